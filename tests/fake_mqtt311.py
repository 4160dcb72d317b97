"""A listener that behaves like RabbitMQ 3.10's MQTT plugin at connect time: MQTT 3.1.1 only.

It reads each client's CONNECT: protocol level 5 (MQTT 5) gets the connection closed without a
CONNACK, as RabbitMQ before 3.13 does; level 4 (3.1.1) gets CONNACK 0 (accepted) and the
connection is kept until the client leaves. ``answer_311=False`` closes every connection (a listener
that is not an MQTT broker at all), so the probe's "confirmed" has a counterpart. Nothing else of
MQTT is spoken: the transport's detection only needs the CONNECT/CONNACK exchange.
"""

from __future__ import annotations

import socket
import threading

from tests.broker import HOST


class FakeMqtt311Broker:
    def __init__(self, *, answer_311: bool = True) -> None:
        self.answer_311 = answer_311
        self.host = HOST
        self.tls = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self.connects: list[int] = []  # protocol level of every CONNECT read, in order
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fake-mqtt311", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                level = self._read_connect(conn)
            except OSError:
                return
            if level is None:
                return
            with self._lock:
                self.connects.append(level)
            if level != 4 or not self.answer_311:
                return  # closed without a CONNACK
            try:
                conn.sendall(b"\x20\x02\x00\x00")
                while conn.recv(1024):  # until the client's DISCONNECT closes it
                    pass
            except OSError:
                return

    @staticmethod
    def _read_connect(conn: socket.socket) -> int | None:
        """The protocol level of the CONNECT packet read from ``conn`` (None: not a CONNECT)."""
        first = conn.recv(1)
        if first != b"\x10":
            return None
        length, shift = 0, 0
        while True:
            b = conn.recv(1)
            if not b:
                return None
            length |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        name_len = int.from_bytes(body[:2], "big")
        return body[2 + name_len]  # protocol level: 4 = 3.1.1, 5 = MQTT 5

    def close(self) -> None:
        self._closed.set()
        self._sock.close()

    def __enter__(self) -> FakeMqtt311Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
