"""The in-memory backend's numbering, history and epochs, without sockets."""
import json

import pytest

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


# -- bounded history --------------------------------------------------------


def started(**options) -> MemoryBackend:
    backend = MemoryBackend(**options)
    backend.start(lambda *args: None)
    return backend


def one_channel_cost(name: str, data) -> int:
    """The estimated bytes of a channel holding one broadcast of ``data``."""
    probe = started()
    probe.publish(name, "e", data)
    return probe.history_bytes


def test_history_bytes_stay_under_the_limit_with_many_tiny_channels():
    """Thousands of channels with one tiny broadcast each never hold more than the limit."""
    backend = started(history_max_bytes=100_000)
    for i in range(20_000):
        backend.publish(f"user:{i}", "mention", None)
        assert backend.history_bytes <= 100_000
    cost = one_channel_cost("user:19999", None)
    # Full, not emptied: the newest channels are all there.
    assert 100_000 // cost - 1 <= backend.histories <= 100_000 // cost
    assert backend.recover("user:19999", 0, None).recovered is True


def test_estimate_covers_what_python_really_allocates():
    """The per-channel and per-broadcast estimates are not below the memory really held."""
    import gc
    import tracemalloc

    backend = started(history_max_bytes=10**9)
    names = [f"room:{i:06d}" for i in range(5_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:
            for n in range(3):
                backend.publish(name, "message", {"n": n, "text": "x" * 40})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= backend.history_bytes
    assert backend.history_bytes <= 1.5 * held  # an estimate, not a wild guess


def test_least_recently_used_history_goes_first():
    """Past the limit the history used longest ago is dropped; a recent use keeps one."""
    cost = one_channel_cost("a", 1)
    backend = started(history_max_bytes=3 * cost)
    for name in "abc":
        backend.publish(name, "e", 1)
    backend.recover("a", None, None)  # a client looked at "a": now "b" is the oldest
    backend.publish("d", "e", 1)
    assert backend.recover("a", 0, None).recovered is True
    assert backend.recover("b", None, None).seq == 0
    assert backend.recover("c", 0, None).recovered is True
    assert backend.recover("d", 0, None).recovered is True


def test_evicted_channel_comes_back_in_a_new_epoch():
    """A client coming back to an evicted channel gets recovered: false and another epoch, no replay."""
    cost = one_channel_cost("kept", 1)
    backend = started(history_max_bytes=4 * cost)
    backend.publish("kept", "e", 1)
    backend.publish("kept", "e", 2)
    seen = backend.recover("kept", None, None)
    assert (seen.seq, backend.recover("kept", 1, seen.epoch).recovered) == (2, True)
    for i in range(10):
        backend.publish(f"flood:{i}", "e", 1)
    backend.publish("kept", "e", "after")  # seq starts again: 1, as the first ever broadcast
    answer = backend.recover("kept", 2, seen.epoch)
    assert answer.recovered is False and answer.frames == []
    assert answer.epoch != seen.epoch and answer.seq == 1
    # Even a since that happens to fit the new seq replays nothing across epochs.
    assert backend.recover("kept", 0, seen.epoch).recovered is False


def test_subscribed_channel_keeps_counting_when_its_history_is_dropped():
    """A channel with local members keeps its seq and epoch; only its broadcasts go."""
    cost = one_channel_cost("live", 1)
    backend = started(history_max_bytes=3 * cost)
    backend.subscribe("live")
    first = backend.recover("live", None, None)
    backend.publish("live", "e", 1)
    for i in range(10):
        backend.publish(f"flood:{i}", "e", 1)
    assert backend.history_bytes <= 3 * cost
    answer = backend.recover("live", 0, first.epoch)
    assert (answer.recovered, answer.seq, answer.epoch) == (False, 1, first.epoch)
    assert backend.publish("live", "e", 2) == 2
    assert backend.recover("live", 1, first.epoch).recovered is True


def test_history_size_replaces_the_oldest_broadcast_and_its_bytes():
    """A full channel history drops its oldest broadcast per publish; the byte count follows."""
    backend = started(history_size=2)
    backend.publish("a", "e", "x")
    two = (backend.publish("a", "e", "x"), backend.history_bytes)[1]
    for _ in range(5):
        backend.publish("a", "e", "x")
    assert backend.history_bytes == two
    assert [seq for seq, _ in backend.recover("a", 5, None).frames] == [6, 7]


def test_unsubscribed_empty_channel_gives_its_bytes_back():
    """Joining and leaving a channel without broadcasts leaves no bytes counted."""
    backend = started()
    for i in range(100):
        backend.subscribe(f"c{i}")
        backend.recover(f"c{i}", None, None)
        backend.unsubscribe(f"c{i}")
    assert (backend.histories, backend.history_bytes) == (0, 0)


def test_timer_sweeps_expired_histories_without_a_publish():
    """Expired histories and nonces go on the timer, with nothing published meanwhile."""
    from .servers import wait_until

    backend = started(history_ttl=0.2)
    backend.publish("idle", "e", 1)
    backend.claim_nonce("n", 0.2)
    assert backend.histories == 1
    wait_until(lambda: backend.histories == 0 and backend.history_bytes == 0, 10, 0.05, "the sweep")
    assert len(backend._nonces) == 0


def test_timer_holds_no_backend_alive():
    """A backend nobody references any more is collected: the timer keeps only weak references."""
    import gc
    import weakref

    backend = started()
    backend.publish("a", "e", 1)
    ref = weakref.ref(backend)
    del backend
    gc.collect()
    assert ref() is None


def test_threads_publishing_while_the_timer_sweeps_keep_exact_counts():
    """Under flask run's threads (and the timer's), seq stays unique and the bytes balance to 0."""
    import sys
    import threading

    from .servers import wait_until

    backend = started(history_ttl=0.05, history_max_bytes=50_000)
    seqs: list[int] = []

    def publisher(k: int) -> None:
        for i in range(3_000):
            seqs.append(backend.publish("shared", "e", i))
            backend.publish(f"own:{k}:{i}", "e", i)

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often, as races need
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert sorted(seqs) == list(range(1, 12_001))
    wait_until(lambda: backend.histories == 0, 10, 0.05, "the sweep")
    assert backend.history_bytes == 0


@pytest.mark.parametrize("patched", [False, True], ids=["threads", "gevent"])
def test_timer_never_keeps_a_process_alive(patched):
    """A script that used the backend exits at once, its sweeper (thread or greenlet) running."""
    import subprocess
    import sys

    script = (
        ("from gevent import monkey; monkey.patch_all()\n" if patched else "")
        + "from flask_robe_sockets.backends import memory\n"
        "backend = memory.MemoryBackend(); backend.start(lambda *a: None)\n"
        "backend.publish('a', 'e', 1); backend.claim_nonce('n', 30)\n"
        "assert memory._process._timer\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=20, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_forked_worker_numbers_under_epochs_of_its_own():
    """A backend made before a fork (gunicorn --preload) starts afresh in each child, in a new epoch."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from flask_robe_sockets.backends.memory import MemoryBackend\n"
        "backend = MemoryBackend(); backend.start(lambda *a: None)\n"
        "epochs = []\n"
        "for _ in range(2):\n"  # two workers one after the other, as after a restart
        "    read, write = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        seq = backend.publish('chat', 'e', 1)\n"
        "        os.write(write, f\"{seq} {backend.recover('chat', None, None).epoch}\".encode())\n"
        "        os._exit(0)\n"
        "    os.close(write); epochs.append(os.read(read, 100).decode()); os.waitpid(pid, 0)\n"
        "print(*epochs, sep='\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=20, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = [line.split() for line in done.stdout.splitlines()]
    assert first[0] == second[0] == "1"
    assert first[1] != second[1]
