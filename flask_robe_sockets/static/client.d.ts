// Types of the browser client served at `{path}/client.js` (protocol 1).

export declare const PROTOCOL_VERSION: 1;

/** An error answered by the server (`@error`) or raised by the client. */
export declare class RobeSocketsError extends Error {
  /** The protocol's code (`forbidden`, `unknown_event`, `handler_error`,
   * `rate_limited`, ...) or the client's own. */
  readonly code:
    | "bad_frame" | "bad_channel" | "bad_event" | "forbidden" | "unknown_event"
    | "handler_error" | "too_many_subscriptions" | "rate_limited"
    | "presence_disabled" | "not_subscribed"
    | "timeout" | "queue_full" | "disconnected" | "closed"
    | "ticket_failed" | "unauthorized" | "connect_failed"
    | "bad_position" | "already_subscribed"
    | (string & {});
  readonly channel: string | null;
  /** On a refused ticket request: the ms its `Retry-After` asked to wait
   * (the next attempt waits at least that), else 0. */
  readonly retryAfter?: number;
  constructor(code: string, message: string, channel?: string | null);
}

/** Reconnect delay in ms for attempt `attempt` (0-based): full jitter. */
export declare function backoffDelay(
  attempt: number, initial?: number, max?: number, random?: () => number,
): number;

/** The channel events that are the client's own: application event names
 * cannot start with `@`, so they never collide with one. */
export declare const CHANNEL_EVENTS: readonly ["@subscribed", "@unsubscribed", "@error"];

/** What `channel.presence.on()` takes. */
export declare const PRESENCE_EVENTS: readonly ["join", "leave", "sync"];

/** Whether a channel handler may be registered for `name`: an application
 * event name (`"message"` for all of them) or one of `CHANNEL_EVENTS`. */
export declare function isChannelEvent(name: unknown): boolean;

/** The ms of a `Retry-After` header in seconds; 0 when absent or not a
 * number of seconds (an HTTP-date included). */
export declare function retryAfterMs(value: string | null | undefined): number;

/** A member of a channel with presence (PROTOCOL.md section 7): one
 * connection, with its ticket's identity (`null` when anonymous) and what
 * the application shows others about it (`null` when it gives nothing). */
export interface Member<I = unknown> {
  id: string;
  identity: string | null;
  info: I | null;
}

/** The server's answer to `channel.presence.fetch()`. */
export interface PresenceAnswer<I = unknown> {
  members: Member<I>[];
  /** The number of members. */
  clients: number;
  /** The number of distinct non-null identities among them. */
  users: number;
}

/** Who is on a channel, as `ClientState` sees it; only the state changes it. */
export declare class PresenceState<I = unknown> {
  constructor();
  /** By connection id; from the snapshot of the last `@subscribed` and every
   * `@join` and `@leave` since; empty while not subscribed and on a channel
   * without presence. */
  readonly members: ReadonlyMap<string, Member<I>>;
}

/** One channel as `ClientState` sees it; only the state changes it. */
export declare class ChannelState {
  constructor(name: string, presence?: PresenceState);
  readonly name: string;
  readonly presence: PresenceState;
  /** The application unsubscribed it: its handlers hear nothing more. */
  readonly left: boolean;
  /** Its last `@subscribed` had presence: only then do `@join`/`@leave` count. */
  readonly hasPresence: boolean;
  readonly seq: number | null;
  readonly epoch: string | null;
  readonly subscribed: boolean;
  /** Subscribed on every connect: not after a refusal, until `subscribe()` again. */
  readonly wanted: boolean;
  /** The ref of the `@subscribe` in flight, if one is. */
  readonly subscribeRef: number | null;
}

/** What `ClientState` answers: the `Client` carries these out, in order. */
export type Action<R = unknown> =
  | { type: "send"; text: string }
  /** Call the handlers of each of `names`: the client's own when `channel` is
   * null; `@join`, `@leave` and `@sync` are the channel's presence events. */
  | { type: "emit"; channel: ChannelState | null; names: string[]; value: unknown }
  | { type: "settle"; request: R; result: unknown; error: RobeSocketsError | null }
  /** Connect again in `delay` ms. */
  | { type: "retry"; delay: number }
  /** Give a silent connection up. */
  | { type: "drop"; reason: string };

/**
 * The client's decisions, without I/O (refs, the send queue, resubscribe
 * positions, backoff, which refusals are retried, ping deadlines). `Client`
 * runs on one; the Python client's `clientstate.ClientState` makes the same
 * decisions. Times are ms.
 */
export declare class ClientState<C extends ChannelState = ChannelState, R = unknown> {
  constructor(
    options?: Omit<ClientOptions, "WebSocket" | "fetch" | "ticketUrl" | "sendTimeout"> & { url?: string },
    io?: { newChannel?: (name: string) => C; clock?: () => number; random?: () => number },
  );
  readonly connected: boolean;
  readonly closed: boolean;
  readonly id: string | null;
  readonly channels: ReadonlyMap<string, C>;
  /** Sends waiting for a connection. */
  readonly queued: number;
  holds(channel: C): boolean;
  /** Throws `bad_channel`, `bad_position`, `already_subscribed` or `closed`. */
  subscribe(name: string, position?: Position): [C, Action<R>[]];
  unsubscribe(name: string): Action<R>[];
  /** Throws `closed`, `bad_event` or `queue_full`. */
  send(channel: string, event: string, data: unknown, request: R): Action<R>[];
  /** `@presence`, sent or queued like a send; settled with a
   * `PresenceAnswer` or the server's refusal. Throws `closed` or `queue_full`. */
  fetchPresence(channel: string, request: R): Action<R>[];
  withdraw(request: R): boolean;
  close(): Action<R>[];
  connecting(): void;
  connectFailed(error: RobeSocketsError): Action<R>[];
  resetBackoff(): void;
  heard(): void;
  receive(text: string): Action<R>[];
  tick(): Action<R>[];
  pingNow(): Action<R>[];
  /** ms until `tick()` has something to do; `null` for never. */
  waitTime(): number | null;
  /** A code from 4500 to 4999 closes the state, as `close()` would; 4001
   * is retried at once. */
  lost(code?: number, reason?: string): Action<R>[];
}

/** An event received on a channel (or sent to this connection alone). */
export interface Message<T = unknown> {
  channel: string | null;
  event: string;
  data: T | null;
  /** Position in the channel; `null` for a message to this connection alone. */
  seq: number | null;
}

export interface Subscribed {
  /** False when missed broadcasts could not be replayed: reload your state. */
  recovered: boolean;
  seq: number;
  epoch: string;
}

/** Where a subscription starts: a channel's `seq` and `epoch`, saved by the
 * application (both or neither). */
export interface Position {
  since?: number | null;
  epoch?: string | null;
}

export interface SendOptions {
  /** ms to wait for the answer, queued time included (default 10000). */
  timeout?: number;
}

export interface ClientOptions {
  /** Socket endpoint (`ws:`, `wss:`, `http(s):` or a path). Default: the
   * page's host and the path this module is served under (`/ops`). */
  url?: string;
  /** Where to POST for a ticket, with the page's cookies; `null` for none.
   * Default: `{url}/ticket` over HTTP(S). */
  ticketUrl?: string | null;
  /** First reconnect delay in ms, doubled per attempt (default 500). */
  reconnectDelay?: number;
  /** Longest reconnect delay in ms (default 30000). */
  maxReconnectDelay?: number;
  /** ms of silence before an `@ping`; 0 disables it (default 25000). */
  pingInterval?: number;
  /** ms to wait for the `@pong` before reconnecting (default 10000). */
  pongTimeout?: number;
  /** ms for a connect, from the ticket request to `@connected`; past it the
   * attempt is abandoned and retried (default 10000). */
  connectTimeout?: number;
  /** Default for `SendOptions.timeout` (10000). */
  sendTimeout?: number;
  /** Sends that may wait for a connection; more fail with `queue_full` (100). */
  maxQueue?: number;
  /** For tests and other runtimes. */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
}

interface Emitter<Events> {
  /** Returns a function that removes the handler. */
  on<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): void;
}

export interface ChannelEvents {
  /** Every application event of the channel, whatever its name, as in Robe
   * (`message.event` says which); never the client's own `@` events. */
  message: Message;
  /** After each `@subscribed`, and when the server says the channel's
   * history was lost (`recovered: false`): reload your state then. */
  "@subscribed": Subscribed;
  /** The subscription was refused (e.g. `forbidden`); the client's
   * `error` event hears it too. */
  "@error": RobeSocketsError;
  /** The server ended the subscription (PROTOCOL.md section 8), saying why:
   * it is not subscribed again on reconnect (`subscribe(name)` again makes
   * a new `Channel`). */
  "@unsubscribed": Unsubscribed;
  /** Any other name: only the application events of that name (`error`,
   * `subscribed` and `join` included: those are application events). */
  [event: string]: Message | Subscribed | RobeSocketsError | Unsubscribed;
}

export interface Unsubscribed {
  reason: string | null;
}

export interface PresenceEvents<I = unknown> {
  /** Another connection joined. */
  join: Member<I>;
  /** A member left (the object its join gave). */
  leave: Member<I>;
  /** Every member, after the snapshot of each (re)subscribe and after every
   * change, the emptying when the connection is lost included. */
  sync: Member<I>[];
}

/** `channel.presence`: who is on the channel, kept in sync by the client. */
export declare class Presence<I = unknown> implements Emitter<PresenceEvents<I>> {
  /** By connection id; empty while not subscribed and on a channel without
   * presence. On reconnect it is replaced by the new snapshot, never merged. */
  readonly members: ReadonlyMap<string, Member<I>>;
  /** Throws `bad_event` for a name other than `join`, `leave`, `sync`. */
  on<K extends keyof PresenceEvents<I>>(event: K, fn: (value: PresenceEvents<I>[K]) => void): () => void;
  off<K extends keyof PresenceEvents<I>>(event: K, fn: (value: PresenceEvents<I>[K]) => void): void;
  /** Asks the server (`@presence`); rejects with `not_subscribed`,
   * `presence_disabled`, `timeout`, ... */
  fetch(options?: SendOptions): Promise<PresenceAnswer<I>>;
}

export declare class Channel implements Emitter<ChannelEvents> {
  readonly client: Client;
  readonly name: string;
  /** `seq` of the last broadcast seen, sent as `since` when resubscribing;
   * `null` before the first `@subscribed`. */
  readonly seq: number | null;
  readonly epoch: string | null;
  readonly subscribed: boolean;
  /** Who is on the channel (PROTOCOL.md section 7). */
  readonly presence: Presence;
  /** Throws `bad_event` for a name starting with `@` other than the client's own. */
  on<K extends keyof ChannelEvents>(event: K, fn: (value: ChannelEvents[K]) => void): () => void;
  off<K extends keyof ChannelEvents>(event: K, fn: (value: ChannelEvents[K]) => void): void;
  /** Resolves with the `@reply` data; rejects with a `RobeSocketsError`. */
  send<R = unknown>(event: string, data?: unknown, options?: SendOptions): Promise<R>;
}

export interface ClientEvents {
  connect: { id: string | null };
  /** After a code from 4500 to 4999 (the application disconnected this
   * client: signed out, banned) the client is closed and never reconnects;
   * after 4001 it reconnects at once; after any other, with backoff. */
  disconnect: { code: number; reason: string };
  error: RobeSocketsError;
  /** Messages sent to this connection alone, outside subscribed channels. */
  message: Message;
}

export declare class Client implements Emitter<ClientEvents> {
  constructor(options?: ClientOptions);
  /** The connection id from `@connected`; `null` while disconnected. */
  readonly id: string | null;
  readonly connected: boolean;
  /** Over: by `close()`, or by a close code from 4500 to 4999; never reconnects. */
  readonly closed: boolean;
  on<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): void;
  /** The same `Channel` for the same name; may be called before connecting.
   * With a saved `{since, epoch}` it starts from there, and what came after
   * is replayed as on a reconnect. Throws `bad_channel`, `bad_position`,
   * `already_subscribed` or `closed`. */
  subscribe(name: string, position?: Position): Channel;
  unsubscribe(name: string): void;
  /** Close for good: one `disconnect` if connected, no reconnect. */
  close(): void;
}
