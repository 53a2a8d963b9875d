"""The opening handshake's checks (PROTOCOL.md section 2), apart from any I/O.

:func:`check` takes what the request says (headers, the ticket, the client
address, scheme and host) and returns the ticket's identity or raises
:class:`Refusal`; it is tested by feeding it headers. The connection limits
that close the table are :class:`Slots`, whose reservation is held for the
socket's whole life. Everything here happens before the upgrade, so every
refusal is a plain HTTP answer.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from .config import Settings
from .errors import BackendUnavailable, TicketError
from .tickets import TicketSigner, identity_key

log = logging.getLogger("flask_robe_sockets")

#: The origin scheme a page must have to open a socket over each request scheme.
_PAGE_SCHEME = {"http": "http", "ws": "http", "https": "https", "wss": "https"}

#: The HTTP status of each limit's refusal.
LIMIT_STATUS = {"identity_limit": 429, "ip_limit": 429, "too_many_connections": 503}


class Refusal(Exception):
    """A handshake refused before the upgrade: ``status`` and the protocol's ``error``."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def check(
    headers: Mapping[str, str],
    ticket: str | None,
    remote_addr: str | None,
    scheme: str,
    host: str,
    settings: Settings,
    tickets: TicketSigner | None,
) -> Any:
    """Run the checks of PROTOCOL.md section 2, in its order, up to the
    ticket's; returns the ticket's identity (``None`` without one).

    :param headers: the request's headers, looked up case-insensitively
        (Werkzeug's ``Headers``, or a dict with the usual spelling).
    :param scheme: the request's scheme as the app sees it (after ProxyFix).
    :raises Refusal: with the status and error of the first check that fails.
    """
    # The checks wsproto makes when it accepts: one it would refuse must be
    # answered here, or it fails inside the upgrade as a 500.
    if (
        headers.get("Upgrade", "").lower() != "websocket"
        or "upgrade" not in {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        or not headers.get("Sec-WebSocket-Key")
        or headers.get("Sec-WebSocket-Version") != "13"
        or not headers.get("Host")
    ):
        raise Refusal(400, "not_websocket")
    origin = headers.get("Origin")
    if origin is not None and not origin_allowed(origin, settings.allowed_origins, scheme, host):
        raise Refusal(403, "origin_not_allowed")
    if ticket is None:
        if settings.tickets_required:
            raise Refusal(401, "ticket_missing")
        return None
    if tickets is None:
        raise Refusal(401, "ticket_invalid")
    try:
        return tickets.verify(ticket, remote_addr)
    except TicketError as exc:
        raise Refusal(401, exc.code) from None
    except BackendUnavailable:
        # The used-nonce store (Redis) is down: the ticket cannot be checked
        # for reuse. Not in PROTOCOL.md's table; the closest reading is a
        # retryable 503 with a JSON body like the others.
        log.warning("cannot check a ticket: the backend is unreachable")
        raise Refusal(503, "backend_unavailable") from None


def origin_allowed(origin: str, allowed: tuple[str, ...] | None, scheme: str, host: str) -> bool:
    """Whether a page from ``origin`` may open a socket on ``scheme://host``."""
    if allowed is None:
        # The same host, and a web page's scheme matching the request's (as
        # ProxyFix reports it): an https page behind the proxy, an http page
        # without one; never ftp: or an opaque "null".
        parts = urlsplit(origin)
        return parts.scheme.lower() == _PAGE_SCHEME.get(scheme.lower()) and parts.netloc.lower() == host.lower()
    return "*" in allowed or origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}


class Slots:
    """The connection limits of one worker: in all, per identity, per client IP.

    A slot is taken before the upgrade and held for the socket's life, by
    :meth:`reserve` alone, so the counts can never drift.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        #: Open connections and handshakes under way.
        self.taken = 0
        self._of_identity: Counter[str] = Counter()
        self._of_ip: Counter[str | None] = Counter()

    @contextlib.contextmanager
    def reserve(self, identity: Any, remote_addr: str | None) -> Iterator[str | None]:
        """Hold a slot for the handshake and the socket's life.

        Yields ``None`` when the slot is taken, counted for ``identity``
        (anonymous ones, ``None``, are not) and for ``remote_addr``; it is
        given back when the block ends, however it ends. Else yields the
        protocol's error for the first limit that is full, in PROTOCOL.md
        section 2's order (see :data:`LIMIT_STATUS`), and takes nothing.
        """
        settings = self._settings
        who = None if identity is None else identity_key(identity)
        per_identity = settings.max_connections_per_identity
        per_ip = settings.max_connections_per_ip
        if who is not None and per_identity is not None and self._of_identity[who] >= per_identity:
            yield "identity_limit"
            return
        if per_ip is not None and self._of_ip[remote_addr] >= per_ip:
            yield "ip_limit"
            return
        if self.taken >= settings.max_connections:
            yield "too_many_connections"
            return
        self.taken += 1
        if who is not None:
            self._of_identity[who] += 1
        self._of_ip[remote_addr] += 1
        try:
            yield None
        finally:
            self.taken -= 1
            if who is not None:
                _give_back(self._of_identity, who)
            _give_back(self._of_ip, remote_addr)

    def counts(self) -> dict[str, Any]:
        """How many slots are held: in all, per identity and per client IP."""
        return {"slots": self.taken, "identities": dict(self._of_identity), "ips": dict(self._of_ip)}


def _give_back(counter: Counter, key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
