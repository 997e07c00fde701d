"""Hugging Face `tokenizer.json` files that tiktoken cannot reproduce, run by the `tokenizers` library.

Kiln's own tokenizer is tiktoken (model/tokenizer.py), and Hugging Face byte-level BPE files
convert to it exactly when their merges allow. Two kinds do not:

- SentencePiece-style BPE (Llama 2, TinyLlama, Mistral, Vicuna): spaces become "▁", a word
  start gets one prepended, and characters missing from the vocabulary fall back to byte tokens
  `<0x00>`..`<0xFF>`;
- byte-level vocabularies whose merges tiktoken's rank order would apply differently.

`LibraryTokenizer` encodes and decodes those with Hugging Face's own library (already a
dependency of `kiln tokenizer train`), so ids are the ones tokenizer.json defines (what
transformers' PreTrainedTokenizerFast gives; transformers 5's LlamaTokenizer class rebuilds Llama
2's normalization itself and can differ at a leading space, which is why `kiln export --format hf`
names PreTrainedTokenizerFast), and exposes the interface the engine and server use
(`Tokenizer`'s). Streaming needs each token's bytes: for SentencePiece vocabularies "▁" is a
space and `<0xHH>` the byte HH; for byte-level ones GPT-2's byte <-> unicode table. The space a SentencePiece tokenizer prepends to a text is not
part of the text: `decode` drops it as transformers does, and `adds_leading_space` tells the
server's echo to drop it from a prompt's first token.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from .tokenizer import TokenText, _read_json, _template_bos, _token_text, bytes_to_unicode

SPIECE_SPACE = "▁"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _steps(component: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """The steps of a (maybe Sequence) normalizer / pre-tokenizer / decoder."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [s for part in component.get(key, []) for s in _steps(part, key)]
    return [component]


class LibraryTokenizer(TokenText):
    """Text <-> ids through `tokenizers.Tokenizer`, with Kiln's Tokenizer interface."""

    chat_template: str | None = None  # set by load_tokenizer

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        source = path / "tokenizer.json"
        data = _read_json(source)
        self.source_dir = path
        decoders = [s.get("type") for s in _steps(data.get("decoder"), "decoders")]
        if "ByteLevel" in decoders:
            self.kind = "byte-level"
        elif "Metaspace" in decoders or any(
                s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == SPIECE_SPACE
                for s in _steps(data.get("decoder"), "decoders")):
            self.kind = "sentencepiece"
        else:
            raise ValueError(f"{source}: decoder {decoders or None} is not supported; Kiln streams text from "
                             "byte-level (ByteLevel) or SentencePiece-style (Metaspace / Replace '▁' + ByteFallback) "
                             "tokenizers")
        self.adds_leading_space = self.kind == "sentencepiece" and self._prepends_space(data)
        try:
            self._hf = HFTokenizer.from_file(str(source))
            self._hf_plain = HFTokenizer.from_file(str(source))  # special-token text as ordinary text
            self._hf_plain.encode_special_tokens = True
        except Exception as e:  # noqa: BLE001 -- the library's own parse errors
            raise ValueError(f"{source}: the tokenizers library cannot load it: {e}") from None

        vocab = self._hf.get_vocab(with_added_tokens=True)  # text -> id
        self.n_vocab = max(vocab.values()) + 1
        added = self._hf.get_added_tokens_decoder()  # id -> AddedToken
        specials = {tok.content: i for i, tok in added.items() if tok.special}
        hf_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        special_map = (_read_json(path / "special_tokens_map.json")
                       if (path / "special_tokens_map.json").is_file() else {})

        def named(key: str) -> str | None:
            text = _token_text(hf_config.get(key)) or _token_text(special_map.get(key))
            return text if text in vocab else None

        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if named(key) is not None:
                specials.setdefault(named(key), vocab[named(key)])
        eos = named("eos_token") or next((t for t in ("</s>", "<|endoftext|>", "<|end_of_text|>") if t in vocab), None)
        if eos is None:
            raise ValueError(f"{path}: cannot tell the EOS token; add \"eos_token\" to tokenizer_config.json")
        self._eos_token, self.eos_id = eos, vocab[eos]
        specials.setdefault(eos, self.eos_id)
        template_bos = _template_bos(data.get("post_processor"))
        self._bos_token = named("bos_token") or template_bos
        self.bos_id = None if self._bos_token is None else vocab.get(self._bos_token)
        self._add_bos = (bool(hf_config["add_bos_token"]) if "add_bos_token" in hf_config
                         else template_bos is not None) and self.bos_id is not None
        self._pad_token = named("pad_token")
        self.pad_id = self.eos_id if self._pad_token is None else vocab[self._pad_token]
        self._special_tokens = specials
        self.special_ids = frozenset(specials.values())

        byte_fallback = bool((data.get("model") or {}).get("byte_fallback"))
        self._bytes: list[bytes] = [b""] * self.n_vocab
        if self.kind == "byte-level":
            byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
            for text, i in vocab.items():
                if i in added:  # added tokens are stored as their text, not byte-level symbols
                    self._bytes[i] = text.encode("utf-8")
                else:
                    self._bytes[i] = b"".join(bytes([byte_decoder[c]]) if c in byte_decoder else c.encode("utf-8")
                                              for c in text)
        else:
            for text, i in vocab.items():
                match = _BYTE_TOKEN.fullmatch(text) if byte_fallback else None
                self._bytes[i] = bytes([int(match.group(1), 16)]) if match else \
                    text.replace(SPIECE_SPACE, " ").encode("utf-8")
        self._ids_by_bytes: dict[bytes, int] = {}
        for i, raw in enumerate(self._bytes):
            self._ids_by_bytes.setdefault(raw, i)

    @staticmethod
    def _prepends_space(data: Mapping[str, Any]) -> bool:
        """Whether encoding puts a "▁" before the text (Prepend normalizer, or Metaspace prepending)."""
        for step in _steps(data.get("normalizer"), "normalizers"):
            if step.get("type") == "Prepend" and step.get("prepend") == SPIECE_SPACE:
                return True
        for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
            if step.get("type") == "Metaspace":
                scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
                return scheme in ("always", "first")
        return False

    # -- the Tokenizer interface ------------------------------------------------------------------
    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def prepends_bos(self) -> bool:
        return self._add_bos

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids for `text` (transformers' `encode(text, add_special_tokens=False)`), never adding BOS."""
        return (self._hf if allow_special else self._hf_plain).encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.encode(text)
        return [self.bos_id] + ids if self.prepends_bos else ids

    def token_to_id(self, text: str) -> int:
        if text in self._special_tokens:
            return self._special_tokens[text]
        raw = text.encode("utf-8")
        if raw in self._ids_by_bytes:
            return self._ids_by_bytes[raw]
        raise ValueError(f"{text!r} is not a single token of this tokenizer "
                         f"(special tokens: {sorted(self._special_tokens)})")

    def token_bytes(self, token_id: int) -> bytes:
        if not isinstance(token_id, int) or not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id!r} is not in this tokenizer (ids are 0..{self.n_vocab - 1})")
        return self._bytes[token_id]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        raw = b"".join(self.token_bytes(i) for i in ids)
        if self.adds_leading_space and raw.startswith(b" "):
            first = next((i for i in ids if i not in self.special_ids), None)
            if first is not None and self._bytes[first].startswith(b" "):
                raw = raw[1:]  # the space encoding prepended, as transformers' decode drops it
        return raw

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer's files (they are the format)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            if (self.source_dir / name).is_file() and (self.source_dir / name).resolve() != (out / name).resolve():
                shutil.copyfile(self.source_dir / name, out / name)

    def __repr__(self) -> str:
        return (f"LibraryTokenizer({self.kind}, n_vocab={self.n_vocab}, eos={self.eos_token!r}, "
                f"bos={self.bos_token!r}, add_bos={self.add_bos})")
