"""The optimizer side of the recipe: parameter groups, AdamW / Adafactor, LR and batch schedules.

GPT-3's recipe: AdamW (beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.1 on matrices
(linear weights, embeddings) and none on norms and biases; linear warmup, then cosine decay
to 10% of the peak LR; optionally a batch size that ramps up over the first steps.

The schedules are pure functions of the step, so a resumed run picks them up exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ConfigError, TrainConfig


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without): decay parameters with 2+ dims (matrices, embeddings).

    A tied weight (embedding == LM head) is one parameter and appears once.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused kernels on CUDA) or Adafactor, with fp32 state beside the fp32 master weights."""
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr, weight_decay=config.weight_decay)
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             weight_decay=config.weight_decay, fused=fused or None)


def lr_at(step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.1,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup: lr * (step + 1) / warmup_steps, reaching `lr` at step warmup_steps - 1.
    Decay from step warmup_steps (lr) to step decay_steps (lr * min_lr_ratio), flat after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    floor = lr * min_lr_ratio
    if step >= decay_steps:
        return floor
    progress = (step - warmup_steps) / (decay_steps - warmup_steps)
    if schedule == "linear":
        return lr - (lr - floor) * progress  # written from the peak down: exactly lr at progress 0
    if schedule == "cosine":
        return lr - (lr - floor) * 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"schedule must be cosine, linear or constant; got {schedule!r}")


def config_lr(config: TrainConfig, step: int, max_steps: int) -> float:
    return lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps,
                 decay_steps=config.decay_steps or max_steps, min_lr_ratio=config.min_lr_ratio,
                 schedule=config.schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def accum_at(step: int, full_accum: int, ramp_steps: int) -> int:
    """Micro-batches per process at `step`: ramps linearly from 1 to full_accum over ramp_steps."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return full_accum
    return min(full_accum, 1 + (full_accum - 1) * step // ramp_steps)


def sequences_before(step: int, full_accum: int, ramp_steps: int, sequences_per_micro: int) -> int:
    """Sequences of the global stream consumed by steps 0 .. step - 1 (sequences_per_micro = B * world)."""
    if ramp_steps <= 0 or step == 0:
        return step * full_accum * sequences_per_micro
    ramped = min(step, ramp_steps)
    total = sum(accum_at(s, full_accum, ramp_steps) for s in range(ramped))
    return (total + (step - ramped) * full_accum) * sequences_per_micro


def planned_steps(config: TrainConfig, full_accum: int, sequences_per_micro: int) -> int:
    """Steps to run: max_steps, or enough steps to see max_tokens (batch ramp included)."""
    if config.max_steps:
        return config.max_steps
    if not config.max_tokens:
        raise ConfigError("the run has no length: set max_steps or max_tokens in the config, or pass --max-steps N")
    tokens_per_micro = sequences_per_micro * config.seq_len
    steps, tokens = 0, 0
    while steps < config.batch_ramp_steps and tokens < config.max_tokens:
        tokens += accum_at(steps, full_accum, config.batch_ramp_steps) * tokens_per_micro
        steps += 1
    remaining = max(0, config.max_tokens - tokens)
    return steps + -(-remaining // (full_accum * tokens_per_micro))
