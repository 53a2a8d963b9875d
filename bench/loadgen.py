"""The load generator: thousands of raw WebSocket clients in one process.

It is built not to be the bottleneck. Most connections only count the bytes
they receive (every subscriber gets the same byte stream, so a count says
how far it got); a few *probes* parse frames, find the end of a burst and
read the timestamps for latency. Everything runs in one epoll loop, and the
process reports its own CPU use beside every figure, so a saturated
generator is visible rather than mistaken for a slow server.

Two read patterns (see STACK-NOTES, "Benchmarking on loopback"):

- ``eager``: read each socket as soon as epoll says it is readable;
- ``batched``: sleep a few milliseconds between epoll rounds and read up to
  1 MiB at once, which halves the generator's CPU but moves kernel work
  (ACKs, freeing the sender's buffers) to other moments.
"""
from __future__ import annotations

import json
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

RCVBUF = 4 * 1024 * 1024
#: Linux's option to pass ``net.core.rmem_max`` (needs root; else SO_RCVBUF).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Seconds the batched pattern sleeps between epoll rounds.
BATCH_PAUSE = 0.004


@dataclass(frozen=True)
class Protocol:
    """How one server's clients connect, get ready and talk."""

    name: str
    path: str
    #: ``reply(text)``: what to send when the server sent ``text`` during
    #: setup (``b""`` for nothing), or ``None`` once the client is ready.
    setup: Callable[[str], bytes | None]
    #: The timestamp of a broadcast, or ``None`` if ``text`` is another frame.
    stamp: Callable[[str], float | None]
    #: The text of one client event for the inbound workload.
    event: Callable[[str], str]


def client_frame(text: str, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """One masked text frame, as RFC 6455 requires of clients."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return header + mask + masked


def _robe_setup(text: str) -> bytes | None:
    if '"@connected"' in text:
        return client_frame('{"channel":"bench","event":"@subscribe"}')
    if '"@subscribed"' in text:
        return None
    return b""


def _robe_stamp(text: str) -> float | None:
    if '"event":"msg"' not in text:
        return None
    return json.loads(text)["data"]["t"]


def _sio_setup(text: str) -> bytes | None:
    if text.startswith("0{"):  # Engine.IO open: connect to the namespace
        return client_frame("40")
    if text.startswith("40"):
        return None
    return b""


def _sio_stamp(text: str) -> float | None:
    if not text.startswith('42["msg"'):
        return None
    return json.loads(text[2:])[1]["t"]


def _naive_setup(text: str) -> bytes | None:
    return None if text == "ready" else b""


def _naive_stamp(text: str) -> float | None:
    if not text.startswith('{"event": "msg"'):
        return None
    return json.loads(text)["data"]["t"]


PROTOCOLS = {
    "robe": Protocol(
        "robe", "/ops", _robe_setup, _robe_stamp,
        lambda pad: json.dumps({"channel": "bench", "event": "echo", "data": {"p": pad}, "ref": 1}),
    ),
    "socketio": Protocol(
        "socketio", "/socket.io/?EIO=4&transport=websocket", _sio_setup, _sio_stamp,
        lambda pad: "42" + json.dumps(["echo", {"p": pad}]),
    ),
    "naive": Protocol(
        "naive", "/ws", _naive_setup, _naive_stamp,
        lambda pad: json.dumps({"event": "echo", "data": {"p": pad}}),
    ),
}

# Connection kinds: what the epoll loop does with bytes from each.
SETUP, COUNT, PROBE, ECHO = range(4)


class Conn:
    __slots__ = ("sock", "fd", "kind", "upgraded", "buf", "nbytes", "done", "stamps", "msgs", "sent", "replies")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.kind = SETUP
        self.upgraded = False
        self.buf = b""
        self.nbytes = 0
        self.done = False
        self.stamps: list[float] = []
        self.msgs = 0
        self.sent = 0
        self.replies = 0


def parse_frames(buf: bytes) -> tuple[list[tuple[int, bytes, int]], bytes]:
    """Split server frames (unmasked) off ``buf``: ``(opcode, payload, size)``."""
    frames = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if end - pos < 4:
                break
            (length,) = struct.unpack_from("!H", buf, pos + 2)
            head = 4
        elif length == 127:
            if end - pos < 10:
                break
            (length,) = struct.unpack_from("!Q", buf, pos + 2)
            head = 10
        if end - pos < head + length:
            break
        frames.append((b0 & 0x0F, buf[pos + head : pos + head + length], head + length))
        pos += head + length
    return frames, buf[pos:]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BenchError(Exception):
    """The run could not be measured (timeout, refused handshake, lost bytes)."""


class LoadGen:
    """Clients of one server; ``mode`` is ``"eager"`` or ``"batched"``."""

    def __init__(self, host: str, port: int, protocol: Protocol) -> None:
        self.host, self.port, self.protocol = host, port, protocol
        self.mode = "eager"
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.ready: list[Conn] = []
        self.small = bytearray(65536)
        self.big = bytearray(1 << 20)
        self.request = (
            f"GET {protocol.path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        # Set during a measurement: the byte count every connection must reach.
        self.target = float("inf")
        self.pending = 0
        self.target_msgs = 0
        self.on_replies: Callable[[Conn, int], None] | None = None
        self.controls: list[socket.socket] = []

    # -- the loop ----------------------------------------------------------

    def _pump(self, finished: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        poll = self.epoll.poll
        conns = self.conns
        batched = self.mode == "batched"
        buf = self.big if batched else self.small
        view = memoryview(buf)
        while not finished():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.protocol.name}: timed out after {timeout}s waiting for {what}")
            for fd, _ in poll(0.05):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.kind == COUNT:
                    try:
                        n = conn.sock.recv_into(view)
                    except BlockingIOError:
                        continue
                    if not n:
                        raise BenchError(f"{self.protocol.name}: server closed a connection")
                    conn.nbytes += n
                    if not conn.done and conn.nbytes >= self.target:
                        conn.done = True
                        self.pending -= 1
                else:
                    self._read_parsed(conn)
            if batched:
                time.sleep(BATCH_PAUSE)

    def _read_parsed(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            raise BenchError(f"{self.protocol.name}: server closed a connection")
        if conn.kind == ECHO:
            conn.nbytes += len(data)
            self.on_replies(conn, conn.nbytes)
            return
        conn.buf += data
        if not conn.upgraded:
            head, found, rest = conn.buf.partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise BenchError(f"{self.protocol.name}: handshake refused: {head[:200]!r}")
            conn.upgraded = True
            conn.buf = rest
        frames, conn.buf = parse_frames(conn.buf)
        for opcode, payload, size in frames:
            if conn.kind == SETUP:
                if opcode != 0x1:
                    continue
                answer = self.protocol.setup(payload.decode())
                if answer is None:
                    conn.kind = COUNT
                    self.ready.append(conn)
                    self.pending -= 1
                elif answer:
                    conn.sock.sendall(answer)
                continue
            conn.nbytes += size
            if opcode == 0x1 and conn.kind == PROBE:
                stamp = self.protocol.stamp(payload.decode())
                if stamp is not None:
                    conn.stamps.append(time.monotonic() - stamp)
                    conn.msgs += 1
                    if conn.msgs == self.target_msgs and self.target == float("inf"):
                        self._set_target(conn.nbytes)
        if conn.kind == PROBE and not conn.done and conn.nbytes >= self.target:
            conn.done = True
            self.pending -= 1

    def _set_target(self, nbytes: int) -> None:
        self.target = nbytes
        self.pending = 0
        for conn in self.ready:
            conn.done = conn.nbytes >= nbytes
            self.pending += not conn.done

    def _reset(self) -> None:
        self.target = float("inf")
        for conn in self.ready:
            conn.nbytes = 0
            conn.done = False
            conn.msgs = 0
            conn.stamps = []
        self.pending = len(self.ready)

    # -- connections -------------------------------------------------------

    def connect(self, count: int, probes: int, concurrency: int = 64, timeout: float = 120) -> dict:
        """Open ``count`` clients, at most ``concurrency`` handshakes at once."""
        started = time.monotonic()
        cpu = cpu_seconds()
        opened = 0
        self.pending = 0
        goal = len(self.ready) + count

        def finished() -> bool:
            nonlocal opened
            while opened < count and self.pending < concurrency:
                self._open_one()
                opened += 1
            return len(self.ready) >= goal

        self._pump(finished, timeout, f"{count} connections")
        seconds = time.monotonic() - started
        # Probes spread over the join order: servers that keep members in
        # insertion order serve the first ones first.
        step = max(1, len(self.ready) // probes) if probes else 0
        for conn in self.ready[step // 2 :: step][:probes] if probes else ():
            conn.kind = PROBE
        return {
            "connections": count,
            "seconds": seconds,
            "per_second": count / seconds,
            "gen_cpu": (cpu_seconds() - cpu) / seconds,
        }

    def _open_one(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((self.host, self.port))
        sock.sendall(self.request)
        sock.setblocking(False)
        conn = Conn(sock)
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN)
        self.pending += 1

    def close(self) -> None:
        for conn in self.conns.values():
            self.epoll.unregister(conn.fd)
            conn.sock.close()
        self.conns.clear()
        self.ready.clear()

    # -- workloads ---------------------------------------------------------

    def _control(self, path: str) -> None:
        """Send a control request without waiting for its answer."""
        sock = socket.create_connection((self.host, self.port))
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        # The answer is not read: closing it after the measurement is enough.
        self.controls.append(sock)

    def _close_controls(self) -> None:
        for sock in self.controls:
            sock.close()
        self.controls.clear()

    def burst(self, messages: int, size: int, every: int = 50, timeout: float = 120) -> dict:
        """Fan-out: time until every client has received ``messages`` broadcasts.

        The server's loop yields to its other greenlets every ``every`` messages.
        """
        self._reset()
        self.target_msgs = messages
        cpu = cpu_seconds()
        started = time.monotonic()
        self._control(f"/bench/burst?m={messages}&size={size}&every={every}")
        self._pump(lambda: self.pending == 0, timeout, f"a burst of {messages}")
        seconds = time.monotonic() - started
        self._close_controls()
        deliveries = messages * len(self.ready)
        return {
            "deliveries": deliveries,
            "seconds": seconds,
            "per_second": deliveries / seconds,
            "gen_cpu": (cpu_seconds() - cpu) / seconds,
        }

    def paced(self, rate: float, count: int, size: int, timeout: float = 120) -> dict:
        """Latency: ``count`` broadcasts at ``rate``/s, probes time each one."""
        self._reset()
        self.target_msgs = count
        cpu = cpu_seconds()
        started = time.monotonic()
        self._control(f"/bench/paced?rate={rate}&count={count}&size={size}")
        self._pump(lambda: self.pending == 0, timeout + count / rate, f"{count} paced broadcasts")
        seconds = time.monotonic() - started
        self._close_controls()
        latencies = sorted(s for conn in self.ready if conn.kind == PROBE for s in conn.stamps)
        if not latencies:
            raise BenchError("no probe measured a latency")

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        return {
            "samples": len(latencies),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": latencies[-1] * 1000,
            "gen_cpu": (cpu_seconds() - cpu) / seconds,
        }

    def inbound(self, per_client: int, window: int, size: int, timeout: float = 120) -> dict:
        """Every client keeps ``window`` events in flight until ``per_client`` are answered."""
        frame = client_frame(self.protocol.event("x" * size))
        reply_size = self._reply_size(frame, timeout)
        self._reset()
        for conn in self.ready:
            conn.kind = ECHO
            conn.sent = conn.replies = 0

        def on_replies(conn: Conn, nbytes: int) -> None:
            conn.replies = nbytes // reply_size
            if conn.replies >= per_client:
                if not conn.done:
                    conn.done = True
                    self.pending -= 1
                return
            more = min(per_client, conn.replies + window) - conn.sent
            if more > 0:
                conn.sock.sendall(frame * more)
                conn.sent += more

        self.on_replies = on_replies
        cpu = cpu_seconds()
        started = time.monotonic()
        for conn in self.ready:
            on_replies(conn, 0)
        self._pump(lambda: self.pending == 0, timeout, "the inbound replies")
        seconds = time.monotonic() - started
        events = per_client * len(self.ready)
        for conn in self.ready:
            conn.kind = COUNT
        return {
            "events": events,
            "seconds": seconds,
            "per_second": events / seconds,
            "gen_cpu": (cpu_seconds() - cpu) / seconds,
        }

    def _reply_size(self, frame: bytes, timeout: float) -> int:
        """Send one event and measure the frame that answers it."""
        conn = self.ready[0]
        conn.sock.setblocking(True)
        conn.sock.settimeout(timeout)
        try:
            conn.sock.sendall(frame)
            buf = b""
            while True:
                buf += conn.sock.recv(65536)
                frames, rest = parse_frames(buf)
                if frames:
                    if len(frames) > 1 or rest:
                        raise BenchError(f"{self.protocol.name}: more than one reply to one event")
                    return frames[0][2]
        finally:
            conn.sock.setblocking(False)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
