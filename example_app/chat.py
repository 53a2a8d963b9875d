"""The chat itself: rooms, their recent history, and the background job.

This module needs no Flask request, so the job runs the same way in the
web worker (a greenlet, when there is no Redis) and in an ``rq worker``
process (when ``REDIS_URL`` is set): the seed's pattern of handing an
incoming message to a background worker that answers on the channel.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Any

from flask_robe_sockets import Message

#: Redis for the channels, the room history and the job queue; ``None``
#: keeps all three in the web process (one gunicorn worker).
REDIS_URL = os.environ.get("REDIS_URL") or None

ROOMS = {
    "lobby": "Say hello",
    "random": "Anything goes",
    "python": "Flask, gevent and friends",
}

#: Names are also channel names (``user:<name>``), hence the narrow alphabet.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MENTION = re.compile(r"(?<![\w.-])@([A-Za-z0-9_.-]{1,32})")
MAX_TEXT = 500
HISTORY_SIZE = 50


class MemoryHistory:
    """The last messages of each room, in this process."""

    def __init__(self, size: int) -> None:
        self._rooms: dict[str, deque[dict]] = defaultdict(lambda: deque(maxlen=size))

    def add(self, room: str, entry: dict) -> None:
        self._rooms[room].append(entry)

    def recent(self, room: str) -> list[dict]:
        return list(self._rooms.get(room, ()))


class RedisHistory:
    """The last messages of each room, in a Redis list shared by every process."""

    def __init__(self, url: str, size: int) -> None:
        import redis

        self._redis = redis.Redis.from_url(url)
        self._size = size

    def add(self, room: str, entry: dict) -> None:
        key = f"example_app:history:{room}"
        with self._redis.pipeline() as pipe:
            pipe.rpush(key, json.dumps(entry))
            pipe.ltrim(key, -self._size, -1)
            pipe.execute()

    def recent(self, room: str) -> list[dict]:
        return [json.loads(item) for item in self._redis.lrange(f"example_app:history:{room}", 0, -1)]


history = RedisHistory(REDIS_URL, HISTORY_SIZE) if REDIS_URL else MemoryHistory(HISTORY_SIZE)

_publisher = None
_queue = None


def publish(channel: str, event: str, data: Any) -> None:
    """Broadcast from wherever the job runs.

    In an ``rq worker`` there is no socket server: a ``Publisher`` hands the
    message to Redis. In the web process the app's own extension does.
    """
    global _publisher
    if REDIS_URL:
        if _publisher is None:
            from flask_robe_sockets import Publisher

            _publisher = Publisher.from_url(REDIS_URL)
        _publisher[channel].send(event, data)
    else:
        from .realtime import sockets

        sockets[channel].send(event, data)


def post_message(message: dict, user: str) -> dict:
    """The background job: keep a chat message, broadcast it to its room,
    and tell everyone it mentions on their private channel."""
    incoming = Message.from_dict(message)
    room = incoming.channel.partition(":")[2]
    entry = {
        "id": uuid.uuid4().hex,
        "user": user,
        "text": incoming.data["text"].strip(),
        "at": time.time(),
    }
    history.add(room, entry)
    publish(incoming.channel, "message", entry)
    for name in sorted(set(MENTION.findall(entry["text"])) - {user}):
        publish(f"user:{name}", "mention", {**entry, "room": room})
    return entry


def dispatch(message: dict, user: str) -> None:
    """Run :func:`post_message` in the background: on RQ when Redis is
    configured, else in this process."""
    global _queue
    if REDIS_URL:
        if _queue is None:
            from redis import Redis
            from rq import Queue

            _queue = Queue("example_app", connection=Redis.from_url(REDIS_URL))
        # Nothing reads the job's return value: do not keep it in Redis.
        _queue.enqueue(post_message, message, user, result_ttl=0)
    else:
        # Under gunicorn's gevent worker ``threading`` is monkey-patched and
        # this is a greenlet; under ``flask run`` it is a real thread.
        threading.Thread(target=post_message, args=(message, user), daemon=True).start()
