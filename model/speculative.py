"""Prompt-lookup (n-gram) speculation: draft tokens copied from earlier in the sequence.

A decode step on a CPU costs about the same for 1 to 4 rows: it is bound by reading the weights,
not by arithmetic (the default model's native step: 1.44 ms for 1 row, 1.45 for 2, 1.73 for 4).
So a greedy sequence can check several guesses for its next tokens in one step: rows at
positions p, p+1, ... fed its last token and the guesses; row j's argmax is the token that
follows, and while it equals the next guess the guess was right and the following row's logits
are the true next ones. A step then emits every accepted guess plus one more token (the argmax
after the last accepted one), which is what greedy decoding one token at a time gives (up to
near-ties: the rows beside a row move its logits by ~1e-5, as in any batch).

The guesses come from the sequence itself, as vLLM's "ngram" method and prompt-lookup decoding
take them: find the latest earlier occurrence of the sequence's last n tokens (n from
`max_n` down to `min_n`) and propose the tokens that followed it. Text that repeats (code,
lists, quoted input, and the loops a small model falls into) is drafted right most of the time;
elsewhere there is usually no match, and the step runs as usual.

`PromptLookup` keeps, per sequence, a dict from each n-gram to where it last ended, extended
with the tokens added since the previous call, so a proposal costs O(new tokens), not a scan.
"""

from __future__ import annotations

from typing import Callable

NGRAM_MIN = 2
NGRAM_MAX = 4
# Drafts a step may verify by default: with one sequence that is 4 rows, which on a CPU cost about what one
# row does (the default model's native step: 1.73 ms against 1.44).
DEFAULT_SPECULATIVE_TOKENS = 3
MAX_SPECULATIVE_TOKENS = 15


class PromptLookup:
    """Draft proposals for one sequence, from the latest earlier match of its last n tokens."""

    def __init__(self, min_n: int = NGRAM_MIN, max_n: int = NGRAM_MAX):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        # n -> {n-gram: index of the token that followed its latest occurrence}
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._indexed = 0  # n-grams ending before this index are in the maps

    def propose(self, tokens: Callable[[int, int], list[int]], length: int, k: int) -> list[int]:
        """Up to k draft tokens to follow the sequence's first `length` tokens (`tokens(lo, hi)` reads
        them); [] when its last n tokens occurred nowhere earlier, for every n."""
        if k <= 0 or length < self.min_n + 1:
            return []
        # index the n-grams whose following token is known: those ending at indices < length - 1
        lo = max(0, self._indexed - self.max_n + 1)
        window = tokens(lo, length)
        for end in range(self._indexed, length - 1):
            for n, table in self._next.items():
                if end + 1 >= n:
                    table[tuple(window[end + 1 - n - lo: end + 1 - lo])] = end + 1
        self._indexed = max(self._indexed, length - 1)
        for n in range(self.max_n, self.min_n - 1, -1):
            if length < n + 1:
                continue
            follow = self._next[n].get(tuple(window[length - n - lo:]))
            if follow is not None:
                return tokens(follow, min(follow + k, length))
        return []
