"""The MQTT job protocol: topic names, payload models, job statuses and error codes.

This module owns the wire format and nothing else: it does no I/O and knows nothing of the
broker, the store or the engine. Inbound payloads (job submissions) are parsed by
``parse_submit``, which turns every possible defect into one exception type, ``InvalidJob``.
Outbound payloads are built from pydantic models whose ``to_payload()`` gives compact UTF-8
JSON. The same models feed the JSON Schemas and tables in docs/protocol.md
(``agent/ops/protocol_doc.py``), so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from agent.codes import TERMINAL, ErrorCode, JobStatus, WaitReason
from agent.mqtt.wire import ID_PATTERN as JOB_ID_PATTERN
from agent.mqtt.wire import (
    ID_RE,
    RFC3339_RE,
    SURROGATE_RE,
    TIMESTAMP,
    JSONObject,
    Outbound,
    Refuse,
    bound,
    decoder,
    describe,
    format_dt,
    rfc3339,
    show,
)

# JOB_ID_PATTERN is for pydantic, whose "$" is the end of the string. Python's "$" also matches
# before a final "\n", so the Python checks anchor with \Z: "abc\n" must not pass here and then
# fail in the outbound models (or end up in a topic name).

# Static ceilings that hold whatever the configuration says; the configured (smaller) limits
# are passed to parse_submit. 131072 matches EngineSettings.max_tokens_limit's upper bound.
MAX_TOKENS_CEILING = 131072
# llama.cpp takes a uint32 seed and treats 0xFFFFFFFF as "pick a random seed": refusing it
# keeps "same seed, same output" true for every seed a client can send.
MAX_SEED = 2**32 - 2
MAX_STOP = 8
MAX_STOP_CHARS = 64
MAX_TIMEOUT_S = 86400.0
MAX_MESSAGES = 256
# A schema is compiled into a grammar on the device: bounded so that the payload's slack (below)
# still holds one next to the other fields, and so that converting it stays cheap.
MAX_SCHEMA_BYTES = 32768
MAX_SCHEMA_DEPTH = 32
# JSON escaping can make a prompt up to 6 times longer on the wire ("\u0001" for one byte);
# the slack covers the other fields. Payloads above this are refused without being parsed.
PAYLOAD_ESCAPE_FACTOR = 6
PAYLOAD_SLACK_BYTES = 65536


def max_payload_bytes(max_prompt_bytes: int) -> int:
    """The largest submit payload parse_submit will parse, bytes, for a given prompt limit."""
    return max_prompt_bytes * PAYLOAD_ESCAPE_FACTOR + PAYLOAD_SLACK_BYTES


# Statuses and error codes live in agent.codes; re-exported here as part of the wire format.


class InvalidJob(Exception):
    """A submit payload that cannot become a job. The only exception ``parse_submit`` raises.

    ``job_id`` is the id the submitter used, when it could be read, so a REJECTED result can be
    published for it; None when the payload gives no trustworthy id.
    """

    def __init__(self, code: ErrorCode, message: str, job_id: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"InvalidJob(code={self.code.value!r}, message={self.message!r}, job_id={self.job_id!r})"


# --------------------------------------------------------------------------------------------
# Time


def _parse_rfc3339(value: Any) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise PydanticCustomError("naive_datetime", "expires_at must carry a time zone")
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "must be an RFC 3339 timestamp string")
    if not RFC3339_RE.match(value):
        if re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?$", value):
            raise PydanticCustomError("naive_datetime", "has no UTC offset; add Z or +hh:mm")
        raise PydanticCustomError("datetime_format", "is not an RFC 3339 timestamp")
    try:
        # fromisoformat wants upper-case T and Z, which RFC 3339 says are case-insensitive.
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise PydanticCustomError("datetime_range", "is not a real date and time") from None


# --------------------------------------------------------------------------------------------
# Inbound: job submission


def _at_most(n: int, limit: int | None, code: str, template: str) -> None:
    """Refuse a size ``n`` above ``limit`` (None: no limit) as pydantic error ``code``; ``template`` names
    ``{n}`` and ``{limit}``."""
    if limit is not None and n > limit:
        raise PydanticCustomError(code, template, {"n": n, "limit": limit})


def _check_text(value: str, what: str) -> str:
    # JSON "\ud800" escapes decode to lone surrogates, which cannot be encoded as UTF-8: they
    # would fail later in the store, the tokenizer or the result payload, so refuse them here.
    m = SURROGATE_RE.search(value)
    if m:
        # pydantic's message templates substitute names only (no format specs): escape it here.
        raise PydanticCustomError(
            "lone_surrogate",
            "{what} contains an unpaired UTF-16 surrogate ({escape}) at character {pos}",
            {"what": what, "escape": f"\\u{ord(m.group()):04x}", "pos": m.start()},
        )
    # NUL ends C strings: llama.cpp's text paths and many consumers would cut the text there.
    pos = value.find("\x00")
    if pos >= 0:
        raise PydanticCustomError(
            "nul_character", "{what} contains a NUL character (U+0000) at character {pos}", {"what": what, "pos": pos}
        )
    return value


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class ChatMessage(BaseModel):
    """One message of a chat job."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant"] = Field(
        description="Who speaks: system (instructions), user, or assistant (earlier replies of the model)."
    )
    content: str = Field(
        description="The message text; may be empty. No NUL characters, no unpaired surrogate escapes. The contents "
        "of all messages together count against engine.max_prompt_bytes."
    )


def _schema_problem(value: Any, path: str, depth: int) -> PydanticCustomError | None:
    """The first text or nesting problem inside a JSON Schema value, as the error to raise."""
    if depth > MAX_SCHEMA_DEPTH:
        return PydanticCustomError(
            "schema_too_deep",
            "response_format.schema is nested more than {limit} levels deep (at {path})",
            {"limit": MAX_SCHEMA_DEPTH, "path": path or "the top"},
        )
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            items.append((f"{path}/{k}", k))
            items.append((f"{path}/{k}", v))
    elif isinstance(value, list):
        items = [(f"{path}/{i}", v) for i, v in enumerate(value)]
    elif isinstance(value, str):
        try:
            _check_text(value, f"response_format.schema at {path or '/'}")
        except PydanticCustomError as e:
            return e
        return None
    for sub_path, v in items:
        if isinstance(v, (dict, list, str)):
            err = _schema_problem(v, sub_path, depth + (not isinstance(v, str)))
            if err is not None:
                return err
    return None


class ResponseFormat(BaseModel):
    """Constrains the generated text to JSON: sampling follows a grammar built from the schema."""

    # The wire name is "schema", which a pydantic field cannot be called (BaseModel.schema);
    # dumps use the alias too, so the stored request validates again.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, serialize_by_alias=True)

    type: Literal["json_object", "json_schema"] = Field(
        description="json_object: the text is one JSON object. json_schema: the text is JSON valid against schema."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description=f"With type json_schema (required there, refused otherwise): a JSON Schema object, at most "
        f"{MAX_SCHEMA_BYTES} bytes of JSON and {MAX_SCHEMA_DEPTH} levels deep. Keywords the grammar cannot enforce "
        "(minimum, maximum, multipleOf, uniqueItems, not, if/then/else, allOf, oneOf, ...) make the job REJECTED "
        "invalid_schema; see docs/models.md, Structured output.",
    )

    @field_validator("json_schema")
    @classmethod
    def _schema_bounds(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        err = _schema_problem(v, "", 1)
        if err is not None:
            raise err
        n = len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        _at_most(
            n, MAX_SCHEMA_BYTES, "schema_too_large", "response_format.schema is {n} bytes of JSON, more than {limit}"
        )
        return v

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "schema_required", "response_format.schema is required when response_format.type is 'json_schema'"
            )
        if self.type == "json_object" and self.json_schema is not None:
            raise PydanticCustomError(
                "schema_not_allowed",
                "response_format.schema is only allowed with type 'json_schema' (json_object means any JSON object)",
            )
        return self


def _kind_problems(kind: object, has_prompt: bool, has_messages: bool) -> list[str]:
    """What is wrong with the text fields for this kind: prompt and messages belong to one kind each."""
    if kind == "generate":
        return (["kind 'generate' needs 'prompt'"] if not has_prompt else []) + (
            ["'messages' is only allowed with kind 'chat'"] if has_messages else []
        )
    if kind == "chat":
        return (["kind 'chat' needs 'messages'"] if not has_messages else []) + (
            ["'prompt' is not allowed with kind 'chat' (put the text in a user message)"] if has_prompt else []
        )
    if not has_prompt and not has_messages:
        return ["the job needs 'prompt' (kind 'generate') or 'messages' (kind 'chat')"]
    return []


class JobSubmit(BaseModel):
    """A generation job, as sent to {root}/jobs/submit."""

    # strict: JSON has real types, and "5" for an integer or true for a number is a client bug
    # worth reporting rather than guessing at. The schema states which text field each kind needs.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"kind": {"const": "generate"}}},
                    "then": {
                        "required": ["prompt"],
                        "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
                    },
                },
                {
                    "if": {"properties": {"kind": {"const": "chat"}}},
                    "then": {
                        "required": ["messages"],
                        "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
                    },
                },
            ]
        },
    )

    job_id: str = Field(
        pattern=JOB_ID_PATTERN,
        description="Client-chosen id, unique per device: 1-64 of A-Z a-z 0-9 _ -. Resending the same id never "
        "runs the job twice: the device answers with the stored outcome.",
    )
    kind: Literal["generate", "chat"] = Field(
        description="generate: continue the text in prompt. chat: answer messages, rendered with the model's chat "
        "template (engine.chat_template overrides it; a model with neither: REJECTED no_chat_template)."
    )
    prompt: str | None = Field(
        default=None,
        min_length=1,
        description="kind generate (required there, refused with chat): the prompt text, non-empty; at most "
        "engine.max_prompt_bytes UTF-8 bytes. No NUL characters, no unpaired surrogate escapes.",
    )
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description=f"kind chat (required there, refused with generate): 1-{MAX_MESSAGES} messages in conversation "
        "order; their contents together at most engine.max_prompt_bytes UTF-8 bytes. The template may refuse an "
        "order it does not support (REJECTED invalid_request with its reason). Usage counts the rendered prompt.",
    )
    max_tokens: int = Field(
        ge=1,
        # The ceiling is checked in the validator, so that any value over the configured limit
        # gets the same code and message; it is still stated in the schema.
        json_schema_extra={"maximum": MAX_TOKENS_CEILING},
        description="Most tokens to generate; at most engine.max_tokens_limit.",
    )
    temperature: float = Field(
        default=0.8,
        ge=0.0,
        le=2.0,
        description="Sampling temperature, 0 to 2; 0 is greedy. Default 0.8, llama.cpp's own default.",
    )
    top_p: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the most likely tokens up to this probability mass, >0 to 1. "
        "Default 0.95, llama.cpp's own default.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description=f"Sampling seed, 0 to {MAX_SEED}; the same seed, prompt and settings give the same text on the "
        "same build. null: random.",
    )
    stop: list[StopString] = Field(
        default=[],  # pydantic copies mutable defaults per instance; a literal shows in the schema
        max_length=MAX_STOP,
        description=f"Up to {MAX_STOP} stop strings, each 1-{MAX_STOP_CHARS} characters. Generation ends before "
        "the first one produced; it is not included in the text.",
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="Constrain the text to JSON (either kind). A result SUCCEEDED has text that parses, and validates "
        "against the schema; output cut short by max_tokens or a stop string is FAILED output_truncated instead. "
        "null: free text.",
    )
    stream: bool = Field(default=False, description="Also publish token pieces on {root}/jobs/{job_id}/stream.")
    priority: int = Field(
        default=0,
        ge=-100,
        le=100,
        description="-100 to 100; higher runs first. Equal priorities run in arrival order. A running job is never "
        "preempted.",
    )
    expires_at: AwareDatetime | None = Field(
        default=None,
        description="RFC 3339 timestamp with an offset (2024-05-01T12:00:00Z). A job not started by then is "
        "REJECTED with 'expired'. null: no deadline.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        le=MAX_TIMEOUT_S,
        description="Longest run time, seconds (>0 to 86400), counted from the start of the run; queue time is "
        "bounded by expires_at instead. Exceeded: TIMED_OUT. null: bounded by max_tokens only.",
    )
    handed_from: str | None = Field(
        default=None,
        pattern=JOB_ID_PATTERN,
        description="Set by a board of the fleet that hands this fleet job to this one (its device id; see "
        "RELEASED): a handed job is not handed on again. Clients leave it out.",
    )

    @field_validator("expires_at", mode="before")
    @classmethod
    def _rfc3339(cls, v: Any) -> Any:
        return None if v is None else _parse_rfc3339(v)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        _check_text(v, "prompt")
        _at_most(
            len(v.encode("utf-8")),
            (info.context or {}).get("max_prompt_bytes"),
            "prompt_too_large",
            "prompt is {n} UTF-8 bytes, exceeds the limit {limit} (engine.max_prompt_bytes)",
        )
        return v

    @field_validator("messages")
    @classmethod
    def _messages_text(cls, v: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if v is None:
            return v
        for i, m in enumerate(v):
            _check_text(m.content, f"messages[{i}].content")
        _at_most(
            sum(len(m.content.encode("utf-8")) for m in v),
            (info.context or {}).get("max_prompt_bytes"),
            "prompt_too_large",
            "messages hold {n} UTF-8 bytes of content, exceeds the limit {limit} (engine.max_prompt_bytes)",
        )
        return v

    @model_validator(mode="after")
    def _text_of_its_kind(self) -> JobSubmit:
        problems = _kind_problems(self.kind, self.prompt is not None, self.messages is not None)
        if problems:
            raise PydanticCustomError("kind_fields", "{text}", {"text": "; ".join(problems)})
        return self

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, v: int, info: ValidationInfo) -> int:
        limit = min((info.context or {}).get("max_tokens_limit", MAX_TOKENS_CEILING), MAX_TOKENS_CEILING)
        if v > limit:
            raise PydanticCustomError(
                "max_tokens_too_large",
                "max_tokens {v} exceeds the limit {limit} (engine.max_tokens_limit)",
                {"v": v, "limit": limit},
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            _check_text(s, f"stop[{i}]")
        return v

    @field_validator("temperature", "top_p", "timeout_s")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        # Python callers can pass nan/inf directly; JSON input never gets this far with them.
        if v is not None and not math.isfinite(v):
            raise PydanticCustomError("finite_number", "must be a finite number")
        return v

    @field_serializer("expires_at")
    def _ser_expires(self, v: datetime | None) -> str | None:
        return None if v is None else format_dt(v)

    def expires_epoch(self) -> float | None:
        """expires_at as epoch seconds (None when there is no deadline)."""
        return None if self.expires_at is None else self.expires_at.timestamp()

    def to_payload(self) -> bytes:
        """The submit payload a client publishes (compact UTF-8 JSON, defaults left out)."""
        return self.model_dump_json(exclude_defaults=True, by_alias=True).encode("utf-8")


SUBMIT_KEYS: tuple[str, ...] = tuple(JobSubmit.model_fields)


# Used only when the payload cannot be decoded at all: most clients serialise job_id first,
# and then the rejection can still be addressed. Whitespace as JSON defines it.
_LEADING_ID_RE = re.compile(
    rb'\A[ \t\n\r]*\{[ \t\n\r]*"job_id"[ \t\n\r]*:[ \t\n\r]*"([A-Za-z0-9_-]{1,64})"[ \t\n\r]*[,}]'
)


def _leading_job_id(payload: bytes) -> str | None:
    m = _LEADING_ID_RE.match(payload)
    return m.group(1).decode("ascii") if m else None


def _object_job_id(obj: JSONObject) -> str | None:
    values = obj.duplicates.get("job_id", [obj.get("job_id")])
    first = values[0]
    if isinstance(first, str) and ID_RE.match(first) and all(v == first for v in values):
        return first
    return None


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "payload"


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}
# The keys allowed inside the nested objects, for "unknown key" messages.
_NESTED_KEYS = {"messages": ("role", "content"), "response_format": ("type", "schema")}
_CODE_OF_ERROR = {
    "prompt_too_large": ErrorCode.prompt_too_large,
    "max_tokens_too_large": ErrorCode.max_tokens_too_large,
}
_MAX_LISTED = 10


def _explain(e: ErrorDetails) -> str:
    """One pydantic error as a sentence naming the field, the problem and the limit."""
    field, kind, ctx, value = _field(e["loc"]), e["type"], e.get("ctx") or {}, e.get("input")
    if kind == "missing":
        return f"missing required field {field!r}"
    if kind in _EXPECTED:
        extra = " (integers are written without a fraction or quotes)" if kind == "int_type" else ""
        return f"{field} must be {_EXPECTED[kind]}, got {describe(value)}{extra}"
    if kind == "literal_error":
        return f"{field} must be one of {ctx.get('expected')}, got {describe(value)}"
    if kind == "string_pattern_mismatch":
        return f"{field} must be 1-64 characters from A-Z a-z 0-9 _ -, got {describe(value)}"
    if kind == "string_too_short":
        return f"{field} must not be empty"
    if kind == "string_too_long":
        return f"{field} is {len(value)} characters, more than the maximum {ctx.get('max_length')}"
    if kind == "too_long":
        return f"{field} has {len(value)} entries, more than the maximum {ctx.get('max_length')}"
    if kind == "too_short":
        return f"{field} must have at least {ctx.get('min_length')} entry"
    if kind == "extra_forbidden":
        owner, key = _field(e["loc"][:-1]), e["loc"][-1]
        allowed = _NESTED_KEYS.get(str(e["loc"][0]), ())
        return f"{owner} has an unknown key {show(key)}; allowed keys: {', '.join(allowed)}"
    if kind == "greater_than_equal":
        return f"{field} {show(value)} is below the minimum {bound(ctx.get('ge'))}"
    if kind == "greater_than":
        return f"{field} must be greater than {bound(ctx.get('gt'))}, got {show(value)}"
    if kind == "less_than_equal":
        return f"{field} {show(value)} exceeds the maximum {bound(ctx.get('le'))}"
    if kind == "string_unicode" and isinstance(value, str):
        # pydantic refuses lone surrogates before our own validator sees them.
        m = SURROGATE_RE.search(value)
        if m:
            return f"{field} contains an unpaired UTF-16 surrogate (\\u{ord(m.group()):04x}) at character {m.start()}"
    if kind in ("naive_datetime", "datetime_type", "datetime_format", "datetime_range", "finite_number"):
        return f"{field} {e['msg']}, got {describe(value)}"
    if kind in (
        "lone_surrogate",
        "nul_character",
        "prompt_too_large",
        "max_tokens_too_large",
        "kind_fields",
        "schema_required",
        "schema_not_allowed",
        "schema_too_large",
        "schema_too_deep",
    ):
        return str(e["msg"])
    return f"{field}: {e['msg']}"


def _from_validation_error(err: ValidationError, job_id: str | None, fields: dict[str, Any]) -> InvalidJob:
    errors = err.errors(include_url=False)
    if not any(e["type"] == "kind_fields" for e in errors):
        # The model-level check runs only once every field is valid: say now what it would say,
        # so one answer lists every change the job needs.
        for problem in _kind_problems(
            fields.get("kind"), fields.get("prompt") is not None, fields.get("messages") is not None
        ):
            errors.append({"type": "kind_fields", "loc": (), "msg": problem, "input": None})

    def bad_key(e: ErrorDetails) -> bool:
        # A key that is not valid Unicode (a lone surrogate escape) is reported by pydantic at no
        # location, with the key as input: it cannot be a known key, so it is named as unknown.
        return e["type"] == "string_unicode" and not e["loc"] and isinstance(e.get("input"), str)

    top_level = [e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    unknown = [str(e["loc"][0]) for e in top_level] + [e["input"] for e in errors if bad_key(e)]
    rest = [e for e in errors if not any(e is t for t in top_level) and not bad_key(e)]
    parts: list[str] = []
    if unknown:
        names = ", ".join(show(k) for k in unknown[:_MAX_LISTED])
        more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        parts.append(f"unknown key(s) {names}{more}; allowed keys: {', '.join(SUBMIT_KEYS)}")
    parts.extend(_explain(e) for e in rest[:_MAX_LISTED])
    if len(rest) > _MAX_LISTED:
        parts.append(f"and {len(rest) - _MAX_LISTED} more error(s)")
    # A specific code only when it is the whole story: fixing the size alone must make the job
    # valid, otherwise the client is told invalid_payload and reads the message.
    codes = {_CODE_OF_ERROR.get(e["type"], ErrorCode.invalid_payload) for e in errors}
    code = codes.pop() if len(codes) == 1 else ErrorCode.invalid_payload
    return InvalidJob(code, "; ".join(parts), job_id)


def parse_submit(
    payload: bytes, *, max_prompt_bytes: int, max_tokens_limit: int, topic_job_id: str | None = None
) -> JobSubmit:
    """Turn a submit payload into a JobSubmit, or raise InvalidJob (and nothing else).

    ``topic_job_id`` is for topics that carry the job id: it must then agree with the payload's
    job_id (and fills it in when the payload has none), and it is the id reported on failure.

    Decisions (see docs/protocol.md, "Parsing rules"): UTF-8 only, no byte-order mark; the top
    level must be an object; duplicate keys are refused, because parsers disagree on which
    copy wins and the submitter and the device must not read different jobs from one payload;
    NaN and Infinity are refused; payloads above ``max_payload_bytes(max_prompt_bytes)`` are
    refused unparsed.
    """
    try:
        return _parse_submit(payload, max_prompt_bytes, max_tokens_limit, topic_job_id)
    except InvalidJob:
        raise
    except Exception as e:  # the contract is "InvalidJob only": a parser bug must not kill the caller
        raise InvalidJob(
            ErrorCode.invalid_payload,
            f"payload could not be validated (internal error {type(e).__name__}; please report it)",
            topic_job_id if isinstance(topic_job_id, str) and ID_RE.match(topic_job_id) else None,
        ) from e


def _parse_submit(payload: Any, max_prompt_bytes: int, max_tokens_limit: int, topic_job_id: str | None) -> JobSubmit:
    if topic_job_id is not None and not (isinstance(topic_job_id, str) and ID_RE.match(topic_job_id)):
        raise InvalidJob(
            ErrorCode.invalid_payload,
            f"the job id in the topic, {show(topic_job_id)}, is not 1-64 characters from A-Z a-z 0-9 _ -",
            None,
        )
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    elif isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    elif not isinstance(payload, bytes):
        raise InvalidJob(ErrorCode.invalid_payload, f"payload must be bytes, got {type(payload).__name__}", None)

    def fallback_id() -> str | None:
        return topic_job_id or _leading_job_id(payload)

    cap = max_payload_bytes(max_prompt_bytes)
    if len(payload) > cap:
        raise InvalidJob(
            ErrorCode.payload_too_large,
            f"payload is {len(payload)} bytes, more than {cap} (6 x engine.max_prompt_bytes + 64 KiB)",
            fallback_id(),
        )
    if not payload.strip():
        raise InvalidJob(ErrorCode.invalid_payload, "payload is empty; expected a JSON object", topic_job_id)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJob(
            ErrorCode.invalid_payload,
            f"payload is not valid UTF-8: byte 0x{payload[e.start]:02x} at offset {e.start}",
            fallback_id(),
        ) from None
    if text.startswith("\ufeff"):
        raise InvalidJob(
            ErrorCode.invalid_payload, "payload starts with a byte-order mark; send plain UTF-8 JSON", fallback_id()
        )
    try:
        data = decoder.decode(text)
    except Refuse as e:
        raise InvalidJob(ErrorCode.invalid_payload, str(e), fallback_id()) from None
    except json.JSONDecodeError as e:
        raise InvalidJob(
            ErrorCode.invalid_payload, f"payload is not valid JSON: {e.msg} at offset {e.pos}", fallback_id()
        ) from None
    except RecursionError:
        raise InvalidJob(ErrorCode.invalid_payload, "payload is nested too deeply", fallback_id()) from None
    except ValueError as e:  # int/float conversion limits not caught by the hooks
        raise InvalidJob(ErrorCode.invalid_payload, f"payload has an invalid number: {e}", fallback_id()) from None
    if not isinstance(data, JSONObject):
        raise InvalidJob(
            ErrorCode.invalid_payload, f"payload must be a JSON object, got {describe(data)}", topic_job_id
        )

    job_id = _object_job_id(data)
    if topic_job_id is not None:
        if "job_id" in data and data.get("job_id") != topic_job_id:
            raise InvalidJob(
                ErrorCode.invalid_payload,
                f"job_id {show(data.get('job_id'))} does not match the job id in the topic {topic_job_id!r}",
                topic_job_id,
            )
        job_id = topic_job_id
    if data.duplicates:
        names = ", ".join(show(k) for k in list(data.duplicates)[:_MAX_LISTED])
        raise InvalidJob(ErrorCode.invalid_payload, f"duplicate key(s) {names}; each key may appear only once", job_id)
    fields = dict(data)
    if topic_job_id is not None:
        fields.setdefault("job_id", topic_job_id)
    try:
        return JobSubmit.model_validate(
            fields, context={"max_prompt_bytes": max_prompt_bytes, "max_tokens_limit": max_tokens_limit}
        )
    except ValidationError as e:
        raise _from_validation_error(e, job_id, fields) from None


# --------------------------------------------------------------------------------------------
# Outbound messages (device to clients)


def _clean_text(v: Any) -> Any:
    # Engines can emit half a multi-byte character at a token boundary, which Python decoders
    # may leave as a lone surrogate; a payload must always encode, so replace rather than fail.
    return SURROGATE_RE.sub("\ufffd", v) if isinstance(v, str) else v


# Outbound text from the engine or an error: lone surrogates replaced before validation.
CleanText = Annotated[str, BeforeValidator(_clean_text)]


class StatusMessage(Outbound):
    """Published on {root}/jobs/{job_id}/status (QoS 1) at every state change."""

    _omit_none: ClassVar[bool] = True

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="The job.")
    device_id: str = Field(description="The device that owns the job.")
    status: JobStatus = Field(description="The new state.")
    attempt: int = Field(ge=0, description="Runs started so far (0 while it never ran).")
    ts: AwareDatetime = TIMESTAMP
    reason: ErrorCode | None = Field(default=None, description="Why, for FAILED, REJECTED, CANCELED, TIMED_OUT.")
    waiting_for: WaitReason | None = Field(
        default=None,
        description="QUEUED only: what the job waits for (slot, memory, reserved, model, paused; see Waiting); a new "
        "QUEUED status is sent when it changes, with the detail in message.",
    )
    message: CleanText | None = Field(default=None, description="Human-readable detail.")
    handed_to: str | None = Field(
        default=None,
        description="RELEASED only: the board of the fleet the job was handed to; absent: given back to the "
        "submitter, who sends it again to the fleet topic.",
    )


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    prompt_tokens: int = Field(ge=0, description="Tokens in the prompt (for chat: the rendered prompt).")
    completion_tokens: int = Field(ge=0, description="Tokens generated.")
    prompt_tokens_cached: int = Field(
        default=0,
        ge=0,
        description="Of prompt_tokens, those not evaluated again: their KV cache was kept from the previous job "
        "(a shared prefix) or restored from engine.prompt_cache. timings.prompt_ms covers the others only.",
    )
    max_tokens_allowed: int | None = Field(
        default=None,
        ge=0,
        description="The most tokens the job could generate: its max_tokens, or less when prompt + max_tokens "
        "passes the end of the context (it then ends with finish_reason length at the context's end).",
    )
    prompt_tokens_dropped: int = Field(
        default=0,
        ge=0,
        description="Tokens cut from the front of a prompt that did not fit (engine.context_overflow = keep_tail).",
    )


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    queue_ms: float | None = Field(default=None, ge=0, description="From acceptance to the start of the run, ms.")
    slot_wait_ms: float | None = Field(
        default=None,
        ge=0,
        description="From the start of the run to a free slot of the engine (every slot busy with other jobs), ms.",
    )
    first_token_ms: float | None = Field(
        default=None,
        ge=0,
        description="From a free slot to the first generated text (time to first token), ms.",
    )
    slots_in_use: int | None = Field(
        default=None,
        ge=1,
        description="Jobs decoding in the engine when this one took its slot, itself included (engine.max_parallel).",
    )
    prompt_ms: float | None = Field(default=None, ge=0, description="Prompt evaluation, ms.")
    generation_ms: float | None = Field(default=None, ge=0, description="Token generation, ms.")
    tokens_per_s: float | None = Field(default=None, ge=0, description="Generated tokens per second.")

    @field_validator("*", mode="before")
    @classmethod
    def _finite_or_none(cls, v: Any) -> Any:
        # A division by a zero duration must not make the result unpublishable.
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    code: ErrorCode = Field(description="Machine-readable reason; see the error code table.")
    message: CleanText = Field(description="Human-readable detail: what was wrong and the limit involved.")


class JobOutcome(BaseModel):
    """The one terminal outcome of a job: decided by the runner (agent.jobs.outcome), persisted by
    the store, carried by ResultMessage. Every copy of a job's result is built from it."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    status: JobStatus = Field(description="A terminal status: SUCCEEDED, FAILED, REJECTED, CANCELED, TIMED_OUT.")
    text: CleanText | None = Field(
        default=None, description="Generated text; partial for CANCELED and TIMED_OUT; null if nothing was generated."
    )
    finish_reason: Literal["stop", "length", "canceled", "timeout"] | None = Field(
        default=None,
        description="stop: a stop string or end of text; length: max_tokens reached, or the end of the context "
        "(usage.max_tokens_allowed says which); canceled / timeout: generation was cut short (status CANCELED / "
        "TIMED_OUT); null when nothing ran.",
    )
    usage: Usage | None = Field(default=None, description="Token counts, null when the job never ran.")
    timings: Timings | None = Field(default=None, description="Durations, null when the job never ran.")
    error: ErrorInfo | None = Field(default=None, description="null on SUCCEEDED; the reason otherwise.")

    @model_validator(mode="after")
    def _one_outcome(self) -> JobOutcome:
        if self.status not in TERMINAL:
            raise ValueError(f"an outcome needs a terminal status, got {self.status.value}")
        if (self.status is JobStatus.SUCCEEDED) != (self.error is None):
            raise ValueError("error must be null exactly when status is SUCCEEDED")
        return self

    @classmethod
    def refused(cls, code: ErrorCode, message: str) -> JobOutcome:
        """An outcome without output: the code decides the status."""
        return cls(status=code.status, error=ErrorInfo(code=code, message=message))

    def body(self) -> dict[str, Any]:
        """Everything but the status, as JSON data (what the store keeps next to its status column)."""
        return self.model_dump(mode="json", exclude={"status"})


class _ResultEnvelope(Outbound):
    job_id: str = Field(pattern=JOB_ID_PATTERN, description="The job.")
    device_id: str = Field(description="The device that ran (or refused) the job.")
    attempt: int = Field(ge=0, description="Runs started (0 if refused before running).")
    ts: AwareDatetime = Field(
        description="When the job reached its terminal status: RFC 3339 UTC, the same in every copy.",
        json_schema_extra={"format": "date-time"},
    )


class ResultMessage(JobOutcome, _ResultEnvelope):
    """Published on {root}/jobs/{job_id}/result (QoS 1): the one terminal outcome of a job.

    It may arrive more than once (after reconnects or reboots); consumers dedupe by job_id.
    """

    @classmethod
    def of(cls, outcome: JobOutcome, *, job_id: str, device_id: str, attempt: int, ts: float) -> ResultMessage:
        return cls(job_id=job_id, device_id=device_id, attempt=attempt, ts=ts, **dict(outcome))


class StreamChunk(Outbound):
    """Published on {root}/jobs/{job_id}/stream (QoS 0) when the job asked for stream: true.

    Best effort: pieces can be lost; the result always holds the whole text.
    """

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="The job.")
    index: int = Field(ge=0, description="0, 1, 2 ... in generation order; a gap means a lost piece.")
    text: CleanText = Field(description="The next piece of text (one or more tokens).")


class FleetLoad(BaseModel):
    """A board's load as its fleet peers read it (in DeviceStatus.fleet)."""

    model_config = ConfigDict(extra="ignore")  # read from peers, which may be newer

    group: str = Field(pattern=JOB_ID_PATTERN, description="mqtt.fleet_group.")
    free: int = Field(ge=0, description="Slots free with no job waiting: fleet jobs it could start now.")
    held: bool = Field(
        default=False,
        description="It starts no job now (intake paused, a model change, the memory governor, an unwritable "
        "store): peers hand it nothing, and it hands its unstarted fleet jobs to them.",
    )
    queued: int = Field(ge=0, description="Jobs waiting in its queue.")
    ms_per_token: float | None = Field(
        default=None, gt=0, description="Its measured run time per generated token, ms (null: none run yet)."
    )
    lease_s: float = Field(
        gt=0,
        description="mqtt.fleet_lease_s: a submitter sends a fleet job again when the board holding it has been "
        "offline or stale this long; the board gives back the ones it has not started after half of it.",
    )


class DeviceStatus(Outbound):
    """Retained on {root}/status; 'offline' is also the MQTT last will."""

    _omit_none: ClassVar[bool] = True

    state: Literal["online", "offline", "stopping"] = Field(
        description="online: taking jobs; stopping: finishing the running job, taking no more; offline: gone."
    )
    device_id: str = Field(description="This device.")
    agent_version: str | None = Field(default=None, description="edge-agent version.")
    model: str | None = Field(default=None, description="Loaded model file name.")
    store: Literal["writable", "unwritable"] | None = Field(
        default=None,
        description="Whether the job store takes writes. unwritable (a full disk, a read-only filesystem): the "
        "device takes no new jobs; they stay with the broker and are taken once the store recovers.",
    )
    heartbeat_s: int | None = Field(
        default=None,
        ge=1,
        description="online: the device publishes this status again at least this often (mqtt.heartbeat_s).",
    )
    expires: AwareDatetime | None = Field(
        default=None,
        description="online: when this status goes stale, RFC 3339 UTC (ts + 3 x heartbeat_s). A retained "
        "'online' older than this is not to be trusted: the device, or the broker node that held its last "
        "will, is gone (a node that dies sends no will). `fleet list`, `shadow get` and Home Assistant show "
        "such a device as stale / unavailable.",
        json_schema_extra={"format": "date-time"},
    )
    fleet: FleetLoad | None = Field(
        default=None,
        description="online, with mqtt.fleet_group: how loaded and how fast the board is, so that boards of the "
        "group hand unstarted fleet jobs to the one that ends them first (docs/mqtt-transport.md, Fleet jobs by "
        "each board's speed).",
    )
    ts: AwareDatetime = TIMESTAMP

    @field_serializer("expires")
    def _ser_expires(self, v: datetime | None) -> str | None:
        return format_dt(v) if v is not None else None


def status_state(status: Mapping[str, Any] | None, now: float) -> str | None:
    """The state a reader should show for a retained device status: its ``state``, or ``stale`` for an
    'online' whose ``expires`` has passed. None: no status. Pure."""
    if not status:
        return None
    state = status.get("state")
    expires = status.get("expires")
    if state == "online" and isinstance(expires, str):
        try:
            if datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() < now:
                return "stale"
        except ValueError:
            pass
    return state if isinstance(state, str) else None


# --------------------------------------------------------------------------------------------
# Schemas for the documentation

INBOUND_MODELS: tuple[type[BaseModel], ...] = (JobSubmit,)
OUTBOUND_MODELS: tuple[type[BaseModel], ...] = (StatusMessage, ResultMessage, StreamChunk, DeviceStatus)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every payload, by model name: what is accepted (inbound) and what is sent (outbound)."""
    out: dict[str, dict[str, Any]] = {}
    for model in INBOUND_MODELS:
        out[model.__name__] = model.model_json_schema(mode="validation")
    for model in OUTBOUND_MODELS:
        # Models that leave out null fields are described as a reader sees them (those keys
        # optional); the others always send every key, which serialization mode says.
        omits = getattr(model, "_omit_none", False)
        out[model.__name__] = model.model_json_schema(mode="validation" if omits else "serialization")
    return out


__all__ = [
    "JOB_ID_PATTERN",
    "JobOutcome",
    "TERMINAL",
    "DeviceStatus",
    "FleetLoad",
    "ErrorCode",
    "ErrorInfo",
    "ChatMessage",
    "InvalidJob",
    "JobStatus",
    "JobSubmit",
    "ResponseFormat",
    "ResultMessage",
    "StatusMessage",
    "StreamChunk",
    "Timings",
    "Usage",
    "json_schemas",
    "max_payload_bytes",
    "parse_submit",
    "rfc3339",
    "status_state",
]
