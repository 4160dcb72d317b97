"""The wire format: parse_submit's refusals and their messages, outbound payloads, topics, the doc."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.jobs.protocol import (
    JOB_ID_PATTERN,
    SUBMIT_KEYS,
    TERMINAL,
    DeviceStatus,
    ErrorCode,
    ErrorInfo,
    InvalidJob,
    JobStatus,
    JobSubmit,
    ResultMessage,
    StatusMessage,
    StreamChunk,
    Timings,
    Usage,
    json_schemas,
    max_payload_bytes,
    parse_submit,
    rfc3339,
)
from agent.mqtt.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_prompt_bytes": 1000, "max_tokens_limit": 1024}
ID_RE = re.compile(JOB_ID_PATTERN)


def parse(payload: Any, **kw: Any) -> JobSubmit:
    if not isinstance(payload, (bytes, bytearray)):
        payload = json.dumps(payload).encode()
    return parse_submit(payload, **{**LIMITS, **kw})


def refused(payload: Any, **kw: Any) -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        parse(payload, **kw)
    return info.value


def job(**over: Any) -> dict[str, Any]:
    return {"job_id": "j-1", "kind": "generate", "prompt": "Hello", "max_tokens": 16, **over}


# ---------------------------------------------------------------------------------------------
# Accepting


def test_minimal_job_gets_documented_defaults() -> None:
    j = parse(job())
    assert (j.job_id, j.kind, j.prompt, j.max_tokens) == ("j-1", "generate", "Hello", 16)
    assert (j.temperature, j.top_p, j.seed, j.stop, j.stream, j.priority) == (0.8, 0.95, None, [], False, 0)
    assert j.expires_at is None and j.timeout_s is None


def test_full_job_round_trips_through_to_payload() -> None:
    full = job(
        temperature=0, top_p=0.5, seed=42, stop=["\n\n", "END"], stream=True, priority=-100,
        expires_at="2030-01-02T03:04:05.678+02:00", timeout_s=1.5,
    )  # fmt: skip
    j = parse(full)
    assert j.temperature == 0.0 and isinstance(j.temperature, float)  # an integer is a valid number
    assert j.expires_at == datetime(2030, 1, 2, 1, 4, 5, 678000, tzinfo=UTC)
    again = parse(j.to_payload())
    assert again == j
    assert json.loads(j.to_payload())["expires_at"] == "2030-01-02T01:04:05.678Z"


def test_limits_are_inclusive() -> None:
    j = parse(job(prompt="é" * 500, max_tokens=1024))  # exactly 1000 bytes
    assert len(j.prompt.encode()) == 1000


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-01T00:00:00Z",
        "2030-01-01t00:00:00z",
        "2030-01-01 00:00:00+00:00",
        "2030-01-01T00:00:00.123456789-05:30",
    ],
)
def test_expires_at_accepts_rfc3339_spellings(value: str) -> None:
    assert parse(job(expires_at=value)).expires_at is not None


def test_topic_job_id_fills_in_and_must_agree() -> None:
    payload = job()
    del payload["job_id"]
    assert parse(payload, topic_job_id="from-topic").job_id == "from-topic"
    e = refused(job(job_id="other"), topic_job_id="from-topic")
    assert e.job_id == "from-topic"
    assert e.message == "job_id 'other' does not match the job id in the topic 'from-topic'"
    e = refused(job(), topic_job_id="bad/id")
    assert e.job_id is None and "the job id in the topic, 'bad/id'" in e.message


def test_bytearray_and_memoryview_payloads() -> None:
    raw = json.dumps(job()).encode()
    assert parse_submit(bytearray(raw), **LIMITS).job_id == "j-1"
    assert parse_submit(memoryview(raw), **LIMITS).job_id == "j-1"


# ---------------------------------------------------------------------------------------------
# Refusing: the code, the exact message, and the id to report it under


@pytest.mark.parametrize(
    ("over", "code", "message"),
    [
        (
            {"max_tokens": 5000},
            "max_tokens_too_large",
            "max_tokens 5000 exceeds the limit 1024 (engine.max_tokens_limit)",
        ),
        (
            {"prompt": "x" * 1001},
            "prompt_too_large",
            "prompt is 1001 UTF-8 bytes, exceeds the limit 1000 (engine.max_prompt_bytes)",
        ),
        (
            {"prompt": "é" * 501},
            "prompt_too_large",
            "prompt is 1002 UTF-8 bytes, exceeds the limit 1000 (engine.max_prompt_bytes)",
        ),
        (
            {"max_tokens": 200000},
            "max_tokens_too_large",
            "max_tokens 200000 exceeds the limit 1024 (engine.max_tokens_limit)",
        ),
        ({"prompt": ""}, "invalid_payload", "prompt must not be empty"),
        (
            {"max_tokens": "5"},
            "invalid_payload",
            "max_tokens must be an integer, got string '5' (integers are written without a fraction or quotes)",
        ),
        (
            {"max_tokens": 5.0},
            "invalid_payload",
            "max_tokens must be an integer, got number 5.0 (integers are written without a fraction or quotes)",
        ),
        (
            {"max_tokens": True},
            "invalid_payload",
            "max_tokens must be an integer, got boolean true (integers are written without a fraction or quotes)",
        ),
        ({"max_tokens": 0}, "invalid_payload", "max_tokens 0 is below the minimum 1"),
        ({"temperature": True}, "invalid_payload", "temperature must be a number, got boolean true"),
        ({"temperature": "0.5"}, "invalid_payload", "temperature must be a number, got string '0.5'"),
        ({"temperature": 2.5}, "invalid_payload", "temperature 2.5 exceeds the maximum 2"),
        ({"temperature": -0.1}, "invalid_payload", "temperature -0.1 is below the minimum 0"),
        ({"top_p": 0}, "invalid_payload", "top_p must be greater than 0, got 0"),
        ({"top_p": 1.01}, "invalid_payload", "top_p 1.01 exceeds the maximum 1"),
        ({"seed": -1}, "invalid_payload", "seed -1 is below the minimum 0"),
        ({"seed": 2**32 - 1}, "invalid_payload", "seed 4294967295 exceeds the maximum 4294967294"),
        ({"stop": "END"}, "invalid_payload", "stop must be an array, got string 'END'"),
        ({"stop": ["a"] * 9}, "invalid_payload", "stop has 9 entries, more than the maximum 8"),
        ({"stop": ["ok", ""]}, "invalid_payload", "stop[1] must not be empty"),
        ({"stop": ["x" * 65]}, "invalid_payload", "stop[0] is 65 characters, more than the maximum 64"),
        ({"stop": [1]}, "invalid_payload", "stop[0] must be a string, got integer 1"),
        ({"stream": 1}, "invalid_payload", "stream must be true or false, got integer 1"),
        ({"priority": 101}, "invalid_payload", "priority 101 exceeds the maximum 100"),
        (
            {"priority": 1.5},
            "invalid_payload",
            "priority must be an integer, got number 1.5 (integers are written without a fraction or quotes)",
        ),
        ({"timeout_s": 0}, "invalid_payload", "timeout_s must be greater than 0, got 0"),
        ({"timeout_s": 86401}, "invalid_payload", "timeout_s 86401 exceeds the maximum 86400"),
        ({"kind": "chats"}, "invalid_payload", "kind must be one of 'generate' or 'chat', got string 'chats'"),
        (
            {"kind": "chat"},
            "invalid_payload",
            "kind 'chat' needs 'messages'; 'prompt' is not allowed with kind 'chat' (put the text in a user message)",
        ),
        (
            {"job_id": "has space"},
            "invalid_payload",
            "job_id must be 1-64 characters from A-Z a-z 0-9 _ -, got string 'has space'",
        ),
        (
            {"job_id": "x" * 65},
            "invalid_payload",
            "job_id must be 1-64 characters from A-Z a-z 0-9 _ -, got string 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (65 characters)",
        ),
        ({"job_id": 7}, "invalid_payload", "job_id must be a string, got integer 7"),
        (
            {"expires_at": "2030-01-01T00:00:00"},
            "invalid_payload",
            "expires_at has no UTC offset; add Z or +hh:mm, got string '2030-01-01T00:00:00'",
        ),
        (
            {"expires_at": 1893456000},
            "invalid_payload",
            "expires_at must be an RFC 3339 timestamp string, got integer 1893456000",
        ),
        (
            {"expires_at": "tomorrow"},
            "invalid_payload",
            "expires_at is not an RFC 3339 timestamp, got string 'tomorrow'",
        ),
        (
            {"expires_at": "2030-02-30T00:00:00Z"},
            "invalid_payload",
            "expires_at is not a real date and time, got string '2030-02-30T00:00:00Z'",
        ),
        ({"prompt": "a\x00b"}, "invalid_payload", "prompt contains a NUL character (U+0000) at character 1"),
        (
            {"prompt": "ab\ud800"},
            "invalid_payload",
            "prompt contains an unpaired UTF-16 surrogate (\\ud800) at character 2",
        ),
        ({"stop": ["\x00"]}, "invalid_payload", "stop[0] contains a NUL character (U+0000) at character 0"),
    ],
)
def test_field_refusals(over: dict[str, Any], code: str, message: str) -> None:
    e = refused(job(**over))
    assert (e.code, e.message, e.job_id) == (ErrorCode(code), message, "j-1" if "job_id" not in over else None)


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    e = refused(job(temp=0.5, Prompt="x"))
    assert e.code is ErrorCode.invalid_payload and e.job_id == "j-1"
    assert e.message == "unknown key(s) 'temp', 'Prompt'; allowed keys: " + ", ".join(SUBMIT_KEYS)


def test_missing_fields_are_named() -> None:
    e = refused({"job_id": "j-2"})
    assert e.message == (
        "missing required field 'kind'; missing required field 'max_tokens'; "
        "the job needs 'prompt' (kind 'generate') or 'messages' (kind 'chat')"
    )
    assert e.job_id == "j-2"


def test_several_problems_are_all_listed_under_invalid_payload() -> None:
    e = refused(job(prompt="x" * 2000, max_tokens=5000))
    assert e.code is ErrorCode.invalid_payload
    assert "prompt is 2000 UTF-8 bytes" in e.message and "max_tokens 5000 exceeds" in e.message
    e = refused(job(prompt="x" * 2000, extra=1))
    assert e.code is ErrorCode.invalid_payload


@pytest.mark.parametrize(
    ("payload", "message", "job_id"),
    [
        (b"", "payload is empty; expected a JSON object", None),
        (b" \n", "payload is empty; expected a JSON object", None),
        (b"[1, 2]", "payload must be a JSON object, got an array", None),
        (b'"job"', "payload must be a JSON object, got string 'job'", None),
        (b"null", "payload must be a JSON object, got null", None),
        (b"{", "payload is not valid JSON: Expecting property name enclosed in double quotes at offset 1", None),
        (
            b'{"job_id": "j-9", ',
            "payload is not valid JSON: Expecting property name enclosed in double quotes at offset 18",
            "j-9",
        ),
        (b'{"job_id":"j-9","max_tokens":NaN}', "payload contains NaN; JSON numbers must be finite", "j-9"),
        (b'{"job_id":"j-9","max_tokens":-Infinity}', "payload contains -Infinity; JSON numbers must be finite", "j-9"),
        (b'{"job_id":"j-9","temperature":1e999}', "number 1e999 is out of range", "j-9"),
        (b'{"job_id":"j-9","max_tokens":' + b"9" * 5000 + b"}", "integer with 5000 digits is out of range", "j-9"),
        (b'{"job_id":"j-9","prompt":"\xff"}', "payload is not valid UTF-8: byte 0xff at offset 26", "j-9"),
        (b'{"prompt":"\xc3","job_id":"j-9"}', "payload is not valid UTF-8: byte 0xc3 at offset 11", None),
        (b"\xef\xbb\xbf{}", "payload starts with a byte-order mark; send plain UTF-8 JSON", None),
        (b'{"job_id":"j-9","a":1,"a":2}', "duplicate key(s) 'a'; each key may appear only once", "j-9"),
        (b'{"job_id":"j-9","job_id":"j-9"}', "duplicate key(s) 'job_id'; each key may appear only once", "j-9"),
        (b'{"job_id":"j-9","job_id":"j-8"}', "duplicate key(s) 'job_id'; each key may appear only once", None),
        (b'{"job_id":"j-9","x":' + b"[" * 30000 + b"]" * 30000 + b"}", "payload is nested too deeply", "j-9"),
    ],
)
def test_document_refusals(payload: bytes, message: str, job_id: str | None) -> None:
    e = refused(payload)
    assert (e.code, e.message, e.job_id) == (ErrorCode.invalid_payload, message, job_id)


def test_oversized_payload_is_refused_unparsed_but_still_addressed() -> None:
    cap = max_payload_bytes(LIMITS["max_prompt_bytes"])
    assert cap == 6 * 1000 + 65536
    big = b'{"job_id": "big-1", "prompt": "' + b"x" * cap + b'"}'
    e = refused(big)
    assert e.code is ErrorCode.payload_too_large and e.job_id == "big-1"
    assert e.message == f"payload is {len(big)} bytes, more than {cap} (6 x engine.max_prompt_bytes + 64 KiB)"
    assert refused(b'{"prompt": "' + b"x" * cap + b'", "job_id": "big-1"}').job_id is None


def test_worst_case_escaped_prompt_within_its_limit_is_not_refused_as_payload() -> None:
    prompt = "\x01" * 1000  # 1000 bytes of text, 6000 bytes as JSON escapes
    assert parse(job(prompt=prompt)).prompt == prompt


def test_invalid_job_is_the_only_exception_even_for_odd_argument_types() -> None:
    e = refused(12345)  # type: ignore[arg-type]  (json.dumps -> b"12345": a number, not an object)
    assert e.message == "payload must be a JSON object, got integer 12345"
    with pytest.raises(InvalidJob, match="payload must be bytes, got int"):
        parse_submit(12345, **LIMITS)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Fuzzing: parse_submit returns a JobSubmit or raises InvalidJob, and recovers the right id

odd_text = st.text(
    alphabet=st.characters(exclude_categories=(), include_characters="\x00\ud800\udfff\ufeff\u2028"), max_size=40
)
ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z") | odd_text
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | odd_text
)  # fmt: skip
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(odd_text, c, max_size=4), max_leaves=12
)
field_values = {
    "job_id": ids,
    "kind": st.sampled_from(["generate", "chat"]) | json_values,
    "prompt": odd_text | st.text(min_size=900, max_size=1200) | json_values,
    "max_tokens": st.integers(-5, 3000) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(0, 1.5) | json_values,
    "seed": st.none() | st.integers(-1, 2**33) | json_values,
    "stop": st.lists(odd_text, max_size=10) | json_values,
    "stream": st.booleans() | json_values,
    "priority": st.integers(-150, 150) | json_values,
    "expires_at": st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()) | json_values,
    "timeout_s": st.floats(-1, 90000) | json_values,
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "bot"]) | json_values,
                "content": odd_text | json_values,
            }
        ),
        max_size=3,
    )
    | json_values,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["json_object", "json_schema", "xml"]) | json_values}, optional={"schema": json_values}
    )
    | json_values,
}
random_submits = st.fixed_dictionaries({}, optional={**field_values, "extra": json_values, "": json_values})
# Mostly-valid jobs with the occasional bad field, so the fuzzer also reaches the accepting path
# and the size limits, not only the first refusal.
valid_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
near_valid_submits = st.fixed_dictionaries(
    {
        "job_id": valid_ids,
        "kind": st.just("generate"),
        "prompt": odd_text.filter(bool) | st.text(min_size=300, max_size=400),
        "max_tokens": st.integers(1, 1100),
    },
    optional={
        "temperature": st.floats(0, 2.2),
        "top_p": st.floats(0, 1),
        "seed": st.none() | st.integers(0, 2**32),
        "stop": st.lists(odd_text, max_size=9),
        "stream": st.booleans(),
        "priority": st.integers(-110, 110),
        "expires_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
        "timeout_s": st.none() | st.floats(0, 90000),
    },
)
near_valid_chats = st.fixed_dictionaries(
    {
        "job_id": valid_ids,
        "kind": st.just("chat"),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": odd_text}),
            min_size=0, max_size=4,
        ),
        "max_tokens": st.integers(1, 1100),
    },
    optional={
        "response_format": st.just({"type": "json_object"})
        | st.fixed_dictionaries({"type": st.just("json_schema"), "schema": st.dictionaries(odd_text, json_values, max_size=3)}),
        "prompt": odd_text,
    },
)  # fmt: skip
submits = random_submits | near_valid_submits | near_valid_chats


def expected_id(d: Any) -> str | None:
    v = d.get("job_id") if isinstance(d, dict) else None
    return v if isinstance(v, str) and ID_RE.match(v) else None


def check_contract(payload: bytes) -> JobSubmit | InvalidJob:
    try:
        return parse_submit(payload, max_prompt_bytes=1000, max_tokens_limit=1024)
    except InvalidJob as e:
        assert isinstance(e.code, ErrorCode) and e.code.status is JobStatus.REJECTED
        assert "internal error" not in e.message, e.message
        e.message.encode("utf-8")  # always publishable
        assert e.job_id is None or (ID_RE.match(e.job_id) and e.job_id.encode() in payload)
        return e


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(submits, st.booleans())
def test_fuzz_job_objects(d: dict[str, Any], ascii_only: bool) -> None:
    if ascii_only:
        payload = json.dumps(d).encode()
    else:
        payload = json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")
    out = check_contract(payload)
    decodable = ascii_only or not any("\ud800" <= c <= "\udfff" for c in json.dumps(d, ensure_ascii=False))
    if isinstance(out, JobSubmit):
        assert out.job_id == d["job_id"] == expected_id(d)
        assert 1 <= out.max_tokens <= 1024
        if out.kind == "generate":
            assert out.messages is None and len(out.prompt.encode()) <= 1000
        else:
            assert out.kind == "chat" and out.prompt is None and out.messages
            assert sum(len(m.content.encode()) for m in out.messages) <= 1000
    elif decodable:
        assert out.job_id == expected_id(d)
    else:  # lone surrogates written raw: invalid UTF-8, only a leading job_id is trusted
        assert out.job_id == (expected_id(d) if payload.startswith(b'{"job_id": "') else None)


@settings(max_examples=300, deadline=None)
@given(json_values | st.floats() | st.dictionaries(odd_text, json_values | st.floats()))
def test_fuzz_any_json(value: Any) -> None:
    out = check_contract(json.dumps(value).encode())
    if isinstance(out, InvalidJob) and isinstance(value, dict):
        text = json.dumps(value)
        if "NaN" not in text and "Infinity" not in text:
            assert out.job_id == expected_id(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
@example(b'{"job_id":"a"')
@example(b'{"job_id":"a"}')
@example(b"\x00")
def test_fuzz_bytes(payload: bytes) -> None:
    check_contract(payload)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_corrupted_valid_payloads(data: st.DataObject) -> None:
    payload = bytearray(json.dumps(job(stop=["a"], temperature=0.1)).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload)))
        payload[pos:pos + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))  # fmt: skip
    out = check_contract(bytes(payload))
    if isinstance(out, InvalidJob) and out.job_id is not None:
        assert out.job_id.encode() in payload


def test_huge_strings_of_odd_unicode() -> None:
    for text in ["\ud83d\ude00" * 300, "\u0301" * 2000, "\U0010ffff" * 251, "\u2028\u2029" * 100]:
        out = check_contract(json.dumps(job(prompt=text), ensure_ascii=False).encode("utf-8", "surrogatepass"))
        assert isinstance(out, (JobSubmit, InvalidJob))


# ---------------------------------------------------------------------------------------------
# Outbound messages


def test_status_message_payload_is_compact_and_leaves_out_nulls() -> None:
    msg = StatusMessage(job_id="j-1", device_id="pi-1", status=JobStatus.QUEUED, attempt=0, ts=1714564800.25)
    assert msg.to_payload() == (
        b'{"job_id":"j-1","device_id":"pi-1","status":"QUEUED","attempt":0,"ts":"2024-05-01T12:00:00.250Z"}'
    )
    msg = StatusMessage(
        job_id="j-1", device_id="pi-1", status="REJECTED", attempt=0, ts="2024-05-01T14:00:00+02:00",
        reason="queue_full", message="full",
    )  # fmt: skip
    assert json.loads(msg.to_payload()) == {
        "job_id": "j-1", "device_id": "pi-1", "status": "REJECTED", "attempt": 0, "ts": "2024-05-01T12:00:00.000Z",
        "reason": "queue_full", "message": "full",
    }  # fmt: skip


def test_result_message_always_has_every_key() -> None:
    ok = ResultMessage(
        job_id="j-1", device_id="pi-1", status="SUCCEEDED", attempt=1, ts=0, text="Hi", finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        timings=Timings(queue_ms=1, prompt_ms=2.5, generation_ms=3, tokens_per_s=float("inf")),
    )  # fmt: skip
    data = json.loads(ok.to_payload())
    assert data["error"] is None and data["ts"] == "1970-01-01T00:00:00.000Z"
    assert data["timings"] == {
        "queue_ms": 1.0, "slot_wait_ms": None, "first_token_ms": None, "slots_in_use": None, "prompt_ms": 2.5,
        "generation_ms": 3.0, "tokens_per_s": None,
    }  # fmt: skip
    bad = ResultMessage(
        job_id="j-1", device_id="pi-1", status="REJECTED", attempt=0, ts=0,
        error=ErrorInfo(code=ErrorCode.queue_full, message="64 waiting"),
    )  # fmt: skip
    assert json.loads(bad.to_payload()) == {
        "job_id": "j-1", "device_id": "pi-1", "status": "REJECTED", "attempt": 0, "ts": "1970-01-01T00:00:00.000Z",
        "text": None, "finish_reason": None, "usage": None, "timings": None,
        "error": {"code": "queue_full", "message": "64 waiting"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("status", "error", "why"),
    [
        ("QUEUED", None, "an outcome needs a terminal status"),
        ("SUCCEEDED", {"code": "engine_error", "message": "x"}, "error must be null exactly when status is SUCCEEDED"),
        ("FAILED", None, "error must be null exactly when status is SUCCEEDED"),
    ],
)
def test_result_message_enforces_one_consistent_outcome(status: str, error: Any, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        ResultMessage(job_id="j-1", device_id="d", status=status, attempt=0, ts=0, error=error)


def test_outbound_text_with_lone_surrogates_still_encodes() -> None:
    r = ResultMessage(job_id="j", device_id="d", status="CANCELED", attempt=1, ts=0, text="ab\udc80",
                      error={"code": "canceled", "message": "x\ud800"})  # fmt: skip
    data = json.loads(r.to_payload())
    assert data["text"] == "ab\ufffd" and data["error"]["message"] == "x\ufffd"
    assert json.loads(StreamChunk(job_id="j", index=0, text="\ud800").to_payload())["text"] == "\ufffd"


def test_stream_chunk_and_device_status() -> None:
    assert StreamChunk(job_id="j", index=3, text=" world").to_payload() == b'{"job_id":"j","index":3,"text":" world"}'
    assert DeviceStatus(state="offline", device_id="pi-1", ts=0).to_payload() == (
        b'{"state":"offline","device_id":"pi-1","ts":"1970-01-01T00:00:00.000Z"}'
    )
    with pytest.raises(ValidationError):
        DeviceStatus(state="sleeping", device_id="pi-1", ts=0)
    with pytest.raises(ValidationError):  # naive times are ambiguous on the wire
        DeviceStatus(state="online", device_id="pi-1", ts=datetime(2024, 1, 1))


def test_rfc3339_rounds_to_milliseconds_in_utc() -> None:
    assert rfc3339(1714564800.1239) == "2024-05-01T12:00:00.123Z"


# ---------------------------------------------------------------------------------------------
# Statuses and codes


def test_statuses_and_terminal_set() -> None:
    assert [s.value for s in JobStatus] == [
        "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "RELEASED"
    ]  # fmt: skip
    # RELEASED is a fleet job's status on a board that let go of it: no result there, not terminal.
    assert TERMINAL == set(JobStatus) - {JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.RELEASED}
    assert str(JobStatus.QUEUED) == "QUEUED" and JobStatus("FAILED") is JobStatus.FAILED


def test_every_error_code_is_documented_and_terminal() -> None:
    for code in ErrorCode:
        assert code.doc and code.status in TERMINAL and str(code) == code.value
    # The daemon maps agent.errors codes onto these by name.
    for name in ("context_too_long", "will_not_fit", "engine_error", "queue_full", "expired", "interrupted",
                 "timeout", "canceled", "invalid_payload", "model_not_loaded"):  # fmt: skip
        assert ErrorCode(name).value == name
    rejected = {c.value for c in ErrorCode if c.status is JobStatus.REJECTED}
    assert {"invalid_payload", "queue_full", "context_too_long", "will_not_fit", "expired"} <= rejected


def test_engine_errors_carry_a_protocol_code() -> None:
    from agent import errors

    for cls in (errors.EngineError, errors.WillNotFit, errors.ContextTooLong):
        assert isinstance(cls.code, ErrorCode)
        assert isinstance(cls("x").code, ErrorCode)
    assert errors.EngineError("x", code=ErrorCode.prompt_too_large).code is ErrorCode.prompt_too_large
    assert errors.WillNotFit("x").code.status is JobStatus.REJECTED


# ---------------------------------------------------------------------------------------------
# Topics


def test_topic_names() -> None:
    t = Topics("edge", "pi-1")
    assert t.root == "edge/pi-1"
    assert t.submit == "edge/pi-1/jobs/submit"
    assert t.cancel_filter == "edge/pi-1/jobs/+/cancel"
    assert t.cancel("j-1") == "edge/pi-1/jobs/j-1/cancel"
    assert t.status("j-1") == "edge/pi-1/jobs/j-1/status"
    assert t.result("j-1") == "edge/pi-1/jobs/j-1/result"
    assert t.stream("j-1") == "edge/pi-1/jobs/j-1/stream"
    assert t.device_status == "edge/pi-1/status"
    assert t.fleet_submit("kitchen") == "$share/kitchen/edge/fleet/jobs/submit"
    assert t.fleet_publish == "edge/fleet/jobs/submit"
    assert (t.result_filter, t.status_filter, t.stream_filter) == (
        "edge/pi-1/jobs/+/result", "edge/pi-1/jobs/+/status", "edge/pi-1/jobs/+/stream"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("topic", "job_id"),
    [
        ("edge/pi-1/jobs/j-1/cancel", "j-1"),
        ("edge/pi-1/jobs/j-1/result", None),
        ("edge/pi-2/jobs/j-1/cancel", None),
        ("edge/pi-1/jobs/a/b/cancel", None),
        ("edge/pi-1/jobs//cancel", None),
        ("edge/pi-1/jobs/cancel", None),
        ("edge/pi-1/jobs/submit", None),
        ("xedge/pi-1/jobs/j-1/cancel", None),
    ],
)
def test_job_id_from_cancel_topic(topic: str, job_id: str | None) -> None:
    assert Topics("edge", "pi-1").job_id_from_cancel_topic(topic) == job_id


@pytest.mark.parametrize(
    ("prefix", "device"), [("ed/ge", "pi"), ("edge", "pi+"), ("", "pi"), ("edge", "#"), ("$SYS", "pi")]
)
def test_topics_refuse_ids_that_would_change_what_is_matched(prefix: str, device: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix, device)
    with pytest.raises(ValueError):
        Topics("edge", "pi").result("a/b")


# ---------------------------------------------------------------------------------------------
# Chat jobs and structured output


def chat(**over: Any) -> dict[str, Any]:
    base = {"job_id": "c-1", "kind": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
    return {**base, **over}


def test_chat_job_with_a_schema_round_trips_through_the_payload_and_the_store_dump() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "é\n"},
        {"role": "assistant", "content": ""},
    ]
    j = parse(chat(messages=msgs, response_format={"type": "json_schema", "schema": schema}))
    assert j.kind == "chat" and j.prompt is None and [m.role for m in j.messages] == ["system", "user", "assistant"]
    assert j.response_format.type == "json_schema" and j.response_format.json_schema == schema
    assert parse(j.to_payload()) == j
    wire = json.loads(j.to_payload())
    assert wire["response_format"] == {"type": "json_schema", "schema": schema} and "prompt" not in wire
    # The store keeps model_dump(mode="json") and validates it again when the job runs.
    assert JobSubmit.model_validate(j.model_dump(mode="json")) == j
    g = parse(job(response_format={"type": "json_object"}))
    assert g.response_format.type == "json_object" and g.response_format.json_schema is None


def test_engine_request_from_a_chat_job() -> None:
    from agent.engine.types import ChatMessage, GenerationRequest, ResponseFormat

    j = parse(
        chat(
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "schema": {"type": "integer"}},
        )
    )
    req = GenerationRequest.from_job(j)
    assert req.is_chat and req.messages == (ChatMessage("user", "Hi"),) and req.prompt == ""
    assert req.response_format == ResponseFormat("json_schema", {"type": "integer"})
    assert not GenerationRequest.from_job(parse(job())).is_chat


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (chat(prompt="Hi"), "invalid_payload", "'prompt' is not allowed with kind 'chat' (put the text in a user message)"),
        (job(messages=[{"role": "user", "content": "Hi"}]), "invalid_payload", "'messages' is only allowed with kind 'chat'"),
        ({**chat(), "messages": None}, "invalid_payload", "kind 'chat' needs 'messages'"),
        ({**job(), "prompt": None}, "invalid_payload", "kind 'generate' needs 'prompt'"),
        (chat(messages=[]), "invalid_payload", "messages must have at least 1 entry"),
        (chat(messages=[{"role": "user", "content": "x"}] * 257), "invalid_payload", "messages has 257 entries, more than the maximum 256"),
        (chat(messages="Hi"), "invalid_payload", "messages must be an array, got string 'Hi'"),
        (chat(messages=["Hi"]), "invalid_payload", "messages[0] must be an object, got string 'Hi'"),
        (chat(messages=[{"role": "bot", "content": "x"}]), "invalid_payload",
         "messages[0].role must be one of 'system', 'user' or 'assistant', got string 'bot'"),
        (chat(messages=[{"role": "user"}]), "invalid_payload", "missing required field 'messages[0].content'"),
        (chat(messages=[{"role": "user", "content": "x", "name": "bob"}]), "invalid_payload",
         "messages[0] has an unknown key 'name'; allowed keys: role, content"),
        (chat(messages=[{"role": "user", "content": 5}]), "invalid_payload", "messages[0].content must be a string, got integer 5"),
        (chat(messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": "a\x00"}]), "invalid_payload",
         "messages[1].content contains a NUL character (U+0000) at character 1"),
        (chat(messages=[{"role": "user", "content": "a\ud800"}]), "invalid_payload",
         "messages[0].content contains an unpaired UTF-16 surrogate (\\ud800) at character 1"),
        (chat(messages=[{"role": "system", "content": "x" * 600}, {"role": "user", "content": "é" * 201}]), "prompt_too_large",
         "messages hold 1002 UTF-8 bytes of content, exceeds the limit 1000 (engine.max_prompt_bytes)"),
        (job(response_format="json"), "invalid_payload", "response_format must be an object, got string 'json'"),
        (job(response_format={"type": "xml"}), "invalid_payload",
         "response_format.type must be one of 'json_object' or 'json_schema', got string 'xml'"),
        (job(response_format={}), "invalid_payload", "missing required field 'response_format.type'"),
        (job(response_format={"type": "json_schema"}), "invalid_payload",
         "response_format.schema is required when response_format.type is 'json_schema'"),
        (job(response_format={"type": "json_object", "schema": {}}), "invalid_payload",
         "response_format.schema is only allowed with type 'json_schema' (json_object means any JSON object)"),
        (job(response_format={"type": "json_schema", "schema": []}), "invalid_payload",
         "response_format.schema must be an object, got an array"),
        (job(response_format={"type": "json_schema", "json_schema": {}}), "invalid_payload",
         "response_format has an unknown key 'json_schema'; allowed keys: type, schema"),
        (job(response_format={"type": "json_schema", "schema": {"enum": ["a\x00"]}}), "invalid_payload",
         "response_format.schema at /enum/0 contains a NUL character (U+0000) at character 1"),
        (job(response_format={"type": "json_schema", "schema": {"description": "x" * 33000}}), "invalid_payload",
         "response_format.schema is 33018 bytes of JSON, more than 32768"),
        (job(response_format={"type": "json_schema", "schema": json.loads('{"items":' * 33 + "{}" + "}" * 33)}), "invalid_payload",
         "response_format.schema is nested more than 32 levels deep (at /items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items/items)"),
    ],
)  # fmt: skip
def test_chat_and_response_format_refusals(payload: dict[str, Any], code: str, message: str) -> None:
    e = refused(payload)
    assert (e.code, e.message) == (ErrorCode(code), message)
    assert e.job_id == payload["job_id"]


def test_new_codes_carry_their_status() -> None:
    assert ErrorCode.no_chat_template.status is JobStatus.REJECTED
    assert ErrorCode.invalid_schema.status is JobStatus.REJECTED
    assert ErrorCode.output_truncated.status is JobStatus.FAILED


def test_job_schema_says_which_text_field_each_kind_needs() -> None:
    import jsonschema

    schema = json_schemas()["JobSubmit"]
    ok = [job(), chat(), chat(response_format={"type": "json_schema", "schema": {"type": "integer"}})]
    bad = [
        chat(prompt="x"),
        job(messages=[{"role": "user", "content": "x"}]),
        {**job(), "kind": "chat"},
        {k: v for k, v in job().items() if k != "prompt"},
    ]
    v = jsonschema.Draft202012Validator(schema)
    assert [v.is_valid(p) for p in ok] == [True, True, True]
    assert [v.is_valid(p) for p in bad] == [False, False, False, False]
    # ... and agrees with the parser on each.
    for p in bad:
        refused(p)


def test_usage_reports_cached_prompt_tokens_with_a_default() -> None:
    assert Usage(prompt_tokens=5, completion_tokens=1).prompt_tokens_cached == 0  # results stored before it existed
    assert "prompt_tokens_cached" in json_schemas()["ResultMessage"]["$defs"]["Usage"]["required"]


# ---------------------------------------------------------------------------------------------
# The document


def test_json_schemas_cover_every_payload() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"JobSubmit", "StatusMessage", "ResultMessage", "StreamChunk", "DeviceStatus"}
    sub = schemas["JobSubmit"]
    assert sub["additionalProperties"] is False
    assert sub["required"] == ["job_id", "kind", "max_tokens"]  # prompt or messages: by kind, in allOf
    assert schemas["ResultMessage"]["required"] == [
        "job_id", "device_id", "attempt", "ts", "status", "text", "finish_reason", "usage", "timings", "error"
    ]  # fmt: skip
    assert "reason" not in schemas["StatusMessage"]["required"]


def test_protocol_doc_is_up_to_date() -> None:
    from agent.ops import protocol_doc as gen

    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert gen.render(doc) == doc, "docs/protocol.md is out of date: run python -m agent.ops.protocol_doc"
    for name, schema in json_schemas().items():
        assert json.dumps(schema, indent=2, ensure_ascii=False) in doc, name


def test_a_key_that_is_not_valid_unicode_is_named_as_an_unknown_key() -> None:
    payload = json.dumps({"job_id": "a", "kind": "generate", "prompt": "0", "max_tokens": 1, "\ud800": None}).encode()
    with pytest.raises(InvalidJob) as e:
        parse_submit(payload, max_prompt_bytes=100, max_tokens_limit=10)
    assert e.value.code is ErrorCode.invalid_payload and e.value.job_id == "a"
    assert e.value.message.startswith("unknown key(s) '\\ud800'; allowed keys: job_id, kind")
