"""The server side of one WebSocket, on simple-websocket.

``simple_websocket.Server`` finds the client socket in the WSGI environ of
every server we run under and completes the upgrade (with wsproto); this
subclass keeps that and replaces the rest, which does not hold up in
production:

- every write goes through ``sendall`` (simple-websocket uses ``send``, which
  under gevent may write part of a frame and lose the rest);
- frames are read by :class:`~flask_robe_sockets.frames.FrameReader`, which
  charges every frame and byte to the connection before reading it and
  hands messages to a callback as they are read, instead of piling them up
  in an unbounded list: limits act where frames are read;
- the reader never writes: replies such as pongs are queued on the
  connection, whose writers (the flusher's non-blocking round and the
  connection's own writer loop, never both at once) own the socket;
- the reader yields to the other greenlets after a bounded amount of work,
  so one client that keeps its socket full cannot hold the worker;
- permessage-deflate is not negotiated: it would cost CPU per connection
  and lets a small frame inflate to any size before the size check.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Callable

import gevent
import simple_websocket
from gevent import monkey
from wsproto.events import AcceptConnection, Request

from . import protocol
from .frames import DRAINING, FrameError, FrameReader, Listener

log = logging.getLogger("flask_robe_sockets")

# What ServerSocket relies on in simple-websocket, none of it documented API
# (read in its ws.py, 1.1.0; setup.cfg allows 1.1.x, and
# tests/test_websocket.py fails naming the item when a release changes one):
# - Server.__init__(environ, receive_bytes=, max_message_size=, thread_class=)
#   takes the client socket from environ["werkzeug.socket"] or
#   environ["gunicorn.socket"] and passes thread_class on to Base.__init__.
# - Base.__init__ keeps the socket in self.sock and receive_bytes, makes
#   self.ws (a server-side wsproto WSConnection), calls self.handshake() and
#   goes on only if that set self.connected; then, and only then, it builds
#   the reader as thread_class(target=self._thread), rewrites its .name (so
#   _Reader has one) and calls .start().
# - Server.handshake() feeds the environ's HTTP_* headers to self.ws and sets
#   self.connected = self._handle_events().
# - The overrides replace methods of those names: _thread (the reader),
#   _handle_events (here the upgrade only). simple-websocket's send,
#   receive and close are never called (they write with sock.send and pile
#   messages up without bound). sock and ws are used in this module alone;
#   connected is set here too (by the reader and close_socket), and read
#   through the ``reading`` property.

#: Bytes the reader handles before it lets the other greenlets run.
TURN_BYTES = 65536
#: Bytes read and dropped from a client we failed (1002, 1007, 1008, 1009)
#: before we stop reading it: enough for what an honest client had in
#: flight, so that it still reads our close code; an attacker that keeps
#: sending gets its socket closed instead of costing us the reading.
DRAIN_BYTES = 1 << 20


def under_gevent() -> bool:
    """Whether this process runs on gevent's loop (gunicorn's gevent worker).

    The flusher and the raw reader greenlets need that loop; under a
    threaded server (``flask run``) nothing would ever run them, so each
    connection uses a reader thread and its own writer wakes up instead.
    """
    return monkey.is_module_patched("socket")


class _Reader:
    """simple-websocket's reader thread, as a raw greenlet.

    Its default, a monkey-patched ``threading.Thread``, costs about 3 KB more
    per idle connection (thread object, locks, registry entry), and even a
    ``gevent.Greenlet`` 2.5 KB (it records the stack that spawned it).
    simple-websocket renames its thread after creating it, hence ``name``.
    """

    __slots__ = ("name", "_target")

    def __init__(self, target: Callable[[], None]) -> None:
        self.name = "simple_websocket.Base._thread"
        self._target = target

    def start(self) -> None:
        gevent.spawn_raw(self._target)


class ServerSocket(simple_websocket.Server):
    """One accepted WebSocket whose frames are passed to ``listener``.

    ``listener`` is the :class:`~flask_robe_sockets.connection.Connection`:
    it gets the :class:`~flask_robe_sockets.frames.Listener` calls, plus
    ``on_activity()`` for every read, ``fail(code, reason)`` for a client
    that broke the protocol or a limit, and ``on_reader_done()``.
    """

    def __init__(self, environ: dict, listener: Listener, max_message_size: int, max_fragments: int) -> None:
        self.listener = listener
        # The reader thread starts inside super().__init__ and needs this.
        self.frames = FrameReader(listener, max_message_size, max_fragments)
        super().__init__(
            environ,
            receive_bytes=65536,
            max_message_size=max_message_size,
            thread_class=_Reader if under_gevent() else None,
        )

    @property
    def reading(self) -> bool:
        """Whether the reader still reads this socket (simple-websocket's ``connected``)."""
        return self.connected

    @property
    def draining(self) -> bool:
        """Whether what the client sends is dropped unread (we failed it)."""
        return self.frames.mode is DRAINING

    def send_now(self, data: bytes) -> int:
        """Write what the socket takes at once, never waiting; the bytes written."""
        if isinstance(self.sock, ssl.SSLSocket):
            # Under TLS (gunicorn --certfile) the OS socket below would get
            # plaintext: everything goes through send_all and the SSL layer.
            return 0
        try:
            # The OS socket under gevent's wrapper (its private ``_sock``):
            # MSG_DONTWAIT makes sure this never waits, whatever its mode.
            return getattr(self.sock, "_sock", self.sock).send(data, socket.MSG_DONTWAIT)
        except OSError:
            return 0  # would block, or broken: send_all finds out which

    def send_all(self, data: bytes) -> None:
        """Write all of ``data``, waiting for the socket as long as it takes."""
        self.sock.sendall(data)

    def finish_writing(self) -> None:
        """Send a FIN: we will write nothing more."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.connected = False

    def _write_handshake(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _thread(self) -> None:
        listener = self.listener
        frames = self.frames
        work = drained = 0
        try:
            while self.connected:
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    break
                if frames.mode is DRAINING:
                    drained += len(data)
                    if drained > DRAIN_BYTES:
                        break
                listener.on_activity()
                try:
                    self.connected = frames.feed(data)
                except FrameError as exc:
                    listener.fail(exc.code, exc.reason)
                work += len(data)
                if work >= TURN_BYTES:
                    # Under gevent a recv that finds data never yields, and
                    # sleep(0) lets ready greenlets run but not the loop poll
                    # sockets: a client that keeps its socket full would hold
                    # the worker. A timer yields to both.
                    work = 0
                    time.sleep(0.001)
        except OSError:
            pass
        except Exception:
            # A bug of ours: the client still gets a close code, not silence.
            log.exception("reading from a client failed: closing with 1011")
            listener.fail(protocol.CLOSE_INTERNAL, "internal error")
        finally:
            self.connected = False
            listener.on_reader_done()

    def _handle_events(self) -> bool:
        # Called by simple-websocket's handshake only: wsproto reads the
        # upgrade request, and never a frame.
        for event in self.ws.events():
            if isinstance(event, Request):
                self._write_handshake(self.ws.send(AcceptConnection()))
        return True
