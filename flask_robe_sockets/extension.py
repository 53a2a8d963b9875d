"""The Flask extension: registration API and HTTP endpoints."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, TypeVar

from flask import Flask, Response, current_app, jsonify, request, send_from_directory
from flask.logging import has_level_handler, wsgi_errors_stream

from . import cli, config, handshake
from .channels import Channel
from .connection import Connection
from .control import Command, Controls
from .dispatch import Router
from .server import SocketServer
from .testing import SocketTestClient
from .tickets import caller

log = logging.getLogger("flask_robe_sockets")

#: Added to the ``flask_robe_sockets`` logger by ``init_app`` when nothing
#: would handle its records (the app configured no logging), as Flask does
#: for ``app.logger``: records go to ``wsgi.errors`` or stderr with their time
#: and level. Configure logging before ``init_app`` to replace it, or remove
#: it with ``logging.getLogger("flask_robe_sockets").removeHandler(default_handler)``.
default_handler = logging.StreamHandler(wsgi_errors_stream)  # type: ignore[arg-type]
default_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s in %(name)s: %(message)s"))

_STATIC = os.path.join(os.path.dirname(__file__), "static")

F = TypeVar("F", bound=Callable[..., Any])


def _json_error(status: int, error: str) -> Response:
    # Returned, not raised: the app's own error pages must not replace it.
    response = jsonify(error=error)
    response.status_code = status
    return response


class RobeSockets(Controls):
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
        #: What the application registered: handlers, hooks, the identity loader.
        self.router = Router()
        self._servers: list[SocketServer] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the ``ROBE_SOCKETS_*`` config and mount the endpoints.

        :raises ConfigurationError: a setting cannot work, naming the fix.
        """
        settings = config.load(app.config)
        if not has_level_handler(log):
            log.addHandler(default_handler)
        server = SocketServer(app, self.router, settings)
        app.extensions["robe_sockets"] = server
        self._servers.append(server)
        path = settings.path
        # Werkzeug routes upgrade requests only to websocket rules, and
        # answers the others with its own HTML 400: one rule for each, so
        # that every refusal is the protocol's JSON.
        for websocket in (True, False):
            app.add_url_rule(
                path, "robe_sockets.socket", self._socket_view, methods=["GET"], websocket=websocket
            )
        app.add_url_rule(path + "/ticket", "robe_sockets.ticket", self._ticket_view, methods=["POST"])
        app.add_url_rule(path + "/<any('client.js', 'client.d.ts'):filename>", "robe_sockets.client", _client_view)
        if settings.metrics:
            app.add_url_rule(path + "/metrics", "robe_sockets.metrics", _metrics_view)
        app.cli.add_command(cli.robe)

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
            self.router.add_handler(channel, event, handler)
            return handler

        return decorator

    def on_connect(self, hook: F) -> F:
        """Register ``hook(connection)``, called once ``@connected`` is queued for it."""
        self.router.connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: F) -> F:
        """Register ``hook(connection)``, called once when the connection ends."""
        self.router.disconnect_hooks.append(hook)
        return hook

    def authorize(self, hook: F) -> F:
        """Set ``hook(connection, channel) -> bool``, asked before every subscribe
        and every application event; ``False`` (or raising ``Forbidden``)
        answers ``@error forbidden``. There is one: a second would silently
        undo the first one's checks, so it is refused."""
        self.router.set_authorize(hook)
        return hook

    def identity_loader(self, loader: F) -> F:
        """Set ``loader() -> identity or None``, called in the ticket request.

        Returning ``None`` refuses the ticket with 401. Without a loader,
        every caller gets a ticket with identity ``None``.
        """
        self.router.set_identity_loader(loader)
        return loader

    def presence_info(self, hook: F) -> F:
        """Set ``hook(connection, channel) -> JSON or None``: what the other
        members see of a connection on a channel with presence (a display
        name, an avatar URL), called once when it joins. A hook that raises
        or returns something that is not JSON is logged, and that member's
        ``info`` is ``null``: the join still succeeds."""
        self.router.set_presence_info(hook)
        return hook

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

    # ``disconnect`` and ``unsubscribe`` (every worker's connections) are Controls'.

    def _send_control(self, command: Command) -> None:
        self._server().control(command)

    # -- testing ---------------------------------------------------------

    def test_client(self, app: Flask, identity: Any = None, flask_client: Any = None) -> SocketTestClient:
        """A client connection to ``app`` run in the test's own process and
        thread: no server, no port, no gevent.

        ::

            with sockets.test_client(app, identity="alice") as alice:
                alice.subscribe("chat")
                alice.send("chat", "message", {"text": "hi"})   # the @reply data
                alice.received("chat")                          # what came since

        It makes the same ticket checks, connection limits, authorize hook,
        handlers, connect and disconnect hooks, frame checks and rate limits
        as a socket, each call to the end before it returns.

        :param identity: the identity its ticket names, issued as the ticket
            endpoint would (``None``: an anonymous ticket, refused
            ``unauthorized`` when the app has an identity loader).
        :param flask_client: an ``app.test_client()`` (signed in, say) whose
            cookies ask ``POST {path}/ticket`` for the ticket, instead of
            ``identity``.
        :raises ConnectError: the ticket or the handshake was refused, with
            the refusal's ``code`` (``unauthorized``, ``ticket_invalid``,
            ``identity_limit``, ...).
        """
        server = app.extensions.get("robe_sockets")
        if server is None or server.router is not self.router:
            raise RuntimeError("this RobeSockets is not initialised on that app: call init_app(app) first")
        if identity is not None and flask_client is not None:
            raise TypeError("pass identity or flask_client, not both: the ticket names one identity")
        return SocketTestClient(server, identity, flask_client)

    # -- HTTP endpoints --------------------------------------------------

    def _ticket_view(self) -> Response:
        server: SocketServer = current_app.extensions["robe_sockets"]
        if server.tickets is None:
            # No SECRET_KEY to sign with (allowed when tickets are optional):
            # clients must connect without one (browser: ticketUrl: null).
            return _json_error(404, "tickets_disabled")
        identity = self.router.load_identity()
        if identity is None and self.router.has_identity_loader:
            return _json_error(401, "unauthorized")
        wait = server.ticket_limit.check(caller(identity, request.remote_addr))
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
            identity = handshake.check(
                request.headers,
                request.args.get("ticket"),
                request.remote_addr,
                request.scheme,
                request.host,
                server.settings,
                server.tickets,
            )
        except handshake.Refusal as refused:
            server.metrics.handshake(refused.error)
            return _refuse(refused.status, refused.error)
        # The last checks of the table: the connection limits, whose slot is
        # held until the socket ends, however it ends.
        with server.slots.reserve(identity, request.remote_addr) as full:
            if full is not None:
                server.metrics.handshake(full)
                return _refuse(handshake.LIMIT_STATUS[full], full)
            server.metrics.handshake("accepted")
            # Served from here, not from a method of the server: one frame
            # more on every socket's stack costs each idle connection a page.
            server.session(identity, request.remote_addr).serve(request.environ)
        return _SocketEnded()


def _refuse(status: int, error: str) -> Response:
    log.info("handshake from %s refused: %s", request.remote_addr, error)
    return _json_error(status, error)


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


def _metrics_view() -> Response:
    # Not for the public (the README says so): counts of every worker.
    body, content_type = current_app.extensions["robe_sockets"].metrics.exposition(request.headers.get("Accept"))
    response = Response(body, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response


def _client_view(filename: str) -> Response:
    response = send_from_directory(_STATIC, filename, max_age=3600)
    # Not left to the mimetypes table, which calls .ts a Qt translation file.
    response.mimetype = "text/javascript" if filename.endswith(".js") else "text/plain"
    return response
