from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest

from .servers import Gunicorn, RedisServer


def pytest_collection_modifyitems(config, items):
    # On CI every real component must be there: a missing one fails the run
    # instead of skipping tests quietly.
    if os.environ.get("CI") != "true" and not shutil.which("redis-server"):
        skip = pytest.mark.skip(reason="redis-server is not installed")
        for item in items:
            if "redis" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def server():
    """A gunicorn gevent server with the test app, shared by the session.

    Tests using it must leave it as they found it (close their sockets).
    """
    srv = Gunicorn()
    yield srv
    srv.stop()


@pytest.fixture
def make_server():
    """Start servers with their own config; stopped after the test."""
    started = []

    def make(config=None, **kwargs):
        srv = Gunicorn(config, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def redis_server():
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def ws_connect(server):
    """Open a socket to the shared server with the ``websockets`` library.

    Returns an independent client (not ours), already past ``@connected``.
    """
    from websockets.sync.client import connect

    with contextlib.ExitStack() as stack:

        def open_(srv=None, expect_connected=True, **kwargs):
            srv = srv or server
            ws = stack.enter_context(
                connect(f"{srv.ws_url}?ticket={srv.ticket()}", open_timeout=5, **kwargs)
            )
            if expect_connected:
                hello = json.loads(ws.recv(timeout=5))
                assert hello["event"] == "@connected"
            return ws

        yield open_
