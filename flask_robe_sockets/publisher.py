"""Broadcasting from outside the server: background jobs, scripts, shells."""
from __future__ import annotations

from typing import Any

from .backends import Backend, create_backend
from .channels import Channel
from .config import DEFAULTS
from .control import Command, Controls
from .errors import ConfigurationError
from .presence import Presence


class Publisher(Controls):
    """Sends to channels from any Python process, without Flask or sockets.

    ::

        publisher = Publisher.from_url("redis://127.0.0.1:6379/0")
        publisher["chat"].send("message", text="hi")

    Every subscriber on every worker sharing that Redis gets the message, in
    the same order and with the same ``seq`` as if a view had sent it. The
    channel handle is the one ``sockets["chat"]`` returns, so code that only
    sends can take either (a job run in an ``rq worker`` gets a publisher,
    the same job run in the app gets the extension).

    ``publisher.disconnect(identity="alice")`` and
    ``publisher.unsubscribe("room:1", identity="alice")`` act on connections
    of every worker, as ``sockets.disconnect`` and ``sockets.unsubscribe`` do.

    Create one per process and keep it: it holds a connection pool.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def from_url(
        cls,
        url: str,
        history_size: int = DEFAULTS["ROBE_SOCKETS_HISTORY_SIZE"],
        history_ttl: float = DEFAULTS["ROBE_SOCKETS_HISTORY_TTL"],
    ) -> "Publisher":
        """A publisher for the backend at ``url`` (``redis://host:port/db``).

        :param history_size: broadcasts kept per channel for recovery; pass
            the app's ``ROBE_SOCKETS_HISTORY_SIZE`` when it is not the default.
        :param history_ttl: seconds they stay recoverable, the app's
            ``ROBE_SOCKETS_HISTORY_TTL``.
        """
        if url.split("://", 1)[0].lower() == "memory":
            raise ConfigurationError(
                "a Publisher in another process needs the app's Redis URL: an in-memory"
                " backend reaches nobody outside its own process"
            )
        return cls(create_backend(url, history_size=history_size, history_ttl=history_ttl))

    def __repr__(self) -> str:
        return f"<Publisher {self.backend!r}>"

    def __getitem__(self, name: str) -> Channel:
        """The channel ``name``, to ``send`` to (or list its ``presence()``)."""
        return Channel(name, self.backend.publish, self._presence)

    def _presence(self, channel: str) -> Presence:
        return Presence.from_dicts(self.backend.presence(channel))

    def send(self, channel: str, event: str, data: Any = None) -> int:
        """Broadcast ``event`` with ``data`` to ``channel``; returns its ``seq``.

        :raises BackendUnavailable: the backend could not take the message.
        """
        return self[channel].send(event, data)

    def _send_control(self, command: Command) -> None:
        self.backend.control(command.to_dict())

    def close(self) -> None:
        """Release the backend's connections."""
        self.backend.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
