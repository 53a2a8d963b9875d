"""Connections ending every way they can, and what they leave behind.

Disconnects (clean close, TCP reset, ping timeout) must take a connection
out of every channel at once and run ``on_disconnect`` once; churn and
half-open connections must leave memory and counts where they were; a
worker told to stop closes its sockets with 1001 (PROTOCOL.md section 5).
"""
from __future__ import annotations

import json
import signal
import socket
import time

import pytest
import requests
from websockets.sync.client import connect

from .rawws import PING, TEXT, RawWebSocket, build_frame
from .servers import Gunicorn, wait_until

PING_INTERVAL = 1

CONFIG = {
    "ROBE_SOCKETS_TICKETS_REQUIRED": False,
    "ROBE_SOCKETS_PING_INTERVAL": PING_INTERVAL,
    "ROBE_SOCKETS_CLOSE_TIMEOUT": 1,
    "ROBE_SOCKETS_SEND_QUEUE_SIZE": 50,
    "ROBE_SOCKETS_RATE_LIMIT": [100000, 100000],
}


@pytest.fixture(scope="module")
def srv():
    server = Gunicorn(CONFIG)
    yield server
    server.stop()


@pytest.fixture
def raw():
    """Open raw sockets (already past ``@connected``); all closed after the test."""
    opened = []

    def open_(srv, connected=True, **kwargs):
        ws = RawWebSocket(srv.ws_url, handshake=connected, **kwargs)
        opened.append(ws)
        if connected:
            ws.connected()
        return ws

    yield open_
    for ws in opened:
        ws.close()


def idle_stats(srv, **expected):
    """Wait until /stats shows ``expected``, and return it."""
    def matches():
        stats = srv.stats()
        return stats if all(stats[key] == value for key, value in expected.items()) else None

    return wait_until(matches, 10, 0.05, f"stats {expected}, last seen {srv.stats()}")


def subscribe_all(ws, channels):
    for name in channels:
        assert ws.request({"channel": name, "event": "@subscribe"})["event"] == "@subscribed"


# -- disconnects --------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset", "ping-timeout"])
def test_disconnect_leaves_every_channel_at_once(srv, raw, how):
    """However a client goes, it leaves all its channels together and on_disconnect runs once."""
    names = [f"{how}:a", f"{how}:b", f"{how}:c"]
    before = idle_stats(srv, connections=0)
    with connect(srv.ws_url, open_timeout=5) as honest:
        assert json.loads(honest.recv(timeout=5))["event"] == "@connected"
        honest.send(json.dumps({"channel": names[0], "event": "@subscribe"}))
        assert json.loads(honest.recv(timeout=5))["event"] == "@subscribed"
        leaver = raw(srv)
        subscribe_all(leaver, names)
        assert srv.stats()["members"] == {names[0]: 2, names[1]: 1, names[2]: 1}
        started = time.monotonic()
        if how == "close":
            leaver.send_close(1000)
            assert leaver.recv_close() == 1000
        elif how == "reset":
            leaver.reset()
        # ping-timeout: it just stays silent and never answers the server's ping.
        stats = idle_stats(srv, connections=1)
        elapsed = time.monotonic() - started
        # One look at the server: every channel of it gone, the honest member kept.
        assert stats["members"] == {names[0]: 1}
        assert stats["disconnects"] == before["disconnects"] + 1
        assert stats["disconnected_twice"] == []
        if how == "ping-timeout":
            # Dropped after one ping went unanswered: between two and three intervals.
            assert 2 * PING_INTERVAL - 0.2 < elapsed < 3 * PING_INTERVAL + 1
            assert leaver.recv_frame().opcode == PING
        else:
            assert elapsed < 1
        # The honest client is still served on the shared channel.
        requests.post(f"{srv.url}/broadcast/{names[0]}/news", json="still here", timeout=5)
        assert json.loads(honest.recv(timeout=5))["data"] == "still here"
    idle_stats(srv, connections=0, slots=0, channels=[], joining=[])


def test_ping_answered_keeps_an_idle_client(srv, raw):
    """A client that answers pings and sends nothing else stays connected past the timeout."""
    ws = raw(srv)
    deadline = time.monotonic() + 3 * PING_INTERVAL
    pings = 0
    while time.monotonic() < deadline:
        try:
            frame = ws.recv_frame(timeout=deadline - time.monotonic())
        except TimeoutError:
            break
        assert frame.opcode == PING
        pings += 1
        ws.send_frame(0xA, frame.payload)
    assert pings >= 1
    assert ws.request({"event": "@ping", "ref": 1}) == {"event": "@pong", "data": None, "ref": 1}


def test_slow_handler_is_not_a_ping_timeout(srv):
    """A handler busy for three ping intervals does not get its client dropped as silent."""
    with connect(srv.ws_url, open_timeout=5) as ws:  # answers pings by itself
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": "chat", "event": "slow", "data": 3 * PING_INTERVAL, "ref": 1}))
        # The pongs wait unread behind the handler; the reply still comes.
        assert json.loads(ws.recv(timeout=3 * PING_INTERVAL + 5)) == {
            "channel": "chat", "event": "@reply", "data": "done", "ref": 1,
        }
        ws.send(json.dumps({"event": "@ping", "ref": 2}))
        assert json.loads(ws.recv(timeout=5)) == {"event": "@pong", "data": None, "ref": 2}


# -- churn and half-open connections -----------------------------------------


def leak_stats(srv) -> dict:
    return requests.get(f"{srv.url}/stats?gc=1", timeout=10).json()


def take_baseline(srv) -> dict:
    idle_stats(srv, connections=0)
    # The first gc=1 call grows the heap by the size of its object list:
    # make that part of the baseline.
    leak_stats(srv)
    return leak_stats(srv)


def assert_back_to_baseline(srv, baseline: dict, rss_slack: int = 4 << 20) -> dict:
    """Counts equal the baseline again; memory within ``rss_slack`` of it."""
    def settled():
        stats = leak_stats(srv)
        same = all(stats[key] == baseline[key] for key in (
            "connections", "slots", "channels", "joining", "histories", "connection_objects",
        ))
        # The baseline may have caught a greenlet of an earlier request finishing.
        return stats if same and stats["greenlets"] <= baseline["greenlets"] else None

    try:
        stats = wait_until(settled, 15, 0.2, "the baseline")
    except TimeoutError:
        pytest.fail(f"not back to {baseline}: {leak_stats(srv)}\n{srv.output()[-3000:]}")
    assert stats["rss"] - baseline["rss"] < rss_slack, (stats["rss"], baseline["rss"])
    assert stats["disconnected_twice"] == []
    return stats


def subscribe_cycles(ws, start: int, count: int, batch: int = 20) -> None:
    """Subscribe to and leave ``count`` distinct channels, pipelined by batches.

    A batch's answers must fit the send queue: the server reads a whole
    batch before its writer runs.
    """
    for first in range(start, start + count, batch):
        frames = []
        for i in range(first, min(first + batch, start + count)):
            channel = f"cycle:{i}"
            for event in ("@subscribe", "@unsubscribe"):
                frame = {"channel": channel, "event": event, "ref": i}
                frames.append(build_frame(TEXT, json.dumps(frame).encode()))
        ws.sock.sendall(b"".join(frames))
        for _ in range(len(frames)):
            assert ws.recv_json()["event"] in ("@subscribed", "@unsubscribed")


def test_thousands_of_subscribe_cycles_leave_nothing(srv, raw):
    """5,000 subscribe/unsubscribe cycles on distinct channels leave counts and memory at baseline."""
    ws = raw(srv)
    subscribe_cycles(ws, 0, 1000)  # warm-up: allocator pools, caches
    leak_stats(srv)
    baseline = leak_stats(srv)
    subscribe_cycles(ws, 1000, 5000)
    assert_back_to_baseline(srv, baseline, rss_slack=2 << 20)


def test_connection_churn_leaves_nothing(srv, raw):
    """Hundreds of connections opened, subscribed and dropped every way leave no object behind."""
    def churn(rounds):
        for _ in range(rounds):
            sockets = [raw(srv) for _ in range(30)]
            for i, ws in enumerate(sockets):
                ws.send_json({"channel": f"churn:{i % 3}", "event": "@subscribe"})
            for i, ws in enumerate(sockets):
                assert ws.recv_json()["event"] == "@subscribed"
                if i % 3 == 0:
                    ws.send_close()
                elif i % 3 == 1:
                    ws.reset()
                else:
                    ws.close()

    churn(5)  # warm-up: the allocator's pools, greenlet stacks
    baseline = take_baseline(srv)
    churn(10)
    # A leak of 7 KB per connection would show: 2 MB over 300 of them.
    assert_back_to_baseline(srv, baseline, rss_slack=2 << 20)


def test_half_open_connections_are_dropped(srv, raw):
    """Unfinished handshakes and subscribers that stop reading are dropped; memory returns to baseline."""
    # The channel's history outlives its members (for recovery): create it first.
    requests.post(f"{srv.url}/broadcast/half-open/tick", json="first", timeout=5).raise_for_status()
    baseline = take_baseline(srv)
    silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(100)]
    partial = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(100)]
    try:
        for sock in partial:
            sock.sendall(b"GET /ops HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        stuck = [raw(srv, rcvbuf=4096) for _ in range(30)]
        for ws in stuck:
            subscribe_all(ws, ["half-open"])
        # The honest client is served meanwhile, and broadcasts pile up on the stuck ones.
        with connect(srv.ws_url, open_timeout=5) as honest:
            assert json.loads(honest.recv(timeout=5))["event"] == "@connected"
            for _ in range(10):
                requests.post(f"{srv.url}/burst/half-open/tick?count=300&size=4000&yield=1", timeout=10)
                if "half-open" not in srv.stats()["members"]:
                    break
            assert "half-open" not in srv.stats()["members"], "stuck subscribers were not dropped"
            honest.send(json.dumps({"channel": "chat", "event": "echo", "data": "hi", "ref": 2}))
            assert json.loads(honest.recv(timeout=5)) == {
                "channel": "chat", "event": "@reply", "data": {"echo": "hi"}, "ref": 2,
            }
        # Sockets that never finish their request are closed by gunicorn's keep-alive timeout.
        for sock in silent + partial:
            assert sock.recv(1024) == b""
        assert_back_to_baseline(srv, baseline)
    finally:
        for sock in silent + partial:
            sock.close()


# -- shutdown -----------------------------------------------------------------


def test_sigterm_closes_sockets_with_1001(make_server):
    """SIGTERM to gunicorn closes every socket with 1001 at once, long before the graceful timeout."""
    srv = make_server({"ROBE_SOCKETS_TICKETS_REQUIRED": False, "ROBE_SOCKETS_CLOSE_TIMEOUT": 1})
    raws = [RawWebSocket(srv.ws_url) for _ in range(3)]
    try:
        for ws in raws:
            ws.connected()
            subscribe_all(ws, ["chat"])
        with connect(srv.ws_url, open_timeout=5) as honest:
            assert json.loads(honest.recv(timeout=5))["event"] == "@connected"
            started = time.monotonic()
            srv.signal(signal.SIGTERM)
            for ws in raws[:2]:
                assert ws.recv_close(timeout=3) == 1001
                ws.send_close(1001)
            # The third never answers the close frame: it waits CLOSE_TIMEOUT only.
            assert raws[2].recv_close(timeout=3) == 1001
            with pytest.raises(Exception) as closed:
                honest.recv(timeout=3)
            assert closed.value.rcvd.code == 1001
            assert time.monotonic() - started < 2
        srv.proc.wait(timeout=8)
        assert time.monotonic() - started < 5, "gunicorn waited for its graceful timeout"
        assert srv.proc.returncode == 0
    finally:
        for ws in raws:
            ws.close()
