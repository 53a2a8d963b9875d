"""The application the end-to-end tests run under gunicorn.

``create_app()`` reads extra Flask config from the ``ROBE_TEST_CONFIG``
environment variable (JSON), so each test server can be set up differently
without another module.

Every caller that did not log in is "anonymous" from 127.0.0.1 here, so the
per-identity connection cap and the ticket and presence join rate limits
would throttle the whole suite as one user: they are off unless a test's config sets them, or
sets ``TEST_LIBRARY_LIMITS`` to run with the library's own defaults.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import time

import gevent
import greenlet
from flask import Flask, current_app, jsonify, request, session
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_robe_sockets import Connection, Forbidden, PublishError, RobeSockets

from . import jobs

sockets = RobeSockets()

#: Calls of the on_disconnect hook per connection id: each must be 1.
DISCONNECTS: dict[str, int] = {}


def _rss() -> int:
    """Resident memory of this worker in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = None if os.environ.get("TEST_NO_SECRET_KEY") else "test secret"
    app.config.update(json.loads(os.environ.get("ROBE_TEST_CONFIG", "{}")))
    if not app.config.get("TEST_LIBRARY_LIMITS"):
        app.config.setdefault("ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY", None)
        app.config.setdefault("ROBE_SOCKETS_TICKET_RATE_LIMIT", (1_000_000, 1_000_000))
        app.config.setdefault("ROBE_SOCKETS_PRESENCE_RATE_LIMIT", (1_000_000, 1_000_000))
    if isinstance(app.config.get("ROBE_SOCKETS_RATE_LIMIT"), list):
        app.config["ROBE_SOCKETS_RATE_LIMIT"] = tuple(app.config["ROBE_SOCKETS_RATE_LIMIT"])
    sockets.init_app(app)
    if app.config.get("TEST_PROXY_FIX"):
        # As behind a proxy that terminates TLS and says so in X-Forwarded-Proto.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)

    @app.post("/login")
    def login():
        """Sign in as the name given: the identity loader reads it back."""
        session["user"] = request.form["user"]
        return jsonify(user=session["user"])

    @app.post("/broadcast/<channel>/<event>")
    def broadcast(channel, event):
        """Lets tests publish from an HTTP request, as a view would."""
        seq = sockets[channel].send(event, request.get_json())
        return jsonify(seq=seq)

    @app.post("/burst/<channel>/<event>")
    def burst(channel, event):
        """Publish ``count`` broadcasts of ``size`` bytes; says how long it took.

        Sent in one go, a burst longer than a send queue overflows every
        subscriber, since no writer runs before the view yields; ``yield=N``
        lets the writers run after every N messages (``1``: as separate
        requests would).
        """
        count, size = request.args.get("count", 100, int), request.args.get("size", 10, int)
        pause = request.args.get("yield", 0, int)
        started = time.perf_counter()
        for i in range(count):
            seq = sockets[channel].send(event, {"i": i, "pad": "x" * size})
            if pause and (i + 1) % pause == 0:
                gevent.sleep(0)
        return jsonify(seq=seq, seconds=time.perf_counter() - started)

    @app.get("/stats")
    def stats():
        """What leak tests compare; ``?gc=1`` adds live object counts (slow)."""
        server = app.extensions["robe_sockets"]
        result = dict(
            connections=len(server.connections),
            slots=server.slots.taken,
            slot_counts=server.slots.counts(),
            channels=sorted(server.hub.member_counts()),
            members=server.hub.member_counts(),
            joining=server.hub.joins_under_way(),
            histories=getattr(server.backend, "histories", None),  # the memory backend only
            pid=os.getpid(),
            rss=_rss(),
            disconnects=sum(DISCONNECTS.values()),
            disconnected_twice=sorted(i for i, n in DISCONNECTS.items() if n > 1),
        )
        if request.args.get("gc"):
            gc.collect()
            objects = gc.get_objects()
            result["greenlets"] = sum(isinstance(o, greenlet.greenlet) for o in objects)
            result["connection_objects"] = sum(isinstance(o, Connection) for o in objects)
        return jsonify(result)

    @app.get("/connections_of/<identity>")
    def connections_of(identity):
        """This worker's connection ids of one identity, and of everyone."""
        return jsonify(
            of=sorted(conn.id for conn in sockets.connections_of(identity)),
            all=sorted(conn.id for conn in sockets.connections),
        )

    @app.post("/control/<action>")
    def control(action):
        """sockets.disconnect(**json) or sockets.unsubscribe(json["channel"], **rest),
        as a view calls them; a refusal is a 400 naming the exception."""
        kwargs = request.get_json()
        try:
            if action == "disconnect":
                sockets.disconnect(**kwargs)
            else:
                sockets.unsubscribe(kwargs.pop("channel"), **kwargs)
        except (TypeError, ValueError) as exc:
            return jsonify(error=type(exc).__name__, message=str(exc)), 400
        return jsonify(pid=os.getpid())

    @app.get("/presence/<channel>")
    def presence(channel):
        """Every worker's members of ``channel``, as ``sockets[channel].presence()`` lists them."""
        return jsonify(pid=os.getpid(), **sockets[channel].presence().to_dict())

    @app.errorhandler(PublishError)
    def publish_failed(exc):
        """A send the backend refused reaches the caller, as an app would report it."""
        return jsonify(error="publish_failed", message=str(exc)), 503

    return app


@sockets.identity_loader
def load_identity():
    # Anonymous callers still get a ticket (identity "anonymous"): the tests
    # of refusal use the /login flow for named users. TEST_LOGIN_REQUIRED
    # makes them get 401 instead.
    if current_app.config.get("TEST_LOGIN_REQUIRED"):
        return session.get("user")
    return session.get("user", "anonymous")


@sockets.authorize
def authorize(connection, channel):
    if channel.startswith("user:"):
        return channel == f"user:{connection.identity}"
    if channel == "vault":
        raise Forbidden("the vault is shut")
    return channel != "closed"


@sockets.on("echo", channel="chat")
def echo(message, connection):
    return {"echo": message.data}


@sockets.on("say", channel="chat")
def say(message, connection):
    sockets["chat"].send("said", message.data)


@sockets.on("first", channel="chat")
def first_none(message, connection):
    return None


@sockets.on("first", channel="chat")
def first_value(message, connection):
    return "second handler"


@sockets.on("first", channel="chat")
def first_ignored(message, connection):
    return "third handler"


@sockets.on("boom", channel="chat")
def boom(message, connection):
    raise RuntimeError("internal detail that must not leak")


@sockets.on("deny", channel="chat")
def deny(message, connection):
    raise Forbidden("no, you may not")


@sockets.on("whoami", channel="room:*")
def whoami(message, connection):
    return {"identity": connection.identity, "channel": message.channel, "id": connection.id}


@sockets.on("direct", channel="chat")
def direct(message, connection):
    connection.send("direct", {"to": connection.id})


@sockets.on("direct_channel", channel="chat")
def direct_channel(message, connection):
    connection.send("direct", {"to": connection.id}, channel="chat")


@sockets.on("order", channel="chat")
def order_a(message, connection):
    connection.metadata["order"] = ["a"]


@sockets.on("order", channel="chat")
def order_b(message, connection):
    connection.metadata["order"].append("b")


@sockets.on("order", channel="chat")
def order_c(message, connection):
    connection.metadata["order"].append("c")
    return connection.metadata["order"]


@sockets.on("late_boom", channel="chat")
def late_boom_fine(message, connection):
    return "fine"


@sockets.on("late_boom", channel="chat")
def late_boom_raise(message, connection):
    raise KeyError("internal detail that must not leak")


@sockets.on("late_deny", channel="chat")
def late_deny_fine(message, connection):
    return "fine"


@sockets.on("late_deny", channel="chat")
def late_deny_raise(message, connection):
    raise Forbidden("not after all")


@sockets.on("not_json", channel="chat")
def not_json(message, connection):
    return {"a set is not JSON"}


@sockets.on("slow", channel="chat")
def slow(message, connection):
    """Takes ``data`` seconds, as a handler waiting on a slow service would."""
    gevent.sleep(float(message.data))
    return "done"


@sockets.on_disconnect
def count_disconnect(connection):
    DISCONNECTS[connection.id] = DISCONNECTS.get(connection.id, 0) + 1


@sockets.on("shout", channel="jobs:*")
def shout(message, connection):
    """Hands the work to a background job: RQ with Redis, else a local greenlet."""
    url = current_app.config["ROBE_SOCKETS_REDIS_URL"]
    if url is None:
        gevent.spawn(jobs.shout, message.to_dict(), sockets)
        return {"queued": None}
    return {"queued": _queue(url).enqueue(jobs.shout, message.to_dict()).id}


@functools.lru_cache(maxsize=None)
def _queue(url):
    from redis import Redis
    from rq import Queue

    return Queue(jobs.QUEUE, connection=Redis.from_url(url))


@sockets.presence_info
def presence_info(connection, channel):
    """Names the member on ``pinfo:*``; raises or gives non-JSON on the bad ones."""
    if channel.startswith("pinfo:raise"):
        raise RuntimeError("presence_info failed on purpose")
    if channel.startswith("pinfo:set"):
        return {"a set is not JSON"}
    if channel.startswith("pinfo:"):
        return {"name": connection.identity, "on": channel}
    return None
