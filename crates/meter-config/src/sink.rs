//! `[sink]`: `meter sink`, usage.aggregates and usage.dlq into ClickHouse.

use serde::{Deserialize, Serialize};

use crate::processor::default_session_timeout_ms;
use crate::{default_instance_id, Problems, Section};

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

impl Section for SinkConfig {
    const NAME: &'static str = "sink";

    fn check(&self, p: &mut Problems) {
        p.check(!self.instance_id.is_empty(), "sink.instance_id must not be empty");
        p.check(self.session_timeout_ms >= 6_000, "sink.session_timeout_ms must be at least 6000 (the broker's minimum)");
        p.check(self.batch_rows > 0, "sink.batch_rows must be positive");
        p.check(self.batch_ms > 0, "sink.batch_ms must be positive");
    }
}
