"""The shared client cases (tests/client_cases.json) against the Python client's state.

tests/js/cases.test.mjs runs the same cases against the browser client's
state; the file's ``about`` says how a case reads.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from flask_robe_sockets.clientstate import (
    ChannelState,
    ClientClosed,
    ClientError,
    ClientState,
    ConnectError,
    Drop,
    Emit,
    Member,
    Presence,
    QueueFull,
    ReceivedMessage,
    Retry,
    Send,
    Settle,
    Subscribed,
    Unsubscribed,
    is_channel_event,
    retry_after_seconds,
)

from .servers import ROOT

CASES = json.loads((ROOT / "tests" / "client_cases.json").read_text())

# The Python client raises ValueError where the browser's error has a code.
RAISES = {
    "bad_channel": ValueError,
    "bad_event": ValueError,
    "bad_position": ValueError,
    "already_subscribed": ValueError,
    "queue_full": QueueFull,
    "closed": ClientClosed,
}


class Clock:
    """The time a case sets with ``at``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def member_of(member: Member) -> dict[str, Any]:
    assert isinstance(member, Member)
    return {"id": member.id, "identity": member.identity, "info": member.info}


def value_of(args: tuple[Any, ...]) -> Any:
    """An emitted value as the cases write it."""
    if not args:
        return None  # connect
    [value] = args
    if isinstance(value, Member):
        return member_of(value)
    if isinstance(value, list):  # a presence sync
        return [member_of(member) for member in value]
    if isinstance(value, Unsubscribed):
        return {"reason": value.reason}
    if isinstance(value, ReceivedMessage):
        return {"channel": value.channel, "event": value.event, "data": value.data, "seq": value.seq}
    if isinstance(value, Subscribed):
        return {"recovered": value.recovered, "seq": value.seq, "epoch": value.epoch}
    if isinstance(value, ClientError):
        return {"code": value.code}
    return {"code": value}  # disconnect


def written(action: Any, names: dict[int, str]) -> dict[str, Any]:
    """An action as the cases write it; ``names`` maps requests to their labels."""
    if isinstance(action, Send):
        return {"send": json.loads(action.text)}
    if isinstance(action, Emit):
        channel = None if action.channel is None else action.channel.name
        return {"emit": list(action.names), "channel": channel, "value": value_of(action.args)}
    if isinstance(action, Settle):
        if action.error is not None:
            return {"settle": names[id(action.request)], "error": action.error.code}
        result = action.result
        if isinstance(result, Presence):
            result = {"members": [member_of(m) for m in result.members], "clients": result.clients, "users": result.users}
        return {"settle": names[id(action.request)], "result": result}
    if isinstance(action, Retry):
        return {"retry": pytest.approx(action.delay, abs=1e-9)}
    assert isinstance(action, Drop)
    return {"drop": True}


def make_state(session: dict[str, Any], clock: Clock) -> ClientState:
    randoms = itertools.cycle(session.get("random", [1]))
    return ClientState(**session.get("options", {}), clock=clock, random=lambda: next(randoms))


def run(state: ClientState, step: dict[str, Any], requests: dict[str, object]) -> list[Any]:
    do = step["do"]
    if do == "subscribe":
        return state.subscribe(step["channel"], **step.get("position", {}))[1]
    if do == "unsubscribe":
        return state.unsubscribe(step["channel"])
    if do == "send":
        request = requests.setdefault(step["request"], object())
        return state.send(step["channel"], step["event"], step["data"], request)
    if do == "fetch":
        request = requests.setdefault(step["request"], object())
        return state.fetch_presence(step["channel"], request)
    if do == "withdraw":
        assert state.withdraw(requests[step["request"]]) is step["withdrawn"]
        return []
    if do == "connecting":
        state.connecting()
        return []
    if do == "connect_failed":
        return state.connect_failed(ConnectError("refused", code=step["code"], retry_after=step.get("retry_after")))
    if do == "receive":
        return state.receive(json.dumps(step["frame"]))
    if do == "lost":
        return state.lost(step["code"])
    if do == "tick":
        return state.tick()
    assert do == "close", do
    return state.close()


@pytest.mark.parametrize("session", CASES["sessions"], ids=[s["name"] for s in CASES["sessions"]])
def test_session(session):
    """The Python client's state decides as the shared case says, step by step."""
    clock = Clock()
    state = make_state(session, clock)
    requests: dict[str, object] = {}
    for number, step in enumerate(session["steps"], 1):
        where = f"step {number}: {step['do']}"
        clock.now = float(step.get("at", clock.now))
        if "raises" in step:
            with pytest.raises(RAISES[step["raises"]]):
                run(state, step, requests)
            continue
        actions = run(state, step, requests)
        names = {id(request): name for name, request in requests.items()}
        if "actions" in step:
            assert [written(action, names) for action in actions] == step["actions"], where
        if "wait" in step:
            wait = state.wait_time()
            assert wait == (None if step["wait"] is None else pytest.approx(step["wait"])), where
        for name, fields in step.get("channels", {}).items():
            channel: ChannelState = state.channels[name]
            assert {key: getattr(channel, key) for key in fields} == fields, f"{where}: {name}"
        for name, members in step.get("members", {}).items():
            held = state.channels[name].presence.members
            assert [member_of(m) for m in held.values()] == members, f"{where}: {name}'s members"
            assert list(held) == [m["id"] for m in members], f"{where}: {name}'s members by id"


@pytest.mark.parametrize("name", CASES["channel_names"]["valid"])
def test_valid_channel_name(name):
    """A channel name the shared cases allow is subscribed."""
    assert ClientState().subscribe(name)[0].name == name


@pytest.mark.parametrize("name", CASES["channel_names"]["invalid"])
def test_invalid_channel_name(name):
    """A channel name the shared cases refuse fails in the caller."""
    with pytest.raises(ValueError, match="invalid channel name"):
        ClientState().subscribe(name)


@pytest.mark.parametrize("name", CASES["handler_names"]["valid"])
def test_valid_handler_name(name):
    """A channel handler name the shared cases allow may be registered."""
    assert is_channel_event(name)


@pytest.mark.parametrize("name", CASES["handler_names"]["invalid"])
def test_invalid_handler_name(name):
    """A channel handler name the shared cases refuse may not."""
    assert not is_channel_event(name)


@pytest.mark.parametrize("name", CASES["event_names"]["valid"])
def test_valid_event_name(name):
    """An event name the shared cases allow is sent (queued while disconnected)."""
    state = ClientState()
    assert state.send("chat", name, None, object()) == [] and state.queued == 1


@pytest.mark.parametrize("name", CASES["event_names"]["invalid"])
def test_invalid_event_name(name):
    """An event name the shared cases refuse fails in the caller, and nothing is queued."""
    state = ClientState()
    with pytest.raises(ValueError, match="invalid event name"):
        state.send("chat", name, None, object())
    assert state.queued == 0


@pytest.mark.parametrize("case", CASES["retry_after"], ids=lambda case: repr(case["header"]))
def test_retry_after(case):
    """A Retry-After header gives the floor the shared cases say, or none."""
    assert retry_after_seconds(case["header"]) == case["seconds"]
