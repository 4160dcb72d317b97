"""The JSON wire helpers every payload parser shares (jobs, the device shadow).

A strict decoder (duplicate keys remembered, NaN and Infinity refused, absurd numbers refused with a
message) and short, printable descriptions of JSON values for error messages. No I/O.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any, ClassVar, NoReturn

from pydantic import BaseModel, ConfigDict, Field, field_serializer

# Job ids and device ids: they end up inside topic filters, where '+', '#', '/' or '$' would change what matches.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
PREFIX_RE = re.compile(r"\A[A-Za-z0-9_-]{1,32}\Z")
# Lone surrogates decode from JSON escapes but cannot be encoded as UTF-8.
SURROGATE_RE = re.compile("[\ud800-\udfff]")


class JSONObject(dict[str, Any]):
    """A decoded JSON object that remembers keys it saw more than once, with every value."""

    __slots__ = ("duplicates",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.duplicates: dict[str, list[Any]] = {}
        for k, v in pairs:
            if k in self:
                self.duplicates.setdefault(k, [self[k]]).append(v)
            else:
                self[k] = v


class Refuse(ValueError):
    """Raised from the JSON decoder hooks with a finished message."""


def _refuse_constant(name: str) -> NoReturn:
    raise Refuse(f"payload contains {name}; JSON numbers must be finite")


def _parse_float(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):
        raise Refuse(f"number {s[:40]} is out of range")
    return f


def _parse_int(s: str) -> int:
    # Python refuses ints over 4300 digits with a confusing message; nothing valid needs 40.
    digits = len(s.lstrip("-"))  # a minus sign is not a digit: -(40 digits) is still in range
    if digits > 40:
        raise Refuse(f"integer with {digits} digits is out of range")
    return int(s)


decoder = json.JSONDecoder(
    object_pairs_hook=JSONObject, parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int
)

_JSON_TYPE = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def describe(v: Any) -> str:
    """A short, printable description of a JSON value for an error message."""
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "an array"
    kind = _JSON_TYPE.get(type(v), type(v).__name__)
    if isinstance(v, bool):
        return f"{kind} {'true' if v else 'false'}"
    if v is None:
        return "null"
    return f"{kind} {show(v)}"


def show(v: Any) -> str:
    # repr escapes non-printable characters (lone surrogates included), so the message is
    # always valid UTF-8 and one line.
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else repr(v[:40]) + f"... ({len(v)} characters)"
    return repr(v)


def bound(v: Any) -> str:
    # Limits such as le=2.0 read better as "2"; inputs keep their repr so 5.0 stays 5.0.
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return show(v)


def rfc3339(epoch: float) -> str:
    """Epoch seconds as an RFC 3339 UTC timestamp with milliseconds: 2024-05-01T12:00:00.123Z."""
    return format_dt(datetime.fromtimestamp(epoch, tz=UTC))


def format_dt(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


class Outbound(BaseModel):
    """Messages the device publishes. Built by the daemon, so unknown fields are bugs."""

    # Every key is always sent unless _omit_none: the serialization schema must say "required".
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)
    _omit_none: ClassVar[bool] = False

    @field_serializer("ts", check_fields=False)
    def _ser_ts(self, v: datetime) -> str:
        return format_dt(v)

    def to_payload(self) -> bytes:
        """Compact UTF-8 JSON for MQTT."""
        return self.model_dump_json(exclude_none=self._omit_none).encode("utf-8")


# Python callers may pass epoch seconds (pydantic converts them); the wire always has RFC 3339.
TIMESTAMP = Field(
    description="When this was produced: RFC 3339 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z.",
    json_schema_extra={"format": "date-time"},
)
