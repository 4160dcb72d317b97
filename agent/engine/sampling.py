"""Token sampling for one generation: llama.cpp's sampler chain, with an optional grammar.

A grammar sampler applied to every candidate costs a grammar check per vocabulary entry per token
(about 66 ms a token with Gemma 3's 262,144 entries on the reference machine, more than the
decode). So, like llama.cpp's own common sampler, the token is first drawn without the grammar
and only checked against it; only when the grammar rejects it is the draw repeated with the
grammar over the whole vocabulary. A model that mostly follows the format pays almost nothing.
A drawn token the grammar accepts is kept as drawn, so greedy output is exactly what the grammar
over the whole vocabulary would give; with temperature the scheme is llama.cpp's own.

Under a grammar every token must also keep the text valid UTF-8. llama.cpp's grammar decodes
bytes leniently (an overlong or surrogate sequence, or a byte F8..FF, becomes some code point), so
a model writing raw bytes (byte-fallback tokens) could pass it and the text would then carry
U+FFFD: JSON still, but a string the grammar counted within maxLength would come out longer.
Such a token is refused like one the grammar refuses, and never accepted into the grammar.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from agent.engine import llamacpp
from agent.engine.types import GenerationRequest
from agent.errors import EngineError

# llama_token_data as numpy sees it, so a whole vocabulary of candidates is filled in one copy.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


def _chain(req: GenerationRequest, grammar: Any = None) -> Any:
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if grammar is not None:
        C.llama_sampler_chain_add(chain, grammar)  # the chain owns it from here
    if req.temperature <= 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    else:
        if req.top_p < 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(req.top_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(req.temperature))
        seed = C.LLAMA_DEFAULT_SEED if req.seed is None else req.seed & 0xFFFFFFFF
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    return chain


# RFC 3629's well-formed sequences: for a lead byte, the range of its first continuation byte
# (the others are 80..BF) and how many continuation bytes follow.
_LEADS: dict[int, tuple[int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    _LEADS[_b] = (0x80, 0xBF, 1)
for _b in range(0xE0, 0xF0):
    _LEADS[_b] = ({0xE0: 0xA0}.get(_b, 0x80), {0xED: 0x9F}.get(_b, 0xBF), 2)
for _b in range(0xF0, 0xF5):
    _LEADS[_b] = ({0xF0: 0x90}.get(_b, 0x80), {0xF4: 0x8F}.get(_b, 0xBF), 3)


def utf8_tail(tail: bytes, piece: bytes) -> bytes | None:
    """The unfinished UTF-8 sequence after ``tail + piece``, or None if those bytes can never be
    well-formed UTF-8 (an invalid byte, an overlong form, a surrogate, a value above U+10FFFF).
    Python's incremental decoder cannot say this: it buffers ED A7 without complaint."""
    data = tail + piece
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        lead = _LEADS.get(b)
        if lead is None:
            return None
        lo, hi, k = lead
        for j in range(1, k + 1):
            if i + j >= n:
                return data[i:]
            c = data[i + j]
            if not ((lo <= c <= hi) if j == 1 else (0x80 <= c <= 0xBF)):
                return None
        i += k + 1
    return b""


class Sampler:
    """Draws the next token from the context's last logits. ``grammar`` is a llama.cpp grammar
    sampler (``agent.engine.grammar.Grammar.sampler``); the Sampler owns and frees it."""

    def __init__(self, req: GenerationRequest, vocab: Any, grammar: Any = None) -> None:
        self._vocab = vocab
        self._plain = _chain(req)
        self._constrained = _chain(req, grammar) if grammar is not None else None
        self._grammar = grammar
        self.resampled = 0  # draws refused (grammar or UTF-8) and drawn again under the grammar
        if grammar is not None:
            self._one = C.llama_token_data(0, 0.0, 0.0)
            self._one_array = C.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
            self._n_vocab = int(C.llama_vocab_n_tokens(vocab))
            self._cand = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(self._n_vocab, dtype=np.int32)
            self._piece_buf = ctypes.create_string_buffer(64)
            self._tail = b""

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """The next token from the logits at batch index ``idx`` (-1: the last output)."""
        token = int(C.llama_sampler_sample(self._plain, ctx, idx))
        if self._constrained is None:
            return token
        if self._grammar_allows(token):
            tail = self._text_ok(token)
            if tail is not None:
                C.llama_sampler_accept(self._constrained, token)
                self._tail = tail
                return token
        self.resampled += 1
        return self._constrained_draw(ctx, idx)

    def _grammar_allows(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = C.llama_token(token), 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        C.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return not math.isinf(self._one.logit)

    def _text_ok(self, token: int) -> bytes | None:
        if C.llama_vocab_is_eog(self._vocab, token):
            return b""
        piece, self._piece_buf = llamacpp.token_piece(self._vocab, token, self._piece_buf)
        return utf8_tail(self._tail, piece)

    def _constrained_draw(self, ctx: Any, idx: int) -> int:
        """Grammar over the whole vocabulary, then the chain; a draw that breaks UTF-8 is banned
        and the draw repeated. The grammar advances only with the token finally kept."""
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
        banned: list[int] = []
        while True:
            self._cand["id"] = self._ids
            self._cand["logit"] = logits
            self._cand["p"] = 0.0
            if banned:
                self._cand["logit"][banned] = -np.inf
            data = self._cand.ctypes.data_as(ctypes.POINTER(C.llama_token_data))
            arr = C.llama_token_data_array(data, self._n_vocab, -1, False)
            C.llama_sampler_apply(self._constrained, ctypes.byref(arr))
            if arr.selected < 0 or arr.size == 0 or math.isinf(arr.data[arr.selected].logit) or len(banned) > 256:
                raise EngineError("sampling under the grammar found no token that keeps the text valid UTF-8")
            token = int(arr.data[arr.selected].id)
            tail = self._text_ok(token)
            if tail is not None:
                C.llama_sampler_accept(self._constrained, token)
                self._tail = tail
                return token
            banned.append(token)

    def close(self) -> None:
        for chain in (self._plain, self._constrained):
            if chain is not None:
                C.llama_sampler_free(chain)
        self._plain = self._constrained = self._grammar = None
