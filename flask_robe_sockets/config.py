"""Configuration keys and their defaults, in one place.

Every key is read from ``app.config`` when ``init_app`` runs; set them
before that. The README documents the same list.
"""
from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    #: URL path of the socket endpoint; the ticket endpoint is ``{PATH}/ticket``
    #: and the browser client ``{PATH}/client.js``.
    "ROBE_SOCKETS_PATH": "/ops",
    #: Largest client message in bytes, counted over all its fragments.
    #: A larger one closes the connection with 1009.
    "ROBE_SOCKETS_MAX_MESSAGE_SIZE": 64 * 1024,
    #: Channels one connection may be subscribed to at once.
    "ROBE_SOCKETS_MAX_SUBSCRIPTIONS": 100,
    #: Open sockets per worker process; the next handshake gets 503. Run
    #: gunicorn with ``--worker-connections`` above this, or the extra
    #: connections wait unanswered in the listen backlog instead.
    "ROBE_SOCKETS_MAX_CONNECTIONS": 5000,
    #: Seconds of silence after which the server pings a client; a client
    #: that stays silent for another interval is dropped. ``None`` disables it.
    "ROBE_SOCKETS_PING_INTERVAL": 25,
    #: Messages waiting to be written to one connection. A client that falls
    #: this far behind is closed with 4008 so it cannot hold up the others.
    "ROBE_SOCKETS_SEND_QUEUE_SIZE": 1024,
    #: Bytes waiting to be written to one connection, counted with
    #: SEND_QUEUE_SIZE: whichever fills first closes the client with 4008.
    #: Messages are not all small (a ``@pong`` echoes its ``@ping``), so a
    #: count alone would let a client that never reads hold 1,024 of 64 KiB.
    "ROBE_SOCKETS_SEND_QUEUE_BYTES": 4 * 1024 * 1024,
    #: Origins allowed to open a socket, e.g. ``["https://example.com"]``.
    #: ``None`` allows only the request's own host; ``["*"]`` allows any.
    "ROBE_SOCKETS_ALLOWED_ORIGINS": None,
    #: Frames a client may send: ``(per second, burst)``. Frames over it get
    #: ``@error rate_limited``; a client that keeps on is closed with 1008.
    #: The burst covers a reconnect: a subscribe per channel (up to
    #: MAX_SUBSCRIPTIONS) plus the sends the client queued meanwhile.
    #: Every WebSocket frame counts, whatever its opcode: a ping, an empty
    #: continuation frame and a whole message cost the same.
    "ROBE_SOCKETS_RATE_LIMIT": (50, 250),
    #: Bytes a client may send: ``(per second, burst)``, counted with the
    #: frames and refused the same way. An interactive client sends a few
    #: KiB a second; the burst covers a reconnect's resubscribes and queued
    #: sends, and 16 messages of the largest size at once. At this rate even
    #: frames chosen to be the dearest to parse cost a worker a few percent.
    "ROBE_SOCKETS_BYTE_RATE_LIMIT": (256 * 1024, 1024 * 1024),
    #: Frames one message may be split into; more closes with 1009. Browsers
    #: and the bundled clients never fragment what they send.
    "ROBE_SOCKETS_MAX_FRAGMENTS": 64,
    #: Open sockets per identity on one worker (anonymous connections are not
    #: counted); the next handshake gets ``429 identity_limit``. ``None``: no cap.
    "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": 32,
    #: Open sockets per client IP on one worker; the next gets ``429 ip_limit``.
    #: Off (``None``) by default: many users may share one address behind a NAT.
    "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IP": None,
    #: Tickets one caller (identity and client IP) may get from
    #: ``POST {PATH}/ticket``: ``(per second, burst)``; over it the answer is
    #: ``429 rate_limited`` with ``Retry-After``. Any reconnect backoff fits.
    "ROBE_SOCKETS_TICKET_RATE_LIMIT": (5, 20),
    #: Whether the handshake needs a ticket from ``POST {PATH}/ticket``.
    "ROBE_SOCKETS_TICKETS_REQUIRED": True,
    #: Seconds a ticket stays valid after it is issued.
    "ROBE_SOCKETS_TICKET_MAX_AGE": 30,
    #: Whether a ticket is valid only from the IP address it was issued to
    #: (``request.remote_addr``; use ``ProxyFix`` behind a proxy).
    "ROBE_SOCKETS_TICKET_BIND_IP": True,
    #: Backend URL: ``memory://`` (one process) or ``redis://host:port/db``.
    #: ``None`` means ``ROBE_SOCKETS_REDIS_URL`` if set, else ``memory://``.
    "ROBE_SOCKETS_BACKEND_URL": None,
    #: Redis URL for the backplane; unset keeps everything in memory.
    "ROBE_SOCKETS_REDIS_URL": None,
    #: Broadcasts kept per channel for recovery after a reconnect.
    "ROBE_SOCKETS_HISTORY_SIZE": 100,
    #: Seconds a broadcast stays in the recovery history.
    "ROBE_SOCKETS_HISTORY_TTL": 300,
    #: Bytes of history the memory backend keeps over all channels; past it
    #: the least recently used channels' histories go first (their clients
    #: then get ``recovered: false``, never a wrong replay). Redis is bounded
    #: by HISTORY_SIZE, HISTORY_TTL and its own ``maxmemory``.
    "ROBE_SOCKETS_HISTORY_MAX_BYTES": 64 * 1024 * 1024,
    #: Seconds a closing socket waits for the client's close frame.
    "ROBE_SOCKETS_CLOSE_TIMEOUT": 5,
}


def load(config: Any) -> dict[str, Any]:
    """Apply the defaults to ``config`` and return the effective settings."""
    for key, value in DEFAULTS.items():
        config.setdefault(key, value)
    return {key: config[key] for key in DEFAULTS}
