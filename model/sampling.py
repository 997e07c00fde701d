"""The sampler: a pure function from logits and per-row parameters to token ids.

`sample(logits, params)` applies, per row: logit bias (OpenAI's `logit_bias`: a value added
to chosen ids' logits), presence/frequency penalties (OpenAI semantics, on the tokens
generated so far), temperature (below `GREEDY_BELOW`, 0 included:
greedy argmax, as vLLM does; dividing logits by 1e-38 would overflow them to inf), top-k
(0 = off) and top-p (1 = off), then draws with the row's own `torch.Generator` when it
has a seed. Logprobs (the chosen token's and the top-N) come from the model's
unmodified distribution, as vLLM reports them. Ids at or past `vocab_limit` (padding
rows of the embedding table) are never returned.

Nothing here reads a value back to the host on CUDA, and per-row parameters go up without a
stream sync (`model.transfer`): the whole step stays queued on the device.
Random draws invert the CDF: one uniform per row (a seeded row draws it from its own
generator), and the sampled id is the first whose cumulative probability passes it. That is
exact, and a scan of the row instead of a random number per vocabulary entry (on a CPU, drawing
8k exponentials cost more than the default model's whole decode step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transfer import to_device

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)
# OpenAI accepts temperatures of 0-2 and vLLM any >= 0. Past float32's range (~3.4e38) a temperature is
# infinity and every scaled logit 0, which erases the ranking that top-k and top-p cut by; this bound is far
# above any temperature a sampler is used with, and far below where that happens.
MAX_TEMPERATURE = 1e4


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for one step; lists have one entry per row."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    generators: list[torch.Generator | None]
    presence_penalty: list[float] | None = None
    frequency_penalty: list[float] | None = None
    logit_bias: list[tuple[tuple[int, float], ...]] | None = None  # per row: (id, bias) pairs
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


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """logits (B, V) with each row's (id, bias) pairs added (a new tensor; one upload, one scatter)."""
    rows = [b for b, pairs in enumerate(biases) for _ in pairs]
    ids = [i for pairs in biases for i, _ in pairs]
    values = [v for pairs in biases for _, v in pairs]
    device = logits.device
    return logits.index_put((to_device(rows, torch.int64, device), to_device(ids, torch.int64, device)),
                            to_device(values, logits.dtype, device), accumulate=True)


def top_k_top_p_mask(logits: torch.Tensor, top_k: list[int] | torch.Tensor,
                     top_p: list[float] | torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf. logits (B, V) fp32; top_k / top_p
    per row (0 and 1.0: no cut), as lists or tensors.

    The nucleus is the smallest prefix of the row's tokens by logit whose probability (under the
    top-k-restricted distribution) reaches top_p; the first token always stays. Sorting a vocabulary
    is the costly part, so the cut is looked for among each row's top K tokens (`topk`, a partial
    selection): on the CPU K = 64 first and 8x larger for the rows whose nucleus does not end inside
    it; on CUDA, where that check would cost a host sync per step, only a batch cut by top-k alone
    (K = the largest k, known on the host) takes the window, and one with a nucleus sorts whole rows."""
    B, V = logits.shape
    device = logits.device

    def host(values):  # the per-row values as a list, when that costs no GPU sync (else None)
        if not isinstance(values, torch.Tensor):
            return list(values)
        return None if values.is_cuda else values.tolist()

    ks, ps = host(top_k), host(top_p)
    top_k = top_k if isinstance(top_k, torch.Tensor) else to_device(ks, torch.int64, device)
    top_p = top_p if isinstance(top_p, torch.Tensor) else to_device(ps, torch.float32, device)
    k_row = torch.where(top_k > 0, top_k.clamp(max=V), V)
    p_row = torch.where(top_p < 1.0, top_p, float("inf"))  # top_p 1: no nucleus cut, whatever the rounding
    if ks is None or ps is None or (logits.is_cuda and any(p < 1.0 for p in ps)):
        values, indices = logits.sort(dim=-1, descending=True)
        remove, _ = _cut(values, k_row, p_row, None)
        return _scatter_kept(logits, values, indices, remove)
    ks = [k if 0 < k < V else V for k in ks]
    todo = [b for b in range(B) if ks[b] < V or ps[b] < 1.0]  # rows with a cut to make
    if not todo:
        return logits
    out = logits  # cloned before rows are written into it (rows without a cut keep their logits)
    # rows cut by top-k alone need their k tokens in the window; rows with a nucleus start at 64
    K = min(V, max([64] + [ks[b] for b in todo if ks[b] < V]))
    whole = torch.logsumexp(logits, dim=-1) if K < V else None  # the normalizer of rows without a top-k cut
    while todo:
        rows = to_device(todo, torch.int64, device)
        sub = logits if len(todo) == B else logits[rows]
        values, indices = sub.topk(K, dim=-1)  # (R, K) sorted descending
        remove, resolved = _cut(values, k_row[rows], p_row[rows],
                                None if K == V else whole if len(todo) == B else whole[rows],
                                top_k_cut=any(ks[b] < V for b in todo))
        # (on CUDA only top-k cuts come here, all inside the window: no need to read `resolved` back)
        done = list(range(len(todo))) if logits.is_cuda or K == V else \
            [i for i, r in enumerate(resolved.tolist()) if r]
        if len(done) == len(todo) == B:  # every row at once (the usual case): no copies
            return _scatter_kept(logits, values, indices, remove)
        if out is logits:
            out = logits.clone()
        if done:
            at = to_device(done, torch.int64, device)
            out[rows[at]] = _scatter_kept(sub[at], values[at], indices[at], remove[at])
        finished = set(done)
        todo = [b for i, b in enumerate(todo) if i not in finished]  # the rest try a window 8x wider
        K = min(V, 8 * K)
    return out


def _cut(values: torch.Tensor, k_row: torch.Tensor, p_row: torch.Tensor, whole: torch.Tensor | None,
         top_k_cut: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k / top-p cut of each row from its top K logits `values` (B, K), sorted descending:
    (which of them to remove, which rows' cuts end inside the window). `whole` is each row's
    log-sum-exp over the full vocabulary when the window is partial (None when it is the whole row).
    `top_k_cut` False (no row has one, known on the host) skips the top-k masking."""
    K = values.shape[-1]
    if top_k_cut:
        remove = torch.arange(K, device=values.device)[None, :] >= k_row[:, None]  # (B, K)
        kept = values.masked_fill(remove, float("-inf"))
        # the top-k-restricted distribution's normalizer: over the row's top k, all inside the window
        # when k <= K; over the whole row otherwise
        norm = torch.logsumexp(kept, dim=-1)
        if whole is not None:
            norm = torch.where(k_row <= K, norm, whole)
    else:
        remove, kept = None, values
        norm = whole if whole is not None else torch.logsumexp(values, dim=-1)
    probs = (kept - norm[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    nucleus_cut = mass - probs >= p_row[:, None]  # the mass before the token already reaches top_p
    remove = nucleus_cut if remove is None else remove | nucleus_cut
    remove[:, 0] = False
    resolved = mass[:, -1] >= p_row
    return remove, (resolved | (k_row <= K)) if top_k_cut else resolved


def _scatter_kept(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  remove: torch.Tensor) -> torch.Tensor:
    """-inf everywhere but the kept tokens of the window (values at indices, not removed)."""
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values.masked_fill(remove, float("-inf")))


def _softmax(x: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """softmax(x / temperature) over rows in fp32; temperature a float or (B,) per row. On CUDA the
    fused Triton kernel (scaling included)."""
    if x.is_cuda:
        try:
            from kernels.softmax import softmax

            return softmax(x, temperature)
        except ImportError:
            pass
    if isinstance(temperature, torch.Tensor):
        return (x / temperature[:, None]).softmax(dim=-1)
    return (x / temperature if temperature != 1.0 else x).softmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingBatch, vocab_limit: int | None = None,
           native=None) -> SampleOutput:
    """logits (B, V) -> SampleOutput. Rows with temperature < GREEDY_BELOW take the argmax.

    `native`: Kiln's compiled CPU module (model/native), whose `sample_rows` makes the same draw
    (temperature, top-k, top-p, the same uniforms) in one call on CPU logits."""
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

    if params.logit_bias is not None and any(params.logit_bias):
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.output_counts is not None and (any(params.presence_penalty or ()) or any(params.frequency_penalty or ())):
        logits = apply_penalties(logits, params.output_counts,
                                 to_device(params.presence_penalty, torch.float32, device),
                                 to_device(params.frequency_penalty, torch.float32, device))

    greedy = [t < GREEDY_BELOW for t in params.temperature]
    if all(greedy):
        token_ids = logits.argmax(dim=-1)
    else:
        # inverse-CDF draw: the first token whose cumulative probability passes u * total, u ~ U[0, 1), one
        # uniform per row (a seeded row draws its own), not one random number per vocabulary entry
        u = torch.empty(B, 1, device=device)
        shared = [i for i, g in enumerate(params.generators) if g is None]
        if len(shared) == B:
            u.uniform_()
        else:
            if shared:
                u[to_device(shared, torch.int64, device)] = torch.rand(len(shared), 1, device=device)
            for i, g in enumerate(params.generators):
                if g is not None:
                    u[i] = torch.rand(1, generator=g, device=device)
        if native is not None and device.type == "cpu":
            token_ids = native.sample_rows(logits, list(params.temperature), list(params.top_k),
                                           list(params.top_p), u, V, GREEDY_BELOW)
        else:
            token_ids = _draw(logits, params, greedy, u)

    if params.want_logprobs or params.num_logprobs > 0:
        logprobs = logprob_table.gather(-1, token_ids[:, None])[:, 0]
    return SampleOutput(token_ids, logprobs, top_ids, top_logprobs)


def _draw(logits: torch.Tensor, params: SamplingBatch, greedy: list[bool], u: torch.Tensor) -> torch.Tensor:
    """The torch path of a draw with uniforms u (B, 1): temperature, top-k / top-p, inverse CDF."""
    device, V = logits.device, logits.shape[-1]
    # one temperature for the batch (the usual case) is a scalar; greedy rows divide by 1 (unused)
    temps = [1.0 if g else t for t, g in zip(params.temperature, greedy)]
    temperature = temps[0] if len(set(temps)) == 1 else to_device(temps, torch.float32, device)
    if any(k > 0 for k in params.top_k) or any(p < 1.0 for p in params.top_p):
        scaled = logits / (temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature)
        probs = _softmax(top_k_top_p_mask(scaled, params.top_k, params.top_p))
    else:
        probs = _softmax(logits, temperature)
    cdf = probs.cumsum(dim=-1)
    # the count of ids whose cumulative probability is <= the draw is the index of the first one past it;
    # a zero-probability id repeats its predecessor's cdf, so it is never the first past it
    sampled_ids = (cdf <= u * cdf[:, -1:]).sum(dim=-1).clamp_(max=V - 1)
    if any(greedy):
        return torch.where(to_device(greedy, torch.bool, device), logits.argmax(dim=-1), sampled_ids)
    return sampled_ids
