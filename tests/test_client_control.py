"""The Python client against a scripted protocol server on loopback: presence
(PROTOCOL.md section 7) and the server's control of connections (section 8):
the server's unsubscribe and the close codes 4500-4999 and 4001.

The server's frames are written by each test (test_client.ScriptedServer),
so that every rule is seen on a real socket, through the client's threads.
"""
from __future__ import annotations

import contextlib
import json
import random
import threading

import pytest
import requests
from websockets.exceptions import ConnectionClosed

from flask_robe_sockets.client import (
    ClientClosed,
    Member,
    Presence,
    ReplyError,
    SendTimeout,
    Unsubscribed,
)

from .servers import wait_until
from .test_client import Recorder, ScriptedServer, make_client  # noqa: F401  (make_client: a fixture)

ALICE = {"id": "c1", "identity": "alice", "info": {"name": "Alice"}}
BOB = {"id": "x2", "identity": "bob", "info": None}
CAROL = {"id": "x3", "identity": "carol", "info": {"name": "Carol"}}


def member(data: dict) -> Member:
    return Member(data["id"], data["identity"], data["info"])


def send(ws, channel: str | None, event: str, data=None, ref=None) -> None:
    frame = {"channel": channel, "event": event, "data": data}
    if ref is not None:
        frame["ref"] = ref
    ws.send(json.dumps(frame))


def subscribed(ws, channel: str, ref, presence: list | None = None, seq: int = 0, recovered: bool = False) -> None:
    data = {"recovered": recovered, "seq": seq, "epoch": "e1"}
    if presence is not None:
        data["presence"] = {
            "members": presence,
            "clients": len(presence),
            "users": len({m["identity"] for m in presence if m["identity"] is not None}),
        }
    send(ws, channel, "@subscribed", data, ref)


def until_closed(ws) -> None:
    """Read (and drop) what the client sends until it closes."""
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            ws.recv(timeout=10)


@pytest.fixture
def scripted():
    servers = []

    def start(script) -> ScriptedServer:
        fake = ScriptedServer(script)
        servers.append(fake)
        return fake

    yield start
    for fake in servers:
        fake.close()


def test_presence_members_follow_snapshot_joins_and_leaves(scripted, make_client):
    """presence.members starts from @subscribed's snapshot and follows @join/@leave, each with its
    handler and a sync; fetch() returns the server's answer or raises its refusal; a reconnect
    replaces the members with the new snapshot (one sync), and nothing reaches "message"."""
    answered = threading.Event()

    def script(ws, number):
        frames = [fake.read(ws, number) for _ in range(2)]  # the subscribes of room:lobby and chat
        refs = {frame["channel"]: frame["ref"] for frame in frames}
        if number == 1:
            subscribed(ws, "room:lobby", refs["room:lobby"], [ALICE, BOB])
            subscribed(ws, "chat", refs["chat"])
            send(ws, "room:lobby", "@join", CAROL)
            send(ws, "room:lobby", "@leave", BOB)
            ask = fake.read(ws, number)
            send(ws, "room:lobby", "@presence", {"members": [ALICE, CAROL], "clients": 2, "users": 2}, ask["ref"])
            ask = fake.read(ws, number)
            send(ws, "chat", "@error", {"code": "presence_disabled", "message": "no presence on chat"}, ask["ref"])
            answered.wait(10)
            ws.close(1011)
        else:
            subscribed(ws, "room:lobby", refs["room:lobby"], [CAROL, {**ALICE, "id": "c2"}], recovered=True)
            subscribed(ws, "chat", refs["chat"], recovered=True)
            fake.read(ws, number)  # a @presence left unanswered
            until_closed(ws)

    fake = scripted(script)
    record = Recorder()
    client = make_client(fake.ws_url, ticket_url=None, record=record)
    # The server answers once both subscribes came: lobby's handlers are in place by then.
    lobby = client.subscribe("room:lobby")
    for name in ("join", "leave", "sync"):
        lobby.presence.on(name, record(name))
    lobby.on("message", record("all"))
    lobby.on("join", record("app join"))
    chat = client.subscribe("chat")
    chat.presence.on("sync", record("chat sync"))
    record.wait("leave")
    assert record.args("join") == [member(CAROL)] and record.args("leave") == [member(BOB)]
    assert lobby.presence.members == {"c1": member(ALICE), "x3": member(CAROL)}
    assert chat.presence.members == {}

    assert lobby.presence.fetch(timeout=5) == Presence([member(ALICE), member(CAROL)], clients=2, users=2)
    with pytest.raises(ReplyError) as refused:
        chat.presence.fetch(timeout=5)
    assert (refused.value.code, refused.value.channel) == ("presence_disabled", "chat")
    answered.set()

    record.wait("sync", 5)
    replaced = [member(CAROL), Member("c2", "alice", {"name": "Alice"})]
    assert record.args("sync") == [
        [member(ALICE), member(BOB)],
        [member(ALICE), member(BOB), member(CAROL)],
        [member(ALICE), member(CAROL)],
        [],  # the connection was lost
        replaced,  # the new snapshot, not merged with the old list
    ]
    assert list(lobby.presence.members.values()) == replaced
    assert record.args("disconnect") == [1011]
    with pytest.raises(SendTimeout) as late:
        lobby.presence.fetch(timeout=0.3)
    assert late.value.code == "timeout"
    client.close()
    assert record.args("all") == [] and record.args("app join") == [] and record.args("chat sync") == []
    assert lobby.presence.members == {}
    with pytest.raises(ValueError, match="unknown presence event"):
        lobby.presence.on("message", print)
    with pytest.raises(ValueError, match="invalid event name"):
        lobby.on("@join", print)


def test_server_unsubscribe_ends_the_channel_for_good(scripted, make_client):
    """A server's @unsubscribed reaches the channel's "@unsubscribed" with the reason; the channel
    hears nothing more, is not subscribed again on reconnect, and subscribe() makes a new one."""

    def script(ws, number):
        if number == 1:
            refs = {frame["channel"]: frame["ref"] for frame in (fake.read(ws, number) for _ in range(2))}
            subscribed(ws, "room:secret", refs["room:secret"], [ALICE], seq=3)
            subscribed(ws, "chat", refs["chat"])
            send(ws, "room:secret", "ev", "before")
            send(ws, "room:secret", "@unsubscribed", {"reason": "removed from the room"})
            ws.send(json.dumps({"channel": "room:secret", "event": "ev", "data": "after", "seq": 4}))
            ws.close(1001)
        else:
            while True:  # every subscribe is answered, and recorded
                frame = fake.read(ws, number)
                subscribed(ws, frame["channel"], frame["ref"], recovered=True)

    fake = scripted(script)
    record = Recorder()
    client = make_client(fake.ws_url, ticket_url=None, record=record)
    secret = client.subscribe("room:secret")
    secret.on("@unsubscribed", record("unsubscribed"))
    secret.on("ev", record("ev"))
    secret.presence.on("sync", record("sync"))
    client.subscribe("chat")  # the server answers once both came
    [first, _] = [fake.next_frame(), fake.next_frame()]
    assert first == (1, {"channel": "room:secret", "event": "@subscribe", "ref": 1})
    number, again = fake.next_frame()
    assert (number, again) == (2, {"channel": "chat", "event": "@subscribe", "ref": 3, "data": {"since": 0, "epoch": "e1"}})
    assert record.wait("unsubscribed") == [Unsubscribed("removed from the room")]
    assert [m.data for m in record.args("ev")] == ["before"]
    assert record.args("sync") == [[member(ALICE)], []]
    assert (secret.subscribed, secret.presence.members, secret.seq) == (False, {}, 3)

    back = client.subscribe("room:secret")
    assert back is not secret and fake.next_frame() == (2, {"channel": "room:secret", "event": "@subscribe", "ref": 4})
    # Answered maybe before a handler could be registered: the channel's own flag says it.
    wait_until(lambda: back.subscribed, message="the new subscription")
    assert record.args("unsubscribed") == [Unsubscribed("removed from the room")] and fake.received.empty()


def test_close_4500_ends_the_client_as_close_would(scripted, make_client):
    """A close with 4500 gives one "disconnect" with 4500, fails the send waiting for its answer
    with ClientClosed, and the client never reconnects: it is closed."""

    def script(ws, number):
        frame = fake.read(ws, number)
        subscribed(ws, "chat", frame["ref"])
        fake.read(ws, number)  # the send, never answered
        ws.close(4500, "signed out")

    fake = scripted(script)
    record = Recorder()
    client = make_client(fake.ws_url, ticket_url=None, record=record)
    chat = client.subscribe("chat")
    wait_until(lambda: chat.subscribed, message="the subscription")
    with pytest.raises(ClientClosed) as ended:
        chat.send("ev", 1, timeout=5)
    assert ended.value.code == "closed"
    assert record.wait("disconnect") == [4500] and client.closed
    # The thread that would reconnect is over: nothing will.
    client._connection_thread.join(5)
    assert not client._connection_thread.is_alive()
    with pytest.raises(ClientClosed):
        chat.send("ev", 2, timeout=5)
    with pytest.raises(ClientClosed):
        client.subscribe("news")
    client.close()
    assert record.args("disconnect") == [4500] and record.args("connect") == [()]
    assert [number for number, _ in (fake.next_frame(timeout=0), fake.next_frame(timeout=0))] == [1, 1]
    assert fake.received.empty()


def test_close_4001_reconnects_at_once(scripted, make_client, monkeypatch):
    """After a close with 4001 the client reconnects at once, although its backoff would wait
    30 s, and subscribes again from where it was."""
    monkeypatch.setattr(random, "random", lambda: 1.0)  # no jitter: any backoff is 30 s

    def script(ws, number):
        frame = fake.read(ws, number)
        subscribed(ws, "chat", frame["ref"], seq=7, recovered=number > 1)
        if number == 1:
            ws.close(4001, "permissions changed")
        else:
            until_closed(ws)

    fake = scripted(script)
    record = Recorder()
    client = make_client(
        fake.ws_url, ticket_url=None, record=record, reconnect_delay=30, max_reconnect_delay=30
    )
    client.subscribe("chat")
    assert fake.next_frame() == (1, {"channel": "chat", "event": "@subscribe", "ref": 1})
    assert fake.next_frame(timeout=5) == (
        2, {"channel": "chat", "event": "@subscribe", "ref": 2, "data": {"since": 7, "epoch": "e1"}}
    )
    assert record.wait("connect", 2) and record.args("disconnect") == [4001]


PRESENCE = {"ROBE_SOCKETS_PRESENCE": ["pinfo:*"]}


def test_presence_against_a_live_server(make_server, make_client):
    """Against gunicorn with presence on: each client's members start from its snapshot (itself
    included, with the app's info), another's join and leave arrive with their handlers, fetch()
    counts connections and people, and a channel without presence refuses it."""
    srv = make_server(PRESENCE)
    people = {}
    for name in ("alice", "bob"):
        http = requests.Session()
        http.post(srv.url + "/login", data={"user": name}, timeout=5).raise_for_status()
        record = Recorder()
        client = make_client(srv=srv, session=http, record=record)
        room = client.subscribe("pinfo:room")
        for event in ("join", "leave", "sync"):
            room.presence.on(event, record(event))
        people[name] = (client, room, record, http)
        record.wait("sync")

    (alice, alice_room, alice_seen, _), (bob, bob_room, bob_seen, _) = people["alice"], people["bob"]
    me = Member(alice.id, "alice", {"name": "alice", "on": "pinfo:room"})
    other = Member(bob.id, "bob", {"name": "bob", "on": "pinfo:room"})
    assert alice_seen.wait("join") == [other]
    assert alice_room.presence.members == {alice.id: me, bob.id: other} == bob_room.presence.members
    assert alice_seen.args("sync")[0] == [me] and bob_seen.args("join") == []
    answer = alice_room.presence.fetch(timeout=5)
    assert (sorted(answer.members, key=lambda m: m.identity), answer.clients, answer.users) == ([me, other], 2, 2)

    news = alice.subscribe("news-presence-off")
    news.on("@subscribed", alice_seen("subscribed"))
    alice_seen.wait("subscribed")
    with pytest.raises(ReplyError) as refused:
        news.presence.fetch(timeout=5)
    assert refused.value.code == "presence_disabled" and news.presence.members == {}

    bob.close()
    assert alice_seen.wait("leave") == [other]
    assert alice_room.presence.members == {alice.id: me} and alice_seen.args("sync")[-1] == [me]
    for _, _, _, http in people.values():
        http.close()


def test_the_servers_control_against_a_live_server(make_server, make_client, monkeypatch):
    """Against gunicorn: sockets.unsubscribe() reaches the channel's "@unsubscribed" with its
    reason, and after a disconnect with 4001 the client is back at once without that channel;
    sockets.disconnect(identity=) with its default 4500 ends the client."""
    monkeypatch.setattr(random, "random", lambda: 1.0)  # no jitter: any backoff is 30 s
    srv = make_server(PRESENCE)
    http = requests.Session()
    http.post(srv.url + "/login", data={"user": "alice"}, timeout=5).raise_for_status()
    record = Recorder()
    client = make_client(srv=srv, session=http, record=record, reconnect_delay=30, max_reconnect_delay=30)
    kept, removed = client.subscribe("pinfo:kept"), client.subscribe("pinfo:removed")
    removed.on("@unsubscribed", record("unsubscribed"))
    wait_until(lambda: kept.subscribed and removed.subscribed, message="both subscriptions")

    def control(action: str, **kwargs) -> None:
        http.post(f"{srv.url}/control/{action}", json=kwargs, timeout=5).raise_for_status()

    def members(channel: str) -> list:
        return [m["identity"] for m in http.get(f"{srv.url}/presence/{channel}", timeout=5).json()["members"]]

    control("unsubscribe", channel="pinfo:removed", identity="alice", reason="removed from the room")
    assert record.wait("unsubscribed") == [Unsubscribed("removed from the room")]
    first = client.id
    control("disconnect", connection_id=first, code=4001, reason="permissions changed")
    record.wait("connect", 2, timeout=5)  # its backoff would be up to 30 s
    wait_until(lambda: kept.subscribed, message="the resubscribe")
    assert record.args("disconnect") == [4001] and client.id != first
    assert members("pinfo:kept") == ["alice"] and members("pinfo:removed") == []

    control("disconnect", identity="alice")
    assert record.wait("disconnect", 2) == [4001, 4500]
    wait_until(lambda: client.closed, message="the client to close")
    with pytest.raises(ClientClosed):
        client.subscribe("pinfo:kept")
    http.close()
