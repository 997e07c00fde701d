"""End to end through the command mains: tokenizer -> kiln prepare -> kiln train -> kiln export -> load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.tokenizer import load_tokenizer
from test_training_data import synthetic_documents, write_jsonl
from training import data, export, train
from training.export import load_trained_model

TINY_TOML = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.toml"
SHRINK = ["--set", "seq_len=32", "--set", "micro_batch_size=4", "--set", "batch_tokens=256", "--set", "lr=1e-2",
          "--set", "warmup_steps=1", "--set", "eval_interval=2", "--set", "eval_batches=2", "--set", "log_interval=1",
          "--set", "checkpoint_interval=2", "--set", "model.n_layer=1", "--set", "model.d_model=48",
          "--set", "model.d_ff=96", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prepare_train_resume_export_load(tmp_path, tokenizer_dir, capsys, monkeypatch):
    kiln_tokenizer = tmp_path / "tokenizer"  # Kiln's own files (tokenizer.tiktoken + config + tokenizer.json)
    load_tokenizer(tokenizer_dir).save(kiln_tokenizer)
    docs = synthetic_documents(60, seed=1)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("\n<|endoftext|>\n".join(docs[:20]) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "text" / "b.jsonl", docs[20:])

    assert data.main(["--tokenizer", str(kiln_tokenizer), "--input", str(tmp_path / "text"),
                      "--out", str(tmp_path / "tokens"), "--val-fraction", "0.1", "--workers", "2",
                      "--no-progress"]) == 0
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 60 and meta["val"]["tokens"] > 0

    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # as on a CPU without the Triton interpreter: a clear error, no traceback
        import kernels.attention

        patch.setattr(kernels.attention, "available", lambda device: False)
        with pytest.raises(SystemExit) as exc:
            train.main(["--config", str(TINY_TOML), "--data", str(tmp_path / "tokens"), "--out", str(run),
                        "--max-steps", "2", *SHRINK, "--set", "attn_backend=triton"])
        assert exc.value.code == 2
        assert "attn_backend=triton needs a CUDA device" in capsys.readouterr().err
    assert train.main(["--config", str(TINY_TOML), "--data", str(tmp_path / "tokens"), "--out", str(run),
                       "--max-steps", "2", *SHRINK]) == 0
    # continue the same run to step 4 from its saved config (no --config)
    capsys.readouterr()
    assert train.main(["--out", str(run), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # no bar (--no-progress, or not a terminal): a line per logged step
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines if "|" in line] == ["step 3/4", "step 4/4"], lines
    assert all(" | loss " in line and " | eta " in line for line in lines if "|" in line)

    # resuming refuses what would silently corrupt the run: another model shape, another tokenizer's data
    tokens2 = tmp_path / "tokens2"
    shutil.copytree(tmp_path / "tokens", tokens2)
    ranks = tokens2 / meta.get("tokenizer", "tokenizer") / "tokenizer.tiktoken"
    first, second, *rest = ranks.read_text().splitlines()
    ranks.write_text("\n".join([first.split()[0] + " " + second.split()[1],
                                second.split()[0] + " " + first.split()[1], *rest]) + "\n")
    tokens3 = tmp_path / "tokens3"  # another vocabulary size too: the data is named, not the config
    shutil.copytree(tmp_path / "tokens", tokens3)
    ranks3 = tokens3 / meta.get("tokenizer", "tokenizer") / "tokenizer.tiktoken"
    ranks3.write_text("\n".join(ranks3.read_text().splitlines()[:-1]) + "\n")
    meta3 = json.loads((tokens3 / "meta.json").read_text())
    (tokens3 / "meta.json").write_text(json.dumps({**meta3, "vocab_size": meta3["vocab_size"] + 100}))
    for argv, message in (
            (["--data", str(tokens2)], "tokenized with another tokenizer than the run in"),
            (["--data", str(tokens3)], "tokenized with another tokenizer than the run in"),
            (["--config", str(TINY_TOML), "--data", str(tmp_path / "tokens"), *SHRINK, "--set", "model.n_layer=2"],
             "(n_layer: checkpoint 1, now 2)")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--out", str(run), "--resume", "--max-steps", "6", "--no-progress", *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and message in err and "\n" not in err, err

    # a run with no length, a bad --out: one line each
    for argv, message in ((["--set", "max_steps=0"], "the run has no length"),
                          (["--out", str(tmp_path / "text" / "a.txt")], "is a file, not a directory")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--config", str(TINY_TOML), "--data", str(tmp_path / "tokens"), "--out",
                        str(tmp_path / "run2"), *SHRINK, *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and message in err and "\n" not in err, err
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["model"]["d_model"] == 48 and saved["seq_len"] == 32

    assert export.main([str(run), "--out", str(tmp_path / "model")]) == 0
    model = load_model(tmp_path / "model")
    tokenizer = load_tokenizer(tmp_path / "model")
    assert {"tokenizer.tiktoken", "tokenizer_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()}
    ids = tokenizer.encode("the quick brown fox jumps")
    assert ids == load_tokenizer(kiln_tokenizer).encode("the quick brown fox jumps")
    trained, state, _ = load_trained_model(run)
    assert state["step"] == 4
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert model.config.n_kv_head == 2 and model.config.eos_token_id == tokenizer.eos_id


def test_train_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    model_is_3 = tmp_path / "model3.toml"
    model_is_3.write_text("model = 3\n")
    cases = [
        (["--config", str(TINY_TOML), "--set", "lr=fast"], "lr must be a float, got 'fast'"),
        (["--config", str(TINY_TOML), "--data", str(tmp_path)], "not a prepared data directory"),
        (["--config", str(tmp_path / "missing.toml")], "does not exist"),
        (["--resume"], "needs --out"),
        ([], "--config FILE.toml is required"),
        (["--config", str(TINY_TOML), "--set", "eps=nan"], "eps must be a finite number, got nan"),
        (["--config", str(TINY_TOML), "--set", "grad_clip=inf"], "grad_clip must be a finite number"),
        (["--config", str(TINY_TOML), "--set", "model.rope_theta=0"], "model.rope_theta must be > 0"),
        (["--config", str(TINY_TOML), "--set", "model.norm_eps=-1"], "model.norm_eps must be > 0"),
        (["--config", str(model_is_3), "--set", "model.n_layer=2"], "model must be a table"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2, argv
        assert message in err and "\n" not in err, err
