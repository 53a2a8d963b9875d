"""``flask robe ...``: the commands run as a user runs them (``flask --app
tests.app:create_app robe ...``), against a real redis-server and real
gunicorn workers sharing it."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import redis

from flask_robe_sockets.backends.redis import WORKERS_KEY, RedisBackend
from flask_robe_sockets.cli import NEEDS_SHARED_BACKEND

from .rawws import RawWebSocket
from .servers import BIN, ROOT, Gunicorn, wait_until

#: Short, so that a killed worker leaves the list within the test (reports every 2 s).
TTL = 6


@pytest.fixture
def redis_url(redis_server):
    """This module's database on the shared redis-server, emptied around its use."""
    with redis_server.flushed(3) as url:
        yield url


def robe(*args: str, config: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``flask --app tests.app:create_app robe ARGS`` with the test app's config."""
    return subprocess.run(
        [str(BIN / "flask"), "--app", "tests.app:create_app", "robe", *args],
        cwd=ROOT,
        env={**os.environ, "ROBE_TEST_CONFIG": json.dumps(config or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def open_socket(srv) -> RawWebSocket:
    ws = RawWebSocket(srv.ws_url, ticket=srv.ticket())
    ws.connected()
    return ws


@pytest.mark.redis
def test_publish_reaches_a_subscriber_with_the_printed_seq(redis_url):
    """The seq printed is the one the subscriber receives, with the data given."""
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url}
    srv = Gunicorn(config)
    try:
        with open_socket(srv) as ws:
            assert ws.request({"channel": "orders", "event": "@subscribe"})["event"] == "@subscribed"
            for expected in (1, 2):
                done = robe("publish", "orders", "placed", '{"id": 7, "items": ["tea"]}', config=config)
                assert done.returncode == 0, done.stderr
                assert done.stdout == f"{expected}\n"
                frame = ws.recv_json()
                assert frame == {
                    "channel": "orders", "event": "placed", "data": {"id": 7, "items": ["tea"]}, "seq": expected,
                }
            # Without JSON the data is null.
            done = robe("publish", "orders", "ping", config=config)
            assert done.returncode == 0, done.stderr
            assert ws.recv_json() == {"channel": "orders", "event": "ping", "data": None, "seq": 3}
    finally:
        srv.stop()


@pytest.mark.redis
@pytest.mark.parametrize("text", ['{"id": 7', "NaN", "{'id': 7}", '[1e999]', ""])
def test_publish_refuses_what_is_not_strict_json(redis_url, text):
    """Bad JSON is a usage error (exit 2) naming the argument, and nothing is sent."""
    done = robe("publish", "orders", "placed", text, config={"ROBE_SOCKETS_REDIS_URL": redis_url})
    assert done.returncode == 2
    assert "Invalid value for JSON: not strict JSON" in done.stderr
    assert done.stdout == ""
    assert redis.Redis.from_url(redis_url).keys("robe:{orders}*") == []


@pytest.mark.redis
def test_publish_refuses_bad_names(redis_url):
    """Channel and event names are checked as the server checks them: exit 2."""
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url}
    done = robe("publish", "no spaces", "placed", config=config)
    assert done.returncode == 2 and "Invalid value for CHANNEL" in done.stderr
    done = robe("publish", "orders", "@connected", config=config)
    assert done.returncode == 2 and "Invalid value for EVENT" in done.stderr


@pytest.mark.parametrize("args", [("publish", "orders", "placed", "{}"), ("workers",)])
def test_memory_backend_exits_2_naming_the_fix(args):
    """On memory:// the server's state is in another process: every command exits 2 saying so."""
    done = robe(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"Error: {NEEDS_SHARED_BACKEND}" in " ".join(done.stderr.split())
    assert "ROBE_SOCKETS_REDIS_URL" in NEEDS_SHARED_BACKEND and "another process" in NEEDS_SHARED_BACKEND


def listed(config: dict) -> list[dict]:
    done = robe("workers", "--json", config=config)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def per_worker(srv, workers: int) -> dict[int, dict]:
    """Each worker's /stats (answered by one worker at a time), by PID."""
    seen: dict[int, dict] = {}

    def all_answered() -> bool:
        stats = srv.stats()
        seen[stats["pid"]] = stats
        return len(seen) == workers

    wait_until(all_answered, 10, 0.01, "every worker to answer /stats")
    return seen


@pytest.mark.redis
def test_workers_lists_live_workers_and_drops_a_killed_one(redis_url):
    """Two gunicorn workers are listed with their connections and channels; one
    killed with SIGKILL is listed until its TTL has passed, then no more."""
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url, "ROBE_SOCKETS_WORKER_TTL": TTL}
    srv = Gunicorn(config, workers=2)
    sockets = []
    try:
        # Sockets until both workers hold some (the kernel picks the worker),
        # each on a channel of its own.
        for n in range(40):
            ws = open_socket(srv)
            sockets.append(ws)
            assert ws.request({"channel": f"desk:{n}", "event": "@subscribe"})["event"] == "@subscribed"
            if len(sockets) >= 3 and all(s["connections"] for s in per_worker(srv, 2).values()):
                break
        stats = per_worker(srv, 2)
        assert all(s["connections"] for s in stats.values()), stats

        def reports_match():
            workers = listed(config)
            by_pid = {worker["pid"]: worker for worker in workers}
            return len(workers) == 2 and all(
                (by_pid.get(pid, {}).get("connections"), by_pid.get(pid, {}).get("channels"))
                == (s["connections"], len(s["channels"]))
                for pid, s in stats.items()
            ) and workers

        workers = wait_until(reports_match, 20, 0.1, "both workers' reports to show their sockets")
        for worker in workers:
            assert worker["id"].split(":")[1] == str(worker["pid"])
            assert 0 <= worker["age"] <= TTL
        # The table for people says the same.
        done = robe("workers", config=config)
        assert done.returncode == 0, done.stderr
        assert f"2 workers, {len(sockets)} connections" in done.stdout
        for worker in workers:
            assert worker["id"] in done.stdout

        victim = max(stats)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # Its last report still stands until its TTL has passed...
        assert victim in {worker["pid"] for worker in listed(config)}
        assert time.monotonic() - killed_at < TTL - TTL / 3, "too slow to see the report still standing"
        # ...then it leaves the list, and gunicorn's replacement joins it.
        wait_until(lambda: victim not in {worker["pid"] for worker in listed(config)}, TTL + 10, 0.2,
                   "the killed worker to leave the list")
        assert time.monotonic() - killed_at >= TTL - TTL / 3
        wait_until(lambda: len(listed(config)) == 2, 20, 0.2, "the replacement worker to report")
        # The killed worker's id stays in the set, with a deadline in the past:
        # what a sweep needs to find the workers that died.
        client = redis.Redis.from_url(redis_url)
        dead = {worker_id.decode() for worker_id in client.zrangebyscore(WORKERS_KEY, "-inf", time.time() * 1000)}
        assert any(worker_id.split(":")[1] == str(victim) for worker_id in dead), dead
    finally:
        for ws in sockets:
            ws.close()
        srv.stop()


@pytest.mark.redis
def test_a_worker_stopped_with_sigterm_leaves_the_list_at_once(redis_url):
    """A worker told to stop (an idle one: it never served a socket) retires
    on the way out: it is not listed for its TTL after, and leaves no trace."""
    config = {"ROBE_SOCKETS_REDIS_URL": redis_url, "ROBE_SOCKETS_WORKER_TTL": 60}
    stays, stops = Gunicorn(config), Gunicorn(config)
    try:
        kept, gone = list(per_worker(stays, 1)), list(per_worker(stops, 1))
        wait_until(lambda: {w["pid"] for w in listed(config)} == {*kept, *gone}, 20, 0.1, "both workers to report")
        gone_id = next(w["id"] for w in listed(config) if w["pid"] in gone)
        stops.stop()
        assert stops.proc.returncode == 0, stops.output()  # gunicorn's own graceful exit, no SIGKILL
        assert {w["pid"] for w in listed(config)} == set(kept)
        client = redis.Redis.from_url(redis_url)
        assert client.zscore(WORKERS_KEY, gone_id) is None
        assert not client.exists(f"{WORKERS_KEY}:{gone_id}")
        client.close()
    finally:
        stops.stop()
        stays.stop()


@pytest.mark.redis
def test_backend_announce_and_workers(redis_url):
    """A report is listed with its info, id and age until its TTL passes;
    a second report refreshes it."""
    backend = RedisBackend(redis_url)
    try:
        backend.announce("host:1:aa", {"pid": 1, "connections": 3, "channels": 2, "started": 1.0}, ttl=0.5)
        backend.announce("host:2:bb", {"pid": 2, "connections": 0, "channels": 0, "started": 2.0}, ttl=60)
        workers = backend.workers()
        assert [(w["id"], w["connections"], w["channels"]) for w in workers] == [
            ("host:1:aa", 3, 2), ("host:2:bb", 0, 0),
        ]
        assert all(0 <= w["age"] < 0.5 for w in workers)
        wait_until(lambda: [w["id"] for w in backend.workers()] == ["host:2:bb"], 5, 0.05, "the first to expire")
        backend.announce("host:1:aa", {"pid": 1, "connections": 4, "channels": 2, "started": 1.0}, ttl=60)
        assert [w["connections"] for w in backend.workers()] == [4, 0]
    finally:
        backend.close()


class FakeBackend:
    """Keeps the reports a heartbeat makes."""

    def __init__(self) -> None:
        self.reports: list = []

    def announce(self, worker_id, info, ttl):
        self.reports.append((time.monotonic(), worker_id, info, ttl))


def test_heartbeat_reports_every_third_of_its_ttl():
    """A started heartbeat reports at once, then every third of the TTL, under one id."""
    from flask_robe_sockets.heartbeat import Heartbeat

    backend = FakeBackend()
    beat = Heartbeat(backend, 0.3, lambda: {"connections": 5, "channels": 1})
    beat.start()
    beat.start()  # once per process
    try:
        wait_until(lambda: len(backend.reports) >= 3, 5, 0.01, "three reports")
    finally:
        beat.stop()
    (first, worker_id, info, ttl), (second, *_), (third, *_) = backend.reports[:3]
    assert {r[1] for r in backend.reports} == {worker_id} == {beat.worker_id}
    assert worker_id.split(":")[1] == str(os.getpid())
    assert info["connections"] == 5 and info["channels"] == 1 and info["pid"] == os.getpid()
    assert ttl == 0.3
    assert 0.09 <= second - first < 0.3 and 0.09 <= third - second < 0.3


def test_a_stopped_heartbeat_never_reports():
    """The CLI's own process stops its heartbeat first: no report is ever made."""
    from flask_robe_sockets.heartbeat import Heartbeat

    backend = FakeBackend()
    beat = Heartbeat(backend, 0.3, lambda: {"connections": 0, "channels": 0})
    beat.stop()
    beat.start()
    assert beat.worker_id is None  # no thread was started
    assert backend.reports == []


def test_sigterm_still_stops_a_gevent_process_that_is_not_gunicorn():
    """A job runner or script patched by gevent that builds the app keeps
    SIGTERM's default: the app's graceful close chains to gunicorn's handler
    only, and taking the signal elsewhere would keep the process running."""
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import time\n"
        "from tests.app import create_app\n"
        "create_app()\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 30)[0], "the process never said it was ready"
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
