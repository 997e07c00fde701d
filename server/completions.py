"""`POST /v1/completions`: OpenAI's legacy completions API on top of the scheduler.

A request becomes one engine sequence per (prompt, choice): `n` choices of prompt `i` are
choices `i * n .. i * n + n - 1`, seeded `seed + j` so that they differ. `ChoiceBuilder`
turns a sequence's step outputs into OpenAI's text and `logprobs` arrays
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); with `echo` the prompt
comes first, its first token without a logprob (`null`), which is what lm-eval's
`local-completions` reads for loglikelihoods. Offsets count characters from the start of the
prompt's text, echoed or not, as OpenAI's API and vLLM count them. Logprobs of generated stop tokens (EOS)
stay in the arrays even though their text does not.

Streaming sends one chunk per sequence per step (skipping steps that show nothing),
a final chunk with `finish_reason`, a usage chunk when asked, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import re
import time
import uuid
from typing import AsyncIterator, Iterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from model.checkpoint import SAMPLING_KEYS
from model.engine import SamplingParams, TokenLogprob
from model.tokenizer import Tokenizer

from .errors import APIError
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from .scheduler import (Failed, Generation, NotReady, QueueFull, Rejected, Scheduler, SequenceOutput, drain,
                        rejection)
from .streaming import sse_response

MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MIN_LOGPROB = -9999.0  # what -inf becomes (as vLLM reports it): JSON has no infinity


def prompt_list(prompt: str | list, field: str = "prompt") -> list[str | list[int]]:
    """OpenAI's four prompt forms -> a list of texts or id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"{field} must not be an empty list", field)
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def sampling_params(body: CompletionRequest, defaults: dict | None = None) -> list[SamplingParams]:
    """The engine parameters of each of the request's `n` choices. temperature, top_p and top_k that the request
    leaves out (or sends as null) come from `defaults` (`model.checkpoint.read_sampling_defaults`) where it has
    them, else OpenAI's (1.0, 1.0, off)."""
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of={body.best_of} is not supported: only best_of == n ({body.n})", "best_of")
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported (no fill-in-the-middle); leave it null", "suffix")
    logit_bias = parse_logit_bias(body.logit_bias)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 is allowed only with echo, to get prompt logprobs)",
                       "max_tokens")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    # left out (or null): the model's recommendation when it has one, else OpenAI's default
    given = {name: getattr(body, name) for name in SAMPLING_KEYS
             if name in body.model_fields_set and getattr(body, name) is not None}
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(defaults or {}), **given}
    params = []
    for j in range(body.n):
        params.append(SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling["temperature"],
            top_k=0 if sampling["top_k"] == -1 else sampling["top_k"],
            top_p=sampling["top_p"],
            # torch takes seeds modulo 2**64 (negative ones too): wrapping keeps every seed's samples the same
            # and gives choice j of seed 2**64 - 1 a seed manual_seed accepts
            seed=None if body.seed is None else (body.seed + j) % 2**64,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=logit_bias,
            logprobs=body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
        ))
    return params


def parse_logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) -> sorted (id, bias) pairs. Ids past the
    vocabulary are the engine's to refuse (it knows the model)."""
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias may hold at most {MAX_LOGIT_BIAS} token ids, got {len(bias)}", "logit_bias")
    pairs = {}
    for key, value in bias.items():
        if not re.fullmatch(r"[0-9]+", key):
            raise APIError(400, f"logit_bias keys must be token ids written as integer strings, got {key!r}",
                           "logit_bias")
        if len(key) > 18:  # (the engine names ids past the vocabulary; int() of thousands of digits would fail)
            raise APIError(400, f"logit_bias token id {key[:24]}{'...' if len(key) > 24 else ''} is out of range",
                           "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                           "logit_bias")
        pairs[int(key)] = float(value)
    return tuple(sorted(pairs.items()))


def _logprob(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return max(value, MIN_LOGPROB)


class ChoiceBuilder:
    """Accumulates one choice: its text, and OpenAI's logprobs arrays when asked for."""

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_ids: list[int], echo: bool,
                 logprobs: int | None):
        self.index = index
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.echo = echo
        self.want_logprobs = logprobs is not None
        self.parts: list[str] = []
        self.chars = 0  # characters of the choice's text so far
        # characters of the prompt's text: OpenAI's offsets count from the prompt's start, echoed or not (vLLM too)
        self.prompt_chars = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.entries: list[TokenLogprob] = []  # the logprob entries as the engine gave them (ids, not text)
        self.new_entries: list[TokenLogprob] = []  # those the last `add` appended
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._started = False

    def add(self, out: SequenceOutput) -> tuple[str, CompletionLogprobs | None]:
        """Take one step's output; returns (new text, new logprobs entries or None)."""
        first = len(self.tokens)
        text = ""
        if not self._started:
            self._started = True
            if self.echo:
                text += self._add_prompt(out.prompt_logprobs)
                self.prompt_chars = len(text)
            elif self.want_logprobs:
                self.prompt_chars = len(self._add_prompt(None, entries=False))
        shown = self.chars + len(text) + (0 if self.echo else self.prompt_chars)  # offset of the text after it
        for lp in out.logprobs:
            self._add_token(lp, shown if lp.text_offset is None else self.prompt_chars + lp.text_offset)
        text += out.text
        self.completion_tokens += len(out.token_ids)
        self.parts.append(text)
        self.chars += len(text)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        self.new_entries = self.entries[first:]
        delta = None
        if self.want_logprobs:
            delta = CompletionLogprobs(tokens=self.tokens[first:], token_logprobs=self.token_logprobs[first:],
                                       top_logprobs=self.top_logprobs[first:], text_offset=self.text_offset[first:])
        return text, delta

    def _add_prompt(self, prompt_logprobs: list[TokenLogprob] | None, entries: bool = True) -> str:
        """The prompt's text (decoded token by token, for offsets) and, with `entries`, its logprob entries.

        A prompt ending inside a UTF-8 character leaves that character out: the engine's output
        text starts with it (whole, or U+FFFD), so prompt text + output text decode the ids once."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        tok = self.tokenizer
        # Text the tokenizer added is not the prompt's: the BOS that encode_prompt puts first (its logprob entry
        # stays), and the space a SentencePiece-style tokenizer puts before the text (decode drops it too).
        hide_bos = tok.prepends_bos and self.prompt_ids[:1] == [tok.bos_id]
        drop_space = tok.adds_leading_space
        for i, token_id in enumerate(self.prompt_ids):
            if self.want_logprobs and entries:
                entry = prompt_logprobs[i] if prompt_logprobs else TokenLogprob(token_id, None, None)
                self._add_token(entry, self.chars + len(text))
            if i == 0 and hide_bos:
                continue
            raw = tok.token_bytes(token_id)
            if drop_space and token_id not in tok.special_ids:
                drop_space = False
                raw = raw[1:] if raw.startswith(b" ") else raw
            text += utf8.decode(raw)
        return text

    def _add_token(self, lp: TokenLogprob, offset: int) -> None:
        self.entries.append(lp)
        token_text = self.tokenizer.id_to_token_text
        self.tokens.append(token_text(lp.token_id))
        self.token_logprobs.append(_logprob(lp.logprob))
        self.text_offset.append(offset)
        if lp.top is None:  # the first prompt token: nothing to condition on
            self.top_logprobs.append(None)
            return
        top: dict[str, float] = {}
        for token_id, value in lp.top:
            top.setdefault(token_text(token_id), _logprob(value))
        # OpenAI: the chosen token is always included (up to logprobs + 1 entries)
        top.setdefault(token_text(lp.token_id), _logprob(lp.logprob))
        self.top_logprobs.append(top)

    def choice(self) -> CompletionChoice:
        logprobs = None
        if self.want_logprobs:
            logprobs = CompletionLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs,
                                          top_logprobs=self.top_logprobs, text_offset=self.text_offset)
        return CompletionChoice(index=self.index, text="".join(self.parts), logprobs=logprobs,
                                finish_reason=_public_reason(self.finish_reason))


def _public_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


class TextFormat:
    """The shapes of OpenAI's legacy completions: `text_completion` objects and chunks."""

    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def opening(self, builders: list[ChoiceBuilder]) -> list[dict]:
        """Chunk choices sent before any text (none here)."""
        return []

    def chunk_choice(self, builder: ChoiceBuilder, text: str, logprobs: CompletionLogprobs | None,
                     finish_reason: str | None) -> dict:
        return {"index": builder.index, "text": text, "logprobs": None if logprobs is None else logprobs.model_dump(),
                "finish_reason": _public_reason(finish_reason)}

    def response(self, completion_id: str, created: int, model_name: str, builders: list[ChoiceBuilder],
                 usage: Usage):
        return CompletionResponse(id=completion_id, created=created, model=model_name,
                                  choices=[b.choice() for b in builders], usage=usage)


TEXT_FORMAT = TextFormat()


async def until_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _watch_disconnect(request: Request, scheduler: Scheduler, generation: Generation) -> None:
    """Non-streaming: abort the sequences as soon as the client goes away."""
    await until_disconnect(request)
    scheduler.abort(generation)
    generation.queue.put_nowait(Failed("the client disconnected", 499))


@contextlib.contextmanager
def admission_errors(param: str) -> Iterator[None]:
    """The scheduler's refusals of a submission as OpenAI errors: a full queue 429, not ready 503
    (both with Retry-After), an input it cannot take 400 naming `param`."""
    try:
        yield
    except (QueueFull, NotReady, ValueError) as e:
        raise refusal_error(rejection(e, param)) from None


def refusal_error(item: Rejected | Failed) -> APIError:
    """A submission's refusal as an OpenAI error: raised by the scheduler (`admission_errors`) or arriving as
    its first item (the engine process admits there), the same answer."""
    if item.status == 429:
        return APIError(429, item.message, code="queue_full", headers={"Retry-After": "1"})
    if item.status == 503:
        return APIError(503, item.message, code="not_ready", headers={"Retry-After": "1"})
    return APIError(item.status, item.message, getattr(item, "param", None))


async def create_completion(body: CompletionRequest, request: Request, scheduler: Scheduler, model_name: str,
                            fmt: TextFormat = TEXT_FORMAT, prompt_ids: list[list[int]] | None = None,
                            defaults: dict | None = None):
    """Run `body` and answer in `fmt`'s shapes (legacy completions, or chat through server/chat.py, which
    passes the prompt already tokenized). `defaults`: the sampling parameters a request that leaves them out
    gets (the model's generation_config.json; see `sampling_params`)."""
    tokenizer = scheduler.engine.tokenizer
    params = sampling_params(body, defaults)
    if prompt_ids is None:
        prompts = prompt_list(body.prompt)
        if all(isinstance(p, list) for p in prompts):  # token ids: nothing to encode, no thread hop
            prompt_ids = prompts
        else:
            prompt_ids = await run_in_threadpool(
                lambda: [tokenizer.encode_prompt(p) if isinstance(p, str) else p for p in prompts])
    n = body.n
    with admission_errors("n"):
        generation = scheduler.submit([ids for ids in prompt_ids for _ in range(n)], params * len(prompt_ids), n,
                                      stream=body.stream)

    builders = [ChoiceBuilder(i, tokenizer, prompt_ids[i // n], body.echo, body.logprobs)
                for i in range(len(generation))]
    completion_id = f"{fmt.id_prefix}{uuid.uuid4().hex}"
    created = int(time.time())
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)

    def usage() -> Usage:
        completion_tokens = sum(b.completion_tokens for b in builders)
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=num_prompt_tokens + completion_tokens)

    if body.stream:
        try:
            first = await generation.queue.get()
        except BaseException:
            scheduler.abort(generation)
            raise
        if isinstance(first, (Rejected, Failed)):
            raise refusal_error(first)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream_chunks(generation, scheduler, builders, completion_id, created, model_name,
                                usage if include_usage else None, fmt)
        return sse_response(chunks)

    watcher = asyncio.create_task(_watch_disconnect(request, scheduler, generation))
    live = len(builders)
    try:
        first = await generation.queue.get()
        if isinstance(first, (Rejected, Failed)):
            live = 0
            raise refusal_error(first)
        while live:
            item = await generation.queue.get()
            if isinstance(item, Failed):
                live = 0
                raise APIError(item.status, item.message)
            builders[item.index].add(item)
            live -= item.finish_reason is not None
    finally:
        watcher.cancel()
        if live:
            scheduler.abort(generation)
    return fmt.response(completion_id, created, model_name, builders, usage())


async def _stream_chunks(generation: Generation, scheduler: Scheduler, builders: list[ChoiceBuilder],
                         completion_id: str, created: int, model_name: str, usage,
                         fmt: TextFormat) -> AsyncIterator[dict]:
    live = len(builders)
    head = {"id": completion_id, "object": fmt.chunk_object, "created": created, "model": model_name}
    try:
        for choice in fmt.opening(builders):
            yield {**head, "choices": [choice], **({"usage": None} if usage is not None else {})}
        while live:
            for item in drain(generation.queue, await generation.queue.get()):
                if isinstance(item, Failed):
                    live = 0
                    yield {"error": {"message": item.message, "type": "server_error" if item.status >= 500
                                     else "invalid_request_error", "param": None, "code": None}}
                    return
                builder = builders[item.index]
                text, logprobs = builder.add(item)
                live -= item.finish_reason is not None
                if not (text or item.finish_reason or (logprobs is not None and logprobs.tokens)):
                    continue  # nothing showable yet (held-back partial character or stop prefix)
                chunk = {**head, "choices": [fmt.chunk_choice(builder, text, logprobs, item.finish_reason)]}
                if usage is not None:
                    chunk["usage"] = None
                yield chunk
        if usage is not None:
            yield {**head, "choices": [], "usage": usage().model_dump()}
    finally:
        if live:  # the client went away (sse-starlette cancelled us) or the stream failed
            scheduler.abort(generation)
