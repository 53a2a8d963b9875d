"""This project, as the benchmark runs it.

Settings changed from the defaults, for the benchmark's sake only:

- ``ROBE_SOCKETS_TICKETS_REQUIRED = False``: clients connect without first
  fetching a ticket over HTTP (the peers have no tickets either);
- ``ROBE_SOCKETS_RATE_LIMIT`` and ``ROBE_SOCKETS_BYTE_RATE_LIMIT`` raised to
  a million frames and a gigabyte a second, so the inbound workload measures
  the handler path, not the limiter refusing;
- ``ROBE_SOCKETS_PING_INTERVAL = None`` and a send queue of 30,000 messages
  and 256 MiB: no keep-alive frames mix into the measured streams, and a
  burst is never cut short by the slow-consumer limit (the peers' queues
  have no limit);
- connection limit 6,000 for the 5,000-connection capacity workload.

``BENCH_METRICS=1`` (the ``robe-metrics`` server of ``bench/run.py``) turns
``ROBE_SOCKETS_METRICS`` on, to measure what counting for Prometheus costs.
``BENCH_PRESENCE=1`` (``bench/presence.py``) turns presence on for ``presence:*``,
with ``ROBE_SOCKETS_PRESENCE_RATE_LIMIT`` raised as the frame rate is: all its
connections are one anonymous caller from one address.
"""
import os

from flask import Flask

from common import add_control_routes
from flask_robe_sockets import RobeSockets

app = Flask(__name__)
app.config.update(
    ROBE_SOCKETS_TICKETS_REQUIRED=False,
    ROBE_SOCKETS_RATE_LIMIT=(1_000_000, 1_000_000),
    ROBE_SOCKETS_PING_INTERVAL=None,
    ROBE_SOCKETS_BYTE_RATE_LIMIT=(1 << 30, 1 << 30),
    ROBE_SOCKETS_SEND_QUEUE_SIZE=30_000,
    ROBE_SOCKETS_SEND_QUEUE_BYTES=256 << 20,
    ROBE_SOCKETS_MAX_CONNECTIONS=6_000,
    # Set by bench/run.py for the two-worker Redis variant.
    ROBE_SOCKETS_REDIS_URL=os.environ.get("BENCH_REDIS_URL"),
    # Set by bench/run.py for the metrics-on variant.
    ROBE_SOCKETS_METRICS=bool(os.environ.get("BENCH_METRICS")),
    # Set by bench/presence.py: presence on its channels only, never on "bench".
    ROBE_SOCKETS_PRESENCE=("presence:*",) if os.environ.get("BENCH_PRESENCE") else (),
    ROBE_SOCKETS_PRESENCE_RATE_LIMIT=(1_000_000, 1_000_000),
)
sockets = RobeSockets(app)


@sockets.on("echo", channel="bench")
def echo(message, connection):
    return message.data


def broadcast(data: dict) -> None:
    sockets.send("bench", "msg", data)


def subscribers() -> int:
    return app.extensions["robe_sockets"].hub.member_counts().get("bench", 0)


add_control_routes(app, broadcast, subscribers)
