"""The handshake's checks apart from any I/O (handshake.py): PROTOCOL.md
section 2 row by row, fed with header dicts, and the connection slots.
tests/test_handshake.py runs the same table against a live server."""
from __future__ import annotations

import pytest
from itsdangerous import URLSafeTimedSerializer

from flask_robe_sockets.backends.memory import MemoryBackend
from flask_robe_sockets.config import Settings
from flask_robe_sockets.errors import BackendUnavailable
from flask_robe_sockets.handshake import LIMIT_STATUS, Refusal, Slots, check, origin_allowed
from flask_robe_sockets.tickets import SALT, TicketSigner

from .test_tickets import IP, clock, make_signer  # noqa: F401 (clock is a fixture)

HOST = "app.example"


def upgrade(**changes: str | None) -> dict[str, str]:
    """A valid upgrade request's headers, with ``changes`` (None removes one)."""
    headers = {
        "Host": HOST,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def run(headers=None, ticket=None, settings=None, tickets=None, remote_addr=IP, scheme="http"):
    return check(
        upgrade() if headers is None else headers, ticket, remote_addr, scheme, HOST,
        settings or Settings(), tickets,
    )


def refusal(**kwargs) -> tuple[int, str]:
    with pytest.raises(Refusal) as info:
        run(**kwargs)
    return info.value.status, info.value.error


OPTIONAL = Settings(tickets_required=False)


# -- row 1: not a WebSocket upgrade ---------------------------------------


@pytest.mark.parametrize("changes", [
    {"Upgrade": None},
    {"Upgrade": "h2c"},
    {"Connection": None},
    {"Connection": "keep-alive"},
    {"Sec-WebSocket-Key": None},
    {"Sec-WebSocket-Key": ""},
    {"Sec-WebSocket-Version": None},
    {"Sec-WebSocket-Version": "8"},
    {"Host": None},
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()))
def test_not_a_websocket_upgrade_is_400(changes):
    """A request wsproto would not accept is refused 400 not_websocket, before anything else."""
    assert refusal(headers=upgrade(**changes), settings=OPTIONAL) == (400, "not_websocket")


def test_upgrade_tokens_are_read_as_http_spells_them():
    """Upgrade is case-insensitive and Connection a token list: browsers' spellings pass."""
    headers = upgrade(Upgrade="WebSocket", Connection="keep-alive, Upgrade")
    assert run(headers=headers, settings=OPTIONAL) is None


def test_not_websocket_comes_before_the_origin_and_the_ticket():
    """A request that is not an upgrade is not_websocket even with a bad Origin and no ticket."""
    headers = upgrade(Upgrade=None, Origin="https://evil.example")
    assert refusal(headers=headers) == (400, "not_websocket")


# -- row 2: the Origin ----------------------------------------------------


@pytest.mark.parametrize("origin, scheme, allowed", [
    (f"http://{HOST}", "http", True),
    (f"http://{HOST}", "ws", True),
    (f"HTTP://{HOST.upper()}", "http", True),
    (f"https://{HOST}", "https", True),
    (f"https://{HOST}", "wss", True),
    (f"https://{HOST}", "http", False),  # an https page on a plain request: not ours
    (f"http://{HOST}", "https", False),  # a plain page may not open our https socket
    (f"ftp://{HOST}", "http", False),
    ("null", "http", False),
    ("http://evil.example", "http", False),
    (f"http://{HOST}:8080", "http", False),
    (f"http://{HOST}.evil.example", "http", False),
])
def test_default_origin_is_the_request_host_with_a_matching_scheme(origin, scheme, allowed):
    """Without a list, only a page of the same host whose scheme matches the request's may connect."""
    assert origin_allowed(origin, None, scheme, HOST) is allowed
    headers = upgrade(Origin=origin)
    if allowed:
        assert run(headers=headers, settings=OPTIONAL, scheme=scheme) is None
    else:
        assert refusal(headers=headers, settings=OPTIONAL, scheme=scheme) == (403, "origin_not_allowed")


def test_origin_list_replaces_the_default():
    """A configured list allows its origins (case and a trailing slash aside) and nothing else, not even the host."""
    listed = ("https://app.example", "http://other.example:8080/")
    for origin in ("https://app.example", "HTTPS://APP.EXAMPLE/", "http://other.example:8080"):
        assert origin_allowed(origin, listed, "http", HOST)
    for origin in (f"http://{HOST}", "http://other.example", "https://evil.example"):
        assert not origin_allowed(origin, listed, "http", HOST)
    assert origin_allowed("https://anything.example", ("*",), "http", HOST)


def test_no_origin_header_passes():
    """A request without Origin (not a browser) is not refused for it."""
    assert run(headers=upgrade(Origin=None), settings=OPTIONAL) is None


def test_origin_comes_before_the_ticket():
    """A bad Origin without a ticket is origin_not_allowed, not ticket_missing."""
    assert refusal(headers=upgrade(Origin="https://evil.example")) == (403, "origin_not_allowed")


# -- rows 3-7: the ticket -------------------------------------------------


def test_ticket_missing_when_required():
    """No ticket where tickets are required: 401 ticket_missing."""
    assert refusal(tickets=make_signer()) == (401, "ticket_missing")


def test_no_ticket_when_optional_connects_anonymously():
    """Tickets optional and none sent: the identity is None."""
    assert run(settings=OPTIONAL, tickets=make_signer()) is None


def test_a_valid_ticket_gives_its_identity():
    """A genuine fresh ticket from its own IP gives the identity it was issued for."""
    signer = make_signer()
    assert run(ticket=signer.issue({"id": 7}, IP), tickets=signer) == {"id": 7}


@pytest.mark.parametrize("make_ticket", [
    lambda: "",
    lambda: "not a ticket",
    lambda: URLSafeTimedSerializer("another secret", salt=SALT).dumps({"i": "x", "a": IP, "n": "n"}),
    lambda: URLSafeTimedSerializer("secret", salt="another salt").dumps({"i": "x", "a": IP, "n": "n"}),
    lambda: URLSafeTimedSerializer("secret", salt=SALT).dumps(["not", "a", "dict"]),
    lambda: URLSafeTimedSerializer("secret", salt=SALT).dumps({"i": "x", "a": IP}),
], ids=["empty", "garbage", "other-key", "other-salt", "not-a-dict", "no-nonce"])
def test_malformed_or_forged_ticket_is_invalid(make_ticket):
    """Tickets that are not ours (empty, garbage, other key or salt, wrong shape) are 401 ticket_invalid."""
    # Signed when the test runs, not when it is collected: a ticket signed
    # minutes earlier, in a long run, would be refused as expired instead.
    assert refusal(ticket=make_ticket(), tickets=make_signer()) == (401, "ticket_invalid")


def test_a_ticket_is_checked_even_when_tickets_are_optional():
    """With tickets optional, a bad ticket that is sent is still refused."""
    assert refusal(ticket="forged", settings=OPTIONAL, tickets=make_signer()) == (401, "ticket_invalid")


def test_a_ticket_without_a_signer_is_invalid():
    """Without a SECRET_KEY (no signer) any ticket sent is ticket_invalid."""
    assert refusal(ticket="anything", settings=OPTIONAL, tickets=None) == (401, "ticket_invalid")


def test_an_old_ticket_is_expired(clock):  # noqa: F811 (the fixture)
    """A genuine ticket past its lifetime is 401 ticket_expired, and its nonce is not used up."""
    backend = MemoryBackend()
    signer = make_signer(max_age=30, backend=backend)
    ticket = signer.issue("alice", IP)
    clock.now += 31
    assert refusal(ticket=ticket, tickets=signer) == (401, "ticket_expired")
    clock.now -= 31
    assert run(ticket=ticket, tickets=signer) == "alice"


def test_a_used_ticket_is_refused_the_second_time():
    """The second use of a ticket is 401 ticket_used (the nonce store is the memory backend)."""
    signer = make_signer()
    ticket = signer.issue("alice", IP)
    assert run(ticket=ticket, tickets=signer) == "alice"
    assert refusal(ticket=ticket, tickets=signer) == (401, "ticket_used")


def test_a_ticket_from_another_ip_is_refused_and_used_up():
    """From another IP a ticket is ticket_wrong_ip, and it is used up: it leaked."""
    signer = make_signer()
    ticket = signer.issue("alice", IP)
    assert refusal(ticket=ticket, tickets=signer, remote_addr="10.0.0.9") == (401, "ticket_wrong_ip")
    assert refusal(ticket=ticket, tickets=signer) == (401, "ticket_used")


def test_ip_binding_off_accepts_another_ip():
    """With TICKET_BIND_IP off, a ticket works from any address."""
    signer = make_signer(bind_ip=False)
    assert run(ticket=signer.issue("alice", IP), tickets=signer, remote_addr="10.0.0.9") == "alice"


def test_nonce_store_down_is_503_backend_unavailable():
    """A ticket whose single use cannot be checked (the backend is down) is 503 backend_unavailable."""

    def down(nonce, ttl):
        raise BackendUnavailable("Redis is away")

    signer = TicketSigner(["secret"], max_age=30, bind_ip=True, claim_nonce=down)
    assert refusal(ticket=signer.issue("alice", IP), tickets=signer) == (503, "backend_unavailable")


# -- rows 8-10: the connection slots --------------------------------------


def slots(identity=1, ip=1, total=1) -> Slots:
    return Slots(Settings(
        max_connections_per_identity=identity, max_connections_per_ip=ip, max_connections=total,
    ))


def test_limits_are_checked_identity_then_ip_then_total():
    """With every limit full, the refusal is identity_limit, then ip_limit, then too_many_connections."""
    held = slots()
    with held.reserve("alice", "10.0.0.1") as full:
        assert full is None
        with held.reserve("alice", "10.0.0.1") as full:
            assert full == "identity_limit"
        with held.reserve("bob", "10.0.0.1") as full:
            assert full == "ip_limit"
        with held.reserve("bob", "10.0.0.2") as full:
            assert full == "too_many_connections"
        assert held.counts() == {"slots": 1, "identities": {'"alice"': 1}, "ips": {"10.0.0.1": 1}}
    assert [LIMIT_STATUS[name] for name in ("identity_limit", "ip_limit", "too_many_connections")] == [429, 429, 503]


def test_a_refused_reservation_takes_nothing():
    """A reservation refused by a limit leaves every count as it was."""
    held = slots(identity=1, ip=None, total=10)
    with held.reserve("alice", "10.0.0.1"):
        before = held.counts()
        with held.reserve("alice", "10.0.0.2") as full:
            assert full == "identity_limit"
            assert held.counts() == before


def test_anonymous_connections_are_not_counted_per_identity():
    """Identity None takes a slot and an IP count, never an identity count."""
    held = slots(identity=1, ip=None, total=10)
    with held.reserve(None, "10.0.0.1") as first, held.reserve(None, "10.0.0.1") as second:
        assert (first, second) == (None, None)
        assert held.counts() == {"slots": 2, "identities": {}, "ips": {"10.0.0.1": 2}}


def test_a_slot_is_given_back_however_the_block_ends():
    """The slot comes back when the block ends, by an exception too, and the counts are empty again."""
    held = slots()
    with pytest.raises(RuntimeError):
        with held.reserve("alice", "10.0.0.1") as full:
            assert full is None and held.taken == 1
            raise RuntimeError("the socket broke")
    assert held.counts() == {"slots": 0, "identities": {}, "ips": {}}
    with held.reserve("alice", "10.0.0.1") as full:
        assert full is None
    assert held.counts() == {"slots": 0, "identities": {}, "ips": {}}
