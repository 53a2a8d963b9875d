"""Hostile and broken clients against a live server (PROTOCOL.md sections 3 and 5).

Each attack runs on a gunicorn gevent server with small limits, then an
honest client on the same server proves it is still served and the
attacker left nothing behind.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
from websockets.sync.client import connect

from .rawws import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, HandshakeRefused, RawWebSocket, build_frame
from .servers import Gunicorn, wait_until

RATE, BURST = 20, 10
MAX_SIZE = 1024
QUEUE = 50
FRAGMENTS = 8

CONFIG = {
    "ROBE_SOCKETS_TICKETS_REQUIRED": False,
    "ROBE_SOCKETS_MAX_MESSAGE_SIZE": MAX_SIZE,
    "ROBE_SOCKETS_RATE_LIMIT": [RATE, BURST],
    "ROBE_SOCKETS_SEND_QUEUE_SIZE": QUEUE,
    "ROBE_SOCKETS_MAX_CONNECTIONS": 40,
    "ROBE_SOCKETS_CLOSE_TIMEOUT": 1,
    "ROBE_SOCKETS_MAX_FRAGMENTS": FRAGMENTS,
}


@pytest.fixture(scope="module")
def srv():
    server = Gunicorn(CONFIG)
    yield server
    server.stop()


_opened: list[RawWebSocket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets():
    """Close what a test opened, even when it failed half-way."""
    yield
    while _opened:
        _opened.pop().close()


def open_raw(srv, **kwargs) -> RawWebSocket:
    ws = RawWebSocket(srv.ws_url, **kwargs)
    _opened.append(ws)
    ws.connected()
    return ws


def assert_honest_client_served(srv, channel: str = "chat") -> None:
    """An independent client subscribes, gets a broadcast and a reply, then leaves."""
    with connect(srv.ws_url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": channel, "event": "@subscribe", "ref": "s"}))
        assert json.loads(ws.recv(timeout=5))["event"] == "@subscribed"
        ws.send(json.dumps({"channel": channel, "event": "say", "data": "honest", "ref": "r"}))
        frames = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
        assert {f["event"] for f in frames} == {"said", "@reply"}
        assert next(f for f in frames if f["event"] == "said")["data"] == "honest"


def assert_nothing_left(srv) -> dict:
    """No connection, slot or channel membership remains once clients are gone."""
    def clean():
        stats = srv.stats()
        counts = (stats["connections"], stats["slots"], stats["channels"], stats["joining"])
        return stats if counts == (0, 0, [], []) else None

    stats = wait_until(clean, 10, message=f"a clean server, last seen {srv.stats()}")
    assert stats["disconnected_twice"] == []
    return stats


def error_frame(code: str, ref=None, channel=None) -> dict:
    """The shape of an ``@error`` answer, message aside."""
    frame = {"event": "@error", "code": code}
    if ref is not None:
        frame["ref"] = ref
    if channel is not None:
        frame["channel"] = channel
    return frame


def shape(frame: dict) -> dict:
    out = {"event": frame["event"]}
    if frame["event"] == "@error":
        out["code"] = frame["data"]["code"]
        assert isinstance(frame["data"]["message"], str)
    for key in ("ref", "channel"):
        if key in frame:
            out[key] = frame[key]
    return out


# -- rate limit ---------------------------------------------------------------


def test_flood_is_rate_limited_then_closed_1008(srv):
    """A flood gets its burst handled, then `rate_limited` with each frame's ref, then close 1008."""
    ws = open_raw(srv)
    # One write: the whole flood arrives at once, far over the rate.
    ws.sock.sendall(b"".join(
        build_frame(TEXT, json.dumps({"event": "@ping", "ref": i}).encode()) for i in range(200)
    ))
    answers = []
    while True:
        frame = ws.recv_frame()
        if frame.opcode == CLOSE:
            break
        answers.append(frame.json())
    assert frame.close_code == 1008
    pongs = [a for a in answers if a["event"] == "@pong"]
    limited = [a for a in answers if a["event"] == "@error"]
    assert [p["ref"] for p in pongs] == list(range(BURST))
    assert all(shape(a) == error_frame("rate_limited", ref=a["ref"]) for a in limited)
    # Refused frames answered in order, each with its own ref, until the close.
    assert [a["ref"] for a in limited] == list(range(BURST, BURST + len(limited)))
    assert 1 <= len(limited) <= BURST + 1
    ws.send_close(1008)
    ws.close()
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


def test_client_that_slows_down_is_not_closed(srv):
    """A client over the rate that backs off when answered `rate_limited` stays connected."""
    ws = open_raw(srv)
    ws.sock.sendall(b"".join(
        build_frame(TEXT, json.dumps({"event": "@ping", "ref": i}).encode()) for i in range(BURST + 3)
    ))
    answers = [ws.recv_json() for _ in range(BURST + 3)]
    assert [a["event"] for a in answers].count("@error") == 3
    assert all(shape(a) == error_frame("rate_limited", ref=a["ref"]) for a in answers if a["event"] == "@error")
    # It slows down to half the rate, for longer than a refusal spell lasts.
    for i in range(30):
        time.sleep(1 / (RATE / 2))
        assert ws.request({"event": "@ping", "ref": 100 + i}) == {"event": "@pong", "data": None, "ref": 100 + i}
    ws.send_close()
    assert ws.recv_close() == 1000
    ws.close()
    assert_nothing_left(srv)


def test_ping_frame_flood_is_rate_limited_then_closed_1008(srv):
    """WebSocket ping frames count against the rate limit: a ping flood is closed with 1008."""
    ws = open_raw(srv)
    ws.sock.sendall(build_frame(PING, b"p") * 200)
    pongs = limited = 0
    while True:
        frame = ws.recv_frame()
        if frame.opcode == CLOSE:
            break
        if frame.opcode == PONG:
            pongs += 1
        else:
            assert shape(frame.json()) == error_frame("rate_limited")
            limited += 1
    assert frame.close_code == 1008
    assert pongs == BURST and 1 <= limited <= BURST + 1
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


def flood_in_background(ws: RawWebSocket, chunk: bytes, seconds: float) -> threading.Thread:
    """Write ``chunk`` again and again for ``seconds``, reading nothing back."""
    def flood():
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                ws.sock.sendall(chunk)
        except OSError:
            pass

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    return thread


def test_fragment_flood_is_closed_1009_and_stalls_no_one(srv):
    """Endless empty fragments are counted: past MAX_FRAGMENTS frames the message closes with 1009."""
    before = srv.stats()["rss"]
    ws = open_raw(srv)
    honest = open_raw(srv)
    ws.send_frame(TEXT, b'{"event": "@pi', fin=False)
    # Empty fragments add nothing to the size: only counting frames ends them.
    flooder = flood_in_background(ws, build_frame(CONTINUATION, b"", fin=False) * 5000, 2.0)
    assert ws.recv_close(timeout=5) == 1009
    started = time.monotonic()
    assert honest.request({"event": "@ping", "ref": 1}, timeout=5)["event"] == "@pong"
    assert time.monotonic() - started < 1.0
    flooder.join(10)
    assert not flooder.is_alive()
    assert srv.stats()["rss"] - before < 4 << 20
    ws.close()
    honest.close()
    assert_nothing_left(srv)


@pytest.mark.parametrize("extra, closed", [(0, False), (1, True)], ids=["at-the-limit", "one-more"])
def test_max_fragments_per_message(srv, extra, closed):
    """A message in MAX_FRAGMENTS frames is handled; one frame more closes with 1009."""
    ws = open_raw(srv)
    # A fragmented message costs one frame of the rate limit per fragment.
    parts = [b'{"event": "@ping", "ref": "f"}'] + [b""] * (FRAGMENTS - 2 + extra)
    ws.send_frame(TEXT, parts[0], fin=False)
    for part in parts[1:]:
        ws.send_frame(CONTINUATION, part, fin=False)
    ws.send_frame(CONTINUATION, b"", fin=True)
    if closed:
        assert ws.recv_close() == 1009
    else:
        assert ws.recv_json() == {"event": "@pong", "data": None, "ref": "f"}
    ws.close()
    assert_nothing_left(srv)


# -- sizes, frame types, encodings -------------------------------------------


def test_oversize_message_closes_1009(srv):
    """A text message over MAX_MESSAGE_SIZE bytes closes the connection with 1009."""
    ws = open_raw(srv)
    ws.send_json({"channel": "chat", "event": "echo", "data": "x" * MAX_SIZE})
    assert ws.recv_close() == 1009
    ws.close()
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


def test_oversize_counts_bytes_not_characters(srv):
    """The size limit counts UTF-8 bytes: 400 four-byte characters are over 1024."""
    ws = open_raw(srv)
    ws.send_text(json.dumps({"channel": "chat", "event": "echo", "data": "\U0001F600" * 400}, ensure_ascii=False))
    assert ws.recv_close() == 1009
    ws.close()
    assert_nothing_left(srv)


def test_message_just_under_the_limit_is_handled(srv):
    """A message of exactly MAX_MESSAGE_SIZE bytes, in three fragments, is one message."""
    ws = open_raw(srv)
    head = json.dumps({"channel": "chat", "event": "echo", "ref": 1, "data": ""})[:-2]
    data = "y" * (MAX_SIZE - len(head) - 2)
    text = head + data + '"}'
    assert len(text.encode()) == MAX_SIZE
    payload = text.encode()
    ws.send_frame(TEXT, payload[:300], fin=False)
    ws.send_frame(PING, b"between fragments")  # control frames may interleave
    ws.send_frame(CONTINUATION, payload[300:700], fin=False)
    ws.send_frame(CONTINUATION, payload[700:], fin=True)
    pong = ws.recv_frame()
    assert (pong.opcode, pong.payload) == (0xA, b"between fragments")
    reply = ws.recv_json()
    assert reply == {"channel": "chat", "event": "@reply", "data": {"echo": data}, "ref": 1}
    ws.close()
    assert_nothing_left(srv)


def test_fragments_adding_up_past_the_limit_close_1009(srv):
    """Fragments each under the limit but over it together close with 1009."""
    ws = open_raw(srv)
    ws.send_frame(TEXT, b'{"channel": "chat", "event": "echo", "data": "', fin=False)
    for _ in range(3):
        ws.send_frame(CONTINUATION, b"z" * 400, fin=False)
    assert ws.recv_close() == 1009
    ws.close()
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


def test_binary_frame_is_bad_frame_and_connection_stays(srv):
    """A binary frame is answered `@error bad_frame`; the connection keeps working."""
    ws = open_raw(srv)
    ws.send_frame(BINARY, b'{"channel": "chat", "event": "echo", "ref": 1}')
    assert shape(ws.recv_json()) == error_frame("bad_frame")
    assert ws.request({"channel": "chat", "event": "echo", "data": 2, "ref": 2}) == {
        "channel": "chat", "event": "@reply", "data": {"echo": 2}, "ref": 2,
    }
    ws.close()
    assert_nothing_left(srv)


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "split-sequence"])
def test_invalid_utf8_closes_1007(srv, fragmented):
    """A text message that is not UTF-8 closes with 1007, even when a fragment splits the bytes."""
    ws = open_raw(srv)
    bad = b'{"channel": "chat", "event": "echo", "data": "\xc3\x28"}'
    if fragmented:
        # A valid two-byte sequence cut between fragments is fine...
        ws.send_frame(TEXT, b'{"channel": "chat", "event": "echo", "ref": 1, "data": "\xc3', fin=False)
        ws.send_frame(CONTINUATION, b'\xa9"}', fin=True)
        assert ws.recv_json()["data"] == {"echo": "\u00e9"}
        # ...an invalid one is not.
        ws.send_frame(TEXT, bad[:-5], fin=False)
        ws.send_frame(CONTINUATION, bad[-5:], fin=True)
    else:
        ws.send_frame(TEXT, bad)
    assert ws.recv_close() == 1007
    ws.close()
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


@pytest.mark.parametrize("text", [
    "[" * 65 + "]" * 65,
    '{"event": "@ping", "data": ' + "[" * 64 + "]" * 64 + "}",
    "[" * 1000,
    "{" * 500,
    '{"channel": "chat", "event": "echo", "data": 1e999}',
    '{"channel": "chat", "event": "echo", "data": -1e400}',
    '{"channel": "chat", "event": "echo", "data": ' + "9" * 500 + "}",
    '{"channel": "chat", "event": "echo", "data": NaN}',
    '{"channel": "chat", "event": "echo", "data": "\\ud800"}',
    '{"channel": "chat", "event": "echo", "data": 1} trailing',
    "",
    "null",
], ids=[
    "nesting-65", "nesting-65-inside-data", "open-brackets", "open-braces",
    "1e999", "-1e400", "500-digit-int", "NaN", "lone-surrogate", "trailing", "empty", "null",
])
def test_hostile_json_is_bad_frame(srv, text):
    """Deep nesting, numbers that fit no double, non-JSON: `bad_frame`, and the connection stays."""
    ws = open_raw(srv)
    ws.send_text(text)
    assert shape(ws.recv_json()) == error_frame("bad_frame")
    assert ws.request({"event": "@ping", "ref": "after"}) == {"event": "@pong", "data": None, "ref": "after"}
    ws.close()
    assert_nothing_left(srv)


def test_deepest_allowed_nesting_is_handled(srv):
    """Data nested 63 levels inside the frame object (64 in all) is accepted and echoed."""
    ws = open_raw(srv)
    data = json.loads("[" * 63 + "]" * 63)
    assert ws.request({"event": "@ping", "data": data, "ref": 1}) == {"event": "@pong", "data": data, "ref": 1}
    ws.close()


@pytest.mark.parametrize("frames", [
    [build_frame(TEXT, b'{"event": "@ping"}', mask=False)],
    [build_frame(TEXT, b'{"event": "@ping"}', rsv=4)],
    [build_frame(0x3, b"")],
    [build_frame(0xB, b"")],
    [build_frame(CONTINUATION, b"orphan")],
    [build_frame(TEXT, b"{", fin=False), build_frame(TEXT, b"}")],
    [build_frame(PING, b"", fin=False)],
    [build_frame(PING, b"x" * 126)],
    [build_frame(CLOSE, b"\x03")],
    [build_frame(CLOSE, (999).to_bytes(2, "big"))],
], ids=[
    "unmasked", "rsv1-without-extension", "reserved-opcode", "reserved-control-opcode",
    "orphan-continuation", "text-inside-fragmented-message", "fragmented-ping",
    "ping-over-125-bytes", "one-byte-close", "close-code-999",
])
def test_rfc6455_violation_closes_1002(srv, frames):
    """A frame that breaks RFC 6455 framing closes the connection with 1002 and leaves nothing behind."""
    ws = open_raw(srv)
    ws.sock.sendall(b"".join(frames))
    assert ws.recv_close() == 1002
    ws.close()
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


@pytest.mark.parametrize("headers", [
    {"Sec-WebSocket-Version": "8"},
    {"Sec-WebSocket-Version": None},
    {"Sec-WebSocket-Key": None},
    {"Upgrade": "h2c"},
    {"Connection": "keep-alive, notupgrade"},
    {"Host": None},
], ids=["version-8", "no-version", "no-key", "not-websocket", "connection-token", "no-host"])
def test_broken_handshake_is_400_not_websocket(srv, headers):
    """A broken upgrade request is refused before the upgrade with `400 not_websocket`."""
    with pytest.raises(HandshakeRefused) as refused:
        RawWebSocket(srv.ws_url, headers=headers)
    assert refused.value.status == 400
    assert json.loads(refused.value.body) == {"error": "not_websocket"}
    assert_nothing_left(srv)


# -- slow consumer ------------------------------------------------------------


def test_slow_consumer_alone_is_dropped_with_4008(srv):
    """A subscriber that stops reading is dropped with 4008; an honest one gets every broadcast at once."""
    count, size = 300, 4000
    slow = open_raw(srv, rcvbuf=4096)
    assert slow.request({"channel": "flow", "event": "@subscribe"})["event"] == "@subscribed"
    with connect(srv.ws_url, open_timeout=5, max_size=None) as honest:
        assert json.loads(honest.recv(timeout=5))["event"] == "@connected"
        honest.send(json.dumps({"channel": "flow", "event": "@subscribe"}))
        expected = json.loads(honest.recv(timeout=5))["data"]["seq"]
        # Bursts until the kernel buffers of the stuck socket are full and its
        # queue overflows (a few MB on loopback), reading the honest socket as we go.
        for _ in range(20):
            started = time.monotonic()
            burst = requests.post(
                f"{srv.url}/burst/flow/tick?count={count}&size={size}&yield=1", timeout=10
            ).json()
            # The broadcaster never waits for the stuck socket.
            assert burst["seconds"] < 2, burst
            for _ in range(count):
                expected += 1
                assert json.loads(honest.recv(timeout=5))["seq"] == expected
            assert time.monotonic() - started < 5
            if srv.stats()["members"]["flow"] == 1:
                break
        else:
            pytest.fail("the stuck subscriber was never dropped")
        # The slow one left the channel at once, while its socket still waits.
        assert srv.stats()["connections"] == 2
    # When it reads again, the close frame 4008 is the last thing it gets,
    # after whole frames only, in order.
    received = []
    while True:
        frame = slow.recv_frame()
        if frame.opcode == CLOSE:
            break
        received.append(frame.json()["data"]["i"])
    assert frame.close_code == 4008
    assert received == [i % count for i in range(len(received))]
    slow.send_close(4008)
    with pytest.raises((ConnectionError, OSError)):
        slow.recv_frame(timeout=5)
    assert_honest_client_served(srv)
    assert_nothing_left(srv)


def test_slow_consumer_dropped_mid_write_gets_whole_frames_then_4008(srv):
    """Dropped while a frame is half written, a slow client still reads whole frames, then 4008."""
    slow = open_raw(srv, rcvbuf=4096)
    assert slow.request({"channel": "half-written", "event": "@subscribe"})["event"] == "@subscribed"
    # Bursts of exactly one queue's worth between yields: the socket takes
    # part of a batch, and the queue overflows before the writer has
    # sent the rest of it.
    for _ in range(40):
        requests.post(
            f"{srv.url}/burst/half-written/tick?count={QUEUE * 4}&size=3000&yield={QUEUE}", timeout=10
        ).raise_for_status()
        if "half-written" not in srv.stats()["members"]:
            break
    else:
        pytest.fail("the stuck subscriber was never dropped")
    received = []
    while True:
        frame = slow.recv_frame()
        if frame.opcode == CLOSE:
            break
        assert frame.opcode == TEXT and frame.fin
        received.append(frame.json()["data"]["i"])
    assert frame.close_code == 4008
    assert received == [i % (QUEUE * 4) for i in range(len(received))]
    slow.close()
    assert_nothing_left(srv)


# -- capacity -----------------------------------------------------------------


def test_max_connections_refuses_with_503_and_serves_the_rest(srv):
    """At MAX_CONNECTIONS the next handshake gets 503 `too_many_connections`; open sockets keep working."""
    limit = CONFIG["ROBE_SOCKETS_MAX_CONNECTIONS"]
    sockets = [open_raw(srv) for _ in range(limit)]
    try:
        for _ in range(3):
            with pytest.raises(HandshakeRefused) as refused:
                RawWebSocket(srv.ws_url)
            assert refused.value.status == 503
            assert json.loads(refused.value.body) == {"error": "too_many_connections"}
        for i, ws in enumerate(sockets):
            ws.send_json({"event": "@ping", "ref": i})
        assert [ws.recv_json()["ref"] for ws in sockets] == list(range(limit))
        # A freed slot is usable again.
        sockets.pop().close()
        wait_until(lambda: srv.stats()["slots"] == limit - 1, 5, message="the slot to be freed")
        sockets.append(open_raw(srv))
    finally:
        for ws in sockets:
            ws.close()
    assert_nothing_left(srv)
    assert_honest_client_served(srv)
