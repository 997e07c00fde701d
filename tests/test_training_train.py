"""The training loop (training/train.py, checkpointing.py) on a tiny model and corpus, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training_data import prepared_data
from training.checkpointing import CheckpointNotFound, list_checkpoints, load_checkpoint
from training.config import ConfigError, ModelShape, TrainConfig
from training.train import Trainer, TrainingDiverged, setup_runtime, train

ROOT = Path(__file__).resolve().parents[1]
DETERMINISTIC_KEYS = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss", "val_perplexity")
TINY_MODEL = ModelShape(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return prepared_data(tmp_path_factory.mktemp("data"), tokenizer_dir)


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    base = dict(model=TINY_MODEL, data_dir=str(data_dir), out_dir=str(out_dir), seq_len=32, micro_batch_size=8,
                max_steps=8, lr=1e-2, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=1,
                checkpoint_interval=4, keep_checkpoints=0, seed=5)
    return TrainConfig(**{**base, **overrides})


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in DETERMINISTIC_KEYS} for r in records]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_outputs_are_written(data_dir, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(data_dir, out, max_steps=40, eval_interval=20, checkpoint_interval=20, keep_checkpoints=1)
    result = train(config, progress=False)
    losses = [r["loss"] for r in result.metrics]
    vocab = 384
    assert abs(losses[0] - math.log(vocab)) < 0.3, f"first loss {losses[0]:.3f} vs ln(V) {math.log(vocab):.3f}"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 2.0, f"loss fell only from {first:.3f} to {last:.3f}"
    assert result.val_loss is not None and result.val_loss < losses[0] - 1.5, (result.val_loss, losses[0])
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == list(range(1, 41))
    assert [r["tokens"] for r in metrics] == [256 * s for s in range(1, 41)]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(metrics[0])
    assert [r["step"] for r in metrics if "val_loss" in r] == [20, 40]
    assert metrics[-1]["val_perplexity"] == pytest.approx(math.exp(metrics[-1]["val_loss"]))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000040.pt"]  # keep_checkpoints=1
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "train_config.json").is_file()
    state = load_checkpoint(out / "checkpoint-0000040.pt")
    assert (state["step"], state["tokens"], state["data_position"]) == (40, 40 * 256, 40 * 8)
    assert "tokenizer.json" in state["tokenizer_files"] and state["train_config"]["max_steps"] == 40


def test_auto_precision_on_a_cpu_is_bf16_only_where_its_products_are_faster(data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """precision=auto trains in bf16 autocast on CPUs with AMX or whose bf16 products time at >= BF16_SPEEDUP
    times fp32's, fp32 elsewhere; the run says which and why at its start, and records it in its checkpoints."""
    import training.train as train_module

    cpu = torch.device("cpu")
    cases = [(True, 1.0, "bf16", "this CPU has AMX"), (False, 2.5, "bf16", "this CPU's bf16 products ran 2.5x fp32's"),
             (False, 1.2, "fp32", "this CPU's bf16 products ran 1.2x fp32's")]
    for amx, speedup, want, why in cases:
        monkeypatch.setattr(train_module, "amx_bf16", lambda amx=amx: amx)
        monkeypatch.setattr(train_module, "bf16_matmul_speedup", lambda speedup=speedup: speedup)
        assert train_module.resolve_precision(tiny_config(data_dir, tmp_path), cpu) == want
        assert train_module.resolve_precision(tiny_config(data_dir, tmp_path, precision="fp32"), cpu) == "fp32"
        out = tmp_path / f"{want}-{speedup}"
        result = train(tiny_config(data_dir, out, max_steps=2, eval_interval=0), progress=False)
        assert math.isfinite(result.metrics[-1]["loss"])
        note = "bf16 autocast, fp32 weights" if want == "bf16" else "fp32"
        assert f"parameters on cpu, {note} (auto: {why}); steps 0..2" in capsys.readouterr().err
        assert load_checkpoint(out / "checkpoint-0000002.pt")["precision"] == want


def test_a_resumed_auto_run_keeps_the_precision_it_chose(data_dir, tmp_path, monkeypatch, capsys):
    """The timed choice is the run's, not each start's: resumed where bf16 no longer times faster, a run that
    started in bf16 goes on in bf16, so its losses are the uninterrupted run's; an explicit setting still wins."""
    import training.train as train_module

    monkeypatch.setattr(train_module, "amx_bf16", lambda: False)
    monkeypatch.setattr(train_module, "bf16_matmul_speedup", lambda: 3.0)
    knobs = dict(max_steps=4, eval_interval=0)
    whole = train(tiny_config(data_dir, tmp_path / "whole", **knobs), progress=False)

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(data_dir, tmp_path / "cut", **knobs)
    first = train(config, progress=False, on_step=interrupt)
    assert first.interrupted and first.step == 2
    monkeypatch.setattr(train_module, "bf16_matmul_speedup", lambda: 1.0)
    capsys.readouterr()
    second = train(config, resume=True, progress=False)
    assert "bf16 autocast, fp32 weights (auto: the resumed run's choice); steps 2..4" in capsys.readouterr().err
    assert deterministic(first.metrics + second.metrics) == deterministic(whole.metrics)
    cpu = torch.device("cpu")
    assert train_module.resolve_precision(config, cpu, resumed="bf16") == "bf16"
    # a checkpoint written before runs recorded their choice: auto then meant fp32 on a CPU without AMX
    monkeypatch.setattr(train_module, "bf16_matmul_speedup", lambda: 3.0)
    older = tmp_path / "older" / "checkpoint-0000002.pt"
    older.parent.mkdir()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint-0000002.pt")
    del state["precision"]
    torch.save(state, older)
    capsys.readouterr()
    train(tiny_config(data_dir, older.parent, **knobs), resume=True, progress=False)
    assert "parameters on cpu, fp32 (auto: the resumed run's choice); steps 2..4" in capsys.readouterr().err
    assert train_module.resolve_precision(dataclasses.replace(config, precision="fp32"), cpu, resumed="bf16") == "fp32"


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_ctrl_c_saves_and_resume_is_bit_for_bit(data_dir, tmp_path, optimizer, capsys):
    """Gradient accumulation and a batch ramp included: interrupted + resumed == uninterrupted."""
    knobs = dict(grad_accum_steps=2, batch_ramp_steps=3, max_steps=7, optimizer=optimizer)
    whole = train(tiny_config(data_dir, tmp_path / "whole", **knobs), progress=False)

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the loop finishes step 3 and saves

    config = tiny_config(data_dir, tmp_path / "cut", **knobs)
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in a background job
    first = train(config, progress=False, on_step=interrupt)
    assert first.interrupted and first.step == 3
    err = capsys.readouterr().err  # the first Ctrl-C is acknowledged at once, the second one's cost said
    assert "stopping after this step and saving a checkpoint (Ctrl-C again: quit without saving)" in err
    assert "interrupted at step 3" in err
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-0000003.pt"]
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
    with pytest.raises(ConfigError, match="already has checkpoints.*--resume"):
        train(config, progress=False)
    second = train(config, resume=True, progress=False)
    assert not second.interrupted and second.step == 7
    assert deterministic(read_metrics(tmp_path / "cut")) == deterministic(read_metrics(tmp_path / "whole"))
    assert deterministic(first.metrics + second.metrics) == deterministic(whole.metrics)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint-0000007.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint-0000007.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["tokens"] == b["tokens"] == (1 + 1 + 1 + 2 + 2 + 2 + 2) * 8 * 32  # ramp: accum 1, 1, 1, 2, ...


def test_fp16_grad_scaler_path(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "fp16", precision="fp16", max_steps=3, eval_interval=0)
    try:
        result = train(config, progress=False)
    except RuntimeError as e:  # a torch build without fp16 CPU kernels
        pytest.skip(f"fp16 autocast on CPU is not supported by this torch: {e}")
    reference = train(tiny_config(data_dir, tmp_path / "fp32", max_steps=3, eval_interval=0), progress=False)
    for got, want in zip(result.metrics, reference.metrics):
        assert got["loss_scale"] > 0 and "loss_scale" not in want
        assert abs(got["loss"] - want["loss"]) < 0.05, (got["loss"], want["loss"])
    state = load_checkpoint(tmp_path / "fp16" / "checkpoint-0000003.pt")
    assert state["scaler"]["scale"] == result.metrics[-1]["loss_scale"]


def test_a_bf16_residual_stream_trains_like_the_fp32_one(data_dir, tmp_path):
    """residual = "autocast" under bf16 autocast: the run's model carries a bf16 residual stream, and its losses
    follow the fp32 stream's run (the same data and initialization) to the same place."""
    runs = {}
    for residual in ("fp32", "autocast"):
        config = tiny_config(data_dir, tmp_path / residual, precision="bf16", residual=residual, max_steps=12,
                             eval_interval=0, checkpoint_interval=0)
        trainer = Trainer(config, setup_runtime(config), progress=False)
        assert trainer.model.autocast_residual == (residual == "autocast")
        runs[residual] = [r["loss"] for r in trainer.run().metrics]
    assert runs["autocast"] != runs["fp32"]  # the stream was rounded to bf16 ...
    for step, (got, want) in enumerate(zip(runs["autocast"], runs["fp32"]), 1):  # ... and trained the same
        assert abs(got - want) < 0.1 * want, (step, got, want)  # (at lr 1e-2 single steps wander by ~6%)
    last, last_fp32 = sum(runs["autocast"][-4:]) / 4, sum(runs["fp32"][-4:]) / 4
    assert abs(last - last_fp32) < 0.03 * last_fp32, (runs["autocast"], runs["fp32"])
    assert runs["autocast"][-1] < runs["autocast"][0] - 1.0
    with pytest.raises(ConfigError, match="residual"):
        tiny_config(data_dir, tmp_path, residual="bf16")


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
    """lr=1e30: step 1's update blows the weights up, a later step's loss is NaN."""
    config = tiny_config(data_dir, tmp_path / "nan", lr=1e30, warmup_steps=0, grad_clip=0.0, max_steps=8,
                         checkpoint_interval=0)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient norm at step (\d+) ") as exc:
        train(config, progress=False)
    first_bad = int(exc.value.args[0].split("at step ")[1].split(" ")[0])
    assert 2 <= first_bad <= 4, exc.value
    assert list_checkpoints(tmp_path / "nan") == []  # the diverged state is never saved
    # as on a GPU: values read back only every log_interval steps, yet the first bad step is reported
    config = dataclasses.replace(config, out_dir=str(tmp_path / "nan2"), log_interval=5, eval_interval=0)
    trainer = Trainer(config, setup_runtime(config), progress=False)
    trainer.read_back_every_step = False
    with pytest.raises(TrainingDiverged, match=rf"at step {first_bad} \(at step 5: loss nan"):
        trainer.run()


def test_bad_checkpoint_and_missing_data_are_clear_errors(data_dir, tmp_path):
    (tmp_path / "checkpoint-0000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointNotFound, match="checkpoint-0000001.pt is not a readable Kiln training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-0000001.pt")
    with pytest.raises(ConfigError, match="no data directory"):
        train(dataclasses.replace(tiny_config(data_dir, tmp_path / "x"), data_dir=""), progress=False)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_accumulation(data_dir, tmp_path, parallel):
    """torchrun, 2 CPU processes (Gloo): the same global batches, so the same losses as 1 process x 2 micro-batches.
    In fp32 on both sides: bf16 products (precision=auto on CPUs where they are faster) round each output to 8
    bits, so the processes' other thread counts would move the losses by ~1e-4."""
    config = tmp_path / "c.toml"
    config.write_text("seed = 5\nseq_len = 32\nmicro_batch_size = 4\nmax_steps = 3\nlr = 1e-2\nwarmup_steps = 1\n"
                      "precision = \"fp32\"\n"
                      "eval_interval = 3\neval_batches = 2\nlog_interval = 1\ncheckpoint_interval = 0\n"
                      "[model]\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nd_model = 64\nd_ff = 128\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--config", str(config), "--data", str(data_dir), "--no-progress"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "training", *common, "--out", str(tmp_path / "two"), "--set", "grad_accum_steps=1",
                    "--set", f"parallel={parallel}"], env=env, check=True, capture_output=True, timeout=120)
    one = train(tiny_config(data_dir, tmp_path / "one", micro_batch_size=4, grad_accum_steps=2, max_steps=3,
                            warmup_steps=1, eval_interval=3, checkpoint_interval=0, precision="fp32"), progress=False)
    two = read_metrics(tmp_path / "two")
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one.metrics] == [256, 512, 768]
    for key in ("loss", "grad_norm"):
        got, want = [r[key] for r in two], [r[key] for r in one.metrics]
        assert max(abs(g - w) for g, w in zip(got, want)) < 1e-5, f"{key}: {got} vs {want}"
    assert abs(two[-1]["val_loss"] - one.metrics[-1]["val_loss"]) < 1e-5
    state = load_checkpoint(tmp_path / "two" / "checkpoint-0000003.pt")  # gathered to full tensors on rank 0
    assert state["model"]["embed.weight"].shape == (384, 64)


def test_ctrl_c_between_log_steps_still_logs_and_plots(data_dir, tmp_path):
    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(data_dir, tmp_path / "run", max_steps=7, log_interval=100, eval_interval=0)
    result = train(config, progress=False, on_step=interrupt)
    assert result.interrupted and result.step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2]
    assert (tmp_path / "run" / "loss.png").is_file()
