"""Several workers on the in-memory backend: each one warns, and why it must.

Nothing is shared between processes on ``memory://``: each worker accepts
every ticket once and hears only its own broadcasts. These tests run real
gunicorn servers (and ``flask run``) and read what they log.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .servers import ROOT, FlaskRun, Gunicorn, wait_until

WARNING = re.compile(r"process (\d+) serves sockets on the in-memory backend \(memory://\)")
FIX = "Set ROBE_SOCKETS_REDIS_URL so that all workers share one Redis, or run one worker"
#: Room for the handshakes these tests make (tickets are rate limited per caller).
CONFIG = {"ROBE_SOCKETS_TICKET_RATE_LIMIT": [1000, 1000], "ROBE_SOCKETS_TICKET_MAX_AGE": 120}


def warned(output: str) -> list[int]:
    """PIDs of the processes that logged the warning, once per line."""
    return [int(pid) for pid in WARNING.findall(output)]


def worker_pids(srv: Gunicorn) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", srv.output())}


def handshake(stack: contextlib.ExitStack, srv, ticket: str):
    """Open a socket with ``ticket``, closed with ``stack``: ``(socket, None)``,
    or ``(None, error code)`` if refused."""
    try:
        ws = stack.enter_context(connect(f"{srv.ws_url}?ticket={ticket}", open_timeout=5))
    except InvalidStatus as exc:
        return None, json.loads(exc.response.body)["error"]
    hello = json.loads(ws.recv(timeout=5))
    assert hello["event"] == "@connected"
    return ws, None


def serving_pid(ws) -> int:
    """The PID of the worker holding ``ws``: its job broadcasts it back."""
    ws.send(json.dumps({"channel": "jobs:pid", "event": "@subscribe", "ref": 1}))
    assert json.loads(ws.recv(timeout=5))["event"] == "@subscribed"
    ws.send(json.dumps({"channel": "jobs:pid", "event": "shout", "data": {"text": "x"}, "ref": 2}))
    while True:
        message = json.loads(ws.recv(timeout=5))
        if message["event"] == "shouted":
            return message["data"]["pid"]


def connect_once(srv) -> None:
    with contextlib.ExitStack() as stack:
        assert handshake(stack, srv, srv.ticket())[1] is None


@pytest.mark.parametrize("preload", [False, True], ids=["import-in-worker", "preload"])
def test_each_of_two_workers_warns_once_naming_the_fix(make_server, preload):
    """gunicorn -w 2 on memory://: each worker logs one warning that says what to do."""
    srv = make_server(CONFIG, workers=2, extra=["--preload"] if preload else [])
    workers = worker_pids(srv)
    assert len(workers) == 2

    def both_warned():
        if preload:
            # The master imported the app and serves nothing: a worker
            # registers when it first takes a ticket, so give both some.
            connect_once(srv)
        return set(warned(srv.output())) == workers

    wait_until(both_warned, 30, 0.05, f"a warning from each of {workers}")
    output = srv.output()
    assert output.count(FIX) == 2
    for _ in range(10):  # more traffic, no more warnings
        connect_once(srv)
    assert sorted(warned(srv.output())) == sorted(workers)


def test_a_ticket_used_on_one_worker_is_accepted_again_by_the_other(make_server):
    """The hazard the warning names: the second worker never heard the ticket was used."""
    srv = make_server(CONFIG, workers=2)
    ticket = srv.ticket()
    with contextlib.ExitStack() as stack:
        first, refused = handshake(stack, srv, ticket)
        assert refused is None
        first_pid = serving_pid(first)
        refusals = []
        for _ in range(200):
            replay, refused = handshake(stack, srv, ticket)
            if replay is not None:
                break
            refusals.append(refused)
        else:
            pytest.fail("no replay reached the other worker in 200 handshakes")
        assert serving_pid(replay) != first_pid
        # Where the ticket was used, its replay is refused as it should be.
        assert set(refusals) <= {"ticket_used"}


@pytest.mark.parametrize("preload", [False, True], ids=["import-in-worker", "preload"])
def test_one_worker_does_not_warn(make_server, preload):
    """gunicorn -w 1 on memory:// is what the backend is for: no warning, also once it served."""
    srv = make_server(CONFIG, workers=1, extra=["--preload"] if preload else [])
    # The worker registers and looks for siblings at its first ticket at the
    # latest, before the handshake is answered.
    connect_once(srv)
    with contextlib.ExitStack() as stack:
        serving_pid(handshake(stack, srv, srv.ticket())[0])
    assert warned(srv.output()) == []


def test_flask_run_with_the_reloader_does_not_warn():
    """flask run --reload (a watcher process and one server child) gives no warning."""
    server = FlaskRun(CONFIG, extra=["--reload"])
    try:
        ticket = requests.post(server.url + "/ops/ticket", timeout=5).json()["ticket"]
        with connect(f"ws://127.0.0.1:{server.port}/ops?ticket={ticket}", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        assert warned(server.output()) == []
    finally:
        server.stop()


SIBLING = textwrap.dedent(
    """
    import logging, sys
    from flask_robe_sockets.backends.memory import MemoryBackend
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    backend = MemoryBackend()
    backend.start(lambda *args: None)
    backend.claim_nonce("n", 30)  # serving: it registers and looks for siblings
    print("registered", flush=True)
    sys.stdin.readline()  # live until told
    """
)


def test_registry_finds_live_siblings_only(tmp_path):
    """A second child of one parent sees the first; once both are gone, a third is alone."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def child():
        proc = subprocess.Popen(
            [sys.executable, "-c", SIBLING], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        lines = []
        for line in proc.stdout:  # bounded: the child prints "registered" or dies
            lines.append(line)
            if line.startswith("registered"):
                break
        return proc, "".join(lines)

    first, first_out = child()
    try:
        assert warned(first_out) == []
        second, second_out = child()
        second_out += second.communicate(timeout=10)[0]
        assert warned(second_out) == [second.pid]
        assert f"so does process {first.pid} of the same parent (pid {os.getpid()})" in second_out
    finally:
        first.communicate(timeout=10)
    # Both are gone: their files can be locked, so a newcomer is alone.
    third, third_out = child()
    third_out += third.communicate(timeout=10)[0]
    assert warned(third_out) == []
