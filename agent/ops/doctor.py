"""`edge-agent doctor`: why is this board unhappy? Checks, each OK, WARN or FAIL with a one-line fix.

Owns the checks. Each is a small function of its inputs (settings, readings, a probe) that returns a
``Check``; the readings come through ``Readers``, whose defaults read this machine (/proc, /sys,
systemctl, the broker) and which tests replace with fixtures. ``run_doctor`` runs them in order;
checks that need valid settings are skipped (and say so) when the config is invalid. Any FAIL makes
the command exit non-zero.

Checks: config; model file (present, GGUF, 4-bit); model sha256; the memory plan (fits the budget at
the configured context, and in which mode); broker (TCP, TLS, credentials, a short timeout); clock;
PSI; memory cgroup; swap; free disk for the store and the models; store writable; the service; CPU
features against the llama.cpp build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agent.app.state import liveness, read_state, state_path
from agent.config import Settings, load_settings
from agent.config.sections import MQTTSettings
from agent.engine.plan import PlanInputs
from agent.engine.plan import plan as plan_load
from agent.engine.types import LoadPlan
from agent.errors import ConfigError, EdgeAgentError, ModelError, StoreError, TransportError, WillNotFit
from agent.jobs.store import JobStore
from agent.models.gguf_info import ModelInfo, check_quantization, read_model_info
from agent.mqtt.grants import GrantProblem
from agent.mqtt.transport import MqttTransport
from agent.signing import SignatureError, Trust, check_claims, manifest_text, verify_manifest
from agent.system import cpu, memory
from agent.system.memory import CgroupMemory, MemInfo, PsiMemory
from agent.system.progress import progress

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
MiB = 1024 * 1024
PI_CMDLINE = "/boot/firmware/cmdline.txt"
# A clock before this is certainly wrong (a board without an RTC that booted at 1970 or at its last
# saved time): certificates look "not yet valid" and TLS fails.
CLOCK_FLOOR = datetime(2025, 1, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    summary: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ok(name: str, summary: str) -> Check:
    return Check(name, "OK", summary)


def _warn(name: str, summary: str, fix: str) -> Check:
    return Check(name, "WARN", summary, fix)


def _fail(name: str, summary: str, fix: str) -> Check:
    return Check(name, "FAIL", summary, fix)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n < 10 * 1024 * MiB else f"{n / 1024 / MiB:.1f} GiB"


# ------------------------------------------------------------------------------------ readers


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _systemctl(args: list[str]) -> subprocess.CompletedProcess[str] | None:
    """None when this machine has no running systemd (a container, a chroot)."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return None
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)


def _ntp_synchronized() -> bool | None:
    if Path("/run/systemd/timesync/synchronized").exists():
        return True
    if shutil.which("timedatectl") and Path("/run/systemd/system").is_dir():
        p = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if p.returncode == 0 and p.stdout.strip() in ("yes", "no"):
            return p.stdout.strip() == "yes"
    return None


def _llama_system_info() -> str | None:
    try:
        from agent.engine import llamacpp  # costly (loads llama.cpp), and may be missing: the CPU check says so

        return llamacpp.system_info()
    except Exception:  # not installed, or a build that cannot load here: the CPU check says so
        return None


def _cpu() -> Any:

    return cpu


@dataclass(frozen=True)
class BrokerProbe:
    """One broker of mqtt.hosts (or mqtt.host): why it cannot be used, or what its grants cost."""

    where: str
    error: str | None
    problems: list[GrantProblem]


def probe_brokers(mqtt: MQTTSettings, timeout: float) -> list[BrokerProbe]:
    """Each broker the daemon would use, probed once in turn."""
    out = []
    for host, port in mqtt.brokers():
        one = mqtt.model_copy(update={"host": host, "port": port, "hosts": []})
        err, problems = probe_broker(one, timeout)
        out.append(BrokerProbe(f"{host}:{port}", err, problems))
    return out


def probe_broker(mqtt: MQTTSettings, timeout: float) -> tuple[str | None, list[GrantProblem]]:
    """Connect once with the configured host, port, TLS and credentials, asking for the configured session
    expiry (the session is ended at the disconnect); (None, what the grants cost) on success, else (why, [])."""

    settings = mqtt.model_copy(
        update={
            "client_id": f"edge-doctor-{uuid.uuid4().hex[:10]}",
            "reconnect_min_s": timeout,
            "reconnect_max_s": max(timeout, 1.0),
        }
    )
    done = threading.Event()
    errors: list[TransportError] = []

    def on_error(e: TransportError) -> None:
        errors.append(e)
        done.set()

    try:
        t = MqttTransport(
            settings, will=None, on_message=lambda m: None, on_connect=done.set, on_error=on_error, manual_ack=False
        )
    except TransportError as e:
        return str(e), []
    # The transport's own retry warnings would repeat what this check reports.
    tlog = logging.getLogger("agent.mqtt.transport")
    level = tlog.level
    tlog.setLevel(logging.ERROR)
    t.start()
    try:
        done.wait(timeout)
        if t.connected:
            return None, t.problems()
        err = errors[0] if errors else t.last_error
        if err is not None and err.code == "mqtt_unreachable" and "closed the connection" in str(err):
            err = t.check_mqtt311() or err  # closed right after our MQTT 5 CONNECT: does it speak 3.1.1?
        if err is None:
            return f"no answer within {timeout:g} s", []
        return re.sub(r"^(cannot connect to )?MQTT \S+: ", "", str(err)), []
    finally:
        t.stop(timeout=2.0, end_session=True)
        tlog.setLevel(level)


@dataclass
class Readers:
    """Everything the checks read from the machine; tests pass fixtures."""

    psi: Callable[[], PsiMemory] = lambda: memory.psi_memory()
    cgroup: Callable[[int | str], CgroupMemory] = lambda pid: memory.cgroup_memory(pid)
    meminfo: Callable[[], MemInfo] = lambda: memory.meminfo()
    swaps: Callable[[], str | None] = lambda: _read("/proc/swaps")
    cmdline: Callable[[], str | None] = lambda: _read("/proc/cmdline")
    cpuinfo: Callable[[], str | None] = lambda: _read("/proc/cpuinfo")
    machine: Callable[[], str] = platform.machine
    llama_info: Callable[[], str | None] = _llama_system_info
    # aarch64 features from HWCAP (right under qemu-user too, unlike /proc/cpuinfo); after llama_info, which loads
    # llama.cpp: the ggml CPU variant it chose.
    hwcap: Callable[[], set[str] | None] = lambda: _cpu().hwcap_flags()
    llama_variant: Callable[[], str | None] = lambda: _cpu().llama_cpu_variant()
    now: Callable[[], float] = time.time
    ntp_synchronized: Callable[[], bool | None] = _ntp_synchronized
    systemctl: Callable[[list[str]], subprocess.CompletedProcess[str] | None] = _systemctl
    disk_free: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free
    broker: Callable[[MQTTSettings, float], list[BrokerProbe]] = probe_brokers
    geteuid: Callable[[], int] = os.geteuid


# ------------------------------------------------------------------------------------ checks


def check_config(path: Path | None, load: Callable[[Path | None], Settings]) -> tuple[Check, Settings | None]:

    where = str(path) if path else "the default location (/etc/edge-agent/config.toml, else built-in defaults)"
    try:
        settings = load(path)
    except ConfigError as e:
        first = str(e).splitlines()
        summary = "; ".join(line.strip() for line in first[:4])
        if "Permission denied" in summary:
            return _fail(
                "config",
                summary,
                "run doctor as root or as the service user: `sudo edge-agent doctor` or "
                "`sudo -u edge-agent edge-agent doctor`",
            ), None
        return _fail(
            "config",
            summary,
            f"edit {path or '/etc/edge-agent/config.toml'} and check it with "
            "`edge-agent config validate FILE` (every key: docs/configuration.md)",
        ), None
    return _ok("config", f"valid: {where}"), settings


def check_model_file(settings: Settings) -> tuple[Check, ModelInfo | None]:
    """Present, inside the models folder, a readable GGUF, 4-bit. Returns the ModelInfo too."""

    name = "model"
    try:
        path = settings.model_file()
    except ModelError as e:
        if e.code == "model_not_found":
            return _fail(
                name,
                str(e),
                f"copy the GGUF model into {settings.device.models_dir}, or set model.path to one "
                f"that is there (`ls {settings.device.models_dir}`)",
            ), None
        return _fail(
            name, str(e), f"set model.path to a file inside device.models_dir ({settings.device.models_dir})"
        ), None
    if not path.exists():
        return _fail(
            name,
            f"{path}: no such file",
            f"copy the GGUF model to {path}, or set model.path to a model in "
            f"{settings.device.models_dir} (`ls {settings.device.models_dir}`)",
        ), None
    try:
        info = read_model_info(path)
    except ModelError as e:
        return _fail(name, str(e), "the file is not a readable GGUF model: copy it again (a partial download?)"), None
    try:
        check_quantization(info, settings.model.allow_non_4bit)
    except ModelError as e:
        return _fail(
            name, str(e), "use a 4-bit quantisation (Q4_0, Q4_K_M, IQ4) or set model.allow_non_4bit = true"
        ), info
    share = 100.0 * info.four_bit_bytes / info.weights_bytes if info.weights_bytes else 0.0
    kind = "4-bit" if info.is_4bit else "NOT 4-bit (allowed by model.allow_non_4bit)"
    return _ok(
        name,
        f"{path.name}: {_mib(info.file_size)}, {info.architecture}, {info.n_layer} layers, {kind} "
        f"({share:.0f} % of weights in 4-bit or smaller types)",
    ), info


def sha256_file(path: Path, progress_desc: str | None = None) -> str:

    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress(size, progress_desc or f"sha256 {path.name}") as bar:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def check_signature(settings: Settings, hasher: Callable[[Path], str] | None = sha256_file) -> Check:
    """Which operator keys the board trusts, and whether its model's signature holds (agent/signing.py).
    ``hasher`` None (--no-sha256): the manifest is checked against the file's name and size only."""

    keys = settings.model.trusted_keys
    if not keys:
        return _ok("model signature", "not required: model.trusted_keys is empty (any model, any shadow change)")
    trust = Trust.from_texts(keys)
    trusted = f"trusts {len(keys)} key(s): {', '.join(sorted(trust.keys))}"
    path = settings.model_file()
    try:
        claims = verify_manifest(manifest_text(settings.model.signature, path), trust, time.time())
        sha = hasher(path) if hasher is not None else None
        check_claims(claims, name=path.name, sha256=sha, size=path.stat().st_size, running_version=None)
    except SignatureError as e:
        return _fail(
            "model signature",
            f"{trusted}; {path.name}: {e}",
            f"sign it on the operator's machine (edge-agent model sign {path.name} --key KEY) and copy "
            f"{path.name}.sig next to it",
        )
    what = "name, size and sha256" if hasher is not None else "name and size (--no-sha256)"
    return _ok(
        "model signature",
        f"{trusted}; {path.name} signed by {claims.key_id}, version {claims.version}, "
        f"expires {claims.expires or 'never'}; {what} match",
    )


def _signature_first(settings: Settings, hasher: Callable[[Path], str] | None) -> Check | None:
    """The model signature check, when keys are trusted and the model file is there (None otherwise: the
    model check then says what is wrong with the file, without reading it)."""

    if not settings.model.trusted_keys:
        return None
    try:
        settings.model_file()
    except ModelError:
        return None
    return check_signature(settings, hasher)


def check_sha256(settings: Settings, hasher: Callable[[Path], str] = sha256_file) -> Check:
    expected = settings.model.sha256
    path = settings.model_file()
    if expected is None:
        return _warn(
            "model sha256",
            "model.sha256 is not set: a damaged or swapped file would be loaded unnoticed",
            f"set model.sha256 = \"$(sha256sum {path} | cut -d' ' -f1)\"",
        )
    got = hasher(path)
    if got != expected:
        return _fail(
            "model sha256",
            f"{path.name}: sha256 {got[:16]}... does not match model.sha256 {expected[:16]}...",
            "copy the model again (damaged or a different file), or set model.sha256 to the file's sha256",
        )
    return _ok("model sha256", f"matches model.sha256 ({expected[:16]}...)")


def check_fit(settings: Settings, plan: Callable[[Settings], LoadPlan] | None = None) -> Check:
    """The engine's own plan (agent.engine.plan) at the configured settings and budget."""

    def default_plan(s: Settings) -> LoadPlan:
        return plan_load(PlanInputs.from_settings(s))

    try:
        p = (plan or default_plan)(settings)
    except WillNotFit as e:
        return _fail(
            "memory plan",
            str(e).split(" Estimate:")[0],
            'lower engine.n_ctx or engine.n_batch, set engine.load_mode = "fit", use a smaller model, or raise '
            "memory.budget_mb (and MemoryMax: `edge-agent systemd render`)",
        )
    except EdgeAgentError as e:
        return _fail("memory plan", str(e), "see the model check")
    est = p.estimate
    summary = (
        f"fits: {p.mode} mode ({p.mode_reason}), n_ctx {p.n_ctx} ({p.n_ctx_reason}); anonymous "
        f"{_mib(est.anon_bytes)} of budget {_mib(p.budget.bytes)} ({p.budget.source}); weights in use "
        f"{_mib(est.file_bytes)} file-backed"
    )
    if est.anon_bytes + est.file_bytes > p.budget.bytes:
        return _warn(
            "memory plan",
            summary + "; the weights do not all stay in RAM beside it",
            "expect slower generation (weights re-read from storage); a smaller n_ctx leaves them more room",
        )
    return _ok("memory plan", summary)


def check_broker(
    settings: Settings, probe: Callable[[MQTTSettings, float], list[BrokerProbe]], timeout: float
) -> Check:
    m = settings.mqtt
    how = (" (TLS)" if m.tls.enabled else "") + (f" as {m.username}" if m.username else "")
    probes = probe(m, timeout)
    good = [p for p in probes if p.error is None]
    if not good:
        first = probes[0]
        return _broker_fail(m, first.where + how, first.error or "no answer")
    problems = {pr.code: pr for p in good for pr in p.problems}.values()
    down = [p for p in probes if p.error is not None]
    where = ", ".join(p.where for p in good) + how
    if any(pr.level == "error" for pr in problems):
        worst = [pr for pr in problems if pr.level == "error"]
        return _fail("broker", f"connected to {where}, but " + "; ".join(pr.message for pr in worst), worst[0].fix)
    if problems or down:
        lines = [pr.message for pr in problems] + [f"{p.where}: {p.error}" for p in down]
        fix = next(iter(problems)).fix if problems else "start that broker, or remove it from mqtt.hosts"
        return _warn("broker", f"connected to {where}, but " + "; ".join(lines), fix)
    return _ok("broker", f"connected to {where}")


def _broker_fail(m: MQTTSettings, where: str, err: str) -> Check:
    low = err.lower()
    if "not authorised" in low or "bad user name" in low or "banned" in low:
        fix = "check mqtt.username and the password (/etc/edge-agent/mqtt_password, credential mqtt_password) and the broker's ACL"
    elif "tls" in low or "certificate" in low:
        fix = "check mqtt.tls.ca_file / cert_file / key_file against the broker's listener, and the clock"
    elif "mqtt 3.1.1 only" in low:
        fix = (
            "enable MQTT 5 on the broker (RabbitMQ >= 3.13, Mosquitto >= 1.6, EMQX, HiveMQ, VerneMQ, ejabberd) or "
            "point mqtt.host at one that has it; the daemon exits 78 until then"
        )
    elif "resolve" in low:
        fix = f"mqtt.host {m.host!r} does not resolve: fix the name or use an address"
    else:
        fix = f"start the broker, or fix mqtt.host / mqtt.port (now {m.host}:{m.port}); the daemon keeps its queue meanwhile"
    return _fail("broker", f"cannot connect to {where}: {err}", fix)


def _ca_not_after(ca_file: Path) -> float | None:
    try:
        info = ssl._ssl._test_decode_cert(str(ca_file))  # type: ignore[attr-defined]
        return ssl.cert_time_to_seconds(info["notAfter"])
    except Exception:
        return None


def check_clock(
    settings: Settings,
    now: float,
    ntp: bool | None,
    *,
    floor: float = CLOCK_FLOOR,
    ca_not_after: Callable[[Path], float | None] = _ca_not_after,
) -> Check:
    when = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    tls = settings.mqtt.tls
    if now < floor:
        return _fail(
            "clock",
            f"the clock says {when}: certainly wrong (no RTC and no time sync yet?)",
            "enable time sync: `timedatectl set-ntp true` (systemd-timesyncd), then check `timedatectl`",
        )
    if tls.enabled and tls.ca_file is not None:
        expiry = ca_not_after(Path(tls.ca_file))
        if expiry is not None and now > expiry:
            return _fail(
                "clock",
                f"{when}: after the CA certificate's expiry ({tls.ca_file})",
                "renew the CA bundle (mqtt.tls.ca_file), or fix the clock if it is wrong",
            )
    if ntp is False:
        fix = "`timedatectl set-ntp true`; TLS needs a correct clock" if tls.enabled else "`timedatectl set-ntp true`"
        return _warn("clock", f"{when}, not synchronised by NTP", fix)
    return _ok("clock", f"{when}" + (", NTP synchronised" if ntp else " (synchronisation state unknown)"))


def _pi_hint(flag: str) -> str:
    return f"add `{flag}` to the kernel command line and reboot (Raspberry Pi OS: the one line of {PI_CMDLINE})"


def check_psi(psi: PsiMemory, cmdline: str | None) -> Check:
    if psi.available:
        return _ok(
            "PSI", f"memory pressure readable (some avg10 {psi.some_avg10:.1f} %, full avg10 {psi.full_avg10:.1f} %)"
        )
    args = (cmdline or "").split()
    why = psi.reason or "no /proc/pressure/memory"
    if "psi=0" in args:
        why += "; the kernel command line has psi=0"
    return _warn(
        "PSI", f"not available: {why}; the agent cannot see memory stalls (thrashing of the weights)", _pi_hint("psi=1")
    )


def check_cgroup(cg: CgroupMemory, cmdline: str | None, *, of_service: bool) -> Check:
    whose = "the service's" if of_service else "this shell's (the service is not running)"
    if not cg.available:
        args = (cmdline or "").split()
        extra = "; cgroup_disable=memory is on the kernel command line" if "cgroup_disable=memory" in args else ""
        return _warn(
            "memory cgroup",
            f"not available: {cg.reason}{extra}; MemoryMax cannot be enforced and "
            "memory.budget_mb 'auto' falls back to MemTotal",
            _pi_hint("cgroup_enable=memory cgroup_memory=1"),
        )
    if cg.limit is None:
        summary = f"cgroup v{cg.version}, {whose} cgroup {cg.path} has no memory limit"
        if of_service:
            return _warn(
                "memory cgroup",
                summary,
                "set MemoryMax for the board: `edge-agent systemd render --profile "
                "BOARD --model MODEL --drop-in --out /etc/systemd/system` then `systemctl daemon-reload`",
            )
        return _ok("memory cgroup", summary + " (the unit sets MemoryHigh/MemoryMax)")
    usage = f", usage {_mib(cg.usage)}" if cg.usage is not None else ""
    return _ok("memory cgroup", f"cgroup v{cg.version}, {whose} limit {_mib(cg.limit)}{usage}")


def check_swap(settings: Settings, mem: MemInfo, swaps: str | None) -> Check:
    policy = settings.swap.policy
    devices = [line.split() for line in (swaps or "").splitlines()[1:] if line.strip()]
    kinds = ", ".join(f"{d[0]} ({d[1]}, {int(d[2]) // 1024} MiB, priority {d[-1]})" for d in devices if len(d) >= 5)
    total = mem.swap_total
    if total == 0:
        if policy == "none":
            return _ok("swap", "none (swap.policy none)")
        return _warn(
            "swap",
            f"no swap active, but swap.policy is {policy!r}",
            "enable the swap unit: `systemctl enable --now edge-agent-swap.path edge-agent-swap.service` "
            '(or set swap.policy = "none")',
        )
    used = total - mem.swap_free
    summary = f"{_mib(total)} ({_mib(used)} used): {kinds or 'see /proc/swaps'}; swap.policy {policy}"
    if policy in ("zram", "zram+file") and not any("zram" in d[0] for d in devices):
        return _warn(
            "swap", summary + "; no zram device", "start the swap unit: `systemctl start edge-agent-swap.service`"
        )
    if total and used > 0.9 * total:
        return _warn(
            "swap", summary + "; almost full", "memory is short: lower engine.n_ctx, use load_mode fit, or add swap"
        )
    return _ok("swap", summary)


def check_disk(settings: Settings, free: Callable[[Path], int], model_size: int | None) -> list[Check]:
    out: list[Check] = []
    # Settings derives store.path from device.state_dir; a tree built by hand may leave it out.
    store_dir = Path(settings.store.path).parent if settings.store.path else Path(settings.device.state_dir)
    need = settings.store.min_free_kb * 1024
    try:
        f = free(_existing(store_dir))
    except OSError as e:
        return [_fail("disk (store)", f"{store_dir}: {e.strerror}", f"create {store_dir} (`edge-agent install`)")]
    if f < need:
        out.append(
            _fail(
                "disk (store)",
                f"{_mib(f)} free for the store in {store_dir}, below store.min_free_kb "
                f"({need // 1024} KiB): jobs are not taken",
                f"free space on the filesystem of {store_dir}",
            )
        )
    elif f < 64 * MiB:
        out.append(
            _warn("disk (store)", f"only {_mib(f)} free in {store_dir}", f"free space on the filesystem of {store_dir}")
        )
    else:
        out.append(_ok("disk (store)", f"{_mib(f)} free in {store_dir}"))
    models = Path(settings.device.models_dir)
    try:
        fm = free(_existing(models))
    except OSError as e:
        out.append(_fail("disk (models)", f"{models}: {e.strerror}", f"create {models}"))
        return out
    if model_size is not None and fm < model_size:
        out.append(
            _warn(
                "disk (models)",
                f"{_mib(fm)} free in {models}: less than the current model ({_mib(model_size)}), "
                "so a new model of its size cannot be delivered",
                f"free space on the filesystem of {models}",
            )
        )
    else:
        out.append(_ok("disk (models)", f"{_mib(fm)} free in {models}"))
    return out


def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_store(settings: Settings) -> Check:
    """A real write next to the store (catches a read-only or full filesystem, a missing folder, wrong
    ownership for this user) and, when the store exists, opening it."""

    if settings.store.path is None:
        return _fail("store", "store.path is not set", "set store.path, or device.state_dir for the default")
    path = Path(settings.store.path)
    folder = path.parent
    if not folder.is_dir():
        return _fail(
            "store",
            f"{folder} does not exist",
            f"create it: `edge-agent install` (or `install -d -o edge-agent -m 0750 {folder}`)",
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".doctor-")
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except PermissionError as e:
        try:
            owner = folder.stat().st_uid
        except OSError:
            owner = None
        if os.geteuid() not in (0, owner):
            return _warn(
                "store",
                f"{folder}: {e.strerror} for this user: the service user may well write it",
                "run doctor as root or as the service user: `sudo edge-agent doctor`",
            )
        return _fail(
            "store",
            f"{folder} is not writable: {e.strerror}",
            f"a read-only or full filesystem, or wrong owner: `mount | grep ' {_existing(folder)} '`, `df -h "
            f"{folder}`, `chown -R edge-agent: {folder}`",
        )
    except OSError as e:
        return _fail(
            "store",
            f"{folder} is not writable: {e.strerror}",
            f"a read-only or full filesystem, or wrong owner: `mount | grep ' {_existing(folder)} '`, `df -h "
            f"{folder}`, `chown -R edge-agent: {folder}`",
        )
    if not path.exists():
        return _ok("store", f"{folder} is writable (no job store yet: the daemon creates {path.name})")
    try:
        store = JobStore.from_settings(settings.store, readonly=True)
        counts = store.counts()
        store.close()
    except StoreError as e:
        return _fail("store", str(e), f"stop the agent and move {path.name} (and its -wal, -shm) aside")
    waiting = counts.get("QUEUED", 0)
    return _ok("store", f"{path} writable; {sum(counts.values())} jobs, {waiting} queued")


def check_service(
    systemctl: Callable[[list[str]], subprocess.CompletedProcess[str] | None], state_line: str | None
) -> Check:
    p = systemctl(
        ["show", "edge-agent.service", "-p", "LoadState,ActiveState,SubState,UnitFileState,ExecMainStatus,NRestarts"]
    )
    tail = f"; {state_line}" if state_line else ""
    if p is None:
        return _warn(
            "service",
            "systemd is not running here (a container or chroot): the service state is unknown" + tail,
            "run the daemon as `edge-agent run -c CONFIG` under your supervisor, or on a systemd host",
        )
    props = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    if props.get("LoadState") == "not-found":
        return _warn(
            "service",
            "edge-agent.service is not installed" + tail,
            "`sudo edge-agent install --profile BOARD` (docs/operations.md)",
        )
    active, sub = props.get("ActiveState", "?"), props.get("SubState", "?")
    summary = f"edge-agent.service {active} ({sub}), {props.get('UnitFileState', '?')}, restarts {props.get('NRestarts', '?')}"
    if active == "failed" or (active != "active" and props.get("ExecMainStatus") == "78"):
        fix = (
            "exit 78: it cannot start with this config; fix the FAILs above, then `systemctl restart edge-agent`"
            if props.get("ExecMainStatus") == "78"
            else "`journalctl -u edge-agent -n 50` says why"
        )
        return _fail("service", summary + tail, fix)
    if active != "active":
        return _warn("service", summary + tail, "`systemctl enable --now edge-agent`")
    return _ok("service", summary + tail)


# CPU features llama.cpp's build reports (llama_print_system_info) -> the /proc/cpuinfo flag it needs.
_X86_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
              "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
              "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}  # fmt: skip
_ARM_FLAGS = {"NEON": "asimd", "ARM_FMA": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp",
              "MATMUL_INT8": "i8mm", "SVE": "sve", "SME": "sme"}  # fmt: skip
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd41": "Cortex-A78", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
              "0xd4b": "Cortex-A78C", "0xc07": "Cortex-A7"}  # fmt: skip


def _cpu_flags(cpuinfo: str) -> tuple[set[str], str | None]:
    flags: set[str] = set()
    core = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags |= set(value.split())
        elif key == "cpu part" and core is None:
            core = _ARM_PARTS.get(value.strip().lower(), f"ARM part {value.strip()}")
        elif key == "model name" and core is None and "arm" not in value.lower():
            core = value.strip()
    return flags, core


def _build_features(info: str | None) -> set[str]:
    if not info:
        return set()
    # "CPU : NEON = 1 | ARM_FMA = 1 | ...": the backend's name comes before the first feature.
    return {part.split("=")[0].split(":")[-1].strip() for part in info.split("|") if part.strip().endswith("= 1")}


def check_cpu(
    machine: str,
    cpuinfo: str | None,
    llama_info: str | None,
    *,
    hwcap: set[str] | None = None,
    variant: str | None = None,
) -> Check:
    flags, core = _cpu_flags(cpuinfo or "")
    if hwcap is not None:
        # The kernel's word for this process; /proc/cpuinfo names the core only when it is an ARM one (under
        # qemu-user it is the host's x86 file).
        flags = set(hwcap)
        core = core if cpuinfo and "cpu part" in cpuinfo.lower() else None
    built = _build_features(llama_info)
    table = _X86_FLAGS if machine in ("x86_64", "amd64", "i686") else _ARM_FLAGS
    # armv7 reports NEON as "neon", not "asimd".
    if machine.startswith("armv7") or machine == "armv6l":
        flags = flags | ({"asimd"} if "neon" in flags else set())
    missing_in_cpu = sorted(f for f in built if f in table and table[f] not in flags)
    label = f"{machine}" + (f" {core}" if core else "")
    if built and flags and missing_in_cpu:
        return _fail(
            "cpu",
            f"{label}: llama.cpp was built for {', '.join(missing_in_cpu)}, which this CPU lacks: it will "
            "stop with an illegal instruction",
            "rebuild llama-cpp-python on this board (`bash .ci/setup` with "
            'CMAKE_ARGS="-DGGML_NATIVE=ON"), not on another machine',
        )
    build = f"; llama.cpp build: {', '.join(sorted(built & set(table)))}" if built else "; llama.cpp not importable"
    if variant:
        build += f" (CPU variant {variant}, chosen at load)"
    if hwcap is not None:
        label += f" (HWCAP: {', '.join(sorted(hwcap & {'asimd', 'asimdhp', 'asimddp', 'i8mm', 'sve', 'sve2', 'sme'}))})"
    if machine in ("x86_64", "amd64"):
        if "avx2" not in flags:
            return _warn(
                "cpu",
                f"{label}: no AVX2{build}",
                "none; llama.cpp falls back to slower SSE/AVX kernels (about 2x slower)",
            )
        return _ok(
            "cpu", f"{label}: AVX2{', FMA' if 'fma' in flags else ''}{', AVX512' if 'avx512f' in flags else ''}{build}"
        )
    if machine.startswith("arm") or machine == "aarch64":
        lacking = [name for name, flag in (("dotprod", "asimddp"), ("i8mm", "i8mm")) if flag not in flags]
        if machine != "aarch64":
            lacking = ["64-bit (aarch64)"] + lacking
        # dotprod carries the fast int8 kernels; i8mm alone (its absence on a Cortex-A76) costs little.
        if lacking and lacking != ["i8mm"]:
            keep = (
                "llama.cpp picked the variant for this CPU at load"
                if variant
                else "Keep llama.cpp built on this board: a build that assumes them crashes here"
            )
            return _warn(
                "cpu",
                f"{label}: NEON{'' if 'asimd' in flags else ' MISSING'}; no {', no '.join(lacking)}{build}",
                "none needed: llama.cpp uses its plain NEON kernels (slower 4-bit matrix products); a Pi 5 "
                f"(Cortex-A76) has dotprod. {keep}",
            )
        return _ok("cpu", f"{label}: NEON, dotprod{', i8mm' if 'i8mm' in flags else ', no i8mm'}{build}")
    return _ok("cpu", f"{label}{build}")


# ------------------------------------------------------------------------------------ running


@dataclass
class DoctorReport:
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in ("OK", "WARN", "FAIL", "SKIP")}
        return {"ok": not self.failed, "counts": counts, "checks": [c.as_dict() for c in self.checks]}

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=5)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.summary}")
            if c.fix and c.status != "OK":
                lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
        d = self.as_dict()["counts"]
        lines.append(
            f"\n{d['OK']} OK, {d['WARN']} WARN, {d['FAIL']} FAIL" + (f", {d['SKIP']} skipped" if d["SKIP"] else "")
        )
        return "\n".join(lines)


def run_doctor(
    config: Path | None,
    *,
    readers: Readers | None = None,
    load: Callable[[Path | None], Settings] | None = None,
    broker_timeout: float = 5.0,
    check_sha: bool = True,
    plan: Callable[[Settings], LoadPlan] | None = None,
) -> DoctorReport:

    r = readers or Readers()
    checks: list[Check] = []
    info: ModelInfo | None = None
    c, settings = check_config(config, load or load_settings)
    checks.append(c)
    dependent = ("model", "model sha256", "memory plan", "broker", "disk (store)", "disk (models)", "store")
    if settings is None:
        checks += [Check(n, "SKIP", "needs a valid config") for n in dependent]
    else:
        # With trusted keys the model's signature is judged first: no check parses a header it does not hold for.
        signature = _signature_first(settings, sha256_file if check_sha else None)
        if signature is not None and signature.status == "FAIL":
            c, info = Check("model", "SKIP", "not read: its signature does not hold (model signature below)"), None
        else:
            c, info = check_model_file(settings)
        checks.append(c)
        if c.status != "OK":
            why = "needs the model file" if c.status == "FAIL" else "needs a model whose signature holds"
            checks.append(Check("model sha256", "SKIP", why))
            checks.append(Check("memory plan", "SKIP", why))
            if signature is not None:
                checks.append(signature)
        else:
            checks.append(check_sha256(settings) if check_sha else Check("model sha256", "SKIP", "--no-sha256"))
            checks.append(check_fit(settings, plan))
            checks.append(signature or check_signature(settings, sha256_file if check_sha else None))
        checks.append(check_broker(settings, r.broker, broker_timeout))
    clock_settings = settings if settings is not None else _defaults()
    checks.append(check_clock(clock_settings, r.now(), r.ntp_synchronized()))
    cmdline = r.cmdline()
    checks.append(check_psi(r.psi(), cmdline))
    # The service's own cgroup when its daemon runs (its pid is in the state file), else ours.
    pid: int | str = "self"
    state_line = None
    if settings is not None:
        snap, problem = read_state(state_path(settings))
        if snap is not None:
            verdict, detail = liveness(snap, r.now())
            state_line = f"daemon {verdict}: {detail}"
            if verdict in ("running", "stale"):
                pid = snap.pid
        else:
            state_line = problem
    checks.append(check_cgroup(r.cgroup(pid), cmdline, of_service=pid != "self"))
    checks.append(check_swap(clock_settings, r.meminfo(), r.swaps()))
    if settings is not None:
        checks += check_disk(settings, r.disk_free, info.file_size if info is not None else None)
        checks.append(check_store(settings))
    checks.append(check_service(r.systemctl, state_line))
    checks.append(check_cpu(r.machine(), r.cpuinfo(), r.llama_info(), hwcap=r.hwcap(), variant=r.llama_variant()))
    return DoctorReport(checks)


def _defaults() -> Settings:

    return Settings()
