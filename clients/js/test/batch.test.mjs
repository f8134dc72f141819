import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  DecodeError,
  FLAG_CONFLATED,
  FLAG_REPLAY,
  FLAG_SNAPSHOT,
  PRICE_SCALE,
  RTYPE_QUOTE,
  RTYPE_TRADE,
  TickgateError,
  decodeBatch,
  encodeBatch,
} from '../src/tickgate-client.js';

const T0 = 1767225600123456789n;

/** A trade and a quote of two instruments, interleaved, with every flag. */
function sample() {
  return [
    { type: 'trade', feedId: 1, instrumentId: 7, seq: 41, tsEventNs: T0, tsRecvNs: T0 + 5n, price: 101.25, size: 300, side: 1, flags: FLAG_SNAPSHOT },
    { type: 'quote', feedId: 1, instrumentId: 7, seq: 42, tsEventNs: T0 + 10n, tsRecvNs: T0 + 11n, bidPx: 101.2, bidSz: 500, askPx: 101.3, askSz: 700.5, flags: 0 },
    { type: 'quote', feedId: 3, instrumentId: 4294967295, seq: 2 ** 53 - 1, tsEventNs: T0 + 20n, tsRecvNs: T0 + 21n, bidPx: -0.000000001, bidSz: 0, askPx: 0.000000001, askSz: 1e-9, flags: FLAG_CONFLATED },
    { type: 'trade', feedId: 65535, instrumentId: 8, seq: 1, tsEventNs: -5n, tsRecvNs: 0n, price: -42.5, size: 0.001, side: 2, flags: FLAG_REPLAY },
  ];
}

test('constants', () => {
  assert.equal(RTYPE_TRADE, 1);
  assert.equal(RTYPE_QUOTE, 2);
  assert.equal(FLAG_SNAPSHOT, 1);
  assert.equal(FLAG_REPLAY, 2);
  assert.equal(FLAG_CONFLATED, 4);
  assert.equal(PRICE_SCALE, 1e9);
});

test('encode then decode gives the records back, in wire order, with columns per type', () => {
  const recs = sample();
  const bytes = encodeBatch(recs, 99n);
  assert.equal(bytes.byteLength, 16 + 56 + 72 + 72 + 56);
  const b = decodeBatch(bytes);
  assert.equal(b.sendTsNs, 99n);
  assert.equal(b.count, 4);
  assert.equal(b.trades.length, 2);
  assert.equal(b.quotes.length, 2);
  assert.ok(b.trades.feedId instanceof Uint16Array);
  assert.ok(b.trades.instrumentId instanceof Uint32Array);
  assert.ok(b.trades.seq instanceof Float64Array);
  assert.ok(b.trades.price instanceof Float64Array);
  assert.ok(b.trades.side instanceof Uint8Array);
  assert.ok(b.quotes.askSz instanceof Float64Array);
  assert.ok(b.quotes.flags instanceof Uint8Array);
  assert.deepEqual([...b.trades.seq], [41, 1]);
  assert.deepEqual([...b.trades.price], [101.25, -42.5]);
  assert.deepEqual([...b.trades.size], [300, 0.001]);
  assert.deepEqual([...b.trades.side], [1, 2]);
  assert.deepEqual([...b.trades.feedId], [1, 65535]);
  assert.deepEqual([...b.quotes.instrumentId], [7, 4294967295]);
  assert.deepEqual([...b.quotes.seq], [42, 2 ** 53 - 1]);
  assert.deepEqual([...b.quotes.bidPx], [101.2, -1e-9]);
  assert.deepEqual([...b.quotes.askSz], [700.5, 1e-9]);
  assert.equal(b.trades.tsEventNs[0], Number(T0));
  assert.equal(b.trades.tsEventNs[1], -5);

  const out = b.records();
  assert.equal(out, b.records(), 'records() is built once');
  assert.deepEqual(
    out.map((r) => r.type),
    ['trade', 'quote', 'quote', 'trade'],
  );
  for (const [i, r] of out.entries()) {
    const want = recs[i];
    for (const [k, v] of Object.entries(want)) assert.deepEqual(r[k], v, `record ${i} field ${k}`);
    assert.equal(r.snapshot, (want.flags & FLAG_SNAPSHOT) !== 0);
    assert.equal(r.replay, (want.flags & FLAG_REPLAY) !== 0);
    assert.equal(r.conflated, (want.flags & FLAG_CONFLATED) !== 0);
  }
  assert.equal(typeof out[0].tsEventNs, 'bigint');
  assert.equal(out[0].tsEventNs, T0, 'bigint times are exact');
  // The decoded records encode to the same bytes.
  assert.deepEqual(encodeBatch(out, b.sendTsNs), bytes);
});

test('boolean flags are ORed into flags when encoding', () => {
  const b = decodeBatch(encodeBatch([{ type: 'trade', feedId: 1, instrumentId: 1, seq: 1, price: 1, size: 1, snapshot: true, replay: true }]));
  assert.equal(b.trades.flags[0], FLAG_SNAPSHOT | FLAG_REPLAY);
});

test('decodes from an unaligned view (a slice of a larger buffer)', () => {
  const bytes = encodeBatch(sample(), 7n);
  const big = new Uint8Array(bytes.byteLength + 3);
  big.set(bytes, 3);
  const b = decodeBatch(big.subarray(3));
  assert.equal(b.sendTsNs, 7n);
  assert.deepEqual([...b.quotes.seq], [42, 2 ** 53 - 1]);
  assert.deepEqual(decodeBatch(Buffer.from(bytes)).records(), decodeBatch(bytes.buffer).records());
  assert.deepEqual(decodeBatch(new DataView(big.buffer, 3)).records(), decodeBatch(bytes).records());
});

test('an empty batch decodes to empty columns', () => {
  const b = decodeBatch(encodeBatch([]));
  assert.equal(b.count, 0);
  assert.equal(b.trades.length, 0);
  assert.equal(b.quotes.length, 0);
  assert.deepEqual(b.records(), []);
});

test('records of an unknown rtype are skipped by their len', () => {
  const base = encodeBatch(sample().slice(0, 2));
  // Insert a 40-byte record of rtype 9 between the two records.
  const unknown = new Uint8Array(40);
  unknown[0] = 40;
  unknown[1] = 9;
  const bytes = new Uint8Array(base.byteLength + 40);
  bytes.set(base.subarray(0, 16 + 56), 0);
  bytes.set(unknown, 16 + 56);
  bytes.set(base.subarray(16 + 56), 16 + 56 + 40);
  new DataView(bytes.buffer).setUint16(2, 3, true);
  const b = decodeBatch(bytes);
  assert.equal(b.count, 3);
  assert.deepEqual(
    b.records().map((r) => r.type),
    ['trade', 'quote'],
  );
  assert.equal(b.quotes.seq[0], 42);
});

test('a record longer than its layout (a future extension) is read and skipped past', () => {
  const base = encodeBatch(sample().slice(0, 2));
  const bytes = new Uint8Array(base.byteLength + 8);
  bytes.set(base.subarray(0, 16 + 56), 0);
  bytes.set(base.subarray(16 + 56), 16 + 64);
  bytes[16] = 64;
  const b = decodeBatch(bytes);
  assert.equal(b.trades.price[0], 101.25);
  assert.equal(b.quotes.askPx[0], 101.3);
});

/**
 * @param {(b: Uint8Array, dv: DataView) => Uint8Array|void} mutate
 * @param {RegExp} message
 */
function rejects(mutate, message) {
  const b = encodeBatch(sample());
  const out = mutate(b, new DataView(b.buffer, b.byteOffset, b.byteLength)) ?? b;
  assert.throws(
    () => decodeBatch(out),
    (err) => err instanceof DecodeError && err instanceof TickgateError && message.test(err.message),
  );
}

test('malformed batches throw DecodeError', () => {
  rejects(() => new Uint8Array(0), /truncated batch header: 0 bytes/);
  rejects((b) => b.subarray(0, 15), /truncated batch header: 15 bytes/);
  rejects((b) => {
    b[0] = 2;
  }, /unsupported batch version 2/);
  rejects((b) => {
    b[0] = 0;
  }, /unsupported batch version 0/);
  rejects((b) => b.subarray(0, 16 + 20), /truncated record 0 of 4/);
  rejects((b) => b.subarray(0, 16 + 56 + 40), /record 1 at offset 72: len 72 runs past the end/);
  rejects((b) => {
    b[16] = 24;
  }, /len 24 is not a multiple of 8 of at least 32/);
  rejects((b) => {
    b[16] = 57;
  }, /len 57 is not a multiple of 8/);
  rejects((b) => {
    b[16] = 0;
  }, /len 0 is not a multiple of 8/);
  rejects((b) => {
    b[16] = 48;
  }, /a trade takes 56 bytes, len is 48/);
  rejects((b) => {
    b[16 + 56] = 64;
  }, /a quote takes 72 bytes, len is 64/);
  rejects((b) => {
    b[16] = 248;
    return b.subarray(0, 16 + 56 + 72);
  }, /record 0 at offset 16: len 248 runs past the end of the batch \(144 bytes\)/);
  rejects((b, dv) => {
    dv.setUint16(2, 3, true);
  }, /count mismatch: the header counts 3 records, 56 bytes follow them/);
  rejects((b, dv) => {
    dv.setUint16(2, 5, true);
  }, /truncated record 4 of 5/);
  rejects((b) => {
    const longer = new Uint8Array(b.byteLength + 8);
    longer.set(b);
    return longer;
  }, /count mismatch: the header counts 4 records, 8 bytes follow them/);
  for (const bad of [null, undefined, 'abc', 42, {}, [1, 2, 3]]) {
    assert.throws(() => decodeBatch(/** @type {any} */ (bad)), DecodeError);
  }
});

test('encodeBatch refuses what it cannot encode', () => {
  const ok = { type: 'trade', feedId: 1, instrumentId: 1, seq: 1, price: 1, size: 1 };
  assert.throws(() => encodeBatch(/** @type {any} */ (null)), TypeError);
  assert.throws(() => encodeBatch([/** @type {any} */ ({ ...ok, type: 'order' })]), TypeError);
  assert.throws(() => encodeBatch([/** @type {any} */ (7)]), TypeError);
  assert.throws(() => encodeBatch([{ ...ok, feedId: 65536 }]), RangeError);
  assert.throws(() => encodeBatch([{ ...ok, instrumentId: -1 }]), RangeError);
  assert.throws(() => encodeBatch([{ ...ok, seq: -1 }]), RangeError);
  assert.throws(() => encodeBatch([{ ...ok, seq: 1.5 }]), TypeError);
  assert.throws(() => encodeBatch([{ ...ok, size: -1 }]), RangeError);
  assert.throws(() => encodeBatch([/** @type {any} */ ({ ...ok, price: '1' })]), TypeError);
  assert.throws(() => encodeBatch([{ ...ok, price: Number.NaN }]), TypeError);
  assert.throws(() => encodeBatch([{ ...ok, tsEventNs: 2n ** 63n }]), RangeError);
  assert.throws(() => encodeBatch([ok], -1n), RangeError);
  assert.throws(() => encodeBatch(new Array(65536).fill(ok)), RangeError);
  assert.equal(decodeBatch(encodeBatch(new Array(65535).fill(ok))).trades.length, 65535);
});
