"""A WebSocket client over a plain socket, for tests that break the rules.

Library clients refuse to send what hostile tests need (binary where text
is expected, invalid UTF-8, fragments past a limit, never-answered pings,
half-finished handshakes) and answer pings behind the test's back. This one
does only what it is told: frames go out byte for byte, and every frame
the server sends (pings and close frames too) comes back to the test.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        if self.opcode != CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    def json(self):
        assert self.opcode == TEXT, f"expected a text frame, got {self}"
        return json.loads(self.payload.decode())


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


def build_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients; ``rsv`` sets RSV1-3)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if length < 4096 else _mask(payload, key)
    return head + key + masked


def _mask(payload: bytes, key: bytes) -> bytes:
    # Whole-buffer XOR through big integers: fast for large payloads.
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


def _payload_length(buffer: bytes) -> int:
    length = buffer[1] & 0x7F
    if length == 126:
        return struct.unpack("!H", buffer[2:4])[0]
    if length == 127:
        return struct.unpack("!Q", buffer[2:10])[0]
    return length


def _frame_size(buffer: bytes) -> int | None:
    """Length of the (unmasked) server frame at the start of ``buffer``, once its header is there."""
    if len(buffer) < 2:
        return None
    head = {126: 4, 127: 10}.get(buffer[1] & 0x7F, 2)
    if len(buffer) < head:
        return None
    return head + _payload_length(buffer)


def repeat_frames(frame: bytes, size: int) -> bytes:
    """``frame`` repeated to about ``size`` bytes: a buffer a flood sends over and over.

    Whole frames only, so that sending it in a loop from any offset it
    wrapped at keeps the stream made of the same frame.
    """
    return frame * max(1, size // len(frame))


class RawWebSocket:
    """A client socket speaking the WebSocket framing by hand.

    :param rcvbuf: a small ``SO_RCVBUF`` makes a client that stops reading
        fill up quickly, as a slow phone on a bad network would.
    """

    def __init__(
        self,
        url: str,
        ticket: str | None = None,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
        handshake: bool = True,
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.path = parts.path + (f"?ticket={ticket}" if ticket else "")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.buffer = b""
        self.closed_by_server = False
        try:
            self.sock.settimeout(timeout)
            self.sock.connect((self.host, self.port))
            if handshake:
                self.handshake(headers)
        except BaseException:
            self.sock.close()
            raise

    # -- handshake -------------------------------------------------------

    def request_bytes(self, headers: dict[str, str] | None = None) -> bytes:
        fields = {
            "Host": f"{self.host}:{self.port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        fields.update(headers or {})
        lines = [f"GET {self.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in fields.items() if value is not None]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def handshake(self, headers: dict[str, str] | None = None) -> None:
        """Upgrade; raise :class:`HandshakeRefused` on any status but 101."""
        self.sock.sendall(self.request_bytes(headers))
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(self.buffer) < length:
                self._fill()
            raise HandshakeRefused(status, self.buffer[:length])

    # -- writing ---------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True) -> None:
        self.sock.sendall(build_frame(opcode, payload, fin, mask))

    def send_text(self, text: str) -> None:
        self.send_frame(TEXT, text.encode())

    def send_json(self, value) -> None:
        self.send_text(json.dumps(value))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are, e.g. many frames built beforehand."""
        self.sock.sendall(data)

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(CLOSE, struct.pack("!H", code))

    # -- reading ---------------------------------------------------------

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the TCP connection")
        self.buffer += data

    def _need(self, count: int) -> None:
        while len(self.buffer) < count:
            self._fill()

    def recv_frame(self, timeout: float | None = 5.0) -> ServerFrame:
        """The next frame from the server, whatever its kind."""
        self.sock.settimeout(timeout)
        while True:
            size = _frame_size(self.buffer)
            if size is not None and len(self.buffer) >= size:
                return self._pop(size)
            self._fill()

    def pop_frame(self) -> ServerFrame | None:
        """The next frame already read (see :meth:`read_ready`), or None."""
        size = _frame_size(self.buffer)
        if size is None or len(self.buffer) < size:
            return None
        return self._pop(size)

    def read_ready(self, limit: int = 1 << 20) -> bool:
        """Read what the socket holds now, without waiting; False at its end.

        For a test that floods and reads in one loop; :meth:`pop_frame`
        then returns the frames. A reset counts as the end.
        """
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            while limit > 0:
                data = self.sock.recv(65536)
                if not data:
                    return False
                self.buffer += data
                limit -= len(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return False
        finally:
            self.sock.settimeout(timeout)
        return True

    def _pop(self, size: int) -> ServerFrame:
        first, second = self.buffer[0], self.buffer[1]
        assert not second & 0x80, "server frames must not be masked"
        offset = size - _payload_length(self.buffer)
        frame = ServerFrame(first & 0x0F, self.buffer[offset:size], bool(first & 0x80))
        self.buffer = self.buffer[size:]
        if frame.opcode == CLOSE:
            self.closed_by_server = True
        return frame

    def recv_json(self, timeout: float | None = 5.0, skip_pings: bool = True):
        """The next text frame as JSON; fails on a close frame."""
        while True:
            frame = self.recv_frame(timeout)
            if frame.opcode == PING and skip_pings:
                continue
            assert frame.opcode == TEXT, f"expected a text frame, got {frame}"
            return frame.json()

    def recv_close(self, timeout: float = 5.0) -> int | None:
        """Read past data frames to the close frame; return its code."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if frame.opcode == CLOSE:
                return frame.close_code

    def connected(self, timeout: float = 5.0) -> dict:
        """Read the ``@connected`` greeting."""
        hello = self.recv_json(timeout)
        assert hello["event"] == "@connected", hello
        return hello

    def request(self, frame: dict, timeout: float = 5.0) -> dict:
        """Send ``frame`` and return the next JSON frame (the answer)."""
        self.send_json(frame)
        return self.recv_json(timeout)

    # -- ending ----------------------------------------------------------

    def reset(self) -> None:
        """Vanish with a TCP reset (``SO_LINGER`` 0), no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawWebSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
