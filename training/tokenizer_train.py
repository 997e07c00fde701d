"""Training Kiln's byte-level BPE tokenizer: `kiln tokenizer train --input FILE... --vocab-size N --out DIR`.

The Hugging Face `tokenizers` trainer does the counting and merging (in Rust, on all cores).
The result is written twice with the same ids: Kiln's format (`tokenizer.tiktoken` +
`tokenizer_config.json`, what `model.tokenizer.load_tokenizer` prefers) and the trainer's own
`tokenizer.json` (what transformers and lm-eval's `hf` backend load).

Ids: single bytes are 0..255 (id == byte value, as in tiktoken's encodings), merges follow in
the order they were learned (so tiktoken's rank-by-id reproduces HF's merge order), and the
special tokens come last. The first special token is the EOS token.

An --out directory that already holds files is refused unless `--overwrite` is given; then the
tokenizer files in it are replaced (any other tokenizer files, e.g. vocab.json, are removed so
the directory holds one tokenizer).
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from model.tokenizer import HF_TOKENIZER_FILE, Tokenizer, bytes_to_unicode, load_hf_tokenizer

from .data import TOKENIZER_FILES, iter_documents

# cl100k / Llama-3 style split: contractions, words with one leading non-letter, digits in
# groups of up to 3, punctuation runs with their newlines, newline runs, other whitespace.
# Written without possessive quantifiers so Oniguruma (HF) and fancy-regex (tiktoken) agree.
KILN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
_UTF8_CHECK_CHUNK = 1 << 20
_SELF_CHECK_CHARS = 200_000  # corpus text encoded by both HF and Kiln after training; ids must agree
# 64x the largest vocabularies in use; the HF trainer reserves ~66 bytes per id up front and aborts the
# process (no exception) when that fails: 2**31 ids asked it for 141 GB
MAX_VOCAB_SIZE = 1 << 24


def check_inputs(input_files: Sequence[str | Path], vocab_size: int, special_tokens: Sequence[str]) -> list[Path]:
    """Raise FileNotFoundError / ValueError naming the first bad input; return the files as paths."""
    if not input_files:
        raise ValueError("no input files given")
    if len(set(special_tokens)) != len(special_tokens) or any(not t for t in special_tokens):
        raise ValueError(f"special tokens must be distinct and non-empty, got {list(special_tokens)}")
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab size {vocab_size} is too small: need at least 256 byte tokens + "
                         f"{len(special_tokens)} special token(s) = {minimum}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab size {vocab_size} is too large: at most {MAX_VOCAB_SIZE}")
    paths = [Path(f) for f in input_files]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input file not found: {path}")
        if not path.is_file():
            raise ValueError(f"input {path} is not a regular file")
        _check_utf8(path)
    return paths


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    consumed = 0  # bytes read before the current chunk
    with path.open("rb") as f:
        while chunk := f.read(_UTF8_CHECK_CHUNK):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                offset = consumed - pending + e.start
                raise ValueError(f"input {path} is not UTF-8 text: invalid byte 0x{e.object[e.start]:02x} "
                                 f"at byte offset {offset}") from None
            consumed += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"input {path} is not UTF-8 text: it ends inside a multi-byte character") from None


def _train_hf(files: list[Path], n_bpe_tokens: int, pattern: str, min_frequency: int):
    """HF byte-level BPE with all 256 bytes in the vocab, no special tokens yet."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe_tokens, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train([str(f) for f in files], trainer=trainer)
    return hf


def _renumber_bytes(hf):
    """Give single byte b the id b (the trainer orders the alphabet by its unicode stand-ins)."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(hf.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    byte_decoder = {char: b for b, char in bytes_to_unicode().items()}
    alphabet = {token: token_id for token, token_id in vocab.items() if token_id < 256}
    if sorted(alphabet.values()) != list(range(256)) or any(t not in byte_decoder for t in alphabet):
        raise RuntimeError("trainer output does not start with the 256 byte-level symbols")
    for token in alphabet:
        vocab[token] = byte_decoder[token]
    return HFTokenizer.from_str(json.dumps(data))


def train_tokenizer(input_files: Sequence[str | Path], vocab_size: int, out_dir: str | Path,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, pattern: str = KILN_PATTERN,
                    *, min_frequency: int = 2, overwrite: bool = False) -> Tokenizer:
    """Train on UTF-8 text files; write Kiln's files and tokenizer.json to `out_dir`; return the tokenizer.

    `vocab_size` counts everything: 256 bytes + merges + special tokens (fewer merges when the
    corpus runs out of pairs seen `min_frequency` times). The first special token is EOS.
    A non-empty `out_dir` is refused unless `overwrite`.
    """
    special_tokens = tuple(special_tokens)
    if not special_tokens:
        raise ValueError("at least one special token (the EOS token) is required")
    files = check_inputs(input_files, vocab_size, special_tokens)
    if min_frequency < 0:
        raise ValueError(f"min frequency must be >= 0, got {min_frequency}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ValueError(f"output {out} already exists and is not empty; pick another directory, or pass "
                         "--overwrite to replace the tokenizer in it")

    with tempfile.TemporaryDirectory() as staging:
        texts = [_as_text_file(f, Path(staging)) for f in files]
        if not any(_has_text(f) for f in texts):  # the trainer would return the 256 bytes and call it done
            raise ValueError(f"the training inputs hold no text ({', '.join(map(str, files[:3]))})")
        files = texts
        hf = _renumber_bytes(_train_hf(files, vocab_size - len(special_tokens), pattern, min_frequency))
        hf.add_special_tokens(list(special_tokens))  # ids after the BPE vocab, in the order given
        hf.save(str(Path(staging) / HF_TOKENIZER_FILE))
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps({"eos_token": special_tokens[0]}))
        # the converter refuses vocabularies whose ranks would not reproduce HF's merge order
        tokenizer = load_hf_tokenizer(staging)
        _self_check(hf, tokenizer, files)
        out.mkdir(parents=True, exist_ok=True)
        for stale in TOKENIZER_FILES:  # another tokenizer's files (vocab.json, merges.txt) would shadow this one
            (out / stale).unlink(missing_ok=True)
        tokenizer.save(out, write_hf_json=False)
        (out / HF_TOKENIZER_FILE).write_bytes((Path(staging) / HF_TOKENIZER_FILE).read_bytes())
    return tokenizer


def _as_text_file(path: Path, staging: Path) -> Path:
    """A `.jsonl` corpus file (one {"text": ...} per line, as `kiln corpus build` writes) -> plain text."""
    if path.suffix != ".jsonl":
        return path
    out = staging / f"{path.stem}.{len(list(staging.glob('*.txt')))}.txt"
    with out.open("w", encoding="utf-8") as dst:
        # kiln prepare's reader: the same documents, and the same errors naming the file and line
        for text in iter_documents(path):
            dst.write(text + "\n\n")
    return out


def _has_text(path: Path) -> bool:
    """Whether a (UTF-8 checked) file holds anything but whitespace."""
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(_UTF8_CHECK_CHUNK):
            if chunk.strip():
                return True
    return False


def _self_check(hf, tokenizer: Tokenizer, files: list[Path]) -> None:
    """Encode the start of the corpus with HF and with Kiln; a difference is a bug, not bad input."""
    with files[0].open(encoding="utf-8") as f:
        sample = f.read(_SELF_CHECK_CHARS)
    expected = hf.encode(sample, add_special_tokens=False).ids
    got = tokenizer.encode(sample)
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise RuntimeError(f"Kiln and HF tokenizations differ at token {at}: {got[at:at + 5]} vs "
                           f"{expected[at:at + 5]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln tokenizer train",
                                     description="Train a byte-level BPE tokenizer (Kiln + Hugging Face files).")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, or .jsonl files of {\"text\": ...} documents")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N",
                        help="total ids: 256 bytes + merges + special tokens")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds files, replacing the tokenizer there")
    parser.add_argument("--special-token", action="append", metavar="TEXT",
                        help=f"special token, repeatable; the first is EOS (default {DEFAULT_SPECIAL_TOKENS[0]})")
    parser.add_argument("--min-frequency", type=int, default=2, metavar="N",
                        help="merge only pairs seen at least N times (default 2)")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(args.input, args.vocab_size, args.out,
                                    special_tokens=tuple(args.special_token or DEFAULT_SPECIAL_TOKENS),
                                    min_frequency=args.min_frequency, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"kiln tokenizer train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.out}: {tokenizer.n_vocab} ids ({len(tokenizer.special_tokens)} special), "
          f"eos {tokenizer.eos_token!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
