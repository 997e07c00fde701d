"""The engine: continuous-batching generation and scoring over one model and KV cache.

It owns no threads: a caller (the CLI, or the server's worker thread) adds requests and
calls `step()`. Each step admits waiting requests into free cache slots and prefills them
in one batched forward (each emits its first token), then runs one batched decode
forward over the requests that were already running. Finished requests free their slot
at once, so a waiting one can take it on the next step.

`score()` computes per-token log-probabilities of whole texts (sliding windows past the
context) without the cache; it is what perplexity, `kiln ppl` and the server use.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .attention import resolve_backend
from .fast_decode import DecodePlan
from .kv_cache import KVCache
from .sampling import SamplingBatch, sample
from .scoring import ScoreResult, ScoreTask, chunked_logprobs
from .text_stream import TextStream
from .tokenizer import Tokenizer
from .transformer import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; N >= 0: chosen token + top-N
    prompt_logprobs: bool = False  # echo: logprobs of the prompt tokens too

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
        need(math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        need(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request: "Request"
    token_ids: list[int]  # generated ids this step (0 or 1)
    text: str  # newly showable text
    logprobs: list[TokenLogprob]  # for the ids above (and the prompt's on the first step with echo)
    finish_reason: str | None  # None, "stop" or "length"
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def prefill_groups(lengths: list[int], max_padding: float = 0.5, max_tokens: int = 8192) -> list[list[int]]:
    """Indices of prompts to prefill together: similar lengths, so right-padding wastes at most
    `max_padding` of each forward, and at most `max_tokens` padded tokens per forward."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            padded = lengths[i] * (len(group) + 1)  # sorted: the newcomer is the longest
            real = sum(lengths[j] for j in group) + lengths[i]
            if padded <= max_tokens and padded - real <= max_padding * padded:
                group.append(i)
                continue
        groups.append([i])
    return groups


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_seq_len: int | None = None, fast_decode: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.cache = KVCache(self.config, max_batch_size, self.max_seq_len, self.device, self.dtype)
        self.vocab_limit = min(tokenizer.n_vocab, self.config.vocab_size)
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else self.config.eos_token_id
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._counts: torch.Tensor | None = None  # (num_slots, V) generated-id counts, for penalties
        # the lean decode step (folded norms, no module calls) where it applies; else the plain forward
        backend = resolve_backend(model.attn_backend, self.device, self.config.dim_per_head)
        use_plan = fast_decode and backend == "torch" and DecodePlan.supports(model)
        self._decode_plan = DecodePlan(model) if use_plan else None
        if self._decode_plan is not None:
            self._decode_plan.pack_head([1, max_batch_size])

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [i for i in prompt_ids if not 0 <= i < self.vocab_limit]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {self.vocab_limit})")
        # the last generated id is never fed back, so P prompt + M new ids need P + M - 1 cache positions
        if len(prompt_ids) > self.max_seq_len or len(prompt_ids) + params.max_tokens > self.max_seq_len + 1:
            raise ValueError(f"this model's maximum context length is {self.max_seq_len} tokens, but "
                             f"{len(prompt_ids)} prompt tokens + {params.max_tokens} max_tokens were requested")
        request = Request(next(self._ids), list(prompt_ids), params,
                          stream=TextStream(self.tokenizer, params.stop))
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        if request.finish_reason is None:
            request.finish_reason = "abort"
        self._release(request)

    def _release(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        if request.slot is not None:
            self.cache.free(request.slot)
            request.slot = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        decoding = list(self.running)
        admitted = []
        while self.waiting and self.cache.num_free > 0:
            request = self.waiting.pop(0)
            request.slot = self.cache.allocate()
            admitted.append(request)
        for group in prefill_groups([len(r.prompt_ids) for r in admitted]):
            outputs += self._prefill([admitted[i] for i in group])
        if decoding:
            outputs += self._decode(decoding)
        return outputs

    def _prefill(self, requests: list[Request]) -> list[StepOutput]:
        lengths = [len(r.prompt_ids) for r in requests]
        T = max(lengths)
        tokens = torch.zeros(len(requests), T, dtype=torch.long)
        for i, r in enumerate(requests):
            tokens[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        tokens = tokens.to(self.device)
        slots = [r.slot for r in requests]
        batch = self.cache.batch(slots, lengths)
        hidden = self.model(tokens, kv_cache=self.cache, batch=batch, return_hidden=True)  # (B, T, d)
        self.cache.advance(slots, lengths)
        last = hidden[torch.arange(len(requests), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        logits = self.model.lm_head(last)  # (B, V)
        prompt_lps: list[list[TokenLogprob] | None] = []
        for i, r in enumerate(requests):
            if r.params.prompt_logprobs:
                prompt_lps.append(self._prompt_logprobs(hidden[i, : lengths[i]], r))
            else:
                prompt_lps.append(None)
        live = [i for i, r in enumerate(requests) if r.params.max_tokens > 0]
        outputs = []
        for i, r in enumerate(requests):
            if r.params.max_tokens == 0:
                r.finish_reason = "length"
                self._release(r)
                outputs.append(StepOutput(r, [], "", [], "length", prompt_logprobs=prompt_lps[i]))
        if live:
            step_outputs = self._sample_and_advance([requests[i] for i in live], logits[live], new_requests=True)
            for out in step_outputs:
                out.prompt_logprobs = prompt_lps[requests.index(out.request)]
            outputs += step_outputs
        return outputs

    def _decode(self, requests: list[Request]) -> list[StepOutput]:
        slots = [r.slot for r in requests]
        tokens = torch.tensor([[r.output_ids[-1]] for r in requests], dtype=torch.long, device=self.device)
        batch = self.cache.batch(slots, [1] * len(requests))
        if self._decode_plan is not None:
            logits = self._decode_plan(tokens, self.cache, batch)  # (B, V)
        else:
            logits = self.model(tokens, kv_cache=self.cache, batch=batch)[:, -1]  # (B, V)
        self.cache.advance(slots, [1] * len(requests))
        return self._sample_and_advance(requests, logits, new_requests=False)

    def _sample_and_advance(self, requests: list[Request], logits: torch.Tensor, new_requests: bool) -> list[StepOutput]:
        params = [r.params for r in requests]
        # min_tokens: EOS and stop ids are not allowed before the minimum length
        for i, r in enumerate(requests):
            if len(r.output_ids) < r.params.min_tokens:
                banned = list(r.params.stop_token_ids) + ([self.eos_id] if self.eos_id is not None else [])
                logits[i, banned] = float("-inf")
        use_penalties = any(p.presence_penalty or p.frequency_penalty for p in params)
        if use_penalties and self._counts is None:
            self._counts = torch.zeros(self.cache.num_slots, self.config.vocab_size, device=self.device)
        # per-slot counts of generated ids, kept only once some request has used a penalty
        slots = torch.tensor([r.slot for r in requests], device=self.device) if self._counts is not None else None
        if self._counts is not None and new_requests:
            self._counts[slots] = 0
        num_top = max((p.logprobs or 0) for p in params)
        batch = SamplingBatch(
            temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params], generators=[r.generator for r in requests],
            presence_penalty=[p.presence_penalty for p in params],
            frequency_penalty=[p.frequency_penalty for p in params],
            output_counts=self._counts[slots] if use_penalties else None,
            num_logprobs=num_top, want_logprobs=any(p.logprobs is not None for p in params))
        out = sample(logits, batch, vocab_limit=self.vocab_limit)
        if self._counts is not None:
            self._counts.index_put_((slots, out.token_ids), torch.ones_like(out.token_ids, dtype=torch.float32),
                                    accumulate=True)
        token_ids = out.token_ids.tolist()  # the one host sync of the step
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        outputs = []
        for i, (r, tok) in enumerate(zip(requests, token_ids)):
            r.output_ids.append(tok)
            if r.params.logprobs is not None:
                n = r.params.logprobs
                top = list(zip(top_ids[i][:n], top_lps[i][:n])) if n else []
                token_lps = [TokenLogprob(tok, lps[i], top)]
            else:
                token_lps = []
            finish = None
            is_eos = tok == self.eos_id and not r.params.ignore_eos
            if is_eos or tok in r.params.stop_token_ids:
                finish, text = "stop", r.stream.finish()
            else:
                text = r.stream.push(tok)
                if r.stream.stopped:
                    finish = "stop"
                elif len(r.output_ids) >= r.params.max_tokens or self.cache.lengths[r.slot] >= self.max_seq_len:
                    finish, text = "length", text + r.stream.finish()
            if finish is not None:
                r.finish_reason = finish
                self._release(r)
            elif new_requests:
                self.running.append(r)
            outputs.append(StepOutput(r, [tok], text, token_lps, finish))
        return outputs

    def _prompt_logprobs(self, hidden: torch.Tensor, request: Request) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it; the first has none."""
        ids = request.prompt_ids
        n = request.params.logprobs or 0
        targets = torch.tensor(ids[1:], device=self.device)
        lp, top_lp, top_ids = chunked_logprobs(hidden[:-1], self.model.lm_head, targets, n, self.vocab_limit)
        result = [TokenLogprob(ids[0], None, None)]
        lp = lp.tolist()
        top_lp = top_lp.tolist() if top_lp is not None else None
        top_ids = top_ids.tolist() if top_ids is not None else None
        for j, tok in enumerate(ids[1:]):
            top = list(zip(top_ids[j], top_lp[j])) if n else []
            result.append(TokenLogprob(tok, lp[j], top))
        return result

    # ---- convenience: one request at a time ------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion (other queued work advances too); yields its outputs."""
        request = self.add_request(prompt_ids, params)
        try:
            while not request.finished:
                for out in self.step():
                    if out.request is request:
                        yield out
        finally:
            if not request.finished:
                self.abort(request)

    # ---- scoring --------------------------------------------------------------------
    def encode_for_scoring(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    def score_task(self, sequences: list[list[int]], stride: int | None = None,
                   batch_tokens: int = 4096) -> ScoreTask:
        """A scoring job to advance one batched forward at a time (a server interleaves decode steps).

        Bad input (empty sequences, ids out of range, a bad stride) raises ValueError here."""
        return ScoreTask(self.model, sequences, self.max_seq_len, self.vocab_limit, stride, batch_tokens)

    def score(self, sequences: list[list[int]], stride: int | None = None, batch_tokens: int = 4096,
              progress: Callable[[int, int], None] | None = None) -> list[ScoreResult]:
        """Per-token logprobs of each sequence; longer than the context -> sliding windows (see ScoreTask)."""
        task = self.score_task(sequences, stride, batch_tokens)
        while not task.done:
            task.advance()
            if progress is not None:
                progress(*task.progress)
        return task.results
