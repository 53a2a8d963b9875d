/**
 * Browser client for flask-robe-sockets (wire protocol 1).
 *
 *     import { Client } from "/ops/client.js";
 *
 *     const client = new Client();
 *     client.on("connect", () => console.log("online"));
 *     const chat = client.subscribe("chat");
 *     chat.on("message", (message) => console.log(message.event, message.data));
 *     const reply = await chat.send("message", { text: "hi" });
 *
 * One dependency-free ES module, served by the extension at
 * `{path}/client.js`: no build step. What arrives is data, not markup:
 * put it on the page with `textContent`, never `innerHTML`.
 *
 * Every decision (refs, the queue, what to resubscribe from, the backoff,
 * which refusals are retried, when to ping) is made by `ClientState`, which
 * has no sockets or timers; `Client` only moves frames and sets timers
 * around it. The Python client's `clientstate.ClientState` makes the same
 * decisions, and tests/client_cases.json holds the cases both must pass.
 */

/** The wire protocol this client speaks. */
export const PROTOCOL_VERSION = 1;

const CHANNEL_NAME = /^[A-Za-z0-9_\-.:/]{1,128}$/;

const DEFAULTS = {
  reconnectDelay: 500,
  maxReconnectDelay: 30000,
  pingInterval: 25000,
  pongTimeout: 10000,
  connectTimeout: 10000,
  sendTimeout: 10000,
  maxQueue: 100,
};

/** An error answered by the server (`@error`) or raised by the client. */
export class RobeSocketsError extends Error {
  constructor(code, message, channel = null) {
    super(message);
    this.name = "RobeSocketsError";
    /** The protocol's error code (`forbidden`, `rate_limited`...) or the
     * client's own (`timeout`, `queue_full`, `disconnected`, `closed`,
     * `ticket_failed`, `connect_failed`). */
    this.code = code;
    this.channel = channel;
  }
}

/**
 * Delay before reconnect attempt number `attempt` (0 for the first), in ms:
 * exponential backoff with full jitter, so that clients dropped together by
 * a restarting server do not all come back in the same instant.
 */
export function backoffDelay(attempt, initial = DEFAULTS.reconnectDelay,
  max = DEFAULTS.maxReconnectDelay, random = Math.random) {
  return random() * Math.min(max, initial * 2 ** attempt);
}

/** A connection that lasted this long (ms) from `@connected` was a good one:
 * the backoff starts over. One dropped sooner keeps growing it, so a server
 * that closes every connection right after `@connected` is not hammered. */
const STABLE_AFTER = 10000;

/** The channel events that are the client's own, named as the protocol
 * names them: application event names cannot start with `@`, so an app
 * that broadcasts an event called `error` never reaches these handlers. */
export const CHANNEL_EVENTS = Object.freeze(["@subscribed", "@unsubscribed", "@error"]);

/** The channel handler name that gets every application event of the
 * channel, whatever its name, as in Robe (never the client's own events). */
const EVERY_EVENT = "message";

/** What `channel.presence.on()` takes. Their emits are named with `@` in
 * front, so that no channel handler ever gets them. */
export const PRESENCE_EVENTS = Object.freeze(["join", "leave", "sync"]);
const PRESENCE_EMITS = new Set(PRESENCE_EVENTS.map((name) => `@${name}`));

/** The close code by which the server asks for a reconnect now
 * (PROTOCOL.md section 8): the first attempt waits no backoff. */
const CLOSE_RECONNECT_NOW = 4001;

/** Whether a close code ends the client, as `close()` would: the
 * application disconnected it (signed out, banned). */
const isTerminal = (code) => code >= 4500 && code <= 4999;

const isEventName = (name) => typeof name === "string" && name.length > 0 && name.length <= 64 && !name.startsWith("@");

/** Whether a channel handler may be registered for `name`: an application
 * event name (`"message"` for all of them) or one of `CHANNEL_EVENTS`. */
export function isChannelEvent(name) {
  return CHANNEL_EVENTS.includes(name) || isEventName(name);
}

/** A saved position `{since, epoch}`, checked: null when neither is given.
 * Both or neither: a seq means nothing without its epoch (the same seq in
 * two epochs is two different messages). */
function position(since, epoch) {
  if (since == null && epoch == null) return null;
  if (since == null || epoch == null) {
    throw new RobeSocketsError("bad_position",
      "since and epoch go together: pass both (a channel's seq and epoch) or neither");
  }
  if (!Number.isSafeInteger(since) || since < 0) {
    throw new RobeSocketsError("bad_position", `since must be a seq, an integer from 0, got ${JSON.stringify(since)}`);
  }
  if (typeof epoch !== "string" || !epoch) {
    throw new RobeSocketsError("bad_position",
      `epoch must be the epoch a @subscribed named, a string, got ${JSON.stringify(epoch)}`);
  }
  return { since, epoch };
}

/** Whether the channel's `@subscribe` went out on this connection. */
const started = (channel) => channel.subscribed || channel.subscribeRef !== null;

// Subscribe refusals that may pass on the next connect; any other refusal
// holds until the application subscribes again.
const RETRIED_REFUSALS = new Set(["rate_limited"]);

// A number of seconds, as Retry-After gives it (RFC 9110 allows digits
// only; a fraction is taken too). Anything else, an HTTP-date included,
// sets no floor.
const SECONDS = /^\s*(\d+(\.\d*)?|\.\d+)\s*$/;

/** The ms of a `Retry-After` header; 0 when absent or not a number of seconds. */
export function retryAfterMs(value) {
  const seconds = value != null && SECONDS.test(value) ? Number(value) : NaN;
  return Number.isFinite(seconds) ? seconds * 1000 : 0;
}

/** Who is on a channel, as the state sees it. Only `ClientState` changes it. */
export class PresenceState {
  constructor() {
    /** The channel's members by connection id (`{id, identity, info}`), kept
     * from the snapshot of its last `@subscribed` and every `@join` and
     * `@leave` since; empty while not subscribed and on a channel without
     * presence. */
    this.members = new Map();
  }
}

/** A member as the wire gives it. */
const member = (data) => ({ id: data.id, identity: data.identity ?? null, info: data.info ?? null });

/** One channel as the state sees it. Only `ClientState` changes it.
 * `presence` holds its members (by default a `PresenceState`). */
export class ChannelState {
  constructor(name, presence = new PresenceState()) {
    this.name = name;
    this.presence = presence;
    /** Whether the application left it: its handlers hear nothing more. */
    this.left = false;
    /** Whether its last `@subscribed` had presence: only then do `@join`
     * and `@leave` count. */
    this.hasPresence = false;
    /** The `seq` of the last broadcast seen, sent as `since` on resubscribe;
     * `null` before the first `@subscribed`. */
    this.seq = null;
    /** The history `@subscribed` named; `null` before the first one. */
    this.epoch = null;
    /** Whether the server confirmed the subscription on this connection. */
    this.subscribed = false;
    /** Whether it is subscribed on every connect: not after a refusal,
     * until the application subscribes again. */
    this.wanted = true;
    /** The ref of the `@subscribe` in flight, if one is. */
    this.subscribeRef = null;
  }
}

const emit = (channel, names, value) => ({ type: "emit", channel, names, value });
/** The `sync` of a channel's presence, with its whole member list. */
const sync = (channel) => emit(channel, ["@sync"], [...channel.presence.members.values()]);
const settle = (request, result, error = null) => ({ type: "settle", request, result, error });

/**
 * The client's decisions, without I/O: told what happened, it answers with
 * the actions to carry out, in order: `{type: "send", text}`, `{type:
 * "emit", channel, names, value}` (call the handlers of each of `names`, the
 * client's own when `channel` is null), `{type: "settle", request, result,
 * error}`, `{type: "retry", delay}` (connect again in `delay` ms) and
 * `{type: "drop", reason}` (give a silent connection up).
 *
 * It reads the time only from `clock` and draws jitter only from `random`.
 */
export class ClientState {
  #options;
  #newChannel;
  #clock;
  #random;
  #queue = [];
  #pending = new Map();
  #lastRef = 0;
  #attempt = 0;
  #connectingSince = null;
  #connectedAt = 0;
  #lastHeard = 0;
  #pingSentAt = null;
  // Whether a 4001 was answered with an immediate reconnect since the last
  // connection that lasted STABLE_AFTER.
  #rushed = false;

  /**
   * @param {object} [options] the `Client`'s options (delays in ms), and
   *   `url` to name in errors.
   * @param {object} [io] `newChannel(name)` makes the object for a newly
   *   subscribed channel; `clock()` gives ms; `random()` a number in [0, 1).
   */
  constructor(options = {}, { newChannel = (name) => new ChannelState(name), clock = Date.now,
    random = Math.random } = {}) {
    this.#options = { ...DEFAULTS, ...options };
    this.#newChannel = newChannel;
    this.#clock = clock;
    this.#random = random;
    /** Whether `@connected` came on the current connection. */
    this.connected = false;
    this.closed = false;
    /** The id the server gave this connection; `null` while disconnected. */
    this.id = null;
    this.channels = new Map();
  }

  /** How many sends wait for a connection. */
  get queued() {
    return this.#queue.length;
  }

  /** Whether `channel`'s handlers still hear its events: until the
   * application unsubscribes it. One the server unsubscribed still hears
   * what came before, and the `@unsubscribed` that ended it. */
  holds(channel) {
    return !channel.left;
  }

  // -- what the application does -----------------------------------------

  /** `[channel, actions]`: the channel `name`, wanted from now on, and its
   * `@subscribe` if connected.
   *
   * `since` and `epoch` (both or neither) are a position the application
   * saved, a channel's `seq` and `epoch`: the `@subscribe` starts from it,
   * so the server replays what came after, as on a reconnect. A channel
   * whose `@subscribe` has gone out already keeps its own position. Throws
   * `bad_channel`, `bad_position`, or `already_subscribed` for a position
   * other than its own on a channel subscribed or on its way. */
  subscribe(name, { since = null, epoch = null } = {}) {
    if (typeof name !== "string" || !CHANNEL_NAME.test(name)) {
      throw new RobeSocketsError("bad_channel",
        `invalid channel name ${JSON.stringify(name)}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /`);
    }
    let from = position(since, epoch);
    if (this.closed) throw new RobeSocketsError("closed", "the client is closed", name);
    let channel = this.channels.get(name);
    if (from && channel && started(channel)) {
      if (channel.seq !== from.since || channel.epoch !== from.epoch) {
        throw new RobeSocketsError("already_subscribed",
          `already subscribed to ${JSON.stringify(name)} (at seq ${channel.seq} of epoch ${JSON.stringify(channel.epoch)}): `
          + "a saved position only starts a subscription; pass it to the first subscribe()", name);
      }
      from = null;  // where the channel is already
    }
    if (!channel) {
      channel = this.#newChannel(name);
      this.channels.set(name, channel);
    }
    if (from) {
      channel.seq = from.since;
      channel.epoch = from.epoch;
    }
    channel.wanted = true;
    return [channel, this.connected && !channel.subscribed ? this.#subscribe(channel) : []];
  }

  unsubscribe(name) {
    const channel = this.channels.get(name);
    if (!channel) return [];
    this.channels.delete(name);
    channel.left = true;
    this.#end(channel);
    return this.connected ? [{ type: "send", text: JSON.stringify({ channel: name, event: "@unsubscribe" }) }] : [];
  }

  /** Send now if connected, else queue; `request` is what a settle hands back.
   * Throws a `RobeSocketsError` (`closed`, `bad_event`, `queue_full`). */
  send(channel, event, data, request) {
    if (this.closed) throw new RobeSocketsError("closed", "the client was closed", channel);
    if (!isEventName(event)) {
      throw new RobeSocketsError("bad_event",
        `invalid event name ${JSON.stringify(event)}: 1 to 64 characters, not starting with '@'`, channel);
    }
    const ref = ++this.#lastRef;
    // Serialised now, so data that is not JSON fails here, for this caller.
    return this.#sendOrQueue({ ref, text: JSON.stringify({ channel, event, data, ref }), request }, channel);
  }

  /** Ask for `channel`'s members (`@presence`), now if connected, else
   * queued like a send; its settle has `{members, clients, users}`, or the
   * server's refusal (`not_subscribed`, `presence_disabled`). Throws
   * `closed` or `queue_full`. */
  fetchPresence(channel, request) {
    if (this.closed) throw new RobeSocketsError("closed", "the client was closed", channel);
    const ref = ++this.#lastRef;
    return this.#sendOrQueue({ ref, text: JSON.stringify({ channel, event: "@presence", ref }), request }, channel);
  }

  #sendOrQueue(outgoing, channel) {
    if (this.connected) return [this.#transmit(outgoing)];
    const { maxQueue } = this.#options;
    if (this.#queue.length >= maxQueue) {
      throw new RobeSocketsError("queue_full", `not connected, and ${maxQueue} sends are already waiting`, channel);
    }
    this.#queue.push(outgoing);
    return [];
  }

  /** Forget a send that timed out; `false` if it was settled meanwhile. */
  withdraw(request) {
    for (const [ref, outgoing] of this.#pending) {
      if (outgoing.request === request) return this.#pending.delete(ref);
    }
    const queued = this.#queue.findIndex((outgoing) => outgoing.request === request);
    if (queued === -1) return false;
    this.#queue.splice(queued, 1);
    return true;
  }

  /** Close for good: queued sends fail; `lost()` follows, and no retry comes again. */
  close() {
    if (this.closed) return [];
    this.closed = true;
    return this.#queue.splice(0).map((outgoing) =>
      settle(outgoing.request, null, new RobeSocketsError("closed", "the client was closed")));
  }

  // -- what the connection does ------------------------------------------

  /** A connect is under way: `@connected` must come within `connectTimeout`. */
  connecting() {
    this.#connectingSince = this.#clock();
  }

  /** A connect failed before the socket was open: report it, retry after the
   * backoff, no sooner than its `retryAfter` (ms). */
  connectFailed(error) {
    this.#connectingSince = null;
    if (this.closed) return [];
    return [emit(null, ["error"], error), this.#retry(error?.retryAfter ?? 0)];
  }

  /** The network is back: the next attempt waits no backoff. */
  resetBackoff() {
    this.#attempt = 0;
  }

  /** Anything from the server: it is alive. */
  heard() {
    this.#lastHeard = this.#clock();
    this.#pingSentAt = null;
  }

  /** A text frame from the server. */
  receive(text) {
    this.heard();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      frame = null;
    }
    if (frame === null || typeof frame !== "object" || typeof frame.event !== "string") {
      return [emit(null, ["error"], new RobeSocketsError("bad_frame", "the server sent a frame that is not a protocol object"))];
    }
    const { event, channel = null, data = null, ref = null, seq = null } = frame;
    switch (event) {
      case "@connected":
        return this.#onConnected(data);
      case "@reply": {
        const request = this.#answeredSend(ref);
        return request === undefined ? [] : [settle(request, data)];
      }
      case "@error":
        return this.#onError(new RobeSocketsError(data?.code ?? "error", data?.message ?? "", channel), ref);
      case "@subscribed": {
        if (ref === null) return this.#onHistoryLost(channel, data);
        const target = this.#answeredSubscribe(channel, ref);
        return target ? this.#onSubscribed(target, data) : [];
      }
      case "@presence": {
        const request = this.#answeredSend(ref);
        if (request === undefined) return [];
        return [settle(request, { members: data.members.map(member), clients: data.clients, users: data.users })];
      }
      case "@join":
      case "@leave":
        return this.#onPresenceChange(channel, event, member(data));
      case "@unsubscribed":
        // The server's own (PROTOCOL.md section 8); the answer to ours has
        // no reason (data null), and its channel is gone already.
        if (ref === null && data !== null && typeof data === "object") {
          return this.#onUnsubscribedByServer(channel, { reason: data.reason ?? null });
        }
        return [];
      default:
        // @pong (reading it was the point), the answer to our own
        // @unsubscribe, or a protocol event this client does not know (e.g.
        // a newer server's): never an application event.
        return isEventName(event) ? this.#onMessage({ channel, event, data, seq }) : [];
    }
  }

  /** Time passed: `@ping` a silent connection, drop one that stayed silent
   * after it or never sent `@connected`. */
  tick() {
    const now = this.#clock();
    const { connectTimeout, pingInterval, pongTimeout } = this.#options;
    if (!this.connected) {
      if (this.#connectingSince === null || now - this.#connectingSince < connectTimeout) return [];
      this.#connectingSince = null;  // this attempt is over
      return [{ type: "drop", reason: `no @connected within ${connectTimeout} ms` }];
    }
    if (this.#pingSentAt !== null) {
      return now - this.#pingSentAt >= pongTimeout ? [{ type: "drop", reason: "no answer to @ping" }] : [];
    }
    return pingInterval && now - this.#lastHeard >= pingInterval ? this.pingNow() : [];
  }

  /** `@ping` now, unless disconnected or one is out already. */
  pingNow() {
    if (!this.connected || this.#pingSentAt !== null) return [];
    this.#pingSentAt = this.#clock();
    return [{ type: "send", text: JSON.stringify({ event: "@ping" }) }];
  }

  /** ms until `tick()` has something to do; `null` for never. */
  waitTime() {
    const { connectTimeout, pingInterval, pongTimeout } = this.#options;
    let deadline;
    if (!this.connected) {
      if (this.#connectingSince === null) return null;
      deadline = this.#connectingSince + connectTimeout;
    } else if (this.#pingSentAt !== null) {
      deadline = this.#pingSentAt + pongTimeout;
    } else if (pingInterval) {
      deadline = this.#lastHeard + pingInterval;
    } else {
      return null;
    }
    return Math.max(deadline - this.#clock(), 0);
  }

  /** The connection ended (or the client closed): sends on the wire fail (the
   * server may or may not have run them, so they are not sent again);
   * queued ones wait for the next connection. */
  lost(code, reason = "") {
    const wasConnected = this.connected;
    this.connected = false;
    this.id = null;
    this.#connectingSince = this.#pingSentAt = null;
    const emptied = [];
    for (const channel of this.channels.values()) {
      channel.subscribed = false;
      channel.subscribeRef = null;
      if (channel.presence.members.size) {
        channel.presence.members.clear();
        emptied.push(channel);
      }
    }
    if (this.closed) code = 1000;
    code ??= 1006;
    // The application ended this client (PROTOCOL.md section 8): as close()
    // would, but reporting the server's code.
    const terminal = !this.closed && isTerminal(code);
    const actions = terminal ? this.close() : [];
    const failure = this.closed
      ? () => new RobeSocketsError("closed", "the client was closed")
      : () => new RobeSocketsError("disconnected", "the connection was lost before the answer");
    for (const outgoing of this.#pending.values()) actions.push(settle(outgoing.request, null, failure()));
    this.#pending.clear();
    if (wasConnected) {
      if (this.#clock() - this.#connectedAt >= STABLE_AFTER) {
        this.#attempt = 0;
        this.#rushed = false;
      }
      actions.push(emit(null, ["disconnect"], { code, reason }));
    } else if (!this.closed || terminal) {
      actions.push(emit(null, ["error"], new RobeSocketsError("connect_failed",
        `cannot open ${this.#options.url} (close code ${code}${reason ? `: ${reason}` : ""})`)));
    }
    for (const channel of emptied) actions.push(sync(channel));
    if (this.closed) return actions;
    if (code === CLOSE_RECONNECT_NOW && wasConnected && !this.#rushed) {
      // The server asks for a reconnect now (e.g. permissions changed): at
      // once, once; should that fail, or the server ask again before a
      // connection lasted STABLE_AFTER, the backoff goes on as usual.
      this.#rushed = true;
      actions.push({ type: "retry", delay: 0 });
    } else {
      actions.push(this.#retry());
    }
    return actions;
  }

  // -- helpers -----------------------------------------------------------

  /** The next attempt: the backoff, but no sooner than `atLeast` ms (a
   * refusal's Retry-After), itself at most `maxReconnectDelay`. */
  #retry(atLeast = 0) {
    const { reconnectDelay, maxReconnectDelay } = this.#options;
    const delay = Math.max(backoffDelay(this.#attempt++, reconnectDelay, maxReconnectDelay, this.#random),
      Math.min(atLeast, maxReconnectDelay));
    return { type: "retry", delay };
  }

  #transmit(outgoing) {
    this.#pending.set(outgoing.ref, outgoing);
    return { type: "send", text: outgoing.text };
  }

  #subscribe(channel) {
    if (channel.subscribeRef !== null) return [];  // one is on its way
    channel.subscribeRef = ++this.#lastRef;
    const frame = { channel: channel.name, event: "@subscribe", ref: channel.subscribeRef };
    if (channel.epoch !== null) frame.data = { since: channel.seq, epoch: channel.epoch };
    return [{ type: "send", text: JSON.stringify(frame) }];
  }

  #onConnected(data) {
    if (this.closed) return [];
    this.id = data?.id ?? null;
    this.connected = true;
    this.#connectingSince = null;
    this.#connectedAt = this.#clock();
    const actions = [];
    for (const channel of this.channels.values()) {
      if (channel.wanted) actions.push(...this.#subscribe(channel));
    }
    // Subscribes first, then what waited, in the order it was sent.
    for (const outgoing of this.#queue.splice(0)) actions.push(this.#transmit(outgoing));
    actions.push(emit(null, ["connect"], { id: this.id }));
    return actions;
  }

  #answeredSend(ref) {
    const outgoing = this.#pending.get(ref);
    this.#pending.delete(ref);
    return outgoing?.request;
  }

  /** The channel whose `@subscribe` this answers, if it is still held. */
  #answeredSubscribe(name, ref) {
    const channel = name === null ? undefined : this.channels.get(name);
    // Unsubscribed meanwhile, or an answer we did not ask for.
    if (!channel || ref === null || channel.subscribeRef !== ref) return null;
    channel.subscribeRef = null;
    return channel;
  }

  #onError(error, ref) {
    const request = this.#answeredSend(ref);
    if (request !== undefined) return [settle(request, null, error)];
    const actions = [];
    const refused = this.#answeredSubscribe(error.channel, ref);
    if (refused) {
      // Refused for good, until subscribe() asks again; but a subscribe that
      // was only rate limited is tried again on the next connect.
      refused.wanted = RETRIED_REFUSALS.has(error.code);
      actions.push(emit(refused, ["@error"], error));
    }
    actions.push(emit(null, ["error"], error));
    return actions;
  }

  #onSubscribed(channel, data) {
    channel.subscribed = true;
    channel.epoch = data.epoch;
    // Without recovery nothing is replayed: the next broadcast follows `seq`.
    // With it, the replay that follows moves `seq` on by itself.
    if (!data.recovered) channel.seq = data.seq;
    const actions = [emit(channel, ["@subscribed"], { recovered: data.recovered, seq: data.seq, epoch: data.epoch })];
    // The snapshot replaces the members, never merged with an older list. A
    // channel without presence has none (and no sync, unless some left).
    const snapshot = data.presence ?? null;
    const hadMembers = channel.presence.members.size > 0;
    channel.hasPresence = snapshot !== null;
    channel.presence.members.clear();
    for (const one of snapshot?.members ?? []) channel.presence.members.set(one.id, member(one));
    if (snapshot !== null || hadMembers) actions.push(sync(channel));
    return actions;
  }

  /** An `@join` or `@leave`: one member more or less. The protocol sends no
   * member twice and none it did not list; should one come, it changes
   * nothing. */
  #onPresenceChange(name, event, one) {
    const channel = name === null ? undefined : this.channels.get(name);
    // Left, not answered yet (the snapshot will count), or no presence.
    if (!channel || !channel.subscribed || !channel.hasPresence) return [];
    const { members } = channel.presence;
    if (event === "@join") {
      if (members.has(one.id)) return [];
      members.set(one.id, one);
    } else {
      const gone = members.get(one.id);
      if (gone === undefined) return [];
      members.delete(one.id);
      one = gone;  // the very object its join gave
    }
    return [emit(channel, [event], one), sync(channel)];
  }

  /** The server removed this connection from the channel (PROTOCOL.md
   * section 8): the subscription ends for good, as `unsubscribe()` would,
   * but its handlers hear why (and nothing is sent back). */
  #onUnsubscribedByServer(name, value) {
    const channel = name === null ? undefined : this.channels.get(name);
    // Left already, or about a subscription before the @subscribe now on its
    // way, which the server answers by itself.
    if (!channel || !channel.subscribed) return [];
    this.channels.delete(channel.name);
    const hadMembers = channel.presence.members.size > 0;
    this.#end(channel);
    const actions = [emit(channel, ["@unsubscribed"], value)];
    if (hadMembers) actions.push(sync(channel));
    return actions;
  }

  /** The channel's subscription is over, not to be asked for again. */
  #end(channel) {
    channel.subscribed = false;
    channel.wanted = false;
    channel.subscribeRef = null;
    channel.hasPresence = false;
    channel.presence.members.clear();
  }

  /** An `@subscribed` without `ref`: the channel's history was lost under a
   * subscription (PROTOCOL.md section 6). Its new epoch and the seq the next
   * broadcast follows replace the channel's, and the application hears it,
   * so that it reloads that channel's state. */
  #onHistoryLost(name, data) {
    const channel = name === null ? undefined : this.channels.get(name);
    // A channel left or not asked for; or nothing was lost.
    if (!channel || !started(channel) || data.recovered) return [];
    channel.seq = data.seq;
    channel.epoch = data.epoch;
    return [emit(channel, ["@subscribed"], { recovered: false, seq: data.seq, epoch: data.epoch })];
  }

  #onMessage(message) {
    const channel = message.channel === null ? undefined : this.channels.get(message.channel);
    if (channel) {
      if (message.seq !== null) channel.seq = message.seq;
      return [emit(channel, message.event === EVERY_EVENT ? [EVERY_EVENT] : [EVERY_EVENT, message.event], message)];
    }
    // A broadcast for a channel just left is dropped; a message to this
    // connection alone goes to the client's own handlers.
    return message.seq === null ? [emit(null, ["message"], message)] : [];
  }
}

// A handler that throws must not stop the others, nor the client itself.
const report = globalThis.reportError ?? ((error) => console.error(error));

// Handlers by event name, on any class: channels are ChannelStates that
// emit, the client emits on its own.
const emitting = (Base) => class extends Base {
  #handlers = new Map();

  /** Call `fn` on `event`; returns a function that removes it again. */
  on(event, fn) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, []);
    this.#handlers.get(event).push(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const list = this.#handlers.get(event);
    const index = list ? list.indexOf(fn) : -1;
    if (index !== -1) list.splice(index, 1);
  }

  _emit(event, value) {
    const list = this.#handlers.get(event);
    if (!list) return;
    for (const fn of [...list]) {
      try {
        fn(value);
      } catch (error) {
        report(error);
      }
    }
  }
};

/**
 * Who is on a channel with presence, as `channel.presence`: `members`, a
 * `Map` from connection id to `{id, identity, info}`, kept in sync by the
 * client (empty while not subscribed, and on a channel without presence).
 *
 * Events: `"join"` and `"leave"` (the member), `"sync"` (every member, as
 * an array, after the snapshot of each subscribe and resubscribe and after
 * every change, an emptying included).
 */
export class Presence extends emitting(PresenceState) {
  #client;
  #channel;

  constructor(client, channel) {
    super();
    this.#client = client;
    this.#channel = channel;
  }

  /** Call `fn` on `event`; returns a function that removes it again.
   * Throws `bad_event` for a name other than `PRESENCE_EVENTS`. */
  on(event, fn) {
    if (!PRESENCE_EVENTS.includes(event)) {
      throw new RobeSocketsError("bad_event",
        `unknown presence event ${JSON.stringify(event)}: one of ${PRESENCE_EVENTS.join(", ")}`, this.#channel);
    }
    return super.on(event, fn);
  }

  /** Ask the server who is on the channel now (`@presence`). Resolves with
   * `{members, clients, users}`; rejects with a `RobeSocketsError`
   * (`not_subscribed`, `presence_disabled`, `timeout`, ...).
   * @param {{timeout?: number}} [options] ms to wait, queued time included. */
  fetch(options = {}) {
    return this.#client._fetchPresence(this.#channel, options);
  }
}

/**
 * A channel of a client, as `client.subscribe(name)` returns it.
 *
 * Events: `"message"` (every application event of the channel, whatever
 * its name, as in Robe; never the client's own events), `"<event name>"`
 * (only the application events of that name), `"@subscribed"`
 * (`{recovered, seq, epoch}` after each `@subscribed`, the server's own
 * included when the channel's history was lost: reload the state you show
 * when `recovered` is false), `"@error"` (the subscription was refused; the
 * client's own `"error"` hears it too), `"@unsubscribed"` (`{reason}`: the
 * server ended the subscription; the channel is not subscribed again, unless
 * `subscribe(name)` is called again, which makes a new object). The
 * client's own events start with `@`, as application event names cannot.
 * Who is on it: `channel.presence` (a `Presence`).
 */
export class Channel extends emitting(ChannelState) {
  constructor(client, name) {
    super(name, new Presence(client, name));
    this.client = client;
  }

  _emit(event, value) {
    // The state names presence emits @join, @leave and @sync: they go to
    // `presence`, never to a channel handler.
    if (PRESENCE_EMITS.has(event)) this.presence._emit(event.slice(1), value);
    else super._emit(event, value);
  }

  /** Call `fn` on `event`; returns a function that removes it again.
   * Throws `bad_event` for a name that is neither an application event's
   * nor one of `CHANNEL_EVENTS`. */
  on(event, fn) {
    if (!isChannelEvent(event)) {
      throw new RobeSocketsError("bad_event", `invalid event name ${JSON.stringify(event)}: 1 to 64 characters, `
        + `not starting with '@', or one of ${CHANNEL_EVENTS.join(", ")}`, this.name);
    }
    return super.on(event, fn);
  }

  /**
   * Send `event` with `data` to the server's handlers for this channel.
   * Resolves with the `@reply` data; rejects with a `RobeSocketsError`.
   * @param {{timeout?: number}} [options] ms to wait for the answer,
   *   including any time spent queued while disconnected.
   */
  send(event, data, options = {}) {
    return this.client._request(this.name, event, data, options);
  }
}

function socketUrl(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  return parsed.href.replace(/\/$/, "");
}

// The module is served at `{path}/client.js`, so its own address names the
// endpoint path, whatever ROBE_SOCKETS_PATH the application chose.
function defaultPath() {
  const here = new URL(import.meta.url);
  if (/^https?:$/.test(here.protocol) && here.pathname.endsWith("/client.js")) {
    return here.pathname.slice(0, -"/client.js".length);
  }
  return "/ops";
}

/**
 * A connection to a flask-robe-sockets server that keeps itself up.
 *
 * It connects at once, in the background; events: `"connect"` (`{id}`,
 * after `@connected`), `"disconnect"` (`{code, reason}`, once per lost
 * connection), `"error"` (a `RobeSocketsError`), `"message"` (messages sent
 * to this connection outside any subscribed channel).
 *
 * After a close it did not ask for it reconnects, with backoff, but at once
 * after 4001 (the server asks for it); a close from 4500 to 4999 (the
 * application disconnected it: signed out, banned) ends it as `close()`
 * would, its `"disconnect"` with that code.
 */
export class Client extends emitting(Object) {
  #state;
  #url;
  #ticketUrl;
  #connectTimeout;
  #sendTimeout;
  #WebSocket;
  #fetch;
  #ws = null;
  #abort = null;
  #retryTimer = null;
  #tickTimer = null;
  #tickAt = 0;

  /**
   * @param {object} [options]
   * @param {string} [options.url] socket endpoint; `ws(s)://` is derived from
   *   the page (`http:` and `https:` URLs and paths are converted).
   *   Default: the page's host and the path this module is served under.
   * @param {string|null} [options.ticketUrl] where to `POST` for a ticket,
   *   with the page's cookies. Default: `{url}/ticket` over HTTP(S);
   *   `null` connects without a ticket.
   */
  constructor(options = {}) {
    super();
    this.#url = socketUrl(options.url ?? defaultPath());
    this.#ticketUrl = options.ticketUrl === undefined
      ? this.#url.replace(/^ws/, "http") + "/ticket"
      : options.ticketUrl;
    const { connectTimeout, sendTimeout } = { ...DEFAULTS, ...options };
    this.#connectTimeout = connectTimeout;
    this.#sendTimeout = sendTimeout;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.#state = new ClientState({ ...options, url: this.#url }, { newChannel: (name) => new Channel(this, name) });
    globalThis.addEventListener?.("online", this.#onOnline);
    globalThis.addEventListener?.("offline", this.#onOffline);
    // After the constructor returns, so handlers registered right after it
    // see the first "connect" (and any "error").
    queueMicrotask(() => this.#connect());
  }

  /** The id the server gave this connection; `null` while disconnected. */
  get id() {
    return this.#state.id;
  }

  /** Whether the socket is open and past `@connected`. */
  get connected() {
    return this.#state.connected;
  }

  /** Whether the client is over: by `close()`, or by the server with a close
   * code from 4500 to 4999 (the application disconnected it). It sends
   * nothing more and never reconnects. */
  get closed() {
    return this.#state.closed;
  }

  /** The channel `name` (the same object for the same name), subscribed
   * now or as soon as the socket is open, and again after every reconnect.
   * `{since, epoch}`, a channel's `seq` and `epoch` saved earlier (by a
   * page that reloaded), start it from there: the server replays what came
   * after, as on a reconnect. */
  subscribe(name, position = {}) {
    const [channel, actions] = this.#state.subscribe(name, position);
    this.#perform(actions);
    return channel;
  }

  /** Leave channel `name`; its object gets no more messages. */
  unsubscribe(name) {
    this.#perform(this.#state.unsubscribe(name));
  }

  /** Close for good: one `"disconnect"` if connected, no reconnect; every
   * unanswered send rejects with code `closed`. */
  close() {
    if (this.#state.closed) return;
    this.#release();
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      ws.close(1000);
    }
    this.#perform(this.#state.close());
    this.#perform(this.#state.lost(1000, "closed by the client"));
  }

  // -- carrying out the state's decisions --------------------------------

  _request(channel, event, data, options) {
    return this.#answer((request) => this.#state.send(channel, event, data, request),
      `${JSON.stringify(event)} on ${JSON.stringify(channel)}`, channel, options);
  }

  _fetchPresence(channel, options) {
    return this.#answer((request) => this.#state.fetchPresence(channel, request),
      `@presence on ${JSON.stringify(channel)}`, channel, options);
  }

  /** What `start(request)` asked for, as a Promise of its answer. */
  #answer(start, what, channel, options) {
    return new Promise((resolve, reject) => {
      const request = { resolve, reject, timer: null };
      const actions = start(request);  // a throw rejects
      const timeout = options.timeout ?? this.#sendTimeout;
      request.timer = setTimeout(() => {
        if (!this.#state.withdraw(request)) return;
        reject(new RobeSocketsError("timeout", `no answer to ${what} within ${timeout} ms`, channel));
      }, timeout);
      this.#perform(actions);
    });
  }

  #perform(actions) {
    for (const action of actions) {
      switch (action.type) {
        case "send":
          this.#ws?.send(action.text);  // none only once a handler closed the client
          break;
        case "emit":
          for (const name of action.names) (action.channel ?? this)._emit(name, action.value);
          break;
        case "settle":
          clearTimeout(action.request.timer);
          if (action.error) action.request.reject(action.error);
          else action.request.resolve(action.result);
          break;
        case "retry":
          // An "error" handler may have closed the client meanwhile.
          if (!this.#state.closed) this.#retryTimer = setTimeout(() => this.#connect(), action.delay);
          break;
        case "drop":
          this.#drop(action.reason);
          break;
      }
    }
    this.#schedule();
  }

  /** One timer for whatever the state waits for next (`@connected`, a
   * ping, a pong); frames only ever push that later, so the timer set
   * stays unless the new deadline comes sooner, and an early tick does nothing. */
  #schedule() {
    const wait = this.#state.waitTime();
    if (wait === null) {
      clearTimeout(this.#tickTimer);
      this.#tickTimer = null;
      return;
    }
    const at = Date.now() + wait;
    if (this.#tickTimer !== null && this.#tickAt <= at) return;
    clearTimeout(this.#tickTimer);
    this.#tickAt = at;
    this.#tickTimer = setTimeout(() => {
      this.#tickTimer = null;
      this.#perform(this.#state.tick());
    }, wait);
  }

  #drop(reason) {
    // A ticket request still under way fails, and that failure is the attempt's.
    this.#abort?.abort();
    const ws = this.#ws;
    if (!ws) return;
    this.#detach(ws);
    ws.close();
    this.#perform(this.#state.lost(1006, reason));
  }

  // -- connecting --------------------------------------------------------

  async #connect() {
    this.#retryTimer = null;
    if (this.#state.closed) return;
    // A server that accepts but never answers (or a network that swallows
    // packets) must not hold the client forever: the whole connect, ticket
    // and handshake up to @connected, has one deadline.
    const abort = new AbortController();
    this.#abort = abort;
    this.#state.connecting();
    this.#schedule();
    let url = this.#url;
    if (this.#ticketUrl !== null) {
      let ticket;
      try {
        ticket = await this.#fetchTicket(abort.signal);
      } catch (error) {
        this.#perform(this.#state.connectFailed(abort.signal.aborted
          ? new RobeSocketsError("ticket_failed", `no ticket from ${this.#ticketUrl} within ${this.#connectTimeout} ms`)
          : error));
        return;
      }
      if (this.#state.closed) return;
      url += (url.includes("?") ? "&" : "?") + "ticket=" + encodeURIComponent(ticket);
    }
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (error) {
      this.#perform(this.#state.connectFailed(
        new RobeSocketsError("connect_failed", `cannot open ${this.#url}: ${error.message}`)));
      return;
    }
    this.#ws = ws;
    ws.onmessage = (event) => this.#perform(this.#state.receive(event.data));
    ws.onclose = (event) => {
      this.#detach(ws);
      this.#perform(this.#state.lost(event.code, event.reason));
      // A close from 4500 to 4999 ended the client, as close() would.
      if (this.#state.closed) this.#release();
    };
  }

  async #fetchTicket(signal) {
    let response;
    let body = null;
    try {
      response = await this.#fetch(this.#ticketUrl, {
        method: "POST",
        credentials: "include",
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal,
      });
      body = await response.json();
    } catch (error) {
      if (!response || signal.aborted) {
        throw new RobeSocketsError("ticket_failed", `cannot reach ${this.#ticketUrl}: ${error.message}`);
      }
    }
    if (!response.ok || typeof body?.ticket !== "string") {
      const code = typeof body?.error === "string" ? body.error : "ticket_failed";
      const error = new RobeSocketsError(code, `${this.#ticketUrl} answered ${response.status} (${code})`);
      // 429 rate_limited says how long to wait; the retry waits at least that.
      error.retryAfter = retryAfterMs(response.headers?.get?.("Retry-After"));
      throw error;
    }
    return body.ticket;
  }

  /** What only a client that may reconnect needs. */
  #release() {
    globalThis.removeEventListener?.("online", this.#onOnline);
    globalThis.removeEventListener?.("offline", this.#onOffline);
  }

  #detach(ws) {
    ws.onmessage = ws.onclose = null;
    if (this.#ws === ws) this.#ws = null;
  }

  #onOnline = () => {
    // The network is back: try now instead of waiting out the backoff. An
    // attempt under way started offline: if it fails, retry at once too.
    this.#state.resetBackoff();
    if (this.#retryTimer === null) return;
    clearTimeout(this.#retryTimer);
    this.#connect();
  };

  // The socket may linger long after the network is gone: check it now.
  #onOffline = () => this.#perform(this.#state.pingNow());
}
