"""Channel membership in this worker, and the handle ``sockets["chat"]``."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from . import protocol

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("flask_robe_sockets")


class Hub:
    """Which local connections are on which channel.

    A connection joins in two steps so that recovery has no gap and no
    duplicate at the seam: ``begin_join`` starts buffering the channel's live
    broadcasts for it, the caller reads the history and sends the replay,
    then ``end_join`` hands over the buffered broadcasts the replay did not
    cover and makes it a member.
    """

    def __init__(self, on_first: Callable[[str], None], on_last: Callable[[str], None]) -> None:
        self.members: dict[str, set[Connection]] = {}
        self._joining: dict[str, dict[Connection, list[tuple[int, bytes]]]] = {}
        self._on_first = on_first
        self._on_last = on_last

    def _in_use(self, channel: str) -> bool:
        return channel in self.members or channel in self._joining

    def begin_join(self, conn: "Connection", channel: str) -> None:
        first = not self._in_use(channel)
        self._joining.setdefault(channel, {})[conn] = []
        if first:
            self._on_first(channel)

    def end_join(self, conn: "Connection", channel: str, last_seq: int) -> None:
        """Finish a join; ``last_seq`` is the newest broadcast already sent."""
        joining = self._joining.get(channel)
        pending = joining.pop(conn, None) if joining else None
        if joining is not None and not joining:
            del self._joining[channel]
        if pending is None:  # it left (or disconnected) while joining
            return
        for seq, frame in pending:
            if seq > last_seq:
                conn.push(frame)
        self.members.setdefault(channel, set()).add(conn)

    def leave(self, conn: "Connection", channel: str) -> None:
        removed = False
        members = self.members.get(channel)
        if members is not None and conn in members:
            removed = True
            members.discard(conn)
            if not members:
                del self.members[channel]
        joining = self._joining.get(channel)
        if joining is not None and conn in joining:
            removed = True
            del joining[conn]
            if not joining:
                del self._joining[channel]
        if removed and not self._in_use(channel):
            self._on_last(channel)

    def deliver(self, channel: str, seq: int, frame: bytes) -> None:
        """Queue one ready frame for every local member of ``channel``."""
        members = self.members.get(channel)
        if members:
            # A copy: a member that overflows leaves the set during the loop.
            for conn in tuple(members):
                try:
                    conn.push(frame)
                except Exception:  # one broken connection must not cost the others
                    log.exception("could not queue a broadcast on %r for %s", channel, conn)
        joining = self._joining.get(channel)
        if joining:
            for buffer in tuple(joining.values()):
                buffer.append((seq, frame))


class Channel:
    """A channel of the application, as returned by ``sockets["chat"]``."""

    def __init__(self, name: str, publish: Callable[[str, str, Any], int]) -> None:
        if not protocol.is_valid_channel(name):
            raise ValueError(
                f"invalid channel name {name!r}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /"
            )
        self.name = name
        self._publish = publish

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
