"""The device shadow on the wire: payload models for every shadow topic.

Inbound models (``ShadowUpdate``, ``ShadowGet``) document what operators send; the payloads are
read by ``agent.shadow.document.parse_update`` / ``parse_get``, which name every problem instead
of stopping at the first. Outbound models are built by the service from a ``ShadowDocument`` and
give compact UTF-8 JSON with ``to_payload()``. The desired and reported shapes come from the
settings (``agent.shadow.desired``), so the JSON Schemas in docs/protocol.md list every desired key
with its type, bounds and meaning. Fields that are not set are left out of the payload.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

# The outbound conventions of the job protocol (RFC 3339 "ts", unknown fields are bugs).
from agent.mqtt.grants import BrokerReport
from agent.mqtt.wire import TIMESTAMP, Outbound, rfc3339
from agent.shadow.desired import desired_model, section_models
from agent.shadow.document import MAX_CLIENT_TOKEN_BYTES, MAX_DEPTH, MAX_STATE_BYTES, ShadowDocument
from agent.shadow.facts import BoardFacts, DownloadReport, ModelChangeReport, Pressure, ServingModel

DesiredPatch = desired_model(nullable=True)
DesiredState = desired_model(nullable=False)

_TOKEN = Field(
    default=None,
    description=f"Any text up to {MAX_CLIENT_TOKEN_BYTES} UTF-8 bytes, echoed in the reply so a client can match "
    "it to its request.",
)


def _reported_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        section: (model | None, FieldInfo(default=None, description=f"The values of [{section}] in force."))
        for section, model in section_models(False).items()
    }
    fields["errors"] = (
        dict[str, str] | None,
        FieldInfo(default=None, description="Dotted key -> why its desired value could not be applied. The old value "
                  "stays in force, so the key stays in delta until a new desired value (or a restart) is tried."),
    )  # fmt: skip
    fields["pending"] = (
        dict[str, str] | None,
        FieldInfo(default=None, description="Dotted key -> note, for values accepted and kept that nothing acts on "
                  "yet (\"not applied yet\")."),
    )  # fmt: skip
    fields["applied_version"] = (
        int | None,
        FieldInfo(default=None, ge=0, description="The desired version the board last finished applying: every key "
                  "of it is in force, or has its error under errors."),
    )  # fmt: skip
    fields["board"] = (BoardFacts | None, FieldInfo(default=None, description="Facts about the board."))
    fields["serving"] = (ServingModel | None, FieldInfo(default=None, description="The model in force; null while "
                                                                                  "none is loaded."))  # fmt: skip
    fields["pressure"] = (
        Pressure | None,
        FieldInfo(default=None, description="The memory governor: level and action."),
    )
    fields["download"] = (DownloadReport | None, FieldInfo(default=None, description="The current or last model "
                                                           "download (model.url); absent before the first."))  # fmt: skip
    fields["model_change"] = (ModelChangeReport | None, FieldInfo(default=None, description="How the last model "
                                                                  "change ended; absent before the first."))  # fmt: skip
    fields["broker"] = (BrokerReport | None, FieldInfo(default=None, description="What the broker granted on the "
                                                       "latest connection, and what it costs this board."))  # fmt: skip
    return create_model(
        "ReportedState",
        __config__=ConfigDict(extra="forbid"),
        __doc__="What the board really runs: every run-time setting's value in force, errors, notes, facts.",
        **fields,
    )


ReportedState = _reported_model()
# Names that reported uses besides the settings sections.
# Facts the daemon reports next to the settings in force (never desired keys).
FACT_KEYS = ("board", "serving", "pressure", "download", "model_change", "broker")
REPORTED_EXTRAS = ("errors", "pending", "applied_version", *FACT_KEYS)


# --------------------------------------------------------------------------------------------
# Inbound (documentation; parsed by agent.shadow.document)


class ShadowUpdateState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: DesiredPatch | None = Field(  # type: ignore[valid-type]
        description="The keys to change, nested by section; null removes every desired key (the config file "
        f"applies). At most {MAX_DEPTH} levels deep."
    )


class UpdateSignature(BaseModel):
    """Ed25519 over the device id, the version, the desired patch and expires (agent/signing.py)."""

    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="The signing key's id (`edge-agent keys show`).")
    expires: str = Field(description="UTC time after which the board refuses the update, YYYY-MM-DDTHH:MM:SSZ.")
    sig: str = Field(description="The signature, base64 (64 bytes).")


class ShadowUpdate(BaseModel):
    """Published to {root}/shadow/update (QoS 1) by operators."""

    model_config = ConfigDict(extra="forbid")

    state: ShadowUpdateState = Field(description="Only desired: reported is written by the device.")
    version: int | None = Field(
        default=None,
        ge=0,
        description="Optimistic lock: when given, it must equal the document's version, else the update is rejected "
        "with 409. Leave it out to merge regardless.",
    )
    client_token: str | None = _TOKEN
    signature: UpdateSignature | None = Field(
        default=None,
        description="The operator's signature (`edge-agent shadow set --key`). Required, with version, when the board "
        "trusts operator keys (model.trusted_keys) and the update sets or removes model.*, download.*, "
        "engine.chat_template or canary.json_schema; else 403.",
    )


class ShadowGet(BaseModel):
    """Published to {root}/shadow/get by operators: empty, or this object."""

    model_config = ConfigDict(extra="forbid")

    client_token: str | None = _TOKEN


# --------------------------------------------------------------------------------------------
# Outbound


class _ShadowOutbound(Outbound):
    @classmethod
    def build(cls, **fields: Any) -> Self:
        # The desired/reported models validate strictly (JSON types, for operators' input); the
        # device's own JSON values (paths as strings) go through the lax mode.
        return cls.model_validate(fields, strict=False)

    def to_payload(self) -> bytes:
        return self.model_dump_json(exclude_unset=True).encode("utf-8")


class AcceptedState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: DesiredState = Field(description="The whole desired state after the merge.")  # type: ignore[valid-type]


class ShadowUpdateAccepted(_ShadowOutbound):
    """Published on {root}/shadow/update/accepted (QoS 1) for every accepted update."""

    version: int = Field(ge=1, description="The document's new version (the previous one + 1).")
    state: AcceptedState = Field(description="The merged desired state.")
    client_token: str | None = _TOKEN
    ts: AwareDatetime = TIMESTAMP


class ShadowRejected(_ShadowOutbound):
    """Published on {root}/shadow/update/rejected (QoS 1) for a refused update, and on
    {root}/shadow/get/rejected for an unreadable get. A refused update changed nothing."""

    code: Literal[400, 403, 409, 413, 500] = Field(
        description="400: invalid (JSON, types, bounds, unknown keys, the model file); 403: a change that needs the "
        "operator's signature is unsigned or badly signed; 409: version conflict; "
        f"413: payload or state larger than {MAX_STATE_BYTES} bytes; 500: the device could not store it."
    )
    message: str = Field(description="What was wrong, and what to do.")
    errors: dict[str, str] | None = Field(default=None, description="Dotted key -> what is wrong with it (400).")
    version: int = Field(ge=0, description="The document's version (unchanged).")
    client_token: str | None = _TOKEN
    ts: AwareDatetime = TIMESTAMP


class KeyMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    updated: str = Field(
        description="When the value last changed, RFC 3339 UTC.", json_schema_extra={"format": "date-time"}
    )


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: dict[str, KeyMeta] = Field(description="Dotted desired key -> when an accepted update set it.")
    reported: dict[str, KeyMeta] = Field(description="Dotted reported key -> when its value in force last changed.")


class DocumentState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: DesiredState = Field(description="What operators asked for.")  # type: ignore[valid-type]
    reported: ReportedState = Field(description="What the board runs.")  # type: ignore[valid-type]
    delta: DesiredState = Field(description="The desired keys whose value differs from reported.")  # type: ignore[valid-type]


class ShadowDocumentMessage(_ShadowOutbound):
    """Retained on {root}/shadow, republished whenever the document changes; also the reply on
    {root}/shadow/get/accepted (with the request's client_token)."""

    version: int = Field(ge=0, description="Counts accepted updates; 0 before the first one.")
    state: DocumentState = Field(description="desired, reported and delta.")
    metadata: Metadata = Field(description="When each key last changed.")
    client_token: str | None = _TOKEN
    ts: AwareDatetime = TIMESTAMP


class ShadowDelta(_ShadowOutbound):
    """Published on {root}/shadow/delta (QoS 1) whenever the set of differing keys changes and is not empty."""

    version: int = Field(ge=0, description="The document's version.")
    state: DesiredState = Field(description="The desired keys whose value differs from reported, nested.")  # type: ignore[valid-type]
    ts: AwareDatetime = TIMESTAMP


def document_message(doc: ShadowDocument, ts: float, client_token: str | None = None) -> ShadowDocumentMessage:
    fields: dict[str, Any] = {
        "version": doc.version,
        "state": {"desired": doc.desired, "reported": doc.reported, "delta": doc.delta()},
        "metadata": {
            "desired": {k: {"updated": rfc3339(t)} for k, t in sorted(doc.desired_meta.items())},
            "reported": {k: {"updated": rfc3339(t)} for k, t in sorted(doc.reported_meta.items())},
        },
        "ts": ts,
    }
    if client_token is not None:
        fields["client_token"] = client_token
    return ShadowDocumentMessage.build(**fields)


INBOUND_MODELS: tuple[type[BaseModel], ...] = (ShadowUpdate, ShadowGet)
OUTBOUND_MODELS: tuple[type[BaseModel], ...] = (
    ShadowUpdateAccepted,
    ShadowRejected,
    ShadowDocumentMessage,
    ShadowDelta,
)


def json_schema() -> dict[str, Any]:
    """One JSON Schema document with every shadow payload under $defs (the desired and reported
    shapes are shared, not repeated per message). Validation mode: keys not set may be absent."""
    _, schema = models_json_schema(
        [(m, "validation") for m in (*INBOUND_MODELS, *OUTBOUND_MODELS)], title="edge-agent device shadow payloads"
    )
    return schema


__all__ = [
    "DesiredPatch",
    "DesiredState",
    "FACT_KEYS",
    "REPORTED_EXTRAS",
    "ReportedState",
    "ShadowDelta",
    "ShadowDocumentMessage",
    "ShadowGet",
    "ShadowRejected",
    "ShadowUpdate",
    "ShadowUpdateAccepted",
    "document_message",
    "json_schema",
]
