"""The presence churn workload: members of one presence channel see others join and leave.

    .venv/bin/python bench/presence.py [--members 1000] [--rate 100] [--seconds 10] [--servers robe,robe-redis]

``--members`` connections subscribe to ``presence:bench`` (the robe server
with ``BENCH_PRESENCE=1`` turns presence on for ``presence:*``); then
``--rate`` joins and leaves a second in all (half each) come from 20 churning
connections, each subscribing and unsubscribing in turn. Every member
receives every ``@join`` and ``@leave``; 20 of them (probes, spread over the
join order) parse their frames, and the latency of an event is the time from
the churner's request to its arrival at a probe. Also measured: the
``@subscribed`` of one more connection (its size with 1,000 members in the
snapshot, and the round trip), the worker's CPU share (and Redis's) and the
generator's own CPU share.

The probes and churners are read eagerly (each socket as soon as epoll says
it is readable). The rest of the members (the crowd) stand for other
machines: they have 4 MiB receive buffers and are read every
``CROWD_EVERY`` seconds, all at once, counting the events in the bytes, so
that this one process is not the bottleneck (eagerly, it made 100,000 reads
a second); at the end each of them must have counted every event.

Like ``run.py``, the server is pinned to core 0 and this process to core 1.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import client_frame, cpu_seconds, parse_frames, raise_fd_limit  # noqa: E402
from run import GEN_CORE, Server, load_now  # noqa: E402

CHANNEL = "presence:bench"
PROBES = 20
CHURNERS = 20
#: Seconds between two reads of the crowd.
CROWD_EVERY = 0.1
RCVBUF = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: How a @join or @leave frame's bytes show its event.
EVENT_MARKS = (b'"@join"', b'"@leave"')


class Client:
    __slots__ = ("sock", "buf", "upgraded", "id", "answers", "parse", "events", "counted", "tail")

    def __init__(self, port: int, parse: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            f"GET /ops HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.sock.setblocking(False)
        self.buf = b""
        self.upgraded = False
        self.id: str | None = None
        #: Answers (``@connected``, ``@subscribed``...) until the client is set up.
        self.answers: list[tuple[float, dict, int]] = []
        self.parse = parse
        #: ``(arrival, event, member id)`` of each @join/@leave, for probes.
        self.events: list[tuple[float, str, str]] = []
        #: Events counted in the bytes of a crowd member, and the end of its
        #: last read (where a mark may begin).
        self.counted = 0
        self.tail = b""

    def receive(self) -> bytes | None:
        """What the socket holds now (``None``: nothing)."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return None
        if not data:
            raise RuntimeError("the server closed a member")
        return data

    def count(self) -> None:
        """Read a crowd member's socket dry, counting the events in its bytes."""
        while (data := self.receive()) is not None:
            # A mark cut by a read is found in the tail (one byte short of
            # the longest mark: no whole mark fits there to be counted twice).
            data = self.tail + data
            self.counted += sum(data.count(mark) for mark in EVENT_MARKS)
            self.tail = data[-(max(map(len, EVENT_MARKS)) - 1):]

    def send(self, text: str) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(client_frame(text))
        self.sock.setblocking(False)

    def feed(self, data: bytes, now: float) -> None:
        if not self.parse and len(self.answers) >= 2:
            return  # a member set up only reads: the probes see what it gets
        self.buf += data
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {head[:200]!r}")
            self.upgraded, self.buf = True, rest
        frames, self.buf = parse_frames(self.buf)
        for _, payload, size in frames:
            if self.parse or self.id is None or len(self.answers) < 2:
                frame = json.loads(payload)
                event = frame.get("event")
                if event in ("@join", "@leave"):
                    self.events.append((now, event, frame["data"]["id"]))
                else:
                    if event == "@connected":
                        self.id = frame["data"]["id"]
                    self.answers.append((now, frame, size))


class Crowd:
    """The members read in batches: every ``CROWD_EVERY`` seconds, all of them."""

    def __init__(self) -> None:
        self.members: list[Client] = []
        self.due = 0.0

    def read(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self.due:
            self.due = now + CROWD_EVERY
            for member in self.members:
                member.count()


def pump(clients: dict[int, Client], epoll: select.epoll, until, timeout: float, what: str,
         crowd: Crowd | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        pump_once(clients, epoll, 0.05, crowd)


def pump_once(clients: dict[int, Client], epoll: select.epoll, wait: float, crowd: Crowd | None = None) -> None:
    if crowd is not None:
        crowd.read()
        wait = min(wait, max(0.0, crowd.due - time.monotonic()))
    for fd, _ in epoll.poll(wait):
        client = clients[fd]
        now = time.monotonic()
        data = client.receive()
        if data is not None:
            client.feed(data, now)


def run(name: str, members: int, rate: float, seconds: float) -> dict:
    os.environ["BENCH_PRESENCE"] = "1"
    server = Server(name)
    epoll = select.epoll()
    clients: dict[int, Client] = {}

    def add(parse: bool) -> Client:
        client = Client(server.port, parse)
        clients[client.sock.fileno()] = client
        epoll.register(client.sock.fileno(), select.EPOLLIN)
        return client

    try:
        probe_every = max(1, members // PROBES)
        crowd = []
        for i in range(members):
            crowd.append(add(parse=i % probe_every == 0))
            if len(crowd) % 64 == 0 or i == members - 1:
                pump(clients, epoll, lambda: all(c.id for c in crowd), 60, "@connected")
                for c in crowd:
                    if len(c.answers) == 1:
                        c.send(json.dumps({"channel": CHANNEL, "event": "@subscribe"}))
                pump(clients, epoll, lambda: all(len(c.answers) >= 2 for c in crowd), 60, "@subscribed")
        # One more joiner: the snapshot of the full channel, and its round trip.
        late = add(parse=True)
        pump(clients, epoll, lambda: late.id is not None, 10, "@connected")
        sent = time.monotonic()
        late.send(json.dumps({"channel": CHANNEL, "event": "@subscribe"}))
        pump(clients, epoll, lambda: len(late.answers) >= 2, 10, "the late @subscribed")
        arrived, answer, snapshot_bytes = late.answers[1]
        assert answer["data"]["presence"]["clients"] == members + 1, answer["data"]["presence"]["clients"]
        subscribe_ms = (arrived - sent) * 1000
        churners = [add(parse=False) for _ in range(CHURNERS)]
        pump(clients, epoll, lambda: all(c.id for c in churners), 10, "the churners")
        probes = [c for c in clients.values() if c.parse and c is not late]
        for probe in probes:
            probe.events.clear()
        batched = Crowd()
        for member in crowd:
            if not member.parse:
                epoll.unregister(member.sock.fileno())
                member.count()
                member.counted = 0
                batched.members.append(member)
        # Each churner alternates subscribe / unsubscribe; requests go out on a schedule.
        requests: dict[str, list[float]] = {c.id: [] for c in churners}
        interval = 1 / rate
        on = [False] * CHURNERS
        started = time.monotonic()
        cpu0, gen0 = server.cpu(), cpu_seconds()
        count = int(rate * seconds)
        for k in range(count):
            due = started + k * interval
            while time.monotonic() < due:
                pump_once(clients, epoll, max(0, due - time.monotonic()), batched)
            i = k % CHURNERS
            churner = churners[i]
            event = "@unsubscribe" if on[i] else "@subscribe"
            on[i] = not on[i]
            requests[churner.id].append(time.monotonic())
            churner.send(json.dumps({"channel": CHANNEL, "event": event}))
        expected = count
        pump(clients, epoll, lambda: all(len(p.events) >= expected for p in probes), 30, "every event at every probe",
             batched)
        elapsed = time.monotonic() - started
        cpu1, gen1 = server.cpu(), cpu_seconds()
        pump(clients, epoll, lambda: all(m.counted >= expected for m in batched.members), 30,
             "every event at every member", batched)
        if any(m.counted != expected for m in batched.members):
            raise RuntimeError(f"a member counted other than {expected} events")
        latencies = []
        for probe in probes:
            seen: dict[str, int] = {}
            for arrival, _, member in probe.events:
                n = seen.get(member, 0)
                seen[member] = n + 1
                latencies.append((arrival - requests[member][n]) * 1000)
        latencies.sort()
        return {
            "server": name,
            "members": members,
            "events_per_s": rate,
            "deliveries_per_s": round(count * (members + 1) / elapsed),
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
            "server_cpu": round((cpu1 - cpu0) / elapsed, 3),
            "generator_cpu": round((gen1 - gen0) / elapsed, 3),
            "snapshot_bytes": snapshot_bytes,
            "subscribe_ms": round(subscribe_ms, 2),
        }
    finally:
        for client in clients.values():
            client.sock.close()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--servers", default="robe,robe-redis")
    args = parser.parse_args()
    raise_fd_limit()
    try:
        os.sched_setaffinity(0, {GEN_CORE})
    except OSError:
        pass
    print(json.dumps({"load_before": load_now()}))
    for name in args.servers.split(","):
        print(json.dumps(run(name, args.members, args.rate, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
