"""Configuration is checked when the extension is set up."""
import pytest
import requests
from flask import Flask

from flask_robe_sockets import ConfigurationError, RobeSockets


def make_app(**config):
    app = Flask(__name__)
    app.secret_key = "k"
    app.config.update(config)
    return app


@pytest.mark.parametrize("interval", [0, -1])
def test_ping_interval_must_be_positive(interval):
    """A ping interval of 0 would spin the writer: refused with a clear message."""
    with pytest.raises(ConfigurationError, match="ROBE_SOCKETS_PING_INTERVAL"):
        RobeSockets(make_app(ROBE_SOCKETS_PING_INTERVAL=interval))


def test_ping_interval_none_turns_pings_off():
    """None is the documented way to turn pings off."""
    app = make_app(ROBE_SOCKETS_PING_INTERVAL=None)
    RobeSockets(app)
    assert app.extensions["robe_sockets"].settings.ping_interval is None


def test_tickets_need_a_secret_key():
    """Required tickets without SECRET_KEY fail at setup, naming the fix."""
    app = Flask(__name__)
    with pytest.raises(ConfigurationError, match="secret_key"):
        RobeSockets(app)


@pytest.mark.parametrize("rate", [(0, 10), (10, 0), 5, "fast"])
def test_rate_limit_shape(rate):
    """The rate limit must be (frames per second, burst)."""
    with pytest.raises(ConfigurationError, match="ROBE_SOCKETS_RATE_LIMIT"):
        RobeSockets(make_app(ROBE_SOCKETS_RATE_LIMIT=rate))


def test_defaults_are_applied_and_documented():
    """Every default lands in app.config and has a row in the README's table."""
    from pathlib import Path

    from flask_robe_sockets.config import DEFAULTS

    app = make_app()
    RobeSockets(app)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for key, value in DEFAULTS.items():
        assert app.config[key] == value
        assert f"| `{key}` |" in readme, key


def test_ticket_endpoint_without_secret_key(make_server):
    """With optional tickets and no SECRET_KEY, the ticket endpoint says so in JSON (404)."""
    srv = make_server({"ROBE_SOCKETS_TICKETS_REQUIRED": False}, env={"TEST_NO_SECRET_KEY": "1"})
    response = requests.post(srv.url + "/ops/ticket", timeout=5)
    assert (response.status_code, response.json()) == (404, {"error": "tickets_disabled"})


def test_a_second_authorize_hook_or_identity_loader_is_refused():
    """Registering a second authorize hook or identity loader raises instead of replacing the first."""
    sockets = RobeSockets()
    sockets.authorize(lambda connection, channel: True)
    with pytest.raises(ConfigurationError, match="authorize hook is already set"):
        sockets.authorize(lambda connection, channel: False)
    sockets.identity_loader(lambda: "me")
    with pytest.raises(ConfigurationError, match="identity loader is already set"):
        sockets.identity_loader(lambda: None)
