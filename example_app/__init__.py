"""A minimal chat on flask-robe-sockets.

Run it with ``gunicorn -k gevent -b 127.0.0.1:9292 example_app:app``, or
``flask --app example_app run`` while developing.
"""
from __future__ import annotations

import os

from flask import Flask

from flask_robe_sockets import RobeSockets

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY", "dev only: set SECRET_KEY in production")
app.config["ROBE_SOCKETS_REDIS_URL"] = os.environ.get("REDIS_URL")
sockets = RobeSockets(app)


@sockets.on("message", channel="chat")
def on_message(message, connection):
    """Echo a chat message to everyone on the channel."""
    sockets["chat"].send("message", message.data)
    return {"ok": True}
