// Type definitions for tickgate-client (hand-written; the module is plain JavaScript).

/** The WebSocket subprotocol of protocol v1: `tickgate.v1`. */
export const SUBPROTOCOL: 'tickgate.v1';
/** Record type of a trade. */
export const RTYPE_TRADE: 1;
/** Record type of a quote. */
export const RTYPE_QUOTE: 2;
/** Record flag bit 0: a subscribe-time last value. */
export const FLAG_SNAPSHOT: 1;
/** Record flag bit 1: re-sent for a `resume`. */
export const FLAG_REPLAY: 2;
/** Record flag bit 2: a quote standing for the quotes a conflating connection skipped. */
export const FLAG_CONFLATED: 4;
/** Prices and sizes are fixed-point with 9 decimals. */
export const PRICE_SCALE: 1e9;

/* ---------------------------------------------------------------------------------------- */
/* Errors                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/** Base class of the stream's errors. */
export class TickgateError extends Error {
  constructor(message: string, options?: { cause?: unknown });
}

/** A token or ticket request failed. */
export class TokenError extends Error {
  constructor(status: number, error: string, description: string, options?: { cause?: unknown });
  /** HTTP status; 0 when no answer came (network failure). */
  status: number;
  /** OAuth2 `error` code (`invalid_client`, `invalid_scope`, ...), `network` or `invalid_response`. */
  error: string;
  /** The server's `error_description`. */
  description: string;
}

/** The server refused the WebSocket handshake. */
export class HandshakeRefused extends TickgateError {
  constructor(status: number, error: string, description: string, options?: { cause?: unknown });
  /** HTTP status; 0 when unknown (a browser hides it; a network failure). */
  status: number;
  /** The server's `error` code (`invalid_token`, `insufficient_scope`, ...), or `handshake_failed`. */
  error: string;
  /** The server's `error_description`, or what is known of the failure. */
  description: string;
}

/** The server answered a request with `error`. */
export class ControlError extends TickgateError {
  constructor(error: string, description: string, id: number | undefined);
  /** The error code: `unknown_feed`, `unknown_symbol`, `insufficient_scope`, `invalid_token`, `rate_limited`, `limit_exceeded`, `bad_request`. */
  error: string;
  /** Text for humans. */
  description: string;
  /** The request id. */
  id: number | undefined;
}

/** The socket closed. */
export class StreamClosed extends TickgateError {
  constructor(code: number, reason?: string);
  /** WebSocket close code. */
  code: number;
  /** Close reason. */
  reason: string;
  /** 4001 token expired. */
  readonly expired: boolean;
  /** 4003 token revoked. */
  readonly revoked: boolean;
  /** 4008 slow consumer. */
  readonly slowConsumer: boolean;
  /** 1001 server shutdown. */
  readonly shutdown: boolean;
  /** 1001, 1006, 1011, 4008, or 1008 "heartbeat timeout": worth reconnecting. */
  readonly retryable: boolean;
}

/** A malformed binary batch. */
export class DecodeError extends TickgateError {
  constructor(message: string);
}

/** A record broke the sequence rules (dispatched by TickgateStream as `error`). */
export class SequenceError extends TickgateError {
  constructor(v: { feedId: number; instrumentId: number; expected: number; got: number }, symbol?: string);
  feedId: number;
  instrumentId: number;
  symbol: string | undefined;
  expected: number;
  got: number;
}

/* ---------------------------------------------------------------------------------------- */
/* Tokens                                                                                    */
/* ---------------------------------------------------------------------------------------- */

export interface Token {
  /** The JWT. */
  accessToken: string;
  /** Lifetime in seconds. */
  expiresIn: number;
  /** Space-separated scopes. */
  scope: string;
  /** `Bearer`. */
  tokenType: string;
}

export interface ClientCredentialsOptions {
  clientId: string;
  clientSecret: string;
  /** Space-separated scopes to narrow the token to (e.g. `md:read:DEMO`). */
  scope?: string;
  fetch?: typeof fetch;
}

/** A function returning a fresh access token (JWT). */
export type TokenProvider = () => Promise<string> | string;

/**
 * Client-credentials token request, credentials in the form body (never HTTP Basic).
 * @throws TokenError
 */
export function fetchToken(tokenUrl: string | URL, options: ClientCredentialsOptions & { signal?: AbortSignal }): Promise<Token>;

/** A token provider fetching a new token on each call. */
export function clientCredentials(tokenUrl: string | URL, options: ClientCredentialsOptions): () => Promise<string>;

/**
 * A one-time stream ticket (`POST /v1/ticket`).
 * @throws TokenError
 */
export function fetchTicket(baseHttpUrl: string | URL, token: string, options?: { fetch?: typeof fetch; signal?: AbortSignal }): Promise<string>;

/** The absolute ws(s) URL of a stream URL (relative: against the page; http(s) → ws(s)). @throws TypeError */
export function wsUrlOf(url: string | URL): string;

/** The http(s) base of a server from any of its URLs (`ws://h:p/v1/stream` → `http://h:p`). */
export function httpBaseOf(url: string | URL): string;

/* ---------------------------------------------------------------------------------------- */
/* Batches                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/** Columns common to trades and quotes; index i is the i-th record of that type in wire order. */
interface CommonColumns {
  length: number;
  feedId: Uint16Array;
  instrumentId: Uint32Array;
  /** Exact up to 2^53. */
  seq: Float64Array;
  /** Nanoseconds as floats (about 256 ns resolution today); `records()` has exact bigints. */
  tsEventNs: Float64Array;
  tsRecvNs: Float64Array;
  flags: Uint8Array;
}

export interface TradeColumns extends CommonColumns {
  /** Already divided by 1e9. */
  price: Float64Array;
  /** Already divided by 1e9. */
  size: Float64Array;
  /** 0 unknown, 1 buyer aggressed, 2 seller aggressed. */
  side: Uint8Array;
}

export interface QuoteColumns extends CommonColumns {
  bidPx: Float64Array;
  bidSz: Float64Array;
  askPx: Float64Array;
  askSz: Float64Array;
}

interface RecordBase {
  feedId: number;
  instrumentId: number;
  seq: number;
  tsEventNs: bigint;
  tsRecvNs: bigint;
  flags: number;
  snapshot: boolean;
  replay: boolean;
  conflated: boolean;
}

export interface TradeRecord extends RecordBase {
  type: 'trade';
  price: number;
  size: number;
  side: number;
}

export interface QuoteRecord extends RecordBase {
  type: 'quote';
  bidPx: number;
  bidSz: number;
  askPx: number;
  askSz: number;
}

export type Record = TradeRecord | QuoteRecord;

/** What `encodeBatch` takes: a Record, with numbers or bigints for integers, booleans and times optional. */
export type RecordInput =
  | ({ type: 'trade'; price: number; size: number; side?: number } & RecordInputBase)
  | ({ type: 'quote'; bidPx: number; bidSz: number; askPx: number; askSz: number } & RecordInputBase);

interface RecordInputBase {
  feedId: number;
  instrumentId: number;
  seq: number | bigint;
  tsEventNs?: number | bigint;
  tsRecvNs?: number | bigint;
  flags?: number;
  snapshot?: boolean;
  replay?: boolean;
  conflated?: boolean;
}

export interface Batch {
  /** Server clock when the batch was handed to the socket. */
  sendTsNs: bigint;
  /** Records in the batch (unknown rtypes included). */
  count: number;
  trades: TradeColumns;
  quotes: QuoteColumns;
  /** `ts_event_ns` (float) of the last trade or quote in wire order; NaN when none. */
  lastTsEventNs: number;
  /** Trades and quotes in wire order (built once, then cached). */
  records(): Record[];
}

/** @throws DecodeError */
export function decodeBatch(input: ArrayBuffer | ArrayBufferView): Batch;

/** The inverse of decodeBatch. @throws TypeError | RangeError */
export function encodeBatch(records: Iterable<RecordInput>, sendTsNs?: bigint | number): Uint8Array;

/* ---------------------------------------------------------------------------------------- */
/* Sequence tracking                                                                         */
/* ---------------------------------------------------------------------------------------- */

export interface Violation {
  kind: 'violation';
  feedId: number;
  instrumentId: number;
  expected: number;
  got: number;
}

export interface FeedInfo {
  name: string;
  id: number;
  epoch: number;
}

export interface SubscribedInstrument {
  symbol: string;
  id: number;
  seq: number;
}

export interface WelcomeMsg {
  type: 'welcome';
  protocol: number;
  session: string;
  sub: string;
  exp: number;
  heartbeat_ms: number;
  feeds: FeedInfo[];
}

export interface SubscribedMsg {
  type: 'subscribed';
  id?: number;
  feed: string;
  epoch: number;
  instruments: SubscribedInstrument[];
  /** v1.1 (§6a): echoes the request's `max_rate` (0: not throttled); absent when it gave none. */
  max_rate?: number;
}

/** Reply to `throttle` (v1.1, §6a): the fields of the parts the request gave. */
export interface ThrottledMsg {
  type: 'throttled';
  id?: number;
  feed?: string;
  /** The instruments the new rate applies to (for `['*']`: every subscribed one of the feed). */
  symbols?: string[];
  max_rate?: number;
  max_bytes_per_s?: number;
}

export interface UnsubscribedMsg {
  type: 'unsubscribed';
  id?: number;
  feed: string;
  symbols: string[];
  reason: 'request' | 'scope_revoked' | string;
}

export interface RefreshedMsg {
  type: 'refreshed';
  id?: number;
  exp: number;
  feeds: FeedInfo[];
}

export interface GapMsg {
  type: 'gap';
  feed: string;
  symbol: string;
  from: number;
  to: number;
  /** `throttled` (v1.1, §6a): trades past the per-update bound of a throttled subscription. */
  reason: 'replay_unavailable' | 'slow_consumer' | 'source_gap' | 'throttled' | string;
}

export interface ResetMsg {
  type: 'reset';
  feed: string;
  epoch: number;
}

/** Any server JSON message. */
export type ServerMsg =
  | WelcomeMsg
  | SubscribedMsg
  | ThrottledMsg
  | UnsubscribedMsg
  | RefreshedMsg
  | GapMsg
  | ResetMsg
  | { type: 'token_expiring'; exp: number }
  | { type: 'shutdown'; reconnect_after_ms: number }
  | { type: 'pong'; id?: number; ts: number }
  | { type: 'error'; id?: number; code: string; message: string }
  | { type: string; [k: string]: unknown };

/**
 * Protocol §9 sequence rules, keyed by (feed id, instrument id). A CONFLATED record of any
 * type may jump ahead (a trade too, on a throttled subscription, §6a).
 */
export class SeqTracker {
  constructor();
  /** `gap` messages seen. */
  gaps: number;
  /** Violations seen. */
  violations: number;
  /** Learns feed name → id from a `welcome` (or `refreshed`). */
  onWelcome(msg: { feeds?: { name: string; id: number }[] }): void;
  /** `expected = seq + 1` for each instrument not already held. `feedId` defaults to the one learned by onWelcome. */
  onSubscribed(msg: Pick<SubscribedMsg, 'feed' | 'instruments'>, feedId?: number): void;
  /** Checks one record; null when it is in order. */
  onRecord(rec: { type?: string; feedId: number; instrumentId: number; seq: number; flags: number }): Violation | null;
  /** onRecord on plain fields; `rtype` RTYPE_TRADE or RTYPE_QUOTE (default quote; no longer changes the outcome). */
  check(feedId: number, instrumentId: number, seq: number, flags: number, rtype?: number): Violation | null;
  /** `expected = to + 1`. The symbol map defaults to what onSubscribed learned. */
  onGap(msg: Pick<GapMsg, 'feed' | 'symbol' | 'from' | 'to'>, instrumentIdBySymbol?: Map<string, number> | { [symbol: string]: number }, feedId?: number): void;
  /** `expected = 1` for every instrument of the feed. */
  onReset(feedId: number): void;
  /** Forgets every instrument of the feed. */
  clearFeed(feedId: number): void;
  /** Last seq held (`expected - 1`), undefined when not tracked. */
  last(feedId: number, instrumentId: number): number | undefined;
  /** `resume` object for a subscribe: symbol → last seq held. */
  resumeFor(feedId: number, symbols: Map<string, number>): { [symbol: string]: number };
}

/* ---------------------------------------------------------------------------------------- */
/* Connection                                                                                */
/* ---------------------------------------------------------------------------------------- */

export interface OpenOptions {
  token?: string;
  ticket?: string;
  /** `subprotocol` (default; `ticket` when only `ticket` is given). */
  auth?: 'subprotocol' | 'ticket';
  /** WebSocket class (default `globalThis.WebSocket`; in Node 20 pass `ws`). */
  WebSocket?: any;
  signal?: AbortSignal;
  /** For fetching a ticket. */
  fetch?: typeof fetch;
  /** Wait for `welcome` (default 30000 ms). */
  timeoutMs?: number;
  /** Wait for each reply (default 30000 ms). */
  requestTimeoutMs?: number;
}

export interface SubscribeOptions {
  snapshot?: boolean;
  resume?: { [symbol: string]: number };
  epoch?: number;
  /** v1.1 (§6a): at most this many updates per second per instrument (0: not throttled; 0.01..=1000). */
  maxRate?: number;
}

/** v1.1 (§6a): `feed` + `symbols` + `maxRate` and/or `maxBytesPerS`. */
export interface ThrottleOptions {
  feed?: string;
  /** `['*']`: every subscribed instrument of the feed. */
  symbols?: string[];
  /** Updates per second per instrument; 0 lifts the throttle. */
  maxRate?: number;
  /** Bandwidth cap of the connection, bytes/s: 0 (no cap) or 1024..=2^40. */
  maxBytesPerS?: number;
}

export interface ConnectionEventMap {
  batch: CustomEvent<Batch>;
  message: CustomEvent<ServerMsg>;
  close: CustomEvent<StreamClosed>;
  error: CustomEvent<TickgateError>;
}

/** One stream socket. */
export class TickgateConnection extends EventTarget {
  /**
   * Resolves after `welcome`.
   * @throws HandshakeRefused | TokenError | StreamClosed | TypeError
   */
  static open(url: string | URL, options?: OpenOptions): Promise<TickgateConnection>;
  constructor(socket: any, welcome: WelcomeMsg, url: string, requestTimeoutMs?: number);
  readonly socket: any;
  readonly url: string;
  welcome: WelcomeMsg;
  session: string;
  feeds: FeedInfo[];
  /** Token deadline (unix s). */
  exp: number;
  closed: boolean;
  closeInfo: StreamClosed | null;
  /** Sends `{...body, id}` and resolves with the reply. */
  request(body: { op: string; [k: string]: unknown }): Promise<any>;
  /** @throws ControlError */
  subscribe(feed: string, symbols: string[], options?: SubscribeOptions): Promise<SubscribedMsg>;
  unsubscribe(feed: string, symbols: string[]): Promise<UnsubscribedMsg>;
  /** v1.1 (§6a). @throws ControlError (`bad_request`, `unknown_feed`, `unknown_symbol`) | TypeError */
  throttle(options: ThrottleOptions): Promise<ThrottledMsg>;
  /** @throws ControlError */
  refresh(token: string): Promise<RefreshedMsg>;
  ping(): Promise<{ ts: number; rttMs: number }>;
  close(code?: number, reason?: string): void;
  addEventListener<K extends keyof ConnectionEventMap>(type: K, listener: (ev: ConnectionEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ConnectionEventMap>(type: K, listener: (ev: ConnectionEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/* ---------------------------------------------------------------------------------------- */
/* Stream                                                                                    */
/* ---------------------------------------------------------------------------------------- */

export interface StreamOptions {
  /** Stream URL, e.g. `ws://127.0.0.1:8080/v1/stream`. */
  url: string | URL;
  /** Token provider, called at each connect and refresh (a fixed token string also works: no refresh then). */
  token: TokenProvider | string;
  feed: string;
  symbols: string[];
  /** Snapshot on a fresh subscribe (default true). */
  snapshot?: boolean;
  /** v1.1 (§6a): `maxRate` of every subscribe, after reconnects too (default: not sent). */
  maxRate?: number;
  /** Default `subprotocol`. */
  auth?: 'subprotocol' | 'ticket';
  /** Default true. */
  reconnect?: boolean;
  WebSocket?: any;
  /** Default 1000. */
  minBackoffMs?: number;
  /** Default 30000. */
  maxBackoffMs?: number;
  /** Also refresh this long before `exp`, without waiting for `token_expiring`. */
  refreshEarlyMs?: number;
  /** For tickets. */
  fetch?: typeof fetch;
}

export interface StreamStats {
  batches: number;
  records: number;
  refreshes: number;
  gaps: number;
  reconnects: number;
  violations: number;
  /** now − ts_event_ns of the last record of the last batch, ms; null before any. */
  lastLatencyMs: number | null;
}

export interface StreamEventMap {
  connecting: CustomEvent<{ attempt: number }>;
  open: CustomEvent<{ welcome: WelcomeMsg }>;
  subscribed: CustomEvent<{ msg: SubscribedMsg }>;
  batch: CustomEvent<{ batch: Batch }>;
  gap: CustomEvent<{ msg: GapMsg }>;
  reset: CustomEvent<{ msg: ResetMsg }>;
  token_expiring: CustomEvent<{ exp: number }>;
  refreshed: CustomEvent<{ exp: number }>;
  reconnecting: CustomEvent<{ delayMs: number; reason: string; error: unknown }>;
  reconnected: CustomEvent<{ welcome: WelcomeMsg }>;
  error: CustomEvent<{ error: unknown }>;
  /**
   * The end: `code` is the server's close code, 1000 after stop() or a refusal decided here
   * (ControlError at subscribe), 1006 when no socket was open (token or handshake refused).
   */
  closed: CustomEvent<{ code: number; reason: string; final: true }>;
}

/** A self-healing subscription. */
export class TickgateStream extends EventTarget {
  constructor(options: StreamOptions);
  readonly url: string;
  readonly feed: string;
  readonly symbols: string[];
  snapshot: boolean;
  /** The `maxRate` of the subscribes (null: not sent); set it with throttle(). */
  readonly maxRate: number | null;
  auth: 'subprotocol' | 'ticket';
  reconnect: boolean;
  minBackoffMs: number;
  maxBackoffMs: number;
  refreshEarlyMs: number | undefined;
  /** Idempotent: one socket. */
  start(): void;
  /**
   * v1.1 (§6a): a new `maxRate` for the live connection (resolves with the `throttled`
   * reply, or null when not connected) and the reconnects to come.
   * @throws ControlError | TypeError
   */
  throttle(maxRate: number): Promise<ThrottledMsg | null>;
  /** Closes with 1000, no reconnect; dispatches the final `closed`. */
  stop(): void;
  readonly running: boolean;
  readonly connection: TickgateConnection | null;
  readonly tracker: SeqTracker;
  /** symbol → {id, seq}: seq is the last seq seen or held. */
  readonly instruments: Map<string, { id: number; seq: number }>;
  readonly instrumentsById: Map<number, string>;
  readonly feedId: number | null;
  readonly epoch: number | null;
  readonly session: string | null;
  /** Token deadline (unix s). */
  readonly exp: number | null;
  readonly welcome: WelcomeMsg | null;
  readonly stats: StreamStats;
  addEventListener<K extends keyof StreamEventMap>(type: K, listener: (ev: StreamEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof StreamEventMap>(type: K, listener: (ev: StreamEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}
