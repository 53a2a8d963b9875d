"""One app's running state: its backend, hub, tickets, slots and connections.

One ``SocketServer`` lives in ``app.extensions["robe_sockets"]``. What the
application registered (handlers and hooks) is the extension's
:class:`~flask_robe_sockets.dispatch.Router`; this object holds what one app
runs with, and is the sessions' :class:`~flask_robe_sockets.session.SessionEvents`:
it greets a new connection, hands its frames to the dispatcher, takes it
off its channels when it closes and runs the hooks.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
from typing import Any

import gevent
from flask import Flask

from . import protocol
from .backends import Backend, create_backend
from .errors import BackendUnavailable
from .channels import Channel, Hub
from .config import Settings
from .connection import Connection
from .control import DISCONNECT, Command
from .dispatch import Dispatcher, Router
from .handshake import Slots
from .heartbeat import Heartbeat
from .presence import Presence, Roster
from .metrics import Metrics, create as create_metrics
from .session import Session
from .websocket import under_gevent
from .ratelimit import CallerRateLimit
from .tickets import TicketSigner

log = logging.getLogger("flask_robe_sockets")


class SocketServer:
    def __init__(self, app: Flask, router: Router, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.backend: Backend = create_backend(
            settings.backend,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            history_max_bytes=settings.history_max_bytes,
        )
        #: What the layers report to, for Prometheus (``NULL`` when off).
        self.metrics: Metrics = create_metrics(settings.metrics)
        self.hub = Hub(self.backend.subscribe, self._channel_unused, self.metrics)
        self.backend.start(self.hub.deliver)
        keys = [*(app.config.get("SECRET_KEY_FALLBACKS") or []), app.secret_key]
        self.tickets = TicketSigner(
            [key for key in keys if key],
            max_age=settings.ticket_max_age,
            bind_ip=settings.ticket_bind_ip,
            claim_nonce=self.backend.claim_nonce,
        ) if app.secret_key else None
        self.ticket_limit = CallerRateLimit(*settings.ticket_rate_limit)
        self.slots = Slots(settings)
        self.router = router
        self.dispatcher = Dispatcher(app, router, self.hub, self.backend, settings, self.metrics)
        self._presence_setup()
        #: Open connections of this worker.
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self._shutdown_hooked_pid: int | None = None
        #: When (``time.time()``) each open session opened: the application's
        #: commands act on the sessions open when they were made.
        self._opened_at: dict[Session, float] = {}
        self._control_pid = 0
        if under_gevent():  # a serving worker: it hears the commands from the start
            self._listen_control()
        #: Reports this worker to a shared backend (``flask robe workers``).
        self.heartbeat: Heartbeat | None = Heartbeat(
            self.backend, settings.worker_ttl, self._report, interval=self._report_interval()
        ) if self.backend.shared else None
        # A gunicorn gevent worker imports the app once patched: it reports
        # from the start, idle or not. Elsewhere (--preload, the first
        # connection starts it), and never in a process that only runs
        # commands or tests.
        self._start_heartbeat()
        self._hook_shutdown()

    def channel(self, name: str) -> Channel:
        # Data that is not JSON raises TypeError or ValueError from the
        # backend's one encoding of the frame, before anything is sent.
        return Channel(name, self.backend.publish, self._presence)

    def session(self, identity: Any, remote_addr: str | None) -> Session:
        """A new connection's session (with its public Connection), to ``serve``."""
        session = Session(self.settings, self, identity, remote_addr, self.metrics)
        session.owner = Connection(session, self.hub)
        return session

    # -- the sessions' events --------------------------------------------

    def opened(self, session: Session) -> None:
        if self.shutting_down:
            # gunicorn's worker accepts for up to a second after SIGTERM: a
            # client that reconnects at once must not settle on a dying worker.
            session.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
            return
        self._hook_shutdown()
        self._start_heartbeat()
        self._listen_control()
        self._opened_at[session] = time.time()
        self.connections.add(session.owner)
        session.answer(protocol.CONNECTED, {"id": session.id, "protocol": protocol.VERSION})
        self.dispatcher.run_hooks(self.router.connect_hooks, session)

    def message(self, session: Session, text: str) -> None:
        self.dispatcher.handle_text(session, text)

    def closing(self, session: Session) -> None:
        self.hub.leave_all(session)

    def closed(self, session: Session) -> None:
        self._opened_at.pop(session, None)
        if session.owner in self.connections:
            self.connections.discard(session.owner)
            self.dispatcher.run_hooks(self.router.disconnect_hooks, session)

    # -- the application's commands (PROTOCOL.md section 8) -------------------

    def control(self, command: Command) -> None:
        """Send ``command`` to every worker sharing the backend, this one included.

        :raises BackendUnavailable: the backend could not take it.
        """
        self.backend.control(command.to_dict())

    def _listen_control(self) -> None:
        pid = os.getpid()
        if self._control_pid != pid:  # once per process (a fork starts again)
            self._control_pid = pid
            self.backend.listen_control(self.apply_control)

    def apply_control(self, data: dict[str, Any]) -> None:
        """Apply a command (``Command.to_dict()``) to the sessions of this
        worker it selects; the backend calls it on every worker."""
        try:
            command = Command.from_dict(data)
        except ValueError as exc:
            log.error("dropped a command this version cannot apply (%s): %.200r", exc, data)
            return
        acted = 0
        for session, opened_at in tuple(self._opened_at.items()):
            if not command.selects(session.id, session.identity, opened_at):
                continue
            try:
                if command.action == DISCONNECT:
                    if session.open:
                        session.close(command.code, command.reason)
                        acted += 1
                elif self.dispatcher.unsubscribed_by_app(session, command.channel, command.reason):
                    acted += 1
            except Exception:  # one failure must not spare the others
                log.exception("could not apply %s to %s", command.describe(), session.owner)
        if acted:
            log.info("%s: %d connections on this worker", command.describe(), acted)

    # -- presence (PROTOCOL.md section 7) ------------------------------------

    def _presence_setup(self) -> None:
        """A roster when the app turned presence on; its leaves ride on the hub's."""
        self.roster: Roster | None = None
        self._sweep_pid = 0
        if self.settings.presence:
            self.roster = Roster(
                self.backend, self.hub, self.settings.presence, self._worker_id, greenlets=under_gevent()
            )
            self.hub.on_leave = self.roster.leave
            self.dispatcher.roster = self.roster

    def _presence(self, channel: str) -> Presence:
        return Presence.from_dicts(self.backend.presence(channel))

    def _channel_unused(self, channel: str) -> None:
        """The hub's last subscriber of ``channel`` left: stop listening to it."""
        self.backend.unsubscribe(channel)
        if self.roster is not None:
            self.roster.forget(channel)

    def _worker_id(self) -> str:
        heartbeat = self.heartbeat
        if heartbeat is not None and heartbeat.worker_id is not None:
            return heartbeat.worker_id
        return f"{socket.gethostname()}:{os.getpid()}:unreported"

    def _report_interval(self) -> float:
        """Every third of the shortest of WORKER_TTL and, with presence, its timeout."""
        ttl = self.settings.worker_ttl
        if self.settings.presence:
            ttl = min(ttl, self.settings.presence_timeout)
        return ttl / 3

    def _start_presence_sweep(self) -> None:
        """Under gevent, one greenlet per worker removes dead workers' members."""
        pid = os.getpid()
        if not self.settings.presence or not self.backend.shared or self._sweep_pid == pid:
            return
        self._sweep_pid = pid
        gevent.spawn(self._sweep_presence, pid)

    def _sweep_presence(self, pid: int) -> None:
        timeout, ttl = self.settings.presence_timeout, self.settings.worker_ttl
        while os.getpid() == pid and not self.shutting_down:
            gevent.sleep(timeout / 3 * random.uniform(0.8, 1.0))
            try:
                removed = self.backend.sweep_presence(timeout, ttl)
                if removed:
                    log.info("removed %d members of workers that stopped reporting", removed)
                self._close_lost_members()
            except BackendUnavailable as exc:
                log.warning("cannot look for dead workers' members: %s", exc)
            except Exception:
                log.exception("looking for dead workers' members failed")

    def _close_lost_members(self) -> None:
        """Close (1011: they reconnect) the connections whose membership the
        backend lost, e.g. after this worker was taken for dead: the others
        were told they left, so they must join again to be listed."""
        if self.roster is None:
            return
        lost = self.roster.lost()
        if lost:
            log.warning("%d connections are no longer listed as members (this worker was taken for dead?):"
                        " closing them with 1011 so that they join again", len(lost))
        for session in lost:
            session.close(protocol.CLOSE_INTERNAL, "presence lost: reconnect")

    # -- this worker's reports -----------------------------------------------

    def _start_heartbeat(self) -> None:
        if self.heartbeat is not None and under_gevent():
            self.heartbeat.start()
            self._start_presence_sweep()

    def _report(self) -> dict[str, Any]:
        return {"connections": len(self.connections), "channels": self.hub.channel_count()}

    # -- shutdown ----------------------------------------------------------

    def shutdown(self) -> None:
        """Close every socket with 1001, e.g. when the worker is stopping;
        sockets opened from now on are closed the same way."""
        self.shutting_down = True
        for conn in tuple(self.connections):
            try:
                conn.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
            except Exception:  # one failure must not keep the rest open
                log.exception("could not close %s on shutdown", conn)
        # Closing took every member off its channels (their leaves are
        # recorded); retiring lets go of what a failed leave left behind.
        if self.heartbeat is not None:
            self.heartbeat.retire()

    def _hook_shutdown(self) -> None:
        """Close sockets with 1001 on SIGTERM, before gunicorn's graceful wait.

        gunicorn calls no application hook when a worker is told to stop, and
        a WebSocket is one long request it would otherwise wait out. The
        handler is installed in the worker process itself, after gunicorn set
        its own handlers, and chains to them: when the worker loads the app
        (gunicorn sets them first), else on the first connection (with
        ``--preload`` the app is loaded before the fork).
        """
        pid = os.getpid()
        if self._shutdown_hooked_pid == pid:
            return
        self._shutdown_hooked_pid = pid
        if not under_gevent():
            # No gevent worker (a test process with the in-process test
            # client, ``flask run``): nothing to chain to, and taking SIGTERM
            # would keep it from stopping the process.
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:  # not the main thread: nothing to chain to
            return
        if not callable(previous):
            # Not gunicorn's (a job runner, a script under gevent): taking
            # SIGTERM there would keep it from stopping the process.
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            gevent.spawn(self.shutdown)
            previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            pass
