"""The application's commands to connections (PROTOCOL.md section 8).

``sockets.disconnect(identity="alice")`` or ``publisher.unsubscribe("room:1",
connection_id="Xy1")`` builds a :class:`Command` here, checked where it is
called, and hands it to the backend as JSON; every worker sharing that backend
(the caller's own included) gets it back and applies it to its own
connections (``SocketServer.apply_control``), selecting them with
:meth:`Command.selects`.

A command acts on the connections open at the moment it was made, not on
those that open while it travels to the workers: it carries the wall-clock
time it was made (``at``), and a worker leaves alone every connection that
opened after it. Across machines that seam is as exact as their clocks agree
(NTP keeps it to milliseconds).

No I/O here: the commands, their checks, their JSON form and the selection,
shared by ``RobeSockets``, ``Publisher`` and the command line.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from . import protocol
from .tickets import identity_key

DISCONNECT = "disconnect"
UNSUBSCRIBE = "unsubscribe"
#: Closed by the application, do not reconnect (PROTOCOL.md section 5).
CLOSE_DISCONNECTED = 4500
#: The application asks the client to reconnect now.
CLOSE_RECONNECT = 4001
#: What a close frame can carry besides its code.
MAX_REASON_BYTES = 123

#: Tells "identity not given" from ``identity=None``, which is refused.
_UNSET: Any = object()


@dataclass(frozen=True)
class Command:
    """One disconnect or unsubscribe, as it travels to every worker.

    Exactly one of ``identity`` (kept as ``tickets.identity_key`` spells it,
    as the connection caps count identities) and ``connection_id`` is set.
    """

    action: str
    identity: str | None
    connection_id: str | None
    #: ``time.time()`` when it was made: connections opened later are left alone.
    at: float
    code: int = CLOSE_DISCONNECTED
    reason: str = ""
    channel: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object backends carry."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Command":
        """The command a backend handed over, checked again (it may come from
        another version of the library, or another program).

        :raises ValueError: it is not a command this version can apply.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a command is a JSON object, not {type(data).__name__}")
        try:
            command = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except KeyError as exc:
            raise ValueError(f"a command without {exc.args[0]!r}") from None
        problem = command.problem()
        if problem is not None:
            raise ValueError(problem)
        return command

    def problem(self) -> str | None:
        """Why this command cannot be applied, or ``None``."""
        if self.action not in (DISCONNECT, UNSUBSCRIBE):
            return f"unknown action {self.action!r}"
        selectors = [s for s in (self.identity, self.connection_id) if s is not None]
        if len(selectors) != 1 or not isinstance(selectors[0], str) or self.identity == identity_key(None):
            return "a command selects by one identity or one connection id"
        if self.identity is not None:
            try:
                json.loads(self.identity)
            except ValueError:
                return "a command's identity is an identity's JSON"
        if isinstance(self.at, bool) or not isinstance(self.at, (int, float)):
            return "a command's time is a number"
        return _code_problem(self.code) or _reason_problem(self.reason) or (
            _channel_problem(self.channel) if self.action == UNSUBSCRIBE else None
        )

    def selects(self, connection_id: str, identity: Any, opened_at: float) -> bool:
        """Whether a connection with this id and identity, opened at
        ``opened_at`` (``time.time()``), is one this command acts on."""
        if opened_at > self.at:
            return False
        if self.connection_id is not None:
            return connection_id == self.connection_id
        if identity is None:
            return False
        if isinstance(identity, str) or isinstance(self._target, str):
            # Most identities are strings: compared as they are, with no
            # encoding per connection (a str's key is that str, quoted).
            return type(identity) is str and identity == self._target
        return identity_key(identity) == self.identity

    @cached_property
    def _target(self) -> Any:
        """The identity selected, decoded once for all the connections."""
        return json.loads(self.identity) if self.identity is not None else None

    def describe(self) -> str:
        """For the log: what it selects and does."""
        who = f"connection {self.connection_id}" if self.connection_id is not None else f"identity {self.identity}"
        if self.action == DISCONNECT:
            return f"disconnect {who} with {self.code}"
        return f"unsubscribe {who} from {self.channel!r}"


def disconnect(identity: Any = _UNSET, connection_id: str | None = None,
               code: int = CLOSE_DISCONNECTED, reason: str = "") -> Command:
    """A checked disconnect command; see :meth:`Controls.disconnect`."""
    who, conn_id = _selector(identity, connection_id)
    problem = _code_problem(code) or _reason_problem(reason)
    if problem is not None:
        raise ValueError(problem)
    return Command(DISCONNECT, who, conn_id, time.time(), code, reason)


def unsubscribe(channel: str, identity: Any = _UNSET, connection_id: str | None = None,
                reason: str = "") -> Command:
    """A checked unsubscribe command; see :meth:`Controls.unsubscribe`."""
    who, conn_id = _selector(identity, connection_id)
    problem = _channel_problem(channel) or _reason_problem(reason)
    if problem is not None:
        raise ValueError(problem)
    return Command(UNSUBSCRIBE, who, conn_id, time.time(), CLOSE_DISCONNECTED, reason, channel)


def _selector(identity: Any, connection_id: Any) -> tuple[str | None, str | None]:
    if identity is None:
        raise TypeError(
            "identity=None would select the anonymous connections, which have no identity in"
            " common: select an anonymous connection by its connection_id"
        )
    given = identity is not _UNSET
    if given == (connection_id is not None):
        raise TypeError("pass exactly one of identity= or connection_id=")
    if not given:
        if not isinstance(connection_id, str) or not connection_id:
            raise TypeError(f"connection_id is a connection's id (a str), not {connection_id!r}")
        return None, connection_id
    try:
        key = identity_key(identity)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"identity {identity!r} is not JSON, so no ticket can name it ({exc})") from None
    return key, None


def _code_problem(code: Any) -> str | None:
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        return (
            f"code must be an application close code from 4000 to 4999, not {code!r}:"
            f" {CLOSE_DISCONNECTED} (do not reconnect) or {CLOSE_RECONNECT} (reconnect now)"
        )
    return None


def _reason_problem(reason: Any) -> str | None:
    if not isinstance(reason, str):
        return f"reason must be a str, not {type(reason).__name__}"
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:
        return "reason must be text that UTF-8 can encode (it holds an unpaired surrogate)"
    if size > MAX_REASON_BYTES:
        return f"reason must be at most {MAX_REASON_BYTES} UTF-8 bytes (a close frame's room), not {size}"
    return None


def _channel_problem(channel: Any) -> str | None:
    if not protocol.is_valid_channel(channel):
        return f"invalid channel name {channel!r}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /"
    return None


class Controls:
    """``disconnect`` and ``unsubscribe``, for whatever can hand a command to
    the backend every worker listens to (``RobeSockets``, ``Publisher``)."""

    def _send_control(self, command: Command) -> None:
        raise NotImplementedError

    def disconnect(self, *, identity: Any = _UNSET, connection_id: str | None = None,
                   code: int = CLOSE_DISCONNECTED, reason: str = "") -> None:
        """Close connections on every worker: all of one identity's, or one by id.

        ::

            sockets.disconnect(identity="alice")     # signed out: 4500, no reconnect
            sockets.disconnect(connection_id="Xy1", code=4001, reason="permissions changed")

        Acts within a second on every worker sharing the backend, this one
        included, on the connections open now (not on those that open later).

        :param identity: every connection whose ticket named it (``None`` is
            refused: anonymous connections are selected by id only).
        :param connection_id: the one connection with that id.
        :param code: 4000 to 4999; 4500 (the default) tells the clients not to
            reconnect, 4001 to reconnect at once (with a fresh ticket, so every
            channel is authorized again).
        :param reason: the close frame's reason, at most 123 UTF-8 bytes.
        :raises TypeError: not exactly one of ``identity`` and ``connection_id``.
        :raises ValueError: a code or reason a close frame cannot carry.
        :raises BackendUnavailable: the backend could not take the command.
        """
        self._send_control(disconnect(identity, connection_id, code, reason))

    def unsubscribe(self, channel: str, *, identity: Any = _UNSET, connection_id: str | None = None,
                    reason: str = "") -> None:
        """Take connections off ``channel`` on every worker: all of one
        identity's, or one by id.

        ::

            sockets.unsubscribe("room:secret", identity="alice", reason="removed from the room")

        Each connection on the channel gets ``{"channel": ..., "event":
        "@unsubscribed", "data": {"reason": ...}}`` and no more of its
        broadcasts; its clients do not subscribe again by themselves. As with
        :meth:`disconnect`, only connections open now are affected.

        :raises TypeError: not exactly one of ``identity`` and ``connection_id``.
        :raises ValueError: an invalid channel name, or a reason over 123 UTF-8 bytes.
        :raises BackendUnavailable: the backend could not take the command.
        """
        self._send_control(unsubscribe(channel, identity, connection_id, reason))
