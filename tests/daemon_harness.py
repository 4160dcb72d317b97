"""Running real daemons in tests: a config writer, an in-process daemon and a subprocess daemon.

Readiness and progress are observed through the broker (a live, non-retained "online" device
status; job statuses and results), never by sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.app.daemon import Daemon
from agent.config import Settings, load_settings
from agent.config.tree import overlay
from agent.engine import Engine
from agent.engine.supervisor import EngineConfig
from tests.broker import BrokerClient, MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out = []
    if scalars:
        if prefix:
            out.append(f"[{prefix}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        out.append("")
    for k, v in tables.items():
        out.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out)


def write_daemon_config(
    folder: Path, broker: MosquittoBroker, model_file: Path, *, device_id: str = "dev-a", **sections: dict[str, Any]
) -> Path:
    """A config for one daemon in ``folder``: its own state and models folders, the given broker,
    the model copied in, fast reconnects; ``sections`` override (e.g. store={"queue_max": 2})."""
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    models.mkdir(exist_ok=True)
    if not (models / "model.gguf").exists():
        shutil.copyfile(model_file, models / "model.gguf")
    data: dict[str, Any] = {
        "device": {"id": device_id, "state_dir": str(folder / "state"), "models_dir": str(models)},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "keepalive_s": 5,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        },
        "model": {"path": "model.gguf"},
        # One job at a time unless a test is about several (tests/test_parallel_daemon.py): queue
        # order, cancels and holds are asserted against a job that occupies the only slot.
        "engine": {"n_ctx": 512, "n_threads": 1, "n_batch": 64, "load_mode": "fit", "max_parallel": 1},
        "memory": {"budget_mb": 1024},
        "priority": {"nice": 0, "oom_score_adj": 0},
        "service": {"shutdown_grace_s": 10},
        # This machine's own memory pressure (other tests, other engineers' work) must not hold or
        # preempt the jobs of tests about something else; the governor's tests turn it on.
        "governor": {"enabled": False},
    }
    overlay(data, sections)
    path = folder / "config.toml"
    path.write_text(to_toml(data))
    return path


def wait_online(peer: BrokerClient, device_id: str, *, timeout: float = 30.0, prefix: str = "edge") -> dict:
    """Wait for a live (non-retained) 'online' device status: the daemon (re)connected just now."""
    topic = f"{prefix}/{device_id}/status"
    deadline = time.monotonic() + timeout
    while True:
        msg = peer.expect(topic, timeout=max(0.01, deadline - time.monotonic()))
        data = json.loads(msg.payload)
        if not msg.retain and data["state"] == "online":
            return data


class _Errors(logging.Handler):
    """Every ERROR (and worse) the agent logs while a daemon under test runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class InProcessDaemon:
    """A real Daemon (real store, engine and transport) served on a thread of the test process.

    ``engine_wrapper`` may wrap the real engine (see GatedEngine); ``clock`` is the daemon's wall clock.

    Used as a context manager, it fails the test when the daemon hides an error: an exit code other
    than ``expect_exit`` (0), or an ERROR logged by the agent that matches none of ``expect_errors``
    (regular expressions the test expects, e.g. a store it made unwritable on purpose). A thread that
    dies with an exception fails the test too (pytest's unhandled-thread-exception warning is an
    error in pyproject.toml).
    """

    def __init__(
        self,
        config: Path,
        *,
        engine_wrapper: Callable[[Engine], Any] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        expect_errors: tuple[str, ...] = (),
        expect_exit: int = 0,
    ) -> None:
        self.expect_errors = [re.compile(p) for p in expect_errors]
        self.expect_exit = expect_exit
        self._errors = _Errors()
        logging.getLogger("agent").addHandler(self._errors)
        self.settings: Settings = load_settings(config, environ={})
        self.engines: list[Any] = []  # every engine the daemon's supervisor made, in order

        def factory(cfg: EngineConfig) -> Any:
            engine = Engine(cfg.model_file(), engine=cfg.engine, memory=cfg.memory,
                            allow_non_4bit=cfg.model.allow_non_4bit, clock=monotonic, state_dir=cfg.state_dir)  # fmt: skip
            self.engines.append(engine_wrapper(engine) if engine_wrapper else engine)
            return self.engines[-1]

        self.daemon = Daemon(
            self.settings, engine_factory=factory, config_path=config, clock=clock, monotonic=monotonic
        )
        self.settings = self.daemon.settings  # the settings in force (the file's, overlaid by the shadow's desired)
        self._thread: threading.Thread | None = None
        self.exit_code: int | None = None

    def start(self) -> InProcessDaemon:
        def serve() -> None:
            self.exit_code = self.daemon.serve(install_signals=False)

        self._thread = threading.Thread(target=serve, name="daemon-under-test", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        self.daemon.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "daemon did not stop"
        return self.exit_code

    def __enter__(self) -> InProcessDaemon:
        return self if self._thread is not None else self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if self._thread is not None and self._thread.is_alive():
                self.stop()
        finally:
            logging.getLogger("agent").removeHandler(self._errors)
        if exc_type is None:  # else the test failed already: its own error is the one to see
            self.check()

    def close(self) -> None:
        """Stop it (if it runs) and fail the test on what it hid: ``with`` does this at its end."""
        self.__exit__(None, None, None)

    def check(self) -> None:
        """Fail the test on an unexpected exit code or an unexpected ERROR log line."""
        if self._thread is not None and self.exit_code != self.expect_exit:
            pytest.fail(f"the daemon under test exited {self.exit_code}, not {self.expect_exit}{self._error_text()}")
        unexpected = self.unexpected_errors()
        if unexpected:
            pytest.fail("the daemon under test logged errors the test did not expect:\n" + "\n".join(unexpected))

    def unexpected_errors(self) -> list[str]:
        out = []
        for r in self._errors.records:
            text = r.getMessage() + (f"\n{logging.Formatter().formatException(r.exc_info)}" if r.exc_info else "")
            if not any(p.search(text) for p in self.expect_errors):
                out.append(f"{r.levelname} {r.name}: {text}")
        return out

    def _error_text(self) -> str:
        return "".join(f"\n  {r.levelname} {r.name}: {r.getMessage()}" for r in self._errors.records)


class GatedEngine:
    """The real engine, with a gate inside generation: the first token of each run signals
    ``started`` and waits until the test opens ``gate``. Lets a test hold a job IN_PROGRESS
    for exactly as long as it needs (cancel it, queue others behind it), with no sleeps."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.started = threading.Event()
        self.gate = threading.Event()
        self.cancel: threading.Event | None = None  # the running job's cancel event, set by the daemon

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_engine", "started", "gate", "cancel"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    def generate(self, req: Any, *, on_token: Any = None, **kw: Any) -> Any:
        first = [True]
        self.cancel = kw.get("cancel")

        def gated(index: int, text: str) -> None:
            if first[0]:
                first[0] = False
                self.started.set()
                self.gate.wait()
            if on_token is not None:
                on_token(index, text)

        try:
            return self._engine.generate(req, on_token=gated, **kw)
        finally:
            self.started.clear()


class DaemonProcess:
    """`edge-agent run -c CONFIG` as a child process (what systemd runs), with its log in a file."""

    def __init__(self, config: Path, *, log_name: str = "daemon.log") -> None:
        self.config = config
        self.log_path = config.parent / log_name
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> DaemonProcess:
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()
