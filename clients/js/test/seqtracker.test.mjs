import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FLAG_CONFLATED, FLAG_REPLAY, FLAG_SNAPSHOT, RTYPE_TRADE, SeqTracker, decodeBatch, encodeBatch } from '../src/tickgate-client.js';

const WELCOME = { type: 'welcome', feeds: [{ name: 'DEMO', id: 1, epoch: 5 }, { name: 'XNAS', id: 2, epoch: 9 }] };
const SUB = {
  type: 'subscribed',
  id: 1,
  feed: 'DEMO',
  epoch: 5,
  instruments: [
    { symbol: 'AAPL', id: 1, seq: 10 },
    { symbol: 'MSFT', id: 2, seq: 0 },
  ],
};

/** @param {number} seq @param {number} [flags] @param {'trade'|'quote'} [type] @param {number} [iid] */
const rec = (seq, flags = 0, type = 'trade', iid = 1) => ({ type, feedId: 1, instrumentId: iid, seq, flags });

function tracker() {
  const t = new SeqTracker();
  t.onWelcome(WELCOME);
  t.onSubscribed(SUB);
  return t;
}

test('subscribed: expected = seq + 1; nothing held before', () => {
  const t = new SeqTracker();
  assert.equal(t.last(1, 1), undefined);
  t.onSubscribed(SUB, 1);
  assert.equal(t.last(1, 1), 10);
  assert.equal(t.last(1, 2), 0);
  assert.equal(t.onRecord(rec(11)), null);
  assert.equal(t.onRecord(rec(1, 0, 'quote', 2)), null);
  assert.equal(t.last(1, 1), 11);
  assert.equal(t.violations, 0);
});

test('subscribed: the feed id comes from onWelcome, else it must be given', () => {
  assert.throws(() => new SeqTracker().onSubscribed(SUB), TypeError);
  const t = tracker();
  assert.equal(t.last(1, 1), 10);
  t.onSubscribed({ ...SUB, feed: 'XNAS' });
  assert.equal(t.last(2, 1), 10, 'keyed by feed and instrument');
});

test('subscribed again: an instrument already held keeps its expected', () => {
  const t = tracker();
  t.onRecord(rec(11));
  t.onRecord(rec(12, 0, 'quote'));
  t.onSubscribed({ ...SUB, instruments: [{ symbol: 'AAPL', id: 1, seq: 12 }, { symbol: 'GOOG', id: 3, seq: 4 }] });
  assert.equal(t.last(1, 1), 12);
  assert.equal(t.last(1, 3), 4);
  assert.equal(t.onRecord(rec(13)), null);
});

test('live records must carry expected; trades and quotes share the numbering', () => {
  const t = tracker();
  assert.equal(t.onRecord(rec(11, 0, 'trade')), null);
  assert.equal(t.onRecord(rec(12, 0, 'quote')), null);
  assert.equal(t.onRecord(rec(13, 0, 'trade')), null);
  assert.equal(t.last(1, 1), 13);
});

test('snapshot records do not move expected; one at or above expected is a violation', () => {
  const t = tracker();
  assert.equal(t.onRecord(rec(9, FLAG_SNAPSHOT)), null);
  assert.equal(t.onRecord(rec(10, FLAG_SNAPSHOT, 'quote')), null);
  assert.equal(t.last(1, 1), 10);
  assert.equal(t.onRecord(rec(11)), null, 'live starts at seq + 1');
  assert.deepEqual(t.onRecord(rec(12, FLAG_SNAPSHOT)), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 12, got: 12 });
  assert.equal(t.violations, 1);
});

test('replay records are checked like live ones', () => {
  const t = tracker();
  assert.equal(t.onRecord(rec(11, FLAG_REPLAY)), null);
  assert.equal(t.onRecord(rec(12, FLAG_REPLAY, 'quote')), null);
  assert.deepEqual(t.onRecord(rec(14, FLAG_REPLAY)), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 13, got: 14 });
});

test('a conflated record of either type may jump ahead (v1.1 §6a); an unflagged jump may not', () => {
  const t = tracker();
  assert.equal(t.onRecord(rec(20, FLAG_CONFLATED, 'quote')), null);
  assert.equal(t.last(1, 1), 20);
  assert.equal(t.onRecord(rec(21)), null);
  // a throttled subscription: a trade after replaced quotes carries CONFLATED
  assert.equal(t.onRecord(rec(25, FLAG_CONFLATED, 'trade')), null);
  assert.equal(t.last(1, 1), 25);
  assert.equal(t.check(1, 1, 30, FLAG_CONFLATED, RTYPE_TRADE), null, 'check() on plain fields too');
  assert.equal(t.violations, 0);
  assert.deepEqual(t.onRecord(rec(33)), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 31, got: 33 }, 'unflagged trade');
  assert.deepEqual(t.onRecord(rec(36, 0, 'quote')), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 34, got: 36 }, 'unflagged quote');
  assert.deepEqual(t.onRecord(rec(20, FLAG_CONFLATED, 'trade')), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 37, got: 20 }, 'never backwards');
  assert.equal(t.violations, 3);
  // a gap with reason throttled moves expected like any gap
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'AAPL', from: 37, to: 40, reason: 'throttled' });
  assert.equal(t.onRecord(rec(41)), null);
});

test('gap: expected = to + 1, by the symbol map given or learned', () => {
  const t = tracker();
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'AAPL', from: 11, to: 20, reason: 'replay_unavailable' }, new Map([['AAPL', 1]]));
  assert.equal(t.last(1, 1), 20);
  assert.equal(t.onRecord(rec(21)), null);
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'MSFT', from: 1, to: 3, reason: 'source_gap' });
  assert.equal(t.onRecord(rec(4, 0, 'quote', 2)), null);
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'AAPL', from: 22, to: 25, reason: 'slow_consumer' }, { AAPL: 1 }, 1);
  assert.equal(t.onRecord(rec(26)), null);
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'AAPL', from: 3, to: 5, reason: 'replay_unavailable' });
  assert.equal(t.last(1, 1), 26, 'an old gap never moves expected back');
  t.onGap({ type: 'gap', feed: 'DEMO', symbol: 'NOPE', from: 1, to: 5, reason: 'source_gap' });
  assert.equal(t.gaps, 5);
  assert.equal(t.violations, 0);
});

test('reset: expected = 1 for every instrument of that feed only', () => {
  const t = tracker();
  t.onSubscribed({ ...SUB, feed: 'XNAS' });
  t.onRecord(rec(11));
  t.onReset(1);
  assert.equal(t.last(1, 1), 0);
  assert.equal(t.last(1, 2), 0);
  assert.equal(t.last(2, 1), 10);
  assert.equal(t.onRecord(rec(1)), null);
  assert.equal(t.onRecord(rec(1, 0, 'trade', 2)), null);
});

test('violations: a jump without a gap moves past it, a repeat does not', () => {
  const t = tracker();
  assert.deepEqual(t.onRecord(rec(15)), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 11, got: 15 });
  assert.equal(t.onRecord(rec(16)), null, 'resynchronised after the jump');
  assert.deepEqual(t.onRecord(rec(16)), { kind: 'violation', feedId: 1, instrumentId: 1, expected: 17, got: 16 });
  assert.equal(t.onRecord(rec(17)), null);
  assert.equal(t.violations, 2);
});

test('records of instruments not held are not checked', () => {
  const t = tracker();
  assert.equal(t.onRecord(rec(99, 0, 'trade', 42)), null);
  assert.equal(t.onRecord({ ...rec(99), feedId: 7 }), null);
  assert.equal(t.violations, 0);
});

test('resumeFor gives the last seq held per symbol; clearFeed forgets a feed', () => {
  const t = tracker();
  t.onRecord(rec(11));
  const ids = new Map([
    ['AAPL', 1],
    ['MSFT', 2],
    ['GOOG', 3],
  ]);
  assert.deepEqual(t.resumeFor(1, ids), { AAPL: 11, MSFT: 0 });
  t.clearFeed(1);
  assert.deepEqual(t.resumeFor(1, ids), {});
  assert.equal(t.last(1, 1), undefined);
});

test('works on decoded records', () => {
  const t = tracker();
  const b = decodeBatch(
    encodeBatch([
      { type: 'trade', feedId: 1, instrumentId: 1, seq: 10, price: 1, size: 1, flags: FLAG_SNAPSHOT },
      { type: 'quote', feedId: 1, instrumentId: 1, seq: 11, bidPx: 1, bidSz: 1, askPx: 2, askSz: 1 },
      { type: 'trade', feedId: 1, instrumentId: 1, seq: 12, price: 1, size: 1 },
    ]),
  );
  assert.deepEqual(b.records().map((r) => t.onRecord(r)), [null, null, null]);
  assert.equal(t.last(1, 1), 12);
});
