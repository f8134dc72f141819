// TickgateStream against the real server: data, refresh with short tokens, revocation, restart.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import WebSocket from 'ws';
import {
  ControlError,
  HandshakeRefused,
  SequenceError,
  StreamClosed,
  TickgateStream,
  TokenError,
  clientCredentials,
  fetchToken,
} from '../src/tickgate-client.js';
import { freePort, startServer, waitFor } from '../testing/server.mjs';

const EVENTS = [
  'connecting',
  'open',
  'subscribed',
  'batch',
  'gap',
  'reset',
  'token_expiring',
  'refreshed',
  'reconnecting',
  'reconnected',
  'error',
  'closed',
];

/**
 * Records every event of a stream.
 * @param {EventTarget} stream
 */
function record(stream) {
  /** @type {{type: string, detail: any}[]} */
  const events = [];
  for (const type of EVENTS) {
    stream.addEventListener(type, (ev) => events.push({ type, detail: /** @type {CustomEvent} */ (ev).detail }));
  }
  return {
    events,
    /** @param {string} type */
    of: (type) => events.filter((e) => e.type === type).map((e) => e.detail),
  };
}

/** A `ws` class that counts the sockets it opens. */
function countingWebSocket() {
  const counter = { opened: 0 };
  class Counting extends WebSocket {
    /** @param {ConstructorParameters<typeof WebSocket>} args */
    constructor(...args) {
      super(...args);
      counter.opened++;
    }
  }
  return { counter, Counting };
}

/**
 * A token provider that counts its calls and remembers its tokens.
 * @param {string} tokenUrl
 * @param {string} secret
 * @param {string} [clientId]
 */
function countingProvider(tokenUrl, secret, clientId = 'demo') {
  const inner = clientCredentials(tokenUrl, { clientId, clientSecret: secret });
  const calls = { n: 0, tokens: /** @type {string[]} */ ([]) };
  const provider = async () => {
    calls.n++;
    const t = await inner();
    calls.tokens.push(t);
    return t;
  };
  return { calls, provider };
}

/** @param {TickgateStream} stream */
function closedOnce(stream) {
  return new Promise((resolve) => stream.addEventListener('closed', (ev) => resolve(/** @type {CustomEvent} */ (ev).detail), { once: true }));
}

describe('TickgateStream', { concurrency: true }, () => {
  it('streams changing records of DEMO AAPL/MSFT; start() twice opens one socket; stop() ends it', async () => {
    const srv = await startServer();
    try {
      const { counter, Counting } = countingWebSocket();
      const { provider } = countingProvider(srv.tokenUrl, srv.secret);
      const stream = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: ['AAPL', 'MSFT'], WebSocket: Counting });
      const rec = record(stream);
      /** @type {Set<number>} */
      const prices = new Set();
      const seqs = new Set();
      stream.addEventListener('batch', (ev) => {
        const { batch } = /** @type {CustomEvent} */ (ev).detail;
        for (const r of batch.records()) {
          if (r.type === 'trade') prices.add(r.price);
          else prices.add(r.bidPx);
          seqs.add(`${r.instrumentId}:${r.seq}`);
        }
      });
      stream.start();
      stream.start();
      assert.equal(stream.running, true);
      await waitFor(() => prices.size >= 3 && seqs.size >= 10 && stream.instruments.get('AAPL')?.seq, 'changing records');
      stream.start();
      assert.equal(counter.opened, 1, 'one socket');
      assert.equal(rec.of('connecting').length, 1);
      assert.equal(rec.of('open').length, 1);
      assert.equal(rec.of('subscribed').length, 1);
      assert.ok(stream.connection, 'connection held');
      assert.match(String(stream.session), /^s-/);
      assert.ok(/** @type {number} */ (stream.exp) > Date.now() / 1000);
      assert.equal(typeof stream.feedId, 'number');
      assert.equal(typeof stream.epoch, 'number');
      assert.deepEqual([...stream.instruments.keys()], ['AAPL', 'MSFT']);
      const aapl = /** @type {{id: number, seq: number}} */ (stream.instruments.get('AAPL'));
      assert.equal(stream.instrumentsById.get(aapl.id), 'AAPL');
      assert.equal(stream.tracker.last(/** @type {number} */ (stream.feedId), aapl.id), aapl.seq);
      assert.ok(stream.stats.batches > 0 && stream.stats.records >= stream.stats.batches);
      assert.equal(typeof stream.stats.lastLatencyMs, 'number');
      assert.equal(stream.stats.violations, 0);
      assert.equal(rec.of('error').length, 0);
      const closed = closedOnce(stream);
      stream.stop();
      assert.equal(stream.running, false);
      assert.deepEqual(await closed, { code: 1000, reason: 'stopped', final: true });
      assert.equal(stream.connection, null);
      const batches = stream.stats.batches;
      stream.stop();
      assert.equal(rec.of('closed').length, 1);
      assert.equal(stream.stats.batches, batches);
    } finally {
      await srv.stop();
    }
  });

  it('connects with a ticket (auth: ticket), from an http URL', async () => {
    const srv = await startServer();
    try {
      const { provider } = countingProvider(srv.tokenUrl, srv.secret);
      const stream = new TickgateStream({ url: `${srv.httpBase}/v1/stream`, token: provider, feed: 'DEMO', symbols: ['MSFT'], auth: 'ticket', WebSocket });
      assert.equal(stream.url, srv.streamUrl);
      const rec = record(stream);
      stream.start();
      await waitFor(() => stream.stats.batches > 0, 'data');
      assert.equal(stream.connection?.socket.protocol, 'tickgate.v1');
      assert.match(String(stream.connection?.socket.url), /\?ticket=/);
      assert.equal(rec.of('error').length, 0);
      stream.stop();
      assert.throws(() => new TickgateStream({ url: 'ftp://x/', token: provider, feed: 'DEMO', symbols: ['A'] }), TypeError);
      assert.throws(() => new TickgateStream(/** @type {any} */ ({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: [] })), TypeError);
    } finally {
      await srv.stop();
    }
  });

  it('ends with error + closed on what retrying cannot fix', async () => {
    const srv = await startServer();
    try {
      const { provider } = countingProvider(srv.tokenUrl, srv.secret);
      // A feed that does not exist: ControlError at subscribe.
      const unknown = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'NOPE', symbols: ['AAPL'], WebSocket });
      const r1 = record(unknown);
      const c1 = closedOnce(unknown);
      unknown.start();
      const d1 = await c1;
      assert.equal(d1.final, true);
      const e1 = r1.of('error')[0]?.error;
      assert.ok(e1 instanceof ControlError && e1.error === 'unknown_feed', String(e1));
      assert.equal(unknown.running, false);

      // The provider's 401: a wrong secret.
      const wrong = new TickgateStream({
        url: srv.streamUrl,
        token: clientCredentials(srv.tokenUrl, { clientId: 'demo', clientSecret: 'wrong' }),
        feed: 'DEMO',
        symbols: ['AAPL'],
        WebSocket,
      });
      const r2 = record(wrong);
      const c2 = closedOnce(wrong);
      wrong.start();
      await c2;
      const e2 = r2.of('error')[0]?.error;
      assert.ok(e2 instanceof TokenError && e2.status === 401, String(e2));
      assert.equal(r2.of('connecting').length, 1, 'no retry');

      // A token the handshake refuses twice in a row.
      let calls = 0;
      const garbage = new TickgateStream({
        url: srv.streamUrl,
        token: async () => {
          calls++;
          return 'not.a.jwt';
        },
        feed: 'DEMO',
        symbols: ['AAPL'],
        WebSocket,
        minBackoffMs: 50,
        maxBackoffMs: 100,
      });
      const r3 = record(garbage);
      const c3 = closedOnce(garbage);
      garbage.start();
      await c3;
      const e3 = r3.of('error')[0]?.error;
      assert.ok(e3 instanceof HandshakeRefused && e3.status === 401, String(e3));
      assert.equal(calls, 2, 'the provider was asked again after the first 401');
      assert.equal(r3.of('reconnecting').length, 1);
    } finally {
      await srv.stop();
    }
  });

  it('refreshes 10-second tokens in place: two refreshed, no 4001', async () => {
    const srv = await startServer({ sections: { issuer: { token_ttl_s: 10 } } });
    try {
      const { calls, provider } = countingProvider(srv.tokenUrl, srv.secret);
      const stream = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: ['AAPL', 'MSFT'], WebSocket });
      const rec = record(stream);
      stream.start();
      await waitFor(() => stream.connection, 'connected');
      const conn = stream.connection;
      const exp0 = /** @type {number} */ (stream.exp);
      /** @type {number[]} */
      const closeCodes = [];
      conn?.addEventListener('close', (ev) => closeCodes.push(/** @type {CustomEvent} */ (ev).detail.code));
      await waitFor(() => stream.stats.refreshes >= 2, 'two refreshes');
      const batchesAtSecond = stream.stats.batches;
      await waitFor(() => stream.stats.batches > batchesAtSecond, 'data after the second refresh');
      assert.equal(stream.connection, conn, 'same connection throughout');
      assert.deepEqual(closeCodes, []);
      assert.equal(rec.of('reconnecting').length, 0);
      assert.ok(rec.of('token_expiring').length >= 2);
      const refreshed = rec.of('refreshed');
      assert.ok(refreshed.length >= 2);
      assert.ok(refreshed[0].exp > exp0 && refreshed[1].exp > refreshed[0].exp);
      assert.equal(stream.exp, refreshed[refreshed.length - 1].exp);
      assert.ok(calls.n >= 3, 'the provider gave each refresh a new token');
      assert.equal(stream.stats.violations, 0);
      assert.equal(rec.of('error').length, 0, rec.of('error').map((e) => String(e.error)).join('; '));
      stream.stop();
    } finally {
      await srv.stop();
    }
  });

  it('a revocation ends the stream: 4003, error StreamClosed.revoked, final closed', async () => {
    const srv = await startServer({
      sections: {
        issuer: {
          clients: [
            { id: 'demo', secret: 'demo-secret', scopes: ['md:read:*'] },
            { id: 'ops', secret: 'ops-secret', scopes: ['md:read:*', 'tickgate:admin'] },
          ],
        },
      },
    });
    try {
      const { provider } = countingProvider(srv.tokenUrl, 'demo-secret');
      const stream = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: ['AAPL'], WebSocket });
      const rec = record(stream);
      const closed = closedOnce(stream);
      stream.start();
      await waitFor(() => stream.stats.batches > 0, 'data');
      const ops = await fetchToken(srv.tokenUrl, { clientId: 'ops', clientSecret: 'ops-secret' });
      const res = await fetch(`${srv.adminBase}/admin/revoke`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${ops.accessToken}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ sub: 'demo' }),
      });
      assert.equal(res.status, 200);
      assert.equal((await res.json()).streams_closed, 1);
      const d = await closed;
      assert.equal(d.code, 4003);
      assert.equal(d.final, true);
      assert.equal(d.reason, 'token revoked');
      const err = rec.of('error').map((e) => e.error).find((e) => e instanceof StreamClosed);
      assert.ok(err && err.revoked && !err.retryable, String(err));
      assert.equal(stream.running, false);
      assert.equal(rec.of('reconnecting').length, 0);
    } finally {
      await srv.stop();
    }
  });

  it('survives a server restart on the same port: reconnected, new token, new epoch, no violation', async () => {
    const port = await freePort();
    const opts = { listen: `127.0.0.1:${port}`, sections: { server: { drain_ms: 2000 } }, secret: 'restart-secret' };
    let srv = await startServer(opts);
    const dir = srv.dir;
    try {
      const { calls, provider } = countingProvider(srv.tokenUrl, 'restart-secret');
      const stream = new TickgateStream({ url: srv.streamUrl, token: provider, feed: 'DEMO', symbols: ['AAPL', 'MSFT'], WebSocket });
      const rec = record(stream);
      stream.start();
      await waitFor(() => stream.stats.batches > 2, 'data before the restart');
      const epoch0 = stream.epoch;
      const calls0 = calls.n;
      await srv.stop({ keepDir: true });
      srv = await startServer({ ...opts, dir });
      await waitFor(() => rec.of('reconnected').length > 0, 'reconnected');
      const batches = stream.stats.batches;
      await waitFor(() => stream.stats.batches > batches + 2, 'data after the restart');
      assert.ok(stream.stats.reconnects >= 1);
      assert.ok(calls.n > calls0, 'a new token was fetched');
      assert.notEqual(calls.tokens[calls.tokens.length - 1], calls.tokens[calls0 - 1]);
      assert.notEqual(stream.epoch, epoch0, 'the feed has a new epoch');
      assert.equal(stream.stats.violations, 0);
      assert.equal(rec.events.filter((e) => e.type === 'error' && e.detail.error instanceof SequenceError).length, 0);
      assert.ok(rec.of('reconnecting').some((d) => d.error instanceof StreamClosed && d.error.shutdown));
      assert.equal(rec.of('closed').length, 0);
      assert.equal(rec.of('subscribed').length, 2);
      stream.stop();
    } finally {
      await srv.stop();
    }
  });
});
