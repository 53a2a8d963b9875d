"""Presence (PROTOCOL.md section 7), end to end: real gunicorn gevent servers,
on the memory backend and two sharing a real redis-server, clients of the
``websockets`` library."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import threading
import time
import uuid

import pytest
import redis
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from flask_robe_sockets import Member, Presence, Publisher

from .servers import Gunicorn, wait_until

PRESENCE = {"ROBE_SOCKETS_PRESENCE": ["room:*", "pinfo:*", "doc:42"]}


def fresh(prefix: str = "room") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def redis_url(redis_server):
    return redis_server.database(3)


@pytest.fixture(autouse=True)
def flush(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield
    client.close()


@pytest.fixture(scope="module")
def memory_server():
    srv = Gunicorn(PRESENCE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def redis_pair(redis_url):
    servers = []
    try:
        for _ in range(2):
            servers.append(Gunicorn({"ROBE_SOCKETS_REDIS_URL": redis_url, **PRESENCE}))
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture(params=["memory", "redis"])
def pair(request):
    """Two servers sharing presence: one memory server twice, or two on one Redis."""
    if request.param == "memory":
        srv = request.getfixturevalue("memory_server")
        return [srv, srv]
    return request.getfixturevalue("redis_pair")


class Client:
    """One socket; answers are read by ref, the events in between are kept in order."""

    def __init__(self, srv: Gunicorn, user: str | None = None) -> None:
        http = requests.Session()
        if user is not None:
            http.post(srv.url + "/login", data={"user": user}, timeout=5).raise_for_status()
        self._cm = connect(f"{srv.ws_url}?ticket={srv.ticket(http)}", open_timeout=5, max_queue=None)
        self.ws = self._cm.__enter__()
        hello = json.loads(self.ws.recv(timeout=5))
        assert hello["event"] == "@connected", hello
        self.id = hello["data"]["id"]
        self.events: list[dict] = []
        self._refs = 0

    def request(self, event: str, channel: str | None = None, data=None, timeout: float = 10) -> dict:
        """Send a request; return its answer, keeping the frames before it in ``events``."""
        self._refs += 1
        ref = self._refs
        frame = {"event": event, "ref": ref, "data": data}
        if channel is not None:
            frame["channel"] = channel
        self.ws.send(json.dumps(frame))
        deadline = time.monotonic() + timeout
        while True:
            got = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if got.get("ref") == ref:
                return got
            self.events.append(got)

    def subscribe(self, channel: str) -> dict:
        answer = self.request("@subscribe", channel)
        assert answer["event"] == "@subscribed", answer
        return answer["data"]

    def next_event(self, timeout: float = 10) -> dict:
        if self.events:
            return self.events.pop(0)
        return json.loads(self.ws.recv(timeout=timeout))

    def flush(self) -> list[dict]:
        """Every event that arrived before a round trip made now."""
        self.request("@ping")
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def ids(presence: dict) -> set[str]:
    return {member["id"] for member in presence["members"]}


def test_snapshot_join_and_leave_reach_the_others_not_oneself(pair):
    """@subscribed lists the members with the joiner; the others get @join and
    @leave with the member object, without seq; the member never its own."""
    channel = fresh()
    a = Client(pair[0], "alice")
    b = Client(pair[1], "bob")
    try:
        first = a.subscribe(channel)["presence"]
        assert first == {"members": [{"id": a.id, "identity": "alice", "info": None}], "clients": 1, "users": 1}
        second = b.subscribe(channel)["presence"]
        assert ids(second) == {a.id, b.id} and second["clients"] == 2 and second["users"] == 2
        join = a.next_event()
        assert join == {"channel": channel, "event": "@join", "data": {"id": b.id, "identity": "bob", "info": None}}
        assert b.flush() == []  # no @join of its own
        assert b.request("@unsubscribe", channel)["event"] == "@unsubscribed"
        leave = a.next_event()
        assert leave == {"channel": channel, "event": "@leave", "data": {"id": b.id, "identity": "bob", "info": None}}
        assert b.flush() == []  # no @leave of its own
        assert a.request("@presence", channel)["data"] == first
    finally:
        a.close()
        b.close()


def test_presence_request_and_its_refusals(pair):
    """@presence answers the members; not_subscribed comes before presence_disabled;
    a bad channel name is bad_channel."""
    a = Client(pair[0])
    try:
        room = fresh()
        assert a.request("@presence", room)["data"]["code"] == "not_subscribed"
        assert a.request("@presence", "chat")["data"]["code"] == "not_subscribed"  # neither: the first check
        a.subscribe("chat")
        chat = a.request("@presence", "chat")
        assert chat["event"] == "@error" and chat["data"]["code"] == "presence_disabled", chat
        assert "presence" not in a.subscribe(fresh("plain"))
        assert a.request("@presence", "bad channel!")["data"]["code"] == "bad_channel"
        a.subscribe(room)
        answer = a.request("@presence", room)
        assert answer["event"] == "@presence" and answer["channel"] == room
        assert answer["data"] == {"members": [{"id": a.id, "identity": "anonymous", "info": None}], "clients": 1, "users": 1}
        assert "seq" not in answer
        assert a.subscribe("doc:42")["presence"]["clients"] >= 1  # a name, not a prefix
        assert "presence" not in a.subscribe("doc:421")
    finally:
        a.close()


def test_info_counts_and_two_tabs_of_one_user(pair):
    """info is the hook's; clients counts connections, users distinct identities;
    sockets[ch].presence() and Publisher list the same on every worker."""
    channel = fresh("pinfo")
    tabs = [Client(pair[0], "alice"), Client(pair[1], "alice"), Client(pair[1], "bob")]
    try:
        for tab in tabs:
            last = tab.subscribe(channel)["presence"]
        assert last["clients"] == 3 and last["users"] == 2
        assert {m["id"]: m["info"] for m in last["members"]} == {
            tabs[0].id: {"name": "alice", "on": channel},
            tabs[1].id: {"name": "alice", "on": channel},
            tabs[2].id: {"name": "bob", "on": channel},
        }
        for srv in pair:
            listed = requests.get(f"{srv.url}/presence/{channel}", timeout=5).json()
            assert sorted(listed["members"], key=lambda m: m["id"]) == sorted(last["members"], key=lambda m: m["id"])
            assert (listed["clients"], listed["users"]) == (3, 2)
    finally:
        for tab in tabs:
            tab.close()


def test_presence_info_raising_or_not_json_gives_null_info(pair):
    """A presence_info hook that raises or returns non-JSON is logged; the join succeeds with info null."""
    for prefix in ("pinfo:raise", "pinfo:set"):
        channel = fresh(prefix)
        a = Client(pair[0], "carol")
        try:
            presence = a.subscribe(channel)["presence"]
            assert presence["members"] == [{"id": a.id, "identity": "carol", "info": None}]
        finally:
            a.close()
    wait_until(lambda: "presence_info failed or gave non-JSON" in pair[0].output(), 5, message="the log line")


def test_members_leave_when_their_connection_ends(pair):
    """Close, TCP reset and unsubscribe each send one @leave; the listing drops them."""
    channel = fresh()
    watcher = Client(pair[0])
    try:
        watcher.subscribe(channel)
        for end in ("close", "reset"):
            member = Client(pair[1])
            member.subscribe(channel)
            assert watcher.next_event()["event"] == "@join"
            if end == "close":
                member.close()
            else:
                member.ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                member.ws.socket.close()
            leave = watcher.next_event()
            assert (leave["event"], leave["data"]["id"]) == ("@leave", member.id), end
        assert ids(watcher.request("@presence", channel)["data"]) == {watcher.id}
        listed = requests.get(f"{pair[1].url}/presence/{channel}", timeout=5).json()
        assert ids(listed) == {watcher.id}
    finally:
        watcher.close()


class View:
    """A channel's members as one observer keeps them: snapshot plus events,
    failing on any event the view already had (or lacked)."""

    def __init__(self, client: Client, channel: str) -> None:
        self.client, self.channel = client, channel
        self.members = {m["id"]: m for m in client.subscribe(channel)["presence"]["members"]}
        self.applied = 0

    def apply(self, frame: dict) -> None:
        member = frame["data"]
        if frame["event"] == "@join":
            assert member["id"] not in self.members, f"{member} joined twice"
            self.members[member["id"]] = member
        elif frame["event"] == "@leave":
            assert self.members.get(member["id"]) == member, f"{member} left without being there"
            del self.members[member["id"]]
        self.applied += 1

    def catch_up(self) -> None:
        for frame in self.client.flush():
            self.apply(frame)


def test_consistency_under_churn_on_two_workers(pair, redis_url):
    """30 clients on two workers (or on one memory worker) join and leave at
    random; each worker's observer, from its snapshot plus events (none applied
    twice), ends equal to sockets[ch].presence() (Publisher's with Redis) and
    to @presence."""
    channel = fresh()
    observers = [View(Client(srv), channel) for srv in pair]
    stop = threading.Event()
    errors: list[BaseException] = []

    def read(view: View) -> None:
        try:
            while not stop.is_set():
                try:
                    frame = json.loads(view.client.ws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                view.apply(frame)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def churn(seed: int) -> None:
        rnd = random.Random(seed)
        srv = pair[seed % 2]
        client = None
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if client is None:
                    client = Client(srv, f"user{seed % 7}")
                action = rnd.random()
                if action < 0.5:
                    client.request("@subscribe", channel)
                elif action < 0.8:
                    client.request("@unsubscribe", channel)
                else:
                    client.close()
                    client = None
        except BaseException as exc:
            errors.append(exc)
        finally:
            if client is not None and seed % 3 == 0:
                client.close()  # the others stay, subscribed or not
            elif client is not None:
                keep.append(client)

    keep: list[Client] = []
    readers = [threading.Thread(target=read, args=(view,), daemon=True) for view in observers]
    for thread in readers:
        thread.start()
    workers = [threading.Thread(target=churn, args=(seed,), daemon=True) for seed in range(30)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    stop.set()
    for thread in readers:
        thread.join(10)
    try:
        assert not errors, errors
        assert all(not thread.is_alive() for thread in workers + readers)
        shared = pair[0] is not pair[1]
        listed = Publisher.from_url(redis_url) if shared else None

        def listing() -> dict:
            if listed is not None:
                return {m.id: m.to_dict() for m in listed[channel].presence().members}
            served = requests.get(f"{pair[0].url}/presence/{channel}", timeout=5).json()
            return {m["id"]: m for m in served["members"]}

        try:
            def settled():
                for view in observers:
                    view.catch_up()
                expected = listing()
                return all(view.members == expected for view in observers) and expected
            expected = wait_until(settled, 10, 0.1, "every view to equal the listing")
        finally:
            if listed is not None:
                listed.close()
        assert sum(view.applied for view in observers) > 60  # the churn really churned
        for view, srv in zip(observers, pair):
            assert {m["id"]: m for m in view.client.request("@presence", channel)["data"]["members"]} == expected
            served = requests.get(f"{srv.url}/presence/{channel}", timeout=5).json()
            assert {m["id"]: m for m in served["members"]} == expected
    finally:
        for view in observers:
            view.client.close()
        for client in keep:
            client.close()


def test_a_killed_workers_members_leave_once_for_everyone(redis_url):
    """SIGKILL one of three workers: within PRESENCE_TIMEOUT each subscriber
    on the two others gets exactly one @leave per lost member; listings are clean."""
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url, "ROBE_SOCKETS_PRESENCE_TIMEOUT": 1.5,
              "ROBE_SOCKETS_WORKER_TTL": 1.5, **PRESENCE}
    servers = []
    try:
        for _ in range(3):
            servers.append(Gunicorn(config))
        doomed, *alive = servers
        channel = fresh()
        observers = [Client(srv) for srv in alive for _ in range(2)]
        for obs in observers:
            obs.subscribe(channel)
        lost = [Client(doomed, f"lost{i}") for i in range(3)]
        for member in lost:
            member.subscribe(channel)
        for obs in observers:
            obs.flush()
        pid = doomed.stats()["pid"]
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        for obs in observers:
            got = [obs.next_event(timeout=10) for _ in lost]
            assert sorted((f["event"], f["data"]["id"]) for f in got) == sorted(("@leave", m.id) for m in lost)
        assert time.monotonic() - started < 1.5 + 3  # the timeout, a sweep interval and a report's
        # Two more sweeps of each survivor: nobody announces them again.
        time.sleep(1.5)
        for obs in observers:
            assert obs.flush() == []
            assert ids(obs.request("@presence", channel)["data"]) == {o.id for o in observers}
        for srv in alive:
            listed = requests.get(f"{srv.url}/presence/{channel}", timeout=5).json()
            assert ids(listed) == {o.id for o in observers}
        for obs in observers:
            obs.close()
    finally:
        for srv in servers:
            srv.stop()


def test_member_and_presence_objects():
    """Member and Presence give the wire form; users counts distinct non-null identities."""
    members = [Member("a", "alice", {"n": 1}), Member("b", "alice", None), Member("c", None, None)]
    presence = Presence.of(members)
    assert (presence.clients, presence.users) == (3, 1)
    assert presence.to_dict() == {
        "members": [
            {"id": "a", "identity": "alice", "info": {"n": 1}},
            {"id": "b", "identity": "alice", "info": None},
            {"id": "c", "identity": None, "info": None},
        ],
        "clients": 3,
        "users": 1,
    }
    with pytest.raises(Exception):
        members[0].id = "x"


def test_events_lost_while_cut_off_from_redis_reach_members_as_a_difference(redis_pair, redis_url):
    """A join and a leave published while a worker's pub/sub connection is down
    reach its members once it is back (as the difference to its view), once each."""
    from flask_robe_sockets.backends.redis import RedisBackend

    channel = fresh()
    observer = Client(redis_pair[1])
    backend = RedisBackend(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        gone = {"id": "gone-member", "identity": "ghost", "info": None}
        backend.presence_join(channel, gone, "test-process")
        assert ids(observer.subscribe(channel)["presence"]) == {observer.id, "gone-member"}
        ghost = {"id": "new-member", "identity": "ghost", "info": {"n": 1}}
        # Every listener loses its connection, and the join and leave happen
        # before any can be back (the first retry waits at least 50 ms).
        assert admin.client_kill_filter(_type="pubsub") >= 1
        backend.presence_join(channel, ghost, "test-process")
        backend.presence_leave(channel, "gone-member", "test-process")
        got = sorted((observer.next_event(timeout=10), observer.next_event(timeout=10)), key=lambda f: f["event"])
        assert got == [
            {"channel": channel, "event": "@join", "data": ghost},
            {"channel": channel, "event": "@leave", "data": gone},
        ]
        assert observer.flush() == []
        assert ids(observer.request("@presence", channel)["data"]) == {observer.id, "new-member"}
        backend.presence_leave(channel, "new-member", "test-process")
        assert observer.next_event()["event"] == "@leave"
    finally:
        observer.close()
        backend.close()
        admin.close()


def test_memory_backend_numbers_and_delivers_in_order_under_threads():
    """Joins and leaves from many threads (as under flask run): each gets its own
    version, events are handed over in version order, the listing ends exact."""
    import sys

    from flask_robe_sockets.backends.memory import MemoryBackend

    backend = MemoryBackend()
    seen: list[tuple[int, str, str]] = []
    returned: list[int] = []
    backend.start_presence(lambda channel, version, event, member, frame: seen.append((version, event, member["id"])))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    def churn(n: int) -> None:
        for i in range(300):
            member = {"id": f"{n}-{i % 3}", "identity": n, "info": None}
            if i % 2 == 0:
                returned.append(backend.presence_join("room:t", member, "w")[0])
            else:
                backend.presence_leave("room:t", member["id"], "w")

    # One member stays throughout, so that the listing is checked against a non-empty channel.
    returned.append(backend.presence_join("room:t", {"id": "stays", "identity": None, "info": None}, "w")[0])
    try:
        threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    versions = [version for version, _, _ in seen]
    assert versions == list(range(1, len(seen) + 1))
    assert sorted(returned) == sorted(v for v, event, _ in seen if event == "@join")
    members: set[str] = set()
    for _, event, member in seen:
        assert (member in members) == (event == "@leave"), (event, member)
        (members.add if event == "@join" else members.discard)(member)
    assert {m["id"] for m in backend.presence("room:t")} == members


def test_presence_settings_are_checked():
    """ROBE_SOCKETS_PRESENCE is a list of names or prefixes; the timeout is seconds above 0;
    one presence_info hook only."""
    from flask_robe_sockets import ConfigurationError, RobeSockets
    from flask_robe_sockets.config import Settings

    assert Settings(presence=["room:*", "doc:42"]).presence == ("room:*", "doc:42")
    for bad in ("room:*", [""], [1], None):
        with pytest.raises(ConfigurationError, match="ROBE_SOCKETS_PRESENCE must be a list"):
            Settings(presence=bad)
    for bad in (0, -1, "30", True):
        with pytest.raises(ConfigurationError, match="ROBE_SOCKETS_PRESENCE_TIMEOUT must be seconds above 0"):
            Settings(presence_timeout=bad)
    sockets = RobeSockets()
    sockets.presence_info(lambda connection, channel: None)
    with pytest.raises(ConfigurationError, match="a presence_info hook is already set"):
        sockets.presence_info(lambda connection, channel: None)


def test_subscribing_again_answers_the_members_without_a_second_join():
    """A second @subscribe to a presence channel lists the members again; nobody hears a join."""
    from flask import Flask

    from flask_robe_sockets import RobeSockets

    app = Flask(__name__)
    app.secret_key = "test"
    app.config["ROBE_SOCKETS_PRESENCE"] = ["room:*"]
    sockets = RobeSockets(app)
    with sockets.test_client(app, identity="alice") as alice, sockets.test_client(app, identity="bob") as bob:
        alice.subscribe("room:1")
        first = bob.subscribe("room:1")["presence"]
        assert [f["event"] for f in alice.received()] == ["@join"]
        again = bob.subscribe("room:1")["presence"]
        assert sorted(m["id"] for m in again["members"]) == sorted(m["id"] for m in first["members"])
        assert alice.received() == []
        with app.app_context():
            assert sockets["room:1"].presence().clients == 2


def test_members_a_sweep_removed_from_a_live_worker_are_closed_to_join_again(redis_url):
    """A worker taken for dead (frozen past the timeout) finds its members
    removed: it closes them with 1011 so that they reconnect and join again,
    and nobody hears a second @leave."""
    from flask_robe_sockets.backends.redis import RedisBackend

    config = {"ROBE_SOCKETS_REDIS_URL": redis_url, "ROBE_SOCKETS_PRESENCE_TIMEOUT": 1.5, **PRESENCE}
    servers = [Gunicorn(config), Gunicorn(config)]
    backend = RedisBackend(redis_url)
    try:
        channel = fresh()
        observer = Client(servers[1])
        observer.subscribe(channel)
        member = Client(servers[0])
        member.subscribe(channel)
        assert observer.next_event()["event"] == "@join"
        # What a survivor's sweep does to a frozen worker's member.
        backend.presence_leave(channel, member.id, "any-worker")
        assert (observer.next_event()["event"], observer.events) == ("@leave", [])
        with pytest.raises(ConnectionClosed):
            while True:
                member.ws.recv(timeout=5)
        assert member.ws.close_code == 1011
        assert observer.flush() == []
        assert ids(observer.request("@presence", channel)["data"]) == {observer.id}
        observer.close()
    finally:
        backend.close()
        for srv in servers:
            srv.stop()


def test_a_silent_worker_is_claimed_by_exactly_one_sweep_once(redis_url, caplog):
    """Sweeps racing over one silent worker: one of them takes its list of
    channels, so its members leave once each, and no later sweep takes it again."""
    import logging

    from flask_robe_sockets.backends.redis import RedisBackend

    caplog.set_level(logging.INFO, logger="flask_robe_sockets")
    backends = [RedisBackend(redis_url) for _ in range(4)]
    admin = redis.Redis.from_url(redis_url)
    listener = admin.pubsub()
    try:
        channels = [fresh(), fresh()]
        db = admin.connection_pool.connection_kwargs.get("db", 0)
        listener.subscribe(*(f"robe:{db}:{channel}" for channel in channels))
        for _ in channels:
            assert listener.get_message(timeout=5)["type"] == "subscribe"
        for channel in channels:
            for n in range(3):
                backends[0].presence_join(channel, {"id": f"m{n}", "identity": n, "info": None}, "silent-w")
        backends[0].announce("silent-w", {}, ttl=0.05)
        # With a timeout as long as the report's TTL, silent once the report lapsed.
        wait_until(lambda: backends[0].workers() == [], message="the report to lapse")
        start = threading.Barrier(len(backends))
        removed: list[int] = []

        def sweep(backend: RedisBackend) -> None:
            start.wait(5)
            removed.append(backend.sweep_presence(0.05, 0.05))

        threads = [threading.Thread(target=sweep, args=(b,)) for b in backends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(removed) == [0, 0, 0, 6]
        assert backends[1].sweep_presence(0.05, 0.05) == 0
        claims = [r for r in caplog.records if "silent-w stopped reporting" in r.getMessage()]
        assert len(claims) == 1, [r.getMessage() for r in claims]
        leaves = []
        while (message := listener.get_message(timeout=1)) is not None:
            leaves.append(message["data"])
        events = [json.loads(data.split(b" ", 2)[2]) for data in leaves]
        assert sorted((e["channel"], e["event"], e["data"]["id"]) for e in events if e["event"] == "@leave") == sorted(
            (channel, "@leave", f"m{n}") for channel in channels for n in range(3)
        )
        for channel in channels:
            assert backends[2].presence(channel) == []
    finally:
        listener.close()
        admin.close()
        for backend in backends:
            backend.close()


def test_presence_joins_are_rate_limited_per_caller(monkeypatch):
    """Subscribing and unsubscribing in a loop would send every other member a
    frame per request: past ROBE_SOCKETS_PRESENCE_RATE_LIMIT a caller's presence
    joins (all its connections together) are refused with rate_limited and
    announce nothing; channels without presence, rejoins and other callers are
    not charged, and the bucket refills at its rate."""
    from flask import Flask

    from flask_robe_sockets import RobeSockets, ratelimit
    from flask_robe_sockets.client import ReplyError
    from flask_robe_sockets.config import Settings

    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(ratelimit, "time", clock)
    app = Flask(__name__)
    app.secret_key = "test"
    app.config["ROBE_SOCKETS_PRESENCE"] = ["room:*"]
    app.config["ROBE_SOCKETS_PRESENCE_RATE_LIMIT"] = (0.5, 3)
    sockets = RobeSockets(app)
    with sockets.test_client(app, identity="mallory") as tab1, sockets.test_client(app, identity="mallory") as tab2, \
            sockets.test_client(app, identity="bob") as bob:
        bob.subscribe("room:1")
        for client in (tab1, tab2, tab1):  # the burst, over both tabs
            client.subscribe("room:1")
            client.subscribe("room:1")  # already a member: not a join
            client.unsubscribe("room:1")
            client.subscribe("plain:1")  # no presence
        assert [f["event"] for f in bob.received()] == ["@join", "@leave"] * 3
        with pytest.raises(ReplyError) as refused:
            tab2.subscribe("room:1")
        assert refused.value.code == "rate_limited"
        assert "try again in 2 s" in str(refused.value)
        assert bob.received() == []
        assert bob.subscribe("room:2")["presence"]["clients"] == 1  # bob's own bucket
        clock.now += 2  # one join a second half
        assert tab2.subscribe("room:1")["presence"]["clients"] == 2
        with pytest.raises(ReplyError):
            tab1.subscribe("room:3")
    for bad in ((0, 5), (1, 0), 3, None):
        with pytest.raises(Exception, match="ROBE_SOCKETS_PRESENCE_RATE_LIMIT must be"):
            Settings(presence_rate_limit=bad)


def test_a_retiring_worker_lets_go_of_members_still_recorded(redis_url):
    """A worker that stops on purpose but could not record some leave (Redis
    was out of reach then) removes those members as it retires: each leaves
    once, and nothing of the worker stays for a sweep."""
    from flask_robe_sockets.backends.redis import WORKERS_KEY, RedisBackend

    backend = RedisBackend(redis_url)
    admin = redis.Redis.from_url(redis_url)
    listener = admin.pubsub()
    try:
        channel = fresh()
        db = admin.connection_pool.connection_kwargs.get("db", 0)
        listener.subscribe(f"robe:{db}:{channel}")
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        backend.announce("retiring-w", {}, ttl=60)
        backend.presence_join(channel, {"id": "left-behind", "identity": "x", "info": None}, "retiring-w")
        backend.presence_join(channel, {"id": "elsewhere", "identity": "y", "info": None}, "other-w")
        backend.retire("retiring-w")
        assert [m["id"] for m in backend.presence(channel)] == ["elsewhere"]
        assert backend.workers() == []
        assert not admin.exists(f"{WORKERS_KEY}:retiring-w:presence")
        assert backend.sweep_presence(0.05, 0.05) == 0
        events = []
        while (message := listener.get_message(timeout=1)) is not None:
            events.append(json.loads(message["data"].split(b" ", 2)[2]))
        assert [(e["event"], e["data"]["id"]) for e in events] == [
            ("@join", "left-behind"), ("@join", "elsewhere"), ("@leave", "left-behind"),
        ]
    finally:
        listener.close()
        admin.close()
        backend.close()
