"""PROTOCOL.md sections 1 and 2: tickets and the handshake, against live servers.

Refusals are read with ``requests`` (or ``http.client`` where the source
address matters), successes with the ``websockets`` client. Every refusal
is followed by an honest client on the same server, to prove the attack
cost nobody else anything.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import time

import pytest
import requests
from itsdangerous import URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, bytes_to_int
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from flask_robe_sockets.tickets import SALT

from .servers import Gunicorn, free_port, wait_until

OTHER_IP = "127.0.0.2"
EVIL = "https://evil.example"
LISTED = ["https://app.example", "http://other.example:8080"]
SHORT_AGE = 2


@pytest.fixture(scope="module")
def custom():
    """Tickets optional, no IP binding, login required for a ticket, 2 s tickets,
    an origin list and room for 3 connections."""
    srv = Gunicorn({
        "TEST_LOGIN_REQUIRED": True,
        "ROBE_SOCKETS_TICKETS_REQUIRED": False,
        "ROBE_SOCKETS_TICKET_BIND_IP": False,
        "ROBE_SOCKETS_TICKET_MAX_AGE": SHORT_AGE,
        "ROBE_SOCKETS_ALLOWED_ORIGINS": LISTED,
        "ROBE_SOCKETS_MAX_CONNECTIONS": 3,
    })
    yield srv
    srv.stop()


# -- helpers ------------------------------------------------------------


def upgrade_headers(**extra: str) -> dict[str, str]:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    headers.update(extra)
    return headers


def attempt(srv, ticket: str | None = None, headers: dict | None = None) -> requests.Response:
    """A handshake that is expected to be refused (a 101 would leave it waiting)."""
    params = {} if ticket is None else {"ticket": ticket}
    return requests.get(
        f"{srv.url}/ops", params=params, timeout=5,
        headers=upgrade_headers() if headers is None else headers,
    )


def attempt_from(srv, source: str, ticket: str) -> tuple[int, str, bytes]:
    """A refused handshake from the loopback address ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", f"/ops?ticket={ticket}", headers=upgrade_headers())
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def ticket_from(srv, source: str) -> str:
    """A ticket issued to a client at the loopback address ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("POST", "/ops/ticket")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["ticket"]
    finally:
        conn.close()


def assert_refused(response: requests.Response, status: int, error: str) -> None:
    """A refusal is the table's status with a JSON body naming the error, never HTML."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": error}
    assert "Sec-WebSocket-Accept" not in response.headers


@contextlib.contextmanager
def opened(srv, ticket: str | None = None, source: str | None = None, **kwargs):
    """A socket past ``@connected``, from ``source`` when given; yields it and the hello."""
    url = srv.ws_url if ticket is None else f"{srv.ws_url}?ticket={ticket}"
    sock = None
    if source is not None:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=(source, 0))
    with connect(url, sock=sock, open_timeout=5, **kwargs) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["event"] == "@connected" and hello["data"]["protocol"] == 1
        yield ws, hello


def ask(ws, **fields) -> dict:
    ws.send(json.dumps(fields))
    return json.loads(ws.recv(timeout=5))


def whoami(ws, room: str = "room:lobby") -> dict:
    answer = ask(ws, channel=room, event="whoami", ref="who")
    assert answer["event"] == "@reply", answer
    return answer["data"]


def assert_served(srv) -> None:
    """An honest client connects and gets its answer; no handshake slot leaked."""
    # An anonymous ticket where the server hands them out, else none (tickets optional).
    response = requests.post(f"{srv.url}/ops/ticket", timeout=5)
    ticket = response.json()["ticket"] if response.status_code == 200 else None
    with opened(srv, ticket) as (ws, _):
        assert ask(ws, channel="chat", event="echo", data="hi", ref=1) == {
            "channel": "chat", "event": "@reply", "ref": 1, "data": {"echo": "hi"},
        }

    def settled():
        stats = srv.stats()
        return stats["slots"] == stats["connections"]

    wait_until(settled, 5, message="handshake slots to match open connections")


def login(srv, user: str) -> requests.Session:
    http = requests.Session()
    assert http.post(f"{srv.url}/login", data={"user": user}, timeout=5).ok
    return http


# -- section 1: tickets -------------------------------------------------


def test_ticket_response_shape(server):
    """``POST /ops/ticket`` answers 200 ``{"ticket": <string>, "expires_in": 30}`` as JSON."""
    response = requests.post(f"{server.url}/ops/ticket", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"ticket", "expires_in"}
    assert isinstance(body["ticket"], str) and body["ticket"]
    assert body["expires_in"] == 30


def test_ticket_unauthorized_without_identity(custom):
    """When the identity loader returns None the ticket request is 401 ``unauthorized``."""
    response = requests.post(f"{custom.url}/ops/ticket", timeout=5)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": "unauthorized"}
    body = login(custom, "alice").post(f"{custom.url}/ops/ticket", timeout=5).json()
    assert body["expires_in"] == SHORT_AGE and body["ticket"]


# -- section 2: each refusal, with every later fault present too ----------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": EVIL},
        {"Upgrade": "websocket"},
        {"Connection": "Upgrade"},
        {"Upgrade": "h2c", "Connection": "Upgrade", "Sec-WebSocket-Key": "x", "Sec-WebSocket-Version": "13"},
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
    ],
    ids=["plain", "plain-evil-origin", "no-connection", "no-upgrade", "other-protocol", "no-key"],
)
def test_not_websocket(server, headers):
    """A GET that is not a WebSocket upgrade is 400 ``not_websocket``, before any other check."""
    assert_refused(attempt(server, headers=headers), 400, "not_websocket")
    assert_served(server)


def test_not_websocket_with_a_ticket_keeps_the_ticket(server):
    """A plain GET with a good ticket is 400 and does not use the ticket up."""
    ticket = server.ticket()
    assert_refused(requests.get(f"{server.url}/ops", params={"ticket": ticket}, timeout=5), 400, "not_websocket")
    with opened(server, ticket):
        pass


@pytest.mark.parametrize(
    "upgrade, connection",
    [("websocket", "Upgrade"), ("WebSocket", "keep-alive, Upgrade"), ("websocket", "upgrade")],
    ids=["plain", "firefox", "lowercase"],
)
def test_browser_handshake_variants_upgrade(server, upgrade, connection):
    """Header spellings browsers use (Firefox: ``Connection: keep-alive, Upgrade``) get 101."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ops?ticket={server.ticket()} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Upgrade: {upgrade}\r\nConnection: {connection}\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{server.port}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1.evil.example", "http://127.0.0.1:1"])
def test_origin_not_allowed(server, origin):
    """A foreign ``Origin`` is 403 ``origin_not_allowed``, checked before the ticket."""
    assert_refused(attempt(server, headers=upgrade_headers(Origin=origin)), 403, "origin_not_allowed")
    assert_served(server)


@pytest.mark.parametrize("scheme", ["ftp", "https", "ws", "file", "chrome-extension"])
def test_same_host_origin_needs_the_request_scheme(server, scheme):
    """By default the same host is not enough: ``ftp://host`` or ``https://host`` on an
    http request is 403 ``origin_not_allowed``, and the ticket is not used up."""
    ticket = server.ticket()
    origin = f"{scheme}://127.0.0.1:{server.port}"
    assert_refused(attempt(server, ticket, upgrade_headers(Origin=origin)), 403, "origin_not_allowed")
    with opened(server, ticket, origin=f"HTTP://127.0.0.1:{server.port}"):
        pass
    assert_served(server)


@pytest.fixture(scope="module")
def proxied():
    """Behind a TLS-terminating proxy: ProxyFix reads the scheme from ``X-Forwarded-Proto``."""
    srv = Gunicorn({"TEST_PROXY_FIX": True})
    yield srv
    srv.stop()


@pytest.mark.parametrize("forwarded", ["https", "wss"])
def test_origin_scheme_follows_proxy_fix(proxied, forwarded):
    """Over https (as ProxyFix reports it; ``wss`` counts as https) an https page of the
    same host connects and an http one is refused."""
    host = f"127.0.0.1:{proxied.port}"
    proto = {"X-Forwarded-Proto": forwarded}
    with opened(proxied, proxied.ticket(), origin=f"https://{host}", additional_headers=proto) as (ws, _):
        assert ask(ws, event="@ping", ref=1) == {"event": "@pong", "data": None, "ref": 1}
    ticket = proxied.ticket()
    refused = attempt(proxied, ticket, upgrade_headers(Origin=f"http://{host}", **proto))
    assert_refused(refused, 403, "origin_not_allowed")
    # Without the header the request is http again, and so must the page be.
    assert_refused(attempt(proxied, ticket, upgrade_headers(Origin=f"https://{host}")), 403, "origin_not_allowed")
    with opened(proxied, ticket, origin=f"http://{host}"):
        pass


def test_origin_refusal_keeps_the_ticket(server):
    """A cross-origin handshake with a stolen ticket is refused without using the ticket up."""
    ticket = server.ticket()
    assert_refused(attempt(server, ticket, upgrade_headers(Origin=EVIL)), 403, "origin_not_allowed")
    with opened(server, ticket):
        pass


def test_same_host_origin_is_allowed(server):
    """By default an ``Origin`` naming the request's own host is allowed (and none is needed)."""
    with opened(server, server.ticket(), origin=f"http://127.0.0.1:{server.port}"):
        pass
    with opened(server, server.ticket()):
        pass


def test_allowed_origins_list(custom):
    """With ``ALLOWED_ORIGINS`` only the listed origins pass; the own host is no longer enough."""
    for origin in LISTED:
        with opened(custom, origin=origin):
            pass
    for origin in (f"http://127.0.0.1:{custom.port}", EVIL, "https://app.example.evil"):
        assert_refused(attempt(custom, headers=upgrade_headers(Origin=origin)), 403, "origin_not_allowed")
    assert_served(custom)


def test_ticket_missing(server):
    """Without a ticket the handshake is 401 ``ticket_missing``; websockets sees the same."""
    assert_refused(attempt(server), 401, "ticket_missing")
    with pytest.raises(InvalidStatus) as info:
        with connect(server.ws_url, open_timeout=5):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body) == {"error": "ticket_missing"}
    assert_served(server)


def _forgeries(ticket: str) -> dict[str, str]:
    payload = {"i": "admin", "a": "127.0.0.1", "n": "forged-nonce"}
    body, stamp, signature = ticket.rsplit(".", 2)
    return {
        "signature-flipped": f"{body}.{stamp}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}",
        "truncated": ticket[: len(ticket) // 2],
        "payload-swapped": URLSafeTimedSerializer("x", salt=SALT).dumps(payload).split(".")[0]
        + f".{stamp}.{signature}",
        "other-secret": URLSafeTimedSerializer("other secret", salt=SALT).dumps(payload),
        "other-salt": URLSafeTimedSerializer("test secret", salt="other salt").dumps(payload),
        "session-cookie-salt": URLSafeTimedSerializer("test secret", salt="cookie-session").dumps(payload),
        "no-nonce": URLSafeTimedSerializer("test secret", salt=SALT).dumps({"i": "admin", "a": "127.0.0.1"}),
        "garbage": "not-a-ticket",
        "empty": "",
    }


@pytest.mark.parametrize("kind", list(_forgeries("a.b.c")))
def test_ticket_invalid(server, kind):
    """Forged, truncated, other-secret, other-salt and malformed tickets are 401 ``ticket_invalid``."""
    forged = _forgeries(server.ticket())[kind]
    assert_refused(attempt(server, forged), 401, "ticket_invalid")
    assert_served(server)


def test_genuine_ticket_signed_with_the_app_key_works(server):
    """The control for the forgeries: the same payload shape with the app's secret and salt passes."""
    ticket = URLSafeTimedSerializer("test secret", salt=SALT).dumps(
        {"i": "crafted", "a": "127.0.0.1", "n": os.urandom(8).hex()}
    )
    with opened(server, ticket) as (ws, _):
        assert whoami(ws)["identity"] == "crafted"


def test_ticket_expired(custom):
    """A genuine ticket past its lifetime is 401 ``ticket_expired``, used before or not."""
    http = login(custom, "alice")
    used, unused = custom.ticket(http), custom.ticket(http)
    with opened(custom, used):
        pass
    issued = max(bytes_to_int(base64_decode(t.rsplit(".", 2)[1])) for t in (used, unused))
    # itsdangerous counts whole seconds: expired once a full second past max_age.
    wait_until(lambda: time.time() >= issued + SHORT_AGE + 1, 5, message="the tickets to expire")
    assert_refused(attempt(custom, unused), 401, "ticket_expired")
    assert_refused(attempt(custom, used), 401, "ticket_expired")
    assert_served(custom)


def test_fresh_short_lived_ticket_works(custom):
    """The control for expiry: the same server accepts a ticket used at once."""
    with opened(custom, custom.ticket(login(custom, "alice"))) as (ws, _):
        assert whoami(ws)["identity"] == "alice"


def test_ticket_used(server):
    """A ticket is valid once: the second handshake with it is 401 ``ticket_used``."""
    ticket = server.ticket()
    with opened(server, ticket):
        assert_refused(attempt(server, ticket), 401, "ticket_used")
    assert_refused(attempt(server, ticket), 401, "ticket_used")
    assert_served(server)


def test_ticket_used_is_checked_before_the_address(server):
    """A used ticket replayed from another address answers ``ticket_used`` (table order)."""
    ticket = server.ticket()
    with opened(server, ticket):
        pass
    status, content_type, body = attempt_from(server, OTHER_IP, ticket)
    assert (status, content_type, json.loads(body)) == (401, "application/json", {"error": "ticket_used"})


def test_ticket_wrong_ip(server):
    """A ticket presented from another client IP is 401 ``ticket_wrong_ip``."""
    ticket = server.ticket()
    status, content_type, body = attempt_from(server, OTHER_IP, ticket)
    assert (status, content_type, json.loads(body)) == (401, "application/json", {"error": "ticket_wrong_ip"})
    assert_served(server)


def test_ticket_is_bound_to_the_issuing_address(server):
    """A ticket issued to 127.0.0.2 works from 127.0.0.2 (and not from 127.0.0.1)."""
    with opened(server, ticket_from(server, OTHER_IP), source=OTHER_IP):
        pass
    assert_refused(attempt(server, ticket_from(server, OTHER_IP)), 401, "ticket_wrong_ip")


def test_ip_binding_off(custom):
    """With ``TICKET_BIND_IP`` off a ticket works from another address."""
    with opened(custom, custom.ticket(login(custom, "bob")), source=OTHER_IP) as (ws, _):
        assert whoami(ws)["identity"] == "bob"


def test_tickets_not_required(custom):
    """Without a ticket the socket opens with identity null; a present ticket is still checked."""
    with opened(custom) as (ws, hello):
        assert whoami(ws) == {"identity": None, "channel": "room:lobby", "id": hello["data"]["id"]}
    assert_refused(attempt(custom, "forged"), 401, "ticket_invalid")
    ticket = custom.ticket(login(custom, "carol"))
    with opened(custom, ticket) as (ws, _):
        assert whoami(ws)["identity"] == "carol"
    assert_refused(attempt(custom, ticket), 401, "ticket_used")
    assert_served(custom)


def test_too_many_connections(custom):
    """At the connection limit the next handshake is 503 ``too_many_connections``; the rest are served."""
    wait_until(lambda: custom.stats()["slots"] == 0, 5, message="the server to be idle")
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(opened(custom))[0] for _ in range(3)]
        wait_until(lambda: custom.stats()["slots"] == 3, 5, message="3 slots taken")
        assert_refused(attempt(custom), 503, "too_many_connections")
        # The ticket checks come first: a bad ticket is still 401, not 503.
        assert_refused(attempt(custom, "forged"), 401, "ticket_invalid")
        # A ticket that passed verification is used, even though 503 followed.
        ticket = custom.ticket(login(custom, "dave"))
        assert_refused(attempt(custom, ticket), 503, "too_many_connections")
        for i, ws in enumerate(sockets):
            assert ask(ws, channel="chat", event="echo", data=i, ref=i)["data"] == {"echo": i}
        assert custom.stats()["slots"] == 3
    wait_until(lambda: custom.stats()["slots"] == 0, 5, message="the slots to be released")
    assert_refused(attempt(custom, ticket), 401, "ticket_used")
    assert_served(custom)


# -- the identity, once connected ---------------------------------------


def test_identity_visible_to_handlers(server):
    """A ticket fetched after ``/login`` gives handlers that identity; anonymous stays anonymous."""
    with opened(server, server.ticket(login(server, "alice"))) as (ws, hello):
        assert whoami(ws, "room:42") == {"identity": "alice", "channel": "room:42", "id": hello["data"]["id"]}
    with opened(server, server.ticket()) as (ws, _):
        assert whoami(ws)["identity"] == "anonymous"


def test_private_channel_only_for_its_identity(server):
    """``user:<id>`` is joined by that identity only; another one gets ``forbidden``."""
    with opened(server, server.ticket(login(server, "alice"))) as (alice, _), \
            opened(server, server.ticket(login(server, "bob"))) as (bob, _):
        answer = ask(alice, channel="user:alice", event="@subscribe", ref=1)
        assert answer["event"] == "@subscribed" and answer["data"]["recovered"] is False
        refused = ask(bob, channel="user:alice", event="@subscribe", ref=2)
        assert refused["data"]["code"] == "forbidden"
        assert {k: v for k, v in refused.items() if k != "data"} == {
            "channel": "user:alice", "event": "@error", "ref": 2,
        }
        requests.post(
            f"{server.url}/broadcast/user:alice/secret", data="1",
            headers={"Content-Type": "application/json"}, timeout=5,
        ).raise_for_status()
        assert json.loads(alice.recv(timeout=5))["event"] == "secret"
        assert ask(bob, event="@ping", ref="fence") == {"event": "@pong", "data": None, "ref": "fence"}


def test_backend_unreachable_is_a_json_503(make_server):
    """With Redis down a ticket cannot be checked for reuse: 503 backend_unavailable, no socket."""
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    srv = make_server({"ROBE_SOCKETS_REDIS_URL": dead})
    assert_refused(attempt(srv, srv.ticket()), 503, "backend_unavailable")


def test_subscribe_with_the_backend_down_closes_1011(make_server):
    """A join that cannot reach Redis closes with 1011, so the client reconnects and asks again."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    srv = make_server({"ROBE_SOCKETS_REDIS_URL": dead, "ROBE_SOCKETS_TICKETS_REQUIRED": False})
    with connect(srv.ws_url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        ws.send(json.dumps({"channel": "chat", "event": "@subscribe", "ref": 1}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    assert closed.value.rcvd.code == 1011
