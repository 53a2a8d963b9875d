"""What the server counts, for Prometheus: one object with a method per event.

With ``ROBE_SOCKETS_METRICS = True`` the app's server makes a
:class:`PrometheusMetrics` and hands it to the layers that report (the
handshake view, the sessions, the hub, the dispatcher); otherwise they get
:data:`NULL`, whose methods do nothing. Either way each layer calls a method
named for what happened on an object it was given: nothing looks up a
registry on the way.

prometheus_client is imported only when metrics are on (the ``metrics``
extra). Its metric objects are made once per process and shared by every
app in it: in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, as under
gunicorn) a value lives in a file per process and metric, and two objects
for one metric in one process would overwrite each other's counts there.

No label takes a value from a client or from the application (no channel,
identity or connection id): a handshake's result is one of a fixed list and
a close code outside the usual ones counts as ``other``, so the number of
series is bounded whatever the traffic.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, ContextManager, Iterator

from .errors import ConfigurationError

#: Every value of ``robe_handshakes_total{result}`` but ``other``: ``accepted``
#: and the refusals of PROTOCOL.md section 2.
HANDSHAKE_RESULTS = frozenset({
    "accepted", "not_websocket", "origin_not_allowed", "ticket_missing", "ticket_invalid",
    "ticket_expired", "ticket_used", "ticket_wrong_ip", "identity_limit", "ip_limit",
    "too_many_connections", "backend_unavailable",
})

#: Close codes counted under their own number in ``robe_disconnects_total{code}``:
#: those of RFC 6455 (1005 and 1006 are never on the wire, but say how a
#: connection ended) and the protocol's 4008. Any other (an application's
#: 3000-4999) is ``other``.
CLOSE_CODES = frozenset({*range(1000, 1016), 4008})

#: Handler durations, in seconds: most handlers take a few milliseconds.
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NO_TIMER: ContextManager[None] = contextlib.nullcontext()


class Metrics:
    """The events the server reports; this base class counts nothing.

    Each method is called where the event happens, once per event:

    - :meth:`handshake` for every socket request, with ``accepted`` or the refusal;
    - :meth:`opened` once a connection is upgraded, :meth:`closed` once it has ended;
    - :meth:`frame` for every WebSocket frame a client sends (the unit of the rate limit);
    - :meth:`broadcast` once per broadcast reaching local members, with how many;
    - :meth:`slow_consumer`, :meth:`rate_limited`, :meth:`handler_error` as they happen;
    - :meth:`handler_timer` around the handlers of one client event.
    """

    #: Whether anything is counted (the endpoint is served only then).
    enabled = False

    def handshake(self, result: str) -> None:
        """A socket request was answered: ``accepted`` or the refusal's error name."""

    def opened(self) -> None:
        """A connection was upgraded."""

    def closed(self, code: int | None) -> None:
        """A connection ended with the close ``code`` (1006: without a close frame)."""

    def frame(self) -> None:
        """A client sent one WebSocket frame, of whatever kind."""

    def broadcast(self, deliveries: int) -> None:
        """One broadcast was queued for ``deliveries`` local members."""

    def slow_consumer(self) -> None:
        """A client's send queue overflowed: it is closed with 4008."""

    def rate_limited(self) -> None:
        """A client frame was refused over the frame or byte rate limit."""

    def handler_error(self) -> None:
        """An application handler or the authorize hook raised (answered ``handler_error``)."""

    def handler_timer(self) -> ContextManager[Any]:
        """A context manager timing the handlers of one client event."""
        return _NO_TIMER


#: The metrics of an app that has them off.
NULL = Metrics()


class PrometheusMetrics(Metrics):
    """Counts in prometheus_client's metrics of this process.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (before the process first imports
    prometheus_client: it reads the variable then), each process writes its
    values to files there and :meth:`exposition` adds up the files of every
    process, i.e. of every gunicorn worker; the connections gauge counts
    live processes only, once gunicorn's ``child_exit`` hook calls
    ``prometheus_client.multiprocess.mark_process_dead``.
    """

    enabled = True

    def __init__(self) -> None:
        family = _family()
        self._prometheus = family.module
        self._registry = family.registry
        self._connections = family.connections
        self._handshakes = family.handshakes
        self._disconnects = family.disconnects
        # Bound once: the first two run for every broadcast and client frame.
        self._count_broadcast = family.broadcasts.inc
        self._count_deliveries = family.deliveries.inc
        self._count_frame = family.frames.inc
        self._count_slow_consumer = family.slow_consumers.inc
        self._count_rate_limited = family.rate_limited.inc
        self._count_handler_error = family.handler_errors.inc
        self._observe_handler = family.handler_seconds.observe
        # The labelled children, looked up once per label value.
        self._handshake_child: dict[str, Any] = {}
        self._disconnect_child: dict[str, Any] = {}

    def handshake(self, result: str) -> None:
        if result not in HANDSHAKE_RESULTS:
            result = "other"
        child = self._handshake_child.get(result)
        if child is None:
            child = self._handshake_child[result] = self._handshakes.labels(result=result)
        child.inc()

    def opened(self) -> None:
        self._connections.inc()

    def closed(self, code: int | None) -> None:
        self._connections.dec()
        label = str(code) if code in CLOSE_CODES else "other"
        child = self._disconnect_child.get(label)
        if child is None:
            child = self._disconnect_child[label] = self._disconnects.labels(code=label)
        child.inc()

    def frame(self) -> None:
        self._count_frame()

    def broadcast(self, deliveries: int) -> None:
        self._count_broadcast()
        self._count_deliveries(deliveries)

    def slow_consumer(self) -> None:
        self._count_slow_consumer()

    def rate_limited(self) -> None:
        self._count_rate_limited()

    def handler_error(self) -> None:
        self._count_handler_error()

    @contextlib.contextmanager
    def handler_timer(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._observe_handler(time.perf_counter() - started)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics in the format the scraper's ``Accept`` header asks for
        (Prometheus' text format without one), and its content type.

        In multiprocess mode, the sum over every process writing to the
        directory (a fresh registry each time, as prometheus_client asks).
        """
        prometheus = self._prometheus
        registry = self._registry
        if registry is None:  # multiprocess mode
            registry = prometheus.CollectorRegistry()
            prometheus.multiprocess.MultiProcessCollector(registry)
        encoder, content_type = prometheus.exposition.choose_encoder(accept or "")
        return encoder(registry), content_type


class _Family:
    """This process's prometheus_client metrics, made once."""

    def __init__(self, prometheus: Any) -> None:
        self.module = prometheus
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Collected from the files at each scrape: registering them too
            # would report this process's values twice.
            self.registry = None
        else:
            self.registry = prometheus.CollectorRegistry()
        registry = self.registry
        counter, gauge, histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
        self.connections = gauge(
            "robe_connections", "Open WebSocket connections.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.handshakes = counter(
            "robe_handshakes", "Socket requests, by result: accepted or the refusal's error.",
            ["result"], registry=registry,
        )
        self.frames = counter(
            "robe_frames_received", "WebSocket frames received from clients, of every kind.",
            registry=registry,
        )
        self.broadcasts = counter(
            "robe_broadcasts", "Broadcasts that reached local subscribers.", registry=registry
        )
        self.deliveries = counter(
            "robe_deliveries", "Broadcast frames queued for local subscribers.", registry=registry
        )
        self.disconnects = counter(
            "robe_disconnects", "Connections ended, by close code (other: an application's code).",
            ["code"], registry=registry,
        )
        self.slow_consumers = counter(
            "robe_slow_consumers", "Clients closed with 4008 because their send queue overflowed.",
            registry=registry,
        )
        self.rate_limited = counter(
            "robe_rate_limited", "Client frames refused over the frame or byte rate limit.",
            registry=registry,
        )
        self.handler_errors = counter(
            "robe_handler_errors", "Handlers and authorize hooks that raised, answered handler_error.",
            registry=registry,
        )
        self.handler_seconds = histogram(
            "robe_handler_seconds", "Time the handlers of one client event took.",
            registry=registry, buckets=HANDLER_BUCKETS,
        )


_family_lock = threading.Lock()
_families: list[_Family] = []


def _family() -> _Family:
    with _family_lock:
        if not _families:
            try:
                import prometheus_client
                import prometheus_client.exposition
                import prometheus_client.multiprocess
            except ImportError as exc:
                raise ConfigurationError(
                    "ROBE_SOCKETS_METRICS needs prometheus_client:"
                    f" pip install 'flask-robe-sockets[metrics]' ({exc})"
                ) from exc
            _families.append(_Family(prometheus_client))
        return _families[0]


def create(enabled: bool) -> Metrics:
    """The metrics of an app: :class:`PrometheusMetrics` when ``enabled``, else :data:`NULL`.

    :raises ConfigurationError: metrics are on and prometheus_client is not installed.
    """
    return PrometheusMetrics() if enabled else NULL
