"""The application's control of connections (PROTOCOL.md section 8):
``disconnect`` and ``unsubscribe`` from a view, a Publisher in another process
and the command line, against real gunicorn gevent servers sharing a real
redis-server (and alone on memory://), seen by clients of the ``websockets``
library."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid

import pytest
import redis
import requests
from flask import Flask
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from flask_robe_sockets import Publisher, RobeSockets, control
from flask_robe_sockets.cli import NEEDS_SHARED_BACKEND
from flask_robe_sockets.errors import ConfigurationError

from .servers import Gunicorn, RedisServer, gunicorn_pair, wait_until
from .test_cli import robe


@pytest.fixture(scope="module")
def redis_url(redis_server):
    """This module's database on the shared redis-server, emptied around its use."""
    with redis_server.flushed(5) as url:
        yield url


@pytest.fixture(scope="module")
def pair(redis_url):
    """Two gunicorn servers (one gevent worker each) sharing one Redis."""
    with gunicorn_pair({"ROBE_SOCKETS_REDIS_URL": redis_url}) as servers:
        yield servers


@pytest.fixture(scope="module")
def memory_server():
    srv = Gunicorn()
    yield srv
    srv.stop()


def fresh(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class Sock:
    """One ``websockets`` client connection signed in as ``user``."""

    def __init__(self, srv: Gunicorn, user: str, stack: contextlib.ExitStack) -> None:
        http = requests.Session()
        http.post(srv.url + "/login", data={"user": user}, timeout=5).raise_for_status()
        self.user = user
        self.ws = stack.enter_context(connect(f"{srv.ws_url}?ticket={srv.ticket(http)}", open_timeout=5))
        hello = json.loads(self.ws.recv(timeout=5))
        assert hello["event"] == "@connected", hello
        self.id = hello["data"]["id"]

    def request(self, frame: dict) -> dict:
        self.ws.send(json.dumps({**frame, "ref": "r"}))
        return self.recv()

    def subscribe(self, channel: str) -> None:
        answer = self.request({"channel": channel, "event": "@subscribe"})
        assert answer["event"] == "@subscribed", answer

    def recv(self, timeout: float = 5) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def alive(self) -> None:
        """Answered @pong: open, and nothing was queued before the answer."""
        assert self.request({"event": "@ping"}) == {"event": "@pong", "ref": "r", "data": None}

    def closed_with(self, timeout: float = 5) -> tuple[int, str]:
        """The close code and reason the server sent, once it closes; nothing else may come first."""
        with pytest.raises(ConnectionClosed) as closed:
            frame = self.ws.recv(timeout=timeout)
            raise AssertionError(f"{self.user} got {frame} instead of a close")
        assert closed.value.rcvd is not None, "closed without a close frame"
        return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.fixture
def socks():
    """Make clients; each is closed after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda srv, user: Sock(srv, user, stack)


def view(srv: Gunicorn, action: str, **kwargs) -> requests.Response:
    """``sockets.disconnect`` / ``sockets.unsubscribe`` called in a view of ``srv``."""
    return requests.post(f"{srv.url}/control/{action}", json=kwargs, timeout=5)


def broadcast(srv: Gunicorn, channel: str, data) -> None:
    requests.post(f"{srv.url}/broadcast/{channel}/news", json=data, timeout=5).raise_for_status()


# -- disconnect --------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(
    "kwargs, closed",
    [
        ({}, (4500, "")),
        ({"code": 4001, "reason": "permissions changed"}, (4001, "permissions changed")),
        ({"code": 4321, "reason": "über"}, (4321, "über")),
    ],
)
def test_disconnect_by_identity_closes_it_on_every_worker(pair, socks, kwargs, closed):
    """A view on A closes every connection of one identity, on A and on B, with
    the code (4500 by default) and reason; others stay open."""
    a, b = pair
    alice, bob = fresh("alice-"), fresh("bob-")
    targets = [socks(a, alice), socks(b, alice), socks(b, alice)]
    others = [socks(b, bob), socks(a, bob)]
    assert view(a, "disconnect", identity=alice, **kwargs).status_code == 200
    for sock in targets:
        assert sock.closed_with() == closed
    for sock in others:
        sock.alive()


@pytest.mark.redis
def test_disconnect_by_connection_id_on_the_other_worker(pair, socks):
    """A view on A closes exactly the one connection with that id, held by B."""
    a, b = pair
    alice = fresh("alice-")
    target, same_user = socks(b, alice), socks(b, alice)
    response = view(a, "disconnect", connection_id=target.id, code=4001, reason="permissions changed")
    assert response.status_code == 200
    assert target.closed_with() == (4001, "permissions changed")
    same_user.alive()


@pytest.mark.redis
def test_selects_nobody_else(pair, socks):
    """An identity selects only its own connections, an id only its one."""
    a, b = pair
    first, second = socks(b, fresh("carol-")), socks(b, fresh("carol-"))
    assert view(a, "disconnect", identity=first.user + "x").status_code == 200
    assert view(a, "disconnect", connection_id=first.id).status_code == 200
    assert first.closed_with() == (4500, "")
    second.alive()


# -- unsubscribe -------------------------------------------------------------


@pytest.mark.redis
def test_unsubscribe_by_identity_and_by_id(pair, socks):
    """The selected connections get @unsubscribed with the reason and no ref, and no
    more of that channel's broadcasts; their other channels and other members go on."""
    a, b = pair
    alice, bob = fresh("alice-"), fresh("bob-")
    room, chat = fresh("room:"), fresh("chat:")
    alice_b, alice_a, bob_b, bob_a = socks(b, alice), socks(a, alice), socks(b, bob), socks(a, bob)
    for sock in (alice_b, alice_a, bob_b, bob_a):
        sock.subscribe(room)
        sock.subscribe(chat)
    assert view(a, "unsubscribe", channel=room, identity=alice, reason="removed from the room").status_code == 200
    for sock in (alice_b, alice_a):
        assert sock.recv() == {"channel": room, "event": "@unsubscribed", "data": {"reason": "removed from the room"}}
    broadcast(a, room, {"n": 1})
    broadcast(b, chat, {"n": 2})
    for sock in (alice_b, alice_a):
        # The room's broadcast was sent first: had it come, it would be first.
        assert sock.recv() == {"channel": chat, "event": "news", "data": {"n": 2}, "seq": 1}
        sock.alive()
    for sock in (bob_b, bob_a):
        assert sock.recv() == {"channel": room, "event": "news", "data": {"n": 1}, "seq": 1}
        assert sock.recv() == {"channel": chat, "event": "news", "data": {"n": 2}, "seq": 1}

    # By id, from B this time: only bob's connection on B leaves.
    assert view(b, "unsubscribe", channel=room, connection_id=bob_b.id, reason="").status_code == 200
    assert bob_b.recv() == {"channel": room, "event": "@unsubscribed", "data": {"reason": ""}}
    broadcast(b, room, {"n": 3})
    broadcast(b, chat, {"n": 4})
    assert bob_b.recv()["data"] == {"n": 4}
    assert [bob_a.recv()["data"] for _ in range(2)] == [{"n": 3}, {"n": 4}]
    for sock in (alice_b, alice_a):
        assert sock.recv()["data"] == {"n": 4}
    # A connection no longer on the channel is told nothing again: once bob's
    # connections saw the command sent after it, both workers applied it.
    assert view(a, "unsubscribe", channel=room, identity=alice).status_code == 200
    assert view(a, "unsubscribe", channel=chat, identity=bob).status_code == 200
    for sock in (bob_b, bob_a):
        assert sock.recv() == {"channel": chat, "event": "@unsubscribed", "data": {"reason": ""}}
    for sock in (alice_b, alice_a):
        sock.alive()


@pytest.mark.redis
def test_unsubscribed_connection_may_subscribe_again(pair, socks):
    """The server's unsubscribe is no ban: a later @subscribe joins again (the
    authorize hook decides), and broadcasts come once more."""
    a, b = pair
    alice, room = fresh("alice-"), fresh("room:")
    sock = socks(b, alice)
    sock.subscribe(room)
    assert view(a, "unsubscribe", channel=room, identity=alice).status_code == 200
    assert sock.recv()["event"] == "@unsubscribed"
    sock.subscribe(room)
    broadcast(a, room, {"n": 1})
    assert sock.recv()["data"] == {"n": 1}


def test_unsubscribe_announces_the_leave_on_a_presence_channel(make_server, socks):
    """The application's unsubscribe leaves as the client's own does: on a
    presence channel the other members get its @leave."""
    srv = make_server({"ROBE_SOCKETS_PRESENCE": ["room:*"]})
    room = fresh("room:")
    alice, bob = socks(srv, fresh("alice-")), socks(srv, fresh("bob-"))
    bob.subscribe(room)
    alice.subscribe(room)
    joined = bob.recv()
    assert (joined["event"], joined["data"]["id"]) == ("@join", alice.id)
    assert view(srv, "unsubscribe", channel=room, connection_id=alice.id, reason="bye").status_code == 200
    assert alice.recv() == {"channel": room, "event": "@unsubscribed", "data": {"reason": "bye"}}
    assert bob.recv() == {"channel": room, "event": "@leave", "data": joined["data"]}


# -- from another process ----------------------------------------------------

PUBLISHER = """
import sys
from flask_robe_sockets import Publisher

url, action, channel, identity, connection_id = sys.argv[1:]
with Publisher.from_url(url) as publisher:
    if action == "disconnect":
        print(publisher.disconnect(connection_id=connection_id, code=4001, reason="from a job"))
    else:
        print(publisher.unsubscribe(channel, identity=identity, reason="from a job"))
"""


@pytest.mark.redis
def test_publisher_in_another_process(pair, socks, redis_url):
    """Publisher.disconnect and .unsubscribe in a plain Python process reach both servers; they return None."""
    a, b = pair
    alice, room = fresh("alice-"), fresh("room:")
    on_a, on_b, target = socks(a, alice), socks(b, alice), socks(b, fresh("dave-"))
    for sock in (on_a, on_b):
        sock.subscribe(room)

    def run(action, identity="", connection_id=""):
        done = subprocess.run(
            [sys.executable, "-c", PUBLISHER, redis_url, action, room, identity, connection_id],
            capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "None\n"

    run("unsubscribe", identity=alice)
    for sock in (on_a, on_b):
        assert sock.recv() == {"channel": room, "event": "@unsubscribed", "data": {"reason": "from a job"}}
    run("disconnect", connection_id=target.id)
    assert target.closed_with() == (4001, "from a job")
    for sock in (on_a, on_b):
        sock.alive()


# -- the moment of the command -------------------------------------------------


@pytest.mark.redis
def test_connection_opened_after_the_command_is_not_affected(pair, socks, redis_url):
    """A command acts on the connections open when it was made: one that opened
    while it was on its way to the worker is left alone."""
    a, b = pair
    alice = fresh("alice-")
    before = socks(b, alice)
    # Made now, delivered once a newer connection is open: as if it had
    # travelled that long.
    command = control.disconnect(identity=alice)
    after = socks(b, alice)
    with Publisher.from_url(redis_url) as publisher:
        publisher.backend.control(command.to_dict())
    assert before.closed_with() == (4500, "")
    # One pass over the worker's connections applied it: had it selected the
    # new one, its close would have been queued before this answer.
    after.alive()
    # And from a view: the sockets opened after it stay too.
    assert view(a, "disconnect", identity=alice).status_code == 200
    assert after.closed_with() == (4500, "")
    later = socks(b, alice)
    later.alive()


@pytest.mark.redis
def test_commands_survive_a_redis_restart(socks):
    """After Redis went away and came back, the worker listens to commands again."""
    store = RedisServer()
    srv = None
    try:
        srv = Gunicorn({"ROBE_SOCKETS_REDIS_URL": store.url})
        store.stop()
        wait_until(lambda: "lost the Redis pub/sub connection" in srv.output(), 20, 0.05, "the listener's loss")
        store = RedisServer(port=store.port)
        wait_until(lambda: "reconnected to Redis" in srv.output(), 30, 0.05, "the listener's reconnect")
        alice = fresh("alice-")
        sock = socks(srv, alice)
        with Publisher.from_url(store.url) as publisher:
            publisher.disconnect(identity=alice, code=4002)
        assert sock.closed_with() == (4002, "")
    finally:
        if srv is not None:
            srv.stop()
        store.stop()


# -- bad input -----------------------------------------------------------------

BAD = [
    ({}, TypeError, "exactly one of identity= or connection_id="),
    ({"identity": "alice", "connection_id": "Xy1"}, TypeError, "exactly one of identity= or connection_id="),
    ({"identity": None}, TypeError, "select an anonymous connection by its connection_id"),
    ({"identity": {1, 2}}, TypeError, "is not JSON"),
    ({"connection_id": 7}, TypeError, "connection_id is a connection's id"),
    ({"identity": "alice", "code": 3999}, ValueError, "from 4000 to 4999, not 3999"),
    ({"identity": "alice", "code": 5000}, ValueError, "from 4000 to 4999, not 5000"),
    ({"identity": "alice", "code": 1000}, ValueError, "from 4000 to 4999"),
    ({"identity": "alice", "code": True}, ValueError, "from 4000 to 4999"),
    ({"identity": "alice", "code": "4500"}, ValueError, "from 4000 to 4999"),
    ({"identity": "alice", "reason": "é" * 62}, ValueError, "at most 123 UTF-8 bytes (a close frame's room), not 124"),
    ({"identity": "alice", "reason": "\ud800"}, ValueError, "unpaired surrogate"),
]


def memory_app() -> tuple[Flask, RobeSockets]:
    app = Flask(__name__)
    app.secret_key = "test"
    return app, RobeSockets(app)


@pytest.mark.parametrize("kwargs, error, message", BAD)
def test_bad_disconnect_raises_where_called(kwargs, error, message):
    """Bad selectors, codes and reasons raise in the caller, and nothing is sent."""
    app, sockets = memory_app()
    with sockets.test_client(app, identity="alice") as alice:
        with app.app_context(), pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            sockets.disconnect(**kwargs)
        assert alice.connected
        assert alice.subscribe("chat")["recovered"] is False


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("bad channel",), {"identity": "alice"}, ValueError, "invalid channel name 'bad channel'"),
        (("",), {"identity": "alice"}, ValueError, "invalid channel name ''"),
        (("room:1",), {"identity": None}, TypeError, "connection_id"),
        (("room:1",), {}, TypeError, "exactly one"),
        (("room:1",), {"connection_id": "x", "identity": "alice"}, TypeError, "exactly one"),
        (("room:1",), {"identity": "alice", "reason": "x" * 124}, ValueError, "at most 123 UTF-8 bytes"),
        (("room:1",), {"identity": "alice", "code": 4001}, TypeError, "code"),
    ],
)
def test_bad_unsubscribe_raises_where_called(args, kwargs, error, message):
    """A bad channel name, selector or reason raises in the caller; unsubscribe takes no code."""
    app, sockets = memory_app()
    with sockets.test_client(app, identity="alice") as alice:
        alice.subscribe("room:1")
        with app.app_context(), pytest.raises(error, match=message):
            sockets.unsubscribe(*args, **kwargs)
        assert alice.received() == []


@pytest.mark.redis
@pytest.mark.parametrize("kwargs, error, message", BAD[:3] + BAD[5:7] + BAD[10:11])
def test_bad_input_raises_in_the_publisher_and_the_view(pair, redis_url, kwargs, error, message):
    """The Publisher checks as the extension does; a view gets the exception where it calls."""
    with Publisher.from_url(redis_url) as publisher, pytest.raises(error, match=message.split(" (")[0]):
        publisher.disconnect(**kwargs)
    response = view(pair[0], "disconnect", **kwargs)
    assert response.status_code == 400
    assert response.json()["error"] == error.__name__
    assert message.split(" (")[0] in response.json()["message"]


@pytest.mark.parametrize("identity", ["alice", 7, "7", True, 7.0, {"id": 7}, {"id": 7.0}, ["a", 1], "true"])
def test_identity_selection_is_the_caps_spelling(identity):
    """An identity selects exactly the connections whose identity has the same
    canonical JSON (tickets.identity_key): 7, "7", True and 7.0 are four."""
    from flask_robe_sockets.tickets import identity_key

    command = control.Command.from_dict(control.disconnect(identity=identity).to_dict())
    others = ["alice", 7, "7", True, 7.0, {"id": 7}, {"id": 7.0}, ["a", 1], "true", None, {"ID": 7}]
    for other in others:
        expected = other is not None and identity_key(other) == identity_key(identity)
        assert command.selects("Xy1", other, command.at) is expected, other
    assert command.selects("Xy1", identity, command.at + 0.001) is False  # opened after it


def test_commands_from_other_programs_are_checked_again():
    """A worker drops a command it cannot apply (another version, another program), naming why."""
    good = control.disconnect(identity="alice").to_dict()
    assert control.Command.from_dict(good) == control.Command(**good)
    for broken, why in [
        ({**good, "action": "ban"}, "unknown action 'ban'"),
        ({**good, "identity": None}, "one identity or one connection id"),
        ({**good, "identity": "null"}, "one identity or one connection id"),
        ({**good, "identity": "alice"}, "an identity's JSON"),
        ({**good, "connection_id": "Xy1"}, "one identity or one connection id"),
        ({**good, "code": 1000}, "from 4000 to 4999"),
        ({**good, "reason": "x" * 200}, "at most 123"),
        ({**good, "at": "now"}, "time is a number"),
        ({**good, "action": "unsubscribe", "channel": "no spaces"}, "invalid channel name"),
        ({k: v for k, v in good.items() if k != "at"}, "a command without 'at'"),
        ([good], "a command is a JSON object"),
    ]:
        with pytest.raises(ValueError, match=why):
            control.Command.from_dict(broken)


# -- memory:// -----------------------------------------------------------------


def test_memory_backend_in_one_gunicorn_worker(memory_server, socks):
    """On memory:// a view's disconnect and unsubscribe act on the worker's own connections."""
    srv = memory_server
    alice, room = fresh("alice-"), fresh("room:")
    first, second, other = socks(srv, alice), socks(srv, alice), socks(srv, fresh("bob-"))
    for sock in (first, second, other):
        sock.subscribe(room)
    assert view(srv, "unsubscribe", channel=room, identity=alice, reason="gone").status_code == 200
    for sock in (first, second):
        assert sock.recv() == {"channel": room, "event": "@unsubscribed", "data": {"reason": "gone"}}
    broadcast(srv, room, {"n": 1})
    assert other.recv()["data"] == {"n": 1}
    assert view(srv, "disconnect", connection_id=first.id, code=4001).status_code == 200
    assert first.closed_with() == (4001, "")
    second.alive()
    assert view(srv, "disconnect", identity=alice).status_code == 200
    assert second.closed_with() == (4500, "")
    other.alive()


def test_memory_backend_with_the_test_client():
    """In one process on memory://, the command has acted when the call returns."""
    app, sockets = memory_app()
    with sockets.test_client(app, identity="alice") as alice, sockets.test_client(app, identity="bob") as bob:
        alice.subscribe("room:1")
        alice.subscribe("chat")
        bob.subscribe("room:1")
        sockets.unsubscribe("room:1", identity="alice", reason="removed")
        assert alice.received() == [{"channel": "room:1", "event": "@unsubscribed", "data": {"reason": "removed"}}]
        sockets["room:1"].send("news", 1)
        sockets["chat"].send("news", 2)
        assert [m["data"] for m in alice.received()] == [2]
        assert [m["data"] for m in bob.received()] == [1]
        assert sockets.disconnect(connection_id=bob.id, code=4001) is None
        assert (bob.connected, bob.close_code) == (False, 4001)
        sockets.disconnect(identity="alice")
        assert (alice.connected, alice.close_code) == (False, 4500)


def test_publisher_refuses_memory():
    """A Publisher on memory:// would reach nobody: refused, saying why."""
    with pytest.raises(ConfigurationError, match="reaches nobody outside its own process"):
        Publisher.from_url("memory://")


# -- the command line -----------------------------------------------------------


@pytest.mark.redis
def test_cli_disconnect(pair, socks, redis_url):
    """flask robe disconnect closes an identity's connections with 4500, or one
    connection with 4001 (--reconnect) and a reason, on every worker."""
    a, b = pair
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url}
    alice = fresh("alice-")
    on_a, on_b, one = socks(a, alice), socks(b, alice), socks(b, fresh("erin-"))
    done = robe("disconnect", "--identity", alice, config=config)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f'sent to every worker: disconnect identity "{alice}" with 4500\n'
    for sock in (on_a, on_b):
        assert sock.closed_with() == (4500, "")
    one.alive()
    done = robe("disconnect", "--connection", one.id, "--reconnect", "--reason", "roles changed", config=config)
    assert done.returncode == 0, done.stderr
    assert one.closed_with() == (4001, "roles changed")


@pytest.mark.redis
@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give exactly one of --identity ID or --connection ID"),
        (("--identity", "a", "--connection", "b"), "give exactly one of --identity ID or --connection ID"),
        (("--identity", "a", "--reason", "x" * 124), "Invalid value for --reason: reason must be at most 123"),
    ],
)
def test_cli_disconnect_usage_errors(redis_url, args, message):
    """Neither or both selectors, or a reason too long: exit 2, nothing sent."""
    done = robe("disconnect", *args, config={"ROBE_SOCKETS_REDIS_URL": redis_url})
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())


def test_cli_disconnect_on_memory_exits_2():
    """On memory:// the connections are in another process: exit 2 naming the fix."""
    done = robe("disconnect", "--identity", "alice")
    assert done.returncode == 2
    assert f"Error: {NEEDS_SHARED_BACKEND}" in " ".join(done.stderr.split())


# -- the README -------------------------------------------------------------------


def test_readme_example_runs_as_written():
    """The "Controlling connections" views, with the test client: the kick takes
    the user off the room, the role change closes every tab with 4001, the
    sign-out closes the signed-in user's sockets with 4500."""
    from flask import session

    from .test_readme import readme_blocks

    (block,) = readme_blocks("Controlling connections")
    app, sockets = memory_app()
    sockets.identity_loader(lambda: session.get("user_id"))
    saved, removed = [], []
    namespace = {
        "__name__": "readme_example", "app": app, "sockets": sockets,
        "save_roles": lambda user, roles: saved.append((user, roles)),
        "remove_member": lambda room, user: removed.append((room, user)),
    }
    exec(block, namespace)
    http = app.test_client()
    with sockets.test_client(app, identity="alice") as tab1, sockets.test_client(app, identity="alice") as tab2:
        tab1.subscribe("room:lobby")
        tab1.subscribe("chat")
        assert http.post("/rooms/lobby/kick/alice").status_code == 204
        assert removed == [("lobby", "alice")]
        assert tab1.received() == [
            {"channel": "room:lobby", "event": "@unsubscribed", "data": {"reason": "removed from the room"}},
        ]
        assert http.post("/admin/users/alice/roles", json={"admin": True}).status_code == 204
        assert saved == [("alice", {"admin": True})]
        assert (tab1.close_code, tab2.close_code) == (4001, 4001)
    with http.session_transaction() as cookie_session:
        cookie_session["user_id"] = "bob"
    with sockets.test_client(app, flask_client=http) as bob, sockets.test_client(app, identity="carol") as carol:
        assert http.post("/logout").status_code == 204
        assert (bob.connected, bob.close_code) == (False, 4500)
        assert carol.connected
