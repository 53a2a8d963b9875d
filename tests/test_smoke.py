"""The first steps of a client against a live server."""
import json


def test_connect_subscribe_send(ws_connect):
    """A client subscribes, sends with a ref, and gets its broadcast and reply."""
    ws = ws_connect()
    ws.send(json.dumps({"channel": "chat", "event": "@subscribe", "ref": 1}))
    subscribed = json.loads(ws.recv(timeout=5))
    assert subscribed["event"] == "@subscribed" and subscribed["ref"] == 1
    ws.send(json.dumps({"channel": "chat", "event": "say", "data": {"text": "hi"}, "ref": 2}))
    frames = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
    said = next(f for f in frames if f["event"] == "said")
    reply = next(f for f in frames if f["event"] == "@reply")
    assert said["data"] == {"text": "hi"} and said["seq"] == subscribed["data"]["seq"] + 1
    assert reply == {"channel": "chat", "event": "@reply", "data": None, "ref": 2}
