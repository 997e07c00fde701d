"""/v1/chat/completions: OpenAI's chat API over the model's chat template, as vLLM serves it.

The messages are rendered with the Jinja template the tokenizer ships (`chat_template.jinja`, or
`tokenizer_config.json`'s "chat_template"; `kiln serve --chat-template FILE` overrides it) as
transformers' `apply_chat_template` renders them (model/chat_template.py), then tokenized without
adding a BOS (the template writes it) and generated as a completion; the answer comes back in chat
shapes.
Text parts of a message's content are joined with newlines (vLLM's "string" content format). A
model without a template, such as Kiln's default base model, answers 400.
"""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from model.chat_template import ChatTemplate, template_tokens

from .completions import SAMPLING_KEYS, ChoiceBuilder, TextFormat, _logprob, _public_reason, create_completion
from .errors import APIError
from .protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatResponseMessage,
                       ChatTokenLogprob, ChatTopLogprob, CompletionRequest, Usage)
from .scheduler import Scheduler

NO_TEMPLATE = ("this model has no chat template (it is a base model): use /v1/completions, or start kiln serve "
               "with --chat-template FILE")


class ChatFormat(TextFormat):
    """Chat shapes: `chat.completion` with messages, `chat.completion.chunk` with deltas (the first one
    per choice carries the role), logprobs as `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer, top_logprobs: int):
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs

    def opening(self, builders: list[ChoiceBuilder]) -> list[dict]:
        return [{"index": b.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for b in builders]

    def chunk_choice(self, builder: ChoiceBuilder, text: str, logprobs, finish_reason: str | None) -> dict:
        content = self._logprobs(builder.new_entries) if builder.want_logprobs else None
        return {"index": builder.index, "delta": {"content": text} if text else {},
                "logprobs": None if content is None else content.model_dump(),
                "finish_reason": _public_reason(finish_reason)}

    def response(self, completion_id: str, created: int, model_name: str, builders: list[ChoiceBuilder],
                 usage: Usage) -> ChatCompletionResponse:
        choices = [ChatChoice(index=b.index, message=ChatResponseMessage(content="".join(b.parts)),
                              logprobs=self._logprobs(b.entries) if b.want_logprobs else None,
                              finish_reason=_public_reason(b.finish_reason)) for b in builders]
        return ChatCompletionResponse(id=completion_id, created=created, model=model_name, choices=choices,
                                      usage=usage)

    def _logprobs(self, entries) -> ChatLogprobs:
        tok = self.tokenizer

        def top(token_id: int, value: float | None) -> ChatTopLogprob:
            return ChatTopLogprob(token=tok.id_to_token_text(token_id), logprob=_logprob(value),
                                  bytes=list(tok.token_bytes(token_id)))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                             top_logprobs=[top(i, v) for i, v in (lp.top or [])[: self.top_logprobs]])
            for lp in entries])


def _messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for message in body.messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        entry = {"role": message.role, "content": content or ""}
        for key in ("name", "tool_call_id"):  # only when sent: templates test `message.name is defined`
            if getattr(message, key) is not None:
                entry[key] = getattr(message, key)
        out.append(entry)
    return out


async def create_chat_completion(body: ChatCompletionRequest, request: Request, scheduler: Scheduler,
                                 model_name: str, template: ChatTemplate | None, defaults: dict | None = None):
    if template is None:
        raise APIError(400, NO_TEMPLATE, "messages")
    if body.tools:
        raise APIError(400, "tools are not supported (no tool calling); leave tools empty", "tools")
    if body.functions:
        raise APIError(400, "functions are not supported (no tool calling); leave functions empty", "functions")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise APIError(400, f'{name} must be "none" or left out: there is no tool calling', name)
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise APIError(400, 'only response_format {"type": "text"} is supported', "response_format")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt false", "continue_final_message")
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                       "continue_final_message")
    if any(m.tool_calls for m in body.messages):
        raise APIError(400, "tool calls are not supported; send the assistant's text only", "messages")
    if body.top_logprobs and not body.logprobs:  # 0 without logprobs asks for nothing: accepted, as vLLM does
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    engine = scheduler.engine
    tokenizer = engine.tokenizer
    special = template_tokens(tokenizer)
    messages = _messages(body)

    def prompt_ids() -> list[int]:
        text = template.render(messages, body.add_generation_prompt, special, body.continue_final_message,
                               body.chat_template_kwargs)
        return tokenizer.encode(text)  # the template writes BOS itself

    try:  # off the event loop: a template is arbitrary code, and a long conversation renders slowly
        ids = await run_in_threadpool(prompt_ids)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    if not ids:
        raise APIError(400, "the chat template rendered an empty prompt", "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # OpenAI: as many as the context leaves
        max_tokens = max(1, engine.max_seq_len - len(ids))
    sampling = {name: getattr(body, name) for name in SAMPLING_KEYS if name in body.model_fields_set}
    completion = CompletionRequest.model_validate({
        **sampling, "prompt": ids, "max_tokens": max_tokens, "n": body.n, "stream": body.stream,
        "stream_options": None if body.stream_options is None else body.stream_options.model_dump(),
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None, "stop": body.stop,
        "stop_token_ids": body.stop_token_ids, "seed": body.seed, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "logit_bias": body.logit_bias, "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens})
    fmt = ChatFormat(tokenizer, body.top_logprobs or 0)
    try:
        return await create_completion(completion, request, scheduler, model_name, fmt=fmt, prompt_ids=[ids],
                                       defaults=defaults)
    except APIError as e:
        if e.param == "prompt":  # the rendered prompt is the messages
            e.param = "messages"
            e.message = e.message.replace("the prompt has", "the messages (rendered by the chat template) have")
        elif e.param == "max_tokens" and body.max_completion_tokens is not None:  # the field the client sent
            e.param = "max_completion_tokens"
        raise
