"""The HTTP endpoints: JSON in, engine work through the scheduler, JSON out.

Handlers own no state: everything lives in the app's `KilnState` (`request.app.state.kiln`),
built by `create_app`. Nothing here runs model code; tokenizing and detokenizing (pure,
read-only tokenizer calls) run in the thread pool so long texts never stall the loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from model.chat_template import ChatTemplate

from .chat import create_chat_completion
from .completions import admission_errors, create_completion, prompt_list, refusal_error, until_disconnect
from .errors import APIError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, Health, ModelCard, ModelList,
                       PerplexityItem, PerplexityRequest, PerplexityResponse, PerplexityToken, PerplexityUsage,
                       TokenizeRequest, TokenizeResponse, TokenizerInfo)
from .scheduler import NotReady, QueueFull, Scheduler, rejection
from .settings import ServerSettings


@dataclass
class KilnState:
    settings: ServerSettings
    scheduler: Scheduler
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    sampling_defaults: dict = field(default_factory=dict)  # for requests that leave them out (--generation-config)
    _chat: tuple[ChatTemplate | None] | None = None  # (the compiled chat template or None), once looked up

    def engine(self):
        """The engine (for its read-only tokenizer and limits) once loaded; 503 before."""
        if not self.scheduler.ready:
            raise APIError(503, self.scheduler.not_ready_message(), code="not_ready", headers={"Retry-After": "1"})
        return self.scheduler.engine

    def chat_template(self) -> ChatTemplate | None:
        """--chat-template, else the template the model's tokenizer ships; compiled once."""
        if self._chat is None:
            source = self.settings.chat_template or self.engine().tokenizer.chat_template
            try:
                self._chat = (ChatTemplate(source) if source else None,)
            except ValueError as e:
                raise APIError(400, f"this model's tokenizer ships a chat template Kiln cannot use ({e}); start "
                                    "kiln serve with --chat-template FILE", "messages") from None
        return self._chat[0]

    def check_model(self, name: str | None) -> None:
        served = self.settings.served_model_name
        if name is not None and name != served:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model",
                           "model_not_found")


def kiln_state(request: Request) -> KilnState:
    return request.app.state.kiln


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse} for s in statuses}


router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the playground page (package data)
# the page loads only its own files and talks only to this server: no CDN, no inline script
PLAYGROUND_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                  "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/perplexity", "/v1/models", "/tokenize", "/detokenize",
             "/tokenizer_info", "/health", "/metrics"}


# the generation endpoints: JSON or a stream, and every refusal a request can meet
GENERATION_RESPONSES = {**_errors(400, 401, 404, 413, 429, 503),
                        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "JSON, or Server-Sent Events when `stream` is true"}}


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES,
             summary="Create a completion (OpenAI legacy completions API)")
async def completions(body: CompletionRequest, request: Request, state: KilnState = Depends(kiln_state)):
    state.check_model(body.model)
    state.engine()
    return await create_completion(body, request, state.scheduler, state.settings.served_model_name,
                                   defaults=state.sampling_defaults)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES,
             summary="Create a chat completion (OpenAI chat API, over the model's chat template)")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: KilnState = Depends(kiln_state)):
    state.check_model(body.model)
    state.engine()
    return await create_chat_completion(body, request, state.scheduler, state.settings.served_model_name,
                                        state.chat_template(), defaults=state.sampling_defaults)


@router.post("/v1/perplexity", response_model=PerplexityResponse, response_model_exclude_unset=True,
             responses=_errors(400, 401, 404, 413, 429, 503),
             summary="Perplexity of texts or token ids (same numbers as `kiln ppl`)")
async def perplexity(body: PerplexityRequest, request: Request,
                     state: KilnState = Depends(kiln_state)) -> PerplexityResponse:
    state.check_model(body.model)
    engine = state.engine()
    inputs = prompt_list(body.input, "input")
    with admission_errors("input"):
        future = state.scheduler.submit_score(inputs, body.stride)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, state.scheduler, future))
    try:
        results = await future
    except ClientGone:
        raise APIError(499, "the client disconnected") from None
    except (QueueFull, NotReady, ValueError) as e:  # (QueueFull: from the engine process, which admits there)
        raise refusal_error(rejection(e, "stride" if "stride" in str(e) else "input")) from None
    except RuntimeError as e:
        raise APIError(500, str(e)) from None
    finally:
        watcher.cancel()
    token_text = engine.tokenizer.id_to_token_text
    data = []
    for index, result in enumerate(results):
        item = PerplexityItem(index=index, perplexity=_perplexity(result.mean_nll),
                              mean_nll=_finite(result.mean_nll), num_tokens=result.num_scored)
        if body.return_tokens:  # left unset (so absent from the JSON) otherwise
            item.tokens = [PerplexityToken(token=token_text(i), id=i, logprob=lp)
                           for i, lp in zip(result.token_ids, result.logprobs)]
        data.append(item)
    total = sum(len(r.token_ids) for r in results)
    return PerplexityResponse(object="perplexity", model=state.settings.served_model_name, data=data,
                              usage=PerplexityUsage(prompt_tokens=total, total_tokens=total))


class ClientGone(Exception):
    """The client of a perplexity request disconnected before its result."""


async def _cancel_on_disconnect(request: Request, scheduler: Scheduler, future: asyncio.Future) -> None:
    """A long text is many forwards: when its client goes away (curl's Ctrl-C, the playground's Stop),
    the job is dropped instead of scored for nobody."""
    await until_disconnect(request)
    scheduler.abort_score(future)
    if not future.done():
        future.set_exception(ClientGone())


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL), as ScoreResult.perplexity, but a huge NLL gives the largest float, not an error."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return 1.0e308  # JSON has no infinity


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1.0e308


@router.post("/tokenize", response_model=TokenizeResponse, responses=_errors(400, 404, 413, 503),
             summary="Text -> token ids (vLLM's shape)")
async def tokenize(body: TokenizeRequest, state: KilnState = Depends(kiln_state)) -> TokenizeResponse:
    state.check_model(body.model)
    engine = state.engine()
    tokenizer = engine.tokenizer

    def encode() -> list[int]:
        return tokenizer.encode_prompt(body.prompt) if body.add_special_tokens else tokenizer.encode(body.prompt)

    ids = await run_in_threadpool(encode)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_seq_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_errors(400, 404, 413, 503),
             summary="Token ids -> text (vLLM's shape)")
async def detokenize(body: DetokenizeRequest, state: KilnState = Depends(kiln_state)) -> DetokenizeResponse:
    state.check_model(body.model)
    tokenizer = state.engine().tokenizer
    bad = [i for i in body.tokens if not 0 <= i < tokenizer.n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range [0, {tokenizer.n_vocab})", "tokens")
    try:
        text = await run_in_threadpool(tokenizer.decode, body.tokens)
    except ValueError as e:  # an id inside the range that the tokenizer does not define
        raise APIError(400, str(e), "tokens") from None
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=_errors(503),
            summary="Special tokens and limits (vLLM's shape; lm-eval's remote tokenizer reads it)")
async def tokenizer_info(state: KilnState = Depends(kiln_state)) -> TokenizerInfo:
    engine = state.engine()
    tok = engine.tokenizer
    return TokenizerInfo(tokenizer_class="KilnTokenizer", eos_token=tok.eos_token, eos_token_id=tok.eos_id,
                         bos_token=tok.bos_token, bos_token_id=tok.bos_id,
                         pad_token=tok.pad_token if tok.pad_token is not None else tok.id_to_token_text(tok.pad_id),
                         pad_token_id=tok.pad_id, add_bos_token=tok.add_bos, vocab_size=tok.n_vocab,
                         model_max_length=engine.max_seq_len)


def _model_card(state: KilnState) -> ModelCard:
    engine = state.scheduler.engine if state.scheduler.ready else None
    return ModelCard(id=state.settings.served_model_name, created=state.created,
                     root=state.settings.model_dir, max_model_len=engine.max_seq_len if engine else None)


@router.get("/v1/models", response_model=ModelList, responses=_errors(401), summary="The served model")
async def list_models(state: KilnState = Depends(kiln_state)) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(401, 404),
            summary="One model by name")
async def get_model(model_id: str, state: KilnState = Depends(kiln_state)) -> ModelCard:
    state.check_model(model_id)
    return _model_card(state)


@router.get("/health", response_model=Health, responses=_errors(503), summary="200 when ready to serve")
async def health(state: KilnState = Depends(kiln_state)) -> Health:
    state.engine()
    return Health()


@router.head("/health", include_in_schema=False)
async def health_head(state: KilnState = Depends(kiln_state)) -> Response:
    """`HEAD /health` (load balancers and `curl -I`): the status of GET, no body."""
    state.engine()
    return Response(status_code=200)


@router.get("/metrics", summary="Prometheus metrics (text format)",
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(state: KilnState = Depends(kiln_state)) -> Response:
    return Response(await state.scheduler.render_metrics(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    """The playground page (server/static/): try completions and per-token perplexity in a browser."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": PLAYGROUND_CSP})
