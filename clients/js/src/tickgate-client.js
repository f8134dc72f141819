// tickgate-client: the JavaScript client of the tickgate market-data stream (protocol v1,
// with the v1.1 throttled subscriptions of §6a: `maxRate`, `throttle`).
//
// One self-contained ES module with no runtime dependencies. It runs in browsers and in
// Node >= 20. The WebSocket class is `globalThis.WebSocket` when present, else the one passed
// in the options (`WebSocket`): Node 20 has no global WebSocket, so Node code passes the `ws`
// package's class.
//
// Layers:
//  - tokens: `fetchToken`, `clientCredentials`, `fetchTicket` (the embedded issuer, §2-§3);
//  - binary batches: `decodeBatch` / `encodeBatch` (§8);
//  - sequence checking: `SeqTracker` (§9);
//  - one socket: `TickgateConnection` (§3-§7, §10);
//  - a self-healing subscription: `TickgateStream` (refresh, reconnect, resume: §10-§11).
//
// No function of this module logs or prints a token, and no error message contains one.

/** The WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL = 'tickgate.v1';
/** Record type of a trade (§8). */
export const RTYPE_TRADE = 1;
/** Record type of a quote (§8). */
export const RTYPE_QUOTE = 2;
/** Record flag: a subscribe-time last value (§6). */
export const FLAG_SNAPSHOT = 1;
/** Record flag: re-sent for a `resume` (§6). */
export const FLAG_REPLAY = 2;
/** Record flag: a quote standing for quotes a conflating connection skipped (§11). */
export const FLAG_CONFLATED = 4;
/** Prices and sizes are fixed-point with 9 decimals: the wire integer divided by this. */
export const PRICE_SCALE = 1e9;

const BATCH_HEADER_BYTES = 16;
const RECORD_HEADER_BYTES = 32;
const TRADE_BYTES = 56;
const QUOTE_BYTES = 72;
const TWO32 = 4294967296;
const MAX_COUNT = 65535;
const MAX_BODY_BYTES = 65536;

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/**
 * `CustomEvent` where the platform has it (browsers, Node >= 19), else a minimal stand-in.
 * @type {typeof CustomEvent}
 */
const CustomEventImpl =
  typeof globalThis.CustomEvent === 'function'
    ? globalThis.CustomEvent
    : /** @type {any} */ (
        class CustomEvent extends Event {
          /** @param {string} type @param {{detail?: any}} [init] */
          constructor(type, init) {
            super(type);
            /** @type {any} */
            this.detail = init && 'detail' in init ? init.detail : null;
          }
        }
      );

/**
 * Dispatches a `CustomEvent` named `type` with `detail` on `target`.
 * @param {EventTarget} target
 * @param {string} type
 * @param {any} detail
 */
function emit(target, type, detail) {
  target.dispatchEvent(new CustomEventImpl(type, { detail }));
}

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/** Base class of the errors of a stream: handshake, control, close, decoding, sequence. */
export class TickgateError extends Error {
  /** @param {string} message @param {{cause?: unknown}} [options] */
  constructor(message, options) {
    super(message, options);
    this.name = 'TickgateError';
  }
}

/**
 * `<what>: <status> <error>: <description>` (the status left out when 0).
 * @param {string} what
 * @param {number} status
 * @param {string} error
 * @param {string} description
 */
function refusalMessage(what, status, error, description) {
  return `${what}: ${status ? `${status} ` : ''}${error}${description ? `: ${description}` : ''}`;
}

/**
 * A token (or ticket) request failed. `status` is the HTTP status (0 for a network failure),
 * `error` the OAuth2 error code (`invalid_client`, `invalid_scope`, ..., or `network`),
 * `description` the server's `error_description`.
 */
export class TokenError extends Error {
  /**
   * @param {number} status
   * @param {string} error
   * @param {string} description
   * @param {{cause?: unknown}} [options]
   */
  constructor(status, error, description, options) {
    super(refusalMessage('token request failed', status, error, description), options);
    this.name = 'TokenError';
    /** HTTP status, 0 when no answer came (network failure). @type {number} */
    this.status = status;
    /** OAuth2 `error` code, or `network`, or `invalid_response`. @type {string} */
    this.error = error;
    /** The server's `error_description` (or the cause's message). @type {string} */
    this.description = description;
  }
}

/**
 * The server refused the WebSocket handshake. With the `ws` package the HTTP status and the
 * JSON body (`error`, `error_description`) are known; a browser hides them: status 0 and error
 * `handshake_failed`.
 */
export class HandshakeRefused extends TickgateError {
  /** HTTP status of the refusal; 0 when unknown (browsers, network failures). */
  status = 0;
  /** The server's `error` code, or `handshake_failed`. */
  error = '';
  /** The server's `error_description`, or what is known of the failure. */
  description = '';

  /**
   * @param {number} status
   * @param {string} error
   * @param {string} description
   * @param {{cause?: unknown}} [options]
   */
  constructor(status, error, description, options) {
    super(refusalMessage('handshake refused', status, error, description), options);
    this.name = 'HandshakeRefused';
    Object.assign(this, { status, error, description });
  }
}

/** The server answered a request (`subscribe`, `unsubscribe`, `refresh`, `ping`, `throttle`) with `error`. */
export class ControlError extends TickgateError {
  /**
   * @param {string} error the `code` of the server's `error` message (e.g. `unknown_feed`)
   * @param {string} description its `message`
   * @param {number|undefined} id the request id echoed
   */
  constructor(error, description, id) {
    super(`${error}${description ? `: ${description}` : ''}`);
    this.name = 'ControlError';
    /** The error code (§13), e.g. `unknown_feed`, `insufficient_scope`, `rate_limited`. */
    this.error = error;
    /** Text for humans. */
    this.description = description;
    /** The request id. */
    this.id = id;
  }
}

/** Codes after which reconnecting is the right move (1008 only for a heartbeat timeout). */
const RETRYABLE_CODES = new Set([1001, 1006, 1011, 4008]);

/** The stream's socket closed: `code` and `reason` of the close (§12). */
export class StreamClosed extends TickgateError {
  /** @param {number} code @param {string} [reason] */
  constructor(code, reason = '') {
    super(`stream closed: ${code}${reason ? ` ${reason}` : ''}`);
    this.name = 'StreamClosed';
    /** WebSocket close code. */
    this.code = code;
    /** Close reason. */
    this.reason = reason;
  }
  /** 4001: the token expired. */
  get expired() {
    return this.code === 4001;
  }
  /** 4003: the token (or its subject) was revoked. */
  get revoked() {
    return this.code === 4003;
  }
  /** 4008: the connection fell too far behind. */
  get slowConsumer() {
    return this.code === 4008;
  }
  /** 1001: the server is shutting down. */
  get shutdown() {
    return this.code === 1001;
  }
  /** True for 1001, 1006, 1011, 4008 and a 1008 heartbeat timeout: reconnect. */
  get retryable() {
    return RETRYABLE_CODES.has(this.code) || (this.code === 1008 && this.reason === 'heartbeat timeout');
  }
}

/** A binary batch is malformed (§8). */
export class DecodeError extends TickgateError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'DecodeError';
  }
}

/** A record broke the sequence rules of §9 (a jump without a `gap`, or a repeated seq). */
export class SequenceError extends TickgateError {
  /**
   * @param {{feedId: number, instrumentId: number, expected: number, got: number}} v
   * @param {string} [symbol]
   */
  constructor(v, symbol) {
    super(
      `sequence violation on ${symbol ?? 'instrument'} (feed ${v.feedId}, instrument ${v.instrumentId}): ` +
        `expected seq ${v.expected}, got ${v.got}`,
    );
    this.name = 'SequenceError';
    /** @type {number} */
    this.feedId = v.feedId;
    /** @type {number} */
    this.instrumentId = v.instrumentId;
    /** @type {string|undefined} */
    this.symbol = symbol;
    /** @type {number} */
    this.expected = v.expected;
    /** @type {number} */
    this.got = v.got;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Tokens and tickets                                                                          */
/* ------------------------------------------------------------------------------------------ */

/**
 * Picks the fetch function: the one given, else `globalThis.fetch`.
 * @param {typeof fetch|undefined} f
 * @returns {typeof fetch}
 */
function fetchFn(f) {
  const impl = f ?? globalThis.fetch;
  if (typeof impl !== 'function') throw new TypeError('no fetch implementation: pass options.fetch');
  return impl;
}

/**
 * POSTs and reads a JSON answer; every failure becomes a `TokenError`.
 * @param {typeof fetch} doFetch
 * @param {string} url
 * @param {RequestInit} init
 * @returns {Promise<{status: number, body: any}>}
 */
async function postJson(doFetch, url, init) {
  let res;
  try {
    res = await doFetch(url, init);
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new TokenError(0, 'network', errMessage(err), { cause: err });
  }
  let text;
  try {
    text = await res.text();
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new TokenError(res.status, 'network', `reading the answer failed: ${errMessage(err)}`, { cause: err });
  }
  /** @type {any} */
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!res.ok) {
    const error = body && typeof body.error === 'string' ? body.error : `http_${res.status}`;
    const description =
      body && typeof body.error_description === 'string' ? body.error_description : text.slice(0, 200);
    throw new TokenError(res.status, error, description);
  }
  if (!body || typeof body !== 'object') {
    throw new TokenError(res.status, 'invalid_response', 'the answer is not a JSON object');
  }
  return { status: res.status, body };
}

/** @param {unknown} err */
function isAbort(err) {
  return !!err && typeof err === 'object' && /** @type {any} */ (err).name === 'AbortError';
}

/** @param {unknown} err */
function errMessage(err) {
  if (err && typeof err === 'object') {
    const e = /** @type {any} */ (err);
    const cause = e.cause && typeof e.cause === 'object' && e.cause.message ? ` (${e.cause.message})` : '';
    return `${e.message ?? String(err)}${cause}`;
  }
  return String(err);
}

/**
 * Gets an access token from an OAuth2 token endpoint with the client-credentials grant
 * (RFC 6749 §4.4). The credentials travel in the form body, never as HTTP Basic, so a browser
 * never shows a password dialog.
 *
 * @param {string|URL} tokenUrl e.g. `http://127.0.0.1:8080/oauth2/token`
 * @param {{clientId: string, clientSecret: string, scope?: string, fetch?: typeof fetch, signal?: AbortSignal}} options
 * @returns {Promise<{accessToken: string, expiresIn: number, scope: string, tokenType: string}>}
 * @throws {TokenError} on a non-2xx answer (with the server's `error` and `error_description`)
 *   or a network failure (status 0, error `network`)
 */
export async function fetchToken(tokenUrl, options) {
  const { clientId, clientSecret, scope, fetch: f, signal } = options ?? /** @type {any} */ ({});
  if (typeof clientId !== 'string' || clientId === '') throw new TypeError('fetchToken: clientId must be a non-empty string');
  if (typeof clientSecret !== 'string') throw new TypeError('fetchToken: clientSecret must be a string');
  const form = new URLSearchParams({ grant_type: 'client_credentials', client_id: clientId, client_secret: clientSecret });
  if (scope != null && scope !== '') form.set('scope', String(scope));
  const { status, body } = await postJson(fetchFn(f), String(tokenUrl), {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
    body: form.toString(),
    signal,
  });
  if (typeof body.access_token !== 'string' || body.access_token === '') {
    throw new TokenError(status, 'invalid_response', 'the answer has no access_token');
  }
  return {
    accessToken: body.access_token,
    expiresIn: typeof body.expires_in === 'number' ? body.expires_in : NaN,
    scope: typeof body.scope === 'string' ? body.scope : '',
    tokenType: typeof body.token_type === 'string' ? body.token_type : 'Bearer',
  };
}

/**
 * A token provider for `TickgateStream`: each call fetches a fresh token with the client
 * credentials and returns the JWT.
 * @param {string|URL} tokenUrl
 * @param {{clientId: string, clientSecret: string, scope?: string, fetch?: typeof fetch}} options
 * @returns {() => Promise<string>}
 */
export function clientCredentials(tokenUrl, options) {
  const opts = { ...options };
  if (typeof opts.clientId !== 'string' || opts.clientId === '') {
    throw new TypeError('clientCredentials: clientId must be a non-empty string');
  }
  return async () => (await fetchToken(tokenUrl, opts)).accessToken;
}

/**
 * The http(s) base of a server from any of its URLs (`ws://h:p/v1/stream` → `http://h:p`).
 * A path prefix in front of `/v1/...` is kept (a reverse proxy).
 * @param {string|URL} url
 * @returns {string}
 */
export function httpBaseOf(url) {
  const u = new URL(String(url));
  if (u.protocol === 'ws:') u.protocol = 'http:';
  else if (u.protocol === 'wss:') u.protocol = 'https:';
  let path = u.pathname.replace(/\/+$/, '');
  const v1 = path.lastIndexOf('/v1/');
  if (v1 >= 0) path = path.slice(0, v1);
  return `${u.origin}${path}`;
}

/**
 * Gets a one-time stream ticket (`POST /v1/ticket`, valid 30 s, single use) for `token`.
 * @param {string|URL} baseHttpUrl the server's http(s) base (a ws(s) URL works too)
 * @param {string} token the JWT
 * @param {{fetch?: typeof fetch, signal?: AbortSignal}} [options]
 * @returns {Promise<string>}
 * @throws {TokenError}
 */
export async function fetchTicket(baseHttpUrl, token, options = {}) {
  if (typeof token !== 'string' || token === '') throw new TypeError('fetchTicket: token must be a non-empty string');
  const { status, body } = await postJson(fetchFn(options.fetch), `${httpBaseOf(baseHttpUrl)}/v1/ticket`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
    signal: options.signal,
  });
  if (typeof body.ticket !== 'string' || body.ticket === '') {
    throw new TokenError(status, 'invalid_response', 'the answer has no ticket');
  }
  return body.ticket;
}

/**
 * The absolute ws(s) URL of a stream URL: relative URLs resolve against the page (browsers),
 * http(s) becomes ws(s).
 * @param {string|URL} url
 * @returns {string}
 * @throws {TypeError} not a URL, or not ws(s)/http(s)
 */
export function wsUrlOf(url) {
  let u;
  try {
    u = new URL(String(url), /** @type {any} */ (globalThis).location?.href);
  } catch {
    throw new TypeError(`not a stream URL: ${JSON.stringify(String(url))}`);
  }
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') throw new TypeError(`a stream URL is ws: or wss:, got ${u.protocol}`);
  return u.href;
}

/* ------------------------------------------------------------------------------------------ */
/* Binary batches (§8)                                                                         */
/* ------------------------------------------------------------------------------------------ */

/** Internal: per record in wire order, its rtype (0: skipped unknown rtype). */
const K_KINDS = Symbol('tickgate.kinds');
/** Internal: per record in wire order, its byte offset in the batch. */
const K_OFFSETS = Symbol('tickgate.offsets');
/** Internal: the batch's bytes. */
const K_VIEW = Symbol('tickgate.view');

/**
 * @param {unknown} input
 * @returns {DataView}
 */
function viewOf(input) {
  if (input instanceof ArrayBuffer) return new DataView(input);
  if (ArrayBuffer.isView(input)) return new DataView(input.buffer, input.byteOffset, input.byteLength);
  if (typeof SharedArrayBuffer === 'function' && input instanceof SharedArrayBuffer) return new DataView(input);
  throw new DecodeError(`decodeBatch: expected an ArrayBuffer or a typed array, got ${describe(input)}`);
}

/** @param {unknown} v */
function describe(v) {
  if (v === null) return 'null';
  if (typeof v === 'object') return /** @type {any} */ (v).constructor?.name ?? 'object';
  return typeof v;
}

/**
 * The columns trades and quotes share, for `n` records.
 * @param {number} n
 */
function commonColumns(n) {
  return {
    length: n,
    feedId: new Uint16Array(n),
    instrumentId: new Uint32Array(n),
    seq: new Float64Array(n),
    tsEventNs: new Float64Array(n),
    tsRecvNs: new Float64Array(n),
    flags: new Uint8Array(n),
  };
}

/**
 * @param {number} n
 * @returns {import('./tickgate-client.js').TradeColumns}
 */
function tradeColumns(n) {
  const c = /** @type {any} */ (commonColumns(n));
  c.price = new Float64Array(n);
  c.size = new Float64Array(n);
  c.side = new Uint8Array(n);
  return c;
}

/**
 * @param {number} n
 * @returns {import('./tickgate-client.js').QuoteColumns}
 */
function quoteColumns(n) {
  const c = /** @type {any} */ (commonColumns(n));
  c.bidPx = new Float64Array(n);
  c.bidSz = new Float64Array(n);
  c.askPx = new Float64Array(n);
  c.askSz = new Float64Array(n);
  return c;
}

/**
 * Reads the 32-byte record header at `off` into row `i` of `cols`; returns `ts_event_ns`.
 * @param {DataView} dv
 * @param {number} off
 * @param {any} cols trade or quote columns
 * @param {number} i
 */
function readHeader(dv, off, cols, i) {
  cols.feedId[i] = dv.getUint16(off + 2, true);
  cols.instrumentId[i] = dv.getUint32(off + 4, true);
  cols.seq[i] = dv.getUint32(off + 12, true) * TWO32 + dv.getUint32(off + 8, true);
  const ts = (cols.tsEventNs[i] = dv.getInt32(off + 20, true) * TWO32 + dv.getUint32(off + 16, true));
  cols.tsRecvNs[i] = dv.getInt32(off + 28, true) * TWO32 + dv.getUint32(off + 24, true);
  return ts;
}

/**
 * A signed 64-bit fixed-point field at `off`, divided by 1e9.
 * @param {DataView} dv
 * @param {number} off
 */
function fixedI64(dv, off) {
  return (dv.getInt32(off + 4, true) * TWO32 + dv.getUint32(off, true)) / PRICE_SCALE;
}

/**
 * An unsigned 64-bit fixed-point field at `off`, divided by 1e9.
 * @param {DataView} dv
 * @param {number} off
 */
function fixedU64(dv, off) {
  return (dv.getUint32(off + 4, true) * TWO32 + dv.getUint32(off, true)) / PRICE_SCALE;
}

/**
 * The fields every record object has, for row `i` of `cols` at byte offset `o`.
 * @param {'trade'|'quote'} type
 * @param {any} cols trade or quote columns
 * @param {number} i
 * @param {DataView} dv
 * @param {number} o
 */
function recordBase(type, cols, i, dv, o) {
  const flags = cols.flags[i];
  return {
    type,
    feedId: cols.feedId[i],
    instrumentId: cols.instrumentId[i],
    seq: cols.seq[i],
    tsEventNs: dv.getBigInt64(o + 16, true),
    tsRecvNs: dv.getBigInt64(o + 24, true),
    flags,
    snapshot: (flags & FLAG_SNAPSHOT) !== 0,
    replay: (flags & FLAG_REPLAY) !== 0,
    conflated: (flags & FLAG_CONFLATED) !== 0,
  };
}

/**
 * One decoded binary message: columns per record type, and `records()` in wire order.
 */
class Batch {
  /**
   * @param {DataView} dv
   * @param {number} count
   * @param {any} trades
   * @param {any} quotes
   * @param {Uint8Array} kinds
   * @param {Uint32Array} offsets
   * @param {number} lastTsEventNs
   */
  constructor(dv, count, trades, quotes, kinds, offsets, lastTsEventNs) {
    /** `send_ts_ns`: the server clock when the batch was handed to the socket. @type {bigint} */
    this.sendTsNs = dv.getBigUint64(8, true);
    /** Records in the batch (the header's count, unknown rtypes included). */
    this.count = count;
    /** The trades, in wire order. */
    this.trades = trades;
    /** The quotes, in wire order. */
    this.quotes = quotes;
    /** `ts_event_ns` (as a float) of the last known record in wire order; NaN when none. */
    this.lastTsEventNs = lastTsEventNs;
    /** @type {import('./tickgate-client.js').Record[]|null} */
    this._records = null;
    this[K_VIEW] = dv;
    this[K_KINDS] = kinds;
    this[K_OFFSETS] = offsets;
  }

  /**
   * The trades and quotes as objects, in wire order (records of unknown rtypes left out).
   * Built on the first call from the batch's bytes (exact bigint times); later calls return
   * the same array.
   * @returns {import('./tickgate-client.js').Record[]}
   */
  records() {
    if (this._records) return this._records;
    const dv = this[K_VIEW];
    const kinds = this[K_KINDS];
    const offsets = this[K_OFFSETS];
    const t = this.trades;
    const q = this.quotes;
    /** @type {any[]} */
    const out = [];
    let ti = 0;
    let qi = 0;
    for (let i = 0; i < kinds.length; i++) {
      const k = kinds[i];
      const o = offsets[i];
      if (k === RTYPE_TRADE) {
        const r = /** @type {any} */ (recordBase('trade', t, ti, dv, o));
        r.price = t.price[ti];
        r.size = t.size[ti];
        r.side = t.side[ti];
        out.push(r);
        ti++;
      } else if (k === RTYPE_QUOTE) {
        const r = /** @type {any} */ (recordBase('quote', q, qi, dv, o));
        r.bidPx = q.bidPx[qi];
        r.bidSz = q.bidSz[qi];
        r.askPx = q.askPx[qi];
        r.askSz = q.askSz[qi];
        out.push(r);
        qi++;
      }
    }
    this._records = out;
    return out;
  }
}

/**
 * Decodes one binary message (a batch, §8) into typed-array columns.
 *
 * Records of an unknown rtype are skipped by their `len`. Seqs, times, prices and sizes are
 * Float64 (seqs exact up to 2^53; prices and sizes already divided by 1e9); `records()` gives
 * objects with exact bigint times.
 *
 * @param {ArrayBuffer|ArrayBufferView} input the bytes of one binary WebSocket message
 * @returns {import('./tickgate-client.js').Batch}
 * @throws {DecodeError} version != 1, truncated header or record, a `len` under 32 or not a
 *   multiple of 8 or beyond the buffer, a trade/quote shorter than its layout, or a count that
 *   does not match the bytes
 */
export function decodeBatch(input) {
  const dv = viewOf(input);
  const n = dv.byteLength;
  if (n < BATCH_HEADER_BYTES) {
    throw new DecodeError(`truncated batch header: ${n} bytes, the header takes ${BATCH_HEADER_BYTES}`);
  }
  const version = dv.getUint8(0);
  if (version !== 1) throw new DecodeError(`unsupported batch version ${version} (expected 1)`);
  const count = dv.getUint16(2, true);

  // Pass 1: validate and count per type.
  let off = BATCH_HEADER_BYTES;
  let nt = 0;
  let nq = 0;
  for (let i = 0; i < count; i++) {
    if (off + RECORD_HEADER_BYTES > n) {
      throw new DecodeError(
        `truncated record ${i} of ${count} at offset ${off}: ${n - off} bytes left, a record header takes ${RECORD_HEADER_BYTES}`,
      );
    }
    const len = dv.getUint8(off);
    if (len < RECORD_HEADER_BYTES || (len & 7) !== 0) {
      throw new DecodeError(`record ${i} at offset ${off}: len ${len} is not a multiple of 8 of at least 32`);
    }
    if (off + len > n) {
      throw new DecodeError(`record ${i} at offset ${off}: len ${len} runs past the end of the batch (${n} bytes)`);
    }
    const rtype = dv.getUint8(off + 1);
    if (rtype === RTYPE_TRADE) {
      if (len < TRADE_BYTES) throw new DecodeError(`record ${i} at offset ${off}: a trade takes ${TRADE_BYTES} bytes, len is ${len}`);
      nt++;
    } else if (rtype === RTYPE_QUOTE) {
      if (len < QUOTE_BYTES) throw new DecodeError(`record ${i} at offset ${off}: a quote takes ${QUOTE_BYTES} bytes, len is ${len}`);
      nq++;
    }
    off += len;
  }
  if (off !== n) {
    throw new DecodeError(`count mismatch: the header counts ${count} records, ${n - off} bytes follow them`);
  }

  // Pass 2: fill the columns.
  const t = tradeColumns(nt);
  const q = quoteColumns(nq);
  const kinds = new Uint8Array(count);
  const offsets = new Uint32Array(count);
  let ti = 0;
  let qi = 0;
  let lastTs = NaN;
  off = BATCH_HEADER_BYTES;
  for (let i = 0; i < count; i++) {
    const len = dv.getUint8(off);
    const rtype = dv.getUint8(off + 1);
    offsets[i] = off;
    if (rtype === RTYPE_TRADE) {
      kinds[i] = RTYPE_TRADE;
      lastTs = readHeader(dv, off, t, ti);
      t.price[ti] = fixedI64(dv, off + 32);
      t.size[ti] = fixedU64(dv, off + 40);
      t.side[ti] = dv.getUint8(off + 48);
      t.flags[ti] = dv.getUint8(off + 49);
      ti++;
    } else if (rtype === RTYPE_QUOTE) {
      kinds[i] = RTYPE_QUOTE;
      lastTs = readHeader(dv, off, q, qi);
      q.bidPx[qi] = fixedI64(dv, off + 32);
      q.bidSz[qi] = fixedU64(dv, off + 40);
      q.askPx[qi] = fixedI64(dv, off + 48);
      q.askSz[qi] = fixedU64(dv, off + 56);
      q.flags[qi] = dv.getUint8(off + 64);
      qi++;
    }
    off += len;
  }
  return /** @type {any} */ (new Batch(dv, count, t, q, kinds, offsets, lastTs));
}

/**
 * @param {unknown} v
 * @param {string} what
 * @param {bigint} min
 * @param {bigint} max
 * @returns {bigint}
 */
function intField(v, what, min, max) {
  let b;
  if (typeof v === 'bigint') b = v;
  else if (typeof v === 'number' && Number.isInteger(v)) b = BigInt(v);
  else throw new TypeError(`encodeBatch: ${what} must be an integer (number or bigint), got ${describe(v)}`);
  if (b < min || b > max) throw new RangeError(`encodeBatch: ${what} ${b} is out of range`);
  return b;
}

/**
 * @param {unknown} v
 * @param {string} what
 * @param {bigint} min
 * @returns {bigint}
 */
function fixedField(v, what, min) {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`encodeBatch: ${what} must be a finite number`);
  return intField(Math.round(v * PRICE_SCALE), what, min, min < 0n ? I64_MAX : U64_MAX);
}

/**
 * @param {unknown} v
 * @param {string} what
 * @param {number} max
 * @returns {number}
 */
function smallField(v, what, max) {
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new TypeError(`encodeBatch: ${what} must be an integer`);
  if (v < 0 || v > max) throw new RangeError(`encodeBatch: ${what} ${v} is out of range 0..${max}`);
  return v;
}

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const U64_MAX = 2n ** 64n - 1n;

/**
 * @param {any} r
 * @returns {number}
 */
function flagsOf(r) {
  let f = r.flags == null ? 0 : smallField(r.flags, 'flags', 255);
  if (r.snapshot) f |= FLAG_SNAPSHOT;
  if (r.replay) f |= FLAG_REPLAY;
  if (r.conflated) f |= FLAG_CONFLATED;
  return f;
}

/**
 * Encodes records into one batch: the inverse of `decodeBatch` (for tests and tools).
 * Records take the shape `records()` returns; times and seqs may be numbers or bigints,
 * prices and sizes are numbers (rounded to 9 decimals). `flags` and the `snapshot`, `replay`,
 * `conflated` booleans are ORed.
 *
 * @param {Iterable<import('./tickgate-client.js').RecordInput>} records
 * @param {bigint|number} [sendTsNs]
 * @returns {Uint8Array}
 * @throws {TypeError|RangeError} on a record of another type or a field of the wrong type or range
 */
export function encodeBatch(records, sendTsNs = 0n) {
  if (records == null || typeof (/** @type {any} */ (records))[Symbol.iterator] !== 'function') {
    throw new TypeError('encodeBatch: records must be an iterable of records');
  }
  const list = Array.from(records);
  if (list.length > MAX_COUNT) throw new RangeError(`encodeBatch: at most ${MAX_COUNT} records per batch`);
  let size = BATCH_HEADER_BYTES;
  for (const [i, r] of list.entries()) {
    if (!r || typeof r !== 'object') throw new TypeError(`encodeBatch: record ${i} is not an object`);
    if (r.type === 'trade') size += TRADE_BYTES;
    else if (r.type === 'quote') size += QUOTE_BYTES;
    else throw new TypeError(`encodeBatch: record ${i} has type ${JSON.stringify(/** @type {any} */ (r).type)} (expected 'trade' or 'quote')`);
  }
  const bytes = new Uint8Array(size);
  const dv = new DataView(bytes.buffer);
  dv.setUint8(0, 1);
  dv.setUint16(2, list.length, true);
  dv.setBigUint64(8, intField(sendTsNs, 'sendTsNs', 0n, U64_MAX), true);
  let off = BATCH_HEADER_BYTES;
  for (const r of /** @type {any[]} */ (list)) {
    const trade = r.type === 'trade';
    dv.setUint8(off, trade ? TRADE_BYTES : QUOTE_BYTES);
    dv.setUint8(off + 1, trade ? RTYPE_TRADE : RTYPE_QUOTE);
    dv.setUint16(off + 2, smallField(r.feedId, 'feedId', 0xffff), true);
    dv.setUint32(off + 4, smallField(r.instrumentId, 'instrumentId', 0xffffffff), true);
    dv.setBigUint64(off + 8, intField(r.seq, 'seq', 0n, U64_MAX), true);
    dv.setBigInt64(off + 16, intField(r.tsEventNs ?? 0n, 'tsEventNs', I64_MIN, I64_MAX), true);
    dv.setBigInt64(off + 24, intField(r.tsRecvNs ?? 0n, 'tsRecvNs', I64_MIN, I64_MAX), true);
    if (trade) {
      dv.setBigInt64(off + 32, fixedField(r.price, 'price', I64_MIN), true);
      dv.setBigUint64(off + 40, fixedField(r.size, 'size', 0n), true);
      dv.setUint8(off + 48, r.side == null ? 0 : smallField(r.side, 'side', 255));
      dv.setUint8(off + 49, flagsOf(r));
      off += TRADE_BYTES;
    } else {
      dv.setBigInt64(off + 32, fixedField(r.bidPx, 'bidPx', I64_MIN), true);
      dv.setBigUint64(off + 40, fixedField(r.bidSz, 'bidSz', 0n), true);
      dv.setBigInt64(off + 48, fixedField(r.askPx, 'askPx', I64_MIN), true);
      dv.setBigUint64(off + 56, fixedField(r.askSz, 'askSz', 0n), true);
      dv.setUint8(off + 64, flagsOf(r));
      off += QUOTE_BYTES;
    }
  }
  return bytes;
}

/* ------------------------------------------------------------------------------------------ */
/* Sequence tracking (§9)                                                                      */
/* ------------------------------------------------------------------------------------------ */

/**
 * @param {number} feedId
 * @param {number} instrumentId
 */
function seqKey(feedId, instrumentId) {
  return feedId * TWO32 + instrumentId;
}

/**
 * Per-instrument sequence checking, the rules of protocol §9, keyed by (feed id, instrument id).
 *
 * - `onSubscribed`: `expected = seq + 1` for each instrument not already held;
 * - SNAPSHOT records set last values and do not move `expected` (a snapshot at or above
 *   `expected` is a violation);
 * - live and REPLAY records must carry `seq == expected`, then `expected += 1`;
 * - a CONFLATED record may jump ahead: `expected = seq + 1`. On a conflating connection (§11)
 *   only quotes carry the flag; on a throttled subscription (v1.1, §6a) a trade may too, the
 *   skipped seqs being quotes replaced by later ones. A jump without the flag is a violation,
 *   whatever the record type;
 * - `onGap`: `expected = to + 1`;
 * - `onReset`: `expected = 1` for every instrument of the feed;
 * - anything else is a violation (returned, counted; a jump moves `expected` past it).
 */
export class SeqTracker {
  constructor() {
    /** @type {Map<number, {expected: number}>} */
    this._state = new Map();
    /** @type {Map<string, number>} feed name → id (from `onWelcome`) */
    this._feedIds = new Map();
    /** @type {Map<number, Map<string, number>>} feed id → symbol → instrument id */
    this._symbols = new Map();
    /** `gap` messages seen. */
    this.gaps = 0;
    /** Sequence violations seen. */
    this.violations = 0;
  }

  /**
   * Learns the feed ids of a `welcome` (or `refreshed`), so that `onSubscribed` and `onGap`
   * can find a feed's id from its name.
   * @param {{feeds?: {name: string, id: number}[]}} msg
   */
  onWelcome(msg) {
    for (const f of msg?.feeds ?? []) this._feedIds.set(f.name, f.id);
  }

  /**
   * @param {string} name
   * @param {number|undefined} feedId
   * @returns {number}
   */
  _feedId(name, feedId) {
    if (typeof feedId === 'number') return feedId;
    const id = this._feedIds.get(name);
    if (id === undefined) throw new TypeError(`SeqTracker: unknown feed ${JSON.stringify(name)}: pass its id or call onWelcome first`);
    return id;
  }

  /**
   * A `subscribed` reply: starts tracking each instrument not already held at `seq + 1`.
   * @param {{feed: string, instruments: {symbol: string, id: number, seq: number}[]}} msg
   * @param {number} [feedId] the feed's id (default: learned from `onWelcome`)
   */
  onSubscribed(msg, feedId) {
    const fid = this._feedId(msg.feed, feedId);
    let syms = this._symbols.get(fid);
    if (!syms) this._symbols.set(fid, (syms = new Map()));
    for (const inst of msg.instruments ?? []) {
      syms.set(inst.symbol, inst.id);
      const key = seqKey(fid, inst.id);
      if (!this._state.has(key)) this._state.set(key, { expected: inst.seq + 1 });
    }
  }

  /**
   * Checks one record (the shape `Batch.records()` returns).
   * @param {{type?: string, feedId: number, instrumentId: number, seq: number, flags: number}} rec
   * @returns {null | {kind: 'violation', feedId: number, instrumentId: number, expected: number, got: number}}
   */
  onRecord(rec) {
    return this.check(rec.feedId, rec.instrumentId, rec.seq, rec.flags, rec.type === 'trade' ? RTYPE_TRADE : RTYPE_QUOTE);
  }

  /**
   * `onRecord` on plain fields (no object): what `TickgateStream` calls per record.
   * Records of instruments not held are not checked (null).
   * @param {number} feedId
   * @param {number} instrumentId
   * @param {number} seq
   * @param {number} flags
   * @param {number} [rtype] RTYPE_TRADE or RTYPE_QUOTE (default quote); no longer changes the
   *   outcome (any CONFLATED record may jump ahead, §6a), kept for v1 callers
   * @returns {null | {kind: 'violation', feedId: number, instrumentId: number, expected: number, got: number}}
   */
  check(feedId, instrumentId, seq, flags, rtype = RTYPE_QUOTE) {
    const s = this._state.get(seqKey(feedId, instrumentId));
    if (s === undefined) return null;
    const expected = s.expected;
    if ((flags & FLAG_SNAPSHOT) !== 0) {
      if (seq < expected) return null;
    } else if (seq === expected) {
      s.expected = expected + 1;
      return null;
    } else if (seq > expected) {
      s.expected = seq + 1;
      if ((flags & FLAG_CONFLATED) !== 0) return null;
    }
    this.violations++;
    return { kind: 'violation', feedId, instrumentId, expected, got: seq };
  }

  /**
   * A `gap` message: `from..=to` will not be delivered; `expected = to + 1`.
   * @param {{feed: string, symbol: string, from: number, to: number}} msg
   * @param {Map<string, number>|Record<string, number>} [instrumentIdBySymbol] symbol → id
   *   (default: what `onSubscribed` learned)
   * @param {number} [feedId] (default: learned from `onWelcome`)
   */
  onGap(msg, instrumentIdBySymbol, feedId) {
    this.gaps++;
    const fid = this._feedId(msg.feed, feedId);
    let iid;
    if (instrumentIdBySymbol instanceof Map) iid = instrumentIdBySymbol.get(msg.symbol);
    else if (instrumentIdBySymbol && typeof instrumentIdBySymbol === 'object') iid = instrumentIdBySymbol[msg.symbol];
    if (iid === undefined) iid = this._symbols.get(fid)?.get(msg.symbol);
    if (iid === undefined) return;
    const s = this._state.get(seqKey(fid, iid));
    if (s !== undefined && msg.to + 1 > s.expected) s.expected = msg.to + 1;
  }

  /**
   * A `reset` (a new epoch of the feed): `expected = 1` for every instrument of the feed held.
   * @param {number} feedId
   */
  onReset(feedId) {
    for (const [key, s] of this._state) {
      if (Math.floor(key / TWO32) === feedId) s.expected = 1;
    }
  }

  /**
   * Forgets every instrument of a feed (another epoch: the old seqs name nothing).
   * @param {number} feedId
   */
  clearFeed(feedId) {
    for (const key of [...this._state.keys()]) {
      if (Math.floor(key / TWO32) === feedId) this._state.delete(key);
    }
  }

  /**
   * The last seq held for an instrument (`expected - 1`), or undefined when not tracked.
   * @param {number} feedId
   * @param {number} instrumentId
   * @returns {number|undefined}
   */
  last(feedId, instrumentId) {
    const s = this._state.get(seqKey(feedId, instrumentId));
    return s === undefined ? undefined : s.expected - 1;
  }

  /**
   * The `resume` object of a subscribe: symbol → last seq held, for the symbols tracked.
   * @param {number} feedId
   * @param {Map<string, number>} symbols symbol → instrument id
   * @returns {Record<string, number>}
   */
  resumeFor(feedId, symbols) {
    /** @type {Record<string, number>} */
    const out = {};
    for (const [sym, id] of symbols) {
      const last = this.last(feedId, id);
      if (last !== undefined) out[sym] = last;
    }
    return out;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* One connection                                                                              */
/* ------------------------------------------------------------------------------------------ */

/** A listener that swallows `error` events (an EventEmitter-based socket throws without one). */
const noop = () => {};

/**
 * Reads the refusal of a handshake from a `ws` 'unexpected-response' (status and JSON body).
 * @param {any} res an http.IncomingMessage
 * @returns {Promise<HandshakeRefused>}
 */
function readRefusal(res) {
  return new Promise((resolve) => {
    /** @type {any[]} */
    const chunks = [];
    let size = 0;
    const done = () => {
      let text = '';
      try {
        text = new TextDecoder().decode(concatBytes(chunks));
      } catch {
        text = '';
      }
      /** @type {any} */
      let body = null;
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
      const error = body && typeof body.error === 'string' ? body.error : `http_${res.statusCode}`;
      const description =
        body && typeof body.error_description === 'string' ? body.error_description : text.slice(0, 200);
      resolve(new HandshakeRefused(res.statusCode, error, description));
    };
    res.on('data', (/** @type {Uint8Array} */ c) => {
      if (size < MAX_BODY_BYTES) chunks.push(c);
      size += c.length;
    });
    res.on('end', done);
    res.on('error', done);
    res.on('aborted', done);
  });
}

/** @param {Uint8Array[]} chunks */
function concatBytes(chunks) {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

/**
 * One stream socket, low level: requests with automatic ids, events for batches, server
 * messages and the close. Create it with `TickgateConnection.open`.
 *
 * Events (`CustomEvent`, `detail`): `batch` (Batch), `message` (every server JSON message, the
 * replies too, dispatched before the request's promise settles), `close` (StreamClosed),
 * `error` (a TickgateError: a server message that is not JSON, a malformed batch).
 */
export class TickgateConnection extends EventTarget {
  /**
   * Opens a stream socket and resolves after the server's `welcome`.
   *
   * @param {string|URL} url the stream URL, e.g. `ws://127.0.0.1:8080/v1/stream`
   * @param {{token?: string, ticket?: string, auth?: 'subprotocol'|'ticket', WebSocket?: any,
   *   signal?: AbortSignal, fetch?: typeof fetch, timeoutMs?: number, requestTimeoutMs?: number}} [options]
   *   `auth: 'subprotocol'` (default) offers `bearer.<token>`; `'ticket'` redeems `ticket`, or
   *   one fetched for `token`; `timeoutMs` (30000) bounds the wait for `welcome`,
   *   `requestTimeoutMs` (30000) the wait for each reply
   * @returns {Promise<TickgateConnection>}
   * @throws {HandshakeRefused} the server refused the upgrade (status 0 when unknown)
   * @throws {TokenError} fetching the ticket failed
   * @throws {StreamClosed} the socket closed before `welcome`
   */
  static async open(url, options = {}) {
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket (in Node: the `ws` package\'s class)');
    }
    const auth = options.auth ?? (options.ticket != null ? 'ticket' : 'subprotocol');
    const signal = options.signal;
    signal?.throwIfAborted();
    let target = wsUrlOf(url);
    const protocols = [SUBPROTOCOL];
    if (auth === 'subprotocol') {
      if (typeof options.token !== 'string' || options.token === '') throw new TypeError('open: a token is needed');
      protocols.push(`bearer.${options.token}`);
    } else if (auth === 'ticket') {
      let ticket = options.ticket;
      if (ticket == null) {
        if (typeof options.token !== 'string' || options.token === '') throw new TypeError('open: a ticket or a token is needed');
        ticket = await fetchTicket(httpBaseOf(target), options.token, { fetch: options.fetch, signal });
      }
      const u = new URL(target);
      u.searchParams.set('ticket', ticket);
      target = u.href;
    } else {
      throw new TypeError(`open: auth must be 'subprotocol' or 'ticket', got ${JSON.stringify(auth)}`);
    }
    signal?.throwIfAborted();
    const timeoutMs = options.timeoutMs ?? 30000;
    const requestTimeoutMs = options.requestTimeoutMs ?? 30000;

    return new Promise((resolve, reject) => {
      /** @type {any} */
      const sock = new WS(target, protocols);
      sock.binaryType = 'arraybuffer';
      sock.addEventListener('error', noop);
      let settled = false;
      let opened = false;
      /** @type {string|null} */
      let lastError = null;
      const timer = setTimeout(() => fail(new TickgateError(`no welcome within ${timeoutMs} ms`)), timeoutMs);
      const onAbort = () => fail(signal?.reason ?? new DOMException('aborted', 'AbortError'));
      signal?.addEventListener('abort', onAbort, { once: true });

      const cleanup = () => {
        settled = true;
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        sock.removeEventListener('open', onOpen);
        sock.removeEventListener('message', onMessage);
        sock.removeEventListener('error', onError);
        sock.removeEventListener('close', onClose);
      };
      /** @param {unknown} err */
      const fail = (err) => {
        if (settled) return;
        cleanup();
        try {
          if (typeof sock.terminate === 'function') sock.terminate();
          else sock.close();
        } catch {
          // already closed
        }
        reject(err);
      };
      const onOpen = () => {
        opened = true;
      };
      /** @param {any} ev */
      const onMessage = (ev) => {
        if (settled) return;
        const data = ev.data;
        /** @type {any} */
        let msg = null;
        if (typeof data === 'string') {
          try {
            msg = JSON.parse(data);
          } catch {
            msg = null;
          }
        }
        if (!msg || msg.type !== 'welcome') {
          fail(new TickgateError(`the server's first message is not a welcome`));
          return;
        }
        cleanup();
        resolve(new TickgateConnection(sock, msg, wsUrlOf(url), requestTimeoutMs));
      };
      /** @param {any} ev */
      const onError = (ev) => {
        lastError = ev?.message ?? ev?.error?.message ?? null;
      };
      /** @param {any} ev */
      const onClose = (ev) => {
        if (opened) fail(new StreamClosed(ev.code, ev.reason));
        else fail(new HandshakeRefused(0, 'handshake_failed', lastError ?? `the connection closed (${ev.code}) before the upgrade`));
      };
      sock.addEventListener('open', onOpen);
      sock.addEventListener('message', onMessage);
      sock.addEventListener('error', onError);
      sock.addEventListener('close', onClose);
      if (typeof sock.on === 'function') {
        // The `ws` package: the refusal's status and body are readable.
        sock.on('unexpected-response', (/** @type {any} */ req, /** @type {any} */ res) => {
          readRefusal(res).then((err) => {
            fail(err);
            try {
              req.destroy();
            } catch {
              // gone
            }
          });
        });
      }
    });
  }

  /**
   * Use `TickgateConnection.open`.
   * @param {any} socket an open WebSocket
   * @param {any} welcome the server's `welcome`
   * @param {string} url
   * @param {number} [requestTimeoutMs]
   */
  constructor(socket, welcome, url, requestTimeoutMs = 30000) {
    super();
    /** The underlying WebSocket. */
    this.socket = socket;
    /** The stream URL. */
    this.url = url;
    /** The server's `welcome` message. */
    this.welcome = welcome;
    /** Session id (keep it for support requests). @type {string} */
    this.session = welcome.session;
    /** The feeds the token may read: `[{name, id, epoch}]`. @type {{name: string, id: number, epoch: number}[]} */
    this.feeds = Array.isArray(welcome.feeds) ? welcome.feeds : [];
    /** The connection's token deadline (unix s), updated by `refresh`. @type {number} */
    this.exp = welcome.exp;
    /** True once the socket closed. */
    this.closed = false;
    /** The close, once closed. @type {StreamClosed|null} */
    this.closeInfo = null;
    this._requestTimeoutMs = requestTimeoutMs;
    this._nextId = 1;
    /** @type {Map<number, {resolve: (m: any) => void, reject: (e: any) => void, timer: any}>} */
    this._pending = new Map();
    socket.addEventListener('message', (/** @type {any} */ ev) => this._onMessage(ev.data));
    socket.addEventListener('close', (/** @type {any} */ ev) => this._onClose(ev.code, ev.reason));
  }

  /** @param {any} data */
  _onMessage(data) {
    if (typeof data === 'string') {
      /** @type {any} */
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        emit(this, 'error', new TickgateError('the server sent a text message that is not JSON'));
        return;
      }
      if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') {
        emit(this, 'error', new TickgateError('the server sent a JSON message without a type'));
        return;
      }
      if (msg.type === 'refreshed' && typeof msg.exp === 'number') this.exp = msg.exp;
      emit(this, 'message', msg);
      const p = typeof msg.id === 'number' ? this._pending.get(msg.id) : undefined;
      if (p) {
        this._pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.type === 'error') p.reject(new ControlError(String(msg.code), String(msg.message ?? ''), msg.id));
        else p.resolve(msg);
      }
      return;
    }
    let batch;
    try {
      batch = decodeBatch(data);
    } catch (err) {
      emit(this, 'error', err instanceof TickgateError ? err : new DecodeError(`a binary message could not be read: ${errMessage(err)}`));
      return;
    }
    emit(this, 'batch', batch);
  }

  /** @param {number} code @param {string} reason */
  _onClose(code, reason) {
    if (this.closed) return;
    this.closed = true;
    const sc = new StreamClosed(code, typeof reason === 'string' ? reason : String(reason ?? ''));
    this.closeInfo = sc;
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(sc);
    }
    this._pending.clear();
    emit(this, 'close', sc);
  }

  /**
   * Sends a request with the next id and resolves with its reply.
   * @param {Record<string, unknown>} body without `id`
   * @returns {Promise<any>}
   */
  request(body) {
    if (this.closed) return Promise.reject(this.closeInfo);
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this._pending.delete(id)) reject(new TickgateError(`no reply to ${String(body.op)} (id ${id}) within ${this._requestTimeoutMs} ms`));
      }, this._requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer });
      try {
        this.socket.send(JSON.stringify({ ...body, id }));
      } catch (err) {
        this._pending.delete(id);
        clearTimeout(timer);
        reject(new TickgateError(`sending ${String(body.op)} failed: ${errMessage(err)}`, { cause: err }));
      }
    });
  }

  /**
   * Subscribes to `symbols` of `feed` (§6).
   * @param {string} feed
   * @param {string[]} symbols
   * `maxRate` (v1.1, §6a): at most that many updates per second per instrument, for every
   * listed instrument (0: not throttled; the server takes 0 or 0.01..=1000 and refuses
   * anything else with `bad_request`); absent, the rates stay as they are. The reply echoes it
   * as `max_rate`.
   * @param {string} feed
   * @param {string[]} symbols
   * @param {{snapshot?: boolean, resume?: Record<string, number>, epoch?: number, maxRate?: number}} [options]
   * @returns {Promise<{type: 'subscribed', id: number, feed: string, epoch: number, instruments: {symbol: string, id: number, seq: number}[], max_rate?: number}>}
   * @throws {ControlError} `unknown_feed`, `insufficient_scope`, `unknown_symbol`, `bad_request`, ...
   */
  subscribe(feed, symbols, options = {}) {
    checkSymbols('subscribe', feed, symbols);
    /** @type {Record<string, unknown>} */
    const body = { op: 'subscribe', feed, symbols: [...symbols] };
    if (options.snapshot) body.snapshot = true;
    if (options.resume && Object.keys(options.resume).length > 0) {
      body.resume = options.resume;
      if (options.epoch != null) body.epoch = options.epoch;
    }
    if (options.maxRate != null) body.max_rate = checkNumber('subscribe', 'maxRate', options.maxRate);
    return this.request(body);
  }

  /**
   * Throttles (v1.1, §6a): `feed` + `symbols` (`['*']`: every subscribed instrument of the
   * feed) + `maxRate` change the rate of live subscriptions (0 lifts it); `maxBytesPerS` caps
   * the connection's bandwidth (0: no cap, else 1024..=2^40). Either part, or both.
   * @param {{feed?: string, symbols?: string[], maxRate?: number, maxBytesPerS?: number}} options
   * @returns {Promise<{type: 'throttled', id: number, feed?: string, symbols?: string[], max_rate?: number, max_bytes_per_s?: number}>}
   *   for `['*']`, `symbols` lists the instruments it applied to
   * @throws {ControlError} `bad_request` (a part missing, a value out of range, a symbol not
   *   subscribed), `unknown_feed`, `unknown_symbol`; nothing is applied then
   */
  throttle(options) {
    if (!options || typeof options !== 'object') return Promise.reject(new TypeError('throttle: options are needed'));
    /** @type {Record<string, unknown>} */
    const body = { op: 'throttle' };
    try {
      if (options.feed != null) {
        if (typeof options.feed !== 'string') throw new TypeError('throttle: feed must be a string');
        body.feed = options.feed;
      }
      if (options.symbols != null) {
        if (!Array.isArray(options.symbols) || options.symbols.some((s) => typeof s !== 'string')) {
          throw new TypeError('throttle: symbols must be an array of strings');
        }
        body.symbols = [...options.symbols];
      }
      if (options.maxRate != null) body.max_rate = checkNumber('throttle', 'maxRate', options.maxRate);
      if (options.maxBytesPerS != null) {
        if (!Number.isSafeInteger(options.maxBytesPerS)) throw new TypeError('throttle: maxBytesPerS must be an integer');
        body.max_bytes_per_s = options.maxBytesPerS;
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return this.request(body);
  }

  /**
   * Unsubscribes (§7); the reply lists the instruments that were subscribed.
   * @param {string} feed
   * @param {string[]} symbols
   * @returns {Promise<{type: 'unsubscribed', id: number, feed: string, symbols: string[], reason: string}>}
   */
  unsubscribe(feed, symbols) {
    checkSymbols('unsubscribe', feed, symbols);
    return this.request({ op: 'unsubscribe', feed, symbols: [...symbols] });
  }

  /**
   * Replaces the connection's token (§10); `exp` follows the new token.
   * @param {string} token
   * @returns {Promise<{type: 'refreshed', id: number, exp: number, feeds: {name: string, id: number, epoch: number}[]}>}
   * @throws {ControlError} `invalid_token`, `rate_limited`
   */
  refresh(token) {
    if (typeof token !== 'string' || token === '') return Promise.reject(new TypeError('refresh: token must be a non-empty string'));
    return this.request({ op: 'refresh', token });
  }

  /**
   * Application-level ping (not a heartbeat).
   * @returns {Promise<{ts: number, rttMs: number}>} `ts`: the server clock in ns (as a float)
   */
  async ping() {
    const t0 = now();
    const msg = await this.request({ op: 'ping' });
    return { ts: msg.ts, rttMs: now() - t0 };
  }

  /**
   * Closes the socket.
   * @param {number} [code]
   * @param {string} [reason]
   */
  close(code = 1000, reason = '') {
    if (this.closed) return;
    this.socket.close(code, reason);
  }
}

/**
 * @param {string} op
 * @param {unknown} feed
 * @param {unknown} symbols
 */
function checkSymbols(op, feed, symbols) {
  if (typeof feed !== 'string') throw new TypeError(`${op}: feed must be a string`);
  if (!Array.isArray(symbols) || symbols.some((s) => typeof s !== 'string')) {
    throw new TypeError(`${op}: symbols must be an array of strings`);
  }
}

/**
 * A finite number for a JSON field (the server checks its range).
 * @param {string} op
 * @param {string} name
 * @param {unknown} v
 * @returns {number}
 */
function checkNumber(op, name, v) {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`${op}: ${name} must be a finite number`);
  return v;
}

/** Monotonic milliseconds. */
function now() {
  return typeof performance !== 'undefined' ? performance.now() : Date.now();
}

/* ------------------------------------------------------------------------------------------ */
/* The self-healing stream                                                                     */
/* ------------------------------------------------------------------------------------------ */

/**
 * Waits `ms`, or less when `signal` aborts (then resolves false).
 * @param {number} ms
 * @param {AbortSignal} signal
 * @returns {Promise<boolean>}
 */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve(false);
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** HTTP statuses of a handshake or token refusal worth retrying. */
function retryableStatus(/** @type {number} */ status) {
  return status === 0 || status === 408 || status === 429 || status >= 500;
}

/**
 * A self-healing subscription to some symbols of one feed: connects, subscribes, checks
 * sequences, refreshes the token, reconnects with resume (same epoch) or snapshot (new epoch).
 *
 * Events (`CustomEvent`, `detail`): `connecting` {attempt}, `open` {welcome},
 * `subscribed` {msg}, `batch` {batch}, `gap` {msg}, `reset` {msg}, `token_expiring` {exp},
 * `refreshed` {exp}, `reconnecting` {delayMs, reason, error}, `reconnected` {welcome},
 * `error` {error}, `closed` {code, reason, final: true}.
 *
 * `maxRate` (v1.1, §6a): every subscribe of the stream, after a reconnect too, asks for at
 * most that many updates per second per instrument; `throttle(maxRate)` changes it.
 */
export class TickgateStream extends EventTarget {
  /**
   * @param {{url: string|URL, token: (() => Promise<string>|string)|string, feed: string, symbols: string[],
   *   snapshot?: boolean, maxRate?: number, auth?: 'subprotocol'|'ticket', reconnect?: boolean, WebSocket?: any,
   *   minBackoffMs?: number, maxBackoffMs?: number, refreshEarlyMs?: number, fetch?: typeof fetch}} options
   */
  constructor(options) {
    super();
    if (!options || typeof options !== 'object') throw new TypeError('TickgateStream: options are needed');
    const { url, token, feed, symbols } = options;
    if (!url) throw new TypeError('TickgateStream: url is needed');
    if (typeof token !== 'function' && (typeof token !== 'string' || token === '')) {
      throw new TypeError('TickgateStream: token must be a provider function (or a token string)');
    }
    if (typeof feed !== 'string' || feed === '') throw new TypeError('TickgateStream: feed must be a non-empty string');
    if (!Array.isArray(symbols) || symbols.length === 0 || symbols.some((s) => typeof s !== 'string')) {
      throw new TypeError('TickgateStream: symbols must be a non-empty array of strings');
    }
    /** The stream URL (absolute ws: or wss:). */
    this.url = wsUrlOf(url);
    /** The feed name. */
    this.feed = feed;
    /** The symbols subscribed. @type {string[]} */
    this.symbols = [...symbols];
    /** Ask for snapshots on a fresh subscribe. */
    this.snapshot = options.snapshot ?? true;
    /** Updates per second per instrument asked for in each subscribe (null: not sent). @type {number|null} */
    this.maxRate = options.maxRate == null ? null : checkNumber('TickgateStream', 'maxRate', options.maxRate);
    /** @type {'subprotocol'|'ticket'} */
    this.auth = options.auth ?? 'subprotocol';
    /** Reconnect after a retryable close. */
    this.reconnect = options.reconnect ?? true;
    this.minBackoffMs = options.minBackoffMs ?? 1000;
    this.maxBackoffMs = Math.max(options.maxBackoffMs ?? 30000, this.minBackoffMs);
    /** @type {number|undefined} refresh this long before `exp` even without `token_expiring` */
    this.refreshEarlyMs = options.refreshEarlyMs;
    this._WebSocket = options.WebSocket;
    this._fetch = options.fetch;
    /** @type {(() => Promise<string>|string)|null} */
    this._provider = typeof token === 'function' ? token : null;
    /** @type {string|null} */
    this._staticToken = typeof token === 'string' ? token : null;

    /** True between `start()` and the final `closed`. */
    this.running = false;
    /** The current connection. @type {TickgateConnection|null} */
    this.connection = null;
    /** Sequence state. */
    this.tracker = new SeqTracker();
    /** symbol → {id, seq} (seq: the last seq seen or held). @type {Map<string, {id: number, seq: number}>} */
    this.instruments = new Map();
    /** instrument id → symbol. @type {Map<number, string>} */
    this.instrumentsById = new Map();
    /** The feed's id. @type {number|null} */
    this.feedId = null;
    /** The feed's epoch the seqs belong to. @type {number|null} */
    this.epoch = null;
    /** The current session id. @type {string|null} */
    this.session = null;
    /** The current token deadline (unix s). @type {number|null} */
    this.exp = null;
    /** The last `welcome`. @type {any} */
    this.welcome = null;
    /** Counters. @type {{batches: number, records: number, refreshes: number, gaps: number, reconnects: number, violations: number, lastLatencyMs: number|null}} */
    this.stats = { batches: 0, records: 0, refreshes: 0, gaps: 0, reconnects: 0, violations: 0, lastLatencyMs: null };
    /** @type {{ac: AbortController}|null} */
    this._run = null;
    /** @type {Map<number, {id: number, seq: number}>} */
    this._byId = new Map();
    /** @type {number|null} epoch sent with the pending resume */
    this._resumeEpoch = null;
    /** @type {number|null} feed id of the pending subscribe */
    this._subFeedId = null;
    /** @type {number|null} reconnect_after_ms of the last `shutdown` */
    this._hint = null;
    /** @type {TickgateConnection|null} */
    this._refreshing = null;
    /** @type {any} */
    this._earlyTimer = null;
  }

  /** Starts the stream; a second call while running does nothing (one socket). */
  start() {
    if (this.running) return;
    this.running = true;
    const run = { ac: new AbortController() };
    this._run = run;
    this._loop(run).catch((err) => this._finish(run, 1006, errMessage(err), err));
  }

  /**
   * Sets the stream's `maxRate` (0: not throttled): on the live connection (a `throttle` of
   * every subscribed instrument, resolving with its reply; null when not connected) and in
   * the subscribes of later reconnects. A rate the server refuses rejects with ControlError
   * `bad_request` and leaves `maxRate` as it was.
   * @param {number} maxRate
   * @returns {Promise<any>}
   */
  async throttle(maxRate) {
    checkNumber('throttle', 'maxRate', maxRate);
    const conn = this.connection;
    let reply = null;
    if (conn && !conn.closed) reply = await conn.throttle({ feed: this.feed, symbols: ['*'], maxRate });
    this.maxRate = maxRate;
    return reply;
  }

  /** Stops the stream: closes the socket with 1000 and does not reconnect. */
  stop() {
    if (this._run) this._finish(this._run, 1000, 'stopped', null);
  }

  /** @param {{ac: AbortController}} run */
  _live(run) {
    return this.running && this._run === run;
  }

  /**
   * Ends the stream: `error` (when given), then the final `closed`.
   * @param {{ac: AbortController}} run
   * @param {number} code
   * @param {string} reason
   * @param {unknown} error
   */
  _finish(run, code, reason, error) {
    if (!this._live(run)) return;
    this.running = false;
    this._run = null;
    run.ac.abort();
    clearTimeout(this._earlyTimer);
    const conn = this.connection;
    this.connection = null;
    if (conn && !conn.closed) {
      try {
        conn.close(1000, '');
      } catch {
        // closed meanwhile
      }
    }
    if (error) emit(this, 'error', { error });
    emit(this, 'closed', { code, reason, final: true });
  }

  /** @returns {Promise<string>} */
  async _token() {
    if (this._staticToken !== null) return this._staticToken;
    const t = await /** @type {() => any} */ (this._provider)();
    if (typeof t !== 'string' || t === '') throw new TickgateError('the token provider returned no token');
    return t;
  }

  /** @param {number} failures consecutive failed attempts (>= 1) */
  _backoff(failures) {
    const cap = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** Math.min(failures, 30));
    return Math.round(this.minBackoffMs + Math.random() * (cap - this.minBackoffMs));
  }

  /** @param {{ac: AbortController}} run */
  async _loop(run) {
    let failures = 0;
    let authRefusals = 0;
    let connectedBefore = false;
    while (this._live(run)) {
      emit(this, 'connecting', { attempt: failures + 1 });
      /** @type {TickgateConnection} */
      let conn;
      try {
        let token;
        try {
          token = await this._token();
        } catch (err) {
          if (err instanceof TokenError && (err.status === 400 || err.status === 401)) {
            this._finish(run, 1006, err.message, err);
            return;
          }
          throw err;
        }
        if (!this._live(run)) return;
        conn = await TickgateConnection.open(this.url, {
          token,
          auth: this.auth,
          WebSocket: this._WebSocket,
          fetch: this._fetch,
          signal: run.ac.signal,
        });
      } catch (err) {
        if (!this._live(run)) return;
        const status = err instanceof HandshakeRefused || err instanceof TokenError ? err.status : 0;
        let fatal = err instanceof TypeError || /** @type {any} */ (err)?.name === 'SyntaxError';
        if (err instanceof HandshakeRefused || err instanceof TokenError) {
          if (status === 401 || status === 403) {
            authRefusals++;
            fatal = authRefusals >= 2 || this._provider === null;
          } else {
            fatal = !retryableStatus(status);
          }
        }
        if (fatal || !this.reconnect) {
          this._finish(run, 1006, errMessage(err), err);
          return;
        }
        failures++;
        const delayMs = this._backoff(failures);
        emit(this, 'reconnecting', { delayMs, reason: errMessage(err), error: err });
        await sleep(delayMs, run.ac.signal);
        continue;
      }
      if (!this._live(run)) {
        conn.close(1000, '');
        return;
      }
      authRefusals = 0;
      const closed = new Promise((resolve) =>
        conn.addEventListener('close', (ev) => resolve(/** @type {CustomEvent} */ (ev).detail), { once: true }),
      );
      this.connection = conn;
      this.welcome = conn.welcome;
      this.session = conn.session;
      this.exp = conn.exp;
      this._hint = null;
      conn.addEventListener('message', (ev) => this._onMessage(run, conn, /** @type {CustomEvent} */ (ev).detail));
      conn.addEventListener('batch', (ev) => this._onBatch(/** @type {CustomEvent} */ (ev).detail));
      conn.addEventListener('error', (ev) => emit(this, 'error', { error: /** @type {CustomEvent} */ (ev).detail }));
      this.tracker.onWelcome(conn.welcome);
      emit(this, 'open', { welcome: conn.welcome });
      if (connectedBefore) {
        this.stats.reconnects++;
        emit(this, 'reconnected', { welcome: conn.welcome });
      }
      connectedBefore = true;
      this._armEarlyRefresh(run, conn);

      /** @type {unknown} a subscribe that got no reply: reconnect */
      let lost = null;
      try {
        await this._subscribe(conn);
        failures = 0;
      } catch (err) {
        if (!this._live(run)) return;
        if (err instanceof ControlError) {
          // unknown_feed, insufficient_scope, unknown_symbol, ...: retrying cannot fix it.
          this._finish(run, 1000, errMessage(err), err);
          return;
        }
        if (!(err instanceof StreamClosed)) {
          lost = err;
          emit(this, 'error', { error: err });
          conn.close(1000, '');
        }
      }

      const sc = /** @type {StreamClosed} */ (await closed);
      if (!this._live(run)) return;
      this.connection = null;
      clearTimeout(this._earlyTimer);
      const retry = this.reconnect && (lost !== null || (!sc.revoked && (sc.retryable || (sc.expired && this._provider !== null))));
      if (!retry) {
        this._finish(run, sc.code, sc.reason, this.reconnect || !sc.retryable ? sc : null);
        return;
      }
      failures++;
      const delayMs = this._hint ?? this._backoff(failures);
      emit(this, 'reconnecting', { delayMs, reason: errMessage(lost ?? sc), error: lost ?? sc });
      await sleep(delayMs, run.ac.signal);
    }
  }

  /**
   * Subscribes on a new connection: `resume` + `epoch` when the feed's epoch is the one the
   * tracker's seqs belong to, else a snapshot (the feed's seq state dropped).
   * @param {TickgateConnection} conn
   */
  async _subscribe(conn) {
    const entry = conn.feeds.find((f) => f.name === this.feed);
    this._subFeedId = entry ? entry.id : this.feedId;
    this._resumeEpoch = null;
    /** @type {{snapshot?: boolean, resume?: Record<string, number>, epoch?: number, maxRate?: number}} */
    const opts = { snapshot: this.snapshot };
    if (this.maxRate != null) opts.maxRate = this.maxRate;
    if (entry && this.feedId !== null) {
      if (entry.id === this.feedId && entry.epoch === this.epoch) {
        /** @type {Map<string, number>} */
        const ids = new Map();
        for (const [sym, e] of this.instruments) ids.set(sym, e.id);
        const resume = this.tracker.resumeFor(this.feedId, ids);
        if (Object.keys(resume).length > 0) {
          opts.resume = resume;
          opts.epoch = entry.epoch;
          this._resumeEpoch = entry.epoch;
        }
      } else {
        this.tracker.clearFeed(this.feedId);
      }
    }
    return conn.subscribe(this.feed, this.symbols, opts);
  }

  /**
   * Server messages, handled synchronously (before any later batch is seen).
   * @param {{ac: AbortController}} run
   * @param {TickgateConnection} conn
   * @param {any} msg
   */
  _onMessage(run, conn, msg) {
    if (!this._live(run) || this.connection !== conn) return;
    switch (msg.type) {
      case 'subscribed': {
        if (msg.feed !== this.feed) return;
        const fid = /** @type {number} */ (this._subFeedId ?? this.feedId);
        if (this.feedId !== null && (this.feedId !== fid || this.epoch !== msg.epoch)) {
          // Another numbering than the seqs held (the feed restarted since the welcome).
          this.tracker.clearFeed(this.feedId);
        } else if (this._resumeEpoch !== null && this._resumeEpoch !== msg.epoch) {
          this.tracker.clearFeed(fid);
        }
        this._resumeEpoch = null;
        this.feedId = fid;
        this.epoch = msg.epoch;
        this.tracker.onSubscribed(msg, fid);
        this._byId.clear();
        this.instrumentsById.clear();
        for (const inst of msg.instruments ?? []) {
          let e = this.instruments.get(inst.symbol);
          if (!e) this.instruments.set(inst.symbol, (e = { id: inst.id, seq: inst.seq }));
          e.id = inst.id;
          e.seq = this.tracker.last(fid, inst.id) ?? inst.seq;
          this._byId.set(inst.id, e);
          this.instrumentsById.set(inst.id, inst.symbol);
        }
        emit(this, 'subscribed', { msg });
        return;
      }
      case 'gap': {
        if (msg.feed !== this.feed || this.feedId === null) return;
        this.tracker.onGap(msg, undefined, this.feedId);
        this.stats.gaps++;
        const e = this.instruments.get(msg.symbol);
        if (e) e.seq = this.tracker.last(this.feedId, e.id) ?? e.seq;
        emit(this, 'gap', { msg });
        return;
      }
      case 'reset': {
        if (msg.feed !== this.feed || this.feedId === null) return;
        this.tracker.onReset(this.feedId);
        this.epoch = msg.epoch;
        for (const e of this.instruments.values()) e.seq = 0;
        emit(this, 'reset', { msg });
        return;
      }
      case 'token_expiring':
        emit(this, 'token_expiring', { exp: msg.exp });
        if (this._provider) this._refresh(run, conn);
        return;
      case 'shutdown':
        if (typeof msg.reconnect_after_ms === 'number') this._hint = msg.reconnect_after_ms;
        return;
      case 'unsubscribed':
        if (msg.id == null && msg.feed === this.feed) {
          this._finish(
            run,
            1000,
            `unsubscribed by the server: ${msg.reason}`,
            new TickgateError(`the server ended the subscription to ${msg.feed} (${msg.reason})`),
          );
        }
        return;
      default:
    }
  }

  /**
   * Refreshes the connection's token with a new one from the provider; on failure dispatches
   * `error` and retries every 2 s until the token's deadline.
   * @param {{ac: AbortController}} run
   * @param {TickgateConnection} conn
   */
  async _refresh(run, conn) {
    if (this._refreshing === conn) return;
    this._refreshing = conn;
    const current = () => this._live(run) && this.connection === conn && !conn.closed;
    try {
      while (current()) {
        try {
          const token = await this._token();
          if (!current()) return;
          const msg = await conn.refresh(token);
          if (!current()) return;
          this.exp = msg.exp;
          this.stats.refreshes++;
          emit(this, 'refreshed', { exp: msg.exp });
          this._armEarlyRefresh(run, conn);
          return;
        } catch (err) {
          if (!current()) return;
          emit(this, 'error', { error: err });
          if (this.exp !== null && Date.now() >= this.exp * 1000) return;
          await sleep(2000, run.ac.signal);
        }
      }
    } finally {
      if (this._refreshing === conn) this._refreshing = null;
    }
  }

  /**
   * With `refreshEarlyMs`: a timer that refreshes that long before `exp`.
   * @param {{ac: AbortController}} run
   * @param {TickgateConnection} conn
   */
  _armEarlyRefresh(run, conn) {
    clearTimeout(this._earlyTimer);
    if (this.refreshEarlyMs == null || !this._provider || this.exp === null) return;
    const exp = this.exp;
    const delay = Math.max(0, exp * 1000 - this.refreshEarlyMs - Date.now());
    this._earlyTimer = setTimeout(() => {
      if (this.exp === exp) this._refresh(run, conn);
    }, delay);
  }

  /**
   * Checks every record in wire order, updates `instruments` and `stats`, then dispatches.
   * @param {any} batch
   */
  _onBatch(batch) {
    const kinds = batch[K_KINDS];
    const t = batch.trades;
    const q = batch.quotes;
    const tracker = this.tracker;
    const fid = this.feedId;
    let ti = 0;
    let qi = 0;
    for (let i = 0; i < kinds.length; i++) {
      const k = kinds[i];
      let f;
      let id;
      let seq;
      let flags;
      if (k === RTYPE_TRADE) {
        f = t.feedId[ti];
        id = t.instrumentId[ti];
        seq = t.seq[ti];
        flags = t.flags[ti];
        ti++;
      } else if (k === RTYPE_QUOTE) {
        f = q.feedId[qi];
        id = q.instrumentId[qi];
        seq = q.seq[qi];
        flags = q.flags[qi];
        qi++;
      } else {
        continue;
      }
      const v = tracker.check(f, id, seq, flags, k);
      if (v !== null) {
        this.stats.violations++;
        emit(this, 'error', { error: new SequenceError(v, f === fid ? this.instrumentsById.get(id) : undefined) });
      }
      if (f === fid && (flags & FLAG_SNAPSHOT) === 0) {
        const e = this._byId.get(id);
        if (e !== undefined) e.seq = seq;
      }
    }
    this.stats.batches++;
    this.stats.records += t.length + q.length;
    if (!Number.isNaN(batch.lastTsEventNs)) this.stats.lastLatencyMs = Date.now() - batch.lastTsEventNs / 1e6;
    emit(this, 'batch', { batch });
  }
}
