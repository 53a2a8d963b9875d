"""The example chat's online list in a real browser (see test_browser.py for the setup)."""
from __future__ import annotations

from .test_browser import CHROMIUM_ARGS, Chat, browser, chat, expect, expect_status, pytestmark  # noqa: F401


def online(page):
    return page.locator("#online li")


def test_each_room_shows_who_is_online(chat):
    """The list updates on join and leave, on every page; two tabs of one person show once."""
    server = chat.start_server()
    alice = chat.sign_in(server, "alice")
    expect(online(alice)).to_have_text(["alice"])
    expect(online(alice).first).to_have_class("me")
    bob = chat.sign_in(server, "bob")
    for page in (alice, bob):
        expect(online(page)).to_have_text(["alice", "bob"])
    second_tab = alice.context.new_page()  # the same cookies: alice again
    second_tab.goto(f"{server.url}/rooms/lobby")
    expect_status(second_tab, "connected")
    expect(online(second_tab)).to_have_text(["alice", "bob"])
    expect(online(bob)).to_have_text(["alice", "bob"])
    bob.close()
    for page in (alice, second_tab):
        expect(online(page)).to_have_text(["alice"])
    second_tab.close()
    expect(online(alice)).to_have_text(["alice"])
