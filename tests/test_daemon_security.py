"""Hostile input and hostile neighbours against a running daemon (real broker, engine and store).

- Fuzzed submit payloads (hypothesis) published to one running in-process daemon. A payload
  with a readable job id gets one REJECTED status and one REJECTED result, with the expected
  code; any other payload gets an ERROR log line and nothing on any job topic. Afterwards a
  valid job still round-trips. Which id is readable, and which code a payload earns, are worked
  out here from the rules in docs/protocol.md, never by calling the parser under test.
- Each refusal code a payload alone can cause, with its exact message, and its boundary.
- Mutual TLS with one certificate per device and mosquitto's per-device ACL: the cloud reaches
  dev-a; dev-b can neither read dev-a's topics nor submit to it.
- Password authentication from the systemd credential: the secret reaches the broker and
  nowhere else (daemon log at DEBUG, `edge-agent config show`).

Everything waits on an event (a message, a log record, a broker round trip), with a deadline.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.config import Settings
from agent.operator.jobs import JobClient
from tests.broker import BrokerClient, MosquittoBroker, TLSFiles, device_acl
from tests.daemon_harness import ROOT, DaemonProcess, GatedEngine, InProcessDaemon, wait_online, write_daemon_config
from tests.helpers import job_payload

T = 15.0  # deadline for anything that should happen promptly on loopback

# The limits of the fuzzed daemon, and what docs/protocol.md derives from them.
MAX_PROMPT_BYTES = 4096
MAX_TOKENS_LIMIT = 64
MAX_PAYLOAD_BYTES = 6 * MAX_PROMPT_BYTES + 64 * 1024  # "6 x engine.max_prompt_bytes + 64 KiB"
SUBMIT_KEYS = (
    "job_id",
    "kind",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "response_format",
    "stream",
    "priority",
    "expires_at",
    "timeout_s",
    "handed_from",
)  # fmt: skip  (the documented field table, in order)
CHAT_KEYS = (
    "messages",
    "response_format",
)  # a generate job's fuzzing leaves them out: tests/test_protocol.py fuzzes them
PAYLOAD_CODES = {"invalid_payload", "payload_too_large", "prompt_too_large", "max_tokens_too_large", "expired"}

FZ = "dev-fz"


def job(job_id: str, **kw: Any) -> bytes:
    return job_payload(job_id, **{"max_tokens": 4, **kw})


# --------------------------------------------------------------------------------------------
# The documented id rules, written independently of agent.jobs.protocol


_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_WS = rb"[ \t\n\r]*"  # JSON whitespace
_LEADING = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"job_id"' + _WS + b":" + _WS + rb'"([A-Za-z0-9_-]{1,64})"' + _WS
                      + rb"[,}]")  # fmt: skip


class _Undecodable(Exception):
    pass


def _strict_json(text: str) -> Any:
    """RFC 8259 JSON as the protocol reads it: finite numbers, integers of at most 40 digits;
    objects as lists of pairs so duplicate keys stay visible."""

    def bad_constant(name: str) -> Any:
        raise _Undecodable(name)

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > 40:
            raise _Undecodable(s)
        return int(s)

    def parse_float(s: str) -> float:
        f = float(s)
        if f in (float("inf"), float("-inf")):
            raise _Undecodable(s)
        return f

    try:
        return json.loads(text, object_pairs_hook=lambda pairs: ("object", pairs), parse_constant=bad_constant,
                          parse_int=parse_int, parse_float=parse_float)  # fmt: skip
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _Undecodable(str(e)) from None


def readable_job_id(payload: bytes) -> str | None:
    """docs/protocol.md, "Which job id a refusal is reported under"."""

    def leading() -> str | None:
        m = _LEADING.match(payload)
        return m.group(1).decode() if m else None

    if len(payload) > MAX_PAYLOAD_BYTES:
        return leading()  # refused before it is parsed
    try:
        text = payload.decode("utf-8")
        if text.startswith("\ufeff"):
            raise _Undecodable("byte-order mark")
        doc = _strict_json(text)
    except (UnicodeDecodeError, _Undecodable):
        return leading()
    if not (isinstance(doc, tuple) and doc[0] == "object"):
        return None
    ids = [v for k, v in doc[1] if k == "job_id"]
    if ids and isinstance(ids[0], str) and _ID_RE.fullmatch(ids[0]) and all(v == ids[0] for v in ids):
        return ids[0]
    return None


# --------------------------------------------------------------------------------------------
# Fuzzed payloads: a valid job, then at least one defect, then maybe damage to the bytes


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


JOB_ID = _Sentinel("JOB_ID")  # this example's unique id, filled in when the payload is rendered
OTHER_ID = _Sentinel("OTHER_ID")  # a second unique id (for a duplicate job_id key that disagrees)
MISSING = _Sentinel("MISSING")  # the field is left out
DEEP = _Sentinel("DEEP")  # a value nested too deeply for any JSON parser's recursion limit

ODD = (
    "\u202e\u200f\u2066\u0627\u0644\u05d0\U0001f600\U0001f469\u200d\U0001f4bb\u0301\ufeff\u2028\u2029"
    '\ufffd\x7f\x01\t\n"\\/\u00e9'
)  # fmt: skip  RTL marks, Arabic, Hebrew, emoji, ZWJ, combining, BOM, separators

good_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=["\x00"]) | st.sampled_from(ODD),
    min_size=1,
    max_size=120,
)
stop_text = st.text(alphabet=st.sampled_from(ODD + "abc \u00e9"), min_size=1, max_size=64)
junk_text = st.text(
    alphabet=st.characters(exclude_categories=[]) | st.sampled_from(ODD + "\x00\ud800\udfff"), max_size=20
)  # fmt: skip  lone surrogates and NUL included
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | junk_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk_text, inner, max_size=3),
    max_leaves=8,
)


def _oneof(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


# Values that are wrong for each field, by the documented bounds and strict types.
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "job_id": _oneof(
        None,
        7,
        "",
        "a" * 65,
        "a/b",
        "a+b",
        "#",
        "$SYS",
        "abc\n",
        "\nabc",
        "a b",
        "\u00e9t\u00e9",
        "ab\ud800",
        "ab\x00",
        ["a"],
        {"id": "a"},
    ),
    "kind": _oneof("chat", "Generate", "generate ", "", None, 1, ["generate"], {"generate": True}),
    "prompt": _oneof(None, 0, True, [], {}, ["Hi"], "")
    | junk_text.map(lambda s: s + "\x00")
    | junk_text.map(lambda s: "\ud800" + s),
    "max_tokens": _oneof("5", 5.0, True, None, [5], {"n": 5})
    | st.integers(max_value=0)
    | st.floats(allow_nan=False, allow_infinity=False),
    "temperature": _oneof("0.5", True, None, [0.5])
    | st.floats(min_value=2.0, exclude_min=True, allow_infinity=False)
    | st.floats(max_value=-1e-9, allow_infinity=False)
    | st.integers(min_value=3)
    | st.integers(max_value=-1),
    "top_p": _oneof(0, 0.0, "0.9", True, None)
    | st.floats(min_value=1.0, exclude_min=True, allow_infinity=False)
    | st.integers(min_value=2)
    | st.integers(max_value=-1),
    "seed": _oneof(1.5, "1", True, [1]) | st.integers(min_value=2**32 - 1) | st.integers(max_value=-1),
    "stop": _oneof("x", 1, None, [1], [""], ["a"] * 9, ["x" * 65], ["a\x00"], ["\udfff"], {"a": 1}),
    "stream": _oneof(1, 0, "true", None, [True]),
    "priority": _oneof(1.0, "1", None, True) | st.integers(min_value=101) | st.integers(max_value=-101),
    "expires_at": _oneof(
        1700000000,
        "2024-05-01T12:00:00",
        "2024-05-01",
        "yesterday",
        "2024-13-01T00:00:00Z",
        "2030-05-01T12:00:00Z\n",
        True,
        [],
    ),
    "timeout_s": _oneof(0, -1, 86401, "5", True, [1])
    | st.floats(min_value=86400, exclude_min=True, allow_infinity=False),
    "handed_from": _oneof(1, "", "a/b", "board+", "x" * 65, True, ["b"]),
}
# Defects with a code of their own (when nothing else is wrong).
SIZED: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "prompt": (
        "prompt_too_large",
        st.tuples(st.sampled_from("xé\u05d0\U0001f600"), st.integers(1, 4000)).map(
            lambda t: t[0] * (-(-(MAX_PROMPT_BYTES + t[1]) // len(t[0].encode())))
        ),
    ),
    "max_tokens": ("max_tokens_too_large", st.integers(MAX_TOKENS_LIMIT + 1, 10**12)),
    "expires_at": ("expired", _oneof("2020-01-01T00:00:00Z", "1999-12-31t23:59:59.5+01:00", "2024-05-01 12:00:00z")),
}


def _documented_valid(name: str, v: Any) -> bool:
    """Whether ``v`` may be valid for field ``name`` by the documented table (strings for
    expires_at always count as maybe valid). Keeps drawn junk from being a valid value by chance."""
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    integer = num and isinstance(v, int)

    def text(s: Any) -> bool:
        return isinstance(s, str) and "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)

    return bool({
        "job_id": isinstance(v, str) and _ID_RE.fullmatch(v),
        "kind": v == "generate",
        "prompt": text(v) and 1 <= len(v.encode("utf-8", "surrogatepass")) <= MAX_PROMPT_BYTES,
        "max_tokens": integer and 1 <= v <= MAX_TOKENS_LIMIT,
        "temperature": num and 0 <= v <= 2,
        "top_p": num and 0 < v <= 1,
        "seed": v is None or integer and 0 <= v <= 2**32 - 2,
        "stop": isinstance(v, list) and len(v) <= 8 and all(text(x) and 1 <= len(x) <= 64 for x in v),
        "stream": isinstance(v, bool),
        "priority": integer and -100 <= v <= 100,
        "expires_at": v is None or isinstance(v, str),
        "timeout_s": v is None or num and 0 < v <= 86400,
        "handed_from": v is None or isinstance(v, str) and _ID_RE.fullmatch(v),
    }[name])  # fmt: skip


def _defect(name: str) -> st.SearchStrategy[tuple[Any, str]]:
    """(value, code it earns on its own) for one field."""
    wrong = WRONG[name] | json_junk.filter(lambda v: not _documented_valid(name, v))
    options = [wrong.map(lambda v: (v, "invalid_payload")), st.just((DEEP, "invalid_payload"))]
    if name in ("job_id", "kind", "prompt", "max_tokens"):
        options.append(st.just((MISSING, "invalid_payload")))
    if name in SIZED:
        code, values = SIZED[name]
        options.append(values.map(lambda v, c=code: (v, c)))
    return st.one_of(options)


@dataclass
class Case:
    fields: dict[str, Any]  # field -> value (sentinels filled in at render time)
    codes: dict[str, str]  # defective field or extra key -> the code it earns on its own
    unknown: dict[str, Any] = field(default_factory=dict)
    duplicates: list[tuple[str, Any]] = field(default_factory=list)  # written before the other keys
    top: str = "object"  # or "array", "string", "number", "null": the job is not an object
    order_seed: int = 0
    id_first: bool = True
    ensure_ascii: bool = True
    spaced: bool = False
    damage: tuple[Any, ...] | None = None  # byte-level damage after serialisation


DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("insert"), st.floats(0, 1),
              # each is invalid wherever it lands (a BOM would not be: inside a string it is a character)
              _oneof(b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xf4\x90\x80\x80", b"\xc0\xaf")),
    st.tuples(st.just("bom")),
    st.tuples(st.just("suffix"), _oneof(b"x", b"}", b" {}", b"\x00", b",")),
    st.tuples(st.just("replace"), st.binary(max_size=48) | _oneof(b"", b" \n\t", b"null", b"[]", b"{}", b'"job"')),
    st.tuples(st.just("oversize"), st.integers(1, 2000)),
)  # fmt: skip


# job_id last: hypothesis favours early choices, and a broken job_id leaves nothing to answer under.
DEFECT_FIELDS = tuple(k for k in SUBMIT_KEYS[1:] + SUBMIT_KEYS[:1] if k not in CHAT_KEYS)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    fields: dict[str, Any] = {"job_id": JOB_ID, "kind": "generate", "prompt": draw(good_text),
                              "max_tokens": draw(st.integers(1, MAX_TOKENS_LIMIT))}  # fmt: skip
    optional = draw(st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2) | st.integers(0, 2), "top_p": st.floats(0.01, 1),
        "seed": st.none() | st.integers(0, 2**32 - 2), "stop": st.lists(stop_text, max_size=8),
        "stream": st.booleans(), "priority": st.integers(-100, 100),
        "expires_at": st.none() | _oneof("2999-01-01T00:00:00Z", "2999-01-01T00:00:00.123456+05:30"),
        "timeout_s": st.none() | st.floats(0.001, 86400),
    }))  # fmt: skip
    fields.update(optional)
    # Mostly one kind of defect at a time, so each code gets its turn; sometimes everything at once.
    shape = draw(st.sampled_from(["field"] * 5 + ["several"] * 2 + ["unknown", "duplicate", "top"] + ["damage"] * 3))
    codes: dict[str, str] = {}
    unknown: dict[str, Any] = {}
    duplicates: list[tuple[str, Any]] = []
    top, damage = "object", None
    if shape == "field":
        # The fields with a code of their own are drawn more often, and so is that code.
        name = draw(st.sampled_from(DEFECT_FIELDS + tuple(SIZED) * 2))
        sized = name in SIZED and draw(st.booleans())
        fields[name], codes[name] = (draw(SIZED[name][1]), SIZED[name][0]) if sized else draw(_defect(name))
    if shape == "several":
        for name in draw(st.lists(st.sampled_from(DEFECT_FIELDS), unique=True, min_size=1, max_size=3)):
            fields[name], codes[name] = draw(_defect(name))
    if shape in ("unknown", "several"):
        unknown = draw(st.dictionaries(junk_text.filter(lambda k: k not in SUBMIT_KEYS), json_junk,
                                       min_size=shape == "unknown", max_size=3))  # fmt: skip
        codes.update({k: "invalid_payload" for k in unknown})
    if shape in ("duplicate", "several"):
        present = [k for k, v in fields.items() if v is not MISSING]
        for k in draw(st.lists(st.sampled_from(present), unique=True, min_size=shape == "duplicate", max_size=2)):
            same = draw(st.booleans())
            duplicates.append((k, fields[k] if same else (OTHER_ID if k == "job_id" else draw(json_junk))))
            codes[f"duplicate {k}"] = "invalid_payload"
    if shape in ("top", "several"):
        top = draw(
            st.sampled_from(["array", "string", "number", "null"] + ["object"] * (4 if shape == "several" else 0))
        )
    if shape in ("damage", "several"):
        damage = draw(DAMAGE) if shape == "damage" else draw(st.none() | DAMAGE)
    if not codes and top == "object" and damage is None:
        # Nothing wrong yet: an unknown key makes sure this is a refusal, not a job.
        unknown["colour"] = "blue"
        codes["colour"] = "invalid_payload"
    return Case(fields, codes, unknown, duplicates, top, draw(st.integers(0, 2**32)), draw(st.booleans()),
                draw(st.booleans()), draw(st.booleans()), damage)  # fmt: skip


def render(case: Case, job_id: str) -> bytes:
    fill = {JOB_ID: job_id, OTHER_ID: job_id + "-x"}
    deep_marker = "@@deep-" + uuid.uuid4().hex

    def value(v: Any) -> Any:
        if v is DEEP:
            return deep_marker
        return fill.get(v, v) if isinstance(v, _Sentinel) else v

    pairs = [(k, value(v)) for k, v in case.fields.items() if v is not MISSING] + list(case.unknown.items())
    random.Random(case.order_seed).shuffle(pairs)
    if case.id_first:
        pairs.sort(key=lambda kv: kv[0] != "job_id")  # stable: job_id first, the rest as shuffled
    if case.damage is not None and case.damage[0] == "oversize":
        pairs.append(("pad", "x" * (MAX_PAYLOAD_BYTES + case.damage[1])))
    seps = (", ", ": ") if case.spaced else (",", ":")

    def dumps(v: Any) -> str:
        return json.dumps(v, ensure_ascii=case.ensure_ascii, separators=seps)

    entries = [(k, value(v)) for k, v in case.duplicates] + pairs
    text = "{" + seps[0].join(dumps(k) + seps[1] + dumps(v) for k, v in entries) + "}"
    text = text.replace(dumps(deep_marker), "[" * 5000 + "]" * 5000)
    if case.top != "object":
        text = {"array": f"[{text}]", "string": dumps(text), "number": "42", "null": "null"}[case.top]
    # Lone surrogates in the text become the bytes a careless encoder writes (invalid UTF-8).
    payload = text.encode("utf-8", "surrogatepass")
    if case.damage is None or case.damage[0] == "oversize":
        return payload
    kind, *args = case.damage
    if kind == "truncate":
        return payload[: int(args[0] * len(payload))]
    if kind == "insert":
        at = int(args[0] * len(payload))
        return payload[:at] + args[1] + payload[at:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + payload
    if kind == "suffix":
        return payload + args[0]
    return args[0]  # replace


def expected_code(case: Case, payload: bytes) -> str:
    """The refusal code docs/protocol.md gives this payload (asked only when an id is readable)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "payload_too_large"
    try:
        _strict_json(payload.decode("utf-8"))  # undecodable: invalid_payload, whatever else is wrong
    except (UnicodeDecodeError, _Undecodable):
        return "invalid_payload"
    if (case.damage is not None and case.damage[0] != "oversize") or case.duplicates or case.top != "object":
        return "invalid_payload"
    validation = {c for k, c in case.codes.items() if c != "expired"}
    if not validation:
        return "expired"  # valid in every other way: stored, then refused on arrival
    return validation.pop() if len(validation) == 1 else "invalid_payload"


# --------------------------------------------------------------------------------------------
# Watching the daemon


class LogWatch(logging.Handler):
    """Log records of one logger, with a condition to wait on (the daemon logs from its own threads)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def errors(self) -> list[logging.LogRecord]:
        with self._cond:
            return [r for r in self.records if r.levelno >= logging.ERROR]

    def wait_for(self, pred: Callable[[list[logging.LogRecord]], bool], timeout: float = T) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.records), timeout)


@pytest.fixture
def watch_log() -> Iterator[Callable[[str, int], LogWatch]]:
    attached: list[tuple[logging.Logger, LogWatch, int]] = []

    def attach(name: str, level: int = logging.DEBUG) -> LogWatch:
        logger, w = logging.getLogger(name), LogWatch()
        attached.append((logger, w, logger.level))
        logger.setLevel(level)
        logger.addHandler(w)
        return w

    yield attach
    for logger, w, level in attached:
        logger.removeHandler(w)
        logger.setLevel(level)


class JobTopics:
    """Everything a device publishes on its job topics, filed by job id."""

    def __init__(self, peer: BrokerClient, device: str) -> None:
        self.peer = peer
        self.root = f"edge/{device}/jobs/"
        self.by_job: dict[str, list[tuple[str, dict]]] = {}
        self.odd: list[Any] = []  # anything under {root}/jobs/ that is not {root}/jobs/{id}/{leaf}
        self.other: list[Any] = []  # messages on other topics, in arrival order
        peer.subscribe(f"edge/{device}/jobs/+/+")  # every job topic; not jobs/submit

    def _file(self, msg: Any) -> None:
        if not msg.topic.startswith(self.root):
            self.other.append(msg)  # the device status the peer also follows
            return
        parts = msg.topic[len(self.root) :].split("/")
        if len(parts) == 2 and parts[1] in ("status", "result", "stream"):
            self.by_job.setdefault(parts[0], []).append((parts[1], json.loads(msg.payload)))
        else:
            self.odd.append((msg.topic, msg.payload[:200]))

    def result(self, job_id: str, timeout: float = T, n: int = 1) -> dict:
        """The job's ``n``-th result, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            done = [m for leaf, m in self.by_job.get(job_id, []) if leaf == "result"]
            if len(done) >= n:
                return done[n - 1]
            try:
                self._file(self.peer.expect(timeout=max(0.0, deadline - time.monotonic())))
            except (TimeoutError, queue.Empty):
                raise AssertionError(f"result {n} of {job_id} did not arrive within {timeout:g} s") from None

    def wait_status(self, job_id: str, status: str, timeout: float = T) -> None:
        deadline = time.monotonic() + timeout
        while not any(m["status"] == status for leaf, m in self.by_job.get(job_id, []) if leaf == "status"):
            try:
                self._file(self.peer.expect(timeout=max(0.0, deadline - time.monotonic())))
            except (TimeoutError, queue.Empty):
                raise AssertionError(f"{job_id} was not {status} within {timeout:g} s") from None

    def settle(self) -> None:
        """File everything the broker routed to us so far (a barrier through the same broker)."""
        for msg in self.peer.barrier():
            self._file(msg)


@dataclass
class FuzzTarget:
    daemon: InProcessDaemon
    cloud: BrokerClient
    seen: JobTopics
    errors: LogWatch
    expected: set[str] = field(default_factory=set)  # job ids that may appear on job topics
    ids: Iterator[int] = field(default_factory=itertools.count)

    def publish(self, payload: bytes) -> None:
        self.cloud.publish(f"edge/{FZ}/jobs/submit", payload)

    def check_refused(self, job_id: str, code: str) -> dict:
        """The job's one REJECTED status and result agree with each other and with ``code``."""
        result = self.seen.result(job_id)
        statuses = [m for leaf, m in self.seen.by_job[job_id] if leaf == "status"]
        assert [s["status"] for s in statuses] == ["REJECTED"], statuses  # published before the result
        err = result["error"]
        assert result["status"] == "REJECTED" and result["attempt"] == 0 and result["text"] is None, result
        assert err["code"] == code and err["message"], result
        assert statuses[0]["reason"] == code and statuses[0]["message"] == err["message"]
        row = self.daemon.daemon.parts.store.get(job_id)
        assert row is not None and row.status.value == "REJECTED" and row.error_code == code
        return result

    def check_unreadable(self, payload: bytes, errors_before: int) -> str:
        """The next ERROR log line of the daemon is this refusal, naming the submit topic."""
        assert self.errors.wait_for(lambda rs: sum(r.levelno >= logging.ERROR for r in rs) > errors_before), (
            f"no ERROR log line for {payload[:80]!r}"
        )
        line = self.errors.errors()[errors_before].getMessage()
        assert f"edge/{FZ}/jobs/submit" in line and "no readable job_id" in line, line
        return line


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FuzzTarget]:
    broker = MosquittoBroker(tmp_path_factory.mktemp("fuzz-broker"), persistence=False).start()
    errors = LogWatch()
    daemon_log = logging.getLogger("agent.jobs.intake")  # the part that refuses submissions
    level = daemon_log.level
    daemon_log.setLevel(logging.INFO)
    daemon_log.addHandler(errors)
    try:
        cfg = write_daemon_config(
            tmp_path_factory.mktemp("fuzz-daemon"), broker, tiny_model, device_id=FZ,
            engine={"max_prompt_bytes": MAX_PROMPT_BYTES, "max_tokens_limit": MAX_TOKENS_LIMIT},
        )  # fmt: skip
        with BrokerClient(broker) as cloud:
            cloud.subscribe(f"edge/{FZ}/status")
            seen = JobTopics(cloud, FZ)
            # The fuzzer sends payloads with no readable job_id: each is logged at ERROR (docs/protocol.md).
            with InProcessDaemon(cfg, expect_errors=("refused a message .* with no readable job_id",)) as d:
                wait_online(cloud, FZ)
                yield FuzzTarget(d, cloud, seen, errors)
                assert d.daemon.parts.transport.connected and d._thread is not None and d._thread.is_alive()
    finally:
        daemon_log.removeHandler(errors)
        daemon_log.setLevel(level)
        broker.stop()


# --------------------------------------------------------------------------------------------
# Fuzzing


def _base_fields(**over: Any) -> dict[str, Any]:
    return {"job_id": JOB_ID, "kind": "generate", "prompt": "Hello", "max_tokens": 4, **over}


# Fixed cases that always run next to the random ones, so the coverage the test asserts (each
# refusal code a payload can earn, with and without a readable id) holds by construction, not by luck.
COVERING_CASES = [
    Case(_base_fields(), {"colour": "invalid_payload"}, unknown={"colour": "blue"}),
    Case(_base_fields(prompt="x" * (MAX_PROMPT_BYTES + 1)), {"prompt": "prompt_too_large"}),
    Case(_base_fields(max_tokens=MAX_TOKENS_LIMIT + 1), {"max_tokens": "max_tokens_too_large"}),
    Case(_base_fields(expires_at="2020-01-01T00:00:00Z"), {"expires_at": "expired"}),
    Case(_base_fields(), {}, damage=("oversize", 10)),
    Case(_base_fields(), {}, top="array"),
    Case(_base_fields(), {}, damage=("replace", b"")),
    Case(_base_fields(), {}, id_first=False, damage=("truncate", 0.5)),
    # found by the fuzzer: a key that is a lone surrogate escape must be named like any unknown key
    Case(
        _base_fields(prompt="0", max_tokens=1), {"\ud800": "invalid_payload"}, unknown={"\ud800": None}, id_first=False
    ),
]


def _covering_examples(test: Any) -> Any:
    for case in reversed(COVERING_CASES):
        test = example(case=case)(test)
    return test


def test_fuzzed_payloads_are_refused_precisely_and_the_daemon_keeps_serving(fuzz_target: FuzzTarget) -> None:
    t = fuzz_target
    tally: Counter[str] = Counter()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(case=cases())
    @_covering_examples
    def one(case: Case) -> None:
        # Unique per run, never reused: hypothesis replays and shrinks, so ids cannot come from the case.
        uid = f"fz{next(t.ids):04d}-{case.order_seed:x}"
        payload = render(case, uid)
        want = readable_job_id(payload)
        assert want in (None, uid, uid + "-x"), want  # the oracle can only find ids this test wrote
        errors_before = len(t.errors.errors())
        rows_before = sum(t.daemon.daemon.parts.store.counts().values())
        if want is not None:
            t.expected.add(want)
        t.publish(payload)
        tally["damage " + (case.damage[0] if case.damage else "none")] += 1
        if want is not None:
            code = expected_code(case, payload)
            tally["with_id"] += 1
            tally[code] += 1
            result = t.check_refused(want, code)
            msg = result["error"]["message"]
            if code == "prompt_too_large":
                assert msg.endswith(f"exceeds the limit {MAX_PROMPT_BYTES} (engine.max_prompt_bytes)"), msg
            elif code == "max_tokens_too_large":
                assert msg.endswith(f"exceeds the limit {MAX_TOKENS_LIMIT} (engine.max_tokens_limit)"), msg
            elif code == "payload_too_large":
                assert f"bytes, more than {MAX_PAYLOAD_BYTES} " in msg, msg
            elif code == "expired":
                assert msg.endswith("had passed when the job arrived"), msg
            if set(case.codes) == set(case.unknown) and not case.duplicates and case.damage is None:
                for key in list(case.unknown)[:10]:  # only unknown keys are wrong: each is named
                    assert repr(key if len(key) <= 40 else key[:40]) in msg, (key, msg)
            assert sum(t.daemon.daemon.parts.store.counts().values()) == rows_before + 1
        else:
            tally["without_id"] += 1
            t.check_unreadable(payload, errors_before)
            assert sum(t.daemon.daemon.parts.store.counts().values()) == rows_before

    one()
    # Still serving: a valid job with the same odd text the fuzzer used runs to SUCCEEDED.
    t.expected.add("after-fuzz")
    t.publish(job("after-fuzz", prompt="\u202eHello \U0001f600 \u05d0\u05d1 \u0301\ufeff", stop=["\u2028"]))
    assert t.seen.result("after-fuzz", timeout=30)["status"] == "SUCCEEDED"
    t.seen.settle()
    # Nothing anywhere else: every job topic message belongs to a refusal or the final job, exactly once each.
    assert t.seen.odd == []
    assert set(t.seen.by_job) <= t.expected
    for job_id, msgs in t.seen.by_job.items():
        assert [leaf for leaf, _ in msgs].count("result") == 1, (job_id, msgs)
    print("fuzz tally:", dict(sorted(tally.items())))
    # Both branches, and every refusal code a payload can earn, really ran (the covering cases
    # guarantee it; the random cases add to it).
    assert tally["with_id"] >= 30 and tally["without_id"] >= 15, tally
    assert all(tally[c] > 0 for c in PAYLOAD_CODES), tally
    assert t.daemon.daemon.parts.transport.connected


# --------------------------------------------------------------------------------------------
# Each refusal code a payload can cause, at its boundary, with its exact message


REFUSALS = [
    ("type", {"max_tokens": "5"}, "invalid_payload",
     "max_tokens must be an integer, got string '5' (integers are written without a fraction or quotes)"),
    ("bool-number", {"temperature": True}, "invalid_payload", "temperature must be a number, got boolean true"),
    ("unknown-key", {"temp": 0.5}, "invalid_payload",
     "unknown key(s) 'temp'; allowed keys: " + ", ".join(SUBMIT_KEYS)),
    ("prompt-bytes", {"prompt": "\u00e9" * 2049}, "prompt_too_large",  # 2049 characters, 4098 bytes
     "prompt is 4098 UTF-8 bytes, exceeds the limit 4096 (engine.max_prompt_bytes)"),
    ("max-tokens", {"max_tokens": 65}, "max_tokens_too_large",
     "max_tokens 65 exceeds the limit 64 (engine.max_tokens_limit)"),
    ("expired", {"expires_at": "2020-01-01T00:00:00Z"}, "expired",
     "expires_at 2020-01-01T00:00:00.000Z had passed when the job arrived"),
]  # fmt: skip


@pytest.mark.parametrize("name,over,code,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_code_with_its_exact_message(fuzz_target: FuzzTarget, name: str, over: dict, code: str,
                                                  message: str) -> None:  # fmt: skip
    job_id = f"refuse-{name}"
    fuzz_target.expected.add(job_id)
    fuzz_target.publish(job(job_id, **over))
    result = fuzz_target.check_refused(job_id, code)
    assert result["error"]["message"] == message


def _padded(job_id: str, size: int, *, id_first: bool = True) -> bytes:
    """A job of exactly ``size`` bytes whose prompt is the padding."""
    head, tail = (f'{{"job_id": "{job_id}", "kind": "generate", "max_tokens": 1, "prompt": "', '"}')
    if not id_first:
        head, tail = '{"kind": "generate", "max_tokens": 1, "prompt": "', f'", "job_id": "{job_id}"}}'
    payload = head.encode() + b"x" * (size - len(head) - len(tail)) + tail.encode()
    assert len(payload) == size
    return payload


def test_payload_too_large_is_refused_unparsed_and_addressed_only_when_job_id_comes_first(
    fuzz_target: FuzzTarget,
) -> None:
    t = fuzz_target
    t.expected |= {"huge-first", "huge-fits"}
    t.publish(_padded("huge-first", MAX_PAYLOAD_BYTES + 1))
    result = t.check_refused("huge-first", "payload_too_large")
    assert result["error"]["message"] == (
        f"payload is {MAX_PAYLOAD_BYTES + 1} bytes, more than {MAX_PAYLOAD_BYTES} (6 x engine.max_prompt_bytes + 64 KiB)"
    )
    # One byte less is parsed, and refused for its prompt instead.
    t.publish(_padded("huge-fits", MAX_PAYLOAD_BYTES))
    t.check_refused("huge-fits", "prompt_too_large")
    # job_id last: a payload refused unparsed has no readable id.
    late = _padded("huge-late", MAX_PAYLOAD_BYTES + 1, id_first=False)
    errors_before = len(t.errors.errors())
    t.publish(late)
    line = t.check_unreadable(late, errors_before)
    assert f"payload is {MAX_PAYLOAD_BYTES + 1} bytes" in line and t.daemon.daemon.parts.store.get("huge-late") is None


def test_limits_are_inclusive(fuzz_target: FuzzTarget) -> None:
    t = fuzz_target
    t.expected |= {"at-max-tokens", "at-prompt-bytes"}
    t.publish(job("at-max-tokens", max_tokens=MAX_TOKENS_LIMIT, temperature=0.0))
    assert t.seen.result("at-max-tokens", timeout=30)["status"] == "SUCCEEDED"
    # Exactly max_prompt_bytes passes the size check and reaches the engine, whose 512-token
    # context then refuses it: a different code, which shows how far it got.
    t.publish(job("at-prompt-bytes", prompt="\u00e9" * (MAX_PROMPT_BYTES // 2), max_tokens=1))
    result = t.seen.result("at-prompt-bytes", timeout=30)
    assert result["status"] == "REJECTED" and result["error"]["code"] == "context_too_long", result


def test_a_refused_id_stays_refused_and_is_never_run(fuzz_target: FuzzTarget) -> None:
    t = fuzz_target
    t.expected.add("refused-once")
    t.publish(job("refused-once", colour="blue"))
    first = t.check_refused("refused-once", "invalid_payload")
    # The same id again, now as a valid job: the stored outcome is sent again, unchanged.
    t.publish(job("refused-once"))
    again = t.seen.result("refused-once", n=2)
    assert again == first
    assert t.daemon.daemon.parts.store.get("refused-once").attempt == 0


@pytest.mark.parametrize(
    "payload",
    [
        b'{"job_id": "nl-1\\n", "kind": "generate", "prompt": "x", "max_tokens": 1}',  # "$" would accept it
        b'{"kind": "generate", "job_id": "ok-but-late", "prompt": "x", "max_tokens": "1"',  # undecodable, id not first
        b'{"job_id": "bad/id", "kind": "generate"}',
        b'{"job_id": "dup-a", "job_id": "dup-b", "kind": "generate", "prompt": "x", "max_tokens": 1}',
        b'[{"job_id": "in-array", "kind": "generate", "prompt": "x", "max_tokens": 1}]',
        b"\xef\xbb\xbf" + job("with-bom"),
        b"",
    ],
    ids=["trailing-newline", "late-id", "bad-id", "disagreeing-duplicates", "array", "bom", "empty"],
)
def test_payloads_without_a_readable_id_are_logged_and_never_stored(fuzz_target: FuzzTarget, payload: bytes) -> None:
    t = fuzz_target
    assert readable_job_id(payload) is None
    errors_before = len(t.errors.errors())
    rows_before = sum(t.daemon.daemon.parts.store.counts().values())
    t.publish(payload)
    t.check_unreadable(payload, errors_before)
    assert sum(t.daemon.daemon.parts.store.counts().values()) == rows_before
    # Nothing waits to be resent either: an unpublishable id in the store would stop the daemon at the next resend.
    assert [r.job_id for r in t.daemon.daemon.parts.store.undelivered()] == []


def test_readable_id_rules_on_undecodable_payloads(fuzz_target: FuzzTarget) -> None:
    """Rule 2: an undecodable payload that begins with a valid job_id is answered under that id."""
    t = fuzz_target
    cases_ = {
        "lead-nan": b'{"job_id": "lead-nan", "kind": "generate", "temperature": NaN}',
        "lead-utf8": b'{"job_id":"lead-utf8","prompt":"caf\xc3"}',
        "lead-cut": b'{"job_id" : "lead-cut" }  trailing',
        # 40 digits (a minus sign is not a digit) still decode: the object's id is read.
        "forty-digits": b'{"kind": "generate", "seed": -' + b"9" * 40 + b', "job_id": "forty-digits"}',
    }
    for job_id, payload in cases_.items():
        assert readable_job_id(payload) == job_id
        t.expected.add(job_id)
        t.publish(payload)
        t.check_refused(job_id, "invalid_payload")


# --------------------------------------------------------------------------------------------
# A flood of jobs


def test_a_flood_that_overflows_the_outgoing_queue_loses_no_result(
    broker: MosquittoBroker, tiny_model: Path, tmp_path: Path
) -> None:
    """More outcomes than the transport holds in RAM (256 + the in-flight window) while the broker
    is not acknowledging: the overflow waits in the transport's backlog, and every result must still
    arrive without waiting for a reconnect (which a full queue never causes)."""
    k = 100  # 3 messages per job (IN_PROGRESS, SUCCEEDED, result): 300 > 256 + 20
    # No heartbeat renewal of "online" during the test: the last assertion reads any status as a reconnect.
    cfg = write_daemon_config(tmp_path / "flood", broker, tiny_model, device_id="dev-flood",
                              store={"queue_max": k}, telemetry={"interval_s": 3600},
                              mqtt={"heartbeat_s": 3600})  # fmt: skip
    gated: list[GatedEngine] = []
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/dev-flood/status")
        seen = JobTopics(cloud, "dev-flood")
        with InProcessDaemon(cfg, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]) as d:
            wait_online(cloud, "dev-flood")
            ids = [f"flood-{i:03d}" for i in range(k)]
            for job_id in ids:
                cloud.publish("edge/dev-flood/jobs/submit", job(job_id, max_tokens=1))
            assert gated[0].started.wait(T)  # the first runs and holds; the others are stored behind it
            for job_id in ids:
                seen.wait_status(job_id, "QUEUED")
            os.kill(broker.pid, signal.SIGSTOP)  # the broker stops reading: nothing is acknowledged
            try:
                gated[0].gate.set()
                store = d.daemon.parts.store
                deadline = time.monotonic() + 30
                while store.counts()["SUCCEEDED"] < k:  # every outcome stored, and its publish attempted
                    assert time.monotonic() < deadline, store.counts()
                    threading.Event().wait(0.01)  # poll pacing; the loop ends on the condition
                probe = d.daemon.parts.transport.publish("edge/dev-flood/probe", b"", qos=1)
                assert not probe.done and probe.mid == 0, probe  # it did overflow: it waits behind the backlog
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            assert probe.wait(30), probe  # not refused: sent once the broker reads again
            results = {job_id: seen.result(job_id, timeout=30) for job_id in ids}
            assert all(r["status"] == "SUCCEEDED" for r in results.values())
            # Delivered over the same connection: no reconnect (that would publish "online" again) did it.
            seen.settle()
            assert d.daemon.parts.transport.connected
            assert [m.payload for m in seen.other if m.topic == "edge/dev-flood/status"] == []


# --------------------------------------------------------------------------------------------
# Mutual TLS, identity as user name, per-device ACL


def _tls(tls: TLSFiles, who: str) -> dict[str, Any]:
    c = tls.clients[who]
    return {"enabled": True, "ca_file": str(tls.ca_file), "cert_file": str(c.cert_file), "key_file": str(c.key_file)}


def test_mutual_tls_serves_the_device_and_the_acl_keeps_its_neighbour_out(
    broker_factory: Callable[..., MosquittoBroker], tls_material: TLSFiles, tiny_model: Path, tmp_path: Path
) -> None:
    b = broker_factory("tls", tls=tls_material, require_certificate=True, acl=device_acl(), allow_anonymous=False)
    cfg = write_daemon_config(tmp_path / "dev-a", b, tiny_model, device_id="dev-a",
                              mqtt={"tls": _tls(tls_material, "dev-a")})  # fmt: skip
    dev_b_settings = Settings(mqtt=b.settings("edge-cli-dev-b", tls=_tls(tls_material, "dev-b")))
    with BrokerClient(b, cert=tls_material.clients["cloud"]) as cloud, \
            BrokerClient(b, cert=tls_material.clients["dev-b"]) as snoop:  # fmt: skip
        cloud.subscribe("edge/dev-a/#")
        snoop.subscribe("edge/dev-a/#")  # mosquitto may grant it; it must deliver nothing
        with InProcessDaemon(cfg) as d:
            wait_online(cloud, "dev-a")
            # dev-b, with the project's own client, tries to hand dev-a a job: the broker refuses it.
            with JobClient(dev_b_settings, device_id="dev-a") as intruder:
                h = intruder.transport.publish("edge/dev-a/jobs/submit", job("from-dev-b"), qos=1)
                assert not h.wait(T) and "refused by the broker" in (h.error or ""), h.error
                h = intruder.transport.publish("edge/dev-a/jobs/tls-1/cancel", b"", qos=1)
                assert not h.wait(T) and "refused by the broker" in (h.error or ""), h.error
            # The cloud's job round-trips over TLS. It was sent after dev-b's was refused, so had the
            # broker passed dev-b's on, dev-a would have stored it before this one.
            cloud.publish("edge/dev-a/jobs/submit", job("tls-1"))
            result = json.loads(cloud.expect("edge/dev-a/jobs/tls-1/result", timeout=30).payload)
            assert result["status"] == "SUCCEEDED" and result["device_id"] == "dev-a"
            assert d.daemon.parts.store.get("from-dev-b") is None
            assert d.daemon.parts.store.get("tls-1").status.value == "SUCCEEDED"
            # dev-b saw none of it (status, job statuses, result): its own topics still reach it,
            # which is what the barrier travels on.
            assert [m.topic for m in snoop.barrier(prefix="edge/dev-b")] == []


# --------------------------------------------------------------------------------------------
# Password from the systemd credential; the secret stays out of logs and `config show`


def _pieces_of(secret: str, text: str, n: int = 8) -> list[str]:
    """Every ``n``-character piece of a random secret found in ``text``: a partial leak counts too."""
    return [secret[i : i + n] for i in range(len(secret) - n + 1) if secret[i : i + n] in text]


class VerboseDaemonProcess(DaemonProcess):
    """`edge-agent -vv run`: DEBUG logging, paho's packet traces included, into the log file."""

    def start(self) -> VerboseDaemonProcess:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "-vv", "run", "-c", str(self.config)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return self


def test_password_from_credentials_directory_is_used_and_never_shown(
    broker_factory: Callable[..., MosquittoBroker], tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    secret = secrets.token_urlsafe(24)
    b = broker_factory("auth", passwords={"dev-a": secret, "cloud": "cloud-pw"}, acl=device_acl(),
                       allow_anonymous=False)  # fmt: skip
    cfg = write_daemon_config(tmp_path / "dev-a", b, tiny_model, device_id="dev-a", mqtt={"username": "dev-a"})
    assert secret not in cfg.read_text()
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt_password").write_text(secret + "\n")
    monkeypatch.setenv(
        "CREDENTIALS_DIRECTORY", str(creds)
    )  # DaemonProcess passes it on (only EDGE_AGENT__* are dropped)

    shown = subprocess.run([sys.executable, "-m", "agent", "config", "show", "-c", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["mqtt"]["password"] == "********"  # loaded, and masked
    assert secret not in shown.stdout + shown.stderr

    daemon = VerboseDaemonProcess(cfg)
    with BrokerClient(b, username="cloud", password="cloud-pw") as cloud, daemon:
        cloud.subscribe("edge/dev-a/#")
        wait_online(cloud, "dev-a", timeout=60)
        cloud.publish("edge/dev-a/jobs/submit", job("auth-1"))
        result = json.loads(cloud.expect("edge/dev-a/jobs/auth-1/result", timeout=30).payload)
        assert result["status"] == "SUCCEEDED"
        assert daemon.terminate() == 0
    text = daemon.log_path.read_text(errors="replace")
    assert "agent.mqtt.transport.paho" in text and "CONNECT" in text  # packet traces were on
    assert not _pieces_of(secret, text)


def test_refused_password_is_reported_without_the_secret(
    broker_factory: Callable[..., MosquittoBroker], tiny_model: Path, tmp_path: Path,
    watch_log: Callable[..., LogWatch],
) -> None:  # fmt: skip
    # In process the password can only come from the file (InProcessDaemon ignores the environment).
    wrong = secrets.token_urlsafe(24)
    b = broker_factory("auth-wrong", passwords={"dev-a": "the-right-one"}, allow_anonymous=False)
    cfg = write_daemon_config(tmp_path / "dev-a", b, tiny_model, device_id="dev-a",
                              mqtt={"username": "dev-a", "password": wrong})  # fmt: skip
    everything = watch_log("", logging.DEBUG)  # root: every logger, paho's traces included
    with InProcessDaemon(cfg) as d:
        assert everything.wait_for(lambda rs: any(r.name == "agent.mqtt.transport" and r.levelno == logging.WARNING
                                                  and "not authorised" in r.getMessage() for r in rs)
                                   and d.daemon.parts.transport.last_error is not None)  # fmt: skip
        err = d.daemon.parts.transport.last_error
        assert err is not None and err.code == "mqtt_auth"
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in list(everything.records))
    assert "agent.mqtt.transport.paho" in {r.name for r in everything.records}  # packet traces were captured
    assert not _pieces_of(wrong, text + str(err))
