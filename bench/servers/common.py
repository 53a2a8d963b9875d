"""What the three benchmark servers share: the payload and the control endpoints.

Each server app passes its own ``broadcast(data)`` and ``subscribers()`` to
:func:`add_control_routes`, so all three run exactly the same loops: the
load generator triggers them over plain HTTP and never publishes itself.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import gevent
from flask import Flask, jsonify, request

#: By default the broadcast loop yields to the other greenlets after this
#: many messages, as a view publishing in a loop would when it does any I/O.
YIELD_EVERY = 50


def payload(size: int) -> dict[str, Any]:
    """A message of about ``size`` bytes, stamped with the time it was made.

    ``time.monotonic`` is one clock for every process on the machine, so a
    probe in the load generator subtracts it from its own to get latency.
    """
    return {"t": time.monotonic(), "p": "x" * size}


def add_control_routes(
    app: Flask, broadcast: Callable[[dict], None], subscribers: Callable[[], int]
) -> None:
    """Mount ``/bench/burst``, ``/bench/paced`` and ``/bench/stats`` on ``app``."""

    @app.post("/bench/burst")
    def burst():
        """Broadcast ``m`` messages as fast as the server can, yielding every ``every``."""
        count, size = int(request.args["m"]), int(request.args["size"])
        every = int(request.args.get("every", YIELD_EVERY))
        started = time.monotonic()
        for i in range(count):
            broadcast(payload(size))
            if i % every == every - 1:
                gevent.sleep(0)
        return jsonify(seconds=time.monotonic() - started)

    @app.post("/bench/paced")
    def paced():
        """Broadcast ``count`` messages at ``rate`` a second, in the background."""
        rate, count, size = float(request.args["rate"]), int(request.args["count"]), int(request.args["size"])

        def run() -> None:
            start = time.monotonic()
            for i in range(count):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                broadcast(payload(size))

        gevent.spawn(run)
        return jsonify(started=True)

    @app.get("/bench/stats")
    def stats():
        return jsonify(pid=os.getpid(), subscribers=subscribers())
