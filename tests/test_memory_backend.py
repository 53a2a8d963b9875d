"""The in-memory backend's numbering, history and epochs, without sockets."""
import json

from flask_robe_sockets.backends.memory import MemoryBackend


def payload(frame: bytes) -> dict:
    """The JSON of a short unmasked server frame."""
    return json.loads(frame[2:])


def test_seq_grows_by_one_per_channel():
    """Each channel numbers its broadcasts 1, 2, 3 on its own."""
    backend = MemoryBackend()
    delivered = []
    backend.start(lambda channel, seq, frame: delivered.append((channel, seq, payload(frame))))
    assert [backend.publish("a", "e", i) for i in range(3)] == [1, 2, 3]
    assert backend.publish("b", "e", None) == 1
    assert delivered[2] == ("a", 3, {"channel": "a", "event": "e", "data": 2, "seq": 3})


def test_recovery_replays_exactly_the_missed_broadcasts():
    """since=n-k replays the last k broadcasts in order; other cases replay nothing."""
    backend = MemoryBackend(history_size=3)
    backend.start(lambda *args: None)
    for i in range(5):
        backend.publish("a", "e", i)
    epoch = backend.recover("a", None, None).epoch
    answer = backend.recover("a", 3, epoch)
    assert (answer.recovered, answer.seq) == (True, 5)
    assert [seq for seq, _ in answer.frames] == [4, 5]
    assert backend.recover("a", 3, None).recovered is True
    assert backend.recover("a", 1, epoch).recovered is False  # older than the kept history
    assert backend.recover("a", 6, epoch).recovered is False  # from the future
    assert backend.recover("a", 3, "other").recovered is False
    assert backend.recover("a", 5, epoch).frames == []


def test_expired_history_is_not_replayed():
    """Broadcasts older than the history TTL no longer count as recoverable."""
    backend = MemoryBackend(history_ttl=0)
    backend.start(lambda *args: None)
    backend.publish("a", "e", 1)
    assert backend.recover("a", 0, None).recovered is False


def test_empty_channel_keeps_its_epoch_when_recreated():
    """A channel with no broadcast, dropped when its last member left, comes back in the same epoch."""
    backend = MemoryBackend()
    backend.start(lambda *args: None)
    backend.subscribe("a")
    epoch = backend.recover("a", None, None).epoch
    backend.unsubscribe("a")
    backend.subscribe("a")
    assert backend.recover("a", 0, epoch).recovered is True


def test_dropped_history_comes_back_in_a_new_epoch():
    """When an idle channel's history is dropped, seq restarts under another epoch."""
    backend = MemoryBackend(history_ttl=0)
    backend.start(lambda *args: None)
    backend.publish("a", "e", 1)
    old_epoch = backend.recover("a", None, None).epoch
    backend.publish("b", "e", 1)  # publishing sweeps idle histories, "a" among them
    answer = backend.recover("a", None, None)
    assert answer.seq == 0 and answer.epoch != old_epoch
