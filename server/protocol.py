"""The wire format: pydantic models of every request and response body (OpenAI shapes).

Requests validate what JSON can check (types, ranges); anything that fails becomes a 400
with an OpenAI error body (see errors.py). Limits that depend on the model (context
length, vocabulary) are checked by the engine. Unknown request fields are ignored, as
OpenAI-compatible servers do, so SDK `extra_body` fields never break a call.
Responses mirror OpenAI's legacy completions API and vLLM's tokenizer endpoints.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from model.sampling import MAX_TEMPERATURE

# torch.Generator.manual_seed accepts exactly this range
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
INT32_MAX = 2**31 - 1

TokenIds = list[StrictInt]
# a string, a list of strings, a list of token ids, or a list of token-id lists
PromptInput = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    # strict: "3" is not an integer and "yes" not a boolean (OpenAI rejects both); ints are still valid floats
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data):
        """An explicit null leaves a field at its default, as OpenAI's API and vLLM read it (`"n": null`,
        `"stream": null`); a required field sent as null is missing."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ----------------------------------------------------------------------------
class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


# ---- completions -----------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False


class CompletionRequest(_Request):
    model: str | None = Field(None, description="the served model name (optional: there is one model)")
    prompt: PromptInput = Field(..., description="a string, a list of strings, a list of token ids, "
                                                 "or a list of token-id lists")
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = Field(
        16, description="tokens to generate per choice (0 only with echo: prompt logprobs only)")
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = Field(1.0, description="0 = greedy")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = Field(None, description="0 or -1 = off (vLLM)")
    n: Annotated[int, Field(ge=1, le=128)] = 1
    best_of: Annotated[int, Field(ge=1, le=128)] | None = Field(None, description="must equal n if given")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="return the chosen token's logprob and the top-N alternatives")
    echo: bool = False
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    logit_bias: dict[str, float] | None = Field(
        None, description='{"token id": bias in [-100, 100]} added to those logits before sampling '
                          '(-100 all but bans an id, 100 all but forces it); logprobs stay unbiased')
    suffix: str | None = Field(None, description="not supported: must be null")
    user: str | None = Field(None, description="ignored")
    ignore_eos: bool = Field(False, description="keep generating past EOS (vLLM extension)")
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = Field(
        0, description="no EOS or stop token before this many tokens (vLLM extension)")


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- chat completions ------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = Field(None, description="text, or a list of text parts")
    name: StrictStr | None = None
    tool_calls: list[dict] | None = Field(None, description="not supported: must be empty")
    tool_call_id: StrictStr | None = Field(None, description="a tool message's call id, passed to the chat template")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"only text content parts are supported (this model reads text), not {kind!r}")
        return content


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = Field(
        None, description="tokens to generate per choice (default: what the context leaves)")
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = Field(
        None, description="the newer name of max_tokens; wins when both are given")
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's header "
                                                          "(vLLM extension)")
    continue_final_message: bool = Field(False, description="continue the last (assistant) message instead of "
                                                            "starting a new one (vLLM extension)")
    chat_template_kwargs: dict | None = Field(None, description="more variables for the chat template, e.g. "
                                                                  "{\"enable_thinking\": false} (vLLM extension)")
    tools: list[dict] | None = Field(None, description="not supported: must be empty")
    tool_choice: StrictStr | dict | None = Field(None, description='not supported: only "none"')
    functions: list[dict] | None = Field(None, description="the legacy tools; not supported: must be empty")
    function_call: StrictStr | dict | None = Field(None, description='the legacy tool_choice; only "none"')
    response_format: dict | None = Field(None, description='only {"type": "text"}')


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


# ---- perplexity (Kiln's own) ----------------------------------------------------------
class PerplexityRequest(_Request):
    model: str | None = None
    input: PromptInput = Field(..., description="text(s) or token id list(s) to score")
    return_tokens: bool = Field(False, description="also return every token with its logprob")
    stride: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = Field(
        None, description="sliding-window stride for inputs longer than the context (default: half of it)")


class PerplexityToken(_Response):
    token: str
    id: int
    logprob: float | None = Field(description="natural-log probability given the tokens before it; null for the "
                                              "first token, which has no context")


class PerplexityItem(_Response):
    index: int
    perplexity: float = Field(description="exp(mean_nll)")
    mean_nll: float = Field(description="mean negative log-likelihood (nats) of the scored tokens")
    num_tokens: int = Field(description="tokens scored: all of the input's n tokens but the first (n - 1); "
                                        "no <|endoftext|> is prepended (a BOS is, for tokenizers that add one)")
    tokens: list[PerplexityToken] | None = Field(None, description="with return_tokens: all n tokens, in order")


class PerplexityUsage(_Response):
    prompt_tokens: int = Field(description="tokens read, all n of every input")
    total_tokens: int


class PerplexityResponse(_Response):
    object: Literal["perplexity"] = "perplexity"
    model: str
    data: list[PerplexityItem]
    usage: PerplexityUsage


# ---- tokenizer endpoints (vLLM's shapes) ------------------------------------------------
class TokenizeRequest(_Request):
    model: str | None = None
    prompt: StrictStr
    add_special_tokens: bool = Field(True, description="prepend BOS when the model uses one; special-token "
                                                       "text always maps to its single id")


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfo(_Response):
    tokenizer_class: str
    eos_token: str
    eos_token_id: int | None
    bos_token: str | None
    bos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    add_bos_token: bool
    vocab_size: int
    model_max_length: int


# ---- models, health --------------------------------------------------------------------
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"] = "ok"
