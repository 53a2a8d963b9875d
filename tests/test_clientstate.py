"""The Python client's state, fed events without sockets or threads.

What both clients decide is in tests/client_cases.json (test_client_cases.py);
these are the Python state's own rules: how it hands writes back, the errors
it raises, and the objects it makes.
"""
from __future__ import annotations

import json

import pytest

import flask_robe_sockets
from flask_robe_sockets import client
from flask_robe_sockets.clientstate import (
    ChannelState,
    ClientClosed,
    ClientState,
    ConnectError,
    ConnectionLost,
    Drop,
    Emit,
    Member,
    PresenceState,
    ReceivedMessage,
    Retry,
    Send,
    Settle,
    error_name,
)


def connected(state: ClientState, id: str = "c1") -> list:
    return state.receive(json.dumps({"event": "@connected", "data": {"id": id, "protocol": 1}}))


def frames(actions: list) -> list:
    return [json.loads(action.text) for action in actions if isinstance(action, Send)]


def test_unsent_sends_wait_in_front_of_the_queue_in_order():
    """Sends whose write failed go back before those still queued, in their order, and out first on the next connect."""
    state = ClientState()
    requests = [object() for _ in range(3)]
    state.send("chat", "echo", 0, requests[0])
    actions = connected(state)
    assert [action.ref for action in actions if isinstance(action, Send)] == [1]
    written = state.send("chat", "echo", 1, requests[1])
    state.unsent([1, written[0].ref])
    state.lost(1006)
    assert state.queued == 2
    state.send("chat", "echo", 2, requests[2])
    assert [frame["data"] for frame in frames(connected(state, "c2"))] == [0, 1, 2]


def test_unsent_sends_are_not_failed_by_the_loss():
    """A send handed back by unsent() is not pending, so the loss does not fail it with ConnectionLost."""
    state = ClientState()
    connected(state)
    request = object()
    [send] = state.send("chat", "echo", 1, request)
    state.unsent([send.ref])
    assert not [a for a in state.lost(1006) if isinstance(a, Settle)]
    assert state.withdraw(request) and state.queued == 0


def test_data_that_is_not_json_fails_before_taking_a_place():
    """Data that JSON cannot carry raises in the caller and queues nothing."""
    state = ClientState(max_queue=1)
    with pytest.raises(TypeError):
        state.send("chat", "echo", object(), object())
    with pytest.raises(ValueError):
        state.send("chat", "echo", float("nan"), object())
    assert state.queued == 0


def test_closed_state_refuses_subscribes_and_sends():
    """After close() subscribe() and send() raise ClientClosed, and a failed connect is not retried."""
    state = ClientState()
    state.close()
    with pytest.raises(ClientClosed):
        state.subscribe("chat")
    with pytest.raises(ClientClosed):
        state.send("chat", "echo", None, object())
    assert state.connect_failed(ConnectError("refused")) == []
    assert connected(state) == [] and not state.connected


def test_a_frame_that_is_not_json_raises_for_the_caller_to_log():
    """Text that is not JSON raises ValueError; the state is unchanged and reads on."""
    state = ClientState()
    with pytest.raises(ValueError):
        state.receive("{not json")
    assert [type(a) for a in connected(state)] == [Emit]


def test_new_channel_makes_the_channel_objects():
    """The objects subscribe() returns and emits name are the ones new_channel made."""

    class Mine(ChannelState):
        pass

    state = ClientState(new_channel=Mine)
    channel, _ = state.subscribe("chat")
    assert type(channel) is Mine and state.holds(channel)
    connected(state)
    [emit] = state.receive(json.dumps({"channel": "chat", "event": "ev", "seq": 1}))
    assert emit.channel is channel
    state.unsubscribe("chat")
    assert not state.holds(channel) and state.subscribe("chat")[0] is not channel


def test_a_channel_the_server_unsubscribed_is_still_held_for_its_handlers():
    """The server's @unsubscribed ends the subscription but not the object's handlers: what came
    before it and the @unsubscribed itself still reach them (holds), unlike after unsubscribe()."""
    state = ClientState()
    channel, _ = state.subscribe("chat")
    [subscribe] = frames(connected(state))
    state.receive(json.dumps({"channel": "chat", "event": "@subscribed", "ref": subscribe["ref"],
                              "data": {"recovered": False, "seq": 0, "epoch": "e1"}}))
    [emit] = state.receive(json.dumps({"channel": "chat", "event": "@unsubscribed", "data": {"reason": "gone"}}))
    assert emit.channel is channel and emit.args[0].reason == "gone"
    assert state.holds(channel) and "chat" not in state.channels and not channel.wanted


def test_presence_state_is_the_one_the_channel_was_made_with():
    """A ChannelState keeps the presence object it is given (the client's ChannelPresence), and the
    state fills its members."""
    presence = PresenceState()
    state = ClientState(new_channel=lambda name: ChannelState(name, presence))
    channel, _ = state.subscribe("room")
    [subscribe] = frames(connected(state))
    state.receive(json.dumps({"channel": "room", "event": "@subscribed", "ref": subscribe["ref"],
                              "data": {"recovered": False, "seq": 0, "epoch": "e1",
                                       "presence": {"members": [{"id": "c1"}], "clients": 1, "users": 0}}}))
    assert channel.presence is presence and presence.members == {"c1": Member("c1", None, None)}


def test_anything_heard_puts_the_ping_off():
    """Bytes that are no whole frame (heard()) count as life, as frames do."""
    now = [0.0]
    state = ClientState(ping_interval=5, clock=lambda: now[0])
    connected(state)
    now[0] = 4.0
    state.heard()
    now[0] = 8.0
    assert state.tick() == [] and state.wait_time() == 1.0


def test_a_dropped_connect_stops_ticking():
    """Once tick() gave a connect up, it asks for no more ticks."""
    now = [0.0]
    state = ClientState(connect_timeout=1, clock=lambda: now[0])
    state.connecting()
    now[0] = 1.0
    assert state.tick() == [Drop("no @connected within 1s")]
    assert state.wait_time() is None and state.tick() == []


def test_errors_carry_the_code_and_the_close_code():
    """A send lost with the connection fails with ConnectionLost naming the close code."""
    state = ClientState()
    connected(state)
    request = object()
    state.send("chat", "echo", 1, request)
    settle, emit, retry = state.lost(4008)
    assert settle.request is request and isinstance(settle.error, ConnectionLost)
    assert "(4008)" in str(settle.error) and emit.args == (4008,) and isinstance(retry, Retry)


def test_error_name_of_a_refusal_body():
    """The error of a refusal's JSON body, when it is a string."""
    assert error_name(b'{"error": "ticket_used"}') == "ticket_used"
    assert error_name(b'{"error": 5}') is None
    assert error_name(b"[1]") is None
    assert error_name(b"<html>") is None


def test_the_two_message_classes_keep_their_names_and_fields():
    """The server's Message and the client's ReceivedMessage are two types; client.Message stays an alias."""
    assert client.Message is ReceivedMessage
    assert ReceivedMessage("chat", "ev", 1, 5).seq == 5
    server_side = flask_robe_sockets.Message("chat", "ev", 1, 7)
    assert server_side.ref == 7 and server_side.to_dict() == {"channel": "chat", "event": "ev", "data": 1, "ref": 7}
    assert flask_robe_sockets.Message is not client.Message
