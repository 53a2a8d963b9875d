"""The in-process test client (testing.py): the real handshake checks, slots,
session, dispatcher and frame reader, synchronously, without gevent, on the
memory backend and on Redis."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
from flask import Flask, session

from flask_robe_sockets import Forbidden, Refused, RobeSockets, websocket
from flask_robe_sockets.client import ClientClosed, ConnectError, ConnectionLost, ReplyError
from flask_robe_sockets.testing import SocketTestClient
from flask_robe_sockets.tickets import TicketSigner


def make_app(**config):
    """An app with a handler, hooks, an authorize hook and two views that send."""
    app = Flask(__name__)
    app.secret_key = "test"
    app.config.update(config)
    sockets = RobeSockets(app)
    app.events = []  # what the hooks saw, in order

    @sockets.on_connect
    def hello(connection):
        app.events.append(("connect", connection.identity))

    @sockets.on_disconnect
    def bye(connection):
        app.events.append(("disconnect", connection.identity))

    @sockets.authorize
    def may(connection, channel):
        if channel == "busy":
            raise Refused("try_later", "the room is being moved")
        return not channel.startswith("admin") or connection.identity == "admin"

    @sockets.on("message", channel="chat")
    def on_message(message, connection):
        if message.data == "fail":
            raise RuntimeError("a bug")
        sockets["chat"].send("message", message.data)
        return {"ok": True}

    @sockets.on("whisper", channel="chat")
    def on_whisper(message, connection):
        connection.send("whispered", message.data, channel="chat")

    @app.post("/broadcast/<channel>")
    def broadcast(channel):
        sockets[channel].send("notice", text="hi")
        return "", 204

    @app.post("/kick/<identity>")
    def kick(identity):
        for connection in sockets.connections_of(identity):
            connection.close(4500, "bye")
        return "", 204

    return app, sockets


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_config(request):
    """The app's backend: in memory, or a scratch database of a real Redis."""
    if request.param == "memory":
        yield {}
        return
    import redis

    url = request.getfixturevalue("redis_server").database(6)
    redis.Redis.from_url(url).flushdb()
    yield {"ROBE_SOCKETS_REDIS_URL": url}


@pytest.fixture
def setup(backend_config):
    app, sockets = make_app(**backend_config)
    yield app, sockets
    app.extensions["robe_sockets"].backend.close()


def test_runs_without_gevent_patching():
    """This test process is not gevent's: the test client needs no patching."""
    assert not websocket.under_gevent()


def test_connects_with_an_id_and_runs_the_hooks(setup):
    """A test client is connected, with the id of its @connected, its ticket's
    identity and a slot; closing runs the disconnect hook and gives the slot back."""
    app, sockets = setup
    slots = app.extensions["robe_sockets"].slots
    client = sockets.test_client(app, identity="alice")
    assert isinstance(client, SocketTestClient)
    assert client.connected and client.close_code is None
    assert client.identity == "alice"
    assert [conn.id for conn in sockets.connections_of("alice")] == [client.id]
    assert app.events == [("connect", "alice")]
    counts = slots.counts()
    assert (counts["slots"], list(counts["identities"].values()), counts["ips"]) == (1, [1], {"127.0.0.1": 1})
    assert client.received() == []  # @connected is not one of them
    client.close()
    assert not client.connected and client.close_code == 1000
    assert app.events == [("connect", "alice"), ("disconnect", "alice")]
    assert slots.counts() == {"slots": 0, "identities": {}, "ips": {}}
    assert sockets.connections_of("alice") == []
    client.close()  # once is enough
    assert app.events[-1] == ("disconnect", "alice")
    with pytest.raises(ClientClosed):
        client.send("chat", "message", "hi")


def test_subscribe_send_and_received(setup):
    """@subscribed data, the @reply data, and broadcasts each received once, in order."""
    app, sockets = setup
    with sockets.test_client(app, identity="alice") as alice, sockets.test_client(app, identity="bob") as bob:
        answer = alice.subscribe("chat")
        assert answer["recovered"] is False and answer["seq"] == 0 and isinstance(answer["epoch"], str)
        bob.subscribe("chat")
        assert alice.send("chat", "message", {"text": "hi"}) == {"ok": True}
        expected = [{"channel": "chat", "event": "message", "data": {"text": "hi"}, "seq": 1}]
        assert alice.received() == expected
        assert bob.received("chat") == expected
        assert alice.received() == [] and bob.received() == []
        assert alice.send("chat", "whisper", "psst") is None  # no handler returned anything
        assert alice.received() == [{"channel": "chat", "event": "whispered", "data": "psst"}]
        assert bob.received() == []
        alice.unsubscribe("chat")
        bob.send("chat", "message", "again")
        assert alice.received() == []
        assert [frame["seq"] for frame in bob.received()] == [2]


def test_broadcast_from_a_view_reaches_subscribers(setup):
    """A view called through app.test_client() reaches each subscribed test client;
    received(channel) leaves the other channels' frames for later."""
    app, sockets = setup
    http = app.test_client()
    with sockets.test_client(app, identity="alice") as alice:
        alice.subscribe("chat")
        alice.subscribe("news")
        assert http.post("/broadcast/news").status_code == 204
        assert http.post("/broadcast/chat").status_code == 204
        assert http.post("/broadcast/elsewhere").status_code == 204
        assert alice.received("chat") == [{"channel": "chat", "event": "notice", "data": {"text": "hi"}, "seq": 1}]
        assert alice.received() == [{"channel": "news", "event": "notice", "data": {"text": "hi"}, "seq": 1}]


def test_subscribe_with_since_replays_what_was_missed(setup):
    """since/epoch go to the server: what came after since is replayed after @subscribed."""
    app, sockets = setup
    http = app.test_client()
    with sockets.test_client(app, identity="alice") as alice:
        epoch = alice.subscribe("chat")["epoch"]
        for _ in range(3):
            http.post("/broadcast/chat")
        assert [frame["seq"] for frame in alice.received()] == [1, 2, 3]
    with sockets.test_client(app, identity="alice") as again:
        assert again.subscribe("chat", since=1, epoch=epoch) == {"recovered": True, "seq": 3, "epoch": epoch}
        assert [frame["seq"] for frame in again.received()] == [2, 3]
        with sockets.test_client(app, identity="bob") as other:
            assert other.subscribe("chat", since=1, epoch="another")["recovered"] is False
            assert other.received() == []


def test_refusals_raise_reply_error_with_the_code(setup):
    """The authorize hook, frame validation and handlers answer @error: ReplyError with code and channel."""
    app, sockets = setup
    with sockets.test_client(app, identity="alice") as alice:
        cases = [
            (lambda: alice.subscribe("admin:logs"), "forbidden", "admin:logs"),
            (lambda: alice.subscribe("busy"), "try_later", "busy"),
            (lambda: alice.send("busy", "message", "x"), "try_later", "busy"),
            (lambda: alice.send("chat", "nothing", None), "unknown_event", "chat"),
            (lambda: alice.send("chat", "message", "fail"), "handler_error", "chat"),
            (lambda: alice.send("bad channel", "message", None), "bad_channel", None),
            (lambda: alice.send("chat", "@bogus", None), "bad_event", "chat"),
        ]
        for call, code, channel in cases:
            with pytest.raises(ReplyError) as caught:
                call()
            assert (caught.value.code, caught.value.channel) == (code, channel)
        assert alice.received() == []
        assert alice.connected
    with sockets.test_client(app, identity="admin") as admin:
        assert admin.subscribe("admin:logs")["seq"] == 0


def test_identity_limit_and_slots(backend_config):
    """Past ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY the handshake is refused
    identity_limit (429); a closed client gives its slot back."""
    app, sockets = make_app(ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY=1, ROBE_SOCKETS_MAX_CONNECTIONS=2, **backend_config)
    first = sockets.test_client(app, identity="alice")
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app, identity="alice")
    assert (caught.value.code, caught.value.status) == ("identity_limit", 429)
    second = sockets.test_client(app, identity="bob")
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app, identity="carol")
    assert (caught.value.code, caught.value.status) == ("too_many_connections", 503)
    first.close()
    sockets.test_client(app, identity="alice").close()
    second.close()
    assert app.events.count(("connect", "alice")) == 2
    app.extensions["robe_sockets"].backend.close()


def test_forged_ticket_is_refused_ticket_invalid(monkeypatch):
    """The handshake checks the ticket: one signed with another key is ticket_invalid (401)."""
    app, sockets = make_app()
    other = TicketSigner(["another key"], max_age=30, bind_ip=True, claim_nonce=lambda nonce, ttl: True)
    monkeypatch.setattr(app.extensions["robe_sockets"].tickets, "issue", other.issue)
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app, identity="alice")
    assert (caught.value.code, caught.value.status) == ("ticket_invalid", 401)
    assert app.events == []
    assert app.extensions["robe_sockets"].slots.counts()["slots"] == 0


def test_flask_client_cookies_get_the_ticket():
    """With flask_client, the ticket comes from POST {path}/ticket with its
    cookies: the identity loader decides; signed out is unauthorized (401)."""
    app, sockets = make_app(ROBE_SOCKETS_PATH="/rt")

    @sockets.identity_loader
    def current():
        return session.get("name")

    @app.post("/login/<name>")
    def login(name):
        session["name"] = name
        return "", 204

    http = app.test_client()
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app, flask_client=http)
    assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app)  # no identity: what the endpoint says to a stranger
    assert caught.value.code == "unauthorized"
    http.post("/login/carol")
    with sockets.test_client(app, flask_client=http) as carol:
        assert carol.identity == "carol"
        assert carol.subscribe("chat")["seq"] == 0
    with pytest.raises(TypeError):
        sockets.test_client(app, identity="x", flask_client=http)


def test_ticket_rate_limit_applies_to_flask_client():
    """The ticket endpoint's rate limit applies: past the burst, rate_limited with Retry-After."""
    app, sockets = make_app(ROBE_SOCKETS_TICKET_RATE_LIMIT=(0.001, 2))
    http = app.test_client()
    for _ in range(2):
        sockets.test_client(app, flask_client=http).close()
    with pytest.raises(ConnectError) as caught:
        sockets.test_client(app, flask_client=http)
    assert (caught.value.code, caught.value.status) == ("rate_limited", 429)
    assert caught.value.retry_after >= 1


def test_rate_limit_answers_then_closes_with_1008():
    """Frames past the rate limit are answered rate_limited; a client that keeps
    on is closed with 1008, its disconnect hook runs, and later calls raise."""
    app, sockets = make_app(ROBE_SOCKETS_RATE_LIMIT=(0.001, 3))
    client = sockets.test_client(app, identity="alice")
    codes = []
    for _ in range(30):
        try:
            client.send("chat", "whisper", None)
            codes.append("ok")
        except ReplyError as exc:
            codes.append(exc.code)
        except ConnectionLost:
            codes.append("lost")
            break
    assert codes[:4] == ["ok", "ok", "ok", "rate_limited"]
    assert codes[-1] == "lost"
    assert client.close_code == 1008 and not client.connected
    assert app.events[-1] == ("disconnect", "alice")
    with pytest.raises(ConnectionLost):
        client.subscribe("chat")


def test_frame_checks_apply():
    """A message over ROBE_SOCKETS_MAX_MESSAGE_SIZE is read by the same frame
    reader as a socket's: closed with 1009."""
    app, sockets = make_app(ROBE_SOCKETS_MAX_MESSAGE_SIZE=100)
    client = sockets.test_client(app, identity="alice")
    assert client.send("chat", "message", "x" * 10) == {"ok": True}
    with pytest.raises(ConnectionLost):
        client.send("chat", "message", "x" * 100)
    assert client.close_code == 1009
    assert app.events[-1] == ("disconnect", "alice")


def test_server_close_is_seen(setup):
    """A connection closed by the app (from a view) reads as closed with its
    code; the disconnect hook has run once the client looks."""
    app, sockets = setup
    client = sockets.test_client(app, identity="alice")
    client.subscribe("chat")
    app.test_client().post("/kick/alice")
    assert client.close_code == 4500
    assert not client.connected
    assert app.events == [("connect", "alice"), ("disconnect", "alice")]
    with pytest.raises(ConnectionLost):
        client.send("chat", "message", "hi")
    client.close()
    assert app.events.count(("disconnect", "alice")) == 1


def test_a_client_that_does_not_read_is_a_slow_consumer():
    """Broadcasts wait in the send queue until the next call: past its bound
    the connection is closed with 4008, as a client that stops reading."""
    app, sockets = make_app(ROBE_SOCKETS_SEND_QUEUE_SIZE=5)
    http = app.test_client()
    with sockets.test_client(app, identity="alice") as alice:
        alice.subscribe("chat")
        for _ in range(4):
            http.post("/broadcast/chat")
        assert len(alice.received()) == 4
        for _ in range(6):
            http.post("/broadcast/chat")
        assert alice.received() == []
        assert alice.close_code == 4008


def test_handler_errors_are_logged(caplog):
    """A handler's exception goes to the flask_robe_sockets log with its traceback."""
    app, sockets = make_app()
    with caplog.at_level(logging.ERROR, "flask_robe_sockets"):
        with sockets.test_client(app, identity="alice") as alice:
            with pytest.raises(ReplyError):
                alice.send("chat", "message", "fail")
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in caplog.records)


def test_works_under_gevent_patching_too(tmp_path):
    """In a process gevent patched (a gevent test suite), the same calls give the same answers."""
    script = tmp_path / "patched.py"
    script.write_text(textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        from flask import Flask
        from flask_robe_sockets import RobeSockets, websocket

        app = Flask(__name__)
        app.secret_key = "k"
        sockets = RobeSockets(app)

        @sockets.on("message", channel="chat")
        def on_message(message, connection):
            sockets["chat"].send("message", message.data)
            return "ok"

        assert websocket.under_gevent()
        with sockets.test_client(app, identity="alice") as alice:
            alice.subscribe("chat")
            assert alice.send("chat", "message", 1) == "ok"
            assert alice.received() == [{"channel": "chat", "event": "message", "data": 1, "seq": 1}]
        assert alice.close_code == 1000
        print("done")
        """
    ))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"


def test_forbidden_from_a_handler_still_answers_forbidden():
    """Forbidden(message) keeps working: @error forbidden with its message."""
    app = Flask(__name__)
    app.secret_key = "k"
    sockets = RobeSockets(app)

    @sockets.on("post", channel="wall")
    def post(message, connection):
        raise Forbidden("read only")

    with sockets.test_client(app) as client:
        with pytest.raises(ReplyError) as caught:
            client.send("wall", "post", None)
    assert (caught.value.code, caught.value.message) == ("forbidden", "read only")


def test_needs_the_extension_initialised_on_the_app():
    """test_client of an extension the app was not initialised with is a clear error."""
    app, _ = make_app()
    with pytest.raises(RuntimeError, match="init_app"):
        RobeSockets().test_client(app, identity="alice")
