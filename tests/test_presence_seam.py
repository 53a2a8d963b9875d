"""Presence at the seam of a join, on a worker whose Redis connections lag
behind a proxy: its pub/sub connection, or its command connections.

A worker that already has members on a channel answers a new joiner from its
own view; that is right only because ``RedisBackend.presence_join`` waits for
its listener to pass the joiner's own event first. On loopback the pub/sub
message arrives as fast as the join script's reply, so here a proxy holds back
what Redis sends on every connection that subscribed, and the wait is needed
for real. With the command connections held back instead, the application's
unsubscribe lands while a subscribe is still in flight.
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from flask_robe_sockets import Publisher

from .servers import Gunicorn, wait_until
from .test_presence import PRESENCE, Client

pytestmark = pytest.mark.redis

#: A database of this module's own (see RedisServer.database).
DATABASE = 8
#: How long the proxy holds back what Redis sends a subscribed connection.
DELAY = 0.3


def _command(buffer: bytes, pos: int) -> tuple[bytes, int] | None:
    """The upper-cased name of the RESP command at ``pos`` and where it ends,
    or ``None`` while it is incomplete."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return None
    if buffer[pos:pos + 1] != b"*":  # an inline command: one line of words
        return buffer[pos:end].split(b" ", 1)[0].upper(), end + 2
    count, pos, name = int(buffer[pos + 1:end]), end + 2, b""
    for i in range(count):  # bulk strings: $<size>\r\n<bytes>\r\n
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        start = end + 2
        size = int(buffer[pos + 1:end])
        if len(buffer) < start + size + 2:
            return None
        if i == 0:
            name = buffer[start:start + size].upper()
        pos = start + size + 2
    return name, pos


class _Pair:
    """One client connection and its upstream one to Redis."""

    def __init__(self, conn: socket.socket, upstream: socket.socket) -> None:
        self.conn, self.upstream = conn, upstream
        #: Set once the client sent SUBSCRIBE or PSUBSCRIBE.
        self.subscribed = threading.Event()
        #: Redis's bytes with the time each may go, in order; ``None`` ends.
        self.outgoing: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

    def cut(self) -> None:
        for sock in (self.conn, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.outgoing.put(None)


class LaggingProxy:
    """A loopback TCP proxy to Redis that delivers what Redis sends on a
    subscribed connection ``delay`` seconds late, in order; every other
    connection passes at once. With ``commands``, the other way round: the
    connections that never subscribed lag. Three threads per connection, at
    most ``max_connections`` connections in all."""

    def __init__(self, port: int, delay: float, commands: bool = False, max_connections: int = 32) -> None:
        self.target = ("127.0.0.1", port)
        self.delay = delay
        self.commands = commands
        self.max_connections = max_connections
        #: How many commands of each name came on connections that never subscribed.
        self._seen: dict[bytes, int] = {}
        self._seen_changed = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def database(self, number: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{number}"

    def subscribed(self) -> int:
        """How many connections subscribed."""
        with self._lock:
            return sum(pair.subscribed.is_set() for pair in self._pairs)

    def seen(self, name: bytes) -> int:
        """How many ``name`` commands came on connections that never subscribed."""
        with self._seen_changed:
            return self._seen.get(name, 0)

    def wait_seen(self, name: bytes, count: int, timeout: float = 10) -> None:
        with self._seen_changed:
            if not self._seen_changed.wait_for(lambda: self._seen.get(name, 0) >= count, timeout):
                raise AssertionError(f"no {count}th {name.decode()} within {timeout}s")

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._pairs) >= self.max_connections
            if full or self._closed.is_set():  # the bound: a leak of connections shows as refused ones
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            pair = _Pair(conn, upstream)
            with self._lock:
                self._pairs.append(pair)
            self._spawn(self._from_client, pair)
            self._spawn(self._from_redis, pair)
            self._spawn(self._to_client, pair)

    def _from_client(self, pair: _Pair) -> None:
        """Forward the client's commands at once, watching for a subscription."""
        buffer, pos = b"", 0
        try:
            while data := pair.conn.recv(65536):
                if not pair.subscribed.is_set():
                    buffer = buffer[pos:] + data
                    pos = 0
                    while (parsed := _command(buffer, pos)) is not None:
                        name, pos = parsed
                        if name in (b"SUBSCRIBE", b"PSUBSCRIBE"):
                            # Before the command goes on: its confirmation lags too.
                            pair.subscribed.set()
                            buffer, pos = b"", 0
                            break
                        with self._seen_changed:
                            self._seen[name] = self._seen.get(name, 0) + 1
                            self._seen_changed.notify_all()
                pair.upstream.sendall(data)
        except OSError:
            pass
        finally:
            pair.cut()

    def _from_redis(self, pair: _Pair) -> None:
        """Stamp each read of Redis's bytes with the time it may go on."""
        try:
            while data := pair.upstream.recv(65536):
                lags = pair.subscribed.is_set() != self.commands
                due = time.monotonic() + self.delay if lags else 0.0
                pair.outgoing.put((due, data))
        except OSError:
            pass
        finally:
            pair.cut()

    def _to_client(self, pair: _Pair) -> None:
        """Send Redis's bytes to the client in order, each once it is due."""
        try:
            while (item := pair.outgoing.get()) is not None:
                due, data = item
                if self._closed.wait(max(0.0, due - time.monotonic())):
                    break
                pair.conn.sendall(data)
        except OSError:
            pass
        finally:
            pair.cut()

    def close(self) -> None:
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self._acceptor.join(5)
        self.listener.close()
        with self._lock:  # no connection comes any more
            pairs, threads = list(self._pairs), [self._acceptor, *self._threads]
        for pair in pairs:
            pair.cut()
        for thread in threads:
            thread.join(5)
        for pair in pairs:
            pair.conn.close()
            pair.upstream.close()
        assert not any(thread.is_alive() for thread in threads), "a proxy thread did not end"


@pytest.fixture(scope="module")
def redis_url(redis_server):
    with redis_server.flushed(DATABASE) as url:
        yield url


def _worker_behind_proxy(redis_server, commands: bool):
    """One gevent worker that reaches Redis only through a lagging proxy; both."""
    proxy = LaggingProxy(redis_server.port, DELAY, commands=commands)
    try:
        srv = Gunicorn({"ROBE_SOCKETS_REDIS_URL": proxy.database(DATABASE), **PRESENCE})
        yield proxy, srv
        srv.stop()
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def pubsub_lags(redis_server, redis_url):
    yield from _worker_behind_proxy(redis_server, commands=False)


@pytest.fixture(scope="module")
def commands_lag(redis_server, redis_url):
    yield from _worker_behind_proxy(redis_server, commands=True)


def wire(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The wire form of ``members``, in id order, with their counts."""
    users = {m["identity"] for m in members if m["identity"] is not None}
    return {"members": sorted(members, key=lambda m: m["id"]), "clients": len(members), "users": len(users)}


def in_order(presence: dict[str, Any]) -> dict[str, Any]:
    return {**presence, "members": sorted(presence["members"], key=lambda m: m["id"])}


def test_joiners_on_a_lagging_worker_see_themselves_and_every_earlier_join_once(pubsub_lags, redis_url):
    """Each joiner's snapshot, taken from the worker's view, lists exactly the
    members before it and itself, though its own @join is still on its way to
    the worker when Redis has recorded it (as a join from elsewhere just
    before was when it asked); after it, each member hears @join only for
    those who came later, once each, and @presence agrees."""
    from flask_robe_sockets.backends.redis import RedisBackend

    proxy, lagging_worker = pubsub_lags
    channel = f"room:{uuid.uuid4().hex[:10]}"
    elsewhere = RedisBackend(redis_url)  # straight to Redis, as another worker
    clients: list[Client] = []
    members: list[dict[str, Any]] = []  # in the order of their joins
    snapshots: dict[str, dict[str, Any]] = {}

    def join_elsewhere(n: int, identity: str | None) -> dict[str, Any]:
        member = {"id": f"elsewhere-{n}", "identity": identity, "info": None}
        elsewhere.presence_join(channel, member, "elsewhere-worker")
        members.append(member)
        return member

    try:
        join_elsewhere(0, "ghost")
        # alice twice (two tabs), and a member without identity: users != clients.
        for n, user in enumerate(["alice", "bob", "alice", "carol"], start=1):
            client = Client(lagging_worker, user)
            clients.append(client)
            if n > 1:
                # Just before the joiner asks: this @join is still on its way to the worker then.
                join_elsewhere(n, None if n == 3 else f"ghost{n}")
            members.append({"id": client.id, "identity": user, "info": None})
            snapshots[client.id] = client.subscribe(channel)["presence"]
        assert proxy.subscribed() == 1  # the worker's pub/sub connection, and only it lags

        for client in clients:
            mine = next(i for i, m in enumerate(members) if m["id"] == client.id)
            got = in_order(snapshots[client.id])
            assert client.id in {m["id"] for m in got["members"]}, f"{client.id} is not in its own snapshot: {got}"
            assert got == wire(members[:mine + 1]), f"the snapshot of member {mine}"

        # One more join from elsewhere marks the end: events come in version order.
        sent = time.monotonic()
        last = join_elsewhere(len(members), "ghost-last")
        for client in clients:
            mine = next(i for i, m in enumerate(members) if m["id"] == client.id)
            heard = []
            while not heard or heard[-1].get("data") != last:
                assert len(heard) < len(members), f"member {mine} heard more than every join: {heard}"
                heard.append(client.next_event(timeout=10))
            assert time.monotonic() - sent >= DELAY  # the worker heard of it late, as meant
            assert [(f["event"], f["data"]["id"]) for f in heard] == [
                ("@join", m["id"]) for m in members[mine + 1:]
            ], f"the events after the snapshot of member {mine}"
            assert heard == [{"channel": channel, "event": "@join", "data": m} for m in members[mine + 1:]]
            assert client.flush() == []
            assert in_order(client.request("@presence", channel)["data"]) == wire(members)
    finally:
        for client in clients:
            client.close()
        elsewhere.close()


@pytest.mark.parametrize("during, command, announced", [
    # The history read (recovery's script): the join is never recorded.
    ("history", b"EVALSHA", []),
    # The presence join itself (this worker's list of channels comes first):
    # it is recorded, and undone at once, so everyone who heard the @join hears the @leave.
    ("join", b"SADD", ["@join", "@leave"]),
])
def test_unsubscribed_while_its_subscribe_is_in_flight(commands_lag, redis_url, during, command, announced):
    """The application's unsubscribe lands while Redis has not answered the
    subscribe yet: the client gets the @unsubscribed and no @subscribed after
    it, and it is not left listed as a member."""
    slow_commands, slow_worker = commands_lag
    channel = f"room:{uuid.uuid4().hex[:10]}"
    user = f"kicked-{during}"
    publisher = Publisher.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    listener = admin.pubsub()
    client = Client(slow_worker, user)
    try:
        listener.subscribe(f"robe:{DATABASE}:{channel}")
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        before = slow_commands.seen(command)
        client.ws.send(json.dumps({"channel": channel, "event": "@subscribe", "ref": "s"}))
        # The worker is waiting for Redis's late answer to that command now.
        slow_commands.wait_seen(command, before + 1)
        publisher.unsubscribe(channel, identity=user, reason="removed")
        assert client.next_event() == {"channel": channel, "event": "@unsubscribed", "data": {"reason": "removed"}}
        assert client.flush() == []  # the ping's answer comes after the subscribe's end: no @subscribed
        assert publisher[channel].presence().members == ()
        heard = []
        while (message := listener.get_message(timeout=2 * DELAY)) is not None:
            heard.append(json.loads(message["data"].split(b" ", 2)[2]))
        assert [(f["event"], f["data"]["id"]) for f in heard] == [(event, client.id) for event in announced]
    finally:
        client.close()
        listener.close()
        admin.close()
        publisher.close()


def test_a_worker_follows_redis_numbering_again_after_redis_lost_its_data(redis_server, redis_url):
    """Redis restarted without its data numbers presence events from 0 again:
    once back, the worker hands its members the difference (everyone left),
    and a new joiner's snapshot, taken from the worker's view, lists itself."""
    srv = Gunicorn({"ROBE_SOCKETS_REDIS_URL": redis_url, "ROBE_SOCKETS_PRESENCE_TIMEOUT": 300, **PRESENCE})
    admin = redis.Redis.from_url(redis_url)
    clients = []
    try:
        channel = f"room:{uuid.uuid4().hex[:10]}"
        observer, other = Client(srv, "olga"), Client(srv, "bob")
        clients += [observer, other]
        observer.subscribe(channel)
        other.subscribe(channel)
        assert observer.next_event()["event"] == "@join"
        admin.flushdb()  # what a restart without persistence leaves
        assert admin.client_kill_filter(_type="pubsub") >= 1
        assert observer.next_event(timeout=10) == {
            "channel": channel, "event": "@leave", "data": {"id": other.id, "identity": "bob", "info": None},
        }
        joiner = Client(srv, "jo")
        clients.append(joiner)
        mine = joiner.subscribe(channel)["presence"]
        assert [m["id"] for m in mine["members"]] == [joiner.id]
        assert observer.next_event()["data"]["id"] == joiner.id
    finally:
        for client in clients:
            client.close()
        admin.close()
        srv.stop()


def test_a_joiner_waits_for_a_resync_that_failed(redis_server, redis_url):
    """Back from an outage, a worker could not read a channel's members (its
    Redis user may not run scripts for a while), so its view misses a join
    made meanwhile: the next joiner resyncs it first, and its snapshot lists
    that member."""
    from flask_robe_sockets.backends.redis import RedisBackend

    admin = redis.Redis.from_url(redis_url)
    user, password = f"robe-{uuid.uuid4().hex[:6]}", "seam"
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url = redis_url.replace("redis://", f"redis://{user}:{password}@")
    srv = Gunicorn({"ROBE_SOCKETS_REDIS_URL": url, "ROBE_SOCKETS_PRESENCE_TIMEOUT": 300, **PRESENCE})
    elsewhere = RedisBackend(redis_url)
    clients = []
    try:
        channel = f"room:{uuid.uuid4().hex[:10]}"
        observer = Client(srv, "olga")
        clients.append(observer)
        observer.subscribe(channel)
        admin.execute_command("ACL", "SETUSER", user, "-evalsha", "-eval")
        assert admin.client_kill_filter(_type="pubsub") >= 1
        # Published before the worker's listener is back (its first retry waits at least 50 ms).
        missed = {"id": "missed-member", "identity": "max", "info": None}
        elsewhere.presence_join(channel, missed, "elsewhere-worker")
        wait_until(lambda: "bringing the members of" in srv.output(), message="the resync to fail")
        admin.execute_command("ACL", "SETUSER", user, "+evalsha", "+eval")
        joiner = Client(srv, "jo")
        clients.append(joiner)
        snapshot = joiner.subscribe(channel)["presence"]
        assert {m["id"] for m in snapshot["members"]} == {observer.id, "missed-member", joiner.id}
        # The observer hears the member it missed (the difference), then the joiner.
        assert [observer.next_event()["data"]["id"] for _ in range(2)] == ["missed-member", joiner.id]
    finally:
        for client in clients:
            client.close()
        elsewhere.close()
        srv.stop()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
