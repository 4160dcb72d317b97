"""The canary: the check a newly loaded model must pass before it is declared in force.

``run_canary(engine, settings)`` runs the configured prompt (or chat messages) on the engine,
greedy with a fixed seed so the same model gives the same answer every time, and judges the
output: it must complete within ``timeout_s``, have at least ``min_tokens`` tokens, and, when
configured, contain a match of ``pattern`` and parse as JSON that satisfies ``json_schema``. The
model supervisor runs it after every model change and rolls back when it fails; this module only
runs and judges (``judge`` is pure).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fastjsonschema

from agent.config.sections import CanarySettings
from agent.engine.types import ChatMessage, EngineLike, GenerationRequest, GenerationResult
from agent.errors import EdgeAgentError

# Output kept in reports: enough to see what the model said, small enough for the shadow's 8 KB.
OUTPUT_MAX_CHARS = 200


class CanaryFailed(EdgeAgentError):
    """The new model loaded but failed the canary check: the previous model is loaded again."""

    code = "canary_failed"


@dataclass(frozen=True)
class CanaryResult:
    passed: bool
    reason: str | None  # why it failed; None when it passed
    output: str  # the text, cut to OUTPUT_MAX_CHARS
    tokens: int
    took_ms: float
    finish_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "output": self.output,
            "tokens": self.tokens,
            "took_ms": round(self.took_ms, 1),
            "finish_reason": self.finish_reason,
        }


def request(c: CanarySettings) -> GenerationRequest:
    """The canary's request: greedy, seed 0, no stop strings."""
    if c.messages is not None:
        messages = tuple(ChatMessage(m.role, m.content) for m in c.messages)
        return GenerationRequest(prompt="", messages=messages, max_tokens=c.max_tokens, temperature=0.0, seed=0)
    return GenerationRequest(prompt=c.prompt or "", max_tokens=c.max_tokens, temperature=0.0, seed=0)


def judge(c: CanarySettings, result: GenerationResult, took_ms: float) -> CanaryResult:
    """Pure: whether ``result`` passes the canary ``c``."""
    text = result.text
    n = result.stats.completion_tokens
    reason: str | None = None
    if result.finish_reason in ("timeout", "canceled", "aborted"):
        reason = f"did not complete within canary.timeout_s = {c.timeout_s:g} s ({result.finish_reason})"
    elif n < c.min_tokens:
        reason = f"produced {n} token(s), fewer than canary.min_tokens = {c.min_tokens}"
    elif c.pattern is not None and re.search(c.pattern, text) is None:
        reason = f"the output does not match canary.pattern {c.pattern!r}"
    elif c.json_schema is not None:
        reason = _schema_problem(c.json_schema, text)
    return CanaryResult(reason is None, reason, text[:OUTPUT_MAX_CHARS], n, took_ms, result.finish_reason)


def _schema_problem(schema: dict[str, Any], text: str) -> str | None:

    try:
        value = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer longer than Python parses
        why = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else str(e)
        return f"the output is not JSON ({why}), as canary.json_schema requires"
    try:
        _validator(json.dumps(schema, sort_keys=True))(value)
    except fastjsonschema.JsonSchemaValueException as e:
        return f"the output does not satisfy canary.json_schema: {e.message}"
    return None


@lru_cache(maxsize=8)
def _validator(schema_json: str) -> Callable[[Any], Any]:

    return fastjsonschema.compile(json.loads(schema_json))


def run_canary(engine: EngineLike, c: CanarySettings, *, clock: Callable[[], float] = time.monotonic) -> CanaryResult:
    """Run the canary ``c`` on a loaded ``engine`` (whose clock is ``clock``) and judge it."""
    t0 = clock()
    try:
        result = engine.generate(request(c), deadline=t0 + c.timeout_s)
    except EdgeAgentError as e:
        return CanaryResult(False, f"the canary request failed: [{e.code}] {e}", "", 0, (clock() - t0) * 1000)
    return judge(c, result, (clock() - t0) * 1000)


__all__ = ["CanaryFailed", "CanaryResult", "OUTPUT_MAX_CHARS", "judge", "request", "run_canary"]
