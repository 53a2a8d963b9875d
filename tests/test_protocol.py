"""The wire protocol apart from any I/O: PROTOCOL.md section 3, frame by frame."""
from __future__ import annotations

import json

import pytest

from flask_robe_sockets import protocol
from flask_robe_sockets.errors import ProtocolError


def frame(**fields) -> str:
    return json.dumps(fields)


def refused(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_frame(text)
    return info.value


def nested(depth: int, leaf: str = "1") -> str:
    """``depth`` arrays one inside the other, around ``leaf``."""
    return "[" * depth + leaf + "]" * depth


# -- valid frames -------------------------------------------------------


def test_valid_application_frame():
    """A well-formed application event parses into its four fields."""
    parsed = protocol.parse_frame(frame(channel="chat", event="message", data={"a": [1]}, ref="r1"))
    assert parsed == protocol.Frame(event="message", channel="chat", data={"a": [1]}, ref="r1")


def test_absent_data_and_ref_are_none_and_unknown_fields_ignored():
    """Absent ``data`` means null, absent ``ref`` none; unknown fields are ignored."""
    parsed = protocol.parse_frame(frame(channel="chat", event="message", extra=[1, 2], seq=9))
    assert parsed == protocol.Frame(event="message", channel="chat", data=None, ref=None)


@pytest.mark.parametrize("ref", [0, -5, 2**70, "", "x" * 1000])
def test_ref_may_be_any_string_or_integer(ref):
    """Any string or integer is a ref, and is kept as it came."""
    assert protocol.parse_frame(frame(channel="chat", event="e", ref=ref)).ref == ref


@pytest.mark.parametrize("event", ["@subscribe", "@unsubscribe", "@ping"])
def test_client_requests_are_accepted(event):
    """The reserved names a client may send parse with their channel."""
    assert protocol.parse_frame(frame(channel="chat", event=event, ref=1)).event == event


def test_ping_needs_no_channel():
    """``@ping`` alone may come without a channel (a connection-level frame)."""
    assert protocol.parse_frame(frame(event="@ping", ref=3)) == protocol.Frame(event="@ping", ref=3)


def test_ping_with_null_channel_is_connection_level():
    """``"channel": null`` on ``@ping`` counts as no channel."""
    assert protocol.parse_frame(frame(event="@ping", channel=None)).channel is None


# -- bad_frame ----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello", "{", '{"event": "e",}', "{'event': 'e'}", "\ufeff{}"])
def test_not_json_is_bad_frame(text):
    """Text that is not JSON is ``bad_frame``, with no ref and no channel."""
    error = refused(text)
    assert (error.code, error.ref, error.channel) == ("bad_frame", None, None)


@pytest.mark.parametrize("text", ["[]", '["chat", "e"]', '"chat"', "1", "null", "true"])
def test_not_an_object_is_bad_frame(text):
    """JSON that is not an object is ``bad_frame``."""
    assert refused(text).code == "bad_frame"


def test_missing_channel_is_bad_frame_with_ref():
    """No channel on anything but ``@ping`` is ``bad_frame``; a good ref is kept."""
    for event in ("message", "@subscribe", "@unsubscribe"):
        error = refused(frame(event=event, ref=7))
        assert (error.code, error.ref, error.channel) == ("bad_frame", 7, None)


@pytest.mark.parametrize("channel", [None, 5, ["chat"], {"name": "chat"}, True])
def test_channel_not_a_string_is_bad_frame(channel):
    """A channel that is not a string is ``bad_frame`` and is not echoed."""
    error = refused(frame(channel=channel, event="message", ref="a"))
    assert (error.code, error.ref, error.channel) == ("bad_frame", "a", None)


@pytest.mark.parametrize("fields", [{}, {"event": None}, {"event": 1}, {"event": ["e"]}])
def test_event_missing_or_not_a_string_is_bad_frame(fields):
    """An event that is missing or not a string is ``bad_frame``; a valid channel is kept."""
    error = refused(json.dumps({"channel": "chat", "ref": 1, **fields}))
    assert (error.code, error.ref, error.channel) == ("bad_frame", 1, "chat")


@pytest.mark.parametrize("ref", [True, False, 1.5, 1.0, [], {}, ["r"]])
def test_ref_neither_string_nor_integer_is_bad_frame(ref):
    """``true`` is not an integer: a mistyped ref is ``bad_frame`` and not echoed."""
    error = refused(frame(channel="chat", event="message", ref=ref))
    assert (error.code, error.ref, error.channel) == ("bad_frame", None, "chat")


def test_mistyped_ref_on_ping_is_bad_frame():
    """A ``@ping`` is checked too: a boolean ref is ``bad_frame``."""
    assert refused(frame(event="@ping", ref=True)).code == "bad_frame"


def test_bad_frame_wins_over_bad_channel_and_bad_event():
    """A frame broken several ways gets ``bad_frame``, the first row of the table."""
    assert refused(frame(channel="no spaces", event="@nope", ref=True)).code == "bad_frame"
    assert refused(frame(channel="chat room", event=5)).code == "bad_frame"


# -- strict JSON --------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"])
def test_non_standard_numbers_are_bad_frame(number):
    """NaN, infinities and numbers past a double are ``bad_frame``; nothing (no ref) is echoed."""
    text = '{"channel": "chat", "event": "e", "ref": 4, "data": %s}' % number
    error = refused(text)
    assert (error.code, error.ref, error.channel) == ("bad_frame", None, None)


def test_integer_past_a_double_is_bad_frame():
    """An integer beyond the largest double (about 1.8e308) is ``bad_frame``."""
    assert refused('{"channel": "chat", "event": "e", "data": 2%s}' % ("0" * 308)).code == "bad_frame"
    assert refused('{"channel": "chat", "event": "e", "data": -2%s}' % ("0" * 308)).code == "bad_frame"


def test_largest_double_integer_is_accepted():
    """An integer of 309 digits that still fits a double is fine."""
    value = int(1e308)
    assert protocol.parse_frame(frame(channel="c", event="e", data=value)).data == value


def test_integer_of_4301_digits_is_bad_frame():
    """More than 4,300 digits is ``bad_frame``, not a ``ValueError`` escaping."""
    assert refused('{"channel": "chat", "event": "e", "data": %s}' % ("9" * 4301)).code == "bad_frame"


def test_tiny_float_underflows_to_zero():
    """``1e-999`` is a valid JSON number (it reads as 0.0): not refused."""
    assert protocol.parse_frame('{"channel": "c", "event": "e", "data": 1e-999}').data == 0.0


def test_nesting_of_64_levels_is_accepted():
    """64 levels (the frame object and 63 arrays inside it) are allowed."""
    text = '{"channel": "chat", "event": "e", "data": %s}' % nested(63)
    assert protocol.parse_frame(text).channel == "chat"


def test_nesting_of_65_levels_is_bad_frame():
    """65 levels is ``bad_frame``."""
    text = '{"channel": "chat", "event": "e", "ref": 1, "data": %s}' % nested(64)
    assert refused(text).code == "bad_frame"


def test_nesting_counts_containers_not_brackets():
    """Depth is levels of arrays and objects: many shallow brackets are fine."""
    text = '{"channel": "c", "event": "e", "data": [%s, %s]}' % (nested(62), ",".join(["[]"] * 200))
    assert protocol.parse_frame(text).event == "e"


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_very_deep_nesting_is_bad_frame(depth):
    """Nesting deep enough to overflow the parser's recursion is ``bad_frame``."""
    assert refused('{"channel": "c", "event": "e", "data": %s}' % nested(depth)).code == "bad_frame"


@pytest.mark.parametrize("text", ['"\\ud800"', '"a\\udfffb"', '{"\\ud83d": 1}'])
def test_lone_surrogate_is_bad_frame(text):
    """A string with an unpaired surrogate has no UTF-8 form: ``bad_frame``."""
    assert refused('{"channel": "c", "event": "e", "data": %s}' % text).code == "bad_frame"


def test_paired_surrogates_are_one_character():
    """An escaped surrogate pair is an ordinary character; an escaped backslash is no escape."""
    text = '{"channel": "c", "event": "e", "data": ["\\ud83d\\ude00", "\\\\ud800"]}'
    assert protocol.parse_frame(text).data == ["\U0001f600", "\\ud800"]


def test_loads_rejects_constants_and_keeps_standard_json():
    """``loads`` is strict but otherwise ``json.loads``."""
    assert protocol.loads('{"a": [1, 2.5, "x", true, null]}') == {"a": [1, 2.5, "x", True, None]}
    for text in ("NaN", "[Infinity]", "[-Infinity]"):
        with pytest.raises(ValueError):
            protocol.loads(text)


# -- channel and event names --------------------------------------------


@pytest.mark.parametrize("name", ["c", "A-Z_a.z:0/9", "x" * 128, "user:42", "a/b/c", "-._:/"])
def test_channel_names_at_the_limits_are_valid(name):
    """1 to 128 characters from ``A-Z a-z 0-9 _ - . : /`` are valid channel names."""
    assert protocol.is_valid_channel(name)
    assert protocol.parse_frame(frame(channel=name, event="e")).channel == name


@pytest.mark.parametrize(
    "name", ["", "x" * 129, "chat room", "chät", "a*", "a\n", "chat\x00", "#", "a+b", "١"]
)
def test_bad_channel_names_are_bad_channel(name):
    """A channel string breaking the rule is ``bad_channel``; the ref is kept, the channel not."""
    error = refused(frame(channel=name, event="message", ref=2))
    assert (error.code, error.ref, error.channel) == ("bad_channel", 2, None)


@pytest.mark.parametrize("event", ["e", "x" * 64, "with space", "é" * 64, "a@b", "\U0001f600"])
def test_event_names_of_1_to_64_characters_are_valid(event):
    """Any 1 to 64 characters not starting with ``@`` make an event name."""
    assert protocol.is_valid_event(event)
    assert protocol.parse_frame(frame(channel="chat", event=event)).event == event


@pytest.mark.parametrize("event", ["", "x" * 65, "é" * 65])
def test_bad_event_names_are_bad_event(event):
    """An empty or too long event is ``bad_event``, with the frame's ref and channel."""
    error = refused(frame(channel="chat", event=event, ref="q"))
    assert (error.code, error.ref, error.channel) == ("bad_event", "q", "chat")


@pytest.mark.parametrize(
    "event", ["@", "@connected", "@subscribed", "@unsubscribed", "@reply", "@error", "@pong", "@other"]
)
def test_reserved_names_other_than_client_requests_are_bad_event(event):
    """Names starting with ``@`` other than the client requests are ``bad_event``."""
    error = refused(frame(channel="chat", event=event, ref=1))
    assert (error.code, error.ref, error.channel) == ("bad_event", 1, "chat")
    assert not protocol.is_valid_event(event)


def test_bad_channel_is_checked_before_bad_event():
    """A frame with both a bad channel and a bad event answers ``bad_channel``."""
    assert refused(frame(channel="", event="@nope")).code == "bad_channel"


def test_reserved_ping_with_a_bad_channel_is_bad_channel():
    """``@ping`` may omit the channel, but a present one must be valid."""
    assert refused(frame(channel="bad channel", event="@ping")).code == "bad_channel"


# -- encoding -----------------------------------------------------------


def test_encode_orders_fields_and_omits_absent_ones():
    """Server frames carry ``channel``, ``ref`` and ``seq`` only when they have them."""
    assert json.loads(protocol.encode("@pong")) == {"event": "@pong", "data": None}
    assert json.loads(protocol.encode("m", {"t": 1}, "chat", ref=0, seq=5)) == {
        "channel": "chat", "event": "m", "data": {"t": 1}, "ref": 0, "seq": 5,
    }


def test_encode_is_utf8_standard_json():
    """Non-ASCII text goes out as UTF-8, and non-JSON numbers are refused."""
    assert protocol.encode("m", "é") == '{"event":"m","data":"é"}'.encode()
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            protocol.encode("m", value)


def test_error_payload_shape():
    """``@error`` data is ``{"code", "message"}``."""
    assert protocol.error_payload("bad_frame", "why") == {"code": "bad_frame", "message": "why"}


@pytest.mark.parametrize(
    "text, depth",
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [[{}]]}', 4),
        ('["]]]]", "[[[[[", "\\"[["]', 1),
        ('{"k\\\\": [[]]}', 3),
        ("[" * 64 + "]" * 64, 64),
        ("[[]," * 100 + "[]" + "]" * 100, 101),
    ],
)
def test_nesting_depth_is_read_from_the_text(text, depth):
    """Depth counts arrays and objects, not brackets inside strings (escaped quotes included)."""
    assert protocol.nesting_depth(text) == depth


def test_too_deep_is_refused_before_parsing():
    """Text nested past 64 levels is refused whatever it holds, even when the parser would choke."""
    with pytest.raises(ValueError, match="deeper than 64"):
        protocol.loads("[" * 30000 + "]" * 30000)
    assert protocol.loads(",".join(["[]"] * 1000).join("[]")) == [[]] * 1000
