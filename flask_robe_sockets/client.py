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
made while disconnected in a bounded queue.

Two background threads do the work: one connects, reads and pings; the other
runs the application's handlers, in order, so that a handler may itself call
:meth:`Channel.send` and wait for the reply while frames keep being read.
Events wait for their handlers in memory: keep handlers quick, and hand long
work to a thread or a job queue.
Threads, locks and events come from the ``threading`` module when the client
is built, so after ``gevent.monkey.patch_all()`` they are greenlets.

The WebSocket itself is :class:`~flask_robe_sockets.clientsocket.ClientSocket`,
wsproto over a blocking socket (its docstring says why not simple-websocket's
client).

Errors, all under :class:`~flask_robe_sockets.errors.RobeSocketsError`::

    ClientError           .code, as the browser client's errors have
     +-- ReplyError       the server answered @error (its code, .message)
     +-- SendTimeout      "timeout": no answer in time (also a TimeoutError)
     +-- QueueFull        "queue_full": too many sends wait for a connection
     +-- ConnectionLost   "disconnected": the connection ended before the answer
     +-- ClientClosed     "closed": the client was closed
     +-- ConnectError     a connect attempt failed ("error" handlers get it)
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlencode, urlsplit

from . import protocol
from .clientsocket import CLOSE_ABNORMAL, ClientSocket, error_name, retry_after_seconds
from .errors import RobeSocketsError

if TYPE_CHECKING:
    import requests

log = logging.getLogger("flask_robe_sockets.client")

_CLIENT_EVENTS = ("connect", "disconnect", "error", "message")

#: Seconds a connection must last for the reconnect backoff to start over.
STABLE_AFTER = 10.0


class ClientError(RobeSocketsError):
    """Base class of the client's errors.

    Each has a ``code``, as the browser client's errors do: the server's
    error code for :class:`ReplyError`, else one of the client's own.
    """

    code = "error"


class ReplyError(ClientError):
    """The server answered ``@error``.

    :param code: the protocol's error code, e.g. ``"forbidden"``.
    :param message: the server's explanation, for humans.
    :param channel: the channel the refused frame was on.
    """

    def __init__(self, code: str, message: str, channel: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.channel = channel


class SendTimeout(ClientError, TimeoutError):
    """No answer came in time. A send still queued is dropped; one already
    sent may still be handled by the server, and its answer is ignored."""

    code = "timeout"


class QueueFull(ClientError):
    """The client is disconnected and already holds ``max_queue`` sends."""

    code = "queue_full"


class ConnectionLost(ClientError):
    """The connection ended after the event was sent and before its answer.

    The server may or may not have handled it: it is not sent again, since
    handlers need not be idempotent.
    """

    code = "disconnected"


class ClientClosed(ClientError):
    """The client was closed; it sends nothing more."""

    code = "closed"


class ConnectError(ClientError):
    """A connect attempt failed; the client tries again after a backoff.

    Every failure is retried, refusals included: ``429 rate_limited`` (too
    many tickets), ``429 identity_limit`` or ``ip_limit`` (too many sockets)
    and even ``401 unauthorized`` may pass later.

    :param status: the HTTP status of a refused ticket request or
        handshake, else ``None``.
    :param code: the ``error`` of the refusal's JSON body, e.g.
        ``"unauthorized"`` or ``"ticket_used"``; else ``"ticket_failed"``
        when no ticket came, ``"connect_failed"`` when the socket failed.
    :param retry_after: the seconds of the refusal's ``Retry-After``
        header, else ``None``; the next attempt waits at least that long.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or "connect_failed"
        self.retry_after = retry_after


@dataclass(frozen=True)
class Message:
    """An event from the server.

    ``seq`` is the broadcast's position in its channel, ``None`` for a
    message sent to this connection alone.
    """

    channel: str | None
    event: str
    data: Any = None
    seq: int | None = None


@dataclass(frozen=True)
class Subscribed:
    """The server's ``@subscribed``: ``recovered`` is ``False`` when messages
    missed while disconnected could not be replayed, so the application
    should reload its state."""

    recovered: bool
    seq: int
    epoch: str


class Channel:
    """A channel of a :class:`Client`, returned by :meth:`Client.subscribe`."""

    def __init__(self, client: "Client", name: str) -> None:
        self.client = client
        self.name = name
        #: The last ``seq`` seen here and the epoch it belongs to; sent back
        #: on resubscribe so the server can replay what came in between.
        self.seq: int | None = None
        self.epoch: str | None = None
        #: Whether the server confirmed the subscription on this connection.
        self.subscribed = False
        # Subscribed on every connect, except after a refusal (until
        # subscribe() asks again); the ref of the @subscribe in flight.
        self._wanted = True
        self._subscribe_ref: int | None = None
        self._handlers: defaultdict[str, list[Callable[..., Any]]] = defaultdict(list)

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} seq={self.seq}>"

    def on(self, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``handler`` on a channel event, in the client's handler thread.

        - ``"<event name>"``: ``handler(message)``, a :class:`Message`, for
          that application event only;
        - ``"message"``: ``handler(message)`` for every application event;
        - ``"subscribed"``: ``handler(subscribed)``, a :class:`Subscribed`,
          after each ``@subscribed`` (reload your state when its
          ``recovered`` is false);
        - ``"error"``: ``handler(exc)``, a :class:`ReplyError`, when the
          subscription is refused; the client's ``"error"`` hears it too.

        As in the browser client, application events named ``subscribed``
        or ``error`` reach those handlers (and the ``"message"`` ones).
        """
        if not protocol.is_valid_event(event):
            raise ValueError(f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'")
        self._handlers[event].append(handler)
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
        return self.client._request(self.name, event, data, timeout)

    def _on_subscribed(self, subscribed: Subscribed) -> None:
        self.subscribed = True
        if not subscribed.recovered:
            # Nothing replayed: new messages follow this seq. When recovered,
            # the replay that follows moves seq on by itself.
            self.seq = subscribed.seq
        self.epoch = subscribed.epoch
        self.client._emit(self._handlers["subscribed"], subscribed, channel=self)

    def _on_refused(self, error: ReplyError) -> None:
        # Refused for good, until subscribe() asks again; but a subscribe
        # that was only rate limited is tried again on the next connect.
        self._wanted = error.code == "rate_limited"
        self.client._emit(self._handlers["error"], error, channel=self)

    def _deliver(self, message: Message) -> None:
        if message.seq is not None:
            self.seq = message.seq
        self.client._emit(self._handlers["message"], message, channel=self)
        if message.event != "message":
            self.client._emit(self._handlers[message.event], message, channel=self)


class _Request:
    """An application event waiting for its answer."""

    def __init__(self, ref: int, text: str) -> None:
        self.ref = ref
        self.text = text
        self.done = threading.Event()
        self.result: Any = None
        self.error: ClientError | None = None

    def resolve(self, result: Any = None, error: ClientError | None = None) -> None:
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
        #: The server's id for the current connection, ``None`` while disconnected.
        self.id: str | None = None

        self._own_session = ticket_url is not None and session is None
        if self._own_session:
            import requests  # only ticket requests need it

            session = requests.Session()
        self._session = session if ticket_url is not None else None

        # Guards the connection state, the channels, the queue and the
        # pending answers; writes happen under it so that queued events go
        # out before newer ones.
        self._lock = threading.RLock()
        self._socket: ClientSocket | None = None
        self._connected = False
        self._closed = False
        self._stop = threading.Event()
        self._channels: dict[str, Channel] = {}
        self._queue: deque[_Request] = deque()
        self._pending: dict[int, _Request] = {}
        self._refs = itertools.count(1)
        self._handlers: dict[str, list[Callable[..., Any]]] = {name: [] for name in _CLIENT_EVENTS}
        # Handler calls, run in order by the handler thread; None ends it.
        self._calls: queue.Queue = queue.Queue()
        self._handler_thread = threading.Thread(
            target=self._run_handlers, name="robe-sockets-handlers", daemon=True
        )
        self._connection_thread = threading.Thread(
            target=self._run_connection, name="robe-sockets-connection", daemon=True
        )
        self._handler_thread.start()
        self._connection_thread.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the socket is open and past ``@connected``."""
        return self._connected

    # -- public API ------------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``handler`` on a client event.

        - ``"connect"``: ``handler()``, after each ``@connected``;
        - ``"disconnect"``: ``handler(code)``, once per lost connection, with
          the close code (1006 when it ended without a close frame);
        - ``"error"``: ``handler(exc)``, a :class:`ConnectError` for a failed
          connect attempt or a :class:`ReplyError` for an ``@error`` that
          answers no send (a refused subscribe);
        - ``"message"``: ``handler(message)``, a :class:`Message` sent to
          this connection alone outside any subscribed channel.
        """
        if event not in self._handlers:
            raise ValueError(f"unknown client event {event!r}: one of {', '.join(_CLIENT_EVENTS)}")
        self._handlers[event].append(handler)
        return handler

    def subscribe(self, name: str) -> Channel:
        """Subscribe to channel ``name`` and return it; the same object for
        the same name. Works before the socket is open: channels are
        subscribed on each connect. After a refusal, calling it again asks
        the server again."""
        if not protocol.is_valid_channel(name):
            raise ValueError(
                f"invalid channel name {name!r}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /"
            )
        with self._lock:
            self._check_open()
            channel = self._channels.get(name)
            if channel is None:
                channel = self._channels[name] = Channel(self, name)
            channel._wanted = True
            if self._connected and not channel.subscribed:
                self._send_subscribe(channel)
        return channel

    def unsubscribe(self, name: str) -> None:
        """Leave channel ``name``; its handlers get nothing more. Subscribing
        again later returns a new :class:`Channel`."""
        with self._lock:
            channel = self._channels.pop(name, None)
            if channel is None:
                return
            channel.subscribed = False
            if self._connected:
                self._write({"channel": name, "event": protocol.UNSUBSCRIBE})

    def close(self) -> None:
        """Close the connection for good: one ``disconnect`` (code 1000) if it
        was connected, no reconnect. Sends still waiting fail with
        :class:`ClientClosed`. Returns once the handlers have run, or after
        ``close_timeout``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            sock = self._socket
            queued = list(self._queue)
            self._queue.clear()
        for request in queued:
            request.resolve(error=ClientClosed("the client was closed before this was sent"))
        if sock is not None:
            sock.close(protocol.CLOSE_NORMAL)
        self._connection_thread.join(self.close_timeout)
        if sock is not None and self._connection_thread.is_alive():
            sock.abort()  # the server did not answer the close frame
            self._connection_thread.join(self.close_timeout)
        # The handler thread ends after the connection thread's last event;
        # close() may itself be running in a handler.
        in_handler = threading.current_thread() is self._handler_thread
        if not self._connection_thread.is_alive() and not in_handler:
            self._handler_thread.join(self.close_timeout)
        if self._own_session:
            self._session.close()

    # -- sending ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")

    def _request(self, channel: str, event: str, data: Any, timeout: float | None) -> Any:
        if not protocol.is_valid_event(event):
            raise ValueError(f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'")
        ref = next(self._refs)
        # Encoded here so that data that is not JSON fails in the caller.
        frame = {"channel": channel, "event": event, "data": data, "ref": ref}
        request = _Request(ref, protocol.dumps(frame))
        with self._lock:
            self._check_open()
            if self._connected:
                self._send_request(request)
            elif len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} sends already wait for the connection (max_queue)"
                )
            else:
                self._queue.append(request)
        if timeout is None:
            timeout = self.send_timeout
        if not request.done.wait(timeout) and self._withdraw(request):
            raise SendTimeout(f"no answer to {event!r} on {channel!r} within {timeout}s")
        if request.error is not None:
            raise request.error
        return request.result

    def _withdraw(self, request: _Request) -> bool:
        """Forget a request that timed out; ``False`` if it was answered meanwhile."""
        with self._lock:
            if self._pending.pop(request.ref, None) is not None:
                return True
            try:
                self._queue.remove(request)
            except ValueError:
                return False
            return True

    def _send_request(self, request: _Request) -> bool:
        """Write ``request`` (lock held); put it back in front of the queue
        if the write failed, since the server then got no whole frame."""
        self._pending[request.ref] = request
        try:
            self._socket.send_text(request.text)
        except OSError:
            del self._pending[request.ref]
            self._queue.appendleft(request)
            return False
        return True

    def _send_subscribe(self, channel: Channel) -> None:
        if channel._subscribe_ref is not None:
            return  # one is on its way
        channel._subscribe_ref = next(self._refs)
        frame: dict[str, Any] = {
            "channel": channel.name, "event": protocol.SUBSCRIBE, "ref": channel._subscribe_ref
        }
        if channel.epoch is not None:
            frame["data"] = {"since": channel.seq, "epoch": channel.epoch}
        self._write(frame)

    def _write(self, frame: dict[str, Any]) -> None:
        """Write a frame that needs no answer; a failure only means the
        connection is gone, and the reconnect will redo what matters."""
        sock = self._socket
        if sock is not None:
            try:
                sock.send_text(protocol.dumps(frame))
            except OSError:
                pass

    # -- the connection thread -------------------------------------------

    def _run_connection(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                at_least = 0.0
                try:
                    sock = self._connect()
                except ConnectError as exc:
                    if not self._stop.is_set():  # else close() cut it short
                        self._emit_error(exc)
                    at_least = exc.retry_after or 0.0
                else:
                    started = time.monotonic()
                    if self._serve(sock) and time.monotonic() - started >= STABLE_AFTER:
                        # A good connection: the backoff starts over. One
                        # dropped sooner keeps growing it, so a server that
                        # closes every connection at once is not hammered.
                        attempt = 0
                if self._stop.wait(self._backoff(attempt, at_least)):
                    break
                attempt += 1
        finally:
            self._calls.put(None)

    def _backoff(self, attempt: int, at_least: float = 0.0) -> float:
        """Seconds before the next attempt: full jitter below a doubling
        ceiling, but no sooner than the server's ``Retry-After`` said (up to
        ``max_reconnect_delay``, whatever the server said)."""
        ceiling = min(self.max_reconnect_delay, self.reconnect_delay * 2 ** min(attempt, 32))
        return max(random.uniform(0, ceiling), min(at_least, self.max_reconnect_delay))

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

    def _serve(self, sock: ClientSocket) -> bool:
        """Read ``sock`` until it ends; whether it got as far as ``@connected``."""
        with self._lock:
            if self._closed:
                sock.release()
                return False
            self._socket = sock
        try:
            self._read(sock)
        finally:
            sock.release()
        connected = self._lost(sock.close_code)
        if not connected and not self._closed:
            code = sock.close_code or CLOSE_ABNORMAL
            self._emit_error(ConnectError(f"the connection closed ({code}) before @connected"))
        return connected

    def _read(self, sock: ClientSocket) -> None:
        awaiting_pong = False
        while sock.close_code is None:
            if not self._connected:
                timeout = self.connect_timeout  # @connected is the first frame
            else:
                # 0 disables ping as None does (and as in the browser client).
                timeout = self.pong_timeout if awaiting_pong else self.ping_interval or None
            try:
                texts = sock.receive(timeout)
            except socket.timeout:
                if not self._connected:
                    log.warning("no @connected within %ss", self.connect_timeout)
                    return
                if awaiting_pong:
                    log.warning("no answer to @ping within %ss: connection lost", self.pong_timeout)
                    return
                awaiting_pong = True
                self._write({"event": protocol.PING})
                continue
            awaiting_pong = False  # anything at all from the server will do
            for text in texts:
                try:
                    self._on_frame(text)
                except Exception:  # a frame we cannot make sense of must not end the reader
                    log.exception("could not handle a frame from the server: %.200r", text)

    def _lost(self, code: int | None) -> bool:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            self._socket = None
            self.id = None
            for channel in self._channels.values():
                channel.subscribed = False
                channel._subscribe_ref = None
            unanswered = list(self._pending.values())
            self._pending.clear()
            closed = self._closed
        if closed:
            code = protocol.CLOSE_NORMAL  # whatever the server answered, or not
        elif code is None:
            code = CLOSE_ABNORMAL
        for request in unanswered:
            error = (
                ClientClosed("the client was closed before the server answered")
                if closed
                else ConnectionLost(f"the connection closed ({code}) before the server answered")
            )
            request.resolve(error=error)
        if was_connected:
            log.info("disconnected from %s (%s)", self.url, code)
            self._emit(self._handlers["disconnect"], code)
        return was_connected

    # -- frames from the server ------------------------------------------

    def _on_frame(self, text: str) -> None:
        frame = json.loads(text)
        event = frame["event"]
        channel = frame.get("channel")
        data = frame.get("data")
        if event == protocol.CONNECTED:
            self._on_connected(data)
        elif event in (protocol.REPLY, protocol.ERROR):
            self._on_answer(event, channel, data, frame.get("ref"))
        elif event == protocol.SUBSCRIBED:
            target = self._answered_subscribe(channel, frame.get("ref"))
            if target is not None:
                target._on_subscribed(Subscribed(data["recovered"], data["seq"], data["epoch"]))
        elif event in (protocol.PONG, protocol.UNSUBSCRIBED):
            pass  # reading it was the point
        else:
            self._on_message(Message(channel, event, data, frame.get("seq")))

    def _on_connected(self, data: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            self.id = data["id"]
            for channel in self._channels.values():
                if channel._wanted:
                    self._send_subscribe(channel)
            while self._queue:
                if not self._send_request(self._queue.popleft()):
                    break
            self._connected = True
        log.info("connected to %s as %s", self.url, self.id)
        self._emit(self._handlers["connect"])

    def _on_answer(self, event: str, channel: str | None, data: Any, ref: Any) -> None:
        with self._lock:
            request = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if event == protocol.REPLY:
            if request is not None:
                request.resolve(data)
            return
        error = ReplyError(data["code"], data["message"], channel)
        if request is not None:
            request.resolve(error=error)
            return
        refused = self._answered_subscribe(channel, ref)
        if refused is not None:
            refused._on_refused(error)
        self._emit_error(error)

    def _answered_subscribe(self, name: str | None, ref: Any) -> Channel | None:
        """The channel whose ``@subscribe`` this answers, if it is still ours."""
        with self._lock:
            channel = self._channels.get(name) if name is not None else None
            if channel is None or ref is None or channel._subscribe_ref != ref:
                return None  # unsubscribed meanwhile, or an answer we did not ask for
            channel._subscribe_ref = None
            return channel

    def _on_message(self, message: Message) -> None:
        channel = self._channels.get(message.channel) if message.channel is not None else None
        if channel is not None:
            channel._deliver(message)
        elif message.seq is None:  # to this connection alone
            self._emit(self._handlers["message"], message)
        # else a broadcast on a channel just left: dropped

    # -- the handler thread ----------------------------------------------

    def _emit(
        self, handlers: list[Callable[..., Any]], *args: Any, channel: Channel | None = None
    ) -> None:
        """Queue a call of ``handlers``; a ``channel``'s handlers are skipped
        if it was left before their turn, as unsubscribe() promises."""
        self._calls.put((handlers, args, channel))

    def _emit_error(self, exc: ClientError) -> None:
        log.warning("%s", exc)
        self._emit(self._handlers["error"], exc)

    def _run_handlers(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            handlers, args, channel = call
            if channel is not None and self._channels.get(channel.name) is not channel:
                continue
            for handler in tuple(handlers):
                try:
                    handler(*args)
                except Exception:
                    log.exception("handler %r failed", handler)
