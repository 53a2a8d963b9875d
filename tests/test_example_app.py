"""The example chat without a browser: pages, sign-in, the hooks and the job
through the in-process test client, and what it does against hostile
visitors, against real gunicorn servers."""
from __future__ import annotations

import json
import re
import secrets
from html.parser import HTMLParser
from http.client import HTTPConnection
from types import SimpleNamespace

import pytest
import requests
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from example_app import app, chat, create_app, realtime
from example_app.extensions import sockets
from example_app.security import UnsafeRedirect, same_site_path
from flask_robe_sockets import Forbidden, Message
from flask_robe_sockets.client import ConnectError, ReplyError
from flask_robe_sockets.tickets import TicketSigner

from .servers import BIN, Gunicorn, Process, free_port

APP = "example_app:app"
CONFIG = "example_app/gunicorn.conf.py"
#: The key the example used to run with whenever SECRET_KEY was unset.
OLD_KEY = "dev only: set SECRET_KEY in production"
#: In memory and without a key, whatever the environment running the tests says.
KEYLESS = {"SECRET_KEY": "", "REDIS_URL": ""}
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


# -- helpers ------------------------------------------------------------


@pytest.fixture
def client():
    return app.test_client()


def fresh(prefix: str = "alice") -> str:
    """A name of its own: the servers outlive a test, and the ticket rate
    limit counts per name."""
    return f"{prefix}-{secrets.token_hex(3)}"


def csrf_token(page: str) -> str:
    match = TOKEN.search(page)
    assert match, "the page has no CSRF token"
    return match.group(1)


def sign_in(client, name="alice"):
    """Sign in as a browser does: the form first, for its token."""
    token = csrf_token(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"name": name, "csrf_token": token})


def http_sign_in(srv: Gunicorn, name: str, http: requests.Session | None = None, next_: str | None = None):
    """Sign in over HTTP; returns the session and the POST's response."""
    http = http or requests.Session()
    token = csrf_token(http.get(f"{srv.url}/login", timeout=5).text)
    query = "" if next_ is None else f"?next={next_}"
    response = http.post(
        f"{srv.url}/login{query}", data={"name": name, "csrf_token": token}, allow_redirects=False, timeout=5
    )
    return http, response


def ticket_of(srv: Gunicorn, http: requests.Session) -> requests.Response:
    return http.post(f"{srv.url}/ops/ticket", timeout=5)


def forged_session(key: str, name: str) -> str:
    """A session cookie for ``name`` signed as Flask signs them, with ``key``."""
    forger = Flask("forger")
    forger.secret_key = key
    return SecureCookieSessionInterface().get_signing_serializer(forger).dumps({"name": name})


def forged_ticket(key: str, name: str) -> str:
    """A socket ticket for ``name`` at 127.0.0.1, signed as the extension signs them, with ``key``."""
    return TicketSigner([key], max_age=30, bind_ip=True, claim_nonce=lambda nonce, ttl: True).issue(
        name, "127.0.0.1"
    )


def handshake_status(srv: Gunicorn, ticket: str) -> int:
    """101 when the socket opened with ``ticket``, else the refusal's status."""
    try:
        with connect(f"{srv.ws_url}?ticket={ticket}", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["event"] == "@connected"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def serve_example(*args: str, env: dict | None = None) -> Process:
    """gunicorn as ``scripts/serve-example`` runs it, on a free port."""
    return Process(
        [str(BIN / "gunicorn"), "-c", CONFIG, "--no-control-socket", "-b", f"127.0.0.1:{free_port()}",
         *args, APP],
        env={**KEYLESS, **(env or {})}, name="gunicorn",
    )


def exits(process: Process, timeout: float = 30) -> int:
    """Wait for ``process`` to end by itself; its exit code."""
    try:
        return process.proc.wait(timeout)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def keyless():
    """The example as ``serve-example`` starts it: one worker, in memory, no SECRET_KEY."""
    srv = Gunicorn(app=APP, extra=["-c", CONFIG], env=KEYLESS)
    yield srv
    srv.stop()


@pytest.fixture
def make_example():
    """Start example servers with their own environment; stopped after the test."""
    started = []

    def make(env: dict, **kwargs) -> Gunicorn:
        srv = Gunicorn(app=APP, env={**KEYLESS, **env}, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


# -- pages and the chat -------------------------------------------------


def test_pages_ask_for_a_name_first(client):
    """Every chat page sends a visitor without a name to the sign-in form."""
    response = client.get("/rooms/random")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/rooms/random"
    assert client.get("/rooms/random/messages").status_code == 302
    assert client.post("/ops/ticket").status_code == 401


def test_sign_in_takes_a_channel_safe_name(client):
    """A name must fit in a channel name; a bad one is refused with a hint."""
    for bad in ("", "a b", "x" * 33, "<script>", "user:eve"):
        response = sign_in(client, bad)
        assert response.status_code == 400
        assert b"Use 1 to 32 letters" in response.data
    response = sign_in(client, "alice.w-2")
    assert response.status_code == 302
    assert client.post("/ops/ticket").status_code == 200


def test_room_page_shows_history_as_text(client):
    """Recent messages are rendered escaped, and the page names the client module."""
    entry = chat.post_message(
        Message("room:python", "message", {"text": "  <script>alert(1)</script>  "}).to_dict(), "mallory"
    )
    assert entry["text"] == "<script>alert(1)</script>"
    sign_in(client)
    page = client.get("/rooms/python").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)" not in page
    assert 'data-client="/ops/client.js"' in page
    assert client.get("/rooms/python/messages").json["messages"][-1] == entry
    assert client.get("/rooms/nowhere").status_code == 404


@pytest.fixture
def jobs_in_process(monkeypatch):
    """The background job runs within the handler, so a test reads its broadcasts
    as soon as the send returns (in memory it is a thread of its own)."""
    monkeypatch.setattr(chat, "dispatch", chat.post_message)
    monkeypatch.setattr(chat, "people", chat.MemoryPeople(100))


def test_a_signed_in_browser_gets_a_socket(client):
    """The ticket comes from the sign-in's session cookie; without one, none."""
    with pytest.raises(ConnectError) as refused:
        sockets.test_client(app, flask_client=client)
    assert (refused.value.code, refused.value.status) == ("unauthorized", 401)
    sign_in(client, "alice")
    with sockets.test_client(app, flask_client=client) as alice:
        assert alice.identity == "alice"


def test_signing_out_closes_that_persons_sockets_everywhere():
    """Signing out in one browser closes every socket of that name with 4500,
    whoever opened it; another person's socket stays open."""
    alice, other_tab, bob = app.test_client(), app.test_client(), app.test_client()
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    with sockets.test_client(app, flask_client=alice) as tab1, \
            sockets.test_client(app, identity="alice") as tab2, \
            sockets.test_client(app, flask_client=bob) as bobs:
        for connection in (tab1, tab2, bobs):
            connection.subscribe("room:lobby")
        page = alice.get("/rooms/lobby").get_data(as_text=True)
        response = alice.post("/logout", data={"csrf_token": csrf_token(page)})
        assert (response.status_code, response.headers["Location"]) == (302, "/login")
        assert (tab1.connected, tab1.close_code) == (False, 4500)
        assert (tab2.connected, tab2.close_code) == (False, 4500)
        assert bobs.connected and bobs.close_code is None
        assert bobs.subscribe("user:bob")["recovered"] is False
    # Signed out: no ticket for the old cookie, and signing out again closes nothing.
    with pytest.raises(ConnectError):
        sockets.test_client(app, flask_client=alice)
    with sockets.test_client(app, identity="alice") as again:
        page = other_tab.get("/login").get_data(as_text=True)
        assert other_tab.post("/logout", data={"csrf_token": csrf_token(page)}).status_code == 302
        assert again.connected


def test_authorize_opens_rooms_and_only_ones_own_private_channel():
    """Known rooms are open to all; ``user:<name>`` only to that name."""
    with sockets.test_client(app, identity="alice") as alice:
        for channel in ("room:lobby", "user:alice"):
            assert alice.subscribe(channel)["recovered"] is False
        for channel in ("room:secret", "user:bob", "chat"):
            with pytest.raises(ReplyError) as refused:
                alice.subscribe(channel)
            assert (refused.value.code, refused.value.channel) == ("forbidden", channel)
        with pytest.raises(ReplyError) as refused:
            alice.send("user:bob", "message", {"text": "hi"})
        assert refused.value.code == "forbidden"


def test_rooms_show_who_is_online():
    """A room's @subscribed lists its members and the others hear of joins and
    leaves; two tabs of one person are two members and one user."""
    with sockets.test_client(app, identity="alice") as tab1, sockets.test_client(app, identity="alice") as tab2:
        assert tab1.subscribe("room:lobby")["presence"]["users"] == 1
        with sockets.test_client(app, identity="bob") as bob:
            presence = bob.subscribe("room:lobby")["presence"]
            assert presence["clients"] == 2 and presence["users"] == 2
            assert {m["identity"] for m in presence["members"]} == {"alice", "bob"}
            tab2.subscribe("room:lobby")
            assert [(f["event"], f["data"]["identity"]) for f in bob.received()] == [("@join", "alice")]
        assert [f["event"] for f in tab1.received()] == ["@join", "@join", "@leave"]
        assert "presence" not in tab1.subscribe("user:alice")


def test_handler_checks_the_text_and_hands_it_to_the_job(monkeypatch):
    """The handler answers at once and leaves the broadcast to the job."""
    jobs = []
    monkeypatch.setattr(chat, "dispatch", lambda message, user: jobs.append((message, user)))
    with sockets.test_client(app, identity="alice") as alice:
        assert alice.send("room:lobby", "message", {"text": "hi"}) == {"queued": True}
        ((message, user),) = jobs
        assert (Message.from_dict(message).channel, message["data"], user) == ("room:lobby", {"text": "hi"}, "alice")
        for data in (None, "hi", {"text": "   "}, {"text": 5}, {"text": "x" * 501}):
            with pytest.raises(ReplyError) as refused:
                alice.send("room:lobby", "message", data)
            assert refused.value.code == "forbidden"
            assert refused.value.message == "a message is 1 to 500 characters of text"
        assert alice.received() == [] and len(jobs) == 1
    with pytest.raises(Forbidden):  # the same check, called as a function
        realtime.on_message(Message("room:lobby", "message", None), SimpleNamespace(identity="alice"))


def test_job_broadcasts_to_the_room_and_to_who_is_mentioned(jobs_in_process):
    """The job keeps the message, sends it to the room, and notifies each
    mentioned person who signed in (not the author, not a stranger) on their
    private channel, once, in the order they are named."""
    for name in ("alice", "bob", "carol"):
        chat.people.add(name)
    clients = {name: sockets.test_client(app, identity=name) for name in ("alice", "bob", "carol")}
    try:
        for name, client in clients.items():
            client.subscribe(f"user:{name}")
        clients["alice"].subscribe("room:lobby")
        text = "@carol and @bob, @carol! mail@example.com @alice @nobody"
        assert clients["alice"].send("room:lobby", "message", {"text": text}) == {"queued": True}
        (broadcast,) = clients["alice"].received()
        entry = broadcast["data"]
        assert (broadcast["channel"], broadcast["event"], entry["user"], entry["text"]) == (
            "room:lobby", "message", "alice", text,
        )
        for name in ("bob", "carol"):
            (mention,) = clients[name].received()
            assert (mention["channel"], mention["event"], mention["data"]) == (
                f"user:{name}", "mention", {**entry, "room": "lobby"},
            )
        assert chat.history.recent("lobby")[-1] == entry
    finally:
        for client in clients.values():
            client.close()


def test_job_notifies_at_most_five_mentions(monkeypatch):
    """A message naming many people who signed in notifies the first five."""
    monkeypatch.setattr(chat, "people", chat.MemoryPeople(100))
    names = [f"p{index}" for index in range(40)]
    for name in names:
        chat.people.add(name)
    assert chat.MAX_MENTIONS == 5
    assert chat.mentioned(" ".join(f"@{name}" for name in names), "alice") == names[:5]


def test_job_in_process_publishes_through_the_extension():
    """Without Redis the job's broadcast goes through the app's own extension."""
    backend = app.extensions["robe_sockets"].backend
    before = backend.recover("room:random", None, None).seq
    chat.post_message(Message("room:random", "message", {"text": "hi"}).to_dict(), "alice")
    assert backend.recover("room:random", None, None).seq == before + 1


def test_client_module_is_served_with_its_types(client):
    """``/ops/client.js`` is JavaScript with caching headers; its .d.ts is beside it."""
    # Closed explicitly: the body is the open file.
    with client.get("/ops/client.js") as response:
        assert response.status_code == 200
        assert response.mimetype == "text/javascript"
        assert "max-age=3600" in response.headers["Cache-Control"]
        assert b"export class Client" in response.data
    with client.get("/ops/client.d.ts") as response:
        assert response.status_code == 200
        assert response.mimetype == "text/plain"
        assert b"export declare class Client" in response.data


# -- where a sign-in may send the browser -------------------------------

#: ``next`` values that lead (or, in some browser, could lead) off the site,
#: as sent on the wire.
OFF_SITE = [
    "/%09/127.0.0.1:8000/pwned.html",  # browsers drop the tab: //127.0.0.1:8000/...
    "/%0d%0a/evil.example",  # a CR LF (once a 500)
    "/%0a/evil.example",
    "/%0d/evil.example",
    "/\\evil.example",  # browsers read \ as /
    "/%5Cevil.example",
    "%5C%5Cevil.example",
    "////evil.example",
    "//evil.example/",
    "/%2F/evil.example",
    "https://evil.example/",
    "http:/evil.example",
    "javascript:alert(1)",
    "evil.example",
    "/%20/evil.example",
    "/%E2%80%8B/evil.example",  # a zero-width space
    "",
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_sign_in_refuses_a_next_off_the_site(keyless, target):
    """``POST /login?next=`` anything but a path of this site is a 400, never
    a redirect nor a 500, and signs nobody in."""
    http, response = http_sign_in(keyless, fresh(), next_=target)
    assert response.status_code == 400, response.headers.get("Location")
    assert "next must be a path of this site" in response.text
    assert "Location" not in response.headers
    assert ticket_of(keyless, http).status_code == 401


def test_sign_in_redirects_to_a_path_of_the_site(keyless):
    """A ``next`` path of this site, query included, is where the sign-in goes;
    without one it goes to the lobby."""
    for target in ("/rooms/python", "/rooms/python?x=1"):
        http, response = http_sign_in(keyless, fresh(), next_=target)
        assert response.status_code == 302
        assert response.headers["Location"] == target
        assert ticket_of(keyless, http).status_code == 200
    _, response = http_sign_in(keyless, fresh())
    assert response.headers["Location"] == "/"


def test_same_site_path_decides_on_the_decoded_value():
    """The check itself, on what Flask decoded from the query."""
    for bad in ("/\t/evil", "/\r\n/evil", "/\\evil", "\\\\evil", "//evil", "///evil", "https://evil",
                "/\x7f", "/\u200b/evil", "/ /evil", "rooms/lobby", ""):
        with pytest.raises(UnsafeRedirect):
            same_site_path(bad)
    assert same_site_path("/rooms/lobby?x=1#top") == "/rooms/lobby?x=1#top"


# -- CSRF ---------------------------------------------------------------


def test_sign_in_needs_the_forms_token(keyless):
    """A sign-in posted without this session's token (another site's form:
    login CSRF) is refused; with it, it works."""
    stranger, _ = http_sign_in(keyless, fresh("mallory"))  # a valid token, of another session
    stranger_token = csrf_token(stranger.get(f"{keyless.url}/login", timeout=5).text)
    http = requests.Session()
    token = csrf_token(http.get(f"{keyless.url}/login", timeout=5).text)
    name = fresh()
    for data in ({"name": name}, {"name": name, "csrf_token": "x" + token[1:]},
                 {"name": name, "csrf_token": stranger_token}):
        response = http.post(f"{keyless.url}/login", data=data, allow_redirects=False, timeout=5)
        assert response.status_code == 400
        assert "please try again" in response.text
        assert ticket_of(keyless, http).status_code == 401
    # Without any cookie at all, as a cross-site form would usually arrive.
    response = requests.post(f"{keyless.url}/login", data={"name": name, "csrf_token": token},
                             allow_redirects=False, timeout=5)
    assert response.status_code == 400
    response = http.post(f"{keyless.url}/login", data={"name": name, "csrf_token": token},
                         allow_redirects=False, timeout=5)
    assert response.status_code == 302
    assert ticket_of(keyless, http).status_code == 200


def test_sign_out_needs_the_pages_token(keyless):
    """Signing out takes the token the room page carries; without it the
    session stays."""
    http, _ = http_sign_in(keyless, fresh())
    page = http.get(f"{keyless.url}/rooms/lobby", timeout=5)
    assert page.status_code == 200
    response = http.post(f"{keyless.url}/logout", allow_redirects=False, timeout=5)
    assert response.status_code == 400
    assert ticket_of(keyless, http).status_code == 200
    response = http.post(f"{keyless.url}/logout", data={"csrf_token": csrf_token(page.text)},
                         allow_redirects=False, timeout=5)
    assert response.status_code == 302
    assert ticket_of(keyless, http).status_code == 401


# -- headers and cookies ------------------------------------------------


class Scripts(HTMLParser):
    """Collects the page's ``<script>`` elements: their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._inside = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._inside = False

    def handle_data(self, data):
        if self._inside:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def test_pages_send_a_content_security_policy_and_no_frames(keyless):
    """Every page forbids inline script and framing, and has no inline script
    for the policy to block."""
    http, _ = http_sign_in(keyless, fresh())
    for path in ("/login", "/rooms/lobby"):
        response = http.get(keyless.url + path, timeout=5)
        assert response.status_code == 200
        policy = dict(
            directive.strip().split(" ", 1) for directive in response.headers["Content-Security-Policy"].split(";")
        )
        assert policy["script-src"] == "'self'"
        assert policy["default-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert policy["object-src"] == "'none'"
        assert "unsafe" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        parser = Scripts()
        parser.feed(response.text)
        for attrs, text in parser.scripts:
            assert attrs.get("src", "").startswith("/static/") and not text.strip(), (attrs, text)
    assert len(parser.scripts) == 1  # the room page's chat.js


def test_session_cookie_is_lax_and_secure_over_https(keyless, make_example):
    """The session cookie is HttpOnly and SameSite=Lax; Secure over https (as
    a trusted proxy says) or always with SESSION_COOKIE_SECURE, never from a
    header nobody vouches for."""

    def cookie(srv, **headers) -> str:
        # From 127.0.0.2: gunicorn itself believes X-Forwarded-Proto from
        # 127.0.0.1 (its forwarded_allow_ips), as from a proxy on the machine.
        conn = HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=("127.0.0.2", 0))
        try:
            conn.request("GET", "/login", headers=headers)
            response = conn.getresponse()
            response.read()
            return response.getheader("Set-Cookie")
        finally:
            conn.close()

    plain = cookie(keyless)
    assert "SameSite=Lax" in plain and "HttpOnly" in plain
    assert "Secure" not in plain
    assert "Secure" not in cookie(keyless, **{"X-Forwarded-Proto": "https"})
    proxied = make_example({"TRUSTED_PROXIES": "1"})
    assert "Secure" not in cookie(proxied)
    secure = cookie(proxied, **{"X-Forwarded-Proto": "https"})
    assert "Secure" in secure and "SameSite=Lax" in secure
    assert "Secure" in cookie(make_example({"SESSION_COOKIE_SECURE": "1"}))


def test_stats_answers_only_on_the_machine_itself(keyless, make_example):
    """``/stats`` answers loopback clients; behind a trusted proxy, only when
    the client itself is local. A forwarded-for header alone changes nothing."""
    assert requests.get(f"{keyless.url}/stats", timeout=5).json()["connections"] >= 0
    outside = {"X-Forwarded-For": "203.0.113.9"}
    assert requests.get(f"{keyless.url}/stats", headers=outside, timeout=5).status_code == 200
    proxied = make_example({"TRUSTED_PROXIES": "1"})
    assert requests.get(f"{proxied.url}/stats", headers=outside, timeout=5).status_code == 404
    local = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
    assert requests.get(f"{proxied.url}/stats", headers=local, timeout=5).status_code == 200


# -- the secret key -----------------------------------------------------


def test_the_old_default_key_forges_nothing(keyless, make_example):
    """Without SECRET_KEY the server logs a warning and signs with a key of its
    own: a session cookie or a ticket signed with the key it once had by
    default is refused, where the same forgery with the real key passes."""
    assert "SECRET_KEY is not set: using a random key" in keyless.output()
    http = requests.Session()
    http.cookies.set("session", forged_session(OLD_KEY, "alice"))
    response = http.get(f"{keyless.url}/rooms/lobby", allow_redirects=False, timeout=5)
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    assert ticket_of(keyless, http).status_code == 401
    assert handshake_status(keyless, forged_ticket(OLD_KEY, "alice")) == 401

    # The control: the same forgeries signed with the key a server does use.
    key = secrets.token_hex(16)
    keyed = make_example({"SECRET_KEY": key})
    assert "SECRET_KEY is not set" not in keyed.output()
    http = requests.Session()
    http.cookies.set("session", forged_session(key, "alice"))
    assert http.get(f"{keyed.url}/rooms/lobby", allow_redirects=False, timeout=5).status_code == 200
    assert ticket_of(keyed, http).status_code == 200
    assert handshake_status(keyed, forged_ticket(key, "alice")) == 101


def test_each_start_without_a_key_has_its_own(keyless, make_example):
    """A session from one key-less start means nothing to the next one."""
    http, response = http_sign_in(keyless, fresh())
    assert response.status_code == 302
    other = make_example({})
    moved = requests.Session()
    moved.cookies.set("session", http.cookies["session"])
    assert ticket_of(other, moved).status_code == 401
    assert ticket_of(keyless, http).status_code == 200


def test_several_workers_without_a_key_refuse_to_start():
    """``serve-example -w 2`` without SECRET_KEY stops at once and says what to
    set; with SECRET_KEY both workers serve the same sessions."""
    refused = serve_example("-w", "2")
    assert exits(refused) == 1
    assert "2 workers need one SECRET_KEY" in refused.output()
    assert "Booting worker" not in refused.output()


def test_several_workers_with_a_key_share_sessions(make_example):
    """With SECRET_KEY two workers start, and a session signed on one is good
    on every worker: each of ten tickets, issued by whichever worker took the
    request, opens a socket on whichever worker takes that one."""
    srv = make_example({"SECRET_KEY": secrets.token_hex(16)}, workers=2, extra=["-c", CONFIG])
    http, response = http_sign_in(srv, fresh())
    assert response.status_code == 302
    for _ in range(10):
        assert handshake_status(srv, ticket_of(srv, http).json()["ticket"]) == 101


def test_redis_without_a_key_refuses_to_start():
    """REDIS_URL without SECRET_KEY: the worker does not boot, and the log says
    to set SECRET_KEY in every process."""
    # Port 9 (discard): nothing is sent, the app refuses before it connects.
    refused = serve_example(env={"REDIS_URL": "redis://127.0.0.1:9/0"})
    assert exits(refused) != 0
    assert "REDIS_URL is set but SECRET_KEY is not" in refused.output()
    with pytest.raises(RuntimeError, match="SECRET_KEY is not"):
        create_app({"SECRET_KEY": None, "ROBE_SOCKETS_REDIS_URL": "redis://127.0.0.1:9/0"})


# -- mentions -----------------------------------------------------------


def test_mentions_reach_only_people_who_signed_in_and_at_most_five(jobs_in_process):
    """A message naming strangers and seven people who signed in publishes on
    the private channels of the first five of those only: the others' and
    the strangers' channels stay at seq 0, with no history."""
    tag = secrets.token_hex(3)
    people = [f"p{index}-{tag}" for index in range(7)]
    for name in people:
        assert sign_in(app.test_client(), name).status_code == 302
    stranger = f"ghost-{tag}"
    author = app.test_client()
    sign_in(author, f"author-{tag}")
    text = " ".join(f"@{name}" for name in [stranger, *people, f"nobody-{tag}"])
    with sockets.test_client(app, flask_client=author) as ws:
        ws.subscribe("room:lobby")
        assert ws.send("room:lobby", "message", {"text": text}) == {"queued": True}
        assert [frame["event"] for frame in ws.received()] == ["message"]
    seqs = {}
    for name in [*people, stranger]:
        with sockets.test_client(app, identity=name) as client:
            seqs[name] = client.subscribe(f"user:{name}")["seq"]
    assert seqs == {**{name: 1 if index < 5 else 0 for index, name in enumerate(people)}, stranger: 0}


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_people_remembers_the_latest_names_only(kind, request):
    """The signed-in names are bounded: past the limit the oldest sign-in is forgotten,
    and signing in again makes a name recent."""
    if kind == "memory":
        people = chat.MemoryPeople(3)
    else:
        import redis

        url = request.getfixturevalue("redis_server").database(4)
        redis.Redis.from_url(url).flushdb()
        people = chat.RedisPeople(url, 3)
    for name in ("a", "b", "c"):
        people.add(name)
    people.add("a")
    people.add("d")
    assert people.known(["a", "b", "c", "d", "e"]) == ["a", "c", "d"]
    assert people.known([]) == []
