"""The server side of one WebSocket, on simple-websocket and wsproto.

``simple_websocket.Server`` finds the client socket in the WSGI environ of
every server we run under and completes the upgrade; this subclass keeps
that and replaces the rest, which does not hold up in production:

- every write goes through ``sendall`` (simple-websocket uses ``send``, which
  under gevent may write part of a frame and lose the rest);
- incoming messages are handed to a callback as they are read instead of
  piling up in an unbounded list, so limits act where frames are read;
- the reader never writes: replies such as pongs are queued on the
  connection, whose writers (the flusher's non-blocking round and the
  connection's own writer loop, never both at once) own the socket;
- permessage-deflate is not negotiated: it would cost CPU per connection
  and lets a small frame inflate to any size before the size check;
- a whole text message in one frame, nearly all client traffic, is parsed
  without wsproto (``protocol.simple_text``), which doubles the events a
  worker handles; wsproto still gets every other frame, whole.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import simple_websocket
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from . import protocol

log = logging.getLogger("flask_robe_sockets")


class ServerSocket(simple_websocket.Server):
    """One accepted WebSocket whose frames are passed to ``listener``.

    ``listener`` is the :class:`~flask_robe_sockets.connection.Connection`;
    it gets ``on_text(str)``, ``on_binary()``, ``on_control(bytes)`` for
    frames to write back, ``on_close(code)`` and ``on_activity()``.
    """

    def __init__(
        self,
        environ: dict,
        listener: object,
        max_message_size: int,
        thread_class: Callable | None = None,
    ) -> None:
        self.listener = listener
        #: Set once we failed the connection (1009, 1007): what the client
        #: still sends is read and dropped until it closes.
        self.draining = False
        # Bytes of a frame not yet complete; whether wsproto is in the middle
        # of a fragmented message; whether it got part of a frame (see _receive).
        self._rest = bytearray()
        self._rest_size = 0
        self._fragmented = False
        self._raw = False
        # The reader thread starts inside super().__init__ and needs these.
        super().__init__(
            environ,
            receive_bytes=65536,
            max_message_size=max_message_size,
            thread_class=thread_class,
        )

    def _write_handshake(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _thread(self) -> None:
        listener = self.listener
        try:
            while self.connected:
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    break
                if len(data) == self.receive_bytes:
                    # More is waiting. Under gevent a recv that finds data
                    # never yields, and sleep(0) lets ready greenlets run but
                    # not the loop poll sockets: a client that keeps its
                    # socket full would hold the worker. A timer yields to both.
                    time.sleep(0.001)
                if self.draining:
                    continue
                listener.on_activity()
                self.connected = self._receive(data)
        except (OSError, LocalProtocolError):
            pass
        except Exception:
            # A bug of ours: the client still gets a close code, not silence.
            log.exception("reading from a client failed: closing with 1011")
            listener.close(protocol.CLOSE_INTERNAL, "internal error")
        finally:
            self.connected = False
            listener.on_reader_done()

    def _receive(self, data: bytes) -> bool:
        """Hand the frames in ``data`` to the listener; False once the socket is done.

        wsproto parses in pure Python and costs more than all the rest of
        handling a small message. The common frame, a whole text message in
        one masked frame, is unmasked here instead; every other frame goes to
        wsproto whole, so its state never depends on the frames it did not see.
        A frame that is incomplete waits in ``_rest``, unless it is longer than
        any allowed message: then wsproto takes the bytes as they come (and
        closes with 1009), as it takes everything else after.
        """
        if self._raw:
            self.ws.receive_data(data)
            return self._handle_events()
        if self._rest:
            # Appended in place: a frame trickling in byte by byte must not
            # be copied whole on every read.
            self._rest += data
            if len(self._rest) < self._rest_size:
                return True
            data = bytes(self._rest)
            self._rest.clear()
        listener = self.listener
        pos, end = 0, len(data)
        while pos < end:
            size = protocol.client_frame_size(data, pos)
            if size is None or size > end - pos:
                if size is not None and size > self.max_message_size + 14:
                    self._raw = True
                    self.ws.receive_data(data[pos:])
                    return self._handle_events()
                self._rest += data[pos:]
                self._rest_size = size or 0
                return True
            frame = data[pos : pos + size]
            pos += size
            if not self._fragmented and frame[0] == 0x81:
                head = 8 if frame[1] & 0x7F == 126 else 6
                text = protocol.simple_text(frame) if size - head <= self.max_message_size else None
                if text is not None:
                    listener.on_text(text)
                    continue
            opcode = frame[0] & 0x0F
            if opcode < 0x8:  # a data frame: a message starts, goes on or ends
                self._fragmented = not frame[0] & 0x80
            self.ws.receive_data(frame)
            if not self._handle_events():
                return False
            if self.draining:
                return True
        return True

    def _handle_events(self) -> bool:
        listener = self.listener
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                # The limit is in bytes: wsproto hands text over decoded,
                # and a character may take four of them.
                data = event.data
                self.incoming_message_len += len(data.encode() if isinstance(data, str) else data)
                if self.incoming_message_len > self.max_message_size:
                    listener.close(protocol.CLOSE_TOO_BIG, "message too big")
                    self.draining = True
                    return True
                if event.message_finished:
                    chunks = self.incoming_message
                    self.incoming_message = None
                    self.incoming_message_len = 0
                    if isinstance(event, BytesMessage):
                        listener.on_binary()
                    elif chunks is None:
                        listener.on_text(event.data)
                    else:
                        chunks.append(event.data)
                        listener.on_text("".join(chunks))
                elif isinstance(event, TextMessage) and data:
                    # Fragments are joined once they pile up (binary ones are
                    # never used, empty ones add nothing): a message in
                    # thousands of tiny fragments must not cost as many objects.
                    chunks = self.incoming_message
                    if chunks is None:
                        self.incoming_message = [data]
                    else:
                        chunks.append(data)
                        if len(chunks) > 32:
                            chunks[:] = ["".join(chunks)]
            elif isinstance(event, Ping):
                listener.on_control(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_reason = event.code
                listener.on_close(event.code)
                if self.ws.state is ConnectionState.OPEN:
                    # Not the client's close but wsproto's verdict on a frame
                    # it could not parse (1007 for bad UTF-8, 1002).
                    self.draining = True
                    return True
                return False
            elif isinstance(event, Request):
                self._write_handshake(self.ws.send(AcceptConnection()))
        return True
