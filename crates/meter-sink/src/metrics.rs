//! Metrics of `meter sink` and the named events that move them.

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use tracing::{debug, warn};

use meter_telemetry::{unix_seconds, Telemetry, LATENCY_BUCKETS};

#[derive(Clone)]
pub struct SinkMetrics {
    pub rows_inserted: IntCounterVec,
    pub batch_rows: Histogram,
    pub insert_duration: Histogram,
    pub insert_retries: IntCounter,
    pub insert_failures: IntCounter,
    pub last_success: IntGauge,
}

impl SinkMetrics {
    pub fn register(t: &Telemetry) -> Self {
        SinkMetrics {
            rows_inserted: t.counter_vec(
                "meter_sink_rows_inserted_total",
                "Rows inserted into ClickHouse and acknowledged, by table.",
                &["table"],
            ),
            batch_rows: t.histogram("meter_sink_batch_rows", "Rows per inserted batch.", &[1.0, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0]),
            insert_duration: t.histogram(
                "meter_sink_insert_duration_seconds",
                "From the first insert attempt of a batch to its acknowledgement, retries included.",
                LATENCY_BUCKETS,
            ),
            insert_retries: t.counter("meter_sink_insert_retries_total", "Batch inserts retried after a failure."),
            insert_failures: t.counter("meter_sink_insert_failures_total", "Batch insert attempts that failed (each is retried)."),
            last_success: t.gauge("meter_sink_last_success_timestamp_seconds", "Unix time of the last acknowledged insert."),
        }
    }
}

/// A batch inserted into ClickHouse and its offsets committed.
#[derive(Debug)]
pub struct BatchInserted<'a> {
    pub rows_by_table: &'a [(&'a str, u64)],
    pub duration: Duration,
}

impl BatchInserted<'_> {
    pub fn emit(&self, m: &SinkMetrics) {
        let total: u64 = self.rows_by_table.iter().map(|(_, n)| n).sum();
        for (table, n) in self.rows_by_table {
            if *n > 0 {
                m.rows_inserted.with_label_values(&[table]).inc_by(*n);
            }
        }
        m.batch_rows.observe(total as f64);
        m.insert_duration.observe(self.duration.as_secs_f64());
        m.last_success.set(unix_seconds());
        debug!(rows = total, ms = self.duration.as_millis() as u64, "batch inserted and committed");
    }
}

/// One failed insert attempt; the batch is kept and retried.
#[derive(Debug)]
pub struct InsertFailed<'a> {
    pub error: &'a str,
    pub rows: usize,
    pub retry_in: Duration,
}

impl InsertFailed<'_> {
    pub fn emit(&self, m: &SinkMetrics) {
        m.insert_failures.inc();
        m.insert_retries.inc();
        warn!(error = self.error, rows = self.rows, retry_in_ms = self.retry_in.as_millis() as u64, "ClickHouse insert failed; retrying");
    }
}
