//! `[clickhouse]`: the server and database every ClickHouse client uses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{read_secret_file, Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP or HTTPS endpoint of the ClickHouse server
    /// (`https://clickhouse.internal:8443`).
    #[serde(default = "default_ch_url")]
    pub url: String,
    /// Database holding meterline's tables; created by `meter migrate`.
    #[serde(default = "default_ch_database")]
    pub database: String,
    /// User the sink, migrations and reports connect as.
    #[serde(default = "default_ch_user")]
    pub user: String,
    /// Password; set it with `METER__CLICKHOUSE__PASSWORD` or
    /// [`ClickHouseConfig::password_file`], not in the file.
    #[serde(default)]
    pub password: String,
    /// A file holding the password (one line; a trailing newline is
    /// dropped), read when the configuration is loaded: a Docker or
    /// Kubernetes secret, or systemd's `LoadCredential=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificates that may sign the server's
    /// certificate (an `https` url only). Unset: the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to a server that asks for one
    /// (with [`ClickHouseConfig::key_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key: PEM, PKCS#8, SEC1 or PKCS#1,
    /// unencrypted (protect it by the file's mode, as the server's own key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The cluster (its `remote_servers` name) to lay the schema out on:
    /// replicated tables on every shard under `Distributed` tables sharded
    /// by customer (docs/operations.md, "Scaling"). Empty: one server.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
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
        ClickHouseConfig {
            url: default_ch_url(),
            database: default_ch_database(),
            user: default_ch_user(),
            password: String::new(),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            cluster: String::new(),
        }
    }
}

impl ClickHouseConfig {
    /// Whether the url asks for TLS.
    pub fn is_https(&self) -> bool {
        self.url.trim().to_ascii_lowercase().starts_with("https://")
    }

    /// Reads [`ClickHouseConfig::password_file`] into the password.
    pub(crate) fn resolve_password(&mut self, p: &mut Problems) {
        let Some(path) = &self.password_file else { return };
        if !self.password.is_empty() {
            p.check(false, "clickhouse.password and clickhouse.password_file are both set; keep one");
            return;
        }
        match read_secret_file(path) {
            Ok(v) => self.password = v,
            Err(e) => p.check(false, &format!("clickhouse.password_file: {e}")),
        }
    }
}

impl Section for ClickHouseConfig {
    const NAME: &'static str = "clickhouse";

    fn check(&self, p: &mut Problems) {
        p.check(
            self.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !self.database.is_empty(),
            "clickhouse.database must be a non-empty identifier of letters, digits and _",
        );
        p.check(
            self.cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "clickhouse.cluster must be an identifier of letters, digits and _ (or empty: one server)",
        );
        let url = self.url.trim().to_ascii_lowercase();
        p.check(
            url.starts_with("http://") || url.starts_with("https://"),
            &format!("clickhouse.url must start with http:// or https:// (got {:?})", self.url),
        );
        if !self.is_https() {
            for (name, set) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
                p.check(
                    set.is_none(),
                    &format!("clickhouse.{name} is set but clickhouse.url is not https://: the server would be reached in plain text"),
                );
            }
        }
        p.check(
            self.cert_file.is_some() == self.key_file.is_some(),
            "clickhouse.cert_file and clickhouse.key_file go together: set both or neither",
        );
        for (name, path) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            if let Some(path) = path {
                p.check(path.is_file(), &format!("clickhouse.{name}: {} is not a readable file", path.display()));
            }
        }
    }
}
