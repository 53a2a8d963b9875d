"""The development server (``flask run``, threads, no gevent) serves sockets too."""
import json

import pytest
import requests
from websockets.sync.client import connect

from .servers import FlaskRun


@pytest.fixture
def dev_server():
    server = FlaskRun()
    yield server.url
    server.stop()


def test_flask_run_subscribes_broadcasts_and_replies(dev_server):
    """Under flask run a client connects, gets broadcasts and replies without delay."""
    ticket = requests.post(dev_server + "/ops/ticket", timeout=5).json()["ticket"]
    ws_url = dev_server.replace("http", "ws", 1) + "/ops?ticket=" + ticket
    with connect(ws_url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": "chat", "event": "@subscribe", "ref": 1}))
        assert json.loads(ws.recv(timeout=5))["event"] == "@subscribed"
        ws.send(json.dumps({"channel": "chat", "event": "echo", "data": "x", "ref": 2}))
        assert json.loads(ws.recv(timeout=2)) == {
            "channel": "chat", "event": "@reply", "data": {"echo": "x"}, "ref": 2,
        }
        requests.post(dev_server + "/broadcast/chat/news", json={"n": 1}, timeout=5)
        news = json.loads(ws.recv(timeout=2))
        assert news["event"] == "news" and news["data"] == {"n": 1}
