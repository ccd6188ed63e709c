//! Resource runs and the per-run minimum (per-second billing with a minimum).
//!
//! A run is a maximal sequence of consecutive minutes in which a resource
//! used more than zero seconds; a run is billed `max(its seconds, minimum)`.
//! The extra seconds (the uplift) are billed on the UTC day the run started.
//!
//! This is an approximation from minute windows: a stop and a restart inside
//! the same minute, or in adjacent minutes, look like one run, so the
//! minimum is applied once where the provider would apply it twice (the
//! customer is never billed more than the minute series shows plus one
//! minimum per visible run). A run that crosses a month boundary belongs to
//! the month it started in: pass the minute series from one minute before
//! the month to `minimum_seconds` minutes after it ([`minute_series_range`])
//! so such runs are seen whole; minutes outside the month only shape runs
//! and never add usage.

use std::collections::BTreeMap;

use crate::date::{Date, YearMonth};

const MINUTE_MS: i64 = 60_000;

/// One run of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Start of the run's first minute, epoch milliseconds.
    pub first_minute: i64,
    /// Start of the run's last minute.
    pub last_minute: i64,
    /// Seconds used in the run (sum of its minutes).
    pub seconds: i128,
}

/// The minute-series range `[from, to)` (epoch milliseconds) to load for
/// rating `month` with a per-run minimum of `minimum_seconds`: one minute
/// before the month (to see that a run started earlier) and enough after it
/// to see that a run reaches the minimum (each minute of a run has at least
/// one second, so `minimum_seconds` minutes suffice).
pub fn minute_series_range(month: YearMonth, minimum_seconds: u32) -> (i64, i64) {
    (month.start_millis() - MINUTE_MS, month.end_millis() + i64::from(minimum_seconds) * MINUTE_MS)
}

/// Runs of a minute series sorted by minute start, without duplicates.
pub fn runs(series: &[(i64, i128)]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut open = false;
    for &(minute, q) in series {
        if q <= 0 {
            open = false;
            continue;
        }
        match out.last_mut() {
            Some(r) if open && minute == r.last_minute + MINUTE_MS => {
                r.last_minute = minute;
                r.seconds = r.seconds.saturating_add(q);
            }
            _ => out.push(Run { first_minute: minute, last_minute: minute, seconds: q }),
        }
        open = true;
    }
    out
}

/// Uplift seconds per day of `month` for one resource: for every run that
/// starts in the month, `max(0, minimum - run seconds)` on its start day.
pub fn uplift_by_day(series: &[(i64, i128)], minimum_seconds: u32, month: YearMonth) -> BTreeMap<Date, i128> {
    let mut out = BTreeMap::new();
    for r in runs(series) {
        let extra = i128::from(minimum_seconds) - r.seconds;
        if extra <= 0 {
            continue;
        }
        if let Some(day) = Date::from_millis(r.first_minute).filter(|d| month.contains(*d)) {
            *out.entry(day).or_insert(0) += extra;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_runs_and_zero_minutes_are_gaps() {
        let m = |i: i64| i * MINUTE_MS;
        let s = [(m(0), 60), (m(1), 5), (m(3), 10), (m(4), 0), (m(5), 20), (m(6), 60), (m(7), 60)];
        let r = runs(&s);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].seconds, r[1].seconds, r[2].seconds), (65, 10, 140));
        assert_eq!(r[2].first_minute, m(5));
    }

    #[test]
    fn a_run_from_the_previous_month_gets_no_minimum_here() {
        let mar: YearMonth = "2026-03".parse().unwrap();
        let t = mar.start_millis();
        let s = [(t - MINUTE_MS, 20), (t, 30), (t + 10 * MINUTE_MS, 5)];
        let u = uplift_by_day(&s, 60, mar);
        assert_eq!(u.into_iter().collect::<Vec<_>>(), vec![(mar.first_day(), 55)]);
        let feb: YearMonth = "2026-02".parse().unwrap();
        let u = uplift_by_day(&s, 60, feb);
        assert_eq!(u.into_iter().collect::<Vec<_>>(), vec![(feb.last_day(), 10)]);
    }
}
