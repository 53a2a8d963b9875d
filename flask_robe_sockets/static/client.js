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

/** A connection that lasted this long (ms) was a good one: the backoff
 * starts over. One dropped sooner keeps growing it, so a server that closes
 * every connection right after `@connected` is not hammered. */
const STABLE_AFTER = 10000;

// A handler that throws must not stop the others, nor the client itself.
const report = globalThis.reportError ?? ((error) => console.error(error));

class Emitter {
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
}

/**
 * A channel of a client, as `client.subscribe(name)` returns it.
 *
 * Events: `"message"` (every application event on the channel),
 * `"<event name>"` (only that event), `"subscribed"` (`{recovered, seq,
 * epoch}` after each (re)subscription: reload the state you show when
 * `recovered` is false), `"error"` (the subscription was refused; the
 * client's own `"error"` hears it too).
 */
export class Channel extends Emitter {
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    /** The `seq` of the last broadcast seen, sent as `since` on resubscribe;
     * `null` before the first `@subscribed`. */
    this.seq = null;
    /** The history `@subscribed` named; `null` before the first one. */
    this.epoch = null;
    /** Whether the server confirmed the subscription on this connection. */
    this.subscribed = false;
    this._wanted = true;
    this._subscribing = false;
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

  _onSubscribed(data) {
    this._subscribing = false;
    this.subscribed = true;
    this.epoch = data.epoch;
    // Without recovery nothing is replayed: the next broadcast follows `seq`.
    if (!data.recovered) this.seq = data.seq;
    this._emit("subscribed", { recovered: data.recovered, seq: data.seq, epoch: data.epoch });
  }

  _onRefused(error) {
    this._subscribing = false;
    // Refused for good, until subscribe() asks again; but a subscribe that
    // was only rate limited is tried again on the next connect.
    this._wanted = error.code === "rate_limited";
    this._emit("error", error);
  }

  _deliver(message) {
    if (message.seq !== null) this.seq = message.seq;
    this._emit("message", message);
    if (message.event !== "message") this._emit(message.event, message);
  }
}

/** The ms of a `Retry-After` header in seconds; 0 when absent or a date. */
function retryAfterMs(value) {
  const seconds = value == null || value.trim() === "" ? NaN : Number(value);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : 0;
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
 */
export class Client extends Emitter {
  #options;
  #url;
  #ticketUrl;
  #WebSocket;
  #fetch;
  #ws = null;
  #connected = false;
  #closed = false;
  #attempt = 0;
  #connectedAt = 0;
  #retryTimer = null;
  #connectTimer = null;
  #channels = new Map();
  #lastRef = 0;
  #pending = new Map();
  #queue = [];
  #subscribing = new Map();
  #lastFrame = 0;
  #watchTimer = null;
  #pongTimer = null;

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
    this.#options = { ...DEFAULTS, ...options };
    this.#url = socketUrl(options.url ?? defaultPath());
    this.#ticketUrl = options.ticketUrl === undefined
      ? this.#url.replace(/^ws/, "http") + "/ticket"
      : options.ticketUrl;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** The id the server gave this connection; `null` while disconnected. */
    this.id = null;
    globalThis.addEventListener?.("online", this.#onOnline);
    globalThis.addEventListener?.("offline", this.#onOffline);
    // After the constructor returns, so handlers registered right after it
    // see the first "connect" (and any "error").
    queueMicrotask(() => this.#connect());
  }

  /** Whether the socket is open and past `@connected`. */
  get connected() {
    return this.#connected;
  }

  /** The channel `name` (the same object for the same name), subscribed
   * now or as soon as the socket is open, and again after every reconnect. */
  subscribe(name) {
    if (typeof name !== "string" || !CHANNEL_NAME.test(name)) {
      throw new RobeSocketsError("bad_channel",
        `invalid channel name ${JSON.stringify(name)}: 1 to 128 characters from A-Z a-z 0-9 _ - . : /`);
    }
    let channel = this.#channels.get(name);
    if (!channel) {
      channel = new Channel(this, name);
      this.#channels.set(name, channel);
    }
    channel._wanted = true;
    if (this.#connected && !channel.subscribed) this.#sendSubscribe(channel);
    return channel;
  }

  /** Leave channel `name`; its object gets no more messages. */
  unsubscribe(name) {
    const channel = this.#channels.get(name);
    if (!channel) return;
    this.#channels.delete(name);
    channel._wanted = false;
    channel.subscribed = false;
    if (this.#connected) this.#write({ channel: name, event: "@unsubscribe" });
  }

  /** Close for good: one `"disconnect"` if connected, no reconnect; every
   * unanswered send rejects with code `closed`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    globalThis.removeEventListener?.("online", this.#onOnline);
    globalThis.removeEventListener?.("offline", this.#onOffline);
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      ws.close(1000);
    }
    this.#lost(1000, "closed by the client", "closed");
  }

  // -- sending -----------------------------------------------------------

  _request(channel, event, data, options) {
    if (this.#closed) {
      return Promise.reject(new RobeSocketsError("closed", "the client was closed", channel));
    }
    if (typeof event !== "string" || !event || event.length > 64 || event.startsWith("@")) {
      return Promise.reject(new RobeSocketsError("bad_event",
        `invalid event name ${JSON.stringify(event)}: 1 to 64 characters, not starting with '@'`, channel));
    }
    return new Promise((resolve, reject) => {
      const ref = ++this.#lastRef;
      // Serialised now, so data that is not JSON fails here, for this caller.
      const request = { ref, text: JSON.stringify({ channel, event, data, ref }), resolve, reject };
      const timeout = options.timeout ?? this.#options.sendTimeout;
      if (this.#connected) {
        this.#transmit(request);
      } else if (this.#queue.length >= this.#options.maxQueue) {
        reject(new RobeSocketsError("queue_full",
          `not connected, and ${this.#options.maxQueue} sends are already waiting`, channel));
        return;
      } else {
        this.#queue.push(request);
      }
      request.timer = setTimeout(() => {
        this.#pending.delete(ref);
        const queued = this.#queue.indexOf(request);
        if (queued !== -1) this.#queue.splice(queued, 1);
        reject(new RobeSocketsError("timeout",
          `no answer to ${JSON.stringify(event)} on ${JSON.stringify(channel)} within ${timeout} ms`, channel));
      }, timeout);
    });
  }

  #transmit(request) {
    this.#pending.set(request.ref, request);
    this.#ws.send(request.text);
  }

  #settle(ref, outcome) {
    const request = this.#pending.get(ref);
    if (!request) return false;
    this.#pending.delete(ref);
    clearTimeout(request.timer);
    outcome(request);
    return true;
  }

  #write(frame) {
    this.#ws.send(JSON.stringify(frame));
  }

  #sendSubscribe(channel) {
    if (channel._subscribing) return;
    const ref = ++this.#lastRef;
    const frame = { channel: channel.name, event: "@subscribe", ref };
    if (channel.epoch !== null) frame.data = { since: channel.seq, epoch: channel.epoch };
    channel._subscribing = true;
    this.#subscribing.set(ref, channel);
    this.#write(frame);
  }

  // -- connecting --------------------------------------------------------

  async #connect() {
    this.#retryTimer = null;
    if (this.#closed) return;
    // A server that accepts but never answers (or a network that swallows
    // packets) must not hold the client forever: the whole connect, ticket
    // and handshake up to @connected, has one deadline.
    const abort = new AbortController();
    const timeout = this.#options.connectTimeout;
    this.#connectTimer = setTimeout(() => {
      this.#connectTimer = null;
      abort.abort();
      const ws = this.#ws;
      if (ws) {
        this.#detach(ws);
        ws.close();
        this.#lost(1006, `no @connected within ${timeout} ms`);
      }
    }, timeout);
    let url = this.#url;
    if (this.#ticketUrl !== null) {
      let ticket;
      try {
        ticket = await this.#fetchTicket(abort.signal);
      } catch (error) {
        clearTimeout(this.#connectTimer);
        this.#connectTimer = null;
        if (!this.#closed) {
          this._emit("error", abort.signal.aborted
            ? new RobeSocketsError("ticket_failed", `no ticket from ${this.#ticketUrl} within ${timeout} ms`)
            : error);
          this.#reconnectLater(error?.retryAfter ?? 0);
        }
        return;
      }
      if (this.#closed) return;
      url += (url.includes("?") ? "&" : "?") + "ticket=" + encodeURIComponent(ticket);
    }
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (error) {
      clearTimeout(this.#connectTimer);
      this.#connectTimer = null;
      this._emit("error", new RobeSocketsError("connect_failed", `cannot open ${this.#url}: ${error.message}`));
      this.#reconnectLater();
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      this.#lastFrame = Date.now();
      this.#watch();
    };
    ws.onmessage = (event) => this.#onFrame(event.data);
    ws.onclose = (event) => {
      this.#detach(ws);
      this.#lost(event.code, event.reason);
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

  /** Try again after the backoff, but no sooner than `atLeast` ms (a
   * refusal's Retry-After), itself at most `maxReconnectDelay`. */
  #reconnectLater(atLeast = 0) {
    if (this.#closed) return;  // an "error" handler may have closed the client
    const { reconnectDelay, maxReconnectDelay } = this.#options;
    const delay = Math.max(backoffDelay(this.#attempt++, reconnectDelay, maxReconnectDelay),
      Math.min(atLeast, maxReconnectDelay));
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
  }

  #detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (this.#ws === ws) this.#ws = null;
  }

  /** The socket is gone (or the client closed): settle everything it held. */
  #lost(code, reason, failure = "disconnected") {
    clearTimeout(this.#watchTimer);
    clearTimeout(this.#pongTimer);
    clearTimeout(this.#connectTimer);
    this.#watchTimer = this.#pongTimer = this.#connectTimer = null;
    const wasConnected = this.#connected;
    this.#connected = false;
    this.id = null;
    this.#subscribing.clear();
    for (const channel of this.#channels.values()) {
      channel.subscribed = false;
      channel._subscribing = false;
    }
    // Sent but unanswered: the server may or may not have run them, so they
    // are not sent again.
    const requests = [...this.#pending.values()];
    this.#pending.clear();
    if (this.#closed) requests.push(...this.#queue.splice(0));
    for (const request of requests) {
      clearTimeout(request.timer);
      request.reject(new RobeSocketsError(failure,
        failure === "closed" ? "the client was closed" : "the connection was lost before the answer"));
    }
    if (wasConnected && Date.now() - this.#connectedAt >= STABLE_AFTER) this.#attempt = 0;
    if (wasConnected) {
      this._emit("disconnect", { code, reason });
    } else if (!this.#closed) {
      this._emit("error", new RobeSocketsError("connect_failed",
        `cannot open ${this.#url} (close code ${code}${reason ? `: ${reason}` : ""})`));
    }
    this.#reconnectLater();
  }

  #onOnline = () => {
    // The network is back: try now instead of waiting out the backoff. An
    // attempt under way started offline: if it fails, retry at once too.
    this.#attempt = 0;
    if (this.#retryTimer === null) return;
    clearTimeout(this.#retryTimer);
    this.#connect();
  };

  #onOffline = () => {
    // The socket may linger long after the network is gone: check it now.
    if (this.#connected && this.#pongTimer === null) this.#ping();
  };

  // -- liveness ----------------------------------------------------------

  #watch() {
    const interval = this.#options.pingInterval;
    if (!interval) return;
    const silent = Date.now() - this.#lastFrame;
    if (silent >= interval && this.#pongTimer === null) this.#ping();
    this.#watchTimer = setTimeout(() => this.#watch(), Math.max(interval - silent, 0) || interval);
  }

  #ping() {
    this.#ws.send(JSON.stringify({ event: "@ping" }));
    this.#pongTimer = setTimeout(() => {
      const ws = this.#ws;
      if (!ws) return;
      this.#detach(ws);
      ws.close();
      this.#lost(1006, "no answer to @ping");
    }, this.#options.pongTimeout);
  }

  // -- frames from the server --------------------------------------------

  #onFrame(text) {
    this.#lastFrame = Date.now();
    clearTimeout(this.#pongTimer);
    this.#pongTimer = null;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      frame = null;
    }
    if (frame === null || typeof frame !== "object" || typeof frame.event !== "string") {
      this._emit("error", new RobeSocketsError("bad_frame", "the server sent a frame that is not a protocol object"));
      return;
    }
    const { event, channel = null, data = null, ref = null, seq = null } = frame;
    switch (event) {
      case "@connected":
        this.#onConnected(data);
        break;
      case "@reply":
        this.#settle(ref, (request) => request.resolve(data));
        break;
      case "@error":
        this.#onError(channel, ref, data);
        break;
      case "@subscribed": {
        const target = this.#subscribing.get(ref);
        this.#subscribing.delete(ref);
        // Unsubscribed meanwhile: the answer is for a channel object no one holds.
        if (target && this.#channels.get(target.name) === target) target._onSubscribed(data);
        break;
      }
      case "@pong":
      case "@unsubscribed":
        break;
      default: {
        const message = { channel, event, data, seq };
        const target = channel === null ? undefined : this.#channels.get(channel);
        if (target) target._deliver(message);
        // A broadcast for a channel just left is dropped; a message to this
        // connection alone goes to the client's own handlers.
        else if (seq === null) this._emit("message", message);
      }
    }
  }

  #onConnected(data) {
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#connected = true;
    this.#connectedAt = Date.now();
    this.id = data?.id ?? null;
    for (const channel of this.#channels.values()) {
      if (channel._wanted) this.#sendSubscribe(channel);
    }
    for (const request of this.#queue.splice(0)) this.#transmit(request);
    this._emit("connect", { id: this.id });
  }

  #onError(channel, ref, data) {
    const error = new RobeSocketsError(data?.code ?? "error", data?.message ?? "", channel);
    if (this.#settle(ref, (request) => request.reject(error))) return;
    const refused = this.#subscribing.get(ref);
    this.#subscribing.delete(ref);
    // Unsubscribed meanwhile: no one holds that channel object any more.
    if (refused && this.#channels.get(refused.name) === refused) refused._onRefused(error);
    this._emit("error", error);
  }
}
