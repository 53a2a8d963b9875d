"""The extension's view of this worker's connections (RobeSockets.connections
and connections_of), against a live gunicorn gevent server."""
from __future__ import annotations

import contextlib
import json
import uuid

import requests
from websockets.sync.client import connect

from .servers import wait_until


def signed_in(server, name: str) -> requests.Session:
    http = requests.Session()
    http.post(f"{server.url}/login", data={"user": name}, timeout=5).raise_for_status()
    return http


def open_socket(stack: contextlib.ExitStack, server, http: requests.Session | None = None):
    """A socket past @connected, with the ticket of ``http``'s user (else anonymous); its id."""
    ws = stack.enter_context(connect(f"{server.ws_url}?ticket={server.ticket(http)}", open_timeout=5))
    hello = json.loads(ws.recv(timeout=5))
    assert hello["event"] == "@connected"
    return ws, hello["data"]["id"]


def listed(server, identity: str) -> dict:
    return requests.get(f"{server.url}/connections_of/{identity}", timeout=5).json()


def test_connections_of_lists_one_identitys_open_connections(server):
    """connections_of(identity) is exactly that user's open sockets; connections has everyone's."""
    alice, bob = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("alice", "bob"))
    with contextlib.ExitStack() as stack:
        alice_http = signed_in(server, alice)
        first, first_id = open_socket(stack, server, alice_http)
        _, second_id = open_socket(stack, server, alice_http)
        _, bob_id = open_socket(stack, server, signed_in(server, bob))
        _, anonymous_id = open_socket(stack, server)

        now = listed(server, alice)
        assert now["of"] == sorted([first_id, second_id])
        assert {first_id, second_id, bob_id, anonymous_id} <= set(now["all"])
        assert listed(server, bob)["of"] == [bob_id]
        assert listed(server, f"nobody-{uuid.uuid4().hex[:8]}")["of"] == []

        first.close()
        wait_until(lambda: listed(server, alice)["of"] == [second_id], 5, 0.02, "the closed socket to leave the list")
        assert first_id not in listed(server, bob)["all"]
    wait_until(lambda: listed(server, alice)["of"] == [] and listed(server, bob)["of"] == [], 5, 0.02,
               "every socket to leave the lists")
