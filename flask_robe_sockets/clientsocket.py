"""The client side of one WebSocket: wsproto over a blocking socket.

The Python client (:mod:`flask_robe_sockets.client`) opens one of these per
connect. It drives wsproto itself rather than ``simple_websocket.Client``,
whose every part a reconnecting client would have to replace: its TCP
connect and handshake have no timeout, it leaks its socket when either
fails (a ``ResourceWarning`` per attempt), it keeps only the status of a
refusal and drops its JSON ``error``, it leaves frames that came in the same
read as the 101 unread, it writes with ``send`` (a partial write loses the
rest of the frame) and buffers messages in an unbounded list.

Like a socket, it reports every failure as an ``OSError``.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .clientstate import CLOSE_ABNORMAL, error_name, retry_after_seconds

log = logging.getLogger("flask_robe_sockets.client")


class Refused(ConnectionError):
    """The server answered the handshake with an HTTP error.

    :param status: the HTTP status, e.g. 401.
    :param error: the ``error`` of its JSON body, e.g. ``"ticket_used"``.
    :param retry_after: seconds of its ``Retry-After`` header, if it had one.
    """

    def __init__(self, status: int, error: str | None, retry_after: float | None = None) -> None:
        super().__init__(f"the server refused the WebSocket: {status} {error or ''}".rstrip())
        self.status = status
        self.error = error
        self.retry_after = retry_after


class ClientSocket:
    """One open WebSocket, past the handshake.

    Reads happen in one thread only. Writes may come from any thread: a lock
    keeps wsproto's state and the frames whole, and every frame goes out
    with ``sendall``. The reader waits with ``select`` and takes the lock
    only for a ``recv`` that has data waiting.

    :param timeout: seconds for the TCP connect and the handshake, and for a
        write to finish (one that cannot ends the connection).
    :raises OSError: the connect or the handshake failed; :class:`Refused`
        when the server answered with an HTTP error.
    """

    def __init__(self, url: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        sock = socket.create_connection((parts.hostname, parts.port or (443 if secure else 80)), timeout)
        try:
            if secure:
                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=parts.hostname)
            self.sock = sock
            self.ws = WSConnection(ConnectionType.CLIENT)
            #: Set when the connection is over: the peer's close code, or 1006.
            self.close_code: int | None = None
            # Serialises every read and write on the socket: an SSL object
            # must not do both at once from two threads.
            self._io_lock = threading.Lock()
            self._fragments: list[str] = []
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._handshake(parts.netloc.rpartition("@")[2], target)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, host: str, target: str) -> None:
        try:
            request = self.ws.send(Request(host=host, target=target))
        except LocalProtocolError as exc:
            raise ConnectionError(f"cannot build the handshake: {exc}") from None
        self.sock.sendall(request)
        status = 0
        retry_after = None
        body = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the server closed the connection during the handshake")
            try:
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        # Frames that came in the same read as the 101 (often
                        # @connected) stay in wsproto's buffer: receive()
                        # returns them before it waits for more.
                        return
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        for name, value in event.headers:
                            if name.lower() == b"retry-after":
                                retry_after = retry_after_seconds(value.decode("latin-1"))
                        if not event.has_body:
                            raise Refused(status, None, retry_after)
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            raise Refused(status, error_name(body), retry_after)
            except RemoteProtocolError as exc:
                raise ConnectionError(f"the server's handshake answer is broken: {exc}") from None

    def receive(self, timeout: float | None) -> list[str]:
        """The text messages completed by the next data, waiting up to
        ``timeout`` seconds for it.

        Messages already buffered come first, without waiting. Raises
        ``socket.timeout`` when nothing came; sets :attr:`close_code` when
        the connection is over.
        """
        texts = self._drain()
        if texts or self.close_code is not None:
            return texts
        try:
            if not self._buffered() and not select.select([self.sock], [], [], timeout)[0]:
                raise socket.timeout(f"nothing received in {timeout}s")
            with self._io_lock:
                data = self.sock.recv(65536)
        except socket.timeout:
            raise
        except OSError:
            data = b""
        if not data:
            self.close_code = CLOSE_ABNORMAL
            return []
        self.ws.receive_data(data)
        return self._drain()

    def _buffered(self) -> bool:
        """Whether TLS holds decrypted bytes that ``select`` cannot see."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def _drain(self) -> list[str]:
        texts = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                # wsproto hands over frames in pieces, as the bytes arrive.
                self._fragments.append(event.data)
                if event.message_finished:
                    texts.append("".join(self._fragments))
                    self._fragments.clear()
            elif isinstance(event, Ping):
                self._send_quietly(event.response())
            elif isinstance(event, CloseConnection):
                # The state is still OPEN when wsproto itself found the
                # server's frames broken: the answer is our close, then.
                if self.ws.state is not ConnectionState.CLOSED:
                    self._send_quietly(event.response())
                self.close_code = int(event.code)
                break
            elif isinstance(event, BytesMessage):
                log.warning("ignored a binary frame: the protocol has none")
        return texts

    def send_text(self, text: str) -> None:
        """Write one text message.

        :raises OSError: it could not be written whole; the connection is
            then over, and the reader sees it end.
        """
        self._send(TextMessage(data=text))

    def _send(self, event: Event) -> None:
        with self._io_lock:
            try:
                self.sock.sendall(self.ws.send(event))
            except (OSError, LocalProtocolError) as exc:
                self.abort()
                raise BrokenPipeError(f"the WebSocket is gone: {exc}") from exc

    def _send_quietly(self, event: Event) -> None:
        try:
            self._send(event)
        except OSError:
            pass  # the next read sees the end

    def close(self, code: int) -> None:
        """Start the closing handshake; the reader ends with the server's answer."""
        self._send_quietly(CloseConnection(code=code))

    def abort(self) -> None:
        """End the connection now. Wakes the reader, which ``close()`` alone
        would not do to a thread blocked in ``recv`` on Linux."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def release(self) -> None:
        """Free the socket, once the reader is done with it."""
        self.sock.close()

