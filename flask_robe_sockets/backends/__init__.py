"""Backends, chosen by URL scheme: ``memory://`` or ``redis://``."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import Backend, Recovery


def create_backend(url: str, **options: Any) -> Backend:
    """Build the backend named by ``url``; Redis is imported only when used."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(**options)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:
            raise ConfigurationError(
                f"the Redis backend needs redis-py: pip install 'flask-robe-sockets[redis]' ({exc})"
            ) from exc
        # Redis bounds its memory itself (HISTORY_SIZE, the keys' TTL and
        # its own maxmemory): the memory backend's total does not apply.
        options.pop("history_max_bytes", None)
        return RedisBackend(url, **options)
    raise ConfigurationError(f"unknown backend URL {url!r}: use memory:// or redis://host:port/db")


__all__ = ["Backend", "Recovery", "create_backend"]
