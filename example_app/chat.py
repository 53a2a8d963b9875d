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
from collections import OrderedDict, defaultdict, deque
from typing import Any

from flask_robe_sockets import Message

from .extensions import sockets

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
#: Mentions notified per message: each one publishes on a private channel,
#: which keeps a history for a while even when nobody is listening.
MAX_MENTIONS = 5
#: Names remembered as having signed in (the most recent ones): only they
#: are notified, so a message cannot make histories for names nobody uses.
MAX_PEOPLE = 10_000


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


class MemoryPeople:
    """The names that signed in to this process, the latest ``size`` of them."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._names: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] = None
            self._names.move_to_end(name)
            while len(self._names) > self._size:
                self._names.popitem(last=False)

    def known(self, names: list[str]) -> list[str]:
        """``names`` that signed in, in their order."""
        return [name for name in names if name in self._names]


class RedisPeople:
    """The names that signed in to any process: a Redis sorted set by time of
    sign-in, trimmed to the latest ``size``."""

    KEY = "example_app:people"

    def __init__(self, url: str, size: int) -> None:
        import redis

        self._redis = redis.Redis.from_url(url)
        self._size = size

    def add(self, name: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.zadd(self.KEY, {name: time.time()})
            pipe.zremrangebyrank(self.KEY, 0, -self._size - 1)
            pipe.execute()

    def known(self, names: list[str]) -> list[str]:
        if not names:
            return []
        with self._redis.pipeline() as pipe:
            for name in names:
                pipe.zscore(self.KEY, name)
            scores = pipe.execute()
        return [name for name, score in zip(names, scores) if score is not None]


people = RedisPeople(REDIS_URL, MAX_PEOPLE) if REDIS_URL else MemoryPeople(MAX_PEOPLE)


def mentioned(text: str, author: str) -> list[str]:
    """Whom ``text`` notifies: the ``@names`` that signed in, except the
    author, each once, in order, at most :data:`MAX_MENTIONS`."""
    names = list(dict.fromkeys(name for name in MENTION.findall(text) if name != author))
    return people.known(names)[:MAX_MENTIONS]

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
        sockets[channel].send(event, data)


def post_message(message: dict, user: str) -> dict:
    """The background job: keep a chat message, broadcast it to its room,
    and tell the people it mentions on their private channels."""
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
    for name in mentioned(entry["text"], user):
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
