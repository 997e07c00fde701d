"""The sampler: a pure function from logits and per-row parameters to token ids.

`sample(logits, params)` applies, per row: presence/frequency penalties (OpenAI
semantics, on the tokens generated so far), temperature (0 = greedy argmax), top-k
(0 = off) and top-p (1 = off), then draws with the row's own `torch.Generator` when it
has a seed. Logprobs (the chosen token's and the top-N) come from the model's
unmodified distribution, as vLLM reports them. Ids at or past `vocab_limit` (padding
rows of the embedding table) are never returned.

Nothing here reads a value back to the host, and per-row parameters go up without a
stream sync (`model.transfer`): the whole step stays queued on the device.
Random draws use the exponential race (argmax p / E, E ~ Exp(1)), which samples from p
exactly and lets each seeded row use its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transfer import to_device


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for one step; lists have one entry per row."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    generators: list[torch.Generator | None]
    presence_penalty: list[float] | None = None
    frequency_penalty: list[float] | None = None
    output_counts: torch.Tensor | None = None  # (B, V) counts of each id generated so far (for penalties)
    num_logprobs: int = 0  # top-N logprobs to return (0 = none)
    want_logprobs: bool = False  # return the chosen token's logprob


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) fp32, chosen token under the unmodified distribution
    top_ids: torch.Tensor | None  # (B, N) int64
    top_logprobs: torch.Tensor | None  # (B, N) fp32


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    counts = counts.to(logits.dtype)
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf. logits (B, V) fp32."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)
    remove = ranks >= k[:, None]  # (B, V) in sorted order
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # the nucleus: the smallest prefix whose mass reaches top_p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    remove = remove | (mass_before >= top_p[:, None])
    remove[:, 0] = False
    return logits.scatter(-1, sorted_idx, sorted_logits.masked_fill(remove, float("-inf")))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        try:
            from kernels.softmax import softmax

            return softmax(x)
        except ImportError:
            pass
    return x.softmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingBatch, vocab_limit: int | None = None) -> SampleOutput:
    """logits (B, V) -> SampleOutput. Rows with temperature 0 take the argmax."""
    B, V = logits.shape
    device = logits.device
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < V:
        logits[:, vocab_limit:] = float("-inf")
    raw = logits

    logprobs = top_ids = top_logprobs = None
    if params.want_logprobs or params.num_logprobs > 0:
        logprob_table = raw.log_softmax(dim=-1)
        if params.num_logprobs > 0:
            top_logprobs, top_ids = logprob_table.topk(params.num_logprobs, dim=-1)

    if params.output_counts is not None and (any(params.presence_penalty or ()) or any(params.frequency_penalty or ())):
        logits = apply_penalties(logits, params.output_counts,
                                 to_device(params.presence_penalty, torch.float32, device),
                                 to_device(params.frequency_penalty, torch.float32, device))

    greedy_ids = logits.argmax(dim=-1)
    if all(t == 0 for t in params.temperature):
        token_ids = greedy_ids
    else:
        temperature = to_device(params.temperature, torch.float32, device)
        scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
        if any(k > 0 for k in params.top_k) or any(p < 1.0 for p in params.top_p):
            scaled = top_k_top_p_mask(scaled, to_device(params.top_k, torch.int64, device),
                                      to_device(params.top_p, torch.float32, device))
        probs = _softmax(scaled)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(params.generators) if g is None]
        if len(shared) == B:
            noise.exponential_()
        else:
            if shared:
                rows = to_device(shared, torch.int64, device)
                noise[rows] = torch.empty(len(shared), V, device=device).exponential_()
            for i, g in enumerate(params.generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
        sampled_ids = (probs / noise).argmax(dim=-1)
        token_ids = torch.where(temperature > 0, sampled_ids, greedy_ids)

    if params.want_logprobs or params.num_logprobs > 0:
        logprobs = logprob_table.gather(-1, token_ids[:, None])[:, 0]
    return SampleOutput(token_ids, logprobs, top_ids, top_logprobs)
