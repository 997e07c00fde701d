"""Kiln's tokenizer: a tiktoken `Encoding` built from local files, and a streaming detokenizer.

Owns reading and writing tokenizer files (nothing is ever downloaded):

- Kiln's format: `tokenizer.tiktoken` (tiktoken's `base64(token bytes) rank` lines) and
  `tokenizer_config.json` ({"pattern", "special_tokens", "bos_token", "eos_token",
  "pad_token", "add_bos"}, plus Hugging Face keys so the same directory loads there too).
- Hugging Face byte-level BPE: `tokenizer.json` (GPT-2, Llama-3 or Qwen2 style: a Unicode
  normalization form such as Qwen2's NFC is applied before encoding) or `vocab.json` +
  `merges.txt`, converted to tiktoken ranks through GPT-2's byte <-> unicode table.
- Any other `tokenizer.json` the `tokenizers` library reads and Kiln can stream (SentencePiece-
  style BPE: Llama 2, TinyLlama, Mistral) runs on that library (model/hf_tokenizer.py).

tiktoken merges the adjacent pair whose concatenated bytes has the lowest rank (and takes a
whole pre-token that is a token as is); Hugging Face merges the pairs listed in `merges`, in
order. With rank = HF id they agree when the ids of merge results grow with merge order and
HF's merges rebuild every token from its own bytes (what BPE trainers produce: GPT-2's
vocabulary, ours), or list every split of a token that they do not rebuild (what HF's
converter of tiktoken vocabularies writes: Llama-3's). The converter checks this and refuses
other vocabularies rather than return ids that differ from transformers'.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import tiktoken

if TYPE_CHECKING:
    from .hf_tokenizer import LibraryTokenizer

log = logging.getLogger("kiln.tokenizer")

# What HF's ByteLevel pre-tokenizer splits with when use_regex=True (tokenizers' byte_level.rs).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

KILN_RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"

NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")  # Unicode forms (unicodedata), as HF's normalizers of these names
_HF_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything about a tokenizer except its ranks; saved as tokenizer_config.json."""

    pattern: str
    special_tokens: Mapping[str, int]
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    add_bos: bool = False
    # ids the BPE can never produce but a model may still emit (HF vocab entries no merge makes)
    decode_only_tokens: Mapping[int, bytes] = field(default_factory=dict)
    normalizer: str | None = None  # a Unicode form of NORMALIZERS applied to text before encoding

    def __post_init__(self) -> None:
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise ValueError(f"tokenizer normalizer must be one of {NORMALIZERS} or null, got {self.normalizer!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pattern": self.pattern,
            "special_tokens": dict(self.special_tokens),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos": self.add_bos,
            # read by transformers' AutoTokenizer (with the tokenizer.json written beside it)
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.normalizer is not None:
            out["normalizer"] = self.normalizer
        if self.decode_only_tokens:
            out["decode_only_tokens"] = {str(i): base64.b64encode(raw).decode()
                                         for i, raw in self.decode_only_tokens.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path) -> TokenizerConfig:
        for key, kind in (("pattern", str), ("special_tokens", dict), ("eos_token", str)):
            if not isinstance(data.get(key), kind):
                raise ValueError(f"{source}: key {key!r} must be a {kind.__name__}, got {data.get(key)!r}")
        decode_only = {int(i): base64.b64decode(b) for i, b in data.get("decode_only_tokens", {}).items()}
        return cls(pattern=data["pattern"], special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
                   eos_token=data["eos_token"], bos_token=data.get("bos_token"), pad_token=data.get("pad_token"),
                   add_bos=bool(data.get("add_bos", False)), decode_only_tokens=decode_only,
                   normalizer=data.get("normalizer"))


class TokenText:
    """What both tokenizer kinds derive from `token_bytes` / `decode_bytes` (this one and
    model/hf_tokenizer.py's LibraryTokenizer)."""

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token_text(self, token_id: int) -> str:
        """One token as display text; a token holding part of a UTF-8 character shows as `bytes:\\xe4\\xbd`."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)  # OpenAI's notation for partial characters


class Tokenizer(TokenText):
    """Text <-> ids. Special-token text (e.g. "<|endoftext|>") encodes to its single id."""

    adds_leading_space = False  # byte-level BPE encodes a text as it is (SentencePiece-style ones prepend a space)
    chat_template: str | None = None  # the Jinja chat template shipped beside it, if any (read_chat_template)

    def __init__(self, mergeable_ranks: Mapping[bytes, int], config: TokenizerConfig, name: str = "kiln"):
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"tokenizer {name!r}: byte-level BPE needs all 256 single bytes as tokens; "
                             f"missing {len(missing)}, e.g. bytes {missing[:8]}")
        rank_ids = set(mergeable_ranks.values())
        if len(rank_ids) != len(mergeable_ranks):
            raise ValueError(f"tokenizer {name!r}: two mergeable tokens share a rank")
        rank_bytes = {rank: token for token, rank in mergeable_ranks.items()}
        clash = sorted([i for i in config.decode_only_tokens if i in rank_ids] + [
            i for text, i in config.special_tokens.items() if rank_bytes.get(i, text.encode()) != text.encode()])
        if clash:  # a special token may reuse a BPE id only for the same text (HF added tokens can)
            raise ValueError(f"tokenizer {name!r}: special/decode-only ids {clash[:8]} are also BPE ranks "
                             "of other tokens")
        self.config = config
        self._mergeable_ranks = dict(mergeable_ranks)
        self._decode_only = dict(config.decode_only_tokens)
        try:
            self.encoding = tiktoken.Encoding(name, pat_str=config.pattern, mergeable_ranks=self._mergeable_ranks,
                                              special_tokens=dict(config.special_tokens))
        except ValueError as e:
            raise ValueError(f"tokenizer {name!r}: split pattern {config.pattern!r} does not compile: {e}") from e
        # longest first, so a special token that starts another never cuts it short
        specials = sorted(config.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, specials)) if specials else r"(?!)")
        self.eos_id = self.token_to_id(config.eos_token)
        self.special_ids = frozenset(config.special_tokens.values())  # ids that generated text leaves out
        self.bos_id = None if config.bos_token is None else self.token_to_id(config.bos_token)
        pad_id = None if config.pad_token is None else self.token_to_id(config.pad_token)
        self.pad_id = self.eos_id if pad_id is None else pad_id  # no pad token: pad with EOS (masked anyway)
        if config.add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer {name!r}: add_bos is set but there is no bos_token")
        all_ids = [*rank_ids, *config.special_tokens.values(), *self._decode_only]
        self.n_vocab = max(all_ids) + 1  # ids may have gaps; the model's embedding needs this many rows

    # -- token names ---------------------------------------------------------------------------
    @property
    def eos_token(self) -> str:
        return self.config.eos_token

    @property
    def bos_token(self) -> str | None:
        return self.config.bos_token

    @property
    def pad_token(self) -> str | None:
        return self.config.pad_token

    @property
    def add_bos(self) -> bool:
        return self.config.add_bos

    @property
    def prepends_bos(self) -> bool:
        """True when `encode_prompt` puts the BOS id first."""
        return self.config.add_bos and self.bos_id is not None

    def encode_prompt(self, text: str) -> list[int]:
        """A text as the model reads it: BOS first when this tokenizer adds one."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.prepends_bos else ids

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.config.special_tokens)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._mergeable_ranks)

    def token_to_id(self, text: str) -> int:
        """Id of a token given as text: a special token, or one BPE token's exact UTF-8 text."""
        if text in self.config.special_tokens:
            return self.config.special_tokens[text]
        raw = text.encode("utf-8")
        if raw in self._mergeable_ranks:
            return self._mergeable_ranks[raw]
        for token_id, token in self._decode_only.items():
            if token == raw:
                return token_id
        raise ValueError(f"{text!r} is not a single token of this tokenizer "
                         f"(special tokens: {sorted(self.config.special_tokens)})")

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids for `text`, never adding BOS (callers prepend `bos_id` when `add_bos`)."""
        form = self.config.normalizer
        if form is None:
            if allow_special:
                return self.encoding.encode(text, allowed_special="all")
            return self.encoding.encode_ordinary(text)  # special-token text becomes ordinary bytes
        if not allow_special:
            return self.encoding.encode_ordinary(unicodedata.normalize(form, text))
        # As Hugging Face does: special tokens are found in the text as written, and only the pieces between
        # them are normalized (NFKC would otherwise turn fullwidth "＜EOT＞" into a control token, and NFC
        # "<|endoftext|>" + U+0338 into text)
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids += self.encoding.encode_ordinary(unicodedata.normalize(form, text[start:match.start()]))
            ids.append(self.config.special_tokens[match.group()])
            start = match.end()
        return ids + self.encoding.encode_ordinary(unicodedata.normalize(form, text[start:]))

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._decode_only:
            return self._decode_only[token_id]
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError, TypeError):
            raise ValueError(f"token id {token_id!r} is not in this tokenizer "
                             f"(ids are 0..{self.n_vocab - 1})") from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            return b"".join(self.token_bytes(i) for i in ids)  # decode-only ids, or a clear error

    # -- files ---------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, write_hf_json: bool = True) -> None:
        """Write Kiln's format, and by default a tokenizer.json that transformers loads with the same ids."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(token).decode()} {rank}\n"
                 for token, rank in sorted(self._mergeable_ranks.items(), key=lambda item: item[1])]
        (out / KILN_RANKS_FILE).write_text("".join(lines), encoding="utf-8")
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        if write_hf_json:
            (out / HF_TOKENIZER_FILE).write_text(json.dumps(self.to_hf_json(), ensure_ascii=False), encoding="utf-8")

    def to_hf_json(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face `tokenizer.json` (byte-level BPE, Split regex, same ids)."""
        byte_encoder = bytes_to_unicode()

        def hf_text(token: bytes) -> str:
            return "".join(byte_encoder[b] for b in token)

        ranks = self._mergeable_ranks
        # Every split of a token into two tokens becomes a merge, ordered by the token's rank (as
        # HF's own tiktoken converter does): then HF merges exactly the pairs tiktoken would.
        merges: list[tuple[int, int, int, bytes, bytes]] = []
        for token, rank in ranks.items():
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in ranks and right in ranks:
                    merges.append((rank, ranks[left], ranks[right], left, right))
        merges.sort()
        vocab = {hf_text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
        for token_id, token in self._decode_only.items():
            vocab[hf_text(token)] = token_id
        for text, token_id in self.config.special_tokens.items():
            # HF keeps an added token's id only when its raw text is in the model vocab
            vocab.setdefault(text, token_id)
        added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for text, i in sorted(self.config.special_tokens.items(), key=lambda item: item[1])]
        post_processor = None
        if self.add_bos:
            bos = self.bos_token
            post_processor = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
            }
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None if self.config.normalizer is None else {"type": self.config.normalizer},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.config.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      # tiktoken takes a whole pre-token that is a token as is; decode-only tokens never
                      "ignore_merges": not self._decode_only,
                      "vocab": vocab, "merges": [f"{hf_text(a)} {hf_text(b)}" for *_, a, b in merges]},
        }

    def __repr__(self) -> str:
        return (f"Tokenizer(n_vocab={self.n_vocab}, eos={self.eos_token!r}, bos={self.bos_token!r}, "
                f"add_bos={self.add_bos})")


class IncrementalDetokenizer:
    """Ids in one at a time, text out in whole UTF-8 characters; O(new bytes) per push.

    A character split across byte-level tokens (CJK, emoji) is held until its last byte arrives.
    The concatenation of all pushes and `flush()` equals `tokenizer.decode(ids)`.
    Most pushes find nothing held back and a token of whole characters: its text comes from a cache
    shared by the tokenizer's detokenizers (no decoder call), which a batch of streams hits once per
    token each step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._clean = True  # the decoder holds no bytes of an unfinished character
        self._whole = _whole_token_texts(tokenizer)

    def prime(self, context_ids: list[int]) -> None:
        """Start after `context_ids` (the prompt's last few ids): when they end inside a UTF-8
        character, its first bytes are kept, so the first pushed ids complete it instead of
        decoding as U+FFFD. The context's own text is not returned."""
        self._utf8.reset()
        for token_id in context_ids:
            self._utf8.decode(self.tokenizer.token_bytes(token_id))
        self._clean = not self._utf8.getstate()[0]

    def push(self, token_id: int) -> str:
        if self._clean:
            text = self._whole.get(token_id)
            if text is not None:
                return text
        was_clean = self._clean
        text = self._utf8.decode(self.tokenizer.token_bytes(token_id))
        self._clean = not self._utf8.getstate()[0]
        if was_clean and self._clean:  # from and to a clean state: what this id always decodes to there
            self._whole[token_id] = text
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete tail becomes U+FFFD); the detokenizer starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._clean = True
        return text


def _whole_token_texts(tokenizer) -> dict[int, str]:
    """The tokenizer's cache of id -> text for ids that decode from, and leave, a clean UTF-8 state."""
    cache = getattr(tokenizer, "_whole_token_texts", None)
    if cache is None:
        cache = {}
        tokenizer._whole_token_texts = cache
    return cache


# -- loading -----------------------------------------------------------------------------------
def load_tokenizer(model_dir: str | Path) -> Tokenizer | LibraryTokenizer:
    """Kiln's format if `tokenizer.tiktoken` is there, else Hugging Face files: converted to tiktoken when
    that reproduces them exactly (byte-level BPE), else a `tokenizer.json` run by the `tokenizers` library
    (SentencePiece-style BPE such as Llama 2's; see model/hf_tokenizer.py)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    tokenizer = _load_any(path)
    tokenizer.chat_template = read_chat_template(path)
    return tokenizer


def read_chat_template(model_dir: str | Path) -> str | None:
    """The Jinja chat template shipped with a tokenizer: `chat_template.jinja` (what transformers writes
    now), or `tokenizer_config.json`'s "chat_template" (a string, or named templates: "default")."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not (path / CONFIG_FILE).is_file():
        return None
    try:
        template = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _load_any(path: Path) -> Tokenizer | LibraryTokenizer:
    if (path / KILN_RANKS_FILE).is_file():
        return _load_kiln(path)
    if _has_hf_files(path):
        try:
            return load_hf_tokenizer(path)
        except ValueError as e:
            if not (path / HF_TOKENIZER_FILE).is_file():
                raise
            from .hf_tokenizer import LibraryTokenizer

            try:
                tokenizer = LibraryTokenizer(path)
            except ValueError as library_error:
                raise ValueError(f"{e}; nor can the tokenizers library serve it: {library_error}") from None
            log.info("tokenizer %s runs on the tokenizers library (tiktoken cannot reproduce it: %s)", path, e)
            return tokenizer
    raise FileNotFoundError(
        f"no tokenizer in {str(path)!r}: looked for {KILN_RANKS_FILE} + {CONFIG_FILE} (Kiln), "
        f"{HF_TOKENIZER_FILE}, or {HF_VOCAB_FILE} + {HF_MERGES_FILE} (Hugging Face)")


def load_hf_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Hugging Face byte-level BPE files only, ignoring any Kiln files beside them."""
    path = Path(model_dir)
    if not _has_hf_files(path):
        raise FileNotFoundError(f"no Hugging Face tokenizer in {str(path)!r}: looked for {HF_TOKENIZER_FILE}, "
                                f"or {HF_VOCAB_FILE} + {HF_MERGES_FILE}")
    return _load_hf(path)


def _has_hf_files(path: Path) -> bool:
    return (path / HF_TOKENIZER_FILE).is_file() or (
        (path / HF_VOCAB_FILE).is_file() and (path / HF_MERGES_FILE).is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _load_kiln(path: Path) -> Tokenizer:
    ranks_file, config_file = path / KILN_RANKS_FILE, path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{ranks_file} needs {CONFIG_FILE} beside it (pattern, special_tokens, eos_token)")
    # parsed here rather than with tiktoken.load, which caches files by path in a temp dir
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(ranks_file.read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{ranks_file}:{line_no}: expected 'base64token rank', got {line[:80]!r}") from e
    config = TokenizerConfig.from_json(_read_json(config_file), config_file)
    return Tokenizer(ranks, config, name=f"kiln:{path.name}")


def _token_text(value: Any) -> str | None:
    """HF configs spell a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _split_pattern(pre_tokenizer: Mapping[str, Any] | None, source: Path) -> str:
    """The one regex that reproduces HF's pre-tokenizer, or a ValueError naming what is unsupported."""
    steps = [] if pre_tokenizer is None else (
        pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer])
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or any(k not in ("Split", "ByteLevel") for k in kinds) or len(kinds) > 2:
        raise ValueError(f"{source}: pre_tokenizer {kinds} is not supported; Kiln reads byte-level BPE with "
                         "ByteLevel, or Split(regex) followed by ByteLevel(use_regex=false)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space", False):
        raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported (tiktoken adds no space)")
    if len(steps) == 1:
        if not byte_level.get("use_regex", True):
            raise ValueError(f"{source}: ByteLevel with use_regex=false and no Split step is not supported")
        return GPT2_PATTERN
    split = steps[0]
    regex = split.get("pattern", {}).get("Regex")
    # Isolated keeps the matches as pieces (and any gap between them); Removed + invert keeps only the
    # matches, which is what tiktoken does (gpt-4o's and OLMo's files spell it that way)
    behavior = (split.get("behavior"), bool(split.get("invert")))
    if regex is None or behavior not in (("Isolated", False), ("Removed", True)) or byte_level.get("use_regex", True):
        raise ValueError(f"{source}: only Split(Regex, behavior=Isolated, invert=false, or Removed with "
                         f"invert=true) followed by ByteLevel(use_regex=false) is supported, got {steps}")
    return regex


def _normalizer_form(spec: Mapping[str, Any] | None, source: Path) -> str | None:
    """The Unicode form a tokenizer.json normalizer applies (None for none, or an empty Sequence), or a
    ValueError for anything else."""
    steps = [] if not spec else spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if not kinds:
        return None
    if len(kinds) > 1 or kinds[0] not in NORMALIZERS:
        raise ValueError(f"{source}: normalizer {kinds[0] if len(kinds) == 1 else kinds} is not supported (only "
                         f"the Unicode forms {', '.join(NORMALIZERS)})")
    return kinds[0]


def _template_bos(post_processor: Mapping[str, Any] | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts first (Llama-3's BOS), if any."""
    if not post_processor:
        return None
    if post_processor.get("type") == "Sequence":
        found = [_template_bos(p) for p in post_processor.get("processors", [])]
        return next((f for f in found if f), None)
    single = post_processor.get("single") or []
    if post_processor.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
        return single[0]["SpecialToken"]["id"]
    return None


def _ranks_from_merges(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], ignore_merges: bool,
                       added: set[str], source: Path) -> tuple[dict[bytes, int], set[str]]:
    """tiktoken ranks (= HF ids) for the 256 bytes and every merge result; returns (ranks, used vocab keys)."""
    byte_encoder = bytes_to_unicode()
    byte_decoder = {char: b for b, char in byte_encoder.items()}
    ranks = {bytes([b]): vocab[char] for b, char in byte_encoder.items()}
    used = set(byte_encoder.values())
    previous_id, previous_merge = -1, None
    for index, (left, right) in enumerate(merges):
        merged = left + right
        for piece in (left, right, merged):
            if piece not in vocab:
                raise ValueError(f"{source}: merge #{index} {left!r} + {right!r} uses {piece!r}, not in the vocab")
        merged_id = vocab[merged]
        if merged_id < previous_id:
            raise ValueError(
                f"{source}: vocab ids do not follow merge order (merge #{index} {left!r} + {right!r} -> id "
                f"{merged_id} comes after {previous_merge!r} -> id {previous_id}); tiktoken ranks by id, so "
                "this vocabulary would encode differently from Hugging Face")
        try:
            ranks[bytes(byte_decoder[c] for c in merged)] = merged_id
        except KeyError as e:
            raise ValueError(f"{source}: token {merged!r} is not byte-level text (char {e.args[0]!r})") from None
        used.add(merged)
        previous_id, previous_merge = merged_id, merged
    if ignore_merges:  # HF then also emits any whole pre-token found in the vocab, as tiktoken does
        for token, token_id in vocab.items():
            if token not in used and token not in added and all(c in byte_decoder for c in token):
                ranks[bytes(byte_decoder[c] for c in token)] = token_id
                used.add(token)
    _check_tiktoken_agrees(merges, used, ignore_merges, source)
    return ranks, used


def _check_tiktoken_agrees(merges: Sequence[tuple[str, str]], ranked: set[str], ignore_merges: bool,
                           source: Path) -> None:
    """Refuse vocabularies where tiktoken's rule would merge a pair that HF's merge list does not.

    tiktoken merges any adjacent pair whose concatenation is a token (lowest rank first) and
    takes a whole pre-token that is a token as is; HF merges only listed pairs. With ids in
    merge order they agree when HF's merges rebuild each token from its own bytes (BPE
    trainers guarantee it: then an unlisted pair can never be adjacent), or, for a token they
    do not rebuild, when every split of it into two tokens is listed (as HF's converter of
    tiktoken vocabularies writes them) and HF also takes whole pre-tokens (`ignore_merges`).
    """
    merge_rank: dict[tuple[str, str], int] = {}
    for index, pair in enumerate(merges):
        merge_rank.setdefault(pair, index)
    for token in ranked:  # the vocab strings that get tiktoken ranks
        symbols = list(token)
        while len(symbols) > 1:  # HF's BPE: lowest-ranked listed pair first, leftmost on ties
            best, at = None, 0
            for i in range(len(symbols) - 1):
                rank = merge_rank.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, at = rank, i
            if best is None:
                break
            symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
        if len(symbols) == 1:
            continue
        unlisted = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                    if token[:cut] in ranked and token[cut:] in ranked and (token[:cut], token[cut:]) not in merge_rank]
        if not ignore_merges or unlisted:
            raise ValueError(f"{source}: Hugging Face's BPE splits token {token!r} into {symbols}, but tiktoken "
                             f"would {'keep it whole' if not ignore_merges else f'also merge {unlisted[0]}'}; "
                             "Kiln refuses this vocabulary rather than give different ids")


def _added_token_ids(texts: Sequence[str], vocab: Mapping[str, int], path: Path) -> dict[str, int]:
    """Ids as `tokenizers` assigns them (the ids written in tokenizer.json are only checked there).

    An added token whose raw text is in the model vocab takes that id; any other takes the next
    id after the model vocab (counted by entries) and the added tokens before it.
    """
    model_size, model_ids = len(vocab), set(vocab.values())
    ids: dict[str, int] = {}
    for text in texts:
        if text in ids:
            continue
        if text in vocab:
            ids[text] = vocab[text]
            continue
        biggest = max(ids.values(), default=None)
        new_id = model_size if biggest is None or (biggest < model_size and model_size) else biggest + 1
        if new_id in model_ids:
            raise ValueError(f"{path}: added token {text!r} gets id {new_id} from Hugging Face, which a vocab "
                             f"token already has (the vocab has {model_size} entries but ids up to "
                             f"{max(model_ids)}); put {text!r} in the model vocab with its id")
        ids[text] = new_id
    return ids


def _load_hf(path: Path) -> Tokenizer:
    hf_config = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    special_map = _read_json(path / HF_SPECIAL_TOKENS_FILE) if (path / HF_SPECIAL_TOKENS_FILE).is_file() else {}
    added: list[Mapping[str, Any]] = [
        {"id": int(i), **entry} for i, entry in (hf_config.get("added_tokens_decoder") or {}).items()]
    template_bos = None
    if (path / HF_TOKENIZER_FILE).is_file():
        source = path / HF_TOKENIZER_FILE
        data = _read_json(source)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{source}: model type {model.get('type')!r} is not supported; Kiln reads BPE only")
        normalizer = _normalizer_form(data.get("normalizer"), source)
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{source}: BPE dropout / subword prefix / word suffix are not supported")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = _split_pattern(data.get("pre_tokenizer"), source)
        ignore_merges = bool(model.get("ignore_merges", False))
        added = [*data.get("added_tokens", []), *added]
        template_bos = _template_bos(data.get("post_processor"))
        gpt2_defaults = False
    else:
        source = path / HF_MERGES_FILE
        vocab = _read_json(path / HF_VOCAB_FILE)
        lines = source.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        pattern, ignore_merges, normalizer = GPT2_PATTERN, False, None
        gpt2_defaults = True  # what transformers' GPT2Tokenizer assumes for bare vocab.json + merges.txt
    bad = [tuple(m) for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{source}: merges must be pairs of tokens, got {bad[0]!r}")

    missing = [b for b, char in bytes_to_unicode().items() if char not in vocab]
    if missing:
        raise ValueError(f"{source}: vocabulary lacks {len(missing)} of the 256 byte-level symbols "
                         f"(e.g. bytes {missing[:8]}); it was not trained with ByteLevel.alphabet()")
    # Added tokens are matched in the text before BPE, like tiktoken's special tokens.
    for entry in added:
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise ValueError(f"{path}: added token {entry['content']!r} uses lstrip/rstrip/single_word, "
                             "which tiktoken cannot reproduce")

    def named(key: str) -> str | None:
        return _token_text(hf_config.get(key)) or _token_text(special_map.get(key))

    names = {key: named(key) for key in _HF_SPECIAL_KEYS}
    if gpt2_defaults:
        for key in ("bos_token", "eos_token", "unk_token"):
            names[key] = names[key] or "<|endoftext|>"
    extra = [*(hf_config.get("additional_special_tokens") or []), *(special_map.get("additional_special_tokens") or [])]
    texts = [e["content"] for e in sorted(added, key=lambda e: int(e["id"]))]
    texts += [t for t in (*names.values(), *(_token_text(e) for e in extra)) if t is not None]
    special_tokens = _added_token_ids(texts, vocab, path)
    ranks, used = _ranks_from_merges(vocab, merges, ignore_merges, set(special_tokens), source)

    eos = names["eos_token"]
    if eos is None:
        candidates = [t for t in ("<|endoftext|>", "<|end_of_text|>", "</s>") if t in special_tokens]
        if not candidates and len(special_tokens) == 1:
            candidates = list(special_tokens)
        if not candidates:
            raise ValueError(f"{path}: cannot tell the EOS token; add \"eos_token\" to {CONFIG_FILE} "
                             f"(special tokens: {sorted(special_tokens)})")
        eos = candidates[0]
    add_bos = bool(hf_config["add_bos_token"]) if "add_bos_token" in hf_config else template_bos is not None
    bos = names["bos_token"] or template_bos
    special_ids = set(special_tokens.values())
    byte_decoder = {char: b for b, char in bytes_to_unicode().items()}
    decode_only = {token_id: _vocab_bytes(token, byte_decoder) for token, token_id in vocab.items()
                   if token not in used and token_id not in special_ids}
    config = TokenizerConfig(pattern=pattern, special_tokens=special_tokens, eos_token=eos, bos_token=bos,
                             pad_token=names["pad_token"], add_bos=add_bos, decode_only_tokens=decode_only,
                             normalizer=normalizer)
    return Tokenizer(ranks, config, name=f"hf:{path.name}")


def _vocab_bytes(token: str, byte_decoder: Mapping[str, int]) -> bytes:
    """Bytes of a byte-level vocab string; characters outside GPT-2's table are taken as UTF-8 text."""
    return b"".join(bytes([byte_decoder[c]]) if c in byte_decoder else c.encode("utf-8") for c in token)
