"""training/tokenizer_train.py: a trained tokenizer gives the same ids in Kiln and in transformers.

Trains tiny vocabularies on generated text (seeded) in temp dirs; each training takes well
under a second.
"""

from __future__ import annotations

import json
import random

import pytest

from model.tokenizer import IncrementalDetokenizer, load_hf_tokenizer, load_tokenizer
from training.tokenizer_train import KILN_PATTERN, main, train_tokenizer

EOS = "<|endoftext|>"
WORDS = ("the model reads a stream of tokens and predicts the next one while the server batches "
         "requests from many clients into one forward pass").split()
CJK = "我们的人工智能模型正在学习中文字符床前明月光"
CODE = "def step(model, batch):\n    loss = model(batch).mean()\n    loss.backward()\n    return loss.item()\n"

TEXTS = {
    "english": "The model reads a stream of tokens. It's what we'll predict, isn't it?",
    "code": CODE + "\tif x != 0:\n\t\treturn {'a': [1, 2]}\n",
    "chinese": "我们的模型正在学习中文，床前明月光。龘",
    "emoji": "ok 🙂🚀 👨‍👩‍👧 👍🏽",
    "whitespace": "a  b   c\n\n\n  d\t\t e \r\n f    \u00a0g\u3000h   ",
    "digits": "1 12 123 1234 12345678 3.14159 2,718,281",
    "special": f"one{EOS}two {EOS}",
}


def write_corpus(path, seed: int, n_lines: int = 400) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            parts.append("".join(rng.choice(CJK) for _ in range(rng.randint(2, 8))))
        if rng.random() < 0.2:
            parts.append(str(rng.randint(0, 10 ** 9)))
        if rng.random() < 0.1:
            parts.append(rng.choice("🙂🚀🔥"))
        lines.append(" ".join(parts) + (CODE if rng.random() < 0.1 else ""))
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained_tok")
    files = [root / "a.txt", root / "b.txt"]
    write_corpus(files[0], seed=0)
    write_corpus(files[1], seed=1)
    out = root / "tok"
    return train_tokenizer(files, 700, out), out


def assert_same_ids(kiln, hf_tokenizer, texts) -> None:
    for name, text in texts.items():
        got, want = kiln.encode(text), hf_tokenizer.encode(text, add_special_tokens=False)
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert got == want, (f"{name}: ids differ from HF at position {at}: "
                             f"kiln {got[at:at + 6]} vs HF {want[at:at + 6]}")


def random_texts(seed: int, n: int) -> dict[str, str]:
    rng = random.Random(seed)
    pool = "abcxyz019 \n\t.,'!?(#" + CJK + "🙂🚀👍🏽\u00a0\r"
    return {f"random{i}": "".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for i in range(n)}


def test_files_and_id_layout(trained):
    tok, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json"]
    assert tok.n_vocab == 700 and tok.special_tokens == {EOS: 699}
    assert (tok.eos_token, tok.eos_id, tok.bos_id, tok.pad_id, tok.add_bos) == (EOS, 699, None, 699, False)
    ranks = tok.mergeable_ranks
    assert all(ranks[bytes([b])] == b for b in range(256)), "single byte b must be id b"
    assert sorted(ranks.values()) == list(range(699))
    assert tok.config.pattern == KILN_PATTERN


def test_kiln_ids_equal_hf_tokenizer_json(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, out = trained
    texts = {**TEXTS, **random_texts(0, 300)}
    by_file = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(out))  # reads the shared tokenizer_config.json too
    assert (auto.eos_token, auto.eos_token_id, len(auto)) == (EOS, 699, 700)
    reloaded = load_tokenizer(out)  # Kiln's files
    from_hf_json = load_hf_tokenizer(out)  # the trainer's tokenizer.json
    for kiln in (tok, reloaded, from_hf_json):
        assert_same_ids(kiln, by_file, texts)
        assert_same_ids(kiln, auto, texts)
    for name, text in texts.items():
        assert tok.decode(tok.encode(text)) == text, name


def test_digits_split_in_groups_of_three(trained):
    tok, _ = trained
    text = "12345678 x2024"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text
    ends = {sum(len(p) for p in pieces[:k]) for k in range(len(pieces) + 1)}
    assert {3, 6, 8, 10, 13} <= ends, f"digits must split as 123|456|78 and x|202|4: {pieces}"


def test_streaming_trained_tokenizer(trained):
    tok, _ = trained
    text = "模型学习龘🙂ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_custom_special_tokens_come_last_first_is_eos(tmp_path):
    from transformers import AutoTokenizer

    write_corpus(tmp_path / "c.txt", seed=2, n_lines=100)
    tok = train_tokenizer([tmp_path / "c.txt"], 400, tmp_path / "out", special_tokens=("<|eos|>", "<|pad|>"))
    assert tok.special_tokens == {"<|eos|>": 398, "<|pad|>": 399}
    assert (tok.eos_token, tok.eos_id, tok.n_vocab) == ("<|eos|>", 398, 400)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert_same_ids(tok, auto, {"s": "a<|pad|>b<|eos|>", **random_texts(1, 50)})


def test_cli_trains_and_reports(tmp_path, capsys):
    write_corpus(tmp_path / "c.txt", seed=3, n_lines=100)
    assert main(["--input", str(tmp_path / "c.txt"), "--vocab-size", "300", "--out", str(tmp_path / "out")]) == 0
    assert "300 ids" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "out")
    assert tok.n_vocab == 300 and tok.eos_id == 299
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS and config["special_tokens"] == {EOS: 299}


@pytest.mark.parametrize("case", ["missing", "not_utf8", "truncated_utf8", "too_small", "directory"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    good = tmp_path / "good.txt"
    write_corpus(good, seed=4, n_lines=20)
    args = {"missing": ([str(tmp_path / "nope.txt")], "300"),
            "not_utf8": ([str(tmp_path / "latin1.txt")], "300"),
            "truncated_utf8": ([str(tmp_path / "cut.txt")], "300"),
            "too_small": ([str(good)], "256"),
            "directory": ([str(tmp_path)], "300")}[case]
    (tmp_path / "latin1.txt").write_bytes("héllo wörld\n".encode("utf-8") + "café au lait\n".encode("latin-1"))
    (tmp_path / "cut.txt").write_bytes("ok 🙂".encode("utf-8")[:-1])
    with pytest.raises(SystemExit) as exc:
        main(["--input", *args[0], "--vocab-size", args[1], "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln tokenizer train: error: ")
    expected = {"missing": "input file not found: " + str(tmp_path / "nope.txt"),
                "not_utf8": "latin1.txt is not UTF-8 text: invalid byte 0xe9 at byte offset 17",
                "truncated_utf8": "cut.txt is not UTF-8 text: it ends inside a multi-byte character",
                "too_small": "vocab size 256 is too small: need at least 256 byte tokens + 1 special token(s) = 257",
                "directory": "is not a regular file"}[case]
    assert expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,expected", [
    (["--vocab-size", "300", "--min-frequency", "-1"], "min frequency must be >= 0, got -1"),  # was an OverflowError
    (["--vocab-size", str(2**31)], f"vocab size {2**31} is too large: at most {1 << 24}"),  # the trainer aborted
])
def test_cli_out_of_range_numbers_exit_2(tmp_path, capsys, flags, expected):
    write_corpus(tmp_path / "c.txt", seed=5, n_lines=20)
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path / "c.txt"), *flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"kiln tokenizer train: error: {expected}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_utf8_check_offsets_do_not_depend_on_chunking(tmp_path, monkeypatch, chunk):
    import training.tokenizer_train as tokenizer_train

    monkeypatch.setattr(tokenizer_train, "_UTF8_CHECK_CHUNK", chunk)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("abc🙂".encode("utf-8") + b"\xe4\xb8x")  # a 3-byte character cut short by 'x'
    with pytest.raises(ValueError, match="invalid byte 0xe4 at byte offset 7"):
        tokenizer_train.check_inputs([bad], 300, [EOS])
    bad.write_bytes("abc🙂".encode("utf-8"))
    assert tokenizer_train.check_inputs([bad], 300, [EOS]) == [bad]


def test_jsonl_documents_train_like_their_text(tmp_path):
    """`kiln corpus build` writes {"text": ...} per line: training reads the texts, not the JSON."""
    write_corpus(tmp_path / "c.txt", seed=3, n_lines=120)
    docs = (tmp_path / "c.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "plain.txt").write_text("".join(d + "\n\n" for d in docs), encoding="utf-8")
    from_jsonl = train_tokenizer([tmp_path / "c.jsonl"], 500, tmp_path / "a")
    from_text = train_tokenizer([tmp_path / "plain.txt"], 500, tmp_path / "b")
    assert from_jsonl.mergeable_ranks == from_text.mergeable_ranks
    assert not any(b'"text"' in token for token in from_jsonl.mergeable_ranks)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        train_tokenizer([tmp_path / "bad.jsonl"], 500, tmp_path / "c")


@pytest.mark.parametrize("name,content,expected", [
    ("empty.txt", "", "the training inputs hold no text ({dir}/empty.txt)"),
    ("blank.txt", " \n\n\t\n", "the training inputs hold no text ({dir}/blank.txt)"),
    ("blank.jsonl", '{"text": "  "}\n\n{"text": ""}\n', "the training inputs hold no text ({dir}/blank.jsonl)"),
    ("number.jsonl", '{"text": "ok"}\n{"text": 5}\n',
     '{dir}/number.jsonl, line 2: "text" must be a string, got a number'),
    ("null.jsonl", '{"text": null}\n', '{dir}/null.jsonl, line 1: "text" must be a string, got null'),
    # JSON's \ud800 escape decodes to a lone surrogate; it was named without its file
    ("lone.jsonl", '{"text": "\\ud800 lone"}\n',
     '{dir}/lone.jsonl, line 1: "text" holds a lone surrogate (\\ud800), which is not valid Unicode text'),
])
def test_cli_input_without_usable_text_exits_2(tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path / name), "--vocab-size", "512", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"kiln tokenizer train: error: {expected.format(dir=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_tokenizer_without_overwrite(tmp_path, capsys):
    write_corpus(tmp_path / "c.txt", seed=6, n_lines=40)
    out = tmp_path / "tok"
    argv = ["--input", str(tmp_path / "c.txt"), "--vocab-size", "300", "--out", str(out)]
    assert main(argv) == 0
    first = (out / "tokenizer.tiktoken").read_bytes()
    capsys.readouterr()
    write_corpus(tmp_path / "c.txt", seed=7, n_lines=40)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"kiln tokenizer train: error: output {out} already exists and is not empty; "
                                       "pick another directory, or pass --overwrite to replace the tokenizer in it\n")
    assert (out / "tokenizer.tiktoken").read_bytes() == first
    (out / "vocab.json").write_text("{}")  # another tokenizer's file, which transformers would read
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "tokenizer.tiktoken").read_bytes() != first and not (out / "vocab.json").exists()
    assert load_tokenizer(out).n_vocab == 300
