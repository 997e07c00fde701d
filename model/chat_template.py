"""Chat templates: the Jinja template a chat model's tokenizer ships, rendered as transformers renders it.

`ChatTemplate(source).render(messages, ...)` gives the prompt text of a conversation, in a sandboxed
environment set up like transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop
controls, `{% generation %}` blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII; a special token the tokenizer lacks is undefined, so it renders as ""). The text is then
tokenized without adding a BOS: the template writes it. Used by the server's
/v1/chat/completions and `kiln generate --chat`; the template comes from the tokenizer directory
(`model.tokenizer.read_chat_template`).
"""

from __future__ import annotations

import datetime
import json


class ChatTemplate:
    """A compiled chat template; `render` raises ValueError with the template's own message."""

    def __init__(self, source: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_block()])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str | None],
               continue_final_message: bool = False, extra: dict | None = None) -> str:
        """The prompt text. `extra`: more template variables (vLLM's chat_template_kwargs, e.g. Qwen3's
        enable_thinking); they cannot replace the messages, the special tokens or the template's functions."""
        fixed = {"messages": messages, "add_generation_prompt": add_generation_prompt, "tools": None,
                 "documents": None}
        # a token the tokenizer lacks stays undefined (renders as "", as in transformers), not None ("None")
        tokens = {name: value for name, value in special_tokens.items() if value is not None}
        reserved = {*fixed, *special_tokens, *self._template.globals}
        variables = {name: value for name, value in (extra or {}).items() if name not in reserved}
        variables.update(fixed, **tokens)
        try:
            text = self._template.render(variables)  # a dict: an extra variable named "self" is just a variable
        except Exception as e:  # noqa: BLE001 -- raise_exception, and whatever else the template's code raises
            raise ValueError(f"the chat template refused the messages: {type(e).__name__}: {e}") from None
        if continue_final_message:  # end the prompt right after the last message's text (no end-of-turn)
            final = messages[-1]["content"].strip()  # as transformers: templates often trim the content
            at = text.rfind(final) if final else -1
            if at < 0:
                raise ValueError("continue_final_message needs a last message whose text the template writes out")
            text = text[: at + len(final)]
        return text


def _generation_block():
    """The `{% generation %}...{% endgeneration %}` tag of transformers' templates (it marks the assistant's
    text for training masks; TRL's assistant_only_loss writes it into fine-tuned models' templates).
    Rendering a prompt keeps the block's body as it is, in its own scope as transformers renders it."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationBlock


def _raise_exception(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def template_tokens(tokenizer) -> dict[str, str | None]:
    """The special-token variables templates read (`{{ bos_token }}`...), from a Kiln tokenizer."""
    return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "pad_token": getattr(tokenizer, "pad_token", None)}
