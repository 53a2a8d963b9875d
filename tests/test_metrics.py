"""Prometheus metrics (``ROBE_SOCKETS_METRICS``): live gunicorn gevent servers,
scraped at ``GET /ops/metrics`` as Prometheus would, while the events happen."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from flask_robe_sockets import ConfigurationError, RobeSockets
from flask_robe_sockets.metrics import CLOSE_CODES, HANDSHAKE_RESULTS, NULL, PrometheusMetrics, create

from .rawws import HandshakeRefused, RawWebSocket
from .servers import Gunicorn, wait_until

METRICS = {"ROBE_SOCKETS_METRICS": True}

#: The label names each metric may have: none with values from clients or the app.
LABELS = {
    "robe_connections": set(),
    "robe_handshakes_total": {"result"},
    "robe_frames_received_total": set(),
    "robe_broadcasts_total": set(),
    "robe_deliveries_total": set(),
    "robe_disconnects_total": {"code"},
    "robe_slow_consumers_total": set(),
    "robe_rate_limited_total": set(),
    "robe_handler_errors_total": set(),
    "robe_handler_seconds_bucket": {"le"},
    "robe_handler_seconds_count": set(),
    "robe_handler_seconds_sum": set(),
}


def scrape(srv) -> dict[tuple, float]:
    """Every sample of ``/ops/metrics`` as ``{(name, (label, value)...): value}``."""
    response = requests.get(srv.url + "/ops/metrics", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


class Delta:
    """What a block changed in the metrics: ``delta("name", label=...)``."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.before = scrape(srv)
        self.after = self.before

    def __call__(self, name: str, **labels) -> float:
        self.after = scrape(self.srv)
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def open_socket(srv, **kwargs) -> RawWebSocket:
    ws = RawWebSocket(srv.ws_url, ticket=srv.ticket(), **kwargs)
    ws.connected()
    return ws


@pytest.fixture(scope="module")
def srv():
    server = Gunicorn(METRICS)
    yield server
    server.stop()


def test_connections_gauge_follows_sockets_and_disconnects_count_by_code(srv):
    """robe_connections counts open sockets; each end counts once under its close code."""
    delta = Delta(srv)
    first, second, third = (open_socket(srv) for _ in range(3))
    assert delta("robe_connections") == 3
    assert delta("robe_handshakes_total", result="accepted") == 3
    first.send_close(1000)
    assert first.recv_close() == 1000
    first.close()
    second.reset()  # gone without a close frame: 1006
    third.send_close(4321)  # a code of the application's: not a label of its own
    assert third.recv_close() == 4321
    third.close()
    wait_until(lambda: delta("robe_connections") == 0, 10, message="the gauge back at 0")
    assert delta("robe_disconnects_total", code="1000") == 1
    assert delta("robe_disconnects_total", code="1006") == 1
    assert delta("robe_disconnects_total", code="other") == 1
    assert delta("robe_disconnects_total", code="4321") == 0


def test_refused_handshakes_count_under_their_error(srv):
    """Each refusal of PROTOCOL.md section 2 counts under its own name, none as accepted."""
    delta = Delta(srv)
    assert requests.get(srv.url + "/ops", timeout=5).status_code == 400  # not an upgrade
    for ticket, headers, error in [
        (None, None, "ticket_missing"),
        ("forged", None, "ticket_invalid"),
        (srv.ticket(), {"Origin": "http://evil.example"}, "origin_not_allowed"),
    ]:
        with pytest.raises(HandshakeRefused) as refused:
            RawWebSocket(srv.ws_url, ticket=ticket, headers=headers)
        assert json.loads(refused.value.body)["error"] == error
    assert delta("robe_handshakes_total", result="not_websocket") == 1
    assert delta("robe_handshakes_total", result="ticket_missing") == 1
    assert delta("robe_handshakes_total", result="ticket_invalid") == 1
    assert delta("robe_handshakes_total", result="origin_not_allowed") == 1
    assert delta("robe_handshakes_total", result="accepted") == 0


def test_limits_count_as_handshake_results(make_server):
    """identity_limit and too_many_connections are results too; the socket that got in is accepted."""
    srv = make_server({**METRICS, "ROBE_SOCKETS_MAX_CONNECTIONS_PER_IDENTITY": 1})
    delta = Delta(srv)
    with open_socket(srv):
        with pytest.raises(HandshakeRefused) as refused:
            RawWebSocket(srv.ws_url, ticket=srv.ticket())
        assert refused.value.status == 429
        assert delta("robe_handshakes_total", result="identity_limit") == 1
    srv = make_server({**METRICS, "ROBE_SOCKETS_MAX_CONNECTIONS": 1})
    delta = Delta(srv)
    with open_socket(srv):
        with pytest.raises(HandshakeRefused) as refused:
            RawWebSocket(srv.ws_url, ticket=srv.ticket())
        assert refused.value.status == 503
        assert delta("robe_handshakes_total", result="too_many_connections") == 1
        assert delta("robe_handshakes_total", result="accepted") == 1


def test_frames_are_counted_one_by_one(srv):
    """Every frame a client sends counts once, whatever it carries."""
    with open_socket(srv) as ws:
        delta = Delta(srv)
        for ref in range(5):
            assert ws.request({"event": "@ping", "ref": ref})["event"] == "@pong"
        ws.send_frame(0x9, b"a websocket ping")  # a control frame counts too
        wait_until(lambda: delta("robe_frames_received_total") == 6, 5, message="6 frames counted")
        assert delta("robe_frames_received_total") == 6


def test_a_broadcast_counts_once_and_its_deliveries_per_member(srv):
    """One broadcast to 3 subscribers: broadcasts +1, deliveries +3."""
    sockets = [open_socket(srv) for _ in range(3)]
    try:
        for ws in sockets:
            assert ws.request({"channel": "tally", "event": "@subscribe"})["event"] == "@subscribed"
        delta = Delta(srv)
        response = requests.post(srv.url + "/broadcast/tally/news", json={"n": 1}, timeout=5)
        assert response.ok
        for ws in sockets:
            assert ws.recv_json()["seq"] == response.json()["seq"]
        assert delta("robe_broadcasts_total") == 1
        assert delta("robe_deliveries_total") == 3
        # A channel nobody here is on delivers nothing, and counts nothing.
        assert requests.post(srv.url + "/broadcast/empty/news", json={}, timeout=5).ok
        assert delta("robe_broadcasts_total") == 1
    finally:
        for ws in sockets:
            ws.close()


def test_handler_errors_and_handler_seconds(srv):
    """A handler that raises counts as an error; each event's handlers are timed once."""
    with open_socket(srv) as ws:
        assert ws.request({"channel": "chat", "event": "@subscribe"})["event"] == "@subscribed"
        delta = Delta(srv)
        answer = ws.request({"channel": "chat", "event": "boom", "ref": 1})
        assert answer["data"]["code"] == "handler_error"
        assert delta("robe_handler_errors_total") == 1
        assert ws.request({"channel": "chat", "event": "slow", "data": 0.05, "ref": 2})["data"] == "done"
        assert delta("robe_handler_seconds_count") == 2
        assert delta("robe_handler_seconds_sum") >= 0.05
        # The slow one is above 25 ms, the failing one well below 1 s.
        assert delta("robe_handler_seconds_bucket", le="0.025") == 1
        assert delta("robe_handler_seconds_bucket", le="1.0") == 2
        # A refusal (Forbidden) is the application's answer, not an error.
        assert ws.request({"channel": "chat", "event": "deny", "ref": 3})["data"]["code"] == "forbidden"
        assert delta("robe_handler_errors_total") == 1


def test_rate_limited_frames_and_slow_consumers(make_server):
    """Frames refused over the rate count one by one; a subscriber whose queue
    overflows counts as a slow consumer when it is closed with 4008."""
    srv = make_server({**METRICS, "ROBE_SOCKETS_RATE_LIMIT": [1, 3], "ROBE_SOCKETS_SEND_QUEUE_SIZE": 10})
    delta = Delta(srv)
    with open_socket(srv) as ws:
        for ref in range(5):
            ws.send_json({"event": "@ping", "ref": ref})
        answers = [ws.recv_json() for _ in range(5)]
        refused = [a for a in answers if a["event"] == "@error" and a["data"]["code"] == "rate_limited"]
        assert len(refused) == 2, answers
        assert delta("robe_rate_limited_total") == 2
    # A subscriber that does not read, with a small receive buffer.
    stuck = open_socket(srv, rcvbuf=4096)
    try:
        assert stuck.request({"channel": "flow", "event": "@subscribe"})["event"] == "@subscribed"
        for _ in range(20):
            assert requests.post(f"{srv.url}/burst/flow/tick?count=200&size=4000", timeout=10).ok
            if "flow" not in srv.stats()["members"]:
                break
        else:
            pytest.fail("the stuck subscriber was never dropped")
        assert delta("robe_slow_consumers_total") == 1
        assert stuck.recv_close(timeout=10) == 4008
    finally:
        stuck.close()
    wait_until(lambda: delta("robe_disconnects_total", code="4008") == 1, 10, message="the 4008 counted")


def test_labels_are_bounded(srv):
    """New channels, identities and connections make no new series: every label
    is one of a fixed set."""
    before = set(scrape(srv))
    for n in range(10):
        http = requests.Session()
        http.post(srv.url + "/login", data={"user": f"user{n}"}, timeout=5)
        ws = RawWebSocket(srv.ws_url, ticket=srv.ticket(http))
        ws.connected()
        assert ws.request({"channel": f"room:{n}", "event": "@subscribe"})["event"] == "@subscribed"
        ws.request({"channel": f"room:{n}", "event": "whoami", "ref": n})
        assert requests.post(f"{srv.url}/broadcast/room:{n}/news", json={}, timeout=5).ok
        ws.send_close(1000)
        ws.recv_close()
        ws.close()
    samples = scrape(srv)
    new = set(samples) - before
    assert all(name in LABELS for name, *_ in samples), sorted(samples)
    for name, *labels in samples:
        assert {label for label, _ in labels} == LABELS[name], (name, labels)
        for label, text in labels:
            if label == "result":
                assert text in HANDSHAKE_RESULTS | {"other"}
            if label == "code":
                assert text == "other" or int(text) in CLOSE_CODES
    # At most the labels these events use the first time: accepted, 1000.
    assert {labels for _, *labels in new} <= {(("result", "accepted"),), (("code", "1000"),)}, new


def test_unknown_values_are_bucketed_as_other():
    """A result or close code outside the known sets is counted as ``other``."""
    metrics = PrometheusMetrics()
    metrics.handshake("made_up_by_someone")
    metrics.closed(4999)
    metrics.closed(None)
    text = metrics.exposition()[0].decode()
    assert 'robe_handshakes_total{result="other"}' in text
    assert 'robe_disconnects_total{code="other"}' in text
    assert "made_up_by_someone" not in text and "4999" not in text


def test_off_by_default_and_not_served():
    """Without ROBE_SOCKETS_METRICS nothing is counted and the endpoint does not exist."""
    from flask import Flask

    app = Flask(__name__)
    app.secret_key = "k"
    RobeSockets(app)
    assert app.extensions["robe_sockets"].metrics is NULL
    assert app.test_client().get("/ops/metrics").status_code == 404
    assert create(False) is NULL


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    """Metrics on without prometheus_client: a ConfigurationError naming the extra."""
    import sys

    from flask import Flask

    from flask_robe_sockets import metrics

    monkeypatch.setattr(metrics, "_families", [])
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    app = Flask(__name__)
    app.secret_key = "k"
    app.config["ROBE_SOCKETS_METRICS"] = True
    with pytest.raises(ConfigurationError, match=r"pip install 'flask-robe-sockets\[metrics\]'"):
        RobeSockets(app)


def readme_gunicorn_conf() -> str:
    """The gunicorn.conf.py of the README's Metrics section, as written there."""
    from .servers import ROOT

    section = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "child_exit" in b]
    return block


def per_worker(srv, workers: int) -> dict[int, int]:
    """Each worker's open sockets (from /stats, answered by one worker at a time)."""
    seen: dict[int, int] = {}

    def all_answered() -> bool:
        stats = srv.stats()
        seen[stats["pid"]] = stats["connections"]
        return len(seen) == workers

    wait_until(all_answered, 10, 0.01, "every worker to answer /stats")
    return seen


def test_two_workers_are_summed_and_a_dead_workers_gauge_leaves(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, any worker answers with the sum of both;
    once one is killed (the README's child_exit hook calls mark_process_dead)
    its connections leave the gauge, and its counts stay in the counters."""
    (tmp_path / "metrics").mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(readme_gunicorn_conf())
    srv = Gunicorn(
        {**METRICS, "ROBE_SOCKETS_TICKET_RATE_LIMIT": [1000, 1000]},
        workers=2,
        extra=["-c", str(conf)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")},
    )
    sockets = []
    try:
        # Until both workers hold some (the kernel picks the worker).
        for _ in range(40):
            sockets.append(open_socket(srv))
            if len(sockets) >= 4 and all(per_worker(srv, 2).values()):
                break
        counts = per_worker(srv, 2)
        assert all(counts.values()) and sum(counts.values()) == len(sockets), counts
        for _ in range(6):  # whichever worker answers, the figures are the sums
            samples = scrape(srv)
            assert value(samples, "robe_connections") == len(sockets)
            assert value(samples, "robe_handshakes_total", result="accepted") == len(sockets)
        victim, survivor = sorted(counts)
        os.kill(victim, signal.SIGKILL)

        def gauge_left():
            try:
                return value(scrape(srv), "robe_connections") == counts[survivor]
            except requests.RequestException:
                return False

        wait_until(gauge_left, 15, 0.1, "the killed worker's connections to leave the gauge")
        assert value(scrape(srv), "robe_handshakes_total", result="accepted") == len(sockets)
        assert not list(Path(tmp_path / "metrics").glob(f"gauge_livesum_{victim}.db"))
    finally:
        for ws in sockets:
            ws.close()
        srv.stop()
