//! Configuration of every meterline component, one TOML file per deployment.
//!
//! Layering, lowest to highest precedence: the defaults written on each field
//! below, then the TOML file (if any), then environment variables named
//! `METER__SECTION__KEY` (e.g. `METER__KAFKA__BROKERS`,
//! `METER__CLICKHOUSE__PASSWORD`). Secrets such as the ClickHouse password
//! belong in the environment, never in the file.
//!
//! Unknown fields are rejected so that a misspelt key is an error rather than
//! a silently ignored setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub topics: TopicsConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub processor: ProcessorConfig,
    #[serde(default)]
    pub sink: SinkConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub rating: RatingConfig,
    #[serde(default)]
    pub agent: AgentConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Extra librdkafka client properties passed through unchanged to every
    /// client (e.g. `security.protocol`, `sasl.mechanism`). Put credentials in
    /// the environment: `METER__KAFKA__PROPERTIES__SASL.PASSWORD` is not a
    /// valid variable name, so prefer `sasl.username`/`sasl.password` via a
    /// file readable only by the service.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig { brokers: default_brokers(), properties: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Usage events published by agents, keyed by customer_id.
    #[serde(default = "default_events_topic")]
    pub events: String,
    /// Window revisions published by the processor, keyed by window key.
    #[serde(default = "default_aggregates_topic")]
    pub aggregates: String,
    /// Records the processor refused, with the reason and original bytes.
    #[serde(default = "default_dlq_topic")]
    pub dlq: String,
    /// The processor's state changelog (compacted, internal; one partition
    /// per events partition). Empty: `{processor.group_id}-state`, so that
    /// every processor group has its own. Use [`Config::state_topic`].
    #[serde(default)]
    pub state: String,
    /// Monthly invoice lines published by `meter rate` (Avro InvoiceLine,
    /// keyed by line id, compacted: the latest value of a line id wins).
    #[serde(default = "default_invoice_lines_topic")]
    pub invoice_lines: String,
    /// Partitions used when `meter init` creates the topics.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor used when `meter init` creates the topics.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
}

fn default_events_topic() -> String {
    "usage.events".into()
}
fn default_aggregates_topic() -> String {
    "usage.aggregates".into()
}
fn default_dlq_topic() -> String {
    "usage.dlq".into()
}
fn default_invoice_lines_topic() -> String {
    "billing.invoice_lines".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    1
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            events: default_events_topic(),
            aggregates: default_aggregates_topic(),
            dlq: default_dlq_topic(),
            state: String::new(),
            invoice_lines: default_invoice_lines_topic(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP endpoint of the ClickHouse server.
    #[serde(default = "default_ch_url")]
    pub url: String,
    /// Database holding meterline's tables; created by `meter migrate`.
    #[serde(default = "default_ch_database")]
    pub database: String,
    /// User the sink, migrations and reports connect as.
    #[serde(default = "default_ch_user")]
    pub user: String,
    /// Password; set it with `METER__CLICKHOUSE__PASSWORD`, not in the file.
    #[serde(default)]
    pub password: String,
}

fn default_ch_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_ch_database() -> String {
    "meterline".into()
}
fn default_ch_user() -> String {
    "default".into()
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig { url: default_ch_url(), database: default_ch_database(), user: default_ch_user(), password: String::new() }
    }
}

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
    /// Events further than this in the future of the processor's clock are
    /// dead-lettered as `future_timestamp`.
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: i64,
    /// A partition without records for this long advances its watermark with
    /// the wall clock.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    /// NEGATIVE CONTROL ONLY: skip restoring state from the changelog on
    /// assignment. This breaks exactly-once (a restarted instance re-emits
    /// windows from partial state); it exists so that `meter chaos
    /// --negative-control` can show the harness detects a broken guarantee.
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
}

fn default_processor_group() -> String {
    "meter-processor".into()
}
fn default_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "meter".into())
}
fn default_session_timeout_ms() -> u64 {
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
            max_clock_skew_ms: default_max_clock_skew_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            unsafe_skip_state_restore: false,
            max_payload_bytes: default_max_payload_bytes(),
            max_string_bytes: default_max_string_bytes(),
            agents: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Consumer group of the sink instances.
    #[serde(default = "default_sink_group")]
    pub group_id: String,
    /// Identity of this sink instance, stable across its restarts (static
    /// group membership): a restarted sink takes its partitions back at once
    /// instead of waiting for its predecessor's session to time out. Two
    /// live instances must not share it. Default: the host name.
    #[serde(default = "default_instance_id")]
    pub instance_id: String,
    /// Consumer group session timeout: how long a dead sink keeps its
    /// partitions before they move to another sink.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// A batch is inserted when it holds this many rows...
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// ...or when its oldest row has waited this long.
    #[serde(default = "default_batch_ms")]
    pub batch_ms: u64,
    /// First retry delay after a failed insert; doubles up to `max_backoff_ms`.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_sink_group() -> String {
    "meter-sink".into()
}
fn default_batch_rows() -> usize {
    50_000
}
fn default_batch_ms() -> u64 {
    1_000
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    10_000
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            group_id: default_sink_group(),
            instance_id: default_instance_id(),
            session_timeout_ms: default_session_timeout_ms(),
            batch_rows: default_batch_rows(),
            batch_ms: default_batch_ms(),
            backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Catalog file; the catalog built into the binary when unset.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address (host:port) serving `/metrics` (Prometheus text format),
    /// `/health/live` and `/health/ready`. Empty: the component's default,
    /// `127.0.0.1:9464` for `meter process`, `127.0.0.1:9465` for `meter
    /// sink`, `127.0.0.1:9466` for `meter agent`. `off` serves nothing. Port
    /// 0 picks a free port (logged at start).
    #[serde(default)]
    pub listen: String,
    /// How often librdkafka reports the statistics behind the
    /// `meter_kafka_*` and `meter_consumer_lag_records` metrics; 0 turns
    /// them off.
    #[serde(default = "default_kafka_statistics_interval_ms")]
    pub kafka_statistics_interval_ms: u64,
    /// A service whose main loop makes no progress for this long answers
    /// `/health/live` with 503.
    #[serde(default = "default_liveness_timeout_ms")]
    pub liveness_timeout_ms: u64,
}

fn default_kafka_statistics_interval_ms() -> u64 {
    5_000
}
fn default_liveness_timeout_ms() -> u64 {
    60_000
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: String::new(),
            kafka_statistics_interval_ms: default_kafka_statistics_interval_ms(),
            liveness_timeout_ms: default_liveness_timeout_ms(),
        }
    }
}

impl MetricsConfig {
    /// The address to serve on for a component whose default is `default`,
    /// or `None` when turned off.
    pub fn listen_or(&self, default: &str) -> Option<String> {
        match self.listen.trim() {
            "" => Some(default.to_owned()),
            "off" => None,
            a => Some(a.to_owned()),
        }
    }
}

/// When the agent forces its spool (write-ahead log) to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every appended tick: survives power loss, costs one fsync per second.
    Always,
    /// Every `agent.fsync_interval_ms`: a power loss may lose that much.
    Interval,
    /// Never: survives a killed agent (the page cache keeps the data), not a
    /// power loss.
    Never,
}

/// `meter agent`: the host sampler (or the simulator with `--simulate`),
/// its persisted sequence numbers and its on-disk spool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent id stamped on every event; with the customer it names the seq
    /// stream, so it must be unique per host and stable. Default: host name.
    #[serde(default = "default_instance_id")]
    pub agent_id: String,
    /// Customer billed for this host's usage. Required by the host sampler.
    #[serde(default)]
    pub customer_id: String,
    /// Region stamped on the events.
    #[serde(default = "default_agent_region")]
    pub region: String,
    /// Resource id of the host (CPU and memory events); interfaces and disks
    /// are `{resource_id}/{name}`. Default: `agent_id`.
    #[serde(default)]
    pub resource_id: String,
    /// Root of the proc file system (tests point it at fixture folders).
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// Network interfaces to meter; empty: every interface except `lo`.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Block devices to meter; empty: every whole disk (partitions, loop, ram
    /// and zram devices are left out so that no byte is counted twice).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Width of the kernel's network and disk counters: 64 on 64-bit kernels,
    /// 32 on 32-bit ones. A counter that goes down is a wrap if the width
    /// makes that plausible, else a reset (counted from 0).
    #[serde(default = "default_counter_bits")]
    pub counter_bits: u32,
    /// USER_HZ of the kernel (`getconf CLK_TCK`), the unit of /proc/stat.
    #[serde(default = "default_clock_ticks")]
    pub clock_ticks_per_second: u64,
    /// After a gap (agent stopped, host suspended) the usage of every missed
    /// second is emitted with its own timestamp, up to this many seconds;
    /// the usage of a longer gap is spread over its last this-many seconds
    /// (totals stay exact; logged and counted).
    #[serde(default = "default_max_catch_up_s")]
    pub max_catch_up_s: u64,
    /// Folder for the persisted seqs, the checkpoint and the spool. One agent
    /// per folder; keep it across restarts and upgrades.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Upper bound of the spool on disk. When full, new ticks are dropped,
    /// counted and logged (never silently).
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Size at which the spool starts a new segment file; acknowledged
    /// segments are deleted whole.
    #[serde(default = "default_spool_segment_bytes")]
    pub spool_segment_bytes: u64,
    /// When the spool is forced to disk: `always`, `interval` or `never`.
    #[serde(default = "default_fsync")]
    pub fsync: FsyncPolicy,
    /// Period of `fsync = "interval"`.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// How often the acknowledged position and seqs are checkpointed (and
    /// acknowledged segments deleted). After a crash at most this much is
    /// sent again (the processor drops the duplicates by seq).
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Events handed to the Kafka producer and not yet acknowledged; beyond
    /// this, events wait in the spool (bounds memory when Kafka is slow).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// librdkafka `message.timeout.ms`: after this a delivery counts as
    /// failed and the agent sends again from the spool.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// On SIGTERM, how long the agent waits for outstanding deliveries before
    /// it leaves them in the spool for the next start.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

fn default_agent_region() -> String {
    "local".into()
}
fn default_proc_root() -> PathBuf {
    "/proc".into()
}
fn default_counter_bits() -> u32 {
    64
}
fn default_clock_ticks() -> u64 {
    100
}
fn default_max_catch_up_s() -> u64 {
    3_600
}
fn default_state_dir() -> PathBuf {
    "/var/lib/meter-agent".into()
}
fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_spool_segment_bytes() -> u64 {
    16 << 20
}
fn default_fsync() -> FsyncPolicy {
    FsyncPolicy::Interval
}
fn default_fsync_interval_ms() -> u64 {
    1_000
}
fn default_checkpoint_interval_ms() -> u64 {
    1_000
}
fn default_max_in_flight() -> usize {
    50_000
}
fn default_delivery_timeout_ms() -> u64 {
    30_000
}
fn default_shutdown_timeout_ms() -> u64 {
    10_000
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            agent_id: default_instance_id(),
            customer_id: String::new(),
            region: default_agent_region(),
            resource_id: String::new(),
            proc_root: default_proc_root(),
            interfaces: Vec::new(),
            disks: Vec::new(),
            counter_bits: default_counter_bits(),
            clock_ticks_per_second: default_clock_ticks(),
            max_catch_up_s: default_max_catch_up_s(),
            state_dir: default_state_dir(),
            spool_max_bytes: default_spool_max_bytes(),
            spool_segment_bytes: default_spool_segment_bytes(),
            fsync: default_fsync(),
            fsync_interval_ms: default_fsync_interval_ms(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            max_in_flight: default_max_in_flight(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
        }
    }
}

impl AgentConfig {
    /// The host's resource id: `resource_id`, else `agent_id`.
    pub fn host_resource_id(&self) -> &str {
        if self.resource_id.is_empty() {
            &self.agent_id
        } else {
            &self.resource_id
        }
    }

    /// Problems of the agent section, each as one message (empty: valid).
    /// `sampler` adds what only the host sampler needs (a customer).
    pub fn problems(&self, sampler: bool) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                p.push(msg.to_owned());
            }
        };
        let id_ok = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(|c| c.is_control());
        check(id_ok(&self.agent_id), "agent.agent_id must be 1 to 256 printable characters");
        check(id_ok(&self.region), "agent.region must be 1 to 256 printable characters");
        check(self.resource_id.len() <= 200, "agent.resource_id must be at most 200 bytes");
        if sampler {
            check(id_ok(&self.customer_id), "agent.customer_id must be set (the customer billed for this host)");
        }
        check(matches!(self.counter_bits, 32 | 64), "agent.counter_bits must be 32 or 64");
        check(
            self.clock_ticks_per_second > 0 && self.clock_ticks_per_second <= 1_000_000,
            "agent.clock_ticks_per_second must be between 1 and 1000000",
        );
        check(!self.state_dir.as_os_str().is_empty(), "agent.state_dir must not be empty");
        check(self.max_catch_up_s > 0 && self.max_catch_up_s <= 86_400, "agent.max_catch_up_s must be between 1 and 86400");
        check(self.spool_segment_bytes >= 4096, "agent.spool_segment_bytes must be at least 4096");
        check(self.spool_max_bytes >= self.spool_segment_bytes, "agent.spool_max_bytes must be at least agent.spool_segment_bytes");
        check(self.fsync_interval_ms > 0, "agent.fsync_interval_ms must be positive");
        check(self.checkpoint_interval_ms > 0, "agent.checkpoint_interval_ms must be positive");
        check(self.max_in_flight > 0, "agent.max_in_flight must be positive");
        check(self.delivery_timeout_ms >= 1_000, "agent.delivery_timeout_ms must be at least 1000");
        p
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RatingConfig {
    /// Price book file (TOML, see `schemas/pricebook.toml`) used by `meter
    /// prices load`, `meter rate` and the invoice preview; the sample price
    /// book built into the binary when unset.
    #[serde(default)]
    pub price_book: Option<PathBuf>,
}

const MASK: &str = "***";

/// Pass-through librdkafka properties that carry credentials or key material.
fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "sasl.jaas.config", "ssl.key.pem", "ssl.keystore", "token"].iter().any(|s| k.contains(s))
}

/// Removes the value at `path` (object keys; array indices as numbers).
fn remove_path(tree: &mut serde_json::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = tree;
    for seg in parents {
        node = match node {
            serde_json::Value::Object(m) => match m.get_mut(seg) {
                Some(n) => n,
                None => return false,
            },
            serde_json::Value::Array(a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        serde_json::Value::Object(m) => m.remove(last).is_some(),
        serde_json::Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

impl Config {
    /// Loads defaults, then `file` (if given), then `METER__*` variables, and
    /// validates the result, reporting every problem found.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        builder = builder.add_source(config::Environment::with_prefix("METER").prefix_separator("__").separator("__").try_parsing(true));
        let tree: serde_json::Value = builder.build()?.try_deserialize()?;
        Config::from_tree(tree)
    }

    /// Deserializes the merged settings, collecting every field that cannot
    /// be read (unknown, or of the wrong type) and then every invalid value,
    /// so that one run reports all problems, each with its path.
    fn from_tree(mut tree: serde_json::Value) -> Result<Config> {
        let mut problems = Vec::new();
        let cfg = loop {
            match serde_path_to_error::deserialize::<_, Config>(&tree) {
                Ok(cfg) => break cfg,
                Err(e) => {
                    let mut path: Vec<String> = e.path().iter().map(|s| s.to_string()).collect();
                    let message = e.inner().to_string();
                    // Make sure the path names an unknown field itself, not
                    // only its parent.
                    if let Some(field) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                        if path.last().map(String::as_str) != Some(field) {
                            path.push(field.to_owned());
                        }
                    }
                    problems.push(format!("{}: {message}", path.join(".")));
                    // Drop what could not be read and carry on, to find the
                    // rest; give up if it cannot be dropped (nothing to gain).
                    if problems.len() >= 100 || !remove_path(&mut tree, &path) {
                        return Err(ConfigError::Invalid(problems));
                    }
                }
            }
        };
        problems.extend(cfg.problems());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every invalid value, or Ok.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The configuration as TOML, with secrets (passwords, SASL and TLS key
    /// material among the pass-through Kafka properties) replaced by `***`.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if !c.clickhouse.password.is_empty() {
            c.clickhouse.password = MASK.into();
        }
        for (k, v) in c.kafka.properties.iter_mut() {
            if is_secret_property(k) {
                *v = MASK.into();
            }
        }
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                problems.push(msg.to_owned());
            }
        };
        check(!self.kafka.brokers.trim().is_empty(), "kafka.brokers must not be empty");
        check(self.topics.partitions > 0, "topics.partitions must be positive");
        check(self.topics.replication_factor > 0, "topics.replication_factor must be positive");
        for (name, t) in [
            ("events", &self.topics.events),
            ("aggregates", &self.topics.aggregates),
            ("dlq", &self.topics.dlq),
            ("invoice_lines", &self.topics.invoice_lines),
        ] {
            check(!t.is_empty(), &format!("topics.{name} must not be empty"));
        }
        check(self.processor.commit_interval_ms > 0, "processor.commit_interval_ms must be positive");
        check(!self.processor.instance_id.is_empty(), "processor.instance_id must not be empty");
        check(self.processor.session_timeout_ms >= 6_000, "processor.session_timeout_ms must be at least 6000 (the broker's minimum)");
        check(!self.sink.instance_id.is_empty(), "sink.instance_id must not be empty");
        check(self.sink.session_timeout_ms >= 6_000, "sink.session_timeout_ms must be at least 6000 (the broker's minimum)");
        check(self.processor.transaction_timeout_ms >= 1_000, "processor.transaction_timeout_ms must be at least 1000");
        check(self.processor.allowed_lateness_ms >= 0, "processor.allowed_lateness_ms must not be negative");
        check(
            self.processor.correction_horizon_ms >= self.processor.allowed_lateness_ms,
            "processor.correction_horizon_ms must be at least processor.allowed_lateness_ms",
        );
        check(self.processor.max_clock_skew_ms >= 0, "processor.max_clock_skew_ms must not be negative");
        check(self.processor.idle_timeout_ms > 0, "processor.idle_timeout_ms must be positive");
        check(self.processor.max_payload_bytes > 0, "processor.max_payload_bytes must be positive");
        check(self.sink.batch_rows > 0, "sink.batch_rows must be positive");
        check(self.sink.batch_ms > 0, "sink.batch_ms must be positive");
        check(
            self.clickhouse.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !self.clickhouse.database.is_empty(),
            "clickhouse.database must be a non-empty identifier of letters, digits and _",
        );
        check(self.metrics.liveness_timeout_ms > 0, "metrics.liveness_timeout_ms must be positive");
        if let Some(listen) = self.metrics.listen_or("127.0.0.1:0") {
            check(
                listen.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
                &format!("metrics.listen must be host:port, `off` or empty, not `{listen}`"),
            );
        }
        for (agent, customers) in &self.processor.agents {
            check(!customers.is_empty(), &format!("processor.agents.{agent} lists no customers (use [\"*\"] for any)"));
        }
        problems.extend(self.agent.problems(false));
        problems
    }

    /// The processor's state changelog topic.
    pub fn state_topic(&self) -> String {
        if self.topics.state.is_empty() {
            format!("{}-state", self.processor.group_id)
        } else {
            self.topics.state.clone()
        }
    }

    /// The catalog named by the configuration, or the built-in one.
    pub fn catalog(&self) -> Result<meter_model::Catalog, meter_model::catalog::CatalogError> {
        match &self.catalog.path {
            Some(p) => meter_model::Catalog::load(p),
            None => Ok(meter_model::Catalog::builtin()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid_and_match_ops() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.topics.events, "usage.events");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
    }

    #[test]
    fn file_values_override_defaults() {
        let f = write("[topics]\nevents = \"x.events\"\n[sink]\nbatch_rows = 7\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.topics.events, "x.events");
        assert_eq!(c.sink.batch_rows, 7);
        assert_eq!(c.topics.dlq, "usage.dlq");
    }

    #[test]
    fn agent_section_from_file_is_validated_reporting_every_problem() {
        let f = write("[agent]\ncustomer_id = \"cust-7\"\nfsync = \"always\"\nspool_max_bytes = 100000\nspool_segment_bytes = 65536\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.agent.customer_id, "cust-7");
        assert_eq!(c.agent.fsync, FsyncPolicy::Always);
        assert!(c.agent.problems(true).is_empty());
        assert!(!Config::default().agent.problems(true).is_empty(), "the sampler needs a customer");
        let f = write("[agent]\ncounter_bits = 16\nmax_in_flight = 0\nfsync = \"sometimes\"\n");
        assert!(Config::load(Some(f.path())).is_err());
        let f = write("[agent]\ncounter_bits = 16\nmax_in_flight = 0\n");
        let err = Config::load(Some(f.path())).unwrap_err().to_string();
        assert!(err.contains("agent.counter_bits") && err.contains("agent.max_in_flight"), "{err}");
        let f = write("[agent]\nspool_dir = \"/tmp\"\n");
        assert!(Config::load(Some(f.path())).is_err(), "unknown agent fields are rejected");
    }

    #[test]
    fn rating_section_and_invoice_topic() {
        let c = Config::default();
        assert_eq!(c.topics.invoice_lines, "billing.invoice_lines");
        assert_eq!(c.rating.price_book, None);
        let f = write("[rating]\nprice_book = \"/etc/meter/prices.toml\"\n[topics]\ninvoice_lines = \"b.lines\"\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.rating.price_book.as_deref(), Some(Path::new("/etc/meter/prices.toml")));
        assert_eq!(c.topics.invoice_lines, "b.lines");
        let f = write("[rating]\nprice_bok = \"x\"\n[topics]\ninvoice_lines = \"\"\n");
        let Err(ConfigError::Invalid(problems)) = Config::load(Some(f.path())) else { panic!("accepted") };
        assert!(problems.iter().any(|p| p.starts_with("rating.price_bok")), "{problems:?}");
        assert!(problems.iter().any(|p| p == "topics.invoice_lines must not be empty"), "{problems:?}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        let f = write("[topics]\nevnts = \"x\"\n");
        assert!(Config::load(Some(f.path())).is_err());
        let f = write("[sink]\nbatch_rows = 0\n[processor]\ncommit_interval_ms = 0\n");
        let err = Config::load(Some(f.path())).unwrap_err().to_string();
        assert!(err.contains("sink.batch_rows") && err.contains("processor.commit_interval_ms"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let f = write(
            "[topics]\nevnts = \"x\"\n[processor]\ncommit_interval_ms = \"soon\"\nsession_timeout_ms = 10\n[sink]\nbatch_rows = 0\n[bogus]\nx = 1\n",
        );
        let ConfigError::Invalid(problems) = Config::load(Some(f.path())).unwrap_err() else { panic!("expected Invalid") };
        let all = problems.join("\n");
        assert_eq!(problems.len(), 5, "{all}");
        assert!(problems.iter().any(|p| p.starts_with("topics.evnts: unknown field `evnts`")), "{all}");
        assert!(problems.iter().any(|p| p.starts_with("bogus: unknown field `bogus`")), "{all}");
        assert!(problems.iter().any(|p| p.starts_with("processor.commit_interval_ms: invalid type: string \"soon\"")), "{all}");
        assert!(problems.iter().any(|p| p.contains("processor.session_timeout_ms must be at least 6000")), "{all}");
        assert!(problems.iter().any(|p| p.contains("sink.batch_rows must be positive")), "{all}");
    }

    #[test]
    fn masked_output_hides_secrets_and_keeps_the_rest() {
        let mut c = Config::default();
        c.clickhouse.password = "hunter2".into();
        c.kafka.properties.insert("sasl.password".into(), "s3cret".into());
        c.kafka.properties.insert("sasl.mechanism".into(), "PLAIN".into());
        c.processor.agents.insert("host-1".into(), vec!["cust-0001".into()]);
        let text = c.to_masked_toml();
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        assert!(text.contains("password = \"***\"") && text.contains("\"sasl.password\" = \"***\""), "{text}");
        assert!(text.contains("PLAIN") && text.contains("cust-0001"), "{text}");
        // What is printed loads back into the same configuration.
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.processor.agents, c.processor.agents);
    }

    #[test]
    fn metrics_listen_defaults_per_component_and_turns_off() {
        let mut m = MetricsConfig::default();
        assert_eq!(m.listen_or("127.0.0.1:9464").as_deref(), Some("127.0.0.1:9464"));
        m.listen = "off".into();
        assert_eq!(m.listen_or("127.0.0.1:9464"), None);
        m.listen = "0.0.0.0:9999".into();
        assert_eq!(m.listen_or("127.0.0.1:9464").as_deref(), Some("0.0.0.0:9999"));
        let mut c = Config::default();
        c.metrics.listen = "nonsense".into();
        assert!(c.validate().unwrap_err().to_string().contains("metrics.listen must be host:port"));
    }
}

#[cfg(test)]
mod compose_tests {
    //! docker-compose.yml cannot run on the build machines (no Docker
    //! engine); these tests keep it consistent with the configuration that
    //! `ops/` and the binaries use.

    use super::*;

    fn compose() -> serde_yaml::Value {
        let text = include_str!("../../../docker-compose.yml");
        let mut v: serde_yaml::Value = serde_yaml::from_str(text).expect("docker-compose.yml is valid YAML");
        // Resolve `<<: *anchor` merge keys as Compose does.
        v.apply_merge().expect("merge keys resolve");
        v
    }

    #[test]
    fn compose_runs_the_stack_and_every_meter_stage() {
        let c = compose();
        let services = c["services"].as_mapping().expect("services");
        for s in ["kafka", "clickhouse", "init", "agent", "process", "sink"] {
            assert!(services.contains_key(s), "docker-compose.yml lacks service {s}");
        }
        let cmd =
            |s: &str| c["services"][s]["command"].as_sequence().map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "));
        assert_eq!(cmd("init").as_deref(), Some("meter init"));
        assert_eq!(cmd("process").as_deref(), Some("meter process"));
        assert_eq!(cmd("sink").as_deref(), Some("meter sink"));
        assert_eq!(cmd("agent").as_deref(), Some("meter agent --simulate --speed 1 --duration 30d"));
        let kafka_env = &c["services"]["kafka"]["environment"];
        assert_eq!(kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"].as_i64(), Some(1));
        assert_eq!(kafka_env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"].as_i64(), Some(1));
    }

    /// Every METER__SECTION__KEY the compose file sets is a real, valid
    /// configuration field (unknown fields are rejected by the same
    /// deserializer the binaries use).
    #[test]
    fn compose_environment_uses_real_config_keys() {
        let c = compose();
        for service in ["init", "agent", "process", "sink"] {
            let env = c["services"][service]["environment"].as_mapping().unwrap_or_else(|| panic!("{service} has no environment"));
            let mut sections: BTreeMap<String, toml::Table> = BTreeMap::new();
            for (k, v) in env {
                let Some(key) = k.as_str().and_then(|k| k.strip_prefix("METER__")) else { continue };
                let (section, field) = key.split_once("__").unwrap_or_else(|| panic!("{key} is not SECTION__KEY"));
                let value = v.as_str().map(str::to_owned).unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_owned());
                sections.entry(section.to_lowercase()).or_default().insert(field.to_lowercase(), toml::Value::String(value));
            }
            assert!(sections.contains_key("kafka") && sections.contains_key("clickhouse"), "{service}");
            let text = toml::to_string(&sections).unwrap();
            let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{service}: {e}\n{text}"));
            cfg.validate().unwrap();
            // Topic names are the defaults, the same as ops/ and the demo's base names.
            assert_eq!(cfg.topics.events, "usage.events");
            assert_eq!(cfg.topics.aggregates, "usage.aggregates");
            assert_eq!(cfg.topics.dlq, "usage.dlq");
        }
    }
}
