"""SeqTracker against protocol §9, rule by rule (no server needed)."""

from __future__ import annotations

import pytest

from tickgate_client import (
    FLAG_CONFLATED,
    FLAG_REPLAY,
    FLAG_SNAPSHOT,
    FeedInfo,
    Gap,
    Instrument,
    Quote,
    Reset,
    SeqTracker,
    SequenceViolation,
    Subscribed,
    Trade,
    Unsubscribed,
    Welcome,
    decode_batch,
    encode_batch,
    parse_message,
)

AAPL, MSFT = 1, 2


def tracker(mode="raise", aapl_seq=10, msft_seq=5) -> SeqTracker:
    t = SeqTracker(on_violation=mode)
    t.on_message(Welcome(1, "s", "demo", 0, 15000, (FeedInfo("DEMO", 1, 77),)))
    t.on_message(Subscribed(1, "DEMO", 77, (Instrument("AAPL", AAPL, aapl_seq), Instrument("MSFT", MSFT, msft_seq))))
    return t


def trade(iid, seq, flags=0):
    return Trade(1, iid, seq, 0, 0, 100, 100, 1, flags)


def quote(iid, seq, flags=0):
    return Quote(1, iid, seq, 0, 0, 100, 100, 101, 100, flags)


def feed(t: SeqTracker, recs, batch: bool):
    """Feeds records one by one or as one batch (the vectorized path)."""
    if batch:
        return t.on_batch(decode_batch(encode_batch(recs)))
    out = []
    for r in recs:
        out += t.on_record(r)
    return out


BOTH = pytest.mark.parametrize("batch", [False, True], ids=["records", "batch"])


@BOTH
def test_live_records_start_after_the_subscribed_seq(batch):
    t = tracker()
    assert feed(t, [trade(AAPL, 11), quote(MSFT, 6), quote(AAPL, 12), trade(MSFT, 7)], batch) == []
    assert t.expected("DEMO", "AAPL") == 13 and t.expected("DEMO", "MSFT") == 8
    assert t.last_seqs("DEMO") == {"AAPL": 12, "MSFT": 7}
    assert t.stats.records == 4


@BOTH
def test_snapshots_do_not_move_expected_and_may_not_exceed_the_subscribed_seq(batch):
    t = tracker()
    assert feed(t, [trade(AAPL, 9, FLAG_SNAPSHOT), quote(AAPL, 10, FLAG_SNAPSHOT), quote(AAPL, 11)], batch) == []
    assert t.expected("DEMO", "AAPL") == 12 and t.stats.snapshots == 2
    with pytest.raises(SequenceViolation) as e:
        feed(t, [quote(MSFT, 6, FLAG_SNAPSHOT)], batch)
    assert e.value.violation.kind == "snapshot_ahead"


@BOTH
def test_a_repeated_seq_is_a_duplicate(batch):
    t = tracker()
    feed(t, [quote(AAPL, 11)], batch)
    with pytest.raises(SequenceViolation) as e:
        feed(t, [quote(AAPL, 11)], batch)
    v = e.value.violation
    assert (v.kind, v.seq, v.expected, v.symbol) == ("duplicate", 11, 12, "AAPL")


@BOTH
def test_a_jump_without_gap_is_a_silent_gap(batch):
    t = tracker()
    with pytest.raises(SequenceViolation) as e:
        feed(t, [quote(AAPL, 11), quote(AAPL, 13)], batch)
    assert (e.value.violation.kind, e.value.violation.expected) == ("silent_gap", 12)


@BOTH
def test_replay_is_checked_like_live(batch):
    t = tracker()
    t.expect_resume("DEMO", 77, {"AAPL": 7})
    t.on_message(Subscribed(2, "DEMO", 77, (Instrument("AAPL", AAPL, 10),)))
    # AAPL was already held: the resume is ignored for it
    assert t.expected("DEMO", "AAPL") == 11
    t2 = SeqTracker()
    t2.on_message(Welcome(1, "s", "demo", 0, 15000, (FeedInfo("DEMO", 1, 77),)))
    t2.expect_resume("DEMO", 77, {"AAPL": 7})
    t2.on_message(Subscribed(1, "DEMO", 77, (Instrument("AAPL", AAPL, 10),)))
    recs = [quote(AAPL, 8, FLAG_REPLAY), trade(AAPL, 9, FLAG_REPLAY), quote(AAPL, 10, FLAG_REPLAY), quote(AAPL, 11)]
    assert feed(t2, recs, batch) == []
    assert t2.stats.replayed == 3
    with pytest.raises(SequenceViolation):
        feed(t2, [quote(AAPL, 11, FLAG_REPLAY)], batch)


def test_resume_from_another_epoch_is_ignored():
    t = SeqTracker()
    t.on_message(Welcome(1, "s", "demo", 0, 15000, (FeedInfo("DEMO", 1, 78),)))
    t.expect_resume("DEMO", 77, {"AAPL": 7})
    t.on_message(Subscribed(1, "DEMO", 78, (Instrument("AAPL", AAPL, 3),)))
    assert t.expected("DEMO", "AAPL") == 4 and t.epoch("DEMO") == 78


def test_resume_ahead_of_the_server_starts_after_the_clients_seq():
    t = SeqTracker()
    t.on_message(Welcome(1, "s", "demo", 0, 15000, (FeedInfo("DEMO", 1, 77),)))
    t.expect_resume("DEMO", 77, {"AAPL": 20})
    t.on_message(Subscribed(1, "DEMO", 77, (Instrument("AAPL", AAPL, 15),)))
    assert t.expected("DEMO", "AAPL") == 21


def test_gap_moves_expected_past_the_range():
    t = SeqTracker()
    t.on_message(Welcome(1, "s", "demo", 0, 15000, (FeedInfo("DEMO", 1, 77),)))
    t.expect_resume("DEMO", 77, {"AAPL": 2})
    t.on_message(Subscribed(1, "DEMO", 77, (Instrument("AAPL", AAPL, 10),)))
    t.on_message(parse_message('{"type":"gap","feed":"DEMO","symbol":"AAPL","from":3,"to":10,"reason":"replay_unavailable"}'))
    assert t.expected("DEMO", "AAPL") == 11 and t.stats.gaps == 1 and t.stats.gap_records == 8
    # the snapshot that follows lies inside the range
    assert t.on_record(quote(AAPL, 9, FLAG_SNAPSHOT)) == []
    assert t.on_record(quote(AAPL, 11)) == []


def test_source_gap_before_the_next_record():
    t = tracker()
    t.on_record(trade(AAPL, 11))
    t.on_gap(Gap("DEMO", "AAPL", 12, 20, "source_gap"))
    assert t.on_record(trade(AAPL, 21)) == []


def test_gap_not_starting_at_expected_is_a_violation():
    t = tracker()
    with pytest.raises(SequenceViolation) as e:
        t.on_gap(Gap("DEMO", "AAPL", 13, 20, "slow_consumer"))
    assert e.value.violation.kind == "gap_mismatch"
    r = tracker("report")
    assert [v.kind for v in r.on_gap(Gap("DEMO", "AAPL", 13, 20, "slow_consumer"))] == ["gap_mismatch"]
    assert r.expected("DEMO", "AAPL") == 21


@BOTH
def test_conflated_records_may_jump_unflagged_ones_may_not(batch):
    t = tracker()
    assert feed(t, [quote(AAPL, 15, FLAG_CONFLATED), trade(AAPL, 16)], batch) == []
    assert t.expected("DEMO", "AAPL") == 17 and t.stats.conflated == 1
    # a throttled subscription (v1.1, §6a): a trade after replaced quotes carries CONFLATED
    assert feed(t, [trade(AAPL, 20, FLAG_CONFLATED), trade(AAPL, 21), quote(AAPL, 25, FLAG_CONFLATED)], batch) == []
    assert t.expected("DEMO", "AAPL") == 26 and t.stats.conflated == 3 and t.stats.violations == 0
    for unflagged in (trade(AAPL, 30), quote(AAPL, 40)):  # a jump without the flag, either type
        with pytest.raises(SequenceViolation) as e:
            feed(t, [unflagged], batch)
        assert e.value.violation.kind == "silent_gap"
    # a gap with reason throttled (trades past the per-update bound) moves expected like any gap
    t.on_gap(Gap("DEMO", "AAPL", 41, 45, "throttled"))
    assert feed(t, [trade(AAPL, 46)], batch) == []
    # CONFLATED never allows going backwards
    with pytest.raises(SequenceViolation) as e:
        feed(t, [trade(AAPL, 20, FLAG_CONFLATED)], batch)
    assert e.value.violation.kind == "duplicate"


def test_reset_restarts_every_instrument_of_the_feed_at_one():
    t = tracker()
    t.on_record(quote(AAPL, 11))
    t.on_message(Reset("DEMO", 99))
    assert t.epoch("DEMO") == 99 and t.stats.resets == 1
    assert t.expected("DEMO", "AAPL") == 1 and t.expected("DEMO", "MSFT") == 1
    assert t.on_record(quote(MSFT, 1)) == [] and t.on_record(trade(AAPL, 1)) == []
    # a new epoch starting above 1 comes with a source_gap from 1
    t.on_message(Reset("DEMO", 100))
    t.on_gap(Gap("DEMO", "AAPL", 1, 499, "source_gap"))
    assert t.on_record(quote(AAPL, 500)) == []


@BOTH
def test_records_of_instruments_not_subscribed(batch):
    t = tracker()
    with pytest.raises(SequenceViolation) as e:
        feed(t, [quote(3, 1)], batch)
    assert e.value.violation.kind == "unsubscribed"
    t.on_message(Unsubscribed(3, "DEMO", ("AAPL",), "request"))
    with pytest.raises(SequenceViolation):
        feed(t, [quote(AAPL, 11)], batch)
    assert t.expected("DEMO", "AAPL") is None


@BOTH
def test_report_mode_returns_violations_and_goes_on(batch):
    t = tracker("report")
    v = feed(t, [quote(AAPL, 11), quote(AAPL, 11), quote(AAPL, 14), quote(AAPL, 15)], batch)
    assert [x.kind for x in v] == ["duplicate", "silent_gap"]
    assert t.expected("DEMO", "AAPL") == 16 and t.stats.violations == 2


def test_instruments_subscribed_again_keep_their_tracking():
    t = tracker()
    t.on_record(quote(AAPL, 11))
    t.on_message(Subscribed(2, "DEMO", 77, (Instrument("AAPL", AAPL, 11),)))
    assert t.expected("DEMO", "AAPL") == 12


def test_forget_drops_the_seq_state():
    t = tracker()
    t.forget("DEMO")
    assert t.last_seqs("DEMO") == {} and t.epoch("DEMO") == 77


def test_bad_mode():
    with pytest.raises(ValueError):
        SeqTracker("ignore")
