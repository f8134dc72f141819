// Starts the real tickgate server binary for a test: its own temporary folder (no feeds/ there,
// so the compiled-in DEMO feed is served; the state file lands there too), ephemeral ports
// unless told otherwise, and a stop() that ends it by its PID.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before } from 'node:test';
import { fileURLToPath } from 'node:url';
import { fetchToken } from '../src/tickgate-client.js';

/** clients/js */
export const PKG_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The server binary: env TICKGATE_BIN (relative to clients/js), default ../../target/debug/tickgate. */
export const TICKGATE_BIN = resolve(PKG_DIR, process.env.TICKGATE_BIN ?? '../../target/debug/tickgate');

/** Generous timeout for polled conditions. */
export const TIMEOUT_MS = 60_000;

/** @param {unknown} v */
function tomlValue(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return `[${v.map(tomlValue).join(', ')}]`;
  if (v && typeof v === 'object') {
    return `{ ${Object.entries(v).map(([k, x]) => `${k} = ${tomlValue(x)}`).join(', ')} }`;
  }
  throw new TypeError(`no TOML for ${String(v)}`);
}

/**
 * The configuration file's text.
 * @param {Record<string, unknown>} top top-level keys
 * @param {Record<string, Record<string, unknown>>} sections
 */
export function toml(top, sections) {
  const lines = Object.entries(top).map(([k, v]) => `${k} = ${tomlValue(v)}`);
  for (const [name, keys] of Object.entries(sections)) {
    lines.push('', `[${name}]`, ...Object.entries(keys).map(([k, v]) => `${k} = ${tomlValue(v)}`));
  }
  return `${lines.join('\n')}\n`;
}

/** A free TCP port on 127.0.0.1 (for a server that must come back on the same port). */
export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {import('node:net').AddressInfo} */ (s.address());
      s.close(() => res(port));
    });
  });
}

/** Every server started and not yet stopped: killed if the test process exits first. */
const live = new Set();
process.on('exit', () => {
  for (const pid of live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
});

/**
 * One server for a whole test file: registers node:test hooks that start it before the
 * file's tests, hand it and a token of the demo client to `ready`, and stop it after them.
 * @param {(srv: Awaited<ReturnType<typeof startServer>>, token: string) => void} ready
 */
export function sharedServer(ready) {
  /** @type {Awaited<ReturnType<typeof startServer>> | undefined} */
  let srv;
  before(async () => {
    srv = await startServer();
    ready(srv, (await fetchToken(srv.tokenUrl, { clientId: 'demo', clientSecret: srv.secret })).accessToken);
  });
  after(async () => {
    await srv?.stop();
  });
}

/**
 * Starts a server.
 * @param {{listen?: string, sections?: Record<string, Record<string, unknown>>, dir?: string, secret?: string}} [opts]
 *   `sections`: TOML tables (`issuer`, `auth`, `server`, ...); `dir`: reuse a folder (a restart)
 */
export async function startServer(opts = {}) {
  if (!existsSync(TICKGATE_BIN)) {
    throw new Error(`tickgate binary not found at ${TICKGATE_BIN}: build it (cargo build) or set TICKGATE_BIN`);
  }
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'tickgate-js-'));
  const secret = opts.secret ?? randomBytes(12).toString('hex');
  const sections = { ...(opts.sections ?? {}) };
  sections.server = { state_dir: join(dir, 'state'), drain_ms: 1000, ...(sections.server ?? {}) };
  const config = join(dir, 'tickgate.toml');
  writeFileSync(config, toml({ listen: opts.listen ?? '127.0.0.1:0', admin_listen: '127.0.0.1:0' }, sections));
  const proc = spawn(TICKGATE_BIN, ['serve', '--config', config], {
    cwd: dir,
    env: { ...process.env, TICKGATE_DEMO_SECRET: secret, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const pid = /** @type {number} */ (proc.pid);
  live.add(pid);
  let stderr = '';
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (d) => {
    stderr = (stderr + d).slice(-8000);
  });
  const exited = new Promise((res) => proc.once('exit', (code, signal) => res({ code, signal })));
  exited.then(() => live.delete(pid));

  const line = await new Promise((res, rej) => {
    let out = '';
    const timer = setTimeout(() => rej(new Error(`no start-up line within ${TIMEOUT_MS} ms; stderr: ${stderr}`)), TIMEOUT_MS);
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (d) => {
      out += d;
      const l = out.split('\n').find((x) => x.startsWith('tickgate: stream '));
      if (l) {
        clearTimeout(timer);
        res(l);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      rej(new Error(`tickgate exited (${code ?? signal}) before its start-up line; stderr: ${stderr}`));
    });
  });
  proc.stdout.resume();
  const m = /stream (ws:\/\/\S+)\s+issuer (http:\/\/\S+)\s+admin (http:\/\/\S+)\/metrics/.exec(line);
  if (!m) throw new Error(`unexpected start-up line: ${line}`);
  const streamUrl = m[1];
  const tokenUrl = m[2];
  return {
    pid,
    dir,
    secret,
    streamUrl,
    tokenUrl,
    httpBase: new URL(tokenUrl).origin,
    adminBase: m[3],
    port: Number(new URL(streamUrl).port),
    exited,
    stderr: () => stderr,
    /** Ends the server by its PID (SIGTERM, SIGKILL after 15 s) and waits for it. */
    async stop({ keepDir = false } = {}) {
      if (live.has(pid)) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          // gone
        }
        const t = setTimeout(() => {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone
          }
        }, 15_000);
        await exited;
        clearTimeout(t);
      }
      if (!keepDir && !opts.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Polls `cond` until it is truthy (or throws after `timeoutMs`).
 * @template T
 * @param {() => T | Promise<T>} cond
 * @param {string} what
 * @param {number} [timeoutMs]
 * @returns {Promise<T>}
 */
export async function waitFor(cond, what, timeoutMs = TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
