"""Log-probabilities of given ids from hidden states, in chunks of positions.

Scoring long texts needs log p(id_t | ids_<t) at every position. Computing the full
(N, V) fp32 log-softmax at once costs N * V * 4 bytes; here the LM head and the
log-softmax + gather run per chunk of positions, so at most `chunk * V` logits live at
a time (on CUDA the fused Triton kernel gathers without the fp32 table).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def chunked_logprobs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, num_top: int = 0,
                     vocab_limit: int | None = None, chunk: int = 512
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden (N, d), targets (N,) -> (logprobs (N,), top_logprobs (N, k) | None, top_ids (N, k) | None)."""
    N = hidden.shape[0]
    logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
    top_lp = torch.empty(N, num_top, dtype=torch.float32, device=hidden.device) if num_top else None
    top_ids = torch.empty(N, num_top, dtype=torch.long, device=hidden.device) if num_top else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        logits = lm_head(hidden[start:end])  # (n, V)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits[:, :vocab_limit]
        if logits.is_cuda and not num_top:
            from kernels.cross_entropy import token_logprobs

            logprobs[start:end] = token_logprobs(logits, targets[start:end])  # fused, no fp32 table
            continue
        table = logits.float().log_softmax(dim=-1)
        logprobs[start:end] = table.gather(-1, targets[start:end, None])[:, 0]
        if num_top:
            top_lp[start:end], top_ids[start:end] = table.topk(num_top, dim=-1)
    return logprobs, top_lp, top_ids
