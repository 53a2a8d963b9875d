"""Tickets apart from any server: signing, refusals, single use (PROTOCOL.md section 1)."""
from __future__ import annotations

import pytest
from itsdangerous import URLSafeTimedSerializer

from flask_robe_sockets import ratelimit
from flask_robe_sockets.backends import memory
from flask_robe_sockets.backends.memory import MemoryBackend
from flask_robe_sockets.errors import ConfigurationError, TicketError
from flask_robe_sockets.ratelimit import CallerRateLimit
from flask_robe_sockets.tickets import SALT, TicketSigner, caller, identity_key

IP = "127.0.0.1"


class Clock:
    """A stand-in for the ``time`` module whose clocks move only when told."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Freeze the clocks that itsdangerous and the memory backend read."""
    fake = Clock()
    monkeypatch.setattr("itsdangerous.timed.time", fake)
    monkeypatch.setattr(memory, "time", fake)
    monkeypatch.setattr(ratelimit, "time", fake)
    return fake


def make_signer(keys=("secret",), max_age=30, bind_ip=True, backend=None) -> TicketSigner:
    backend = backend or MemoryBackend()
    return TicketSigner(list(keys), max_age=max_age, bind_ip=bind_ip, claim_nonce=backend.claim_nonce)


def refusal(signer: TicketSigner, ticket: str, ip: str = IP) -> str:
    with pytest.raises(TicketError) as info:
        signer.verify(ticket, ip)
    assert info.value.message
    return info.value.code


@pytest.mark.parametrize("identity", ["alice", 42, {"id": 7, "roles": ["admin"]}, None])
def test_issue_then_verify_returns_the_identity(identity):
    """A fresh ticket verifies once and gives back the identity it was issued for."""
    signer = make_signer()
    assert signer.verify(signer.issue(identity, IP), IP) == identity


def test_tickets_are_url_safe_and_unique():
    """Two tickets for the same caller differ (their nonces do) and fit in a URL as they are."""
    signer = make_signer()
    first, second = signer.issue("alice", IP), signer.issue("alice", IP)
    assert first != second
    assert all(c.isalnum() or c in "-_." for c in first)


def test_ticket_is_single_use():
    """A ticket that passed verification is refused the second time as ``ticket_used``."""
    signer = make_signer()
    ticket = signer.issue("alice", IP)
    signer.verify(ticket, IP)
    assert refusal(signer, ticket) == "ticket_used"


def test_expired_ticket(clock):
    """A ticket older than ``max_age`` is ``ticket_expired``, and a fresh one still works."""
    signer = make_signer(max_age=30)
    ticket = signer.issue("alice", IP)
    clock.now += 31
    assert refusal(signer, ticket) == "ticket_expired"
    assert signer.verify(signer.issue("alice", IP), IP) == "alice"


def test_ticket_valid_up_to_its_max_age(clock):
    """A ticket is still good exactly ``max_age`` seconds after issue."""
    signer = make_signer(max_age=30)
    ticket = signer.issue("alice", IP)
    clock.now += 30
    assert signer.verify(ticket, IP) == "alice"


def test_expired_ticket_is_not_marked_used(clock):
    """Only a ticket that passes verification is used up: an expired one reports expiry again."""
    signer = make_signer(max_age=30)
    ticket = signer.issue("alice", IP)
    clock.now += 31
    assert refusal(signer, ticket) == "ticket_expired"
    assert refusal(signer, ticket) == "ticket_expired"


def change_signature(ticket: str) -> str:
    """``ticket`` with the first character of its signature changed.

    Not the last: a 20-byte HMAC is 27 base64 characters whose last one
    carries 2 padding bits that decoding ignores, so changing it from "A"
    to "B" left the signature valid in one ticket out of 16.
    """
    head, _, signature = ticket.rpartition(".")
    first = "B" if signature[0] == "A" else "A"
    return f"{head}.{first}{signature[1:]}"


@pytest.mark.parametrize(
    "mangle",
    [
        change_signature,
        lambda t: t[: len(t) // 2],  # truncated
        lambda t: "x" + t,  # payload changed
        lambda t: "",
        lambda t: "not a ticket",
        lambda t: "a.b.c",
        lambda t: t.replace(".", ""),
    ],
)
def test_forged_or_malformed_ticket_is_invalid(mangle):
    """Any change to a ticket, or garbage, is ``ticket_invalid``."""
    signer = make_signer()
    assert refusal(signer, mangle(signer.issue("alice", IP))) == "ticket_invalid"


def test_ticket_of_another_secret_is_invalid():
    """A ticket signed with another app's secret is ``ticket_invalid``."""
    other = make_signer(keys=["other secret"])
    assert refusal(make_signer(), other.issue("alice", IP)) == "ticket_invalid"


def test_ticket_of_another_salt_is_invalid():
    """A token signed with the same secret for another purpose is ``ticket_invalid``."""
    forged = URLSafeTimedSerializer("secret", salt="itsdangerous").dumps({"i": "root", "a": IP, "n": "x"})
    assert refusal(make_signer(), forged) == "ticket_invalid"


def test_genuinely_signed_payload_without_nonce_is_invalid():
    """A correctly signed token that is not shaped like a ticket is ``ticket_invalid``."""
    serializer = URLSafeTimedSerializer("secret", salt=SALT)
    for payload in ({"i": "alice", "a": IP}, ["alice"], "alice", {"i": "a", "a": IP, "n": 5}):
        assert refusal(make_signer(), serializer.dumps(payload)) == "ticket_invalid"


def test_ticket_from_another_ip_is_wrong_ip():
    """With IP binding on, a ticket presented from another address is ``ticket_wrong_ip``."""
    signer = make_signer()
    assert refusal(signer, signer.issue("alice", IP), "127.0.0.2") == "ticket_wrong_ip"


def test_wrong_ip_burns_the_ticket():
    """A ticket seen from another address has leaked: it is used up (used is checked first)."""
    signer = make_signer()
    ticket = signer.issue("alice", IP)
    assert refusal(signer, ticket, "10.0.0.9") == "ticket_wrong_ip"
    assert refusal(signer, ticket, IP) == "ticket_used"


def test_ip_binding_off_accepts_any_address():
    """With IP binding off, the address a ticket is presented from does not matter."""
    signer = make_signer(bind_ip=False)
    assert signer.verify(signer.issue("alice", IP), "10.1.2.3") == "alice"


def test_secret_key_rotation():
    """Tickets signed with a fallback key still verify; new ones use the newest key."""
    old = make_signer(keys=["old"])
    backend = MemoryBackend()
    rotated = make_signer(keys=["old", "new"], backend=backend)
    assert rotated.verify(old.issue("alice", IP), IP) == "alice"
    fresh = rotated.issue("bob", IP)
    assert make_signer(keys=["new"]).verify(fresh, IP) == "bob"
    assert refusal(make_signer(keys=["old"]), fresh) == "ticket_invalid"


def test_used_nonce_is_shared_through_the_backend():
    """Two signers on one backend (two workers, one store) refuse each other's used tickets."""
    backend = MemoryBackend()
    first, second = make_signer(backend=backend), make_signer(backend=backend)
    ticket = first.issue("alice", IP)
    first.verify(ticket, IP)
    assert refusal(second, ticket) == "ticket_used"


@pytest.mark.parametrize("identity", [object(), {1, 2}, b"bytes", float("nan"), {"x": float("inf")}])
def test_non_json_identity_is_a_clear_error_at_issue(identity):
    """An identity that is not JSON fails when the ticket is issued, saying what to return."""
    with pytest.raises(ConfigurationError, match="not JSON.*str, int or dict"):
        make_signer().issue(identity, IP)


def test_no_secret_key_is_a_configuration_error():
    """Without a secret key tickets cannot be signed: the error says to set one."""
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        make_signer(keys=[])


def test_claim_nonce_once_until_it_expires(clock):
    """A nonce is claimed once; after its lifetime it is forgotten."""
    backend = MemoryBackend()
    assert backend.claim_nonce("n", 10)
    assert not backend.claim_nonce("n", 10)
    clock.now += 10.5
    assert backend.claim_nonce("n", 10)


def test_nonce_memory_stays_bounded(clock):
    """Under a steady stream of tickets, expired nonces are dropped: memory stays bounded."""
    backend = MemoryBackend()
    largest = 0
    for i in range(20_000):
        clock.now += 0.01  # 100 tickets a second, each remembered for 5 s
        assert backend.claim_nonce(f"nonce-{i}", 5)
        largest = max(largest, len(backend._nonces))
    # 500 are live at any moment; sweeps run once the store passes 1,000.
    assert largest <= 1_200


# -- the ticket endpoint's rate limit -------------------------------------


def test_ticket_rate_limit_burst_then_rate(clock):
    """A caller gets ``burst`` tickets at once, then one per ``1/rate`` s; the wait is said."""
    limit = CallerRateLimit(4, 20)
    assert [limit.check(("alice", IP)) for _ in range(20)] == [0.0] * 20
    assert limit.check(("alice", IP)) == 0.25
    clock.now += 0.125
    assert limit.check(("alice", IP)) == 0.125
    clock.now += 0.125
    assert limit.check(("alice", IP)) == 0.0
    assert limit.check(("alice", IP)) > 0


def test_ticket_rate_limit_is_per_identity_and_address(clock):
    """Another identity, another address, or the anonymous caller each have their own bucket."""
    limit = CallerRateLimit(1, 2)

    def check(identity, address):
        return limit.check(caller(identity, address))

    for who in (("alice", IP), ("bob", IP), ("alice", "127.0.0.2"), (None, IP), ({"id": 7}, IP)):
        assert check(*who) == 0.0 and check(*who) == 0.0
        assert check(*who) > 0, who
    # 1 and "1" are two identities; a dict is the same whatever its key order.
    assert check(1, IP) == 0.0 and check("1", IP) == 0.0
    assert check({"id": 7}, IP) > 0
    assert identity_key({"a": 1, "b": 2}) == identity_key({"b": 2, "a": 1})


def test_ticket_rate_limit_memory_stays_bounded_by_time(clock):
    """Rotating identities: a bucket idle for ``burst/rate`` s is full again and dropped."""
    limit = CallerRateLimit(5, 20)  # a bucket refills in 4 s
    largest = 0
    for i in range(20_000):
        clock.now += 0.001  # 1,000 new callers a second
        assert limit.check((f"user-{i}", IP)) == 0.0
        largest = max(largest, len(limit))
    assert largest <= 4_001
    # A caller that stayed over its rate is still remembered meanwhile.
    limit = CallerRateLimit(5, 20)
    for _ in range(21):
        limit.check(("alice", IP))
    for i in range(1_000):
        clock.now += 0.0001
        limit.check((f"user-{i}", IP))
    assert limit.check(("alice", IP)) > 0


def test_ticket_rate_limit_memory_stays_bounded_by_count(clock):
    """Past ``max_callers`` the least recently used buckets go first, whatever the rate."""
    limit = CallerRateLimit(5, 20, max_callers=100)
    for i in range(10_000):
        limit.check((None, f"10.0.{i // 256}.{i % 256}"))
    assert len(limit) <= 100
