"""An MQTT 3.1.1 probe: does a broker that closed the connection on our MQTT 5 CONNECT speak 3.1.1?

Owns one short exchange on its own socket (CONNECT with a clean session and a throw-away client id,
CONNACK, DISCONNECT), written by hand: paho's client is configured for MQTT 5 and a second paho
client here would only hide the bytes this check is about. A broker that answers it with a CONNACK
speaks MQTT 3.1.1 only (RabbitMQ before 3.13 does this); one that closes this too is down or
refuses every client, which the transport's own error says.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_311(client_id: str, username: str | None = None, password: str | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session, keep-alive 10 s)."""
    flags = 0x02
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes([0x04, flags]) + struct.pack("!H", 10) + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def probe_mqtt311(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 3.0,
) -> int | None:
    """The CONNACK return code a 3.1.1 CONNECT gets (0: accepted, 4/5: credentials refused), or None
    when the broker does not answer it with a 3.1.1 CONNACK (closed, silent, or not MQTT)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(raw, server_hostname=host)
            sock.settimeout(timeout)
            sock.sendall(connect_311(f"edge-probe-{os.urandom(5).hex()}", username, password))
            answer = _read_exactly(sock, 4)
            if len(answer) == 4 and answer[0] == 0x20 and answer[1] == 0x02:
                try:
                    sock.sendall(b"\xe0\x00")  # DISCONNECT: no will, no session left behind
                except OSError:
                    pass
                return answer[3]
            return None
    except (OSError, ValueError):
        return None


__all__ = ["connect_311", "probe_mqtt311"]
