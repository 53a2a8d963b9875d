"""What clients' frames do: the registered handlers and hooks, and the
handling of every text frame a client sends.

:class:`Router` holds what the application registered (``RobeSockets``
registers into it, and one router serves every app the extension is
initialised with). :class:`Dispatcher` handles one app's frames with it:
``@ping``, ``@subscribe`` and ``@unsubscribe`` itself, every other event
through the handlers, each answered as PROTOCOL.md section 4 says.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask

from . import protocol
from .backends import Backend
from .channels import Hub
from .config import Settings
from .errors import BackendUnavailable, ConfigurationError, Forbidden, ProtocolError, Refused, application_code_problem
from .frames import ws_frame
from .message import Message
from .metrics import NULL, Metrics
from .ratelimit import CallerRateLimit
from .tickets import caller

if TYPE_CHECKING:
    from .connection import Connection
    from .presence import Roster
    from .session import Session

log = logging.getLogger("flask_robe_sockets")

Handler = Callable[[Message, "Connection"], Any]
Hook = Callable[["Connection"], Any]


class Router:
    """The application's handlers and hooks, registered once for every app."""

    def __init__(self) -> None:
        # Handlers by event name, each with its channel pattern, in
        # registration order.
        self._handlers: dict[str, list[tuple[str, Handler]]] = {}
        self.connect_hooks: list[Hook] = []
        self.disconnect_hooks: list[Hook] = []
        self._authorize: Callable[[Connection, str], Any] | None = None
        self._identity_loader: Callable[[], Any] | None = None
        self._presence_info: Callable[[Connection, str], Any] | None = None

    def add_handler(self, channel: str, event: str, handler: Handler) -> None:
        self._handlers.setdefault(event, []).append((channel, handler))

    def handlers_for(self, channel: str, event: str) -> list[Handler]:
        """The handlers of ``event`` whose pattern matches ``channel``, in order."""
        return [
            handler
            for pattern, handler in self._handlers.get(event, ())
            if pattern == channel or (pattern.endswith("*") and channel.startswith(pattern[:-1]))
        ]

    def set_authorize(self, hook: Callable[[Connection, str], Any]) -> None:
        if self._authorize is not None:
            raise ConfigurationError(
                f"an authorize hook is already set ({self._authorize.__name__}):"
                " combine the checks in one function"
            )
        self._authorize = hook

    def authorized(self, conn: "Connection", channel: str) -> bool:
        """What the authorize hook says of ``conn`` on ``channel`` (yes without one).

        :raises Refused: the hook refused with a code and message of its own
            (``Forbidden`` for ``forbidden``).
        """
        return True if self._authorize is None else bool(self._authorize(conn, channel))

    def set_identity_loader(self, loader: Callable[[], Any]) -> None:
        if self._identity_loader is not None:
            raise ConfigurationError(
                f"an identity loader is already set ({self._identity_loader.__name__})"
            )
        self._identity_loader = loader

    def set_presence_info(self, hook: Callable[[Connection, str], Any]) -> None:
        if self._presence_info is not None:
            raise ConfigurationError(f"a presence_info hook is already set ({self._presence_info.__name__})")
        self._presence_info = hook

    def presence_info(self, conn: "Connection", channel: str) -> Any:
        """What the presence_info hook shows of ``conn`` on ``channel``: JSON,
        or ``None`` without a hook (and when it raised or gave non-JSON: logged)."""
        if self._presence_info is None:
            return None
        try:
            info = self._presence_info(conn, channel)
            protocol.dumps(info)
        except Exception:
            log.exception("presence_info failed or gave non-JSON for %s on %r: its info is null", conn, channel)
            return None
        return info

    @property
    def has_identity_loader(self) -> bool:
        return self._identity_loader is not None

    def load_identity(self) -> Any:
        """The caller's identity as the loader says, ``None`` without a loader."""
        return self._identity_loader() if self._identity_loader is not None else None


class Dispatcher:
    """Handles the text frames of one app's connections.

    :param metrics: times the handlers of each event, and is told of every
        handler or authorize hook that raised.
    """

    def __init__(
        self, app: Flask, router: Router, hub: Hub, backend: Backend, settings: Settings, metrics: Metrics = NULL
    ) -> None:
        self.app = app
        self.router = router
        self.hub = hub
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        #: This worker's presence, when the app turned it on for some channels.
        self.roster: Roster | None = None
        self._presence_joins = CallerRateLimit(*settings.presence_rate_limit)

    def run_hooks(self, hooks: list[Hook], session: "Session") -> None:
        """Run connect or disconnect hooks; one that fails is logged, the rest run."""
        for hook in hooks:
            try:
                with self.app.app_context():
                    hook(session.owner)
            except Exception:
                log.exception("hook %r failed for %s", hook, session.owner)

    def handle_text(self, session: "Session", text: str) -> None:
        try:
            frame = protocol.parse_frame(text)
        except ProtocolError as exc:
            session.answer_error(exc.code, exc.message, exc.ref, exc.channel)
            return
        event = frame.event
        if event == protocol.PING:
            session.answer(protocol.PONG, frame.data, frame.channel, frame.ref)
        elif event == protocol.SUBSCRIBE:
            self.subscribe(session, frame)
        elif event == protocol.UNSUBSCRIBE:
            self.unsubscribe(session, frame)
        elif event == protocol.PRESENCE:
            self.presence(session, frame)
        else:
            self.dispatch(session, frame)

    def _authorized(self, session: "Session", channel: str) -> bool:
        with self.app.app_context():
            return self.router.authorized(session.owner, channel)

    def subscribe(self, session: "Session", frame: protocol.Frame) -> None:
        channel, ref = frame.channel, frame.ref
        since, epoch = _since(frame.data)
        code, reason = "forbidden", f"not allowed on channel {channel!r}"
        try:
            allowed = self._authorized(session, channel)
        except Refused as exc:
            allowed = False
            code, reason = _refusal(exc, "the authorize hook", channel)
        except Exception:
            log.exception("authorize hook failed for %s on %r", session.owner, channel)
            self.metrics.handler_error()
            session.answer_error("handler_error", "the server could not authorize this", ref, channel)
            return
        if not session.open:
            # Closed while the hook ran (it may wait on a database): joining
            # now would leave a member behind that nobody removes.
            return
        if not allowed:
            session.answer_error(code, reason, ref, channel)
            return
        hub = self.hub
        rejoin = hub.has(session, channel)
        limit = self.settings.max_subscriptions
        if not rejoin and len(hub.channels_of(session)) >= limit:
            session.answer_error("too_many_subscriptions", f"at most {limit} channels per connection", ref, channel)
            return
        roster = self.roster if self.roster is not None and self.roster.enabled(channel) else None
        member = None
        if roster is not None and not rejoin:
            wait = self._presence_joins.check(caller(session.identity, session.remote_addr))
            if wait:
                session.answer_error(
                    "rate_limited", f"too many presence joins: try again in {math.ceil(wait)} s", ref, channel
                )
                return
            member = self._member(session, channel)
            if not session.open:
                return
        if not rejoin:
            hub.begin_join(session, channel)
        try:
            # Already a member: broadcasts keep arriving once, so nothing is
            # replayed; the client only gets its answer again.
            recovery = self.backend.recover(channel, None if rejoin else since, epoch)
        except BackendUnavailable as exc:
            hub.leave(session, channel)
            # No error code of PROTOCOL.md says "try again later", and an
            # @error would read as a final refusal. Closing with 1011 makes
            # the client reconnect with backoff and subscribe again.
            log.warning("cannot subscribe %s to %r: %s: closing with 1011", session.owner, channel, exc)
            session.close(protocol.CLOSE_INTERNAL, "backend unavailable")
            return
        if not rejoin and not hub.has(session, channel):
            # Taken off the channel while the backend answered (the
            # application's unsubscribe, or a close): the client was told,
            # and an @subscribed now would contradict it.
            return
        answer = {"recovered": recovery.recovered, "seq": recovery.seq, "epoch": recovery.epoch}
        version = None
        if roster is not None:
            if member is None:
                answer["presence"] = roster.view(channel)
            else:
                try:
                    version, answer["presence"] = roster.join(
                        session, channel, member, lambda: session.open and hub.has(session, channel)
                    )
                except BackendUnavailable as exc:
                    hub.leave(session, channel)
                    log.warning("cannot subscribe %s to %r: %s: closing with 1011", session.owner, channel, exc)
                    session.close(protocol.CLOSE_INTERNAL, "backend unavailable")
                    return
        if not rejoin and not hub.has(session, channel):
            return  # the same, while the presence join was recorded (and undone)
        session.answer(protocol.SUBSCRIBED, answer, channel, ref)
        for _, replayed in recovery.frames:
            session.push(replayed)
        if not rejoin:
            hub.end_join(session, channel, recovery.seq, version)

    def _member(self, session: "Session", channel: str) -> dict[str, Any]:
        """The member object of ``session`` on ``channel`` (PROTOCOL.md section 7)."""
        with self.app.app_context():
            info = self.router.presence_info(session.owner, channel)
        return {"id": session.id, "identity": session.owner.identity, "info": info}

    def presence(self, session: "Session", frame: protocol.Frame) -> None:
        """``@presence``: the members as this connection's events left them."""
        channel, ref = frame.channel, frame.ref
        if not self.hub.has(session, channel):
            session.answer_error("not_subscribed", f"subscribe to {channel!r} first", ref, channel)
        elif self.roster is None or not self.roster.enabled(channel):
            session.answer_error("presence_disabled", f"channel {channel!r} has no presence", ref, channel)
        else:
            session.answer(protocol.PRESENCE, self.roster.view(channel), channel, ref)

    def unsubscribe(self, session: "Session", frame: protocol.Frame) -> None:
        self.leave(session, frame.channel)
        session.answer(protocol.UNSUBSCRIBED, None, frame.channel, frame.ref)

    def leave(self, session: "Session", channel: str) -> None:
        """Take ``session`` off ``channel``, as asked by the client
        (``@unsubscribe``) or by the application (``unsubscribed_by_app``):
        the one place where a leave that was asked for happens, so whatever
        else such a leave does (presence's ``@leave``) goes here."""
        self.hub.leave(session, channel)

    def unsubscribed_by_app(self, session: "Session", channel: str, reason: str) -> bool:
        """The application took ``session`` off ``channel`` (PROTOCOL.md
        section 8): it leaves, and is told with ``@unsubscribed`` without a
        ref, ``data: {"reason": reason}``. ``False`` (and nothing sent) when
        it was neither on the channel nor joining it."""
        if not self.hub.has(session, channel):
            return False
        self.leave(session, channel)
        session.answer(protocol.UNSUBSCRIBED, {"reason": reason}, channel)
        return True

    def dispatch(self, session: "Session", frame: protocol.Frame) -> None:
        channel, ref = frame.channel, frame.ref
        handlers = self.router.handlers_for(channel, frame.event)
        result = None
        try:
            if not self._authorized(session, channel):
                raise Forbidden(f"not allowed on channel {channel!r}")
            if not handlers:
                session.answer_error(
                    "unknown_event", f"no handler for event {frame.event!r} on channel {channel!r}", ref, channel
                )
                return
            message = Message(channel, frame.event, frame.data, ref)
            with self.app.app_context(), self.metrics.handler_timer():
                for handler in handlers:
                    value = handler(message, session.owner)
                    if result is None:
                        result = value
            # Encoded inside the try: a handler may have returned non-JSON.
            reply = protocol.encode(protocol.REPLY, result, channel, ref) if ref is not None else None
        except Refused as exc:
            session.answer_error(*_refusal(exc, f"a handler of {frame.event!r}", channel), ref, channel)
            return
        except Exception:
            log.exception("handler for %r on %r failed", frame.event, channel)
            self.metrics.handler_error()
            session.answer_error("handler_error", "the handler failed", ref, channel)
            return
        if reply is not None:
            session.push(ws_frame(reply))


def _refusal(exc: Refused, who: str, channel: str) -> tuple[str, str]:
    """The code and message an application's refusal is answered with.

    ``Refused`` checks its code when it is made; one changed afterwards (or
    a subclass that skipped the check) could pass for the protocol's own
    answer, so it is logged and answered ``handler_error`` instead.
    """
    problem = application_code_problem(exc.code)
    if problem is not None:
        log.error("%s on %r refused with an unusable code: %s; answered handler_error", who, channel, problem)
        return "handler_error", "the handler failed"
    return exc.code, str(exc.message)


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
