"""model/tokenizer.py against transformers: same ids from the same files, streaming, errors.

Fixtures are byte-level BPEs trained here with `tokenizers` on generated text (seeded), saved
as GPT-2 does (vocab.json + merges.txt), as tokenizer.json, and Llama-3 style (Split regex,
BOS template). Nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from model.tokenizer import (GPT2_PATTERN, IncrementalDetokenizer, Tokenizer, bytes_to_unicode, load_hf_tokenizer,
                             load_tokenizer)

EOS = "<|endoftext|>"
LLAMA_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = ("the quick brown fox jumps over lazy dog and then returns to its den where it sleeps "
         "tokenizer model server request stream batch cache attention layer weight").split()
CJK = "床前明月光疑是地上霜举头望低思故乡我们的人工智能模型正在学习中文字符"
EMOJI = "🙂🚀🔥👍🏽❤️✨🎉😀"
CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i ** 2)\n",
        "if (x != 0 && y >= 1) { z = x / y; }\n", "SELECT id, name FROM users WHERE age > 30;\n"]

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it? We've 2 DOGS.",
    "code": "def add(a, b):\n    return a + b\n\n\nclass Foo(Bar):\n\tpass  # comment\n{'k': [1, 2]}",
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。龘",
    "emoji": "hi 🙂🚀 family 👨‍👩‍👧 thumbs 👍🏽 flag 🇯🇵 ❤️‍🔥",
    "whitespace": "a  b   c\n\n\n  d\t\t e \r\n f    \n   g\u00a0h\u3000i\u2003j \u0085k\x0bl\x0cm\x1cn     ",
    "digits": "1 12 123 1234 12345 3.14159 2,718,281 1000000 ١٢٣ ½ x2y",
    "special": "start<|endoftext|>middle <|endoftext|> end<|endoftext|>",
    "empty": "",
    "accents": "café naïve résumé Ünïcödé e\u0301 ß İ ﬁ",
}


def corpus(seed: int = 0, n_docs: int = 200) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(10, 30)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(WORDS) + rng.choice([" ", " ", ", ", ". ", "\n", "  "]))
            elif r < 0.65:
                parts.append(f"{rng.randint(0, 10 ** rng.randint(1, 7))} ")
            elif r < 0.8:
                parts.append("".join(rng.choice(CJK[:20]) for _ in range(rng.randint(1, 6))) + "，")
            elif r < 0.85:
                parts.append(rng.choice(EMOJI[:4]))
            else:
                parts.append(rng.choice(CODE))
        docs.append("".join(parts))
    return docs


def train_bpe(pre_tokenizer, vocab_size: int, ignore_merges: bool = False, specials=()):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials), show_progress=False)
    hf.train_from_iterator(corpus(), trainer=trainer)
    return hf


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """GPT-2 style BPE saved two ways: vocab.json + merges.txt (EOS last) and tokenizer.json."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=599)
    root = tmp_path_factory.mktemp("gpt2_tok")
    vm_dir, json_dir = root / "vocab_merges", root / "tokenizer_json"
    vm_dir.mkdir()
    hf.model.save(str(vm_dir))
    vocab = json.loads((vm_dir / "vocab.json").read_text())
    vocab[EOS] = len(vocab)  # as in GPT-2: <|endoftext|> = the last id
    (vm_dir / "vocab.json").write_text(json.dumps(vocab))
    hf.add_special_tokens([EOS])
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=EOS).save_pretrained(str(json_dir))
    return vm_dir, json_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-3 style: Split(regex) + ByteLevel(use_regex=False), ignore_merges, BOS template."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA_PATTERN), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf = train_bpe(pre, vocab_size=600, ignore_merges=True)
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos_id = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bos_id)])
    out = tmp_path_factory.mktemp("llama_tok")
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(str(out))
    return out


def hf_ids(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer.encode(text, add_special_tokens=False)


def assert_same_ids(kiln: Tokenizer, hf_tokenizer, texts: dict[str, str]) -> None:
    for name, text in texts.items():
        got, want = kiln.encode(text), hf_ids(hf_tokenizer, text)
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert got == want, (f"{name}: ids differ from HF at position {at}: "
                             f"kiln {got[at:at + 6]} vs HF {want[at:at + 6]}")


def random_texts(seed: int, n: int) -> dict[str, str]:
    rng = random.Random(seed)
    pool = "abcXYZ019 \n\t.,'!?()#_" + CJK + EMOJI + "\u00a0\u3000\r\x0bé"
    return {f"random{i}": "".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for i in range(n)}


# -- ids equal transformers' ------------------------------------------------------------------
def test_vocab_merges_ids_match_gpt2_tokenizer(gpt2_dirs):
    from transformers import GPT2TokenizerFast

    vm_dir, _ = gpt2_dirs
    reference = GPT2TokenizerFast(vocab=str(vm_dir / "vocab.json"), merges=str(vm_dir / "merges.txt"))
    tok = load_tokenizer(vm_dir)
    assert tok.config.pattern == GPT2_PATTERN
    assert_same_ids(tok, reference, {**TEXTS, **random_texts(1, 200)})
    assert (tok.eos_token, tok.eos_id, tok.n_vocab) == (EOS, reference.eos_token_id, len(reference))
    assert tok.add_bos is False and not tok.prepends_bos
    assert tok.encode_prompt(TEXTS["english"]) == tok.encode(TEXTS["english"])


def test_tokenizer_json_ids_match_transformers(gpt2_dirs):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, json_dir = gpt2_dirs
    tok = load_tokenizer(json_dir)
    by_file = PreTrainedTokenizerFast(tokenizer_file=str(json_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(json_dir))
    texts = {**TEXTS, **random_texts(2, 200)}
    assert_same_ids(tok, by_file, texts)
    assert_same_ids(tok, auto, texts)
    assert (tok.eos_id, tok.n_vocab, tok.bos_id, tok.pad_id) == (auto.eos_token_id, len(auto), None, tok.eos_id)


def test_both_gpt2_layouts_give_the_same_tokenizer(gpt2_dirs):
    vm, js = (load_tokenizer(d) for d in gpt2_dirs)
    assert vm.mergeable_ranks == js.mergeable_ranks
    assert vm.special_tokens == js.special_tokens == {EOS: 599}


def test_llama_style_split_regex_and_bos(llama_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(llama_dir)
    auto = AutoTokenizer.from_pretrained(str(llama_dir))
    assert tok.config.pattern == LLAMA_PATTERN
    assert tok.add_bos and (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (tok.bos_id, tok.eos_id) == (auto.bos_token_id, auto.eos_token_id)
    texts = {k: v.replace(EOS, "<|end_of_text|>") for k, v in {**TEXTS, **random_texts(3, 200)}.items()}
    assert_same_ids(tok, auto, texts)
    for text in texts.values():  # transformers adds BOS by default; Kiln's encode_prompt does
        assert auto.encode(text) == [tok.bos_id] + tok.encode(text) == tok.encode_prompt(text)


def test_add_bos_token_from_tokenizer_config(gpt2_dirs, tmp_path):
    vm_dir, _ = gpt2_dirs
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vm_dir / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": {"content": EOS}, "pad_token": EOS}))
    tok = load_tokenizer(tmp_path)
    assert (tok.add_bos, tok.bos_id, tok.pad_token, tok.pad_id) == (True, 599, EOS, 599)


def test_shared_conftest_tokenizer_matches_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_dir)
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert_same_ids(tok, auto, {**TEXTS, **random_texts(4, 50)})
    assert (tok.eos_id, tok.n_vocab) == (auto.eos_token_id, len(auto))


# -- special tokens, decoding, display ----------------------------------------------------------
def test_special_token_text_is_one_id(gpt2_dirs):
    tok = load_tokenizer(gpt2_dirs[1])
    assert tok.encode(EOS) == [tok.eos_id] == [599]
    ids = tok.encode(f"a{EOS}b")
    assert ids == tok.encode("a") + [599] + tok.encode("b")
    plain = tok.encode(EOS, allow_special=False)
    assert len(plain) > 1 and 599 not in plain and tok.decode(plain) == EOS
    assert tok.token_to_id(EOS) == 599


def test_round_trip_and_decode_bytes(gpt2_dirs, llama_dir):
    for tok in (load_tokenizer(gpt2_dirs[0]), load_tokenizer(llama_dir)):
        for name, text in {**TEXTS, **random_texts(5, 300)}.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, name
            assert tok.decode_bytes(ids) == text.encode("utf-8"), name


def test_id_to_token_text(gpt2_dirs):
    tok = load_tokenizer(gpt2_dirs[1])
    assert tok.id_to_token_text(599) == EOS
    assert tok.id_to_token_text(tok.encode("the")[0]) == "the"
    partial = tok.mergeable_ranks[b"\xf0"]  # first byte of every 4-byte character (emoji)
    assert tok.id_to_token_text(partial) == "bytes:\\xf0"
    # every single-token display string is the token's bytes, in text or \x notation
    for token_id in range(tok.n_vocab):
        shown, raw = tok.id_to_token_text(token_id), tok.token_bytes(token_id)
        if shown.startswith("bytes:"):
            assert bytes.fromhex(shown[6:].replace("\\x", "")) == raw
        else:
            assert shown.encode("utf-8") == raw


def test_unknown_id_is_a_clear_error(gpt2_dirs):
    tok = load_tokenizer(gpt2_dirs[1])
    for bad in (tok.n_vocab, -1, 10 ** 12):
        with pytest.raises(ValueError, match=f"token id {bad} is not in this tokenizer"):
            tok.decode([1, bad])


# -- streaming ----------------------------------------------------------------------------------
def test_incremental_detokenizer_yields_whole_characters(gpt2_dirs):
    tok = load_tokenizer(gpt2_dirs[1])
    text = "床前明月光，疑是地上霜。龘🙂🚀👨‍👩‍👧 ok 👍🏽！"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    held = sum(1 for p in pieces if p == "")
    assert held >= 3, f"expected characters split across tokens to be held back, {held} empty pushes"
    # each piece is exactly the new whole characters: prefixes of the text, in order
    assert all(text.startswith("".join(pieces[:k])) for k in range(len(pieces) + 1))


def test_incremental_detokenizer_matches_decode_on_random_ids(gpt2_dirs):
    tok = load_tokenizer(gpt2_dirs[1])
    rng = random.Random(6)
    for _ in range(200):  # random ids make invalid UTF-8 too: replacement chars must match decode()
        ids = [rng.randrange(tok.n_vocab) for _ in range(rng.randint(1, 12))]
        detok = IncrementalDetokenizer(tok)
        streamed = "".join(detok.push(i) for i in ids) + detok.flush()
        assert streamed == tok.decode(ids), ids
        assert detok.flush() == "" and detok.push(tok.encode("a")[0]) == "a"  # reusable after flush


def test_stream_primed_with_a_prompt_that_ends_inside_a_character(gpt2_dirs):
    """A token-id prompt may stop in the middle of a UTF-8 character; the output that completes it
    must decode to the character, not to U+FFFD."""
    from model.text_stream import TextStream

    tok = load_tokenizer(gpt2_dirs[1])
    text = "床前明月光，疑是地上霜。🙂🚀 ok"
    ids = tok.encode(text)
    splits = [k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k])]  # cuts inside a character
    assert splits, "the sample must have a character split across tokens"
    for k in splits:
        prompt, rest = ids[:k], ids[k:]
        stream = TextStream(tok, context_ids=prompt[-4:])
        out = "".join(stream.push(i) for i in rest) + stream.finish()
        # the output starts at the character the prompt left unfinished, and is whole
        assert out == text[len(tok.decode(prompt).rstrip("\ufffd")):]
        unprimed = TextStream(tok)
        assert ("".join(unprimed.push(i) for i in rest) + unprimed.finish()).startswith("\ufffd")


# -- Kiln's own format --------------------------------------------------------------------------
def test_save_writes_kiln_format_that_reloads_and_transformers_reads(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(llama_dir)
    tok.save(tmp_path)
    lines = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    assert len(lines) == len(tok.mergeable_ranks)
    token_b64, rank = lines[0].split()
    assert tok.mergeable_ranks[base64.b64decode(token_b64)] == int(rank)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("special_tokens", "bos_token", "eos_token", "pad_token", "add_bos")} == {
        "special_tokens": tok.special_tokens, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "pad_token": None, "add_bos": True}
    again = load_tokenizer(tmp_path)  # tokenizer.tiktoken wins over tokenizer.json
    assert again.encoding.name.startswith("kiln:")
    assert (again.mergeable_ranks, again.special_tokens, again.config.pattern) == (
        tok.mergeable_ranks, tok.special_tokens, tok.config.pattern)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id, True)
    texts = {k: v.replace(EOS, "<|end_of_text|>") for k, v in {**TEXTS, **random_texts(7, 100)}.items()}
    auto = AutoTokenizer.from_pretrained(str(tmp_path))  # the regenerated tokenizer.json
    assert_same_ids(again, auto, texts)
    assert_same_ids(again, AutoTokenizer.from_pretrained(str(llama_dir)), texts)
    assert load_hf_tokenizer(tmp_path).mergeable_ranks == tok.mergeable_ranks


def test_qwen2_style_nfc_normalizer(tmp_path_factory, tmp_path):
    """Qwen2's tokenizer.json: Split(regex) + ByteLevel, and an NFC normalizer before both: decomposed
    text ("e" + combining acute) must get the ids of its composed form, as transformers gives."""
    import unicodedata

    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA_PATTERN), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf = train_bpe(pre, vocab_size=600, specials=[EOS, "<|im_start|>", "<|im_end|>"])
    hf.normalizer = normalizers.NFC()
    out = tmp_path_factory.mktemp("qwen_tok")
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=EOS, pad_token=EOS).save_pretrained(str(out))
    tok, auto = load_tokenizer(out), AutoTokenizer.from_pretrained(str(out))
    assert tok.config.normalizer == "NFC"
    decomposed = "cafe\u0301 A\u030angstro\u0308m \u1100\u1161 \u5e8a\u524d e\u0301e\u0301"
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    texts = {**TEXTS, **random_texts(8, 100), "decomposed": decomposed, "chat": "<|im_start|>user\nhi<|im_end|>",
             # NFC would merge ">" + U+0338 into one character; HF finds special tokens before normalizing
             "special then combining": "<|endoftext|>\u0338 x <|im_end|>\u0301"}
    assert_same_ids(tok, auto, texts)
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))
    tok.save(tmp_path)  # Kiln's files keep the form, and the tokenizer.json written beside them too
    again = load_tokenizer(tmp_path)
    assert again.config.normalizer == "NFC"
    assert_same_ids(again, auto, texts)
    assert_same_ids(again, AutoTokenizer.from_pretrained(str(tmp_path)), texts)


def test_nfkc_does_not_turn_fullwidth_text_into_special_tokens(tmp_path):
    """NFKC maps fullwidth "＜EOT＞" to "<EOT>": user text must stay text, as transformers encodes it."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=500, specials=["<EOT>", "<META>"])
    hf.normalizer = normalizers.NFKC()
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<EOT>").save_pretrained(str(tmp_path))
    tok, reference = load_tokenizer(tmp_path), PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert tok.config.normalizer == "NFKC"
    texts = {"fullwidth": "\uff1cEOT\uff1e x \uff1cMETA\uff1e", "real": "a<EOT>b<META>", "ligature": "\ufb01ne \u2460"}
    assert_same_ids(tok, reference, texts)
    assert tok.eos_id not in tok.encode(texts["fullwidth"])


def test_split_removed_inverted_is_tiktoken_and_an_empty_normalizer_is_none(llama_dir, tmp_path):
    """gpt-4o's and OLMo's tokenizer.json spell the split as behavior=Removed, invert=true (keep only the
    matches: tiktoken's rule); DeepSeek's carries an empty normalizer Sequence."""
    from transformers import PreTrainedTokenizerFast

    data = json.loads((llama_dir / "tokenizer.json").read_text())
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["behavior"], split["invert"] = "Removed", True
    data["normalizer"] = {"type": "Sequence", "normalizers": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = load_hf_tokenizer(tmp_path)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert tok.config.normalizer is None
    texts = {**TEXTS, **random_texts(9, 100)}
    assert_same_ids(tok, reference, {k: v.replace(EOS, "<|end_of_text|>") for k, v in texts.items()})


# -- errors -------------------------------------------------------------------------------------
def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.tiktoken.*tokenizer\.json.*vocab\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.tiktoken").write_text("")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def _tiny_vocab_json(tmp_path: Path, merges: list[tuple[str, str]], extra: dict[str, int],
                     ignore_merges: bool = False) -> Path:
    """A hand-made GPT-2 style tokenizer.json: the 256 byte symbols, then `extra` tokens."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    vocab = {char: b for b, char in bytes_to_unicode().items()} | extra
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": 999, "content": EOS, "special": True, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False}],
            "pre_tokenizer": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges,
                      "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return tmp_path


def test_tiny_consistent_vocab_loads(tmp_path):
    from transformers import PreTrainedTokenizerFast

    d = _tiny_vocab_json(tmp_path, [("a", "b"), ("ab", "c")], {"ab": 256, "abc": 257})
    tok = load_tokenizer(d)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert_same_ids(tok, reference, {"t": "abc abcab xabcx <|endoftext|>"})
    # tokenizers ignores the id 999 written for an added token outside the vocab: next free id
    assert tok.encode("abc") == [257] and tok.eos_id == reference.convert_tokens_to_ids(EOS) == 258


def test_vocab_token_no_merge_makes_is_decode_only(tmp_path):
    from transformers import PreTrainedTokenizerFast

    d = _tiny_vocab_json(tmp_path / "hf", [("a", "b")], {"ab": 256, "zz": 257})
    tok = load_tokenizer(d)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert_same_ids(tok, reference, {"t": "zz abzz zzz"})
    assert tok.encode("zz") == [ord("z")] * 2 and tok.decode([257, 256]) == "zzab" and tok.n_vocab == 259
    tok.save(tmp_path / "kiln")
    for again, hf in ((load_tokenizer(tmp_path / "kiln"), None),
                      (load_hf_tokenizer(tmp_path / "kiln"),
                       PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "kiln" / "tokenizer.json")))):
        assert again.decode([257, 256]) == "zzab" and again.encode("zz abzz") == tok.encode("zz abzz")
        if hf is not None:
            assert_same_ids(again, hf, {"t": "zz abzz zzz <|endoftext|>"})


def assert_runs_on_the_library(d: Path, texts: dict[str, str]) -> None:
    """A tokenizer.json tiktoken cannot reproduce: load_tokenizer serves it through the tokenizers
    library instead, with transformers' ids."""
    from transformers import PreTrainedTokenizerFast

    from model.hf_tokenizer import LibraryTokenizer

    tok = load_tokenizer(d)
    assert isinstance(tok, LibraryTokenizer) and tok.kind == "byte-level"
    reference = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert_same_ids(tok, reference, texts)
    for text in texts.values():
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids) == text


def test_vocab_not_in_merge_order_is_refused_by_tiktoken(tmp_path):
    d = _tiny_vocab_json(tmp_path, [("a", "b"), ("ab", "c")], {"ab": 257, "abc": 256})
    with pytest.raises(ValueError, match="do not follow merge order"):
        load_hf_tokenizer(d)
    assert_runs_on_the_library(d, {"t": "abc abcab xabcx <|endoftext|>", "u": "ab \u00e9 \U0001f642"})


def test_merges_that_cannot_rebuild_a_token_are_refused_by_tiktoken(tmp_path):
    # "abc" comes from ab + c, but b + c merges first, so HF never makes "abc"; tiktoken would
    d = _tiny_vocab_json(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c")], {"bc": 256, "ab": 257, "abc": 258})
    with pytest.raises(ValueError, match="splits token 'abc'"):
        load_hf_tokenizer(d)
    assert_runs_on_the_library(d, {w: w for w in ("abc", "xabc", "abcabc", "aabc", "ab bc abc")})


def test_tiktoken_style_merges_listing_every_split_load(tmp_path):
    from transformers import PreTrainedTokenizerFast

    # HF's own BPE does not rebuild "abc" (b + c merges first), but every split of it is listed
    # and whole pre-tokens are taken as is: HF then agrees with tiktoken, as for Llama-3
    d = _tiny_vocab_json(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")],
                         {"bc": 256, "ab": 257, "abc": 258}, ignore_merges=True)
    tok = load_tokenizer(d)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert_same_ids(tok, reference, {w: w for w in ("abc", "xabc", "abcabc", "aabc", "abcc", "ab bc abc")})
    assert tok.encode("xabc") == [ord("x"), 258]


def test_unsupported_hf_files_are_refused(tmp_path):
    """What the tiktoken conversion refuses (load_hf_tokenizer); load_tokenizer then runs such files on the
    tokenizers library, and refuses only what Kiln cannot stream text from (naming both reasons)."""
    d = _tiny_vocab_json(tmp_path, [("a", "b")], {"ab": 256})
    data = json.loads((d / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="add_prefix_space"):
        load_hf_tokenizer(d)
    data["pre_tokenizer"]["add_prefix_space"] = False
    data["normalizer"] = {"type": "Lowercase"}
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="normalizer Lowercase is not supported"):
        load_hf_tokenizer(d)
    assert_runs_on_the_library(d, {"t": "ab abab x", "lower": "ab"})
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Whitespace"):
        load_hf_tokenizer(d)
    data["pre_tokenizer"] = data["decoder"]
    del data["model"]["vocab"]["Ġ"]
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks 1 of the 256 byte-level symbols"):
        load_hf_tokenizer(d)
    data["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    data["pre_tokenizer"]["add_prefix_space"] = True
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"add_prefix_space.*nor can the tokenizers library serve it: .*decoder "
                                         r"\['WordPiece'\] is not supported"):
        load_tokenizer(d)


def test_bad_kiln_files(tmp_path, gpt2_dirs):
    load_tokenizer(gpt2_dirs[1]).save(tmp_path, write_hf_json=False)
    assert not (tmp_path / "tokenizer.json").exists()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="'<\\|nope\\|>' is not a single token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pattern": "(unclosed"}))
    with pytest.raises(ValueError, match="does not compile"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with (tmp_path / "tokenizer.tiktoken").open("a") as f:
        f.write("not-a-line\n")
    with pytest.raises(ValueError, match=r"tokenizer\.tiktoken:\d+: expected 'base64token rank'"):
        load_tokenizer(tmp_path)
