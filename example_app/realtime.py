"""The app's side of the sockets: who is connecting, where they may go,
and what happens to what they send."""
from __future__ import annotations

from flask import session

from flask_robe_sockets import Connection, Forbidden, Message

from . import chat
from .extensions import sockets


@sockets.identity_loader
def signed_in_name() -> str | None:
    """The ticket names whoever signed in with this browser; nobody else gets one."""
    return session.get("name")


@sockets.authorize
def may_use(connection: Connection, channel: str) -> bool:
    """Rooms are open to everyone signed in; ``user:<name>`` only to that name."""
    kind, _, name = channel.partition(":")
    if kind == "room":
        return name in chat.ROOMS
    if kind == "user":
        return name == connection.identity
    return False


@sockets.on("message", channel="room:*")
def on_message(message: Message, connection: Connection) -> dict:
    """Check the message and hand it to the background job, which broadcasts it."""
    data = message.data if isinstance(message.data, dict) else {}
    text = data.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > chat.MAX_TEXT:
        raise Forbidden(f"a message is 1 to {chat.MAX_TEXT} characters of text")
    chat.dispatch(message.to_dict(), connection.identity)
    return {"queued": True}
