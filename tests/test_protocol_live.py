"""PROTOCOL.md sections 3 to 6 against a live gunicorn gevent server.

The peer is the ``websockets`` library, which the project did not write, so
what is checked is the wire, not our own client's reading of it. Every
answer the protocol names is asserted whole; a "fence" (a ``@ping`` with a
fresh ref) proves that nothing else was sent before it.
"""
from __future__ import annotations

import itertools
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from websockets.exceptions import ConnectionClosedError

from .servers import Gunicorn

_refs = itertools.count(1_000_000)


@pytest.fixture(scope="module")
def small():
    """A server allowing 3 subscriptions, with long histories and send queues."""
    srv = Gunicorn({
        "ROBE_SOCKETS_MAX_SUBSCRIPTIONS": 3,
        "ROBE_SOCKETS_HISTORY_SIZE": 5000,
        "ROBE_SOCKETS_SEND_QUEUE_SIZE": 10000,
    })
    yield srv
    srv.stop()


def send(ws, **fields) -> None:
    ws.send(json.dumps(fields))


def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=5))


def fence(ws) -> list[dict]:
    """Every frame the server sends before the answer to a fresh ``@ping``."""
    ref = f"fence-{next(_refs)}"
    send(ws, event="@ping", ref=ref)
    frames = []
    while True:
        frame = recv(ws)
        if frame == {"event": "@pong", "data": None, "ref": ref}:
            return frames
        frames.append(frame)


def ask(ws, **fields) -> dict:
    """Send a frame and return the one answer to it, checking nothing else came."""
    send(ws, **fields)
    answer = recv(ws)
    assert fence(ws) == []
    return answer


def error(answer: dict) -> tuple[str, dict]:
    """The code of an ``@error``, and the frame without its data."""
    assert answer["event"] == "@error", answer
    data = answer["data"]
    assert set(data) == {"code", "message"} and isinstance(data["message"], str) and data["message"]
    return data["code"], {k: v for k, v in answer.items() if k != "data"}


def unique_channel() -> str:
    return f"t:{uuid.uuid4().hex[:12]}"


def broadcast(srv, channel: str, event: str = "news", data=None) -> int:
    response = requests.post(
        f"{srv.url}/broadcast/{channel}/{event}",
        data=json.dumps(data), headers={"Content-Type": "application/json"}, timeout=5,
    )
    response.raise_for_status()
    return response.json()["seq"]


def subscribe(ws, channel: str, data=None, ref=None) -> dict:
    fields = {"channel": channel, "event": "@subscribe", "ref": ref or next(_refs)}
    if data is not None:
        fields["data"] = data
    send(ws, **fields)
    answer = recv(ws)
    assert answer["event"] == "@subscribed", answer
    assert (answer["channel"], answer["ref"]) == (channel, fields["ref"])
    return answer


# -- section 3: broken frames ------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello", "", "{", "[]", '["chat"]', "42", "null", '"chat"', "{'event': 'e'}"],
)
def test_not_json_or_not_an_object_is_bad_frame(ws_connect, text):
    """Text that is not a JSON object gets ``bad_frame`` with neither ref nor channel."""
    ws = ws_connect()
    ws.send(text)
    assert error(recv(ws)) == ("bad_frame", {"event": "@error"})
    assert fence(ws) == []


@pytest.mark.parametrize(
    "fields, code, echoed",
    [
        # channel missing, on anything but @ping
        ({"event": "echo", "ref": 1}, "bad_frame", {"ref": 1}),
        ({"event": "@subscribe", "ref": "s"}, "bad_frame", {"ref": "s"}),
        # channel not a string
        ({"channel": 7, "event": "echo", "ref": 2}, "bad_frame", {"ref": 2}),
        ({"channel": ["chat"], "event": "echo"}, "bad_frame", {}),
        ({"channel": None, "event": "echo", "ref": 0}, "bad_frame", {"ref": 0}),
        # event missing or not a string
        ({"channel": "chat", "ref": 3}, "bad_frame", {"ref": 3, "channel": "chat"}),
        ({"channel": "chat", "event": 5, "ref": 4}, "bad_frame", {"ref": 4, "channel": "chat"}),
        ({"channel": "chat", "event": None}, "bad_frame", {"channel": "chat"}),
        # ref neither a string nor an integer: true is not an integer
        ({"channel": "chat", "event": "echo", "ref": True}, "bad_frame", {"channel": "chat"}),
        ({"channel": "chat", "event": "echo", "ref": 1.5}, "bad_frame", {"channel": "chat"}),
        ({"channel": "chat", "event": "echo", "ref": [1]}, "bad_frame", {"channel": "chat"}),
        ({"event": "@ping", "ref": False}, "bad_frame", {}),
        # channel breaks the name rule
        ({"channel": "", "event": "echo", "ref": 5}, "bad_channel", {"ref": 5}),
        ({"channel": "x" * 129, "event": "echo", "ref": 6}, "bad_channel", {"ref": 6}),
        ({"channel": "chat room", "event": "@subscribe", "ref": 7}, "bad_channel", {"ref": 7}),
        ({"channel": "chät", "event": "echo"}, "bad_channel", {}),
        ({"channel": "a*", "event": "@ping", "ref": "p"}, "bad_channel", {"ref": "p"}),
        # event breaks the name rule, or is reserved
        ({"channel": "chat", "event": "", "ref": 8}, "bad_event", {"ref": 8, "channel": "chat"}),
        ({"channel": "chat", "event": "e" * 65, "ref": 9}, "bad_event", {"ref": 9, "channel": "chat"}),
        ({"channel": "chat", "event": "@connected", "ref": 10}, "bad_event", {"ref": 10, "channel": "chat"}),
        ({"channel": "chat", "event": "@reply"}, "bad_event", {"channel": "chat"}),
        ({"channel": "chat", "event": "@error", "ref": "e"}, "bad_event", {"ref": "e", "channel": "chat"}),
        ({"channel": "chat", "event": "@pong", "ref": 11}, "bad_event", {"ref": 11, "channel": "chat"}),
        ({"channel": "chat", "event": "@subscribed", "ref": 12}, "bad_event", {"ref": 12, "channel": "chat"}),
        ({"channel": "chat", "event": "@"}, "bad_event", {"channel": "chat"}),
    ],
)
def test_broken_frame_answers(ws_connect, fields, code, echoed):
    """Each broken frame gets its code, with ``ref`` and ``channel`` exactly when usable."""
    ws = ws_connect()
    send(ws, **fields)
    assert error(recv(ws)) == (code, {"event": "@error", **echoed})
    assert fence(ws) == []


def test_names_at_the_limits_are_accepted(ws_connect):
    """A 128-character channel and a 64-character event are valid (no bad_channel/bad_event)."""
    ws = ws_connect()
    channel = "c" * 128
    assert subscribe(ws, channel, ref=1)["data"]["recovered"] is False
    answer = ask(ws, channel=channel, event="e" * 64, ref=2)
    assert error(answer) == ("unknown_event", {"event": "@error", "channel": channel, "ref": 2})


@pytest.mark.parametrize(
    "data",
    ["NaN", "Infinity", "-Infinity", "1e999", "9" * 4301, "[" * 65 + "]" * 65, '"\\udc00"'],
    ids=["nan", "infinity", "-infinity", "1e999", "4301-digits", "65-deep", "lone-surrogate"],
)
def test_non_strict_json_is_bad_frame(ws_connect, data):
    """NaN, infinities, huge numbers, 65 levels and lone surrogates are ``bad_frame``."""
    ws = ws_connect()
    ws.send('{"channel": "chat", "event": "echo", "ref": 1, "data": %s}' % data)
    assert error(recv(ws)) == ("bad_frame", {"event": "@error"})
    assert fence(ws) == []


@pytest.mark.parametrize("fields", ['"event": "@ping"', '"event": "@ping", "channel": "\\udc00"'])
def test_lone_surrogate_in_a_ping_is_bad_frame(ws_connect, fields):
    """A ``@ping`` whose data holds a lone surrogate is ``bad_frame``, and the connection lives on."""
    ws = ws_connect()
    ws.send('{%s, "ref": "\\ud800", "data": ["\\ud800"]}' % fields)
    assert error(recv(ws)) == ("bad_frame", {"event": "@error"})
    assert fence(ws) == []


def test_64_levels_of_nesting_are_accepted(ws_connect):
    """A frame nested 64 levels deep (the object and 63 arrays) is handled."""
    ws = ws_connect()
    data = json.loads("[" + "[" * 62 + '"leaf"' + "]" * 62 + ", [], {}]")
    ws.send(json.dumps({"channel": "chat", "event": "echo", "ref": 1, "data": data}))
    assert recv(ws) == {"channel": "chat", "event": "@reply", "ref": 1, "data": {"echo": data}}


def test_largest_numbers_and_unicode_round_trip(ws_connect):
    """Numbers that fit a double and any Unicode text come back as sent."""
    ws = ws_connect()
    data = [int(1e308), -1.7976931348623157e308, 2**63, 5e-324, "é€\U0001f600", "\\ud800"]
    assert ask(ws, channel="chat", event="echo", ref="u", data=data)["data"] == {"echo": data}


def test_binary_frame_is_bad_frame(ws_connect):
    """A binary frame gets ``bad_frame`` and the connection goes on."""
    ws = ws_connect()
    ws.send(json.dumps({"channel": "chat", "event": "echo", "ref": 1}).encode())
    assert error(recv(ws)) == ("bad_frame", {"event": "@error"})
    assert fence(ws) == []


def test_invalid_utf8_text_closes_1007(ws_connect):
    """A text frame that is not UTF-8 closes the connection with 1007."""
    ws = ws_connect()
    ws.send(b'{"channel": "chat", "event": "echo", "data": "\xff\xfe"}', text=True)
    with pytest.raises(ConnectionClosedError) as info:
        fence(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007


def test_message_of_exactly_the_maximum_size_is_handled(ws_connect):
    """A 64 KiB message (not larger than the maximum) is handled."""
    ws = ws_connect()
    head = '{"channel": "chat", "event": "echo", "ref": 1, "data": "'
    text = head + "x" * (65536 - len(head) - 2) + '"}'
    assert len(text.encode()) == 65536
    ws.send(text)
    assert recv(ws)["event"] == "@reply"


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
def test_message_over_the_maximum_closes_1009(ws_connect, fragmented):
    """A message over 64 KiB, in one frame or counted over its fragments, closes with 1009."""
    ws = ws_connect()
    head = '{"channel": "chat", "event": "echo", "ref": 1, "data": "'
    text = head + "x" * (65537 - len(head) - 2) + '"}'
    with pytest.raises(ConnectionClosedError) as info:
        # websockets ends a fragmented message with an empty final fragment:
        # the 1009 for the last data fragment may already be there to refuse it.
        if fragmented:
            ws.send([text[i:i + 20000] for i in range(0, len(text), 20000)])
        else:
            ws.send(text)
        fence(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize(
    "bad, code", [("x" * 70000, 1009), (b"\xff\xfe", 1007)], ids=["oversize", "not-utf8"]
)
def test_close_code_survives_frames_sent_after_the_bad_one(ws_connect, bad, code):
    """A client still sending after its bad frame gets the close code, not a reset."""
    for _ in range(6):  # without a lingering close, about half the tries lost the code
        ws = ws_connect(close_timeout=2)
        ws.send(bad, text=True)
        with pytest.raises(ConnectionClosedError) as info:
            for _ in range(50):
                send(ws, event="@ping")
            while True:
                ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == code


def test_bad_frames_leave_the_connection_and_others_alone(ws_connect, server):
    """A stream of bad frames neither closes that connection nor disturbs another one."""
    channel = unique_channel()
    honest, hostile = ws_connect(), ws_connect()
    subscribe(honest, channel)
    subscribe(hostile, channel)
    for text in ["x", "[]", '{"event": 1}', '{"channel": "", "event": "e"}', '{"channel": "c", "event": "@x"}']:
        hostile.send(text)
        assert recv(hostile)["event"] == "@error"
    hostile.send(b"\x00binary")
    assert recv(hostile)["event"] == "@error"
    seq = broadcast(server, channel, data={"n": 1})
    expected = {"channel": channel, "event": "news", "data": {"n": 1}, "seq": seq}
    assert recv(honest) == expected and recv(hostile) == expected
    assert fence(honest) == [] and fence(hostile) == []


# -- section 4: client to server ----------------------------------------


def test_connected_is_the_first_frame(server):
    """The first frame is ``@connected`` with the connection id and protocol 1, nothing else."""
    from websockets.sync.client import connect

    with connect(f"{server.ws_url}?ticket={server.ticket()}", open_timeout=5) as ws:
        hello = recv(ws)
        assert set(hello) == {"event", "data"} and hello["event"] == "@connected"
        assert set(hello["data"]) == {"id", "protocol"} and hello["data"]["protocol"] == 1
        assert isinstance(hello["data"]["id"], str) and hello["data"]["id"]
        assert fence(ws) == []


def test_subscribe_answer_shape(ws_connect, server):
    """``@subscribed`` echoes channel and ref and has data ``{recovered, seq, epoch}``."""
    ws = ws_connect()
    channel = unique_channel()
    answer = ask(ws, channel=channel, event="@subscribe", ref="sub-1")
    assert set(answer) == {"channel", "event", "ref", "data"}
    assert answer["ref"] == "sub-1" and answer["channel"] == channel
    data = answer["data"]
    assert set(data) == {"recovered", "seq", "epoch"}
    assert data["recovered"] is False and data["seq"] == 0
    assert isinstance(data["epoch"], str) and data["epoch"]


def test_subscribe_without_ref_is_answered_without_ref(ws_connect):
    """Answers carry a ref only when the request had one."""
    ws = ws_connect()
    answer = ask(ws, channel=unique_channel(), event="@subscribe")
    assert answer["event"] == "@subscribed" and "ref" not in answer


def test_subscribe_reports_the_channel_position(ws_connect, server):
    """``@subscribed`` names the channel's last ``seq``."""
    channel = unique_channel()
    broadcast(server, channel)
    last = broadcast(server, channel)
    assert last == 2
    assert subscribe(ws_connect(), channel)["data"]["seq"] == 2


def test_double_subscribe_answers_again_and_delivers_once(ws_connect, server):
    """Subscribing twice answers ``@subscribed`` again; broadcasts still arrive once."""
    ws = ws_connect()
    channel = unique_channel()
    first = subscribe(ws, channel, ref=1)
    second = subscribe(ws, channel, ref=2)
    assert second["data"] == first["data"]
    seq = broadcast(server, channel, data="once")
    assert recv(ws) == {"channel": channel, "event": "news", "data": "once", "seq": seq}
    assert fence(ws) == []


def test_unsubscribe_stops_delivery(ws_connect, server):
    """``@unsubscribed`` answers a leave, and broadcasts stop arriving."""
    ws = ws_connect()
    channel = unique_channel()
    subscribe(ws, channel)
    answer = ask(ws, channel=channel, event="@unsubscribe", ref=3)
    assert answer == {"channel": channel, "event": "@unsubscribed", "data": None, "ref": 3}
    broadcast(server, channel)
    assert fence(ws) == []


def test_unsubscribe_never_joined_still_answers(ws_connect):
    """``@unsubscribe`` from a channel never joined answers ``@unsubscribed``."""
    ws = ws_connect()
    channel = unique_channel()
    assert ask(ws, channel=channel, event="@unsubscribe", ref="u") == {
        "channel": channel, "event": "@unsubscribed", "data": None, "ref": "u",
    }
    assert ask(ws, channel=channel, event="@unsubscribe") == {
        "channel": channel, "event": "@unsubscribed", "data": None,
    }


def test_subscribe_forbidden_by_the_authorize_hook(ws_connect, server):
    """A subscribe the hook refuses answers ``forbidden`` and joins nothing."""
    ws = ws_connect()
    answer = ask(ws, channel="closed", event="@subscribe", ref=1)
    assert error(answer) == ("forbidden", {"event": "@error", "channel": "closed", "ref": 1})
    broadcast(server, "closed")
    assert fence(ws) == []


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"event": "@ping"}, {"event": "@pong", "data": None}),
        ({"event": "@ping", "ref": 1}, {"event": "@pong", "data": None, "ref": 1}),
        ({"event": "@ping", "ref": "p", "channel": "chat"}, {"event": "@pong", "data": None, "ref": "p", "channel": "chat"}),
        ({"event": "@ping", "channel": "any/name"}, {"event": "@pong", "data": None, "channel": "any/name"}),
    ],
)
def test_ping_is_answered_pong(ws_connect, fields, expected):
    """``@ping`` answers ``@pong`` with its ref, and its channel when it had one."""
    ws = ws_connect()
    assert ask(ws, **fields) == expected


def test_reply_carries_the_handler_result(ws_connect):
    """An event with a ref gets one ``@reply`` with the handler's value; subscribing is not needed."""
    ws = ws_connect()
    assert ask(ws, channel="chat", event="echo", ref=7, data={"t": "hi"}) == {
        "channel": "chat", "event": "@reply", "ref": 7, "data": {"echo": {"t": "hi"}},
    }
    assert ask(ws, channel="chat", event="echo", ref="s")["data"] == {"echo": None}


def test_unknown_fields_are_ignored(ws_connect):
    """Fields the protocol does not define (even ``seq``) change nothing in the answer."""
    ws = ws_connect()
    answer = ask(ws, channel="chat", event="echo", ref=3, data=1, seq=99, extra={"x": [1]}, id="z")
    assert answer == {"channel": "chat", "event": "@reply", "ref": 3, "data": {"echo": 1}}


def test_reply_is_the_first_non_null_return(ws_connect):
    """With several handlers, ``@reply`` holds the first value that is not null."""
    ws = ws_connect()
    assert ask(ws, channel="chat", event="first", ref=1)["data"] == "second handler"


def test_reply_is_null_when_every_handler_returns_none(ws_connect):
    """Handlers that return nothing give ``@reply`` with data null."""
    ws = ws_connect()
    assert ask(ws, channel="chat", event="say", ref=2) == {
        "channel": "chat", "event": "@reply", "ref": 2, "data": None,
    }


def test_handlers_run_in_registration_order(ws_connect):
    """Handlers for one channel and event run in the order they were registered."""
    ws = ws_connect()
    assert ask(ws, channel="chat", event="order", ref=1)["data"] == ["a", "b", "c"]


def test_successful_event_without_ref_is_not_answered(ws_connect):
    """Without a ref only errors are answered: a handled event sends nothing back."""
    ws = ws_connect()
    send(ws, channel="chat", event="echo", data=1)
    send(ws, channel="chat", event="first")
    assert fence(ws) == []


@pytest.mark.parametrize(
    "event, ref",
    [("boom", 9), ("boom", None), ("late_boom", "r"), ("late_boom", None), ("not_json", 9)],
)
def test_handler_error_hides_internals(ws_connect, event, ref):
    """A raising handler, or a non-JSON reply, gets one ``handler_error`` and no internal detail."""
    ws = ws_connect()
    fields = {"channel": "chat", "event": event}
    if ref is not None:
        fields["ref"] = ref
    send(ws, **fields)
    answer = recv(ws)
    code, rest = error(answer)
    assert (code, rest) == ("handler_error", {"event": "@error", "channel": "chat", **({"ref": ref} if ref else {})})
    text = json.dumps(answer)
    for leak in ("internal detail", "Error", "Traceback", ".py", "set"):
        assert leak not in text
    assert fence(ws) == []
    assert ask(ws, channel="chat", event="echo", ref=1)["event"] == "@reply"


@pytest.mark.parametrize("event, message", [("deny", "no, you may not"), ("late_deny", "not after all")])
def test_forbidden_raised_by_a_handler(ws_connect, event, message):
    """A handler raising ``Forbidden`` gets one ``@error forbidden`` with its message."""
    ws = ws_connect()
    answer = ask(ws, channel="chat", event=event, ref="f")
    assert answer == {
        "channel": "chat", "event": "@error", "ref": "f",
        "data": {"code": "forbidden", "message": message},
    }


@pytest.mark.parametrize("channel", ["closed", "user:somebody-else"])
def test_event_forbidden_by_the_authorize_hook(ws_connect, channel):
    """An event on a channel the hook refuses is ``forbidden``, whether or not it has handlers."""
    ws = ws_connect()
    for event in ("echo", "no-handler"):
        answer = ask(ws, channel=channel, event=event, ref=1)
        assert error(answer) == ("forbidden", {"event": "@error", "channel": channel, "ref": 1})


def test_unknown_event_with_and_without_ref(ws_connect):
    """An event with no handler is ``unknown_event``, answered even without a ref."""
    ws = ws_connect()
    answer = ask(ws, channel="chat", event="nobody-listens", ref=4)
    assert error(answer) == ("unknown_event", {"event": "@error", "channel": "chat", "ref": 4})
    answer = ask(ws, channel="elsewhere", event="echo")
    assert error(answer) == ("unknown_event", {"event": "@error", "channel": "elsewhere"})


def test_too_many_subscriptions(ws_connect, small):
    """Past MAX_SUBSCRIPTIONS a subscribe is refused; joined ones still answer; leaving frees a place."""
    ws = ws_connect(small)
    names = [unique_channel() for _ in range(4)]
    for name in names[:3]:
        subscribe(ws, name)
    answer = ask(ws, channel=names[3], event="@subscribe", ref="over")
    assert error(answer) == (
        "too_many_subscriptions", {"event": "@error", "channel": names[3], "ref": "over"},
    )
    broadcast(small, names[3])
    assert fence(ws) == []
    subscribe(ws, names[0])
    ask(ws, channel=names[0], event="@unsubscribe")
    subscribe(ws, names[3])


# -- section 5: server to client ----------------------------------------


@pytest.mark.parametrize(
    "event, frame_channel", [("direct", None), ("direct_channel", "chat")]
)
def test_message_to_one_connection_has_no_seq(ws_connect, event, frame_channel):
    """A message to one connection carries no ``seq`` (and a channel only when given)."""
    ws = ws_connect()
    send(ws, channel="chat", event=event, ref=1)
    frames = [recv(ws), recv(ws)]
    direct = next(f for f in frames if f["event"] == "direct")
    conn_id = direct["data"]["to"]
    expected = {"event": "direct", "data": {"to": conn_id}}
    if frame_channel:
        expected["channel"] = frame_channel
    assert direct == expected
    assert {"channel": "chat", "event": "@reply", "ref": 1, "data": None} in frames
    assert fence(ws) == []


def test_seq_grows_by_one_from_1(ws_connect, server):
    """Broadcasts on a channel carry ``seq`` 1, 2, 3... in order, as the sender was told."""
    ws = ws_connect()
    channel = unique_channel()
    assert subscribe(ws, channel)["data"]["seq"] == 0
    sent = [broadcast(server, channel, data=i) for i in range(5)]
    assert sent == [1, 2, 3, 4, 5]
    got = [recv(ws) for _ in sent]
    assert got == [{"channel": channel, "event": "news", "data": i, "seq": i + 1} for i in range(5)]


def test_seq_from_a_handler_broadcast(ws_connect):
    """A broadcast made by a handler reaches the sender too, with the next ``seq``."""
    ws = ws_connect()
    seq = subscribe(ws, "chat")["data"]["seq"]
    send(ws, channel="chat", event="say", data={"text": "hi"}, ref=1)
    frames = [recv(ws), recv(ws)]
    assert {"channel": "chat", "event": "said", "data": {"text": "hi"}, "seq": seq + 1} in frames
    assert {"channel": "chat", "event": "@reply", "ref": 1, "data": None} in frames


# -- section 6: recovery ------------------------------------------------


def _history(srv, ws_connect, count: int) -> tuple[str, str]:
    """A fresh channel with ``count`` broadcasts (``seq`` n has data ``{"i": n - 1}``).

    A watcher reads them all: the ``websockets`` client stops reading when
    16 messages wait unread, and then its close waits out its timeout.
    """
    channel = unique_channel()
    ws = ws_connect(srv)
    epoch = subscribe(ws, channel)["data"]["epoch"]
    response = requests.post(f"{srv.url}/burst/{channel}/news", params={"count": count}, timeout=10)
    assert response.json()["seq"] == count
    assert [recv(ws)["seq"] for _ in range(count)] == list(range(1, count + 1))
    return channel, epoch


def news(channel: str, seq: int) -> dict:
    """The broadcast ``seq`` of a channel filled by ``_history``."""
    return {"channel": channel, "event": "news", "data": {"i": seq - 1, "pad": "x" * 10}, "seq": seq}


def test_recovery_replays_in_order_with_original_seq(ws_connect, server):
    """``since`` in the current epoch replays every later broadcast, in order, then live ones."""
    channel, epoch = _history(server, ws_connect, 5)
    ws = ws_connect()
    answer = subscribe(ws, channel, {"since": 2, "epoch": epoch})
    assert answer["data"] == {"recovered": True, "seq": 5, "epoch": epoch}
    replay = [recv(ws) for _ in range(3)]
    assert replay == [news(channel, seq) for seq in (3, 4, 5)]
    assert broadcast(server, channel, data=6) == 6
    assert recv(ws) == {"channel": channel, "event": "news", "data": 6, "seq": 6}
    assert fence(ws) == []


def test_recovery_without_epoch_uses_the_current_one(ws_connect, server):
    """A client that sent no epoch is recovered against the current history."""
    channel, epoch = _history(server, ws_connect, 3)
    ws = ws_connect()
    assert subscribe(ws, channel, {"since": 1})["data"] == {"recovered": True, "seq": 3, "epoch": epoch}
    assert [recv(ws)["seq"] for _ in range(2)] == [2, 3]
    assert fence(ws) == []


def test_recovery_when_nothing_was_missed(ws_connect, server):
    """``since`` equal to the last ``seq`` is recovered with nothing to replay."""
    channel, epoch = _history(server, ws_connect, 2)
    ws = ws_connect()
    assert subscribe(ws, channel, {"since": 2, "epoch": epoch})["data"]["recovered"] is True
    assert fence(ws) == []


@pytest.mark.parametrize(
    "data",
    [
        {"since": 1, "epoch": "another-epoch"},
        {"since": 4},
        {"since": 99, "epoch": None},
        {"epoch": "EPOCH"},
        {},
        "not an object",
        {"since": True, "epoch": "EPOCH"},
        {"since": -1, "epoch": "EPOCH"},
        {"since": "1", "epoch": "EPOCH"},
    ],
    ids=["other-epoch", "since-past-n", "since-far-past-n", "no-since", "empty", "not-object",
         "since-true", "since-negative", "since-string"],
)
def test_no_recovery(ws_connect, server, data):
    """Another epoch, ``since`` past the last ``seq``, or no usable ``since``: recovered false, no replay."""
    channel, epoch = _history(server, ws_connect, 3)
    if isinstance(data, dict):
        data = {k: (epoch if v == "EPOCH" else v) for k, v in data.items() if v is not None}
    ws = ws_connect()
    answer = subscribe(ws, channel, data)
    assert answer["data"] == {"recovered": False, "seq": 3, "epoch": epoch}
    assert fence(ws) == []


def test_no_recovery_past_the_history_kept(ws_connect, server):
    """With 100 broadcasts kept, ``since`` 4 of 105 is not recovered; ``since`` 5 replays 100."""
    channel, epoch = _history(server, ws_connect, 105)
    ws = ws_connect()
    assert subscribe(ws, channel, {"since": 4, "epoch": epoch})["data"] == {
        "recovered": False, "seq": 105, "epoch": epoch,
    }
    assert fence(ws) == []
    other = ws_connect()
    assert subscribe(other, channel, {"since": 5, "epoch": epoch})["data"]["recovered"] is True
    assert [recv(other) for _ in range(100)] == [news(channel, seq) for seq in range(6, 106)]
    assert fence(other) == []


def test_recovery_seam_while_broadcasting(ws_connect, small):
    """Recovering while broadcasts keep coming gives every ``seq`` once, in order: no gap, no duplicate."""
    channel = unique_channel()
    watcher = ws_connect(small)
    epoch = subscribe(watcher, channel)["data"]["epoch"]
    count = 2000
    with ThreadPoolExecutor(1) as pool:
        burst = pool.submit(
            requests.post, f"{small.url}/burst/{channel}/news",
            params={"count": count, "yield": 1}, timeout=30,
        )
        seen = 0
        while seen < 100:
            seen = recv(watcher)["seq"]
        ws = ws_connect(small)
        answer = subscribe(ws, channel, {"since": seen - 50, "epoch": epoch})
        assert answer["data"]["recovered"] is True
        seqs = []
        while not seqs or seqs[-1] < count:
            seqs.append(recv(ws)["seq"])
        assert burst.result().json()["seq"] == count
    assert seqs == list(range(seen - 49, count + 1))
    assert [recv(watcher)["seq"] for _ in range(count - seen)] == list(range(seen + 1, count + 1))
    assert fence(ws) == [] and fence(watcher) == []
