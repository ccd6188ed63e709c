//! Reconciliation: ClickHouse and `usage.aggregates` against a ledger,
//! per key and to the unit.

use std::time::Duration;

use anyhow::Context;
use meter_config::Config;
use meter_model::ledger::{compare, Ledger, Mismatch};
use meter_model::Granularity;

/// Everything a reconciliation found.
pub struct Reconciliation {
    pub events: i64,
    pub keys: usize,
    pub mismatches: Vec<(String, Mismatch)>,
    pub final_windows: usize,
    pub windows: usize,
    /// Events aggregated according to the topic's minute windows.
    pub aggregated_events: i64,
    /// Windows whose latest revision is not final.
    pub not_final: Vec<meter_model::WindowKey>,
}

impl Reconciliation {
    pub fn summary(&self) -> String {
        if self.mismatches.is_empty() {
            format!("reconciliation: ok ({} events, {} keys, 0 mismatches)", self.events, self.keys)
        } else {
            format!("reconciliation: FAILED ({} events, {} keys, {} mismatches)", self.events, self.keys, self.mismatches.len())
        }
    }
}

/// Compares ClickHouse (minute, hour, day; latest revision per window) and
/// the latest revisions on the aggregates topic with the ledger, per key and
/// to the unit.
pub async fn reconcile(cfg: &Config, ledger: &Ledger) -> anyhow::Result<Reconciliation> {
    let expected = ledger.with_rollups();
    let client = crate::sink::connection(cfg).client()?;
    let mut clickhouse = Ledger::default();
    for g in Granularity::ALL {
        clickhouse.merge(&meter_clickhouse::latest_totals(&client, g).await.with_context(|| format!("reading {}", g.table()))?);
    }
    let kafka_cfg = cfg.clone();
    let latest = tokio::task::spawn_blocking(move || crate::aggregates::read_latest(&kafka_cfg, Duration::from_secs(120))).await??;
    let mut mismatches: Vec<(String, Mismatch)> = Vec::new();
    mismatches.extend(compare(&expected, &clickhouse).into_iter().map(|m| ("clickhouse".to_owned(), m)));
    mismatches.extend(compare(&expected, &latest.totals()).into_iter().map(|m| (cfg.topics.aggregates.clone(), m)));
    Ok(Reconciliation {
        events: ledger.event_count(),
        keys: expected.entries.len(),
        mismatches,
        final_windows: latest.final_count(),
        windows: latest.windows.len(),
        not_final: latest.windows.values().filter(|a| !a.is_final).map(|a| a.key.clone()).collect(),
        aggregated_events: latest
            .windows
            .values()
            .filter(|a| a.key.granularity == meter_model::Granularity::Minute)
            .map(|a| a.event_count)
            .sum(),
    })
}
