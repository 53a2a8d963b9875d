"""Presence (PROTOCOL.md section 7): who is subscribed to a channel, on every worker.

:class:`Member` and :class:`Presence` are what the application and the wire
see. :class:`Roster` is this worker's side: it joins and leaves its
connections through the backend, which keeps the members of every worker and
numbers each change (the channel's presence *version*), and it keeps, per
channel with local members, a *view*: the members as this worker has
delivered them. A view starts from the backend's snapshot at version V and
applies each event above V in order, at the moment the event is handed to the
local members, so a ``@presence`` answer read from it is exactly what those
members' own snapshot plus events say.

A joiner gets the backend's snapshot at its own join's version V; the hub
buffers the presence events that arrive while it joins, with their version,
and hands over only those above V (``Hub.end_join``), as it does for
recovery's broadcasts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import protocol
from .backends import Backend
from .channels import Hub, Subscriber
from .frames import ws_frame

log = logging.getLogger("flask_robe_sockets")


@dataclass(frozen=True)
class Member:
    """One connection subscribed to a presence channel."""

    #: The connection's id.
    id: str
    #: The ticket's identity, or ``None``.
    identity: Any
    #: What ``presence_info`` said for that connection on that channel, or ``None``.
    info: Any

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"id": ..., "identity": ..., "info": ...}``."""
        return {"id": self.id, "identity": self.identity, "info": self.info}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Member":
        return cls(value["id"], value.get("identity"), value.get("info"))


@dataclass(frozen=True)
class Presence:
    """A channel's members: ``members``, ``clients`` (how many) and ``users``
    (how many distinct non-null identities: two tabs of one user count once)."""

    members: tuple[Member, ...]
    clients: int
    users: int

    @classmethod
    def of(cls, members: Iterable[Member]) -> "Presence":
        members = tuple(members)
        users = len({_hashable(m.identity) for m in members if m.identity is not None})
        return cls(members, len(members), users)

    @classmethod
    def from_dicts(cls, members: Iterable[dict[str, Any]]) -> "Presence":
        return cls.of(Member.from_dict(m) for m in members)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"members": [...], "clients": n, "users": u}``."""
        return {"members": [m.to_dict() for m in self.members], "clients": self.clients, "users": self.users}


def _hashable(identity: Any) -> Any:
    # Identities are JSON: a dict or list identity is counted by its encoding.
    return identity if isinstance(identity, (str, int, float, bool)) else json.dumps(identity, sort_keys=True)


def matches(patterns: tuple[str, ...], channel: str) -> bool:
    """Whether ``channel`` is named by ``patterns`` (names, or prefixes ending in ``*``)."""
    return any(p == channel or (p.endswith("*") and channel.startswith(p[:-1])) for p in patterns)


class _View:
    """This worker's picture of one channel's members."""

    __slots__ = ("members", "version", "pending", "users", "identities", "stale")

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        #: ``None`` until the first snapshot arrived; events meanwhile wait in ``pending``.
        self.version: int | None = None
        self.pending: list[tuple[int, str, dict[str, Any]]] = []
        #: Local presence members plus joins under way: the view goes at 0.
        self.users = 0
        #: How many members each non-null identity has: the wire form's
        #: ``users`` without a pass over every member at each join.
        self.identities: dict[Any, int] = {}
        #: Set while events may be missing (a resync could not read the
        #: backend): a joiner must not take the view as it is.
        self.stale = False

    def apply(self, version: int, event: str, member: dict[str, Any]) -> None:
        if self.version is None:
            self.pending.append((version, event, member))
            return
        if version <= self.version:
            return
        self.version = version
        self._remove(member["id"])
        if event == protocol.JOIN:
            self.members[member["id"]] = member
            self._count(member, 1)

    def start(self, version: int, members: list[dict[str, Any]]) -> None:
        if self.version is not None:
            return
        self.reset(version, members)
        pending, self.pending = self.pending, []
        for args in pending:
            self.apply(*args)

    def reset(self, version: int, members: list[dict[str, Any]]) -> None:
        self.version = version
        self.members = {m["id"]: m for m in members}
        self.identities = {}
        for member in self.members.values():
            self._count(member, 1)

    def wire(self) -> dict[str, Any]:
        """The members in the wire form, as a snapshot of ``version``."""
        return {"members": list(self.members.values()), "clients": len(self.members), "users": len(self.identities)}

    def _remove(self, member_id: str) -> None:
        old = self.members.pop(member_id, None)
        if old is not None:
            self._count(old, -1)

    def _count(self, member: dict[str, Any], n: int) -> None:
        identity = member.get("identity")
        if identity is None:
            return
        key = _hashable(identity)
        left = self.identities.get(key, 0) + n
        if left:
            self.identities[key] = left
        else:
            del self.identities[key]


class Roster:
    """This worker's presence: its members' joins and leaves, and its views.

    :param patterns: the channels with presence (ROBE_SOCKETS_PRESENCE).
    :param worker_id: this worker's id, as its heartbeat reports it, so that
        a surviving worker can remove the members of one that died.
    :param greenlets: whether events and joins run as greenlets of one
        thread (gevent), so that nothing changes a view while a joiner reads
        it; with threads every joiner reads the backend's snapshot.
    """

    def __init__(
        self, backend: Backend, hub: Hub, patterns: tuple[str, ...], worker_id: Callable[[], str],
        greenlets: bool = True,
    ) -> None:
        self._backend = backend
        self._hub = hub
        self._patterns = tuple(patterns)
        self._worker_id = worker_id
        #: Each local member's wire form and the worker id it joined with,
        #: per presence channel.
        self._local: dict[str, dict[Subscriber, tuple[dict[str, Any], str]]] = {}
        self._views: dict[str, _View] = {}
        self._greenlets = greenlets
        backend.start_presence(self.on_event, self.resync)

    def enabled(self, channel: str) -> bool:
        return bool(self._patterns) and matches(self._patterns, channel)

    def join(self, subscriber: Subscriber, channel: str, member: dict[str, Any],
             still_on: Callable[[], bool]) -> tuple[int, dict[str, Any]]:
        """Make ``subscriber`` a member; return the version of its snapshot
        (at or after its join) and the snapshot (the wire form).

        The first member on this worker reads the snapshot from the backend;
        the others take this worker's view, which the backend has brought up
        to their join by the time it returns (reading and decoding the
        snapshot of 1,000 members took 2.5 ms of the worker at every join).

        :raises BackendUnavailable: the backend could not record it.
        """
        view = self._views.get(channel)
        if view is None:
            view = self._views[channel] = _View()
        view.users += 1
        worker_id = self._worker_id()
        try:
            if view.stale:
                self.resync(channel)
            version, members = self._backend.presence_join(
                channel, member, worker_id, snapshot=view.version is None or not self._greenlets
            )
        except BaseException:
            self._release(channel, view)
            raise
        if members is None:
            # The backend handed over every event up to the join: the view
            # is at its version or later, and the joiner takes it from there.
            version, snapshot = view.version, view.wire()
        else:
            view.start(version, members)
            snapshot = Presence.from_dicts(members).to_dict()
        if still_on():
            self._local.setdefault(channel, {})[subscriber] = (member, worker_id)
        else:
            # It left (or closed) while the backend recorded the join: its
            # leave found nothing to remove, so it is removed now.
            self._release(channel, view)
            self._leave(channel, member, worker_id)
        return version, snapshot

    def leave(self, subscriber: Subscriber, channel: str) -> None:
        """The hub took ``subscriber`` off ``channel``: if it was a member, it leaves."""
        local = self._local.get(channel)
        if local is None:
            return
        entry = local.pop(subscriber, None)
        if entry is None:
            return
        if not local:
            del self._local[channel]
        view = self._views.get(channel)
        if view is not None:
            self._release(channel, view)
        self._leave(channel, *entry)

    def _leave(self, channel: str, member: dict[str, Any], worker_id: str) -> None:
        try:
            self._backend.presence_leave(channel, member["id"], worker_id)
        except Exception:
            log.exception("could not record that %s left %r", member["id"], channel)

    def forget(self, channel: str) -> None:
        """The worker stopped listening to ``channel``: its view can follow it
        no more (a join still under way keeps its own, and undoes itself)."""
        self._views.pop(channel, None)

    def _release(self, channel: str, view: _View) -> None:
        view.users -= 1
        if view.users <= 0 and self._views.get(channel) is view:
            del self._views[channel]

    def lost(self) -> list[Subscriber]:
        """This worker's members that the backend no longer lists: a sweep
        took this worker for dead (frozen past the timeout), or the backend
        lost them. Their leave was announced; they must connect again to be
        members again.

        :raises BackendUnavailable: the backend could not be asked.
        """
        lost = []
        for channel, local in list(self._local.items()):
            entries = list(local.items())
            missing = set(self._backend.presence_missing(channel, [member["id"] for member, _ in local.values()]))
            for subscriber, entry in entries:
                # Only those still members here after the answer: one that
                # left meanwhile was simply removed by its own leave.
                if entry[0]["id"] in missing and self._local.get(channel, {}).get(subscriber) is entry:
                    lost.append(subscriber)
        return lost

    def view(self, channel: str) -> dict[str, Any]:
        """The members as this worker delivered them (the wire form), for ``@presence``."""
        view = self._views.get(channel)
        return view.wire() if view is not None else Presence.of(()).to_dict()

    def presence(self, channel: str) -> Presence:
        """Every worker's members of ``channel``, from the backend."""
        return Presence.from_dicts(self._backend.presence(channel))

    def on_event(self, channel: str, version: int, event: str, member: dict[str, Any], frame: bytes) -> None:
        """The backend's delivery of one ``@join`` or ``@leave`` (in version order)."""
        view = self._views.get(channel)
        if view is not None:
            if view.version is not None and version <= view.version:
                return  # already in the view (a resync's snapshot): its members had it
            view.apply(version, event, member)
        self._hub.deliver_presence(channel, version, member["id"], frame)

    def resync(self, channel: str) -> None:
        """Events of ``channel`` may have been lost (the backend was out of
        reach): read its members and version, and hand this worker's members
        the difference as ``@leave``s and ``@join``s, so their views stay exact."""
        view = self._views.get(channel)
        if view is None or view.version is None:
            return
        view.stale = True
        version, members = self._backend.presence_snapshot(channel)
        view.stale = False
        if version == view.version:
            return
        # Newer: events were lost. Older: the backend lost its data (a Redis
        # restarted without persistence numbers from 0 again).
        current = {m["id"]: m for m in members}
        changes = [(protocol.LEAVE, m) for i, m in view.members.items() if current.get(i) != m]
        changes += [(protocol.JOIN, m) for i, m in current.items() if view.members.get(i) != m]
        view.reset(version, members)
        if changes:
            log.warning("presence events of %r were lost meanwhile: sent %d as a difference", channel, len(changes))
        for event, member in changes:
            frame = ws_frame(protocol.encode(event, member, channel))
            self._hub.deliver_presence(channel, version, member["id"], frame)
