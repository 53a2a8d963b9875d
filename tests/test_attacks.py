"""Attacks on one gunicorn gevent worker, measured from outside (PROTOCOL.md section 5).

Each test runs an attacker beside an honest client on the same worker
(one worker), and measures what the attack costs: the worker's CPU from
``/proc`` (not wall time: the machine is shared), its RSS, and the honest
client's ``@ping`` round trips. The attackers are cheap on purpose: they
send buffers built beforehand and read what comes back, all in one
``select`` loop, so that they do not take the CPU the worker needs.

The bounds follow from the protocol's limits, read from the config:

- every frame is counted before it is parsed, so a flood of frames that
  carry nothing is closed after ``ROBE_SOCKETS_MAX_FRAGMENTS`` fragments or
  after the frame rate's burst, within ``CLOSE_WITHIN`` seconds;
- what a closing connection still sends is discarded unparsed, so the
  worker is idle again within a second of the attacker stopping, and a
  SIGTERM does not wait for a backlog;
- the work per frame is linear in its size, so frames chosen to be the
  dearest to parse, sent at the full rates, cost at most a quarter of
  a core;
- the send queue is bounded in bytes, so clients that never read cost at
  most their queues.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from flask_robe_sockets.config import DEFAULTS

from .attack import CpuMeter, Honest, drained, rss_bytes, worker_pid
from .rawws import CLOSE, CONTINUATION, PING, TEXT, RawWebSocket, build_frame, repeat_frames
from .servers import Gunicorn

#: Attackers connect without tickets (tickets are not what is attacked here,
#: and twenty of them would meet the ticket rate limit); the honest client
#: still takes one.
CONFIG = {"ROBE_SOCKETS_TICKETS_REQUIRED": False}

#: Seconds within which a flooding connection must get its close frame.
CLOSE_WITHIN = 2.0
#: Seconds a flood goes on: attackers ignore the close frame and keep sending
#: until the server cuts them. Shorter than the default CLOSE_TIMEOUT, so a
#: server that reads a closing connection until that timeout is seen doing it.
FLOOD_SECONDS = 4.0
#: The honest client's round trip, 99th percentile.
HONEST_P99 = 0.050
#: On a shared machine a round trip can be slow for reasons of its own: a
#: second honest client, on an idle server at the same moment, measures that.
#: The honest client beside the attacker may exceed HONEST_P99 only by what
#: the machine alone cost the reference, plus this margin.
HONEST_MARGIN = 0.020
#: Seconds after the attacker stops within which the worker must fall idle.
DRAIN_WITHIN = 1.0
#: Seconds a SIGTERM may take with the attackers' sockets still open.
SIGTERM_WITHIN = 3.0
#: The worker's CPU over a flood, as a fraction of one core. Discarding is a
#: ``recv`` and nothing else, but the attackers keep sending as fast as
#: loopback takes it, and the kernel's copying is charged to the worker.
FLOOD_CPU = 0.5
MiB = 1024 * 1024


def settings(config: dict) -> dict:
    return {**DEFAULTS, **config}


# -- attackers ---------------------------------------------------------------


class Endless:
    """A buffer of whole frames, sent over and over as fast as the socket takes it."""

    def __init__(self, stream: bytes) -> None:
        self.view, self.pos = memoryview(stream), 0

    def pending(self, now: float):
        return self.view[self.pos:self.pos + 256 * 1024]

    def consumed(self, count: int) -> None:
        self.pos = (self.pos + count) % len(self.view)

    def wake_at(self) -> float | None:
        return None


class Paced:
    """Frames ``make(n)`` (n = 1, 2, ...) sent within a byte budget and a frame budget.

    Each budget is a burst at once, then a rate a second, as the server's
    limits are: ``byte_rate=(rate, burst)``, ``frame_rate=(rate, burst)``
    (``None``: no frame budget). The attacker sends as much as the limits allow, and
    no more. A frame goes out whole once both budgets cover it.
    """

    def __init__(self, make, byte_rate: tuple, frame_rate: tuple | None = None,
                 count: int | None = None) -> None:
        self.make, self.count = make, count
        self.byte_budget, self.frame_budget = byte_rate, frame_rate
        self.started = time.monotonic()
        self.budgeted = 0  # bytes of the frames taken so far
        self.frames = 0
        self.current, self.pos = None, 0
        self._next = make(1)

    def pending(self, now: float):
        if self.current is not None and self.pos < len(self.current):
            return self.current[self.pos:]
        if self.count is not None and self.frames >= self.count:
            return None
        if self.wake_at() > now:
            return None
        self.current, self.pos = memoryview(self._next), 0
        self.budgeted += len(self._next)
        self.frames += 1
        self._next = self.make(self.frames + 1)
        return self.current

    def consumed(self, count: int) -> None:
        self.pos += count

    def wake_at(self) -> float | None:
        """When the budgets cover the next frame (None: one is being sent)."""
        if self.current is not None and self.pos < len(self.current):
            return None
        if self.count is not None and self.frames >= self.count:
            return float("inf")
        rate, burst = self.byte_budget
        at = self.started + (self.budgeted + len(self._next) - burst) / rate
        if self.frame_budget is not None:
            rate, burst = self.frame_budget
            at = max(at, self.started + (self.frames + 1 - burst) / rate)
        return at

    def count_within(self, wire: int, seconds: float) -> int:
        """Frames of ``wire`` bytes the budgets allow over ``seconds``."""
        rate, burst = self.byte_budget
        count = (burst + rate * seconds) // wire
        if self.frame_budget is not None:
            rate, burst = self.frame_budget
            count = min(count, burst + rate * seconds)
        return int(count)


@dataclass
class Attacker:
    ws: RawWebSocket
    source: object = None  # Endless or Paced; None: sends nothing more
    reading: bool = True
    sent: int = 0
    close_code: int | None = None
    closed_after: float | None = None  # seconds from the flood's start to the close frame
    eof_after: float | None = None  # ... to the server's end of the stream (FIN or reset)
    ended_after: float | None = None  # ... to the end of the connection, both ways
    answers: list = field(default_factory=list)  # the JSON frames received


def open_attacker(srv, rcvbuf: int | None = None) -> Attacker:
    ws = RawWebSocket(srv.ws_url, rcvbuf=rcvbuf)
    try:
        ws.connected()
    except BaseException:
        ws.close()
        raise
    return Attacker(ws)


def flood(attackers: list[Attacker], seconds: float, stop_when=None, poll: float = 0.2) -> float:
    """Run the attackers for ``seconds`` (or until ``stop_when()``); return how long it ran.

    One loop for all of them: each sends what its source has whenever its
    socket takes more, and reads (without waiting) what the server sent,
    noting the close frame and the end of the connection.
    """
    started = time.monotonic()
    deadline = started + seconds
    by_fd = {a.ws.sock.fileno(): a for a in attackers}
    for a in attackers:
        a.ws.sock.setblocking(False)
    checked = started
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if stop_when is not None and now - checked >= poll:
            checked = now
            if stop_when():
                break
        # Connections the server ended stay ended: the flood's window goes
        # on all the same, so that what it costs is measured over all of it.
        live = [a for a in attackers if a.ended_after is None]
        readers = [a.ws.sock for a in live if a.reading]
        writers, wake = [], deadline
        for a in live:
            if a.source is None:
                continue
            if a.source.pending(now) is not None:
                writers.append(a.ws.sock)
            else:
                wake = min(wake, a.source.wake_at() or now)
        timeout = max(0.0, min(wake - now, poll, deadline - now))
        if readers or writers:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        else:
            time.sleep(timeout)
            readable = writable = []
        now = time.monotonic()
        for sock in readable:
            _read(by_fd[sock.fileno()], now - started)
        for sock in writable:
            a = by_fd[sock.fileno()]
            if a.ended_after is not None:
                continue
            chunk = a.source.pending(now)
            if chunk is None:
                continue
            try:
                count = sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                a.ended_after = now - started
                continue
            a.sent += count
            a.source.consumed(count)
    return time.monotonic() - started


def _read(a: Attacker, elapsed: float) -> None:
    alive = a.ws.read_ready()
    while (frame := a.ws.pop_frame()) is not None:
        if frame.opcode == CLOSE and a.close_code is None:
            a.close_code, a.closed_after = frame.close_code, elapsed
        elif frame.opcode == TEXT:
            a.answers.append(frame.json())
    if not alive and a.eof_after is None:
        # The server shut its side: an attacker goes on sending until a
        # send fails, one that sends nothing more is done.
        a.eof_after = elapsed
        a.reading = False
        if a.source is None:
            a.ended_after = elapsed


def read_to_close(a: Attacker, timeout: float = 5.0) -> None:
    """Read everything the server still has for ``a`` until its close frame or the end."""
    deadline = time.monotonic() + timeout
    a.reading = True
    while a.close_code is None and a.eof_after is None and time.monotonic() < deadline:
        if select.select([a.ws.sock], [], [], 0.1)[0]:
            _read(a, -1.0)


def close_all(attackers: list[Attacker]) -> None:
    for a in attackers:
        a.ws.close()


# -- measuring ---------------------------------------------------------------


class Findings:
    """Measurements and failed bounds of one test, all reported at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.numbers: dict[str, object] = {}
        self.failures: list[str] = []

    def note(self, **numbers) -> None:
        self.numbers.update(numbers)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    def assert_ok(self) -> None:
        report = f"{self.name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items())
        print(report)
        if self.failures:
            pytest.fail(report + "\n  " + "\n  ".join(self.failures))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def check_honest(found: Findings, honest: Honest, reference: Honest) -> None:
    """The honest client beside the attacker kept its round trip under
    HONEST_P99, or, on a machine busy with other work, under what the same
    client measured on an idle server meanwhile plus HONEST_MARGIN."""
    bound = max(HONEST_P99, reference.p99() + HONEST_MARGIN)
    found.note(honest_pings=len(honest.rtts), honest_p99_ms=honest.p99() * 1000,
               honest_max_ms=honest.max() * 1000, honest_lost=honest.lost,
               reference_p99_ms=reference.p99() * 1000)
    found.check(honest.error is None, f"the honest client's connection failed: {honest.error!r}")
    found.check(len(honest.rtts) >= 10, f"the honest client got only {len(honest.rtts)} answers")
    found.check(honest.lost == 0, f"{honest.lost} honest pings were not answered within 5 s")
    found.check(honest.p99() < bound,
                f"honest p99 round trip {honest.p99() * 1000:.1f} ms, over {bound * 1000:.0f} ms"
                f" (the idle reference's p99: {reference.p99() * 1000:.1f} ms)")


@pytest.fixture(scope="module")
def reference():
    """An idle server, whose honest client measures what the machine alone costs a round trip."""
    server = Gunicorn(CONFIG)
    yield server
    server.stop()


def check_closed(found: Findings, attackers: list[Attacker], codes: set[int], within: float) -> None:
    closes = [a.closed_after for a in attackers]
    got = sorted({a.close_code for a in attackers}, key=str)
    found.note(close_codes=got, slowest_close_s=max((c for c in closes if c is not None), default=None),
               unclosed=sum(c is None for c in closes))
    found.check(all(a.close_code in codes for a in attackers),
                f"attackers closed with {got}, expected {sorted(codes)}")
    found.check(all(c is not None and c <= within for c in closes),
                f"close frames after {closes} s, expected within {within} s")


# -- the tests ---------------------------------------------------------------


def _frame_flood(make_server, reference, name: str, first: bytes, frame: bytes, count: int, codes: set[int]) -> None:
    """Flood ``count`` connections with ``frame`` (after ``first``); measure, check, report.

    The attackers ignore the close frame and keep sending for the whole
    flood, then stop but keep their sockets open, never answering the close:
    the worker must fall idle within a second all the same (it discards
    what is still buffered), and a SIGTERM must end the server within
    ``SIGTERM_WITHIN`` seconds.
    """
    found = Findings(name)
    srv = make_server(CONFIG)
    pid = worker_pid(srv)
    stream = repeat_frames(frame, 1 * MiB)
    rss_before = rss_bytes(pid)
    attackers: list[Attacker] = []
    try:
        with Honest(srv) as honest, Honest(reference) as ref:
            attackers += [open_attacker(srv) for _ in range(count)]
            for a in attackers:
                if first:
                    a.ws.send_raw(first)
                a.source = Endless(stream)
            ours = sum(os.times()[:2])
            with CpuMeter(pid) as cpu:
                wall = flood(attackers, FLOOD_SECONDS)
            ours = (sum(os.times()[:2]) - ours) / wall
            for a in attackers:  # they stop sending; their sockets stay open
                a.source = None
            with CpuMeter(pid) as after:
                idle = drained(pid, within=DRAIN_WITHIN)
            rss_after = rss_bytes(pid)
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        try:
            srv.proc.wait(SIGTERM_WITHIN + 15)
        except subprocess.TimeoutExpired:
            pass
        stopped = time.monotonic() - started
    finally:
        close_all(attackers)
    sent = sum(a.sent for a in attackers)
    found.note(attackers=count, flood_s=wall, sent_MiB=sent / MiB, frames_sent=sent // len(frame),
               worker_cpu=cpu.fraction, test_process_cpu=ours, idle_within_1s=idle,
               cpu_after_s=after.seconds,
               rss_growth_MiB=(rss_after - rss_before) / MiB, sigterm_s=stopped)
    check_closed(found, attackers, codes, CLOSE_WITHIN)
    check_honest(found, honest, ref)
    found.check(cpu.fraction < FLOOD_CPU, f"worker CPU {cpu.fraction:.0%} of a core over the flood")
    found.check(idle, f"the worker was still busy {DRAIN_WITHIN} s after the attackers stopped"
                      f" ({after.fraction:.0%} of a core): it parses their backlog")
    found.check(rss_after - rss_before < 32 * MiB,
                f"worker RSS grew by {(rss_after - rss_before) / MiB:.1f} MiB")
    found.check(stopped < SIGTERM_WITHIN, f"SIGTERM took {stopped:.1f} s")
    found.assert_ok()


@pytest.mark.parametrize("count", [1, 20])
def test_empty_continuation_frames_are_counted(make_server, reference, count):
    """A text frame without FIN, then endless 6-byte empty continuation frames.

    They add nothing to the message's size, so only counting frames stops
    them: each connection is closed (1009 past ``MAX_FRAGMENTS``, or 1008 for
    the frame rate) after a few hundred bytes, and the rest of its flood is
    discarded unparsed.
    """
    first = build_frame(TEXT, b'{"event":', fin=False)
    empty = build_frame(CONTINUATION, b"", fin=False)
    assert len(empty) == 6
    _frame_flood(make_server, reference, f"empty continuation frames x{count}", first, empty, count, {1009, 1008})


def test_ping_flood_is_closed_and_its_backlog_discarded(make_server, reference):
    """WebSocket pings with 125-byte payloads, as fast as the socket takes them.

    Pings count against the frame rate: past its burst the connection is
    closed with 1008, and what it sent after that is discarded, not parsed.
    """
    ping = build_frame(PING, b"p" * 125)
    _frame_flood(make_server, reference, "ping flood", b"", ping, 1, {1008})


# Frames the dearest to parse within every limit: each fills a message
# almost to the size limit with values that cost most per byte. The plain
# string is the baseline: an honest client sending as many bytes.
def _repeat(item: str, size: int, sep: str = ",") -> str:
    return sep.join([item] * max(1, (size + len(sep)) // (len(item) + len(sep))))


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


SHAPES = {
    "plain_string": lambda size, depth: '"' + "x" * (size - 2) + '"',
    "empty_arrays": lambda size, depth: "[" + _repeat("[]", size - 2) + "]",
    "empty_objects": lambda size, depth: "[" + _repeat("{}", size - 2) + "]",
    "deepest_nests": lambda size, depth: "[" + _repeat(_nest(depth - 1), size - 2) + "]",
    "zeros": lambda size, depth: "[" + _repeat("0", size - 2) + "]",
    "empty_strings": lambda size, depth: "[" + _repeat('""', size - 2) + "]",
    "escapes": lambda size, depth: '"' + "\\u00e9" * ((size - 2) // 6) + '"',
    "many_keys": lambda size, depth: _keys(size),
}


def _keys(size: int) -> str:
    """An object with as many distinct short keys as fit in ``size`` bytes."""
    items, used = [], 2
    while True:
        item = f'"{len(items):x}":0'
        if used + len(item) + 1 > size:
            return "{" + ",".join(items) + "}"
        items.append(item)
        used += len(item) + 1


def _frame_text(data: str, ref: int) -> bytes:
    return ('{"channel":"chat","event":"x","ref":%d,"data":%s}' % (ref, data)).encode()


def _allowed_depth(ws: RawWebSocket, limit: int = 128) -> tuple[int, int]:
    """The deepest nesting of ``data`` the server accepts, and the frames it took to find.

    Answered as anything but ``bad_frame`` means accepted (a refused frame
    may carry no ``ref``: its text was refused before it was parsed).
    """
    low, high, probes = 0, limit, 0  # low is accepted, high is not
    while high - low > 1:
        depth = (low + high) // 2
        ws.send_raw(build_frame(TEXT, _frame_text(_nest(depth), depth)))
        probes += 1
        answer = ws.recv_json()
        if answer["event"] == "@error" and answer["data"]["code"] == "bad_frame":
            high = depth
        else:
            assert answer.get("ref") == depth, answer
            low = depth
    assert 0 < low < limit - 1, f"nesting accepted up to {low}"
    return low, probes


@pytest.fixture(scope="module")
def json_server():
    srv = Gunicorn(CONFIG)
    yield srv
    srv.stop()


@pytest.mark.parametrize("size", ["largest", "both_rates"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dearest_json_within_the_rate_is_cheap(json_server, reference, shape, size):
    """Valid JSON at the full allowed rate costs at most a quarter of a core.

    Two sizes: the largest message (the byte rate binds), and the size at
    which both rates bind at once (``BYTE_RATE_LIMIT``'s rate over
    ``RATE_LIMIT``'s: as many frames and as many bytes as allowed). The
    attacker sends the bursts at once, then paces itself at 90% of both
    rates for several seconds. It stays within the rate, so it is never
    closed and every frame is answered (``unknown_event``, or ``bad_frame``
    if the server refuses the shape from its text), never ``rate_limited``.
    The CPU window runs from the first frame to the last answer.
    """
    srv, conf = json_server, settings(CONFIG)
    found = Findings(f"dearest JSON: {shape} {size}")
    pid = worker_pid(srv)
    assert drained(pid, within=5), "the worker is busy before the test"
    rate, burst = conf["ROBE_SOCKETS_BYTE_RATE_LIMIT"]
    frame_rate, frame_burst = conf["ROBE_SOCKETS_RATE_LIMIT"]
    largest = conf["ROBE_SOCKETS_MAX_MESSAGE_SIZE"]
    target = largest - 512 if size == "largest" else min(largest, rate // frame_rate) - 16
    seconds = 4.0
    with Honest(srv) as honest, Honest(reference) as ref:
        a = open_attacker(srv)
        try:
            depth, probes = _allowed_depth(a.ws)
            data = SHAPES[shape](target - 48, depth)
            sample = _frame_text(data, 10 ** 6)
            assert target - 200 < len(sample) <= largest, len(sample)
            wire = len(build_frame(TEXT, sample))
            # 90% of each rate; the bursts less what the probes took.
            source = Paced(lambda n: build_frame(TEXT, _frame_text(data, n)),
                           byte_rate=(rate * 0.9, burst * 0.9 - 64 * 1024),
                           frame_rate=(frame_rate * 0.9, frame_burst * 0.9 - probes))
            count = source.count_within(wire, seconds)
            source.count = count
            a.source = source
            with CpuMeter(pid) as cpu:
                flood([a], seconds + 10, stop_when=lambda: len(a.answers) >= count
                      or a.close_code is not None, poll=0.02)
            read_to_close(a, 0.2)
        finally:
            a.ws.close()
    codes: dict[str, int] = {}
    for answer in a.answers:
        key = answer["data"]["code"] if answer["event"] == "@error" else answer["event"]
        codes[key] = codes.get(key, 0) + 1
    found.note(frame_bytes=len(sample), depth=depth, frames=count, answered=len(a.answers),
               answers=codes, window_s=cpu.wall, frames_per_s=count / cpu.wall,
               KiB_per_s=count * wire / cpu.wall / 1024, worker_cpu=cpu.fraction,
               cpu_ms_per_frame=cpu.seconds / max(1, count) * 1000)
    found.check(a.close_code is None and a.eof_after is None and a.ended_after is None,
                f"the attacker was closed ({a.close_code}) within the rate")
    found.check(len(a.answers) == count, f"{len(a.answers)} answers to {count} frames")
    found.check("rate_limited" not in codes, f"refused within the rate: {codes}")
    found.check(cpu.fraction <= 0.25, f"worker CPU {cpu.fraction:.0%} of a core at the full rate")
    check_honest(found, honest, ref)
    found.assert_ok()


def test_send_queue_is_bounded_in_bytes(make_server, reference):
    """Five connections that never read, each sending large ``@ping`` frames within the rate.

    Each ``@pong`` echoes its ``@ping``'s data, so the answers pile up in the
    send queues. A queue past ``SEND_QUEUE_BYTES`` is dropped and its
    connection closed with 4008: its channels lose it at once (seen in
    ``/stats``), and the close frame is what the client finds when it reads
    again. The worker's RSS grows by at most the five queues, counted twice
    (what the allocator keeps besides), plus the messages being read.

    The byte rate is raised for this test (the queue's default stays): at
    the default rate a queue of 4 MiB, behind the server's kernel send
    buffer (up to ``tcp_wmem``'s maximum, 4 MiB here), takes half a minute
    to fill. The attackers still pace themselves within every limit.
    """
    config = {**CONFIG, "ROBE_SOCKETS_BYTE_RATE_LIMIT": [2 * MiB, 4 * MiB]}
    conf = settings(config)
    queue_bytes = conf["ROBE_SOCKETS_SEND_QUEUE_BYTES"]
    rate, burst = conf["ROBE_SOCKETS_BYTE_RATE_LIMIT"]
    frame_rate, _ = conf["ROBE_SOCKETS_RATE_LIMIT"]
    max_size = conf["ROBE_SOCKETS_MAX_MESSAGE_SIZE"]
    srv = make_server(config)
    pid = worker_pid(srv)
    found = Findings("send queue in bytes")
    count, rcvbuf = 5, 4096
    data = "d" * (max_size - 4 * 1024)

    def ping(n: int) -> bytes:
        return build_frame(TEXT, json.dumps({"event": "@ping", "ref": n, "data": data}).encode())

    wire = len(ping(1))
    assert rate * 0.9 / wire < frame_rate * 0.9, "the frame rate would bind first"
    # Before the queue fills, the kernel takes some pongs: the server's send
    # buffer (at most tcp_wmem's maximum) and the client's receive buffer.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        kernel = int(f.read().split()[2]) + 2 * rcvbuf
    within = (queue_bytes + kernel) / (rate * 0.9) + 3
    bound = count * 2 * (queue_bytes + max_size) + 16 * MiB
    rss_before = rss_bytes(pid)
    peak = [rss_before]

    def dropped() -> bool:
        peak[0] = max(peak[0], rss_bytes(pid))
        members = srv.stats()["members"]
        return not any(members.get(f"slow:{i}") for i in range(count))

    attackers: list[Attacker] = []
    try:
        with Honest(srv, channel="chat") as honest, Honest(reference) as ref:
            attackers += [open_attacker(srv, rcvbuf=rcvbuf) for _ in range(count)]
            for i, a in enumerate(attackers):
                answer = a.ws.request({"channel": f"slow:{i}", "event": "@subscribe", "ref": "s"})
                assert answer["event"] == "@subscribed", answer
                a.reading = False
                a.source = Paced(ping, byte_rate=(rate * 0.9, burst * 0.9))
            with CpuMeter(pid) as cpu:
                wall = flood(attackers, within, stop_when=dropped, poll=0.1)
            all_dropped = dropped()
            for a in attackers:
                a.source = None
            for a in attackers:
                read_to_close(a, 5)
            rss_after = rss_bytes(pid)
    finally:
        close_all(attackers)
    sent = sum(a.sent for a in attackers)
    growth = peak[0] - rss_before
    codes = [a.close_code for a in attackers]
    found.note(within_s=within, flood_s=wall, sent_MiB=sent / MiB, all_dropped=all_dropped,
               close_codes=codes, rss_growth_peak_MiB=growth / MiB, rss_bound_MiB=bound / MiB,
               rss_growth_after_MiB=(rss_after - rss_before) / MiB, worker_cpu=cpu.fraction)
    found.check(all_dropped, f"not every slow consumer was dropped from its channel within {within:.1f} s")
    found.check(all(c == 4008 for c in codes), f"close codes read at the end: {codes}, expected 4008")
    found.check(growth < bound, f"worker RSS grew by {growth / MiB:.1f} MiB, bound {bound / MiB:.0f}")
    check_honest(found, honest, ref)
    found.assert_ok()
