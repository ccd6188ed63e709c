//! `[processor]`: `meter process`, the exactly-once aggregation service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{default_instance_id, Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Consumer group of the processor instances.
    #[serde(default = "default_processor_group")]
    pub group_id: String,
    /// Identity of this instance, stable across its restarts: the
    /// transactional id is `{group_id}-{instance_id}`, so a restarted
    /// instance fences its predecessor and aborts its open transaction at
    /// once. Two live instances must not share it. Default: the host name.
    #[serde(default = "default_instance_id")]
    pub instance_id: String,
    /// Consumer group session timeout: how long a dead instance keeps its
    /// partitions before they move to another instance.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Kafka transaction timeout: how long the transaction of an instance
    /// that died without a successor may block read_committed readers.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// How often changed windows are emitted and offsets committed (one
    /// Kafka transaction each).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How long after a window's end events are still folded into it before
    /// its final revision is emitted.
    #[serde(default = "default_allowed_lateness_ms")]
    pub allowed_lateness_ms: i64,
    /// How long after a window's end a late event still produces a correction
    /// of the final revision; later events are dead-lettered as `too_late`.
    #[serde(default = "default_correction_horizon_ms")]
    pub correction_horizon_ms: i64,
    /// Where the on-disk state store lives (one file per group and instance,
    /// `{group_id}--{instance_id}.redb`): every window, dedup stream and
    /// seq-less id of the owned partitions, with a checkpoint of the
    /// changelog offsets it reflects. A restart on the same disk restores
    /// only the changelog after the checkpoint; a lost or unusable store
    /// is rebuilt from the changelog (the durable copy). Give every
    /// instance its own local disk; it needs about the changelog's
    /// compacted size.
    #[serde(default = "default_state_dir")]
    pub state_dir: std::path::PathBuf,
    /// How long a final window stays in memory after it closed (window
    /// end + allowed lateness); then it is on disk only and read back when
    /// a late event corrects it. Memory follows the active keys times
    /// (lateness + this), not the correction horizon.
    #[serde(default = "default_hot_window_ms")]
    pub hot_window_ms: i64,
    /// Events further than this in the future of the processor's clock are
    /// dead-lettered as `future_timestamp`.
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: i64,
    /// A partition without records for this long advances its watermark with
    /// the wall clock.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    /// NEGATIVE CONTROL ONLY, in builds with the `testkit` feature (never in
    /// the release binary): skip restoring state from the changelog on
    /// assignment. This breaks exactly-once (a restarted instance re-emits
    /// windows from partial state); it exists so that `meter chaos
    /// --negative-control` can show the harness detects a broken guarantee.
    #[cfg(feature = "testkit")]
    #[serde(default)]
    pub unsafe_skip_state_restore: bool,
    /// Payloads larger than this are dead-lettered as `oversize_payload`.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Strings longer than this (in bytes) are dead-lettered as `string_too_long`.
    #[serde(default = "default_max_string_bytes")]
    pub max_string_bytes: usize,
    /// Which customers each agent may publish usage for, e.g.
    /// `agents = { "host-17" = ["cust-0001"], "edge-2" = ["*"] }` (`*`: any
    /// customer). When set, an event from an agent not listed, or for a
    /// customer its agent is not registered for, is dead-lettered as
    /// `unauthorized` and counted, never aggregated. Empty (the default):
    /// every agent may publish for every customer.
    #[serde(default)]
    pub agents: BTreeMap<String, Vec<String>>,
    /// The agents' signature verification keys: a TOML file of
    /// `[agents."<agent id>"]` tables of `<key id> = "<secret hex>"` (two
    /// keys at once during a rotation). An agent listed there must sign
    /// every event with one of its keys, else the event is dead-lettered
    /// as `bad_signature`. Re-read when the file changes. Unset: no agent
    /// is enrolled.
    #[serde(default)]
    pub agent_keys_file: Option<std::path::PathBuf>,
    /// Whether events of agents without keys, and unsigned, are accepted
    /// (counted as `meter_events_unsigned_total`). Turn it off once every
    /// agent signs.
    #[serde(default = "default_true")]
    pub accept_unsigned: bool,
    /// Whether events without an incarnation (agents before incarnations,
    /// UsageEvent version 1) are accepted (counted as
    /// `meter_events_without_incarnation_total`). Turn it off once the
    /// fleet is upgraded.
    #[serde(default = "default_true")]
    pub accept_no_incarnation: bool,
}

fn default_true() -> bool {
    true
}

fn default_processor_group() -> String {
    "meter-processor".into()
}
pub(crate) fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_transaction_timeout_ms() -> u64 {
    30_000
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_allowed_lateness_ms() -> i64 {
    5 * 60_000
}
fn default_correction_horizon_ms() -> i64 {
    35 * 24 * 3_600_000
}
fn default_state_dir() -> std::path::PathBuf {
    "/var/lib/meter-processor".into()
}
fn default_hot_window_ms() -> i64 {
    15 * 60_000
}
fn default_max_clock_skew_ms() -> i64 {
    5 * 60_000
}
fn default_idle_timeout_ms() -> i64 {
    10_000
}
fn default_max_payload_bytes() -> usize {
    64 * 1024
}
fn default_max_string_bytes() -> usize {
    256
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            group_id: default_processor_group(),
            instance_id: default_instance_id(),
            session_timeout_ms: default_session_timeout_ms(),
            transaction_timeout_ms: default_transaction_timeout_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            allowed_lateness_ms: default_allowed_lateness_ms(),
            correction_horizon_ms: default_correction_horizon_ms(),
            state_dir: default_state_dir(),
            hot_window_ms: default_hot_window_ms(),
            max_clock_skew_ms: default_max_clock_skew_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            #[cfg(feature = "testkit")]
            unsafe_skip_state_restore: false,
            max_payload_bytes: default_max_payload_bytes(),
            max_string_bytes: default_max_string_bytes(),
            agents: BTreeMap::new(),
            agent_keys_file: None,
            accept_unsigned: true,
            accept_no_incarnation: true,
        }
    }
}

impl Section for ProcessorConfig {
    const NAME: &'static str = "processor";

    fn check(&self, p: &mut Problems) {
        p.check(self.commit_interval_ms > 0, "processor.commit_interval_ms must be positive");
        p.check(!self.instance_id.is_empty(), "processor.instance_id must not be empty");
        p.check(self.session_timeout_ms >= 6_000, "processor.session_timeout_ms must be at least 6000 (the broker's minimum)");
        p.check(self.transaction_timeout_ms >= 1_000, "processor.transaction_timeout_ms must be at least 1000");
        p.check(self.allowed_lateness_ms >= 0, "processor.allowed_lateness_ms must not be negative");
        p.check(
            self.correction_horizon_ms >= self.allowed_lateness_ms,
            "processor.correction_horizon_ms must be at least processor.allowed_lateness_ms",
        );
        p.check(!self.state_dir.as_os_str().is_empty(), "processor.state_dir must not be empty");
        p.check(self.hot_window_ms >= 0, "processor.hot_window_ms must not be negative");
        p.check(self.max_clock_skew_ms >= 0, "processor.max_clock_skew_ms must not be negative");
        p.check(self.idle_timeout_ms > 0, "processor.idle_timeout_ms must be positive");
        p.check(self.max_payload_bytes > 0, "processor.max_payload_bytes must be positive");
        for (agent, customers) in &self.agents {
            p.check(!customers.is_empty(), &format!("processor.agents.{agent} lists no customers (use [\"*\"] for any)"));
        }
    }
}
