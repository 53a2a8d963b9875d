"""One client connection: its socket, its send queue and its state."""
from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import gevent
from gevent import monkey

from . import protocol
from .frames import PING_FRAME, PONG, close_frame, valid_close_code, ws_frame
from .ratelimit import RateLimiter
from .websocket import ServerSocket

if TYPE_CHECKING:
    from .server import SocketServer

log = logging.getLogger("flask_robe_sockets")


def _under_gevent() -> bool:
    """Whether this process runs on gevent's loop (gunicorn's gevent worker).

    The flusher and the raw reader greenlets need that loop; under a
    threaded server (``flask run``) nothing would ever run them, so each
    connection uses a reader thread and its own writer wakes up instead.
    """
    return monkey.is_module_patched("socket")


class _Flusher:
    """Writes the queued frames of every connection from one greenlet.

    Waking one writer greenlet per connection for each broadcast costs two
    greenlet switches per subscriber, more than the write itself. Instead
    ``push`` marks the connection, and once the publisher yields, this writes
    each marked queue with one non-blocking ``send``. Only what the socket
    does not take at once is left to the connection's own writer, which
    waits for the socket (with a timeout) as before.
    """

    def __init__(self) -> None:
        self._pending: list[Connection] = []

    def add(self, conn: "Connection") -> None:
        if not self._pending:
            # A raw greenlet: a gevent.Greenlet records the stack that spawned
            # it, a cost paid on every round of the event loop that writes.
            gevent.spawn_raw(self._run)
        self._pending.append(conn)

    def _run(self) -> None:
        while self._pending:
            pending, self._pending = self._pending, []
            for conn in pending:
                try:
                    conn._flush()
                except Exception:  # one broken connection must not stall the others
                    log.exception("writing to connection %s failed", conn.id)


# One per process: every connection of a gevent worker shares its event loop.
_flusher = _Flusher()


class _Reader:
    """simple-websocket's reader thread, as a raw greenlet.

    Its default, a monkey-patched ``threading.Thread``, costs about 3 KB more
    per idle connection (thread object, locks, registry entry), and even a
    ``gevent.Greenlet`` 2.5 KB (it records the stack that spawned it).
    """

    __slots__ = ("name", "_target")

    def __init__(self, target: Callable[[], None]) -> None:
        self.name = "simple_websocket.Base._thread"
        self._target = target

    def start(self) -> None:
        gevent.spawn_raw(self._target)


class Connection:
    """A client connected to the socket endpoint.

    Handlers and hooks receive it. ``metadata`` is a dict for the
    application's own per-connection state; the library never reads it.
    """

    def __init__(
        self, server: "SocketServer", identity: Any = None, remote_addr: str | None = None
    ) -> None:
        #: Unique id, also sent to the client in ``@connected``.
        self.id: str = secrets.token_urlsafe(12)
        #: What the ticket's identity loader returned (``None`` without one).
        self.identity: Any = identity
        #: The client's IP address as Flask saw it.
        self.remote_addr: str | None = remote_addr
        #: Free for the application's use.
        self.metadata: dict[str, Any] = {}
        self._server = server
        self._channels: set[str] = set()
        # A list, not a deque: an empty deque takes 600 bytes, an idle
        # connection's whole budget is a few kilobytes.
        self._queue: list[bytes] = []
        self._queue_size = server.config["ROBE_SOCKETS_SEND_QUEUE_SIZE"]
        self._queue_max_bytes = server.config["ROBE_SOCKETS_SEND_QUEUE_BYTES"]
        # Bytes in the queue, and in a batch being written from it.
        self._queued_bytes = 0
        self._on_gevent = _under_gevent()
        # Set by writers of the queue; waited on by the writer loop.
        self._wakeup = threading.Event()
        # Whether the flusher has this connection on its list.
        self._flush_pending = False
        # Whether the writer is in the middle of a (blocking) write.
        self._writing = False
        # Whether the queue's first item is the rest of a frame partly written.
        self._partial_head = False
        # Set while the reader runs the application's handlers: the client's
        # pong may wait unread behind a slow one, so silence is not its fault.
        self._busy = False
        self._closing = False
        # The close code and who ended the connection, for the log.
        self._close_code: int | None = None
        self._closed_by = ""
        self._reader_done = threading.Event()
        self._active = self._opened = time.monotonic()
        rate, burst = server.config["ROBE_SOCKETS_RATE_LIMIT"]
        self._limiter = RateLimiter(rate, burst)
        rate, burst = server.config["ROBE_SOCKETS_BYTE_RATE_LIMIT"]
        self._byte_limiter = RateLimiter(rate, burst)
        self._socket: ServerSocket | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} identity={self.identity!r}>"

    @property
    def channels(self) -> frozenset[str]:
        """Names of the channels this connection is subscribed to."""
        return frozenset(self._channels)

    @property
    def open(self) -> bool:
        """Whether messages sent to this connection can still reach it."""
        return not self._closing

    def send(self, event: str, data: Any = None, channel: str | None = None) -> None:
        """Send an event to this connection alone (no ``seq``).

        :param channel: the channel to name in the frame, or ``None`` for a
            connection-level message.
        """
        if channel is not None and not protocol.is_valid_channel(channel):
            raise ValueError(f"invalid channel name {channel!r}")
        if not protocol.is_valid_event(event):
            raise ValueError(f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'")
        self._answer(event, data, channel)

    def _answer(
        self, event: str, data: Any = None, channel: str | None = None, ref: Any = None
    ) -> None:
        """Queue one frame of the protocol's own (``@reply``, ``@error``...) for this client."""
        self.push(ws_frame(protocol.encode(event, data, channel, ref)))

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        """Close the connection: queued messages are written, then the close frame.

        :param code: 1000 (normal) or another code a peer may send: 1001 to
            1014 (not 1004-1006), or 3000 to 4999 for the application's own.
        """
        if not valid_close_code(code):
            raise ValueError(f"{code} is not a close code that may be sent (RFC 6455, section 7.4)")
        if self._closing:
            return
        self._closing = True
        if self._close_code is None:
            self._close_code, self._closed_by = code, "server"
        self._server.forget(self)
        frame = close_frame(code, reason)
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._socket is not None:
            self._socket.frames.close()
        self._wakeup.set()

    def fail(self, code: int, reason: str) -> None:
        """Close because the client broke the protocol or a limit; what it
        still sends is dropped unread (see ``ServerSocket``)."""
        log.info("connection %s failed: closing with %d (%s)", self.id, code, reason)
        self.close(code, reason)
        if self._socket is not None:
            self._socket.frames.drain()

    # -- the send queue -------------------------------------------------

    def push(self, frame: bytes) -> None:
        """Queue a ready WebSocket frame; never blocks."""
        if self._closing:
            return
        if len(self._queue) >= self._queue_size or self._queued_bytes + len(frame) > self._queue_max_bytes:
            if self._on_gevent:
                # The flusher may not have had its turn yet (a reader handles
                # a whole read, e.g. a reconnect's resubscribes with their
                # replays, without yielding): the socket may take it now.
                self._flush()
            if len(self._queue) >= self._queue_size or (
                # A frame larger than the whole budget still goes to a client
                # that has nothing else waiting.
                self._queued_bytes and self._queued_bytes + len(frame) > self._queue_max_bytes
            ):
                self._overflow()
                return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if not self._on_gevent:
            self._wakeup.set()
        elif not self._flush_pending:
            self._flush_pending = True
            _flusher.add(self)

    def _flush(self) -> None:
        """Write the queue without blocking; the writer takes what is left."""
        self._flush_pending = False
        queue = self._queue
        if not queue or self._writing or self._socket is None:
            return
        frames = queue[:]
        batch = b"".join(frames) if len(frames) > 1 else frames[0]
        queue.clear()
        head_was_partial, self._partial_head = self._partial_head, False
        sock = self._socket.sock
        if isinstance(sock, ssl.SSLSocket):
            # Under TLS (gunicorn --certfile) the OS socket below would get
            # plaintext: the writer's sendall goes through the SSL layer.
            sent = 0
        else:
            try:
                # The OS socket under gevent's wrapper: MSG_DONTWAIT makes sure
                # this greenlet never waits here, whatever the socket's mode.
                sent = getattr(sock, "_sock", sock).send(batch, socket.MSG_DONTWAIT)
            except OSError:
                sent = 0  # would block, or broken: the writer's sendall finds out which
        self._queued_bytes -= sent
        if sent < len(batch):
            # Put back what is left frame by frame, the one cut short first,
            # so that the queue still counts messages, as its limit does.
            for index, frame in enumerate(frames):
                if sent < len(frame):
                    break
                sent -= len(frame)
            left = frames[index + 1 :]
            left.insert(0, frame[sent:] if sent else frame)
            self._partial_head = bool(sent) or (index == 0 and head_was_partial)
            queue[0:0] = left
            self._wakeup.set()

    def _overflow(self) -> None:
        log.warning("connection %s is not reading: send queue full, closing with 4008", self.id)
        # The rest of a frame the socket took only part of must still go
        # out: cut short, it would turn the close frame after it into garbage.
        rest = self._queue[0] if self._partial_head else None
        self._queue.clear()
        self._queued_bytes = 0
        if rest is not None:
            self._queue.append(rest)
            self._queued_bytes = len(rest)
        self.close(protocol.CLOSE_SLOW_CONSUMER, "send queue overflow")

    # -- called by ServerSocket and its FrameReader, in the reader -------

    def on_activity(self) -> None:
        self._active = time.monotonic()

    def on_frame(self, size: int) -> bool:
        """Charge one frame of ``size`` bytes, whatever its kind; whether to read it."""
        limiter = self._limiter
        if limiter.allow():
            if self._byte_limiter.allow(size):
                return True
            limiter.strike()
        if self._closing:
            # A client that floods after our close frame is not waited for.
            self._socket.frames.drain()
        elif limiter.exhausted:
            log.warning("connection %s kept flooding: closing with 1008", self.id)
            self.fail(protocol.CLOSE_POLICY, "rate limit exceeded")
        return False

    def on_refused(self, text: str | None) -> None:
        if not self._closing:
            self._server.answer_rate_limited(self, text)

    def on_text(self, text: str) -> None:
        if self._closing:
            return
        self._busy = True
        try:
            self._server.handle_text(self, text)
        finally:
            self._busy = False

    def on_binary(self) -> None:
        if not self._closing:
            self._server.answer_error(self, "bad_frame", "binary frames are not supported")

    def on_ping(self, payload: bytes) -> None:
        self.push(ws_frame(payload, PONG))

    def on_close(self, code: int) -> None:
        if self._close_code is None:
            self._close_code, self._closed_by = code, "client"
        # Echo the client's code as RFC 6455 asks; 1005/1006 never go on the wire.
        self.close(code if code not in (1005, 1006) else protocol.CLOSE_NORMAL)

    def on_reader_done(self) -> None:
        self._reader_done.set()
        self._lost("client")

    def _lost(self, by: str) -> None:
        """The socket is gone without a closing handshake (or after ours)."""
        if not self._closing:
            self._closing = True
            self._close_code, self._closed_by = 1006, by
            self._server.forget(self)
            self._queue.clear()
            self._queued_bytes = 0
        self._wakeup.set()

    # -- the writer, run in the request's own greenlet -------------------

    def serve(self, environ: dict) -> None:
        """Upgrade the request and run the connection until it ends."""
        config = self._server.config
        try:
            self._socket = ServerSocket(
                environ,
                self,
                config["ROBE_SOCKETS_MAX_MESSAGE_SIZE"],
                config["ROBE_SOCKETS_MAX_FRAGMENTS"],
                thread_class=_Reader if self._on_gevent else None,
            )
        except OSError as exc:  # the client left during the handshake
            log.info("handshake from %s not completed: %r", self.remote_addr, exc)
            return
        log.info("connection %s opened: identity=%r ip=%s", self.id, self.identity, self.remote_addr)
        try:
            self._server.connected(self)
            self._write_loop(config["ROBE_SOCKETS_PING_INTERVAL"])
        except (OSError, gevent.Timeout) as exc:
            log.info("connection %s lost while writing: %r", self.id, exc)
        finally:
            self._shutdown(config["ROBE_SOCKETS_CLOSE_TIMEOUT"])

    def _write_loop(self, ping_interval: float | None) -> None:
        sock = self._socket.sock
        queue = self._queue
        write_timeout = ping_interval or 30
        pinged_at: float | None = None
        while True:
            timeout = None
            if ping_interval:
                # Counted from the client's last sign of life, or from our
                # ping: waking up for writes must not push the deadline back.
                start = self._active if pinged_at is None else pinged_at
                timeout = max(0.0, start + ping_interval - time.monotonic())
            if not self._wakeup.wait(timeout):
                if pinged_at is not None:
                    # Compared with the ping's time, not with the interval:
                    # the timer fires a little late, so a prompt pong can
                    # still be "an interval ago" by now. A client whose
                    # handler is still running is not silent by its fault.
                    if self._active < pinged_at and not self._busy:
                        log.info("connection %s did not answer a ping: dropping it", self.id)
                        # Nothing more to wait for from this client.
                        self._reader_done.set()
                        self._lost("server")
                        return
                    pinged_at = None
                now = time.monotonic()
                if now - self._active >= ping_interval:
                    pinged_at = now
                    queue.append(PING_FRAME)
                    self._queued_bytes += len(PING_FRAME)
            self._wakeup.clear()
            while queue:
                # Only what was taken is removed: under a threaded server
                # another thread may append meanwhile.
                taken = len(queue)
                batch = b"".join(queue[:taken]) if taken > 1 else queue[0]
                del queue[:taken]
                self._partial_head = False
                self._writing = True
                with gevent.Timeout(write_timeout):
                    sock.sendall(batch)
                self._queued_bytes -= len(batch)
                self._writing = False
            if self._closing and not queue:
                return

    def _shutdown(self, close_timeout: float) -> None:
        if self._close_code is None:  # the write failed: the network is gone
            self._close_code, self._closed_by = 1006, "network"
        self._closing = True
        self._server.forget(self)
        if not self._reader_done.is_set() and self._socket.connected:
            if self._socket.draining:
                # Our close frame is out: a FIN after it lets the client close
                # too while the reader drops what it still sends. Closing with
                # input unread would reset the connection instead, and the
                # client could lose the close code (1009, 1007) with it.
                try:
                    self._socket.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            # Give the client the chance to answer our close frame.
            self._reader_done.wait(close_timeout)
        try:
            self._socket.sock.close()
        except OSError:
            pass
        self._socket.connected = False
        log.info(
            "connection %s closed after %.1fs: code %s by the %s",
            self.id, time.monotonic() - self._opened, self._close_code, self._closed_by or "server",
        )
        self._server.disconnected(self)
