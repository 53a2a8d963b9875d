"""The Flask extension: registration API, HTTP endpoints and the handshake."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, jsonify, request, send_from_directory

from . import config as config_module
from .channels import Channel
from .connection import Connection
from .errors import ConfigurationError, BackendUnavailable, TicketError
from .message import Message
from .server import SocketServer

log = logging.getLogger("flask_robe_sockets")

_STATIC = os.path.join(os.path.dirname(__file__), "static")

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Message, Connection], Any]


class _Refused(Exception):
    """A handshake refused before the upgrade."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


#: The HTTP status of each refusal by a full connection limit.
_LIMIT_STATUS = {"identity_limit": 429, "ip_limit": 429, "too_many_connections": 503}


def _json_error(status: int, error: str) -> Response:
    # Returned, not raised: the app's own error pages must not replace it.
    response = jsonify(error=error)
    response.status_code = status
    return response


class RobeSockets:
    """Real-time channels for a Flask app.

    ::

        sockets = RobeSockets(app)
        sockets["chat"].send("message", text="hi")

        @sockets.on("message", channel="chat")
        def on_message(message, connection):
            return {"ok": True}

    Handlers and hooks are registered on this object and shared by every
    app it is initialised with; each app's running state is kept in
    ``app.extensions["robe_sockets"]``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._handlers: list[tuple[str, str, Handler]] = []
        self._connect_hooks: list[Callable[[Connection], Any]] = []
        self._disconnect_hooks: list[Callable[[Connection], Any]] = []
        self._authorize_hook: Callable[[Connection, str], bool] | None = None
        self._identity_loader: Callable[[], Any] | None = None
        self._servers: list[SocketServer] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the ``ROBE_SOCKETS_*`` config and mount the endpoints."""
        settings = config_module.load(app.config)
        path = settings["ROBE_SOCKETS_PATH"].rstrip("/")
        if not path.startswith("/"):
            raise ConfigurationError(f"ROBE_SOCKETS_PATH must start with '/', got {path!r}")
        for key, unit in (
            ("ROBE_SOCKETS_RATE_LIMIT", "frames"),
            ("ROBE_SOCKETS_BYTE_RATE_LIMIT", "bytes"),
            ("ROBE_SOCKETS_TICKET_RATE_LIMIT", "tickets"),
        ):
            rate = settings[key]
            if not (isinstance(rate, (tuple, list)) and len(rate) == 2 and rate[0] > 0 and rate[1] >= 1):
                raise ConfigurationError(f"{key} must be ({unit} per second, burst), got {rate!r}")
        ping = settings["ROBE_SOCKETS_PING_INTERVAL"]
        if ping is not None and not ping > 0:
            raise ConfigurationError(
                f"ROBE_SOCKETS_PING_INTERVAL must be seconds above 0, or None to turn pings off, got {ping!r}"
            )
        if settings["ROBE_SOCKETS_TICKETS_REQUIRED"] and not app.secret_key:
            raise ConfigurationError(
                "tickets are signed with the app's SECRET_KEY: set app.secret_key,"
                " or set ROBE_SOCKETS_TICKETS_REQUIRED = False"
            )
        server = SocketServer(app, self, settings)
        app.extensions["robe_sockets"] = server
        self._servers.append(server)
        # Werkzeug routes upgrade requests only to websocket rules, and
        # answers the others with its own HTML 400: one rule for each, so
        # that every refusal is the protocol's JSON.
        for websocket in (True, False):
            app.add_url_rule(
                path, "robe_sockets.socket", self._socket_view, methods=["GET"], websocket=websocket
            )
        app.add_url_rule(path + "/ticket", "robe_sockets.ticket", self._ticket_view, methods=["POST"])
        app.add_url_rule(path + "/<any('client.js', 'client.d.ts'):filename>", "robe_sockets.client", _client_view)

    # -- registration ----------------------------------------------------

    def on(self, event: str, channel: str) -> Callable[[F], F]:
        """Register a handler for ``event`` sent by clients on ``channel``.

        ``channel`` is a name, or a prefix ending in ``*`` (``"room:*"``)
        that matches every channel starting with it. Handlers for the same
        channel and event run in registration order; the first one to
        return something other than ``None`` gives the ``@reply``.
        """
        if event.startswith("@") or not event:
            raise ValueError(f"invalid event name {event!r}: names starting with '@' are reserved")

        def decorator(handler: F) -> F:
            self._handlers.append((channel, event, handler))
            return handler

        return decorator

    def on_connect(self, hook: F) -> F:
        """Register ``hook(connection)``, called once ``@connected`` is queued for it."""
        self._connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: F) -> F:
        """Register ``hook(connection)``, called once when the connection ends."""
        self._disconnect_hooks.append(hook)
        return hook

    def authorize(self, hook: F) -> F:
        """Set ``hook(connection, channel) -> bool``, asked before every subscribe
        and every application event; ``False`` (or raising ``Forbidden``)
        answers ``@error forbidden``. There is one: a second would silently
        undo the first one's checks, so it is refused."""
        if self._authorize_hook is not None:
            raise ConfigurationError(
                f"an authorize hook is already set ({self._authorize_hook.__name__}):"
                " combine the checks in one function"
            )
        self._authorize_hook = hook
        return hook

    def identity_loader(self, loader: F) -> F:
        """Set ``loader() -> identity or None``, called in the ticket request.

        Returning ``None`` refuses the ticket with 401. Without a loader,
        every caller gets a ticket with identity ``None``.
        """
        if self._identity_loader is not None:
            raise ConfigurationError(
                f"an identity loader is already set ({self._identity_loader.__name__})"
            )
        self._identity_loader = loader
        return loader

    def _handlers_for(self, channel: str, event: str) -> list[Handler]:
        return [
            handler
            for pattern, name, handler in self._handlers
            if name == event
            and (pattern == channel or (pattern.endswith("*") and channel.startswith(pattern[:-1])))
        ]

    # -- sending ---------------------------------------------------------

    def _server(self) -> SocketServer:
        try:
            return current_app.extensions["robe_sockets"]
        except RuntimeError:  # no app context: a thread or greenlet of our own
            if len(self._servers) == 1:
                return self._servers[0]
            raise RuntimeError(
                "RobeSockets is used by several apps (or none): send from within an app context"
            ) from None

    def __getitem__(self, name: str) -> Channel:
        """The channel ``name``, to ``send`` to."""
        return self._server().channel(name)

    def send(self, channel: str, event: str, data: Any = None) -> int:
        """Broadcast ``event`` with ``data`` to ``channel``; returns its ``seq``."""
        return self[channel].send(event, data)

    @property
    def connections(self) -> frozenset[Connection]:
        """The open connections of this worker."""
        return frozenset(self._server().connections)

    def connections_of(self, identity: Any) -> list[Connection]:
        """This worker's open connections whose ticket named ``identity``."""
        return [conn for conn in self._server().connections if conn.identity == identity]

    # -- HTTP endpoints --------------------------------------------------

    def _ticket_view(self) -> Response:
        server: SocketServer = current_app.extensions["robe_sockets"]
        if server.tickets is None:
            # No SECRET_KEY to sign with (allowed when tickets are optional):
            # clients must connect without one (browser: ticketUrl: null).
            return _json_error(404, "tickets_disabled")
        identity = self._identity_loader() if self._identity_loader else None
        if identity is None and self._identity_loader is not None:
            return _json_error(401, "unauthorized")
        wait = server.ticket_limit.check(identity, request.remote_addr)
        if wait:
            response = _json_error(429, "rate_limited")
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
        ticket = server.tickets.issue(identity, request.remote_addr)
        response = jsonify(ticket=ticket, expires_in=server.tickets.max_age)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _socket_view(self) -> Any:
        server: SocketServer = current_app.extensions["robe_sockets"]
        try:
            identity = _check_handshake(server)
        except _Refused as refused:
            return _refuse(refused.status, refused.error)
        # The last checks of the table: the connection limits, whose slot is
        # held until the socket ends, however it ends.
        with server.slot(identity, request.remote_addr) as full:
            if full is not None:
                return _refuse(_LIMIT_STATUS[full], full)
            conn = Connection(server, identity, request.remote_addr)
            conn.serve(request.environ)
        return _SocketEnded()


def _refuse(status: int, error: str) -> Response:
    log.info("handshake from %s refused: %s", request.remote_addr, error)
    return _json_error(status, error)


def _check_handshake(server: SocketServer) -> Any:
    """Run the checks of PROTOCOL.md section 2, in its order, up to the
    ticket's; the connection limits that follow are ``server.slot()``'s.

    Everything here happens before the upgrade, so a refusal is a plain
    HTTP answer. Returns the ticket's identity.
    """
    config = server.config
    headers = request.headers
    # The checks wsproto makes when it accepts: one it would refuse must be
    # answered here, or it fails inside the upgrade as a 500.
    if (
        headers.get("Upgrade", "").lower() != "websocket"
        or "upgrade" not in {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        or not headers.get("Sec-WebSocket-Key")
        or headers.get("Sec-WebSocket-Version") != "13"
        or not headers.get("Host")
    ):
        raise _Refused(400, "not_websocket")
    origin = request.headers.get("Origin")
    if origin is not None and not _origin_allowed(origin, config["ROBE_SOCKETS_ALLOWED_ORIGINS"]):
        raise _Refused(403, "origin_not_allowed")
    ticket = request.args.get("ticket")
    identity = None
    if ticket is None:
        if config["ROBE_SOCKETS_TICKETS_REQUIRED"]:
            raise _Refused(401, "ticket_missing")
    elif server.tickets is None:
        raise _Refused(401, "ticket_invalid")
    else:
        try:
            identity = server.tickets.verify(ticket, request.remote_addr)
        except TicketError as exc:
            raise _Refused(401, exc.code) from None
        except BackendUnavailable:
            # The used-nonce store (Redis) is down: the ticket cannot be
            # checked for reuse. Not in PROTOCOL.md's table; the closest
            # reading is a retryable 503 with a JSON body like the others.
            log.warning("cannot check a ticket: the backend is unreachable")
            raise _Refused(503, "backend_unavailable") from None
    return identity


#: The origin scheme a page must have to open a socket over each request scheme.
_PAGE_SCHEME = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def _origin_allowed(origin: str, allowed: list[str] | None) -> bool:
    if allowed is None:
        # The same host, and a web page's scheme matching the request's (as
        # ProxyFix reports it): an https page behind the proxy, an http page
        # without one; never ftp: or an opaque "null".
        parts = urlsplit(origin)
        return (
            parts.scheme.lower() == _PAGE_SCHEME.get(request.scheme.lower())
            and parts.netloc.lower() == request.host.lower()
        )
    return "*" in allowed or origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}


class _SocketEnded(Response):
    """What the view returns once the socket is finished.

    Under gunicorn, raising ``StopIteration`` from the response keeps it from
    writing an HTTP response onto the closed socket (as flask-sock does).
    """

    def __call__(self, environ: dict, start_response: Any) -> Any:
        if "gunicorn.socket" in environ:
            raise StopIteration()
        if "werkzeug.socket" in environ:
            return super().__call__(environ, start_response)
        return []


def _client_view(filename: str) -> Response:
    response = send_from_directory(_STATIC, filename, max_age=3600)
    # Not left to the mimetypes table, which calls .ts a Qt translation file.
    response.mimetype = "text/javascript" if filename.endswith(".js") else "text/plain"
    return response
