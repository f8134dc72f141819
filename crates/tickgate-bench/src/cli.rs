//! Value parsers for the command line's numeric flags: every number is checked by clap
//! against a range before any code sees it, so a bad one is a usage error (exit status
//! 2) naming the flag and the allowed range, never a panic further down
//! (`Duration::from_secs_f64(-1.0)`, an `Instant` overflowing on a huge duration).

use clap::builder::RangedI64ValueParser;

/// Longest `record --seconds`: a year.
pub const MAX_RECORD_SECONDS: f64 = 31_536_000.0;

/// Lowest and highest `load --rate` (ticks/s): the schedule's own floor, and the fastest
/// synthetic feed a feed file may define.
pub const RATE_RANGE: (f64, f64) = (0.001, 10_000_000.0);

/// An integer flag of type `T` that must lie in `lo..=hi`. Parsed as i64 first, so a
/// negative value gets the range message ("-1 is not in 1..=65535"), not a digit error.
pub fn int_in<T>(lo: i64, hi: i64) -> RangedI64ValueParser<T>
where
    T: TryFrom<i64> + Clone + Send + Sync + 'static,
    <T as TryFrom<i64>>::Error: std::error::Error + Send + Sync + 'static,
{
    RangedI64ValueParser::<T>::new().range(lo..=hi)
}

/// A finite float in `(lo, hi]` (`lo_inclusive`: `[lo, hi]`), explained as `what`.
fn float_in(s: &str, lo: f64, lo_inclusive: bool, hi: f64, what: &str) -> Result<f64, String> {
    let open = if lo_inclusive { '[' } else { '(' };
    let explain = || format!("{what} must be a finite number in {open}{lo}, {hi}]");
    let v: f64 = s.trim().parse().map_err(|_| explain())?;
    let above_lo = if lo_inclusive { v >= lo } else { v > lo };
    if v.is_finite() && above_lo && v <= hi {
        Ok(v)
    } else {
        Err(explain())
    }
}

/// `record --seconds`: finite, above 0, at most [`MAX_RECORD_SECONDS`].
pub fn record_seconds(s: &str) -> Result<f64, String> {
    float_in(s, 0.0, false, MAX_RECORD_SECONDS, "seconds")
}

/// `load --rate`: finite ticks per second within [`RATE_RANGE`].
pub fn ticks_per_second(s: &str) -> Result<f64, String> {
    float_in(s, RATE_RANGE.0, true, RATE_RANGE.1, "ticks per second")
}

/// `load --max-rate`: updates per second per instrument of a throttled subscription, in
/// the range the server takes (protocol v1.1: above 0, at most 1,000).
pub fn updates_per_second(s: &str) -> Result<f64, String> {
    float_in(s, 0.01, true, 1000.0, "updates per second")
}

/// `load --child INDEX/PROCESSES` (internal): INDEX < PROCESSES, PROCESSES in 1..=256.
pub fn child_slot(s: &str) -> Result<String, String> {
    let bad = || format!("wants INDEX/PROCESSES with INDEX < PROCESSES <= 256, got {s:?}");
    let (i, p) = s.split_once('/').ok_or_else(bad)?;
    let (i, p): (usize, usize) = (i.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?);
    if p == 0 || p > 256 || i >= p {
        return Err(bad());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_must_be_finite_and_in_range() {
        for bad in ["-1", "0", "NaN", "nan", "inf", "-inf", "1e300", "31536000.5", "", "x", "1s"] {
            assert!(record_seconds(bad).is_err(), "{bad:?}");
        }
        assert_eq!(record_seconds("0.5"), Ok(0.5));
        assert_eq!(record_seconds("31536000"), Ok(MAX_RECORD_SECONDS));
        assert!(ticks_per_second("0.0001").is_err());
        assert_eq!(ticks_per_second("0.001"), Ok(0.001));
        assert!(ticks_per_second("10000001").is_err());
        assert_eq!(record_seconds("-1").unwrap_err(), "seconds must be a finite number in (0, 31536000]");
    }

    #[test]
    fn child_slots() {
        assert!(child_slot("0/4").is_ok());
        for bad in ["4/4", "0/0", "1", "a/b", "0/257", "-1/4"] {
            assert!(child_slot(bad).is_err(), "{bad:?}");
        }
    }
}
