"""What one sequence of the KV cache holds, as tokens, and reusing its longest common prefix.

Owns the bookkeeping of one llama.cpp sequence (``seq_id``): the tokens whose KV cells it holds,
in position order. ``reuse`` trims the cache to the longest prefix the next prompt shares with it
(llama.cpp's memory API, ``llama_memory_seq_rm``), so only the rest is evaluated; ``commit``
records what a decode added; ``forget`` empties the sequence when its state cannot be vouched
for. One object per sequence: several sequences in one context (continuous batching) would each
get their own.

Sliding-window attention (Gemma 3, ...): unless the context was made with ``swa_full``, llama.cpp
keeps only about the last ``n_swa`` + n_ubatch positions for those layers and reuses older cells.
A prefix of length n is reusable only if the cells the next token attends to, positions n - n_swa
to n - 1, are still there (``llama_memory_seq_pos_min``/``_max`` report the window cache's oldest
and newest position); otherwise everything is evaluated again, as llama.cpp's server does.
"""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as C


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVSequence:
    """The tokens one sequence of a llama.cpp context holds in its KV cache."""

    def __init__(self, seq_id: int = 0, *, n_swa: int = 0) -> None:
        self.seq_id = seq_id
        self.n_swa = n_swa
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def reuse(self, ctx: Any, tokens: list[int]) -> int:
        """Keep the longest prefix of the cache that ``tokens`` starts with, less at least one
        token (its logits are needed to sample from); drop the rest. Returns the number of tokens
        kept: evaluate ``tokens[n:]`` next."""
        return self.truncate(ctx, max(0, min(common_prefix(self.tokens, tokens), len(tokens) - 1)))

    def truncate(self, ctx: Any, n: int) -> int:
        """Keep the first ``n`` tokens (fewer if the cache cannot keep them). Returns how many were kept."""
        if n <= 0:
            self.forget(ctx)
            return 0
        mem = C.llama_get_memory(ctx)
        if n < len(self.tokens):
            # Fails for memory that cannot drop part of a sequence (recurrent models).
            if not C.llama_memory_seq_rm(mem, self.seq_id, n, -1):
                self.forget(ctx)
                return 0
            del self.tokens[n:]
        # The cache must hold what the bookkeeping says: the last position, and for a sliding
        # window every position the next token attends to (an emptied window reports -1).
        n = len(self.tokens)
        lo = max(0, n - self.n_swa) if self.n_swa > 0 else 0
        pos_min = C.llama_memory_seq_pos_min(mem, self.seq_id)
        if C.llama_memory_seq_pos_max(mem, self.seq_id) != n - 1 or not 0 <= pos_min <= lo:
            self.forget(ctx)
            return 0
        return n

    def commit(self, tokens: list[int]) -> None:
        """``tokens`` were just decoded after the ones held."""
        self.tokens.extend(tokens)

    def replace(self, tokens: list[int]) -> None:
        """The sequence now holds exactly ``tokens`` (restored from a state file)."""
        self.tokens = list(tokens)

    def forget(self, ctx: Any) -> None:
        """Empty the sequence (never fails)."""
        mem = C.llama_get_memory(ctx)
        if mem is not None:
            C.llama_memory_seq_rm(mem, self.seq_id, -1, -1)
        self.tokens = []
