//! `[clickhouse]`: the server and database every ClickHouse client uses.

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

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

impl Section for ClickHouseConfig {
    const NAME: &'static str = "clickhouse";

    fn check(&self, p: &mut Problems) {
        p.check(
            self.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !self.database.is_empty(),
            "clickhouse.database must be a non-empty identifier of letters, digits and _",
        );
    }
}
