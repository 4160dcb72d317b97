"""`edge-agent install` and `uninstall`: a board set up as a service, as a list of idempotent steps.

Owns the layout of an installed board (user, folders, config, credential, units) and the steps that
create or remove it. ``plan_install`` / ``plan_uninstall`` are decisions only: they return ``Step``s;
``run_steps`` applies them (or, with ``dry_run``, only says what each would do). Every step first
looks at what is there, so running install twice changes nothing the second time, and a config file
or credential someone edited is kept unless asked otherwise.

``root`` prefixes every path: tests install into a throw-away folder, and an image builder can install
into a mounted image. systemctl is only run when ``root`` is "/" (on another root it would act on this
machine's units, not the image's); the user is created with ``systemd-sysusers --root``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import ValidationError

from agent.config import Settings, load_settings
from agent.errors import ConfigError, EdgeAgentError
from agent.ops.units import memory_limits, plan_model, profile_budget, render_units
from agent.system.files import atomic_file, file_sha256
from agent.system.progress import progress

USER = "edge-agent"
CONFIG_DIR = Path("/etc/edge-agent")
CONFIG_FILE = CONFIG_DIR / "config.toml"
CREDENTIAL_FILE = CONFIG_DIR / "mqtt_password"  # LoadCredential=mqtt_password:... in the unit
STATE_DIR = Path("/var/lib/edge-agent")  # StateDirectory=edge-agent
MODELS_DIR = STATE_DIR / "models"
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_FILE = Path("/etc/sysusers.d/edge-agent.conf")
SYSUSERS_LINE = f'u {USER} - "edge-agent LLM worker" {STATE_DIR} /usr/sbin/nologin\n'


class InstallError(EdgeAgentError):
    code = "install_failed"


# ------------------------------------------------------------------------------------ context


@dataclass
class Context:
    """Where steps act, and how. ``run`` runs a command (injectable for tests)."""

    root: Path = Path("/")
    dry_run: bool = False
    run: Callable[[list[str]], subprocess.CompletedProcess[str]] = field(
        default=lambda argv: subprocess.run(argv, capture_output=True, text=True, check=False)
    )

    @property
    def on_host(self) -> bool:
        return self.root.resolve() == Path("/")

    def path(self, p: Path) -> Path:
        """``p`` (absolute, as seen on the installed system) under the root."""
        return self.root / p.relative_to("/")

    def ids(self, user: str, group: str) -> tuple[int, int] | None:
        """uid and gid as the root's own passwd/group files say (not this machine's NSS), or None."""
        if self.on_host:
            try:
                return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
            except KeyError:
                return None
        uid = 0 if user == "root" else _lookup(self.path(Path("/etc/passwd")), user)
        gid = 0 if group == "root" else _lookup(self.path(Path("/etc/group")), group)
        return (uid, gid) if uid is not None and gid is not None else None


def _lookup(table: Path, name: str) -> int | None:
    try:
        for line in table.read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[0] == name:
                return int(parts[2])
    except (OSError, ValueError):
        pass
    return None


# ------------------------------------------------------------------------------------ steps


@dataclass
class Step:
    """One change. ``apply(ctx)`` returns the outcome word: done, exists, unchanged, kept, absent,
    removed, skipped; in a dry run ``would ...``."""

    description: str

    def apply(self, ctx: Context) -> str:  # pragma: no cover - every step overrides it
        raise NotImplementedError


def _owner_text(owner: tuple[str, str] | None) -> str:
    return f" {owner[0]}:{owner[1]}" if owner else " root:root"


def _set_owner_mode(ctx: Context, path: Path, mode: int, owner: tuple[str, str] | None) -> None:
    os.chmod(path, mode)
    ids = ctx.ids(*owner) if owner else (0, 0)
    if ids is None:
        raise InstallError(f"{path}: owner {owner[0]}:{owner[1]} does not exist on {ctx.root}")  # type: ignore[index]
    if os.geteuid() == 0:
        os.chown(path, *ids)


@dataclass
class MakeDir(Step):
    path: Path = Path("/")
    mode: int = 0o755
    owner: tuple[str, str] | None = None

    def apply(self, ctx: Context) -> str:
        target = ctx.path(self.path)
        existed = target.is_dir()
        if ctx.dry_run:
            return "exists" if existed else "would create"
        target.mkdir(parents=True, exist_ok=True)
        _set_owner_mode(ctx, target, self.mode, self.owner)
        return "exists" if existed else "done"


@dataclass
class WriteFile(Step):
    """Write ``content`` atomically. ``replace`` False keeps an existing file whatever it holds."""

    path: Path = Path("/")
    content: bytes = b""
    mode: int = 0o644
    owner: tuple[str, str] | None = None
    replace: bool = True

    def apply(self, ctx: Context) -> str:
        target = ctx.path(self.path)
        if target.exists():
            if not self.replace:
                return "kept"
            if target.read_bytes() == self.content:
                if not ctx.dry_run:
                    _set_owner_mode(ctx, target, self.mode, self.owner)
                return "unchanged"
            if ctx.dry_run:
                return "would update"
        elif ctx.dry_run:
            return "would create"
        existed = target.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(
            target, mode=self.mode, before_replace=lambda tmp: _set_owner_mode(ctx, tmp, self.mode, self.owner)
        ) as f:
            f.write(self.content)
        return "updated" if existed else "done"


@dataclass
class CopyModel(Step):
    """Copy a model file into the models folder (skipped when the same bytes are there)."""

    source: Path = Path("/")
    path: Path = Path("/")
    sha256: str = ""
    owner: tuple[str, str] | None = None

    def apply(self, ctx: Context) -> str:
        target = ctx.path(self.path)
        if (
            target.exists()
            and target.stat().st_size == self.source.stat().st_size
            and file_sha256(target) == self.sha256
        ):
            return "unchanged"
        if ctx.dry_run:
            return "would copy"

        target.parent.mkdir(parents=True, exist_ok=True)
        size = self.source.stat().st_size
        with (
            open(self.source, "rb") as src,
            atomic_file(
                target, mode=0o640, before_replace=lambda tmp: _set_owner_mode(ctx, tmp, 0o640, self.owner)
            ) as dst,
            progress(size, f"copy {self.source.name}") as bar,
        ):
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        return "done"


@dataclass
class CreateUser(Step):
    """The service user and its group, from the sysusers.d line (systemd-sysusers; useradd where it is missing)."""

    name: str = USER
    sysusers_file: Path = SYSUSERS_FILE

    def apply(self, ctx: Context) -> str:
        if ctx.ids(self.name, self.name) is not None:
            return "exists"
        if ctx.dry_run:
            return "would create"
        if shutil.which("systemd-sysusers"):
            argv = ["systemd-sysusers"] + ([] if ctx.on_host else ["--root", str(ctx.root)])
            argv.append(str(ctx.path(self.sysusers_file)))
        else:
            argv = (
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--home-dir",
                    str(STATE_DIR),
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ]
                + ([] if ctx.on_host else ["--root", str(ctx.root)])
                + [self.name]
            )
        p = ctx.run(argv)
        if p.returncode != 0 or ctx.ids(self.name, self.name) is None:
            raise InstallError(f"could not create user {self.name}: {' '.join(argv)}: {(p.stderr or p.stdout).strip()}")
        return "done"


@dataclass
class RemoveUser(Step):
    name: str = USER

    def apply(self, ctx: Context) -> str:
        if ctx.ids(self.name, self.name) is None and _lookup(ctx.path(Path("/etc/group")), self.name) is None:
            return "absent"
        if ctx.dry_run:
            return "would remove"
        extra = [] if ctx.on_host else ["--root", str(ctx.root)]
        for argv in (["userdel", *extra, self.name], ["groupdel", *extra, self.name]):
            p = ctx.run(argv)
            # 6: no such user/group (userdel may already have removed the user's group)
            if p.returncode not in (0, 6):
                raise InstallError(f"{' '.join(argv)} failed: {(p.stderr or p.stdout).strip()}")
        return "removed"


@dataclass
class RemovePath(Step):
    path: Path = Path("/")

    def apply(self, ctx: Context) -> str:
        target = ctx.path(self.path)
        if not target.exists() and not target.is_symlink():
            return "absent"
        if ctx.dry_run:
            return "would remove"
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        return "removed"


@dataclass
class Systemctl(Step):
    """systemctl on this machine only; on another root it is not run (and says so)."""

    args: tuple[str, ...] = ()
    tolerate_failure: bool = False

    def apply(self, ctx: Context) -> str:
        if not ctx.on_host:
            return "skipped (--root)"
        if not Path("/run/systemd/system").is_dir():
            return "skipped (systemd is not running here)"
        if ctx.dry_run:
            return "would run"
        p = ctx.run(["systemctl", *self.args])
        if p.returncode != 0 and not self.tolerate_failure:
            raise InstallError(f"systemctl {' '.join(self.args)} failed: {(p.stderr or p.stdout).strip()}")
        return "done" if p.returncode == 0 else "failed (ignored)"


def run_steps(steps: Iterable[Step], ctx: Context, out: Callable[[str], None] = print) -> list[tuple[Step, str]]:
    """Apply each step in order, printing ``outcome  description``; the first failure stops the run."""
    done: list[tuple[Step, str]] = []
    for step in steps:
        try:
            outcome = step.apply(ctx)
        except OSError as e:
            raise InstallError(f"{step.description}: {e.strerror or e}") from None
        out(f"{outcome:<14} {step.description}")
        done.append((step, outcome))
    return done


# ------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class InstallOptions:
    profile: Path
    exec_path: str
    units_dir: Path
    model: Path | None = None
    device_id: str | None = None
    board: str | None = None
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = None
    ram_mb: int | None = None
    replace_config: bool = False
    start: bool = False
    command: str = ""


def config_text(opts: InstallOptions, model_sha256: str | None) -> str:
    """The board's config.toml: the profile with its comments, the service's own folders, and the
    options given; validated like the daemon will read it."""

    raw = opts.profile.read_text()
    doc = tomlkit.parse(raw)

    def table(name: str) -> Any:
        if name not in doc:
            doc[name] = tomlkit.table()
        return doc[name]

    device = table("device")
    # The service's folders (StateDirectory=edge-agent); a profile's development paths do not apply.
    device["state_dir"] = str(STATE_DIR)
    device["models_dir"] = str(MODELS_DIR)
    if opts.device_id:
        device["id"] = opts.device_id
    if opts.board:
        device["board"] = opts.board
    if opts.mqtt_host or opts.mqtt_port or opts.mqtt_username:
        mqtt = table("mqtt")
        if opts.mqtt_host:
            mqtt["host"] = opts.mqtt_host
        if opts.mqtt_port:
            mqtt["port"] = opts.mqtt_port
        if opts.mqtt_username:
            mqtt["username"] = opts.mqtt_username
    if "service" in doc and "demo_broker" in doc["service"]:
        doc["service"]["demo_broker"] = False  # never on a board
    if opts.model is not None:
        model = table("model")
        model["path"] = opts.model.name
        if model_sha256:
            model["sha256"] = model_sha256
    header = f"# Installed by edge-agent from the profile {opts.profile.name}" + (
        f" ({opts.command})" if opts.command else ""
    )
    text = header + "\n" + tomlkit.dumps(doc)
    _validate_config(text)
    return text


def _validate_config(text: str) -> None:

    try:
        Settings.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ConfigError(f"the config built from the profile is not valid: {e}") from None


def plan_install(opts: InstallOptions) -> list[Step]:
    """Every step of an install, decided from the options (and the profile and model files)."""

    if opts.model is not None and not opts.model.is_file():
        raise InstallError(f"--model {opts.model}: no such file")
    secret = _password(opts.mqtt_password_file) if opts.mqtt_password_file is not None else None
    settings = load_settings(opts.profile, environ={})
    budget = profile_budget(settings, opts.ram_mb * 1024 * 1024 if opts.ram_mb else None)
    plan = plan_model(settings, opts.model, budget) if opts.model is not None else None
    limits = memory_limits(budget, plan)
    units = render_units(limits, exec_path=opts.exec_path, units_dir=opts.units_dir, command=opts.command)
    sha = file_sha256(opts.model) if opts.model is not None else None
    owner = (USER, USER)

    steps: list[Step] = [
        WriteFile(f"sysusers.d entry for the user {USER}: {SYSUSERS_FILE}", path=SYSUSERS_FILE,
                  content=SYSUSERS_LINE.encode(), mode=0o644),
        CreateUser(f"user and group {USER} (no login, home {STATE_DIR})"),
        MakeDir(f"config folder {CONFIG_DIR} (0750 root:{USER})", path=CONFIG_DIR, mode=0o750, owner=("root", USER)),
        MakeDir(f"state folder {STATE_DIR} (0750 {USER})", path=STATE_DIR, mode=0o750, owner=owner),
        MakeDir(f"models folder {MODELS_DIR} (0750 {USER})", path=MODELS_DIR, mode=0o750, owner=owner),
    ]  # fmt: skip
    if opts.model is not None:
        steps.append(
            CopyModel(
                f"model {opts.model.name} into {MODELS_DIR}",
                source=opts.model,
                path=MODELS_DIR / opts.model.name,
                sha256=sha or "",
                owner=owner,
            )
        )
    steps.append(
        WriteFile(
            f"config {CONFIG_FILE} from the profile {opts.profile.name} (0640 root:{USER})"
            + ("" if opts.replace_config else "; an existing one is kept"),
            path=CONFIG_FILE,
            content=config_text(opts, sha).encode(),
            mode=0o640,
            owner=("root", USER),
            replace=opts.replace_config,
        )
    )
    if secret is not None:
        steps.append(
            WriteFile(
                f"broker password credential {CREDENTIAL_FILE} (0600 root)",
                path=CREDENTIAL_FILE,
                content=secret,
                mode=0o600,
            )
        )
    else:
        # LoadCredential= fails the unit when its file is missing: an empty one means "no password".
        steps.append(
            WriteFile(
                f"broker password credential {CREDENTIAL_FILE} (0600 root; empty: no password)",
                path=CREDENTIAL_FILE,
                content=b"",
                mode=0o600,
                replace=False,
            )
        )
    for name, text in units.items():
        steps.append(
            WriteFile(
                f"unit {UNIT_DIR / name}"
                + (f" (MemoryHigh={limits.high} MemoryMax={limits.max})" if name == "edge-agent.service" else ""),
                path=UNIT_DIR / name,
                content=text.encode(),
                mode=0o644,
            )
        )
    steps.append(Systemctl("systemctl daemon-reload", args=("daemon-reload",)))
    enable = [n for n in units if n != "edge-agent.service"] + ["edge-agent.service"]
    steps.append(Systemctl(f"systemctl enable {' '.join(enable)}", args=("enable", *enable)))
    if opts.start:
        steps.append(Systemctl("systemctl restart edge-agent.service", args=("restart", "edge-agent.service")))
    return steps


def _password(path: Path) -> bytes:
    """The broker password file's content as the credential holds it (one line), read before any step
    runs: a missing or unreadable file stops the install (or the dry run) with one line saying so."""
    try:
        secret = path.read_bytes()
    except OSError as e:
        raise InstallError(
            f"--mqtt-password-file {path}: cannot read it: {e.strerror or e}; give the file that "
            "holds the broker password (one line)"
        ) from None
    return secret.rstrip(b"\n") + b"\n"


def plan_uninstall(units: Iterable[str], *, purge: bool = False) -> list[Step]:
    """Stop and remove the units; with ``purge`` also the config, the credential, the state (jobs and
    models) and the user. Without it those stay, so a reinstall finds the board as it was."""
    units = list(units)
    steps: list[Step] = [
        Systemctl(
            f"systemctl disable --now {' '.join(units)}", args=("disable", "--now", *units), tolerate_failure=True
        )
    ]
    steps += [RemovePath(f"unit {UNIT_DIR / n}", path=UNIT_DIR / n) for n in units]
    steps.append(RemovePath(f"drop-ins {UNIT_DIR / 'edge-agent.service.d'}", path=UNIT_DIR / "edge-agent.service.d"))
    steps.append(Systemctl("systemctl daemon-reload", args=("daemon-reload",)))
    if purge:
        steps += [
            RemovePath(f"config and credential {CONFIG_DIR}", path=CONFIG_DIR),
            RemovePath(f"state, job store and models {STATE_DIR}", path=STATE_DIR),
            RemoveUser(f"user and group {USER}"),
            RemovePath(f"sysusers.d entry {SYSUSERS_FILE}", path=SYSUSERS_FILE),
        ]
    return steps
