// node tests/js/realtime/client.mjs 127.0.0.1:8080 <admin access token>
//
// An independent client for the reference server's realtime routes (API.md,
// "Realtime"): the npm `ws` and `eventsource` packages against a running server.
// The address and the admin token come from argv or from UPCOACH_ADDR and
// UPCOACH_ADMIN_TOKEN; the server must run with --dev (a non-admin token comes from
// POST /dev/token). Exits 0 when every check passes, 1 with the failed check otherwise.
// examples/server/tests/js_client.rs runs it against an in-process server.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";

import { EventSource } from "eventsource";
import WebSocket from "ws";

/** How long one awaited answer may take. */
const WAIT_MS = 10_000;
/** How long the whole run may take. */
const RUN_MS = 60_000;
/** How long to watch for a frame or event that must not come. */
const QUIET_MS = 300;

const [major] = process.versions.node.split(".").map(Number);
if (major < 20) {
  console.error(`FAIL: Node ${process.versions.node} is too old: eventsource 4 needs Node 20 or later`);
  process.exit(1);
}

const addrArg = process.argv[2] ?? process.env.UPCOACH_ADDR;
const adminToken = process.argv[3] ?? process.env.UPCOACH_ADMIN_TOKEN;
if (!addrArg || !adminToken) {
  console.error(
    "usage: node client.mjs <host:port | http://host:port> <admin access token>\n" +
      "   or: UPCOACH_ADDR=... UPCOACH_ADMIN_TOKEN=... node client.mjs",
  );
  process.exit(2);
}
const base = new URL(/^https?:\/\//.test(addrArg) ? addrArg : `http://${addrArg}`);
const httpBase = base.origin;
const wsBase = httpBase.replace(/^http/, "ws");

let current = "start";
let passed = 0;

/** Runs one named check; a failure names it. */
async function check(name, body) {
  current = name;
  await body();
  passed += 1;
  console.log(`ok   ${name}`);
}

/** `promise`, or a failure saying what did not come in time. */
function within(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------
// HTTP

async function api(method, path, { token, body, headers = {} } = {}) {
  const init = { method, headers: { ...headers } };
  if (token) init.headers.authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await within(fetch(`${httpBase}${path}`, init), `${method} ${path}`);
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      throw new Error(`${method} ${path}: answer is not JSON (status ${response.status}): ${text}`);
    }
  }
  return { status: response.status, headers: response.headers, json };
}

async function devToken(roles) {
  const answer = await api("POST", "/dev/token", { body: { roles } });
  assert.equal(
    answer.status,
    200,
    `POST /dev/token answered ${answer.status} ${JSON.stringify(answer.json)}: is the server running with --dev?`,
  );
  assert.equal(typeof answer.json?.access_token, "string", "POST /dev/token gave no access_token");
  return answer.json.access_token;
}

/** POST .../broadcast/{room}: checks the 202 `{"room","seq"}` and returns seq. */
async function publish(room, event, data) {
  const path = `/api/dashboard/realtime/broadcast/${room}`;
  const answer = await api("POST", path, { token: adminToken, body: { event, data } });
  assert.equal(answer.status, 202, `POST ${path} answered ${answer.status} ${JSON.stringify(answer.json)}`);
  assert.deepEqual(Object.keys(answer.json).sort(), ["room", "seq"], `POST ${path} answer keys`);
  assert.equal(answer.json.room, room, `POST ${path} answer room`);
  assert.ok(Number.isSafeInteger(answer.json.seq) && answer.json.seq > 0, `POST ${path} seq: ${answer.json.seq}`);
  return answer.json.seq;
}

// ---------------------------------------------------------------------------------
// WebSocket

/** A `ws` connection whose text frames are read in order as JSON. */
class Socket {
  constructor(url) {
    this.frames = [];
    this.waiting = null;
    this.ws = new WebSocket(url);
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
      this.ws.once("unexpected-response", (_req, res) =>
        reject(new Error(`the WebSocket handshake was answered ${res.statusCode}, not 101`)),
      );
    });
    this.closed = new Promise((resolve) => {
      this.ws.once("close", (code, reason) => resolve({ code, reason: reason.toString() }));
    });
    this.ws.on("error", (error) => {
      this.error = error;
    });
    this.ws.on("message", (data, isBinary) => {
      const frame = isBinary ? { binary: data } : JSON.parse(data.toString());
      this.frames.push(frame);
      this.waiting?.();
    });
  }

  static async open(query) {
    const socket = new Socket(`${wsBase}/api/dashboard/realtime/ws${query}`);
    await within(socket.opened, "the WebSocket handshake");
    return socket;
  }

  send(message) {
    this.ws.send(JSON.stringify(message));
  }

  /** The next frame, or a failure naming `what`. */
  async next(what, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    while (this.frames.length === 0) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
      const arrived = new Promise((resolve) => {
        this.waiting = resolve;
      });
      const gone = this.closed.then(({ code, reason }) => {
        throw new Error(`the WebSocket closed (${code} ${reason}) while waiting for ${what}`);
      });
      await within(Promise.race([arrived, gone]), what, left);
      this.waiting = null;
    }
    return this.frames.shift();
  }

  close() {
    this.ws.close(1000);
  }
}

async function websocketChecks() {
  const room = "public:js";
  let socket;
  let head;
  let epoch;

  await check("ws: subscribe answers subscribed with the room's seq", async () => {
    socket = await Socket.open(`?access_token=${encodeURIComponent(adminToken)}`);
    socket.send({ type: "subscribe", room });
    const subscribed = await socket.next("subscribed");
    assert.deepEqual(Object.keys(subscribed).sort(), ["epoch", "room", "seq", "type"], `subscribed keys: ${JSON.stringify(subscribed)}`);
    assert.equal(subscribed.type, "subscribed");
    assert.equal(subscribed.room, room);
    assert.ok(Number.isSafeInteger(subscribed.seq) && subscribed.seq >= 0, `subscribed seq: ${subscribed.seq}`);
    assert.ok(Number.isSafeInteger(subscribed.epoch) && subscribed.epoch >= 0, `subscribed epoch: ${subscribed.epoch}`);
    head = subscribed.seq;
  });

  await check("ws: a broadcast arrives as an event with its seq and data", async () => {
    const data = { n: 1, text: "héllo ✓ \"quoted\"\nline", nested: { list: [1, 2.5, null, true] } };
    const before = Date.now();
    const seq = await publish(room, "posted", data);
    assert.equal(seq, head + 1, "the broadcast's seq follows the subscribed seq");
    const event = await socket.next("the broadcast event");
    assert.deepEqual(
      Object.keys(event).sort(),
      ["data", "epoch", "event", "room", "seq", "ts", "type"],
      `event keys: ${JSON.stringify(event)}`,
    );
    assert.ok(Number.isSafeInteger(event.epoch) && event.epoch > 0, `event epoch: ${event.epoch}`);
    epoch = event.epoch;
    assert.deepEqual(
      { type: event.type, room: event.room, seq: event.seq, event: event.event, data: event.data },
      { type: "event", room, seq, event: "posted", data },
    );
    assert.ok(
      Number.isSafeInteger(event.ts) && Math.abs(event.ts - before) < 60_000,
      `ts is milliseconds since the epoch near now: ${event.ts}`,
    );
    head = seq;
  });

  await check("ws: several broadcasts arrive once each, in order", async () => {
    const seqs = [];
    for (let i = 0; i < 5; i += 1) seqs.push(await publish(room, "posted", { i }));
    assert.deepEqual(seqs, [1, 2, 3, 4, 5].map((i) => head + i), "consecutive seqs");
    for (const [i, seq] of seqs.entries()) {
      const event = await socket.next(`event seq ${seq}`);
      assert.deepEqual([event.type, event.seq, event.data], ["event", seq, { i }]);
    }
    head = seqs.at(-1);
  });

  await check("ws: ping answers pong", async () => {
    socket.send({ type: "ping" });
    assert.deepEqual(await socket.next("pong"), { type: "pong" });
  });

  await check("ws: token as the first message, subscribe with since replays the gap", async () => {
    const late = await Socket.open("");
    late.send({ type: "auth", token: adminToken });
    late.send({ type: "subscribe", room, since: head - 2, epoch });
    assert.deepEqual(await late.next("subscribed"), { type: "subscribed", room, seq: head, epoch });
    for (const seq of [head - 1, head]) {
      const event = await late.next(`replayed seq ${seq}`);
      assert.deepEqual([event.type, event.room, event.seq], ["event", room, seq]);
    }
    late.send({ type: "ping" });
    assert.deepEqual(await late.next("pong after the replay"), { type: "pong" }, "no extra replayed event");
    late.close();
  });

  await check("ws: after unsubscribe no event of the room arrives", async () => {
    socket.send({ type: "unsubscribe", room });
    // The server answers a successful unsubscribe with nothing; a ping orders it.
    socket.send({ type: "ping" });
    assert.deepEqual(await socket.next("pong after unsubscribe"), { type: "pong" });
    head = await publish(room, "posted", { after: "unsubscribe" });
    await sleep(QUIET_MS);
    socket.send({ type: "ping" });
    assert.deepEqual(await socket.next("pong, not an event"), { type: "pong" });
    socket.close();
  });

  await check("ws: a bad token closes with 4001", async () => {
    const bad = await Socket.open("?access_token=not-a-token");
    const { code, reason } = await within(bad.closed, "the close frame");
    assert.equal(code, 4001, `close code (reason "${reason}")`);
    assert.ok(reason.length > 0, "the close frame names a reason");
  });

  await check("ws: a non-admin subscribing to metrics gets error forbidden", async () => {
    const userToken = await devToken(["user"]);
    const user = await Socket.open(`?access_token=${encodeURIComponent(userToken)}`);
    user.send({ type: "subscribe", room: "metrics" });
    const error = await user.next("the forbidden error");
    assert.equal(error.type, "error", JSON.stringify(error));
    assert.equal(error.code, "forbidden", JSON.stringify(error));
    assert.equal(error.room, "metrics", JSON.stringify(error));
    assert.equal(typeof error.message, "string", JSON.stringify(error));
    // The connection stays usable, and a public room is open to any signed-in user.
    user.send({ type: "subscribe", room });
    assert.deepEqual(await user.next("subscribed to a public room"), { type: "subscribed", room, seq: head, epoch });
    user.close();
  });
}

// ---------------------------------------------------------------------------------
// Server-Sent Events

function sseUrl(room, extra = "") {
  return `${httpBase}/api/dashboard/realtime/sse?rooms=${room}&access_token=${encodeURIComponent(adminToken)}${extra}`;
}

/**
 * An EventSource whose `posted` events, `reset` events, unnamed messages and errors
 * are recorded, and whose requests and responses go through `fetch` (so a test can
 * see the headers it sends and cut a stream as a network would).
 */
class Stream {
  constructor(url, init = {}) {
    this.events = [];
    this.unexpected = [];
    this.errors = [];
    this.waiters = [];
    this.source = new EventSource(url, init);
    this.opened = new Promise((resolve, reject) => {
      this.source.addEventListener("open", resolve, { once: true });
      this.source.addEventListener("error", (e) => {
        if (this.source.readyState === EventSource.CLOSED) {
          reject(new Error(`the EventSource failed: ${e.message ?? "error"} (code ${e.code})`));
        }
      });
    });
    this.source.addEventListener("error", (e) => this.errors.push(e));
    this.source.addEventListener("posted", (e) => {
      this.events.push(e);
      for (const wake of this.waiters.splice(0)) wake();
    });
    this.source.addEventListener("reset", (e) => this.unexpected.push(`reset: ${e.data}`));
    this.source.onmessage = (e) => this.unexpected.push(`unnamed message: ${e.data}`);
  }

  async open() {
    await within(this.opened, "the SSE stream to open");
  }

  /** Waits until `count` `posted` events have arrived in all. */
  async until(count, what) {
    const deadline = Date.now() + WAIT_MS;
    while (this.events.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what} (have ${this.seqs()})`);
      await within(new Promise((resolve) => this.waiters.push(resolve)), what, left).catch(() => {});
    }
  }

  seqs() {
    return this.events.map((e) => JSON.parse(e.data).seq);
  }

  close() {
    this.source.close();
  }
}

/** Checks one SSE event against API.md: data shape, id cursor, name. */
function checkSseEvent(event, room, seq, data) {
  const body = JSON.parse(event.data);
  assert.deepEqual(Object.keys(body).sort(), ["data", "epoch", "event", "room", "seq", "ts"], `data keys: ${event.data}`);
  assert.deepEqual(
    { room: body.room, seq: body.seq, event: body.event, name: event.type },
    { room, seq, event: "posted", name: "posted" },
  );
  if (data !== undefined) assert.deepEqual(body.data, data);
  assert.ok(Number.isSafeInteger(body.ts), `ts: ${body.ts}`);
  assert.ok(Number.isSafeInteger(body.epoch) && body.epoch > 0, `epoch: ${body.epoch}`);
  assert.equal(event.lastEventId, `${room}=${seq}@${body.epoch}`, "lastEventId is the cursor");
}

/** The server's first bytes on a stream, read with plain fetch. */
async function firstRecord(url, headers) {
  const controller = new AbortController();
  const response = await within(fetch(url, { headers, signal: controller.signal }), "the SSE response");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (!text.includes("\n\n")) {
    const { value, done } = await within(reader.read(), "the first SSE record");
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  controller.abort();
  return { response, text };
}

/**
 * A fetch that records each request's Last-Event-ID header and lets the test end the
 * current response body, as a dropped connection would. `cutAfterFirstRecord` ends the
 * next response right after its first record (`retry:` and the id-only record).
 */
function cuttableFetch() {
  const tap = {
    requests: [],
    cutAfterFirstRecord: false,
    cut: () => {},
  };
  tap.fetch = async (url, init) => {
    const headers = new Headers(init?.headers);
    tap.requests.push({ lastEventId: headers.get("last-event-id") });
    const response = await fetch(url, init);
    if (!response.body) return response;
    const upstream = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    let cutFirst = tap.cutAfterFirstRecord;
    tap.cutAfterFirstRecord = false;
    let ended = false;
    const body = new ReadableStream({
      start(controller) {
        tap.cut = () => {
          if (ended) return;
          ended = true;
          controller.close();
          upstream.cancel().catch(() => {});
        };
      },
      async pull(controller) {
        if (ended) return;
        const { value, done } = await upstream.read().catch(() => ({ done: true }));
        if (ended) return;
        if (done) {
          ended = true;
          controller.close();
          return;
        }
        controller.enqueue(value);
        text += decoder.decode(value, { stream: true });
        if (cutFirst && text.includes("\n\n")) {
          cutFirst = false;
          tap.firstRecord = text;
          tap.cut();
        }
      },
      cancel() {
        ended = true;
        return upstream.cancel();
      },
    });
    return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
  };
  return tap;
}

async function sseChecks() {
  const room = "public:js2";
  let cursor;

  await check("sse: refusals: no token 401, a non-admin asking for metrics 403, a bad cursor 400", async () => {
    const path = "/api/dashboard/realtime/sse";
    const missing = await api("GET", `${path}?rooms=${room}`);
    assert.equal(missing.status, 401, JSON.stringify(missing.json));
    const userToken = await devToken(["user"]);
    const forbidden = await api("GET", `${path}?rooms=metrics`, { token: userToken });
    assert.deepEqual([forbidden.status, forbidden.json?.error?.code], [403, "forbidden"], JSON.stringify(forbidden.json));
    const badCursor = await api("GET", `${path}?rooms=${room}&last_event_id=${encodeURIComponent(`${room}=x`)}`, {
      token: adminToken,
    });
    assert.deepEqual([badCursor.status, badCursor.json?.error?.code], [400, "invalid_cursor"], JSON.stringify(badCursor.json));
  });

  await check("sse: the stream starts with retry and an id-only record holding the head", async () => {
    const head = await publish(room, "posted", { warmup: true });
    const { response, text } = await firstRecord(`${httpBase}/api/dashboard/realtime/sse?rooms=${room}`, {
      authorization: `Bearer ${adminToken}`,
      accept: "text/event-stream",
    });
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/event-stream/);
    assert.equal(response.headers.get("cache-control"), "no-store");
    assert.match(text, new RegExp(`^retry: 3000\nid: ${room}=${head}@[1-9][0-9]*\n\n$`), "the first record");
    console.log(`     (content-encoding: ${response.headers.get("content-encoding") ?? "none"})`);
  });

  await check("sse: published events arrive with the API's data shape and the cursor as id", async () => {
    const stream = new Stream(sseUrl(room));
    await stream.open();
    const datas = [{ n: 1, text: "héllo ✓" }, { n: 2, list: [1, 2, 3] }];
    const seqs = [];
    for (const data of datas) seqs.push(await publish(room, "posted", data));
    await stream.until(2, "two published events");
    for (const [i, event] of stream.events.entries()) checkSseEvent(event, room, seqs[i], datas[i]);
    stream.close();
    assert.deepEqual(stream.unexpected, [], "no reset or unnamed event");
    cursor = stream.events.at(-1).lastEventId;
  });

  /** Closes, publishes three, reopens from `cursor` with `init`: each missed one once, then a live one. */
  async function resume(how, extra, init) {
    const from = Number(cursor.split("=").at(-1).split("@")[0]);
    const missed = [];
    for (let i = 0; i < 3; i += 1) missed.push(await publish(room, "posted", { missed: i }));
    assert.deepEqual(missed, [from + 1, from + 2, from + 3], "the missed seqs follow the cursor");
    const stream = new Stream(sseUrl(room, extra), init);
    await stream.open();
    await stream.until(3, `the three missed events (resume by ${how})`);
    const live = await publish(room, "posted", { live: true });
    await stream.until(4, "the live event");
    await sleep(QUIET_MS);
    stream.close();
    assert.deepEqual(stream.seqs(), [...missed, live], `each missed event once, in order, then the live one (by ${how})`);
    for (const [i, event] of stream.events.slice(0, 3).entries()) checkSseEvent(event, room, missed[i], { missed: i });
    checkSseEvent(stream.events[3], room, live, { live: true });
    assert.deepEqual(stream.unexpected, [], "no reset or unnamed event");
    cursor = stream.events.at(-1).lastEventId;
  }

  await check("sse: a new stream with last_event_id=<cursor> resumes exactly", async () => {
    await resume("last_event_id=", `&last_event_id=${encodeURIComponent(cursor)}`);
  });

  await check("sse: a new stream with a Last-Event-ID header resumes exactly", async () => {
    let first = true;
    const withHeader = (url, init) => {
      const headers = { ...init.headers };
      if (first) headers["Last-Event-ID"] = cursor;
      first = false;
      return fetch(url, { ...init, headers });
    };
    await resume("Last-Event-ID", "", { fetch: withHeader });
  });
}

/**
 * The package's own reconnect after a drop: first from a stream whose only record was
 * the id-only one (does the package keep that id?), then from a stream that carried an
 * event (it must send that event's cursor).
 */
async function reconnectChecks() {
  const room = "public:js3";
  const tap = cuttableFetch();
  let stream;
  let head;
  let cursor;
  let idOnlyHonoured;

  await check("sse: eventsource reconnects after a drop that followed only the id-only record", async () => {
    await publish(room, "posted", { before: 1 });
    head = await publish(room, "posted", { before: 2 });
    tap.cutAfterFirstRecord = true;
    stream = new Stream(sseUrl(room), { fetch: tap.fetch });
    await stream.open();
    await within(
      (async () => {
        while (stream.errors.length === 0) await sleep(10);
      })(),
      "the drop to be noticed",
    );
    assert.match(tap.firstRecord, new RegExp(`^retry: 3000\nid: ${room}=${head}@[1-9][0-9]*\n\n$`), "the first record");
    // The room's numbering (its epoch) stays; the cursor of a seq in it:
    const epoch = tap.firstRecord.match(/@([0-9]+)\n/)[1];
    cursor = (seq) => `${room}=${seq}@${epoch}`;
    const gap = [await publish(room, "posted", { gap: 1 }), await publish(room, "posted", { gap: 2 })];
    // The package waits the server's `retry: 3000` before it reconnects.
    await within(
      (async () => {
        while (tap.requests.length < 2) await sleep(20);
      })(),
      "the package's reconnect",
      WAIT_MS,
    );
    await within(
      (async () => {
        while (stream.source.readyState !== EventSource.OPEN) await sleep(10);
      })(),
      "the reconnected stream to open",
    );
    const live = await publish(room, "posted", { live: 1 });
    await within(
      (async () => {
        while (!stream.seqs().includes(live)) await sleep(10);
      })(),
      "the live event after the reconnect",
    );
    await sleep(QUIET_MS);
    const sent = tap.requests[1].lastEventId;
    const seqs = stream.seqs();
    if (sent === cursor(head)) {
      assert.deepEqual(seqs, [...gap, live], "the gap once each, then the live event");
      idOnlyHonoured = true;
    } else {
      assert.equal(sent, null, "without the id-only record the package sends no Last-Event-ID");
      assert.deepEqual(seqs, [live], "the server starts at its head: the live event only");
      idOnlyHonoured = false;
    }
    head = live;
  });

  await check("sse: eventsource resumes from the last event's cursor after a drop", async () => {
    const before = stream.events.length;
    tap.cut();
    await within(
      (async () => {
        while (stream.source.readyState === EventSource.OPEN) await sleep(10);
      })(),
      "the drop to be noticed",
    );
    const gap = [await publish(room, "posted", { gap: 3 }), await publish(room, "posted", { gap: 4 })];
    await within(
      (async () => {
        while (tap.requests.length < 3 || stream.source.readyState !== EventSource.OPEN) await sleep(20);
      })(),
      "the package's second reconnect",
    );
    assert.equal(tap.requests[2].lastEventId, cursor(head), "Last-Event-ID is the last event's cursor");
    const live = await publish(room, "posted", { live: 2 });
    await stream.until(before + 3, "the gap and the live event");
    await sleep(QUIET_MS);
    stream.close();
    assert.deepEqual(stream.seqs().slice(before), [...gap, live], "the gap once each, in order, then the live event");
    assert.deepEqual(stream.unexpected, [], "no reset or unnamed event");
  });

  const note = idOnlyHonoured
    ? "honours the id-only record: its reconnect sent that cursor and got the gap"
    : "ignores the id-only record: its reconnect sent no Last-Event-ID, so events published " +
      "between the drop and the reconnect of a stream that had carried no event were not delivered";
  console.log(`NOTE eventsource ${await packageVersion("eventsource")} ${note}`);
}

async function packageVersion(name) {
  const url = new URL(`./node_modules/${name}/package.json`, import.meta.url);
  return JSON.parse(await readFile(url, "utf8")).version;
}

// ---------------------------------------------------------------------------------

const overall = setTimeout(() => {
  console.error(`FAIL ${current}: the run took longer than ${RUN_MS} ms`);
  process.exit(1);
}, RUN_MS);

try {
  const health = await api("GET", "/health").catch((e) => {
    throw new Error(`the server at ${httpBase} does not answer: ${e.cause?.message ?? e.message}`);
  });
  assert.ok(health.status === 200 || health.status === 503, `GET /health answered ${health.status}`);
  console.log(`server ${httpBase}, Node ${process.versions.node}, ws ${await packageVersion("ws")}, eventsource ${await packageVersion("eventsource")}`);
  await websocketChecks();
  await sseChecks();
  await reconnectChecks();
  clearTimeout(overall);
  console.log(`all ${passed} checks passed`);
  process.exit(0);
} catch (error) {
  console.error(`FAIL ${current}: ${error.message}`);
  // A check's own failure says enough; anything else is a fault in this script.
  if (!(error instanceof assert.AssertionError) && error.constructor !== Error) console.error(error.stack);
  process.exit(1);
}
