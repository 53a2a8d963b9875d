"""Recovery edge cases against a live server, with the websockets client."""
import json

import requests
from websockets.sync.client import connect


def frames_until(ws, predicate, limit=500):
    """Read frames until one matches ``predicate``; return them all."""
    seen = []
    for _ in range(limit):
        frame = json.loads(ws.recv(timeout=5))
        seen.append(frame)
        if predicate(frame):
            return seen
    raise AssertionError(f"no matching frame in {limit}: {seen[-3:]}")


def test_replay_larger_than_the_send_queue_is_delivered(make_server):
    """A replay of more broadcasts than the send queue holds reaches the client, not 4008."""
    srv = make_server({"ROBE_SOCKETS_SEND_QUEUE_SIZE": 20, "ROBE_SOCKETS_HISTORY_SIZE": 100})
    for n in range(60):
        requests.post(f"{srv.url}/broadcast/news/item", json=n, timeout=5).raise_for_status()
    with connect(f"{srv.ws_url}?ticket={srv.ticket()}", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": "news", "event": "@subscribe", "data": {"since": 0}, "ref": 1}))
        seen = frames_until(ws, lambda f: f.get("seq") == 60)
    assert seen[0]["data"]["recovered"] is True
    assert [f["data"] for f in seen[1:]] == list(range(60))


def test_epoch_of_the_wrong_type_is_not_the_current_one(server, ws_connect):
    """since with a non-string epoch replays nothing: only a missing epoch means the current one."""
    requests.post(f"{server.url}/broadcast/epochs/item", json=1, timeout=5).raise_for_status()
    ws = ws_connect()
    ws.send(json.dumps({"channel": "epochs", "event": "@subscribe", "data": {"since": 0, "epoch": 7}, "ref": 1}))
    answer = json.loads(ws.recv(timeout=5))
    assert answer["event"] == "@subscribed" and answer["data"]["recovered"] is False
    ws.send(json.dumps({"event": "@ping", "ref": "fence"}))
    assert json.loads(ws.recv(timeout=5)) == {"event": "@pong", "data": None, "ref": "fence"}


def test_authorize_hook_raising_forbidden_answers_forbidden(ws_connect):
    """An authorize hook that raises Forbidden refuses the subscribe with its message."""
    ws = ws_connect()
    ws.send(json.dumps({"channel": "vault", "event": "@subscribe", "ref": 1}))
    assert json.loads(ws.recv(timeout=5)) == {
        "channel": "vault",
        "event": "@error",
        "data": {"code": "forbidden", "message": "the vault is shut"},
        "ref": 1,
    }
