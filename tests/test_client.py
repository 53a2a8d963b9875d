"""The Python client against a live gunicorn gevent server.

Connection trouble is made real with a loopback TCP proxy between client
and server that a test can cut, blackhole or make refuse new connections,
while the server (and its in-memory history) stays up.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import queue
import random
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from flask_robe_sockets.client import (
    Client,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    Message,
    QueueFull,
    ReplyError,
    SendTimeout,
    Subscribed,
)
from flask_robe_sockets.errors import RobeSocketsError

from .servers import ROOT, Gunicorn, wait_until


def cut(*socks: socket.socket) -> None:
    """Shut sockets down both ways, as a network failure would; already closed is fine."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Proxy:
    """A loopback TCP proxy to ``port`` whose connections the test controls.

    With ``tls`` (a server-side SSL context) it terminates TLS, as a load
    balancer in front of the app would.
    """

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = ("127.0.0.1", port)
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ws_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{self.port}/ops"
        #: While true, new connections are closed as soon as they arrive.
        self.refusing = False
        self.accepted = 0
        #: Bytes read from clients, forwarded or not.
        self.from_clients = 0
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._sockets: list[socket.socket] = []  # every one, closed by close()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                conn.close()
                continue
            if self.tls:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError:
                    conn.close()
                    continue
            upstream = socket.create_connection(self.target)
            frozen = threading.Event()
            # Both pumps use both sockets: an SSL socket must not read and
            # write at once, so each recv and sendall of a pair takes turns.
            io_lock = threading.Lock()
            with self._lock:
                self.accepted += 1
                self._pairs.append((conn, upstream, frozen))
                self._sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                args = (src, dst, frozen, io_lock)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src, dst, frozen: threading.Event, io_lock: threading.Lock) -> None:
        from_client = src.getsockname()[1] == self.port
        try:
            while True:
                if not (isinstance(src, ssl.SSLSocket) and src.pending()):
                    select.select([src], [], [])  # so that recv, under the lock, never waits long
                with io_lock:
                    data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    self.from_clients += len(data)
                if not frozen.is_set():  # a frozen path loses everything, silently
                    with io_lock:
                        dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile
            pass
        cut(src, dst)

    def drop(self) -> None:
        """Cut every open connection, as a network failure would."""
        for conn, upstream, _ in self._take():
            cut(conn, upstream)

    def freeze(self) -> None:
        """Blackhole every open connection: bytes vanish, nothing closes."""
        with self._lock:
            for _, _, frozen in self._pairs:
                frozen.set()

    def _take(self) -> list:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        return pairs

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self.listener.close()
        self.drop()
        for sock in self._sockets:
            sock.close()


class Recorder:
    """Collects handler calls as ``(name, *args)`` for tests to wait on."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, name: str):
        return lambda *args: self.calls.append((name, *args))

    def args(self, name: str) -> list:
        return [call[1] if len(call) == 2 else call[1:] for call in self.calls if call[0] == name]

    def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> list:
        wait_until(lambda: len(self.args(name)) >= count, timeout, message=f"{count} x {name}")
        return self.args(name)


@pytest.fixture
def make_client(server):
    """Build clients (fast backoff) that are closed after the test."""
    clients = []

    def make(url: str | None = None, srv=None, record: Recorder | None = None, **kwargs) -> Client:
        srv = srv or server
        kwargs.setdefault("ticket_url", srv.url + "/ops/ticket")
        kwargs.setdefault("reconnect_delay", 0.05)
        kwargs.setdefault("max_reconnect_delay", 0.2)
        kwargs.setdefault("send_timeout", 10)
        kwargs.setdefault("close_timeout", 1)
        client = Client(url or srv.ws_url, **kwargs)
        clients.append(client)
        if record is not None:
            for event in ("connect", "disconnect", "error", "message"):
                client.on(event, record(event))
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def proxy(server):
    proxy = Proxy(server.port)
    yield proxy
    proxy.close()


def unique(prefix: str = "news") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def publish(srv, channel: str, event: str, data) -> int:
    response = requests.post(f"{srv.url}/broadcast/{channel}/{event}", json=data, timeout=5)
    response.raise_for_status()
    return response.json()["seq"]


def outcome(function, *args, **kwargs):
    """What ``function`` returned, or the library error it raised."""
    try:
        return function(*args, **kwargs)
    except RobeSocketsError as exc:
        return exc


def subscribed(client: Client, name: str, record: Recorder) -> Subscribed:
    """Subscribe ``name``, recording its messages, and wait for ``@subscribed``."""
    channel = client.subscribe(name)
    channel.on("@subscribed", record("subscribed"))
    channel.on("ev", record("ev"))
    return record.wait("subscribed")[0]


# -- connecting and receiving -------------------------------------------


def test_connect_subscribe_and_receive_broadcast(server, make_client):
    """A client connects by itself, subscribes, and gets broadcasts: "message" handlers all, others their own."""
    record = Recorder()
    # No pings: if @connected stayed unread in wsproto's buffer after the
    # 101, nothing else would ever wake the reader.
    client = make_client(record=record, ping_interval=None)
    record.wait("connect")
    assert client.connected and isinstance(client.id, str)
    name = unique()
    client.subscribe(name).on("message", record("all"))
    first = subscribed(client, name, record)
    assert first == Subscribed(recovered=False, seq=0, epoch=first.epoch)
    assert client.subscribe(name).subscribed
    assert publish(server, name, "ev", {"text": "hi"}) == 1
    assert publish(server, name, "other", []) == 2
    record.wait("all", 2)
    assert record.args("all") == [
        Message(channel=name, event="ev", data={"text": "hi"}, seq=1),
        Message(channel=name, event="other", data=[], seq=2),
    ]
    assert record.args("ev") == record.args("all")[:1]
    assert client.subscribe(name).seq == 2 and record.args("message") == []


def test_same_channel_object_and_argument_checks(make_client):
    """subscribe() returns one object per name; bad names and data fail in the caller."""
    client = make_client()
    chat = client.subscribe("chat")
    assert client.subscribe("chat") is chat and chat.name == "chat"
    with pytest.raises(ValueError):
        client.subscribe("no spaces")
    with pytest.raises(ValueError):
        chat.send("@subscribe")
    with pytest.raises(ValueError):
        chat.on("@reply", print)
    with pytest.raises(ValueError, match="@subscribed, @unsubscribed, @error"):
        chat.on("@join", print)
    for own in ("@subscribed", "@unsubscribed", "@error"):
        assert chat.on(own, print) is print
    with pytest.raises(ValueError, match="since and epoch go together"):
        client.subscribe("news", since=3)
    with pytest.raises(ValueError, match="since must be a seq"):
        client.subscribe("news", since=-1, epoch="e1")
    with pytest.raises(TypeError):
        client.subscribe("news", 3, "e1")  # by keyword only: subscribe(name, since=..., epoch=...)
    with pytest.raises(ValueError):
        client.on("connected", print)
    with pytest.raises(ValueError):
        chat.send("echo", float("nan"))
    with pytest.raises(TypeError):
        chat.send("echo", object())


def test_subscribe_before_the_socket_is_open(proxy, make_client):
    """A channel subscribed before the first connect is subscribed on connect."""
    proxy.refusing = True
    record = Recorder()
    client = make_client(proxy.ws_url, record=record)
    name = unique()
    channel = client.subscribe(name)
    channel.on("@subscribed", record("subscribed"))
    record.wait("error")
    assert not client.connected and record.args("subscribed") == []
    proxy.refusing = False
    assert record.wait("subscribed")[0].recovered is False
    assert record.args("connect") == [()]


def test_direct_message_goes_to_client_message_handlers(make_client):
    """A message to this connection alone, with no channel, reaches client.on("message")."""
    record = Recorder()
    client = make_client(record=record)
    assert client.subscribe("chat").send("direct") is None
    [message] = record.wait("message")
    assert message == Message(channel=None, event="direct", data={"to": client.id}, seq=None)


# -- sending ------------------------------------------------------------


def test_send_returns_the_reply_data(make_client):
    """send() waits for @reply and returns its data, null included."""
    record = Recorder()
    client = make_client()
    chat = client.subscribe("chat")
    chat.on("said", record("said"))
    assert chat.send("echo", {"text": "hi"}) == {"echo": {"text": "hi"}}
    assert chat.send("first") == "second handler"
    assert chat.send("say", [1, 2]) is None
    assert record.wait("said")[0].data == [1, 2]


@pytest.mark.parametrize(
    "channel, event, code",
    [
        ("chat", "no-such-event", "unknown_event"),
        ("chat", "boom", "handler_error"),
        ("chat", "deny", "forbidden"),
        ("closed", "echo", "forbidden"),
    ],
)
def test_error_answer_raises_reply_error(make_client, channel, event, code):
    """An @error answer raises ReplyError carrying the protocol's code."""
    client = make_client()
    with pytest.raises(ReplyError) as info:
        client.subscribe(channel).send(event, {"x": 1})
    assert info.value.code == code and info.value.channel == channel
    assert isinstance(info.value, RobeSocketsError)
    if event == "deny":
        assert info.value.message == "no, you may not"
    if event == "boom":
        assert "internal detail" not in str(info.value)


def test_refused_subscribe_is_an_error_event(make_client):
    """A refused subscribe reaches the channel's "@error" and the client's "error" handlers; subscribing again re-asks."""
    record = Recorder()
    client = make_client(record=record)
    channel = client.subscribe("closed")
    channel.on("@error", record("channel error"))
    [error] = record.wait("error")
    assert isinstance(error, ReplyError)
    assert (error.code, error.channel) == ("forbidden", "closed")
    assert record.wait("channel error") == [error] and not channel.subscribed
    assert client.subscribe("closed") is channel
    assert record.wait("error", 2)[1].code == "forbidden"


def test_application_events_named_like_the_clients_own_are_application_events(server, make_client):
    """Broadcasts called "error" and "subscribed" reach "message" and their own handlers, never
    "@error" or "@subscribed"; "message" never gets the client's own @subscribed."""
    record = Recorder()
    client = make_client(record=record)
    name = unique()
    channel = client.subscribe(name)
    channel.on("message", record("all"))
    channel.on("error", record("app error"))
    channel.on("subscribed", record("app subscribed"))
    channel.on("@error", record("own error"))
    first = subscribed(client, name, record)  # its "@subscribed" handler records "subscribed"
    assert publish(server, name, "error", {"code": "out_of_stock"}) == 1
    assert publish(server, name, "subscribed", "to the newsletter") == 2
    assert publish(server, name, "ev", "marker") == 3
    record.wait("ev")
    assert record.args("all") == [
        Message(channel=name, event="error", data={"code": "out_of_stock"}, seq=1),
        Message(channel=name, event="subscribed", data="to the newsletter", seq=2),
        Message(channel=name, event="ev", data="marker", seq=3),
    ]
    assert record.args("app error") == record.args("all")[:1]
    assert record.args("app subscribed") == record.args("all")[1:2]
    assert record.args("subscribed") == [first]
    assert record.args("own error") == record.args("error") == []


def test_send_timeout_when_no_answer_comes(proxy, make_client):
    """A send whose answer never comes fails with SendTimeout after its timeout."""
    record = Recorder()
    client = make_client(proxy.ws_url, record=record)
    chat = client.subscribe("chat")
    record.wait("connect")
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(SendTimeout) as info:
        chat.send("echo", 1, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2 and info.value.code == "timeout"
    assert issubclass(SendTimeout, TimeoutError)


# -- closing ------------------------------------------------------------


def test_close_gives_one_disconnect_and_no_reconnect(server, make_client):
    """close() reports one disconnect (1000), stops for good and frees the socket."""
    record = Recorder()
    client = make_client(record=record)
    name = unique()
    subscribed(client, name, record)
    chat = client.subscribe("chat")
    client.close()
    # close() returns after the handlers ran: nothing to wait for.
    assert record.args("disconnect") == [1000]
    assert not client._connection_thread.is_alive()  # so no reconnect can come
    wait_until(lambda: name not in server.stats()["members"], 5, message="the server to drop it")
    with pytest.raises(ClientClosed) as info:
        chat.send("echo", 1)
    assert info.value.code == "closed"
    with pytest.raises(ClientClosed):
        client.subscribe("other")
    client.close()
    assert record.args("disconnect") == [1000] and record.args("connect") == [()]


# -- losing the connection ----------------------------------------------


def test_reconnect_resubscribes_and_replays_missed_messages(server, proxy, make_client):
    """After a drop the client resubscribes with since/epoch and gets the missed messages in order, once."""
    record = Recorder()
    client = make_client(proxy.ws_url, record=record)
    name = unique()
    first = subscribed(client, name, record)
    publish(server, name, "ev", 1)
    record.wait("ev")
    proxy.refusing = True
    proxy.drop()
    assert record.wait("disconnect") == [1006]
    assert [publish(server, name, "ev", n) for n in (2, 3)] == [2, 3]
    proxy.refusing = False
    record.wait("subscribed", 2)
    assert record.args("subscribed")[1] == Subscribed(recovered=True, seq=3, epoch=first.epoch)
    publish(server, name, "ev", 4)
    record.wait("ev", 4)
    assert [(m.seq, m.data) for m in record.args("ev")] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert record.args("connect") == [(), ()]


def test_reconnect_after_server_restart_is_not_recovered(make_server, make_client):
    """After a server restart the resubscribe names the old epoch, so nothing of the new history is replayed."""
    old = make_server()
    proxy = Proxy(old.port)
    try:
        record = Recorder()
        client = make_client(proxy.ws_url, srv=old, record=record)
        name = unique()
        first = subscribed(client, name, record)
        publish(old, name, "ev", "before")
        record.wait("ev")
        proxy.refusing = True
        old.stop()
        assert record.wait("disconnect") == [1001]
        new = make_server(port=old.port)
        # The new server's seq passes the client's since=1: only the epoch
        # tells that its seq 2 and 3 are not what the client missed.
        assert [publish(new, name, "ev", n) for n in ("new 1", "new 2", "new 3")] == [1, 2, 3]
        proxy.refusing = False
        record.wait("subscribed", 2)
        again = record.args("subscribed")[1]
        assert again.recovered is False and again.seq == 3 and again.epoch != first.epoch
        publish(new, name, "ev", "after")
        record.wait("ev", 2)
        assert [(m.seq, m.data) for m in record.args("ev")] == [(1, "before"), (4, "after")]
        client.close()
    finally:
        proxy.close()


# -- starting from a saved position ----------------------------------------


def test_restarted_client_resumes_from_its_saved_position(server, make_client):
    """A client that saved seq and epoch, then restarted, subscribes from them and gets
    what it missed in order, once, then what follows; the same seq under another epoch replays nothing."""
    name = unique()
    record = Recorder()
    before = make_client()
    first = subscribed(before, name, record)
    publish(server, name, "ev", 1)
    publish(server, name, "ev", 2)
    record.wait("ev", 2)
    channel = before.subscribe(name)
    saved = {"since": channel.seq, "epoch": channel.epoch}
    assert saved == {"since": 2, "epoch": first.epoch}
    before.close()
    assert [publish(server, name, "ev", n) for n in (3, 4)] == [3, 4]

    again = Recorder()
    after = make_client()
    resumed = after.subscribe(name, **saved)
    resumed.on("ev", again("ev"))
    resumed.on("@subscribed", again("subscribed"))
    assert again.wait("subscribed") == [Subscribed(recovered=True, seq=4, epoch=first.epoch)]
    publish(server, name, "ev", 5)
    again.wait("ev", 3)
    assert [(m.seq, m.data) for m in again.args("ev")] == [(3, 3), (4, 4), (5, 5)]
    assert resumed.seq == 5

    other = Recorder()
    stale = make_client().subscribe(name, since=2, epoch="another epoch")
    stale.on("ev", other("ev"))
    stale.on("@subscribed", other("subscribed"))
    assert other.wait("subscribed") == [Subscribed(recovered=False, seq=5, epoch=first.epoch)]
    publish(server, name, "ev", 6)
    assert [m.seq for m in other.wait("ev")] == [6]


class ScriptedServer:
    """A protocol server on loopback whose every frame the test writes.

    ``script(ws, number)`` runs for each connection (``number`` from 1),
    with a ``websockets`` server connection already past ``@connected``;
    every frame clients sent is put on :attr:`received` as ``(number, frame)``.
    ``files`` maps paths to ``(content type, text)`` answered to plain HTTP
    GETs (a page and the browser client, on the socket's own origin).
    """

    def __init__(self, script, files: dict[str, tuple[str, str]] | None = None) -> None:
        from websockets.sync.server import serve

        self.received: queue.Queue = queue.Queue()
        self._script = script
        self._files = files or {}
        self._count = itertools.count(1)
        self._server = serve(self._serve, "127.0.0.1", 0, process_request=self._http)
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self.ws_url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}/ops"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _http(self, connection, request):
        """A GET that is no WebSocket handshake gets one of ``files``, or 404."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        content_type, text = self._files.get(request.path, ("text/plain", "not found"))
        response = connection.respond(200 if request.path in self._files else 404, text)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = content_type
        return response

    def _serve(self, ws) -> None:
        number = next(self._count)
        ws.send(json.dumps({"event": "@connected", "data": {"id": f"c{number}", "protocol": 1}}))
        self._script(ws, number)

    def next_frame(self, timeout: float = 10.0) -> tuple[int, dict]:
        return self.received.get(timeout=timeout)

    def read(self, ws, number: int) -> dict:
        """The next frame the client sent on ``ws``, recorded."""
        frame = json.loads(ws.recv(timeout=10))
        self.received.put((number, frame))
        return frame

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


def test_history_lost_under_a_subscription_moves_seq_and_epoch_on(make_client):
    """An @subscribed without ref (recovered false, PROTOCOL.md section 6) reaches "@subscribed",
    and the channel follows the new epoch: the next broadcast counts, and a resubscribe names it."""

    def script(ws, number):
        subscribe = fake.read(ws, number)
        ref = subscribe["ref"]
        if number == 1:
            ws.send(json.dumps({"channel": "chat", "event": "@subscribed", "ref": ref,
                                "data": {"recovered": False, "seq": 0, "epoch": "e1"}}))
            ws.send(json.dumps({"channel": "chat", "event": "ev", "data": "old 1", "seq": 1}))
            ws.send(json.dumps({"channel": "chat", "event": "@subscribed",
                                "data": {"recovered": False, "seq": 0, "epoch": "e2"}}))
            ws.send(json.dumps({"channel": "chat", "event": "ev", "data": "new 1", "seq": 1}))
            ws.close(1011)
        else:
            ws.send(json.dumps({"channel": "chat", "event": "@subscribed", "ref": ref,
                                "data": {"recovered": True, "seq": 1, "epoch": "e2"}}))
            with contextlib.suppress(ConnectionClosed):
                ws.recv(timeout=10)  # until the client closes

    fake = ScriptedServer(script)
    try:
        record = Recorder()
        client = make_client(fake.ws_url, ticket_url=None, record=record)
        chat = client.subscribe("chat")
        chat.on("@subscribed", record("subscribed"))
        chat.on("message", record("all"))
        assert fake.next_frame() == (1, {"channel": "chat", "event": "@subscribe", "ref": 1})
        number, again = fake.next_frame()
        assert (number, again["data"]) == (2, {"since": 1, "epoch": "e2"})
        record.wait("subscribed", 3)
        assert record.args("subscribed") == [
            Subscribed(recovered=False, seq=0, epoch="e1"),
            Subscribed(recovered=False, seq=0, epoch="e2"),
            Subscribed(recovered=True, seq=1, epoch="e2"),
        ]
        assert [(m.event, m.data, m.seq) for m in record.args("all")] == [("ev", "old 1", 1), ("ev", "new 1", 1)]
        assert record.args("disconnect") == [1011] and (chat.seq, chat.epoch) == (1, "e2")
        client.close()
    finally:
        fake.close()


def test_ping_detects_a_dead_connection(proxy, make_client):
    """@ping keeps a quiet connection up; without @pong it counts as lost."""
    record = Recorder()
    client = make_client(proxy.ws_url, record=record, ping_interval=0.2, pong_timeout=1.0)
    record.wait("connect")
    time.sleep(1.0)  # five quiet intervals: each @ping is answered, nothing drops
    assert record.args("disconnect") == []
    proxy.freeze()
    started = time.monotonic()
    assert record.wait("disconnect") == [1006]
    assert time.monotonic() - started < 3
    record.wait("connect", 2)
    assert client.connected


def test_ping_interval_zero_disables_ping(proxy, make_client):
    """ping_interval=0 disables @ping, as pingInterval: 0 does in the browser client, instead of pinging nonstop."""
    record = Recorder()
    client = make_client(proxy.ws_url, record=record, ping_interval=0)
    record.wait("connect")
    before = proxy.from_clients
    time.sleep(0.5)  # what is checked is that nothing is sent meanwhile
    assert proxy.from_clients == before
    assert record.args("disconnect") == [] and client.connected


def test_sends_while_disconnected_go_out_after_reconnect(proxy, make_client):
    """Sends made while disconnected go out after the reconnect; one in flight at the drop fails with ConnectionLost."""
    record = Recorder()
    client = make_client(proxy.ws_url, record=record)
    chat = client.subscribe("chat")
    record.wait("connect")
    proxy.freeze()
    results = {}

    def send(n):
        results[n] = outcome(chat.send, "echo", n, timeout=10)

    written = proxy.from_clients
    in_flight = threading.Thread(target=send, args=(0,))
    in_flight.start()
    wait_until(lambda: proxy.from_clients > written, 5, message="the send to be written")
    proxy.refusing = True
    proxy.drop()
    in_flight.join(5)
    assert isinstance(results[0], ConnectionLost) and results[0].code == "disconnected"
    record.wait("disconnect")
    threads = [threading.Thread(target=send, args=(n,)) for n in (1, 2, 3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: client._state.queued == 3, 5, message="three queued sends")
    assert not client.connected
    proxy.refusing = False
    for thread in threads:
        thread.join(10)
    assert {n: results[n] for n in (1, 2, 3)} == {n: {"echo": n} for n in (1, 2, 3)}


def test_queue_bound_and_timeouts_fail_at_once(proxy, make_client):
    """Past the queue bound a send fails at once; a queued send times out and frees its place; close() fails the rest."""
    proxy.refusing = True
    record = Recorder()
    client = make_client(proxy.ws_url, max_queue=2, record=record)
    chat = client.subscribe("chat")
    with pytest.raises(SendTimeout):
        chat.send("echo", "late", timeout=0.1)
    results = []

    def send(n):
        results.append(outcome(chat.send, "echo", n))

    threads = [threading.Thread(target=send, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: client._state.queued == 2, 5, message="two queued sends")
    started = time.monotonic()
    with pytest.raises(QueueFull) as info:
        chat.send("echo", 3, timeout=10)
    assert info.value.code == "queue_full"
    assert time.monotonic() - started < 0.5
    client.close()
    for thread in threads:
        thread.join(5)
    assert [type(result) for result in results] == [ClientClosed, ClientClosed]
    assert record.args("connect") == record.args("disconnect") == []  # it never was connected


# -- tickets ------------------------------------------------------------


def test_fresh_ticket_for_every_connect(server, proxy, make_client):
    """Each connect uses a new ticket; a used one would be refused."""
    tickets = []
    http = requests.Session()
    http.hooks["response"].append(lambda response, **_: tickets.append(response.json()["ticket"]))
    record = Recorder()
    make_client(proxy.ws_url, session=http, record=record)
    record.wait("connect")
    for count in (2, 3):
        proxy.drop()
        record.wait("connect", count)
    assert len(tickets) == 3 == len(set(tickets))
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"{server.ws_url}?ticket={tickets[0]}", open_timeout=5)
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body) == {"error": "ticket_used"}
    http.close()


class FlakyTicketServer:
    """Answers the first ``failures`` ticket requests 401, then passes them on."""

    def __init__(self, ticket_url: str, failures: int) -> None:
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests += 1
                if outer.requests <= failures:
                    status, body = 401, b'{"error": "unauthorized"}'
                else:
                    response = requests.post(ticket_url, timeout=5)
                    status, body = response.status_code, response.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ticket"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_ticket_refusal_is_an_error_event_and_retried(server, make_client):
    """A 401 from the ticket endpoint is an "error" event, retried with backoff."""
    flaky = FlakyTicketServer(server.url + "/ops/ticket", failures=2)
    try:
        record = Recorder()
        make_client(ticket_url=flaky.url, record=record)
        record.wait("connect")
        errors = record.args("error")
        assert [(type(e), e.status, e.code) for e in errors] == [(ConnectError, 401, "unauthorized")] * 2
        assert flaky.requests == 3
    finally:
        flaky.close()


def test_refused_handshake_is_an_error_event_and_retried(make_client):
    """A handshake the server refuses reports its status and error name, and is retried."""
    record = Recorder()
    client = make_client(ticket_url=None, record=record)
    errors = record.wait("error", 2)
    assert {(type(e), e.status, e.code) for e in errors} == {(ConnectError, 401, "ticket_missing")}
    assert not client.connected


def test_reconnects_under_the_ticket_rate_limit_wait_for_retry_after(make_server, make_client):
    """Reconnecting faster than the ticket rate limit allows gets 429 rate_limited, an
    "error" event; the next try waits the Retry-After (not the 50 ms backoff) and gets in."""
    srv = make_server({"ROBE_SOCKETS_TICKET_RATE_LIMIT": [1, 2]})
    proxy = Proxy(srv.port)
    try:
        events = []
        client = make_client(proxy.ws_url, srv=srv, max_reconnect_delay=5)
        for name in ("connect", "error"):
            client.on(name, lambda *args, name=name: events.append((name, time.monotonic(), *args)))
        connects = lambda: [e for e in events if e[0] == "connect"]  # noqa: E731
        wait_until(lambda: len(connects()) == 1, 10, message="the first connect")
        # Whoever else asks as this caller (anonymous, 127.0.0.1) uses up its budget.
        wait_until(
            lambda: requests.post(srv.url + "/ops/ticket", timeout=5).status_code == 429, 10,
            message="the ticket budget to be used up",
        )
        proxy.drop()
        wait_until(lambda: len(connects()) == 2, 10, message="the connect after the rate limit")
        errors = [e for e in events if e[0] == "error"]
        assert errors, "the reconnect got a ticket at once: no rate limit"
        assert all(
            (type(e[2]), e[2].status, e[2].code, e[2].retry_after) == (ConnectError, 429, "rate_limited", 1.0)
            for e in errors
        ), errors
        # Each refusal was followed by a wait of at least a second, not a tight loop.
        assert len(errors) <= 2
        assert connects()[1][1] - errors[0][1] >= 0.95
        assert client.connected
    finally:
        proxy.close()


def test_handshake_at_the_identity_cap_is_retried_until_a_slot_frees(make_server, make_client):
    """429 identity_limit at the handshake is not final: the client keeps trying, with
    backoff, and connects once the user's other socket closed."""
    srv = make_server({"ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": 1})
    http = requests.Session()
    assert http.post(f"{srv.url}/login", data={"user": "alice"}, timeout=5).ok
    record = Recorder()
    with ws_connect(f"{srv.ws_url}?ticket={srv.ticket(http)}", open_timeout=5) as other:
        assert json.loads(other.recv(timeout=5))["event"] == "@connected"
        client = make_client(srv=srv, session=http, record=record)
        errors = record.wait("error", 3)
        assert {(type(e), e.status, e.code) for e in errors} == {(ConnectError, 429, "identity_limit")}
        assert not client.connected
    record.wait("connect")
    answer = client.subscribe("room:1").send("whoami", timeout=5)
    assert answer["identity"] == "alice"


def test_silent_server_times_out_and_is_retried(make_client):
    """A server that never answers the handshake costs connect_timeout per attempt, then an error and a retry."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: the kernel does
        port = silent.getsockname()[1]
        record = Recorder()
        started = time.monotonic()
        url = f"ws://127.0.0.1:{port}/ops"
        client = make_client(url, ticket_url=None, connect_timeout=0.2, record=record)
        errors = record.wait("error", 2)
        assert time.monotonic() - started < 3
        assert all(type(e) is ConnectError and e.code == "connect_failed" for e in errors)
        assert "timed out" in str(errors[0]) and not client.connected
        client.close()


def test_session_cookies_carry_over_to_tickets(server, make_client):
    """With the caller's logged-in session, tickets carry the user's identity."""
    http = requests.Session()
    http.post(server.url + "/login", data={"user": "alice"}, timeout=5).raise_for_status()
    record = Recorder()
    client = make_client(session=http, record=record)
    client.subscribe("user:alice").on("@subscribed", record("subscribed"))
    client.subscribe("user:bob")
    record.wait("subscribed")
    [error] = record.wait("error")
    assert (error.code, error.channel) == ("forbidden", "user:bob")
    answer = client.subscribe("room:1").send("whoami")
    assert answer == {"identity": "alice", "channel": "room:1", "id": client.id}
    http.close()


class Tls:
    """A self-signed certificate for 127.0.0.1 and the contexts that use it."""

    def __init__(self, cert, key) -> None:
        self.cert, self.key = cert, key
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.load_cert_chain(cert, key)
        self.client_context = ssl.create_default_context(cafile=str(cert))

    def session(self) -> requests.Session:
        http = requests.Session()
        http.verify = str(self.cert)
        # Else REQUESTS_CA_BUNDLE, when set, overrides verify (requests #3829).
        http.trust_env = False
        return http


class TlsGunicorn(Gunicorn):
    """The test app behind gunicorn's own TLS (``--certfile``)."""

    def __init__(self, tls: Tls) -> None:
        self.tls = tls
        super().__init__(extra=["--certfile", str(tls.cert), "--keyfile", str(tls.key)])

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.url = self.url.replace("http://", "https://")
        self.ws_url = self.ws_url.replace("ws://", "wss://")
        with self.tls.session() as http:

            def ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited:\n{self.output()}")
                try:
                    return http.get(self.url + "/stats", timeout=1).ok
                except requests.RequestException:
                    return False

            wait_until(ready, timeout, 0.05, "gunicorn (TLS) to serve")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return Tls(cert, key)


def test_wss_to_gunicorn_tls(tls, make_client):
    """Over wss straight to gunicorn's TLS, tickets, replies and broadcasts all work."""
    srv = TlsGunicorn(tls)
    http = tls.session()
    try:
        record = Recorder()
        client = make_client(srv=srv, session=http, ssl_context=tls.client_context, record=record)
        chat = client.subscribe("chat")
        chat.on("said", record("said"))
        assert chat.send("echo", "x" * 5000) == {"echo": "x" * 5000}
        assert chat.send("say", "over tls") is None
        assert record.wait("said")[0].data == "over tls"
        client.close()
        assert record.args("disconnect") == [1000]
    finally:
        http.close()
        srv.stop()


def test_wss_with_concurrent_sends_and_broadcasts(server, make_client, tls):
    """Over wss, sends from several threads and the broadcasts they cause all arrive intact."""
    proxy = Proxy(server.port, tls=tls.server_context)
    client = make_client(proxy.ws_url, ssl_context=tls.client_context)
    try:
        record = Recorder()
        chat = client.subscribe("chat")
        chat.on("said", record("said"))
        pad = "x" * 3000  # several TLS records per frame now and then
        results = []

        def send_many(thread):
            results.extend(outcome(chat.send, "say", [thread, n, pad]) for n in range(25))

        threads = [threading.Thread(target=send_many, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == [None] * 100
        said = record.wait("said", 100)
        assert sorted(m.data[:2] for m in said) == [[k, n] for k in range(4) for n in range(25)]
        assert all(m.data[2] == pad for m in said)
    finally:
        client.close()
        proxy.close()


# -- handlers -----------------------------------------------------------


def test_failing_handler_is_logged_and_reading_goes_on(server, make_client, caplog):
    """A handler's exception is logged and later messages still arrive."""
    caplog.set_level(logging.ERROR, logger="flask_robe_sockets.client")
    record = Recorder()
    client = make_client()
    name = unique()
    channel = client.subscribe(name)

    def explode(message):
        raise RuntimeError("handler bug")

    channel.on("ev", explode)
    channel.on("ev", record("ev"))
    channel.on("@subscribed", record("subscribed"))
    record.wait("subscribed")
    publish(server, name, "ev", 1)
    publish(server, name, "ev", 2)
    assert [m.data for m in record.wait("ev", 2)] == [1, 2]
    failures = [r for r in caplog.records if r.name == "flask_robe_sockets.client" and r.exc_info]
    assert len(failures) == 2 and "handler bug" in str(failures[0].exc_info[1])


def test_handlers_may_take_fewer_arguments_than_the_client_passes(server, proxy, make_client, monkeypatch):
    """Handlers written with fewer arguments (lambda: ...) are called with the first ones, as JS
    functions are; each handler's signature is read once, when it is registered, not per call."""
    read = inspect.signature
    calls = []
    monkeypatch.setattr(inspect, "signature", lambda handler: calls.append(handler) or read(handler))
    record = Recorder()

    class Seen:
        def message(self, message):
            record("method")(message.seq)

    class Unreadable:
        """A handler whose signature cannot be read (as some builtins'): it gets every argument."""

        __signature__ = "not a signature"

        def __call__(self, *args):
            record("unreadable")(*args)

    client = make_client(proxy.ws_url)
    client.on("connect", lambda: record("connect")())
    client.on("disconnect", lambda: record("disconnect")())
    client.on("disconnect", lambda code, extra="default": record("disconnect with default")(code, extra))
    name = unique()
    channel = client.subscribe(name)
    channel.on("@subscribed", lambda: record("subscribed")())
    channel.on("ev", lambda: record("ev")())
    channel.on("ev", Seen().message)
    channel.on("ev", Unreadable())
    record.wait("subscribed")
    for n in (1, 2, 3):
        publish(server, name, "ev", n)
    record.wait("method", 3)
    proxy.drop()
    record.wait("disconnect")
    record.wait("connect", 2)
    assert record.args("ev") == [()] * 3 and record.args("method") == [1, 2, 3]
    assert [m.seq for m in record.args("unreadable")] == [1, 2, 3]
    assert record.args("disconnect with default") == [(1006, "default")]
    assert len(calls) == 7  # once per registration, however many events came since


def test_a_type_error_inside_a_handler_is_its_own_failure(server, make_client, caplog):
    """A handler that raises TypeError itself is logged once, not called again with fewer arguments."""
    caplog.set_level(logging.ERROR, logger="flask_robe_sockets.client")
    record = Recorder()
    client = make_client()
    name = unique()
    channel = client.subscribe(name)

    def broken(message):
        record("broken")(message.seq)
        raise TypeError("broken() bug")

    channel.on("ev", broken)
    channel.on("ev", record("ev"))
    channel.on("@subscribed", record("subscribed"))
    record.wait("subscribed")
    publish(server, name, "ev", 1)
    record.wait("ev")
    assert record.args("broken") == [1]
    failures = [r for r in caplog.records if r.name == "flask_robe_sockets.client" and r.exc_info]
    assert [str(r.exc_info[1]) for r in failures] == ["broken() bug"]


def test_handler_may_send_and_wait(server, make_client):
    """A handler can call send() and wait for the reply: frames keep being read."""
    record = Recorder()
    client = make_client()
    name = unique()
    channel = client.subscribe(name)
    chat = client.subscribe("chat")
    channel.on("ev", lambda message: record("reply")(chat.send("echo", message.data, timeout=5)))
    channel.on("@subscribed", record("subscribed"))
    record.wait("subscribed")
    publish(server, name, "ev", "ping")
    assert record.wait("reply") == [{"echo": "ping"}]


def test_unsubscribe_stops_delivery(server, make_client):
    """After unsubscribe the channel's handlers get nothing more."""
    record = Recorder()
    client = make_client(record=record)
    name, barrier = unique(), unique("barrier")
    subscribed(client, name, record)
    old = client.subscribe(name)
    client.unsubscribe(name)
    # The server handles frames in order: once the barrier is subscribed,
    # the unsubscribe is done, and broadcasts reach us in publish order.
    client.subscribe(barrier).on("ev", record("barrier"))
    client.subscribe(barrier).on("@subscribed", record("barrier subscribed"))
    record.wait("barrier subscribed")
    publish(server, name, "ev", "unwanted")
    publish(server, barrier, "ev", "marker")
    record.wait("barrier")
    assert record.args("ev") == [] and record.args("message") == []
    assert client.subscribe(name) is not old


def test_unsubscribe_drops_messages_already_read(server, make_client):
    """A message read before unsubscribe() but not yet handled never reaches the left channel's handlers."""
    record = Recorder()
    client = make_client()
    name, busy = unique(), unique("busy")
    subscribed(client, name, record)
    release = threading.Event()
    holding = client.subscribe(busy)
    holding.on("ev", lambda message: release.wait(10))  # holds the handler thread
    holding.on("ev", record("busy"))
    holding.on("@subscribed", record("busy subscribed"))
    record.wait("busy subscribed")
    publish(server, busy, "ev", "hold")
    seq = publish(server, name, "ev", "late")
    wait_until(lambda: client.subscribe(name).seq == seq, 10, message="the reader to read it")
    client.unsubscribe(name)
    release.set()
    publish(server, busy, "ev", "after")
    record.wait("busy", 2)  # handlers run in order: "late" has had its turn
    assert record.args("ev") == []


# -- gevent -------------------------------------------------------------

GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()

import json, sys, threading
import gevent
from flask_robe_sockets.client import Client

get_native_ident = monkey.get_original("threading", "get_ident")
main_thread = get_native_ident()
handler_threads = set()
said = threading.Event()

def on_said(message):
    handler_threads.add(get_native_ident())
    said.set()

ticks = [0]

def tick():
    while True:
        ticks[0] += 1
        gevent.sleep(0.001)

ticker = gevent.spawn(tick)
with Client(sys.argv[1], ticket_url=sys.argv[2]) as client:
    chat = client.subscribe("chat")
    chat.on("said", on_said)
    sends = [gevent.spawn(chat.send, "echo", n, timeout=10) for n in range(20)]
    gevent.joinall(sends, timeout=10, raise_error=True)
    chat.send("say", "hi", timeout=10)
    said.wait(10)
ticker.kill()
print(json.dumps({
    "replies": [g.value for g in sends],
    "said": said.is_set(),
    "one_os_thread": handler_threads == {main_thread},
    "ticked": ticks[0] > 0,
}))
"""


def test_client_under_gevent(server):
    """Monkey-patched by gevent, the client runs as greenlets and serves concurrent sends."""
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, server.ws_url, server.url + "/ops/ticket"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "replies": [{"echo": n} for n in range(20)],
        "said": True,
        "one_os_thread": True,
        "ticked": True,
    }


def test_backoff_keeps_growing_when_connections_drop_at_once(proxy, make_client, monkeypatch):
    """Connections dropped right after @connected do not reset the backoff: a flapping server is not hammered."""
    monkeypatch.setattr(random, "random", lambda: 1.0)  # no jitter: each delay is its ceiling
    record = Recorder()
    events = []
    client = make_client(proxy.ws_url, reconnect_delay=0.1, max_reconnect_delay=1)
    for name in ("connect", "disconnect"):
        client.on(name, lambda *args, name=name: events.append((name, time.monotonic())))
        client.on(name, record(name))
    for drops in range(1, 4):
        record.wait("connect", drops)
        proxy.drop()
        record.wait("disconnect", drops)
    record.wait("connect", 4)
    times = [t for _, t in events]
    waited = [times[i + 1] - times[i] for i in range(1, len(times), 2)]
    # 0.1, 0.2, 0.4 s (give or take the threads), not 0.1 s each time.
    assert waited[1] >= 0.19 and waited[2] >= 0.39, waited
