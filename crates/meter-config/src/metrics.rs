//! `[metrics]`: Prometheus metrics and health endpoints of every service.

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address (host:port) serving `/metrics` (Prometheus text format),
    /// `/health/live` and `/health/ready`. Empty: the component's default,
    /// `127.0.0.1:9464` for `meter process`, `127.0.0.1:9465` for `meter
    /// sink`, `127.0.0.1:9466` for `meter agent`, `127.0.0.1:9467` for `meter
    /// serve`. `off` serves nothing. Port
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

impl Section for MetricsConfig {
    const NAME: &'static str = "metrics";

    fn check(&self, p: &mut Problems) {
        p.check(self.liveness_timeout_ms > 0, "metrics.liveness_timeout_ms must be positive");
        if let Some(listen) = self.listen_or("127.0.0.1:0") {
            p.check(
                listen.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
                &format!("metrics.listen must be host:port, `off` or empty, not `{listen}`"),
            );
        }
    }
}
