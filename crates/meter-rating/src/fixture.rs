//! Usage fixtures: a compact, hand-checkable description of a month's usage
//! (daily quantities and instance runs) that expands into the [`UsageRow`]s
//! and [`MinuteRow`]s rating takes. The golden scenario
//! (`tests/golden/usage.toml`, priced by hand in `tests/golden/README.md`)
//! is one; an end-to-end test can load the same file and write the rows (or
//! per-second events built from the minute rows) into the pipeline.
//!
//! Quantities are products of integers and named units, e.g.
//! `"61440 * GiB * day"`: KiB, MiB, GiB, TiB, PiB (powers of 2^10) and
//! minute, hour, day (seconds).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::date::{parse_utc_millis, toml_text, Date, YearMonth};
use crate::error::{Error, Result};
use crate::rate::{HourRow, MinuteRow, UsageRow};

/// `tests/golden/usage.toml`.
pub const GOLDEN_USAGE: &str = include_str!("../tests/golden/usage.toml");
/// `tests/golden/expected_lines.csv`: the hand-priced invoice lines.
pub const GOLDEN_EXPECTED_LINES: &str = include_str!("../tests/golden/expected_lines.csv");
/// `tests/golden/expected_invoices.csv`: the hand-priced invoice totals.
pub const GOLDEN_EXPECTED_INVOICES: &str = include_str!("../tests/golden/expected_invoices.csv");

/// A usage scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Daily quantities.
    #[serde(default)]
    pub daily: Vec<DailyUsage>,
    /// Runs of resources billed per second (they yield minute rows and daily rows).
    #[serde(default)]
    pub run: Vec<RunUsage>,
}

/// The same quantity on every day from `first_day` to `last_day`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyUsage {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    /// Empty unless the catalog keys the usage type by resource.
    #[serde(default)]
    pub resource_id: String,
    pub first_day: Date,
    /// Inclusive; defaults to `first_day`.
    #[serde(default)]
    pub last_day: Option<Date>,
    /// Base units per day, e.g. `"61440 * GiB * day"`.
    #[serde(deserialize_with = "quantity")]
    pub quantity: i128,
}

/// A resource running for `seconds` from `start`, optionally repeated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunUsage {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub resource_id: String,
    /// UTC start, a TOML datetime or "YYYY-MM-DDTHH:MM:SSZ".
    #[serde(deserialize_with = "instant")]
    pub start: i64,
    /// Length of each run in seconds, e.g. `"100 * hour"`.
    #[serde(deserialize_with = "quantity")]
    pub seconds: i128,
    /// Number of runs (default 1).
    #[serde(default = "one")]
    pub repeat: u32,
    /// Minutes between the starts of repeated runs.
    #[serde(default)]
    pub every_minutes: u32,
}

fn one() -> u32 {
    1
}

fn instant<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    parse_utc_millis(&toml_text(d)?).map_err(serde::de::Error::custom)
}

/// Evaluate `"61440 * GiB * day"`.
pub fn parse_quantity(s: &str) -> Result<i128, String> {
    let mut q: i128 = 1;
    for f in s.split('*') {
        let f = f.trim();
        let v: i128 = match f {
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "PiB" => 1 << 50,
            "minute" => 60,
            "hour" => 3600,
            "day" => 86_400,
            _ => f.replace('_', "").parse().map_err(|_| format!("{f:?} in {s:?} is not an integer or a known unit"))?,
        };
        q = q.checked_mul(v).ok_or_else(|| format!("{s:?} overflows"))?;
    }
    Ok(q)
}

fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Integer(i) => Ok(i128::from(i)),
        toml::Value::String(s) => parse_quantity(&s).map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!("expected a quantity, found {}", other.type_str()))),
    }
}

type ResourceKey = (String, String, String, String, String);

impl Scenario {
    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Fixture(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Fixture(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The golden scenario.
    pub fn golden() -> Result<Self> {
        Self::parse(GOLDEN_USAGE)
    }

    /// Every minute row of every run (all months), one per (resource, minute).
    pub fn minute_rows(&self) -> Vec<MinuteRow> {
        let mut per: BTreeMap<(ResourceKey, i64), i128> = BTreeMap::new();
        for r in &self.run {
            let rk = (r.customer_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone(), r.resource_id.clone());
            for i in 0..r.repeat {
                // Seconds fill minutes from the start second on; a run may start mid-minute.
                let mut t = r.start + i64::from(i) * i64::from(r.every_minutes) * 60_000;
                let mut left = r.seconds;
                while left > 0 {
                    let minute = t - t.rem_euclid(60_000);
                    let take = left.min(i128::from((minute + 60_000 - t) / 1000));
                    *per.entry((rk.clone(), minute)).or_insert(0) += take;
                    left -= take;
                    t += i64::try_from(take).unwrap_or(0) * 1000;
                }
            }
        }
        per.into_iter()
            .map(|((k, minute_start), quantity)| MinuteRow {
                customer_id: k.0,
                service: k.1,
                usage_type: k.2,
                region: k.3,
                resource_id: k.4,
                minute_start,
                quantity,
            })
            .collect()
    }

    /// The daily rows of `month` (from `daily` entries and from runs) and all
    /// minute rows (pass them all to rating; it uses what it needs).
    pub fn usage(&self, month: YearMonth) -> Result<(Vec<UsageRow>, Vec<MinuteRow>)> {
        let mut per: BTreeMap<(ResourceKey, Date), i128> = BTreeMap::new();
        for d in &self.daily {
            let last = d.last_day.unwrap_or(d.first_day);
            if last < d.first_day {
                return Err(Error::Fixture(format!("last_day {last} is before first_day {}", d.first_day)));
            }
            let rk = (d.customer_id.clone(), d.service.clone(), d.usage_type.clone(), d.region.clone(), d.resource_id.clone());
            for day in month.iter_days().filter(|x| *x >= d.first_day && *x <= last) {
                *per.entry((rk.clone(), day)).or_insert(0) += d.quantity;
            }
        }
        let minutes = self.minute_rows();
        for m in &minutes {
            let Some(day) = Date::from_millis(m.minute_start).filter(|x| month.contains(*x)) else { continue };
            let rk = (m.customer_id.clone(), m.service.clone(), m.usage_type.clone(), m.region.clone(), m.resource_id.clone());
            *per.entry((rk, day)).or_insert(0) += m.quantity;
        }
        let rows = per
            .into_iter()
            .map(|((k, day), quantity)| UsageRow {
                customer_id: k.0,
                service: k.1,
                usage_type: k.2,
                region: k.3,
                resource_id: k.4,
                day,
                quantity,
            })
            .collect();
        Ok((rows, minutes))
    }
}

/// The golden billing scenario (`tests/golden/billing/`, priced by hand in
/// its README): daily usage as CSV (day, customer_id, service, usage_type,
/// region, resource_id, quantity in base units) ...
pub const BILLING_USAGE: &str = include_str!("../../../tests/golden/billing/usage.csv");
/// ... instance runs (a [`Scenario`]) ...
pub const BILLING_RUNS: &str = include_str!("../../../tests/golden/billing/runs.toml");
/// ... its contracts ...
pub const BILLING_CONTRACTS: &str = include_str!("../../../tests/golden/billing/contracts.toml");
/// ... and what rating May and then June 2026 must give, to the cent.
pub const BILLING_EXPECTED_LINES: &str = include_str!("../../../tests/golden/billing/expected_lines.csv");
pub const BILLING_EXPECTED_INVOICES: &str = include_str!("../../../tests/golden/billing/expected_invoices.csv");
pub const BILLING_EXPECTED_LEDGER: &str = include_str!("../../../tests/golden/billing/expected_ledger.csv");

/// Minute rows summed per (customer, service, usage type, region) and hour:
/// the `usage_hour` rows reservations and savings plans are applied to.
pub fn hour_rows(minutes: &[MinuteRow]) -> Vec<HourRow> {
    let mut per: BTreeMap<(String, String, String, String, i64), i128> = BTreeMap::new();
    for m in minutes {
        let hour = m.minute_start - m.minute_start.rem_euclid(3_600_000);
        *per.entry((m.customer_id.clone(), m.service.clone(), m.usage_type.clone(), m.region.clone(), hour)).or_insert(0) += m.quantity;
    }
    per.into_iter()
        .map(|((customer_id, service, usage_type, region, hour_start), quantity)| HourRow {
            customer_id,
            service,
            usage_type,
            region,
            hour_start,
            quantity,
        })
        .collect()
}

/// Daily usage rows from CSV with a header (`BILLING_USAGE`'s columns).
pub fn usage_csv(text: &str) -> Result<Vec<UsageRow>> {
    let bad = |n: usize, why: String| Error::Fixture(format!("usage line {n}: {why}"));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1).filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let [day, customer_id, service, usage_type, region, resource_id, quantity] = f[..] else {
            return Err(bad(n + 1, format!("{} fields, want 7", f.len())));
        };
        out.push(UsageRow {
            customer_id: customer_id.to_owned(),
            service: service.to_owned(),
            usage_type: usage_type.to_owned(),
            region: region.to_owned(),
            resource_id: resource_id.to_owned(),
            day: day.parse().map_err(|e| bad(n + 1, format!("day {day:?}: {e}")))?,
            quantity: quantity.parse().map_err(|e| bad(n + 1, format!("quantity {quantity:?}: {e}")))?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_runs_expand() {
        assert_eq!(parse_quantity("61440 * GiB * day").unwrap(), 61440 * (1i128 << 30) * 86_400);
        assert_eq!(parse_quantity("12_345_678").unwrap(), 12_345_678);
        assert!(parse_quantity("3 * parsec").is_err());
        let s = Scenario::parse(
            r#"
[[run]]
customer_id = "c"
service = "compute"
usage_type = "BoxUsage:t3.micro"
region = "r"
resource_id = "i"
start = 2026-02-28T23:59:40Z
seconds = 50
"#,
        )
        .unwrap();
        let m = s.minute_rows();
        assert_eq!(m.iter().map(|m| m.quantity).collect::<Vec<_>>(), vec![20, 30]);
        let (rows, _) = s.usage("2026-02".parse().unwrap()).unwrap();
        assert_eq!((rows.len(), rows[0].quantity, rows[0].day.to_string()), (1, 20, "2026-02-28".to_owned()));
    }
}
