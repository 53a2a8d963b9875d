"""Channel membership in one worker (channels.Hub), without sockets."""
import pytest

from flask_robe_sockets.channels import Channel, Hub


class FakeConnection:
    """Records the frames a Hub queues for it."""

    def __init__(self):
        self.frames = []

    def push(self, frame):
        self.frames.append(frame)


@pytest.fixture
def hub_calls():
    calls = []
    hub = Hub(lambda ch: calls.append(("first", ch)), lambda ch: calls.append(("last", ch)))
    return hub, calls


def join(hub, conn, channel, last_seq=0):
    hub.begin_join(conn, channel)
    hub.end_join(conn, channel, last_seq)


def test_deliver_reaches_members_only(hub_calls):
    """A broadcast is queued once for each member of its channel and nobody else."""
    hub, _ = hub_calls
    a, b, c = FakeConnection(), FakeConnection(), FakeConnection()
    join(hub, a, "chat")
    join(hub, b, "chat")
    join(hub, c, "other")
    hub.deliver("chat", 1, b"frame")
    assert a.frames == [b"frame"] and b.frames == [b"frame"] and c.frames == []


def test_backend_told_on_first_join_and_last_leave(hub_calls):
    """The backend hears of a channel when its first local member joins and its last leaves."""
    hub, calls = hub_calls
    a, b = FakeConnection(), FakeConnection()
    join(hub, a, "chat")
    join(hub, b, "chat")
    hub.leave(a, "chat")
    assert calls == [("first", "chat")]
    hub.leave(b, "chat")
    assert calls == [("first", "chat"), ("last", "chat")]
    assert hub.member_counts() == {}


def test_leave_of_a_non_member_changes_nothing(hub_calls):
    """Leaving a channel never joined does not release the backend subscription."""
    hub, calls = hub_calls
    a, b = FakeConnection(), FakeConnection()
    join(hub, a, "chat")
    hub.leave(b, "chat")
    hub.leave(b, "never")
    assert calls == [("first", "chat")]
    assert hub.member_counts() == {"chat": 1} and hub.channels_of(a) == {"chat"}


def test_join_seam_has_no_gap_and_no_duplicate(hub_calls):
    """Broadcasts during a join are held, then only those newer than the replay go out."""
    hub, _ = hub_calls
    a = FakeConnection()
    hub.begin_join(a, "chat")
    hub.deliver("chat", 5, b"five")  # already in the replay the caller sends
    hub.deliver("chat", 6, b"six")  # newer than the replay
    assert a.frames == []
    a.frames.append(b"replay up to five")
    hub.end_join(a, "chat", last_seq=5)
    hub.deliver("chat", 7, b"seven")
    assert a.frames == [b"replay up to five", b"six", b"seven"]


def test_leaving_while_joining_releases_the_channel(hub_calls):
    """A connection that drops mid-join is not made a member afterwards."""
    hub, calls = hub_calls
    a = FakeConnection()
    hub.begin_join(a, "chat")
    hub.leave(a, "chat")
    hub.end_join(a, "chat", 0)
    hub.deliver("chat", 1, b"late")
    assert a.frames == [] and hub.member_counts() == {}
    assert calls == [("first", "chat"), ("last", "chat")]


def test_member_that_leaves_during_delivery_does_not_break_the_loop(hub_calls):
    """A member dropped while a broadcast is being delivered does not stop the others."""
    hub, _ = hub_calls
    received = []

    class Overflowing(FakeConnection):
        def push(self, frame):
            hub.leave(self, "chat")

    class Recording(FakeConnection):
        def push(self, frame):
            received.append(frame)

    join(hub, Overflowing(), "chat")
    join(hub, Recording(), "chat")
    hub.deliver("chat", 1, b"x")
    assert received == [b"x"]


@pytest.mark.parametrize("name", ["", "x" * 129, "has space", "é"])
def test_channel_handle_refuses_bad_names(name):
    """sockets[name] with a name the protocol forbids raises ValueError at once."""
    with pytest.raises(ValueError, match="invalid channel name"):
        Channel(name, lambda *args: 0)


def test_channel_send_builds_data_from_keywords():
    """send(event, text=...) publishes a dict; a positional value is sent as it is."""
    published = []
    channel = Channel("chat", lambda *args: published.append(args) or len(published))
    assert channel.send("message", text="hi") == 1
    assert channel.send("message", [1, 2]) == 2
    assert published == [("chat", "message", {"text": "hi"}), ("chat", "message", [1, 2])]
    with pytest.raises(TypeError):
        channel.send("message", {"a": 1}, text="hi")
    with pytest.raises(ValueError, match="invalid event name"):
        channel.send("@subscribed")


def test_a_failing_member_does_not_stop_the_broadcast(hub_calls):
    """A member whose push raises is skipped; the others still get the frame."""
    hub, _ = hub_calls

    class Broken(FakeConnection):
        def push(self, frame):
            raise RuntimeError("broken")

    healthy = FakeConnection()
    join(hub, Broken(), "chat")
    join(hub, healthy, "chat")
    hub.deliver("chat", 1, b"x")
    assert healthy.frames == [b"x"]
