"""The project's exceptions: one base per boundary, so callers catch one type per boundary.

Every error carries a stable machine-readable ``code`` (used in MQTT results and CLI JSON)
and a human message that says what to fix.
"""

from __future__ import annotations

from agent.codes import ErrorCode


class EdgeAgentError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal"
    exit_code: int | None = None  # set when the error ends the daemon: EXIT_CANNOT_START (the CLI exits with it)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(EdgeAgentError):
    """Configuration that cannot be loaded or validated. The message names file, key and fix."""

    code = "config_invalid"


class ModelError(EdgeAgentError):
    """A model file that cannot be read, is outside the models folder, or is refused (not 4-bit)."""

    code = "model_invalid"


class EngineError(EdgeAgentError):
    """Inference engine failures (load, generation). ``code`` is the job error code a run that
    ends with this error is reported with (its status follows from the code)."""

    code: ErrorCode = ErrorCode.engine_error

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)


class WillNotFit(EngineError):
    """The load or request would exceed the memory budget. Do not retry on this board."""

    code = ErrorCode.will_not_fit


class ContextTooLong(EngineError):
    """prompt tokens + max_tokens exceed the loaded context."""

    code = ErrorCode.context_too_long


class NoChatTemplate(EngineError):
    """A chat job for a model without a chat template, and no engine.chat_template."""

    code = ErrorCode.no_chat_template


class SchemaRefused(EngineError):
    """response_format.schema cannot become a grammar that guarantees valid output."""

    code = ErrorCode.invalid_schema


class OutputTruncated(EngineError):
    """Structured output ended (max_tokens, a stop string) before its JSON was complete.
    ``result`` is the generation as it ended (partial text, finish_reason, stats), for the outcome."""

    code = ErrorCode.output_truncated

    def __init__(self, message: str, *, result: object) -> None:
        super().__init__(message)
        self.result = result


class StoreError(EdgeAgentError):
    """The durable job store failed."""

    code = "store_error"


class TransportError(EdgeAgentError):
    """The MQTT connection failed or was refused."""

    code = "transport_error"


# Exit codes of the CLI. EXIT_CANNOT_START lets systemd's RestartPreventExitStatus stop a
# crash loop on a configuration that will never work.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CANNOT_START = 78  # EX_CONFIG from sysexits.h
