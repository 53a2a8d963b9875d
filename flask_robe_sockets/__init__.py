"""Real-time WebSocket channels for Flask.

Everything a server-side application needs is importable from here; the
Python client lives in :mod:`flask_robe_sockets.client`.
"""
from __future__ import annotations

from .backends import Backend
from .channels import Channel
from .connection import Connection
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    Forbidden,
    ProtocolError,
    PublishError,
    Refused,
    RobeSocketsError,
    TicketError,
)
from .extension import RobeSockets
from .message import Message
from .presence import Member, Presence
from .publisher import Publisher

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Channel",
    "ConfigurationError",
    "Connection",
    "Forbidden",
    "Member",
    "Message",
    "Presence",
    "ProtocolError",
    "PublishError",
    "Publisher",
    "Refused",
    "RobeSockets",
    "RobeSocketsError",
    "TicketError",
]
__version__ = "0.1.0"
