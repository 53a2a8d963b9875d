"""What the Python client knows and decides, apart from any I/O.

:class:`ClientState` is told what happened (the application subscribed or
sent, a connect started or failed, a frame came, the connection was lost,
time passed) and answers with the actions the I/O around it carries out:
texts to write (:class:`Send`), handlers to call (:class:`Emit`), sends to
settle (:class:`Settle`), when to try again (:class:`Retry`) and when to
give a silent connection up (:class:`Drop`). It has no sockets, threads or
locks, reads the time only from the ``clock`` it is given and draws jitter
only from its ``random``, so tests drive it step by step.

:mod:`flask_robe_sockets.client` wraps it in threads and a socket; the
browser client (``static/client.js``) has a ``ClientState`` of its own that
makes the same decisions, and ``tests/client_cases.json`` holds the cases
both must pass, so the two cannot drift apart.
"""
from __future__ import annotations

import itertools
import json
import random as _random
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

from . import protocol
from .errors import RobeSocketsError

#: Seconds a connection must last, from ``@connected``, for the reconnect
#: backoff to start over. One dropped sooner keeps growing it, so a server
#: that closes every connection right after ``@connected`` is not hammered.
STABLE_AFTER = 10.0

#: The close code reported when the connection ended without a close frame
#: (RFC 6455 reserves it for exactly that; it never goes on the wire).
CLOSE_ABNORMAL = 1006

#: The channel events that are the client's own, named as the protocol
#: names them: application event names cannot start with ``@``, so an app
#: that broadcasts an event called ``error`` never reaches these handlers.
CHANNEL_EVENTS = (protocol.SUBSCRIBED, protocol.UNSUBSCRIBED, protocol.ERROR)

#: The channel handler name that gets every application event of the
#: channel, whatever its name, as in Robe (never the client's own events).
EVERY_EVENT = "message"

#: What ``channel.presence.on()`` takes. Their :class:`Emit` names are
#: these with ``@`` in front, so that no channel handler (whose names
#: cannot start with ``@`` but for :data:`CHANNEL_EVENTS`) ever gets them.
PRESENCE_EVENTS = ("join", "leave", "sync")

#: The close code by which the server asks for a reconnect now
#: (PROTOCOL.md section 8): the first attempt waits no backoff.
CLOSE_RECONNECT_NOW = 4001

#: Close codes from here to 4999 end the client, as :meth:`ClientState.close`
#: would: the application disconnected it (signed out, banned).
CLOSE_TERMINAL = 4500

# Subscribe refusals that may pass on the next connect; any other refusal
# holds until the application subscribes again.
_RETRIED_REFUSALS = frozenset({"rate_limited"})

# The largest seq a position may name: the largest integer a browser's
# JSON keeps exact (Number.MAX_SAFE_INTEGER), so both clients take the same.
_MAX_SEQ = 2**53 - 1

# A number of seconds, as Retry-After gives it (RFC 9110 allows digits
# only; a fraction is taken too). Anything else, an HTTP-date included,
# sets no floor: it is not worth a clock here.
_SECONDS = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*")


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
class ReceivedMessage:
    """An event from the server, as the client's handlers receive it.

    ``seq`` is the broadcast's position in its channel, ``None`` for a
    message sent to this connection alone. (What the server's handlers
    receive from clients is :class:`flask_robe_sockets.Message`.)
    """

    channel: str | None
    event: str
    data: Any = None
    seq: int | None = None


@dataclass(frozen=True)
class Member:
    """A member of a channel with presence (PROTOCOL.md section 7): one
    connection, by its ``id``, with the ``identity`` its ticket named
    (``None`` for an anonymous one) and the ``info`` the application shows
    others about it (any JSON, ``None`` when it gives none)."""

    id: str
    identity: Any = None
    info: Any = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Member":
        return cls(data["id"], data.get("identity"), data.get("info"))


@dataclass(frozen=True)
class Presence:
    """The server's answer to ``channel.presence.fetch()``: ``members``, a
    list of :class:`Member`; ``clients``, how many; ``users``, how many
    distinct identities other than ``None`` among them."""

    members: list[Member]
    clients: int
    users: int

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Presence":
        members = [Member.from_wire(member) for member in data["members"]]
        return cls(members, data["clients"], data["users"])


@dataclass(frozen=True)
class Unsubscribed:
    """The server ended the subscription (PROTOCOL.md section 8), saying why.
    The channel is not subscribed again on reconnect."""

    reason: str | None


@dataclass(frozen=True)
class Subscribed:
    """The server's ``@subscribed``: ``recovered`` is ``False`` when messages
    missed while disconnected could not be replayed, so the application
    should reload its state."""

    recovered: bool
    seq: int
    epoch: str


class PresenceState:
    """Who is on a channel, as the state sees it. Only :class:`ClientState`
    changes it."""

    def __init__(self) -> None:
        #: The channel's members by connection id, kept from the snapshot of
        #: its last ``@subscribed`` and every ``@join`` and ``@leave`` since;
        #: empty while not subscribed and on a channel without presence.
        self.members: dict[str, Member] = {}


class ChannelState:
    """One channel as the state sees it. Only :class:`ClientState` changes it.

    ``seq`` and ``epoch`` are sent back on resubscribe so that the server
    can replay what came in between.

    :param presence: the object that holds its members; by default a
        :class:`PresenceState`.
    """

    def __init__(self, name: str, presence: PresenceState | None = None) -> None:
        self.name = name
        self.presence = PresenceState() if presence is None else presence
        #: Whether the application left it: its handlers hear nothing more.
        self.left = False
        #: The last ``seq`` seen here, and the epoch it belongs to.
        self.seq: int | None = None
        self.epoch: str | None = None
        #: Whether the server confirmed the subscription on this connection.
        self.subscribed = False
        #: Whether it is subscribed on every connect: not after a refusal,
        #: until the application subscribes again.
        self.wanted = True
        #: The ref of the ``@subscribe`` in flight, if one is.
        self.subscribe_ref: int | None = None
        #: Whether its last ``@subscribed`` had presence: only then do
        #: ``@join`` and ``@leave`` count.
        self.has_presence = False


@dataclass(frozen=True)
class Send:
    """Write ``text``. ``ref`` is the send it carries, if any: should the
    write fail, hand it to :meth:`ClientState.unsent`."""

    text: str
    ref: int | None = None


@dataclass(frozen=True)
class Emit:
    """Call the handlers of each of ``names`` in turn with ``args``: the
    client's own when ``channel`` is ``None``, else that channel's, which
    are skipped once it is no longer held (:meth:`ClientState.holds`)."""

    channel: ChannelState | None
    names: tuple[str, ...]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Settle:
    """A send is over: its ``request`` gets ``result``, or fails with ``error``."""

    request: Any
    result: Any = None
    error: ClientError | None = None


@dataclass(frozen=True)
class Retry:
    """Connect again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Drop:
    """Give the connection up: it has been silent too long. ``reason`` says how."""

    reason: str


Action = Union[Send, Emit, Settle, Retry, Drop]


class _Outgoing:
    """A send, encoded, with the caller's ``request`` to settle when it is over."""

    __slots__ = ("ref", "text", "request")

    def __init__(self, ref: int, text: str, request: Any) -> None:
        self.ref = ref
        self.text = text
        self.request = request


class ClientState:
    """The client's decisions, without I/O.

    Every method returns the list of actions to carry out, in order. The
    I/O around it calls it under one lock and carries out what it answers.

    :param max_queue: sends that may wait for a connection; more fail with
        :class:`QueueFull`.
    :param reconnect_delay: the first backoff ceiling in seconds; it doubles
        after each failed attempt, up to ``max_reconnect_delay``, and each
        delay is drawn uniformly below it (full jitter).
    :param max_reconnect_delay: the largest backoff ceiling, and the most a
        ``Retry-After`` is waited out.
    :param ping_interval: seconds of silence after which ``@ping`` is sent;
        ``None`` or 0 disables it.
    :param pong_timeout: seconds to wait for anything after a ``@ping``.
    :param connect_timeout: seconds from :meth:`connecting` to ``@connected``.
    :param new_channel: makes the object for a newly subscribed channel (the
        client's :class:`~flask_robe_sockets.client.Channel` is one).
    :param clock: seconds, for the deadlines and :data:`STABLE_AFTER`.
    :param random: a float in [0, 1) per backoff, for the jitter; by
        default :func:`random.random`.
    """

    def __init__(
        self,
        *,
        max_queue: int = 100,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
        ping_interval: float | None = 25.0,
        pong_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        new_channel: Callable[[str], ChannelState] = ChannelState,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.connect_timeout = connect_timeout
        self._new_channel = new_channel
        self._clock = clock
        # Looked up now rather than bound at import, so that a test may
        # patch random.random before the client is built.
        self._random = random or _random.random
        #: Whether ``@connected`` came on the current connection.
        self.connected = False
        self.closed = False
        #: The server's id for the current connection.
        self.id: str | None = None
        self.channels: dict[str, ChannelState] = {}
        self._queue: deque[_Outgoing] = deque()
        self._pending: dict[int, _Outgoing] = {}
        self._refs = itertools.count(1)
        self._attempt = 0
        self._connecting_since: float | None = None
        self._connected_at = 0.0
        self._last_heard = 0.0
        self._ping_sent_at: float | None = None
        # Whether a 4001 was answered with an immediate reconnect since the
        # last connection that lasted STABLE_AFTER.
        self._rushed = False

    @property
    def queued(self) -> int:
        """How many sends wait for a connection."""
        return len(self._queue)

    def holds(self, channel: ChannelState) -> bool:
        """Whether ``channel``'s handlers still hear its events: until the
        application unsubscribes it. One the server unsubscribed still hears
        what came before, and the ``@unsubscribed`` that ended it."""
        return not channel.left

    # -- what the application does --------------------------------------

    def subscribe(
        self, name: str, since: int | None = None, epoch: str | None = None
    ) -> tuple[ChannelState, list[Action]]:
        """The channel ``name``, wanted from now on, and its ``@subscribe``
        if connected. After a refusal this asks the server again.

        ``since`` and ``epoch`` (both or neither) are a position the
        application saved, a channel's ``seq`` and ``epoch``: the
        ``@subscribe`` starts from it, so the server replays what came
        after, as on a reconnect. A channel whose ``@subscribe`` has gone
        out already keeps its own position.

        :raises ValueError: not a channel name the protocol allows, a
            position that is not one, or a position other than its own for
            a channel subscribed or on its way.
        :raises ClientClosed: the client is closed.
        """
        if not protocol.is_valid_channel(name):
            raise ValueError(
                f"invalid channel name {name!r}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /"
            )
        position = _position(since, epoch)
        self._check_open()
        channel = self.channels.get(name)
        if position is not None and channel is not None and _started(channel):
            if (channel.seq, channel.epoch) != position:
                raise ValueError(
                    f"already subscribed to {name!r} (at seq {channel.seq} of epoch {channel.epoch!r}):"
                    " a saved position only starts a subscription; pass it to the first subscribe()"
                )
            position = None  # where the channel is already
        if channel is None:
            channel = self.channels[name] = self._new_channel(name)
        if position is not None:
            channel.seq, channel.epoch = position
        channel.wanted = True
        if self.connected and not channel.subscribed:
            return channel, self._subscribe(channel)
        return channel, []

    def unsubscribe(self, name: str) -> list[Action]:
        """Leave ``name``: its object hears nothing more, and a later
        :meth:`subscribe` makes a new one."""
        channel = self.channels.pop(name, None)
        if channel is None:
            return []
        channel.left = True
        self._end(channel)
        if not self.connected:
            return []
        return [Send(protocol.dumps({"channel": name, "event": protocol.UNSUBSCRIBE}))]

    def send(self, channel: str, event: str, data: Any, request: Any) -> list[Action]:
        """Send ``event`` now if connected, else queue it; ``request`` is
        what a :class:`Settle` hands back when it is answered.

        :raises ValueError: a reserved or malformed event name, or data that
            is not JSON (``NaN``); ``TypeError`` for data of no JSON type.
        :raises ClientClosed: the client is closed.
        :raises QueueFull: disconnected, with ``max_queue`` sends waiting.
        """
        if not protocol.is_valid_event(event):
            raise ValueError(f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'")
        ref = next(self._refs)
        # Encoded now, so that data that is not JSON fails in the caller.
        text = protocol.dumps({"channel": channel, "event": event, "data": data, "ref": ref})
        return self._send_or_queue(_Outgoing(ref, text, request))

    def _send_or_queue(self, outgoing: _Outgoing) -> list[Action]:
        self._check_open()
        if self.connected:
            return [self._transmit(outgoing)]
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} sends already wait for the connection (max_queue)")
        self._queue.append(outgoing)
        return []

    def fetch_presence(self, channel: str, request: Any) -> list[Action]:
        """Ask for ``channel``'s members (``@presence``), now if connected,
        else queued like a send; its :class:`Settle` has a :class:`Presence`,
        or the server's refusal (``not_subscribed``, ``presence_disabled``).

        :raises ClientClosed: the client is closed.
        :raises QueueFull: disconnected, with ``max_queue`` sends waiting.
        """
        ref = next(self._refs)
        text = protocol.dumps({"channel": channel, "event": protocol.PRESENCE, "ref": ref})
        return self._send_or_queue(_Outgoing(ref, text, request))

    def withdraw(self, request: Any) -> bool:
        """Forget a send that timed out; ``False`` if it was settled meanwhile."""
        for ref, outgoing in self._pending.items():
            if outgoing.request is request:
                del self._pending[ref]
                return True
        for outgoing in self._queue:
            if outgoing.request is request:
                self._queue.remove(outgoing)
                return True
        return False

    def unsent(self, refs: Iterable[int]) -> None:
        """These sends could not be written (the connection broke as they
        went out): the server got no whole frame, so they wait in front of
        the queue, in order, for the next connection."""
        outgoing = [self._pending.pop(ref) for ref in refs if ref in self._pending]
        self._queue.extendleft(reversed(outgoing))

    def close(self) -> list[Action]:
        """Close for good: queued sends fail; :meth:`lost` follows for the
        connection, if there is one, and no :class:`Retry` comes again."""
        if self.closed:
            return []
        self.closed = True
        queued = list(self._queue)
        self._queue.clear()
        error = ClientClosed("the client was closed before this was sent")
        return [Settle(outgoing.request, error=error) for outgoing in queued]

    # -- what the connection does ---------------------------------------

    def connecting(self) -> None:
        """A connect is under way: ``@connected`` must come within
        ``connect_timeout`` from now (:meth:`tick` drops it after)."""
        self._connecting_since = self._clock()

    def connect_failed(self, error: ConnectError) -> list[Action]:
        """A connect attempt failed before the socket was open: report it and
        retry after the backoff, no sooner than its ``retry_after``."""
        self._connecting_since = None
        if self.closed:  # close() cut it short
            return []
        return [Emit(None, ("error",), (error,)), self._retry(error.retry_after)]

    def heard(self) -> None:
        """Bytes came from the server: it is alive, whatever they were."""
        self._last_heard = self._clock()
        self._ping_sent_at = None

    def receive(self, text: str) -> list[Action]:
        """A text frame from the server.

        :raises ValueError: the text is not JSON (and ``KeyError`` or
            ``TypeError`` a frame that lacks what its event needs); the
            caller logs it and reads on.
        """
        self.heard()
        frame = json.loads(text)
        event = frame["event"]
        channel = frame.get("channel")
        data = frame.get("data")
        ref = frame.get("ref")
        if event == protocol.CONNECTED:
            return self._on_connected(data)
        if event == protocol.REPLY:
            request = self._answered_send(ref)
            return [] if request is None else [Settle(request, data)]
        if event == protocol.PRESENCE:
            request = self._answered_send(ref)
            return [] if request is None else [Settle(request, Presence.from_wire(data))]
        if event in (protocol.JOIN, protocol.LEAVE):
            return self._on_presence_change(channel, event, Member.from_wire(data))
        if event == protocol.UNSUBSCRIBED and ref is None and isinstance(data, dict):
            # The server's own (PROTOCOL.md section 8); the answer to ours
            # has no reason (data null), and its channel is gone already.
            return self._on_unsubscribed_by_server(channel, Unsubscribed(data.get("reason")))
        if event == protocol.ERROR:
            return self._on_error(ReplyError(data["code"], data["message"], channel), ref)
        if event == protocol.SUBSCRIBED:
            subscribed = Subscribed(data["recovered"], data["seq"], data["epoch"])
            if ref is None:
                return self._on_history_lost(channel, subscribed)
            target = self._answered_subscribe(channel, ref)
            if target is None:
                return []
            snapshot = data.get("presence")
            members = None if snapshot is None else [Member.from_wire(m) for m in snapshot["members"]]
            return self._on_subscribed(target, subscribed, members)
        if not protocol.is_valid_event(event):
            # @pong (reading it was the point), the answer to our own
            # @unsubscribe, or a protocol event this client does not know
            # (e.g. a newer server's): never an application event.
            return []
        return self._on_message(ReceivedMessage(channel, event, data, frame.get("seq")))

    def tick(self) -> list[Action]:
        """Time passed: ``@ping`` a silent connection, drop one that stayed
        silent after it or never sent ``@connected``."""
        now = self._clock()
        if not self.connected:
            since = self._connecting_since
            if since is None or now - since < self.connect_timeout:
                return []
            self._connecting_since = None  # this attempt is over
            return [Drop(f"no @connected within {self.connect_timeout}s")]
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= self.pong_timeout:
                return [Drop(f"no answer to @ping within {self.pong_timeout}s: connection lost")]
            return []
        if self.ping_interval and now - self._last_heard >= self.ping_interval:
            self._ping_sent_at = now
            return [Send(protocol.dumps({"event": protocol.PING}))]
        return []

    def wait_time(self) -> float | None:
        """Seconds until :meth:`tick` has something to do; ``None`` for never."""
        if not self.connected:
            if self._connecting_since is None:
                return None
            deadline = self._connecting_since + self.connect_timeout
        elif self._ping_sent_at is not None:
            deadline = self._ping_sent_at + self.pong_timeout
        elif self.ping_interval:
            deadline = self._last_heard + self.ping_interval
        else:
            return None
        return max(deadline - self._clock(), 0.0)

    def lost(self, code: int | None) -> list[Action]:
        """The connection ended with close ``code`` (``None``: without a
        close frame). Sends on the wire fail (the server may have run them,
        so they are not sent again); queued ones wait for the next. Every
        channel's members are gone until its next ``@subscribed``.

        A code from 4500 to 4999 ends the client as :meth:`close` would
        (no retry, every send fails with :class:`ClientClosed`), its
        ``disconnect`` with that code; 4001 is retried at once.
        """
        was_connected = self.connected
        self.connected = False
        self.id = None
        self._connecting_since = self._ping_sent_at = None
        emptied = []
        for channel in self.channels.values():
            channel.subscribed = False
            channel.subscribe_ref = None
            if channel.presence.members:
                channel.presence.members.clear()
                emptied.append(channel)
        unanswered = list(self._pending.values())
        self._pending.clear()
        if self.closed:
            code = protocol.CLOSE_NORMAL  # whatever the server answered, or not
        elif code is None:
            code = CLOSE_ABNORMAL
        actions: list[Action] = []
        terminal = not self.closed and CLOSE_TERMINAL <= code <= 4999
        if terminal:
            # The application ended this client (PROTOCOL.md section 8):
            # as close() would, but reporting the server's code.
            actions += self.close()
        for outgoing in unanswered:
            error = (
                ClientClosed("the client was closed before the server answered")
                if self.closed
                else ConnectionLost(f"the connection closed ({code}) before the server answered")
            )
            actions.append(Settle(outgoing.request, error=error))
        if was_connected:
            if self._clock() - self._connected_at >= STABLE_AFTER:
                self._attempt = 0
                self._rushed = False
            actions.append(Emit(None, ("disconnect",), (code,)))
        elif not self.closed or terminal:
            error = ConnectError(f"the connection closed ({code}) before @connected")
            actions.append(Emit(None, ("error",), (error,)))
        actions += [_sync(channel) for channel in emptied]
        if self.closed:
            return actions
        if code == CLOSE_RECONNECT_NOW and was_connected and not self._rushed:
            # The server asks for a reconnect now (e.g. permissions changed):
            # at once, once; should that fail, or the server ask again before
            # a connection lasted STABLE_AFTER, the backoff goes on as usual.
            self._rushed = True
            actions.append(Retry(0.0))
        else:
            actions.append(self._retry())
        return actions

    # -- helpers ----------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosed("the client is closed")

    def _retry(self, at_least: float | None = None) -> Retry:
        """The next attempt, after full jitter below a doubling ceiling, but
        no sooner than the server's ``Retry-After`` said (up to
        ``max_reconnect_delay``, whatever the server said)."""
        ceiling = min(self.max_reconnect_delay, self.reconnect_delay * 2 ** min(self._attempt, 32))
        self._attempt += 1
        floor = min(at_least or 0.0, self.max_reconnect_delay)
        return Retry(max(self._random() * ceiling, floor))

    def _transmit(self, outgoing: _Outgoing) -> Send:
        self._pending[outgoing.ref] = outgoing
        return Send(outgoing.text, outgoing.ref)

    def _subscribe(self, channel: ChannelState) -> list[Action]:
        if channel.subscribe_ref is not None:
            return []  # one is on its way
        channel.subscribe_ref = next(self._refs)
        frame: dict[str, Any] = {
            "channel": channel.name, "event": protocol.SUBSCRIBE, "ref": channel.subscribe_ref
        }
        if channel.epoch is not None:
            frame["data"] = {"since": channel.seq, "epoch": channel.epoch}
        return [Send(protocol.dumps(frame))]

    def _on_connected(self, data: dict[str, Any]) -> list[Action]:
        if self.closed:
            return []
        self.id = data["id"]
        self.connected = True
        self._connecting_since = None
        self._connected_at = self._clock()
        actions: list[Action] = []
        for channel in self.channels.values():
            if channel.wanted:
                actions += self._subscribe(channel)
        # Subscribes first, then what waited, in the order it was sent.
        while self._queue:
            actions.append(self._transmit(self._queue.popleft()))
        actions.append(Emit(None, ("connect",), ()))
        return actions

    def _answered_send(self, ref: Any) -> Any:
        outgoing = self._pending.pop(ref, None) if isinstance(ref, int) else None
        return None if outgoing is None else outgoing.request

    def _answered_subscribe(self, name: str | None, ref: Any) -> ChannelState | None:
        """The channel whose ``@subscribe`` this answers, if it is still held."""
        channel = self.channels.get(name) if name is not None else None
        if channel is None or ref is None or channel.subscribe_ref != ref:
            return None  # unsubscribed meanwhile, or an answer we did not ask for
        channel.subscribe_ref = None
        return channel

    def _on_error(self, error: ReplyError, ref: Any) -> list[Action]:
        request = self._answered_send(ref)
        if request is not None:
            return [Settle(request, error=error)]
        actions: list[Action] = []
        refused = self._answered_subscribe(error.channel, ref)
        if refused is not None:
            # Refused for good, until subscribe() asks again; but a
            # subscribe that was only rate limited is tried on the next connect.
            refused.wanted = error.code in _RETRIED_REFUSALS
            actions.append(Emit(refused, (protocol.ERROR,), (error,)))
        actions.append(Emit(None, ("error",), (error,)))
        return actions

    def _on_subscribed(
        self, channel: ChannelState, subscribed: Subscribed, members: list[Member] | None
    ) -> list[Action]:
        channel.subscribed = True
        if not subscribed.recovered:
            # Nothing replayed: new messages follow this seq. When recovered,
            # the replay that follows moves seq on by itself.
            channel.seq = subscribed.seq
        channel.epoch = subscribed.epoch
        actions: list[Action] = [Emit(channel, (protocol.SUBSCRIBED,), (subscribed,))]
        # The snapshot replaces the members, never merged with an older list.
        # A channel without presence has none (and no sync, unless some left).
        had_members = bool(channel.presence.members)
        channel.has_presence = members is not None
        channel.presence.members.clear()
        for member in members or ():
            channel.presence.members[member.id] = member
        if members is not None or had_members:
            actions.append(_sync(channel))
        return actions

    def _on_presence_change(self, name: str | None, event: str, member: Member) -> list[Action]:
        """An ``@join`` or ``@leave``: one member more or less. The protocol
        sends no member twice and none it did not list; should one come, it
        changes nothing."""
        channel = self.channels.get(name) if name is not None else None
        if channel is None or not channel.subscribed or not channel.has_presence:
            return []  # left, not answered yet (the snapshot will count), or no presence
        members = channel.presence.members
        if event == protocol.JOIN:
            if member.id in members:
                return []
            members[member.id] = member
        else:
            gone = members.pop(member.id, None)
            if gone is None:
                return []
            member = gone  # the very object its join gave
        return [Emit(channel, (event,), (member,)), _sync(channel)]

    def _on_unsubscribed_by_server(self, name: str | None, unsubscribed: Unsubscribed) -> list[Action]:
        """The server removed this connection from the channel (PROTOCOL.md
        section 8): the subscription ends for good, as :meth:`unsubscribe`
        would, but its handlers hear why (and nothing is sent back)."""
        channel = self.channels.get(name) if name is not None else None
        if channel is None or not channel.subscribed:
            # Left already, or about a subscription before the @subscribe
            # now on its way, which the server answers by itself.
            return []
        del self.channels[channel.name]
        had_members = bool(channel.presence.members)
        self._end(channel)
        actions: list[Action] = [Emit(channel, (protocol.UNSUBSCRIBED,), (unsubscribed,))]
        if had_members:
            actions.append(_sync(channel))
        return actions

    def _end(self, channel: ChannelState) -> None:
        """The channel's subscription is over, not to be asked for again."""
        channel.subscribed = False
        channel.wanted = False
        channel.subscribe_ref = None
        channel.has_presence = False
        channel.presence.members.clear()

    def _on_history_lost(self, name: str | None, subscribed: Subscribed) -> list[Action]:
        """An ``@subscribed`` without ``ref``: the channel's history was lost
        under a subscription (PROTOCOL.md section 6). Its new epoch and the
        seq the next broadcast follows replace the channel's, and the
        application hears it, so that it reloads that channel's state."""
        channel = self.channels.get(name) if name is not None else None
        if channel is None or not _started(channel) or subscribed.recovered:
            return []  # a channel left or not asked for; nothing was lost
        channel.seq = subscribed.seq
        channel.epoch = subscribed.epoch
        return [Emit(channel, (protocol.SUBSCRIBED,), (subscribed,))]

    def _on_message(self, message: ReceivedMessage) -> list[Action]:
        channel = self.channels.get(message.channel) if message.channel is not None else None
        if channel is not None:
            if message.seq is not None:
                channel.seq = message.seq
            names = (EVERY_EVENT,) if message.event == EVERY_EVENT else (EVERY_EVENT, message.event)
            return [Emit(channel, names, (message,))]
        if message.seq is None:  # to this connection alone
            return [Emit(None, ("message",), (message,))]
        return []  # a broadcast on a channel just left


def _sync(channel: ChannelState) -> Emit:
    """The ``sync`` of a channel's presence, with its whole member list."""
    return Emit(channel, ("@sync",), (list(channel.presence.members.values()),))


def is_channel_event(name: Any) -> bool:
    """Whether a channel handler may be registered for ``name``: an
    application event name (``"message"`` for all of them) or one of
    :data:`CHANNEL_EVENTS`."""
    return name in CHANNEL_EVENTS or protocol.is_valid_event(name)


def _position(since: Any, epoch: Any) -> tuple[int, str] | None:
    """A saved position, checked: ``None`` when neither is given.

    Both or neither: a ``seq`` means nothing without its epoch (the same seq
    in two epochs is two different messages), and the protocol's own
    clients always send the epoch (PROTOCOL.md section 6).
    """
    if since is None and epoch is None:
        return None
    if since is None or epoch is None:
        raise ValueError("since and epoch go together: pass both (a channel's seq and epoch) or neither")
    if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= _MAX_SEQ:
        raise ValueError(f"since must be a seq, an integer from 0, got {since!r}")
    if not isinstance(epoch, str) or not epoch:
        raise ValueError(f"epoch must be the epoch a @subscribed named, a string, got {epoch!r}")
    return since, epoch


def _started(channel: ChannelState) -> bool:
    """Whether the channel's ``@subscribe`` went out on this connection."""
    return channel.subscribed or channel.subscribe_ref is not None


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header; ``None`` when absent or not
    a number of seconds."""
    if value is None or _SECONDS.fullmatch(value) is None:
        return None
    seconds = float(value)
    return seconds if seconds < float("inf") else None  # hundreds of digits


def error_name(body: bytes) -> str | None:
    """The ``error`` of a refusal's JSON body, e.g. ``"ticket_used"``."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    return error if isinstance(error, str) else None
