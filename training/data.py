"""Token files: `kiln prepare` (text -> train.bin / val.bin) and the deterministic window sampler.

    kiln prepare --tokenizer DIR --input FILE|DIR [FILE|DIR ...] --out DIR [--val-fraction 0.005]
    kiln prepare --tokenizer DIR --train-input FILE|DIR ... --val-input FILE|DIR ... --out DIR

Input documents: a `.txt` file is one document unless it has separator lines
`<|endoftext|>` (or the tokenizer's EOS text) between documents; a `.jsonl` file holds one
`{"text": ...}` object per line; a directory stands for all its `.txt` / `.jsonl` files
(recursively, sorted). A directory with `train/` and `val/` subdirectories (what
`kiln corpus build` writes: a held-out validation split by document) is read as those two
splits. Otherwise each document goes to val when a seeded hash of its text falls below
`--val-fraction`; when that leaves val empty (a corpus of a few documents), the last
`val_fraction` of the train tokens become val instead.

Output in `--out`: `train.bin` and `val.bin`, flat arrays of token ids (uint16 when the
vocabulary fits, else uint32; read with `np.memmap`), every document followed by EOS (and
preceded by BOS when the tokenizer adds one); `tokenizer/` (a copy of the tokenizer files);
and `meta.json` (dtype, vocab size, EOS/BOS ids, the tokenizer directory, per split token
and document counts).

Tokenizing runs in a process pool over chunks of documents, in order, so the output does not
depend on the number of workers. Input that is not UTF-8, not valid JSON lines, or not a
.txt/.jsonl file stops the run with an error naming the file and line; nothing is skipped
silently, and nothing is written until every input has been read.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

META_FILE = "meta.json"
META_FORMAT = "kiln-tokens-v1"
SPLITS = ("train", "val")
DOC_SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")
DEFAULT_CHUNK_BYTES = 4 << 20


class DataError(ValueError):
    """Input that cannot be prepared; the message names the file (and line) and the problem."""


# ------------------------------------------------------------------------------- reading text
def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """The .txt/.jsonl files named by `paths` (directories expand recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"input directory {str(path)!r} has no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise DataError(f"input file {str(path)!r} is neither .txt (text) nor .jsonl ({{\"text\": ...}} lines)")
            files.append(path)
        elif path.exists():
            raise DataError(f"input {str(path)!r} is neither a regular file nor a directory")
        else:
            raise DataError(f"input {str(path)!r} does not exist")
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line); a non-UTF-8 byte stops with the file, line and byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not UTF-8 text ({e.reason} at byte "
                                f"{offset + e.start} of the file)") from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            yield line_no, line


def iter_documents(path: Path, separators: Sequence[str] = (DOC_SEPARATOR,)) -> Iterator[str]:
    """The documents of one .txt or .jsonl file."""
    if path.suffix == ".jsonl":
        for line_no, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}, line {line_no}: expected an object with a string \"text\" field")
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{path}, line {line_no}: \"text\" must be a string, got {_json_type(text)}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a \ud800 escape decodes to a lone surrogate: not text
                raise DataError(f"{path}, line {line_no}: \"text\" holds a lone surrogate "
                                f"(\\u{ord(e.object[e.start]):04x}), which is not valid Unicode text") from None
            yield text
        return
    document: list[str] = []
    for _, line in _lines(path):
        if line.strip() in separators:
            yield "".join(document)
            document = []
        else:
            document.append(line)
    yield "".join(document)


def _json_type(value) -> str:
    """The JSON name of a decoded value's type (null, number, ...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def split_inputs(inputs: Sequence[str], train_inputs: Sequence[str],
                 val_inputs: Sequence[str]) -> tuple[list[Path], list[Path] | None]:
    """(train files, val files or None for a hash split) from the command's three input lists."""
    if inputs and (train_inputs or val_inputs):
        raise DataError("give either --input, or --train-input/--val-input, not both")
    if train_inputs or val_inputs:
        if not (train_inputs and val_inputs):
            raise DataError("--train-input and --val-input go together (or use --input with --val-fraction)")
        return collect_files(train_inputs), collect_files(val_inputs)
    if not inputs:
        raise DataError("no input: give --input FILE|DIR (or --train-input and --val-input)")
    if len(inputs) == 1 and (Path(inputs[0]) / "train").is_dir() and (Path(inputs[0]) / "val").is_dir():
        root = Path(inputs[0])  # a corpus with its own held-out split (kiln corpus build)
        return collect_files([root / "train"]), collect_files([root / "val"])
    return collect_files(inputs), None


# ------------------------------------------------------------------------------- tokenizing
def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def is_validation(text: str, seed: int, val_fraction: float) -> bool:
    """Seeded, order-independent document split: the same text always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


@dataclass(frozen=True)
class Chunk:
    texts: tuple[str, ...]
    split: str | None  # "train" / "val", or None: split each document by hash
    nbytes: int


@dataclass(frozen=True)
class EncodeSettings:
    eos_id: int
    bos_id: int | None
    dtype: str
    seed: int
    val_fraction: float


def encode_chunk(tokenizer, settings: EncodeSettings, chunk: Chunk) -> tuple[bytes, bytes, int, int]:
    """(train token bytes, val token bytes, train documents, val documents) for one chunk."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for text in chunk.texts:
        if not text.strip():
            continue  # an empty document would be a lone EOS
        split = chunk.split
        if split is None:
            split = "val" if is_validation(text, settings.seed, settings.val_fraction) else "train"
        ids = out[split]
        if settings.bos_id is not None:
            ids.append(settings.bos_id)
        ids.extend(tokenizer.encode(text, allow_special=False))  # special-token text inside a document is plain text
        ids.append(settings.eos_id)
        docs[split] += 1
    dtype = np.dtype(settings.dtype)
    return (np.asarray(out["train"], dtype=dtype).tobytes(), np.asarray(out["val"], dtype=dtype).tobytes(),
            docs["train"], docs["val"])


def _pool_init(tokenizer_dir: str, settings: EncodeSettings) -> None:
    # Pool initializer: runs in each worker process, which keeps its own tokenizer for its lifetime.
    from model.tokenizer import load_tokenizer

    global _WORKER_STATE
    _WORKER_STATE = (load_tokenizer(tokenizer_dir), settings)


def _pool_encode(chunk: Chunk) -> tuple[bytes, bytes, int, int]:
    tokenizer, settings = _WORKER_STATE
    return encode_chunk(tokenizer, settings, chunk)


def iter_chunks(files: Sequence[Path], split: str | None, separators: Sequence[str],
                chunk_bytes: int) -> Iterator[Chunk]:
    texts: list[str] = []
    size = 0
    for path in files:
        for text in iter_documents(path, separators):
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= chunk_bytes:
                yield Chunk(tuple(texts), split, size)
                texts, size = [], 0
    if texts:
        yield Chunk(tuple(texts), split, size)


def _encoded(chunks: Iterator[Chunk], tokenizer, tokenizer_dir: str, settings: EncodeSettings,
             workers: int) -> Iterator[tuple[Chunk, tuple[bytes, bytes, int, int]]]:
    """Encoded chunks in input order; at most 2 * workers chunks in flight (bounded memory)."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, encode_chunk(tokenizer, settings, chunk)
        return
    # forkserver where there is one (Python 3.14's default on Linux): forking this process, whose progress
    # bar and torch may run threads, can copy a lock another thread holds (Python 3.12+ warns of it)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers, initializer=_pool_init,
                                                  initargs=(tokenizer_dir, settings)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_pool_encode, (chunk,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def prepare(tokenizer_dir: str | Path, out_dir: str | Path, inputs: Sequence[str] = (),
            train_inputs: Sequence[str] = (), val_inputs: Sequence[str] = (), val_fraction: float = 0.005,
            seed: int = 1337, workers: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            progress: bool = True, eos_token: str | None = None) -> dict:
    """Tokenize the inputs into `out_dir`; returns the meta dict also written to meta.json.

    `eos_token`: the token that ends each document (and separates documents in .txt inputs); default the
    tokenizer's EOS, which for a chat model's tokenizer ends a turn (Qwen's <|im_end|>), where pretraining
    text wants its end-of-text token."""
    from tqdm import tqdm

    from model.tokenizer import load_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if Path(tokenizer_dir).is_file():  # load_tokenizer would call it missing
        raise DataError(f"--tokenizer {str(tokenizer_dir)!r} is a file, not a tokenizer directory")
    tokenizer_dir = Path(tokenizer_dir).resolve()
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer: {e}") from None
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_id
    if eos_token is not None:
        try:
            eos_text, eos_id = eos_token, tokenizer.token_to_id(eos_token)
        except ValueError:
            raise DataError(f"--eos-token {eos_token!r} is not a single token of this tokenizer (its special "
                            f"tokens: {', '.join(sorted(tokenizer.special_tokens))})") from None
    train_files, val_files = split_inputs(inputs, train_inputs, val_inputs)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    dtype = token_dtype(tokenizer.n_vocab)
    settings = EncodeSettings(eos_id=eos_id, bos_id=bos_id, dtype=dtype.name, seed=seed,
                              val_fraction=val_fraction)
    separators = tuple({DOC_SEPARATOR, eos_text})
    all_files = train_files + (val_files or [])
    total_bytes = sum(p.stat().st_size for p in all_files)
    if workers is None:
        workers = 1 if total_bytes < chunk_bytes else min(os.cpu_count() or 1, 32)

    def chunks() -> Iterator[Chunk]:
        yield from iter_chunks(train_files, "train" if val_files is not None else None, separators, chunk_bytes)
        if val_files is not None:
            yield from iter_chunks(val_files, "val", separators, chunk_bytes)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file, not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {split: out / f"{split}.bin.tmp" for split in SPLITS}
    counts = {split: {"tokens": 0, "documents": 0} for split in SPLITS}
    try:
        with open(tmp["train"], "wb") as train_f, open(tmp["val"], "wb") as val_f, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for chunk, (train_bytes, val_bytes, train_docs, val_docs) in _encoded(
                    chunks(), tokenizer, str(tokenizer_dir), settings, workers):
                train_f.write(train_bytes)
                val_f.write(val_bytes)
                for split, nbytes, docs in (("train", len(train_bytes), train_docs), ("val", len(val_bytes), val_docs)):
                    counts[split]["tokens"] += nbytes // dtype.itemsize
                    counts[split]["documents"] += docs
                bar.update(min(chunk.nbytes, total_bytes - bar.n))  # text bytes; the files also hold JSON
            bar.update(total_bytes - bar.n)
        split_kind = "explicit" if val_files is not None else "hash"
        if counts["train"]["tokens"] == 0:
            raise DataError(f"the training inputs hold no text ({', '.join(map(str, train_files[:3]))})")
        if split_kind == "hash" and counts["val"]["tokens"] == 0 and val_fraction > 0:
            split_kind = "tail"
            n_val = max(1, int(counts["train"]["tokens"] * val_fraction))
            _move_tail(tmp["train"], tmp["val"], n_val, dtype)
            counts["train"]["tokens"] -= n_val
            counts["val"]["tokens"] = n_val
        for split in SPLITS:
            os.replace(tmp[split], out / f"{split}.bin")
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # a failed first run leaves no empty --out behind
            out.rmdir()
        raise
    copy_tokenizer_files(tokenizer_dir, out / "tokenizer")
    meta = {
        "format": META_FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.n_vocab, "eos_id": eos_id,
        "bos_id": bos_id, "tokenizer_dir": str(tokenizer_dir), "tokenizer": "tokenizer", "split": split_kind,
        "val_fraction": val_fraction, "seed": seed,
        "train": {**counts["train"], "inputs": [str(p) for p in train_files]},
        "val": {**counts["val"], "inputs": [str(p) for p in (val_files or [])]},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _move_tail(train_path: Path, val_path: Path, n_tokens: int, dtype: np.dtype) -> None:
    nbytes = n_tokens * dtype.itemsize
    size = train_path.stat().st_size
    with open(train_path, "r+b") as f:
        f.seek(size - nbytes)
        tail = f.read()
        f.truncate(size - nbytes)
    val_path.write_bytes(tail)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src` (Kiln's and Hugging Face's) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------- reading tokens
def load_meta(data_dir: str | Path) -> dict:
    if Path(data_dir).is_file():
        raise DataError(f"{str(data_dir)!r} is a file, not a prepared data directory (the --out of `kiln prepare`)")
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{str(data_dir)!r} is not a prepared data directory (no {META_FILE}); "
                        "run `kiln prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError or UnicodeDecodeError: a damaged file
        reason = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise DataError(f"{path} is not valid JSON ({reason}); re-run `kiln prepare` to rewrite it") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else _json_type(meta)
        raise DataError(f"{path}: format {found!r}, expected {META_FORMAT!r}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta.get('dtype')!r}, expected 'uint16' or 'uint32'; re-run `kiln prepare`")
    return meta


def open_tokens(data_dir: str | Path, split: str, meta: dict | None = None) -> np.ndarray:
    """The split's token ids, memory-mapped (an empty array for an empty file)."""
    meta = meta or load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "is missing"
        raise DataError(f"{path} {what}; re-run `kiln prepare`")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, dtype=dtype)
    if size % dtype.itemsize:
        raise DataError(f"{path} holds {size} bytes, not a whole number of {dtype.itemsize}-byte {dtype.name} "
                        "tokens: it is truncated or damaged; re-run `kiln prepare`")
    return np.memmap(path, dtype=dtype, mode="r")


class WindowSampler:
    """Sequence number i of the training stream -> a window of seq_len + 1 tokens of the file.

    Each epoch cuts the file into non-overlapping windows on a grid shifted by a random
    amount, and visits them in a random order; the shift and order depend only on (seed,
    epoch), so any sequence of the stream can be read again exactly from its number.
    Data-parallel processes read disjoint slices of every global batch (see train.py).
    """

    def __init__(self, n_tokens: int, seq_len: int, seed: int):
        if n_tokens < seq_len + 1:
            raise DataError(f"the training split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            "prepare more text or lower seq_len")
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (n_tokens - 1) // seq_len
        self.slack = (n_tokens - 1) - self.n_windows * seq_len  # in [0, seq_len): room for the shift
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        self._shift = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._shift = int(rng.integers(0, self.slack + 1))
            self._order = rng.permutation(self.n_windows)
            self._epoch = epoch

    def offsets(self, start: int, count: int) -> np.ndarray:
        """Token offsets of sequences start .. start + count - 1."""
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, j = divmod(start + k, self.n_windows)
            self._load_epoch(epoch)
            out[k] = self._shift + int(self._order[j]) * self.seq_len
        return out


def read_windows(tokens: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """(len(offsets), length) int64 token windows."""
    return np.stack([np.asarray(tokens[o: o + length], dtype=np.int64) for o in offsets])


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln prepare", description="Tokenize text into train.bin / val.bin token "
                                                                 "files for `kiln train`.")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (Kiln or Hugging Face)")
    p.add_argument("--input", nargs="+", default=[], metavar="FILE|DIR",
                   help=".txt / .jsonl files or directories; a directory with train/ and val/ keeps that split")
    p.add_argument("--train-input", nargs="+", default=[], metavar="FILE|DIR", help="explicit training inputs")
    p.add_argument("--val-input", nargs="+", default=[], metavar="FILE|DIR", help="explicit validation inputs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation (hash split; default 0.005)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document split")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--eos-token", default=None, metavar="TEXT",
                   help="the token that ends each document (default: the tokenizer's EOS; a chat model's EOS "
                        "ends a turn, e.g. Qwen's <|im_end|>, so pretraining text may want <|endoftext|>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        _fail(f"--workers must be >= 1, got {args.workers}")
    try:
        meta = prepare(args.tokenizer, args.out, inputs=args.input, train_inputs=args.train_input,
                       val_inputs=args.val_input, val_fraction=args.val_fraction, seed=args.seed,
                       workers=args.workers, progress=not args.no_progress, eos_token=args.eos_token)
    except (DataError, OSError) as e:
        _fail(str(e))
    print(f"train: {meta['train']['tokens']:,} tokens in {meta['train']['documents']:,} documents; "
          f"val: {meta['val']['tokens']:,} tokens ({meta['split']} split); {meta['dtype']} -> {args.out}")
    return 0


def _fail(message: str) -> None:
    print(f"kiln prepare: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
