"""The machinery of one client connection: its send queue, writers and limits.

A :class:`Session` is private to the library; handlers and hooks get the
public :class:`~flask_robe_sockets.connection.Connection` that wraps it. It
owns the socket once the handshake is done: the reader greenlet hands it
frames (it is the transport's listener), and it writes what is queued,
through the process's flusher first and its own writer loop for the rest.
What it cannot decide itself goes up to ``events``, an object of the layer
above (see :class:`SessionEvents`) named for what happened.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Protocol

import gevent

from . import protocol
from .config import Settings
from .errors import ProtocolError
from .frames import PING_FRAME, PONG, close_frame, valid_close_code, ws_frame
from .metrics import NULL, Metrics
from .ratelimit import RateLimiter
from .websocket import ServerSocket, under_gevent

log = logging.getLogger("flask_robe_sockets")


class SessionEvents(Protocol):
    """What a session tells the layer above; each is called once per session
    (``message`` once per text message)."""

    def opened(self, session: "Session") -> None: ...  # upgraded: greet it, or close it
    def message(self, session: "Session", text: str) -> None: ...  # a text message to handle
    def closing(self, session: "Session") -> None: ...  # no more deliveries: leave every channel
    def closed(self, session: "Session") -> None: ...  # the socket is gone


class _Flusher:
    """Writes the queued frames of every session from one greenlet.

    Waking one writer greenlet per connection for each broadcast costs two
    greenlet switches per subscriber, more than the write itself. Instead
    ``push`` marks the session, and once the publisher yields, this writes
    each marked queue with one non-blocking ``send``. Only what the socket
    does not take at once is left to the session's own writer, which waits
    for the socket (with a timeout).
    """

    def __init__(self) -> None:
        self._pending: list[Session] = []

    def add(self, session: "Session") -> None:
        if not self._pending:
            # A raw greenlet: a gevent.Greenlet records the stack that spawned
            # it, a cost paid on every round of the event loop that writes.
            gevent.spawn_raw(self._run)
        self._pending.append(session)

    def _run(self) -> None:
        while self._pending:
            pending, self._pending = self._pending, []
            for session in pending:
                try:
                    session.flush()
                except Exception:  # one broken connection must not stall the others
                    log.exception("writing to connection %s failed", session.id)


# One per process: every connection of a gevent worker shares its event loop.
_flusher = _Flusher()


class Session:
    """One connection's queue, writers, limits and lifecycle.

    :param owner: what the layer above hands to the application for this
        session (the public ``Connection``); the session never looks at it.
    :param metrics: told when it opens and closes, of every client frame,
        of refused ones and of an overflowing queue.
    """

    def __init__(
        self,
        settings: Settings,
        events: SessionEvents,
        identity: Any = None,
        remote_addr: str | None = None,
        metrics: Metrics = NULL,
    ) -> None:
        #: Unique id, also sent to the client in ``@connected``.
        self.id: str = secrets.token_urlsafe(12)
        self.identity = identity
        self.remote_addr = remote_addr
        #: The public Connection of this session, set by whoever made both.
        self.owner: Any = None
        self._settings = settings
        self._events = events
        self._metrics = metrics
        # A list, not a deque: an empty deque takes 600 bytes, an idle
        # connection's whole budget is a few kilobytes.
        self._queue: list[bytes] = []
        # Copied from the settings: push reads them for every broadcast.
        self._queue_size = settings.send_queue_size
        self._queue_max_bytes = settings.send_queue_bytes
        self._on_gevent = under_gevent()
        # Bytes in the queue, and in a batch being written from it, counted
        # while _counting: whenever a write could not take everything (the
        # client is behind), and always without gevent. A client that keeps
        # up has its queue emptied by every flush, so its pushes need not
        # count: the byte count cost the broadcast path a fifth of its speed,
        # and between two flushes the message bound holds meanwhile.
        self._queued_bytes = 0
        self._counting = not self._on_gevent
        # Set by writers of the queue; waited on by the writer loop.
        self._wakeup = threading.Event()
        # Whether the flusher has this session on its list.
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
        self._limiter = RateLimiter(*settings.rate_limit)
        self._byte_limiter = RateLimiter(*settings.byte_rate_limit)
        self._socket: ServerSocket | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} identity={self.identity!r}>"

    @property
    def open(self) -> bool:
        """Whether frames pushed now can still reach the client."""
        return not self._closing

    @property
    def queued(self) -> tuple[bytes, ...]:
        """What waits to be written, oldest first (the first may be the rest of a frame)."""
        return tuple(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to be written, or being written."""
        return self._queued_bytes if self._counting else sum(map(len, self._queue))

    def attach(self, transport: ServerSocket) -> None:
        """Write to ``transport`` from now on; ``serve`` attaches the socket it upgraded."""
        self._socket = transport

    def answer(self, event: str, data: Any = None, channel: str | None = None, ref: Any = None) -> None:
        """Queue one frame of the protocol (``@reply``, ``@error``...) or an event."""
        self.push(ws_frame(protocol.encode(event, data, channel, ref)))

    def answer_error(self, code: str, message: str, ref: Any = None, channel: str | None = None) -> None:
        self.answer(protocol.ERROR, protocol.error_payload(code, message), channel, ref)

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        """Close: queued frames are written, then the close frame.

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
        self._events.closing(self)
        frame = close_frame(code, reason)
        self._queue.append(frame)
        if self._counting:
            self._queued_bytes += len(frame)
        if self._socket is not None:
            self._socket.frames.close()
        self._wakeup.set()

    def fail(self, code: int, reason: str) -> None:
        """Close because the client broke the protocol or a limit; what it
        still sends is dropped unread."""
        log.info("connection %s failed: closing with %d (%s)", self.id, code, reason)
        self.close(code, reason)
        if self._socket is not None:
            self._socket.frames.drain()

    # -- the send queue -------------------------------------------------

    def push(self, frame: bytes) -> None:
        """Queue a ready WebSocket frame; never blocks."""
        if self._closing:
            return
        counting = self._counting
        if len(self._queue) >= self._queue_size or (
            counting and self._queued_bytes + len(frame) > self._queue_max_bytes
        ):
            if self._on_gevent:
                # The flusher may not have had its turn yet (a reader handles
                # a whole read, e.g. a reconnect's resubscribes with their
                # replays, without yielding): the socket may take it now.
                self.flush()
            counting = self._counting
            if len(self._queue) >= self._queue_size or (
                # A frame larger than the whole budget still goes to a client
                # that has nothing else waiting.
                counting and self._queued_bytes and self._queued_bytes + len(frame) > self._queue_max_bytes
            ):
                self._overflow()
                return
        self._queue.append(frame)
        if counting:
            self._queued_bytes += len(frame)
        if not self._on_gevent:
            self._wakeup.set()
        elif not self._flush_pending:
            self._flush_pending = True
            _flusher.add(self)

    def flush(self) -> None:
        """Write the queue without blocking; the writer takes what is left."""
        self._flush_pending = False
        queue = self._queue
        if not queue or self._writing or self._socket is None:
            return
        taken = queue[:]
        batch = b"".join(taken) if len(taken) > 1 else taken[0]
        queue.clear()
        head_was_partial, self._partial_head = self._partial_head, False
        sent = self._socket.send_now(batch)
        if not self._counting:
            if sent == len(batch):
                return  # it kept up: the common case
            # Behind from now on, until the writer has caught up.
            self._counting = True
            self._queued_bytes = len(batch)
        self._queued_bytes -= sent
        if sent < len(batch):
            # Put back what is left frame by frame, the one cut short first,
            # so that the queue still counts messages, as its limit does.
            for index, frame in enumerate(taken):
                if sent < len(frame):
                    break
                sent -= len(frame)
            left = taken[index + 1 :]
            left.insert(0, frame[sent:] if sent else frame)
            self._partial_head = bool(sent) or (index == 0 and head_was_partial)
            queue[0:0] = left
            self._wakeup.set()
        elif self._on_gevent:
            self._counting = False
            self._queued_bytes = 0

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
        self._metrics.slow_consumer()
        self.close(protocol.CLOSE_SLOW_CONSUMER, "send queue overflow")

    # -- the transport's listener, called in the reader -----------------

    def on_activity(self) -> None:
        self._active = time.monotonic()

    def on_frame(self, size: int) -> bool:
        """Charge one frame of ``size`` bytes, whatever its kind; whether to read it."""
        self._metrics.frame()
        limiter = self._limiter
        if limiter.allow():
            if self._byte_limiter.allow(size):
                return True
            limiter.strike()
        self._metrics.rate_limited()
        if self._closing:
            # A client that floods after our close frame is not waited for.
            self._socket.frames.drain()
        elif limiter.exhausted:
            log.warning("connection %s kept flooding: closing with 1008", self.id)
            self.fail(protocol.CLOSE_POLICY, "rate limit exceeded")
        return False

    def on_refused(self, text: str | None) -> None:
        if self._closing:
            return
        ref = channel = None
        if text is not None:
            # Small enough to read cheaply (the reader says so), so that the
            # client can match the refusal to its request.
            try:
                frame = protocol.parse_frame(text)
                ref, channel = frame.ref, frame.channel
            except ProtocolError as exc:
                ref, channel = exc.ref, exc.channel
        self.answer_error("rate_limited", "slow down: too many frames", ref, channel)

    def on_text(self, text: str) -> None:
        if self._closing:
            return
        self._busy = True
        try:
            self._events.message(self, text)
        finally:
            self._busy = False

    def on_binary(self) -> None:
        if not self._closing:
            self.answer_error("bad_frame", "binary frames are not supported")

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
            self._events.closing(self)
            self._queue.clear()
            self._queued_bytes = 0
        self._wakeup.set()

    # -- the writer, run in the request's own greenlet -------------------

    def serve(self, environ: dict) -> None:
        """Upgrade the request and run the connection until it ends."""
        settings = self._settings
        try:
            self.attach(ServerSocket(environ, self, settings.max_message_size, settings.max_fragments))
        except OSError as exc:  # the client left during the handshake
            log.info("handshake from %s not completed: %r", self.remote_addr, exc)
            return
        log.info("connection %s opened: identity=%r ip=%s", self.id, self.identity, self.remote_addr)
        self._metrics.opened()
        try:
            self._events.opened(self)
            self._write_loop(settings.ping_interval)
        except (OSError, gevent.Timeout) as exc:
            log.info("connection %s lost while writing: %r", self.id, exc)
        finally:
            self._shutdown(settings.close_timeout)

    def _write_loop(self, ping_interval: float | None) -> None:
        transport = self._socket
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
                    if self._counting:
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
                    transport.send_all(batch)
                if self._counting:
                    self._queued_bytes -= len(batch)
                self._writing = False
            if self._on_gevent and self._counting:
                # Caught up: the flusher's rounds take over again.
                self._counting = False
                self._queued_bytes = 0
            if self._closing and not queue:
                return

    # -- a transport that is not a socket: the test client's ------------

    def begin(self, transport: Any) -> None:
        """Open over ``transport``, which is not a socket of ours (the test
        client's, in the same process): what ``serve`` does once upgraded.

        ``transport`` has what the session uses of a :class:`ServerSocket`:
        ``frames`` (its :class:`~flask_robe_sockets.frames.FrameReader`,
        bound to this session) and ``send_now(data) -> int``. Nothing writes
        by itself: its owner calls :meth:`flush` to take what is queued, and
        :meth:`end` once it is done.
        """
        self.attach(transport)
        log.info("connection %s opened: identity=%r ip=%s", self.id, self.identity, self.remote_addr)
        self._metrics.opened()
        self._events.opened(self)

    def end(self) -> None:
        """The transport of a session opened with :meth:`begin` is done: no
        more deliveries (if that was not so yet), then the ``closed`` event,
        as when a socket ends."""
        self._reader_done.set()
        self._stop_delivering()
        self._report_closed()

    def _stop_delivering(self) -> None:
        if self._close_code is None:  # the write failed: the network is gone
            self._close_code, self._closed_by = 1006, "network"
        if not self._closing:
            self._closing = True
            self._events.closing(self)

    def _report_closed(self) -> None:
        log.info(
            "connection %s closed after %.1fs: code %s by the %s",
            self.id, time.monotonic() - self._opened, self._close_code, self._closed_by or "server",
        )
        self._metrics.closed(self._close_code)
        self._events.closed(self)

    def _shutdown(self, close_timeout: float) -> None:
        self._stop_delivering()
        transport = self._socket
        if not self._reader_done.is_set() and transport.reading:
            if transport.draining:
                # Our close frame is out: a FIN after it lets the client close
                # too while the reader drops what it still sends. Closing with
                # input unread would reset the connection instead, and the
                # client could lose the close code (1009, 1007) with it.
                transport.finish_writing()
            # Give the client the chance to answer our close frame.
            self._reader_done.wait(close_timeout)
        transport.close_socket()
        self._report_closed()
