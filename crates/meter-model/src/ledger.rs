//! The ground-truth ledger: what an agent produced, summed per customer,
//! service, usage type, region and minute. The demo and the tests compare
//! ClickHouse and `usage.aggregates` against it to the unit.
//!
//! File format: CSV with a header line,
//! `customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum`.
//! Values never contain commas (the simulator chooses them); reading rejects
//! lines that do not have exactly seven fields.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{Granularity, Millis};

const HEADER: &str = "customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum";

/// A ledger key: the aggregation key without resource_id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LedgerKey {
    pub granularity: Granularity,
    pub window_start: Millis,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
}

impl std::fmt::Display for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}/{}/{}/{}",
            self.granularity.as_str(),
            self.window_start,
            self.customer_id,
            self.service,
            self.usage_type,
            self.region
        )
    }
}

/// Exact totals of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub event_count: i64,
    pub quantity_sum: i128,
}

impl Totals {
    pub fn add(&mut self, other: Totals) {
        self.event_count += other.event_count;
        self.quantity_sum += other.quantity_sum;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("ledger line {line}: {message}")]
pub struct LedgerError {
    pub line: usize,
    pub message: String,
}

/// Totals per key, for one or more granularities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub entries: BTreeMap<LedgerKey, Totals>,
}

impl Ledger {
    /// Records one event at minute granularity.
    pub fn record(&mut self, customer_id: &str, service: &str, usage_type: &str, region: &str, event_time: Millis, quantity: i64) {
        let key = LedgerKey {
            granularity: Granularity::Minute,
            window_start: Granularity::Minute.window_start(event_time),
            customer_id: customer_id.to_owned(),
            service: service.to_owned(),
            usage_type: usage_type.to_owned(),
            region: region.to_owned(),
        };
        self.entries.entry(key).or_default().add(Totals { event_count: 1, quantity_sum: i128::from(quantity) });
    }

    pub fn merge(&mut self, other: &Ledger) {
        for (k, t) in &other.entries {
            self.entries.entry(k.clone()).or_default().add(*t);
        }
    }

    /// The minute entries rolled up to minute, hour and day keys.
    pub fn with_rollups(&self) -> Ledger {
        let mut out = Ledger::default();
        for (k, t) in self.entries.iter().filter(|(k, _)| k.granularity == Granularity::Minute) {
            for g in Granularity::ALL {
                let key = LedgerKey { granularity: g, window_start: g.window_start(k.window_start), ..k.clone() };
                out.entries.entry(key).or_default().add(*t);
            }
        }
        out
    }

    pub fn event_count(&self) -> i64 {
        self.entries.iter().filter(|(k, _)| k.granularity == Granularity::Minute).map(|(_, t)| t.event_count).sum()
    }

    /// CSV of the minute entries.
    pub fn to_csv(&self) -> String {
        let mut s = String::with_capacity(64 * (self.entries.len() + 1));
        s.push_str(HEADER);
        s.push('\n');
        for (k, t) in self.entries.iter().filter(|(k, _)| k.granularity == Granularity::Minute) {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                k.customer_id, k.service, k.usage_type, k.region, k.window_start, t.event_count, t.quantity_sum
            );
        }
        s
    }

    pub fn from_csv(text: &str) -> Result<Ledger, LedgerError> {
        let mut ledger = Ledger::default();
        for (i, line) in text.lines().enumerate() {
            if i == 0 {
                if line != HEADER {
                    return Err(LedgerError { line: 1, message: format!("expected header {HEADER:?}") });
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let err = |message: String| LedgerError { line: i + 1, message };
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 7 {
                return Err(err(format!("expected 7 fields, found {}", f.len())));
            }
            let window_start = f[4].parse().map_err(|e| err(format!("minute_start_ms: {e}")))?;
            let event_count = f[5].parse().map_err(|e| err(format!("event_count: {e}")))?;
            let quantity_sum = f[6].parse().map_err(|e| err(format!("quantity_sum: {e}")))?;
            let key = LedgerKey {
                granularity: Granularity::Minute,
                window_start,
                customer_id: f[0].to_owned(),
                service: f[1].to_owned(),
                usage_type: f[2].to_owned(),
                region: f[3].to_owned(),
            };
            ledger.entries.entry(key).or_default().add(Totals { event_count, quantity_sum });
        }
        Ok(ledger)
    }
}

/// One difference between the ledger and what a system reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub key: LedgerKey,
    pub expected: Option<Totals>,
    pub actual: Option<Totals>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |t: &Option<Totals>| match t {
            Some(t) => format!("{} events, sum {}", t.event_count, t.quantity_sum),
            None => "missing".to_owned(),
        };
        write!(f, "{}: expected {}, found {}", self.key, show(&self.expected), show(&self.actual))
    }
}

/// Every key whose totals differ between `expected` and `actual`, both ways.
pub fn compare(expected: &Ledger, actual: &Ledger) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (k, e) in &expected.entries {
        match actual.entries.get(k) {
            Some(a) if a == e => {}
            a => out.push(Mismatch { key: k.clone(), expected: Some(*e), actual: a.copied() }),
        }
    }
    for (k, a) in &actual.entries {
        if !expected.entries.contains_key(k) {
            out.push(Mismatch { key: k.clone(), expected: None, actual: Some(*a) });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_and_rollups_add_up() {
        let mut l = Ledger::default();
        l.record("c1", "compute", "BoxUsage:m5.large", "us-east-1", 1_000, 1);
        l.record("c1", "compute", "BoxUsage:m5.large", "us-east-1", 61_000, 1);
        l.record("c2", "cdn", "Requests-HTTPS", "eu", 3_600_000, 7);
        let back = Ledger::from_csv(&l.to_csv()).unwrap();
        assert_eq!(back, l);
        let r = l.with_rollups();
        let hour0 = LedgerKey {
            granularity: Granularity::Hour,
            window_start: 0,
            customer_id: "c1".into(),
            service: "compute".into(),
            usage_type: "BoxUsage:m5.large".into(),
            region: "us-east-1".into(),
        };
        assert_eq!(r.entries[&hour0], Totals { event_count: 2, quantity_sum: 2 });
        assert_eq!(r.event_count(), 3);
    }

    #[test]
    fn compare_reports_missing_extra_and_different() {
        let mut a = Ledger::default();
        a.record("c1", "s", "u", "r", 0, 5);
        a.record("c2", "s", "u", "r", 0, 5);
        let mut b = Ledger::default();
        b.record("c1", "s", "u", "r", 0, 4);
        b.record("c3", "s", "u", "r", 0, 5);
        let m = compare(&a, &b);
        assert_eq!(m.len(), 3);
        assert!(compare(&a, &a).is_empty());
    }

    #[test]
    fn rejects_short_lines() {
        let text = format!("{HEADER}\na,b,c\n");
        assert_eq!(Ledger::from_csv(&text).unwrap_err().line, 2);
    }
}
