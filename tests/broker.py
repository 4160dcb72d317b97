"""A private Mosquitto broker for tests and benchmarks, plus the TLS material it needs.

Owns: writing mosquitto.conf (and the password and ACL files) into a folder, running
``mosquitto -c`` in the foreground as a child process on a loopback port, and stopping,
killing or restarting it; readiness is "the port accepts TCP". ``BrokerClient`` is an
independent peer (plain paho, not agent.mqtt.transport) for tests to publish jobs and observe
what the agent sends. The system broker on 1883 is never used.
"""

from __future__ import annotations

import itertools
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The test broker could not be started; the message carries the end of its log."""


@dataclass(frozen=True)
class ClientCert:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TLSFiles:
    """PEM files from one throw-away CA: the broker's certificate and one client certificate
    per device, whose CN is the device id (the broker's user name with use_identity_as_username)."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, ClientCert] = field(default_factory=dict)
    # Signed by a different CA: the broker is not trusted by it (the "wrong CA" case).
    other_ca_file: Path | None = None


def make_tls_material(
    folder: Path,
    client_ids: tuple[str, ...] = ("dev-a", "dev-b", "cloud"),
    server_names: tuple[str, ...] = (HOST, "localhost"),
) -> TLSFiles:
    """A CA, a server certificate for ``server_names``, and a client certificate per id."""
    import trustme  # test-only dependency; imported here so the broker alone works without it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    server = ca.issue_cert(*server_names, common_name=server_names[0])
    server_cert, server_key = folder / "server.pem", folder / "server.key"
    # The chain (leaf then CA) so a client that only trusts the CA can build the path.
    server_cert.write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    server.private_key_pem.write_to_path(server_key)
    clients = {}
    for cid in client_ids:
        leaf = ca.issue_cert(f"{cid}.devices.invalid", common_name=cid)
        cert, key = folder / f"client-{cid}.pem", folder / f"client-{cid}.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(key)
        clients[cid] = ClientCert(cert, key)
    other_ca_file = folder / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other_ca_file)
    return TLSFiles(ca_file, server_cert, server_key, clients, other_ca_file)


def device_acl(prefix: str = "edge", admins: tuple[str, ...] = ("cloud",)) -> str:
    """ACL text: each user (device id) reads and writes only {prefix}/{its id}/#; admins see all."""
    lines = [f"pattern readwrite {prefix}/%u/#", ""]
    for admin in admins:
        lines += [f"user {admin}", f"topic readwrite {prefix}/#", ""]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process bound to 127.0.0.1 with its config, data and log in ``tmp_dir``.

    Persistence is on by default: stop() (SIGTERM) saves the database and restart() reloads
    it, which is what a broker restart in the field does. kill() (SIGKILL) loses whatever
    was not autosaved yet.
    """

    def __init__(
        self,
        tmp_dir: Path | str,
        *,
        port: int | None = None,
        persistence: bool = True,
        autosave_interval_s: int = 60,
        tls: TLSFiles | None = None,
        require_certificate: bool = False,
        passwords: dict[str, str] | None = None,
        acl: str | None = None,
        allow_anonymous: bool = True,
        extra_conf: str = "",
        start_timeout_s: float = 30.0,
    ) -> None:
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.host = HOST
        self.persistence = persistence
        self.autosave_interval_s = autosave_interval_s
        self.tls = tls
        self.require_certificate = require_certificate
        self.passwords = passwords
        self.acl = acl
        self.allow_anonymous = allow_anonymous
        self.extra_conf = extra_conf
        self.start_timeout_s = start_timeout_s
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.data_dir = self.dir / "data"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration ---------------------------------------------------------------------

    def _write_conf(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        lines = [
            # Run as whoever runs the tests: as root, mosquitto would otherwise switch to the
            # "mosquitto" user, which cannot read these files or write the database.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "per_listener_settings false",
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "persistence_file mosquitto.db",
                f"autosave_interval {self.autosave_interval_s}",
            ]
        else:
            lines.append("persistence false")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        if self.passwords is not None:
            pw_file = self.dir / "passwords"
            pw_file.write_text("")
            for user, password in self.passwords.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw_file), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {pw_file}")
        if self.acl is not None:
            acl_file = self.dir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if self.extra_conf:
            lines.append(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- process control -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        # A free port can be taken by someone else between choosing and binding it; with a
        # port of our own choosing, pick another and try again.
        for attempt in range(3):
            self._write_conf()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except BrokerError:
                in_use = "Address already in use" in self.log_tail()
                self._reap()
                if self._fixed_port or not in_use or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        log = open(self.dir / "mosquitto.stdout", "ab")
        try:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )
        finally:
            log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._proc.returncode} during start-up\n{self.log_tail()}")
            if port_accepts(self.host, self.port, timeout=0.2):
                return
            # Poll pacing only: the loop exits on readiness, not on this delay.
            time.sleep(0.02)
        raise BrokerError(
            f"mosquitto did not accept connections on {self.port} within {self.start_timeout_s}s\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: mosquitto saves its database on the way out."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: like a power cut for the broker; unsaved state is lost."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def _reap(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> MosquittoBroker:
        """Stop (saving state) and start again on the same port."""
        self.stop()
        self._fixed_port = True  # clients are configured with this port: keep it
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for p in (self.log_path, self.dir / "mosquitto.stdout"):
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, dir={self.dir}, running={self.running})"

    # -- helpers for tests ------------------------------------------------------------------

    def settings(self, client_id: str, **overrides: Any) -> Any:
        """agent MQTTSettings pointing at this broker, with fast reconnects for tests."""
        from agent.config.sections import MQTTSettings

        values: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "client_id": client_id,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "keepalive_s": 10,
        }
        values.update(overrides)
        return MQTTSettings.model_validate(values)


class TcpProxy:
    """A loopback TCP relay in front of a broker that can simulate network loss.

    ``partition()``: bytes in both directions are dropped and closes are not passed on, so
    both ends see a silent, half-open connection (as when a Wi-Fi link goes away); new
    connections are closed at once. ``heal()``: existing (now corrupt) streams are closed and
    new connections pass again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = HOST
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._blocked = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                if not self._blocked.is_set():
                    for s_ in (src, dst):
                        try:
                            s_.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                return
            if self._blocked.is_set():
                continue  # lost on the way
            try:
                dst.sendall(data)
            except OSError:
                return

    def partition(self) -> None:
        self._blocked.set()

    def heal(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._blocked.clear()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.heal()


class BrokerClient:
    """A test peer ("the cloud"): connects, subscribes and publishes with explicit waits.

    Every received message lands in ``self.messages`` (a queue of paho MQTTMessage); use
    ``expect()`` to take the next one with a deadline. Plain paho on purpose: the agent's
    transport is checked against an implementation that is not itself.
    """

    _ids = itertools.count()

    def __init__(
        self,
        broker: MosquittoBroker,
        client_id: str | None = None,
        *,
        cert: ClientCert | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_start: bool = True,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self._mqtt = mqtt
        self.broker = broker
        self.client_id = client_id or f"test-peer-{os.getpid()}-{next(self._ids)}"
        self.messages: queue.Queue[Any] = queue.Queue()
        self._connack: queue.Queue[Any] = queue.Queue()
        self._subacks: dict[int, queue.Queue[Any]] = {}
        self._clean_start = clean_start
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if broker.tls is not None:
            import ssl

            ctx = ssl.create_default_context(cafile=str(broker.tls.ca_file))
            if cert is not None:
                ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
            c.tls_set_context(ctx)
        c.on_connect = lambda _c, _u, flags, rc, props: self._connack.put(rc)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, mid, rcs, props: self._subacks.setdefault(mid, queue.Queue()).put(rcs)
        self.client = c

    def connect(self, timeout: float = 10.0) -> BrokerClient:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=self._clean_start)
        self.client.loop_start()
        rc = self._connack.get(timeout=timeout)
        if rc.is_failure:
            self.close()
            raise ConnectionError(f"test peer refused: {rc}")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[Any]:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == 0, rc
        q = self._subacks.setdefault(mid, queue.Queue())
        return list(q.get(timeout=timeout))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for {topic} within {timeout}s")

    def expect(self, topic: str | None = None, timeout: float = 10.0) -> Any:
        """The next message (on ``topic`` if given; others before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message on {topic or 'any topic'} within {timeout}s")
            msg = self.messages.get(timeout=left)
            if topic is None or msg.topic == topic:
                return msg

    def barrier(self, timeout: float = 10.0, prefix: str = "edge") -> list[Any]:
        """Round-trip two markers through the broker and return everything received before
        them. After this, the broker has processed whatever reached it before the call (the
        second round trip starts after the first came back, so it is handled in a later pass
        of the broker's event loop)."""
        topic = f"{prefix}/_barrier/{self.client_id}"
        self.subscribe(topic, 1, timeout)
        seen: list[Any] = []
        for marker in (b"1", b"2"):
            self.publish(topic, marker, timeout=timeout)
            while True:
                msg = self.messages.get(timeout=timeout)
                if msg.topic == topic and msg.payload == marker:
                    break
                seen.append(msg)
        return seen

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> BrokerClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
