"""The interface every backend implements.

A backend numbers and stores broadcasts and carries them to every worker.
Channel membership itself stays in each worker's memory (``channels.Hub``):
the backend is told when a worker's first member of a channel joins
(``subscribe``) and when its last one leaves (``unsubscribe``), so that a
worker only hears about channels its own clients care about.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigurationError

#: ``deliver(channel, seq, frame)``: hand a ready WebSocket frame to the
#: local members of ``channel``.
Deliver = Callable[[str, int, bytes], None]
#: ``on_event(channel, version, event, member, frame)``: a presence event
#: (``@join`` or ``@leave``) with the member's wire form and the ready frame.
PresenceEvent = Callable[[str, int, str, "dict[str, Any]", bytes], None]
#: ``on_control(command)``: apply a command of the application (a JSON
#: object, ``control.Command.to_dict()``) to this worker's connections.
OnControl = Callable[[dict[str, Any]], None]


@dataclass
class Recovery:
    """What ``@subscribed`` answers, and the broadcasts to replay first."""

    recovered: bool
    seq: int
    epoch: str
    #: ``(seq, frame)`` pairs, oldest first.
    frames: list[tuple[int, bytes]] = field(default_factory=list)


class Backend:
    """Base class; see the module docstring."""

    #: Whether other processes see this backend's state: its channels,
    #: history and workers (Redis), or only this process (memory).
    shared = False

    def start(self, deliver: Deliver) -> None:
        """Begin delivering broadcasts of subscribed channels to ``deliver``."""
        raise NotImplementedError

    def publish(self, channel: str, event: str, data: Any) -> int:
        """Broadcast to every worker; return the message's ``seq``.

        :raises BackendUnavailable: when the message could not be handed over.
        """
        raise NotImplementedError

    def subscribe(self, channel: str) -> None:
        """This worker's first member of ``channel`` joined."""

    def unsubscribe(self, channel: str) -> None:
        """This worker's last member of ``channel`` left."""

    def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        """The channel's position, and the broadcasts after ``since`` if all are kept."""
        raise NotImplementedError

    def claim_nonce(self, nonce: str, ttl: float) -> bool:
        """Mark a ticket nonce used; ``False`` when it already was."""
        raise NotImplementedError

    def announce(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        """Report this worker alive, with ``info`` (JSON values), for ``ttl`` seconds.

        Each serving worker calls it every third of ``ttl``. A worker not
        heard of for ``ttl`` is gone: ``workers`` leaves it out, and a
        backend keeps its id (see ``workers``) so that what it held for its
        connections can be found and let go.

        :raises BackendUnavailable: the report did not reach the backend.
        """

    def retire(self, worker_id: str) -> None:
        """This worker stops, its connections closed: ``workers`` leaves it out
        at once, and any member still recorded for it (a leave that failed)
        leaves now, as a sweep (``sweep_presence``) would remove it.

        :raises BackendUnavailable: the backend could not be told.
        """

    def workers(self) -> list[dict[str, Any]]:
        """The workers alive on this backend: each report's ``info`` with its
        ``id`` and ``age`` (seconds since that report), oldest worker first.

        :raises BackendUnavailable: the backend could not be asked.
        """
        return []

    # -- the application's commands to connections (PROTOCOL.md section 8) --

    def control(self, command: dict[str, Any]) -> None:
        """Hand ``command`` (a JSON object) to every worker listening on this
        backend, this process included, within a second.

        :raises BackendUnavailable: the command could not be handed over.
        """
        raise NotImplementedError

    def listen_control(self, on_control: OnControl) -> None:
        """From now on, call ``on_control`` with every command sent with
        ``control`` (by any process sharing the backend); safe to repeat. A
        backend that carries no commands hears none."""

    # -- presence (PROTOCOL.md section 7) ------------------------------------

    def start_presence(self, on_event: PresenceEvent, on_resync: Callable[[str], None] | None = None) -> None:
        """Hand every ``@join`` and ``@leave`` of the channels this worker
        listens to, on every worker, to ``on_event``, in version order; when
        some may have been lost (the backend was out of reach), call
        ``on_resync(channel)`` for each channel listened to, before any later event."""
        self._on_presence = on_event
        self._on_presence_resync = on_resync

    def presence_snapshot(self, channel: str) -> tuple[int, list[dict[str, Any]]]:
        """The channel's presence version and its members at that version, read together."""
        raise ConfigurationError(f"presence needs the memory or the Redis backend, not {type(self).__name__}")

    def presence_join(
        self, channel: str, member: dict[str, Any], worker_id: str, snapshot: bool = True
    ) -> tuple[int, list[dict[str, Any]] | None]:
        """Add ``member`` (its wire form), held by ``worker_id``, to ``channel``
        and announce its ``@join``, atomically; return the join's version and,
        with ``snapshot``, the members at that version, ``member`` included
        (else ``None``).

        Return only once every event of ``channel`` up to the join's version
        has been handed to ``on_event`` (when this worker listens to it): a
        joiner that asks for no snapshot takes this worker's view, which must
        then be up to its join.

        :raises BackendUnavailable: the join was not recorded.
        """
        raise ConfigurationError(f"presence needs the memory or the Redis backend, not {type(self).__name__}")

    def presence_leave(self, channel: str, member_id: str, worker_id: str) -> None:
        """Remove a member and announce its ``@leave``, atomically; nothing if it is not one."""

    def presence(self, channel: str) -> list[dict[str, Any]]:
        """Every worker's members of ``channel``, in their wire form."""
        return []

    def presence_missing(self, channel: str, member_ids: list[str]) -> list[str]:
        """Which of ``member_ids`` are no longer members of ``channel`` (removed
        by another worker's sweep, or lost by the backend)."""
        return []

    def sweep_presence(self, timeout: float, worker_ttl: float) -> int:
        """Remove the members of workers silent for ``timeout`` seconds,
        announcing a ``@leave`` for each, each dead worker by exactly one
        caller; return how many were removed."""
        return 0

    def close(self) -> None:
        """Release connections and background tasks."""
