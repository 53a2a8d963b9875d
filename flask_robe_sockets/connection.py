"""A client connection, as handlers and hooks see it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import protocol

if TYPE_CHECKING:
    from .channels import Hub
    from .session import Session


class Connection:
    """A client connected to the socket endpoint.

    Handlers and hooks receive it. It is a narrow view of the connection's
    machinery (the private session, which owns the queue and the socket):
    who it is, where its channels are, and the two things an application
    does to it, ``send`` and ``close``. ``metadata`` is a dict for the
    application's own per-connection state; the library never reads it.
    """

    # An idle connection's whole budget is a few kilobytes.
    __slots__ = ("_session", "_hub", "metadata", "__weakref__")

    def __init__(self, session: "Session", hub: "Hub") -> None:
        self._session = session
        self._hub = hub
        #: Free for the application's use.
        self.metadata: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Connection {self.id} identity={self.identity!r}>"

    @property
    def id(self) -> str:
        """Unique id, also sent to the client in ``@connected``."""
        return self._session.id

    @property
    def identity(self) -> Any:
        """What the ticket's identity loader returned (``None`` without one)."""
        return self._session.identity

    @property
    def remote_addr(self) -> str | None:
        """The client's IP address as Flask saw it."""
        return self._session.remote_addr

    @property
    def channels(self) -> frozenset[str]:
        """Names of the channels this connection is subscribed to."""
        return self._hub.channels_of(self._session)

    @property
    def open(self) -> bool:
        """Whether messages sent to this connection can still reach it."""
        return self._session.open

    def send(self, event: str, data: Any = None, channel: str | None = None) -> None:
        """Send an event to this connection alone (no ``seq``).

        :param channel: the channel to name in the frame, or ``None`` for a
            connection-level message.
        """
        if channel is not None and not protocol.is_valid_channel(channel):
            raise ValueError(f"invalid channel name {channel!r}")
        if not protocol.is_valid_event(event):
            raise ValueError(f"invalid event name {event!r}: 1 to 64 characters, not starting with '@'")
        self._session.answer(event, data, channel)

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        """Close the connection: queued messages are written, then the close frame.

        :param code: 1000 (normal) or another code a peer may send: 1001 to
            1014 (not 1004-1006), or 3000 to 4999 for the application's own.
        """
        self._session.close(code, reason)
