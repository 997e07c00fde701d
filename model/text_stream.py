"""Generated ids -> text deltas, with stop strings found even when split across tokens.

`TextStream.push(id)` returns the text that is safe to show now: whole UTF-8 characters
only, and never a tail that could still become the start of a stop string. When a
stop string appears, the stream ends; the stop text itself is never returned. Special
tokens (EOS generated under `ignore_eos`, for instance) add no text, as vLLM's default
`skip_special_tokens` does. A push with `check_stop=False` (a sequence still short of its
`min_tokens`) decodes without looking for stop strings, and a later match must end in text
decoded after it, as in vLLM. `offset` is where the last pushed token's text starts in the
whole output text (OpenAI's `text_offset`), held-back characters counted.
"""

from __future__ import annotations

from .tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = (), context_ids: list[int] = ()):
        """`context_ids`: the prompt's last ids, so a character split between prompt and output decodes whole
        (the output text then starts with that whole character, or U+FFFD if the output does not complete it)."""
        self.detok = IncrementalDetokenizer(tokenizer)
        self.special_ids = tokenizer.special_ids
        if context_ids:
            self.detok.prime(list(context_ids))
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all decoded text so far (whole characters); kept only with stop strings
        self.length = 0  # characters decoded so far
        self.emitted = 0  # characters of `text` already returned
        self.offset = 0  # where the last pushed token's text starts in the output text
        self.stopped = False

    def push(self, token_id: int, check_stop: bool = True) -> str:
        """Feed one id; returns the newly showable text ('' while held back)."""
        if self.stopped:
            return ""
        self.offset = self.length
        if token_id in self.special_ids:
            return ""
        if not self.stop:  # nothing to look for or hold back: the text goes out as it is decoded
            new = self.detok.push(token_id)
            self.length += len(new)
            return new
        return self._advance(self.detok.push(token_id), final=False, check_stop=check_stop)

    def finish(self, check_stop: bool = True, at_stop_token: bool = False) -> str:
        """End of generation: flush what the detokenizer and the stop hold-back kept. `at_stop_token`: it
        ended on an EOS or stop id, which shows no text; `offset` then points at the text's end."""
        if self.stopped:
            return ""
        if at_stop_token:
            self.offset = self.length
        if not self.stop:
            tail = self.detok.flush()
            self.length += len(tail)
            return tail
        return self._advance(self.detok.flush(), final=True, check_stop=check_stop)

    def _advance(self, new: str, final: bool, check_stop: bool) -> str:
        if not new and not final:
            return ""
        before = len(self.text)
        self.text += new
        self.length = len(self.text)
        if self.stop and check_stop and new:
            # a match must end inside the new text: one wholly before it was either found already or
            # lies in text decoded while stops were not checked
            hits = [i for i in (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                delta = self.text[self.emitted:end]
                self.text = self.text[:end]
                self.length = self.emitted = end
                return delta
        safe = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        tail = self.text[-self.max_stop:] if self.max_stop else ""
        for n in range(min(len(tail), self.max_stop - 1), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0
