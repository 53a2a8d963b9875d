"""Channel membership in this worker, and the handle ``sockets["chat"]``."""
from __future__ import annotations

import logging
from typing import Any, Callable, Hashable, Protocol

from . import protocol
from .metrics import NULL, Metrics

log = logging.getLogger("flask_robe_sockets")


class Subscriber(Hashable, Protocol):
    """What the hub delivers to: a connection's session."""

    id: str

    def push(self, frame: bytes) -> None: ...


class Hub:
    """Which local subscribers are on which channel, indexed both ways.

    The hub is the one owner of membership: nothing else keeps a copy of who
    is on a channel or of a subscriber's channels.

    A subscriber joins in two steps so that recovery has no gap and no
    duplicate at the seam: ``begin_join`` starts buffering the channel's live
    broadcasts for it, the caller reads the history and sends the replay,
    then ``end_join`` hands over the buffered broadcasts the replay did not
    cover and makes it a member. From ``begin_join`` on the channel counts
    among its channels.

    Presence events (``deliver_presence``) wait in the same buffer with their
    presence version, and ``end_join`` hands over those above the version of
    the joiner's snapshot.

    :param metrics: told of each broadcast with its number of members.
    :param on_leave: called with each subscriber taken off a channel it was
        on or joining, whatever took it off (presence's one seam for leaves).
    """

    def __init__(
        self, on_first: Callable[[str], None], on_last: Callable[[str], None], metrics: Metrics = NULL,
        on_leave: Callable[[Subscriber, str], None] | None = None,
    ) -> None:
        self._members: dict[str, set[Subscriber]] = {}
        #: Per joiner, what arrived meanwhile: ``(seq, 0, frame)`` for a
        #: broadcast, ``(0, version, frame)`` for a presence event.
        self._joining: dict[str, dict[Subscriber, list[tuple[int, int, bytes]]]] = {}
        self._channels: dict[Subscriber, set[str]] = {}
        self._on_first = on_first
        self._on_last = on_last
        self._metrics = metrics
        self.on_leave = on_leave

    def _in_use(self, channel: str) -> bool:
        return channel in self._members or channel in self._joining

    def channels_of(self, subscriber: Subscriber) -> frozenset[str]:
        """The channels ``subscriber`` is on, or joining."""
        return frozenset(self._channels.get(subscriber, ()))

    def has(self, subscriber: Subscriber, channel: str) -> bool:
        """Whether ``subscriber`` is on ``channel``, or joining it."""
        channels = self._channels.get(subscriber)
        return channels is not None and channel in channels

    def member_counts(self) -> dict[str, int]:
        """Members per channel with any, joins under way not counted."""
        return {channel: len(members) for channel, members in self._members.items()}

    def channel_count(self) -> int:
        """How many channels have local members."""
        return len(self._members)

    def joins_under_way(self) -> list[str]:
        """Channels someone is joining right now."""
        return sorted(self._joining)

    def begin_join(self, subscriber: Subscriber, channel: str) -> None:
        first = not self._in_use(channel)
        self._joining.setdefault(channel, {})[subscriber] = []
        self._channels.setdefault(subscriber, set()).add(channel)
        if first:
            self._on_first(channel)

    def end_join(
        self, subscriber: Subscriber, channel: str, last_seq: int, presence_version: int | None = None
    ) -> None:
        """Finish a join; ``last_seq`` is the newest broadcast already sent,
        ``presence_version`` the version of the presence snapshot sent (none:
        every presence event that arrived meanwhile is dropped)."""
        joining = self._joining.get(channel)
        pending = joining.pop(subscriber, None) if joining else None
        if joining is not None and not joining:
            del self._joining[channel]
        if pending is None:  # it left (or disconnected) while joining
            return
        for seq, version, frame in pending:
            if version:
                if presence_version is not None and version > presence_version:
                    subscriber.push(frame)
            elif seq > last_seq:
                subscriber.push(frame)
        self._members.setdefault(channel, set()).add(subscriber)

    def leave(self, subscriber: Subscriber, channel: str) -> None:
        """Take ``subscriber`` off ``channel`` (or out of its join); safe to repeat."""
        channels = self._channels.get(subscriber)
        if channels is None or channel not in channels:
            return
        channels.discard(channel)
        if not channels:
            del self._channels[subscriber]
        members = self._members.get(channel)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._members[channel]
        joining = self._joining.get(channel)
        if joining is not None:
            joining.pop(subscriber, None)
            if not joining:
                del self._joining[channel]
        if self.on_leave is not None:
            self.on_leave(subscriber, channel)
        if not self._in_use(channel):
            self._on_last(channel)

    def leave_all(self, subscriber: Subscriber) -> None:
        """Take ``subscriber`` off every channel at once, e.g. when it closes."""
        for channel in tuple(self._channels.get(subscriber, ())):
            self.leave(subscriber, channel)

    def deliver(self, channel: str, seq: int, frame: bytes) -> None:
        """Queue one ready frame for every local member of ``channel``."""
        members = self._members.get(channel)
        if members:
            # Counted once for all members: per member would cost every delivery.
            self._metrics.broadcast(len(members))
            # A copy: a member whose queue overflows closes, and so leaves
            # this very set (hub.leave_all) while the loop runs.
            for subscriber in tuple(members):
                try:
                    subscriber.push(frame)
                except Exception:  # one broken connection must not cost the others
                    log.exception("could not queue a broadcast on %r for %s", channel, subscriber)
        joining = self._joining.get(channel)
        if joining:
            for buffer in tuple(joining.values()):
                buffer.append((seq, 0, frame))

    def deliver_presence(self, channel: str, version: int, member_id: str, frame: bytes) -> None:
        """Queue a ``@join`` or ``@leave`` for every local member of ``channel``
        but the member it is about; joiners get it at ``end_join`` if newer
        than their snapshot."""
        members = self._members.get(channel)
        if members:
            for subscriber in tuple(members):
                if subscriber.id == member_id:
                    continue
                try:
                    subscriber.push(frame)
                except Exception:
                    log.exception("could not queue a presence event on %r for %s", channel, subscriber)
        joining = self._joining.get(channel)
        if joining:
            for buffer in tuple(joining.values()):
                buffer.append((0, version, frame))


class Channel:
    """A channel of the application, as returned by ``sockets["chat"]``."""

    def __init__(
        self, name: str, publish: Callable[[str, str, Any], int], presence: Callable[[str], Any] | None = None
    ) -> None:
        if not protocol.is_valid_channel(name):
            raise ValueError(
                f"invalid channel name {name!r}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /"
            )
        self.name = name
        self._publish = publish
        self._presence = presence

    def __repr__(self) -> str:
        return f"<Channel {self.name!r}>"

    def send(self, event: str, data: Any = None, /, **fields: Any) -> int:
        """Broadcast ``event`` to every subscriber, on every worker.

        ``data`` is any JSON value; keyword arguments build a dict instead:
        ``send("message", text="hi")`` sends ``{"text": "hi"}``.
        Returns the broadcast's ``seq``.

        :raises BackendUnavailable: the backend could not take the message.
        """
        if data is not None and fields:
            raise TypeError("pass data either positionally or as keyword arguments, not both")
        if not protocol.is_valid_event(event):
            raise ValueError(
                f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'"
            )
        return self._publish(self.name, event, fields if fields else data)

    def presence(self) -> Any:
        """The channel's members on every worker, as a ``Presence`` (``members``,
        ``clients``, ``users``); empty on a channel without presence.

        :raises BackendUnavailable: the backend could not be asked.
        """
        if self._presence is None:
            raise TypeError("this channel handle cannot list members")
        return self._presence(self.name)
