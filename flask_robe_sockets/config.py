"""Configuration keys, their defaults and their checks, in one place.

Every ``ROBE_SOCKETS_<NAME>`` key of ``app.config`` is the field ``<name>``
of :class:`Settings`; ``init_app`` reads them once, through :func:`load`, so
set them before that. The README documents the same list.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigurationError

PREFIX = "ROBE_SOCKETS_"


@dataclass(frozen=True)
class Settings:
    """The effective ``ROBE_SOCKETS_*`` settings of one app, checked."""

    #: URL path of the socket endpoint; the ticket endpoint is ``{PATH}/ticket``
    #: and the browser client ``{PATH}/client.js``.
    path: str = "/ops"
    #: Largest client message in bytes, counted over all its fragments.
    #: A larger one closes the connection with 1009.
    max_message_size: int = 64 * 1024
    #: Frames one message may be split into; more closes with 1009. Browsers
    #: and the bundled clients never fragment what they send.
    max_fragments: int = 64
    #: Channels one connection may be subscribed to at once.
    max_subscriptions: int = 100
    #: Open sockets per worker process; the next handshake gets 503. Run
    #: gunicorn with ``--worker-connections`` above this, or the extra
    #: connections wait unanswered in the listen backlog instead.
    max_connections: int = 5000
    #: Open sockets per identity on one worker (anonymous connections are not
    #: counted); the next handshake gets ``429 identity_limit``. ``None``: no cap.
    max_connections_per_identity: int | None = 32
    #: Open sockets per client IP on one worker; the next gets ``429 ip_limit``.
    #: Off (``None``) by default: many users may share one address behind a NAT.
    max_connections_per_ip: int | None = None
    #: Seconds of silence after which the server pings a client; a client
    #: that stays silent for another interval is dropped. ``None`` disables it.
    ping_interval: float | None = 25
    #: Messages waiting to be written to one connection. A client that falls
    #: this far behind is closed with 4008 so it cannot hold up the others.
    send_queue_size: int = 1024
    #: Bytes waiting to be written to one connection, counted with
    #: SEND_QUEUE_SIZE: whichever fills first closes the client with 4008.
    #: Messages are not all small (a ``@pong`` echoes its ``@ping``), so a
    #: count alone would let a client that never reads hold 1,024 of 64 KiB.
    send_queue_bytes: int = 4 * 1024 * 1024
    #: Origins allowed to open a socket, e.g. ``["https://example.com"]``.
    #: ``None`` allows only the request's own host and scheme; ``["*"]`` any.
    allowed_origins: tuple[str, ...] | None = None
    #: Frames a client may send: ``(per second, burst)``. Frames over it get
    #: ``@error rate_limited``; a client that keeps on is closed with 1008.
    #: Every WebSocket frame counts, whatever its opcode: a ping, an empty
    #: continuation frame and a whole message cost the same. The burst covers
    #: a reconnect: a subscribe per channel (up to MAX_SUBSCRIPTIONS) plus
    #: the sends the client queued meanwhile.
    rate_limit: tuple[float, float] = (50, 250)
    #: Bytes a client may send: ``(per second, burst)``, counted with the
    #: frames and refused the same way. An interactive client sends a few
    #: KiB a second; the burst covers a reconnect's resubscribes and queued
    #: sends, and 16 messages of the largest size at once. At this rate even
    #: frames chosen to be the dearest to parse cost a worker a few percent.
    byte_rate_limit: tuple[float, float] = (256 * 1024, 1024 * 1024)
    #: Tickets one caller (identity and client IP) may get from
    #: ``POST {PATH}/ticket``: ``(per second, burst)``; over it the answer is
    #: ``429 rate_limited`` with ``Retry-After``. Any reconnect backoff fits.
    ticket_rate_limit: tuple[float, float] = (5, 20)
    #: Whether the handshake needs a ticket from ``POST {PATH}/ticket``.
    tickets_required: bool = True
    #: Seconds a ticket stays valid after it is issued.
    ticket_max_age: float = 30
    #: Whether a ticket is valid only from the IP address it was issued to
    #: (``request.remote_addr``; use ``ProxyFix`` behind a proxy).
    ticket_bind_ip: bool = True
    #: Backend URL: ``memory://`` (one process) or ``redis://host:port/db``.
    #: ``None`` means ``ROBE_SOCKETS_REDIS_URL`` if set, else ``memory://``.
    backend_url: str | None = None
    #: Redis URL for the backplane; unset keeps everything in memory.
    redis_url: str | None = None
    #: Broadcasts kept per channel for recovery after a reconnect.
    history_size: int = 100
    #: Seconds a broadcast stays in the recovery history.
    history_ttl: float = 300
    #: Bytes of history the memory backend keeps over all channels; past it
    #: the least recently used channels' histories go first (their clients
    #: then get ``recovered: false``, never a wrong replay). Redis is bounded
    #: by HISTORY_SIZE, HISTORY_TTL and its own ``maxmemory``.
    history_max_bytes: int | None = 64 * 1024 * 1024
    #: Seconds a closing socket waits for the client's close frame.
    close_timeout: float = 5
    #: Whether to count connections, handshakes, frames, broadcasts and
    #: handlers for Prometheus, served at ``GET {PATH}/metrics`` (needs the
    #: ``metrics`` extra, prometheus_client). Keep that path behind your
    #: proxy: it is not for the public.
    metrics: bool = False
    #: Seconds after its last report that a worker which stopped reporting
    #: (killed) is no longer listed by ``flask robe workers``. Each worker
    #: serving sockets reports itself to a shared backend every third of it.
    worker_ttl: float = 15
    #: Channels with presence (who is subscribed, ``@join``/``@leave``):
    #: names, or prefixes ending in ``*`` (``["room:*", "doc:42"]``). Off
    #: by default: every join and leave of such a channel reaches all its
    #: subscribers, and each joiner gets the whole member list.
    presence: tuple[str, ...] = ()
    #: Seconds within which the members of a worker that died without
    #: closing its sockets (SIGKILL, a lost machine) vanish, each announced
    #: with one ``@leave``. With presence on a shared backend, each worker
    #: reports itself at least every third of it.
    presence_timeout: float = 30
    #: Presence joins one caller (an identity from one client IP) may make:
    #: ``(per second, burst)``, over all its connections of this worker. Each
    #: join and its leave is a frame to every other member, so a client that
    #: subscribes and unsubscribes in a loop would cost a worker a frame per
    #: member per request; over it a subscribe is answered ``@error
    #: rate_limited`` (the clients try again on their next connect). The
    #: burst covers a page with a few presence channels reloaded in many tabs.
    presence_rate_limit: tuple[float, float] = (2, 50)

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigurationError(f"ROBE_SOCKETS_PATH must start with '/', got {self.path!r}")
        object.__setattr__(self, "path", self.path.rstrip("/"))
        for name, unit in (("rate_limit", "frames"), ("byte_rate_limit", "bytes"), ("ticket_rate_limit", "tickets"),
                           ("presence_rate_limit", "joins")):
            rate = getattr(self, name)
            if not (isinstance(rate, (tuple, list)) and len(rate) == 2 and rate[0] > 0 and rate[1] >= 1):
                raise ConfigurationError(f"{key(name)} must be ({unit} per second, burst), got {rate!r}")
            object.__setattr__(self, name, tuple(rate))
        if self.ping_interval is not None and not self.ping_interval > 0:
            raise ConfigurationError(
                "ROBE_SOCKETS_PING_INTERVAL must be seconds above 0, or None to turn pings off,"
                f" got {self.ping_interval!r}"
            )
        if not (isinstance(self.worker_ttl, (int, float)) and self.worker_ttl > 0):
            raise ConfigurationError(f"ROBE_SOCKETS_WORKER_TTL must be seconds above 0, got {self.worker_ttl!r}")
        if self.allowed_origins is not None:
            object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        self._check_presence()

    def _check_presence(self) -> None:
        patterns = self.presence
        if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or not all(
            isinstance(p, str) and p and len(p) <= 129 for p in patterns
        ):
            raise ConfigurationError(
                "ROBE_SOCKETS_PRESENCE must be a list of channel names or prefixes ending in '*',"
                f" e.g. ['room:*'], got {patterns!r}"
            )
        object.__setattr__(self, "presence", tuple(patterns))
        timeout = self.presence_timeout
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
            raise ConfigurationError(f"ROBE_SOCKETS_PRESENCE_TIMEOUT must be seconds above 0, got {timeout!r}")

    @property
    def backend(self) -> str:
        """The backend's URL, as BACKEND_URL and REDIS_URL choose it."""
        return self.backend_url or self.redis_url or "memory://"


def key(name: str) -> str:
    """The ``app.config`` key of the setting ``name``."""
    return PREFIX + name.upper()


#: Every key with its default, as ``app.config`` spells them.
DEFAULTS: dict[str, Any] = {key(field.name): field.default for field in fields(Settings)}


def load(config: Any) -> Settings:
    """Apply the defaults to ``config`` and return its checked settings.

    :raises ConfigurationError: a setting cannot work, with the fix.
    """
    for name, value in DEFAULTS.items():
        config.setdefault(name, value)
    settings = Settings(**{field.name: config[key(field.name)] for field in fields(Settings)})
    if settings.tickets_required and not config.get("SECRET_KEY"):
        raise ConfigurationError(
            "tickets are signed with the app's SECRET_KEY: set app.secret_key,"
            " or set ROBE_SOCKETS_TICKETS_REQUIRED = False"
        )
    return settings
