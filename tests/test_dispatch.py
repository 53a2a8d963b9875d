"""Frame handling apart from any socket (dispatch.py): the Router's lookups and
hooks, and the Dispatcher's answers (PROTOCOL.md section 4) with a real Hub,
a real memory backend and sessions that write down what they are sent."""
from __future__ import annotations

import json

import pytest
from flask import Flask, current_app

from flask_robe_sockets import protocol
from flask_robe_sockets.backends.memory import MemoryBackend
from flask_robe_sockets.channels import Hub
from flask_robe_sockets.config import Settings
from flask_robe_sockets.connection import Connection
from flask_robe_sockets.dispatch import Dispatcher, Router
from flask_robe_sockets.errors import BackendUnavailable, ConfigurationError, Forbidden
from flask_robe_sockets.frames import ws_frame


def unframe(frame: bytes) -> dict:
    """The JSON of one unmasked server frame."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return json.loads(frame[start:])


class FakeSession:
    """What the Dispatcher uses of a session, writing down what it is sent."""

    def __init__(self, hub: Hub, identity=None) -> None:
        self.id = f"s{id(self)}"
        self.identity = identity
        self.remote_addr = "127.0.0.1"
        self.open = True
        self.closed_with: tuple[int, str] | None = None
        self.sent: list[dict] = []
        self.owner = Connection(self, hub)

    def push(self, frame: bytes) -> None:
        self.sent.append(unframe(frame))

    def answer(self, event, data=None, channel=None, ref=None) -> None:
        self.push(ws_frame(protocol.encode(event, data, channel, ref)))

    def answer_error(self, code, message, ref=None, channel=None) -> None:
        self.answer(protocol.ERROR, protocol.error_payload(code, message), channel, ref)

    def close(self, code=1000, reason="") -> None:
        self.open = False
        self.closed_with = (code, reason)

    def take(self) -> list[dict]:
        sent, self.sent = self.sent, []
        return sent


class Setup:
    """One app's Dispatcher on a real Hub and MemoryBackend."""

    def __init__(self, **settings) -> None:
        self.app = Flask(__name__)
        self.router = Router()
        self.backend = MemoryBackend()
        self.hub = Hub(self.backend.subscribe, self.backend.unsubscribe)
        self.backend.start(self.hub.deliver)
        self.dispatcher = Dispatcher(self.app, self.router, self.hub, self.backend, Settings(**settings))

    def session(self, identity=None) -> FakeSession:
        return FakeSession(self.hub, identity)

    def send(self, session: FakeSession, **frame) -> list[dict]:
        """Hand ``session``'s frame to the dispatcher; what it was answered."""
        self.dispatcher.handle_text(session, json.dumps(frame))
        return session.take()

    def on(self, event: str, channel: str):
        def decorator(handler):
            self.router.add_handler(channel, event, handler)
            return handler

        return decorator


@pytest.fixture
def setup():
    made = Setup()
    yield made
    made.backend.close()


def error(code: str, message: str, channel=None, ref=None) -> dict:
    frame = {"event": "@error", "data": {"code": code, "message": message}}
    if channel is not None:
        frame = {"channel": channel, **frame}
    if ref is not None:
        frame["ref"] = ref
    return frame


def subscribed(channel: str, ref, recovered: bool, seq: int, epoch: str) -> dict:
    return {
        "channel": channel, "event": "@subscribed",
        "data": {"recovered": recovered, "seq": seq, "epoch": epoch}, "ref": ref,
    }


# -- Router ---------------------------------------------------------------


def test_router_finds_handlers_by_event_and_exact_channel():
    """A handler is found for its own event and channel only."""
    router = Router()
    chat = lambda message, conn: None  # noqa: E731
    router.add_handler("chat", "message", chat)
    assert router.handlers_for("chat", "message") == [chat]
    assert router.handlers_for("chat", "other") == []
    assert router.handlers_for("chat2", "message") == []
    assert router.handlers_for("cha", "message") == []


def test_router_prefix_patterns_and_registration_order():
    """"room:*" matches every channel starting with "room:", and handlers come in registration order."""
    router = Router()
    calls = [lambda m, c, n=n: n for n in range(4)]
    router.add_handler("room:*", "say", calls[0])
    router.add_handler("room:lobby", "say", calls[1])
    router.add_handler("*", "say", calls[2])
    router.add_handler("room:*", "say", calls[3])
    assert router.handlers_for("room:lobby", "say") == calls
    assert router.handlers_for("room:other", "say") == [calls[0], calls[2], calls[3]]
    assert router.handlers_for("room:", "say") == [calls[0], calls[2], calls[3]]
    assert router.handlers_for("roomy", "say") == [calls[2]]


def test_router_allows_everything_without_an_authorize_hook():
    """Without a hook every channel is allowed; with one, its truthiness decides."""
    router = Router()
    assert router.authorized(None, "anything") is True
    router.set_authorize(lambda conn, channel: channel if channel != "no" else "")
    assert router.authorized(None, "yes") is True
    assert router.authorized(None, "no") is False


def test_router_refuses_a_second_authorize_hook():
    """A second authorize hook raises ConfigurationError naming the first, which stays."""

    def first(conn, channel):
        return channel == "open"

    router = Router()
    router.set_authorize(first)
    with pytest.raises(ConfigurationError, match=r"already set \(first\)"):
        router.set_authorize(lambda conn, channel: True)
    assert router.authorized(None, "shut") is False


def test_router_refuses_a_second_identity_loader():
    """One identity loader; a second raises ConfigurationError and the first stays."""

    def load():
        return "alice"

    router = Router()
    assert not router.has_identity_loader and router.load_identity() is None
    router.set_identity_loader(load)
    with pytest.raises(ConfigurationError, match=r"already set \(load\)"):
        router.set_identity_loader(lambda: "mallory")
    assert router.has_identity_loader and router.load_identity() == "alice"


# -- reserved events ------------------------------------------------------


def test_ping_is_answered_pong_with_its_data_and_ref(setup):
    """@ping gets @pong with the same data and ref, with or without a channel."""
    session = setup.session()
    assert setup.send(session, event="@ping", data={"t": 1}, ref=4) == [
        {"event": "@pong", "data": {"t": 1}, "ref": 4}
    ]
    assert setup.send(session, event="@ping", channel="chat") == [
        {"channel": "chat", "event": "@pong", "data": None}
    ]


def test_a_broken_frame_is_answered_with_its_code_ref_and_channel(setup):
    """A frame the protocol refuses gets its @error, naming the ref and channel it could read."""
    session = setup.session()
    assert setup.send(session, event="@nope", channel="chat", ref="r") == [
        error("bad_event", "'@nope' is reserved for the protocol", "chat", "r")
    ]


def test_subscribe_answers_position_then_replays_in_order_then_live(setup):
    """@subscribed comes first with recovered/seq/epoch, then the missed broadcasts in seq order, then live ones."""
    for n in range(1, 4):
        setup.backend.publish("chat", "news", {"n": n})
    epoch = setup.backend.recover("chat", None, None).epoch
    session = setup.session()
    sent = setup.send(session, event="@subscribe", channel="chat", data={"since": 1, "epoch": epoch}, ref=1)
    assert sent == [
        subscribed("chat", 1, True, 3, epoch),
        {"channel": "chat", "event": "news", "data": {"n": 2}, "seq": 2},
        {"channel": "chat", "event": "news", "data": {"n": 3}, "seq": 3},
    ]
    assert session.owner.channels == {"chat"}
    setup.backend.publish("chat", "news", {"n": 4})
    assert session.take() == [{"channel": "chat", "event": "news", "data": {"n": 4}, "seq": 4}]


def test_subscribe_without_since_replays_nothing(setup):
    """A subscribe without since answers recovered: false and replays nothing."""
    setup.backend.publish("chat", "news", 1)
    session = setup.session()
    [answer] = setup.send(session, event="@subscribe", channel="chat", ref="a")
    assert answer["event"] == "@subscribed" and answer["data"]["recovered"] is False
    assert answer["data"]["seq"] == 1


def test_rejoin_answers_again_and_replays_nothing(setup):
    """A second @subscribe to a joined channel answers @subscribed (recovered: false) and broadcasts still come once."""
    session = setup.session()
    [first] = setup.send(session, event="@subscribe", channel="chat", ref=1)
    setup.backend.publish("chat", "news", 1)
    session.take()
    epoch = first["data"]["epoch"]
    again = setup.send(session, event="@subscribe", channel="chat", data={"since": 0, "epoch": epoch}, ref=2)
    assert again == [subscribed("chat", 2, False, 1, epoch)]
    setup.backend.publish("chat", "news", 2)
    assert session.take() == [{"channel": "chat", "event": "news", "data": 2, "seq": 2}]
    assert setup.hub.member_counts() == {"chat": 1}


def test_too_many_subscriptions_refuses_a_new_channel_but_not_a_rejoin():
    """Past MAX_SUBSCRIPTIONS a new channel gets too_many_subscriptions; a joined one still answers."""
    setup = Setup(max_subscriptions=2)
    session = setup.session()
    setup.send(session, event="@subscribe", channel="a")
    setup.send(session, event="@subscribe", channel="b")
    assert setup.send(session, event="@subscribe", channel="c", ref=3) == [
        error("too_many_subscriptions", "at most 2 channels per connection", "c", 3)
    ]
    assert session.owner.channels == {"a", "b"}
    [answer] = setup.send(session, event="@subscribe", channel="b", ref=4)
    assert answer["event"] == "@subscribed"
    setup.backend.close()


def test_subscribe_refused_by_the_hook_returning_false(setup):
    """An authorize hook that returns False answers forbidden, and nothing is joined."""
    setup.router.set_authorize(lambda conn, channel: channel != "secret")
    session = setup.session()
    assert setup.send(session, event="@subscribe", channel="secret", ref=1) == [
        error("forbidden", "not allowed on channel 'secret'", "secret", 1)
    ]
    assert session.owner.channels == frozenset() and setup.hub.member_counts() == {}


def test_subscribe_refused_by_the_hook_raising_forbidden_carries_its_message(setup):
    """A hook raising Forbidden answers forbidden with the hook's own message."""

    def hook(conn, channel):
        raise Forbidden("the vault is shut")

    setup.router.set_authorize(hook)
    session = setup.session()
    assert setup.send(session, event="@subscribe", channel="vault", ref=1) == [
        error("forbidden", "the vault is shut", "vault", 1)
    ]
    assert session.owner.channels == frozenset()


def test_authorize_hook_sees_the_connection_in_an_app_context(setup):
    """The hook gets the session's public Connection and runs in the app's context."""
    seen = []

    def hook(conn, channel):
        seen.append((conn, channel, current_app._get_current_object()))
        return True

    setup.router.set_authorize(hook)
    session = setup.session(identity="alice")
    setup.send(session, event="@subscribe", channel="chat")
    assert seen == [(session.owner, "chat", setup.app)]
    assert seen[0][0].identity == "alice"


def test_authorize_hook_raising_answers_handler_error(setup):
    """A hook that fails answers handler_error on subscribe and on events, without its details."""

    def hook(conn, channel):
        raise RuntimeError("database password is hunter2")

    setup.router.set_authorize(hook)
    setup.on("say", "chat")(lambda message, conn: "never")
    session = setup.session()
    assert setup.send(session, event="@subscribe", channel="chat", ref=1) == [
        error("handler_error", "the server could not authorize this", "chat", 1)
    ]
    assert setup.send(session, event="say", channel="chat", ref=2) == [
        error("handler_error", "the handler failed", "chat", 2)
    ]
    assert session.owner.channels == frozenset()


def test_session_closed_while_the_hook_ran_is_not_joined(setup):
    """A connection closed while its authorize hook ran gets no answer and joins nothing."""

    def hook(conn, channel):
        conn.close(1000)
        return True

    setup.router.set_authorize(hook)
    session = setup.session()
    assert setup.send(session, event="@subscribe", channel="chat", ref=1) == []
    assert setup.hub.channels_of(session) == frozenset()
    assert setup.hub.member_counts() == {} and setup.hub.joins_under_way() == []


def test_backend_unavailable_on_recover_closes_with_1011(setup, monkeypatch):
    """A join whose history cannot be read closes the connection with 1011 and leaves nothing behind."""

    def down(channel, since, epoch):
        raise BackendUnavailable("Redis is away")

    monkeypatch.setattr(setup.backend, "recover", down)
    session = setup.session()
    assert setup.send(session, event="@subscribe", channel="chat", ref=1) == []
    assert session.closed_with == (1011, "backend unavailable")
    assert setup.hub.channels_of(session) == frozenset() and setup.hub.joins_under_way() == []


def test_unsubscribed_by_the_app_while_joining_gets_no_subscribed(setup, monkeypatch):
    """The application's unsubscribe landing while the backend reads the history wins: @unsubscribed, never @subscribed after it."""
    session = setup.session()
    read_history = setup.backend.recover

    def slow_recover(channel, since, epoch):
        # As Redis would: other greenlets run while the history is read.
        setup.dispatcher.unsubscribed_by_app(session, channel, "removed")
        return read_history(channel, since, epoch)

    monkeypatch.setattr(setup.backend, "recover", slow_recover)
    assert setup.send(session, event="@subscribe", channel="chat", ref=1) == [
        {"channel": "chat", "event": "@unsubscribed", "data": {"reason": "removed"}}
    ]
    setup.backend.publish("chat", "news", 1)
    assert session.take() == [] and setup.hub.channels_of(session) == frozenset()
    assert setup.hub.joins_under_way() == []


def test_unsubscribe_answers_and_stops_broadcasts(setup):
    """@unsubscribe answers @unsubscribed (also for a channel never joined) and no broadcast follows."""
    session = setup.session()
    setup.send(session, event="@subscribe", channel="chat")
    assert setup.send(session, event="@unsubscribe", channel="chat", ref=2) == [
        {"channel": "chat", "event": "@unsubscribed", "data": None, "ref": 2}
    ]
    setup.backend.publish("chat", "news", 1)
    assert session.take() == [] and session.owner.channels == frozenset()
    assert setup.send(session, event="@unsubscribe", channel="never", ref=3) == [
        {"channel": "never", "event": "@unsubscribed", "data": None, "ref": 3}
    ]


# -- application events ---------------------------------------------------


def test_unknown_event_with_and_without_ref(setup):
    """An event without a handler for its channel is answered unknown_event, with or without a ref."""
    setup.on("say", "room:*")(lambda message, conn: None)
    session = setup.session()
    assert setup.send(session, event="say", channel="chat", ref=1) == [
        error("unknown_event", "no handler for event 'say' on channel 'chat'", "chat", 1)
    ]
    assert setup.send(session, event="shout", channel="room:a") == [
        error("unknown_event", "no handler for event 'shout' on channel 'room:a'", "room:a")
    ]


def test_event_refused_by_the_authorize_hook(setup):
    """An event on a channel the hook refuses answers forbidden, and no handler runs."""
    ran = []
    setup.router.set_authorize(lambda conn, channel: False)
    setup.on("say", "chat")(lambda message, conn: ran.append(message))
    session = setup.session()
    assert setup.send(session, event="say", channel="chat", ref=1) == [
        error("forbidden", "not allowed on channel 'chat'", "chat", 1)
    ]
    assert ran == []


def test_reply_comes_from_the_first_handler_not_returning_none(setup):
    """Every handler runs in order, in an app context; the first non-None value is the one @reply."""
    ran = []

    @setup.on("ask", "room:*")
    def first(message, conn):
        ran.append(("first", message, conn, current_app._get_current_object()))

    @setup.on("ask", "room:lobby")
    def second(message, conn):
        ran.append("second")
        return {"answer": 42}

    @setup.on("ask", "room:*")
    def third(message, conn):
        ran.append("third")
        return "ignored"

    session = setup.session()
    assert setup.send(session, event="ask", channel="room:lobby", data=[1], ref="q") == [
        {"channel": "room:lobby", "event": "@reply", "data": {"answer": 42}, "ref": "q"}
    ]
    _, message, conn, app = ran[0]
    assert (message.channel, message.event, message.data, message.ref) == ("room:lobby", "ask", [1], "q")
    assert conn is session.owner and app is setup.app
    assert ran[1:] == ["second", "third"]


def test_reply_is_null_when_every_handler_returns_none(setup):
    """Handlers that all return None give @reply with data null."""
    setup.on("ask", "chat")(lambda message, conn: None)
    session = setup.session()
    assert setup.send(session, event="ask", channel="chat", ref=0) == [
        {"channel": "chat", "event": "@reply", "data": None, "ref": 0}
    ]


def test_no_answer_without_ref(setup):
    """An event without a ref runs its handlers and gets no answer."""
    ran = []
    setup.on("say", "chat")(lambda message, conn: ran.append(message.data) or "value")
    session = setup.session()
    assert setup.send(session, event="say", channel="chat", data="hi") == []
    assert ran == ["hi"]


def test_handler_raising_answers_handler_error_without_internals(setup):
    """A handler that raises answers handler_error, whatever an earlier one returned, and leaks nothing."""
    setup.on("boom", "chat")(lambda message, conn: "fine")

    @setup.on("boom", "chat")
    def boom(message, conn):
        raise KeyError("internal detail that must not leak")

    session = setup.session()
    sent = setup.send(session, event="boom", channel="chat", ref=1)
    assert sent == [error("handler_error", "the handler failed", "chat", 1)]
    assert "internal detail" not in json.dumps(sent)
    # The connection stays usable.
    assert setup.send(session, event="@ping", ref=2) == [{"event": "@pong", "data": None, "ref": 2}]


def test_handler_raising_forbidden_answers_forbidden(setup):
    """A handler raising Forbidden answers forbidden with its message."""

    @setup.on("deny", "chat")
    def deny(message, conn):
        raise Forbidden("no, you may not")

    session = setup.session()
    assert setup.send(session, event="deny", channel="chat", ref=1) == [
        error("forbidden", "no, you may not", "chat", 1)
    ]


@pytest.mark.parametrize("value", [{"a set"}, float("nan"), object()])
def test_reply_that_is_not_json_answers_handler_error(setup, value):
    """A handler returning something that is not JSON answers handler_error, not a broken frame."""
    setup.on("odd", "chat")(lambda message, conn: value)
    session = setup.session()
    assert setup.send(session, event="odd", channel="chat", ref=1) == [
        error("handler_error", "the handler failed", "chat", 1)
    ]


def test_hooks_run_in_order_and_one_failing_does_not_stop_the_rest(setup):
    """Connect/disconnect hooks get the Connection in an app context; a failing one is skipped."""
    ran = []

    def broken(conn):
        raise RuntimeError("hook bug")

    hooks = [lambda conn: ran.append(("a", conn)), broken,
             lambda conn: ran.append(("b", current_app._get_current_object()))]
    session = setup.session()
    setup.dispatcher.run_hooks(hooks, session)
    assert ran == [("a", session.owner), ("b", setup.app)]
