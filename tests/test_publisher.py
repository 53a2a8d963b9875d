"""Publisher (publisher.py) against a real redis-server: what it sends, who
hears it, what it refuses, and what it passes on to its backend."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis

from flask_robe_sockets import Publisher, frames, protocol
from flask_robe_sockets.backends.base import Backend
from flask_robe_sockets.config import Settings
from flask_robe_sockets.errors import ConfigurationError

from .servers import wait_until

pytestmark = pytest.mark.redis

#: A worker's side, in a process of its own under gevent as gunicorn's
#: worker is: subscribes through the Redis backend, says when Redis
#: confirmed it, then prints the first frame it is handed.
SUBSCRIBER = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent.queue
from flask_robe_sockets.backends import create_backend

url, channel = sys.argv[1:]
backend = create_backend(url)
got = gevent.queue.Queue()
backend.start(lambda name, seq, frame: got.put((name, seq, frame)))
backend.subscribe(channel)
backend.recover(channel, None, None)  # returns once Redis confirmed the SUBSCRIBE
print("ready", flush=True)
name, seq, frame = got.get(timeout=10)
print(name, seq, frame.hex(), flush=True)
backend.close()
"""


@pytest.fixture
def url(redis_server):
    """This module's database on the shared redis-server, flushed around each test."""
    url = redis_server.database(3)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def fresh_channel() -> str:
    return f"pub:{uuid.uuid4().hex[:12]}"


def test_send_returns_the_seq(url):
    """Each send returns the channel's next seq, from 1, whichever way it is called."""
    channel = fresh_channel()
    with Publisher.from_url(url) as publisher:
        assert publisher[channel].send("news", text="hi") == 1
        assert publisher.send(channel, "news", {"n": 2}) == 2
        assert publisher[fresh_channel()].send("news") == 1


def test_a_subscriber_through_the_backend_receives_it(url):
    """A worker subscribed through the Redis backend is handed the very frame a view's send would make."""
    channel = fresh_channel()
    worker = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, url, channel], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
        with Publisher.from_url(url) as publisher:
            seq = publisher[channel].send("news", {"text": "hi"})
        out, err = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    name, got_seq, frame = out.split()
    assert (name, int(got_seq)) == (channel, seq)
    assert bytes.fromhex(frame) == frames.ws_frame(protocol.encode("news", {"text": "hi"}, channel, seq=seq))


@pytest.mark.parametrize("memory", ["memory://", "MEMORY://"])
def test_memory_backend_is_refused_saying_why(memory):
    """from_url("memory://") raises ConfigurationError: an in-memory backend reaches no other process."""
    with pytest.raises(ConfigurationError, match="needs the app's Redis URL: an in-memory backend reaches nobody"):
        Publisher.from_url(memory)


def test_history_settings_default_to_the_apps(url):
    """Without arguments the publisher keeps history as an app with default settings does."""
    with Publisher.from_url(url) as publisher:
        assert (publisher.backend.history_size, publisher.backend.history_ttl) == (
            Settings.history_size, Settings.history_ttl,
        )


def test_history_size_and_ttl_reach_redis(url):
    """history_size bounds what a reconnect can recover, and history_ttl is the keys' lifetime in Redis."""
    channel = fresh_channel()
    with Publisher.from_url(url, history_size=3, history_ttl=60) as publisher:
        for n in range(5):
            publisher[channel].send("n", n)
        assert publisher.backend.recover(channel, 2, None).recovered is True  # 3 missed: all kept
        assert publisher.backend.recover(channel, 1, None).recovered is False  # 4 missed: one too many
    admin = redis.Redis.from_url(url)
    try:
        for key in (f"robe:{{{channel}}}:meta", f"robe:{{{channel}}}:log"):
            assert 55_000 < admin.pttl(key) <= 60_000, key
    finally:
        admin.close()


def test_data_that_is_not_json_is_refused_before_sending(url):
    """Data that is not JSON raises before anything is sent: the seq is not used up."""
    channel = fresh_channel()
    with Publisher.from_url(url) as publisher:
        with pytest.raises(TypeError):
            publisher[channel].send("n", {"a set"})
        with pytest.raises(ValueError):
            publisher[channel].send("n", float("nan"))
        with pytest.raises(ValueError, match="invalid channel name"):
            publisher["bad channel"]
        assert publisher[channel].send("n", 1) == 1


def test_context_manager_closes_its_redis_connections(url):
    """Leaving the with block, by an exception too, closes the publisher's connections to Redis."""
    admin = redis.Redis.from_url(url)
    name = f"robe-publisher-{uuid.uuid4().hex[:8]}"

    def connections() -> int:
        return sum(client.get("name") == name for client in admin.client_list())

    try:
        with pytest.raises(RuntimeError):
            with Publisher.from_url(f"{url}?client_name={name}") as publisher:
                publisher[fresh_channel()].send("n", 1)
                assert connections() == 1
                raise RuntimeError("the job failed")
        wait_until(lambda: connections() == 0, 5, 0.02, "Redis to see the publisher's connection closed")
    finally:
        admin.close()


def test_context_manager_closes_the_backend_once():
    """with Publisher(backend) gives the publisher itself and closes its backend when the block ends."""

    class Recording(Backend):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    backend = Recording()
    with Publisher(backend) as publisher:
        assert publisher.backend is backend and backend.closed == 0
    assert backend.closed == 1
