"""The example chat in a real browser: Debian's headless chromium, driven by
Playwright, against the example app under gunicorn with the gevent worker.

A failing test leaves a screenshot of each of its pages, and the server's
log, in ``test-artifacts/``.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid

import pytest

from .servers import BIN, ROOT, Gunicorn, Process, wait_until

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
# Playwright cannot download its own browser here; these flags keep Debian's
# quiet, and on loopback only.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
APP = "example_app:app"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
    reason="chromium is not installed (apt-get install chromium)",
)

expect.set_options(timeout=15_000)


class Chat:
    """The pages and servers of one test, and what they leave when it fails."""

    def __init__(self, browser) -> None:
        self.browser = browser
        self.pages: dict[str, sync_api.Page] = {}
        #: Processes whose log is kept on failure; the test stops those it started.
        self.processes: list[Process] = []
        self._started: list[Process] = []
        self.page_errors: list[str] = []

    def start_server(self, port: int | None = None, **options) -> Gunicorn:
        return self.adopt(Gunicorn(app=APP, port=port, **options))

    def adopt(self, process: Process) -> Process:
        """Keep ``process``'s log on failure, and stop it after the test."""
        self.processes.append(process)
        self._started.append(process)
        return process

    def watch(self, process: Process) -> None:
        """Keep the log of a process the test did not start."""
        self.processes.append(process)

    def sign_in(self, server: Gunicorn, name: str, room: str = "lobby") -> sync_api.Page:
        """A fresh browser profile (its own cookies) signed in as ``name``."""
        context = self.browser.new_context(viewport={"width": 1100, "height": 700})
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: self.page_errors.append(f"{name}: {error}"))
        # What the page's Content-Security-Policy blocked is only a console error.
        page.on("console", lambda message: "Content Security Policy" in message.text
                and self.page_errors.append(f"{name}: {message.text}"))
        self.pages[name] = page
        page.goto(f"{server.url}/login?next=/rooms/{room}")
        page.fill("#name", name)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{server.url}/rooms/{room}")
        expect_status(page, "connected")
        return page

    def save_artifacts(self, test_name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", test_name)
        for name, page in self.pages.items():
            try:
                page.screenshot(path=str(ARTIFACTS / f"{stem}-{name}.png"), full_page=True)
            except sync_api.Error:
                pass
        for index, process in enumerate(self.processes):
            (ARTIFACTS / f"{stem}-{process.name}{index}.log").write_text(process.output())

    def close(self) -> None:
        for page in self.pages.values():
            page.context.close()
        for process in self._started:
            process.stop()


def expect_status(page, state: str) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", state)


def post(page, text: str) -> None:
    """Type a message and send it, as a person would."""
    page.fill("#compose input", text)
    page.press("#compose input", "Enter")


def message(page, text: str):
    return page.locator("#messages .message", has_text=text)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def chat(browser, request):
    chat = Chat(browser)
    failed = request.session.testsfailed
    yield chat
    try:
        # The call's report is counted before teardown runs.
        if request.session.testsfailed > failed:
            chat.save_artifacts(request.node.name)
    finally:
        chat.close()
    assert not chat.page_errors, chat.page_errors


@pytest.fixture(scope="module")
def chat_server():
    """One example app for the tests that do not restart it."""
    server = Gunicorn(app=APP)
    yield server
    server.stop()


def unique(text: str) -> str:
    # The shared server keeps every test's messages: tell them apart.
    return f"{text} {uuid.uuid4().hex[:6]}"


def test_two_people_chat_in_a_room(chat, chat_server):
    """Two signed-in pages in one room see each other's messages, shown as text."""
    chat.watch(chat_server)
    alice = chat.sign_in(chat_server, "alice")
    bob = chat.sign_in(chat_server, "bob")
    hello = unique("hello bob <b>not bold</b>")
    post(alice, hello)
    for page in (alice, bob):
        expect(message(page, hello)).to_have_count(1)
        expect(message(page, hello).locator(".who")).to_have_text("alice")
        expect(page.locator("#messages .message b")).to_have_count(0)
    expect(message(alice, hello)).to_have_class(re.compile(r"\bmine\b"))
    reply = unique("hi @alice")
    post(bob, reply)
    expect(message(alice, reply)).to_have_count(1)
    # The mention also went to alice's private channel, and only there.
    expect(alice.locator("#mentions li", has_text=reply)).to_have_count(1)
    expect(bob.locator("#mentions li", has_text=reply)).to_have_count(0)


def test_private_channel_is_refused_to_another_user(chat, chat_server):
    """A page signed in as bob cannot join or send on alice's private channel."""
    chat.watch(chat_server)
    bob = chat.sign_in(chat_server, "bob")
    outcome = bob.evaluate(
        """async () => {
            const { Client } = await import("/ops/client.js");
            const client = new Client();
            const join = (name) => new Promise((resolve) => {
                const channel = client.subscribe(name);
                channel.on("@subscribed", () => resolve("subscribed"));
                channel.on("@error", (error) => resolve(error.code));
            });
            try {
                const refused = await join("user:alice");
                const own = await join("user:bob");
                const sent = await client.subscribe("user:alice").send("message", { text: "psst" })
                    .then(() => "sent", (error) => error.code);
                return [refused, own, sent];
            } finally {
                client.close();
            }
        }"""
    )
    assert outcome == ["forbidden", "subscribed", "forbidden"]


def test_page_resumes_from_a_saved_position(chat, chat_server):
    """The browser module started from a saved seq and epoch (as a page that reloaded would)
    gets the messages it missed, in order, with @subscribed recovered; "message" gets only the
    room's events, never the client's own @subscribed."""
    chat.watch(chat_server)
    bob = chat.sign_in(chat_server, "bob")
    texts = [unique("before"), unique("missed 1"), unique("missed 2")]
    outcome = bob.evaluate(
        """async ([before, ...missed]) => {
            const { Client } = await import("/ops/client.js");
            const within = (promise, what) => Promise.race([promise, new Promise((_, reject) =>
                setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10000))]);
            const subscribed = (channel) => within(new Promise((resolve) => channel.on("@subscribed", resolve)), "@subscribed");
            const saw = (channel, text) => within(new Promise((resolve) =>
                channel.on("message", (m) => m.data.text === text && resolve())), text);
            const events = [];
            const clients = [];
            const open = (position) => {
                const client = new Client();
                clients.push(client);
                const channel = client.subscribe("room:random", position);
                channel.on("message", (m) => events.push(m.event));
                return channel;
            };
            try {
                const first = open();
                await subscribed(first);
                const seen = saw(first, before);
                await first.send("message", { text: before });
                await seen;
                const saved = { since: first.seq, epoch: first.epoch };
                first.client.close();

                const other = open();
                await subscribed(other);
                const sent = saw(other, missed[1]);
                for (const text of missed) await other.send("message", { text });
                await sent;

                const again = open(saved);
                const replayed = [];
                const done = within(new Promise((resolve) => again.on("message", (m) => {
                    replayed.push(m.data.text);
                    if (replayed.length === missed.length) resolve();
                })), "the replay");
                const info = await subscribed(again);
                await done;
                return { info, saved, replayed, seq: again.seq, events: [...new Set(events)] };
            } finally {
                for (const client of clients) client.close();
            }
        }""",
        texts,
    )
    since, epoch = outcome["saved"]["since"], outcome["saved"]["epoch"]
    assert outcome["info"] == {"recovered": True, "seq": since + 2, "epoch": epoch}
    assert outcome["replayed"] == texts[1:] and outcome["seq"] == since + 2
    assert outcome["events"] == ["message"]


def test_network_cut_replays_what_was_missed(chat, chat_server):
    """A page whose network drops shows disconnected, then gets the missed
    messages replayed in order when it is back."""
    chat.watch(chat_server)
    alice = chat.sign_in(chat_server, "alice")
    bob = chat.sign_in(chat_server, "bob")
    # "connected" comes before the room's @subscribed: cut before it and the
    # page only ever subscribes afterwards, with nothing to recover from.
    # A message seen live proves bob is in the room.
    before = unique("before the cut")
    post(alice, before)
    expect(message(bob, before)).to_have_count(1)
    bob.context.set_offline(True)
    # The socket outlives the network: the client's unanswered @ping finds
    # out, after its 10 s pong timeout.
    expect(bob.locator("#status")).to_have_attribute("data-state", "disconnected", timeout=25_000)
    missed = [unique("while you were offline 1"), unique("while you were offline 2")]
    for text in missed:
        post(alice, text)
        expect(message(alice, text)).to_have_count(1)
    bob.context.set_offline(False)
    expect_status(bob, "connected")
    for text in missed:
        expect(message(bob, text)).to_have_count(1)
    texts = bob.locator("#messages .message .text").all_inner_texts()
    assert texts.index(missed[0]) < texts.index(missed[1])
    expect(bob.locator("#notice")).to_contain_text("replayed")


def test_server_restart_reconnects_and_reloads_the_room(chat):
    """Stopping the server shows both pages disconnected; after the restart
    both reconnect, and a page that came back later finds the messages sent
    meanwhile (the new server cannot replay them, so the page reloads)."""
    # The same key before and after: the sessions outlive the restart.
    key = {"SECRET_KEY": uuid.uuid4().hex}
    server = chat.start_server(env=key)
    alice = chat.sign_in(server, "alice")
    bob = chat.sign_in(server, "bob")
    before = unique("before the restart")
    post(alice, before)
    expect(message(bob, before)).to_have_count(1)

    server.stop()
    expect_status(alice, "disconnected")
    expect_status(bob, "disconnected")
    bob.context.set_offline(True)  # bob stays away while alice is back
    chat.start_server(port=server.port, env=key)
    expect_status(alice, "connected")
    meanwhile = unique("sent while bob was away")
    post(alice, meanwhile)
    expect(message(alice, meanwhile)).to_have_count(1)

    bob.context.set_offline(False)
    expect_status(bob, "connected")
    expect(message(bob, meanwhile)).to_have_count(1)
    expect(message(bob, before)).to_have_count(1)
    expect(bob.locator("#notice")).to_contain_text("reloaded")
    # The two pages still talk to each other.
    after = unique("after the restart")
    post(bob, after)
    expect(message(alice, after)).to_have_count(1)


def test_restart_without_a_key_ends_the_sign_in(chat):
    """Without SECRET_KEY each start signs with a key of its own: after a
    restart the page stops reconnecting and says to sign in again."""
    keyless = {"SECRET_KEY": "", "REDIS_URL": ""}
    server = chat.start_server(env=keyless)
    alice = chat.sign_in(server, "alice")
    server.stop()
    expect_status(alice, "disconnected")
    chat.start_server(port=server.port, env=keyless)
    expect(alice.locator("#status")).to_have_text("Signed out")
    expect(alice.locator("#notice")).to_contain_text("sign in again")
    alice.reload()
    expect(alice).to_have_url(re.compile(r"/login\?next=/rooms/lobby$"))


@pytest.mark.skipif(
    not shutil.which("redis-server") and os.environ.get("CI") != "true",
    reason="redis-server is not installed",
)
def test_with_redis_messages_go_through_an_rq_worker(chat, redis_server):
    """With REDIS_URL the handler enqueues the message on RQ, a separate
    ``rq worker`` runs the job, and its Publisher reaches both pages (served
    by two gunicorn workers) and the private channel."""
    import redis

    url = redis_server.database(3)  # a database of its own
    redis.Redis.from_url(url).flushdb()
    # Every process of a Redis set-up must share one SECRET_KEY (the app refuses to start without).
    env = {"REDIS_URL": url, "SECRET_KEY": uuid.uuid4().hex}
    worker = chat.adopt(Process([str(BIN / "rq"), "worker", "example_app", "--url", url], env=env, name="rq"))
    server = chat.start_server(workers=2, env=env)
    alice = chat.sign_in(server, "alice")
    bob = chat.sign_in(server, "bob")
    text = unique("through the queue, @alice")
    post(bob, text)
    for page in (alice, bob):
        expect(message(page, text)).to_have_count(1)
    expect(alice.locator("#mentions li", has_text=text)).to_have_count(1)
    wait_until(lambda: "post_message" in worker.output(), 10, message="the rq worker to log the job")
    # The history the page loads is the one the worker wrote.
    assert text in [entry["text"] for entry in alice.evaluate(
        "async () => (await (await fetch('/rooms/lobby/messages')).json()).messages"
    )]


def test_browser_client_presence_and_a_terminal_close(browser):
    """In a real browser, the client's presence follows a scripted server's snapshot, @join and
    @leave (sync after each, "message" handlers never), and a close with 4500 ends it: one
    disconnect with the code, no reconnect, subscribe() refused with closed."""
    import json

    from .test_client import ScriptedServer

    def member(id, identity):
        return {"id": id, "identity": identity, "info": None}

    def script(ws, number):
        frame = fake.read(ws, number)
        members = [member("c1", "alice"), member("x2", "bob")]
        ws.send(json.dumps({"channel": "room:lobby", "event": "@subscribed", "ref": frame["ref"], "data": {
            "recovered": False, "seq": 0, "epoch": "e1",
            "presence": {"members": members, "clients": 2, "users": 2}}}))
        ws.send(json.dumps({"channel": "room:lobby", "event": "@join", "data": member("x3", "carol")}))
        ws.send(json.dumps({"channel": "room:lobby", "event": "@leave", "data": member("x2", "bob")}))
        ask = fake.read(ws, number)  # presence.fetch(), once the page saw the leave
        ws.send(json.dumps({"channel": "room:lobby", "event": "@presence", "ref": ask["ref"],
                            "data": {"members": [member("c1", "alice"), member("x3", "carol")], "clients": 2, "users": 2}}))
        fake.read(ws, number)  # the page's "done"
        ws.close(4500, "signed out")

    page_html = """<!doctype html><script type="module">
      import { Client } from "/client.js";
      const seen = window.seen = [];
      const client = window.client = new Client({ url: "/ops", ticketUrl: null, reconnectDelay: 1, maxReconnectDelay: 1 });
      client.on("disconnect", ({ code, reason }) => seen.push(["disconnect", code, reason]));
      const room = client.subscribe("room:lobby");
      room.on("message", (m) => seen.push(["message", m.event]));
      room.presence.on("join", (m) => seen.push(["join", m.id]));
      room.presence.on("leave", async (m) => {
        seen.push(["leave", m.id]);
        const answer = await room.presence.fetch({ timeout: 5000 });
        seen.push(["fetched", answer.users, answer.members.map((one) => one.id)]);
        room.send("done").catch((error) => seen.push(["send", error.code]));
      });
      room.presence.on("sync", (members) => seen.push(["sync", members.map((one) => one.id)]));
    </script>"""
    js = (ROOT / "flask_robe_sockets" / "static" / "client.js").read_text()
    fake = ScriptedServer(script, files={"/": ("text/html", page_html), "/client.js": ("text/javascript", js)})
    context = browser.new_context()
    try:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(fake.url + "/")
        page.wait_for_function("window.seen && window.seen.some((e) => e[0] === 'send')", timeout=15_000)
        seen = page.evaluate("window.seen")
        assert seen == [
            ["sync", ["c1", "x2"]],
            ["join", "x3"], ["sync", ["c1", "x2", "x3"]],
            ["leave", "x2"], ["sync", ["c1", "x3"]],
            ["fetched", 2, ["c1", "x3"]],
            ["disconnect", 4500, "signed out"],
            ["sync", []],
            ["send", "closed"],  # the unanswered send, rejected as the client ended
        ], seen
        assert page.evaluate("""() => { try { client.subscribe("news"); return "subscribed"; }
                                        catch (error) { return error.code; } }""") == "closed"
        assert errors == []
        frames = [fake.next_frame(timeout=0) for _ in range(3)]
        assert [(number, frame["event"]) for number, frame in frames] == [(1, "@subscribe"), (1, "@presence"), (1, "done")]
        assert fake.received.empty()
    finally:
        context.close()
        fake.close()


# Every socket's close, as the page's own WebSocket saw it (code and reason).
RECORD_CLOSES = """
(() => {
    const Native = window.WebSocket;
    window.socketCloses = [];
    window.WebSocket = class extends Native {
        constructor(...args) {
            super(...args);
            this.addEventListener("close", (event) => window.socketCloses.push([event.code, event.reason]));
        }
    };
})();
"""


def test_signing_out_in_one_tab_signs_out_the_others(chat, chat_server):
    """Two tabs of one person in a room: signing out in one closes the other's
    socket with 4500; that page says so, links to the sign-in and does not
    reconnect, while another person's page stays connected."""
    chat.watch(chat_server)
    name, other = f"carol-{uuid.uuid4().hex[:6]}", f"dave-{uuid.uuid4().hex[:6]}"
    tab1 = chat.sign_in(chat_server, name)
    tab2 = tab1.context.new_page()  # the same browser profile: the same cookie
    tab2.set_default_timeout(15_000)
    tab2.on("pageerror", lambda error: chat.page_errors.append(f"{name} tab 2: {error}"))
    tab2.add_init_script(RECORD_CLOSES)
    chat.pages[f"{name}-tab2"] = tab2
    tickets = []
    tab2.on("request", lambda request: "/ticket" in request.url and tickets.append(request.url))
    tab2.goto(f"{chat_server.url}/rooms/lobby")
    expect_status(tab2, "connected")
    assert len(tickets) == 1  # what a reconnect would ask for again
    dave = chat.sign_in(chat_server, other)
    expect(dave.locator("#online li", has_text=name)).to_have_count(1)

    tab1.click("form[action='/logout'] button")
    expect(tab1).to_have_url(f"{chat_server.url}/login")

    expect_status(tab2, "signed-out")
    expect(tab2.locator("#status")).to_have_text("Signed out")
    notice = tab2.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("You were signed out in another tab or window.")
    expect(notice.locator("a")).to_have_attribute("href", "/login?next=/rooms/lobby")
    assert tab2.evaluate("window.socketCloses") == [[4500, "signed out"]]
    expect(tab2.locator("#compose input")).to_be_disabled()
    # No reconnect: its first retry would come within the 500 ms backoff.
    with pytest.raises(sync_api.TimeoutError):
        with tab2.expect_request(lambda request: "/ticket" in request.url, timeout=2_500):
            pass
    assert len(tickets) == 1 and tab2.evaluate("window.socketCloses") == [[4500, "signed out"]]

    # Dave's page stays connected, sees carol leave, and still chats.
    expect(dave.locator("#online li", has_text=name)).to_have_count(0)
    expect_status(dave, "connected")
    still = unique("still here")
    post(dave, still)
    expect(message(dave, still)).to_have_count(1)

    tab2.click("#notice a")
    expect(tab2).to_have_url(f"{chat_server.url}/login?next=/rooms/lobby")
