"""`kiln prepare` (training/data.py): documents -> token files, splits, errors, the window sampler.

Also home of the small corpus helpers the other training tests import.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import load_tokenizer
from training.data import DataError, WindowSampler, load_meta, main, open_tokens, prepare, read_windows

WORDS = ("the quick brown fox jumps over the lazy dog and the cat sat on the mat while "
         "numbers count one two three four five six seven eight nine ten").split()


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents with structure a tiny model learns in a few dozen steps (repeated phrases, counting)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(3, 6)):
            start = rng.randrange(0, len(WORDS) - 8)
            parts.append(" ".join(WORDS[start: start + rng.randint(4, 8)]).capitalize() + ".")
        parts.append(f"Count: {' '.join(str(k) for k in range(rng.randint(1, 5), rng.randint(8, 14)))}.")
        docs.append(f"Document {i}. " + " ".join(parts))
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def prepared_data(root: Path, tokenizer_dir: Path, n_docs: int = 120) -> Path:
    """A prepared data dir with an explicit validation split (like `kiln corpus build`)."""
    docs = synthetic_documents(n_docs)
    corpus = root / "corpus"
    write_jsonl(corpus / "train" / "synthetic.jsonl", docs[: n_docs - n_docs // 10])
    write_jsonl(corpus / "val" / "synthetic.jsonl", docs[n_docs - n_docs // 10:])
    prepare(tokenizer_dir, root / "tokens", inputs=[str(corpus)], workers=1, progress=False)
    return root / "tokens"


def expected_ids(tokenizer, texts) -> list[int]:
    ids = []
    for text in texts:
        ids += tokenizer.encoding.encode_ordinary(text) + [tokenizer.eos_id]
    return ids


def test_txt_with_separators_jsonl_and_directory(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first doc\nline two\n<|endoftext|>\nsecond doc 🙂\n", encoding="utf-8")
    write_jsonl(tmp_path / "in" / "b.jsonl", ["third <|endoftext|> stays text", ""])
    (tmp_path / "in" / "notes.md").write_text("not an input")  # directories take only .txt / .jsonl
    meta = prepare(tokenizer_dir, tmp_path / "out", inputs=[str(tmp_path / "in")], val_fraction=0.0,
                   workers=1, progress=False)
    train = open_tokens(tmp_path / "out", "train")
    want = expected_ids(tok, ["first doc\nline two\n", "second doc 🙂\n", "third <|endoftext|> stays text"])
    assert train.tolist() == want
    assert meta["train"] == {"tokens": len(want), "documents": 3,
                             "inputs": [str(tmp_path / "in" / "a.txt"), str(tmp_path / "in" / "b.jsonl")]}
    assert meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert meta["tokenizer_dir"] == str(Path(tokenizer_dir).resolve())
    assert load_tokenizer(tmp_path / "out" / "tokenizer").encode("the fox") == tok.encode("the fox")


def test_pool_output_equals_single_process_and_split_is_by_document(tmp_path, tokenizer_dir):
    docs = synthetic_documents(200, seed=3)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    one = prepare(tokenizer_dir, tmp_path / "one", inputs=[str(src)], val_fraction=0.2, workers=1,
                  chunk_bytes=2000, progress=False)
    two = prepare(tokenizer_dir, tmp_path / "two", inputs=[str(src)], val_fraction=0.2, workers=2,
                  chunk_bytes=2000, progress=False)
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()
        assert one[split] == two[split]
    assert one["split"] == "hash" and 20 <= one["val"]["documents"] <= 60, one["val"]
    # each document lands whole in one split: the splits decode back to whole documents
    tok = load_tokenizer(tokenizer_dir)
    val_docs = tok.decode(open_tokens(tmp_path / "one", "val").tolist()).split("<|endoftext|>")[:-1]
    assert set(val_docs) <= set(docs) and len(val_docs) == one["val"]["documents"]


def test_explicit_and_detected_splits(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    train_f = write_jsonl(tmp_path / "c" / "train" / "s.jsonl", ["alpha beta", "gamma"])
    val_f = write_jsonl(tmp_path / "c" / "val" / "s.jsonl", ["delta"])
    detected = prepare(tokenizer_dir, tmp_path / "d", inputs=[str(tmp_path / "c")], workers=1, progress=False)
    explicit = prepare(tokenizer_dir, tmp_path / "e", train_inputs=[str(train_f)], val_inputs=[str(val_f)],
                       workers=1, progress=False)
    for meta, out in ((detected, tmp_path / "d"), (explicit, tmp_path / "e")):
        assert meta["split"] == "explicit"
        assert open_tokens(out, "train").tolist() == expected_ids(tok, ["alpha beta", "gamma"])
        assert open_tokens(out, "val").tolist() == expected_ids(tok, ["delta"])


def test_single_document_gets_a_tail_validation_split(tmp_path, tokenizer_dir):
    src = tmp_path / "book.txt"
    src.write_text(" ".join(synthetic_documents(5)), encoding="utf-8")
    meta = prepare(tokenizer_dir, tmp_path / "out", inputs=[str(src)], val_fraction=0.1, workers=1, progress=False)
    whole = expected_ids(load_tokenizer(tokenizer_dir), [src.read_text()])
    n_val = int(len(whole) * 0.1)
    assert meta["split"] == "tail" and meta["val"]["tokens"] == n_val
    assert open_tokens(tmp_path / "out", "train").tolist() + open_tokens(tmp_path / "out", "val").tolist() == whole


@pytest.mark.parametrize("name, content, expected", [
    ("bad.txt", b"ok line\nbad \xff byte\n", r"bad\.txt, line 2: not UTF-8 text .* at byte 12"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', r"bad\.jsonl, line 2: not valid JSON"),
    ("bad.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', r"bad\.jsonl, line 2: expected an object with a string"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": 5}\n', r"bad\.jsonl, line 2: \"text\" must be a string, got a number"),
    ("bad.jsonl", b'{"text": null}\n', r"bad\.jsonl, line 1: \"text\" must be a string, got null"),
    # JSON's \ud800 escape decodes to a lone surrogate, which no encoder takes (was a UnicodeEncodeError)
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "\\ud800 lone"}\n',
     r"bad\.jsonl, line 2: \"text\" holds a lone surrogate \(\\ud800\)"),
    ("data.csv", b"a,b\n", r"data\.csv.* neither \.txt"),
])
def test_bad_input_is_an_error_naming_the_file(tmp_path, tokenizer_dir, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=expected):
        prepare(tokenizer_dir, tmp_path / "out", inputs=[str(tmp_path / name)], workers=1, progress=False)
    assert not (tmp_path / "out" / "train.bin").exists()  # nothing half-written
    assert not (tmp_path / "out").exists()  # and no empty --out left behind by a failed first run


def test_cli_errors_exit_2_with_one_line(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.txt" in err and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main(["--tokenizer", str(tmp_path / "nope"), "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "tokenizer" in capsys.readouterr().err


def test_window_sampler_is_a_seeded_permutation_per_epoch():
    n_tokens, seq_len = 1001, 10
    sampler = WindowSampler(n_tokens, seq_len, seed=7)
    assert sampler.n_windows == 100
    epoch0 = sampler.offsets(0, 100)
    shift = int(epoch0.min()) % seq_len
    assert sorted(epoch0.tolist()) == [shift + seq_len * k for k in range(100)]  # every window once
    assert (epoch0 + seq_len + 1 <= n_tokens).all()
    # any stretch of the stream reads the same from a fresh sampler (what exact resume needs)
    again = WindowSampler(n_tokens, seq_len, seed=7)
    assert again.offsets(95, 10).tolist() == np.concatenate([epoch0[95:], sampler.offsets(100, 5)]).tolist()
    assert WindowSampler(n_tokens, seq_len, seed=8).offsets(0, 100).tolist() != epoch0.tolist()
    tokens = np.arange(n_tokens, dtype=np.uint16)
    windows = read_windows(tokens, epoch0[:3], seq_len + 1)
    assert windows.dtype == np.int64 and windows.shape == (3, 11)
    assert (windows == epoch0[:3, None] + np.arange(11)).all()
    with pytest.raises(DataError, match="fewer than seq_len"):
        WindowSampler(10, 10, seed=0)


def test_load_meta_names_the_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_meta(tmp_path)


def test_damaged_token_files_are_data_errors_naming_the_file(tmp_path, tokenizer_dir, capsys):
    data = prepared_data(tmp_path, tokenizer_dir, n_docs=20)
    meta = load_meta(data)
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-1])  # cut mid-token
    with pytest.raises(DataError, match=r"train\.bin holds \d+ bytes, not a whole number of 2-byte uint16 tokens"):
        open_tokens(data, "train", meta)
    (data / "meta.json").write_text('{"format": "kiln-tokens-v1", ')  # cut mid-object
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON \(.* at line 1 column \d+\)"):
        load_meta(data)
    with pytest.raises(DataError, match="is a file, not a prepared data directory"):
        load_meta(data / "train.bin")

    from training import train

    with pytest.raises(SystemExit) as exc:  # as `kiln train` reports it: one line, no traceback
        train.main(["--config", str(Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.toml"),
                    "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("kiln train: error: ") and err.count("\n") == 1
    assert "meta.json is not valid JSON" in err


def test_wrong_kind_of_path_says_what_it_is(tmp_path, tokenizer_dir):
    (tmp_path / "file.txt").write_text("some text\n")
    with pytest.raises(DataError, match="--out '.*file.txt' is a file, not a directory"):
        prepare(tokenizer_dir, tmp_path / "file.txt", inputs=[str(tmp_path / "file.txt")], workers=1, progress=False)
    with pytest.raises(DataError, match="--tokenizer '.*file.txt' is a file, not a tokenizer directory"):
        prepare(tmp_path / "file.txt", tmp_path / "out", inputs=[str(tmp_path / "file.txt")], workers=1,
                progress=False)


def test_eos_token_picks_the_document_end(tmp_path, capsys):
    """A chat tokenizer's EOS ends a turn (<|im_end|>): --eos-token <|endoftext|> ends documents with the
    end-of-text token instead, splits .txt inputs on it, and records it as the data's EOS."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from test_tokenizer import train_bpe

    hf = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=400,
                   specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>").save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(tmp_path / "tok")
    text_end, turn_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert tok.eos_id == turn_end
    (tmp_path / "a.txt").write_text("first doc\n<|endoftext|>\nsecond doc\n", encoding="utf-8")
    meta = prepare(tmp_path / "tok", tmp_path / "out", inputs=[str(tmp_path / "a.txt")], val_fraction=0.0,
                   workers=1, progress=False, eos_token="<|endoftext|>")
    ids = open_tokens(tmp_path / "out", "train").tolist()
    assert ids == tok.encode("first doc\n") + [text_end] + tok.encode("second doc\n") + [text_end]
    assert meta["eos_id"] == text_end and meta["train"]["documents"] == 2
    with pytest.raises(SystemExit) as e:
        main(["--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "a.txt"), "--out",
              str(tmp_path / "out2"), "--eos-token", "<|nope|>"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--eos-token '<|nope|>' is not a single token" in err and "<|im_end|>" in err
