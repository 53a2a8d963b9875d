// Types of the browser client served at `{path}/client.js` (protocol 1).

export declare const PROTOCOL_VERSION: 1;

/** An error answered by the server (`@error`) or raised by the client. */
export declare class RobeSocketsError extends Error {
  /** The protocol's code (`forbidden`, `unknown_event`, `handler_error`,
   * `rate_limited`, ...) or the client's own. */
  readonly code:
    | "bad_frame" | "bad_channel" | "bad_event" | "forbidden" | "unknown_event"
    | "handler_error" | "too_many_subscriptions" | "rate_limited"
    | "timeout" | "queue_full" | "disconnected" | "closed"
    | "ticket_failed" | "unauthorized" | "connect_failed"
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
  /** Every application event on the channel. */
  message: Message;
  subscribed: Subscribed;
  /** The subscription was refused (e.g. `forbidden`); the client's
   * `error` event hears it too. */
  error: RobeSocketsError;
  /** Any other name: only the application events of that name. */
  [event: string]: Message | Subscribed | RobeSocketsError;
}

export declare class Channel implements Emitter<ChannelEvents> {
  readonly client: Client;
  readonly name: string;
  /** `seq` of the last broadcast seen, sent as `since` when resubscribing;
   * `null` before the first `@subscribed`. */
  readonly seq: number | null;
  readonly epoch: string | null;
  readonly subscribed: boolean;
  on<K extends keyof ChannelEvents>(event: K, fn: (value: ChannelEvents[K]) => void): () => void;
  off<K extends keyof ChannelEvents>(event: K, fn: (value: ChannelEvents[K]) => void): void;
  /** Resolves with the `@reply` data; rejects with a `RobeSocketsError`. */
  send<R = unknown>(event: string, data?: unknown, options?: SendOptions): Promise<R>;
}

export interface ClientEvents {
  connect: { id: string | null };
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
  on<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): void;
  /** The same `Channel` for the same name; may be called before connecting. */
  subscribe(name: string): Channel;
  unsubscribe(name: string): void;
  /** Close for good: one `disconnect` if connected, no reconnect. */
  close(): void;
}
