"""The settings tree: one pydantic model per section.

Every field has a description, a unit where it has one (in the description, and in the
field name suffix: _s, _ms, _mb, _pct) and bounds. Unknown keys are refused everywhere.
Paths that are relative are resolved by ``agent.config.load`` against the config file's folder.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Which settings may change while the daemon runs is declared on the field itself, and read by
# agent.config.live (the one diff-and-apply path for SIGHUP and the device shadow):
#   HOT    applied in place (a limit, a priority, an interval);
#   RELOAD applied by the model supervisor reloading the model with the new value (rolled back if
#          the new model does not load).
# Fields without a marker need a restart (the broker connection, the device identity, paths).
HOT = {"live": "hot"}
RELOAD = {"live": "reload"}


_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _default_device_id() -> str:
    # A hostname is a stable per-board name on an image; keep only topic-safe characters.
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return (name or "edge-device")[:64]


class DeviceSettings(Section):
    id: str = Field(
        default_factory=_default_device_id,
        pattern=_ID_PATTERN,
        description="Device identifier used in MQTT topics (letters, digits, '-', '_'; 1-64). Default: the hostname.",
    )
    board: str = Field(
        default="generic",
        max_length=64,
        description="Board profile name, reported upstream (informational).",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edge-agent"),
        description="Folder for the job store and runtime state (systemd StateDirectory).",
    )
    models_dir: Path = Field(
        default=Path("/var/lib/edge-agent/models"),
        description="Folder that holds GGUF models. Model paths outside it are refused.",
    )


class TLSSettings(Section):
    enabled: bool = Field(default=False, description="Connect with TLS.")
    ca_file: Path | None = Field(default=None, description="CA bundle (PEM) to verify the broker. None: system store.")
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(default=None, description="Client private key (PEM) for mutual TLS.")
    insecure_skip_verify: bool = Field(
        default=False, description="Do not verify the broker's hostname. For lab use only; logged as a warning."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "TLSSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together (client certificate and its key)")
        return self


class MQTTSettings(Section):
    host: str = Field(default="127.0.0.1", min_length=1, max_length=253, description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port (8883 is usual with TLS).")
    prefix: str = Field(
        default="edge", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="First topic level: {prefix}/{device_id}/..."
    )
    client_id: str | None = Field(
        default=None,
        pattern=_ID_PATTERN,
        description="MQTT client id. Default: edge-agent-{device_id}. Must be stable for the persistent session.",
    )
    fleet_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Also take jobs from the shared subscription $share/{group}/{prefix}/fleet/jobs/submit.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive, seconds.")
    session_expiry_s: int = Field(
        default=86400,
        ge=0,
        le=4294967295,
        description="MQTT 5 session expiry, seconds: how long the broker keeps QoS 1 jobs while the board is offline.",
    )
    reconnect_min_s: float = Field(default=1.0, ge=0.1, le=60, description="First reconnect delay, seconds.")
    reconnect_max_s: float = Field(default=120.0, ge=1, le=3600, description="Largest reconnect delay, seconds.")
    max_inflight: int = Field(default=20, ge=1, le=1000, description="QoS 1 messages in flight at once (outgoing).")
    username: str | None = Field(default=None, max_length=256, description="Broker user name.")
    password: SecretStr | None = Field(
        default=None,
        description="Broker password. Prefer the systemd credential 'mqtt_password' ($CREDENTIALS_DIRECTORY) "
        "or EDGE_AGENT__MQTT__PASSWORD over writing it into a file.",
    )
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS to the broker.")

    @model_validator(mode="after")
    def _backoff_order(self) -> "MQTTSettings":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self


class ModelSettings(Section):
    path: Path = Field(
        default=Path("demo-tiny.gguf"),
        description="GGUF model file, relative to device.models_dir (or absolute, inside it).",
        json_schema_extra=RELOAD,
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        json_schema_extra=RELOAD,
        description="Expected SHA-256 of the model file (64 lower-case hex digits). When set, a file that does not "
        "match is not loaded (the previous model keeps serving). None: not checked.",
    )
    allow_non_4bit: bool = Field(
        default=False,
        description="Accept models whose weights are not 4-bit (they need more memory than the budget planning assumes).",
    )


KVType = Literal["f16", "q8_0", "q4_0"]


class EngineSettings(Section):
    load_mode: Literal["auto", "fit", "fast"] = Field(
        default="auto",
        description="fit: weights stay file-backed mmap pages (least memory). fast: weights repacked into anonymous "
        "memory (faster, costs about the weight size again). auto: fast only when the budget holds it with room.",
        json_schema_extra=RELOAD,
    )
    n_ctx: int | Literal["auto"] = Field(
        default="auto",
        description="Context size in tokens (16-131072), or 'auto': the largest that fits the budget, capped at "
        "engine.auto_ctx_max and the model's training context.",
        json_schema_extra=RELOAD,
    )
    auto_ctx_max: int = Field(default=4096, ge=16, le=131072, json_schema_extra=RELOAD, description="Upper bound for n_ctx='auto', tokens.")
    n_threads: int | Literal["auto"] = Field(
        default="auto", description="CPU threads for generation (1-64), or 'auto': the number of usable cores.",
        json_schema_extra=RELOAD,
    )
    n_batch: int = Field(
        default=128,
        ge=8,
        le=2048,
        description="Prompt batch size, tokens. The compute buffer grows with n_batch x vocabulary size: keep it small "
        "on 512 MB boards.",
        json_schema_extra=RELOAD,
    )
    type_k: KVType = Field(default="f16", json_schema_extra=RELOAD, description="KV cache type for keys.")
    type_v: KVType = Field(default="f16", json_schema_extra=RELOAD, description="KV cache type for values (quantised needs flash_attn).")
    flash_attn: bool = Field(default=False, json_schema_extra=RELOAD, description="Use flash attention (needed for a quantised V cache).")
    context_overflow: Literal["refuse", "keep_tail"] = Field(
        default="refuse",
        description="When prompt tokens + max_tokens exceed n_ctx: refuse the request (context_too_long), or keep "
        "the prompt's last tokens.",
        json_schema_extra=HOT,
    )
    max_tokens_limit: int = Field(default=1024, ge=1, le=131072, json_schema_extra=HOT, description="Largest max_tokens a request may ask.")
    max_prompt_bytes: int = Field(
        default=262144, ge=16, le=16777216, description="Largest prompt accepted, UTF-8 bytes (checked before tokenising).",
        json_schema_extra=HOT,
    )
    warmup: bool = Field(
        default=False,
        description="After load, read every layer's weights once (progress shown), so the first job is not slowed by "
        "page faults.",
        json_schema_extra=RELOAD,
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=65536,
        json_schema_extra=RELOAD,
        description="Jinja2 chat template for chat jobs, used instead of the model's own (GGUF tokenizer.chat_template), "
        "in the Hugging Face format (messages, bos_token, eos_token, add_generation_prompt). None: the model's; a "
        "model without one then refuses chat jobs (no_chat_template).",
    )
    prompt_cache: str | None = Field(
        default=None,
        min_length=1,
        max_length=262144,
        json_schema_extra=RELOAD,
        description="A prompt prefix that many jobs share (a long system prompt, few-shot examples). Its KV cache is "
        "evaluated once, saved under {device.state_dir}/prompt-cache and restored at load, so jobs whose prompt (or "
        "rendered chat) starts with it skip evaluating it, even the first after a restart. None: off (jobs still "
        "reuse the prefix they share with the previous job).",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # Parsed here so a typo stops the daemon at start with the line, not at the first chat job.
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(jinja2.ext.Extension):
            # Hugging Face's {% generation %} tag, which llama-cpp-python's formatter passes through.
            tags = {"generation"}

            def parse(self, parser):  # type: ignore[no-untyped-def]
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        try:
            ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols", _Generation]).parse(v)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"engine.chat_template is not a valid Jinja2 template: {e.message} (line {e.lineno})") from None
        return v

    @field_validator("n_ctx")
    @classmethod
    def _ctx_bounds(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 16 <= v <= 131072:
            raise ValueError("n_ctx must be 'auto' or an integer from 16 to 131072")
        return v

    @field_validator("n_threads")
    @classmethod
    def _threads_bounds(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("n_threads must be 'auto' or an integer from 1 to 64")
        return v

    @model_validator(mode="after")
    def _quantised_v_needs_fa(self) -> "EngineSettings":
        if self.type_v != "f16" and not self.flash_attn:
            raise ValueError("engine.type_v other than f16 needs engine.flash_attn = true (llama.cpp requirement)")
        return self


class MemorySettings(Section):
    budget_mb: int | Literal["auto"] = Field(
        default="auto",
        description="Memory the agent may plan for, MiB (32-1048576), or 'auto': the agent's own memory cgroup "
        "limit when one is set, else MemTotal less memory.reserve_mb.",
        json_schema_extra=RELOAD,
    )
    reserve_mb: int = Field(
        default=128, ge=0, le=65536, description="With budget 'auto' and no cgroup limit: MiB of MemTotal left for the OS and other services.",
        json_schema_extra=RELOAD,
    )
    headroom_pct: int = Field(
        default=15,
        ge=0,
        le=90,
        description="load_mode 'auto' picks fast only when the fast estimate stays this many percent under budget.",
        json_schema_extra=RELOAD,
    )

    @field_validator("budget_mb")
    @classmethod
    def _budget_bounds(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 32 <= v <= 1048576:
            raise ValueError("budget_mb must be 'auto' or an integer from 32 to 1048576")
        return v


class SwapSettings(Section):
    policy: Literal["none", "zram", "file", "zram+file"] = Field(
        default="none",
        description="Swap the board should have. Validated and reported; applied by the root swap unit "
        "(not yet shipped: see docs/operations.md).",
        json_schema_extra=HOT,
    )
    zram_mb: int = Field(default=0, ge=0, le=65536, json_schema_extra=HOT, description="zram size, MiB (0: none).")
    file_mb: int = Field(default=0, ge=0, le=65536, json_schema_extra=HOT, description="Swap file size, MiB (0: none).")
    file_path: Path = Field(default=Path("/var/swap.edge-agent"), description="Swap file location.")
    swappiness: int = Field(default=60, ge=0, le=200, json_schema_extra=HOT, description="vm.swappiness wanted.")


class PrioritySettings(Section):
    nice: int = Field(default=5, ge=-20, le=19, json_schema_extra=HOT, description="Process niceness applied at daemon start.")
    oom_score_adj: int = Field(
        default=300,
        ge=-1000,
        le=1000,
        description="OOM-killer bias applied at daemon start: positive so the kernel picks the agent before sshd.",
        json_schema_extra=HOT,
    )


class TelemetrySettings(Section):
    interval_s: float = Field(default=30.0, ge=1, le=86400, json_schema_extra=HOT, description="Memory telemetry period, seconds.")


class IntakeSettings(Section):
    paused: bool = Field(
        default=False,
        json_schema_extra=HOT,
        description="Start no new jobs: submitted jobs are still stored, acknowledged and QUEUED, and run once intake "
        "is resumed. Cancels are still answered.",
    )


class ServiceSettings(Section):
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="On SIGTERM, seconds the running job may take to finish before it is stopped and requeued. "
        "Keep it below systemd's TimeoutStopSec.",
        json_schema_extra=HOT,
    )
    demo_broker: bool = Field(
        default=False,
        description="Start a private Mosquitto on mqtt.host:mqtt.port when nothing listens there (the demo; "
        "never on a board).",
    )


class StoreSettings(Section):
    path: Path | None = Field(default=None, description="SQLite job store. Default: {device.state_dir}/jobs.db.")
    queue_max: int = Field(default=64, ge=1, le=100000, json_schema_extra=HOT, description="Jobs waiting at once; more are REJECTED queue_full.")
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Runs of a job interrupted by a crash before it FAILS with 'interrupted'.",
        json_schema_extra=HOT,
    )
    keep_finished: int = Field(default=1000, ge=10, le=1000000, json_schema_extra=HOT, description="Finished jobs kept, count.")
    keep_finished_days: float = Field(default=7.0, ge=0.01, le=3650, json_schema_extra=HOT, description="Finished jobs kept, days.")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite synchronous mode. FULL: an acknowledged job survives power loss (fsync per commit). "
        "NORMAL: about 2x the intake rate (docs/benchmarks.md), but the last jobs acknowledged before a power cut "
        "can be lost (a process crash loses nothing).",
    )
    prune_interval_s: float = Field(
        default=600.0, ge=1, le=86400, description="How often retention limits are applied, seconds.",
        json_schema_extra=HOT,
    )
