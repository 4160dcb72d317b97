"""Continuous batching: the jobs in flight, decoded together, one llama.cpp batch per step.

Owns the scheduler thread of one loaded model. Each job runs in a slot: a llama.cpp sequence
(``seq_id``) with a KV cache of its own (``agent.engine.prefix.KVSequence``). A step builds one
batch from every active job: the token each generating job sampled last, then prompt chunks of the
jobs still reading their prompt, up to ``n_batch`` tokens, so a long prompt never holds the others'
tokens back for more than one chunk. After the decode, every job whose logits came out samples its
next token with its own sampler (temperature, top_p, seed, grammar), checks its stop strings and
streams its text. A job that arrives while others generate takes a free slot at the next step;
when every slot is busy it waits (``slot_wait_ms``). A free slot is given to the job whose prompt
shares the longest prefix with what the slot's KV cache holds, so repeated system prompts are not
evaluated again.

Decoding is bound by memory bandwidth on CPUs: reading the weights once per step for several
sequences costs little more than for one (docs/benchmarks.md).

Cancellation and deadlines are checked before every step and end only their own job; llama.cpp's
abort callback stops a decode in the middle when the model is being unloaded or when every job in
the batch has asked to stop (a lone long prompt is then stopped within one graph node). The callback
is installed only for steps that evaluate prompt tokens: llama.cpp calls it once per graph node, and
a Python call per node costs several percent of a generation step, which lasts one token anyway.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp.llama_cpp as C

from agent.codes import ErrorCode
from agent.engine import llamacpp
from agent.engine.prefix import KVSequence
from agent.engine.sampling import Sampler
from agent.engine.types import FinishReason, GenerationRequest, GenerationResult, GenerationStats, TokenCallback
from agent.errors import EngineError, OutputTruncated
from agent.system.memory import proc_status

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# one generation's stop state
# ---------------------------------------------------------------------------------------------


class Run:
    """What decides that a generation must stop. ``check`` may be called from llama.cpp's compute
    thread once per graph node, so it does as little as possible."""

    __slots__ = ("cancel", "deadline", "clock", "closing", "reason")

    def __init__(
        self,
        cancel: threading.Event | None,
        deadline: float | None,
        clock: Callable[[], float],
        closing: threading.Event,
    ) -> None:
        self.cancel = cancel
        self.deadline = deadline
        self.clock = clock
        self.closing = closing
        self.reason: FinishReason | None = None

    def check(self) -> bool:
        if self.reason is not None:
            return True
        if self.cancel is not None and self.cancel.is_set():
            self.reason = "canceled"
        elif self.closing.is_set():
            self.reason = "aborted"
        elif self.deadline is not None and self.clock() >= self.deadline:
            self.reason = "timeout"
        return self.reason is not None


class StopFilter:
    """Holds back text that could be the start of a stop sequence, so neither the stream nor the
    result ever contains any part of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop sequence was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------------------------------------
# a job in the scheduler
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One generation: its request, its prompt tokens (fitted to the slot's context), and its
    progress. Filled in by the scheduler thread only."""

    req: GenerationRequest
    tokens: list[int]
    dropped: int
    allowed: int  # tokens it may generate: max_tokens, or what is left of the slot's context
    sampler: Sampler
    run: Run
    on_token: TokenCallback | None
    structured: bool
    t_submit: float = field(default_factory=time.monotonic)
    t_start: float | None = None
    t_prompt_end: float | None = None
    t_first_text: float | None = None
    slot: Slot | None = None
    cached: int = 0
    slots_in_use: int = 1
    pending: int | None = None  # the token sampled last, decoded at the next step
    completion: int = 0
    n_out: int = 0
    parts: list[str] = field(default_factory=list)
    hit_stop: bool = False
    finish: FinishReason = "length"
    peak_rss_anon: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.stops = StopFilter(self.req.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def emit(self, text: str) -> None:
        if not text:
            return
        if self.t_first_text is None:
            self.t_first_text = time.monotonic()
        self.parts.append(text)
        if self.on_token is not None:
            self.on_token(self.n_out, text)
        self.n_out += 1


@dataclass
class Slot:
    """One sequence of the context and what its KV cache holds."""

    kv: KVSequence
    job: Job | None = None
    last_used: float = 0.0


# ---------------------------------------------------------------------------------------------
# the scheduler
# ---------------------------------------------------------------------------------------------


class Scheduler:
    """The decode loop of one loaded model, on a thread of its own. ``submit`` hands it a job and
    returns at once; the job's ``done`` event is set when it has its result or error.

    ``prepare(slot, job)`` is the engine's: it makes the slot's KV cache hold the longest prefix of
    the job's prompt it can (prefix reuse, engine.prompt_cache) and returns that length.
    """

    def __init__(
        self,
        llama: Any,
        slots: list[KVSequence],
        *,
        n_batch: int,
        closing: threading.Event,
        prepare: Callable[[Slot, Job], int],
        abort_callback: Any = None,
    ) -> None:
        self._llama = llama
        self._ctx = llama.ctx
        self._vocab = llama._model.vocab
        self._slots = [Slot(kv) for kv in slots]
        self._n_batch = n_batch  # llama.cpp's: no decode may carry more tokens
        self._closing = closing
        self._prepare = prepare
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._batch = C.llama_batch_init(self._n_batch, 0, 1)
        self._batch_runs: list[Run] = []
        self._abort_cb = abort_callback  # llama.cpp's ggml_abort_callback, or None
        self._abort_on: bool | None = None
        self._piece_buf = ctypes.create_string_buffer(64)
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, name="edge-agent-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ interface

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing.is_set():
                job.run.reason = "aborted"
                self._finish(job)
                return
            self._waiting.append(job)
            self._cond.notify()

    def busy(self) -> int:
        """Slots with a job."""
        return sum(1 for s in self._slots if s.job is not None)

    def kv_tokens(self) -> int:
        """KV cells in use over every slot, tokens."""
        return sum(len(s.kv) for s in self._slots)

    def slot_tokens(self) -> list[list[int]]:
        """What each slot's KV cache holds (tests, diagnostics)."""
        return [list(s.kv.tokens) for s in self._slots]

    def abort_wanted(self) -> bool:
        """For llama.cpp's abort callback: stop the decode running now?"""
        if self._closing.is_set():
            return True
        runs = self._batch_runs
        return bool(runs) and all(r.check() for r in runs)

    def decode_seq(self, kv: KVSequence, tokens: list[int], run: Run) -> bool:
        """Evaluate ``tokens`` after what ``kv`` holds, alone, in chunks of n_batch, no logits (the
        engine's prompt-cache prefix, from ``prepare`` on the scheduler thread). False when the
        run stopped it or llama.cpp failed: ``kv`` then holds what it can vouch for."""
        for start in range(0, len(tokens), self._n_batch):
            if run.check():
                return False
            chunk = tokens[start : start + self._n_batch]
            for i, t in enumerate(chunk):
                self._put(i, t, len(kv) + i, kv.seq_id, False)
            self._batch.n_tokens = len(chunk)
            rc = self._decode([run], interruptible=True)
            if rc != 0:
                kv.truncate(self._ctx, len(kv))
                return False
            kv.commit(chunk)
        return True

    def close(self) -> None:
        """Stop the loop: jobs in flight end 'aborted'. The caller set ``closing`` first."""
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
        C.llama_batch_free(self._batch)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing.is_set() and not self._waiting and self.busy() == 0:
                        self._cond.wait()
                    if self._closing.is_set():
                        break
                self._end_stopped()
                self._admit()
                if self.busy():
                    self._step()
        except BaseException:  # a bug must not leave jobs waiting forever
            log.exception("engine scheduler failed")
        finally:
            self._closing.set()
            with self._cond:
                left = [s.job for s in self._slots if s.job is not None] + list(self._waiting)
                self._waiting.clear()
            for job in left:
                job.run.reason = job.run.reason or "aborted"
                self._finish(job)

    def _end_stopped(self) -> None:
        """Jobs canceled or past their deadline end now, whether waiting or in a slot."""
        with self._cond:
            stopped = [j for j in self._waiting if j.run.check()]
            for j in stopped:
                self._waiting.remove(j)
        stopped += [s.job for s in self._slots if s.job is not None and s.job.run.check()]
        for job in stopped:
            self._finish(job)

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if s.job is None]
            with self._cond:
                if not free or not self._waiting:
                    return
                job = self._waiting.popleft()
            slot = _pick_slot(free, job.tokens)
            job.slot, slot.job = slot, job
            job.t_start = time.monotonic()
            job.slots_in_use = self.busy()
            try:
                job.cached = self._prepare(slot, job)
            except BaseException as e:  # noqa: BLE001
                self._fail(job, e)

    def _step(self) -> None:
        b = self._batch
        n = 0
        entries: list[tuple[Job, list[int], int | None]] = []  # job, tokens added, batch index of its logits
        active = [s.job for s in self._slots if s.job is not None]
        if len(active) > self._n_batch:  # more jobs than a batch holds: take turns
            k = self._steps % len(active)
            active = active[k:] + active[:k]
        for job in active:  # generating jobs first: one token each
            if n == self._n_batch:
                break
            if job.pending is not None:
                assert job.slot is not None
                self._put(n, job.pending, len(job.slot.kv), job.slot.kv.seq_id, True)
                entries.append((job, [job.pending], n))
                n += 1
        for job in active:  # then prompt chunks, as far as the batch has room
            if job.pending is not None or job.t_prompt_end is not None:
                continue
            assert job.slot is not None
            room = self._n_batch - n
            if room <= 0:
                break
            start = len(job.slot.kv)
            chunk = job.tokens[start : start + room]
            last = start + len(chunk) == len(job.tokens)
            for i, t in enumerate(chunk):
                self._put(n + i, t, start + i, job.slot.kv.seq_id, last and i == len(chunk) - 1)
            entries.append((job, chunk, n + len(chunk) - 1 if last else None))
            n += len(chunk)
        if n == 0:
            return
        b.n_tokens = n
        rc = self._decode(
            [job.run for job, _, _ in entries],
            interruptible=any(len(a) > 1 or job.pending is None for job, a, _ in entries),
        )
        if rc == llamacpp.DECODE_ABORTED:
            # llama.cpp dropped what it had not finished of this batch: nothing of it is committed;
            # each cache keeps what it held before (or nothing, where it cannot vouch for it).
            for job, _, _ in entries:
                assert job.slot is not None
                job.slot.kv.truncate(self._ctx, len(job.slot.kv))
                job.run.check()
                job.run.reason = job.run.reason or "aborted"
                self._finish(job)
            return
        if rc != 0:
            for job, _, _ in entries:
                assert job.slot is not None
                job.slot.kv.forget(self._ctx)
                job.error = EngineError(f"llama_decode failed ({rc})", code=ErrorCode.engine_error)
                self._finish(job)
            return
        self._steps += 1
        now = time.monotonic()
        for job, added, idx in entries:
            assert job.slot is not None
            job.slot.kv.commit(added)
            if idx is None:
                continue
            if job.t_prompt_end is None:
                job.t_prompt_end = now
            try:
                self._next_token(job, idx)
            except BaseException as e:  # noqa: BLE001  one job's failure (a callback, a sampler) is its own
                self._fail(job, e)

    def _decode(self, runs: list[Run], *, interruptible: bool) -> int:
        """llama_decode of the batch as filled; with the abort callback only when ``interruptible``
        (prompt tokens in it: a step of generated tokens lasts one token)."""
        want = interruptible and self._abort_cb is not None
        if want != self._abort_on:
            C.llama_set_abort_callback(self._ctx, self._abort_cb if want else C.ggml_abort_callback(), None)
            self._abort_on = want
        self._batch_runs = runs
        try:
            return int(C.llama_decode(self._ctx, self._batch))
        finally:
            self._batch_runs = []

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _next_token(self, job: Job, idx: int) -> None:
        """Sample the job's next token from its logits at batch index ``idx``, and act on it."""
        job.pending = None
        token = job.sampler.sample(self._ctx, idx)
        if C.llama_vocab_is_eog(self._vocab, token):
            job.finish = "stop"
            self._finish(job)
            return
        job.completion += 1
        piece, self._piece_buf = llamacpp.token_piece(self._vocab, token, self._piece_buf)
        text, job.hit_stop = job.stops.push(job.decoder.decode(piece))
        job.emit(text)
        if job.hit_stop:
            job.finish = "stop"
            self._finish(job)
        elif job.completion >= job.allowed:
            job.finish = "length"
            self._finish(job)
        else:
            job.pending = token

    # ------------------------------------------------------------------ ending a job

    def _fail(self, job: Job, error: BaseException) -> None:
        """The job raised (its stream consumer, its sampler, a prefix it needed): the caller gets
        that exception; the slot's cache is dropped, since what it holds is no longer vouched for."""
        if job.slot is not None:
            job.slot.kv.forget(self._ctx)
        job.error = error
        self._finish(job)

    def _finish(self, job: Job) -> None:
        """The job's result (or error), its slot freed. Never raises."""
        try:
            if job.error is None:
                if job.run.reason is not None:
                    job.finish = job.run.reason
                if not job.hit_stop:
                    # Text held back because it might have begun a stop sequence is real output.
                    tail, job.hit_stop = job.stops.push(job.decoder.decode(b"", final=True))
                    job.emit(tail)
                    if not job.hit_stop:
                        job.emit(job.stops.flush())
                job.result = self._result(job)
                if job.structured and job.result.finish_reason in ("stop", "length"):
                    check_json(job.result, job.req, job.hit_stop)
        except BaseException as e:  # noqa: BLE001
            job.error = e
        finally:
            job.sampler.close()
            if job.slot is not None:
                job.slot.job = None
                job.slot.last_used = time.monotonic()
            job.done.set()

    def _result(self, job: Job) -> GenerationResult:
        end = time.monotonic()
        start = job.t_start if job.t_start is not None else end
        prompt_end = job.t_prompt_end if job.t_prompt_end is not None else end
        gen_s = end - prompt_end
        # RssAnon grows as the job's KV pages are first written: its end is its peak.
        job.peak_rss_anon = proc_status().rss_anon
        stats = GenerationStats(
            prompt_tokens=len(job.tokens),
            completion_tokens=job.completion,
            prompt_ms=(prompt_end - start) * 1000,
            generation_ms=gen_s * 1000,
            tokens_per_s=job.completion / gen_s if job.completion and gen_s > 0 else 0.0,
            peak_rss_anon=job.peak_rss_anon,
            prompt_tokens_dropped=job.dropped,
            prompt_tokens_cached=job.cached,
            slot_wait_ms=(start - job.t_submit) * 1000,
            time_to_first_token_ms=None if job.t_first_text is None else (job.t_first_text - start) * 1000,
            slots_in_use=job.slots_in_use,
            max_tokens_allowed=job.allowed,
        )
        return GenerationResult("".join(job.parts), job.finish, stats)


# A slot's cache is given to a job for its prefix only when it holds at least this share of the
# prompt (llama-server's --slot-prompt-similarity default): a shared BOS alone must not make a job
# overwrite the cache another prompt may come back for.
MIN_SHARED = 0.1


def _pick_slot(free: list[Slot], tokens: list[int]) -> Slot:
    """The free slot whose cache shares the longest prefix with ``tokens``, when that is worth
    having; otherwise the one used longest ago (never used: first), whose cache is the least likely
    to be wanted again."""
    shared, slot = max(((_shared(s.kv.tokens, tokens), s) for s in free), key=lambda x: (x[0], -x[1].last_used))
    if shared >= max(2, MIN_SHARED * len(tokens)):
        return slot
    return min(free, key=lambda s: s.last_used)


def _shared(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_json(result: GenerationResult, req: GenerationRequest, hit_stop: bool) -> None:
    """Structured output that ended before its grammar did is not valid JSON: never a success."""
    try:
        json.loads(result.text)
        return
    except ValueError:
        pass
    n = result.stats.completion_tokens
    if hit_stop:
        why = (
            "a stop string ended the output before its JSON was complete (structured output seldom needs stop strings)"
        )
    elif result.finish_reason == "length":
        why = (
            f"max_tokens {req.max_tokens} ended the output before its JSON was complete: raise max_tokens, or bound "
            "the schema's strings and arrays (maxLength, maxItems)"
        )
    else:  # the grammar allowed end-of-generation on incomplete JSON: a bug, but still not a success
        why = "the output ended before its JSON was complete"
    excerpt = result.text if len(result.text) <= 80 else result.text[:60] + f"... ({len(result.text)} characters)"
    raise OutputTruncated(f"{why}; {n} tokens generated: {excerpt!r}", result=result)


__all__ = ["Job", "Run", "Scheduler", "Slot", "StopFilter", "check_json"]
