"""Client WebSocket frames (RFC 6455 section 5), read apart from any I/O.

:class:`FrameReader` takes the bytes a client sent, in whatever pieces the
socket returns them, and hands whole messages and control frames to a
listener. It is the server's only parser of client frames: wsproto stays
for the opening handshake, but every frame is read here, because a limit
must act where a frame's header is read, before its payload costs anything
(STACK-NOTES: wsproto parses an empty continuation frame as dearly as a full
one, and only a message's payload counts towards its size).

Every frame, whatever its opcode, is charged to the listener
(``on_frame(size)``) once it is all there and before its payload is read; a
frame the listener refuses is skipped unread. Every check that can be made
from a header is made as soon as the header is in, so a frame that breaks a
rule is refused before it is buffered, and nothing longer than one allowed
frame is ever buffered. What the reader does per byte is
linear and small: find the header, unmask with two integer operations,
decode UTF-8 incrementally (a fragmented message with invalid UTF-8 fails
at the fragment that breaks it).
"""
from __future__ import annotations

import codecs
import struct
from typing import Protocol

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

#: Refused text messages up to this size are decoded anyway, so that their
#: ``rate_limited`` answer can name their ``ref``: it costs little.
CHEAP_TEXT = 1024

_DATA_OPCODES = (CONTINUATION, TEXT, BINARY)
_CONTROL_OPCODES = (CLOSE, PING, PONG)

# What the reader does with the frames that arrive.
READING, CLOSING, DRAINING = "reading", "closing", "draining"


class FrameError(Exception):
    """A client broke RFC 6455 or a limit: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Listener(Protocol):
    """What :class:`FrameReader` calls; the connection implements it."""

    def on_frame(self, size: int) -> bool: ...  # charge a frame of ``size`` bytes
    def on_refused(self, text: str | None) -> None: ...
    def on_text(self, text: str) -> None: ...
    def on_binary(self) -> None: ...
    def on_ping(self, payload: bytes) -> None: ...
    def on_close(self, code: int) -> None: ...


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 section 7.4)."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``, as one big-integer operation."""
    size = len(payload)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")


class FrameReader:
    """Parses one client's byte stream into messages for ``listener``.

    :param max_message_size: bytes a message may hold over all its
        fragments; a frame that would pass it fails with 1009 from its header.
    :param max_fragments: frames a message may be split into; one more
        fails with 1009, since an empty fragment adds nothing to the size.
    """

    # Slots: one reader per idle connection, whose whole budget is a few KiB.
    __slots__ = (
        "listener", "max_message_size", "max_fragments", "mode", "_buffer", "_needed",
        "_opcode", "_fragments", "_size", "_parts", "_decoder", "_dropped", "_probe",
    )

    def __init__(self, listener: Listener, max_message_size: int, max_fragments: int) -> None:
        self.listener = listener
        self.max_message_size = max_message_size
        self.max_fragments = max_fragments
        #: READING: every frame is handled. CLOSING: our close frame is out;
        #: frames are charged and skipped unread until the client's close
        #: frame. DRAINING: the stream is finished or broken; bytes are dropped.
        self.mode = READING
        self._buffer = bytearray()
        # Bytes the buffer must hold before the next frame can be read.
        self._needed = 0
        # The message in progress: its opcode (None between messages), its
        # fragments so far, its size, its decoded text, and whether a
        # fragment of it was refused (then the rest is skipped too).
        self._opcode: int | None = None
        self._fragments = 0
        self._size = 0
        self._parts: list[str] = []
        # Made for the first fragmented text message: most clients never send one.
        self._decoder: codecs.IncrementalDecoder | None = None
        self._dropped = False
        # While a text frame is still arriving: a UTF-8 decoder, where its
        # payload starts in the buffer and up to where it was checked, its mask.
        self._probe: tuple[codecs.IncrementalDecoder, int, int, bytes] | None = None

    def close(self) -> None:
        """Our close frame is out: look only for the client's."""
        if self.mode is READING:
            self.mode = CLOSING
            self._parts = []
            self._probe = None

    def drain(self) -> None:
        """Drop whatever the client still sends, unread."""
        self.mode = DRAINING
        self._buffer = bytearray()
        self._parts = []
        self._probe = None

    def feed(self, data: bytes) -> bool:
        """Read the frames in ``data``; ``False`` once the client's close frame came.

        :raises FrameError: the client broke the protocol or a limit; the
            reader is draining from then on.
        """
        if self.mode is DRAINING:
            return True
        try:
            buffer = self._buffer
            if buffer:
                # Appended in place: a frame trickling in byte by byte must not
                # be copied whole on every read.
                buffer += data
                if len(buffer) < self._needed:
                    if self._probe is not None:
                        self._check_text()
                    return True
                data = bytes(buffer)
                buffer.clear()
                self._probe = None
            return self._read(data)
        except FrameError:
            self.drain()
            raise

    def _read(self, data: bytes) -> bool:
        listener = self.listener
        pos, end = 0, len(data)
        while pos < end:
            if self.mode is DRAINING:
                # The listener gave up on this client while handling a frame.
                return True
            if end - pos < 2:
                self._keep(data, pos, 2)
                return True
            first, second = data[pos], data[pos + 1]
            if first & 0x70 or not second & 0x80:
                raise FrameError(
                    CLOSE_PROTOCOL_ERROR,
                    "reserved bits set without an extension" if first & 0x70 else "client frames must be masked",
                )
            length = second & 0x7F
            head = 6 if length < 126 else 8 if length == 126 else 14
            if end - pos < head:
                self._keep(data, pos, head)
                return True
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            opcode = first & 0x0F
            fin = first & 0x80
            self._check(first, opcode, length)
            size = head + length
            if end - pos < size:
                # _check refused anything longer than one allowed frame, so
                # that is all that is ever buffered.
                self._keep(data, pos, size)
                if self.mode is READING and (
                    opcode == TEXT or (opcode == CONTINUATION and self._opcode == TEXT and not self._dropped)
                ):
                    # Bad UTF-8 fails the connection as soon as it arrives,
                    # not when the rest of a large frame is in.
                    decoder = codecs.getincrementaldecoder("utf-8")()
                    if opcode == CONTINUATION and self._decoder is not None:
                        decoder.setstate(self._decoder.getstate())
                    self._probe = (decoder, head, head, bytes(self._buffer[head - 4 : head]))
                    self._check_text()
                return True
            start, pos = pos + head, pos + size
            if opcode < CLOSE:
                if opcode != CONTINUATION:
                    self._start_message(opcode)
                self._fragments += 1
                self._size += length
            allowed = listener.on_frame(size)
            if self.mode is DRAINING:
                return True
            if opcode < CLOSE:
                if not allowed:
                    # The whole message is dropped: its other fragments are
                    # charged as they come and skipped unread.
                    self._dropped = True
                skip = self._dropped or self.mode is CLOSING
                kind = self._opcode
                if fin:
                    self._opcode = None
                if skip:
                    if not allowed and self.mode is READING:
                        self._refused(opcode, fin, data[start - 4 : pos])
                    continue
                payload = unmask(data[start:pos], data[start - 4 : start])
                self._data(kind, opcode == TEXT and fin, fin, payload)
            elif not allowed or (self.mode is CLOSING and opcode != CLOSE):
                if not allowed and self.mode is READING:
                    listener.on_refused(None)
            elif not self._control(opcode, unmask(data[start:pos], data[start - 4 : start])):
                self.drain()
                return False
        return True

    def _check_text(self) -> None:
        """Decode what came of the text frame still arriving, from where it was left."""
        decoder, start, checked, mask = self._probe
        buffer = self._buffer
        if len(buffer) <= checked:
            return
        turn = (checked - start) % 4
        try:
            decoder.decode(unmask(bytes(buffer[checked:]), mask[turn:] + mask[:turn]))
        except UnicodeDecodeError:
            raise FrameError(CLOSE_INVALID_DATA, "invalid UTF-8") from None
        self._probe = (decoder, start, len(buffer), mask)

    def _keep(self, data: bytes, pos: int, needed: int) -> None:
        self._buffer += data[pos:] if pos else data
        self._needed = needed

    def _check(self, first: int, opcode: int, length: int) -> None:
        """Refuse from the header what RFC 6455 or a limit forbids."""
        if opcode >= CLOSE:
            if opcode not in _CONTROL_OPCODES:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if not first & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame longer than 125 bytes")
            return
        if opcode == CONTINUATION:
            if self._opcode is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            fragments, size = self._fragments + 1, self._size + length
        elif opcode in _DATA_OPCODES:
            if self._opcode is not None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            fragments, size = 1, length
        else:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if fragments > self.max_fragments:
            raise FrameError(CLOSE_TOO_BIG, f"message in more than {self.max_fragments} frames")
        if size > self.max_message_size:
            raise FrameError(CLOSE_TOO_BIG, "message too big")

    def _start_message(self, opcode: int) -> None:
        self._opcode = opcode
        self._fragments = self._size = 0
        self._dropped = False
        if self._parts:
            self._parts = []
        if self._decoder is not None:
            self._decoder.reset()

    def _refused(self, opcode: int, fin: int, masked: bytes) -> None:
        """Tell the listener; a small whole text message is read for its ``ref``."""
        text = None
        if opcode == TEXT and fin and len(masked) - 4 <= CHEAP_TEXT:
            try:
                text = unmask(masked[4:], masked[:4]).decode()
            except UnicodeDecodeError:
                pass
        self.listener.on_refused(text)

    def _data(self, kind: int | None, whole: bool, fin: int, payload: bytes) -> None:
        if whole:
            # The common case: one whole text message in one frame.
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                raise FrameError(CLOSE_INVALID_DATA, "invalid UTF-8") from None
            self.listener.on_text(text)
            return
        if kind == TEXT:
            if self._decoder is None:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                part = self._decoder.decode(payload, bool(fin))
            except UnicodeDecodeError:
                raise FrameError(CLOSE_INVALID_DATA, "invalid UTF-8") from None
            if part:
                parts = self._parts
                parts.append(part)
                if len(parts) > 32:
                    # Joined as they pile up: many tiny fragments must not
                    # cost as many objects.
                    parts[:] = ["".join(parts)]
        if fin:
            parts, self._parts = self._parts, []
            if kind == TEXT:
                self.listener.on_text("".join(parts))
            else:
                self.listener.on_binary()

    def _control(self, opcode: int, payload: bytes) -> bool:
        if opcode == PING:
            if self.mode is READING:
                self.listener.on_ping(payload)
            return True
        if opcode == PONG:
            return True
        if not payload:
            self.listener.on_close(CLOSE_NO_STATUS)
            return False
        if len(payload) == 1:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
        (code,) = struct.unpack("!H", payload[:2])
        if not valid_close_code(code):
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
        self.listener.on_close(code)
        return False


# -- server frames --------------------------------------------------------

def ws_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """Wrap ``payload`` in one unmasked, final WebSocket frame (RFC 6455).

    Server frames are never masked, so the same bytes serve every
    subscriber: a broadcast is framed once, not once per connection.
    RSV1 stays 0, which RFC 7692 allows on compressed connections too.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A ready-to-write close frame; the reason is cut to fit, on a character boundary."""
    # A control frame holds 125 bytes; cutting inside a UTF-8 sequence would
    # make the reason invalid, and the client fail the connection on it.
    reason_bytes = reason.encode()[:123].decode(errors="ignore").encode()
    return ws_frame(struct.pack("!H", code) + reason_bytes, opcode=CLOSE)


#: A ping with no payload, as the server sends it to a silent client.
PING_FRAME = ws_frame(b"", opcode=PING)
