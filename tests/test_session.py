"""A session's send queue, with a fake transport that takes what it is told."""
import pytest

from flask_robe_sockets import frames
from flask_robe_sockets.config import Settings
from flask_robe_sockets.frames import FrameReader
from flask_robe_sockets.session import Session


class ShortTransport:
    """Takes at most ``room`` bytes per write, like a full kernel buffer."""

    def __init__(self, listener, room):
        self.room = room
        self.written = b""
        self.frames = FrameReader(listener, 1024, 8)

    def send_now(self, data):
        taken = data[: self.room]
        self.written += taken
        return len(taken)


class Events:
    """The layer above, writing down what it is told."""

    def __init__(self):
        self.calls = []

    def opened(self, session):
        self.calls.append("opened")

    def message(self, session, text):
        self.calls.append(("message", text))

    def closing(self, session):
        self.calls.append("closing")

    def closed(self, session):
        self.calls.append("closed")


def connection(queue_size, room, queue_bytes=Settings.send_queue_bytes):
    session = Session(Settings(send_queue_size=queue_size, send_queue_bytes=queue_bytes), Events())
    sock = ShortTransport(session, room)
    session.attach(sock)
    return session, sock


def frame(n):
    return frames.ws_frame(b"%08d" % n)  # 10 bytes each


def test_partly_written_queue_still_counts_messages():
    """After a partial write the queue holds the unsent messages, counted one by one."""
    conn, sock = connection(queue_size=4, room=15)
    for n in range(3):
        conn.push(frame(n))
    conn.flush()
    assert sock.written == frame(0) + frame(1)[:5]
    assert list(conn.queued) == [frame(1)[5:], frame(2)]
    conn.push(frame(3))
    conn.push(frame(4))
    assert conn.open
    conn.push(frame(5))  # a fifth message waiting: over the limit of 4
    assert not conn.open
    # The half-written frame is finished, then the close frame: no garbage.
    assert list(conn.queued) == [frame(1)[5:], frames.close_frame(4008, "send queue overflow")]


def test_rest_of_a_frame_cut_twice_is_kept_on_overflow():
    """A frame cut short by two partial writes in a row is still finished before 4008."""
    conn, sock = connection(queue_size=2, room=3)
    conn.push(frame(0))
    conn.flush()
    sock.room = 0
    conn.flush()  # nothing taken: the head is still the rest of frame 0
    conn.push(frame(1))
    conn.push(frame(2))
    assert not conn.open
    assert sock.written + conn.queued[0] == frame(0)


def test_close_refuses_codes_that_may_not_be_sent():
    """close() with a reserved or out-of-range code raises ValueError and leaves the connection open."""
    conn, _ = connection(queue_size=4, room=100)
    for code in (999, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(ValueError, match="close code"):
            conn.close(code)
    assert conn.open
    conn.close(4001, "bye")
    assert not conn.open and list(conn.queued) == [frames.close_frame(4001, "bye")]


def test_queue_is_bounded_in_bytes_too():
    """A few large messages overflow the byte budget long before the message count: 4008."""
    conn, sock = connection(queue_size=100, room=0, queue_bytes=1000)
    big = frames.ws_frame(b"x" * 300)
    for _ in range(3):
        conn.push(big)
    assert conn.open and conn.queued_bytes == 3 * len(big)
    conn.push(big)  # 1,212 bytes waiting: over 1,000
    assert not conn.open
    assert list(conn.queued) == [frames.close_frame(4008, "send queue overflow")]


def test_a_frame_larger_than_the_byte_budget_goes_to_an_idle_client():
    """One message larger than the whole budget is still sent when nothing else waits."""
    conn, sock = connection(queue_size=100, room=10_000, queue_bytes=100)
    big = frames.ws_frame(b"x" * 500)
    conn.push(big)
    assert conn.open
    conn.flush()
    assert sock.written == big and conn.queued_bytes == 0


def test_byte_count_follows_partial_writes():
    """After partial writes the byte count is what is still waiting."""
    conn, sock = connection(queue_size=10, room=15)
    for n in range(3):
        conn.push(frame(n))
    conn.flush()
    assert conn.queued_bytes == sum(map(len, list(conn.queued))) == 15


@pytest.fixture
def on_gevent(monkeypatch):
    """Sessions made now take the gevent worker's path (flusher rounds), whose
    flusher greenlet these tests never let run: they flush by hand."""
    monkeypatch.setattr("flask_robe_sockets.session.under_gevent", lambda: True)


def test_a_client_that_keeps_up_is_not_counted_in_bytes(on_gevent):
    """Under gevent a queue that every flush empties costs no byte count, and reports its bytes all the same."""
    conn, sock = connection(queue_size=100, room=10_000, queue_bytes=1000)
    for n in range(3):
        conn.push(frame(n))
    assert conn.queued_bytes == 30
    conn.flush()
    assert sock.written == frame(0) + frame(1) + frame(2) and conn.queued_bytes == 0


def test_a_client_behind_is_bounded_in_bytes_from_its_first_short_write(on_gevent):
    """The first flush that cannot write everything starts the byte count: past the budget, 4008."""
    conn, sock = connection(queue_size=100, room=0, queue_bytes=1000)
    big = frames.ws_frame(b"x" * 300)
    for _ in range(3):
        conn.push(big)
    conn.flush()  # nothing taken: behind from now on
    assert conn.open and conn.queued_bytes == 3 * len(big)
    conn.push(big)
    assert not conn.open
    assert list(conn.queued) == [frames.close_frame(4008, "send queue overflow")]


def test_a_client_that_catches_up_stops_being_counted(on_gevent):
    """Once a flush writes everything again, pushes go back to the cheap path, and the bound starts afresh."""
    conn, sock = connection(queue_size=100, room=0, queue_bytes=1000)
    big = frames.ws_frame(b"x" * 300)
    conn.push(big)
    conn.flush()
    assert conn.queued_bytes == len(big)
    sock.room = 10_000
    conn.flush()
    assert sock.written == big and conn.queued_bytes == 0
    for _ in range(3):
        conn.push(big)
    assert conn.open and conn.queued_bytes == 3 * len(big)
