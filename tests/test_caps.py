"""Connection caps per identity and per client IP, and the ticket endpoint's
rate limit (PROTOCOL.md sections 1 and 2), against live gunicorn gevent workers.

Handshakes come from two loopback addresses, 127.0.0.1 and 127.0.0.2, so
that the per-IP cap can be told apart from the others. Refusals are read
with ``http.client``; sockets that get through are ``websockets`` clients.
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
from websockets.sync.client import connect

from .attack import Honest
from .rawws import HandshakeRefused, RawWebSocket
from .servers import Gunicorn, wait_until

LOCAL, OTHER = "127.0.0.1", "127.0.0.2"

CAPS = {
    "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": 3,
    "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IP": 5,
    "ROBE_SOCKETS_MAX_CONNECTIONS": 7,
    # Anonymous sockets (identity None) need no ticket; a named one's ticket
    # may be fetched from 127.0.0.1 and used from 127.0.0.2.
    "ROBE_SOCKETS_TICKETS_REQUIRED": False,
    "ROBE_SOCKETS_TICKET_BIND_IP": False,
}
IDLE = {"slots": 0, "identities": {}, "ips": {}}


@pytest.fixture(scope="module")
def capped():
    """At most 3 sockets per identity, 5 per IP and 7 in all."""
    srv = Gunicorn(CAPS)
    yield srv
    srv.stop()


@pytest.fixture
def sockets(capped):
    """Open sockets that the test may close; all closed after it, and the
    server's slot counts back to nothing."""
    with contextlib.ExitStack() as stack:

        def open_(ticket: str | None = None, source: str = LOCAL):
            return stack.enter_context(opened(capped, ticket, source))

        yield open_
    wait_until(lambda: capped.stats()["slot_counts"] == IDLE, 10, message="every slot to be given back")


# -- helpers ------------------------------------------------------------


@contextlib.contextmanager
def opened(srv, ticket: str | None = None, source: str = LOCAL):
    """A socket from ``source``, past ``@connected``."""
    url = srv.ws_url if ticket is None else f"{srv.ws_url}?ticket={ticket}"
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=(source, 0))
    with connect(url, sock=sock, open_timeout=5, close_timeout=2) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
        yield ws


def upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


def refusal(srv, ticket: str | None = None, source: str = LOCAL) -> tuple[int, str]:
    """Status and ``error`` of a handshake that must be refused (a JSON body, no upgrade)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/ops" + (f"?ticket={ticket}" if ticket else ""), headers=upgrade_headers())
        response = conn.getresponse()
        body = response.read()
        assert response.status != 101
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Sec-WebSocket-Accept") is None
        return response.status, json.loads(body)["error"]
    finally:
        conn.close()


def login(srv, user: str) -> requests.Session:
    http = requests.Session()
    assert http.post(f"{srv.url}/login", data={"user": user}, timeout=5).ok
    return http


def ticket_of(srv, http: requests.Session) -> str:
    response = http.post(f"{srv.url}/ops/ticket", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["ticket"]


def ticket_from(srv, source: str) -> http.client.HTTPResponse:
    """``POST /ops/ticket`` from ``source``, anonymous; the response, read."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("POST", "/ops/ticket")
        response = conn.getresponse()
        response.body = response.read()
        return response
    finally:
        conn.close()


def pong(ws, ref) -> bool:
    ws.send(json.dumps({"event": "@ping", "ref": ref}))
    return json.loads(ws.recv(timeout=5)) == {"event": "@pong", "data": None, "ref": ref}


def held(srv) -> dict:
    return srv.stats()["slot_counts"]


# -- the caps -------------------------------------------------------------


def test_identity_cap(capped, sockets):
    """The 4th socket of alice (cap 3) is 429 ``identity_limit`` while bob still
    connects; closing one of alice's frees her slot."""
    alice = login(capped, "alice")
    first = sockets(ticket_of(capped, alice))
    for _ in range(2):
        sockets(ticket_of(capped, alice))
    assert refusal(capped, ticket_of(capped, alice)) == (429, "identity_limit")
    # From another address too: the cap is per identity.
    assert refusal(capped, ticket_of(capped, alice), OTHER) == (429, "identity_limit")
    bob = sockets(ticket_of(capped, login(capped, "bob")))
    assert pong(bob, 1) and pong(first, 2)
    assert held(capped)["identities"] == {'"alice"': 3, '"bob"': 1}
    first.close()
    wait_until(lambda: held(capped)["identities"].get('"alice"') == 2, 5, message="alice's slot to be freed")
    assert pong(sockets(ticket_of(capped, alice)), 3)


def test_anonymous_sockets_are_not_counted_per_identity(capped, sockets):
    """Sockets without an identity (``None``) pass the identity cap: only the IP cap counts them."""
    anonymous = [sockets(source=OTHER) for _ in range(5)]  # over the identity cap of 3
    assert all(pong(ws, i) for i, ws in enumerate(anonymous))
    assert held(capped) == {"slots": 5, "identities": {}, "ips": {OTHER: 5}}


def test_ip_cap(capped, sockets):
    """The 6th socket from 127.0.0.2 (cap 5) is 429 ``ip_limit``, named or not, while
    127.0.0.1 still connects; closing one frees the address's slot."""
    from_other = [sockets(source=OTHER) for _ in range(5)]
    assert refusal(capped, source=OTHER) == (429, "ip_limit")
    assert refusal(capped, ticket_of(capped, login(capped, "carol")), OTHER) == (429, "ip_limit")
    assert pong(sockets(source=LOCAL), 1)
    from_other[0].close()
    wait_until(lambda: held(capped)["ips"].get(OTHER) == 4, 5, message="the address's slot to be freed")
    assert pong(sockets(source=OTHER), 2)


def test_limits_in_protocol_order(capped, sockets):
    """With every limit full at once, the refusal is the first of PROTOCOL.md's table:
    ticket checks, then identity_limit, then ip_limit, then too_many_connections."""
    alice = login(capped, "alice")
    for _ in range(3):
        sockets(ticket_of(capped, alice))  # alice full
    for _ in range(2):
        sockets(source=LOCAL)  # 127.0.0.1 full (5)
    for _ in range(2):
        sockets(source=OTHER)  # the worker full (7)
    assert held(capped) == {"slots": 7, "identities": {'"alice"': 3}, "ips": {LOCAL: 5, OTHER: 2}}
    bob = login(capped, "bob")
    # identity, IP and worker full; identity and worker full:
    assert refusal(capped, ticket_of(capped, alice), LOCAL) == (429, "identity_limit")
    assert refusal(capped, ticket_of(capped, alice), OTHER) == (429, "identity_limit")
    # IP and worker full:
    assert refusal(capped, ticket_of(capped, bob), LOCAL) == (429, "ip_limit")
    assert refusal(capped, None, LOCAL) == (429, "ip_limit")
    # only the worker full:
    assert refusal(capped, ticket_of(capped, bob), OTHER) == (503, "too_many_connections")
    assert refusal(capped, None, OTHER) == (503, "too_many_connections")
    # The ticket's checks come before every limit, and a ticket refused by a
    # limit has passed them: it is used up.
    assert refusal(capped, "forged", LOCAL) == (401, "ticket_invalid")
    ticket = ticket_of(capped, alice)
    assert refusal(capped, ticket, LOCAL) == (429, "identity_limit")
    assert refusal(capped, ticket, LOCAL) == (401, "ticket_used")
    assert held(capped)["slots"] == 7


def test_slots_are_given_back_on_every_path(capped):
    """Refused handshakes, handshakes cut before the 101 arrived, sockets reset or
    closed: afterwards no slot is held, and alice has her 3 again."""
    alice = login(capped, "alice")
    for _ in range(10):
        raw = socket.create_connection(("127.0.0.1", capped.port), timeout=5)
        request = (
            f"GET /ops?ticket={ticket_of(capped, alice)} HTTP/1.1\r\nHost: 127.0.0.1:{capped.port}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in upgrade_headers().items()) + "\r\n"
        )
        raw.sendall(request.encode())
        # A reset, not a FIN: whatever the server was doing with it fails.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()
    wait_until(lambda: held(capped) == IDLE, 10, message="the cut handshakes' slots to be given back")
    resets = [RawWebSocket(capped.ws_url, ticket_of(capped, alice)) for _ in range(3)]
    for raw in resets:
        raw.connected()
    with pytest.raises(HandshakeRefused) as refused:
        RawWebSocket(capped.ws_url, ticket_of(capped, alice))
    assert refused.value.status == 429
    for raw in resets:
        raw.reset()
    wait_until(lambda: held(capped) == IDLE, 10, message="every slot to be given back")
    with contextlib.ExitStack() as stack:
        for i in range(3):
            assert pong(stack.enter_context(opened(capped, ticket_of(capped, alice))), i)
        assert held(capped)["identities"] == {'"alice"': 3}
    wait_until(lambda: held(capped) == IDLE, 10, message="every slot to be given back")


def test_one_identity_cannot_take_every_socket(make_server):
    """Finding 6: one session opening sockets as fast as it can is capped at 32 by
    default (and slowed by the ticket rate limit); an honest user still connects,
    with a quick round trip all along."""
    srv = make_server({"TEST_LIBRARY_LIMITS": True})
    # An idle server's honest client measures what the machine alone costs a
    # round trip meanwhile (the attacker's loop runs in this very process).
    reference = make_server({})
    mallory = login(srv, "mallory")
    held_open, outcomes = [], {}
    with Honest(srv, interval=0.05) as honest, Honest(reference, interval=0.05) as ref:
        started = time.monotonic()
        # The attacker ignores every refusal, until 10 handshakes were refused.
        while outcomes.get("identity_limit", 0) < 10 and time.monotonic() - started < 60:
            response = mallory.post(f"{srv.url}/ops/ticket", timeout=5)
            if response.status_code != 200:
                key = response.json()["error"]
                outcomes[key] = outcomes.get(key, 0) + 1
                continue
            try:
                held_open.append(RawWebSocket(srv.ws_url, response.json()["ticket"]))
            except HandshakeRefused as exc:
                key = json.loads(exc.body)["error"]
                outcomes[key] = outcomes.get(key, 0) + 1
        attack = time.monotonic() - started
        try:
            with opened(srv, ticket_of(srv, login(srv, "bob"))) as bob:
                assert pong(bob, "after the attack")
            stats = srv.stats()
        finally:
            for raw in held_open:
                raw.close()
    print(
        f"\nfinding 6: {len(held_open)} sockets open after {attack:.1f} s of attack, "
        f"refusals {outcomes}; {honest.summary()}"
    )
    assert len(held_open) == 32
    assert set(outcomes) == {"identity_limit", "rate_limited"}
    assert outcomes["identity_limit"] == 10
    assert stats["slot_counts"]["identities"]['"mallory"'] == 32
    # 20 tickets at once, then 5 a second: the 42 tickets took at least 4.4 s.
    assert attack >= (32 + 10 - 20) / 5 - 0.5
    assert honest.lost == 0 and honest.p99() < max(0.05, ref.p99() + 0.02), (honest.summary(), ref.summary())


# -- the ticket rate limit ------------------------------------------------


def test_ticket_rate_limit(make_server):
    """With ``TICKET_RATE_LIMIT = (0.4, 3)`` a caller gets 3 tickets at once, then 429
    ``rate_limited`` with ``Retry-After: 3`` (2.5 s, rounded up); others have their own
    budget; after the wait it gets one again."""
    srv = make_server({"ROBE_SOCKETS_TICKET_RATE_LIMIT": [0.4, 3]})
    assert [ticket_from(srv, LOCAL).status for _ in range(3)] == [200] * 3
    refused = ticket_from(srv, LOCAL)
    assert refused.status == 429
    assert refused.getheader("Content-Type") == "application/json"
    assert json.loads(refused.body) == {"error": "rate_limited"}
    assert refused.getheader("Retry-After") == "3"
    # The same identity (anonymous) from another address, and another identity
    # from this one, are other callers.
    assert [ticket_from(srv, OTHER).status for _ in range(3)] == [200] * 3
    alice = login(srv, "alice")
    assert [alice.post(f"{srv.url}/ops/ticket", timeout=5).status_code for _ in range(4)] == [200] * 3 + [429]
    # Asking again while refused costs nothing, and says the time left.
    again = ticket_from(srv, LOCAL)
    assert again.status == 429 and 1 <= int(again.getheader("Retry-After")) <= 3
    # Waiting what was said is enough: the limit is the contract under test.
    time.sleep(int(refused.getheader("Retry-After")))
    granted = ticket_from(srv, LOCAL)
    assert granted.status == 200 and json.loads(granted.body)["expires_in"] == 30
    # A ticket that was given works.
    with opened(srv, json.loads(granted.body)["ticket"]) as ws:
        assert pong(ws, 1)
    assert ticket_from(srv, LOCAL).status == 429


# -- the browser client under the limits ----------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Runs in a page of the server's origin: the module's own address gives the
# default socket and ticket URLs, and the page's cookies go with the tickets.
CONNECT_JS = """
async ({ timeout }) => {
  const { Client } = await import("/ops/client.js");
  // Use up this caller's ticket budget first, as a reconnect loop would have.
  for (let i = 0; i < 20; i++) {
    if ((await fetch("/ops/ticket", { method: "POST" })).status === 429) break;
  }
  const started = performance.now();
  const events = [];
  const client = new Client({ reconnectDelay: 50, maxReconnectDelay: 5000 });
  window.robeClient = client;
  client.on("error", (e) => events.push(["error", performance.now() - started, e.code, e.retryAfter ?? null]));
  await new Promise((resolve, reject) => {
    client.on("connect", () => { events.push(["connect", performance.now() - started]); resolve(); });
    setTimeout(() => reject(new Error("no connect: " + JSON.stringify(events))), timeout);
  });
  const reply = await client.subscribe("room:1").send("whoami", null);
  client.close();
  return { events, identity: reply.identity };
}
"""


@pytest.fixture
def page():
    """A page of headless Chromium (Debian's), closed after the test."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true":
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def test_browser_client_waits_out_the_ticket_rate_limit(make_server, page):
    """The browser client's ticket request answered 429 rate_limited is an "error" event;
    it tries again after the Retry-After (1 s, not its 50 ms backoff) and connects."""
    srv = make_server({"ROBE_SOCKETS_TICKET_RATE_LIMIT": [1, 2]})
    page.goto(f"{srv.url}/stats")
    result = page.evaluate(CONNECT_JS, {"timeout": 15_000})
    events = result["events"]
    errors = [event for event in events if event[0] == "error"]
    assert errors and all(event[2:] == ["rate_limited", 1000] for event in errors), events
    assert len(errors) <= 2, events
    assert events[-1][0] == "connect" and events[-1][1] - errors[0][1] >= 950, events
    assert result["identity"] == "anonymous"


def test_browser_client_retries_a_handshake_at_the_identity_cap(make_server, page):
    """A handshake refused 429 identity_limit (a close before open, to a page) is retried
    with backoff until the identity's other socket closes; then it connects."""
    srv = make_server({"ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": 1})
    page.goto(f"{srv.url}/stats")
    with opened(srv, srv.ticket()):  # "anonymous", as the page is
        page.evaluate("""() => {
          window.errors = [];
          window.connecting = (async () => {
            const { Client } = await import("/ops/client.js");
            const client = new Client({ reconnectDelay: 50, maxReconnectDelay: 400 });
            client.on("error", (e) => window.errors.push(e.code));
            await new Promise((resolve) => client.on("connect", resolve));
            window.connected = true;
            const reply = await client.subscribe("room:1").send("whoami", null);
            client.close();
            return reply.identity;
          })();
        }""")
        page.wait_for_function("() => window.errors.length >= 3", timeout=15_000)
        assert set(page.evaluate("window.errors")) == {"connect_failed"}
        assert not page.evaluate("window.connected === true")
        assert held(srv)["identities"] == {'"anonymous"': 1}
    assert page.evaluate("window.connecting") == "anonymous"
