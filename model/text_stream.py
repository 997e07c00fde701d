"""Generated ids -> text deltas, with stop strings found even when split across tokens.

`TextStream.push(id)` returns the text that is safe to show now: whole UTF-8 characters
only, and never a tail that could still become the start of a stop string. When a
stop string appears, the stream ends; the stop text itself is never returned.
"""

from __future__ import annotations

from .tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = (), context_ids: list[int] = ()):
        """`context_ids`: the prompt's last ids, so a character split between prompt and output decodes whole."""
        self.detok = IncrementalDetokenizer(tokenizer)
        if context_ids:
            self.detok.prime(list(context_ids))
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all decoded text so far (whole characters)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Feed one id; returns the newly showable text ('' while held back)."""
        if self.stopped:
            return ""
        new = self.detok.push(token_id)
        return self._advance(new, final=False)

    def finish(self) -> str:
        """End of generation: flush what the detokenizer and the stop hold-back kept."""
        if self.stopped:
            return ""
        return self._advance(self.detok.flush(), final=True)

    def _advance(self, new: str, final: bool) -> str:
        if not new and not final:
            return ""
        search_from = max(0, len(self.text) - self.max_stop + 1)
        self.text += new
        if self.stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                delta = self.text[self.emitted:end]
                self.text = self.text[:end]
                self.emitted = end
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
