"""A multi-room chat on flask-robe-sockets.

Run it with ``./scripts/serve-example`` (gunicorn with the gevent worker on
http://127.0.0.1:9292), or ``flask --app example_app run`` while
developing. Without ``REDIS_URL`` everything stays in that one process;
with it the channels, the room history and the background jobs go through
Redis, and ``rq worker example_app --url $REDIS_URL`` runs the jobs.
"""
from __future__ import annotations

import os

from flask import Flask

from . import chat, views
from .realtime import sockets


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = os.environ.get("SECRET_KEY", "dev only: set SECRET_KEY in production")
    app.config["ROBE_SOCKETS_REDIS_URL"] = chat.REDIS_URL
    sockets.init_app(app)
    app.register_blueprint(views.bp)
    return app


app = create_app()
