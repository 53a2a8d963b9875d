"""The Redis backend: every worker, on every machine, shares the channels.

What is kept where:

- In Redis, per channel (keys expire ``history_ttl`` after the channel's
  last broadcast): ``robe:{<channel>}:meta``, a hash with the channel's
  ``epoch`` and last ``seq``; ``robe:{<channel>}:log``, a stream of its last
  ``history_size`` frames. Used ticket nonces: ``robe:nonce:<nonce>``.
- In each worker: which channels its own clients joined (``channels.Hub``),
  and one pub/sub connection subscribed to exactly those channels.
- The serving workers (``announce``): ``robe:{workers}``, a sorted set of
  worker ids scored with the time (Redis's clock, in ms) after which each is
  gone if it has not reported again, and ``robe:{workers}:<id>``, a hash
  with its last report that expires then. An id stays in the set a day
  after its worker stopped reporting, so that a sweep can find the workers
  that died (a score in the past) and let go of what they held.

What bounds Redis's memory (measured on Redis 7.0, 64-bit): a channel's two
keys take about 4.5 KiB once it had one broadcast, small or of 1 KiB alike
(the stream allocates its first 4 KiB node whole), and about 21 KiB with
100 kept broadcasts of 150 B. ``history_size`` bounds one channel, and
``history_ttl`` how long a channel nobody publishes to stays (both keys
expire that long after its last broadcast); nothing here bounds how many
channels there are: a client that makes the app publish to 1,000 new
channels a second holds some 1.3 GB for the default 300 s. The total is
bounded by Redis's own ``maxmemory``, with ``maxmemory-policy volatile-lru``
(``allkeys-lru`` on a Redis that holds nothing else): every key here has a
TTL, and a channel whose keys were evicted starts a new epoch (or shows a
gap), so its clients get ``recovered: false``, never a wrong replay. That
policy may also evict a used ticket's nonce, which could then be used once
more until the ticket expires (from the IP it was issued to): nonces are
never older than the ticket lifetime, younger than the idle channels LRU
takes first. ``volatile-ttl`` evicts the nonces first (theirs is the
shortest TTL): do not use it. ``noeviction`` keeps tickets single-use, but
once Redis is full every publish fails with ``BackendUnavailable`` and every
handshake gets 503.

A broadcast is one Lua script (``PUBLISH_SCRIPT``): the next ``seq``, the
history entry and the ``PUBLISH`` happen atomically, so ``seq`` order is
delivery order on every worker. The frame's JSON is encoded once, by the
publisher; Redis only appends ``"seq"``. Each worker wraps it in a WebSocket
frame once and hands the same bytes to all its members.

Why one ``SUBSCRIBE`` per channel rather than one shared channel or a
pattern: with a shared channel (or ``PSUBSCRIBE robe:*``), every worker
reads and parses every broadcast of the whole site, and a worker's read rate
caps the site's total throughput whatever the number of workers. With
per-channel subscriptions Redis sends a worker only the channels its clients
joined, so adding workers adds capacity; the price is one ``SUBSCRIBE``
round trip when a worker's first member of a channel joins. Measured on two
loopback cores, a worker whose clients joined 1 of 100 busy channels spent
0.15 us of CPU per site-wide broadcast this way, 4.4 us with ``PSUBSCRIBE``.

Joining is where pub/sub and history meet (``recover``): the history is
read once Redis confirmed the worker's SUBSCRIBE, and the answer waits for
the listener to pass a PING sent after it, so the replay and the live
broadcasts meet with no gap and no duplicate.
"""
from __future__ import annotations

import json
import logging
import random
import secrets
import socket
import time
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket
from gevent import monkey
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from .. import protocol
from ..frames import ws_frame
from ..errors import BackendUnavailable
from .base import Backend, Deliver, OnControl, Recovery

log = logging.getLogger("flask_robe_sockets")

#: KEYS: meta, log. ARGV: frame JSON without its closing brace, pub/sub
#: channel, an epoch to use if the channel has none, history size, TTL (ms).
#: The pub/sub message is ``<epoch> <seq> <frame JSON>``.
PUBLISH_SCRIPT = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3]) == 1 then
  redis.call('DEL', KEYS[2])  -- a new epoch starts with an empty history
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local frame = ARGV[1] .. ',"seq":' .. seq .. '}'
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if tonumber(ARGV[4]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 's', seq, 'f', frame)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[2], epoch .. ' ' .. seq .. ' ' .. frame)
return seq
"""

#: KEYS: meta, log. ARGV: an epoch to use if the channel has none, TTL (ms),
#: ``since`` (-1: none), the client's epoch ('' : none), history size.
#: Returns the epoch, the last seq and, when a replay can be complete, the
#: frames after ``since`` still younger than the TTL, newest first.
RECOVER_SCRIPT = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local seq = tonumber(meta[2]) or 0
local since = tonumber(ARGV[3])
local frames = {}
if since >= 0 and since < seq and seq - since <= tonumber(ARGV[5])
    and (ARGV[4] == '' or ARGV[4] == meta[1]) then
  local now = redis.call('TIME')
  local cutoff = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(ARGV[2])
  local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', seq - since)
  for _, entry in ipairs(entries) do
    if tonumber(string.match(entry[1], '^%d+')) < cutoff then break end
    table.insert(frames, entry[2][2])
    table.insert(frames, entry[2][4])
  end
end
return {meta[1], seq, frames}
"""

#: KEYS: the workers' set, the worker's hash. ARGV: id, TTL (ms), the report (JSON).
#: Scores and ``seen`` are Redis's own clock, so workers' clocks never disagree.
ANNOUNCE_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[2], 'info', ARGV[3], 'seen', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
return now
"""

#: KEYS: the workers' set, the worker's hash, its list of channels. ARGV:
#: id. A retiring worker leaves no trace: it takes its list of channels (as
#: a sweep's claim would) to let go of any member still recorded there.
RETIRE_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
local channels = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[3])
return channels
"""

#: Where the workers report: one Redis Cluster slot for all of them.
WORKERS_KEY = "robe:{workers}"

# Presence. Per channel: ``robe:{<channel>}:presence``, a hash of the
# members' wire forms by id; ``robe:{<channel>}:pver``, the presence version,
# bumped by every join and leave (never reset: a view may still hold an
# older number); ``robe:{<channel>}:presence:<worker id>``, the ids of the
# members each worker holds. Per worker: ``robe:{workers}:<id>:presence``,
# the channels it held members on, added before each join, so that a
# sweep finds every member of a worker that died. Each join and leave is one
# script that changes the members, bumps the version and PUBLISHes the event
# on the channel's pub/sub channel as ``@ <version> <frame JSON>`` (a
# broadcast starts with its epoch, which never starts with ``@``).

#: KEYS: members, version, the worker's ids. ARGV: id, member JSON, pub/sub
#: channel, channel name, "1" for a snapshot. Returns the version and, with
#: a snapshot, every member's JSON.
PRESENCE_JOIN_SCRIPT = """
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], '@ ' .. v .. ' {"channel":"' .. ARGV[4] .. '","event":"@join","data":' .. ARGV[2] .. '}')
if ARGV[5] == '1' then return {v, redis.call('HVALS', KEYS[1])} end
return {v}
"""

#: KEYS: members, version, then the ids of each worker whose members leave.
#: ARGV: pub/sub channel, channel name, then the ids leaving (none: every id
#: in those sets). Returns how many left.
PRESENCE_LEAVE_SCRIPT = """
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do table.insert(ids, ARGV[i]) end
  redis.call('SREM', KEYS[3], unpack(ids))
else
  for i = 3, #KEYS do
    for _, id in ipairs(redis.call('SMEMBERS', KEYS[i])) do table.insert(ids, id) end
    redis.call('DEL', KEYS[i])
  end
end
local n = 0
for _, id in ipairs(ids) do
  local m = redis.call('HGET', KEYS[1], id)
  if m then
    redis.call('HDEL', KEYS[1], id)
    local v = redis.call('INCR', KEYS[2])
    redis.call('PUBLISH', ARGV[1], '@ ' .. v .. ' {"channel":"' .. ARGV[2] .. '","event":"@leave","data":' .. m .. '}')
    n = n + 1
  end
end
return n
"""

#: KEYS: members, version. Returns the version and every member's JSON.
PRESENCE_SNAPSHOT_SCRIPT = """
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('HVALS', KEYS[1])}
"""

#: KEYS: the workers' set. ARGV: presence timeout, worker TTL (ms). Returns
#: the ids of the workers silent for the timeout, by Redis's own clock.
PRESENCE_SILENT_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]) + tonumber(ARGV[2]))
"""

#: KEYS: the lists of channels of silent workers (one Redis Cluster slot,
#: ``{workers}``). Each list that holds channels is taken (and deleted) by
#: exactly one caller. Returns ``index, {channels}`` pairs, index into KEYS.
PRESENCE_CLAIM_SCRIPT = """
local claimed = {}
for i, key in ipairs(KEYS) do
  local channels = redis.call('SMEMBERS', key)
  if #channels > 0 then
    redis.call('DEL', key)
    table.insert(claimed, i)
    table.insert(claimed, channels)
  end
end
return claimed
"""
#: The pub/sub channel of the application's commands to connections, after
#: the database's prefix: braces never occur in a channel name, so no
#: channel of the application can be it.
CONTROL_CHANNEL = "{control}"

#: Seconds of silence on the pub/sub connection before it is checked with a
#: PING; no answer within as long again counts as a lost connection.
KEEPALIVE = 15
#: Reconnection backoff of the listener: first delay and cap, in seconds.
BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
#: Channels per SUBSCRIBE command when re-subscribing after a reconnect.
SUBSCRIBE_BATCH = 1000


def _wait_readable(conn: Any, timeout: float) -> bool:
    """``conn.can_read(timeout)``, waiting in gevent's loop on a socket gevent
    did not patch.

    In a process that runs without gevent's patching (tests with the
    in-process test client), ``can_read`` would block the thread, and with
    it the greenlets that wait for this listener (a join's barrier) would
    never run: the listener waits for the socket through gevent's own poller
    instead, so it reads whenever they wait, and only then.
    """
    if conn.can_read(timeout=0):
        return True
    try:
        # redis-py's own socket: no public way to wait for it.
        gevent.socket.wait_read(conn._sock.fileno(), timeout)
    except socket.timeout:
        return False
    return conn.can_read(timeout=0)


class _Subscription:
    """This worker's pub/sub state for one channel."""

    __slots__ = ("ready", "epoch", "last")

    def __init__(self) -> None:
        #: Set once Redis confirmed the SUBSCRIBE: from then on no broadcast
        #: can be missed, so the history may be read.
        self.ready = gevent.event.Event()
        #: Epoch and seq of the last broadcast delivered, to drop the ones
        #: a reconnect's gap-filling already delivered.
        self.epoch: str | None = None
        self.last = 0


class RedisBackend(Backend):
    """Broadcasts through Redis pub/sub, history in Redis streams.

    :param url: ``redis://host:port/db`` (``rediss://`` and ``unix://`` too).
    :param history_size: broadcasts kept per channel for recovery (100).
    :param history_ttl: seconds a broadcast stays recoverable (300).
    :param max_connections: command connections per process (50); a send
        waits up to ``timeout`` seconds for a free one.
    :param timeout: seconds a Redis command may take before it fails (5).
    """

    shared = True

    def __init__(
        self,
        url: str,
        history_size: int = 100,
        history_ttl: float = 300,
        max_connections: int = 50,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.timeout = timeout
        self._ttl_ms = max(1, int(history_ttl * 1000))
        # redis-py retries a failed command 10 times with backoff by default,
        # which holds a send for seconds while Redis is down; one quick retry
        # covers a pooled connection Redis closed, then the caller hears of it.
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        )
        self.redis = redis.Redis(connection_pool=self._pool)
        # Only the settings of the listener's connections, made one at a time.
        # RESP2: redis-py 8 speaks RESP3 by default, where a pub/sub message
        # is a push that read_response() stringifies for a debug log and then
        # skips unless asked for with push_request.
        self._listen_pool = redis.ConnectionPool.from_url(
            url,
            protocol=2,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self._publish = self.redis.register_script(PUBLISH_SCRIPT)
        self._recover = self.redis.register_script(RECOVER_SCRIPT)
        self._announce = self.redis.register_script(ANNOUNCE_SCRIPT)
        self._retire = self.redis.register_script(RETIRE_SCRIPT)
        self._presence_join = self.redis.register_script(PRESENCE_JOIN_SCRIPT)
        self._presence_leave = self.redis.register_script(PRESENCE_LEAVE_SCRIPT)
        self._presence_snapshot = self.redis.register_script(PRESENCE_SNAPSHOT_SCRIPT)
        self._presence_silent = self.redis.register_script(PRESENCE_SILENT_SCRIPT)
        self._presence_claim = self.redis.register_script(PRESENCE_CLAIM_SCRIPT)
        # Pub/sub is not scoped to a database: name the database in the
        # channel so that apps on two databases of one Redis stay apart.
        db = self._pool.connection_kwargs.get("db", 0)
        self._prefix = f"robe:{db}:"
        self._control_channel = (self._prefix + CONTROL_CHANNEL).encode()
        self._on_control: OnControl | None = None
        self._deliver: Deliver | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        #: SUBSCRIBE commands sent per channel and not confirmed yet.
        self._pending: dict[str, int] = {}
        #: Joins waiting for the listener to reach a PING's answer.
        self._barriers: dict[bytes, gevent.event.AsyncResult] = {}
        self._conn: Any = None
        # Serialises writes to the pub/sub connection, which several
        # greenlets subscribe through while the listener reads it.
        self._write_lock = gevent.lock.RLock()
        self._listener: gevent.Greenlet | None = None
        #: Failed connection attempts in a row: non-zero while Redis is away.
        self._failures = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisBackend {self._where()}>"

    def _where(self) -> str:
        kwargs = self._pool.connection_kwargs
        if "path" in kwargs:
            return kwargs["path"]
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"

    def _keys(self, channel: str) -> list[str]:
        # The braces keep a channel's keys in one slot of a Redis Cluster.
        return [f"robe:{{{channel}}}:meta", f"robe:{{{channel}}}:log"]

    # -- publishing ------------------------------------------------------

    def publish(self, channel: str, event: str, data: Any) -> int:
        head = protocol.encode(event, data, channel)[:-1]  # Redis appends "seq"
        args = [head, self._prefix + channel, secrets.token_urlsafe(6), self.history_size, self._ttl_ms]
        try:
            return self._publish(keys=self._keys(channel), args=args)
        except redis.RedisError as exc:
            raise BackendUnavailable(
                f"could not send {event!r} to channel {channel!r}: Redis at {self._where()}"
                f" did not take it ({exc}). It was most likely not delivered: send it again once"
                " Redis is back."
            ) from exc

    def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        """Read the channel's position and history, for a client joining here.

        When this worker listens to ``channel``, the history is read only
        after Redis confirmed the SUBSCRIBE (else a broadcast published in
        between would be missed), and the answer is returned only once the
        listener has handed over every broadcast up to the position read
        (else one still on its way would reach the new member after the
        replay too). So a joiner's replay and its live broadcasts meet with
        no gap and no duplicate, as ``channels.Hub`` expects.
        """
        subscription = self._subscriptions.get(channel)
        if subscription is not None and not subscription.ready.is_set():
            if self._failures or not subscription.ready.wait(self.timeout):
                raise BackendUnavailable(f"Redis at {self._where()} is unreachable: cannot join {channel!r}")
        answer = self._read_history(channel, since, epoch)
        if subscription is not None:
            self._barrier(channel)
            if subscription.epoch is None:
                subscription.epoch = answer.epoch
            if subscription.epoch == answer.epoch:
                subscription.last = max(subscription.last, answer.seq)
        return answer

    def _read_history(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        args = [secrets.token_urlsafe(6), self._ttl_ms, -1 if since is None else since,
                epoch or "", self.history_size]
        try:
            current, seq, flat = self._recover(keys=self._keys(channel), args=args)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not read the history of {channel!r} from Redis: {exc}") from exc
        answer = Recovery(False, seq, current.decode())
        if since is None or since > seq or (epoch is not None and epoch != answer.epoch):
            return answer
        frames = [(int(flat[i]), ws_frame(flat[i + 1])) for i in range(len(flat) - 2, -1, -2)]
        if len(frames) == seq - since and (not frames or frames[0][0] == since + 1):
            answer.recovered = True
            answer.frames = frames
        return answer

    def _barrier(self, channel: str) -> None:
        """Wait until the listener has read all that Redis sent it so far.

        Redis answers a PING on the pub/sub connection after every message
        it queued there before, so its answer marks the point.
        """
        token = secrets.token_hex(6).encode()
        done = self._barriers[token] = gevent.event.AsyncResult()
        try:
            with self._write_lock:
                if self._conn is None:
                    raise BackendUnavailable(f"Redis at {self._where()} is unreachable: cannot join {channel!r}")
                self._conn.send_command("PING", token, check_health=False)
            done.get(timeout=self.timeout)
        except (redis.RedisError, gevent.Timeout) as exc:
            raise BackendUnavailable(
                f"Redis at {self._where()} did not answer in time: cannot join {channel!r}"
            ) from exc
        finally:
            self._barriers.pop(token, None)

    # -- presence (see PRESENCE_JOIN_SCRIPT) --------------------------------

    def _presence_keys(self, channel: str) -> list[str]:
        return [f"robe:{{{channel}}}:presence", f"robe:{{{channel}}}:pver"]

    @staticmethod
    def _worker_channels(worker_id: str) -> str:
        """The key of the channels ``worker_id`` held members on."""
        return f"{WORKERS_KEY}:{worker_id}:presence"

    def presence_join(
        self, channel: str, member: dict[str, Any], worker_id: str, snapshot: bool = True
    ) -> tuple[int, list[dict[str, Any]] | None]:
        """Record the join; when this worker listens to ``channel``, return
        only once its listener has handed over every event up to it, so that
        none at or below the joiner's version reaches it after its snapshot."""
        keys = self._presence_keys(channel)
        try:
            self.redis.sadd(self._worker_channels(worker_id), channel)
            version, *values = self._presence_join(
                keys=[*keys, f"{keys[0]}:{worker_id}"],
                args=[member["id"], protocol.dumps(member), self._prefix + channel, channel, int(snapshot)],
            )
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not record a member of {channel!r} in Redis: {exc}") from exc
        if channel in self._subscriptions:
            try:
                self._barrier(channel)
            except BackendUnavailable:
                self.presence_leave(channel, member["id"], worker_id)
                raise
        return int(version), [json.loads(value) for value in values[0]] if snapshot else None

    def presence_leave(self, channel: str, member_id: str, worker_id: str) -> None:
        keys = self._presence_keys(channel)
        try:
            self._presence_leave(
                keys=[*keys, f"{keys[0]}:{worker_id}"], args=[self._prefix + channel, channel, member_id]
            )
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not record that a member left {channel!r} in Redis: {exc}") from exc

    def presence_snapshot(self, channel: str) -> tuple[int, list[dict[str, Any]]]:
        try:
            version, values = self._presence_snapshot(keys=self._presence_keys(channel))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not read the members of {channel!r} from Redis: {exc}") from exc
        return int(version), [json.loads(value) for value in values]

    def presence_missing(self, channel: str, member_ids: list[str]) -> list[str]:
        if not member_ids:
            return []
        try:
            found = self.redis.hmget(self._presence_keys(channel)[0], member_ids)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not read the members of {channel!r} from Redis: {exc}") from exc
        return [member_id for member_id, value in zip(member_ids, found) if value is None]

    def _resync_presence(self) -> None:
        """After a reconnect: events published meanwhile never reached this
        worker, so each channel's view is brought up to Redis's members."""
        on_resync = getattr(self, "_on_presence_resync", None)
        if on_resync is None:
            return
        for channel in list(self._subscriptions):
            try:
                on_resync(channel)
            except Exception:
                log.exception("bringing the members of %r up to date failed", channel)

    def presence(self, channel: str) -> list[dict[str, Any]]:
        try:
            values = self.redis.hvals(self._presence_keys(channel)[0])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not read the members of {channel!r} from Redis: {exc}") from exc
        return [json.loads(value) for value in values]

    def sweep_presence(self, timeout: float, worker_ttl: float) -> int:
        try:
            silent = self._presence_silent(keys=[WORKERS_KEY], args=[int(timeout * 1000), int(worker_ttl * 1000)])
            if not silent:
                return 0
            claimed = self._presence_claim(keys=[self._worker_channels(w.decode()) for w in silent])
            removed = 0
            for i in range(0, len(claimed), 2):
                worker_id = silent[claimed[i] - 1].decode()
                left = self._let_go(worker_id, claimed[i + 1])
                if left:
                    log.info("worker %s stopped reporting: its %d members left", worker_id, left)
                removed += left
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not remove dead workers' members in Redis: {exc}") from exc
        return removed

    def _let_go(self, worker_id: str, channels: list[bytes]) -> int:
        """Remove the members ``worker_id`` still has on ``channels``, each
        announced with its ``@leave``; how many there were."""
        left = 0
        for name in channels:
            channel = name.decode()
            keys = self._presence_keys(channel)
            left += self._presence_leave(
                keys=[*keys, f"{keys[0]}:{worker_id}"], args=[self._prefix + channel, channel]
            )
        return left

    def _on_presence_message(self, channel: str, payload: bytes) -> None:
        on_event = getattr(self, "_on_presence", None)
        if on_event is None:
            return
        _, version, text = payload.split(b" ", 2)
        frame = json.loads(text)
        try:
            on_event(channel, int(version), frame["event"], frame["data"], ws_frame(text))
        except Exception:
            log.exception("delivering %s on %r failed", frame["event"], channel)

    # -- the workers sharing this Redis ------------------------------------

    def announce(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        args = [worker_id, max(1, int(ttl * 1000)), json.dumps(info)]
        try:
            self._announce(keys=[WORKERS_KEY, f"{WORKERS_KEY}:{worker_id}"], args=args)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not report this worker to Redis at {self._where()}: {exc}") from exc

    def retire(self, worker_id: str) -> None:
        keys = [WORKERS_KEY, f"{WORKERS_KEY}:{worker_id}", self._worker_channels(worker_id)]
        try:
            left = self._let_go(worker_id, self._retire(keys=keys, args=[worker_id]))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not retire this worker in Redis at {self._where()}: {exc}") from exc
        if left:
            log.warning("worker %s stopped with %d members still recorded: they left now", worker_id, left)

    def workers(self) -> list[dict[str, Any]]:
        try:
            seconds, micros = self.redis.time()
            now = seconds * 1000 + micros // 1000
            ids = self.redis.zrangebyscore(WORKERS_KEY, now, "+inf")
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hmget(f"{WORKERS_KEY}:{worker_id.decode()}", "info", "seen")
            reports = pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not list the workers from Redis at {self._where()}: {exc}") from exc
        found = []
        for worker_id, (info, seen) in zip(ids, reports):
            if info is None:  # expired between the two reads
                continue
            found.append({**json.loads(info), "id": worker_id.decode(), "age": max(0, now - int(seen)) / 1000})
        return sorted(found, key=lambda worker: (worker.get("started", 0), worker["id"]))

    def claim_nonce(self, nonce: str, ttl: float) -> bool:
        try:
            return bool(self.redis.set(f"robe:nonce:{nonce}", 1, nx=True, px=max(1, int(ttl * 1000))))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"could not check the ticket with Redis at {self._where()}: {exc}") from exc

    # -- the application's commands --------------------------------------

    def control(self, command: dict[str, Any]) -> None:
        # Every listening worker gets it, this one too, through its listener.
        try:
            self.redis.publish(self._control_channel, json.dumps(command, allow_nan=False))
        except redis.RedisError as exc:
            raise BackendUnavailable(
                f"could not send the {command.get('action')} command: Redis at {self._where()}"
                f" did not take it ({exc}). No worker got it: send it again once Redis is back."
            ) from exc

    def listen_control(self, on_control: OnControl) -> None:
        first = self._on_control is None
        self._on_control = on_control
        if self._listener is None and not self._closed:
            self._listener = gevent.spawn(self._listen)  # subscribes to it once connected
        elif first:
            self._subscribe_control()

    def _subscribe_control(self) -> None:
        """Listen to the commands; the listener calls it on every (re)connect."""
        with self._write_lock:
            if self._conn is None or self._on_control is None:
                return
            try:
                self._conn.send_command("SUBSCRIBE", self._control_channel, check_health=False)
            except redis.RedisError as exc:
                log.info("SUBSCRIBE to the commands failed (%s): the listener reconnects", exc)

    def _on_command(self, payload: bytes) -> None:
        if self._on_control is None:
            return
        try:
            command = json.loads(payload)
        except ValueError:
            log.error("dropped a command that is not JSON from Redis at %s: %.200r", self._where(), payload)
            return
        try:
            self._on_control(command)
        except Exception:
            log.exception("applying a command from Redis failed: %.200r", payload)

    # -- this worker's subscriptions ------------------------------------

    def start(self, deliver: Deliver) -> None:
        # The listener starts with the first subscription, so that an app
        # imported before gunicorn forks (--preload) starts it in the worker.
        self._deliver = deliver

    def subscribe(self, channel: str) -> None:
        if channel not in self._subscriptions:
            self._subscriptions[channel] = _Subscription()
        if self._listener is None and not self._closed:
            self._listener = gevent.spawn(self._listen)
        self._send_subscribe([channel])

    def unsubscribe(self, channel: str) -> None:
        if self._subscriptions.pop(channel, None) is None:
            return
        with self._write_lock:
            if self._conn is not None:
                try:
                    self._conn.send_command("UNSUBSCRIBE", self._prefix + channel, check_health=False)
                except redis.RedisError as exc:
                    log.info("UNSUBSCRIBE %r failed (%s): the listener reconnects", channel, exc)

    def _send_subscribe(self, channels: list[str]) -> None:
        """Ask Redis for ``channels``; without a connection the listener will."""
        with self._write_lock:
            if self._conn is None:
                return
            names = []
            for channel in channels:
                if channel in self._subscriptions:
                    self._pending[channel] = self._pending.get(channel, 0) + 1
                    names.append(self._prefix + channel)
            try:
                for start in range(0, len(names), SUBSCRIBE_BATCH):
                    batch = names[start:start + SUBSCRIBE_BATCH]
                    self._conn.send_command("SUBSCRIBE", *batch, check_health=False)
            except redis.RedisError as exc:
                log.info("SUBSCRIBE failed (%s): the listener reconnects", exc)

    def _listen(self) -> None:
        """The listener greenlet: read pub/sub for ever, reconnecting as needed."""
        lost_at = 0.0
        while not self._closed:
            conn = None
            try:
                conn = self._listen_pool.connection_class(**self._listen_pool.connection_kwargs)
                conn.connect()
                with self._write_lock:
                    self._conn = conn
                    self._send_subscribe(list(self._subscriptions))
                    self._subscribe_control()
                if self._failures:
                    log.warning(
                        "reconnected to Redis at %s after %d attempts (%.1fs): resubscribed to %d channels",
                        self._where(), self._failures, time.monotonic() - lost_at, len(self._subscriptions),
                    )
                    self._failures = 0
                self._read(conn, resync=lost_at > 0)
            except Exception as exc:  # whatever broke, the way back is the same
                if self._closed:
                    break
                self._failures += 1
                failures = self._failures
                delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** min(failures - 1, 16)) * random.uniform(0.5, 1)
                if failures == 1:
                    lost_at = time.monotonic()
                    log.warning(
                        "lost the Redis pub/sub connection to %s (%s): reconnecting in %.1fs",
                        self._where(), exc, delay,
                    )
                elif failures & (failures - 1) == 0:  # 2, 4, 8...: the log stays short
                    log.warning(
                        "Redis at %s still unreachable after %d attempts (%s): retrying in %.1fs",
                        self._where(), failures - 1, exc, delay,
                    )
            finally:
                with self._write_lock:
                    self._conn = None
                    self._pending.clear()
                    for subscription in self._subscriptions.values():
                        subscription.ready.clear()
                    for done in self._barriers.values():
                        done.set_exception(redis.ConnectionError("the pub/sub connection was lost"))
                if conn is not None:
                    conn.disconnect()
            if not self._closed:
                gevent.sleep(delay if self._failures else 0)

    def _read(self, conn: Any, resync: bool) -> None:
        """Deliver what the pub/sub connection brings until it fails.

        After a reconnect (``resync``), broadcasts sent while this worker
        was not listening are read from the history first, and the live ones
        that arrived meanwhile are delivered after them, each once.
        """
        held: list[tuple[bytes, bytes]] | None = [] if resync else None
        # Barriers reached while messages are held count once those are out.
        passed: list[bytes] = []
        waiting = {self._prefix.encode() + c.encode() for c in self._subscriptions}
        pinged = False
        readable = conn.can_read if monkey.is_module_patched("socket") else partial(_wait_readable, conn)
        while True:
            if not readable(timeout=KEEPALIVE):
                if pinged:
                    raise redis.ConnectionError(f"no answer to PING within {KEEPALIVE}s")
                with self._write_lock:
                    conn.send_command("PING", check_health=False)
                pinged = True
                continue
            reply = conn.read_response(disconnect_on_error=False)
            pinged = False
            if isinstance(reply, bytes):  # a PING's answer when subscribed to nothing
                reply = [b"pong", reply]
            kind = reply[0]
            if kind == b"message" and reply[1] == self._control_channel:
                # Commands are no broadcasts: nothing to hold back while resyncing.
                self._on_command(reply[2])
            elif kind == b"message":
                if held is None:
                    self._on_message(reply[1], reply[2])
                else:
                    held.append((reply[1], reply[2]))
            elif kind == b"pong":
                if held is None:
                    self._pass_barrier(reply[1])
                else:
                    passed.append(reply[1])
            elif kind == b"subscribe":
                waiting.discard(reply[1])
                channel = reply[1].decode()[len(self._prefix):]
                # Ready only when every SUBSCRIBE sent is confirmed: after a
                # quick leave and join, the first one may be followed by an
                # UNSUBSCRIBE.
                pending = self._pending.get(channel, 1) - 1
                if pending > 0:
                    self._pending[channel] = pending
                else:
                    self._pending.pop(channel, None)
                    subscription = self._subscriptions.get(channel)
                    if subscription is not None:
                        subscription.ready.set()
            if held is not None and not waiting:
                self._fill_gaps()
                self._resync_presence()
                for name, payload in held:
                    self._on_message(name, payload)
                for token in passed:
                    self._pass_barrier(token)
                held = None

    def _pass_barrier(self, token: bytes) -> None:
        done = self._barriers.get(token)
        if done is not None and not done.ready():
            done.set(None)

    def _fill_gaps(self) -> None:
        for channel, subscription in list(self._subscriptions.items()):
            if subscription.epoch is None:
                continue
            try:
                recovery = self._read_history(channel, subscription.last, subscription.epoch)
                if recovery.epoch != subscription.epoch:  # Redis lost the channel meanwhile
                    subscription.epoch, subscription.last = recovery.epoch, 0
                    recovery = self._read_history(channel, 0, recovery.epoch)
                elif recovery.seq < subscription.last:
                    # Redis came back from an older snapshot: without this,
                    # broadcasts up to the old seq would be taken for repeats.
                    log.warning("seq of %r went back from %d to %d", channel, subscription.last, recovery.seq)
                    subscription.last = recovery.seq
            except BackendUnavailable as exc:
                log.warning("cannot read what %r missed while Redis was unreachable: %s", channel, exc)
                continue
            if not recovery.recovered:
                log.warning("broadcasts on %r were lost while Redis was unreachable", channel)
            for seq, frame in recovery.frames:
                subscription.last = seq
                self._hand_over(channel, seq, frame)

    def _on_message(self, name: bytes, payload: bytes) -> None:
        channel = name[len(self._prefix):].decode()
        subscription = self._subscriptions.get(channel)
        if subscription is None:  # left while the message was under way
            return
        if payload.startswith(b"@ "):
            self._on_presence_message(channel, payload)
            return
        epoch, seq, text = payload.split(b" ", 2)
        seq = int(seq)
        epoch = epoch.decode()
        if epoch == subscription.epoch:
            if seq <= subscription.last:
                return
        else:
            subscription.epoch = epoch
        subscription.last = seq
        self._hand_over(channel, seq, ws_frame(text))

    def _hand_over(self, channel: str, seq: int, frame: bytes) -> None:
        if self._deliver is None:
            return
        try:
            self._deliver(channel, seq, frame)
        except Exception:
            log.exception("delivering seq %d of %r failed", seq, channel)

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.kill(block=False)
            self._listener = None
        self._pool.disconnect()
