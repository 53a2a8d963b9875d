"""Application error codes (PROTOCOL.md section 4): ``Refused(code, message)``
from a handler or the authorize hook, ``Forbidden`` as the ``forbidden`` one,
and codes that cannot be an application's."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flask import Flask

import flask_robe_sockets
from flask_robe_sockets import Forbidden, Refused, RobeSocketsError
from flask_robe_sockets.client import ReplyError
from flask_robe_sockets.errors import PROTOCOL_CODES

PROTOCOL = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()


def protocol_codes() -> set[str]:
    """Every error code PROTOCOL.md names: the ticket and handshake tables
    (sections 1 and 2) and the list of section 5."""
    codes = set(re.findall(r'"error": "([a-z_]+)"', PROTOCOL))
    codes |= set(re.findall(r"^\|[^|\n]+\| \d{3} \| `([a-z_]+)` \|$", PROTOCOL, re.M))
    listed = re.search(r"^Error codes: (.+?)\n\n", PROTOCOL, re.M | re.S).group(1)
    codes |= set(re.findall(r"`([a-z_]+)`", listed))
    return codes


@pytest.fixture
def app():
    app = Flask(__name__)
    app.secret_key = "k"
    sockets = app.sockets = flask_robe_sockets.RobeSockets(app)

    @sockets.authorize
    def may(connection, channel):
        if channel == "moving":
            raise Refused("room_moving", "this room is moving: try again in a minute")
        if channel == "broken":
            raise Refused("Not A Code", "x")  # ValueError, raised right here
        return channel != "closed"

    @sockets.on("order", channel="shop")
    def order(message, connection):
        if message.data == "down":
            raise Refused("try_later", "the queue is down")
        if message.data == "empty":
            raise Forbidden("empty orders are not taken")
        if message.data == "bad":
            raise Refused("bad_frame", "pretending to be the protocol")
        if message.data == "tampered":
            refusal = Refused("out_of_stock", "none left")
            refusal.code = "bad_frame"  # a code no constructor would take
            raise refusal
        return {"ordered": message.data}

    return app


def test_refused_carries_code_and_message():
    """Refused(code, message) keeps both; it is a RobeSocketsError and exported."""
    refusal = Refused("out_of_stock", "none left")
    assert (refusal.code, refusal.message, str(refusal)) == ("out_of_stock", "none left", "none left")
    assert isinstance(refusal, RobeSocketsError)
    assert "Refused" in flask_robe_sockets.__all__
    assert Refused("a" * 64, "x").code == "a" * 64
    assert Refused("x_9", "x").code == "x_9"


def test_forbidden_is_refused_with_forbidden():
    """Forbidden(message) still works, as Refused("forbidden", message)."""
    refusal = Forbidden("no")
    assert isinstance(refusal, Refused)
    assert (refusal.code, refusal.message) == ("forbidden", "no")
    assert Forbidden().message == "forbidden"
    assert Refused("forbidden", "no").code == "forbidden"


@pytest.mark.parametrize("code", ["", "a" * 65, "Out_of_stock", "out-of-stock", "out of stock", "é", None, 7])
def test_codes_that_break_the_rule_are_value_errors(code):
    """A code must be 1 to 64 characters from a-z 0-9 _: anything else is refused where it is raised."""
    with pytest.raises(ValueError, match="1 to 64 characters from a-z 0-9 _"):
        Refused(code, "x")


def test_the_protocols_own_codes_are_value_errors():
    """Every code PROTOCOL.md names, except forbidden, is the protocol's own."""
    codes = protocol_codes()
    assert {"unauthorized", "ticket_invalid", "too_many_connections", "bad_frame", "handler_error",
            "not_subscribed", "forbidden"} <= codes
    assert codes - {"forbidden"} <= PROTOCOL_CODES
    assert "forbidden" not in PROTOCOL_CODES
    for code in codes - {"forbidden"}:
        with pytest.raises(ValueError, match="one of the protocol's own"):
            Refused(code, "x")


def test_a_handler_refuses_with_its_own_code(app):
    """@error with the handler's code and message; the connection stays."""
    with app.sockets.test_client(app, identity="alice") as client:
        assert client.send("shop", "order", "tea") == {"ordered": "tea"}
        with pytest.raises(ReplyError) as caught:
            client.send("shop", "order", "down")
        assert (caught.value.code, caught.value.message, caught.value.channel) == (
            "try_later", "the queue is down", "shop",
        )
        with pytest.raises(ReplyError) as caught:
            client.send("shop", "order", "empty")
        assert (caught.value.code, caught.value.message) == ("forbidden", "empty orders are not taken")
        assert client.connected


def test_the_authorize_hook_refuses_with_its_own_code(app):
    """A subscribe and an event refused by the hook's Refused answer its code; False is forbidden."""
    with app.sockets.test_client(app, identity="alice") as client:
        for call in (lambda: client.subscribe("moving"), lambda: client.send("moving", "order", "tea")):
            with pytest.raises(ReplyError) as caught:
                call()
            assert (caught.value.code, caught.value.message) == (
                "room_moving", "this room is moving: try again in a minute",
            )
        with pytest.raises(ReplyError) as caught:
            client.subscribe("closed")
        assert caught.value.code == "forbidden"


def test_a_bad_code_is_logged_and_answered_handler_error(app, caplog):
    """Refused with a code that breaks the rule raises ValueError in the handler
    or hook: logged with its traceback, answered handler_error."""
    with caplog.at_level(logging.ERROR, "flask_robe_sockets"):
        with app.sockets.test_client(app, identity="alice") as client:
            for call in (lambda: client.send("shop", "order", "bad"), lambda: client.subscribe("broken")):
                with pytest.raises(ReplyError) as caught:
                    call()
                assert caught.value.code == "handler_error"
    errors = [record.exc_info[1] for record in caplog.records if record.exc_info]
    assert [type(error) for error in errors] == [ValueError, ValueError]
    assert "one of the protocol's own" in str(errors[0])


def test_a_code_changed_after_it_was_made_is_answered_handler_error(app, caplog):
    """A refusal whose code was changed to the protocol's own still never goes out as one."""
    with caplog.at_level(logging.ERROR, "flask_robe_sockets"):
        with app.sockets.test_client(app, identity="alice") as client:
            with pytest.raises(ReplyError) as caught:
                client.send("shop", "order", "tampered")
    assert (caught.value.code, caught.value.message) == ("handler_error", "the handler failed")
    assert any("unusable code" in record.getMessage() for record in caplog.records)
