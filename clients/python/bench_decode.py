#!/usr/bin/env python3
"""Records decoded per second: the numpy path (decode_batch) and the dataclass path
(decode_batch_records), on batches shaped like the DEMO feed's.

Each batch mixes quotes (75 %) and trades (25 %) of 50 instruments, with per-instrument
seqs, cent-grid prices around $100, sizes in lots of 100 and nanosecond timestamps.
Prints one JSON line. Usage: bench_decode.py [--records 2000] [--batches 64] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

# The checkout's own sources (next to this file) come before any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import numpy as np

from tickgate_client import Quote, SeqTracker, Trade, decode_batch, decode_batch_records, encode_batch
from tickgate_client import records as _records
from tickgate_client.messages import FeedInfo, Instrument, Subscribed, Welcome


def make_batches(n_batches: int, per_batch: int, quote_ratio: float, seed: int = 20261130):
    rnd = random.Random(seed)
    mids = {i: rnd.randint(8_000, 12_000) for i in range(1, 51)}  # cents
    seqs = {i: rnd.randint(10_000, 2_000_000) for i in range(1, 51)}
    first = dict(seqs)
    ts = 1_767_225_600_000_000_000
    batches = []
    for _ in range(n_batches):
        recs = []
        for _ in range(per_batch):
            iid = rnd.randint(1, 50)
            seqs[iid] += 1
            ts += rnd.randint(100_000, 900_000)
            mids[iid] = max(10, mids[iid] + rnd.choice((-1, 0, 0, 1)))
            bid = mids[iid] * 10_000_000
            if rnd.random() < quote_ratio:
                recs.append(Quote(1, iid, seqs[iid], ts, ts + 40_000, bid, rnd.randint(1, 40) * 100 * 10**9,
                                  bid + rnd.randint(1, 3) * 10_000_000, rnd.randint(1, 40) * 100 * 10**9, 0))
            else:
                recs.append(Trade(1, iid, seqs[iid], ts, ts + 40_000, bid + 5_000_000,
                                  rnd.randint(1, 20) * 100 * 10**9, rnd.randint(1, 2), 0))
        batches.append(encode_batch(recs, send_ts_ns=ts + 90_000))
    return batches, first


def _as_json(r) -> dict:
    """A record as a JSON feed would carry it (Coinbase/Alpaca style: decimal strings)."""
    common = {"feed": r.feed_id, "instrument": r.instrument_id, "seq": r.seq,
              "ts_event": r.ts_event_ns, "ts_recv": r.ts_recv_ns}
    if isinstance(r, Trade):
        return {"type": "trade", **common, "price": f"{r.price:.9f}", "size": f"{r.size:.9f}", "side": r.side}
    return {"type": "quote", **common, "bid": f"{r.bid_px:.9f}", "bid_size": f"{r.bid_sz:.9f}",
            "ask": f"{r.ask_px:.9f}", "ask_size": f"{r.ask_sz:.9f}"}


def rate(fn, batches, records_per_batch, seconds):
    """Records per second of ``fn`` over the batches, repeated for about ``seconds``."""
    done = 0
    start = time.perf_counter()
    while True:
        for b in batches:
            fn(b)
        done += len(batches)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done * records_per_batch / elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000, help="records per batch")
    ap.add_argument("--batches", type=int, default=64, help="distinct batches")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = ap.parse_args()
    if not (1 <= args.records <= 65535 and args.batches >= 1 and args.seconds > 0):
        ap.error("--records in 1..65535, --batches >= 1, --seconds > 0")

    mixed, first = make_batches(args.batches, args.records, 0.75)
    quotes_only, _ = make_batches(max(1, args.batches // 4), args.records, 1.0, seed=7)
    vector_ok = sum(_records._vector_scan(b, args.records) is not None for b in mixed)
    assert decode_batch(mixed[0]).records() == decode_batch_records(mixed[0])

    numpy_rps = rate(decode_batch, mixed, args.records, args.seconds)
    numpy_homog_rps = rate(decode_batch, quotes_only, args.records, args.seconds / 2)
    dataclass_rps = rate(decode_batch_records, mixed[: max(1, args.batches // 8)], args.records, args.seconds)

    # decode + sequence check, as the Stream does per batch
    def tracked():
        t = SeqTracker()
        t.on_message(Welcome(1, "s", "bench", 0, 15000, (FeedInfo("DEMO", 1, 1),)))
        t.on_message(Subscribed(1, "DEMO", 1, tuple(Instrument(f"S{i}", i, first[i]) for i in range(1, 51))))
        return t

    state = {"t": tracked(), "k": 0}

    def decode_and_track(b):
        if state["k"] % len(mixed) == 0:
            state["t"] = tracked()  # the batches repeat: start the seqs over
        state["k"] += 1
        state["t"].on_batch(decode_batch(b))

    tracked_rps = rate(decode_and_track, mixed, args.records, args.seconds / 2)

    # The peer, in the same run: the same records as the JSON text most market-data
    # WebSocket APIs send (one object per record, prices as decimal strings), read with
    # the standard library's json.loads, the usual way to read such a feed in Python.
    json_batches = [json.dumps([_as_json(r) for r in decode_batch_records(b)]) for b in mixed[: max(1, args.batches // 8)]]
    json_rps = rate(json.loads, json_batches, args.records, args.seconds)

    print(json.dumps({
        "bench": "decode",
        "records_per_batch": args.records,
        "batches": args.batches,
        "quote_ratio": 0.75,
        "numpy_records_per_s": round(numpy_rps),
        "numpy_quotes_only_records_per_s": round(numpy_homog_rps),
        "numpy_with_seq_tracking_records_per_s": round(tracked_rps),
        "dataclass_records_per_s": round(dataclass_rps),
        "json_peer_records_per_s": round(json_rps),
        "numpy_vs_json": round(numpy_rps / json_rps, 1),
        "dataclass_vs_json": round(dataclass_rps / json_rps, 2),
        "vector_scan_hits": f"{vector_ok}/{len(mixed)}",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
