"""Each serving worker reports itself to a shared backend, as long as it lives.

``flask robe workers`` lists what the reports say (see ``cli.py``); a worker
that stops reporting (killed, frozen, cut off from Redis) drops out of the
list ``ttl`` seconds after its last report, so a later sweep can tell the
workers that died from the live ones by the same reports.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable

from .backends import Backend
from .errors import BackendUnavailable

log = logging.getLogger("flask_robe_sockets")


class Heartbeat:
    """Calls ``backend.announce`` every third of ``ttl`` from one thread of
    this process (a greenlet under gevent's patching).

    :param report: what to say, called before each report: a dict of JSON
        values (connections and channels counts).
    :param interval: seconds between reports, at most a third of ``ttl``
        (the default); presence's timeout may need them more often.
    """

    def __init__(
        self, backend: Backend, ttl: float, report: Callable[[], dict[str, Any]], interval: float | None = None
    ) -> None:
        self._backend = backend
        self._ttl = ttl
        self._interval = min(ttl / 3, interval) if interval is not None else ttl / 3
        self._report = report
        self._pid: int | None = None
        self._stop = threading.Event()
        self._retiring = False
        #: This process's id on the backend, once started: unique per process.
        self.worker_id: str | None = None

    def start(self) -> None:
        """Start reporting from this process, unless it already does (or was stopped)."""
        pid = os.getpid()
        if self._pid == pid or self._stop.is_set():
            return
        # A fork (gunicorn --preload) starts over with an id of its own.
        self._pid = pid
        self.worker_id = f"{socket.gethostname()}:{pid}:{secrets.token_hex(3)}"
        threading.Thread(target=self._run, args=(self.worker_id, time.time()), daemon=True).start()

    def stop(self) -> None:
        """Report no more; a report not yet made is not made (the CLI's own
        process must not pass for a worker)."""
        self._stop.set()

    def retire(self) -> None:
        """Report no more, and have the backend drop this worker at once
        (``backend.retire``), after any report still on its way: a worker
        stopping on purpose is not listed, nor taken for dead, for ``ttl``
        seconds after, and what it still held is let go of at once."""
        self._retiring = True
        self._stop.set()

    def _run(self, worker_id: str, started: float) -> None:
        host, pid = socket.gethostname(), os.getpid()
        failing = False
        while not self._stop.is_set() and os.getpid() == pid:
            try:
                info = {"host": host, "pid": pid, "started": started, **self._report()}
                self._backend.announce(worker_id, info, self._ttl)
                if failing:
                    log.warning("worker %s reports to the backend again", worker_id)
                    failing = False
            except BackendUnavailable as exc:
                if not failing:
                    log.warning("worker %s cannot report itself: %s", worker_id, exc)
                    failing = True
            except Exception:  # a bug here must not end the reports for good
                log.exception("worker %s could not report itself", worker_id)
            self._stop.wait(self._interval)
        if self._retiring:
            try:
                self._backend.retire(worker_id)
            except BackendUnavailable as exc:
                log.warning("worker %s could not retire: %s", worker_id, exc)
