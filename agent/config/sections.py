"""The settings tree: one pydantic model per section.

Every field has a description, a unit where it has one (in the description, and in the
field name suffix: _s, _ms, _mb, _pct) and bounds. Unknown keys are refused everywhere.
Paths that are relative are resolved by ``agent.config.load`` against the config file's folder.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import fastjsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


def _int_or_auto(name: str, lo: int, hi: int) -> Any:
    """An integer within [lo, hi], or the string 'auto'."""

    def check(v: int | str) -> int | str:
        if isinstance(v, int) and not lo <= v <= hi:
            raise ValueError(f"{name} must be 'auto' or an integer from {lo} to {hi}")
        return v

    return Annotated[int | Literal["auto"], AfterValidator(check)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Which settings may change while the daemon runs is declared on the field itself, and read by
# agent.config.live (the one diff-and-apply path for SIGHUP and the device shadow):
#   HOT    applied in place (a limit, a priority, an interval);
#   RELOAD applied by the model supervisor reloading the model with the new value (rolled back if
#          the new model does not load).
# Fields without a marker need a restart (the broker connection, the device identity, paths).
HOT: dict[str, Any] = {"live": "hot"}
RELOAD: dict[str, Any] = {"live": "reload"}


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
    def _cert_and_key_together(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together (client certificate and its key)")
        return self


class MQTTSettings(Section):
    host: str = Field(default="127.0.0.1", min_length=1, max_length=253, description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port (8883 is usual with TLS).")
    hosts: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Several brokers (the nodes of a cluster), each 'host' or 'host:port' ('[v6addr]:port'; the "
        "port defaults to mqtt.port), tried in order: after a failed attempt or a lost connection the next one is "
        "tried, and while connected to another than the first, the first is checked every mqtt.failback_s and "
        "taken back once it accepts connections. TLS and credentials apply to each. Empty (default): mqtt.host and "
        "mqtt.port alone (docs/mqtt-transport.md, Several brokers).",
    )
    failback_s: float = Field(
        default=60.0,
        ge=1,
        le=86400,
        description="While connected to another broker than the first of mqtt.hosts: how often to check whether "
        "the first accepts connections again, seconds.",
    )
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
    fleet_share: bool = Field(
        default=True,
        description="With fleet_group: hand fleet jobs this board has not started to a board of the group that "
        "would end them sooner (boards read each other's load and measured speed from their retained status), so "
        "a shared queue over boards of unequal speed ends close to the ideal. False: keep every fleet job dealt "
        "to it.",
    )
    fleet_lease_s: float = Field(
        default=120.0,
        ge=2,
        le=86400,
        description="With fleet_group: a board away from the broker for half of this gives back the fleet jobs it "
        "has not started (it announces them RELEASED when back, and does not run them); submitters send a fleet "
        "job again when the board holding it has been offline or stale this long. Published in the status.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive, seconds.")
    control_session: bool = Field(
        default=True,
        description="Take cancels and shadow messages on a second connection (client id '{client_id}-ctl', a "
        "session of its own), so they never wait behind a job the board has not acknowledged yet: some brokers "
        "(ejabberd) hand a session one QoS 1 message at a time. The broker sees two clients of this board (an "
        "ACL keyed on the client id must allow both). False: one connection for everything.",
    )
    heartbeat_s: int = Field(
        default=60,
        ge=5,
        le=3600,
        description="How often the board publishes its retained 'online' status again, seconds. The status says "
        "it expires after 3 x this: readers (`fleet list`, `shadow get`, Home Assistant) show a board whose "
        "'online' is older as stale, since a broker node that dies sends no last will.",
    )
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
    def _backoff_order(self) -> MQTTSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self

    @field_validator("hosts")
    @classmethod
    def _hosts_parse(cls, v: list[str]) -> list[str]:
        for entry in v:
            split_host_port(entry, 1883)  # ValueError names the entry
        return v

    def brokers(self) -> list[tuple[str, int]]:
        """The brokers to try, in order: mqtt.hosts, or mqtt.host:mqtt.port."""
        if not self.hosts:
            return [(self.host, self.port)]
        return [split_host_port(entry, self.port) for entry in self.hosts]


def split_host_port(entry: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host, port)."""
    text = entry.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"mqtt.hosts entry {entry!r}: '[' without ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"mqtt.hosts entry {entry!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host or len(host) > 253 or any(c.isspace() for c in host):
        raise ValueError(f"mqtt.hosts entry {entry!r}: not a host name or address")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"mqtt.hosts entry {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


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
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s/@]+(/[^\s]*)?$",
        json_schema_extra=RELOAD,
        description="Where to download model.path from when it is not in the models folder yet (https://, or http:// "
        "where the sha256 alone is trusted). Needs model.sha256. The file is fetched in the background, resumed "
        "after an interruption, checked and only then swapped in (docs/operations.md). No credentials in the URL: "
        "they would be published in the shadow; use the model_download_token credential.",
    )
    size: int | None = Field(
        default=None,
        ge=1,
        le=2**40,
        json_schema_extra=RELOAD,
        description="Size of the file at model.url, bytes: free space is checked before the download starts. "
        "None: the server's Content-Length is used.",
    )
    keep_previous: int = Field(
        default=1,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="Downloaded models kept besides the one in force, most recently used first (the previous one "
        "is the rollback). Older downloaded models are deleted after a model change; files copied in by hand, the "
        "config file's model and files named in desired state are never deleted.",
    )
    allow_non_4bit: bool = Field(
        default=False,
        description="Accept models whose weights are not 4-bit (they need more memory than the budget planning assumes).",
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Operator public keys ('ed25519:<base64>', from `edge-agent keys generate`) whose signature a "
        "model must carry. Empty (default): models and shadow changes are not signature-checked. Set: a model loads "
        "only with a valid, unexpired manifest by one of these keys (model.signature or FILE.sig) for its exact "
        "bytes, and shadow updates of model.*, download.*, engine.chat_template and canary.json_schema must be "
        "signed. Only in the config file: never changeable through the shadow (docs/operations.md, Signed models).",
    )
    signature: str | None = Field(
        default=None,
        max_length=4096,
        json_schema_extra=RELOAD,
        description="The signed manifest of model.path (the JSON text of FILE.sig from `edge-agent model sign`), for "
        "a model the board downloads. None: FILE.sig next to the model file is read. Only checked when "
        "model.trusted_keys is set.",
    )

    @field_validator("trusted_keys")
    @classmethod
    def _keys_parse(cls, v: list[str]) -> list[str]:
        if not v:
            return v
        # costly: cryptography (OpenSSL), loaded only when keys are configured; every process reads settings
        from agent.signing import parse_public_key

        for text in v:
            parse_public_key(text)  # ValueError says which key and why
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _url_needs_sha256(self) -> ModelSettings:
        if self.url is not None and self.sha256 is None:
            raise ValueError("model.url needs model.sha256: a downloaded file is only used once its checksum matches")
        return self


KVType = Literal["f16", "q8_0", "q4_0"]


class EngineSettings(Section):
    load_mode: Literal["auto", "fit", "fast"] = Field(
        default="auto",
        description="fit: weights stay file-backed mmap pages (least memory). fast: weights repacked into anonymous "
        "memory (faster, costs about the weight size again). auto: fast only when the budget holds it with room.",
        json_schema_extra=RELOAD,
    )
    n_ctx: _int_or_auto("n_ctx", 16, 131072) = Field(  # type: ignore[valid-type]
        default="auto",
        description="Context size in tokens (16-131072), or 'auto': the largest that fits the budget, capped at "
        "engine.auto_ctx_max and the model's training context.",
        json_schema_extra=RELOAD,
    )
    auto_ctx_max: int = Field(
        default=4096, ge=16, le=131072, json_schema_extra=RELOAD, description="Upper bound for n_ctx='auto', tokens."
    )
    max_parallel: _int_or_auto("max_parallel", 1, 16) = Field(  # type: ignore[valid-type]
        default="auto",
        description="Jobs decoded together in one llama.cpp batch (continuous batching), each with n_ctx of KV "
        "cache of its own: 1-16, or 'auto': as many as the memory plan allows at n_ctx per job, up to "
        "engine.auto_parallel_max. On CPUs decoding is bound by memory bandwidth, so a batch of jobs costs little "
        "more than one (docs/benchmarks.md). Under memory pressure the governor runs one job at a time "
        "(docs/governor.md).",
        json_schema_extra=RELOAD,
    )
    auto_parallel_max: int = Field(
        default=4, ge=1, le=16, json_schema_extra=RELOAD, description="Upper bound for max_parallel='auto'."
    )
    n_threads: _int_or_auto("n_threads", 1, 64) = Field(  # type: ignore[valid-type]
        default="auto",
        description="CPU threads for generation (1-64), or 'auto': the number of usable cores.",
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
    type_v: KVType = Field(
        default="f16", json_schema_extra=RELOAD, description="KV cache type for values (quantised needs flash_attn)."
    )
    flash_attn: bool = Field(
        default=False, json_schema_extra=RELOAD, description="Use flash attention (needed for a quantised V cache)."
    )
    context_overflow: Literal["refuse", "keep_tail"] = Field(
        default="refuse",
        description="When the prompt alone fills the context of a slot (counted with the model's tokenizer): refuse "
        "the job (REJECTED context_too_long), or keep the prompt's last tokens, leaving room for min(max_tokens, "
        "n_ctx / 2) new ones. A prompt that fits always runs; if prompt + max_tokens passes the context's end, it "
        "stops there (finish_reason length).",
        json_schema_extra=HOT,
    )
    max_tokens_limit: int = Field(
        default=1024, ge=1, le=131072, json_schema_extra=HOT, description="Largest max_tokens a request may ask."
    )
    max_prompt_bytes: int = Field(
        default=262144,
        ge=16,
        le=16777216,
        description="Largest prompt accepted, UTF-8 bytes (checked before tokenising).",
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
        import jinja2.ext  # costly: only a chat template override needs jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # costly: see above

        class _Generation(jinja2.ext.Extension):
            # Hugging Face's {% generation %} tag, which llama-cpp-python's formatter passes through.
            tags = {"generation"}

            def parse(self, parser):  # type: ignore[no-untyped-def]
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        try:
            ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols", _Generation]).parse(v)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(
                f"engine.chat_template is not a valid Jinja2 template: {e.message} (line {e.lineno})"
            ) from None
        return v

    @model_validator(mode="after")
    def _quantised_v_needs_fa(self) -> EngineSettings:
        if self.type_v != "f16" and not self.flash_attn:
            raise ValueError("engine.type_v other than f16 needs engine.flash_attn = true (llama.cpp requirement)")
        return self


class MemorySettings(Section):
    budget_mb: _int_or_auto("budget_mb", 32, 1048576) = Field(  # type: ignore[valid-type]
        default="auto",
        description="Memory the agent may plan for, MiB (32-1048576), or 'auto': the agent's own memory cgroup "
        "limit when one is set, else MemTotal less memory.reserve_mb.",
        json_schema_extra=RELOAD,
    )
    reserve_mb: int = Field(
        default=128,
        ge=0,
        le=65536,
        description="With budget 'auto' and no cgroup limit: MiB of MemTotal left for the OS and other services.",
        json_schema_extra=RELOAD,
    )
    headroom_pct: int = Field(
        default=15,
        ge=0,
        le=90,
        description="load_mode 'auto' picks fast only when the fast estimate stays this many percent under budget.",
        json_schema_extra=RELOAD,
    )


class SwapSettings(Section):
    """The swap this board should have. The daemon does not run as root: it writes these values to
    {device.state_dir}/swap-desired.json, and the root unit edge-agent-swap.service (started by
    edge-agent-swap.path) runs `edge-agent swap apply`. Swap it did not create is never touched."""

    policy: Literal["none", "zram", "file", "zram+file"] = Field(
        default="none",
        description="zram: compressed swap in RAM (no flash wear). file: a swap file on disk. zram+file: zram "
        "first, the file as low-priority overflow. none: remove the swap the agent created.",
        json_schema_extra=HOT,
    )
    zram_mb: _int_or_auto("swap.zram_mb", 0, 65536) = Field(  # type: ignore[valid-type]
        default="auto",
        json_schema_extra=HOT,
        description="zram size (uncompressed), MiB (1-65536), or 'auto': half of MemTotal, at most 4096 "
        "(zram-generator's rule).",
    )
    zram_algorithm: str = Field(
        default="auto",
        pattern=r"^[a-z0-9-]{1,32}$",
        json_schema_extra=HOT,
        description="zram compression algorithm (lz4, zstd, lzo-rle ...), or 'auto': lz4 when the kernel has it, "
        "else the kernel's default.",
    )
    zram_priority: int = Field(
        default=100, ge=0, le=32767, json_schema_extra=HOT, description="swapon priority of zram."
    )
    file_mb: _int_or_auto("swap.file_mb", 0, 65536) = Field(  # type: ignore[valid-type]
        default="auto",
        json_schema_extra=HOT,
        description="Swap file size, MiB (1-65536), or 'auto': twice MemTotal, at most 2048 (dphys-swapfile's rule).",
    )
    file_path: Path = Field(
        default=Path("/var/swap.edge-agent"),
        description="Swap file location (absolute; a filesystem that supports swap files: ext4, xfs; not tmpfs). "
        "Only the root configuration sets it: the desired-swap file the daemon writes cannot.",
    )
    file_priority: int = Field(
        default=10,
        ge=0,
        le=32767,
        json_schema_extra=HOT,
        description="swapon priority of the swap file; below zram_priority so the file is overflow.",
    )
    file_keep_free_mb: int = Field(
        default=512,
        ge=0,
        le=1048576,
        json_schema_extra=HOT,
        description="Free space the filesystem must keep after the swap file is created, MiB; creation is refused "
        "otherwise.",
    )
    swappiness: int | None = Field(
        default=60,
        ge=0,
        le=200,
        json_schema_extra=HOT,
        description="vm.swappiness to set (0-200; 100 or more suits zram). null: leave it as it is.",
    )
    swapoff_min_available_pct: int = Field(
        default=20,
        ge=0,
        le=90,
        json_schema_extra=HOT,
        description="A swap device is only switched off (removed or resized) when MemAvailable would stay above "
        "this share of MemTotal after its contents come back into RAM, percent.",
    )
    record_path: Path = Field(
        default=Path("/var/lib/edge-agent-swap/record.json"),
        description="Where `edge-agent swap apply` (root) records the swap it created; not writable by the daemon.",
    )

    @model_validator(mode="after")
    def _sizes_for_policy(self) -> SwapSettings:
        if "zram" in self.policy and self.zram_mb == 0:
            raise ValueError(f"swap.policy {self.policy!r} needs swap.zram_mb > 0 or 'auto'")
        if "file" in self.policy:
            if self.file_mb == 0:
                raise ValueError(f"swap.policy {self.policy!r} needs swap.file_mb > 0 or 'auto'")
            if not self.file_path.is_absolute():
                raise ValueError("swap.file_path must be absolute")
        return self


class PrioritySettings(Section):
    """CPU, I/O and OOM priority of the agent. Applied at start and on change; a setting the kernel or the
    unit refuses is reported with what to set in the unit instead (systemd Nice=, IOSchedulingClass=,
    OOMScoreAdjust=, CPUAffinity=)."""

    nice: int = Field(
        default=5, ge=-20, le=19, json_schema_extra=HOT, description="Niceness of the daemon's own threads."
    )
    inference_nice: int | None = Field(
        default=10,
        ge=-20,
        le=19,
        json_schema_extra=HOT,
        description="Niceness of the inference threads (llama.cpp's workers inherit it from the thread that runs "
        "the job), so the MQTT, watchdog and governor threads stay responsive. null: same as nice.",
    )
    io_class: Literal["best-effort", "idle", "none"] = Field(
        default="best-effort",
        json_schema_extra=HOT,
        description="I/O scheduling class. idle: disk I/O only when no one else wants the disk (slows job "
        "acknowledgement on a busy card). none: leave it to the kernel.",
    )
    io_priority: int = Field(
        default=6,
        ge=0,
        le=7,
        json_schema_extra=HOT,
        description="I/O priority within best-effort (0 highest, 7 lowest).",
    )
    oom_score_adj: int = Field(
        default=300,
        ge=-1000,
        le=1000,
        description="OOM-killer bias: positive so the kernel picks the agent before sshd and system services.",
        json_schema_extra=HOT,
    )
    cpus: list[int] | Literal["all", "spare_one"] = Field(
        default="all",
        json_schema_extra=HOT,
        description="CPUs the agent may run on: 'all'; 'spare_one': all but CPU 0 on boards with 4 or more CPUs "
        "(keeps a core for the system; engine.n_threads 'auto' follows); or a list of CPU numbers.",
    )

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if not v or len(v) > 1024 or any(c < 0 or c > 1023 for c in v):
                raise ValueError("cpus must be 'all', 'spare_one' or a non-empty list of CPU numbers 0-1023")
            return sorted(set(v))
        return v


class TelemetrySettings(Section):
    """Memory telemetry on {root}/telemetry, events on {root}/events, and the offline spool
    ({device.state_dir}/telemetry.db, docs/telemetry.md)."""

    interval_s: float = Field(
        default=30.0, ge=1, le=86400, json_schema_extra=HOT, description="Telemetry period, seconds."
    )
    residency_interval_s: float = Field(
        default=60.0,
        ge=1,
        le=86400,
        json_schema_extra=HOT,
        description="How often the model's resident share is measured (mincore over the whole file), seconds.",
    )
    spool_max_rows: int = Field(
        default=10000,
        ge=10,
        le=10000000,
        json_schema_extra=HOT,
        description="Most readings and events kept while the broker is unreachable; the oldest readings go first.",
    )
    spool_max_mb: float = Field(
        default=8.0,
        ge=0.1,
        le=4096,
        json_schema_extra=HOT,
        description="Most payload and topic bytes kept in the spool, MiB (the file is about 1.1x this, docs/benchmarks.md).",
    )


class GovernorSettings(Section):
    """The memory governor: levels ok / warn / critical from MemAvailable, PSI and the own memory cgroup,
    and its ordered actions (docs/governor.md). Defaults follow earlyoom, nohang and systemd-oomd, acting
    earlier and more gently: on the agent's own work, never by killing."""

    enabled: bool = Field(default=True, json_schema_extra=HOT, description="Watch memory and act on pressure.")
    interval_s: float = Field(
        default=1.0, ge=0.2, le=60, json_schema_extra=HOT, description="How often the governor samples, seconds."
    )
    mem_available_warn_pct: float = Field(
        default=20,
        ge=0,
        le=90,
        json_schema_extra=HOT,
        description="warn when MemAvailable falls below this share of MemTotal, percent.",
    )
    mem_available_act_pct: float = Field(
        default=10,
        ge=0,
        le=90,
        json_schema_extra=HOT,
        description="critical when MemAvailable falls below this share of MemTotal, percent.",
    )
    psi_some_warn_pct: float = Field(
        default=40,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="warn when PSI memory 'some' avg10 stays above this for psi_hold_s, percent (nohang: 40).",
    )
    psi_some_act_pct: float = Field(
        default=90,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="critical when PSI memory 'some' avg10 stays above this for psi_hold_s, percent (nohang: 90).",
    )
    psi_full_act_pct: float = Field(
        default=40,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="critical when PSI memory 'full' avg10 stays above this for psi_hold_s, percent (systemd-oomd "
        "uses 60 for 30 s as a last resort).",
    )
    psi_hold_s: float = Field(
        default=10, ge=0, le=600, json_schema_extra=HOT, description="How long a PSI threshold must hold, seconds."
    )
    cgroup_warn_pct: float = Field(
        default=85,
        ge=1,
        le=100,
        json_schema_extra=HOT,
        description="warn when the own cgroup's working set reaches this share of its limit (or high mark, the "
        "smaller), percent.",
    )
    cgroup_act_pct: float = Field(
        default=95,
        ge=1,
        le=100,
        json_schema_extra=HOT,
        description="critical when the own cgroup's working set reaches this share of its limit or high mark, percent.",
    )
    weights_warn_pct: float = Field(
        default=90,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="warn when the share of the weights the plan keeps in RAM (fit mode) that is resident falls "
        "below this for psi_hold_s, percent: the kernel is evicting them.",
    )
    weights_act_pct: float = Field(
        default=75,
        ge=0,
        le=100,
        json_schema_extra=HOT,
        description="critical when that share stays below this for psi_hold_s, percent: tokens wait on storage "
        "(thrashing).",
    )
    hysteresis_pct: float = Field(
        default=5,
        ge=0,
        le=50,
        json_schema_extra=HOT,
        description="A signal leaves a level only this many percentage points past the threshold that raised it.",
    )
    cool_down_s: float = Field(
        default=15, ge=0, le=3600, json_schema_extra=HOT, description="Time between two actions, seconds."
    )
    recover_s: float = Field(
        default=60,
        ge=0,
        le=86400,
        json_schema_extra=HOT,
        description="Pressure must stay below an action's level this long before the action is undone (the model "
        "reloaded, jobs resumed), seconds.",
    )
    shrink_ctx_pct: int = Field(
        default=50,
        ge=5,
        le=100,
        json_schema_extra=HOT,
        description="Second action: new jobs run only when prompt + max_tokens fit this share of the context, percent.",
    )
    reserve_after_s: float = Field(
        default=30,
        ge=0,
        le=86400,
        json_schema_extra=HOT,
        description="A queued job that has waited this long for memory takes the next free capacity: jobs behind it "
        "wait (waiting_for 'reserved') until it starts, so smaller jobs cannot starve it, seconds.",
    )
    memory_wait_max_s: float = Field(
        default=120,
        ge=1,
        le=86400,
        json_schema_extra=HOT,
        description="A queued job that has waited this long for memory while no other job ran ends FAILED "
        "memory_wait_exceeded (with what it needed and what was available), seconds.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> GovernorSettings:
        if self.mem_available_act_pct >= self.mem_available_warn_pct:
            raise ValueError("governor.mem_available_act_pct must be below governor.mem_available_warn_pct")
        if self.psi_some_act_pct <= self.psi_some_warn_pct:
            raise ValueError("governor.psi_some_act_pct must be above governor.psi_some_warn_pct")
        if self.weights_act_pct >= self.weights_warn_pct:
            raise ValueError("governor.weights_act_pct must be below governor.weights_warn_pct")
        if self.cgroup_act_pct <= self.cgroup_warn_pct:
            raise ValueError("governor.cgroup_act_pct must be above governor.cgroup_warn_pct")
        if self.reserve_after_s >= self.memory_wait_max_s:
            raise ValueError("governor.reserve_after_s must be below governor.memory_wait_max_s")
        return self


class FleetSettings(Section):
    """This board's place in the fleet, as operators' tools see it (edge-agent fleet, docs/operations.md)."""

    groups: list[str] = Field(
        default=[],  # pydantic copies it per instance
        max_length=16,
        json_schema_extra=HOT,
        description="Fleet groups this board belongs to (names of letters, digits, '-', '_'; at most 16). Reported "
        "in the shadow, where `edge-agent fleet list|rollout --group G` reads them; set them in the config file or "
        "remotely through the shadow (fleet.groups). Unrelated to mqtt.fleet_group, which shares jobs.",
    )

    @field_validator("groups")
    @classmethod
    def _group_names(cls, v: list[str]) -> list[str]:

        bad = [g for g in v if not re.fullmatch(_ID_PATTERN[1:-1], g)]
        if bad:
            raise ValueError(f"group names are 1-64 characters from A-Z a-z 0-9 _ -, got {bad[0]!r}")
        return list(dict.fromkeys(v))


class DownloadSettings(Section):
    """How the board fetches a model named by model.url (agent/models/download.py). The credentials come from
    systemd credentials ($CREDENTIALS_DIRECTORY: model_download_token, model_download_username,
    model_download_password) or the environment, never from the shadow, and are never logged."""

    ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) to verify the model server. None: the system's CA store."
    )
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token sent to the model server (Authorization: Bearer), over HTTPS only. Prefer the "
        "systemd credential 'model_download_token'.",
    )
    username: str | None = Field(default=None, max_length=256, description="User for HTTP basic auth (HTTPS only).")
    password: SecretStr | None = Field(
        default=None,
        description="Password for HTTP basic auth. Prefer the systemd credential 'model_download_password'.",
    )
    connect_timeout_s: float = Field(
        default=15.0, ge=0.1, le=600, description="Connecting to the model server, seconds."
    )
    read_timeout_s: float = Field(
        default=60.0,
        ge=0.1,
        le=3600,
        description="A read that brings no byte for this long fails the attempt, seconds.",
    )
    retry_min_s: float = Field(
        default=2.0, ge=0.01, le=600, description="First wait before a failed attempt is retried, seconds (doubles)."
    )
    retry_max_s: float = Field(default=120.0, ge=0.01, le=3600, description="Longest wait between attempts, seconds.")
    max_failures: int = Field(
        default=12,
        ge=1,
        le=10000,
        description="Attempts in a row that fail without bringing a new byte before the download is given up "
        "(reported as failed; the partial file is kept, so the next try resumes).",
    )
    free_margin_mb: int = Field(
        default=64,
        ge=0,
        le=1048576,
        description="Free space that must remain in the models folder after the download, MiB.",
    )
    progress_interval_s: float = Field(
        default=5.0,
        ge=0.1,
        le=3600,
        description="Download progress is reported in the shadow at most this often, seconds.",
    )

    @model_validator(mode="after")
    def _auth(self) -> DownloadSettings:
        if self.token is not None and (self.username is not None or self.password is not None):
            raise ValueError("download.token and download.username/password exclude each other")
        if (self.username is None) != (self.password is None):
            raise ValueError("download.username and download.password must be set together")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("download.retry_max_s must be >= download.retry_min_s")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Who says it.")
    content: str = Field(max_length=4096, description="What is said.")


class CanarySettings(Section):
    """The check every new model must pass before it is declared in force (agent/engine/canary.py). It runs on
    the freshly loaded model, greedy, before any job; a failure loads the previous model again by itself and
    is reported as canary_failed with the output. No prompt and no messages: no check."""

    prompt: str | None = Field(default=None, max_length=4096, json_schema_extra=HOT, description="The canary prompt.")
    messages: list[ChatMessage] | None = Field(
        default=None,
        max_length=16,
        json_schema_extra=HOT,
        description="Chat messages instead of a prompt (rendered with the model's chat template).",
    )
    max_tokens: int = Field(
        default=16, ge=1, le=1024, json_schema_extra=HOT, description="Tokens the canary may generate."
    )
    min_tokens: int = Field(
        default=1, ge=0, le=1024, json_schema_extra=HOT, description="Tokens the output must have at least."
    )
    timeout_s: float = Field(
        default=60.0,
        ge=0.1,
        le=3600,
        json_schema_extra=HOT,
        description="The canary must complete within this time (prompt and generation), seconds.",
    )
    pattern: str | None = Field(
        default=None,
        max_length=1024,
        json_schema_extra=HOT,
        description="A regular expression (Python re) the output must contain (re.search). None: not checked.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=HOT,
        description="A JSON Schema (draft 7) the output must satisfy as JSON. None: not checked.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CanarySettings:

        if self.prompt is not None and self.messages is not None:
            raise ValueError("canary.prompt and canary.messages exclude each other")
        if self.min_tokens > self.max_tokens:
            raise ValueError("canary.min_tokens must not exceed canary.max_tokens")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"canary.pattern is not a valid regular expression: {e}") from None
        if self.json_schema is not None:
            try:
                fastjsonschema.compile(self.json_schema)
            except Exception as e:  # noqa: BLE001  a schema can fail to compile in many ways; each is the user's to fix
                raise ValueError(f"canary.json_schema is not a valid JSON Schema: {e}") from None
        return self

    @property
    def enabled(self) -> bool:
        return self.prompt is not None or self.messages is not None


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
    log_format: Literal["text", "kv", "json"] = Field(
        default="text",
        description="Log lines: text (readable), kv (key=value pairs: level, logger, msg and the line's fields) or "
        "json (one object per line). Under systemd (JOURNAL_STREAM set) no timestamp is written: journald adds "
        "its own. Secrets (the MQTT password, bearer tokens) are masked in every format.",
    )


class StoreSettings(Section):
    path: Path | None = Field(default=None, description="SQLite job store. Default: {device.state_dir}/jobs.db.")
    queue_max: int = Field(
        default=64,
        ge=1,
        le=100000,
        json_schema_extra=HOT,
        description="Jobs waiting at once; more are REJECTED queue_full.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Runs of a job interrupted by a crash before it FAILS with 'interrupted'.",
        json_schema_extra=HOT,
    )
    max_preemptions: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Preemptions of a job (memory pressure, a model change) that do not count as an attempt; later "
        "ones do, so a job preempted again and again ends FAILED 'preempted' after store.max_attempts.",
        json_schema_extra=HOT,
    )
    min_free_kb: int = Field(
        default=1024,
        ge=0,
        le=1048576,
        description="After the store failed to write (full disk, read-only, I/O error), KiB its filesystem must have "
        "free before jobs are taken again.",
        json_schema_extra=HOT,
    )
    recheck_s: float = Field(
        default=5.0,
        ge=0.1,
        le=3600,
        description="While the store is unwritable, how often it is checked again, seconds.",
        json_schema_extra=HOT,
    )
    keep_finished: int = Field(
        default=1000, ge=10, le=1000000, json_schema_extra=HOT, description="Finished jobs kept, count."
    )
    keep_finished_days: float = Field(
        default=7.0, ge=0.01, le=3650, json_schema_extra=HOT, description="Finished jobs kept, days."
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite synchronous mode. FULL: an acknowledged job survives power loss (fsync per commit). "
        "NORMAL: about 2x the intake rate (docs/benchmarks.md), but the last jobs acknowledged before a power cut "
        "can be lost (a process crash loses nothing).",
    )
    prune_interval_s: float = Field(
        default=600.0,
        ge=1,
        le=86400,
        description="How often retention limits are applied, seconds.",
        json_schema_extra=HOT,
    )


class HomeAssistantSettings(Section):
    enabled: bool = Field(
        default=False,
        description="Publish Home Assistant MQTT discovery (retained config messages) on every connect: sensors for "
        "memory, pressure, speed and the queue, a select for the model and a switch for paused intake. Turning it "
        "off removes the entities (empty retained messages) at the next connect.",
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        max_length=64,
        description="Home Assistant's discovery prefix (its MQTT integration setting; 'homeassistant' by default).",
    )
    name: str | None = Field(
        default=None,
        max_length=64,
        description="Device name shown in Home Assistant. Default: 'edge-agent {device.id}'.",
    )
