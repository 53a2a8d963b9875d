// Unit tests of the browser client's own logic, with a fake WebSocket and a
// fake fetch: run with `node --test tests/js/` (tests/test_client_js.py does).
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { backoffDelay, Client, RobeSocketsError } from "../../flask_robe_sockets/static/client.js";

class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code) {
    this.closedWith = code ?? 1005;
  }

  // What the server would do:
  accept(id = "c1") {
    this.onopen?.();
    this.receive({ event: "@connected", data: { id, protocol: 1 } });
  }

  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }

  last(event) {
    return this.sent.findLast((frame) => frame.event === event);
  }
}

let tickets = 0;
const clients = [];

async function fakeFetch(url, init) {
  assert.equal(init.method, "POST");
  assert.equal(init.credentials, "include");
  tickets += 1;
  return { ok: true, status: 200, json: async () => ({ ticket: `t${tickets}`, expires_in: 30 }) };
}

function makeClient(options = {}) {
  const client = new Client({
    url: "ws://example.test/ops",
    WebSocket: FakeSocket,
    fetch: fakeFetch,
    reconnectDelay: 1,
    maxReconnectDelay: 4,
    ...options,
  });
  clients.push(client);
  return client;
}

async function until(predicate, what = "condition", timeout = 2000) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

const socketNumber = (n) => until(() => FakeSocket.all.length >= n, `socket ${n}`).then(() => FakeSocket.all[n - 1]);

afterEach(() => {
  for (const client of clients.splice(0)) client.close();
  FakeSocket.all = [];
});

test("backoff doubles from the initial delay up to the cap, with full jitter", () => {
  const top = (attempt) => backoffDelay(attempt, 500, 30000, () => 1);
  assert.deepEqual([0, 1, 2, 3, 6, 7, 20].map(top), [500, 1000, 2000, 4000, 30000, 30000, 30000]);
  assert.equal(backoffDelay(5, 500, 30000, () => 0), 0);
  assert.equal(backoffDelay(2, 500, 30000, () => 0.5), 1000);
});

test("every connect uses a fresh ticket and resubscribes with since and epoch", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  assert.equal(client.subscribe("chat"), chat, "the same object for the same name");
  const events = [];
  client.on("connect", ({ id }) => events.push(`connect ${id}`));
  client.on("disconnect", ({ code }) => events.push(`disconnect ${code}`));
  const subscribed = [];
  chat.on("@subscribed", (info) => subscribed.push(info));
  const messages = [];
  chat.on("message", (m) => messages.push(m));

  const first = await socketNumber(1);
  assert.match(first.url, /^ws:\/\/example\.test\/ops\?ticket=t\d+$/);
  first.accept("c1");
  assert.deepEqual(first.sent, [{ channel: "chat", event: "@subscribe", ref: first.sent[0].ref }]);
  first.receive({ channel: "chat", event: "@subscribed", ref: first.sent[0].ref, data: { recovered: false, seq: 4, epoch: "e1" } });
  first.receive({ channel: "chat", event: "said", data: { text: "hi" }, seq: 5 });
  assert.deepEqual(messages, [{ channel: "chat", event: "said", data: { text: "hi" }, seq: 5 }]);
  assert.deepEqual(subscribed, [{ recovered: false, seq: 4, epoch: "e1" }]);

  first.drop(1001, "server shutting down");
  const second = await socketNumber(2);
  assert.notEqual(second.url, first.url, "a ticket is never sent twice");
  second.accept("c2");
  assert.deepEqual(second.last("@subscribe").data, { since: 5, epoch: "e1" });
  assert.deepEqual(events, ["connect c1", "disconnect 1001", "connect c2"]);
});

test("recovered subscriptions keep counting from the replay", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const ws = await socketNumber(1);
  ws.accept();
  ws.receive({ channel: "chat", event: "@subscribed", ref: ws.sent[0].ref, data: { recovered: true, seq: 9, epoch: "e1" } });
  assert.equal(chat.seq, null, "the replay, not @subscribed, advances seq");
  ws.receive({ channel: "chat", event: "message", data: 1, seq: 8 });
  ws.receive({ channel: "chat", event: "message", data: 2, seq: 9 });
  assert.equal(chat.seq, 9);
  assert.equal(chat.subscribed, true);
  assert.equal(client.subscribe("chat"), chat);
  assert.equal(ws.sent.filter((f) => f.event === "@subscribe").length, 1, "subscribed already: not sent again");
});

test("send resolves with the reply and rejects with the error's code", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const ws = await socketNumber(1);
  ws.accept();
  const ok = chat.send("echo", { n: 1 });
  const bad = chat.send("deny", null);
  const [echo, deny] = ws.sent.filter((f) => !f.event.startsWith("@"));
  assert.deepEqual({ ...echo, ref: 0 }, { channel: "chat", event: "echo", data: { n: 1 }, ref: 0 });
  ws.receive({ channel: "chat", event: "@reply", ref: echo.ref, data: { echo: { n: 1 } } });
  ws.receive({ channel: "chat", event: "@error", ref: deny.ref, data: { code: "forbidden", message: "no" } });
  assert.deepEqual(await ok, { echo: { n: 1 } });
  await assert.rejects(bad, (error) => error instanceof RobeSocketsError && error.code === "forbidden" && error.message === "no");
  await assert.rejects(chat.send("@subscribe"), { code: "bad_event" });
});

test("sends wait while disconnected, up to the bound, and go out after connect", async () => {
  const client = makeClient({ maxQueue: 2 });
  const chat = client.subscribe("chat");
  const a = chat.send("echo", "a");
  const b = chat.send("echo", "b");
  await assert.rejects(chat.send("echo", "c"), { code: "queue_full" });
  const ws = await socketNumber(1);
  ws.accept();
  assert.deepEqual(ws.sent.map((f) => f.event), ["@subscribe", "echo", "echo"], "subscribes go first");
  for (const frame of ws.sent.slice(1)) ws.receive({ channel: "chat", event: "@reply", ref: frame.ref, data: frame.data });
  assert.deepEqual(await Promise.all([a, b]), ["a", "b"]);
});

test("a send times out, queued or unanswered, and a lost connection fails what was sent", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  await assert.rejects(chat.send("echo", 1, { timeout: 5 }), { code: "timeout" });
  const ws = await socketNumber(1);
  ws.accept();
  await assert.rejects(chat.send("echo", 2, { timeout: 5 }), { code: "timeout" });
  const unanswered = chat.send("echo", 3);
  ws.drop();
  await assert.rejects(unanswered, { code: "disconnected" });
});

test("a silent socket is pinged, and one that stays silent is dropped and replaced", async () => {
  const client = makeClient({ pingInterval: 20, pongTimeout: 20 });
  const disconnects = [];
  client.on("disconnect", (info) => disconnects.push(info));
  const ws = await socketNumber(1);
  ws.accept();
  await until(() => ws.last("@ping"), "@ping");
  assert.deepEqual(ws.last("@ping"), { event: "@ping" });
  ws.receive({ event: "@pong" });
  assert.equal(client.connected, true, "a @pong keeps it");
  await until(() => disconnects.length === 1, "the dead connection to be dropped");
  assert.deepEqual(disconnects, [{ code: 1006, reason: "no answer to @ping" }]);
  assert.notEqual(ws.closedWith, null);
  await socketNumber(2);
});

test("close() gives one disconnect, fails queued sends and never reconnects", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const disconnects = [];
  client.on("disconnect", (info) => disconnects.push(info));
  const ws = await socketNumber(1);
  ws.accept();
  const unanswered = chat.send("echo", 1);
  client.close();
  client.close();
  await assert.rejects(unanswered, { code: "closed" });
  assert.equal(ws.closedWith, 1000);
  assert.deepEqual(disconnects, [{ code: 1000, reason: "closed by the client" }]);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(FakeSocket.all.length, 1);
  await assert.rejects(chat.send("echo", 2), { code: "closed" });
});

test("a refused subscription reports forbidden and is not retried on reconnect", async () => {
  const client = makeClient();
  const secret = client.subscribe("user:alice");
  const refusals = [];
  secret.on("@error", (error) => refusals.push(error.code));
  client.on("error", (error) => refusals.push(`client: ${error.code}`));
  const ws = await socketNumber(1);
  ws.accept();
  ws.receive({ channel: "user:alice", event: "@error", ref: ws.sent[0].ref, data: { code: "forbidden", message: "not allowed" } });
  assert.deepEqual(refusals, ["forbidden", "client: forbidden"]);
  ws.drop();
  const next = await socketNumber(2);
  next.accept();
  assert.equal(next.last("@subscribe"), undefined);
});

test("named handlers get only their event; direct messages reach the client", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const said = [];
  const all = [];
  const direct = [];
  chat.on("said", (m) => said.push(m.data));
  chat.on("message", (m) => all.push(m.event));
  client.on("message", (m) => direct.push(m));
  const reported = [];
  chat.on("said", () => {
    throw new Error("a failing handler does not stop the others");
  });
  const ws = await socketNumber(1);
  ws.accept();
  const consoleError = console.error;
  console.error = (error) => reported.push(error.message);
  try {
    ws.receive({ channel: "chat", event: "said", data: 1, seq: 1 });
  } finally {
    console.error = consoleError;
  }
  assert.deepEqual(reported, ["a failing handler does not stop the others"]);
  ws.receive({ channel: "chat", event: "other", seq: 2 });
  ws.receive({ event: "direct", data: { to: "c1" } });
  client.unsubscribe("chat");
  assert.equal(ws.last("@unsubscribe").channel, "chat");
  ws.receive({ channel: "chat", event: "said", data: 3, seq: 3 });
  assert.deepEqual(said, [1]);
  assert.deepEqual(all, ["said", "other"]);
  assert.deepEqual(direct, [{ channel: null, event: "direct", data: { to: "c1" }, seq: null }]);
});

test("a refused ticket is an error event, followed by another try", async () => {
  let calls = 0;
  const errors = [];
  const client = makeClient({
    fetch: async () => {
      calls += 1;
      return { ok: false, status: 401, json: async () => ({ error: "unauthorized" }) };
    },
  });
  client.on("error", (error) => errors.push(error.code));
  await until(() => calls >= 2, "a second ticket request");
  assert.equal(errors[0], "unauthorized");
  assert.equal(FakeSocket.all.length, 0);
});

test("429 rate_limited at the ticket endpoint backs off at least its Retry-After, then connects", async () => {
  const asked = [];
  const errors = [];
  const client = makeClient({
    maxReconnectDelay: 5000,
    fetch: async () => {
      asked.push(Date.now());
      if (asked.length <= 2) {
        return {
          ok: false, status: 429, headers: new Headers({ "Retry-After": "1" }),
          json: async () => ({ error: "rate_limited" }),
        };
      }
      return { ok: true, status: 200, headers: new Headers(), json: async () => ({ ticket: "t" }) };
    },
  });
  client.on("error", (error) => errors.push([error.code, error.retryAfter]));
  await until(() => FakeSocket.all.length === 1, "the socket after two waits", 5000);
  FakeSocket.all[0].accept();
  assert.equal(client.connected, true);
  assert.deepEqual(errors, [["rate_limited", 1000], ["rate_limited", 1000]]);
  // Without it the backoff from 1 ms would have asked again at once.
  assert.ok(asked[1] - asked[0] >= 990 && asked[2] - asked[1] >= 990, `${asked}`);
});

test("Retry-After waits no longer than maxReconnectDelay, and a 429 at the handshake is retried", async () => {
  const asked = [];
  const client = makeClient({
    maxReconnectDelay: 20,
    fetch: async () => {
      asked.push(Date.now());
      if (asked.length === 1) {
        return {
          ok: false, status: 429, headers: new Headers({ "Retry-After": "3600" }),
          json: async () => ({ error: "rate_limited" }),
        };
      }
      return { ok: true, status: 200, headers: new Headers(), json: async () => ({ ticket: `t${asked.length}` }) };
    },
  });
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  // The browser shows a refused handshake (429 identity_limit) only as a close before open.
  (await socketNumber(1)).drop(1006);
  (await socketNumber(2)).accept();
  assert.equal(client.connected, true);
  assert.deepEqual(errors, ["rate_limited", "connect_failed"]);
  assert.ok(asked[1] - asked[0] < 1000, `${asked}`);
  assert.equal(FakeSocket.all[1].url, "ws://example.test/ops?ticket=t3");
});

test("the ticket URL is derived from the socket URL, in http(s)", async () => {
  const urls = [];
  makeClient({
    url: "wss://example.test/live",
    fetch: async (url) => {
      urls.push(url);
      return { ok: true, status: 200, json: async () => ({ ticket: "x" }) };
    },
  });
  await socketNumber(1);
  assert.deepEqual(urls, ["https://example.test/live/ticket"]);
  assert.equal(FakeSocket.all[0].url, "wss://example.test/live?ticket=x");
});

test("a connect that hangs, at the ticket or before @connected, is given up and retried", async () => {
  let calls = 0;
  const errors = [];
  const hanging = makeClient({
    connectTimeout: 10,
    fetch: (url, init) => {
      calls += 1;
      return new Promise((resolve, reject) => {
        init.signal.addEventListener("abort", () => reject(new Error("aborted")));
      });
    },
  });
  hanging.on("error", (error) => errors.push(error.code));
  await until(() => calls >= 2, "a second ticket request");
  assert.equal(errors[0], "ticket_failed");
  hanging.close();

  const silent = makeClient({ connectTimeout: 10 });
  const failures = [];
  silent.on("error", (error) => failures.push(error.message));
  const first = await socketNumber(1);
  first.onopen?.();  // opened, but no @connected ever comes
  await socketNumber(2);
  assert.notEqual(first.closedWith, null);
  assert.match(failures[0], /close code 1006: no @connected within 10 ms/);
});

test("a rate-limited subscribe is tried again on the next connect", async () => {
  const client = makeClient();
  client.on("error", () => {});
  const chat = client.subscribe("chat");
  const ws = await socketNumber(1);
  ws.accept();
  ws.receive({ channel: "chat", event: "@error", ref: ws.sent[0].ref, data: { code: "rate_limited", message: "slow down" } });
  assert.equal(chat.subscribed, false);
  ws.drop();
  const next = await socketNumber(2);
  next.accept();
  assert.deepEqual(next.last("@subscribe"), { channel: "chat", event: "@subscribe", ref: next.last("@subscribe")?.ref });
});

test("a refusal for a channel left meanwhile does not reach its old object", async () => {
  const client = makeClient();
  client.on("error", () => {});
  const old = client.subscribe("user:alice");
  const refusals = [];
  old.on("@error", (error) => refusals.push(error.code));
  const ws = await socketNumber(1);
  ws.accept();
  client.unsubscribe("user:alice");
  ws.receive({ channel: "user:alice", event: "@error", ref: ws.sent[0].ref, data: { code: "forbidden", message: "no" } });
  assert.deepEqual(refusals, []);
});

test("closing from an error handler leaves no retry timer behind", async () => {
  const timers = () => process.getActiveResourcesInfo().filter((kind) => kind === "Timeout").length;
  const before = timers();
  let closed = false;
  const client = makeClient({
    reconnectDelay: 60000,
    maxReconnectDelay: 60000,
    fetch: async () => ({ ok: false, status: 401, json: async () => ({ error: "unauthorized" }) }),
  });
  client.on("error", () => {
    client.close();
    closed = true;
  });
  await until(() => closed, "the error handler");
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(timers(), before, "no timer may keep the page (or node) busy after close()");
});

test("connections dropped right after @connected keep the backoff growing", async () => {
  const random = Math.random;
  Math.random = () => 1;  // no jitter: each delay is its ceiling
  try {
    makeClient({ reconnectDelay: 100, maxReconnectDelay: 10000 });
    const waited = [];
    for (let n = 1; n <= 3; n++) {
      const ws = await socketNumber(n);
      ws.accept(`c${n}`);
      const dropped = Date.now();
      ws.drop(1011, "internal error");
      await socketNumber(n + 1);
      waited.push(Date.now() - dropped);
    }
    // 100, 200, 400 ms (give or take the timers), not 100 ms each time.
    assert.ok(waited[1] >= 190 && waited[2] >= 390, `waited ${waited}`);
  } finally {
    Math.random = random;
  }
});

test("the client's own channel events start with @; application events called error or subscribed are application events", async () => {
  const client = makeClient();
  client.on("error", () => {});
  const chat = client.subscribe("chat");
  const seen = [];
  for (const name of ["message", "error", "subscribed", "@error", "@subscribed"]) {
    chat.on(name, (value) => seen.push([name, value.event ?? value.recovered]));
  }
  assert.throws(() => chat.on("@reply", () => {}), { code: "bad_event" });
  assert.throws(() => chat.on("@join", () => {}), { code: "bad_event" });
  const ws = await socketNumber(1);
  ws.accept();
  ws.receive({ channel: "chat", event: "@subscribed", ref: ws.sent[0].ref, data: { recovered: false, seq: 0, epoch: "e1" } });
  ws.receive({ channel: "chat", event: "error", data: { code: "out_of_stock" }, seq: 1 });
  ws.receive({ channel: "chat", event: "subscribed", data: null, seq: 2 });
  ws.receive({ channel: "chat", event: "@join", data: { id: "c2" } });
  assert.deepEqual(seen, [
    ["@subscribed", false],
    ["message", "error"], ["error", "error"],
    ["message", "subscribed"], ["subscribed", "subscribed"],
  ]);
});

test("subscribe(name, {since, epoch}) starts from a saved position, checked", async () => {
  const client = makeClient();
  assert.throws(() => client.subscribe("chat", { since: 4 }), { code: "bad_position" });
  assert.throws(() => client.subscribe("chat", { since: -1, epoch: "e1" }), { code: "bad_position" });
  const chat = client.subscribe("chat", { since: 4, epoch: "e1" });
  assert.deepEqual([chat.seq, chat.epoch], [4, "e1"]);
  const got = [];
  chat.on("message", (m) => got.push(m.seq));
  chat.on("@subscribed", (info) => got.push(info));
  const ws = await socketNumber(1);
  ws.accept();
  assert.deepEqual(ws.last("@subscribe").data, { since: 4, epoch: "e1" });
  ws.receive({ channel: "chat", event: "@subscribed", ref: ws.last("@subscribe").ref, data: { recovered: true, seq: 6, epoch: "e1" } });
  ws.receive({ channel: "chat", event: "said", data: 5, seq: 5 });
  ws.receive({ channel: "chat", event: "said", data: 6, seq: 6 });
  assert.deepEqual(got, [{ recovered: true, seq: 6, epoch: "e1" }, 5, 6]);
  assert.throws(() => client.subscribe("chat", { since: 1, epoch: "e1" }), { code: "already_subscribed" });
  assert.equal(client.subscribe("chat", { since: 6, epoch: "e1" }), chat);
});

test("an @subscribed without ref (history lost) fires @subscribed, and the resubscribe names the new epoch", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const subscribed = [];
  chat.on("@subscribed", (info) => subscribed.push(info));
  const first = await socketNumber(1);
  first.accept();
  first.receive({ channel: "chat", event: "@subscribed", ref: first.sent[0].ref, data: { recovered: false, seq: 3, epoch: "e1" } });
  first.receive({ channel: "chat", event: "@subscribed", data: { recovered: false, seq: 0, epoch: "e2" } });
  first.receive({ channel: "chat", event: "said", data: "new", seq: 1 });
  assert.deepEqual(subscribed, [{ recovered: false, seq: 3, epoch: "e1" }, { recovered: false, seq: 0, epoch: "e2" }]);
  assert.deepEqual([chat.seq, chat.epoch], [1, "e2"]);
  first.drop(1011);
  const second = await socketNumber(2);
  second.accept();
  assert.deepEqual(second.last("@subscribe").data, { since: 1, epoch: "e2" });
});

// -- presence and the server's control of connections (PROTOCOL.md 7 and 8)

const ALICE = { id: "c1", identity: "alice", info: { name: "Alice" } };
const BOB = { id: "x2", identity: "bob", info: null };
const CAROL = { id: "x3", identity: "carol", info: { name: "Carol" } };

function snapshot(ws, channel, members, { recovered = false } = {}) {
  const ref = ws.sent.findLast((frame) => frame.event === "@subscribe" && frame.channel === channel).ref;
  const users = new Set(members.map((m) => m.identity).filter((identity) => identity !== null)).size;
  ws.receive({ channel, event: "@subscribed", ref, data: { recovered, seq: 0, epoch: "e1",
    presence: { members, clients: members.length, users } } });
}

test("presence.members follows the snapshot, @join and @leave, with their events and a sync after each; a reconnect replaces them", async () => {
  const client = makeClient();
  const lobby = client.subscribe("room:lobby");
  const seen = [];
  for (const name of ["join", "leave", "sync"]) lobby.presence.on(name, (value) => seen.push([name, value]));
  const app = [];
  lobby.on("message", (m) => app.push(m));
  lobby.on("join", (m) => app.push(m));
  const ws = await socketNumber(1);
  ws.accept();
  snapshot(ws, "room:lobby", [ALICE, BOB]);
  ws.receive({ channel: "room:lobby", event: "@join", data: CAROL });
  ws.receive({ channel: "room:lobby", event: "@leave", data: BOB });
  assert.ok(lobby.presence.members instanceof Map);
  assert.deepEqual([...lobby.presence.members], [["c1", ALICE], ["x3", CAROL]]);
  assert.deepEqual(seen, [
    ["sync", [ALICE, BOB]], ["join", CAROL], ["sync", [ALICE, BOB, CAROL]], ["leave", BOB], ["sync", [ALICE, CAROL]],
  ]);
  assert.deepEqual(app, [], "presence events never reach the channel's handlers");

  seen.length = 0;
  ws.drop(1011);
  assert.equal(lobby.presence.members.size, 0, "empty while not subscribed");
  const second = await socketNumber(2);
  second.accept("c2");
  snapshot(second, "room:lobby", [CAROL, { ...ALICE, id: "c2" }], { recovered: true });
  assert.deepEqual(seen, [["sync", []], ["sync", [CAROL, { ...ALICE, id: "c2" }]]], "replaced, never merged");
  assert.deepEqual([...lobby.presence.members.keys()], ["x3", "c2"]);
  assert.throws(() => lobby.presence.on("message", () => {}), { code: "bad_event" });
  assert.throws(() => lobby.on("@join", () => {}), { code: "bad_event" });
});

test("presence.fetch() resolves with the @presence answer and rejects with the server's code, or timeout", async () => {
  const client = makeClient();
  const lobby = client.subscribe("room:lobby");
  const chat = client.subscribe("chat");
  const queued = lobby.presence.fetch();
  const ws = await socketNumber(1);
  ws.accept();
  const ask = ws.last("@presence");
  assert.deepEqual(ws.sent.map((f) => f.event), ["@subscribe", "@subscribe", "@presence"], "after the subscribes");
  assert.deepEqual(ask, { channel: "room:lobby", event: "@presence", ref: ask.ref });
  const answer = { members: [ALICE, CAROL], clients: 2, users: 2 };
  ws.receive({ channel: "room:lobby", event: "@presence", ref: ask.ref, data: answer });
  assert.deepEqual(await queued, answer);
  const disabled = chat.presence.fetch();
  ws.receive({ channel: "chat", event: "@error", ref: ws.last("@presence").ref,
    data: { code: "presence_disabled", message: "no presence on chat" } });
  await assert.rejects(disabled, { code: "presence_disabled", channel: "chat" });
  await assert.rejects(lobby.presence.fetch({ timeout: 5 }), { code: "timeout" });
});

test("a server's @unsubscribed fires @unsubscribed with the reason; the channel is not subscribed again on reconnect", async () => {
  const client = makeClient();
  const secret = client.subscribe("room:secret");
  client.subscribe("chat");
  const seen = [];
  secret.on("@unsubscribed", (value) => seen.push(value));
  secret.on("message", (m) => seen.push(m.data));
  secret.presence.on("sync", (members) => seen.push(members));
  const ws = await socketNumber(1);
  ws.accept();
  snapshot(ws, "room:secret", [ALICE]);
  snapshot(ws, "chat", []);
  ws.receive({ channel: "room:secret", event: "@unsubscribed", data: { reason: "removed from the room" } });
  ws.receive({ channel: "room:secret", event: "ev", data: "after", seq: 1 });
  assert.deepEqual(seen, [[ALICE], { reason: "removed from the room" }, []]);
  assert.equal(secret.subscribed, false);
  ws.drop(1001);
  const second = await socketNumber(2);
  second.accept("c2");
  assert.deepEqual(second.sent.map((f) => f.channel), ["chat"]);
  const back = client.subscribe("room:secret");
  assert.notEqual(back, secret);
  assert.equal(second.last("@subscribe").channel, "room:secret");
});

test("a close from 4500 to 4999 ends the client: one disconnect with its code, sends fail with closed, no reconnect", async () => {
  const client = makeClient();
  const chat = client.subscribe("chat");
  const disconnects = [];
  client.on("disconnect", (info) => disconnects.push(info));
  const ws = await socketNumber(1);
  ws.accept();
  const unanswered = chat.send("echo", 1);
  ws.drop(4500, "signed out");
  await assert.rejects(unanswered, { code: "closed" });
  assert.deepEqual(disconnects, [{ code: 4500, reason: "signed out" }]);
  assert.equal(client.closed, true);
  await assert.rejects(chat.send("echo", 2), { code: "closed" });
  assert.throws(() => client.subscribe("news"), { code: "closed" });
  // Longer than any backoff of makeClient's (at most 4 ms): no second socket.
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(FakeSocket.all.length, 1);
  client.close();
  assert.deepEqual(disconnects, [{ code: 4500, reason: "signed out" }]);
});

test("after a close with 4001 the client reconnects at once, whatever its backoff", async () => {
  const client = makeClient({ reconnectDelay: 60000, maxReconnectDelay: 60000 });
  client.subscribe("chat");
  const ws = await socketNumber(1);
  ws.accept();
  ws.receive({ channel: "chat", event: "@subscribed", ref: ws.sent[0].ref, data: { recovered: false, seq: 7, epoch: "e1" } });
  ws.drop(4001, "permissions changed");
  assert.equal(client.closed, false);
  const second = await socketNumber(2);
  second.accept("c2");
  assert.deepEqual(second.last("@subscribe").data, { since: 7, epoch: "e1" });
});
