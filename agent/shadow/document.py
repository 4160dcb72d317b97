"""The device shadow document and the rules of an update, as pure functions (no I/O, no clock).

Owns ``ShadowDocument`` (version, desired, reported, per-key ``updated`` metadata), the reading of
update and get payloads (``parse_update``, ``parse_get``: bytes in, a request or a ``BadRequest``
naming every problem), ``apply_update`` with AWS IoT Device Shadow semantics, and ``delta``.

The semantics, kept close to AWS so people who know it feel at home:

* desired is a nested object; an update's partial desired is merged into it; ``null`` removes a key
  (and an emptied object), so the board's config file applies again; ``"desired": null`` removes all;
* an update that names a ``version`` must name the current one, else 409; every accepted update
  increments the version by one (reported changes do not: the version is the operators' lock);
* desired + reported take at most 8 KB of compact JSON (413), desired nests at most 6 levels (400),
  a client_token is at most 64 bytes and is echoed;
* a 400 changes nothing and names each bad key (``errors: {key: message}``);
* delta holds the desired keys whose value differs from reported.

What the keys may hold is not decided here: ``apply_update`` takes a ``validate`` callable
(agent.shadow.desired) that normalises the merged desired state or raises ``DesiredInvalid``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# The JSON decoder of the job protocol: duplicate keys are kept for refusal, NaN/Infinity and
# absurd numbers are refused. One set of reading rules for everything the device takes in.
from agent.config.inforce import DesiredInvalid, summarise
from agent.config.tree import Tree, flatten, same, unflatten
from agent.mqtt.wire import SURROGATE_RE, JSONObject, Refuse, decoder, describe

MAX_STATE_BYTES = 8192  # desired + reported, compact JSON (AWS: 8 KB)
MAX_DEPTH = 6  # levels of keys below desired (AWS: 6)
MAX_CLIENT_TOKEN_BYTES = 64  # UTF-8 (AWS: 64)
# Payloads above this are refused unparsed: a valid update holds at most 8 KB of state.
MAX_PAYLOAD_BYTES = 65536
_UPDATE_KEYS = ("state", "version", "client_token", "signature")


@dataclass(frozen=True)
class ShadowDocument:
    """The shadow as the board keeps it. Dicts are never mutated in place: functions return copies.

    ``desired`` and ``reported`` are nested JSON objects. ``desired_meta`` / ``reported_meta`` map
    a dotted leaf key to the epoch seconds at which it last changed.
    """

    version: int = 0
    desired: Tree = field(default_factory=dict)
    reported: Tree = field(default_factory=dict)
    desired_meta: dict[str, float] = field(default_factory=dict)
    reported_meta: dict[str, float] = field(default_factory=dict)

    def delta(self) -> Tree:
        return delta(self.desired, self.reported)


@dataclass(frozen=True)
class UpdateRequest:
    """A readable update. ``desired`` None: ``"desired": null`` (remove every desired key)."""

    desired: Tree | None
    version: int | None = None
    client_token: str | None = None
    signature: Any = None  # the operator's signature (agent.signing), checked by an ``Authorizer``


@dataclass(frozen=True)
class GetRequest:
    client_token: str | None = None


@dataclass(frozen=True)
class Accepted:
    document: ShadowDocument
    changed: frozenset[str]  # dotted keys set or removed by this update
    client_token: str | None


@dataclass(frozen=True)
class Rejected:
    code: int  # 400 invalid, 403 not signed by the operator, 409 version conflict, 413 too large, 500 failed
    message: str
    version: int  # the document's version (unchanged)
    errors: dict[str, str] = field(default_factory=dict)
    client_token: str | None = None


class BadRequest(Exception):
    """A payload that is not a readable request: code 400 or 413, one message per bad key."""

    def __init__(
        self, code: int, message: str, errors: Mapping[str, str] | None = None, client_token: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = dict(errors or {})
        self.client_token = client_token

    def rejected(self, version: int) -> Rejected:
        return Rejected(self.code, self.message, version, self.errors, self.client_token)


Validator = Callable[[Tree, frozenset[str]], Tree]
"""(merged desired, dotted keys the update sets) -> the normalised desired; raises DesiredInvalid."""

Authorizer = Callable[[UpdateRequest, frozenset[str]], str | None]
"""(update, dotted keys it sets or removes) -> None when allowed, else why not (a 403)."""


# --------------------------------------------------------------------------------------------
# Trees


def merge(desired: Mapping[str, Any], patch: Mapping[str, Any]) -> Tree:
    """AWS merge: objects merge key by key, null removes, anything else replaces. Returns a copy;
    objects left empty by removals are dropped."""
    out = copy.deepcopy(dict(desired))
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping):
            base = out.get(k)
            merged = merge(base if isinstance(base, Mapping) else {}, v)
            if merged:
                out[k] = merged
            else:
                out.pop(k, None)
        else:
            out[k] = copy.deepcopy(v)
    return out


def touched_keys(patch: Mapping[str, Any], prefix: str = "") -> tuple[set[str], set[str]]:
    """(dotted keys the patch sets, dotted keys or prefixes it removes)."""
    sets: set[str] = set()
    removes: set[str] = set()
    for k, v in patch.items():
        key = f"{prefix}{k}"
        if v is None:
            removes.add(key)
        elif isinstance(v, Mapping):
            s, r = touched_keys(v, key + ".")
            sets |= s
            removes |= r
        else:
            sets.add(key)
    return sets, removes


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> Tree:
    """The desired leaves whose value differs from reported (missing in reported counts as different)."""
    have = flatten(reported)
    return unflatten({k: v for k, v in flatten(desired).items() if k not in have or not same(have[k], v)})


def json_size(tree: Any) -> int:
    """Bytes of compact UTF-8 JSON: what the 8 KB limit counts (AWS ignores whitespace too)."""
    return len(json.dumps(tree, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _depth(v: Any) -> int:
    if isinstance(v, Mapping):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


def _deepest_path(v: Any, prefix: str = "") -> str:
    if not isinstance(v, Mapping) or not v:
        return prefix
    k, child = max(v.items(), key=lambda kv: _depth(kv[1]))
    return _deepest_path(child, f"{prefix}.{k}" if prefix else str(k))


# --------------------------------------------------------------------------------------------
# Reading payloads


def _decode(payload: bytes, what: str) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadRequest(
            413,
            f"{what} payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}; the whole state may hold "
            f"{MAX_STATE_BYTES} bytes",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            400, f"payload is not valid UTF-8: byte 0x{payload[e.start]:02x} at offset {e.start}"
        ) from None
    if text.startswith("\ufeff"):
        raise BadRequest(400, "payload starts with a byte-order mark; send plain UTF-8 JSON")
    try:
        return decoder.decode(text)
    except Refuse as e:
        raise BadRequest(400, str(e)) from None
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"payload is not valid JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise BadRequest(400, f"payload is nested too deeply (desired may nest {MAX_DEPTH} levels)") from None
    except ValueError as e:
        raise BadRequest(400, f"payload has an invalid number: {e}") from None


def _duplicates(v: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(v, JSONObject):
        out += [f"{prefix}{k}" for k in v.duplicates]
        for k, child in v.items():
            out += _duplicates(child, f"{prefix}{k}.")
    elif isinstance(v, list):
        for i, child in enumerate(v):
            out += _duplicates(child, f"{prefix}[{i}].")
    return out


def _client_token(data: Mapping[str, Any], errors: dict[str, str]) -> str | None:
    if "client_token" not in data or data["client_token"] is None:
        return None
    token = data["client_token"]
    if not isinstance(token, str):
        errors["client_token"] = f"must be a string, got {describe(token)}"
        return None
    n = len(token.encode("utf-8", "surrogatepass"))
    if n > MAX_CLIENT_TOKEN_BYTES:
        errors["client_token"] = f"is {n} UTF-8 bytes, more than {MAX_CLIENT_TOKEN_BYTES}"
        return None
    if not token.isprintable():
        errors["client_token"] = "must be printable text (no control characters)"
        return None
    return token


def _object(payload: bytes, what: str) -> tuple[Mapping[str, Any], dict[str, str], str | None]:
    data = _decode(payload, what)
    if not isinstance(data, Mapping):
        raise BadRequest(400, f"{what} payload must be a JSON object, got {describe(data)}")
    errors: dict[str, str] = {}
    token = _client_token(data, errors)
    dups = _duplicates(data)
    if dups:
        for key in dups:
            errors[key] = "appears more than once; each key may appear only once"
    return data, errors, token


def parse_update(payload: bytes) -> UpdateRequest:
    """Read an update payload; raise BadRequest (400 or 413) naming every problem."""
    data, errors, token = _object(payload, "update")
    for k in data:
        if k not in _UPDATE_KEYS:
            errors[str(k)] = "unknown key; an update holds state, version, client_token and signature"
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        errors["version"] = f"must be a non-negative integer, got {describe(version)}"
        version = None
    desired: Tree | None = None
    state = data.get("state")
    if "state" not in data:
        errors["state"] = 'missing; send {"state": {"desired": {...}}}'
    elif not isinstance(state, Mapping):
        errors["state"] = f"must be an object, got {describe(state)}"
    else:
        for k in state:
            if k == "reported":
                errors["state.reported"] = "reported is written by the device only"
            elif k != "desired":
                errors[f"state.{k}"] = "unknown key; state holds desired"
        if "desired" not in state:
            errors.setdefault("state.desired", 'missing; send {"state": {"desired": {...}}}')
        elif state["desired"] is not None and not isinstance(state["desired"], Mapping):
            errors["state.desired"] = f"must be an object or null, got {describe(state['desired'])}"
        elif isinstance(state["desired"], Mapping):
            desired = _plain(state["desired"])
            if not desired:
                errors["state.desired"] = "is empty: nothing to update (null removes every desired key)"
            errors.update(_bad_text(desired))
            depth = _depth(desired)  # levels of keys below desired: {"engine": {"n_ctx": 1}} is 2
            if depth > MAX_DEPTH:
                errors[_deepest_path(desired)] = f"nested {depth} levels deep, more than {MAX_DEPTH}"
    if errors:
        raise BadRequest(400, f"update refused, nothing changed: {summarise(errors)}", errors, token)
    return UpdateRequest(desired=desired, version=version, client_token=token, signature=_plain(data.get("signature")))


def parse_get(payload: bytes) -> GetRequest:
    """Read a get payload: empty, or an object with an optional client_token."""
    if not payload.strip():
        return GetRequest()
    data, errors, token = _object(payload, "get")
    for k in data:
        if k != "client_token":
            errors[str(k)] = "unknown key; a get holds only client_token"
    if errors:
        raise BadRequest(400, f"get refused: {summarise(errors)}", errors, token)
    return GetRequest(client_token=token)


def _bad_text(v: Any, key: str = "") -> dict[str, str]:
    """Keys and strings of desired that no setting may hold, by dotted key: a NUL character (C strings,
    file names and llama.cpp's text paths end there) or an unpaired UTF-16 surrogate (a JSON "\\ud800"
    escape: it cannot be encoded as UTF-8, so it could be neither stored nor published). The job
    protocol refuses the same in prompts."""
    out: dict[str, str] = {}
    if isinstance(v, Mapping):
        for k, child in v.items():
            name = f"{key}.{_shown(k)}" if key else _shown(k)
            if why := _bad_chars(k):
                out[name] = f"the key {why}"
            else:
                out.update(_bad_text(child, name))
    elif isinstance(v, list):
        for i, child in enumerate(v):
            for k, why in _bad_text(child, f"{key}[{i}]").items():
                out.setdefault(key, f"{k[len(key) :]} {why}")  # under its setting: "[0].content contains ..."
    elif isinstance(v, str) and (why := _bad_chars(v)):
        out[key] = why
    return out


def _bad_chars(text: str) -> str | None:
    if (pos := text.find("\x00")) >= 0:
        return f"contains a NUL character (U+0000) at character {pos}"
    m = SURROGATE_RE.search(text)
    if m:
        return f"contains an unpaired UTF-16 surrogate (\\u{ord(m.group()):04x}) at character {m.start()}"
    return None


def _shown(key: str) -> str:
    """A key as it can be written back in a reply: NUL and surrogates as JSON escapes."""
    return SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", key).replace("\x00", "\\u0000")


def _plain(v: Any) -> Any:
    # JSONObject -> dict, so documents compare and copy as plain data.
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# Updating


def apply_update(
    doc: ShadowDocument, update: UpdateRequest, validate: Validator, now: float, authorize: Authorizer | None = None
) -> Accepted | Rejected:
    """Merge ``update`` into ``doc``: a new document (version + 1) or a refusal that changes nothing.
    ``authorize`` (when given) may refuse it with 403 before anything else is looked at."""
    token = update.client_token
    if authorize is not None:
        touched = set(flatten(doc.desired)) if update.desired is None else set().union(*touched_keys(update.desired))
        why = authorize(update, frozenset(touched))
        if why is not None:
            return Rejected(403, f"update refused, nothing changed: {why}", doc.version, client_token=token)
    if update.version is not None and update.version != doc.version:
        return Rejected(
            409,
            f"version conflict: the update names version {update.version}, the document is at version {doc.version}; "
            "get the document and send the update again (or send it without a version)",
            doc.version,
            client_token=token,
        )
    patch = update.desired
    if patch is None:
        merged: Tree = {}
        sets: set[str] = set()
        removes = set(flatten(doc.desired))
    else:
        merged = merge(doc.desired, patch)
        sets, removes = touched_keys(patch)
    too_big = _too_big(merged, doc.reported, doc.version, token)
    if too_big is not None:
        return too_big
    try:
        normalised = validate(merged, frozenset(sets))
    except DesiredInvalid as e:
        return Rejected(400, f"update refused, nothing changed: {summarise(e.errors)}", doc.version, e.errors, token)
    too_big = _too_big(normalised, doc.reported, doc.version, token)
    if too_big is not None:
        return too_big
    meta = {k: t for k, t in doc.desired_meta.items() if not any(_under(k, r) for r in removes)}
    have = flatten(normalised)
    meta = {k: t for k, t in meta.items() if k in have}
    for k in sets:
        if k in have:
            meta[k] = now
    new = replace(doc, version=doc.version + 1, desired=normalised, desired_meta=meta)
    return Accepted(new, frozenset(sets | removes), token)


def handle_update(
    doc: ShadowDocument, payload: bytes, validate: Validator, now: float, authorize: Authorizer | None = None
) -> Accepted | Rejected:
    """parse_update + apply_update; every refusal comes back as a Rejected, never an exception."""
    try:
        update = parse_update(payload)
    except BadRequest as e:
        return e.rejected(doc.version)
    return apply_update(doc, update, validate, now, authorize)


def _too_big(desired: Tree, reported: Tree, version: int, token: str | None) -> Rejected | None:
    d, r = json_size(desired), json_size(reported)
    if d + r <= MAX_STATE_BYTES:
        return None
    return Rejected(
        413,
        f"the state would be {d + r} bytes (desired {d} + reported {r}), more than {MAX_STATE_BYTES}; nothing changed",
        version,
        client_token=token,
    )


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def set_reported(doc: ShadowDocument, reported: Tree, now: float) -> ShadowDocument:
    """The document with a new reported state; metadata marks the leaves whose value changed."""
    old, new = flatten(doc.reported), flatten(reported)
    meta = {k: t for k, t in doc.reported_meta.items() if k in new}
    for k, v in new.items():
        if k not in old or not same(old[k], v) or k not in meta:
            meta[k] = now
    return replace(doc, reported=copy.deepcopy(reported), reported_meta=meta)


__all__ = [
    "MAX_CLIENT_TOKEN_BYTES",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_STATE_BYTES",
    "Accepted",
    "Authorizer",
    "BadRequest",
    "DesiredInvalid",
    "GetRequest",
    "Rejected",
    "ShadowDocument",
    "UpdateRequest",
    "Validator",
    "apply_update",
    "delta",
    "flatten",
    "handle_update",
    "json_size",
    "merge",
    "parse_get",
    "parse_update",
    "same",
    "set_reported",
    "summarise",
    "touched_keys",
    "unflatten",
]
