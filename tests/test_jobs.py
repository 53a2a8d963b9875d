"""Background jobs: a handler enqueues the message on RQ, a real ``rq worker``
runs the job, and the job's result reaches the channel through a Publisher."""
from __future__ import annotations

import contextlib
import json
import uuid

import pytest
import redis
from rq.job import Job

from . import jobs
from .servers import BIN, Process, gunicorn_pair, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_url(redis_server):
    """This module's database on the shared redis-server."""
    return redis_server.database(2)


@pytest.fixture(scope="module")
def pair(redis_url):
    """Two gunicorn servers (one gevent worker each) sharing one Redis."""
    with gunicorn_pair({"ROBE_SOCKETS_REDIS_URL": redis_url}) as servers:
        yield servers


@pytest.fixture
def rq_worker(redis_url):
    """A real ``rq worker`` on the test queue, on a freshly flushed database."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    worker = Process(
        [str(BIN / "rq"), "worker", "--url", redis_url, jobs.QUEUE],
        env={"ROBE_SOCKETS_REDIS_URL": redis_url},
        name="rq",
    )
    try:
        wait_until(lambda: worker.proc.poll() is None and "Listening on" in worker.output(), 20,
                   message=f"rq worker to listen:\n{worker.output()}")
        yield worker
    finally:
        worker.stop()
        client.flushdb()
        client.close()


@contextlib.contextmanager
def subscribed(srv, channel):
    from websockets.sync.client import connect

    with connect(f"{srv.ws_url}?ticket={srv.ticket()}", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": channel, "event": "@subscribe"}))
        assert json.loads(ws.recv(timeout=5))["event"] == "@subscribed"
        yield ws


def test_enqueue_work_reply_round_trip(pair, rq_worker, redis_url):
    """A handler enqueues the message, rq worker runs the job, every subscriber gets the result."""
    a, b = pair
    channel = f"jobs:{uuid.uuid4().hex[:12]}"
    with subscribed(a, channel) as asker, subscribed(b, channel) as other:
        asker.send(json.dumps({"channel": channel, "event": "shout", "data": {"text": "hi"}, "ref": 7}))
        reply = json.loads(asker.recv(timeout=5))
        assert reply["event"] == "@reply" and reply["ref"] == 7
        job_id = reply["data"]["queued"]
        results = [json.loads(ws.recv(timeout=20)) for ws in (asker, other)]
    assert results[0] == results[1]
    pid = results[0]["data"].pop("pid")
    assert results[0] == {
        "channel": channel, "event": "shouted", "data": {"text": "HI", "in_reply_to": 7}, "seq": 1,
    }
    assert pid not in {a.stats()["pid"], b.stats()["pid"]}, "the job ran in a web worker"
    connection = redis.Redis.from_url(redis_url)
    job = Job.fetch(job_id, connection=connection)
    wait_until(lambda: job.get_status(refresh=True) == "finished", 10, message="the job to finish")
    assert job.return_value() == "HI"
    connection.close()


def test_jobs_run_one_after_another_in_order(pair, rq_worker):
    """Several enqueued messages come back once each, in the order they were sent."""
    a, _ = pair
    channel = f"jobs:{uuid.uuid4().hex[:12]}"
    with subscribed(a, channel) as ws:
        for i in range(5):
            ws.send(json.dumps({"channel": channel, "event": "shout", "data": {"text": f"m{i}"}}))
        results = [json.loads(ws.recv(timeout=20)) for _ in range(5)]
        assert [r["data"]["text"] for r in results] == [f"M{i}" for i in range(5)]
        assert [r["seq"] for r in results] == [1, 2, 3, 4, 5]


def test_without_redis_the_job_runs_in_a_local_greenlet(server):
    """With no Redis configured, the same handler runs the job in the worker itself."""
    channel = f"jobs:{uuid.uuid4().hex[:12]}"
    with subscribed(server, channel) as ws:
        ws.send(json.dumps({"channel": channel, "event": "shout", "data": {"text": "hi"}, "ref": 1}))
        frames = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
    assert {"channel": channel, "event": "@reply", "data": {"queued": None}, "ref": 1} in frames
    shouted = next(f for f in frames if f["event"] == "shouted")
    assert shouted["data"] == {"text": "HI", "in_reply_to": 1, "pid": server.stats()["pid"]}
