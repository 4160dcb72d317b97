"""A private ejabberd (mod_mqtt, MQTT 5) for interop tests: the Debian package, never the system service.

Owns: writing an ejabberd.yml into a folder (one MQTT listener on a free loopback port, anonymous
log-in with any user name, mod_mqtt's session expiry), running Erlang's port mapper (epmd) on a port
of its own and the ejabberd node (``erl ... -s ejabberd``) as child processes, and ending both by
their pids. Readiness is "the MQTT port accepts TCP" (ejabberd opens it last). The system's epmd on
4369, a system ejabberd and their files are never touched: every path is under the test's folder.

ejabberd keeps MQTT sessions in RAM (Mnesia ram tables): ``restart()`` loses them, as a real restart
does. ``EJABBERD_ERL`` says why a test skips when the package is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.broker import HOST, BrokerError, free_port, port_accepts

ERL = shutil.which("erl") or "/usr/bin/erl"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
EJABBERD_LIBS = Path("/usr/lib/x86_64-linux-gnu")


def ejabberd_missing() -> str | None:
    """Why ejabberd cannot run here (for pytest.skip), or None."""
    if not Path(ERL).exists() or not Path(EPMD).exists():
        return "Erlang is not installed (apt-get install ejabberd; .ci/setup installs it)"
    libs = [p for p in EJABBERD_LIBS.glob("ejabberd-*") if (p / "ebin" / "ejabberd.app").exists()]
    if not libs:
        return "ejabberd is not installed (apt-get install ejabberd; .ci/setup installs it)"
    return None


class EjabberdBroker:
    """One ejabberd node with one MQTT listener on 127.0.0.1, all state in ``tmp_dir``."""

    def __init__(
        self,
        tmp_dir: Path | str,
        *,
        session_expiry_s: int = 300,
        port: int | None = None,
        start_timeout_s: float = 90.0,  # an Erlang VM boots in seconds, far slower on a loaded machine
        join: EjabberdBroker | None = None,
    ) -> None:
        """``join``: a running node whose cluster this one joins (Mnesia extra_db_nodes: the MQTT
        sessions and subscriptions are shared; the port mapper is that node's)."""
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.join = join
        self.epmd_port = join.epmd_port if join is not None else free_port()
        self.session_expiry_s = session_expiry_s
        self.start_timeout_s = start_timeout_s
        self.tls = None  # BrokerClient reads it
        self.node = f"edgetest{self.port}@localhost"
        self.conf_path = self.dir / "ejabberd.yml"
        self.log_path = self.dir / "ejabberd.log"
        self._epmd: subprocess.Popen[bytes] | None = None
        self._erl: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.conf_path.write_text(
            "\n".join(
                [
                    'hosts: ["localhost"]',
                    "loglevel: info",
                    # Any user name and password log in (ejabberd has no "no credentials" MQTT log-in).
                    "auth_method: [anonymous]",
                    "anonymous_protocol: login_anon",
                    "allow_multiple_connections: true",
                    "listen:",
                    f"  - port: {self.port}",
                    f'    ip: "{HOST}"',
                    "    module: mod_mqtt",
                    "acl:",
                    "  local:",
                    '    user_regexp: ""',
                    "access_rules:",
                    "  local:",
                    "    allow: all",
                    "modules:",
                    "  mod_mqtt:",
                    f"    session_expiry: {self.session_expiry_s}",
                    "",
                ]
            )
        )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ERL_EPMD_PORT": str(self.epmd_port),
                "EJABBERD_CONFIG_PATH": str(self.conf_path),
                "EJABBERD_LOG_PATH": str(self.log_path),
                "ERL_LIBS": str(EJABBERD_LIBS),
                "HOME": str(self.dir),
                "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
            }
        )
        return env

    @property
    def running(self) -> bool:
        return self._erl is not None and self._erl.poll() is None

    def start(self) -> EjabberdBroker:
        if self.running:
            return self
        self._write_conf()
        out = open(self.dir / "erl.stdout", "ab")
        try:
            if self.join is None and (self._epmd is None or self._epmd.poll() is not None):
                # In the foreground (no -daemon): a child of ours, ended by its pid.
                self._epmd = subprocess.Popen(
                    [EPMD, "-port", str(self.epmd_port), "-address", HOST],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self._erl = subprocess.Popen(
                [
                    ERL,
                    "-sname",
                    self.node,
                    "-noinput",
                    "-start_epmd",
                    "false",
                    "-setcookie",
                    "edgetest",
                    *self._join_args(),
                    "-kernel",
                    "inet_dist_use_interface",
                    "{127,0,0,1}",
                    "-mnesia",
                    "dir",
                    f'"{self.dir / "spool"}"',
                    "-s",
                    "ejabberd",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env=self._env(),
            )
        finally:
            out.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._erl.poll() is not None:
                tail = self.log_tail()
                self._end_all()
                raise BrokerError(f"ejabberd exited with {self._erl.returncode} during start-up\n{tail}")
            if port_accepts(self.host, self.port):
                return self
            time.sleep(0.05)  # poll pacing only: the loop ends on readiness
        tail = self.log_tail()
        self._end_all()
        raise BrokerError(f"ejabberd did not listen on {self.port} within {self.start_timeout_s}s\n{tail}")

    def _join_args(self) -> list[str]:
        """A node joining a cluster: Mnesia starts with the other node as an extra db node (it copies the
        schema) and makes its schema a disc copy before ejabberd starts, as ejabberdctl join_cluster does."""
        if self.join is None:
            return []
        return [
            "-mnesia", "extra_db_nodes", f"['{self.join.node}']",
            "-eval", "ok = mnesia:start(), {atomic, ok} = mnesia:change_table_copy_type(schema, node(), disc_copies)",
        ]  # fmt: skip

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the Erlang VM (init:stop: listeners close, clients get no will), then epmd."""
        self._end(self._erl, signal.SIGTERM, timeout)
        self._erl = None
        self._end(self._epmd, signal.SIGTERM, timeout)
        self._epmd = None

    def kill(self) -> None:
        """SIGKILL to the node: a crashed broker (the sockets close; wills of its clients are not sent)."""
        self._end(self._erl, signal.SIGKILL, 10.0)
        self._erl = None

    def restart(self) -> EjabberdBroker:
        """Stop and start on the same port: sessions (RAM) are gone afterwards."""
        self._end(self._erl, signal.SIGTERM, 15.0)
        self._erl = None
        return self.start()

    def _end_all(self) -> None:
        self._end(self._erl, signal.SIGKILL, 10.0)
        self._end(self._epmd, signal.SIGKILL, 10.0)
        self._erl = self._epmd = None

    @staticmethod
    def _end(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        out: list[str] = []
        for p in (self.log_path, self.dir / "erl.stdout"):
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    def settings(self, client_id: str, **overrides: Any) -> Any:
        """agent MQTTSettings for this broker (a user name: ejabberd's anonymous log-in wants one)."""
        from agent.config.sections import MQTTSettings

        values: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "client_id": client_id,
            "username": client_id,
            "password": "x",
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "keepalive_s": 10,
        }
        values.update(overrides)
        return MQTTSettings.model_validate(values)

    def __repr__(self) -> str:
        return f"EjabberdBroker({self.host}:{self.port}, dir={self.dir}, running={self.running})"
