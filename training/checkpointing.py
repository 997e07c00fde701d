"""Training checkpoints: atomic save, find the latest, exact resume.

A checkpoint is one `torch.save` file, `OUT/checkpoint-0001000.pt`, holding a dict of
plain data and tensors (so it loads with `weights_only=True`):

    format          "kiln-train-checkpoint-v1"
    step            optimizer steps completed (the LR schedule position)
    tokens          training tokens consumed so far
    data_position   sequences of the global training stream consumed (the data position)
    model           full fp32 state dict (names as in model.transformer.Transformer)
    optimizer       full optimizer state, keyed by parameter name (so a checkpoint written by
                    one process resumes on several, under DDP or FSDP, and back)
    scaler          GradScaler state (fp16) or None
    rng             torch CPU / CUDA generator states
    train_config    TrainConfig.to_dict()
    model_config    ModelConfig.to_dict()
    data_meta       the meta.json of the data directory it was trained on
    tokenizer_files {file name: bytes}: the tokenizer, so a lone checkpoint can be exported

Writes go to a temporary file in the same directory, are fsynced, then renamed over the
final name: a crash mid-write leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

CHECKPOINT_FORMAT = "kiln-train-checkpoint-v1"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointNotFound(ValueError):
    """No usable checkpoint at the given path; the message says what was looked for."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint files in `out_dir`, oldest step first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as is, or the latest checkpoint of a training output directory."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointNotFound(f"{str(path)!r} has no checkpoint-*.pt files: not a training output directory")
        return latest
    if path.exists():
        raise CheckpointNotFound(f"{str(path)!r} is neither a regular file nor a directory (expected a checkpoint "
                                 "file or a training --out directory)")
    raise CheckpointNotFound(f"{str(path)!r} does not exist (expected a checkpoint file or a training --out directory)")


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU (tensors and plain data only: weights_only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointNotFound(f"{path} is not a readable Kiln training checkpoint "
                                 f"(torch.load: {_load_failure(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointNotFound(f"{path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


def _load_failure(error: Exception) -> str:
    """torch.load's failure in a few words, without its paragraphs of weights_only advice."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch bolds part of its advice
    # a weights_only refusal buries the actual cause after "WeightsUnpickler error:"
    message = message.split("WeightsUnpickler error:")[-1]
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")
    # the unpickler fails on a text file with bare errors such as KeyError('105'): name the type
    if len(first) <= 8:
        first = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return first if len(first) <= 100 else first[:97] + "..."


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0 keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(out_dir)[:-keep]:
        path.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 state dict on the CPU; collective under FSDP (call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name; collective under FSDP."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def apply_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                         model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
    """Load full state dicts into a (possibly sharded) model and its optimizer, on every rank."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
