"""Scoring: log-probabilities of given ids, in chunks of positions, over sliding windows.

Scoring long texts needs log p(id_t | ids_<t) at every position. Computing the full
(N, V) fp32 log-softmax at once costs N * V * 4 bytes; here the LM head and the
log-softmax + gather run per chunk of positions, so at most `chunk * V` logits live at
a time (on CUDA the fused Triton kernel gathers without the fp32 table).

A window longer than a forward may take (`ScoreTask.advance(max_tokens)` while a server's streams
decode) is run in chunks through a KV cache of the task's own, one window long, so that no
forward holds the streams back longer than a prefill chunk would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .kv_cache import KVCache

WINDOW_BLOCK_SIZE = 16  # tokens per block of a task's own KV cache (chunked windows)


def chunked_logprobs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, num_top: int = 0,
                     vocab_limit: int | None = None, chunk: int = 512, cpu_ops=None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden (N, d), targets (N,) -> (logprobs (N,), top_logprobs (N, k) | None, top_ids (N, k) | None).

    `cpu_ops` (the model's `Transformer.cpu_ops`, model/native): fp32 CPU logits are read in place by its
    `token_logprobs` (one pass for the log-sum-exp, one more for the top ids) instead of through a
    log-softmax table."""
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
        if cpu_ops is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            lp, top, ids = cpu_ops.token_logprobs(logits, targets[start:end].long(), logits.shape[-1], num_top)
            logprobs[start:end] = lp
            if num_top:
                top_lp[start:end], top_ids[start:end] = top, ids
            continue
        table = logits.float().log_softmax(dim=-1)
        logprobs[start:end] = table.gather(-1, targets[start:end, None])[:, 0]
        if num_top:
            top_lp[start:end], top_ids[start:end] = table.topk(num_top, dim=-1)
    return logprobs, top_lp, top_ids


@dataclass
class ScoreResult:
    token_ids: list[int]  # the scored sequence (with BOS when the tokenizer adds one)
    logprobs: list[float | None]  # one per id; None for ids with no context (the first)

    @property
    def num_scored(self) -> int:
        return sum(lp is not None for lp in self.logprobs)

    @property
    def mean_nll(self) -> float:
        scored = [-lp for lp in self.logprobs if lp is not None]
        return sum(scored) / len(scored) if scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.num_scored else float("nan")


class ScoreTask:
    """Per-token logprobs of several sequences, advanced one batched forward at a time.

    Sequences longer than the context are scored with sliding windows. Every id but the
    first is scored exactly once: windows of up to `max_seq_len` ids end `stride` ids apart
    (default half the context), and each scores only the ids past the previous window's
    end, with the rest of the window as their context. Windows of similar length share a
    forward of at most `batch_tokens` (padded) tokens; `advance(max_tokens)` takes a smaller
    one (a server with streams running keeps each forward short), down to `unit_tokens`; a window
    longer than `max_tokens` runs in chunks of `max_tokens` through the task's own KV cache, one
    chunk per call.
    """

    def __init__(self, model: nn.Module, sequences: list[list[int]], max_seq_len: int, vocab_limit: int,
                 stride: int | None = None, batch_tokens: int = 4096, unit_tokens: int | None = None):
        C = max_seq_len
        stride = stride or max(1, C // 2)
        if not 1 <= stride <= C:
            raise ValueError(f"stride must be in [1, {C}] (the context length), got {stride}")
        self.model, self.sequences, self.vocab_limit = model, sequences, vocab_limit
        step = min(stride, C - 1) if C > 1 else 1  # windows must overlap by >= 1 id to give each its context
        windows = []  # (sequence index, begin, end, first scored offset within the window)
        for s, ids in enumerate(sequences):
            if len(ids) < 1:
                raise ValueError("cannot score an empty sequence")
            bad = [i for i in ids if not 0 <= i < vocab_limit]
            if bad:
                raise ValueError(f"token id {bad[0]} is out of range [0, {vocab_limit})")
            prev_end, end = 1, min(C, len(ids))
            while True:
                begin = max(0, end - C)
                windows.append((s, begin, end, prev_end - begin))
                if end >= len(ids):
                    break
                prev_end, end = end, min(end + step, len(ids))
        self.results = [ScoreResult(list(ids), [None] * len(ids)) for ids in sequences]
        self.batch_tokens = batch_tokens
        # units of at most `unit` padded tokens, by length; a forward takes consecutive units while they fit
        unit = min(batch_tokens, unit_tokens or batch_tokens)
        self.groups: list[tuple[list[tuple[int, int, int, int]], int]] = []  # (windows, padded length)
        windows.sort(key=lambda w: w[2] - w[1])
        group, T = [], 0
        for w in windows:
            n = w[2] - w[1]
            if group and max(T, n) * (len(group) + 1) > unit:
                self.groups.append((group, T))
                group, T = [], 0
            group.append(w)
            T = max(T, n)
        if group:
            self.groups.append((group, T))
        self._next = 0
        self._windows_done = 0
        self._windows_total = len(windows)
        self._longest_window = max(w[2] - w[1] for w in windows)  # sizes the chunked windows' KV cache
        self._chunked: tuple[tuple[int, int, int, int], int] | None = None  # (window, ids computed so far)
        self._window_cache: KVCache | None = None  # made at the first chunked window
        self._window_table: list[int] = []  # its blocks, in order

    @property
    def done(self) -> bool:
        return self._next >= len(self.groups) and self._chunked is None

    @property
    def progress(self) -> tuple[int, int]:
        """(windows scored, windows in all)."""
        return self._windows_done, self._windows_total

    @torch.inference_mode()
    def advance(self, max_tokens: int | None = None) -> None:
        """Run the next batched forward: the next units of windows while their padded tokens fit in
        `max_tokens` (default `batch_tokens`), at least one; or, for a window longer than `max_tokens`,
        its next chunk."""
        budget = max_tokens or self.batch_tokens
        if self._chunked is None and self.groups[self._next][1] > budget:
            self._chunked = (self.groups[self._next][0][0], 0)  # a window longer than the budget: in chunks
            self.groups[self._next][0].pop(0)
            if not self.groups[self._next][0]:
                self._next += 1
        if self._chunked is not None:
            self._advance_chunk(budget)
            return
        windows, T = self.groups[self._next]
        self._next += 1
        while self._next < len(self.groups):
            more, T_more = self.groups[self._next]  # sorted by length: T_more >= T
            if max(T, T_more) * (len(windows) + len(more)) > budget:
                break
            windows, T = windows + more, max(T, T_more)
            self._next += 1
        device = next(self.model.parameters()).device
        tokens = torch.zeros(len(windows), T, dtype=torch.long)
        for row, (s, begin, end, _) in enumerate(windows):
            tokens[row, : end - begin] = torch.tensor(self.sequences[s][begin:end])
        tokens = tokens.to(device)
        hidden = self.model(tokens, return_hidden=True)  # (B, T, d)
        for row, (s, begin, end, first) in enumerate(windows):
            n = end - begin
            if n < 2 or first >= n:
                continue
            # position p predicts id p+1: score ids first..n-1 of the window
            h = hidden[row, first - 1: n - 1]
            targets = tokens[row, first:n]
            lp, _, _ = chunked_logprobs(h, self.model.lm_head, targets, 0, self.vocab_limit,
                                        cpu_ops=getattr(self.model, "cpu_ops", None))
            self.results[s].logprobs[begin + first: end] = lp.tolist()
        self._windows_done += len(windows)

    def _advance_chunk(self, budget: int) -> None:
        """The next `budget` ids of the window being chunked: their keys and values go into the task's KV
        cache, where the later chunks attend to them, and the ids they predict are scored."""
        (s, begin, end, first), done = self._chunked
        n = end - begin
        device = next(self.model.parameters()).device
        if self._window_cache is None:
            dtype = self.model.embed.weight.dtype
            blocks = -(-self._longest_window // WINDOW_BLOCK_SIZE)
            self._window_cache = KVCache(self.model.config, blocks + 1, WINDOW_BLOCK_SIZE, self._longest_window,
                                         device, dtype, enable_prefix_caching=False)
            self._window_table = [self._window_cache.pool.allocate() for _ in range(blocks)]
        cache = self._window_cache
        stop = min(n, done + budget)
        ids = self.sequences[s][begin + done: begin + stop]
        tokens = torch.tensor([ids], dtype=torch.long).to(device)  # (1, chunk)
        batch = cache.batch([self._window_table], [done], [stop - done])
        hidden = self.model(tokens, kv_cache=cache, batch=batch, return_hidden=True)[0]  # (chunk, d)
        # window position p predicts id p + 1; the window scores ids first..n-1
        lo, hi = max(done, first - 1), min(stop, n - 1)
        if lo < hi:
            targets = torch.tensor(self.sequences[s][begin + lo + 1: begin + hi + 1], dtype=torch.long).to(device)
            lp, _, _ = chunked_logprobs(hidden[lo - done: hi - done], self.model.lm_head, targets, 0,
                                        self.vocab_limit, cpu_ops=getattr(self.model, "cpu_ops", None))
            self.results[s].logprobs[begin + lo + 1: begin + hi + 1] = lp.tolist()
        if stop == n:
            self._chunked = None
            self._windows_done += 1
        else:
            self._chunked = ((s, begin, end, first), stop)
