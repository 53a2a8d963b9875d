"""The in-memory backend: one process, nothing else to run."""
from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any

from .. import protocol
from .base import Backend, Deliver, Recovery


class _History:
    """A channel's ``seq`` counter and its last broadcasts."""

    __slots__ = ("epoch", "seq", "frames", "touched")

    def __init__(self, size: int, epoch: str) -> None:
        self.epoch = epoch
        self.seq = 0
        #: ``(seq, time, frame)`` triples, oldest first.
        self.frames: deque[tuple[int, float, bytes]] = deque(maxlen=size)
        self.touched = time.monotonic()


class MemoryBackend(Backend):
    """Everything in this process: the embedded default, one worker only.

    Broadcasts go straight to the local hub; nothing reaches other
    processes, so run a single worker (or use Redis).
    """

    def __init__(self, history_size: int = 100, history_ttl: float = 300) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self._histories: dict[str, _History] = {}
        self._nonces: dict[str, float] = {}
        self._members: set[str] = set()
        self._deliver: Deliver | None = None
        self._swept = time.monotonic()
        # Epochs are "<process token>.<generation>". The generation moves on
        # whenever a history that had broadcasts is dropped, so a channel
        # whose seq starts again from 1 comes back under a new epoch. An
        # empty channel dropped and recreated usually keeps the epoch its
        # clients saw (they missed nothing): unless, the generation being
        # process-wide, some other history was dropped in between.
        self._token = secrets.token_urlsafe(6)
        self._generation = 0

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def _history(self, channel: str) -> _History:
        history = self._histories.get(channel)
        if history is None:
            epoch = f"{self._token}.{self._generation}"
            history = self._histories[channel] = _History(self.history_size, epoch)
        return history

    def publish(self, channel: str, event: str, data: Any) -> int:
        history = self._history(channel)
        seq = history.seq + 1
        frame = protocol.ws_frame(protocol.encode(event, data, channel, seq=seq))
        history.seq = seq
        now = time.monotonic()
        history.touched = now
        history.frames.append((seq, now, frame))
        if now - self._swept > self.history_ttl:
            self._sweep(now)
        if self._deliver is not None:
            self._deliver(channel, seq, frame)
        return seq

    def subscribe(self, channel: str) -> None:
        self._members.add(channel)
        self._history(channel).touched = time.monotonic()

    def unsubscribe(self, channel: str) -> None:
        self._members.discard(channel)
        history = self._histories.get(channel)
        if history is not None and history.seq == 0:
            del self._histories[channel]

    def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        history = self._history(channel)
        answer = Recovery(False, history.seq, history.epoch)
        if since is None or (epoch is not None and epoch != history.epoch):
            return answer
        if since > history.seq:
            return answer
        cutoff = time.monotonic() - self.history_ttl
        missed = [(seq, frame) for seq, stamp, frame in history.frames if seq > since and stamp >= cutoff]
        if len(missed) == history.seq - since:
            answer.recovered = True
            answer.frames = missed
        return answer

    def claim_nonce(self, nonce: str, ttl: float) -> bool:
        now = time.monotonic()
        if len(self._nonces) > 1000 and now - self._swept > 1:
            self._sweep(now)
        expires = self._nonces.get(nonce)
        if expires is not None and expires > now:
            return False
        self._nonces[nonce] = now + ttl
        return True

    def _sweep(self, now: float) -> None:
        """Drop expired nonces, and histories nobody can recover from any more."""
        self._swept = now
        self._nonces = {n: exp for n, exp in self._nonces.items() if exp > now}
        idle = [
            name
            for name, history in self._histories.items()
            if name not in self._members and now - history.touched > self.history_ttl
        ]
        for name in idle:
            if self._histories.pop(name).seq:
                self._generation += 1
