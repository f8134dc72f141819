// TickgateConnection, tokens and tickets against the real server.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import WebSocket from 'ws';
import {
  ControlError,
  HandshakeRefused,
  StreamClosed,
  TickgateConnection,
  TickgateError,
  TokenError,
  clientCredentials,
  fetchTicket,
  fetchToken,
  httpBaseOf,
  wsUrlOf,
} from '../src/tickgate-client.js';
import { sharedServer, waitFor } from '../testing/server.mjs';

/** @type {Awaited<ReturnType<typeof import('../testing/server.mjs').startServer>>} */
let srv;
/** @type {string} */
let token;

sharedServer((s, t) => {
  srv = s;
  token = t;
});

/** A fetch that keeps the last response's headers. */
function recordingFetch() {
  /** @type {{headers: Headers|null, init: RequestInit|null}} */
  const seen = { headers: null, init: null };
  /** @type {typeof fetch} */
  const f = async (url, init) => {
    seen.init = init ?? null;
    const res = await fetch(url, init);
    seen.headers = res.headers;
    return res;
  };
  return { f, seen };
}

test('fetchToken: client credentials in the form body give a token', async () => {
  const { f, seen } = recordingFetch();
  const t = await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret, fetch: f });
  assert.equal(t.tokenType, 'Bearer');
  assert.equal(t.scope, 'md:read:*');
  assert.ok(t.expiresIn > 0);
  assert.equal(t.accessToken.split('.').length, 3);
  const headers = new Headers(seen.init?.headers);
  assert.equal(headers.get('authorization'), null, 'no Basic auth');
  assert.equal(headers.get('content-type'), 'application/x-www-form-urlencoded');
  assert.match(String(seen.init?.body), /^grant_type=client_credentials&client_id=demo&client_secret=/);

  const narrowed = await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret, scope: 'md:read:DEMO' });
  assert.equal(narrowed.scope, 'md:read:DEMO');
  const provider = clientCredentials(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret });
  assert.equal((await provider()).split('.').length, 3);
});

test('fetchToken: a wrong secret is TokenError 401 invalid_client, without a Basic challenge', async () => {
  const { f, seen } = recordingFetch();
  const err = await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: 'wrong', fetch: f }).catch((e) => e);
  assert.ok(err instanceof TokenError, String(err));
  assert.equal(err.status, 401);
  assert.equal(err.error, 'invalid_client');
  assert.ok(err.description.length > 0);
  assert.ok(err.message.includes(err.description), err.message);
  assert.equal(seen.headers?.get('www-authenticate'), null, 'no WWW-Authenticate: a browser shows no password dialog');

  const scoped = await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret, scope: 'tickgate:admin' }).catch((e) => e);
  assert.ok(scoped instanceof TokenError);
  assert.equal(scoped.status, 400);
  assert.equal(scoped.error, 'invalid_scope');
});

test('fetchToken: a network failure is TokenError with status 0, error network', async () => {
  const err = await fetchToken('http://127.0.0.1:1/oauth2/token', { clientId: 'demo', clientSecret: 'x' }).catch((e) => e);
  assert.ok(err instanceof TokenError, String(err));
  assert.equal(err.status, 0);
  assert.equal(err.error, 'network');
  await assert.rejects(fetchToken(srv.tokenUrl, /** @type {any} */ ({ clientSecret: 'x' })), TypeError);
});

test('fetchTicket: a ticket for a token; a bad token is TokenError 401', async () => {
  const ticket = await fetchTicket(srv.httpBase, token);
  assert.equal(ticket.length, 43);
  assert.equal(await fetchTicket(srv.streamUrl, token).then((t) => t.length), 43, 'a ws URL works as the base');
  const err = await fetchTicket(srv.httpBase, 'not.a.jwt').catch((e) => e);
  assert.ok(err instanceof TokenError);
  assert.equal(err.status, 401);
  assert.equal(err.error, 'invalid_token');
  assert.equal(httpBaseOf('wss://h.example:9/md/v1/stream'), 'https://h.example:9/md');
  assert.equal(wsUrlOf('https://h.example/v1/stream'), 'wss://h.example/v1/stream');
  assert.equal(wsUrlOf(new URL('http://h.example:8080/v1/stream')), 'ws://h.example:8080/v1/stream');
  assert.throws(() => wsUrlOf('/v1/stream'), TypeError, 'relative only where there is a page');
  assert.throws(() => wsUrlOf('ftp://h/'), TypeError);
});

test('open by subprotocol: welcome, subscribe, batches, ping, unsubscribe, refresh, close', async () => {
  const conn = await TickgateConnection.open(srv.streamUrl, { token, WebSocket });
  assert.equal(conn.welcome.type, 'welcome');
  assert.equal(conn.welcome.protocol, 1);
  assert.match(conn.session, /^s-/);
  assert.equal(conn.socket.protocol, 'tickgate.v1');
  const demo = conn.feeds.find((f) => f.name === 'DEMO');
  assert.ok(demo && typeof demo.id === 'number' && typeof demo.epoch === 'number');
  assert.ok(conn.exp > Date.now() / 1000);

  /** @type {any[]} */
  const batches = [];
  /** @type {any[]} */
  const messages = [];
  conn.addEventListener('batch', (ev) => batches.push(/** @type {CustomEvent} */ (ev).detail));
  conn.addEventListener('message', (ev) => messages.push(/** @type {CustomEvent} */ (ev).detail));
  const sub = await conn.subscribe('DEMO', ['AAPL', 'MSFT'], { snapshot: true });
  assert.equal(sub.type, 'subscribed');
  assert.equal(sub.epoch, demo.epoch);
  assert.deepEqual(
    sub.instruments.map((i) => i.symbol),
    ['AAPL', 'MSFT'],
  );
  assert.ok(messages.some((m) => m.type === 'subscribed'), 'replies are dispatched as messages too');
  await waitFor(() => batches.some((b) => b.records().some((r) => !r.snapshot)), 'live records');
  const ids = new Set(sub.instruments.map((i) => i.id));
  for (const b of batches) for (const r of b.records()) assert.ok(ids.has(r.instrumentId) && r.feedId === demo.id);

  const pong = await conn.ping();
  assert.ok(pong.ts > 0 && pong.rttMs >= 0);
  const unsub = await conn.unsubscribe('DEMO', ['MSFT']);
  assert.deepEqual(unsub.symbols, ['MSFT']);

  const fresh = (await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret })).accessToken;
  const refreshed = await waitFor(
    () =>
      conn.refresh(fresh).catch((e) => {
        if (e instanceof ControlError && e.error === 'rate_limited') return null;
        throw e;
      }),
    'a refresh past the rate limit',
  );
  assert.equal(refreshed.type, 'refreshed');
  assert.equal(conn.exp, refreshed.exp);
  const bad = await conn.refresh('not.a.jwt').catch((e) => e);
  assert.ok(bad instanceof ControlError);

  const closed = new Promise((r) => conn.addEventListener('close', (ev) => r(/** @type {CustomEvent} */ (ev).detail)));
  conn.close();
  const sc = await closed;
  assert.ok(sc instanceof StreamClosed);
  assert.equal(sc.code, 1000);
  assert.equal(conn.closed, true);
  await assert.rejects(conn.ping(), StreamClosed);
});

test('open by ticket', async () => {
  const viaToken = await TickgateConnection.open(srv.streamUrl, { token, auth: 'ticket', WebSocket });
  assert.match(viaToken.session, /^s-/);
  viaToken.close();
  const ticket = await fetchTicket(srv.httpBase, token);
  const viaTicket = await TickgateConnection.open(srv.streamUrl, { ticket, WebSocket });
  const sub = await viaTicket.subscribe('DEMO', ['AAPL']);
  assert.equal(sub.instruments[0].symbol, 'AAPL');
  viaTicket.close();
  const reused = await TickgateConnection.open(srv.streamUrl, { ticket, WebSocket }).catch((e) => e);
  assert.ok(reused instanceof HandshakeRefused, String(reused));
  assert.equal(reused.status, 401);
  assert.match(reused.description, /unknown or already used ticket/);
});

test('HandshakeRefused carries the server status and description', async () => {
  const err = await TickgateConnection.open(srv.streamUrl, { token: 'garbage', WebSocket }).catch((e) => e);
  assert.ok(err instanceof HandshakeRefused && err instanceof TickgateError, String(err));
  assert.equal(err.status, 401);
  assert.equal(err.error, 'invalid_token');
  assert.match(err.description, /malformed token/);
  assert.ok(err.message.includes(err.description));
  assert.ok(!err.message.includes('garbage'), 'the token is never in a message');

  const refused = await TickgateConnection.open('ws://127.0.0.1:1/v1/stream', { token, WebSocket }).catch((e) => e);
  assert.ok(refused instanceof HandshakeRefused);
  assert.equal(refused.status, 0);
  assert.equal(refused.error, 'handshake_failed');
  await assert.rejects(TickgateConnection.open(srv.streamUrl, { WebSocket }), TypeError);
  if (typeof globalThis.WebSocket !== 'function') {
    await assert.rejects(TickgateConnection.open(srv.streamUrl, { token }), TypeError, 'no WebSocket given, none global');
  }
  const ac = new AbortController();
  ac.abort();
  await assert.rejects(TickgateConnection.open(srv.streamUrl, { token, WebSocket, signal: ac.signal }), { name: 'AbortError' });
});

test('subscribe errors are ControlError with the server code', async () => {
  const conn = await TickgateConnection.open(srv.streamUrl, { token, WebSocket });
  try {
    const feed = await conn.subscribe('NOPE', ['AAPL']).catch((e) => e);
    assert.ok(feed instanceof ControlError, String(feed));
    assert.equal(feed.error, 'unknown_feed');
    assert.equal(typeof feed.id, 'number');
    assert.ok(feed.description.length > 0);
    const sym = await conn.subscribe('DEMO', ['NOPE']).catch((e) => e);
    assert.ok(sym instanceof ControlError);
    assert.equal(sym.error, 'unknown_symbol');
    const empty = await conn.subscribe('DEMO', []).catch((e) => e);
    assert.equal(empty.error, 'bad_request');
    assert.throws(() => conn.subscribe(/** @type {any} */ (1), ['AAPL']), TypeError);
  } finally {
    conn.close();
  }
});
