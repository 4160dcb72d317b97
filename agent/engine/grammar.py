"""Structured output: the llama.cpp grammar that keeps a generation inside a JSON Schema.

Owns three things. ``check_schema`` refuses schemas that llama-cpp-python's JSON-Schema-to-GBNF
converter would only half enforce (it silently ignores ``minimum``, ``uniqueItems``, ``not`` ...),
so that a SUCCEEDED text really validates: the converter's own gaps become a precise
``invalid_schema`` refusal instead of an invalid "success". ``GrammarCache`` converts accepted
schemas (the converter's errors are refusals too) and keeps the GBNF text of the most recent ones
by schema hash. ``Grammar.sampler`` compiles the text for one model's vocabulary.

Pure Python apart from ``Grammar.sampler``: the converter is plain Python, but it lives in the
llama_cpp package, whose import loads libllama, so this module is imported by the engine only.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
from llama_cpp import llama_grammar

from agent.engine.types import ResponseFormat
from agent.errors import SchemaRefused

# Keywords that never change which values validate: allowed anywhere and ignored.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "readOnly",
        "writeOnly",
        "deprecated",
        "format",
        "contentEncoding",
        "contentMediaType",
        "$anchor",
    }
)
# Every keyword of JSON Schema (2020-12 and draft 7) that constrains values. A keyword that is in
# neither set is unknown to JSON Schema, so validators ignore it, and so may the grammar.
_VALIDATION = frozenset(
    {
        "type",
        "enum",
        "const",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxContains",
        "minContains",
        "maxProperties",
        "minProperties",
        "required",
        "dependentRequired",
        "properties",
        "patternProperties",
        "additionalProperties",
        "propertyNames",
        "items",
        "prefixItems",
        "additionalItems",
        "contains",
        "unevaluatedItems",
        "unevaluatedProperties",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependencies",
        "$ref",
        "$dynamicRef",
        "$recursiveRef",
    }
)
_HINTS = {
    "minimum": "the grammar bounds digits, not values",
    "maximum": "the grammar bounds digits, not values",
    "exclusiveMinimum": "the grammar bounds digits, not values",
    "exclusiveMaximum": "the grammar bounds digits, not values",
    "allOf": "write the combined object out in one schema",
    "oneOf": "use anyOf (a grammar cannot ensure that exactly one branch matches)",
    "uniqueItems": "a grammar cannot compare items",
}
# Formats whose strings the converter builds a rule for; other formats are annotations.
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
_JSON_TYPES = {"string", "number", "integer", "boolean", "null", "array", "object"}


def _branch(schema: dict[str, Any]) -> tuple[str, frozenset[str]]:
    """Which rule the converter builds for this schema (it checks keys in this order, first
    match wins: agent follows llama_cpp.llama_grammar.SchemaConverter.visit) and the
    validation keywords that rule enforces. Any other validation keyword would be ignored."""
    t = schema.get("type")
    fmt = schema.get("format")
    if "$ref" in schema:
        return "$ref", frozenset({"$ref"})
    if "anyOf" in schema or "oneOf" in schema:
        return "anyOf", frozenset({"anyOf", "oneOf"})
    if isinstance(t, list):
        return "type list", frozenset({"type"})
    if "const" in schema:
        return "const", frozenset({"const", "type"})
    if "enum" in schema:
        return "enum", frozenset({"enum", "type"})
    if t in (None, "object") and ("properties" in schema or schema.get("additionalProperties", True) is not True):
        return "object", frozenset({"type", "properties", "required", "additionalProperties"})
    if t in (None, "object") and "allOf" in schema:
        return "allOf", frozenset()  # merged only approximately (anyOf parts become optional): refused
    if t in (None, "array") and ("items" in schema or "prefixItems" in schema):
        return "array", frozenset({"type", "items", "prefixItems", "minItems", "maxItems"})
    if t in (None, "string") and "pattern" in schema:
        return "pattern", frozenset({"type", "pattern"})
    if t in (None, "string") and fmt in _FORMATS:
        return "format", frozenset({"type"})
    if t == "string" and ("minLength" in schema or "maxLength" in schema):
        return "string", frozenset({"type", "minLength", "maxLength"})
    return "type", frozenset({"type"})


def _matches_type(value: Any, t: Any) -> bool:
    types = t if isinstance(t, list) else [t]
    for name in types:
        if name == "string" and isinstance(value, str):
            return True
        if name == "boolean" and isinstance(value, bool):
            return True
        if name == "null" and value is None:
            return True
        if name == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if name == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if name == "array" and isinstance(value, list):
            return True
        if name == "object" and isinstance(value, dict):
            return True
    return False


def check_schema(schema: Any, path: str = "") -> None:
    """Raise SchemaRefused (naming the place, as a JSON pointer) unless every constraint in the
    schema is one the converter's grammar enforces. A text generated under the grammar of an
    accepted schema then validates against it."""
    where = path or "/"
    if schema is True or schema == {}:
        return
    if not isinstance(schema, dict):
        raise SchemaRefused(f"the schema at {where} must be an object, got {type(schema).__name__}")
    t = schema.get("type")
    for name in t if isinstance(t, list) else ([t] if t is not None else []):
        if name not in _JSON_TYPES:
            raise SchemaRefused(f"the schema at {where} has an unknown type {name!r}")
    branch, enforced = _branch(schema)
    if branch == "type" and t is None and any(k in _VALIDATION for k in schema):
        # e.g. {"maxLength": 5}: the converter needs the type to pick a rule.
        raise SchemaRefused(
            f"the schema at {where} needs a 'type' next to {sorted(k for k in schema if k in _VALIDATION)}"
        )
    for key in schema:
        if key in _VALIDATION and key not in enforced:
            hint = _HINTS.get(key, "the grammar cannot enforce it")
            what = f"next to {branch!r}" if branch not in ("type", "string", "object", "array", "allOf") else "here"
            raise SchemaRefused(f"keyword {key!r} at {where} is not supported {what}: {hint}")
    if branch == "type" and t is None and any(k not in _ANNOTATIONS for k in schema):
        # Only unknown keywords: the converter would fail on it ("Unrecognized schema").
        raise SchemaRefused(f"the schema at {where} has no 'type' (nor enum, const, properties ...)")
    if branch in ("const", "enum") and t is not None:
        values = [schema["const"]] if branch == "const" else schema["enum"]
        for v in values if isinstance(values, list) else []:
            if not _matches_type(v, t):
                raise SchemaRefused(f"{branch} value {v!r} at {where} is not of type {t!r}: nothing could validate")
    if branch == "enum" and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise SchemaRefused(f"enum at {where} must be a non-empty array")
    if branch == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaRefused(f"properties at {where} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise SchemaRefused(f"required at {where} must be an array")
        for name in required:
            if name not in props:
                # The converter only emits declared properties: the output would lack this one.
                raise SchemaRefused(f"required property {name!r} at {where} is not declared in properties")
        for name, sub in props.items():
            check_schema(sub, f"{path}/properties/{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            if props:
                # The grammar's extra keys are any string: one could repeat a declared key with a
                # value of the other schema.
                raise SchemaRefused(
                    f"additionalProperties with a schema next to properties at {where} is not supported: "
                    "use additionalProperties false, or a map without properties"
                )
            check_schema(extra, f"{path}/additionalProperties")
    elif branch == "array":
        if "items" in schema and "prefixItems" in schema:
            raise SchemaRefused(f"items next to prefixItems at {where} is not supported: the grammar uses only one")
        items = schema.get("items", schema.get("prefixItems"))
        if isinstance(items, list):
            n = len(items)
            lo, hi = schema.get("minItems", 0), schema.get("maxItems", n)
            if not lo <= n <= hi:
                raise SchemaRefused(f"minItems/maxItems at {where} disagree with the {n} fixed items")
            for i, sub in enumerate(items):
                check_schema(sub, f"{path}/prefixItems/{i}")
        else:
            check_schema(items, f"{path}/items")
    elif branch == "anyOf":
        if "anyOf" in schema and "oneOf" in schema:
            raise SchemaRefused(f"anyOf next to oneOf at {where} is not supported")
        if "oneOf" in schema:
            raise SchemaRefused(f"keyword 'oneOf' at {where} is not supported: {_HINTS['oneOf']}")
        alts = schema["anyOf"]
        if not isinstance(alts, list) or not alts:
            raise SchemaRefused(f"anyOf at {where} must be a non-empty array")
        for i, sub in enumerate(alts):
            check_schema(sub, f"{path}/anyOf/{i}")
    elif branch == "$ref":
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaRefused(f"$ref {ref!r} at {where} is not supported: only local references (#/...)")
    for key in ("$defs", "definitions"):
        defs = schema.get(key)
        if isinstance(defs, dict):
            for name, sub in defs.items():
                check_schema(sub, f"{path}/{key}/{name}")


# The converter's string character rule lets raw control characters through (JSON forbids them
# inside strings, and llama.cpp's own C++ converter excludes them): replace it where it appears.
_LOOSE_CHAR = llama_grammar.PRIMITIVE_RULES["char"].content
_STRICT_CHAR = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_RULE_RE = re.compile(r"^([A-Za-z0-9-]+) ::= (.*)$")


@dataclass(frozen=True)
class Grammar:
    """A converted schema: GBNF text with its root rule ``root``."""

    key: str  # sha256 of the canonical schema
    gbnf: str
    convert_ms: float  # converting it (check_schema included), when it was first built

    def sampler(self, vocab: Any) -> Any:
        """A fresh llama.cpp grammar sampler for this vocabulary (the caller frees it). Raises
        SchemaRefused when llama.cpp cannot parse the grammar."""
        smpl = C.llama_sampler_init_grammar(vocab, self.gbnf.encode("utf-8"), b"root")
        if not smpl:
            raise SchemaRefused("llama.cpp could not parse the grammar built from the schema (see the agent's log)")
        return smpl


def build_grammar(rf: ResponseFormat) -> Grammar:
    """Check and convert; raises SchemaRefused with the converter's reason."""
    t0 = time.perf_counter()
    schema = rf.effective_schema()
    check_schema(schema)
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaRefused("the schema is too deeply nested or recursive for the grammar converter") from None
    except Exception as e:  # noqa: BLE001  the converter raises AssertionError, ValueError, KeyError ...
        reason = str(e) or type(e).__name__
        raise SchemaRefused(f"the grammar converter cannot handle the schema: {reason}") from None
    lines = []
    for line in gbnf.splitlines():
        m = _RULE_RE.match(line)
        if m and m.group(2) == _LOOSE_CHAR:
            line = f"{m.group(1)} ::= {_STRICT_CHAR}"
        lines.append(line)
    return Grammar(rf.key(), "\n".join(lines) + "\n", (time.perf_counter() - t0) * 1000)


class GrammarCache:
    """The most recently used grammars by schema hash (the schema is the whole key: the GBNF
    text does not depend on the model). Thread-safe; refusals are not cached."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, rf: ResponseFormat) -> Grammar:
        key = rf.key()
        with self._lock:
            g = self._items.get(key)
            if g is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return g
        g = build_grammar(rf)
        with self._lock:
            self.misses += 1
            self._items[key] = g
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return g

    def __len__(self) -> int:
        return len(self._items)
