// Runs examples/stream.mjs (the README's example) against the real server.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { PKG_DIR, TIMEOUT_MS, startServer, waitFor } from '../testing/server.mjs';

/**
 * @param {Record<string, string>} env
 * @returns {Promise<{code: number|null, out: string, err: string}>}
 */
function runExample(env) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(PKG_DIR, 'examples', 'stream.mjs')], {
      cwd: PKG_DIR,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => {
      process.kill(/** @type {number} */ (child.pid), 'SIGKILL');
      reject(new Error(`the example did not exit within ${TIMEOUT_MS} ms; stdout: ${out}; stderr: ${err}`));
    }, TIMEOUT_MS);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
  });
}

test('examples/stream.mjs prints LIMIT trades and exits 0; a wrong secret exits 1', async () => {
  const srv = await startServer();
  try {
    const ok = await runExample({ TICKGATE_URL: srv.httpBase, TICKGATE_CLIENT_ID: 'demo', TICKGATE_CLIENT_SECRET: srv.secret, LIMIT: '5' });
    assert.equal(ok.code, 0, ok.err);
    const trades = ok.out.split('\n').filter((l) => /^(AAPL|MSFT) (buy |sell|\? {3}) \S+ @ \d+\.\d\d {2}seq \d+/.test(l));
    assert.equal(trades.length, 5, ok.out);
    assert.match(ok.out, /^subscribed to DEMO \(epoch \d+\): AAPL, MSFT$/m);
    assert.match(ok.out, /^closed: 1000 stopped$/m);
    assert.ok(!ok.out.includes(srv.secret) && !ok.err.includes(srv.secret));

    const bad = await runExample({ TICKGATE_URL: srv.httpBase, TICKGATE_CLIENT_ID: 'demo', TICKGATE_CLIENT_SECRET: 'wrong', LIMIT: '5' });
    assert.equal(bad.code, 1);
    assert.match(bad.err, /error: token request failed: 401 invalid_client/);
  } finally {
    await srv.stop();
  }
});

test('examples/stream.mjs keeps streaming through an in-band token refresh (6-second tokens)', async () => {
  const srv = await startServer({ sections: { issuer: { token_ttl_s: 6 } } });
  const child = spawn(process.execPath, [join(PKG_DIR, 'examples', 'stream.mjs')], {
    cwd: PKG_DIR,
    env: { ...process.env, TICKGATE_URL: srv.httpBase, TICKGATE_CLIENT_ID: 'demo', TICKGATE_CLIENT_SECRET: srv.secret },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  const trade = /^(AAPL|MSFT) (buy |sell|\? {3}) \S+ @ \d+\.\d\d {2}seq \d+/;
  try {
    // A trade printed after the first refresh: the same run outlived its first token.
    await waitFor(() => {
      const lines = out.split('\n');
      const at = lines.findIndex((l) => l.startsWith('token refreshed, valid until '));
      return at >= 0 && lines.slice(at + 1).some((l) => trade.test(l));
    }, 'a trade after a token refresh');
    assert.ok(!/^closed:|^reconnecting/m.test(out), out.slice(-2000));
    child.kill('SIGINT');
    assert.equal(await exited, 0, err);
    assert.match(out, /^closed: 1000 stopped$/m);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await srv.stop();
  }
});
