"""Random frames against the frame parser and against a live server.

The expected answer of every frame comes from a model written from
PROTOCOL.md section 3 alone (``expected_error``), not from the code under
test, so the parser is checked against the contract, and the live server
is checked to answer each frame exactly as the contract says and stay up.
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_robe_sockets import protocol
from flask_robe_sockets.errors import ProtocolError

from .app import sockets as app_sockets
from .rawws import BINARY, TEXT, RawWebSocket
from .servers import Gunicorn, wait_until

PARSER_CODES = {"bad_frame", "bad_channel", "bad_event"}
ERROR_CODES = PARSER_CODES | {
    "forbidden", "unknown_event", "handler_error", "too_many_subscriptions", "rate_limited",
}
CHANNEL_CHARS = "ABCXYZabcxyz0189_-.:/"


# -- building frames ----------------------------------------------------------


class Raw:
    """A token written into the JSON text as is, e.g. ``NaN`` or ``1e999``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


def to_json(value) -> str:
    """Serialise like ``json.dumps`` (ASCII, so lone surrogates become escapes), with raw tokens."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


ABSENT = object()

clean_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
hostile_scalars = st.one_of(
    st.integers(min_value=-(10 ** 330), max_value=10 ** 330),  # some fit no double
    st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=3),  # surrogates
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-2E400")]),
)


def nested(depth: int):
    """A value ``depth`` containers deep (64 is the most a frame may hold, itself included)."""
    return "x" if depth == 0 else [nested(depth - 1)]


def containers(leaves):
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


clean_values = containers(clean_scalars)
json_values = st.one_of(
    clean_values,
    containers(clean_scalars | hostile_scalars),
    st.integers(min_value=60, max_value=66).map(nested),
)

valid_channels = st.one_of(
    st.sampled_from(["chat", "room:1", "closed", "user:None", "user:bob", "fuzz", "a" * 128]),
    st.text(CHANNEL_CHARS, min_size=1, max_size=128),
)
channels = st.one_of(
    valid_channels,
    st.sampled_from(["", "a" * 129, "chat room", "caf\u00e9"]),
    st.text(max_size=6),
    json_values,
)
known_events = st.sampled_from([
    "@subscribe", "@unsubscribe", "@ping", "@pong", "@error", "@connected", "@",
    "echo", "boom", "first", "whoami", "no-handler", "e" * 64, "e" * 65, "",
])
events = st.one_of(known_events, st.text(max_size=70), json_values)
refs = st.one_of(st.integers(), st.text(max_size=10), json_values)


@st.composite
def frame_objects(draw):
    """A JSON object shaped like a frame: each field absent, well typed or not."""
    obj = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=1))
    for key, values in (("channel", channels), ("event", events), ("ref", refs), ("data", json_values)):
        value = draw(st.one_of(st.just(ABSENT), values))
        if value is not ABSENT:
            obj[key] = value
    return obj


@st.composite
def likely_frames(draw):
    """A frame a client could well send: mostly valid, with a wrong value now and then."""
    obj = {"channel": draw(valid_channels), "event": draw(known_events)}
    ref = draw(st.one_of(st.just(ABSENT), st.integers(), st.text(max_size=10)))
    if ref is not ABSENT:
        obj["ref"] = ref
    data = draw(st.one_of(st.just(ABSENT), clean_values, clean_values, json_values))
    if data is not ABSENT:
        obj["data"] = data
    if obj["event"] == "@ping" and draw(st.booleans()):
        del obj["channel"]
    return obj


# one_of picks its branches evenly: likely frames are listed twice so that
# about half the examples get past the parser.
frame_texts = st.one_of(
    likely_frames().map(to_json),
    likely_frames().map(to_json),
    frame_objects().map(to_json),
    st.one_of(
        json_values.map(to_json),  # arrays, scalars, objects of anything
        st.text(max_size=40),  # mostly not JSON at all
    ),
)


# -- the model: PROTOCOL.md section 3 -----------------------------------------


def strict_loads(text: str):
    """Strict JSON as section 3 defines it; ``ValueError`` for anything else."""
    def refuse(token):
        raise ValueError(token)

    def parse_int(digits):
        if len(digits.lstrip("-")) > 4300:
            raise ValueError("too many digits")
        value = int(digits)
        float(value)  # OverflowError: does not fit a double
        return value

    def parse_float(digits):
        value = float(digits)
        if math.isinf(value):
            raise ValueError("does not fit a double")
        return value

    try:
        value = json.loads(text, parse_constant=refuse, parse_int=parse_int, parse_float=parse_float)
    except (RecursionError, OverflowError) as exc:
        raise ValueError(exc) from None

    def check(item, depth):
        if isinstance(item, str):
            item.encode()  # UnicodeEncodeError (a ValueError): a lone surrogate
        elif isinstance(item, (list, dict)):
            if depth > 64:
                raise ValueError("nesting deeper than 64")
            for key, child in (item.items() if isinstance(item, dict) else enumerate(item)):
                check(key, depth)
                check(child, depth + 1)

    check(value, 1)
    return value


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_channel(value) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 128
        and all(c in "_-.:/" or c.isascii() and c.isalnum() for c in value)
    )


def expected_error(text: str):
    """``None`` for a valid frame, else ``(codes, ref, channel)`` of its ``@error``.

    ``codes`` is a set: where a frame breaks two rules the contract does not
    say which one is reported, but the report is one of them.
    """
    try:
        obj = strict_loads(text)
    except ValueError:
        return {"bad_frame"}, None, None
    if not isinstance(obj, dict):
        return {"bad_frame"}, None, None
    ref, channel, event = obj.get("ref"), obj.get("channel"), obj.get("event")
    answer_ref = ref if ref is None or isinstance(ref, str) or is_int(ref) else None
    answer_channel = channel if valid_channel(channel) else None
    if not isinstance(event, str) or answer_ref is None and ref is not None:
        return {"bad_frame"}, answer_ref, answer_channel
    if channel is None and event == "@ping":
        return None
    if not isinstance(channel, str):
        return {"bad_frame"}, answer_ref, answer_channel
    codes = set()
    if not valid_channel(channel):
        codes.add("bad_channel")
    if event.startswith("@") and event not in ("@subscribe", "@unsubscribe", "@ping") or not 1 <= len(event) <= 64:
        codes.add("bad_event")
    return (codes, answer_ref, answer_channel) if codes else None


# -- the parser ---------------------------------------------------------------


def check_parse(text: str) -> None:
    expected = expected_error(text)
    try:
        frame = protocol.parse_frame(text)
    except ProtocolError as exc:
        assert expected is not None, f"refused a valid frame: {exc.code} {exc.message}"
        codes, ref, channel = expected
        assert exc.code in codes and (exc.ref, exc.channel) == (ref, channel)
        assert isinstance(exc.message, str) and exc.message
        # The answer can always be written.
        payload = protocol.error_payload(exc.code, exc.message)
        json.loads(protocol.encode(protocol.ERROR, payload, exc.channel, exc.ref))
        return
    assert expected is None, f"accepted a frame the protocol refuses with {expected}"
    obj = json.loads(text)
    assert frame == protocol.Frame(obj["event"], obj.get("channel"), obj.get("data"), obj.get("ref"))
    # Whatever it carries can be echoed back (in @pong, @reply) as standard JSON.
    echoed = json.loads(protocol.encode(protocol.PONG, frame.data, frame.channel, frame.ref))
    assert echoed["data"] == frame.data


@settings(max_examples=1500, deadline=None, database=None)
@given(frame_texts)
def test_parse_frame_answers_per_protocol(text):
    """Any text gives a Frame or a ProtocolError with the code section 3 assigns, never another exception."""
    check_parse(text)


@pytest.mark.parametrize("text", [
    '{"event": "@ping", "data": "\\ud83d\\ude00"}',
    '{"event": "@ping", "data": "\\ud83d"}',
    '{"event": "@ping", "ref": "\\udc00", "data": 1}',
    '{"event": "@ping", "data": ' + to_json(nested(63)) + "}",
    '{"event": "@ping", "data": ' + to_json(nested(64)) + "}",
    '{"event": "@ping", "data": 1' + "0" * 308 + "}",
    '{"event": "@ping", "data": 1' + "0" * 309 + "}",
    '{"event": "@ping", "data": 1' + "0" * 4300 + "}",
    '{"event": "@ping", "ref": true}',
    '{"event": "@ping", "ref": null}',
    '{"event": "@ping", "ref": 1.0}',
    '{"channel": null, "event": "echo"}',
    '{"channel": "", "event": ""}',
])
def test_parse_frame_edge_cases(text):
    """Edges of the rules (surrogates, depth 64, the double's range, ref types) match the model."""
    check_parse(text)


# -- the live endpoint --------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
    server = Gunicorn({"ROBE_SOCKETS_TICKETS_REQUIRED": False})
    yield server
    server.stop()


def forbidden(channel: str) -> bool:
    """The test app's authorize hook, for a connection without identity."""
    return channel == "closed" or channel.startswith("user:") and channel != "user:None"


def expected_answers(text: str):
    """The exact answers to ``text``, or ``None`` where a handler decides."""
    error = expected_error(text)
    if error is not None:
        codes, ref, channel = error
        return [("@error", codes, ref, channel)]
    obj = json.loads(text)
    event, channel, ref, data = obj["event"], obj.get("channel"), obj.get("ref"), obj.get("data")

    def frame(name, payload=None):
        out = {"event": name, "data": payload}
        if channel is not None:
            out["channel"] = channel
        if ref is not None:
            out["ref"] = ref
        return out

    if event == "@ping":
        return [frame("@pong", data)]
    if event == "@unsubscribe":
        return [frame("@unsubscribed")]
    if forbidden(channel):
        return [("@error", {"forbidden"}, ref, channel)]
    if event == "@subscribe":
        return [("@subscribed", channel, ref)]
    if not app_sockets.router.handlers_for(channel, event):
        return [("@error", {"unknown_event"}, ref, channel)]
    if (channel, event) == ("chat", "echo"):
        return [frame("@reply", {"echo": data})] if ref is not None else []
    return None


def assert_answers(got: list[dict], expected) -> None:
    if expected is None:  # a handler of the test app: only the shape is the contract
        for answer in got:
            assert answer["event"] in ("@reply", "@error", "direct", "said") or not answer["event"].startswith("@")
            if answer["event"] == "@error":
                assert answer["data"]["code"] in ERROR_CODES
        return
    assert len(got) == len(expected), (got, expected)
    for answer, want in zip(got, expected):
        if isinstance(want, dict):
            assert answer == want
        elif want[0] == "@error":
            _, codes, ref, channel = want
            assert answer["event"] == "@error" and answer["data"]["code"] in codes, (answer, want)
            assert set(answer["data"]) == {"code", "message"}
            assert answer.get("ref") == ref and answer.get("channel") == channel
        else:
            _, channel, ref = want
            assert answer["event"] == "@subscribed" and answer["channel"] == channel
            assert answer.get("ref") == ref
            assert set(answer["data"]) == {"recovered", "seq", "epoch"}


messages = st.one_of(
    frame_texts.map(lambda text: (TEXT, text.encode())),
    st.binary(max_size=30).map(lambda data: (TEXT, data)),  # most are not UTF-8
    st.binary(max_size=30).map(lambda data: (BINARY, data)),
)


def exchange(ws: RawWebSocket, opcode: int, payload: bytes) -> bool:
    """Send one fuzzed frame and check its answers; ``False`` once the server closed."""
    ws.send_frame(opcode, payload)
    if opcode == TEXT:
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            assert ws.recv_close() == 1007
            return False
    # A ping after it: every frame before the pong answers the fuzzed one.
    ws.send_json({"event": "@ping", "ref": "sentinel"})
    got = []
    while True:
        frame = ws.recv_frame()
        assert frame.opcode == TEXT, frame
        answer = frame.json()
        if answer.get("ref") == "sentinel" and answer["event"] == "@pong":
            break
        got.append(answer)
    if opcode == BINARY:
        assert len(got) == 1 and got[0]["event"] == "@error" and got[0]["data"]["code"] == "bad_frame"
        assert "ref" not in got[0] and "channel" not in got[0]
    else:
        assert_answers(got, expected_answers(text))
    return True


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=4))
def test_live_endpoint_answers_per_protocol(srv, sequence):
    """A live server answers any frames as the protocol says, one after another on one connection."""
    with RawWebSocket(srv.ws_url) as ws:
        ws.connected()
        for opcode, payload in sequence:
            if not exchange(ws, opcode, payload):
                break


def test_live_server_clean_after_fuzzing(srv):
    """After the fuzzing every connection is gone and the server still serves."""
    wait_until(lambda: srv.stats()["connections"] == 0, 10, message="fuzz connections to close")
    assert srv.stats()["slots"] == 0 and srv.stats()["disconnected_twice"] == []
    with RawWebSocket(srv.ws_url) as ws:
        ws.connected()
        assert ws.request({"channel": "chat", "event": "echo", "data": [1], "ref": 1}) == {
            "channel": "chat", "event": "@reply", "data": {"echo": [1]}, "ref": 1,
        }
    # No reader or writer greenlet died of an exception (gevent reports "... failed with ...").
    assert " failed with " not in srv.output()
