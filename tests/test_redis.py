"""The Redis backplane, end to end: real redis-server, several real gunicorn
gevent servers sharing it, clients of the ``websockets`` library."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest
import redis
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from flask_robe_sockets import Publisher, PublishError, frames, protocol

from .servers import Gunicorn, RedisServer, free_port, gunicorn_pair, wait_until

pytestmark = pytest.mark.redis

#: History long enough that a reconnect under a loaded machine never outruns it.
HISTORY = {"ROBE_SOCKETS_HISTORY_SIZE": 1000}


def scratch_url(redis_server) -> str:
    """This module's database on the shared redis-server."""
    return redis_server.database(1)


@pytest.fixture(scope="module")
def redis_url(redis_server):
    return scratch_url(redis_server)


@pytest.fixture(autouse=True)
def flush(redis_url):
    """A clean scratch database around each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def pair(redis_url):
    """Two gunicorn servers (one gevent worker each) sharing one Redis."""
    with gunicorn_pair({"ROBE_SOCKETS_REDIS_URL": redis_url, **HISTORY}) as servers:
        yield servers


@pytest.fixture(scope="module")
def memory_server():
    srv = Gunicorn(HISTORY)
    yield srv
    srv.stop()


def fresh_channel(prefix: str = "ch") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


class Subscriber:
    """A client on one channel that keeps ``seq`` and ``epoch`` as ours do,
    and checks that broadcasts come without gap or duplicate."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.seq: int | None = None
        self.epoch: str | None = None
        self.numbers: list[int] = []
        #: What happened, for the assertion messages: answers and seqs read.
        self.trace: list = []
        self.ws = None
        self._stack = contextlib.ExitStack()

    def connect(self, srv: Gunicorn) -> dict:
        """Connect and (re)subscribe, with ``since`` after the first time."""
        self.close()
        self.ws = self._stack.enter_context(connect(f"{srv.ws_url}?ticket={srv.ticket()}", open_timeout=5))
        assert json.loads(self.ws.recv(timeout=5))["event"] == "@connected"
        data = None if self.seq is None else {"since": self.seq, "epoch": self.epoch}
        self.ws.send(json.dumps({"channel": self.channel, "event": "@subscribe", "ref": "s", "data": data}))
        answer = json.loads(self.ws.recv(timeout=5))
        assert answer["event"] == "@subscribed", answer
        self.trace.append((srv.port, answer["data"], data))
        self.epoch = answer["data"]["epoch"]
        if self.seq is None:
            self.seq = answer["data"]["seq"]
        return answer["data"]

    def read(self, count: int, timeout: float = 10, new_epoch: bool = False) -> None:
        """Read until ``count`` numbers arrived in all; fail on a gap.

        ``new_epoch``: ``seq`` may start again from 1 once (Redis lost it all).
        """
        while len(self.numbers) < count:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if new_epoch and frame["seq"] == 1 and self.seq:
                self.seq, new_epoch = 0, False
            assert frame["channel"] == self.channel and frame["seq"] == self.seq + 1, f"{frame} after {self.trace[-30:]}"
            self.trace.append(frame["seq"])
            self.seq = frame["seq"]
            self.numbers.append(frame["data"]["n"])

    def read_until_closed(self, timeout: float = 10) -> None:
        """Read what still arrives until the connection is gone."""
        try:
            self.read(sys.maxsize, timeout)
        except ConnectionClosed:
            pass

    def cut(self) -> None:
        """Drop the TCP connection with no close handshake, as a network would."""
        self.ws.socket.shutdown(socket.SHUT_RDWR)
        self.read_until_closed()
        self.close()

    def close(self) -> None:
        self._stack.close()


class Sender(threading.Thread):
    """Publishes ``{"n": 0..count-1}`` one after the other; bounded, stops by itself."""

    def __init__(self, send, count: int, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.send, self.count, self.pause = send, count, pause
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            for n in range(self.count):
                if self._halt.is_set():
                    return
                self.send(n)
                self.sent = n + 1
                self._halt.wait(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 30) -> None:
        self.join(timeout)
        self._halt.set()
        assert not self.is_alive(), "the sender did not finish"
        assert self.error is None, self.error


def http_sender(srv: Gunicorn, channel: str):
    http = requests.Session()

    def send(n: int) -> None:
        http.post(f"{srv.url}/broadcast/{channel}/n", json={"n": n}, timeout=5).raise_for_status()

    return send


def test_cross_worker_delivery_exactly_once_in_order(pair):
    """Sends made through either server reach every subscriber on both, once each, in publish order."""
    a, b = pair
    channel = fresh_channel()
    clients = [Subscriber(channel) for _ in range(4)]
    for client, srv in zip(clients, (a, b, a, b)):
        assert client.connect(srv)["seq"] == 0
    send_a, send_b = http_sender(a, channel), http_sender(b, channel)
    for n in range(200):
        (send_a if n % 2 else send_b)(n)
    for client in clients:
        client.read(200)
        assert client.numbers == list(range(200)) and client.seq == 200
        with pytest.raises(TimeoutError):
            client.ws.recv(timeout=0.2)  # and nothing more
        client.close()


def test_publisher_in_another_process(pair, redis_url):
    """Publisher.from_url in a plain Python process reaches clients on every server."""
    a, b = pair
    channel = fresh_channel()
    clients = [Subscriber(channel) for _ in range(2)]
    clients[0].connect(a)
    clients[1].connect(b)
    script = (
        "import sys\n"
        "from flask_robe_sockets import Publisher\n"
        "publisher = Publisher.from_url(sys.argv[1])\n"
        "print(publisher[sys.argv[2]].send('message', text='hi'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, redis_url, channel], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    for client in clients:
        assert json.loads(client.ws.recv(timeout=5)) == {
            "channel": channel, "event": "message", "data": {"text": "hi"}, "seq": 1,
        }
        client.close()


def test_publisher_in_process_and_errors(pair, redis_url):
    """The test process's own Publisher sends; a dead Redis raises PublishError at once."""
    a, _ = pair
    channel = fresh_channel()
    client = Subscriber(channel)
    client.connect(a)
    with Publisher.from_url(redis_url) as publisher:
        assert publisher[channel].send("n", n=7) == 1
        assert publisher.send(channel, "n", {"n": 8}) == 2
        with pytest.raises(ValueError):
            publisher["bad channel"]
    client.read(2)
    assert client.numbers == [7, 8]
    client.close()
    with Publisher.from_url(f"redis://127.0.0.1:{free_port()}/0") as nowhere:
        with pytest.raises(PublishError, match="did not take it"):
            nowhere[channel].send("n", n=1)


def test_ticket_used_on_one_server_is_refused_on_the_other(pair):
    """A ticket's nonce is claimed in Redis: once used on one server, every server refuses it."""
    a, b = pair
    ticket = a.ticket()
    with connect(f"{a.ws_url}?ticket={ticket}", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
    for srv in (b, a):
        with pytest.raises(InvalidStatus) as refused:
            with connect(f"{srv.ws_url}?ticket={ticket}", open_timeout=5):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body) == {"error": "ticket_used"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_recovery_after_a_cut_connection(backend, request):
    """A client cut off while a sequence is sent gets every number once, in order, after reconnecting."""
    channel = fresh_channel("rec")
    if backend == "memory":
        first = second = request.getfixturevalue("memory_server")
        send = http_sender(first, channel)
    else:
        first, second = request.getfixturevalue("pair")
        publisher = Publisher.from_url(request.getfixturevalue("redis_url"), history_size=1000)
        request.addfinalizer(publisher.close)
        send = lambda n: publisher[channel].send("n", n=n)  # noqa: E731
    client = Subscriber(channel)
    client.connect(first)
    sender = Sender(send, 300)
    sender.start()
    client.read(60)
    client.cut()
    cut_at = sender.sent
    wait_until(lambda: sender.sent >= cut_at + 20 or not sender.is_alive(), 10, message="sends during the cut")
    answer = client.connect(second)
    assert answer["recovered"] is True
    sender.finish()
    client.read(300)
    assert client.numbers == list(range(300))
    client.close()


def test_worker_killed_clients_recover_on_a_survivor(pair, redis_url):
    """A worker killed with SIGKILL: its clients reconnect to another server and miss nothing."""
    survivor = pair[1]
    victim = Gunicorn({"ROBE_SOCKETS_REDIS_URL": redis_url, **HISTORY})
    try:
        channel = fresh_channel("kill")
        clients = [Subscriber(channel) for _ in range(3)]
        for client in clients:
            client.connect(victim)
        publisher = Publisher.from_url(redis_url, history_size=1000)
        sender = Sender(lambda n: publisher[channel].send("n", n=n), 300)
        sender.start()
        for client in clients:
            client.read(40)
        os.kill(victim.stats()["pid"], signal.SIGKILL)
        for client in clients:
            client.read_until_closed()
            client.close()
        for client in clients:
            assert client.connect(survivor)["recovered"] is True
        sender.finish()
        for client in clients:
            client.read(300)
            assert client.numbers == list(range(300))
            client.close()
        publisher.close()
    finally:
        victim.stop()


def test_redis_restart_under_load(tmp_path):
    """Redis stops and comes back: sends fail loudly meanwhile, workers reconnect and deliver again."""
    store = RedisServer()
    servers = []
    try:
        config = {"ROBE_SOCKETS_REDIS_URL": store.url, **HISTORY}
        servers = [Gunicorn(config) for _ in range(2)]
        pids = [srv.stats()["pid"] for srv in servers]
        channel = fresh_channel("restart")
        clients = [Subscriber(channel) for _ in servers]
        for client, srv in zip(clients, servers):
            client.connect(srv)

        ok: list[int] = []
        failed: list[dict] = []
        stop = threading.Event()

        def load() -> None:
            http = requests.Session()
            for n in range(100_000):  # bounded; the test stops it much sooner
                if stop.is_set():
                    return
                response = http.post(f"{servers[n % 2].url}/broadcast/{channel}/n", json={"n": n}, timeout=10)
                if response.status_code == 200:
                    ok.append(n)
                else:
                    assert response.status_code == 503, response.text
                    failed.append({"n": n, **response.json()})
                stop.wait(0.005)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            wait_until(lambda: len(ok) >= 30, 10, message="sends before the stop")
            store.stop()
            wait_until(lambda: len(failed) >= 5, 10, message="refused sends while Redis is down")
            assert failed[0]["error"] == "publish_failed"
            assert "did not take it" in failed[0]["message"] and str(store.port) in failed[0]["message"]
            for srv in servers:  # the listeners back off while it is away
                wait_until(lambda: "still unreachable after 3 attempts" in srv.output(), 10, message="backoff log")
            before_restart = len(ok)
            store = RedisServer(port=store.port)
            wait_until(lambda: len(ok) >= before_restart + 30, 20, message="sends after the restart")
            for srv in servers:
                wait_until(lambda: "reconnected to Redis" in srv.output(), 20, message="reconnect log")
            wait_until(lambda: len(ok) >= before_restart + 60, 20, message="more sends after reconnecting")
        finally:
            stop.set()
            loader.join(15)
        assert not loader.is_alive()
        for client in clients:
            client.read(len(ok), new_epoch=True)
            # Every send that succeeded arrived once, in order; a send
            # refused while Redis was down never arrived.
            assert client.numbers == ok
            client.close()
        for srv in servers:
            log = srv.output()
            assert "lost the Redis pub/sub connection" in log
            assert "reconnected to Redis" in log
        assert [srv.stats()["pid"] for srv in servers] == pids, "a worker was restarted"
    finally:
        for srv in servers:
            srv.stop()
        store.stop()


@pytest.fixture(params=["memory", "redis"])
def make_backend(request):
    """Build a backend of either kind (no listener: this process is not gevent's)."""
    from flask_robe_sockets.backends import create_backend

    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    made = []

    def make(**options):
        made.append(create_backend(url, **options))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def test_history_replays_exactly_the_missed_broadcasts(make_backend):
    """recover() replays the frames after since, as published; too old a since or another epoch replays nothing."""
    backend = make_backend(history_size=5, history_ttl=60)
    channel = fresh_channel()
    seqs = [backend.publish(channel, "n", {"n": n}) for n in range(8)]
    assert seqs == list(range(1, 9))
    recovery = backend.recover(channel, 3, None)
    assert (recovery.recovered, recovery.seq) == (True, 8)
    assert recovery.frames == [
        (seq, frames.ws_frame(protocol.encode("n", {"n": seq - 1}, channel, seq=seq))) for seq in range(4, 9)
    ]
    assert backend.recover(channel, 8, recovery.epoch).recovered is True
    assert backend.recover(channel, 8, recovery.epoch).frames == []
    for since, epoch in ((2, None), (9, None), (5, "another epoch")):
        missed = backend.recover(channel, since, epoch)
        assert (missed.recovered, missed.frames, missed.seq) == (False, [], 8), (since, epoch)
    assert backend.recover(channel, None, None).recovered is False


def test_history_expires(make_backend):
    """Broadcasts older than the history TTL are not replayed."""
    backend = make_backend(history_size=5, history_ttl=0.3)
    channel = fresh_channel()
    backend.publish(channel, "n", {"n": 0})
    backend.publish(channel, "n", {"n": 1})
    assert backend.recover(channel, 1, None).recovered is True
    wait_until(lambda: not backend.recover(channel, 1, None).recovered, 5, 0.05, "the history to expire")


def test_epoch_changes_when_redis_loses_the_channel(redis_url):
    """After Redis lost a channel's keys, seq starts again from 1 under a new epoch."""
    publisher = Publisher.from_url(redis_url)
    channel = fresh_channel()
    assert publisher[channel].send("n", n=0) == 1
    before = publisher.backend.recover(channel, 0, None)
    redis.Redis.from_url(redis_url).flushdb()
    assert publisher[channel].send("n", n=1) == 1
    after = publisher.backend.recover(channel, 0, before.epoch)
    assert after.epoch != before.epoch and (after.recovered, after.seq) == (False, 1)
    publisher.close()
