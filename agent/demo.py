"""The embedded default of `edge-agent run --demo`: the dev profile, a generated demo model, a local broker.

Nothing here runs on a board: a board has its profile in /etc/edge-agent and its broker elsewhere.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import socket
import subprocess
from pathlib import Path

from agent.config import Settings, load_settings
from agent.errors import ConfigError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEV_PROFILE = REPO / "firmware-config" / "dev.toml"


def demo_settings() -> Settings:
    if not DEV_PROFILE.is_file():
        raise ConfigError(f"--demo needs the source checkout's {DEV_PROFILE}; on a board use --config instead")
    return load_settings(DEV_PROFILE)


def ensure_demo_model(settings: Settings) -> Path:
    """Write the tiny demo model into the models folder unless a file is already there."""
    from agent.models.synth import synth_model

    path = settings.device.models_dir / settings.model.path
    if not path.exists():
        settings.device.models_dir.mkdir(parents=True, exist_ok=True)
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
