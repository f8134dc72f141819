"""Per-instrument sequence tracking, protocol §9.

State is keyed by ``(feed_id, instrument_id)``, one expected seq per instrument:

* ``subscribed``: ``expected = seq + 1`` for each instrument not already held (or the
  client's own resume seq + 1 when it asked to ``resume`` in the same epoch);
* a SNAPSHOT record is state, not a live record: it leaves ``expected`` alone (its seq is
  at most the ``subscribed`` seq);
* a live or REPLAY record must carry ``seq == expected``; then ``expected += 1``;
* a ``gap`` names ``from..=to`` with ``from == expected``: ``expected = to + 1``;
* a CONFLATED record may jump ahead: ``expected = seq + 1``. On a conflating connection
  (§11) only the latest quote carries the flag; on a throttled subscription (v1.1, §6a) a
  trade may carry it too, the seqs skipped being quotes replaced by later ones. A jump
  without the flag is still a violation, whatever the record type;
* ``reset``: ``expected = 1`` for every instrument of the feed, subscriptions kept;
* anything else (a jump without a ``gap``, a repeated seq, a record of an instrument that
  is not subscribed) is a :class:`Violation`.

With ``on_violation="raise"`` (the default) a violation raises
:class:`~tickgate_client.errors.SequenceViolation`; with ``"report"`` it is returned (and
counted) and tracking goes on: after a silent jump ``expected`` follows the record, a
repeated seq is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import SequenceViolation
from .messages import Gap, Message, Refreshed, Reset, Subscribed, Unsubscribed, Welcome
from .records import FLAG_CONFLATED, FLAG_REPLAY, FLAG_SNAPSHOT, RTYPE_QUOTE, Batch

__all__ = ["SeqTracker", "Violation", "TrackerStats"]


@dataclass(frozen=True, slots=True)
class Violation:
    """A break of the delivery contract.

    ``kind``: ``duplicate`` (a seq below ``expected``), ``silent_gap`` (above it, with no
    ``gap``: ``expected..seq-1`` went missing), ``unsubscribed`` (a record of an instrument
    not subscribed), ``snapshot_ahead`` (a SNAPSHOT above the ``subscribed`` seq),
    ``gap_mismatch`` (a ``gap`` whose ``from`` is not ``expected``; ``seq`` is its ``from``).
    """

    kind: str
    feed_id: int
    instrument_id: int
    seq: int
    expected: int
    symbol: str | None = None

    def __str__(self) -> str:
        who = self.symbol or f"instrument {self.instrument_id}"
        return f"{self.kind}: feed {self.feed_id} {who}: seq {self.seq}, expected {self.expected}"


@dataclass(slots=True)
class TrackerStats:
    records: int = 0
    snapshots: int = 0
    replayed: int = 0
    conflated: int = 0
    gaps: int = 0
    gap_records: int = 0
    resets: int = 0
    violations: int = 0


class _Track:
    __slots__ = ("expected", "snapshot_upto")

    def __init__(self, expected: int, snapshot_upto: int):
        self.expected = expected
        self.snapshot_upto = snapshot_upto


class SeqTracker:
    """Checks one connection's records against protocol §9 (see the module doc).

    Feed ids come from ``welcome``/``refreshed``, instrument ids from ``subscribed``;
    feed them in with :meth:`on_message` (or the ``on_*`` methods) in the order they
    arrive, and records with :meth:`on_batch` / :meth:`on_record`.
    """

    def __init__(self, on_violation: str = "raise"):
        if on_violation not in ("raise", "report"):
            raise ValueError("on_violation must be 'raise' or 'report'")
        self.on_violation = on_violation
        self.stats = TrackerStats()
        self._feed_ids: dict[str, int] = {}
        self._feed_names: dict[int, str] = {}
        self._epochs: dict[str, int] = {}
        self._symbols: dict[tuple[int, int], str] = {}
        self._by_symbol: dict[tuple[int, str], int] = {}
        self._track: dict[tuple[int, int], _Track] = {}
        self._resuming: dict[str, tuple[int | None, dict[str, int]]] = {}

    # -- lookups ---------------------------------------------------------------------

    def epoch(self, feed: str) -> int | None:
        """The feed's epoch as last announced (welcome, subscribed, reset)."""
        return self._epochs.get(feed)

    def feed_id(self, feed: str) -> int | None:
        return self._feed_ids.get(feed)

    def feed_name(self, feed_id: int) -> str | None:
        return self._feed_names.get(feed_id)

    def symbol(self, feed_id: int, instrument_id: int) -> str | None:
        return self._symbols.get((feed_id, instrument_id))

    def expected(self, feed: str, symbol: str) -> int | None:
        """The next seq expected for a subscribed instrument (None when not subscribed)."""
        fid = self._feed_ids.get(feed)
        iid = self._by_symbol.get((fid, symbol)) if fid is not None else None
        t = self._track.get((fid, iid)) if iid is not None else None
        return t.expected if t else None

    def last_seqs(self, feed: str) -> dict[str, int]:
        """The last seq held per subscribed symbol of ``feed`` (what a reconnect sends as ``resume``)."""
        fid = self._feed_ids.get(feed)
        out = {}
        for (f, i), t in self._track.items():
            if f == fid:
                sym = self._symbols.get((f, i))
                if sym is not None:
                    out[sym] = t.expected - 1
        return out

    def subscribed(self, feed: str) -> list[str]:
        return list(self.last_seqs(feed))

    # -- control messages -------------------------------------------------------------

    def on_message(self, msg: Message) -> list[Violation]:
        """Applies one control message; returns violations (``report`` mode)."""
        if isinstance(msg, (Welcome, Refreshed)):
            self.on_feeds(msg.feeds, update_epochs=isinstance(msg, Welcome))
        elif isinstance(msg, Subscribed):
            self.on_subscribed(msg)
        elif isinstance(msg, Unsubscribed):
            self.on_unsubscribed(msg)
        elif isinstance(msg, Gap):
            return self.on_gap(msg)
        elif isinstance(msg, Reset):
            self.on_reset(msg)
        return []

    def on_feeds(self, feeds: Iterable, update_epochs: bool = True) -> None:
        """Learns feed ids (and epochs) from ``welcome`` or ``refreshed``."""
        for f in feeds:
            self._feed_ids[f.name] = f.id
            self._feed_names[f.id] = f.name
            if update_epochs:
                self._epochs[f.name] = f.epoch

    def expect_resume(self, feed: str, epoch: int | None, seqs: dict[str, int]) -> None:
        """Announces a ``subscribe`` with ``resume`` (taken in ``epoch``) about to be sent:
        the next ``subscribed`` of ``feed`` in that epoch starts after those seqs."""
        self._resuming[feed] = (epoch, dict(seqs))

    def on_subscribed(self, msg: Subscribed) -> None:
        self._epochs[msg.feed] = msg.epoch
        epoch, resume = self._resuming.pop(msg.feed, (None, {}))
        if epoch is not None and epoch != msg.epoch:
            resume = {}  # the server ignored seqs of another epoch: snapshot, no replay
        fid = self._feed_ids.get(msg.feed)
        if fid is None:
            return
        for ins in msg.instruments:
            key = (fid, ins.id)
            self._symbols[key] = ins.symbol
            self._by_symbol[(fid, ins.symbol)] = ins.id
            if key not in self._track:
                start = resume.get(ins.symbol, ins.seq)
                self._track[key] = _Track(start + 1, ins.seq)

    def on_unsubscribed(self, msg: Unsubscribed) -> None:
        fid = self._feed_ids.get(msg.feed)
        for s in msg.symbols:
            iid = self._by_symbol.get((fid, s))
            if iid is not None:
                self._track.pop((fid, iid), None)

    def on_gap(self, msg: Gap) -> list[Violation]:
        self.stats.gaps += 1
        fid = self._feed_ids.get(msg.feed)
        iid = self._by_symbol.get((fid, msg.symbol))
        t = self._track.get((fid, iid)) if iid is not None else None
        if t is None:
            return []
        out = []
        if msg.from_seq != t.expected:
            out = self._violate(Violation("gap_mismatch", fid, iid, msg.from_seq, t.expected, msg.symbol))
        if msg.to_seq + 1 > t.expected:
            self.stats.gap_records += msg.to_seq + 1 - max(t.expected, msg.from_seq)
            t.expected = msg.to_seq + 1
        return out

    def on_reset(self, msg: Reset) -> None:
        self.stats.resets += 1
        self._epochs[msg.feed] = msg.epoch
        fid = self._feed_ids.get(msg.feed)
        for (f, _), t in self._track.items():
            if f == fid:
                t.expected = 1
                t.snapshot_upto = 0

    def forget(self, feed: str | None = None) -> None:
        """Drops the seq state of one feed (or all): a new connection holds no subscription."""
        if feed is None:
            self._track.clear()
            self._resuming.clear()
            return
        fid = self._feed_ids.get(feed)
        for key in [k for k in self._track if k[0] == fid]:
            del self._track[key]
        self._resuming.pop(feed, None)

    # -- records -----------------------------------------------------------------------

    def _violate(self, v: Violation) -> list[Violation]:
        self.stats.violations += 1
        if self.on_violation == "raise":
            raise SequenceViolation(v)
        return [v]

    def check(self, feed_id: int, instrument_id: int, seq: int, flags: int, is_quote: bool = True) -> list[Violation]:
        """Checks one record given by its header fields. ``is_quote`` no longer changes the
        outcome (any CONFLATED record may jump ahead, §6a); it is kept for callers of v1."""
        st = self.stats
        st.records += 1
        t = self._track.get((feed_id, instrument_id))
        if t is None:
            return self._violate(
                Violation("unsubscribed", feed_id, instrument_id, seq, 0, self._symbols.get((feed_id, instrument_id)))
            )
        if flags & FLAG_SNAPSHOT:
            st.snapshots += 1
            if seq > t.snapshot_upto:
                return self._violate(
                    Violation("snapshot_ahead", feed_id, instrument_id, seq, t.snapshot_upto,
                              self._symbols.get((feed_id, instrument_id)))
                )
            return []
        if flags & FLAG_REPLAY:
            st.replayed += 1
        if flags & FLAG_CONFLATED:
            st.conflated += 1
        exp = t.expected
        if seq == exp:
            t.expected = exp + 1
            return []
        if seq > exp and flags & FLAG_CONFLATED:
            t.expected = seq + 1
            return []
        sym = self._symbols.get((feed_id, instrument_id))
        if seq < exp:
            return self._violate(Violation("duplicate", feed_id, instrument_id, seq, exp, sym))
        t.expected = seq + 1
        return self._violate(Violation("silent_gap", feed_id, instrument_id, seq, exp, sym))

    def on_record(self, r) -> list[Violation]:
        """Checks one :class:`~tickgate_client.records.Trade` / ``Quote``."""
        return self.check(r.feed_id, r.instrument_id, r.seq, r.flags, r.rtype == RTYPE_QUOTE)

    def on_batch(self, batch: Batch) -> list[Violation]:
        """Checks every record of a batch, in batch order.

        The common case (live records only, each instrument's seqs consecutive from its
        ``expected``) is checked with a few vectorized operations; a batch with snapshot
        or conflated records, or anything wrong, is walked record by record."""
        n = len(batch)
        if n == 0:
            return []
        fid = batch.ordered("feed_id")
        iid = batch.ordered("instrument_id")
        seq = batch.ordered("seq")
        flags = batch.ordered("flags")
        if not (flags & (FLAG_SNAPSHOT | FLAG_CONFLATED)).any():
            keys = (fid.astype(np.uint64) << np.uint64(32)) | iid.astype(np.uint64)
            uniq, inv = np.unique(keys, return_inverse=True)
            inv = inv.reshape(-1)
            order = np.argsort(inv, kind="stable")
            s = seq[order]
            g = inv[order]
            same = g[1:] == g[:-1]
            if (s[1:][same] == s[:-1][same] + np.uint64(1)).all():
                starts = np.flatnonzero(np.concatenate(([True], ~same)))
                ends = np.concatenate((starts[1:], [n])) - 1
                firsts = s[starts].tolist()
                lasts = s[ends].tolist()
                tracks = []
                ok = True
                for k, first in zip(uniq.tolist(), firsts):
                    t = self._track.get((k >> 32, k & 0xFFFFFFFF))
                    if t is None or t.expected != first:
                        ok = False
                        break
                    tracks.append(t)
                if ok:
                    for t, last in zip(tracks, lasts):
                        t.expected = last + 1
                    self.stats.records += n
                    self.stats.replayed += int(np.count_nonzero(flags & FLAG_REPLAY))
                    return []
        out: list[Violation] = []
        is_q = batch.is_quote()
        for f, i, sq, fl, q in zip(fid.tolist(), iid.tolist(), seq.tolist(), flags.tolist(), is_q.tolist()):
            v = self.check(f, i, sq, fl, q)
            if v:
                out.extend(v)
        return out
