"""Batch decoding: the numpy path and the dataclass path agree, and malformed input is a DecodeError."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from tickgate_client import (
    FLAG_CONFLATED,
    FLAG_REPLAY,
    FLAG_SNAPSHOT,
    QUOTE_DTYPE,
    TRADE_DTYPE,
    DecodeError,
    Quote,
    Trade,
    decode_batch,
    decode_batch_records,
    encode_batch,
    to_float,
)


def make_records(n: int, quote_ratio: float = 0.75, seed: int = 7) -> list:
    rnd = random.Random(seed)
    out = []
    seqs: dict[int, int] = {}
    for k in range(n):
        iid = rnd.randint(1, 50)
        seqs[iid] = seqs.get(iid, 0) + 1
        ts = 1_767_225_600_000_000_000 + k * 1000
        flags = rnd.choice([0, 0, 0, FLAG_SNAPSHOT, FLAG_REPLAY, FLAG_CONFLATED])
        px = rnd.randint(1_000, 50_000) * 10_000_000
        if rnd.random() < quote_ratio:
            out.append(Quote(1, iid, seqs[iid], ts, ts + 500, px, rnd.randint(1, 90) * 100 * 10**9,
                             px + 10_000_000, rnd.randint(1, 90) * 100 * 10**9, flags))
        else:
            out.append(Trade(1, iid, seqs[iid], ts, ts + 700, px, rnd.randint(1, 90) * 100 * 10**9,
                             rnd.randint(0, 2), flags & ~FLAG_CONFLATED))
    return out


def numpy_rows_as_records(batch) -> list:
    """The numpy view turned into dataclasses, in batch order, to compare with the other path."""
    rows: list = [None] * len(batch)
    for i, t in zip(batch.trade_index.tolist(), batch.trades.tolist()):
        rows[i] = Trade(*t[2:11])
    for i, q in zip(batch.quote_index.tolist(), batch.quotes.tolist()):
        rows[i] = Quote(*q[2:12])
    return rows


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.75, 0.5])
@pytest.mark.parametrize("n", [1, 2, 17, 2000])
def test_numpy_and_dataclass_paths_agree(n, ratio):
    recs = make_records(n, ratio, seed=n)
    buf = encode_batch(recs, send_ts_ns=42)
    batch = decode_batch(buf)
    assert batch.send_ts_ns == 42
    assert len(batch) == n and batch.skipped == 0
    assert decode_batch_records(buf) == recs
    assert numpy_rows_as_records(batch) == recs
    assert batch.records() == recs
    assert batch.trades.dtype == TRADE_DTYPE and batch.quotes.dtype == QUOTE_DTYPE
    assert batch.ordered("seq").tolist() == [r.seq for r in recs]
    assert batch.ordered("flags").tolist() == [r.flags for r in recs]
    assert batch.is_quote().tolist() == [isinstance(r, Quote) for r in recs]


def test_homogeneous_batch_is_a_zero_copy_view():
    recs = [r for r in make_records(300, 0.0)]
    buf = encode_batch(recs)
    b = decode_batch(buf)
    assert len(b.quotes) == 0 and not b.trades.flags.owndata
    assert b.trades["price"].tolist() == [r.price_raw for r in recs]


def test_floats_and_flags():
    t = Trade(1, 2, 3, 4, 5, 123_450_000_000, 2_500 * 10**9, 1, FLAG_SNAPSHOT | FLAG_REPLAY)
    q = Quote(1, 2, 4, 4, 5, 99_990_000_000, 10**11, 100_010_000_000, 2 * 10**11, FLAG_CONFLATED)
    assert t.price == 123.45 and t.size == 2500.0 and t.snapshot and t.replay and not t.conflated
    assert q.bid_px == 99.99 and q.ask_px == 100.01 and q.mid == 100.0 and q.conflated and not q.snapshot
    b = decode_batch(encode_batch([t, q]))
    assert to_float(b.trades["price"]).tolist() == [123.45]
    assert to_float(b.quotes["ask_px"]).tolist() == [100.01]
    assert to_float(b.trades["size"]).dtype == np.float64
    with pytest.raises(Exception):
        t.seq = 9  # frozen
    assert hash(t) == hash(Trade(1, 2, 3, 4, 5, 123_450_000_000, 2_500 * 10**9, 1, FLAG_SNAPSHOT | FLAG_REPLAY))


def test_headers_that_appear_inside_data_do_not_confuse_the_scan():
    # seq 312 = 0x0138 reads as (len 56, rtype 1) and 584 = 0x0248 as (72, 2); the
    # ts and price words are made to look like record headers too.
    fake_t = 56 | 1 << 8
    fake_q = 72 | 2 << 8
    recs = []
    for k in range(200):
        if k % 3:
            recs.append(Quote(1, 3, 312 if k % 2 else 584, fake_t, fake_q, fake_q, 0, fake_t, 0, 0))
        else:
            recs.append(Trade(1, 3, 584 if k % 2 else 312, fake_q, fake_t, fake_t, 0, 0, 0))
    buf = encode_batch(recs)
    assert decode_batch_records(buf) == recs
    assert numpy_rows_as_records(decode_batch(buf)) == recs


def test_unknown_record_types_are_skipped_by_length():
    recs = make_records(10, 0.5)
    body = encode_batch(recs)[16:]
    unknown = struct.pack("<BBHIQqq", 40, 9, 1, 1, 1, 0, 0) + bytes(8)
    # insert the unknown record after the third known one
    at = 0
    for r in recs[:3]:
        at += 56 if isinstance(r, Trade) else 72
    buf = struct.pack("<BBHIQ", 1, 0, 11, 0, 5) + body[:at] + unknown + body[at:]
    b = decode_batch(buf)
    assert b.skipped == 1 and len(b) == 10
    assert numpy_rows_as_records(b) == recs
    assert decode_batch_records(buf) == recs


def test_empty_batch():
    b = decode_batch(struct.pack("<BBHIQ", 1, 0, 0, 0, 9))
    assert len(b) == 0 and b.send_ts_ns == 9
    assert decode_batch_records(struct.pack("<BBHIQ", 1, 0, 0, 0, 9)) == []


def _good() -> bytes:
    return encode_batch(make_records(5, 0.5))


def _with(buf: bytes, at: int, value: int) -> bytes:
    b = bytearray(buf)
    b[at] = value
    return bytes(b)


MALFORMED = {
    "empty": b"",
    "short header": b"\x01\x00\x01\x00",
    "version 2": _with(_good(), 0, 2),
    "count too high": _with(_good(), 2, 6),
    "count too low": _with(_good(), 2, 4),
    "truncated record": _good()[:-8],
    "trailing bytes": _good() + bytes(8),
    "record length 0": _with(_good(), 16, 0),
    "record length 33": _with(_good(), 16, 33),
    "record length 24": _with(_good(), 16, 24),
    "trade with quote length": _with(_with(_good(), 16, 72), 17, 1),
    "quote with trade length": _with(_with(_good(), 16, 56), 17, 2),
    "header only, count 1": struct.pack("<BBHIQ", 1, 0, 1, 0, 0),
    "record header cut": struct.pack("<BBHIQ", 1, 0, 1, 0, 0) + bytes([56, 1]) + bytes(10),
    "length past the end": struct.pack("<BBHIQ", 1, 0, 1, 0, 0) + bytes([248, 7]) + bytes(38),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_batches_raise_decode_error(name):
    buf = MALFORMED[name]
    with pytest.raises(DecodeError):
        decode_batch(buf)
    with pytest.raises(DecodeError):
        decode_batch_records(buf)


def test_random_garbage_never_crashes():
    rnd = random.Random(11)
    good = _good()
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if rnd.random() < 0.3:
            b = b[: rnd.randrange(len(b) + 1)]
        buf = bytes(b)
        try:
            np_rows = numpy_rows_as_records(decode_batch(buf))
        except DecodeError:
            np_rows = None
        try:
            dc_rows = decode_batch_records(buf)
        except DecodeError:
            dc_rows = None
        assert np_rows == dc_rows


def test_non_bytes_input_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode_batch(5)
    with pytest.raises(DecodeError):
        decode_batch_records("text")
    assert decode_batch(bytearray(_good())).send_ts_ns == 0
