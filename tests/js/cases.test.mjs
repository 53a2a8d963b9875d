// The shared client cases (tests/client_cases.json) against the browser
// client's state; tests/test_client_cases.py runs them against the Python
// one. The file's `about` says how a case reads. Its times are seconds: the
// browser's state counts milliseconds.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  ClientState, isChannelEvent, RobeSocketsError, retryAfterMs,
} from "../../flask_robe_sockets/static/client.js";

const CASES = JSON.parse(readFileSync(new URL("../client_cases.json", import.meta.url), "utf8"));

const MS = 1000;
const OPTIONS = {
  max_queue: ["maxQueue", 1],
  reconnect_delay: ["reconnectDelay", MS],
  max_reconnect_delay: ["maxReconnectDelay", MS],
  ping_interval: ["pingInterval", MS],
  pong_timeout: ["pongTimeout", MS],
  connect_timeout: ["connectTimeout", MS],
};

function options(session) {
  const out = {};
  for (const [name, value] of Object.entries(session.options ?? {})) {
    const [key, scale] = OPTIONS[name];
    out[key] = value * scale;
  }
  return out;
}

/** An emitted value as the cases write it. */
function valueOf(names, value) {
  if (names[0] === "connect") return null;
  if (value instanceof RobeSocketsError) return { code: value.code };
  if (names[0] === "disconnect") return { code: value.code };
  return value;
}

/** An action as the cases write it; `labels` maps requests to their names. */
function written(action, labels) {
  switch (action.type) {
    case "send":
      return { send: JSON.parse(action.text) };
    case "emit":
      return { emit: action.names, channel: action.channel?.name ?? null, value: valueOf(action.names, action.value) };
    case "settle":
      return action.error
        ? { settle: labels.get(action.request), error: action.error.code }
        : { settle: labels.get(action.request), result: action.result };
    case "retry":
      return { retry: Math.round(action.delay) / MS };
    default:
      assert.equal(action.type, "drop");
      return { drop: true };
  }
}

function run(state, step, requests) {
  switch (step.do) {
    case "subscribe":
      return state.subscribe(step.channel, step.position)[1];
    case "unsubscribe":
      return state.unsubscribe(step.channel);
    case "send": {
      if (!requests.has(step.request)) requests.set(step.request, { label: step.request });
      return state.send(step.channel, step.event, step.data, requests.get(step.request));
    }
    case "fetch": {
      if (!requests.has(step.request)) requests.set(step.request, { label: step.request });
      return state.fetchPresence(step.channel, requests.get(step.request));
    }
    case "withdraw":
      assert.equal(state.withdraw(requests.get(step.request)), step.withdrawn);
      return [];
    case "connecting":
      state.connecting();
      return [];
    case "connect_failed": {
      const error = new RobeSocketsError(step.code, "refused");
      if (step.retry_after !== undefined) error.retryAfter = step.retry_after * MS;
      return state.connectFailed(error);
    }
    case "receive":
      return state.receive(JSON.stringify(step.frame));
    case "lost":
      return state.lost(step.code ?? undefined);
    case "tick":
      return state.tick();
    default:
      assert.equal(step.do, "close");
      return state.close();
  }
}

for (const session of CASES.sessions) {
  test(`shared case: ${session.name}`, () => {
    let now = 0;
    const randoms = session.random ?? [1];
    let drawn = 0;
    const state = new ClientState(options(session), {
      clock: () => now,
      random: () => randoms[drawn++ % randoms.length],
    });
    const requests = new Map();
    session.steps.forEach((step, index) => {
      const where = `step ${index + 1}: ${step.do}`;
      if (step.at !== undefined) now = step.at * MS;
      if (step.raises !== undefined) {
        assert.throws(() => run(state, step, requests), { code: step.raises }, where);
        return;
      }
      const actions = run(state, step, requests);
      const labels = new Map([...requests].map(([label, request]) => [request, label]));
      if (step.actions !== undefined) {
        assert.deepEqual(actions.map((action) => written(action, labels)), step.actions, where);
      }
      if (step.wait !== undefined) {
        const wait = state.waitTime();
        assert.equal(wait === null ? null : wait / MS, step.wait, where);
      }
      for (const [name, fields] of Object.entries(step.channels ?? {})) {
        const channel = state.channels.get(name);
        const seen = Object.fromEntries(Object.keys(fields).map((key) => [key, channel[key]]));
        assert.deepEqual(seen, fields, `${where}: ${name}`);
      }
      for (const [name, members] of Object.entries(step.members ?? {})) {
        const held = state.channels.get(name).presence.members;
        assert.deepEqual([...held.values()], members, `${where}: ${name}'s members`);
        assert.deepEqual([...held.keys()], members.map((m) => m.id), `${where}: ${name}'s members by id`);
      }
    });
  });
}

test("shared case: channel names", () => {
  for (const name of CASES.channel_names.valid) assert.equal(new ClientState().subscribe(name)[0].name, name);
  for (const name of CASES.channel_names.invalid) {
    assert.throws(() => new ClientState().subscribe(name), { code: "bad_channel" }, JSON.stringify(name));
  }
});

test("shared case: channel handler names", () => {
  for (const name of CASES.handler_names.valid) assert.equal(isChannelEvent(name), true, JSON.stringify(name));
  for (const name of CASES.handler_names.invalid) assert.equal(isChannelEvent(name), false, JSON.stringify(name));
});

test("shared case: event names", () => {
  for (const name of CASES.event_names.valid) {
    const state = new ClientState();
    assert.deepEqual(state.send("chat", name, null, {}), []);
    assert.equal(state.queued, 1);
  }
  for (const name of CASES.event_names.invalid) {
    const state = new ClientState();
    assert.throws(() => state.send("chat", name, null, {}), { code: "bad_event" }, JSON.stringify(name));
    assert.equal(state.queued, 0);
  }
});

test("shared case: Retry-After", () => {
  for (const { header, seconds } of CASES.retry_after) {
    // The browser's state counts no floor as 0 ms.
    assert.equal(retryAfterMs(header), seconds === null ? 0 : seconds * MS, JSON.stringify(header));
  }
});
