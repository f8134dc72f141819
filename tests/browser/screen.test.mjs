// The trading screen at `/`, in Debian's chromium (headless) driven by playwright-core, against
// the real server binary started here. What a user sees is what is checked: cells, the status
// bar, the error banner; the number of sockets is counted by the browser itself.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import net from 'node:net';
import { chromium } from 'playwright-core';

const BIN = process.env.TICKGATE_BIN;
const ARTEFACTS = process.env.TICKGATE_ARTEFACTS || tmpdir();
const SECRET = 'browser-test-secret';
const PATIENCE = 60_000; // a generous bound for anything that should happen "soon"

const dirs = [];
const servers = new Set();
after(() => {
  for (const s of servers) s.kill('SIGKILL');
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir() {
  const d = mkdtempSync(join(tmpdir(), 'tickgate-browser-'));
  dirs.push(d);
  return d;
}

/** A free loopback port (for a server that must come back on the same address). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

/** A running `tickgate serve`: its URLs from the start-up line, stopped by its PID. */
class Server {
  static async start(dir, toml) {
    const cfg = join(dir, 'tickgate.toml');
    writeFileSync(cfg, toml);
    // In `dir`, which has no `feeds` folder: the server streams its compiled-in DEMO feed.
    const child = spawn(BIN, ['serve', '--config', cfg], {
      cwd: dir,
      env: { ...process.env, TICKGATE_DEMO_SECRET: SECRET, RUST_LOG: 'warn' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    servers.add(child);
    const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    const lines = createInterface({ input: child.stdout });
    const line = await new Promise((resolve, reject) => {
      lines.on('line', (l) => { if (l.startsWith('tickgate: stream ')) resolve(l); });
      exited.then(() => reject(new Error('tickgate serve exited before serving')));
    });
    // tickgate: stream ws://H/v1/stream  issuer http://H/oauth2/token  admin http://A/metrics
    const w = line.split(/\s+/);
    const s = new Server();
    s.child = child; s.exited = exited;
    s.base = w[4].replace(/\/oauth2\/token$/, '');
    s.admin = w[6].replace(/\/metrics$/, '');
    return s;
  }
  async metric(series) {
    const text = await (await fetch(`${this.admin}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(series + ' '));
    return line ? Number(line.split(' ')[1]) : NaN;
  }
  /** SIGTERM (the graceful shutdown) and the exit. */
  async stop() {
    this.child.kill('SIGTERM');
    const r = await this.exited;
    servers.delete(this.child);
    return r;
  }
}

/** The config of a server on loopback (started in `dir`: the compiled-in DEMO feed). */
function config(dir, { port = 0, extra = '' } = {}) {
  return `listen = "127.0.0.1:${port}"\nadmin_listen = "127.0.0.1:0"\n` +
    `[server]\nstate_dir = "${join(dir, 'state')}"\ndrain_ms = 2000\n${extra}`;
}

/** Chromium as the issue prescribes: Debian's build, headless, a fresh profile, nothing phoning home. */
async function browser() {
  return chromium.launchPersistentContext(tempDir(), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1400, height: 820 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}

/** Polls `f` until it returns something truthy, at most `ms`. */
async function until(what, f, ms = PATIENCE) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The page, with every socket it opens and every console error recorded. */
async function openScreen(ctx, server) {
  const page = ctx.pages()[0] || await ctx.newPage();
  const sockets = [];
  const problems = [];
  page.on('websocket', (ws) => sockets.push(ws));
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('dialog', (d) => { problems.push(`dialog: ${d.message()}`); d.dismiss(); });
  await page.goto(server.base + '/');
  return { page, sockets, problems };
}

const text = (page, sel) => page.locator(sel).first().textContent();
const num = async (page, sel) => Number((await text(page, sel)).replace(/,/g, ''));
const board = (page) => page.$$eval('#rows tr[data-symbol]', (trs) => trs.map((tr) => ({
  symbol: tr.dataset.symbol,
  ...Object.fromEntries([...tr.cells].map((td) => [td.classList[0], td.textContent])),
})));

test('the screen shows ticks that change; a double Connect keeps one socket; screenshot', async () => {
  const server = await Server.start(tempDir(), config(tempDir()));
  const ctx = await browser();
  try {
    const { page, sockets, problems } = await openScreen(ctx, server);
    // Pressed twice, and submitted twice more from script while the first is in flight.
    await page.click('#connect');
    await page.evaluate(() => { const f = document.getElementById('login'); f.requestSubmit(); f.requestSubmit(); });
    await until('connected', async () => (await text(page, '#st-conn')) === 'connected');
    const first = await until('prices on the board', async () => {
      const b = await board(page);
      return b.length === 50 && b.every((r) => /^\d+\.\d\d$/.test(r.last) && /^\d+\.\d\d$/.test(r.bid)) && b;
    });
    await until('a price that changes', async () => {
      const b = await board(page);
      return b.some((r, i) => r.last !== first[i].last);
    });
    for (const r of await board(page)) {
      assert.ok(Number(r.bid) < Number(r.ask), `${r.symbol}: bid ${r.bid} below ask ${r.ask}`);
      assert.match(r.chg, /^([+-]?\d+\.\d\d)$/, `${r.symbol} change`);
      assert.match(r.pct, /^[+-]?\d+\.\d\d%$/, `${r.symbol} %`);
      assert.equal(Number(r.spread).toFixed(2), (Number(r.ask) - Number(r.bid)).toFixed(2));
      assert.match(r.bidsz, /^[\d,]+$/, `${r.symbol} bid size is whole units`);
    }
    // Selecting an instrument puts it on the chart and the book.
    await page.click('#rows tr[data-symbol="MSFT"]');
    assert.equal(await text(page, '#chart-sym'), 'MSFT');
    await until('the book of MSFT', async () => /^\d+\.\d\d$/.test(await text(page, '#book-bid')));
    await until('records counted', async () => (await num(page, '#st-records')) > 0);
    await until('a latency', async () => /ms$/.test(await text(page, '#st-latency')));
    // The screen subscribes throttled (protocol v1.1) and shows the rate the server echoed.
    assert.equal(await text(page, '#st-rate'), '10 updates/s per instrument');
    assert.match(await text(page, '#st-session'), /^s-/);
    assert.match(await text(page, '#st-exp'), /^\d+m \d\ds$|^\d+s$/);
    await page.screenshot({ path: join(ARTEFACTS, 'trading-screen.png') });
    // One socket: counted by the browser, and by the server.
    assert.equal(sockets.length, 1, 'the browser opened one WebSocket');
    assert.equal(await server.metric('tickgate_connections'), 1);
    // Disconnect, then Connect again: a second socket, still one at a time.
    await page.click('#disconnect');
    await until('disconnected', async () => (await text(page, '#st-conn')) === 'disconnected');
    await until('the server saw the close', async () => (await server.metric('tickgate_connections')) === 0);
    assert.equal(await page.locator('#error.shown').count(), 0, 'a disconnect by the user is no error');
    await page.click('#connect');
    await until('connected again', async () => (await text(page, '#st-conn')) === 'connected');
    assert.equal(sockets.length, 2);
    assert.equal(await server.metric('tickgate_connections'), 1);
    assert.deepEqual(problems, []);
  } finally {
    await ctx.close();
    await server.stop();
  }
});

test('a wrong secret shows an error within 2 s; so does an unknown feed', async () => {
  const server = await Server.start(tempDir(), config(tempDir()));
  const ctx = await browser();
  try {
    const { page, problems } = await openScreen(ctx, server);
    await page.fill('#secret', 'not-the-secret');
    const t0 = Date.now();
    await page.click('#connect');
    // The bound: the token endpoint answers 401 with no Basic challenge (no password
    // dialog to hang on), and the page says so.
    await page.waitForSelector('#error.shown', { timeout: 2000 });
    const shownAfter = Date.now() - t0;
    assert.match(await text(page, '#error'), /invalid_client/);
    assert.ok(shownAfter <= 2000, `error shown after ${shownAfter} ms`);
    await until('the Connect button back', async () => page.isEnabled('#connect'));
    assert.equal(await text(page, '#st-conn'), 'disconnected');
    // The right secret works from the same page.
    await page.fill('#secret', SECRET);
    await page.click('#connect');
    await until('connected', async () => (await text(page, '#st-conn')) === 'connected');
    await until('the error banner cleared', async () => (await page.locator('#error.shown').count()) === 0);
    await page.click('#disconnect');
    await until('disconnected', async () => (await text(page, '#st-conn')) === 'disconnected');
    // An unknown feed: the subscribe is refused and the banner names why.
    await page.fill('#feed', 'NOPE');
    await page.click('#connect');
    await page.waitForSelector('#error.shown', { timeout: PATIENCE });
    assert.match(await text(page, '#error'), /unknown_feed/);
    await until('disconnected', async () => (await text(page, '#st-conn')) === 'disconnected');
    assert.deepEqual(problems, []);
  } finally {
    await ctx.close();
    await server.stop();
  }
});

test('the screen survives a refresh cycle with 10-second tokens', async () => {
  const dir = tempDir();
  const server = await Server.start(dir, config(dir, { extra: '[issuer]\ntoken_ttl_s = 10\n' }));
  const ctx = await browser();
  try {
    const { page, sockets, problems } = await openScreen(ctx, server);
    await page.click('#connect');
    await until('connected', async () => (await text(page, '#st-conn')) === 'connected');
    // Each token gets `token_expiring` at 8-9 s; two refreshes take the first connection past
    // two token lifetimes (a 4001 would have closed it at 10 s).
    await until('two refreshes', async () => (await num(page, '#st-refreshes')) >= 2, PATIENCE);
    const before = await num(page, '#st-records');
    await until('records still flowing', async () => (await num(page, '#st-records')) > before);
    assert.equal(await text(page, '#st-conn'), 'connected');
    assert.equal(await num(page, '#st-reconnects'), 0, 'no reconnect was needed');
    assert.equal(sockets.length, 1, 'the same socket throughout');
    assert.equal(await page.locator('#error.shown').count(), 0);
    assert.equal(await server.metric('tickgate_closes_total{code="4001"}') || 0, 0);
    assert.deepEqual(problems, []);
  } finally {
    await ctx.close();
    await server.stop();
  }
});

test('after a server restart the screen reconnects, resubscribes and shows no gap', async () => {
  const dir = tempDir();
  const toml = config(dir, { port: await freePort() });
  let server = await Server.start(dir, toml);
  const ctx = await browser();
  try {
    const { page, problems } = await openScreen(ctx, server);
    await page.click('#connect');
    await until('connected', async () => (await text(page, '#st-conn')) === 'connected');
    await until('records', async () => (await num(page, '#st-records')) > 20);
    const session1 = await text(page, '#st-session');
    const r = await server.stop();
    assert.equal(r.code, 0, 'a graceful exit');
    server = await Server.start(dir, toml);
    await until('reconnected', async () => (await num(page, '#st-reconnects')) >= 1 &&
      (await text(page, '#st-conn')) === 'connected');
    const session2 = await text(page, '#st-session');
    assert.notEqual(session2, session1, 'a new session on the new server');
    const before = await num(page, '#st-records');
    await until('records from the new server', async () => (await num(page, '#st-records')) > before + 20);
    assert.equal(await num(page, '#st-gaps'), 0, 'no gap');
    const stats = await page.evaluate(() => window.tickgateScreen.lastStats);
    assert.equal(stats.violations, 0, 'every seq as expected');
    assert.equal(await page.locator('#error.shown').count(), 0);
    assert.deepEqual(problems, []);
  } finally {
    await ctx.close();
    await server.stop();
  }
});

test('a server close is shown with its reason (revoked: 4003), and a configured server refuses the demo token', async () => {
  const dir = tempDir();
  const clients = '[issuer]\nclients = [{ id = "trader", secret = "trader-secret", scopes = ["md:read:*"] }, ' +
    '{ id = "ops", secret = "ops-secret", scopes = ["tickgate:admin"] }]\n';
  const server = await Server.start(dir, config(dir, { extra: clients }));
  const ctx = await browser();
  try {
    const { page, problems } = await openScreen(ctx, server);
    // No secret: the demo token exists only without configured clients, and the page says so.
    await page.fill('#cid', 'trader');
    await page.click('#connect');
    await page.waitForSelector('#error.shown', { timeout: PATIENCE });
    assert.match(await text(page, '#error'), /configured clients/);
    await until('the Connect button back', async () => page.isEnabled('#connect'));
    // With the client's secret it streams; revoking its subject closes it with 4003, for good.
    await page.fill('#secret', 'trader-secret');
    await page.click('#connect');
    await until('connected', async () => (await text(page, '#st-conn')) === 'connected');
    await until('records', async () => (await num(page, '#st-records')) > 0);
    const form = new URLSearchParams({ grant_type: 'client_credentials', client_id: 'ops', client_secret: 'ops-secret' });
    const admin = await (await fetch(`${server.base}/oauth2/token`, { method: 'POST', body: form })).json();
    const r = await fetch(`${server.admin}/admin/revoke`, {
      method: 'POST',
      headers: { authorization: `Bearer ${admin.access_token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ sub: 'trader' }),
    });
    assert.equal(r.status, 200);
    await until('the revocation shown', async () => /4003.*token revoked/.test(await text(page, '#error')));
    await until('disconnected', async () => (await text(page, '#st-conn')) === 'disconnected');
    assert.equal(await num(page, '#st-reconnects'), 0, 'a revoked token is not retried');
    assert.deepEqual(problems, []);
  } finally {
    await ctx.close();
    await server.stop();
  }
});
