"""gunicorn's settings for the example chat (``scripts/serve-example``).

Options on the command line go over these: ``-w 4``, ``-b 127.0.0.1:8000``.
This file is read by path, so it imports nothing of the app (the app must
not be loaded before gunicorn forks its gevent workers).
"""
import os

bind = ["127.0.0.1:9292"]
worker_class = "gevent"
workers = 1
# Above ROBE_SOCKETS_MAX_CONNECTIONS, so that sockets past it get a clean 503.
worker_connections = 6000


def on_starting(server):
    """Refuse several workers without a shared ``SECRET_KEY``: each would make
    its own random key, and refuse the others' sessions and tickets."""
    if server.cfg.workers > 1 and not os.environ.get("SECRET_KEY"):
        # gunicorn prints a RuntimeError's message and exits with 1.
        raise RuntimeError(
            f"{server.cfg.workers} workers need one SECRET_KEY: without it each worker signs"
            " sessions and tickets with its own random key and refuses the others'."
            " Set SECRET_KEY in the environment, or run one worker."
        )
