"""The message a server-side handler receives.

The Python client's handlers receive another class, for events that come
the other way: :class:`flask_robe_sockets.client.ReceivedMessage`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Message:
    """An event a client sent on a channel.

    It is plain data so that it can be handed to a background job with
    :meth:`to_dict` and rebuilt there with :meth:`from_dict`.
    """

    channel: str
    event: str
    data: Any = None
    ref: str | int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Message":
        return cls(
            channel=value["channel"],
            event=value["event"],
            data=value.get("data"),
            ref=value.get("ref"),
        )
