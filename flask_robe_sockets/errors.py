"""Exceptions raised by flask-robe-sockets.

The tree::

    RobeSocketsError
     +-- ConfigurationError   the app's setup cannot work (fix the config)
     +-- Refused              raised by a handler or hook to refuse a client
     |    |                   with a code of the application's own (has .code)
     |    +-- Forbidden       the same with the code ``forbidden``
     +-- TicketError          a handshake ticket was refused (has .code)
     +-- BackendUnavailable   the backend (Redis) could not be reached
                              (also importable as PublishError, its old name)
     +-- ProtocolError        a client frame breaks the wire protocol (has .code)

The client's own errors (``flask_robe_sockets.client``) derive from
``RobeSocketsError`` too, so one ``except`` catches everything the library
raises.
"""
from __future__ import annotations

import re
from typing import Any

#: Every error code the protocol itself uses (PROTOCOL.md sections 1, 2 and
#: 5, the two answers of the server that are not in its tables, and the
#: clients' own codes), so none can be taken for an application's refusal.
#: ``forbidden`` is not here: it is the application's to raise.
PROTOCOL_CODES = frozenset({
    # the ticket endpoint and the handshake
    "unauthorized", "rate_limited", "not_websocket", "origin_not_allowed", "ticket_missing",
    "ticket_invalid", "ticket_expired", "ticket_used", "ticket_wrong_ip", "identity_limit",
    "ip_limit", "too_many_connections", "backend_unavailable", "tickets_disabled",
    # @error
    "bad_frame", "bad_channel", "bad_event", "unknown_event", "handler_error",
    "too_many_subscriptions", "presence_disabled", "not_subscribed",
    # what the clients report of their own
    "timeout", "queue_full", "disconnected", "closed", "connect_failed", "ticket_failed", "error",
})

_CODE = re.compile(r"[a-z0-9_]{1,64}")


def application_code_problem(code: Any) -> str | None:
    """Why ``code`` cannot be an application's error code (PROTOCOL.md
    section 4), or ``None`` when it can."""
    if not isinstance(code, str) or _CODE.fullmatch(code) is None:
        return f"error code {code!r} is not 1 to 64 characters from a-z 0-9 _"
    if code in PROTOCOL_CODES:
        return f"error code {code!r} is one of the protocol's own: choose another name"
    return None


class RobeSocketsError(Exception):
    """Base class of every error this library raises."""


class ConfigurationError(RobeSocketsError):
    """The application's configuration cannot work as given."""


class Refused(RobeSocketsError):
    """Raise from a handler or the authorize hook to refuse the client with an
    error code of the application's own: it is answered ``@error`` with
    ``code`` and ``message``::

        raise Refused("try_later", "the queue is down")

    :param code: 1 to 64 characters from ``a-z 0-9 _``, not one of the
        protocol's own codes (:data:`PROTOCOL_CODES`), e.g. ``out_of_stock``.
    :param message: sent to the client: keep it free of internal detail.
    :raises ValueError: ``code`` breaks that rule.
    """

    def __init__(self, code: str, message: str) -> None:
        problem = application_code_problem(code)
        if problem is not None:
            raise ValueError(problem)
        super().__init__(message)
        self.code = code
        self.message = message


class Forbidden(Refused):
    """Raise from a handler or hook to answer the client ``@error forbidden``.

    The message is sent to the client, so keep it free of internal detail.
    """

    def __init__(self, message: str = "forbidden") -> None:
        super().__init__("forbidden", message)


class TicketError(RobeSocketsError):
    """A ticket was refused at the handshake.

    :param code: the protocol's error name, e.g. ``"ticket_expired"``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BackendUnavailable(RobeSocketsError):
    """The backend could not be reached, e.g. Redis is down.

    Raised by ``send`` when the message was most likely not delivered: the
    backend refused it or could not be reached. When the connection broke
    after Redis took the message, it may have gone out all the same, so a
    retry can deliver it twice. Also raised inside the server when a ticket's
    single use or a channel's history cannot be checked.
    """


#: The first name of :class:`BackendUnavailable`, kept for existing code.
PublishError = BackendUnavailable


class ProtocolError(RobeSocketsError):
    """A frame broke the wire protocol; answered with ``@error <code>``.

    ``ref`` and ``channel`` are those of the frame, when they were usable,
    so that the answer can be matched by the client.
    """

    def __init__(
        self,
        code: str,
        message: str,
        ref: Any = None,
        channel: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.channel = channel
