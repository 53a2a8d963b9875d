"""Background jobs the test app enqueues on RQ, and a real ``rq worker`` runs.

A job gets the handler's message as ``message.to_dict()`` and sends its
result to the message's channel. In the ``rq worker`` process it sends
through a ``Publisher``; run inside the app (no Redis configured) it is
given the extension instead, whose channels send the same way.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from flask_robe_sockets import Message, Publisher

#: The RQ queue the test app enqueues on.
QUEUE = "robe-tests"


@lru_cache(maxsize=None)
def publisher() -> Publisher:
    """One publisher per process, from the worker's environment."""
    return Publisher.from_url(os.environ["ROBE_SOCKETS_REDIS_URL"])


def shout(message: dict[str, Any], sender: Any = None) -> str:
    """Upper-case the text of a ``shout`` and broadcast it as ``shouted``."""
    msg = Message.from_dict(message)
    text = str(msg.data.get("text", "")).upper()
    (sender or publisher())[msg.channel].send(
        "shouted", {"text": text, "in_reply_to": msg.ref, "pid": os.getpid()}
    )
    return text
