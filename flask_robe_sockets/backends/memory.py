"""The in-memory backend: one process, nothing else to run.

What it keeps, and what bounds it:

- Per channel, a history: the channel's ``seq`` counter, its epoch and its
  last ``history_size`` broadcasts (ready frames), kept ``history_ttl``
  seconds after the channel was last used.
- In total, at most ``history_max_bytes`` of history, estimated as the frame
  bytes plus ``ENTRY_BYTES`` per kept broadcast and ``CHANNEL_BYTES`` (plus
  the name) per channel, what CPython really allocates for them: so a flood
  of channels with one tiny broadcast each is bounded as surely as a few
  large ones. Past it, the least recently used histories go first. A
  channel whose history was dropped comes back under a new epoch, so a
  returning client gets ``recovered: false``, never a wrong replay. A
  channel this worker's clients are subscribed to keeps its ``seq`` and
  epoch (its subscribers go on counting); only its broadcasts are dropped.
- Used ticket nonces, until their ticket expires.

Publishing is O(1) amortised: histories are kept in least-recently-used
order, so expiry and eviction only ever look at the oldest one. Expired
histories are also swept once a second by one timer per process (a greenlet
under gevent, a daemon thread otherwise), which holds no reference to the
backends it sweeps and never keeps a process alive.

Several processes on this backend do not share anything: each accepts every
ticket once and hears only its own broadcasts. Each serving process
therefore registers in a small directory of the temp dir, keyed by its
parent's PID (a gunicorn worker's parent is its master), with a file it
keeps locked while it lives; a process that finds a live sibling there logs
a warning naming the fix. It registers when it first takes a ticket or a
subscriber (or when it starts, under gevent), so that with gunicorn's
``--preload`` the master, which imports the app but serves nothing, stays
out of it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any, Callable

import gevent
from gevent import monkey

from .. import protocol
from ..frames import ws_frame
from .base import Backend, Deliver, OnControl, Recovery

try:
    import fcntl
except ImportError:  # not on POSIX: no registry, no warning
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("flask_robe_sockets")

#: Estimated bytes a channel's history costs besides its name and
#: broadcasts: the history object, its deque and the two dict entries that
#: find it (measured with tracemalloc on CPython 3.11: about 940).
CHANNEL_BYTES = 1024
#: Estimated bytes per kept broadcast besides its frame: the
#: ``(seq, time, frame)`` tuple, its number, its time and the bytes object's
#: header (measured: about 160).
ENTRY_BYTES = 176
#: Seconds between two sweeps of the process's timer.
SWEEP_INTERVAL = 1.0
#: Longest wait, in seconds, between two looks for sibling workers; the
#: first looks come one, two, four... seconds after a process registered.
SIBLING_CHECK_CAP = 64.0


class _History:
    """A channel's ``seq`` counter and its last broadcasts."""

    __slots__ = ("epoch", "seq", "frames", "touched", "size")

    def __init__(self, epoch: str, size: int) -> None:
        self.epoch = epoch
        self.seq = 0
        #: ``(seq, time, frame)`` triples, oldest first.
        self.frames: deque[tuple[int, float, bytes]] = deque()
        self.touched = time.monotonic()
        #: Estimated bytes, counted in ``MemoryBackend.history_bytes``.
        self.size = size

    def drop_frames(self) -> int:
        """Forget every kept broadcast (``seq`` and epoch stay); return the bytes freed."""
        freed = sum(ENTRY_BYTES + len(frame) for _, _, frame in self.frames)
        self.frames.clear()
        self.size -= freed
        return freed


class MemoryBackend(Backend):
    """Everything in this process: the embedded default, one worker only.

    Broadcasts go straight to the local hub; nothing reaches other
    processes, so run a single worker (or use Redis). See the module
    docstring for what is kept and what bounds it.

    :param history_size: broadcasts kept per channel for recovery (100).
    :param history_ttl: seconds a channel's history is kept after its last
        use, and a broadcast stays recoverable (300).
    :param history_max_bytes: estimated bytes of history kept over all
        channels (64 MiB); the least recently used histories are dropped
        past it (``None``: no bound). Each channel costs about 1 KiB besides
        its broadcasts, so the default holds some 50,000 channels with one
        small broadcast, or some 2,000 with 100 broadcasts of 150 B.
    """

    def __init__(
        self,
        history_size: int = 100,
        history_ttl: float = 300,
        history_max_bytes: int | None = 64 * 1024 * 1024,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.history_max_bytes = float("inf") if history_max_bytes is None else history_max_bytes
        #: Every history, by channel name.
        self._histories: dict[str, _History] = {}
        #: The histories that can be dropped, least recently used first:
        #: every channel without local members, and those with members that
        #: have broadcasts to lose. A member channel without broadcasts has
        #: nothing to give back and stays out, so no walk passes over it.
        self._lru: OrderedDict[str, _History] = OrderedDict()
        self._bytes = 0
        #: Used nonces and when they expire, in the order they were claimed.
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._members: set[str] = set()
        self._deliver: Deliver | None = None
        self._on_control: OnControl | None = None
        # Epochs are "<process token>.<generation>". The generation moves on
        # whenever a history that had broadcasts is dropped, so a channel
        # whose seq starts again from 1 comes back under a new epoch. An
        # empty channel dropped and recreated usually keeps the epoch its
        # clients saw (they missed nothing): unless, the generation being
        # process-wide, some other history was dropped in between.
        self._token = secrets.token_urlsafe(6)
        self._generation = 0
        self._epoch = f"{self._token}.0"
        # Held only for pure bookkeeping, never around a call out: the
        # timer thread (or, under ``flask run``, request threads) must not
        # see the dicts half changed. Made again after a fork.
        self._lock = threading.Lock()
        #: The PID this backend last started its timer in (0: none yet), and
        #: the one it was made in.
        self._pid = 0
        self._origin = os.getpid()
        #: Presence: each channel's members (by id), and the version of the
        #: last join or leave, one count for every channel: a channel's
        #: versions only rise, even once it emptied and is gone.
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._presence_version = 0
        #: Presence events not handed over yet: a leave announced while
        #: one is handed over (a member closed as slow) waits its turn, so
        #: every member sees them in version order.
        self._presence_events: deque[tuple[str, int, str, dict[str, Any]]] = deque()
        self._announcing = False
        # Held around a join or leave and its delivery, so that with threads
        # (``flask run``) each is seen whole, in version order, as with
        # greenlets; re-entrant for a leave its own delivery causes.
        self._presence_lock = threading.RLock()

    @property
    def histories(self) -> int:
        """How many channels have a history here."""
        return len(self._histories)

    @property
    def history_bytes(self) -> int:
        """Estimated bytes of all histories, bounded by ``history_max_bytes``
        (channels with local members may keep their bare counters past it)."""
        return self._bytes

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        if monkey.is_module_patched("socket"):
            # A gevent worker that imported the app itself (no --preload):
            # it serves from now on, so it registers at start-up.
            self._activate(serving=True)

    def _activate(self, serving: bool) -> None:
        """Start sweeping in this process; register it if it serves clients."""
        if self._pid != _pid:
            if self._pid:
                # Used before a fork: the lock copied with it may be held by
                # a thread that does not exist in this process.
                self._lock = threading.Lock()
            if self._origin != _pid:
                self._start_afresh()
            self._pid = _pid
            _process.watch(self)
        if serving:
            _process.register()

    def _start_afresh(self) -> None:
        """In a process forked from the one that made this backend (gunicorn's
        ``--preload``): nothing of the parent's counts here, and the epochs
        are this process's own. With the parent's token, a worker the master
        started again would reuse its predecessor's epochs, and a client of
        the old worker would be sent the new one's broadcasts as a replay."""
        self._histories.clear()
        self._lru.clear()
        self._bytes = 0
        self._nonces.clear()
        self._token = secrets.token_urlsafe(6)
        self._generation = 0
        self._epoch = f"{self._token}.0"

    # -- histories -------------------------------------------------------

    def _create(self, channel: str) -> _History:
        history = self._histories[channel] = _History(self._epoch, CHANNEL_BYTES + len(channel))
        self._bytes += history.size
        return history

    def _touch(self, channel: str, history: _History, now: float) -> None:
        """Mark ``history`` as just used: it goes to the end of the LRU order."""
        history.touched = now
        self._lru[channel] = history
        self._lru.move_to_end(channel)

    def _drop(self, channel: str, history: _History) -> None:
        """Forget what ``history`` holds; it is no longer in ``_lru``."""
        if channel in self._members:
            self._bytes -= history.drop_frames()
            return
        del self._histories[channel]
        self._bytes -= history.size
        if history.seq:
            self._generation += 1
            self._epoch = f"{self._token}.{self._generation}"

    def _expire(self, now: float) -> None:
        """Drop histories unused for ``history_ttl``: they are the oldest ones."""
        lru = self._lru
        while lru:
            channel, history = next(iter(lru.items()))
            if now - history.touched <= self.history_ttl:
                break
            del lru[channel]
            self._drop(channel, history)

    def _evict(self) -> None:
        """Drop the least recently used histories until the total fits."""
        lru = self._lru
        while self._bytes > self.history_max_bytes and lru:
            self._drop(*lru.popitem(last=False))

    def publish(self, channel: str, event: str, data: Any) -> int:
        if self._pid != _pid:
            self._activate(serving=False)
        with self._lock:
            history = self._histories.get(channel)
            seq = (history.seq if history is not None else 0) + 1
            # Encoded before anything changes: data that is not JSON raises here.
            frame = ws_frame(protocol.encode(event, data, channel, seq=seq))
            if history is None:
                history = self._create(channel)
            history.seq = seq
            now = time.monotonic()
            if self.history_size > 0:
                frames = history.frames
                if len(frames) >= self.history_size:
                    freed = ENTRY_BYTES + len(frames.popleft()[2])
                    history.size -= freed
                    self._bytes -= freed
                frames.append((seq, now, frame))
                cost = ENTRY_BYTES + len(frame)
                history.size += cost
                self._bytes += cost
            self._touch(channel, history, now)
            self._expire(now)
            if self._bytes > self.history_max_bytes:
                self._evict()
        if self._deliver is not None:
            self._deliver(channel, seq, frame)
        return seq

    def subscribe(self, channel: str) -> None:
        if self._pid != _pid or not _process.registered:
            self._activate(serving=True)
        with self._lock:
            self._members.add(channel)
            history = self._histories.get(channel)
            if history is not None:
                if history.frames:
                    self._touch(channel, history, time.monotonic())
                else:
                    self._lru.pop(channel, None)

    def unsubscribe(self, channel: str) -> None:
        with self._lock:
            self._members.discard(channel)
            history = self._histories.get(channel)
            if history is None:
                return
            if history.seq == 0:
                del self._histories[channel]
                self._lru.pop(channel, None)
                self._bytes -= history.size
            else:
                # Kept for clients that come back: from now on it can go.
                self._touch(channel, history, time.monotonic())

    def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        if self._pid != _pid:
            self._activate(serving=False)
        with self._lock:
            now = time.monotonic()
            history = self._histories.get(channel)
            if history is None:
                history = self._create(channel)
            if channel not in self._members or history.frames:
                self._touch(channel, history, now)
            if self._bytes > self.history_max_bytes:
                self._evict()
            answer = Recovery(False, history.seq, history.epoch)
            if since is None or (epoch is not None and epoch != history.epoch):
                return answer
            if since > history.seq:
                return answer
            cutoff = now - self.history_ttl
            missed = [(seq, frame) for seq, stamp, frame in history.frames if seq > since and stamp >= cutoff]
            if len(missed) == history.seq - since:
                answer.recovered = True
                answer.frames = missed
        return answer

    # -- presence --------------------------------------------------------

    def presence_join(
        self, channel: str, member: dict[str, Any], worker_id: str, snapshot: bool = True
    ) -> tuple[int, list[dict[str, Any]] | None]:
        with self._presence_lock:
            members = self._presence.setdefault(channel, {})
            self._presence_version += 1
            version = self._presence_version
            members[member["id"]] = member
            listed = list(members.values()) if snapshot else None
            self._announce_presence(channel, version, protocol.JOIN, member)
        return version, listed

    def presence_leave(self, channel: str, member_id: str, worker_id: str) -> None:
        with self._presence_lock:
            members = self._presence.get(channel)
            if members is None or member_id not in members:
                return
            member = members.pop(member_id)
            self._presence_version += 1
            version = self._presence_version
            if not members:
                del self._presence[channel]
            self._announce_presence(channel, version, protocol.LEAVE, member)

    def presence(self, channel: str) -> list[dict[str, Any]]:
        with self._presence_lock:
            return list(self._presence.get(channel, {}).values())

    def _announce_presence(self, channel: str, version: int, event: str, member: dict[str, Any]) -> None:
        self._presence_events.append((channel, version, event, member))
        if self._announcing:
            return
        self._announcing = True
        try:
            while self._presence_events:
                channel, version, event, member = self._presence_events.popleft()
                on_event = getattr(self, "_on_presence", None)
                if on_event is None:
                    continue
                frame = ws_frame(protocol.encode(event, member, channel))
                try:
                    on_event(channel, version, event, member, frame)
                except Exception:
                    log.exception("delivering %s of %s on %r failed", event, member.get("id"), channel)
        finally:
            self._announcing = False

    # -- tickets ---------------------------------------------------------

    def claim_nonce(self, nonce: str, ttl: float) -> bool:
        if self._pid != _pid or not _process.registered:
            self._activate(serving=True)
        with self._lock:
            now = time.monotonic()
            self._expire_nonces(now)
            expires = self._nonces.get(nonce)
            if expires is not None and expires > now:
                return False
            self._nonces[nonce] = now + ttl
            self._nonces.move_to_end(nonce)
            return True

    def _expire_nonces(self, now: float) -> None:
        # Claimed in order with one lifetime (the ticket's), so they expire
        # in order: the oldest are at the front.
        nonces = self._nonces
        while nonces and next(iter(nonces.values())) <= now:
            nonces.popitem(last=False)

    # -- the application's commands ---------------------------------------

    def control(self, command: dict[str, Any]) -> None:
        # Applied at once, in the caller's own thread: the one process is
        # every worker there is. Through JSON, as Redis carries it, so that
        # both backends hand over the same values.
        if self._on_control is not None:
            self._on_control(json.loads(json.dumps(command, allow_nan=False)))

    def listen_control(self, on_control: OnControl) -> None:
        self._on_control = on_control

    # -- housekeeping ----------------------------------------------------

    def sweep(self) -> None:
        """Drop expired histories and nonces; the process's timer calls it
        every ``SWEEP_INTERVAL`` seconds, so nothing waits for a publish."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            self._expire_nonces(now)

    def close(self) -> None:
        _process.forget(self)


class _Registry:
    """The processes of one parent that serve on this backend.

    One empty file per process, ``<parent pid>-<pid>``, which the process
    keeps locked (``flock``) while it lives: the kernel releases the lock
    when it dies, however it dies, so a file that can be locked is stale.
    """

    def __init__(self, directory: str, group: int, pid: int) -> None:
        self.directory = directory
        self.prefix = f"{group}-"
        self.pid = pid
        self._fd: int | None = None

    def join(self) -> bool:
        """Register this process; ``False`` when the directory cannot be trusted."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            log.debug("not using %s to find sibling workers: not a private directory", self.directory)
            return False
        self._clean(everything=True)
        path = os.path.join(self.directory, f"{self.prefix}{self.pid}")
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sibling may have found the file stale and unlinked it
                # just before we locked it: then lock a new one.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._fd = fd
                    return True
            except OSError:
                pass
            os.close(fd)
        return False

    def others(self) -> list[int]:
        """PIDs of this parent's other live registered processes."""
        return self._clean(everything=False)

    def _clean(self, everything: bool) -> list[int]:
        """Unlink stale files (this group's, or all); return the live siblings."""
        alive = []
        for name in os.listdir(self.directory):
            pid = name.partition("-")[2]
            ours = name.startswith(self.prefix)
            if not pid.isdigit() or not (ours or everything) or (ours and int(pid) == self.pid):
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if ours:
                    alive.append(int(pid))
            except OSError:
                pass
            else:
                os.unlink(path)
            finally:
                os.close(fd)
        return sorted(alive)

    def abandon(self) -> None:
        """In a forked child: the lock is the parent's, not ours to keep."""
        if self._fd is not None:
            os.close(self._fd)  # the parent's copy keeps the lock
            self._fd = None


class _Process:
    """What the memory backends of one process share: the sweep timer, and
    the registration that finds sibling workers."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._backends: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()
        self._timer = False
        self._registry: _Registry | None = None
        self.registered = False
        self._warned = False
        self._next_check = 0.0
        self._check_every = 1.0

    def watch(self, backend: MemoryBackend) -> None:
        """Sweep ``backend`` on this process's timer, started on first need."""
        with self._lock:
            self._backends.add(backend)
            if self._timer:
                return
            self._timer = True
        if monkey.is_module_patched("socket"):
            gevent.spawn_raw(self._run, gevent.sleep)
        else:
            # A daemon thread: it never keeps the interpreter alive.
            thread = threading.Thread(
                target=self._run, args=(threading.Event().wait,),
                name="flask-robe-sockets memory sweeper", daemon=True,
            )
            thread.start()

    def forget(self, backend: MemoryBackend) -> None:
        with self._lock:
            self._backends.discard(backend)

    def _run(self, sleep: Callable[[float], Any]) -> None:
        # Holds the backends only weakly, and only during a sweep: an app
        # that is gone is not kept alive by its timer.
        while self is _process:
            sleep(SWEEP_INTERVAL)
            if self is not _process:
                return  # forked: the child starts a timer of its own
            with self._lock:
                backends = list(self._backends)
                if not backends:  # all closed or collected: the next use starts another
                    self._timer = False
                    return
            for backend in backends:
                try:
                    backend.sweep()
                except Exception:
                    log.exception("sweeping the memory backend's histories failed")
            del backends
            self.check_siblings()

    def register(self) -> None:
        """Register this process as serving, and look for siblings at once."""
        with self._lock:
            if self.registered:
                return
            self.registered = True
            if fcntl is None:
                return
            directory = os.path.join(tempfile.gettempdir(), f"flask-robe-sockets-{os.getuid()}")
            registry = _Registry(directory, os.getppid(), self.pid)
            try:
                if not registry.join():
                    return
            except OSError as exc:
                log.debug("cannot register to find sibling workers in %s: %s", directory, exc)
                return
            self._registry = registry
        self.check_siblings(force=True)

    def check_siblings(self, force: bool = False) -> None:
        """Warn once if another process of the same parent serves on this backend."""
        registry = self._registry
        if registry is None or self._warned:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._check_every
        self._check_every = min(self._check_every * 2, SIBLING_CHECK_CAP)
        try:
            others = registry.others()
        except OSError as exc:
            log.debug("cannot look for sibling workers: %s", exc)
            return
        if others and not self._warned:
            self._warned = True
            log.warning(
                "process %d serves sockets on the in-memory backend (memory://), and so"
                " does %s of the same parent (pid %d): nothing is shared between them, so each"
                " accepts every ticket once (a used ticket can be replayed on another) and a"
                " broadcast reaches only the clients of the process that sent it. Set"
                " ROBE_SOCKETS_REDIS_URL so that all workers share one Redis, or run one worker"
                " (gunicorn -w 1).",
                self.pid,
                ("process " if len(others) == 1 else "processes ") + ", ".join(map(str, others)),
                os.getppid(),
            )

    def abandon(self) -> None:
        if self._registry is not None:
            self._registry.abandon()


_process = _Process()
#: This process's PID, kept current across forks without a system call per publish.
_pid = _process.pid


def _after_fork_in_child() -> None:
    global _process, _pid
    _process.abandon()
    _process = _Process()
    _pid = _process.pid


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
