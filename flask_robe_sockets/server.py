"""Per-application state: connections, channels, backend, frame handling.

One ``SocketServer`` lives in ``app.extensions["robe_sockets"]``. The
``RobeSockets`` object holds what the application registered (handlers and
hooks); this object holds what one app runs with.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import gevent
from flask import Flask

from . import protocol
from .frames import ws_frame
from .backends import Backend, create_backend
from .channels import Channel, Hub
from .errors import Forbidden, ProtocolError, BackendUnavailable
from .message import Message
from .tickets import TicketRateLimit, TicketSigner, identity_key

if TYPE_CHECKING:
    from .connection import Connection
    from .extension import RobeSockets

log = logging.getLogger("flask_robe_sockets")


class SocketServer:
    def __init__(self, app: Flask, extension: "RobeSockets", config: dict[str, Any]) -> None:
        self.app = app
        self.extension = extension
        self.config = config
        url = config["ROBE_SOCKETS_BACKEND_URL"] or config["ROBE_SOCKETS_REDIS_URL"] or "memory://"
        self.backend: Backend = create_backend(
            url,
            history_size=config["ROBE_SOCKETS_HISTORY_SIZE"],
            history_ttl=config["ROBE_SOCKETS_HISTORY_TTL"],
            history_max_bytes=config["ROBE_SOCKETS_HISTORY_MAX_BYTES"],
        )
        self.hub = Hub(self.backend.subscribe, self.backend.unsubscribe)
        self.backend.start(self.hub.deliver)
        keys = [*(app.config.get("SECRET_KEY_FALLBACKS") or []), app.secret_key]
        self.tickets = TicketSigner(
            [key for key in keys if key],
            max_age=config["ROBE_SOCKETS_TICKET_MAX_AGE"],
            bind_ip=config["ROBE_SOCKETS_TICKET_BIND_IP"],
            claim_nonce=self.backend.claim_nonce,
        ) if app.secret_key else None
        self.ticket_limit = TicketRateLimit(*config["ROBE_SOCKETS_TICKET_RATE_LIMIT"])
        #: Open connections of this worker.
        self.connections: set[Connection] = set()
        #: Open connections and handshakes under way, in all and per identity
        #: and client IP: taken and given back together, by slot() alone.
        self.slots = 0
        self._slots_of_identity: Counter[str] = Counter()
        self._slots_of_ip: Counter[str | None] = Counter()
        self.shutting_down = False
        self._shutdown_hooked_pid: int | None = None

    # -- publishing ------------------------------------------------------

    def channel(self, name: str) -> Channel:
        # Data that is not JSON raises TypeError or ValueError from the
        # backend's one encoding of the frame, before anything is sent.
        return Channel(name, self.backend.publish)

    # -- connection slots ------------------------------------------------

    @contextlib.contextmanager
    def slot(self, identity: Any, remote_addr: str | None) -> Iterator[str | None]:
        """Hold a connection slot for the handshake and the socket's life.

        Yields ``None`` when the slot is taken, counted for ``identity``
        (anonymous ones, ``None``, are not) and for ``remote_addr``; it is
        given back when the block ends, however it ends. Else yields the
        protocol's error for the first limit that is full, in PROTOCOL.md
        section 2's order, and takes nothing.
        """
        config = self.config
        who = None if identity is None else identity_key(identity)
        per_identity = config["ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY"]
        per_ip = config["ROBE_SOCKETS_MAX_CONNECTIONS_PER_IP"]
        if who is not None and per_identity is not None and self._slots_of_identity[who] >= per_identity:
            yield "identity_limit"
            return
        if per_ip is not None and self._slots_of_ip[remote_addr] >= per_ip:
            yield "ip_limit"
            return
        if self.slots >= config["ROBE_SOCKETS_MAX_CONNECTIONS"]:
            yield "too_many_connections"
            return
        self.slots += 1
        if who is not None:
            self._slots_of_identity[who] += 1
        self._slots_of_ip[remote_addr] += 1
        try:
            yield None
        finally:
            self.slots -= 1
            if who is not None:
                _give_back(self._slots_of_identity, who)
            _give_back(self._slots_of_ip, remote_addr)

    def slot_counts(self) -> dict[str, Any]:
        """How many slots are held: in all, per identity and per client IP."""
        return {
            "slots": self.slots,
            "identities": dict(self._slots_of_identity),
            "ips": dict(self._slots_of_ip),
        }

    # -- connection lifecycle --------------------------------------------

    def connected(self, conn: "Connection") -> None:
        if self.shutting_down:
            # gunicorn's worker accepts for up to a second after SIGTERM: a
            # client that reconnects at once must not settle on a dying worker.
            conn.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
            return
        self._hook_shutdown()
        self.connections.add(conn)
        conn._answer(protocol.CONNECTED, {"id": conn.id, "protocol": protocol.VERSION})
        self._run_hooks(self.extension._connect_hooks, conn)

    def forget(self, conn: "Connection") -> None:
        """Drop ``conn`` from every channel at once; safe to call again."""
        for channel in tuple(conn._channels):
            self.hub.leave(conn, channel)
        conn._channels.clear()

    def disconnected(self, conn: "Connection") -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self._run_hooks(self.extension._disconnect_hooks, conn)

    def _run_hooks(self, hooks: list, conn: "Connection") -> None:
        for hook in hooks:
            try:
                with self.app.app_context():
                    hook(conn)
            except Exception:
                log.exception("%s hook %r failed for %s", "connect/disconnect", hook, conn)

    def shutdown(self) -> None:
        """Close every socket with 1001, e.g. when the worker is stopping;
        sockets opened from now on are closed the same way."""
        self.shutting_down = True
        for conn in tuple(self.connections):
            try:
                conn.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
            except Exception:  # one failure must not keep the rest open
                log.exception("could not close %s on shutdown", conn)

    def _hook_shutdown(self) -> None:
        """Close sockets with 1001 on SIGTERM, before gunicorn's graceful wait.

        gunicorn calls no application hook when a worker is told to stop, and
        a WebSocket is one long request it would otherwise wait out. The
        handler is installed on the first connection, in the worker process
        itself (after gunicorn set its own handlers), and chains to them.
        """
        pid = os.getpid()
        if self._shutdown_hooked_pid == pid:
            return
        self._shutdown_hooked_pid = pid
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:  # not the main thread: nothing to chain to
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            gevent.spawn(self.shutdown)
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            pass

    # -- frames from clients ---------------------------------------------

    def answer_error(
        self,
        conn: "Connection",
        code: str,
        message: str,
        ref: Any = None,
        channel: str | None = None,
    ) -> None:
        conn._answer(protocol.ERROR, protocol.error_payload(code, message), channel, ref)

    def answer_rate_limited(self, conn: "Connection", text: str | None) -> None:
        ref = channel = None
        if text is not None:
            try:
                frame = protocol.parse_frame(text)
                ref, channel = frame.ref, frame.channel
            except ProtocolError as exc:
                ref, channel = exc.ref, exc.channel
        self.answer_error(conn, "rate_limited", "slow down: too many frames", ref, channel)

    def handle_text(self, conn: "Connection", text: str) -> None:
        try:
            frame = protocol.parse_frame(text)
        except ProtocolError as exc:
            self.answer_error(conn, exc.code, exc.message, exc.ref, exc.channel)
            return
        event = frame.event
        if event == protocol.PING:
            conn._answer(protocol.PONG, frame.data, frame.channel, frame.ref)
        elif event == protocol.SUBSCRIBE:
            self.subscribe(conn, frame)
        elif event == protocol.UNSUBSCRIBE:
            self.unsubscribe(conn, frame)
        else:
            self.dispatch(conn, frame)

    def _allowed(self, conn: "Connection", channel: str) -> bool:
        hook = self.extension._authorize_hook
        if hook is None:
            return True
        with self.app.app_context():
            return bool(hook(conn, channel))

    def subscribe(self, conn: "Connection", frame: protocol.Frame) -> None:
        channel, ref = frame.channel, frame.ref
        since, epoch = _since(frame.data)
        try:
            allowed = self._allowed(conn, channel)
        except Forbidden as exc:
            allowed = False
            reason = exc.message
        except Exception:
            log.exception("authorize hook failed for %s on %r", conn, channel)
            self.answer_error(conn, "handler_error", "the server could not authorize this", ref, channel)
            return
        else:
            reason = f"not allowed on channel {channel!r}"
        if not conn.open:
            # Closed while the hook ran (it may wait on a database): joining
            # now would leave a member behind that nobody removes.
            return
        if not allowed:
            self.answer_error(conn, "forbidden", reason, ref, channel)
            return
        rejoin = channel in conn._channels
        if not rejoin and len(conn._channels) >= self.config["ROBE_SOCKETS_MAX_SUBSCRIPTIONS"]:
            self.answer_error(
                conn, "too_many_subscriptions",
                f"at most {self.config['ROBE_SOCKETS_MAX_SUBSCRIPTIONS']} channels per connection",
                ref, channel,
            )
            return
        if not rejoin:
            conn._channels.add(channel)
            self.hub.begin_join(conn, channel)
        try:
            # Already a member: broadcasts keep arriving once, so nothing is
            # replayed; the client only gets its answer again.
            recovery = self.backend.recover(channel, None if rejoin else since, epoch)
        except BackendUnavailable as exc:
            conn._channels.discard(channel)
            self.hub.leave(conn, channel)
            # No error code of PROTOCOL.md says "try again later", and an
            # @error would read as a final refusal. Closing with 1011 makes
            # the client reconnect with backoff and subscribe again.
            log.warning("cannot subscribe %s to %r: %s: closing with 1011", conn, channel, exc)
            conn.close(protocol.CLOSE_INTERNAL, "backend unavailable")
            return
        conn._answer(
            protocol.SUBSCRIBED,
            {"recovered": recovery.recovered, "seq": recovery.seq, "epoch": recovery.epoch},
            channel,
            ref,
        )
        for _, replayed in recovery.frames:
            conn.push(replayed)
        if not rejoin:
            self.hub.end_join(conn, channel, recovery.seq)

    def unsubscribe(self, conn: "Connection", frame: protocol.Frame) -> None:
        if frame.channel in conn._channels:
            conn._channels.discard(frame.channel)
            self.hub.leave(conn, frame.channel)
        conn._answer(protocol.UNSUBSCRIBED, None, frame.channel, frame.ref)

    def dispatch(self, conn: "Connection", frame: protocol.Frame) -> None:
        channel, ref = frame.channel, frame.ref
        handlers = self.extension._handlers_for(channel, frame.event)
        result = None
        try:
            if not self._allowed(conn, channel):
                raise Forbidden(f"not allowed on channel {channel!r}")
            if not handlers:
                self.answer_error(
                    conn, "unknown_event",
                    f"no handler for event {frame.event!r} on channel {channel!r}", ref, channel,
                )
                return
            message = Message(channel, frame.event, frame.data, ref)
            with self.app.app_context():
                for handler in handlers:
                    value = handler(message, conn)
                    if result is None:
                        result = value
            # Encoded inside the try: a handler may have returned non-JSON.
            reply = protocol.encode(protocol.REPLY, result, channel, ref) if ref is not None else None
        except Forbidden as exc:
            self.answer_error(conn, "forbidden", exc.message, ref, channel)
            return
        except Exception:
            log.exception("handler for %r on %r failed", frame.event, channel)
            self.answer_error(conn, "handler_error", "the handler failed", ref, channel)
            return
        if reply is not None:
            conn.push(ws_frame(reply))


def _give_back(counts: Counter, key: Any) -> None:
    # Keys at zero are removed, so the counts hold only who is connected.
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _since(data: Any) -> tuple[int | None, str | None]:
    """``since`` and ``epoch`` of a ``@subscribe``; an unusable ``since`` counts as absent."""
    if not isinstance(data, dict):
        return None, None
    since = data.get("since")
    epoch = data.get("epoch")
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        since = None
    if "epoch" in data and not isinstance(epoch, str):
        # Present but unusable: it names no epoch of ours, so it cannot be
        # the current one, unlike an epoch left out.
        epoch = ""
    return since, epoch
