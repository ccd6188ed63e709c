//! The agent's counters and gauges, shared with whoever exports them
//! (Prometheus names in the doc comments).

use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free so that the exporter reads them while the agent runs.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// `meter_agent_events_generated_total`: events the source produced.
    pub generated: AtomicU64,
    /// `meter_agent_events_spooled_total`: events appended to the spool
    /// (every kept event is, before it is sent).
    pub spooled: AtomicU64,
    /// `meter_agent_events_produced_total`: events Kafka acknowledged.
    pub produced: AtomicU64,
    /// `meter_agent_events_replayed_total`: events sent again, after a
    /// restart (the unacknowledged tail) or a failed delivery.
    pub replayed: AtomicU64,
    /// `meter_agent_events_dropped_total`: events the full spool could not
    /// keep (also logged).
    pub dropped: AtomicU64,
    /// `meter_agent_delivery_failures_total`: failed deliveries (each makes
    /// the agent send again from the spool).
    pub delivery_failures: AtomicU64,
    /// `meter_agent_ticks_total`: seconds emitted.
    pub ticks: AtomicU64,
    /// `meter_agent_ticks_caught_up_total`: seconds emitted late because the
    /// agent fell behind the one-second cadence (never skipped).
    pub caught_up_ticks: AtomicU64,
    /// `meter_agent_seconds_compressed_total`: seconds of a gap longer than
    /// `agent.max_catch_up_s` whose usage was spread over later seconds.
    pub compressed_seconds: AtomicU64,
    /// `meter_agent_counter_resets_total` / `_wraps_total`: kernel counters
    /// that went down (reset: counted from 0; wrap: across the top).
    pub counter_resets: AtomicU64,
    pub counter_wraps: AtomicU64,
    /// `meter_agent_spool_bytes`: bytes on disk in the spool (gauge).
    pub spool_bytes: AtomicU64,
    /// `meter_agent_spool_backlog_events`: spooled, not yet acknowledged (gauge).
    pub backlog: AtomicU64,
}

impl AgentStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(c: &AtomicU64, n: u64) {
        c.store(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        let g = Self::get;
        format!(
            "{} generated, {} spooled, {} produced, {} replayed, {} dropped, {} delivery failures, {} ticks ({} caught up, {} compressed), {} counter resets, {} wraps, spool {} bytes / {} events behind",
            g(&self.generated),
            g(&self.spooled),
            g(&self.produced),
            g(&self.replayed),
            g(&self.dropped),
            g(&self.delivery_failures),
            g(&self.ticks),
            g(&self.caught_up_ticks),
            g(&self.compressed_seconds),
            g(&self.counter_resets),
            g(&self.counter_wraps),
            g(&self.spool_bytes),
            g(&self.backlog),
        )
    }
}
