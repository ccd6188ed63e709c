//! `[agent]`: `meter agent`, the host sampler or simulator, its seqs and
//! its on-disk spool.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{default_instance_id, Problems, Section};

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
    /// Free space the spool leaves on its file system for the checkpoint and
    /// the dropped ledger: a tick that would leave less is dropped (counted,
    /// recorded) like one past `spool_max_bytes`.
    #[serde(default = "default_disk_reserve_bytes")]
    pub disk_reserve_bytes: u64,
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
    /// What tells this machine from others, recorded with the agent's
    /// incarnation (`{state_dir}/incarnation.json`): when it differs from
    /// the recorded one (the state dir was copied or the image cloned), the
    /// agent starts a new incarnation, so that its events never share a
    /// seq stream with the original's. Empty (the default): the contents
    /// of `/etc/machine-id`.
    #[serde(default)]
    pub host_identity: String,
    /// File holding this agent's signing key, `key_id:secret_hex` (at least
    /// 16 bytes of secret). The environment variable
    /// `METER_AGENT_SIGNING_KEY` (same form) takes precedence. Neither: the
    /// events go unsigned, which a processor with
    /// `processor.accept_unsigned = false` refuses.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// How often the agent renews its lease on `topics.agents`: a
    /// transactional producer whose id is the agent's (id, incarnation), so
    /// that a second instance with the same identity fences the first,
    /// which then stops (see docs/operations.md, "Agent identity").
    #[serde(default = "default_lease_interval_ms")]
    pub lease_interval_ms: u64,
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
fn default_disk_reserve_bytes() -> u64 {
    8 << 20
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
fn default_lease_interval_ms() -> u64 {
    5_000
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
            disk_reserve_bytes: default_disk_reserve_bytes(),
            fsync: default_fsync(),
            fsync_interval_ms: default_fsync_interval_ms(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            max_in_flight: default_max_in_flight(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            host_identity: String::new(),
            signing_key_file: None,
            lease_interval_ms: default_lease_interval_ms(),
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

    /// Problems of the agent section for the host sampler: everything
    /// [`Section::check`] finds, plus what only the sampler needs (a
    /// customer). Empty: valid.
    pub fn sampler_problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        self.check(&mut p);
        let id_ok = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(|c| c.is_control());
        p.check(id_ok(&self.customer_id), "agent.customer_id must be set (the customer billed for this host)");
        p.into_vec()
    }
}

impl Section for AgentConfig {
    const NAME: &'static str = "agent";

    fn check(&self, p: &mut Problems) {
        let id_ok = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(|c| c.is_control());
        p.check(id_ok(&self.agent_id), "agent.agent_id must be 1 to 256 printable characters");
        p.check(id_ok(&self.region), "agent.region must be 1 to 256 printable characters");
        p.check(self.resource_id.len() <= 200, "agent.resource_id must be at most 200 bytes");
        p.check(matches!(self.counter_bits, 32 | 64), "agent.counter_bits must be 32 or 64");
        p.check(
            self.clock_ticks_per_second > 0 && self.clock_ticks_per_second <= 1_000_000,
            "agent.clock_ticks_per_second must be between 1 and 1000000",
        );
        p.check(!self.state_dir.as_os_str().is_empty(), "agent.state_dir must not be empty");
        p.check(self.max_catch_up_s > 0 && self.max_catch_up_s <= 86_400, "agent.max_catch_up_s must be between 1 and 86400");
        p.check(self.spool_segment_bytes >= 4096, "agent.spool_segment_bytes must be at least 4096");
        p.check(self.spool_max_bytes >= self.spool_segment_bytes, "agent.spool_max_bytes must be at least agent.spool_segment_bytes");
        p.check(self.fsync_interval_ms > 0, "agent.fsync_interval_ms must be positive");
        p.check(self.checkpoint_interval_ms > 0, "agent.checkpoint_interval_ms must be positive");
        p.check(self.max_in_flight > 0, "agent.max_in_flight must be positive");
        p.check(self.delivery_timeout_ms >= 1_000, "agent.delivery_timeout_ms must be at least 1000");
        p.check(self.host_identity.len() <= 256, "agent.host_identity must be at most 256 bytes");
        p.check(self.lease_interval_ms >= 500 && self.lease_interval_ms <= 60_000, "agent.lease_interval_ms must be between 500 and 60000");
    }
}
