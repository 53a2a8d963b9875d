"""A Python client for Robe Sockets channels.

::

    from flask_robe_sockets.client import Client

    client = Client("ws://127.0.0.1:9292/ops", ticket_url="http://127.0.0.1:9292/ops/ticket")
    chat = client.subscribe("chat")
    chat.on("message", lambda message: print(message.data, message.seq))
    reply = chat.send("message", {"text": "hi"}, timeout=5)
    client.close()

The client connects in the background as soon as it is built and keeps the
connection up by itself: it fetches a fresh ticket before every connect,
reconnects with exponential backoff and full jitter after any close it did
not ask for, subscribes every channel again with the last ``seq`` and
``epoch`` it saw so that the server replays what was missed, and keeps sends
made while disconnected in a bounded queue. It reconnects at once after
4001 (the server asks for it), and stops for good after a close from 4500 to
4999 (the application disconnected it), as :meth:`Client.close` would.
Each channel's ``presence`` keeps its members (PROTOCOL.md section 7).

Every decision (refs, the queue, what to resubscribe from, the backoff,
which refusals are retried) is made by
:class:`~flask_robe_sockets.clientstate.ClientState`, which has no I/O; this
module only moves bytes and runs threads around it. Two background threads
do that: one connects, reads and pings; the other runs the application's
handlers, in order, so that a handler may itself call :meth:`Channel.send`
and wait for the reply while frames keep being read.
Events wait for their handlers in memory: keep handlers quick, and hand long
work to a thread or a job queue.
Threads, locks and events come from the ``threading`` module when the client
is built, so after ``gevent.monkey.patch_all()`` they are greenlets.

The WebSocket itself is :class:`~flask_robe_sockets.clientsocket.ClientSocket`,
wsproto over a blocking socket (its docstring says why not simple-websocket's
client).

Errors, all under :class:`~flask_robe_sockets.errors.RobeSocketsError` (and
defined in :mod:`~flask_robe_sockets.clientstate`, which decides them)::

    ClientError           .code, as the browser client's errors have
     +-- ReplyError       the server answered @error (its code, .message)
     +-- SendTimeout      "timeout": no answer in time (also a TimeoutError)
     +-- QueueFull        "queue_full": too many sends wait for a connection
     +-- ConnectionLost   "disconnected": the connection ended before the answer
     +-- ClientClosed     "closed": the client was closed
     +-- ConnectError     a connect attempt failed ("error" handlers get it)
"""
from __future__ import annotations

import inspect
import logging
import queue
import ssl
import socket
import threading
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple
from urllib.parse import urlencode, urlsplit

from . import protocol
from .clientsocket import ClientSocket
from .clientstate import (
    CHANNEL_EVENTS,
    PRESENCE_EVENTS,
    STABLE_AFTER,
    Action,
    ChannelState,
    ClientClosed,
    ClientError,
    ClientState,
    ConnectError,
    ConnectionLost,
    Drop,
    Emit,
    Member,
    Presence,
    PresenceState,
    QueueFull,
    ReceivedMessage,
    ReplyError,
    Retry,
    Send,
    SendTimeout,
    Settle,
    Subscribed,
    Unsubscribed,
    error_name,
    is_channel_event,
    retry_after_seconds,
)

if TYPE_CHECKING:
    import requests

__all__ = [
    "STABLE_AFTER",
    "Channel",
    "ChannelPresence",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Member",
    "Message",
    "Presence",
    "QueueFull",
    "ReceivedMessage",
    "ReplyError",
    "SendTimeout",
    "Subscribed",
    "Unsubscribed",
]

log = logging.getLogger("flask_robe_sockets.client")

#: The name this module gave :class:`ReceivedMessage` first; it stays so
#: that code importing it keeps working. (The server's handlers receive
#: :class:`flask_robe_sockets.Message`, another class.)
Message = ReceivedMessage

_CLIENT_EVENTS = ("connect", "disconnect", "error", "message")


class ChannelPresence(PresenceState):
    """Who is on a channel with presence (PROTOCOL.md section 7), as
    ``channel.presence``.

    :attr:`members` is a dict from connection id to :class:`Member`
    (``.id``, ``.identity``, ``.info``), kept in sync by the client from the
    snapshot of each ``@subscribed`` and every ``@join`` and ``@leave``;
    empty while not subscribed, and on a channel without presence. Read it
    in a handler, or copy it (``list(members.values())``) elsewhere: the
    connection thread changes it.
    """

    def __init__(
        self,
        add: Callable[[str, Callable[..., Any]], None],
        fetch: Callable[[float | None], Presence],
    ) -> None:
        super().__init__()
        self._add = add
        self._fetch = fetch

    def on(self, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``handler`` on a presence event, in the client's handler thread.

        - ``"join"``: ``handler(member)``, a :class:`Member`, when another
          connection joins;
        - ``"leave"``: ``handler(member)``, the member as it joined, when
          one leaves;
        - ``"sync"``: ``handler(members)``, the list of every member, after
          the snapshot of each subscribe and resubscribe (it replaces the
          members, never merged with an older list) and after every change,
          the emptying at a lost connection or an unsubscribe included.

        These never reach the channel's own handlers, ``"message"``
        included. A handler may take fewer arguments.

        :raises ValueError: ``event`` is not one of these.
        """
        if event not in PRESENCE_EVENTS:
            raise ValueError(f"unknown presence event {event!r}: one of {', '.join(PRESENCE_EVENTS)}")
        self._add("@" + event, handler)
        return handler

    def fetch(self, timeout: float | None = None) -> Presence:
        """Ask the server who is on the channel now (``@presence``) and wait
        for the answer; while disconnected the request waits in the send
        queue.

        :param timeout: seconds to wait, queueing included; ``None`` uses
            the client's ``send_timeout``.
        :returns: a :class:`Presence` (``.members``, ``.clients``, ``.users``).
        :raises ReplyError: the server refused: ``.code`` is
            ``"not_subscribed"`` or ``"presence_disabled"``.
        :raises SendTimeout: no answer within ``timeout`` (``"timeout"``).
        :raises QueueFull: disconnected, and the queue is full.
        :raises ConnectionLost: the connection ended before the answer.
        :raises ClientClosed: the client is closed.
        """
        return self._fetch(timeout)


class Channel(ChannelState):
    """A channel of a :class:`Client`, returned by :meth:`Client.subscribe`.

    Its ``seq``, ``epoch`` and ``subscribed`` are kept by the client's state
    (:class:`~flask_robe_sockets.clientstate.ChannelState`); who is on it,
    by its :attr:`presence` (a :class:`ChannelPresence`).
    """

    presence: ChannelPresence

    def __init__(
        self,
        client: "Client",
        name: str,
        request: Callable[[str, str, Any, float | None], Any],
        fetch: Callable[[str, float | None], Presence],
        handlers: "_Handlers",
    ) -> None:
        # Presence handlers are this channel's, under the names its state
        # emits (@join, @leave, @sync), which channel.on() refuses.
        super().__init__(
            name,
            ChannelPresence(
                lambda event, handler: handlers.add(self, event, handler),
                lambda timeout: fetch(name, timeout),
            ),
        )
        self.client = client
        self._request = request
        self._handlers = handlers

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} seq={self.seq}>"

    def on(self, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``handler`` on a channel event, in the client's handler thread.

        - ``"message"``: ``handler(message)``, a :class:`ReceivedMessage`,
          for every application event of the channel, whatever its name,
          as in Robe (``message.event`` says which); never for the client's
          own events below;
        - ``"<event name>"``: ``handler(message)`` for the application
          events of that name only;
        - ``"@subscribed"``: ``handler(subscribed)``, a :class:`Subscribed`,
          after each ``@subscribed``, the server's own included when the
          channel's history was lost (reload your state when its
          ``recovered`` is false);
        - ``"@error"``: ``handler(exc)``, a :class:`ReplyError`, when the
          subscription is refused; the client's ``"error"`` hears it too;
        - ``"@unsubscribed"``: ``handler(unsubscribed)``, an
          :class:`Unsubscribed` with the server's ``.reason``, when the
          server ended the subscription: for good, it is not subscribed
          again on reconnect (a later :meth:`Client.subscribe` makes a new
          channel object).

        The client's own events start with ``@``, as application event
        names cannot, so an application event called ``error`` or
        ``subscribed`` is an application event like any other. A handler
        may take fewer arguments than these (``lambda: ...``).

        :raises ValueError: ``event`` is neither an application event name
            nor one of the client's own.
        """
        if not is_channel_event(event):
            raise ValueError(
                f"invalid event name {event!r}: 1 to 64 characters, not starting with '@',"
                f" or one of {', '.join(CHANNEL_EVENTS)}"
            )
        self._handlers.add(self, event, handler)
        return handler

    def send(self, event: str, data: Any = None, timeout: float | None = None) -> Any:
        """Send ``event`` with ``data`` and wait for the answer.

        While disconnected the event waits in the client's queue and goes
        out after the reconnect.

        :param timeout: seconds to wait for the answer, queueing included;
            ``None`` uses the client's ``send_timeout``.
        :returns: the data of the server's ``@reply``.
        :raises ReplyError: the server answered ``@error``.
        :raises SendTimeout: no answer within ``timeout``.
        :raises QueueFull: disconnected, and the queue is full.
        :raises ConnectionLost: the connection ended before the answer.
        :raises ClientClosed: the client is closed.
        """
        return self._request(self.name, event, data, timeout)


def _arguments_taken(handler: Callable[..., Any]) -> int | None:
    """How many positional arguments ``handler`` takes; ``None`` for all.

    Read once, when the handler is registered: a handler written with fewer
    arguments than the client passes gets the first ones (``lambda: ...``
    for ``"disconnect"``), as a JavaScript function ignores extra ones. A
    TypeError that the handler itself raises is its own failure, logged
    like any other, never a reason to call it again with fewer.
    """
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass them all
        return None
    taken = 0
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            taken += 1
    return taken


# A handler, and how many of an event's arguments it takes (None: all).
_Handler = Tuple[Callable[..., Any], Optional[int]]


class _Handlers:
    """The application's handlers, the client's and its channels', and the
    thread that runs them one at a time, in order.

    The connection thread only queues calls here, so that a handler may
    itself call :meth:`Channel.send` and wait for the reply while frames
    keep being read.
    """

    def __init__(self, holds: Callable[[ChannelState], bool]) -> None:
        # Each handler with how many of an event's arguments it takes.
        self._own: dict[str, list[_Handler]] = {name: [] for name in _CLIENT_EVENTS}
        # Weak, so that a channel left and forgotten takes its handlers along.
        self._channels: weakref.WeakKeyDictionary[Channel, defaultdict[str, list]] = (
            weakref.WeakKeyDictionary()
        )
        self._holds = holds
        # Calls waiting for their turn; None ends the thread.
        self._calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="robe-sockets-handlers", daemon=True)

    def add(self, channel: Channel | None, event: str, handler: Callable[..., Any]) -> None:
        entry = (handler, _arguments_taken(handler))
        if channel is None:
            self._own[event].append(entry)
        else:
            self._channels.setdefault(channel, defaultdict(list))[event].append(entry)

    def call(self, emit: Emit) -> None:
        self._calls.put(emit)

    def stop(self) -> None:
        """End the thread after the calls already queued."""
        self._calls.put(None)

    def _run(self) -> None:
        while True:
            emit = self._calls.get()
            if emit is None:
                return
            for name in emit.names:
                # A channel left before its handlers' turn hears nothing
                # more, as unsubscribe() promises.
                if emit.channel is not None and not self._holds(emit.channel):
                    break
                handlers = (
                    self._own[name]
                    if emit.channel is None
                    else self._channels.get(emit.channel, {}).get(name, ())
                )
                for handler, taken in tuple(handlers):
                    try:
                        handler(*emit.args[:taken])
                    except Exception:
                        log.exception("handler %r failed", handler)


class _Request:
    """A send waiting for its answer, in the thread that sent it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: ClientError | None = None

    def settle(self, result: Any, error: ClientError | None) -> None:
        self.result = result
        self.error = error
        self.done.set()


class Client:
    """A connection to a Robe Sockets server that keeps itself up.

    :param url: the socket endpoint, e.g. ``"ws://127.0.0.1:9292/ops"``.
    :param ticket_url: where to ``POST`` for a ticket before each connect,
        e.g. ``"http://127.0.0.1:9292/ops/ticket"``; ``None`` connects
        without one (for servers that do not require tickets).
    :param session: the ``requests.Session`` for ticket requests, so that
        cookies from a login carry over; by default a new one.
    :param send_timeout: seconds :meth:`Channel.send` waits by default.
    :param max_queue: sends that may wait for a connection; more fail at
        once with :class:`QueueFull`.
    :param reconnect_delay: the first backoff ceiling in seconds; it doubles
        after each failed attempt, up to ``max_reconnect_delay``, and the
        delay is drawn uniformly below it (full jitter).
    :param max_reconnect_delay: the largest backoff ceiling, in seconds.
        A refusal with ``Retry-After`` (the ticket endpoint's ``429
        rate_limited``) waits at least that long, up to this.
    :param ping_interval: seconds of silence from the server after which the
        client sends ``@ping``; ``None`` or 0 disables it. Keep it near the
        server's ``ROBE_SOCKETS_PING_INTERVAL`` (25 seconds).
    :param pong_timeout: seconds to wait for anything after a ``@ping``
        before the connection counts as lost.
    :param connect_timeout: seconds for each step of a connect: the ticket
        request, the TCP connect, the handshake, and ``@connected``.
    :param close_timeout: seconds :meth:`close` waits for the server's
        close frame and for the handlers to finish.
    :param ssl_context: for ``wss://`` URLs; by default the system's.
    """

    def __init__(
        self,
        url: str,
        ticket_url: str | None = None,
        session: "requests.Session | None" = None,
        *,
        send_timeout: float = 10.0,
        max_queue: int = 100,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
        ping_interval: float | None = 25.0,
        pong_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if urlsplit(url).scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
        self.url = url
        self.ticket_url = ticket_url
        self.send_timeout = send_timeout
        self.max_queue = max_queue
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.ssl_context = ssl_context

        self._own_session = ticket_url is not None and session is None
        if self._own_session:
            import requests  # only ticket requests need it

            session = requests.Session()
        self._session = session if ticket_url is not None else None

        # Every decision is the state's; this object only moves bytes and
        # runs threads. The lock guards the state, and writes happen under
        # it so that queued events go out before newer ones.
        self._state = ClientState(
            max_queue=max_queue,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            ping_interval=ping_interval,
            pong_timeout=pong_timeout,
            connect_timeout=connect_timeout,
            new_channel=lambda name: Channel(self, name, self._request, self._fetch_presence, self._handlers),
        )
        self._closing = False
        self._lock = threading.RLock()
        self._socket: ClientSocket | None = None
        self._stop = threading.Event()
        self._handlers = _Handlers(self._state.holds)
        self._connection_thread = threading.Thread(
            target=self._run_connection, name="robe-sockets-connection", daemon=True
        )
        self._handlers.thread.start()
        self._connection_thread.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the socket is open and past ``@connected``."""
        return self._state.connected

    @property
    def closed(self) -> bool:
        """Whether the client is over: by :meth:`close`, or by the server
        with a close code from 4500 to 4999 (the application disconnected
        it). It sends nothing more and never reconnects."""
        return self._state.closed

    @property
    def id(self) -> str | None:
        """The server's id for the current connection, ``None`` while disconnected."""
        return self._state.id

    # -- public API ------------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``handler`` on a client event.

        - ``"connect"``: ``handler()``, after each ``@connected``;
        - ``"disconnect"``: ``handler(code)``, once per lost connection, with
          the close code (1006 when it ended without a close frame). After
          a code from 4500 to 4999 (the application disconnected this
          client: signed out, banned) the client is closed, as by
          :meth:`close`; after 4001 it reconnects at once;
        - ``"error"``: ``handler(exc)``, a :class:`ConnectError` for a failed
          connect attempt or a :class:`ReplyError` for an ``@error`` that
          answers no send (a refused subscribe);
        - ``"message"``: ``handler(message)``, a :class:`ReceivedMessage`
          sent to this connection alone outside any subscribed channel.

        A handler may take fewer arguments than these: ``lambda: ...`` is
        fine for ``"disconnect"``.
        """
        if event not in _CLIENT_EVENTS:
            raise ValueError(f"unknown client event {event!r}: one of {', '.join(_CLIENT_EVENTS)}")
        self._handlers.add(None, event, handler)
        return handler

    def subscribe(self, name: str, *, since: int | None = None, epoch: str | None = None) -> Channel:
        """Subscribe to channel ``name`` and return it; the same object for
        the same name. Works before the socket is open: channels are
        subscribed on each connect. After a refusal, calling it again asks
        the server again.

        :param since: with ``epoch``, a position the application saved
            from a channel's ``seq`` and ``epoch`` (a process that
            restarted): the server replays what came after it, in order,
            as on a reconnect, and ``"@subscribed"`` says ``recovered``
            whether it could. Both or neither; by default the channel starts
            from now, with ``recovered`` false.
        :raises ValueError: an invalid channel name or position, or a
            position for a channel already subscribed from another one.
        :raises ClientClosed: the client is closed.
        """
        with self._lock:
            channel, actions = self._state.subscribe(name, since, epoch)
            self._perform(actions)
        return channel  # type: ignore[return-value]  # made by new_channel

    def unsubscribe(self, name: str) -> None:
        """Leave channel ``name``; its handlers get nothing more. Subscribing
        again later returns a new :class:`Channel`."""
        with self._lock:
            self._perform(self._state.unsubscribe(name))

    def close(self) -> None:
        """Close the connection for good: one ``disconnect`` (code 1000) if it
        was connected, no reconnect. Sends still waiting fail with
        :class:`ClientClosed`. Returns once the handlers have run, or after
        ``close_timeout``."""
        with self._lock:
            # The state may be closed already, by a close code from 4500 to
            # 4999: the threads and the session still end here.
            if self._closing:
                return
            self._closing = True
            self._perform(self._state.close())
            self._stop.set()
            sock = self._socket
        if sock is not None:
            sock.close(protocol.CLOSE_NORMAL)
        self._connection_thread.join(self.close_timeout)
        if sock is not None and self._connection_thread.is_alive():
            sock.abort()  # the server did not answer the close frame
            self._connection_thread.join(self.close_timeout)
        # The handler thread ends after the connection thread's last event;
        # close() may itself be running in a handler.
        in_handler = threading.current_thread() is self._handlers.thread
        if not self._connection_thread.is_alive() and not in_handler:
            self._handlers.thread.join(self.close_timeout)
        if self._own_session:
            self._session.close()

    # -- carrying out the state's decisions ------------------------------

    def _request(self, channel: str, event: str, data: Any, timeout: float | None) -> Any:
        return self._answer(
            lambda request: self._state.send(channel, event, data, request), f"{event!r} on {channel!r}", timeout
        )

    def _fetch_presence(self, channel: str, timeout: float | None) -> Presence:
        return self._answer(
            lambda request: self._state.fetch_presence(channel, request), f"@presence on {channel!r}", timeout
        )

    def _answer(self, start: Callable[[_Request], list[Action]], what: str, timeout: float | None) -> Any:
        """The answer to what ``start(request)`` asked for, waited for here."""
        request = _Request()
        with self._lock:
            self._perform(start(request))
        if timeout is None:
            timeout = self.send_timeout
        if not request.done.wait(timeout):
            with self._lock:
                withdrawn = self._state.withdraw(request)
            if withdrawn:
                raise SendTimeout(f"no answer to {what} within {timeout}s")
        if request.error is not None:
            raise request.error
        return request.result

    def _perform(self, actions: list[Action]) -> None:
        """Carry out ``actions`` (lock held). After a failed write the
        connection is gone: the sends still to go wait for the next one,
        and the reconnect redoes the rest (subscribes)."""
        unsent: list[int] = []
        for action in actions:
            if isinstance(action, Send):
                failed = bool(unsent) or not self._write(action.text)
                if failed and action.ref is not None:
                    unsent.append(action.ref)
            elif isinstance(action, Emit):
                if action.channel is None:
                    self._log(action)
                self._handlers.call(action)
            elif isinstance(action, Settle):
                action.request.settle(action.result, action.error)
        if unsent:
            self._state.unsent(unsent)

    def _write(self, text: str) -> bool:
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.send_text(text)
        except OSError:
            return False
        return True

    def _log(self, emit: Emit) -> None:
        name = emit.names[0]
        if name == "connect":
            log.info("connected to %s as %s", self.url, self._state.id)
        elif name == "disconnect":
            log.info("disconnected from %s (%s)", self.url, *emit.args)
        elif name == "error":
            log.warning("%s", *emit.args)

    # -- the connection thread -------------------------------------------

    def _run_connection(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    sock = self._connect()
                except ConnectError as exc:
                    with self._lock:
                        actions = self._state.connect_failed(exc)
                        self._perform(actions)
                else:
                    actions = self._serve(sock)
                retry = next((a for a in actions if isinstance(a, Retry)), None)
                if retry is None or self._stop.wait(retry.delay):
                    break
        finally:
            self._handlers.stop()

    def _connect(self) -> ClientSocket:
        url = self.url
        if self._session is not None:
            separator = "&" if urlsplit(url).query else "?"
            url += separator + urlencode({"ticket": self._fetch_ticket()})
        try:
            return ClientSocket(url, self.connect_timeout, self.ssl_context)
        except OSError as exc:  # Refused has the status, error and Retry-After of the answer
            status, error = getattr(exc, "status", None), getattr(exc, "error", None)
            retry_after = getattr(exc, "retry_after", None)
            raise ConnectError(f"cannot connect to {self.url}: {exc}", status, error, retry_after) from exc

    def _fetch_ticket(self) -> str:
        try:
            response = self._session.post(self.ticket_url, timeout=self.connect_timeout)
        except Exception as exc:  # requests' errors are OSErrors; a session's hooks raise anything
            message = f"cannot get a ticket from {self.ticket_url}: {exc}"
            raise ConnectError(message, code="ticket_failed") from exc
        with response:
            if response.status_code != 200:
                raise ConnectError(
                    f"{self.ticket_url} refused a ticket: {response.status_code}",
                    response.status_code,
                    error_name(response.content) or "ticket_failed",
                    retry_after_seconds(response.headers.get("Retry-After")),
                )
            try:
                ticket = response.json()["ticket"]
            except (ValueError, KeyError, TypeError):
                ticket = None
        if not isinstance(ticket, str):
            message = f"{self.ticket_url} answered without a ticket"
            raise ConnectError(message, response.status_code, "ticket_failed")
        return ticket

    def _serve(self, sock: ClientSocket) -> list[Action]:
        """Read ``sock`` until it ends; what the state makes of the end."""
        with self._lock:
            if self._state.closed:
                sock.release()
                return []
            self._socket = sock
            # connect_timeout bounds each step: from here, the wait for @connected.
            self._state.connecting()
        try:
            self._read(sock)
        finally:
            sock.release()
        with self._lock:
            self._socket = None
            actions = self._state.lost(sock.close_code)
            self._perform(actions)
        return actions

    def _read(self, sock: ClientSocket) -> None:
        while sock.close_code is None:
            with self._lock:
                timeout = self._state.wait_time()
            try:
                texts = sock.receive(timeout)
            except socket.timeout:
                with self._lock:
                    actions = self._state.tick()
                    self._perform(actions)
                drop = next((a for a in actions if isinstance(a, Drop)), None)
                if drop is not None:
                    log.warning("%s", drop.reason)
                    return
                continue
            with self._lock:
                self._state.heard()  # anything at all from the server will do
                for text in texts:
                    try:
                        actions = self._state.receive(text)
                    except Exception:  # a frame we cannot make sense of must not end the reader
                        log.exception("could not handle a frame from the server: %.200r", text)
                        continue
                    self._perform(actions)
