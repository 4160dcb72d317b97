"""What an operator may put in the shadow's desired state, and how it is checked.

The desired keys are the live settings (``agent.config.live.live_keys``): their types, bounds and
descriptions are taken from the Settings field definitions, so there is no second copy of the
settings here. A desired state is checked in three steps, and every bad key gets its own message:

1. the keys: each must be a live setting (a known setting that is not live needs a restart, and
   is refused with that said);
2. the values, strictly as JSON types (``"512"`` is not an integer, ``1`` is not ``true``), with
   the field's bounds (``desired_model``); file names and URLs (``NAME_KEYS``) without control
   characters (NUL and unpaired surrogates, in any key or value, are refused earlier, when the
   update is read: agent.shadow.document);
3. the settings the board would run with, ``effective_settings``: the board's config file
   overlaid by desired, validated by Settings itself, so every validator and cross-field rule of
   the config file applies (negative n_ctx, a quantised V cache without flash attention);

and, when the update sets ``model.path``, the file is checked on the board: inside
``device.models_dir`` (``..`` and symlinks that escape are refused), present, a readable GGUF, and
4-bit (``check_quantization``). A model that reads fine but does not load is found when it is
loaded, and rolled back by the daemon. A file that is not there yet but has a ``model.url`` is
downloaded by the board (agent/models/library.py) and checked once it is there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from agent.config import Settings
from agent.config.inforce import DesiredInvalid, effective_settings, json_kind
from agent.config.live import all_keys, live_keys
from agent.config.tree import Tree
from agent.errors import ModelError
from agent.models.gguf_info import check_quantization, read_model_info

MODEL_PATH = "model.path"
# A file name or a URL: no control characters. A newline or a tab in a name is never meant, and a URL
# with one would be refused by the HTTP client much later, far from the update that set it.
NAME_KEYS = (MODEL_PATH, "model.url")


# --------------------------------------------------------------------------------------------
# The model, from the settings


def _sections() -> dict[str, dict[str, tuple[Any, FieldInfo]]]:
    """Live fields per section, with the Settings field definitions, in declaration order."""
    out: dict[str, dict[str, tuple[Any, FieldInfo]]] = {}
    for key in live_keys():
        section, name = key.split(".", 1)
        info = Settings.model_fields[section].annotation.model_fields[name]  # type: ignore[union-attr]
        out.setdefault(section, {})[name] = (info.annotation, info)
    return out


def _field(annotation: Any, info: FieldInfo, nullable: bool, note: str) -> tuple[Any, FieldInfo]:
    description = f"{info.description} {note}".strip() if note else info.description
    return (annotation | None if nullable else annotation), FieldInfo.merge_field_infos(
        info, default=None, description=description
    )


@cache
def section_models(nullable: bool = False) -> dict[str, type[BaseModel]]:
    """One model per settings section with live keys, holding those keys (all optional)."""
    strict = ConfigDict(extra="forbid", strict=True)
    note = "null: remove it from desired (the board's config file applies)." if nullable else ""
    out: dict[str, type[BaseModel]] = {}
    for section, fields in _sections().items():
        out[section] = create_model(  # type: ignore[call-overload]
            f"Desired{section.capitalize()}{'Patch' if nullable else ''}",
            __config__=strict,
            __doc__=f"Run-time settings of [{section}] (docs/configuration.md).",
            **{name: _field(ann, info, nullable, note) for name, (ann, info) in fields.items()},
        )
    return out


@cache
def desired_model(nullable: bool = False) -> type[BaseModel]:
    """The desired state as a pydantic model: one optional object per settings section with live keys.

    ``nullable=False`` (DesiredState): what desired holds, and what ``validate_desired`` checks
    values with (strict JSON types). ``nullable=True`` (DesiredPatch): what an update may send,
    where null removes a key.
    """
    sections: dict[str, Any] = {}
    for section, model in section_models(nullable).items():
        description = Settings.model_fields[section].description
        if nullable:
            description = f"{description} null: remove the whole section."
        sections[section] = (model | None, FieldInfo(default=None, description=description))
    name = "DesiredPatch" if nullable else "DesiredState"
    doc = (
        "A partial desired state: only the keys to change; null removes a key."
        if nullable
        else "The desired state: the live settings an operator set, by section."
    )
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), __doc__=doc, **sections)


# --------------------------------------------------------------------------------------------
# Checking


def validate_desired(
    merged: Tree,
    touched: frozenset[str] | set[str],
    base: Settings,
    *,
    check_board: bool = True,
    read_header: bool = True,
) -> Tree:
    """Check a whole desired state against the board; return it normalised (JSON values as the
    settings hold them: "./a.gguf" -> "a.gguf", 30 -> 30.0), or raise DesiredInvalid.

    ``touched``: the dotted keys the update sets. Errors that belong to a section as a whole (a
    cross-field rule) are reported under the touched keys of that section; board checks of the
    model file run only when the update sets model.path; ``read_header`` False: they do not parse the
    file (a board that trusts operator keys reads it only once its signature is judged, at load).
    """
    errors = _key_errors(merged)
    normalised: Tree = {}
    models = section_models()
    for section, values in merged.items():
        if section not in models or not isinstance(values, Mapping):
            continue
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in errors or key not in live_keys():
                continue
            if key in NAME_KEYS and isinstance(value, str) and (why := _control_chars(value)):
                errors[key] = why
                continue
            # One key at a time, so every bad key gets its message and the good ones are still checked
            # together below.
            try:
                checked = models[section].model_validate_json(json.dumps({name: value}))
            except ValidationError as e:
                errors.update(_value_errors(e, section))
                continue
            normalised.setdefault(section, {}).update(checked.model_dump(mode="json", exclude_unset=True))
    settings: Settings | None = None
    try:
        settings = effective_settings(base, normalised, touched=touched)
    except DesiredInvalid as e:
        errors.update(e.errors)
    if check_board and MODEL_PATH in touched and MODEL_PATH not in errors:
        try:
            model_settings = settings or effective_settings(base, {"model": normalised.get("model", {})})
        except DesiredInvalid as e:
            errors.update(e.errors)
        else:
            problem = check_model_file(model_settings, read_header=read_header)
            if problem is not None:
                errors[MODEL_PATH] = problem
    if errors:
        raise DesiredInvalid(errors)
    return normalised


def _key_errors(merged: Mapping[str, Any]) -> dict[str, str]:
    kinds = all_keys()
    sections = sorted({k.split(".", 1)[0] for k in live_keys()})
    errors: dict[str, str] = {}
    for section, value in merged.items():
        if "." in section and section in kinds:
            first, rest = section.split(".", 1)
            errors[section] = f'write nested objects: {{"{first}": {{"{rest}": ...}}}}'
        elif section not in sections:
            if section in Settings.model_fields:
                errors[section] = "no setting of this section can change at run time; change it in the config file"
            else:
                errors[section] = f"unknown section; run-time settings are in: {', '.join(sections)}"
        elif not isinstance(value, Mapping):
            errors[section] = f"must be an object of settings, got {json_kind(value)}"
        else:
            for name in value:
                key = f"{section}.{name}"
                if key not in kinds:
                    names = ", ".join(k.split(".", 1)[1] for k in live_keys() if k.startswith(section + "."))
                    errors[key] = f"unknown key; the run-time settings of {section} are: {names}"
                elif kinds[key] is None:
                    errors[key] = "takes effect only at a restart: change it in the board's config file"
    return errors


def _control_chars(text: str) -> str | None:
    for pos, ch in enumerate(text):
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            return f"contains the control character U+{ord(ch):04X} at character {pos}; a file name or URL has none"
    return None


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "path_type": "a path (a string)",
}


def _value_errors(err: ValidationError, section: str) -> dict[str, str]:
    by_key: dict[str, list[ErrorDetails]] = {}
    for e in err.errors(include_url=False):
        # loc is (field, [union member tag ...]): the tags are not keys anyone can write.
        by_key.setdefault(f"{section}.{e['loc'][0]}", []).append(e)
    return {key: _explain(errs) for key, errs in by_key.items()}


def _explain(errs: list[ErrorDetails]) -> str:
    value = errs[0].get("input")
    got = f", got {json_kind(value)}"
    kinds = [e["type"] for e in errs]
    if all(k in _EXPECTED or k == "literal_error" for k in kinds):
        wanted = []
        for e in errs:
            if e["type"] == "literal_error":
                expected = str(e["ctx"]["expected"])
                wanted.append(f"one of {expected}" if " or " in expected else expected)
            else:
                wanted.append(_EXPECTED[e["type"]])
        text = " or ".join(dict.fromkeys(wanted))
        hint = " (integers are written without a fraction or quotes)" if "an integer" in wanted else ""
        return f"must be {text}{got}{hint}"
    # A union where the type matched one member but a bound failed: the bound is the story.
    e = next((x for x in errs if x["type"] not in _EXPECTED and x["type"] != "literal_error"), errs[0])
    ctx = e.get("ctx") or {}
    if e["type"] == "greater_than_equal":
        return f"{_num(value)} is below the minimum {_num(ctx.get('ge'))}"
    if e["type"] == "less_than_equal":
        return f"{_num(value)} is above the maximum {_num(ctx.get('le'))}"
    if e["type"] == "greater_than":
        return f"must be greater than {_num(ctx.get('gt'))}{got}"
    if e["type"] == "string_pattern_mismatch":
        return f"does not match {ctx.get('pattern')}{got}"
    if e["type"] == "extra_forbidden":
        return "unknown key"
    return f"{str(e['msg']).removeprefix('Value error, ')}{got}"


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(v)


# --------------------------------------------------------------------------------------------
# The settings the board runs with


def check_model_file(settings: Settings, *, read_header: bool = True) -> str | None:
    """Why the configured model file cannot be used on this board (None: it can). ``read_header``
    False: only where it is (the 4-bit rule is checked at load)."""

    try:
        path = settings.model_file()  # inside device.models_dir, symlinks resolved, exists
        if read_header:
            check_quantization(read_model_info(path), settings.model.allow_non_4bit)
    except ModelError as e:
        if e.code == "model_not_found" and settings.model.url is not None:
            return _download_target_problem(settings.model.path)  # the board fetches it, then checks it
        return str(e)
    except OSError as e:  # a name too long for the filesystem, a permission problem
        return f"cannot check the model file: {e.strerror or e}"
    except ValueError as e:  # a name the OS cannot take (the update's reading refuses NUL before this)
        return f"cannot check the model file: {e}"
    return None


def _download_target_problem(path: Path) -> str | None:

    p = Path(path)
    if p.is_absolute() or len(p.parts) != 1 or p.name.startswith("."):
        return (
            f"with model.url, model.path must be a plain file name (the file is downloaded into "
            f"device.models_dir), got {str(path)!r}"
        )
    return None


def live_values(settings: Settings) -> dict[str, Any]:
    """Every live setting's value in ``settings``, dotted, as JSON values."""
    data = settings.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in live_keys():
        section, name = key.split(".", 1)
        out[key] = data[section][name]
    return out


__all__ = [
    "MODEL_PATH",
    "NAME_KEYS",
    "check_model_file",
    "desired_model",
    "section_models",
    "live_values",
    "validate_desired",
]
