"""Binary batches (protocol §8): a numpy path and a dataclass path.

A batch is a 16-byte header followed by ``count`` records, each starting with a 32-byte
header whose first byte is its length. Trades are 56 bytes, quotes 72; a batch can mix
them (and skip records of types this client does not know, by their length).

* :func:`decode_batch` returns a :class:`Batch` holding two numpy structured arrays,
  ``trades`` (:data:`TRADE_DTYPE`) and ``quotes`` (:data:`QUOTE_DTYPE`). A batch of one
  record type is a zero-copy view of the message; a mixed one is gathered with a
  vectorized scan of the record headers (a plain Python walk only when that scan cannot
  prove the layout, e.g. records of an unknown type).
* :func:`decode_batch_records` returns frozen :class:`Trade` / :class:`Quote`
  dataclasses in batch order.

Prices and sizes stay raw on the wire (fixed point, 9 decimals: :data:`SCALE`);
:func:`to_float` (or the dataclasses' properties) turns them into floats.
Any malformed batch raises :class:`~tickgate_client.errors.DecodeError`.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from .errors import DecodeError

__all__ = [
    "SCALE",
    "FLAG_SNAPSHOT",
    "FLAG_REPLAY",
    "FLAG_CONFLATED",
    "RTYPE_TRADE",
    "RTYPE_QUOTE",
    "TRADE_LEN",
    "QUOTE_LEN",
    "BATCH_HEADER_DTYPE",
    "RECORD_HEADER_DTYPE",
    "TRADE_DTYPE",
    "QUOTE_DTYPE",
    "Batch",
    "Trade",
    "Quote",
    "Record",
    "decode_batch",
    "decode_batch_records",
    "encode_batch",
    "to_float",
]

#: Fixed-point scale of prices and sizes: raw / SCALE is the value.
SCALE = 1_000_000_000
#: Record flag bits (protocol §8).
FLAG_SNAPSHOT = 1
FLAG_REPLAY = 2
FLAG_CONFLATED = 4
RTYPE_TRADE = 1
RTYPE_QUOTE = 2
TRADE_LEN = 56
QUOTE_LEN = 72
BATCH_HEADER_LEN = 16
RECORD_HEADER_LEN = 32

BATCH_HEADER_DTYPE = np.dtype(
    [("version", "u1"), ("flags", "u1"), ("count", "<u2"), ("reserved", "<u4"), ("send_ts_ns", "<u8")]
)
_HEADER_FIELDS = [
    ("len", "u1"),
    ("rtype", "u1"),
    ("feed_id", "<u2"),
    ("instrument_id", "<u4"),
    ("seq", "<u8"),
    ("ts_event_ns", "<i8"),
    ("ts_recv_ns", "<i8"),
]
RECORD_HEADER_DTYPE = np.dtype(_HEADER_FIELDS)
#: One trade record, 56 bytes. ``price`` i64 and ``size`` u64 are raw fixed point.
TRADE_DTYPE = np.dtype(
    _HEADER_FIELDS + [("price", "<i8"), ("size", "<u8"), ("side", "u1"), ("flags", "u1"), ("_pad", "V6")]
)
#: One quote record, 72 bytes. ``bid_px``/``ask_px`` i64, ``bid_sz``/``ask_sz`` u64, raw fixed point.
QUOTE_DTYPE = np.dtype(
    _HEADER_FIELDS
    + [("bid_px", "<i8"), ("bid_sz", "<u8"), ("ask_px", "<i8"), ("ask_sz", "<u8"), ("flags", "u1"), ("_pad", "V7")]
)
assert TRADE_DTYPE.itemsize == TRADE_LEN and QUOTE_DTYPE.itemsize == QUOTE_LEN

_TRADE_WORDS = TRADE_LEN // 8
_QUOTE_WORDS = QUOTE_LEN // 8
_EMPTY_TRADES = np.empty(0, TRADE_DTYPE)
_EMPTY_QUOTES = np.empty(0, QUOTE_DTYPE)
_EMPTY_INDEX = np.empty(0, np.intp)
_TRADE_COLS = np.arange(_TRADE_WORDS)
_QUOTE_COLS = np.arange(_QUOTE_WORDS)
_BATCH_HEADER = struct.Struct("<BBHIQ")
_TRADE_STRUCT = struct.Struct("<2xHIQqqqQBB")
_QUOTE_STRUCT = struct.Struct("<2xHIQqqqQqQB")


def to_float(raw):
    """Raw fixed-point value(s) (an int or a numpy array) as float(s): ``raw / 1e9``."""
    if isinstance(raw, np.ndarray):
        return raw.astype(np.float64) / SCALE
    return raw / SCALE


class _FlagProps:
    """``snapshot`` / ``replay`` / ``conflated`` from the flags byte."""

    __slots__ = ()
    flags: int

    @property
    def snapshot(self) -> bool:
        """A subscribe-time last value (§6): state, not a live record."""
        return bool(self.flags & FLAG_SNAPSHOT)

    @property
    def replay(self) -> bool:
        """Re-sent for a ``resume`` (§6)."""
        return bool(self.flags & FLAG_REPLAY)

    @property
    def conflated(self) -> bool:
        """A quote standing for quotes a conflating connection skipped (§11)."""
        return bool(self.flags & FLAG_CONFLATED)


@dataclass(frozen=True, slots=True)
class Trade(_FlagProps):
    """One trade. ``price_raw``/``size_raw`` are fixed point (9 decimals); ``price``/``size`` floats.
    ``side``: 0 unknown, 1 buyer aggressed, 2 seller aggressed."""

    feed_id: int
    instrument_id: int
    seq: int
    ts_event_ns: int
    ts_recv_ns: int
    price_raw: int
    size_raw: int
    side: int
    flags: int
    rtype: ClassVar[int] = RTYPE_TRADE

    @property
    def price(self) -> float:
        return self.price_raw / SCALE

    @property
    def size(self) -> float:
        return self.size_raw / SCALE


@dataclass(frozen=True, slots=True)
class Quote(_FlagProps):
    """One top-of-book quote; ``*_raw`` fields are fixed point (9 decimals), the properties floats."""

    feed_id: int
    instrument_id: int
    seq: int
    ts_event_ns: int
    ts_recv_ns: int
    bid_px_raw: int
    bid_sz_raw: int
    ask_px_raw: int
    ask_sz_raw: int
    flags: int
    rtype: ClassVar[int] = RTYPE_QUOTE

    @property
    def bid_px(self) -> float:
        return self.bid_px_raw / SCALE

    @property
    def bid_sz(self) -> float:
        return self.bid_sz_raw / SCALE

    @property
    def ask_px(self) -> float:
        return self.ask_px_raw / SCALE

    @property
    def ask_sz(self) -> float:
        return self.ask_sz_raw / SCALE

    @property
    def mid(self) -> float:
        return (self.bid_px_raw + self.ask_px_raw) / (2 * SCALE)


Record = Union[Trade, Quote]


def _builder(cls):
    """A mutable twin of a frozen record class with the same slot layout. A frozen
    dataclass's ``__init__`` sets every field through ``object.__setattr__`` (several times
    slower than plain slot stores); the decoder builds the twin and then switches its
    ``__class__``, which yields a real, frozen instance of ``cls``. Falls back to ``cls``
    where an interpreter refuses the switch."""
    twin = dataclasses.make_dataclass(
        cls.__name__ + "Builder", [(f.name, f.type) for f in dataclasses.fields(cls)], bases=(_FlagProps,), slots=True
    )
    try:
        probe = twin(*range(len(dataclasses.fields(cls))))
        probe.__class__ = cls
        if probe != cls(*range(len(dataclasses.fields(cls)))):
            raise TypeError("layout differs")
    except TypeError:
        return None
    return twin


_TRADE_BUILDER = _builder(Trade)
_QUOTE_BUILDER = _builder(Quote)


@dataclass(frozen=True, slots=True)
class Batch:
    """One decoded binary message.

    ``trades``/``quotes`` are structured arrays (read-only views of the message when the
    batch holds one record type, copies otherwise). ``trade_index``/``quote_index`` give
    each row's position among the batch's known records (batch order: a record at
    position ``k`` is ``trades[i]`` where ``trade_index[i] == k`` or likewise a quote).
    ``skipped`` counts records of unknown types. ``raw`` is the message itself.
    """

    send_ts_ns: int
    trades: np.ndarray
    quotes: np.ndarray
    trade_index: np.ndarray
    quote_index: np.ndarray
    skipped: int
    raw: bytes

    def __len__(self) -> int:
        return len(self.trades) + len(self.quotes)

    def __repr__(self) -> str:
        return f"Batch(send_ts_ns={self.send_ts_ns}, trades={len(self.trades)}, quotes={len(self.quotes)}, skipped={self.skipped})"

    def records(self) -> list[Record]:
        """The records as dataclasses, in batch order."""
        return decode_batch_records(self.raw)

    def ordered(self, field: str, dtype=None) -> np.ndarray:
        """A header field common to both types (``feed_id``, ``instrument_id``, ``seq``,
        ``ts_event_ns``, ``ts_recv_ns``, ``flags``) for every known record, in batch order."""
        nt, nq = len(self.trades), len(self.quotes)
        if nq == 0:
            return np.asarray(self.trades[field], dtype=dtype)
        if nt == 0:
            return np.asarray(self.quotes[field], dtype=dtype)
        out = np.empty(nt + nq, dtype=dtype or self.trades.dtype[field])
        out[self.trade_index] = self.trades[field]
        out[self.quote_index] = self.quotes[field]
        return out

    def is_quote(self) -> np.ndarray:
        """A bool per known record in batch order: True for quotes."""
        out = np.zeros(len(self), dtype=bool)
        out[self.quote_index] = True
        return out


def _header(buf) -> tuple[int, int]:
    n = len(buf)
    if n < BATCH_HEADER_LEN:
        raise DecodeError(f"truncated batch header: {n} bytes, need {BATCH_HEADER_LEN}")
    version, _flags, count, _reserved, send_ts_ns = _BATCH_HEADER.unpack_from(buf, 0)
    if version != 1:
        raise DecodeError(f"unsupported batch version {version} (expected 1)")
    return count, send_ts_ns


def _bad_len(k: int, at: int, length: int) -> DecodeError:
    return DecodeError(f"record {k} at byte {at}: length {length} is not a multiple of 8 of at least 32")


def _walk(buf, count: int) -> tuple[list[int], list[int], int]:
    """The exact, sequential scan: byte offsets of trades and quotes, and unknown records skipped."""
    n = len(buf)
    trades: list[int] = []
    quotes: list[int] = []
    skipped = 0
    at = BATCH_HEADER_LEN
    for k in range(count):
        if at + RECORD_HEADER_LEN > n:
            raise DecodeError(f"record {k} at byte {at}: truncated header ({n - at} bytes left, need 32)")
        length = buf[at]
        if length < RECORD_HEADER_LEN or length & 7:
            raise _bad_len(k, at, length)
        if at + length > n:
            raise DecodeError(f"record {k} at byte {at}: truncated ({n - at} bytes left, need {length})")
        rtype = buf[at + 1]
        if rtype == RTYPE_TRADE:
            if length != TRADE_LEN:
                raise DecodeError(f"record {k} at byte {at}: trade of length {length} (expected 56)")
            trades.append(at)
        elif rtype == RTYPE_QUOTE:
            if length != QUOTE_LEN:
                raise DecodeError(f"record {k} at byte {at}: quote of length {length} (expected 72)")
            quotes.append(at)
        else:
            skipped += 1
        at += length
    if at != n:
        raise DecodeError(f"{n - at} bytes after the {count} records the header announced")
    return trades, quotes, skipped


def _vector_scan(buf, count: int):
    """Finds the record starts without a Python loop, or returns None when it cannot prove them.

    Every record is a whole number of 8-byte words, so a record starts at a word whose
    first two bytes read (56, 1) or (72, 2). Data words can look like that too, so the
    candidates are filtered by the records' zero padding and then verified: the chain
    starting at word 0, each start plus its length, must hit exactly the candidates, in
    order, and end at the end of the message with ``count`` records. Only a verified
    chain is used, so the result is exact; anything else falls back to :func:`_walk`.
    """
    body = len(buf) - BATCH_HEADER_LEN
    if body <= 0 or body & 7:
        return None
    words = np.frombuffer(buf, dtype="<u8", offset=BATCH_HEADER_LEN)
    nwords = len(words)
    lo = np.frombuffer(buf, dtype="<u2", offset=BATCH_HEADER_LEN)[::4]
    # little-endian: low byte = len, next byte = rtype
    cand = np.flatnonzero((lo == (RTYPE_TRADE << 8 | TRADE_LEN)) | (lo == (RTYPE_QUOTE << 8 | QUOTE_LEN)))
    if len(cand) < count:
        return None
    is_q = lo[cand] == (RTYPE_QUOTE << 8 | QUOTE_LEN)
    if len(cand) > count:
        # Drop data words that merely look like headers: a real record has zero padding
        # (trade: bytes 50-55, quote: bytes 65-71).
        step = np.where(is_q, _QUOTE_WORDS, _TRADE_WORDS)
        last = cand + step - 1
        inside = last < nwords
        cand, is_q, last = cand[inside], is_q[inside], last[inside]
        tail = words[last]
        keep = np.where(is_q, (tail >> np.uint64(8)) == 0, (tail >> np.uint64(16)) == 0)
        cand, is_q = cand[keep], is_q[keep]
        for _ in range(2):
            if len(cand) <= count:
                break
            # A real record is the end of the previous one (or the first) and ends where
            # the next one starts (or the message ends); a look-alike inside a record
            # almost never is both.
            ends = cand + np.where(is_q, _QUOTE_WORDS, _TRADE_WORDS)
            keep = (np.isin(ends, cand) | (ends == nwords)) & (np.isin(cand, ends) | (cand == 0))
            cand, is_q = cand[keep], is_q[keep]
        if len(cand) != count:
            return None
    step = np.where(is_q, _QUOTE_WORDS, _TRADE_WORDS)
    if cand[0] != 0:
        return None
    ends = cand + step
    if ends[-1] != nwords or not np.array_equal(ends[:-1], cand[1:]):
        return None
    return words, cand, is_q


def decode_batch(buf: bytes) -> Batch:
    """Decodes one binary message into numpy structured arrays (see :class:`Batch`)."""
    if not isinstance(buf, bytes):
        if not isinstance(buf, (bytearray, memoryview)):
            raise DecodeError(f"a batch is bytes, not {type(buf).__name__}")
        buf = bytes(buf)
    count, send_ts_ns = _header(buf)
    if count == 0:
        if len(buf) != BATCH_HEADER_LEN:
            raise DecodeError(f"{len(buf) - BATCH_HEADER_LEN} bytes after the 0 records the header announced")
        return Batch(send_ts_ns, _EMPTY_TRADES, _EMPTY_QUOTES, _EMPTY_INDEX, _EMPTY_INDEX, 0, buf)
    body = len(buf) - BATCH_HEADER_LEN
    # Fast path: one record type, a zero-copy view.
    for rlen, rtype, dt in ((TRADE_LEN, RTYPE_TRADE, TRADE_DTYPE), (QUOTE_LEN, RTYPE_QUOTE, QUOTE_DTYPE)):
        if body == count * rlen:
            arr = np.frombuffer(buf, dtype=dt, count=count, offset=BATCH_HEADER_LEN)
            if (arr["len"] == rlen).all() and (arr["rtype"] == rtype).all():
                idx = np.arange(count)
                if rtype == RTYPE_TRADE:
                    return Batch(send_ts_ns, arr, _EMPTY_QUOTES, idx, _EMPTY_INDEX, 0, buf)
                return Batch(send_ts_ns, _EMPTY_TRADES, arr, _EMPTY_INDEX, idx, 0, buf)
    found = _vector_scan(buf, count)
    if found is not None:
        words, cand, is_q = found
        tpos = np.flatnonzero(~is_q)
        qpos = np.flatnonzero(is_q)
        trades = words[cand[tpos][:, None] + _TRADE_COLS].view(TRADE_DTYPE).reshape(-1) if len(tpos) else _EMPTY_TRADES
        quotes = words[cand[qpos][:, None] + _QUOTE_COLS].view(QUOTE_DTYPE).reshape(-1) if len(qpos) else _EMPTY_QUOTES
        return Batch(send_ts_ns, trades, quotes, tpos, qpos, 0, buf)
    toffs, qoffs, skipped = _walk(buf, count)
    u8 = np.frombuffer(buf, dtype=np.uint8)
    trades = (
        u8[np.asarray(toffs)[:, None] + np.arange(TRADE_LEN)].view(TRADE_DTYPE).reshape(-1) if toffs else _EMPTY_TRADES
    )
    quotes = (
        u8[np.asarray(qoffs)[:, None] + np.arange(QUOTE_LEN)].view(QUOTE_DTYPE).reshape(-1) if qoffs else _EMPTY_QUOTES
    )
    # Positions in batch order among the known records.
    kinds = np.concatenate([np.asarray(toffs, dtype=np.intp), np.asarray(qoffs, dtype=np.intp)])
    order = np.argsort(kinds, kind="stable")
    pos = np.empty(len(kinds), dtype=np.intp)
    pos[order] = np.arange(len(kinds))
    return Batch(send_ts_ns, trades, quotes, pos[: len(toffs)], pos[len(toffs) :], skipped, buf)


def decode_batch_records(buf: bytes) -> list[Record]:
    """Decodes one binary message into :class:`Trade` / :class:`Quote` dataclasses, in batch
    order (records of unknown types are skipped)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise DecodeError(f"a batch is bytes, not {type(buf).__name__}")
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    count, _ = _header(buf)
    n = len(buf)
    out: list[Record] = []
    append = out.append
    at = BATCH_HEADER_LEN
    tunpack = _TRADE_STRUCT.unpack_from
    qunpack = _QUOTE_STRUCT.unpack_from
    tb, qb = _TRADE_BUILDER, _QUOTE_BUILDER
    if tb is None or qb is None:
        return _decode_records_plain(buf, count)
    for k in range(count):
        if at + RECORD_HEADER_LEN > n:
            raise DecodeError(f"record {k} at byte {at}: truncated header ({n - at} bytes left, need 32)")
        length = buf[at]
        rtype = buf[at + 1]
        if length == TRADE_LEN and rtype == RTYPE_TRADE and at + TRADE_LEN <= n:
            r = tb(*tunpack(buf, at))
            r.__class__ = Trade
            append(r)
        elif length == QUOTE_LEN and rtype == RTYPE_QUOTE and at + QUOTE_LEN <= n:
            r = qb(*qunpack(buf, at))
            r.__class__ = Quote
            append(r)
        elif length < RECORD_HEADER_LEN or length & 7:
            raise _bad_len(k, at, length)
        elif at + length > n:
            raise DecodeError(f"record {k} at byte {at}: truncated ({n - at} bytes left, need {length})")
        elif rtype == RTYPE_TRADE:
            raise DecodeError(f"record {k} at byte {at}: trade of length {length} (expected 56)")
        elif rtype == RTYPE_QUOTE:
            raise DecodeError(f"record {k} at byte {at}: quote of length {length} (expected 72)")
        at += length
    if at != n:
        raise DecodeError(f"{n - at} bytes after the {count} records the header announced")
    return out



def _decode_records_plain(buf: bytes, count: int) -> list[Record]:
    """:func:`decode_batch_records` with the classes' own constructors (layout checked by :func:`_walk`)."""
    toffs, qoffs, _ = _walk(buf, count)
    recs = [(at, Trade(*_TRADE_STRUCT.unpack_from(buf, at))) for at in toffs]
    recs += [(at, Quote(*_QUOTE_STRUCT.unpack_from(buf, at))) for at in qoffs]
    recs.sort(key=lambda x: x[0])
    return [r for _, r in recs]


_TRADE_PACK = struct.Struct("<BBHIQqqqQBB6x")
_QUOTE_PACK = struct.Struct("<BBHIQqqqQqQB7x")


def encode_batch(records, send_ts_ns: int = 0) -> bytes:
    """The wire form (§8) of :class:`Trade` / :class:`Quote` records: one batch, for tests,
    benchmarks and publishers (``GET /v1/publish``, §15)."""
    records = list(records)
    if len(records) > 0xFFFF:
        raise ValueError(f"a batch holds at most 65535 records, not {len(records)}")
    parts = [_BATCH_HEADER.pack(1, 0, len(records), 0, send_ts_ns)]
    for r in records:
        if isinstance(r, Trade):
            parts.append(
                _TRADE_PACK.pack(TRADE_LEN, RTYPE_TRADE, r.feed_id, r.instrument_id, r.seq, r.ts_event_ns,
                                 r.ts_recv_ns, r.price_raw, r.size_raw, r.side, r.flags)
            )
        elif isinstance(r, Quote):
            parts.append(
                _QUOTE_PACK.pack(QUOTE_LEN, RTYPE_QUOTE, r.feed_id, r.instrument_id, r.seq, r.ts_event_ns,
                                 r.ts_recv_ns, r.bid_px_raw, r.bid_sz_raw, r.ask_px_raw, r.ask_sz_raw, r.flags)
            )
        else:
            raise TypeError(f"not a Trade or Quote: {type(r).__name__}")
    return b"".join(parts)
