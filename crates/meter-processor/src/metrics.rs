//! Metrics of `meter process` and the named events that move them.

use std::time::Duration;

use prometheus::{GaugeVec, Histogram, IntCounter, IntCounterVec, IntGauge};
use tracing::{debug, info, warn};

use meter_telemetry::{Telemetry, LATENCY_BUCKETS};

#[derive(Clone)]
pub struct ProcessorMetrics {
    pub events_received: IntCounter,
    pub events_aggregated: IntCounter,
    pub events_deduplicated: IntCounter,
    pub events_dead_lettered: IntCounterVec,
    pub events_legacy_fingerprint: IntCounter,
    pub events_schema_resolved: IntCounter,
    pub events_unsigned: IntCounter,
    pub events_without_incarnation: IntCounter,
    pub incarnation_overlaps: IntCounter,
    pub agent_ids_shared: IntCounter,
    pub agent_keys_reload_failures: IntCounter,
    pub aggregates_emitted: IntCounterVec,
    pub watermark_delay: GaugeVec,
    pub windows_open: IntGauge,
    pub dedup_streams: IntGauge,
    pub partitions_assigned: IntGauge,
    pub transactions_committed: IntCounter,
    pub transactions_aborted: IntCounter,
    pub transaction_duration: Histogram,
    pub restore_duration: Histogram,
    pub state_restores: IntCounterVec,
    pub state_entries_restored: IntCounter,
    pub state_store_bytes: IntGauge,
}

impl ProcessorMetrics {
    pub fn register(t: &Telemetry) -> Self {
        ProcessorMetrics {
            events_received: t.counter("meter_events_received_total", "Input records handled, counted when their transaction commits."),
            events_aggregated: t.counter("meter_events_aggregated_total", "Events added to their windows (committed)."),
            events_deduplicated: t
                .counter("meter_events_deduplicated_total", "Events dropped as duplicates of one already counted (committed)."),
            events_dead_lettered: t.counter_vec(
                "meter_events_dead_lettered_total",
                "Input records sent to the dead-letter topic, by reason (committed).",
                &["reason"],
            ),
            events_legacy_fingerprint: t.counter(
                "meter_events_legacy_fingerprint_total",
                "Input records whose single-object header carries the fingerprint meterline wrote before it followed the Avro specification (committed).",
            ),
            events_schema_resolved: t.counter(
                "meter_events_schema_resolved_total",
                "Input records written with another version of the UsageEvent schema, resolved to the current one (committed).",
            ),
            events_unsigned: t.counter(
                "meter_events_unsigned_total",
                "Events accepted from agents without keys in processor.agent_keys_file (processor.accept_unsigned; committed).",
            ),
            events_without_incarnation: t.counter(
                "meter_events_without_incarnation_total",
                "Input records without an agent incarnation (agents before incarnations), whatever their outcome (committed).",
            ),
            incarnation_overlaps: t.counter(
                "meter_agent_incarnation_overlaps_total",
                "Events of an agent id inside the event-time range of another incarnation of it: two live hosts share the agent id.",
            ),
            state_restores: t.counter_vec(
                "meter_processor_state_restores_total",
                "Partition restores by how they began: checkpoint (the local store was used, only the changelog after its checkpoint read), full (no checkpoint), rejected (the checkpoint did not match the changelog and was discarded: a stale, copied or edited store).",
                &["source"],
            ),
            state_entries_restored: t.counter(
                "meter_processor_state_entries_restored_total",
                "Changelog records read into the local store while restoring partitions.",
            ),
            state_store_bytes: t.gauge("meter_processor_state_store_bytes", "Size of the local state store file (processor.state_dir)."),
            agent_ids_shared: t.counter(
                "meter_agent_ids_shared_total",
                "Pairs of live incarnations found sharing one agent id (each pair counted and logged once).",
            ),
            agent_keys_reload_failures: t.counter(
                "meter_agent_keys_reload_failures_total",
                "Changes of processor.agent_keys_file that could not be loaded (the previous keys stay in use).",
            ),
            aggregates_emitted: t.counter_vec(
                "meter_aggregates_emitted_total",
                "Window revisions written to the aggregates topic (committed).",
                &["granularity", "final"],
            ),
            watermark_delay: t.float_gauge_vec(
                "meter_watermark_delay_seconds",
                "Wall clock minus the event-time watermark, per owned input partition.",
                &["partition"],
            ),
            windows_open: t.gauge("meter_windows_open", "Windows held in state (open, or final and still correctable)."),
            dedup_streams: t.gauge("meter_dedup_streams", "(agent, customer) seq streams held in dedup state."),
            partitions_assigned: t.gauge("meter_partitions_assigned", "Input partitions owned by this instance."),
            transactions_committed: t.counter("meter_transactions_committed_total", "Kafka transactions committed."),
            transactions_aborted: t
                .counter("meter_transactions_aborted_total", "Kafka transactions aborted (state restored and input rewound)."),
            transaction_duration: t.histogram(
                "meter_transaction_commit_duration_seconds",
                "From beginning a transaction to its commit acknowledgement.",
                LATENCY_BUCKETS,
            ),
            restore_duration: t.histogram(
                "meter_state_restore_duration_seconds",
                "Time to restore partition state from the changelog.",
                &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
        }
    }
}

/// Outcomes of the records handled since the previous commit, counted once
/// their transaction has committed.
#[derive(Debug, Default)]
pub struct OutcomesCommitted<'a> {
    pub aggregated: u64,
    pub duplicates: u64,
    pub dead_letters: Vec<(&'a str, u64)>,
    pub legacy_fingerprint: u64,
    pub resolved_schema: u64,
    pub unsigned: u64,
    pub without_incarnation: u64,
    pub incarnation_overlaps: u64,
}

impl OutcomesCommitted<'_> {
    pub fn emit(&self, m: &ProcessorMetrics) {
        let dead: u64 = self.dead_letters.iter().map(|(_, n)| n).sum();
        m.events_received.inc_by(self.aggregated + self.duplicates + dead);
        m.events_aggregated.inc_by(self.aggregated);
        m.events_deduplicated.inc_by(self.duplicates);
        m.events_legacy_fingerprint.inc_by(self.legacy_fingerprint);
        m.events_schema_resolved.inc_by(self.resolved_schema);
        m.events_unsigned.inc_by(self.unsigned);
        m.events_without_incarnation.inc_by(self.without_incarnation);
        m.incarnation_overlaps.inc_by(self.incarnation_overlaps);
        for (reason, n) in &self.dead_letters {
            if *n > 0 {
                m.events_dead_lettered.with_label_values(&[reason]).inc_by(*n);
                warn!(reason, count = n, "records dead-lettered");
            }
        }
    }
}

/// One committed transaction.
#[derive(Debug)]
pub struct TransactionCommitted {
    /// Revisions by (granularity, is_final).
    pub revisions: Vec<(&'static str, bool, u64)>,
    pub changes: usize,
    pub dead_letters: usize,
    pub duration: Duration,
}

impl TransactionCommitted {
    pub fn emit(&self, m: &ProcessorMetrics) {
        m.transactions_committed.inc();
        m.transaction_duration.observe(self.duration.as_secs_f64());
        for &(granularity, is_final, n) in &self.revisions {
            m.aggregates_emitted.with_label_values(&[granularity, if is_final { "true" } else { "false" }]).inc_by(n);
        }
        debug!(
            revisions = self.revisions.iter().map(|r| r.2).sum::<u64>(),
            changes = self.changes,
            dead_letters = self.dead_letters,
            ms = self.duration.as_millis() as u64,
            "transaction committed"
        );
    }
}

/// A transaction that failed and was aborted.
#[derive(Debug)]
pub struct TransactionAborted<'a> {
    pub error: &'a str,
}

impl TransactionAborted<'_> {
    pub fn emit(&self, m: &ProcessorMetrics) {
        m.transactions_aborted.inc();
        warn!(error = self.error, "transaction aborted; state will be restored and input rewound");
    }
}

/// Partition state restored from the changelog.
#[derive(Debug)]
pub struct StateRestored<'a> {
    pub partitions: &'a [i32],
    /// Changelog records read (the tail after the checkpoints).
    pub entries: u64,
    /// Entries then loaded into memory from the store (the hot state).
    pub loaded: u64,
    /// How each partition's restore began, see `state_restores`.
    pub sources: &'a [(i32, &'static str)],
    pub duration: Duration,
}

impl StateRestored<'_> {
    pub fn emit(&self, m: &ProcessorMetrics) {
        m.restore_duration.observe(self.duration.as_secs_f64());
        m.state_entries_restored.inc_by(self.entries);
        for (_, source) in self.sources {
            m.state_restores.with_label_values(&[source]).inc();
        }
        info!(
            partitions = ?self.partitions,
            entries = self.entries,
            loaded = self.loaded,
            sources = ?self.sources,
            ms = self.duration.as_millis() as u64,
            "partition state restored"
        );
    }
}

/// A checkpoint of the local store that does not describe the changelog.
pub struct CheckpointRejected<'a> {
    pub partition: i32,
    pub reason: &'a str,
}

impl CheckpointRejected<'_> {
    pub fn emit(&self) {
        warn!(
            partition = self.partition,
            reason = self.reason,
            "the local state store's checkpoint does not match the changelog; discarding the partition's local state and restoring it in full"
        );
    }
}

/// Two live incarnations of one agent id (both counted).
#[derive(Debug)]
pub struct AgentIdShared<'a> {
    pub shared: &'a meter_engine::SharedIdentity,
}

impl AgentIdShared<'_> {
    pub fn emit(&self, m: &ProcessorMetrics) {
        m.agent_ids_shared.inc();
        let [a, b] = &self.shared.incarnations;
        warn!(
            agent_id = %self.shared.agent_id,
            incarnations = %format!("{a}, {b}"),
            "two hosts publish usage under one agent id at the same time (a cloned image or a reused host name); both are counted, but give each host its own agent.agent_id (docs/operations.md, \"Agent identity\")"
        );
    }
}
