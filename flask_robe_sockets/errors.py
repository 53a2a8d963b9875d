"""Exceptions raised by flask-robe-sockets.

The tree::

    RobeSocketsError
     +-- ConfigurationError   the app's setup cannot work (fix the config)
     +-- Forbidden            raised by a handler or hook to refuse a client
     +-- TicketError          a handshake ticket was refused (has .code)
     +-- BackendUnavailable   the backend (Redis) could not be reached
                              (also importable as PublishError, its old name)
     +-- ProtocolError        a client frame breaks the wire protocol (has .code)

The client's own errors (``flask_robe_sockets.client``) derive from
``RobeSocketsError`` too, so one ``except`` catches everything the library
raises.
"""
from __future__ import annotations

from typing import Any


class RobeSocketsError(Exception):
    """Base class of every error this library raises."""


class ConfigurationError(RobeSocketsError):
    """The application's configuration cannot work as given."""


class Forbidden(RobeSocketsError):
    """Raise from a handler to answer the client ``@error forbidden``.

    The message is sent to the client, so keep it free of internal detail.
    """

    def __init__(self, message: str = "forbidden") -> None:
        super().__init__(message)
        self.message = message


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
