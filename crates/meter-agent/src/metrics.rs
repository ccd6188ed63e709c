//! Metrics of `meter agent` and the named events that move them.
//!
//! Each event is one occurrence in the agent's loop; its `emit()` counts it
//! and logs it together, so a metric and its log line cannot disagree. The
//! loop beats the service's liveness with every tick it emits (also while
//! Kafka is down and it spools), so `/health/live` follows the loop.

use std::time::Duration;

use meter_model::Millis;
use meter_telemetry::Telemetry;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tracing::{error, info, warn};

/// The agent's metrics, registered in its [`Telemetry`]. Cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    telemetry: Telemetry,
    /// Events the source produced.
    pub generated: IntCounter,
    /// Events appended to the spool (every kept event is, before it is sent).
    pub spooled: IntCounter,
    /// Events Kafka acknowledged.
    pub produced: IntCounter,
    /// Events sent again, after a restart (the unacknowledged tail) or a
    /// failed delivery.
    pub replayed: IntCounter,
    /// Events the full spool could not keep (also logged).
    pub dropped: IntCounter,
    /// Failed deliveries (each makes the agent send again from the spool).
    pub delivery_failures: IntCounter,
    /// Failed deliveries the broker refused for want of authorization: this
    /// agent's principal may not write the topic (an ACL, or a wrong
    /// `topics.events`). Also counted in `delivery_failures`.
    pub delivery_denied: IntCounter,
    /// Seconds emitted.
    pub ticks: IntCounter,
    /// Seconds emitted late because the agent fell behind the one-second
    /// cadence (never skipped).
    pub caught_up_ticks: IntCounter,
    /// Seconds of a gap longer than `agent.max_catch_up_s` whose usage was
    /// spread over later seconds.
    pub compressed_seconds: IntCounter,
    /// Kernel counters that went down and were counted from 0.
    pub counter_resets: IntCounter,
    /// Kernel counters that wrapped across the top.
    pub counter_wraps: IntCounter,
    /// Bytes on disk in the spool.
    pub spool_bytes: IntGauge,
    /// Spooled, not yet acknowledged.
    pub spool_backlog: IntGauge,
    /// Configured size limit of the spool.
    pub spool_limit_bytes: IntGauge,
    /// Free bytes of the file system holding the spool.
    pub disk_free_bytes: IntGauge,
    /// Writes of the state folder that failed, by file (`spool`,
    /// `checkpoint`, `dropped_ledger`): a full or failing disk.
    pub state_write_failures: IntCounterVec,
    /// Bytes of torn ends cut off the state files at start (a crash during a
    /// write; never events that were sent).
    pub state_torn_bytes: IntCounter,
    /// Incarnations this state dir started (1 for a new one; more when it
    /// was found on another machine or its file was unreadable).
    pub incarnations_started: IntCounter,
    /// Lease renewals committed to Kafka.
    pub lease_renewals: IntCounter,
    /// Events sent with a signature.
    pub signed: IntCounter,
}

impl AgentMetrics {
    pub fn register(t: &Telemetry) -> Self {
        AgentMetrics {
            telemetry: t.clone(),
            generated: t.counter("meter_agent_events_generated_total", "Events the source (sampler or simulator) produced."),
            spooled: t.counter("meter_agent_events_spooled_total", "Events written to the on-disk spool."),
            produced: t.counter("meter_agent_events_produced_total", "Events acknowledged by Kafka."),
            replayed: t.counter("meter_agent_events_replayed_total", "Spooled events sent again once Kafka answered."),
            dropped: t.counter("meter_agent_events_dropped_total", "Events that could not be kept because the spool was full."),
            delivery_failures: t
                .counter("meter_agent_delivery_failures_total", "Failed deliveries; each makes the agent send again from the spool."),
            delivery_denied: t.counter(
                "meter_agent_delivery_denied_total",
                "Failed deliveries the broker refused because this agent's principal may not write the topic (ACLs, or a wrong topics.events).",
            ),
            ticks: t.counter("meter_agent_ticks_total", "One-second ticks emitted."),
            caught_up_ticks: t
                .counter("meter_agent_ticks_caught_up_total", "One-second ticks emitted late, with their correct timestamps."),
            compressed_seconds: t.counter(
                "meter_agent_seconds_compressed_total",
                "Seconds of a gap longer than agent.max_catch_up_s whose usage was spread over its last seconds.",
            ),
            counter_resets: t.counter("meter_agent_counter_resets_total", "Kernel counters that went down and were counted from 0."),
            counter_wraps: t.counter("meter_agent_counter_wraps_total", "Kernel counters that wrapped across the top."),
            spool_bytes: t.gauge("meter_agent_spool_bytes", "Bytes held in the on-disk spool."),
            spool_backlog: t.gauge("meter_agent_spool_backlog_events", "Spooled events not yet acknowledged by Kafka."),
            spool_limit_bytes: t.gauge("meter_agent_spool_limit_bytes", "Configured size limit of the spool."),
            disk_free_bytes: t.gauge("meter_agent_disk_free_bytes", "Free bytes of the file system holding the spool."),
            state_write_failures: t.counter_vec(
                "meter_agent_state_write_failures_total",
                "Writes of the agent's state folder that failed (a full or failing disk), by file.",
                &["file"],
            ),
            state_torn_bytes: t.counter("meter_agent_state_torn_bytes_total", "Bytes of torn ends cut off the state files at start."),
            incarnations_started: t.counter(
                "meter_agent_incarnations_started_total",
                "New incarnations of this agent: a new state dir, or one found on another machine.",
            ),
            lease_renewals: t.counter("meter_agent_lease_renewals_total", "Renewals of the agent's Kafka lease (its identity's fencing)."),
            signed: t.counter("meter_agent_events_signed_total", "Events sent with a meterline-signature header."),
        }
    }

    /// Metrics in a registry of their own, for an agent nobody scrapes.
    pub fn unserved() -> Self {
        AgentMetrics::register(&Telemetry::new("agent"))
    }

    /// The service is up: live while it beats (every tick), ready while it runs.
    pub fn started(&self, liveness_timeout: Duration) {
        let health = self.telemetry.health();
        health.set_live_timeout(liveness_timeout);
        health.beat();
        health.set_ready();
    }

    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        format!(
            "{} generated, {} spooled, {} produced, {} replayed, {} dropped, {} delivery failures ({} denied), {} ticks ({} caught up, {} compressed), {} counter resets, {} wraps, spool {} bytes / {} events behind",
            self.generated.get(),
            self.spooled.get(),
            self.produced.get(),
            self.replayed.get(),
            self.dropped.get(),
            self.delivery_failures.get(),
            self.delivery_denied.get(),
            self.ticks.get(),
            self.caught_up_ticks.get(),
            self.compressed_seconds.get(),
            self.counter_resets.get(),
            self.counter_wraps.get(),
            self.spool_bytes.get(),
            self.spool_backlog.get(),
        )
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Ticks the source emitted in one turn of the loop.
#[derive(Debug)]
pub struct TicksEmitted {
    pub ticks: u64,
    pub events: u64,
}

impl TicksEmitted {
    pub fn emit(&self, m: &AgentMetrics) {
        m.ticks.inc_by(self.ticks);
        m.generated.inc_by(self.events);
        if self.ticks > 0 {
            m.telemetry.health().beat();
        }
    }
}

/// Seconds emitted late, each with its own timestamp: the simulator
/// catching up with its pace, or the host sampler after it fell behind.
#[derive(Debug)]
pub struct TicksCaughtUp {
    pub ticks: u64,
    /// The host sampler: worth a warning (the simulator catches up by design).
    pub sampler: bool,
}

impl TicksCaughtUp {
    pub fn emit(&self, m: &AgentMetrics) {
        m.caught_up_ticks.inc_by(self.ticks);
        if self.sampler && self.ticks > 0 {
            warn!(seconds = self.ticks, "sampler fell behind; caught up with one tick per missed second");
        }
    }
}

/// A gap longer than `agent.max_catch_up_s`: its usage was spread over the
/// last seconds (totals stay exact).
#[derive(Debug)]
pub struct GapCompressed {
    pub seconds: u64,
    pub max_catch_up_s: u64,
}

impl GapCompressed {
    pub fn emit(&self, m: &AgentMetrics) {
        m.compressed_seconds.inc_by(self.seconds);
        warn!(
            seconds = self.seconds,
            max_catch_up_s = self.max_catch_up_s,
            "gap longer than agent.max_catch_up_s: its usage is spread over the last seconds"
        );
    }
}

/// Kernel counters that went down since the last sample.
#[derive(Debug)]
pub struct CountersWentDown {
    pub resets: u64,
    pub wraps: u64,
}

impl CountersWentDown {
    pub fn emit(&self, m: &AgentMetrics) {
        m.counter_resets.inc_by(self.resets);
        m.counter_wraps.inc_by(self.wraps);
        if self.resets > 0 {
            warn!(resets = self.resets, "a kernel counter went down; counted from 0");
        }
    }
}

/// A turn's ticks appended to the spool.
#[derive(Debug)]
pub struct TicksSpooled {
    pub events: u64,
}

impl TicksSpooled {
    pub fn emit(&self, m: &AgentMetrics) {
        m.spooled.inc_by(self.events);
    }
}

/// A turn's ticks the spool could not keep (full, or the disk failed).
#[derive(Debug)]
pub struct TicksDropped {
    pub events: u64,
    pub tick: Millis,
    pub spool_bytes: u64,
    /// Why, for the log.
    pub why: &'static str,
    /// Whether to log this time: the loop logs drops at most every 10 s.
    pub log: bool,
}

impl TicksDropped {
    pub fn emit(&self, m: &AgentMetrics) {
        m.dropped.inc_by(self.events);
        if self.log {
            error!(
                events = self.events,
                tick = self.tick,
                dropped_total = m.dropped.get(),
                spool_bytes = self.spool_bytes,
                why = self.why,
                "dropped ticks (counted in meter_agent_events_dropped_total; recorded in dropped-ledger.csv once a later tick is kept)"
            );
        }
    }
}

/// Spooled events Kafka acknowledged.
#[derive(Debug)]
pub struct EventsAcknowledged {
    pub events: u64,
}

impl EventsAcknowledged {
    pub fn emit(&self, m: &AgentMetrics) {
        m.produced.inc_by(self.events);
    }
}

/// A delivery failed: everything unacknowledged is sent again from the
/// spool, in order, after a backoff.
#[derive(Debug)]
pub struct DeliveryFailed<'a> {
    pub error: &'a str,
    pub resend: u64,
    pub backlog: u64,
}

impl DeliveryFailed<'_> {
    pub fn emit(&self, m: &AgentMetrics) {
        m.delivery_failures.inc();
        m.replayed.inc_by(self.resend);
        if is_denied(self.error) {
            m.delivery_denied.inc();
            error!(
                error = self.error,
                backlog = self.backlog,
                "Kafka refused this agent's principal the write: grant it Write on the events topic, or fix topics.events; the events stay in the spool and are sent again in 1 s"
            );
        } else {
            warn!(error = self.error, resend = self.resend, backlog = self.backlog, "delivery failed; sending again from the spool in 1 s");
        }
    }
}

/// Whether a delivery error is the broker's refusal to authorize the write
/// (`TopicAuthorizationFailed`, `ClusterAuthorizationFailed`, ...).
fn is_denied(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("authorizationfailed") || e.contains("authorization failed")
}

/// What opening the spool found after the previous run.
#[derive(Debug)]
pub struct SpoolRecovered<'a> {
    pub truncated_bytes: u64,
    pub unacked: u64,
    /// Why `checkpoint.json` could not be used, if it could not.
    pub checkpoint_fallback: Option<&'a str>,
}

impl SpoolRecovered<'_> {
    pub fn emit(&self, m: &AgentMetrics) {
        if self.truncated_bytes > 0 {
            m.state_torn_bytes.inc_by(self.truncated_bytes);
            warn!(bytes = self.truncated_bytes, "cut off a torn tick at the end of the spool (it was never sent)");
        }
        if let Some(why) = self.checkpoint_fallback {
            warn!(reason = why, "the checkpoint cannot be read: continuing from the previous one; what it does not cover is sent again");
        }
        if self.unacked > 0 {
            info!(events = self.unacked, "sending the unacknowledged tail of the spool again");
            m.replayed.inc_by(self.unacked);
        }
    }
}

/// The spool's size, after a turn.
#[derive(Debug)]
pub struct SpoolMeasured {
    pub bytes: u64,
    pub backlog: u64,
}

impl SpoolMeasured {
    pub fn emit(&self, m: &AgentMetrics) {
        m.spool_bytes.set(gauge(self.bytes));
        m.spool_backlog.set(gauge(self.backlog));
    }
}

/// At start, the spool's file system has less free than the reserve the
/// spool leaves: every tick is dropped (counted, recorded) until space is
/// freed or `agent.disk_reserve_bytes` lowered.
#[derive(Debug)]
pub struct DiskBelowReserve {
    pub free: u64,
    pub reserve: u64,
}

impl DiskBelowReserve {
    pub fn emit(&self, m: &AgentMetrics) {
        m.disk_free_bytes.set(gauge(self.free));
        if self.free < self.reserve {
            warn!(
                free = self.free,
                reserve = self.reserve,
                "the state folder's file system has less free than agent.disk_reserve_bytes: every tick is dropped (counted, recorded) until space is freed or the reserve lowered"
            );
        }
    }
}

/// A torn end cut off a state file at start.
#[derive(Debug)]
pub struct TornTailCut {
    pub file: &'static str,
    pub bytes: u64,
}

impl TornTailCut {
    pub fn emit(&self, m: &AgentMetrics) {
        if self.bytes > 0 {
            m.state_torn_bytes.inc_by(self.bytes);
            warn!(file = self.file, bytes = self.bytes, "cut off a torn end (a crash during a write)");
        }
    }
}

/// A write of the state folder failed: usually a full disk. Nothing is
/// lost: a spool write that fails drops its tick (counted, recorded), a
/// checkpoint that fails is tried again, a dropped-ledger record waits in
/// memory for the next turn.
#[derive(Debug)]
pub struct StateWriteFailed<'a> {
    pub file: &'static str,
    pub error: &'a str,
}

impl StateWriteFailed<'_> {
    pub fn emit(&self, m: &AgentMetrics) {
        m.state_write_failures.with_label_values(&[self.file]).inc();
        error!(file = self.file, error = self.error, "cannot write the state folder (is the disk full?); retrying");
    }
}

/// The agent's identity as it starts: its incarnation, how it came by it,
/// and whether it signs.
#[derive(Debug)]
pub struct IdentityReady<'a> {
    pub incarnation: &'a crate::identity::Incarnation,
    pub origin: &'a crate::identity::Origin,
    pub signing_key: Option<&'a str>,
}

impl IdentityReady<'_> {
    pub fn emit(&self, m: &AgentMetrics) {
        use crate::identity::Origin;
        let i = self.incarnation;
        match self.origin {
            Origin::Recorded => {}
            Origin::Created => m.incarnations_started.inc(),
            Origin::Moved { previous } => {
                m.incarnations_started.inc();
                warn!(
                    previous = %previous.incarnation,
                    previous_machine = %previous.machine,
                    machine = %i.machine,
                    previous_agent_id = %previous.agent_id,
                    "this state dir was created on another machine (or for another agent id): starting a new incarnation, so that this host's events never share a seq stream with the original's"
                );
            }
            Origin::Unreadable { error } => {
                m.incarnations_started.inc();
                warn!(%error, "the incarnation file is unreadable: starting a new incarnation (safe: a new seq stream)");
            }
        }
        if i.machine.is_empty() {
            warn!("no machine identity (no /etc/machine-id and agent.host_identity unset): a copy of this state dir on another host would keep this incarnation");
        }
        match self.signing_key {
            Some(id) => info!(agent_id = %i.agent_id, incarnation = %i.incarnation, signing_key = id, "agent identity"),
            None => {
                info!(agent_id = %i.agent_id, incarnation = %i.incarnation, "agent identity; events are not signed (no agent.signing_key_file or METER_AGENT_SIGNING_KEY)")
            }
        }
    }
}
