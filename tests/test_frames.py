"""The client frame reader, fed bytes (RFC 6455 section 5)."""
from __future__ import annotations

import struct

import pytest

from flask_robe_sockets.frames import (
    CLOSE,
    CLOSING,
    CONTINUATION,
    DRAINING,
    PING,
    PONG,
    TEXT,
    FrameError,
    PING_FRAME,
    FrameReader,
    close_frame,
    unmask,
    ws_frame,
)

from .rawws import BINARY, build_frame


class Recorder:
    """A listener that writes down every call; ``budget`` frames are allowed."""

    def __init__(self, budget: int = 10**9) -> None:
        self.budget = budget
        self.calls: list[tuple] = []
        self.charged: list[int] = []

    def on_frame(self, size):
        self.charged.append(size)
        self.budget -= 1
        return self.budget >= 0

    def on_refused(self, text):
        self.calls.append(("refused", text))

    def on_text(self, text):
        self.calls.append(("text", text))

    def on_binary(self):
        self.calls.append(("binary",))

    def on_ping(self, payload):
        self.calls.append(("ping", payload))

    def on_close(self, code):
        self.calls.append(("close", code))


def reader(budget=10**9, max_size=1000, max_fragments=4):
    listener = Recorder(budget)
    return FrameReader(listener, max_size, max_fragments), listener


def test_unmask_round_trips():
    """Unmasking is XOR with the key repeated, for any length."""
    key = b"\x01\x02\x03\x04"
    for size in (0, 1, 3, 4, 5, 1000):
        data = bytes(range(256)) * 4
        data = data[:size]
        masked = unmask(data, key)
        assert unmask(masked, key) == data
        assert all(masked[i] == data[i] ^ key[i % 4] for i in range(size))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 999, 1000])
def test_whole_text_frames_in_every_header_form(size):
    """A whole text frame is handed over as text and charged its full size."""
    frames, listener = reader()
    frame = build_frame(TEXT, b"a" * size)
    assert frames.feed(frame)
    assert listener.calls == [("text", "a" * size)]
    assert listener.charged == [len(frame)]


def test_frames_split_at_every_byte_are_read_once():
    """A stream cut into one-byte reads gives the same messages, each charged once."""
    stream = build_frame(TEXT, "héllo".encode()) + build_frame(PING, b"p") + build_frame(TEXT, b"x" * 300)
    frames, listener = reader()
    for i in range(len(stream)):
        frames.feed(stream[i : i + 1])
    assert listener.calls == [("text", "héllo"), ("ping", b"p"), ("text", "x" * 300)]
    assert len(listener.charged) == 3


def test_fragmented_text_is_joined():
    """Fragments make one message; a character split between them survives."""
    data = "é€😀".encode()
    frames, listener = reader()
    frames.feed(
        build_frame(TEXT, data[:1], fin=False)
        + build_frame(PING, b"between")
        + build_frame(CONTINUATION, data[1:5], fin=False)
        + build_frame(CONTINUATION, data[5:], fin=True)
    )
    assert listener.calls == [("ping", b"between"), ("text", "é€😀")]
    assert len(listener.charged) == 4


def test_binary_messages_are_reported_not_kept():
    frames, listener = reader()
    frames.feed(build_frame(BINARY, b"\x00" * 10, fin=False) + build_frame(CONTINUATION, b"\x01"))
    assert listener.calls == [("binary",)]


@pytest.mark.parametrize("extra, fails", [(0, False), (1, True)])
def test_fragments_per_message_are_bounded(extra, fails):
    """At most max_fragments frames per message, empty ones included: then 1009."""
    frames, listener = reader(max_fragments=4)
    stream = build_frame(TEXT, b"a", fin=False)
    stream += build_frame(CONTINUATION, b"", fin=False) * (2 + extra)
    stream += build_frame(CONTINUATION, b"b")
    if fails:
        with pytest.raises(FrameError) as info:
            frames.feed(stream)
        assert info.value.code == 1009
        assert frames.mode is DRAINING
    else:
        frames.feed(stream)
        assert listener.calls == [("text", "ab")]


def test_oversize_is_refused_from_the_header():
    """A frame longer than the limit fails with 1009 before its payload arrives."""
    frames, listener = reader(max_size=1000)
    header = build_frame(TEXT, b"x" * 1001)[:8]
    with pytest.raises(FrameError) as info:
        frames.feed(header)
    assert info.value.code == 1009
    assert listener.charged == []


def test_fragments_adding_past_the_limit_fail():
    frames, _ = reader(max_size=1000)
    with pytest.raises(FrameError) as info:
        frames.feed(build_frame(TEXT, b"x" * 600, fin=False) + build_frame(CONTINUATION, b"y" * 401))
    assert info.value.code == 1009


def test_invalid_utf8_fails_at_the_fragment_that_breaks_it():
    """Bad UTF-8 in a first fragment fails at once (1007), before the message ends."""
    frames, _ = reader()
    with pytest.raises(FrameError) as info:
        frames.feed(build_frame(TEXT, b"ok\xff", fin=False))
    assert info.value.code == 1007


def test_truncated_utf8_at_the_end_of_a_message_fails():
    frames, _ = reader()
    with pytest.raises(FrameError) as info:
        frames.feed(build_frame(TEXT, b"ok", fin=False) + build_frame(CONTINUATION, "é".encode()[:1]))
    assert info.value.code == 1007


@pytest.mark.parametrize(
    "frame",
    [
        build_frame(TEXT, b"x", mask=False),
        build_frame(TEXT, b"x", rsv=4),
        build_frame(0x3, b""),
        build_frame(0xB, b""),
        build_frame(CONTINUATION, b"orphan"),
        build_frame(PING, b"", fin=False),
        build_frame(PING, b"x" * 126),
        build_frame(CLOSE, b"\x03"),
        build_frame(CLOSE, (999).to_bytes(2, "big")),
        build_frame(CLOSE, (1005).to_bytes(2, "big")),
        build_frame(CLOSE, (5000).to_bytes(2, "big")),
        build_frame(TEXT, b"{", fin=False) + build_frame(TEXT, b"}"),
    ],
    ids=[
        "unmasked", "rsv", "reserved-opcode", "reserved-control", "orphan-continuation",
        "fragmented-ping", "long-ping", "one-byte-close", "close-999", "close-1005",
        "close-5000", "text-inside-message",
    ],
)
def test_rfc6455_violations_fail_with_1002(frame):
    frames, listener = reader()
    with pytest.raises(FrameError) as info:
        frames.feed(frame)
    assert info.value.code == 1002
    assert frames.mode is DRAINING
    assert not [call for call in listener.calls if call[0] == "text"]


def test_close_reason_must_be_utf8():
    frames, _ = reader()
    with pytest.raises(FrameError) as info:
        frames.feed(build_frame(CLOSE, (1000).to_bytes(2, "big") + b"\xff"))
    assert info.value.code == 1007


@pytest.mark.parametrize("payload, code", [(b"", 1005), ((1000).to_bytes(2, "big") + b"bye", 1000), ((4999).to_bytes(2, "big"), 4999)])
def test_close_ends_the_stream(payload, code):
    """The client's close frame is reported and nothing after it is read."""
    frames, listener = reader()
    assert frames.feed(build_frame(CLOSE, payload) + build_frame(TEXT, b"after")) is False
    assert listener.calls == [("close", code)]


def test_pongs_are_read_and_ignored():
    frames, listener = reader()
    frames.feed(build_frame(PONG, b"x") + build_frame(TEXT, b"t"))
    assert listener.calls == [("text", "t")]
    assert len(listener.charged) == 2


def test_refused_frames_are_skipped_and_small_texts_named():
    """Frames over the budget are skipped; a small whole text is given for its ref, others not."""
    frames, listener = reader(budget=1, max_size=2000)
    frames.feed(
        build_frame(TEXT, b"first")
        + build_frame(TEXT, b'{"ref": 7}')
        + build_frame(TEXT, b"y" * 1025)
        + build_frame(PING, b"p")
    )
    assert listener.calls == [("text", "first"), ("refused", '{"ref": 7}'), ("refused", None), ("refused", None)]


def test_a_refused_fragment_drops_its_whole_message():
    """Once a fragment is refused, the rest of its message is charged and skipped."""
    frames, listener = reader(budget=0)
    frames.feed(build_frame(TEXT, b"a", fin=False) + build_frame(CONTINUATION, b"b", fin=False))
    listener.budget = 10
    frames.feed(build_frame(CONTINUATION, b"c") + build_frame(TEXT, b"next"))
    # Each refused frame is told; the allowed rest of the message is not.
    assert listener.calls == [("refused", None), ("refused", None), ("text", "next")]
    assert len(listener.charged) == 4


def test_closing_skips_everything_but_the_close_frame():
    """After our close frame, data and pings are skipped unread until the client's close."""
    frames, listener = reader()
    frames.close()
    assert frames.mode is CLOSING
    assert frames.feed(build_frame(TEXT, b"late") + build_frame(PING, b"p")) is True
    assert frames.feed(build_frame(CLOSE, (1000).to_bytes(2, "big"))) is False
    assert listener.calls == [("close", 1000)]
    assert len(listener.charged) == 3


def test_draining_reads_nothing():
    """A drained reader neither parses nor charges what still arrives, even garbage."""
    frames, listener = reader()
    frames.drain()
    assert frames.feed(b"\xff" * 10_000 + build_frame(TEXT, b"x")) is True
    assert listener.calls == [] and listener.charged == []


def test_buffer_never_holds_more_than_one_frame():
    """What waits for the rest of a frame is bounded by the largest allowed frame."""
    frames, _ = reader(max_size=1000)
    frame = build_frame(TEXT, b"x" * 1000)
    frames.feed(frame[:-1])
    assert len(frames._buffer) == len(frame) - 1


# -- server frames -------------------------------------------------------------


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_ws_frame_length_encoding(length, header):
    """Payload lengths use 7, 16 and 64 bits exactly at the RFC 6455 boundaries."""
    payload = b"x" * length
    data = ws_frame(payload)
    assert data == header + payload


def test_ws_frame_is_final_unmasked_and_keeps_opcode():
    """Frames are final, unmasked, RSV bits clear, with the requested opcode."""
    assert ws_frame(b"ab", opcode=0x2)[:2] == b"\x82\x02"
    assert PING_FRAME == b"\x89\x00"


def test_close_frame_layout():
    """A close frame is opcode 8, the code in network order, then the reason."""
    assert close_frame(4008, "slow") == b"\x88\x06" + struct.pack("!H", 4008) + b"slow"
    assert close_frame(1000) == b"\x88\x02\x03\xe8"


def test_close_frame_reason_fits_a_control_frame():
    """A long reason is cut so that the frame stays within 125 payload bytes."""
    data = close_frame(1001, "x" * 500)
    assert data[1] == 125 and len(data) == 127


def test_close_frame_reason_is_cut_on_a_character_boundary():
    """A cut reason is still valid UTF-8, or the client would fail the connection."""
    data = close_frame(1000, "é" * 100)
    assert data[1] <= 125
    assert data[4:].decode("utf-8") == "é" * 61


def test_bad_utf8_fails_before_the_rest_of_its_frame_arrives():
    """A large text frame whose first bytes are not UTF-8 fails (1007) at once, not at its end."""
    frames, listener = reader(max_size=100_000)
    frame = build_frame(TEXT, b"ok" + b"\xff" + b"x" * 50_000)
    frames.feed(frame[:4])
    with pytest.raises(FrameError) as info:
        frames.feed(frame[4:20])
    assert info.value.code == 1007
    assert listener.calls == []


def test_trickled_text_is_checked_once_and_delivered_whole():
    """A text frame arriving a few bytes at a time, characters split anywhere, is delivered whole."""
    text = "é€😀" * 500
    frames, listener = reader(max_size=100_000)
    frame = build_frame(TEXT, text.encode())
    for i in range(0, len(frame), 7):
        frames.feed(frame[i : i + 7])
    assert listener.calls == [("text", text)]


def test_bad_utf8_in_a_continuation_still_arriving_fails():
    """The check of a fragment still arriving starts from the message's state (a split character)."""
    data = "€".encode()
    frames, _ = reader(max_size=100_000)
    frames.feed(build_frame(TEXT, b"a" + data[:1], fin=False))
    second = build_frame(CONTINUATION, data[1:] + b"ok" * 1000, fin=True)
    frames.feed(second[:10])  # the rest of the euro sign: still fine
    bad = build_frame(CONTINUATION, b"\xc3(" + b"x" * 1000, fin=True)
    frames2, _ = reader(max_size=100_000)
    frames2.feed(build_frame(TEXT, b"a", fin=False))
    with pytest.raises(FrameError) as info:
        frames2.feed(bad[:12])
    assert info.value.code == 1007
