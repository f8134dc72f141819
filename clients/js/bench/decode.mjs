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
 * @template T
 * @param {(input: T) => number} fn
 * @param {T} bytes
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
// The peer, in the same run: the same records as the JSON text most market-data WebSocket
// APIs send (one object per record, prices and sizes as decimal strings), read with
// JSON.parse, the usual way a browser or Node app reads such a feed.
const json = JSON.stringify(
  decodeBatch(buf).records().map((r) => {
    const common = { feed: r.feedId, instrument: r.instrumentId, seq: r.seq, ts_event: String(r.tsEventNs), ts_recv: String(r.tsRecvNs) };
    return r.type === 'trade'
      ? { type: 'trade', ...common, price: r.price.toFixed(9), size: r.size.toFixed(9), side: r.side }
      : { type: 'quote', ...common, bid: r.bidPx.toFixed(9), bid_size: r.bidSz.toFixed(9), ask: r.askPx.toFixed(9), ask_size: r.askSz.toFixed(9) };
  }),
);
const jsonPeer = measure((text) => JSON.parse(text).length, json);
console.log(
  JSON.stringify({
    bench: 'decode',
    records_per_batch: RECORDS,
    batch_bytes: buf.byteLength,
    columns_records_per_s: columns,
    records_records_per_s: objects,
    json_peer_records_per_s: jsonPeer,
    columns_vs_json: Math.round((columns / jsonPeer) * 10) / 10,
    records_vs_json: Math.round((objects / jsonPeer) * 100) / 100,
    node: process.version,
  }),
);
