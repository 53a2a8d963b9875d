"""Measuring what an attack costs a live gunicorn worker.

The worker's CPU and memory are read from ``/proc`` (not from wall time, so
that a busy test machine does not pass for a busy worker), and an honest
client on the same worker measures the round trip of ``@ping`` to
``@pong`` while the attack runs. Everything here has a bounded timeout.
"""
from __future__ import annotations

import json
import os
import threading
import time

from websockets.sync.client import connect

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def worker_pid(srv) -> int:
    """PID of the gunicorn worker serving ``srv`` (one worker: ``/stats`` says which)."""
    return int(srv.stats()["pid"])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces: fields are counted after its ')'.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def rss_bytes(pid: int) -> int:
    """Resident memory of the process in bytes."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class CpuMeter:
    """CPU the process used over a span, as a fraction of one core.

    ``with CpuMeter(pid) as meter: ...`` then ``meter.fraction``; or
    ``start()`` / ``stop()``. ``seconds`` and ``wall`` hold the two sides.
    The resolution is one clock tick (10 ms), so spans should last seconds.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = self.wall = 0.0
        self._cpu = self._started = None

    def start(self) -> "CpuMeter":
        self._cpu, self._started = cpu_seconds(self.pid), time.monotonic()
        return self

    def stop(self) -> float:
        self.seconds = cpu_seconds(self.pid) - self._cpu
        self.wall = time.monotonic() - self._started
        return self.fraction

    @property
    def fraction(self) -> float:
        return self.seconds / self.wall if self.wall else 0.0

    def __enter__(self) -> "CpuMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def drained(pid: int, idle_fraction: float = 0.05, within: float = 1.0, window: float = 0.2) -> bool:
    """Whether the worker falls idle within ``within`` seconds.

    Idle: one ``window`` in which it used at most ``idle_fraction`` of a
    core. A worker still parsing an attacker's backlog stays busy past it.
    """
    deadline = time.monotonic() + within
    while True:
        with CpuMeter(pid) as meter:
            time.sleep(window)
        if meter.fraction <= idle_fraction:
            return True
        if time.monotonic() + window > deadline:
            return False


def percentile(values, fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("inf")
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


class Honest:
    """An independent client pinging the server while a test attacks it.

    A thread with the ``websockets`` sync client sends
    ``{"event": "@ping", "ref": n}`` every ``interval`` seconds (keep its
    rate within the server's limits) and times each answer. ``rtts`` holds
    the round trips in seconds; ``lost`` counts pings not answered within
    ``timeout``; ``error`` holds what ended the connection early, if
    anything, and leaving the ``with`` block raises it as an
    ``AssertionError`` (unless ``strict=False``). With ``channel`` it
    subscribes there first, so it is also a member while the attack runs.
    """

    def __init__(self, srv, interval: float = 0.05, channel: str | None = None,
                 timeout: float = 5.0, strict: bool = True) -> None:
        self.srv, self.interval, self.channel = srv, interval, channel
        self.timeout, self.strict = timeout, strict
        self.rtts: list[float] = []
        self.lost = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="honest-client", daemon=True)

    def __enter__(self) -> "Honest":
        self._thread.start()
        if not self._ready.wait(10):
            self._stop.set()
            raise AssertionError(f"the honest client could not connect: {self.error!r}")
        if self.error is not None:
            raise AssertionError(f"the honest client could not connect: {self.error!r}")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        if exc_type is None and self.strict and self.error is not None:
            raise AssertionError(f"the honest client's connection failed: {self.error!r}")

    def p99(self) -> float:
        return percentile(self.rtts, 0.99)

    def max(self) -> float:
        return max(self.rtts, default=float("inf"))

    def summary(self) -> str:
        return (f"honest: {len(self.rtts)} pings, p99 {self.p99() * 1000:.1f} ms, "
                f"max {self.max() * 1000:.1f} ms, lost {self.lost}, error {self.error!r}")

    def _run(self) -> None:
        try:
            url = f"{self.srv.ws_url}?ticket={self.srv.ticket()}"
            with connect(url, open_timeout=5, close_timeout=2, max_size=None) as ws:
                hello = json.loads(ws.recv(timeout=5))
                assert hello["event"] == "@connected", hello
                if self.channel is not None:
                    ws.send(json.dumps({"channel": self.channel, "event": "@subscribe", "ref": "s"}))
                    self._await(ws, lambda f: f.get("ref") == "s", 5)
                self._ready.set()
                self._pings(ws)
        except BaseException as exc:  # recorded; raised in the test's thread on exit
            self.error = exc
        finally:
            self._ready.set()

    def _pings(self, ws) -> None:
        ref, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            ref += 1
            sent = time.monotonic()
            ws.send(json.dumps({"event": "@ping", "ref": ref}))
            if self._await(ws, lambda f: f.get("event") == "@pong" and f.get("ref") == ref, self.timeout):
                self.rtts.append(time.monotonic() - sent)
            else:
                self.lost += 1
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    @staticmethod
    def _await(ws, match, timeout: float) -> bool:
        """Read frames until one matches; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                frame = json.loads(ws.recv(timeout=left))
            except TimeoutError:
                return False
            if match(frame):
                return True
