"""The example chat without a browser: pages, sign-in, the hooks and the job."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from example_app import app, chat, realtime
from flask_robe_sockets import Forbidden, Message


@pytest.fixture
def client():
    return app.test_client()


def sign_in(client, name="alice"):
    return client.post("/login", data={"name": name})


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


def test_sign_in_redirects_only_within_the_site(client):
    """``next`` may name a path of this site, never another site."""
    assert client.post("/login?next=/rooms/python", data={"name": "a"}).headers["Location"] == "/rooms/python"
    for outside in ("//evil.example/", "https://evil.example/", "javascript:alert(1)"):
        response = client.post(f"/login?next={outside}", data={"name": "a"})
        assert response.headers["Location"] == "/"


def test_room_page_shows_history_as_text(client):
    """Recent messages are rendered escaped, with the client module mapped in."""
    entry = chat.post_message(
        Message("room:python", "message", {"text": "  <script>alert(1)</script>  "}).to_dict(), "mallory"
    )
    assert entry["text"] == "<script>alert(1)</script>"
    sign_in(client)
    page = client.get("/rooms/python").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)" not in page
    assert '"robe-sockets": "/ops/client.js"' in page
    assert client.get("/rooms/python/messages").json["messages"][-1] == entry
    assert client.get("/rooms/nowhere").status_code == 404


def test_authorize_opens_rooms_and_only_ones_own_private_channel():
    """Known rooms are open to all; ``user:<name>`` only to that name."""
    alice = SimpleNamespace(identity="alice")
    assert realtime.may_use(alice, "room:lobby")
    assert not realtime.may_use(alice, "room:secret")
    assert realtime.may_use(alice, "user:alice")
    assert not realtime.may_use(alice, "user:bob")
    assert not realtime.may_use(alice, "chat")


def test_handler_checks_the_text_and_hands_it_to_the_job(monkeypatch):
    """The handler answers at once and leaves the broadcast to the job."""
    jobs = []
    monkeypatch.setattr(chat, "dispatch", lambda message, user: jobs.append((message, user)))
    alice = SimpleNamespace(identity="alice")
    message = Message("room:lobby", "message", {"text": "hi"}, ref=3)
    assert realtime.on_message(message, alice) == {"queued": True}
    assert jobs == [(message.to_dict(), "alice")]
    for data in (None, "hi", {"text": "   "}, {"text": 5}, {"text": "x" * 501}):
        with pytest.raises(Forbidden):
            realtime.on_message(Message("room:lobby", "message", data), alice)


def test_job_broadcasts_to_the_room_and_to_who_is_mentioned(monkeypatch):
    """The job keeps the message, sends it to the room, and notifies each
    mentioned person (not the author) on their private channel."""
    sent = []
    monkeypatch.setattr(chat, "publish", lambda channel, event, data: sent.append((channel, event, data)))
    entry = chat.post_message(
        Message("room:lobby", "message", {"text": "@bob and @carol, @bob! mail@example.com @alice"}).to_dict(),
        "alice",
    )
    assert sent == [
        ("room:lobby", "message", entry),
        ("user:bob", "mention", {**entry, "room": "lobby"}),
        ("user:carol", "mention", {**entry, "room": "lobby"}),
    ]
    assert chat.history.recent("lobby")[-1] == entry


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
