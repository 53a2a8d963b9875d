"""A presence join loop on a live gunicorn worker (PROTOCOL.md section 7).

On a presence channel every join and every leave is a frame to each other
member, so a caller that subscribes and unsubscribes in a loop, on several
connections and within their frame rate, would make the worker write a
frame per member per request. ``ROBE_SOCKETS_PRESENCE_RATE_LIMIT`` bounds
the joins of one caller (identity and client IP) over all its connections
of the worker: past it a subscribe is answered ``@error rate_limited``, and
nothing is announced.

The attack runs on one worker beside a crowd of members of the channel, an
observer member that reads every event, and an honest client pinging on
the same worker (tests/attack.py). The bounds are the library's default
limit, whatever the server was given, so that the same attack on a server
with the limit raised fails them; run by hand, the module measures that:

    .venv/bin/python -m tests.test_presence_attack --limit 1e6 1e6
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import sys
import time
from dataclasses import dataclass, field

import pytest
import requests

from flask_robe_sockets.config import DEFAULTS

from .attack import CpuMeter, Honest, drained, percentile, worker_pid
from .rawws import TEXT, RawWebSocket, build_frame
from .servers import Gunicorn
from .test_attacks import MiB, Attacker, Findings, Paced, check_honest, flood, reference  # noqa: F401 (reference: a fixture)

CHANNEL = "room:attack"
LIMIT_KEY = "ROBE_SOCKETS_PRESENCE_RATE_LIMIT"
CONFIG = {
    "ROBE_SOCKETS_PRESENCE": ["room:*"],
    # The test app lifts the per-identity cap; the attackers meet the library's.
    "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": DEFAULTS["ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY"],
    # The test app lifts the join limit too (its anonymous callers are one): this is the library's.
    LIMIT_KEY: DEFAULTS[LIMIT_KEY],
}
#: Honest members of the channel besides the observer, each its own identity
#: (one identity would meet the join limit itself).
CROWD = 200
#: Connections of the one attacking identity: as many as the per-identity cap lets it open.
ATTACKERS = CONFIG["ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY"]
ATTACKER = "mallory"
ATTACK_SECONDS = 5.0
#: The attackers' share of the frame rate: within it, so none is closed with 1008.
PACE = 0.9
#: Seconds after the attack within which every frame must be answered and
#: every member must have read every event.
ANSWER_WITHIN = 10.0
#: Seconds of the join rate added to the bound: the attack's window is
#: measured from outside, the limit's bucket inside the worker.
TIMING_MARGIN = 1.0
#: The worker's CPU over the attack, as a fraction of one core.
ATTACK_CPU = 0.25
#: The crowd is read only after the attack (reading 200 sockets eagerly
#: would cost this process more than the worker): its kernel buffers hold
#: what arrives meanwhile, so that none of them falls behind as a slow consumer.
CROWD_RCVBUF = 2 * MiB
#: How a @join or @leave frame's bytes show its event.
EVENT_MARKS = (b'"event":"@join"', b'"event":"@leave"')


class Member:
    """A crowd member, read only to count the events in its bytes: cheap at any rate."""

    def __init__(self, ws: RawWebSocket, conn_id: str, expected_before: int) -> None:
        self.ws, self.id = ws, conn_id
        #: Joins it gets before the attack: the crowd members after it and the observer.
        self.expected_before = expected_before
        self.counted = 0
        self.ended = False
        self._tail = b""
        self._feed(ws.buffer)
        ws.buffer = b""

    def count(self) -> None:
        """Read the socket dry (it is non-blocking), counting the events."""
        while True:
            try:
                data = self.ws.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.ended = True
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        # A mark cut by a read is found in the tail, one byte short of the
        # longest mark so that no whole mark is counted twice.
        data = self._tail + data
        self.counted += sum(data.count(mark) for mark in EVENT_MARKS)
        self._tail = data[-(max(map(len, EVENT_MARKS)) - 1):]


@dataclass
class Tally:
    """What one attacker's answers say, in their order."""

    subscribes: int = 0
    joins: int = 0  # subscribes answered @subscribed
    refused: int = 0  # subscribes answered @error rate_limited
    leaves: int = 0  # unsubscribes of a connection that was a member
    member: bool = False  # its state at the end
    unexpected: list = field(default_factory=list)


def tally(a: Attacker) -> Tally:
    t = Tally()
    for answer in a.answers:
        ref, event = answer.get("ref"), answer.get("event")
        if ref is None and event in ("@join", "@leave"):
            continue  # another attacker's, heard while a member
        if not isinstance(ref, int):
            t.unexpected.append(answer)
        elif ref % 2:
            t.subscribes += 1
            if event == "@subscribed":
                t.joins, t.member = t.joins + 1, True
            elif event == "@error" and answer["data"]["code"] == "rate_limited":
                t.refused += 1
            else:
                t.unexpected.append(answer)
        elif event == "@unsubscribed":
            t.leaves += t.member
            t.member = False
        else:
            t.unexpected.append(answer)
    return t


def answered(a: Attacker) -> int:
    return sum(1 for answer in a.answers if "ref" in answer)


def churn(n: int) -> bytes:
    """An attacker's ``n``-th frame: a subscribe when odd, an unsubscribe when even."""
    event = "@subscribe" if n % 2 else "@unsubscribe"
    return build_frame(TEXT, json.dumps({"channel": CHANNEL, "event": event, "ref": n}).encode())


def login(srv: Gunicorn, http: requests.Session, user: str) -> None:
    http.post(srv.url + "/login", data={"user": user}, timeout=5).raise_for_status()


def connect(srv: Gunicorn, ticket: str, rcvbuf: int | None = None) -> tuple[RawWebSocket, str]:
    """An open socket past ``@connected``, and its connection id."""
    ws = RawWebSocket(srv.ws_url, ticket=ticket, rcvbuf=rcvbuf)
    try:
        return ws, ws.connected()["data"]["id"]
    except BaseException:
        ws.close()
        raise


def subscribe(ws: RawWebSocket) -> dict:
    """Join the channel; the ``@subscribed`` data. Nobody else joins
    meanwhile, so the next frame is the answer."""
    answer = ws.request({"channel": CHANNEL, "event": "@subscribe", "ref": "s"})
    assert answer["event"] == "@subscribed" and answer.get("ref") == "s", answer
    return answer["data"]


def ask_presence(observer: Attacker, timeout: float = 5.0) -> dict:
    """The ``@presence`` answer; the events read before it join ``observer.answers``."""
    observer.ws.send_json({"channel": CHANNEL, "event": "@presence", "ref": "p"})
    deadline = time.monotonic() + timeout
    while True:
        frame = observer.ws.recv_json(max(0.01, deadline - time.monotonic()))
        if frame.get("ref") == "p":
            assert frame["event"] == "@presence", frame
            return frame["data"]
        observer.answers.append(frame)


def replay(members: list[dict], events: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """The members as a snapshot and the events after it leave them, and
    what contradicts section 7's consistency (a member joined twice, or
    leaving without having joined)."""
    view = {m["id"]: m for m in members}
    problems = []
    for event in events:
        if event.get("channel") != CHANNEL or event.get("ref") is not None:
            continue
        member = event["data"]
        if event["event"] == "@join":
            if member["id"] in view:
                problems.append(f"joined twice: {member}")
            view[member["id"]] = member
        elif event["event"] == "@leave":
            if view.pop(member["id"], None) is None:
                problems.append(f"left unseen: {member}")
    return view, problems


def read_crowd(crowd: list[Member], expected: int, within: float) -> None:
    """Read the crowd until each member counted ``expected`` events past its
    own (or its connection ended), for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        for member in crowd:
            member.count()
            if member.counted < member.expected_before + expected and not member.ended:
                selector.register(member.ws.sock, selectors.EVENT_READ, member)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                member = key.data
                member.count()
                if member.counted >= member.expected_before + expected or member.ended:
                    selector.unregister(member.ws.sock)


def attack(srv: Gunicorn, reference: Gunicorn, crowd_size: int = CROWD, attackers: int = ATTACKERS,
           seconds: float = ATTACK_SECONDS, limit: tuple[float, float] = DEFAULTS[LIMIT_KEY]) -> Findings:
    """Run the attack on ``srv`` and judge it against ``limit`` (the default's, whatever the server has)."""
    conf = {**DEFAULTS, **CONFIG}
    frame_rate, _ = conf["ROBE_SOCKETS_RATE_LIMIT"]
    byte_rate, byte_burst = conf["ROBE_SOCKETS_BYTE_RATE_LIMIT"]
    assert attackers <= conf["ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY"]
    found = Findings(f"presence join loop x{attackers}")
    pid = worker_pid(srv)
    http = requests.Session()
    crowd: list[Member] = []
    sockets: list[RawWebSocket] = []
    try:
        for i in range(crowd_size):
            login(srv, http, f"member-{i}")
            ws, conn_id = connect(srv, srv.ticket(http), rcvbuf=CROWD_RCVBUF)
            sockets.append(ws)
            subscribe(ws)
            crowd.append(Member(ws, conn_id, expected_before=crowd_size - i))
        for member in crowd:
            member.ws.sock.setblocking(False)
        login(srv, http, "observer")
        ws, observer_id = connect(srv, srv.ticket(http))
        sockets.append(ws)
        snapshot = subscribe(ws)["presence"]["members"]
        observer = Attacker(ws)
        login(srv, http, ATTACKER)
        gang: list[Attacker] = []
        gang_ids: list[str] = []
        for _ in range(attackers):
            ws, conn_id = connect(srv, srv.ticket(http))
            sockets.append(ws)
            gang.append(Attacker(ws))
            gang_ids.append(conn_id)
        assert drained(pid, within=5), "the worker is busy before the attack"

        count = int(frame_rate * PACE * seconds) | 1  # odd: each ends on a subscribe
        for a in gang:
            a.source = Paced(churn, byte_rate=(byte_rate * PACE, byte_burst * PACE),
                             frame_rate=(frame_rate * PACE, 1), count=count)
        with Honest(srv) as honest, Honest(reference) as ref:
            ours = sum(os.times()[:2])
            with CpuMeter(pid) as cpu:
                wall = flood(gang + [observer], seconds + ANSWER_WITHIN, poll=0.05,
                             stop_when=lambda: all(answered(a) >= count or a.close_code is not None for a in gang))
            ours = (sum(os.times()[:2]) - ours) / wall
            idle = drained(pid)
        presence = ask_presence(observer)
        tallies = [tally(a) for a in gang]
        events = [e for e in observer.answers if e.get("event") in ("@join", "@leave")]
        theirs = [e for e in events if e["data"]["identity"] == ATTACKER]
        read_crowd(crowd, len(events), ANSWER_WITHIN)
        listed = srv.stats()["members"].get(CHANNEL, 0)
    finally:
        for ws in sockets:
            ws.close()

    view, problems = replay(snapshot, observer.answers)
    expected = {m.id for m in crowd} | {observer_id} | {i for i, t in zip(gang_ids, tallies) if t.member}
    joins = sum(t.joins for t in tallies)
    leaves = sum(t.leaves for t in tallies)
    subscribes = sum(t.subscribes for t in tallies)
    refused = sum(t.refused for t in tallies)
    heard_joins = sum(e["event"] == "@join" for e in theirs)
    rate, burst = limit
    bound = int(burst + rate * (wall + TIMING_MARGIN))
    behind = [m for m in crowd if m.counted != m.expected_before + len(events)]
    found.note(crowd=crowd_size, attackers=attackers, attack_s=wall, subscribes=subscribes,
               joins=joins, refused=refused, leaves=leaves, observer_events=len(events),
               observer_events_per_s=len(events) / wall, join_bound=bound,
               members_at_end=len(presence["members"]), worker_cpu=cpu.fraction,
               test_process_cpu=ours, idle_after=idle,
               honest_p50_ms=percentile(honest.rtts, 0.5) * 1000,
               crowd_behind=len(behind), crowd_ended=sum(m.ended for m in crowd))
    found.check(heard_joins <= bound, f"the observer heard {heard_joins} joins of {ATTACKER!r}, over"
                                      f" {bound} (burst {burst:g} + {rate:g}/s over {wall:.1f} s + {TIMING_MARGIN} s)")
    found.check(len(theirs) <= 2 * bound, f"the observer heard {len(theirs)} events of {ATTACKER!r}, over {2 * bound}")
    found.check(heard_joins >= min(burst, subscribes), f"only {heard_joins} of {subscribes} subscribes joined, fewer than the burst")
    found.check(heard_joins == joins and len(theirs) == joins + leaves,
                f"the observer heard {heard_joins} joins and {len(theirs) - heard_joins} leaves; the attackers"
                f" were answered {joins} @subscribed and left {leaves} times")
    found.check(len(events) == len(theirs), f"{len(events) - len(theirs)} events of others during the attack")
    found.check(subscribes == (count + 1) // 2 * attackers and joins + refused == subscribes,
                f"{subscribes} subscribes answered ({joins} joined, {refused} refused) of"
                f" {(count + 1) // 2 * attackers} sent")
    found.check(not any(t.unexpected for t in tallies),
                f"unexpected answers: {[t.unexpected[:3] for t in tallies if t.unexpected]}")
    found.check(all(a.close_code is None and a.eof_after is None for a in gang),
                f"attackers closed: {[a.close_code for a in gang]}")
    found.check(not problems, f"the observer's events contradict its snapshot: {problems[:5]}")
    found.check(set(view) == expected, f"the observer's view is off by {sorted(set(view) ^ expected)[:5]}")
    found.check({m["id"]: m for m in presence["members"]} == view and presence["clients"] == len(view),
                "@presence differs from the observer's snapshot and events")
    found.check(listed == len(expected), f"the worker lists {listed} members, expected {len(expected)}")
    found.check(not behind, f"{len(behind)} crowd members did not get every event ({sum(m.ended for m in crowd)}"
                            f" were closed); e.g. {[(m.counted, m.expected_before + len(events)) for m in behind[:3]]}")
    found.check(cpu.fraction < ATTACK_CPU, f"worker CPU {cpu.fraction:.0%} of a core over the attack")
    found.check(idle, "the worker was still busy a second after the attack")
    check_honest(found, honest, ref)
    return found


def test_presence_join_loop_is_bounded_per_caller(make_server, reference):
    """One identity's connections loop subscribe/unsubscribe at 90% of the
    frame rate: the members hear at most the limit's burst and rate of its
    joins (and their leaves), the rest is refused ``rate_limited``, the
    worker stays cheap and the honest client fast, and presence stays exact."""
    attack(make_server(CONFIG), reference).assert_ok()


def main(argv: list[str] | None = None) -> int:
    """The same attack by hand, e.g. with the limit raised, judged against the default."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--limit", nargs=2, type=float, metavar=("RATE", "BURST"),
                        help=f"the server's {LIMIT_KEY} (default: the library's)")
    parser.add_argument("--crowd", type=int, default=CROWD)
    parser.add_argument("--attackers", type=int, default=ATTACKERS)
    parser.add_argument("--seconds", type=float, default=ATTACK_SECONDS)
    args = parser.parse_args(argv)
    config = {**CONFIG, **({LIMIT_KEY: args.limit} if args.limit else {})}
    print(f"load average before: {os.getloadavg()}")
    servers = []
    try:
        servers.append(Gunicorn(config))
        servers.append(Gunicorn())
        found = attack(servers[0], servers[1], args.crowd, args.attackers, args.seconds)
    finally:
        for srv in servers:
            srv.stop()
    try:
        found.assert_ok()
    except pytest.fail.Exception as exc:
        print(f"bounds failed:\n{exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
