"""Short-lived, signed, single-use tickets for the socket handshake.

Browsers cannot set headers on a WebSocket request, and cookies alone let
any other site open a socket in the user's name. So the client first asks
``POST {path}/ticket`` (with its cookies) for a ticket, then opens the
socket with ``?ticket=...``. The ticket is signed like Flask's session, with
its own salt, and names the identity, the client IP and a random nonce that
makes it valid once.

Asking for tickets is rate limited per caller (a
:class:`~flask_robe_sockets.ratelimit.CallerRateLimit` of the server), so that
a reconnect loop, honest or not, cannot spin on the endpoint.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Callable

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .errors import ConfigurationError, TicketError

SALT = "flask-robe-sockets.ticket"


class TicketSigner:
    """Issues and verifies tickets.

    :param secret_keys: oldest first, newest last, as Flask's
        ``SECRET_KEY_FALLBACKS`` followed by ``SECRET_KEY``; tickets are
        signed with the newest and accepted with any.
    :param claim_nonce: ``claim_nonce(nonce, ttl) -> bool``, ``False`` when
        the nonce was claimed before (the backend's store).
    """

    def __init__(
        self,
        secret_keys: list[str | bytes],
        max_age: float,
        bind_ip: bool,
        claim_nonce: Callable[[str, float], bool],
    ) -> None:
        if not secret_keys:
            raise ConfigurationError(
                "tickets are signed with the app's SECRET_KEY: set app.secret_key"
            )
        self._serializer = URLSafeTimedSerializer(secret_keys, salt=SALT)
        self.max_age = max_age
        self.bind_ip = bind_ip
        self._claim_nonce = claim_nonce

    def issue(self, identity: Any, remote_addr: str | None) -> str:
        """Sign a ticket for ``identity`` (any JSON value) and the client's IP."""
        try:
            json.dumps(identity, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"the identity loader returned {identity!r}, which is not JSON;"
                " return a str, int or dict that identifies the user"
            ) from exc
        return self._serializer.dumps(
            {"i": identity, "a": remote_addr, "n": secrets.token_urlsafe(16)}
        )

    def verify(self, ticket: str, remote_addr: str | None) -> Any:
        """Return the ticket's identity, and mark the ticket used.

        :raises TicketError: with the protocol's code for why it was refused.
        """
        try:
            payload = self._serializer.loads(ticket, max_age=self.max_age)
        except SignatureExpired:
            raise TicketError("ticket_expired", "the ticket has expired: fetch a new one") from None
        except BadSignature:
            raise TicketError("ticket_invalid", "the ticket is not valid") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("n"), str):
            raise TicketError("ticket_invalid", "the ticket is not valid")
        if not self._claim_nonce(payload["n"], self.max_age + 1):
            raise TicketError("ticket_used", "the ticket was used before: fetch a new one")
        if self.bind_ip and payload.get("a") != remote_addr:
            raise TicketError("ticket_wrong_ip", "the ticket was issued to another address")
        return payload.get("i")


def identity_key(identity: Any) -> str:
    """One hashable spelling of a ticket's identity (any JSON value), so that
    ``{"id": 7}`` can be counted as ``"alice"`` is, and ``1`` apart from ``"1"``."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def caller(identity: Any, remote_addr: str | None) -> tuple[str, str | None]:
    """Who a per-caller limit counts (tickets, presence joins): an identity
    from one client IP."""
    return identity_key(identity), remote_addr
