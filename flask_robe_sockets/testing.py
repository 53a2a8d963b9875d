"""An in-process client for testing an application's sockets: no server, no
port, no gevent.

::

    def test_chat(app):                       # sockets: the app's RobeSockets
        with sockets.test_client(app, identity="alice") as alice:
            alice.subscribe("chat")
            assert alice.send("chat", "message", {"text": "hi"}) == {"ok": True}
            assert alice.received("chat") == [
                {"channel": "chat", "event": "message", "data": {"text": "hi"}, "seq": 1},
            ]

A :class:`SocketTestClient` goes through what a socket goes through, in the
caller's thread, one call at a time: the ticket (issued for ``identity``, or
asked for with ``POST {path}/ticket`` through a Flask test client and its
cookies), :func:`~flask_robe_sockets.handshake.check`, the connection
limits, then the same session, connection and dispatcher as a real socket.
What it sends are masked client frames, read by the same
:class:`~flask_robe_sockets.frames.FrameReader`, so frame validation and
the rate limits apply; what the server writes is read back as frames.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from . import frames, handshake, protocol
from .clientstate import ClientClosed, ConnectError, ConnectionLost, ReplyError, SendTimeout
from .frames import FrameError, FrameReader, unmask

if TYPE_CHECKING:
    from .server import SocketServer
    from .session import Session

log = logging.getLogger("flask_robe_sockets")

#: The address Werkzeug's test client gives its requests, unless told otherwise.
TEST_ADDR = "127.0.0.1"

#: The answers that settle a request of the test client's own.
_ANSWERS = frozenset({protocol.SUBSCRIBED, protocol.UNSUBSCRIBED, protocol.REPLY, protocol.ERROR})


class _Loopback:
    """The test client's end of the wire, as the session sees it: its
    ``frames`` reader and ``send_now``; what is written waits here until
    the client reads it."""

    def __init__(self, session: "Session", max_message_size: int, max_fragments: int) -> None:
        self.frames = FrameReader(session, max_message_size, max_fragments)
        self._written = bytearray()

    def send_now(self, data: bytes) -> int:
        self._written += data
        return len(data)

    def send_all(self, data: bytes) -> None:
        self._written += data

    def take_frames(self) -> list[tuple[int, bytes]]:
        """The whole server frames written so far, as (opcode, payload), oldest first."""
        out = []
        buffer = self._written
        pos = 0
        while len(buffer) - pos >= 2:
            opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                head = 4
                if len(buffer) - pos < head:
                    break
                (length,) = struct.unpack("!H", buffer[pos + 2 : pos + 4])
            elif length == 127:
                head = 10
                if len(buffer) - pos < head:
                    break
                (length,) = struct.unpack("!Q", buffer[pos + 2 : pos + 10])
            if len(buffer) - pos < head + length:
                break
            out.append((opcode, bytes(buffer[pos + head : pos + head + length])))
            pos += head + length
        del buffer[:pos]
        return out


def masked_frame(payload: bytes, opcode: int = frames.TEXT) -> bytes:
    """One final client frame, masked as RFC 6455 asks of every client."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    return header + mask + unmask(payload, mask)


class SocketTestClient:
    """One client connection to ``server``, run in the caller's thread.

    Made by :meth:`RobeSockets.test_client`; see there for the arguments.
    Every call runs the server's side of it to the end before it returns:
    the handlers and hooks have run, and the answer is what it returns or
    raises. Frames the server sends that answer none of its calls
    (broadcasts, messages to this connection alone, an ``@error`` without a
    ``ref``) wait for :meth:`received`. Use it from one thread.

    They wait in the connection's send queue until the next call, as for a
    client that is not reading: more than ``ROBE_SOCKETS_SEND_QUEUE_SIZE``
    broadcasts between two calls close it with 4008. The server sends it no
    pings.
    """

    def __init__(self, server: "SocketServer", identity: Any = None, flask_client: Any = None) -> None:
        self._server = server
        settings = server.settings
        remote_addr = TEST_ADDR
        if flask_client is not None:
            remote_addr = (getattr(flask_client, "environ_base", None) or {}).get("REMOTE_ADDR", TEST_ADDR)
            ticket = self._ask_ticket(flask_client)
        else:
            ticket = self._issue_ticket(identity, remote_addr)
        headers = {
            "Host": server.app.config.get("SERVER_NAME") or "localhost",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        try:
            identity = handshake.check(
                headers, ticket, remote_addr, "http", headers["Host"], settings, server.tickets
            )
        except handshake.Refusal as refused:
            raise self._refused(refused.status, refused.error, remote_addr) from None
        self._slot = contextlib.ExitStack()
        full = self._slot.enter_context(server.slots.reserve(identity, remote_addr))
        if full is not None:
            self._slot.close()
            raise self._refused(handshake.LIMIT_STATUS[full], full, remote_addr)
        #: What the ticket named (``None`` for an anonymous connection).
        self.identity = identity
        #: The connection id of ``@connected``.
        self.id: str | None = None
        self._refs = itertools.count(1)
        self._inbox: list[dict] = []
        self._close_code: int | None = None
        self._closed_by_us = False
        self._ended = False
        self._session = session = server.session(identity, remote_addr)
        self._wire = _Loopback(session, settings.max_message_size, settings.max_fragments)
        session.begin(self._wire)
        self._sync()
        hello = self._inbox.pop(0) if self._inbox else None
        if hello is None or hello.get("event") != protocol.CONNECTED:
            raise ConnectError(
                f"the server closed the connection with {self._close_code} before @connected",
                None, "connect_failed",
            )
        self.id = hello["data"]["id"]

    def __repr__(self) -> str:
        return f"<SocketTestClient {self.id} identity={self.identity!r}>"

    def __enter__(self) -> "SocketTestClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the handshake ---------------------------------------------------

    def _ask_ticket(self, flask_client: Any) -> str:
        """A ticket from the app's own endpoint, with ``flask_client``'s cookies."""
        response = flask_client.post(self._server.settings.path + "/ticket")
        body = response.get_json(silent=True) or {}
        if response.status_code != 200 or "ticket" not in body:
            retry_after = response.headers.get("Retry-After")
            raise ConnectError(
                f"the ticket was refused: {response.status_code} {body.get('error')}",
                response.status_code,
                body.get("error") or "ticket_failed",
                float(retry_after) if retry_after else None,
            )
        return body["ticket"]

    def _issue_ticket(self, identity: Any, remote_addr: str) -> str | None:
        """A ticket for ``identity``, as the ticket endpoint would issue it
        (its rate limit aside); ``None`` when the app needs none."""
        server = self._server
        if identity is None and not server.settings.tickets_required:
            return None
        if identity is None and server.router.has_identity_loader:
            # What the endpoint answers a caller its loader does not know.
            raise ConnectError("the ticket was refused: 401 unauthorized", 401, "unauthorized")
        if server.tickets is None:
            raise ConnectError(
                "the ticket was refused: 404 tickets_disabled (the app has no SECRET_KEY)",
                404, "tickets_disabled",
            )
        return server.tickets.issue(identity, remote_addr)

    def _refused(self, status: int, error: str, remote_addr: str) -> ConnectError:
        log.info("handshake from %s refused: %s", remote_addr, error)
        return ConnectError(f"the handshake was refused: {status} {error}", status, error)

    # -- what it does ----------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection is open, as of what the server sent so far."""
        self._sync()
        return not self._ended

    @property
    def close_code(self) -> int | None:
        """The code of the close frame that ended the connection; ``None`` while open."""
        self._sync()
        return self._close_code

    def subscribe(self, name: str, since: int | None = None, epoch: str | None = None) -> dict:
        """Subscribe to channel ``name``; the ``@subscribed`` data.

        :param since: the last ``seq`` seen, to have what came after replayed.
        :param epoch: the ``epoch`` that ``seq`` belongs to.
        :raises ReplyError: the server refused (``forbidden``, ...).
        """
        data = {key: value for key, value in (("since", since), ("epoch", epoch)) if value is not None}
        return self._request(name, protocol.SUBSCRIBE, data or None)

    def unsubscribe(self, name: str) -> None:
        """Leave channel ``name``."""
        self._request(name, protocol.UNSUBSCRIBE, None)

    def send(self, channel: str, event: str, data: Any = None) -> Any:
        """Send ``event`` on ``channel``; the ``@reply`` data.

        :raises ReplyError: the server answered ``@error`` (``.code``).
        """
        return self._request(channel, event, data)

    def received(self, channel: str | None = None) -> list[dict]:
        """The frames received since the last call, as the JSON objects on the
        wire (``channel``, ``event``, ``data``, ``seq``), oldest first; each is
        returned once.

        With a shared backend (Redis), broadcasts reach this process through
        the backend: it first waits (at most the backend's timeout) until
        everything published to its channels so far has arrived.

        :param channel: only the frames of that channel (the others stay).
        """
        if not self._ended:
            for name in sorted(self._session.owner.channels):
                # Answered once the backend handed over every broadcast of
                # the channel up to now (Redis: the listener's PING barrier).
                self._server.backend.recover(name, None, None)
        self._sync()
        if channel is None:
            taken, self._inbox = self._inbox, []
            return taken
        taken = [frame for frame in self._inbox if frame.get("channel") == channel]
        self._inbox = [frame for frame in self._inbox if frame.get("channel") != channel]
        return taken

    def close(self) -> None:
        """Close the connection as a client does (its close frame first);
        the disconnect hooks have run when it returns."""
        if self._ended:
            return
        self._closed_by_us = True
        self._feed(masked_frame(struct.pack("!H", protocol.CLOSE_NORMAL), frames.CLOSE))
        self._sync()
        if not self._ended:  # the server's close frame never came (e.g. it failed us)
            self._end(None)

    # -- the wire --------------------------------------------------------

    def _request(self, channel: str, event: str, data: Any) -> Any:
        if self._ended:
            if self._closed_by_us:
                raise ClientClosed("the test client is closed")
            raise ConnectionLost(f"the connection was closed with {self._close_code}")
        ref = next(self._refs)
        frame: dict[str, Any] = {"channel": channel, "event": event, "ref": ref}
        if data is not None:
            frame["data"] = data
        self._feed(masked_frame(json.dumps(frame, ensure_ascii=False).encode()))
        answer = self._sync(ref)
        if answer is None:
            if self._ended:
                raise ConnectionLost(
                    f"{event!r} on {channel!r} was sent, and the connection was closed with"
                    f" {self._close_code} before its answer"
                )
            raise SendTimeout(f"the server did not answer {event!r} on {channel!r}")
        if answer["event"] == protocol.ERROR:
            error = answer.get("data") or {}
            raise ReplyError(error.get("code", ""), error.get("message", ""), answer.get("channel"))
        return answer.get("data")

    def _feed(self, data: bytes) -> None:
        """Hand bytes to the server as its socket's reader does."""
        session = self._session
        session.on_activity()
        try:
            reading = self._wire.frames.feed(data)
        except FrameError as exc:
            session.fail(exc.code, exc.reason)
        else:
            if not reading:  # our close frame was read
                session.on_reader_done()

    def _sync(self, ref: Any = None) -> dict | None:
        """Take what the server wrote; the answer to ``ref`` if it came."""
        if self._ended:
            return None
        self._session.flush()
        answer = None
        for opcode, payload in self._wire.take_frames():
            if opcode == frames.TEXT:
                frame = json.loads(payload)
                if (
                    ref is not None and answer is None and frame.get("ref") == ref
                    and frame.get("event") in _ANSWERS
                ):
                    answer = frame
                else:
                    self._inbox.append(frame)
            elif opcode == frames.CLOSE:
                self._end(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005)
                break
        return answer

    def _end(self, code: int | None) -> None:
        """The server's close frame came (or never will): finish the
        connection's server side, as its socket ending would."""
        self._close_code = code
        self._ended = True
        session = self._session
        if not self._closed_by_us:
            # Answered as a client answers a close; the reader drops it if
            # it was told to stop reading.
            self._feed(masked_frame(struct.pack("!H", code or protocol.CLOSE_NORMAL), frames.CLOSE))
        session.on_reader_done()
        try:
            session.end()
        finally:
            self._slot.close()
