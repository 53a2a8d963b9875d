"""The transport (websocket.py) on a socket pair, without gunicorn or gevent:
one end is the WSGI server's client socket, the test writes to and reads
from the other. Not monkey-patched, the reader is a thread, so every wait
here is a bounded wait for what the reader does.

The last tests check that simple-websocket still does what the subclass
relies on (the list at the top of websocket.py), naming what changed.
"""
from __future__ import annotations

import base64
import configparser
import hashlib
import inspect
import queue
import socket
import struct
import threading
from importlib import metadata

import pytest
import simple_websocket
from packaging.requirements import Requirement
from simple_websocket import ws as simple_ws

from flask_robe_sockets import websocket
from flask_robe_sockets.websocket import DRAIN_BYTES, ServerSocket

from .rawws import BINARY, CLOSE, CONTINUATION, PING, TEXT, build_frame
from .servers import ROOT

KEY = base64.b64encode(b"sixteen byte key").decode()
WAIT = 5.0


class Recorder:
    """The listener: writes down every call the transport makes, in order."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.activity = 0
        self.allow = True
        self.done = threading.Event()
        self.reader = None

    def on_activity(self) -> None:
        self.activity += 1

    def on_frame(self, size: int) -> bool:
        self.events.put(("frame", size))
        return self.allow

    def on_refused(self, text) -> None:
        self.events.put(("refused", text))

    def on_text(self, text: str) -> None:
        if text == "raise":
            raise RuntimeError("a bug in the layer above")
        self.events.put(("text", text))

    def on_binary(self) -> None:
        self.events.put(("binary",))

    def on_ping(self, payload: bytes) -> None:
        self.events.put(("ping", payload))

    def on_close(self, code: int) -> None:
        self.events.put(("close", code))

    def fail(self, code: int, reason: str) -> None:
        self.events.put(("fail", code, reason))

    def on_reader_done(self) -> None:
        self.reader = threading.current_thread()
        self.events.put(("done",))
        self.done.set()

    def next(self, skip=("frame",)) -> tuple:
        """The next call, other than those of ``skip``; fails after WAIT seconds."""
        while True:
            try:
                event = self.events.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"the transport called nothing within {WAIT}s") from None
            if event[0] not in skip:
                return event


class CountingSocket:
    """The server's end, counting what the reader takes and whether it waits for more."""

    def __init__(self, sock: socket.socket) -> None:
        self._wrapped = sock
        self.received = 0
        self.waiting = 0
        self.changed = threading.Condition()

    def recv(self, size: int) -> bytes:
        with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        data = self._wrapped.recv(size)
        with self.changed:
            self.waiting -= 1
            self.received += len(data)
            self.changed.notify_all()
        return data

    def wait_idle_after(self, total: int) -> None:
        """Until the reader took ``total`` bytes and waits in its next recv."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.received == total and self.waiting, WAIT), (
                f"the reader took {self.received} of {total} bytes"
            )

    def sendall(self, data: bytes) -> None:
        self._wrapped.sendall(data)

    def send(self, data: bytes, flags: int = 0) -> int:
        return self._wrapped.send(data, flags)

    def shutdown(self, how: int) -> None:
        self._wrapped.shutdown(how)

    def close(self) -> None:
        self._wrapped.close()


def environ(sock, **headers: str) -> dict:
    return {
        "gunicorn.socket": sock,
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/ops",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": KEY,
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        **{f"HTTP_{name.upper()}": value for name, value in headers.items()},
    }


class Pair:
    """A ServerSocket on one end of a socket pair; ``peer`` is the client's end."""

    def __init__(self, counting: bool = False, **headers: str) -> None:
        server_end, self.peer = socket.socketpair()
        self.peer.settimeout(WAIT)
        self.server_end = CountingSocket(server_end) if counting else server_end
        self.listener = Recorder()
        try:
            self.transport = ServerSocket(environ(self.server_end, **headers), self.listener, 1024, 4)
        except BaseException:
            server_end.close()
            self.peer.close()
            raise
        self.response = self._read_response()

    def _read_response(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.peer.recv(4096)
            assert chunk, f"the server closed during the handshake, after {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert rest == b"", "the server wrote more than the 101 before any frame"
        return head

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.peer.recv(size - len(data))
            assert chunk, f"end of stream after {len(data)} of {size} bytes"
            data += chunk
        return data

    def close(self) -> None:
        self.peer.close()
        self.listener.done.wait(WAIT)
        self.transport.close_socket()


@pytest.fixture
def pair():
    made = Pair()
    yield made
    made.close()


def headers_of(response: bytes) -> tuple[str, dict[str, str]]:
    status, *lines = response.decode().split("\r\n")
    return status, {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


# -- the handshake --------------------------------------------------------


def test_upgrade_answers_101_with_the_accept_key(pair):
    """The handshake writes a 101 whose Sec-WebSocket-Accept is RFC 6455's hash of the key."""
    status, headers = headers_of(pair.response)
    assert status == "HTTP/1.1 101 Switching Protocols"
    accept = base64.b64encode(hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert headers["sec-websocket-accept"] == accept.decode()
    assert headers["upgrade"].lower() == "websocket" and headers["connection"].lower() == "upgrade"
    assert pair.transport.connected and not pair.transport.draining


def test_permessage_deflate_is_not_negotiated():
    """A client offering permessage-deflate gets a 101 without any extension."""
    made = Pair(sec_websocket_extensions="permessage-deflate; client_max_window_bits")
    try:
        status, headers = headers_of(made.response)
        assert status.startswith("HTTP/1.1 101") and "sec-websocket-extensions" not in headers
    finally:
        made.close()


def test_the_reader_runs_in_a_thread_named_as_simple_websocket_names_it(pair):
    """Without gevent the reader is a thread, renamed by simple-websocket, that stops when the peer goes."""
    reader = pair.transport.thread
    assert isinstance(reader, threading.Thread) and reader.is_alive()
    assert "simple_websocket.Base._thread" in reader.name
    pair.peer.close()
    assert pair.listener.next() == ("done",)
    assert pair.listener.reader is reader and not pair.transport.connected


# -- what the client sends ------------------------------------------------


def test_frames_reach_the_listener_in_order(pair):
    """Text, fragmented text, binary and pings reach the listener as read, each charged with its size first."""
    listener = pair.listener
    hello = build_frame(TEXT, "héllo".encode())
    pair.peer.sendall(hello)
    assert listener.next(skip=()) == ("frame", len(hello))
    assert listener.next() == ("text", "héllo")
    pair.peer.sendall(
        build_frame(TEXT, b"ab", fin=False) + build_frame(CONTINUATION, b"c")
        + build_frame(BINARY, b"\x00\x01") + build_frame(PING, b"are you there")
    )
    assert [listener.next() for _ in range(3)] == [
        ("text", "abc"), ("binary",), ("ping", b"are you there"),
    ]
    assert listener.activity >= 2


def test_a_frame_split_over_many_reads_is_read_once_whole(pair):
    """A frame arriving byte by byte is handed over once, when its last byte is in."""
    frame = build_frame(TEXT, b"in pieces")
    for byte in frame:
        pair.peer.sendall(bytes([byte]))
    assert pair.listener.next(skip=()) == ("frame", len(frame))
    assert pair.listener.next() == ("text", "in pieces")


def test_a_refused_frame_is_not_read(pair):
    """A frame the listener refuses is reported refused (with its text when small) and not handed over."""
    pair.listener.allow = False
    pair.peer.sendall(build_frame(TEXT, b'{"ref": 1}'))
    assert pair.listener.next() == ("refused", '{"ref": 1}')
    pair.listener.allow = True
    pair.peer.sendall(build_frame(TEXT, b"next"))
    assert pair.listener.next() == ("text", "next")


def test_the_clients_close_frame_ends_the_reader(pair):
    """A close frame reaches on_close with its code, then the reader stops."""
    pair.peer.sendall(build_frame(CLOSE, struct.pack("!H", 1001) + b"bye"))
    assert pair.listener.next() == ("close", 1001)
    assert pair.listener.next() == ("done",)
    assert not pair.transport.connected


def test_end_of_stream_ends_the_reader(pair):
    """The peer shutting its side down ends the reader, which tells the listener once."""
    pair.peer.shutdown(socket.SHUT_WR)
    assert pair.listener.next() == ("done",)
    assert pair.listener.events.empty()


def test_a_protocol_violation_fails_the_connection_with_1002(pair):
    """An unmasked client frame calls fail(1002, ...) and the transport drains from then on."""
    pair.peer.sendall(build_frame(TEXT, b"unmasked", mask=False))
    assert pair.listener.next() == ("fail", 1002, "client frames must be masked")
    assert pair.transport.draining
    pair.peer.sendall(build_frame(TEXT, b"dropped unread"))
    pair.peer.shutdown(socket.SHUT_WR)
    assert pair.listener.next() == ("done",)


def test_a_message_over_the_size_limit_fails_with_1009(pair):
    """A frame over max_message_size fails with 1009 from its header."""
    pair.peer.sendall(build_frame(TEXT, b"x" * 1025)[:8])
    assert pair.listener.next(skip=()) == ("fail", 1009, "message too big")


def test_a_bug_in_the_listener_fails_with_1011(pair):
    """An exception escaping the listener is logged and fails the connection with 1011, not silence."""
    pair.peer.sendall(build_frame(TEXT, b"raise"))
    assert pair.listener.next() == ("fail", 1011, "internal error")
    assert pair.listener.next() == ("done",)


def test_a_draining_reader_stops_after_drain_bytes():
    """Once draining, the reader drops up to DRAIN_BYTES more and stops at the next byte past them."""
    made = Pair(counting=True)
    try:
        sock, listener = made.server_end, made.listener
        violation = build_frame(TEXT, b"x", mask=False)
        made.peer.sendall(violation)
        assert listener.next() == ("fail", 1002, "client frames must be masked")
        made.peer.sendall(b"\x81" * DRAIN_BYTES)
        sock.wait_idle_after(len(violation) + DRAIN_BYTES)
        assert not listener.done.is_set() and made.transport.connected
        made.peer.sendall(b"\x81")
        assert listener.next() == ("done",)
        assert listener.events.empty()  # nothing it dropped was read as a frame
    finally:
        made.close()


# -- what the server writes -----------------------------------------------


def test_send_now_writes_what_the_socket_takes_without_waiting(pair):
    """send_now returns the bytes written; on a full socket it writes part or nothing, at once."""
    assert pair.transport.send_now(b"abc") == 3
    assert pair.read(3) == b"abc"
    big = b"y" * (16 << 20)
    written = pair.transport.send_now(big)
    assert 0 < written < len(big)
    assert pair.transport.send_now(big) == 0  # full: nothing, and no wait
    assert pair.read(written) == big[:written]


def test_send_all_writes_everything_waiting_for_room(pair):
    """send_all writes all of a payload larger than the socket's buffers."""
    big = bytes(range(256)) * (4 << 12)  # 4 MiB
    got = []
    reader = threading.Thread(target=lambda: got.append(pair.read(len(big))))
    reader.start()
    pair.transport.send_all(big)
    reader.join(WAIT)
    assert got == [big]


def test_finish_writing_half_closes_and_keeps_reading(pair):
    """finish_writing sends a FIN after what was written, and the reader still takes the client's frames."""
    pair.transport.send_all(b"last words")
    pair.transport.finish_writing()
    assert pair.read(10) == b"last words"
    assert pair.peer.recv(1) == b""
    pair.peer.sendall(build_frame(TEXT, b"still heard"))
    assert pair.listener.next() == ("text", "still heard")
    pair.transport.finish_writing()  # again: harmless


def test_close_socket_closes_and_can_be_repeated(pair):
    """close_socket closes the socket and marks the transport disconnected, twice without error."""
    pair.transport.close_socket()
    assert not pair.transport.connected and pair.server_end.fileno() == -1
    pair.transport.close_socket()
    assert pair.transport.send_now(b"x") == 0


# -- what the subclass relies on in simple-websocket ----------------------


def folded(function) -> str:
    """The source of ``function`` with white space folded, as one line."""
    return " ".join(inspect.getsource(function).split())


# (what the subclass relies on, where, the code that does it)
RELIED_ON = [
    ("Server.__init__ takes the socket from environ['werkzeug.socket']", simple_ws.Server.__init__,
     "environ.get('werkzeug.socket')"),
    ("Server.__init__ takes the socket from environ['gunicorn.socket']", simple_ws.Server.__init__,
     "environ.get('gunicorn.socket')"),
    ("Server.__init__ passes thread_class on to Base", simple_ws.Server.__init__, "thread_class=thread_class"),
    ("Base.__init__ keeps the socket in self.sock", simple_ws.Base.__init__, "self.sock = sock"),
    ("Base.__init__ keeps receive_bytes", simple_ws.Base.__init__, "self.receive_bytes = receive_bytes"),
    ("Base.__init__ makes self.ws a wsproto connection", simple_ws.Base.__init__,
     "self.ws = WSConnection(connection_type)"),
    ("Base.__init__ calls self.handshake()", simple_ws.Base.__init__, "self.handshake()"),
    ("Base.__init__ refuses to go on unless handshake() set self.connected", simple_ws.Base.__init__,
     "if not self.connected:"),
    ("Base.__init__ builds the reader as thread_class(target=self._thread)", simple_ws.Base.__init__,
     "self.thread = thread_class(target=self._thread)"),
    ("Base.__init__ renames the reader through .name (websocket._Reader has one)", simple_ws.Base.__init__,
     "self.thread.name = self.thread.name.replace("),
    ("Base.__init__ starts the reader with .start()", simple_ws.Base.__init__, "self.thread.start()"),
    ("Server.handshake feeds the request's headers to self.ws", simple_ws.Server.handshake,
     "self.ws.receive_data(in_data)"),
    ("Server.handshake sets self.connected from self._handle_events()", simple_ws.Server.handshake,
     "self.connected = self._handle_events()"),
]


@pytest.mark.parametrize("what, where, code", RELIED_ON, ids=[what for what, _, _ in RELIED_ON])
def test_simple_websocket_still_does_what_the_subclass_relies_on(what, where, code):
    """Each step of simple-websocket that ServerSocket relies on is still in its source."""
    assert code in folded(where), (
        f"simple-websocket {metadata.version('simple-websocket')} changed: no longer true that {what}"
        f" (looked for {code!r} in {where.__qualname__}). Read its ws.py against the list at the top of"
        " flask_robe_sockets/websocket.py before allowing this version in setup.cfg."
    )


def test_simple_websocket_handshakes_before_it_starts_the_reader():
    """Base.__init__ completes the handshake before it builds and starts the reader thread."""
    source = folded(simple_ws.Base.__init__)
    assert source.find("self.handshake()") < source.find("thread_class(target=self._thread)"), (
        "simple-websocket's Base.__init__ now starts the reader before the handshake: ServerSocket's"
        " reader would read the socket while wsproto still answers the upgrade"
    )


@pytest.mark.parametrize("name", ["_thread", "_handle_events", "handshake"])
def test_the_methods_the_subclass_overrides_still_exist(name):
    """_thread, _handle_events and handshake are still simple-websocket's, so the overrides still replace them."""
    assert name in vars(simple_ws.Base) or name in vars(simple_ws.Server), (
        f"simple-websocket no longer has {name}: ServerSocket.{name} would never be called and"
        " simple-websocket's own code would read or answer in its place"
    )
    assert name in vars(ServerSocket) or name == "handshake"


def test_server_takes_the_arguments_the_subclass_passes():
    """simple_websocket.Server still takes environ, receive_bytes, max_message_size and thread_class."""
    parameters = inspect.signature(simple_websocket.Server.__init__).parameters
    missing = {"environ", "receive_bytes", "max_message_size", "thread_class"} - set(parameters)
    assert not missing, f"simple_websocket.Server no longer takes {sorted(missing)}"


def test_installed_simple_websocket_is_in_the_pinned_range():
    """The installed simple-websocket is a release setup.cfg says the subclass was checked against."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    [pin] = [
        Requirement(line) for line in parser["options"]["install_requires"].split("\n")
        if line.strip().startswith("simple-websocket")
    ]
    installed = metadata.version("simple-websocket")
    assert pin.specifier.contains(installed), (
        f"simple-websocket {installed} is installed, setup.cfg supports {pin.specifier}: check what"
        " flask_robe_sockets/websocket.py relies on in its ws.py, then move the pin"
    )
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in pin.specifier), (
        f"setup.cfg allows every simple-websocket from {pin.specifier} on: bound it above, at the next"
        " release nobody read"
    )


def test_the_list_in_websocket_py_names_what_is_checked():
    """websocket.py's list of what it relies on names every upstream method these tests read."""
    source = inspect.getsource(websocket)
    for name in ("Base.__init__", "Server.__init__", "Server.handshake", "_thread", "_handle_events"):
        assert name in source, f"websocket.py's list of what it relies on does not mention {name}"
