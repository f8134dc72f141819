// Throttled subscriptions (protocol v1.1, §6a) against the real server: maxRate on subscribe,
// throttle (live rate changes, lifting, the bandwidth cap), its errors, sequence tracking with
// CONFLATED trades, and a TickgateStream that keeps its rate across a reconnect.
//
// Rates are checked only from above, generously: per instrument, the batches holding live
// records of it number at most `rate * (elapsed + 0.5) + 1`; from below only "at least one".
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import WebSocket from 'ws';
import {
  ControlError,
  SeqTracker,
  SequenceError,
  TickgateConnection,
  TickgateStream,
  clientCredentials,
} from '../src/tickgate-client.js';
import { sharedServer, waitFor } from '../testing/server.mjs';

const SYMBOLS = ['AAPL', 'MSFT'];

/** @type {Awaited<ReturnType<typeof import('../testing/server.mjs').startServer>>} */
let srv;
/** @type {string} */
let token;

sharedServer((s, t) => {
  srv = s;
  token = t;
});

/**
 * A connection whose every message goes through a SeqTracker, and windows of what it saw.
 */
async function open() {
  const conn = await TickgateConnection.open(srv.streamUrl, { token, WebSocket });
  const tracker = new SeqTracker();
  tracker.onWelcome(conn.welcome);
  /** @type {any[]} */
  const violations = [];
  /** @type {Set<ReturnType<typeof newWindow>>} */
  const windows = new Set();
  conn.addEventListener('message', (ev) => {
    const msg = /** @type {CustomEvent} */ (ev).detail;
    if (msg.type === 'subscribed') tracker.onSubscribed(msg);
    else if (msg.type === 'gap') tracker.onGap(msg);
    for (const w of windows) w.messages.push(msg);
  });
  conn.addEventListener('batch', (ev) => {
    const batch = /** @type {CustomEvent} */ (ev).detail;
    /** @type {Set<number>} */
    const seen = new Set();
    for (const r of batch.records()) {
      const v = tracker.onRecord(r);
      if (v) violations.push(v);
      if (r.snapshot) continue;
      seen.add(r.instrumentId);
      for (const w of windows) {
        const list = w.records.get(r.instrumentId) ?? [];
        list.push(r);
        w.records.set(r.instrumentId, list);
        if (r.type === 'trade' && r.conflated) w.conflatedTrades++;
      }
    }
    for (const w of windows) for (const id of seen) w.updates.set(id, (w.updates.get(id) ?? 0) + 1);
  });
  return {
    conn,
    tracker,
    violations,
    /** Starts collecting now; `stop()` ends it. */
    window() {
      const w = newWindow(() => windows.delete(w));
      windows.add(w);
      return w;
    },
  };
}

/** @param {() => void} stop */
function newWindow(stop) {
  const start = performance.now();
  return {
    /** instrument id → batches with live records of it */
    updates: /** @type {Map<number, number>} */ (new Map()),
    /** instrument id → live records */
    records: /** @type {Map<number, any[]>} */ (new Map()),
    conflatedTrades: 0,
    messages: /** @type {any[]} */ ([]),
    stop,
    elapsedS: () => (performance.now() - start) / 1000,
  };
}

/**
 * @param {ReturnType<typeof newWindow>} w
 * @param {number} rate
 * @param {number[]} ids
 */
function assertRateAtMost(w, rate, ids) {
  const elapsed = w.elapsedS();
  const bound = rate * (elapsed + 0.5) + 1;
  for (const id of ids) {
    const n = w.updates.get(id) ?? 0;
    assert.ok(n >= 1 && n <= bound, `instrument ${id}: ${n} updates in ${elapsed.toFixed(2)} s at maxRate ${rate}`);
  }
}

/** @param {any[]} records */
function consecutive(records) {
  return records.every((r, i) => i === 0 || r.seq === records[i - 1].seq + 1);
}

describe('throttled subscriptions (v1.1)', { concurrency: true }, () => {
  it('maxRate caps the updates per instrument; CONFLATED trades are no violation', async () => {
    const c = await open();
    try {
      const w = c.window();
      const sub = await c.conn.subscribe('DEMO', SYMBOLS, { snapshot: true, maxRate: 5 });
      assert.equal(sub.max_rate, 5);
      const ids = sub.instruments.map((i) => i.id);
      await waitFor(() => w.elapsedS() >= 3 && w.conflatedTrades > 0, '3 s and a CONFLATED trade');
      w.stop();
      assertRateAtMost(w, 5, ids);
      assert.deepEqual(c.violations, []);
      assert.equal(c.tracker.violations, 0);
    } finally {
      c.conn.close();
    }
  });

  it('throttle changes the rate live, and maxRate 0 lifts it', async () => {
    const c = await open();
    try {
      let w = c.window();
      const sub = await c.conn.subscribe('DEMO', SYMBOLS);
      assert.equal(sub.max_rate, undefined);
      const ids = sub.instruments.map((i) => i.id);
      await waitFor(() => ids.every((id) => (w.records.get(id)?.length ?? 0) >= 5), 'unthrottled records');
      w.stop();
      for (const id of ids) assert.ok(consecutive(/** @type {any[]} */ (w.records.get(id))), 'every seq');

      const reply = await c.conn.throttle({ feed: 'DEMO', symbols: ['*'], maxRate: 1 });
      w = c.window(); // what the old interval held came before the reply
      assert.equal(reply.type, 'throttled');
      assert.equal(reply.feed, 'DEMO');
      assert.equal(reply.max_rate, 1);
      assert.deepEqual([...reply.symbols].sort(), [...SYMBOLS].sort(), '"*": every subscribed instrument');
      await waitFor(() => w.elapsedS() >= 3 && ids.every((id) => w.updates.get(id)), '3 s throttled');
      w.stop();
      assertRateAtMost(w, 1, ids);

      const lifted = await c.conn.throttle({ feed: 'DEMO', symbols: SYMBOLS, maxRate: 0 });
      w = c.window();
      assert.equal(lifted.max_rate, 0);
      assert.deepEqual(lifted.symbols, SYMBOLS);
      await waitFor(() => ids.every((id) => (w.records.get(id)?.length ?? 0) >= 10), 'records after lifting');
      w.stop();
      for (const id of ids) {
        const recs = /** @type {any[]} */ (w.records.get(id));
        assert.ok(consecutive(recs), `every seq again: ${recs.map((r) => r.seq)}`);
        assert.ok(!recs.some((r) => r.conflated));
      }
      assert.deepEqual(c.violations, []);
    } finally {
      c.conn.close();
    }
  });

  it('bad rates and throttle errors are ControlErrors; the connection stays usable', async () => {
    const c = await open();
    try {
      const bad = await c.conn.subscribe('DEMO', ['AAPL'], { maxRate: 2000 }).catch((e) => e);
      assert.ok(bad instanceof ControlError, String(bad));
      assert.equal(bad.error, 'bad_request');
      assert.match(bad.description, /max_rate/);
      await c.conn.subscribe('DEMO', ['AAPL']);
      const cases = [
        [{ feed: 'DEMO', symbols: ['AAPL'], maxRate: 0.001 }, 'bad_request'],
        [{ feed: 'DEMO', symbols: ['AAPL'], maxRate: 1000.5 }, 'bad_request'],
        [{ feed: 'DEMO', symbols: ['AAPL'], maxRate: -1 }, 'bad_request'],
        [{ feed: 'DEMO', symbols: ['MSFT'], maxRate: 5 }, 'bad_request'], // not subscribed
        [{ feed: 'DEMO', symbols: [], maxRate: 5 }, 'bad_request'],
        [{ feed: 'DEMO', maxRate: 5 }, 'bad_request'], // the three go together
        [{}, 'bad_request'], // neither part
        [{ maxBytesPerS: 100 }, 'bad_request'],
        [{ maxBytesPerS: 2 ** 40 + 1 }, 'bad_request'],
        [{ feed: 'DEMO', symbols: ['NOPE'], maxRate: 5 }, 'unknown_symbol'],
        [{ feed: 'NOPE', symbols: ['AAPL'], maxRate: 5 }, 'unknown_feed'],
      ];
      for (const [opts, code] of cases) {
        const err = await c.conn.throttle(/** @type {any} */ (opts)).catch((e) => e);
        assert.ok(err instanceof ControlError, `${JSON.stringify(opts)}: ${err}`);
        assert.equal(err.error, code, JSON.stringify(opts));
        assert.equal(typeof err.id, 'number');
      }
      // what cannot be encoded is refused before sending
      await assert.rejects(c.conn.throttle({ feed: 'DEMO', symbols: ['AAPL'], maxRate: /** @type {any} */ ('5') }), TypeError);
      await assert.rejects(c.conn.throttle({ feed: 'DEMO', symbols: ['AAPL'], maxRate: Number.NaN }), TypeError);
      await assert.rejects(c.conn.throttle({ maxBytesPerS: 1024.5 }), TypeError);
      await assert.rejects(c.conn.throttle(/** @type {any} */ (null)), TypeError);
      assert.throws(() => c.conn.subscribe('DEMO', ['AAPL'], { maxRate: Infinity }), TypeError);
      const pong = await c.conn.ping();
      assert.equal(typeof pong.ts, 'number');
      assert.deepEqual(c.violations, []);
    } finally {
      c.conn.close();
    }
  });

  it('maxBytesPerS: the reply is parsed, alone or with a rate', async () => {
    const c = await open();
    try {
      const r = await c.conn.throttle({ maxBytesPerS: 65536 });
      assert.equal(r.type, 'throttled');
      assert.equal(r.max_bytes_per_s, 65536);
      assert.equal(r.feed, undefined);
      assert.equal(r.max_rate, undefined);
      await c.conn.subscribe('DEMO', ['AAPL']);
      const both = await c.conn.throttle({ feed: 'DEMO', symbols: ['AAPL'], maxRate: 2.5, maxBytesPerS: 2 ** 40 });
      assert.deepEqual([both.feed, both.symbols, both.max_rate, both.max_bytes_per_s], ['DEMO', ['AAPL'], 2.5, 2 ** 40]);
      const off = await c.conn.throttle({ maxBytesPerS: 0 });
      assert.equal(off.max_bytes_per_s, 0);
      const w = c.window();
      await waitFor(() => (w.updates.get(1) ?? 0) >= 2, 'records under the cap');
      w.stop();
      assert.deepEqual(c.violations, []);
    } finally {
      c.conn.close();
    }
  });

  it('TickgateStream keeps its maxRate across a reconnect, and throttle() changes it', async () => {
    const provider = clientCredentials(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret });
    const stream = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: SYMBOLS, maxRate: 5, minBackoffMs: 100, maxBackoffMs: 500, WebSocket });
    /** @type {any[]} */
    const subscribed = [];
    /** @type {unknown[]} */
    const errors = [];
    stream.addEventListener('subscribed', (ev) => subscribed.push(/** @type {CustomEvent} */ (ev).detail.msg));
    stream.addEventListener('error', (ev) => errors.push(/** @type {CustomEvent} */ (ev).detail.error));
    assert.equal(stream.maxRate, 5);
    stream.start();
    try {
      await waitFor(() => subscribed.length === 1 && stream.stats.batches > 0, 'subscribed and data');
      assert.equal(subscribed[0].max_rate, 5);
      const reply = await stream.throttle(2);
      assert.deepEqual([reply.feed, [...reply.symbols].sort(), reply.max_rate], ['DEMO', [...SYMBOLS].sort(), 2]);
      assert.equal(stream.maxRate, 2);
      const refused = await stream.throttle(5000).catch((e) => e);
      assert.ok(refused instanceof ControlError && refused.error === 'bad_request', String(refused));
      assert.equal(stream.maxRate, 2, 'unchanged after a refusal');
      assert.ok(stream.running);

      // the socket drops (no close frame: 1006); the stream resumes in the same epoch
      const epoch = stream.epoch;
      /** @type {any} */ (stream.connection).socket.terminate();
      await waitFor(() => subscribed.length === 2, 'the subscribe after the reconnect');
      assert.equal(subscribed[1].max_rate, 2);
      assert.equal(subscribed[1].epoch, epoch);
      const batches = stream.stats.batches;
      await waitFor(() => stream.stats.batches > batches, 'data after the reconnect');
      assert.equal(stream.stats.reconnects, 1);
      assert.equal(stream.stats.violations, 0);
      assert.equal(errors.filter((e) => e instanceof SequenceError).length, 0);
    } finally {
      stream.stop();
    }
  });
});
