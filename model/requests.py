"""What a request asks for and what it has produced so far: the engine's per-request state.

`SamplingParams` are the OpenAI-style knobs of one completion (validated here, so every
entry point gets the same errors). A `Request` is one sequence inside the engine: its prompt,
the ids generated so far (the newest may still be PENDING on the device, see
`model.engine`), the KV blocks and batch slot it holds, and its detokenizer. A step reports
per request with `StepOutput`, logprobs as `TokenLogprob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .sampling import MAX_TEMPERATURE
from .speculative import PromptLookup
from .text_stream import TextStream

PENDING = -1  # an output id sampled on the device but not yet read back


class InvalidRequest(ValueError):
    """A request the engine cannot take; ``param`` names the request field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit) pairs (OpenAI)
    logprobs: int | None = None  # None: no logprobs; N >= 0: chosen token + top-N
    prompt_logprobs: bool = False  # echo: logprobs of the prompt tokens too

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
        need(math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        for token_id, bias in self.logit_bias:
            need(math.isfinite(bias) and -100 <= bias <= 100,
                 f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}")
        need(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        need(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None
    text_offset: int | None = None  # generated tokens: where the token's text starts in the output text


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
    slot: int | None = None  # row of the running set (per-sequence state such as penalty counts)
    blocks: list[int] = field(default_factory=list)  # KV blocks holding this sequence's positions
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at the last admission
    hashes: list[int] = field(default_factory=list)  # chained hashes of this sequence's full blocks
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    num_preemptions: int = 0
    num_pending: int = 0  # trailing output_ids still PENDING (sampled, not read back yet)
    finish_reason: str | None = None
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    prompt_lps: list[TokenLogprob] | None = None  # echo: built up chunk by chunk during prefill
    prompt_lps_done: bool = False
    lookup: PromptLookup | None = None  # prompt-lookup drafts (greedy decoding with speculation)
    draft_limit: int | None = None  # drafts to propose next (after wrong ones, fewer); None: the engine's

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """The prompt and everything generated so far (PENDING ids included)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def drop_pending(self) -> None:
        if self.num_pending:
            del self.output_ids[len(self.output_ids) - self.num_pending:]
            self.num_pending = 0

    def tokens(self, lo: int, hi: int) -> list[int]:
        """Known tokens lo..hi-1 (prompt then output) without concatenating the whole sequence."""
        P = len(self.prompt_ids)
        if hi <= P:
            return self.prompt_ids[lo:hi]
        if lo >= P:
            return self.output_ids[lo - P: hi - P]
        return self.prompt_ids[lo:] + self.output_ids[: hi - P]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs and not self.prompt_lps_done
