#!/usr/bin/env node
// Decode throughput on 2000-record mixed batches (about half trades, half quotes, in random
// order): records per second through the columns (decodeBatch) and through records()
// (decodeBatch + objects with bigint times). Prints one JSON line.
//
//   node bench/decode.mjs [seconds per path, default 2]
import { decodeBatch, encodeBatch } from '../src/tickgate-client.js';

const RECORDS = 2000;
const seconds = Number(process.argv[2] ?? 2);

function batch() {
  let seed = 42;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const seqs = new Map();
  const recs = [];
  for (let i = 0; i < RECORDS; i++) {
    const instrumentId = 1 + Math.floor(rand() * 50);
    const seq = (seqs.get(instrumentId) ?? 1000) + 1;
    seqs.set(instrumentId, seq);
    const ts = 1767225600000000000n + BigInt(i) * 1000n;
    const px = 100 + Math.round(rand() * 10000) / 100;
    recs.push(
      rand() < 0.5
        ? { type: 'trade', feedId: 1, instrumentId, seq, tsEventNs: ts, tsRecvNs: ts + 500n, price: px, size: 100, side: 1, flags: 0 }
        : { type: 'quote', feedId: 1, instrumentId, seq, tsEventNs: ts, tsRecvNs: ts + 500n, bidPx: px, bidSz: 300, askPx: px + 0.01, askSz: 200, flags: 0 },
    );
  }
  return encodeBatch(recs, 1767225600000001000n);
}

/**
 * @param {(bytes: ArrayBuffer) => number} fn
 * @param {ArrayBuffer} bytes
 */
function measure(fn, bytes) {
  let sink = 0;
  for (let i = 0; i < 200; i++) sink += fn(bytes); // warm-up
  let batches = 0;
  const t0 = process.hrtime.bigint();
  const end = t0 + BigInt(Math.round(seconds * 1e9));
  let now = t0;
  while (now < end) {
    for (let i = 0; i < 20; i++) sink += fn(bytes);
    batches += 20;
    now = process.hrtime.bigint();
  }
  const s = Number(now - t0) / 1e9;
  if (sink === 0) throw new Error('nothing decoded');
  return Math.round((batches * RECORDS) / s);
}

const bytes = batch();
const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
const columns = measure((b) => {
  const d = decodeBatch(b);
  return d.trades.price[0] + d.quotes.bidPx[d.quotes.length - 1];
}, buf);
const objects = measure((b) => {
  const r = decodeBatch(b).records();
  return r.length;
}, buf);
console.log(
  JSON.stringify({
    bench: 'decode',
    records_per_batch: RECORDS,
    batch_bytes: buf.byteLength,
    columns_records_per_s: columns,
    records_records_per_s: objects,
    node: process.version,
  }),
);
