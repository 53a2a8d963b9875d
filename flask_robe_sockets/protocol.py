"""The wire protocol, version 1, apart from any I/O.

Parsing and validation of client frames' JSON, and encoding of server
frames to JSON text (``frames.py`` wraps that text for the wire). Nothing
here knows about sockets, gevent or Flask, so it is tested by feeding it
strings.
See PROTOCOL.md for the contract this module implements.
"""
from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from .errors import ProtocolError

VERSION = 1

SUBSCRIBE = "@subscribe"
UNSUBSCRIBE = "@unsubscribe"
PING = "@ping"
PONG = "@pong"
CONNECTED = "@connected"
SUBSCRIBED = "@subscribed"
UNSUBSCRIBED = "@unsubscribed"
REPLY = "@reply"
ERROR = "@error"
#: Presence (PROTOCOL.md section 7): a request and its answer, and the events.
PRESENCE = "@presence"
JOIN = "@join"
LEAVE = "@leave"

#: The reserved events a client may send (PROTOCOL.md section 4).
CLIENT_REQUESTS = frozenset({SUBSCRIBE, UNSUBSCRIBE, PING, PRESENCE})

MAX_DEPTH = 64

_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-.:/]{1,128}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# Close codes (PROTOCOL.md section 5).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SLOW_CONSUMER = 4008


@dataclass(frozen=True)
class Frame:
    """A valid frame from a client."""

    event: str
    channel: str | None = None
    data: Any = None
    ref: str | int | None = None


def is_valid_channel(name: Any) -> bool:
    """Whether ``name`` is a channel name the protocol allows."""
    return isinstance(name, str) and _CHANNEL_RE.fullmatch(name) is not None


def is_valid_event(name: Any) -> bool:
    """Whether ``name`` is an application event name (not reserved)."""
    return isinstance(name, str) and 0 < len(name) <= 64 and not name.startswith("@")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number does not fit a double")
    return value


def _parse_int(text: str) -> int:
    value = int(text)  # more than 4,300 digits raises ValueError itself
    if len(text) > 308:
        float(value)  # OverflowError when it does not fit a double
    return value


_decoder = json.JSONDecoder(
    parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant
)


# A JSON string, escapes included (the unrolled form runs in linear time),
# and the runs of text between brackets.
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# Containers in a frame past which the GC waits for the parse (its first
# generation is collected every 700 new ones).
_GC_PAUSE_AT = 500


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in the JSON ``text``.

    Read from the text, in time linear in its length whatever its shape:
    walking the parsed value instead costs more than parsing it (21,000
    ``[]`` in 63 KB took 28 ms to walk and 6 ms to parse). Brackets inside
    strings are not counted; on text that is not JSON the answer means
    nothing, and the parser refuses that text anyway.
    """
    brackets = _NOT_BRACKETS_RE.sub("", _STRING_RE.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def loads(text: str) -> Any:
    """Parse strict JSON (RFC 8259), raising ``ValueError`` on anything else.

    Python's ``json`` accepts ``NaN`` and ``Infinity`` and turns ``1e999``
    into ``inf``; the protocol does not, so they are refused here. Every
    check costs time linear in the text, with a small constant whatever its
    content (PROTOCOL.md section 5).
    """
    # Counting brackets first keeps the depth scan off the common path; the
    # depth is read before parsing, so text nested too deep is never parsed.
    containers = text.count("[") + text.count("{")
    if containers > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
    # Every container parsed is one the cyclic GC tracks: thousands of them
    # would run it again and again, over the whole heap, and tripled the
    # cost of a frame of 21,000 "[]". The decoder is C code that cannot
    # switch greenlets, so pausing the GC while it runs costs no one else.
    paused = containers > _GC_PAUSE_AT and gc.isenabled()
    if paused:
        gc.disable()
    try:
        value = _decoder.decode(text)
    except (RecursionError, OverflowError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    finally:
        if paused:
            gc.enable()
    # An escaped lone surrogate ("\\ud800") decodes to a string that has no
    # UTF-8 form: echoing it back would fail, so it is refused here.
    if _SURROGATE_ESCAPE.search(text):
        try:
            dumps(value).encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate: not Unicode text") from None
    return value


def parse_frame(text: str) -> Frame:
    """Validate one client text frame.

    :raises ProtocolError: with the code PROTOCOL.md section 3 assigns, and
        the frame's ``ref`` and ``channel`` where they were usable.
    """
    try:
        obj = loads(text)
    except ValueError as exc:
        raise ProtocolError("bad_frame", f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")

    ref = obj.get("ref")
    ref_ok = ref is None or (isinstance(ref, (str, int)) and not isinstance(ref, bool))
    answer_ref = ref if ref_ok else None
    channel = obj.get("channel")
    channel_ok = is_valid_channel(channel)
    answer_channel = channel if channel_ok else None

    def fail(code: str, message: str) -> ProtocolError:
        return ProtocolError(code, message, answer_ref, answer_channel)

    event = obj.get("event")
    if not isinstance(event, str):
        raise fail("bad_frame", "'event' must be a string")
    if not ref_ok:
        raise fail("bad_frame", "'ref' must be a string or an integer")
    if channel is None and event == PING:
        return Frame(event=event, data=obj.get("data"), ref=ref)
    if not isinstance(channel, str):
        raise fail("bad_frame", "'channel' must be a string")
    if not channel_ok:
        raise fail(
            "bad_channel",
            "channel names are 1 to 128 characters from A-Z a-z 0-9 _ - . : /",
        )
    if event.startswith("@"):
        if event not in CLIENT_REQUESTS:
            raise fail("bad_event", f"{event!r} is reserved for the protocol")
    elif not is_valid_event(event):
        raise fail("bad_event", "event names are 1 to 64 characters")
    return Frame(event=event, channel=channel, data=obj.get("data"), ref=ref)


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
)


def dumps(value: Any) -> str:
    """Encode ``value`` as standard JSON; ``NaN`` and infinities raise ``ValueError``."""
    return _encoder.encode(value)


def encode(
    event: str,
    data: Any = None,
    channel: str | None = None,
    ref: Any = None,
    seq: int | None = None,
) -> bytes:
    """Build the UTF-8 JSON text of one server frame."""
    frame: dict[str, Any] = {}
    if channel is not None:
        frame["channel"] = channel
    frame["event"] = event
    frame["data"] = data
    if ref is not None:
        frame["ref"] = ref
    if seq is not None:
        frame["seq"] = seq
    return dumps(frame).encode()


def error_payload(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}
