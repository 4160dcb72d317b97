"""Job statuses and error codes: the one definition of each, shared by every layer.

No imports from the rest of the project, so the engine, the store, the protocol and the runner
all speak the same enum without a mapping table between them. A code carries the terminal status
it is reported with; an ``EngineError`` carries its code, so an outcome never re-parses a string.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class _Documented(StrEnum):
    """A string enum whose every member is given as ``"VALUE", "its doc"``: the doc tables read ``doc``."""

    # The default only lets a type checker see ``JobStatus("QUEUED")`` (a lookup by value, which
    # never calls this) as valid; every member gives its doc.
    def __new__(cls, value: str, doc: str = "") -> Self:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.doc = doc
        return obj

    doc: str


class JobStatus(_Documented):
    """A job's state. Every status message and result carries one."""

    QUEUED = "QUEUED", "Stored durably and waiting to run. The submit message was acknowledged only after this."
    IN_PROGRESS = "IN_PROGRESS", "Running on the engine. `attempt` counts the runs started."
    SUCCEEDED = "SUCCEEDED", "Finished; the result holds the text. Terminal."
    FAILED = (
        "FAILED",
        "Could not complete on this device this time (engine error, interrupted too often). "
        "Retrying, here later or elsewhere, may succeed. Terminal.",
    )
    REJECTED = (
        "REJECTED",
        "Will not be run: do not retry the same request on this device (invalid payload, "
        "queue full, context too long, will not fit memory, expired). Terminal.",
    )
    CANCELED = "CANCELED", "Stopped by a cancel request; a partial text may be included. Terminal."
    TIMED_OUT = "TIMED_OUT", "Ran longer than its timeout_s; a partial text may be included. Terminal."
    RELEASED = (
        "RELEASED",
        "A fleet job this device no longer holds, never started here: handed to the board named in "
        "handed_to (which sends its own statuses next), or, without handed_to, given back because this device "
        "was away from the broker for mqtt.fleet_lease_s / 2: the submitter sends it again to the fleet topic. "
        "Status only (no result from this device).",
    )


class WaitReason(_Documented):
    """Why a queued job is not running yet: the ``waiting_for`` of its QUEUED status, ``jobs show`` and
    ``status``. Every wait is bounded (docs/protocol.md, "Waiting")."""

    slot = (
        "slot",
        "Every slot of the engine (engine.max_parallel) is running a job, or a job ahead of it in the queue takes the next free one.",
    )
    memory = (
        "memory",
        "Its KV cache does not fit the memory available now, or the governor holds new jobs under memory pressure. Ends FAILED memory_wait_exceeded after governor.memory_wait_max_s with nothing else running.",
    )
    reserved = (
        "reserved",
        "A job ahead of it has waited for memory longer than governor.reserve_after_s: the next free capacity is kept for that job, so it is not starved by smaller ones.",
    )
    model = (
        "model",
        "No model is loaded: a model change, a canary, or a load that failed (the shadow's reported state says which).",
    )
    paused = (
        "paused",
        "Intake is paused (intake.paused in the device shadow or the config): queued jobs start when it is resumed.",
    )


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELED, JobStatus.TIMED_OUT}
)


class ErrorCode(StrEnum):
    """Why a job did not succeed. Each code comes with the terminal status it is reported with."""

    def __new__(cls, value: str, status: JobStatus = JobStatus.FAILED, doc: str = "") -> ErrorCode:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.status = status
        obj.doc = doc
        return obj

    status: JobStatus
    doc: str

    invalid_payload = (
        "invalid_payload",
        JobStatus.REJECTED,
        "The submit payload is not a valid job: not UTF-8, not JSON, not an object, unknown or duplicate keys, "
        "a missing field, a wrong type or a value out of bounds. The message names each field and what was wrong.",
    )
    invalid_request = (
        "invalid_request",
        JobStatus.REJECTED,
        "The job is well-formed but this model cannot run it as asked (for example an empty prompt with a model "
        "that adds no BOS token). The message says what to change.",
    )
    payload_too_large = (
        "payload_too_large",
        JobStatus.REJECTED,
        "The payload is larger than 6 x engine.max_prompt_bytes + 64 KiB and was refused without being parsed.",
    )
    prompt_too_large = (
        "prompt_too_large",
        JobStatus.REJECTED,
        "The prompt is longer, in UTF-8 bytes, than engine.max_prompt_bytes (checked before tokenising).",
    )
    max_tokens_too_large = (
        "max_tokens_too_large",
        JobStatus.REJECTED,
        "max_tokens is larger than engine.max_tokens_limit.",
    )
    expired = (
        "expired",
        JobStatus.REJECTED,
        "expires_at passed before the job could start (on arrival, or while it waited in the queue).",
    )
    queue_full = (
        "queue_full",
        JobStatus.REJECTED,
        "store.queue_max jobs were already waiting. Send it again later or to another device.",
    )
    context_too_long = (
        "context_too_long",
        JobStatus.REJECTED,
        "The prompt alone fills the context of one slot (engine.n_ctx, per slot), counted with the loaded "
        "model's tokenizer, and engine.context_overflow is 'refuse'. The message gives both numbers. A prompt "
        "that fits runs even when prompt + max_tokens does not: it stops at the context's end (finish_reason "
        "length). Shorten the prompt, or send it to a board with a larger context.",
    )
    no_chat_template = (
        "no_chat_template",
        JobStatus.REJECTED,
        "A chat job for a model whose GGUF file has no chat template (tokenizer.chat_template), with no "
        "engine.chat_template set on the device. Send a generate job, or configure a template.",
    )
    invalid_schema = (
        "invalid_schema",
        JobStatus.REJECTED,
        "response_format.schema cannot be turned into a grammar that guarantees valid output: a keyword the "
        "grammar converter does not enforce, or a schema it cannot convert. The message has the converter's reason.",
    )
    output_truncated = (
        "output_truncated",
        JobStatus.FAILED,
        "A structured-output job ended before its JSON was complete (max_tokens reached, or a stop string "
        "matched), so its text is not valid JSON. Raise max_tokens or bound the schema (maxLength, maxItems); "
        "with greedy sampling the same request ends the same way.",
    )
    result_too_large = (
        "result_too_large",
        JobStatus.FAILED,
        "The result is larger than the broker takes in one message (its CONNACK Maximum Packet Size), so it could "
        "not be sent. The text is left out; the message gives both sizes. Ask for fewer max_tokens or raise the "
        "broker's packet size limit (Mosquitto: max_packet_size).",
    )
    will_not_fit = (
        "will_not_fit",
        JobStatus.REJECTED,
        "Running the job would exceed the memory budget of this board.",
    )
    insufficient_memory = (
        "insufficient_memory",
        JobStatus.REJECTED,
        "The job's memory (its KV cache for prompt + max_tokens, next to the model) can never fit this board's "
        "memory budget. Lower max_tokens or the prompt, or send it to a larger board.",
    )
    memory_wait_exceeded = (
        "memory_wait_exceeded",
        JobStatus.FAILED,
        "The job waited for memory longer than governor.memory_wait_max_s while nothing else ran here: the "
        "board never had room for it. The message gives what it needed and what was available. It may "
        "succeed later, with a smaller max_tokens or prompt, or on another device.",
    )
    model_not_loaded = (
        "model_not_loaded",
        JobStatus.FAILED,
        "No model is loaded (loading failed, or the model is being replaced). This device may succeed later.",
    )
    preempted = (
        "preempted",
        JobStatus.FAILED,
        "The job was preempted (memory pressure, a model change) more often than store.max_preemptions allows, "
        "and those runs used up store.max_attempts. It may succeed later or on another device.",
    )
    engine_error = (
        "engine_error",
        JobStatus.FAILED,
        "The inference engine failed while running the job. The message has the engine's reason.",
    )
    interrupted = (
        "interrupted",
        JobStatus.FAILED,
        "The agent stopped (crash, power loss, OOM kill) while the job ran, store.max_attempts times in a row.",
    )
    timeout = (
        "timeout",
        JobStatus.TIMED_OUT,
        "The job ran longer than its timeout_s (counted from the start of the run, not from arrival).",
    )
    canceled = (
        "canceled",
        JobStatus.CANCELED,
        "A cancel request stopped the job, either while it waited or while it ran.",
    )
    internal = (
        "internal",
        JobStatus.FAILED,
        "An unexpected error in the agent itself; the message has details. Please report it.",
    )


__all__ = ["ErrorCode", "JobStatus", "TERMINAL", "WaitReason"]
