//! `[serve]`: `meter serve`, the HTTP API (CloudEvents ingestion, usage,
//! cost and invoice queries).
//!
//! API keys are stored as the SHA-256 of the token, never the token: a key
//! table in this section or in `api_keys_file` (the same TOML shape, so the
//! keys can live outside the configuration, mode 0600). `meter api-key`
//! makes a token and prints its entry.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address (host:port) of the API. Port 0 picks a free one (logged).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API keys by name (the name appears in logs and metrics, never the token).
    #[serde(default)]
    pub api_keys: BTreeMap<String, ApiKey>,
    /// A TOML file of more keys: `[api_keys.<name>]` tables, as in this
    /// section. Read at start; a name in both places is a problem.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// Largest request body accepted; a larger one is answered 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most events in one request; more is answered 413.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Events handed to Kafka and not acknowledged yet, over all requests:
    /// a request that would exceed it is answered 429 with `Retry-After`.
    #[serde(default = "default_max_in_flight_events")]
    pub max_in_flight_events: usize,
    /// How long the broker has to acknowledge an event (librdkafka's
    /// `message.timeout.ms`): a request with an event not acknowledged by
    /// then is answered 503, and nothing of it is answered 202.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Events this close to the correction horizon (or past it) are
    /// refused as `too_late`: the processor judges them later, against its
    /// watermark, and would dead-letter them after the 202.
    #[serde(default = "default_horizon_margin_ms")]
    pub horizon_margin_ms: i64,
    /// `POST /v1/events` requests being read, checked or produced at once;
    /// one more is answered 429 before its body is read. Bounds the memory
    /// of bodies in progress (this times `max_body_bytes`, and their events).
    #[serde(default = "default_max_concurrent_posts")]
    pub max_concurrent_posts: usize,
    /// How long a client may take to send a request's body; a slower one
    /// is answered 408 (a stalled upload would hold its connection and
    /// hold back a graceful shutdown).
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// The `Retry-After` (seconds) of 429 and 503 answers.
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u64,
    /// Most windows one `GET /v1/usage` may span (`to - from` over the
    /// window size; a month counts its days): bounds the ClickHouse work of
    /// one query. The default is about 35 days of minutes.
    #[serde(default = "default_max_query_windows")]
    pub max_query_windows: u64,
    /// Most rows in one page of `GET /v1/usage`.
    #[serde(default = "default_max_page_rows")]
    pub max_page_rows: usize,
    /// How long one ClickHouse read may take before the request is
    /// answered 503 (with `Retry-After`).
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
}

/// One API key. `role` decides what it may do:
///
/// - `ingest`: `POST /v1/events` for `customers`, as agent `agent_id`
///   (the events carry it, and the processor's `processor.agents` applies
///   to it as to any agent); it reads nothing.
/// - `query`: the `GET` routes for `customers` only.
/// - `admin`: the `GET` routes for every customer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
    pub role: ApiRole,
    /// `ingest` keys: the agent id of the events they post.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    /// `ingest` and `query` keys: the customers they may report for or
    /// read (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customers: Vec<String>,
    /// `ingest` keys of an enrolled agent: the agent's signing key file
    /// (`key_id:secret_hex`, see `agent.signing_key_file`); every event is
    /// signed with it.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ApiRole {
    Ingest,
    Query,
    Admin,
}

/// The shape of `serve.api_keys_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    api_keys: BTreeMap<String, ApiKey>,
}

fn default_listen() -> String {
    "127.0.0.1:8480".into()
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_max_batch_events() -> usize {
    5_000
}
fn default_max_in_flight_events() -> usize {
    100_000
}
fn default_delivery_timeout_ms() -> u64 {
    30_000
}
fn default_horizon_margin_ms() -> i64 {
    3_600_000
}
fn default_max_concurrent_posts() -> usize {
    64
}
fn default_body_timeout_ms() -> u64 {
    30_000
}
fn default_retry_after_s() -> u64 {
    1
}
fn default_max_query_windows() -> u64 {
    50_400
}
fn default_max_page_rows() -> usize {
    10_000
}
fn default_query_timeout_ms() -> u64 {
    30_000
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: default_listen(),
            api_keys: BTreeMap::new(),
            api_keys_file: None,
            max_body_bytes: default_max_body_bytes(),
            max_batch_events: default_max_batch_events(),
            max_in_flight_events: default_max_in_flight_events(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            horizon_margin_ms: default_horizon_margin_ms(),
            max_concurrent_posts: default_max_concurrent_posts(),
            body_timeout_ms: default_body_timeout_ms(),
            retry_after_s: default_retry_after_s(),
            max_query_windows: default_max_query_windows(),
            max_page_rows: default_max_page_rows(),
            query_timeout_ms: default_query_timeout_ms(),
        }
    }
}

impl ServeConfig {
    /// Every key: this section's and `api_keys_file`'s, each checked.
    pub fn keys(&self) -> Result<BTreeMap<String, ApiKey>, Vec<String>> {
        let mut keys = self.api_keys.clone();
        let mut problems = Vec::new();
        if let Some(path) = &self.api_keys_file {
            match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!("serve.api_keys_file: cannot read {}: {e}", path.display())),
                Ok(text) => match toml::from_str::<KeysFile>(&text) {
                    Err(e) => problems.push(format!("serve.api_keys_file {}: {}", path.display(), e.message())),
                    Ok(file) => {
                        for (name, key) in file.api_keys {
                            if keys.contains_key(&name) {
                                problems.push(format!("api key {name:?} is in serve.api_keys and in {}", path.display()));
                            }
                            keys.insert(name, key);
                        }
                    }
                },
            }
        }
        let mut hashes = BTreeMap::new();
        for (name, key) in &keys {
            key.check(name, &mut problems);
            if let Some(other) = hashes.insert(key.sha256.to_ascii_lowercase(), name) {
                problems.push(format!("api keys {other:?} and {name:?} have the same sha256"));
            }
        }
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }
}

impl ApiKey {
    fn check(&self, name: &str, p: &mut Vec<String>) {
        let mut problem = |ok: bool, msg: String| {
            if !ok {
                p.push(msg);
            }
        };
        problem(
            self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
            format!("api key {name:?}: sha256 must be 64 hex digits (the SHA-256 of the token, not the token)"),
        );
        match self.role {
            ApiRole::Ingest => {
                problem(
                    !self.agent_id.trim().is_empty() && !self.agent_id.chars().any(char::is_control),
                    format!("api key {name:?}: an ingest key needs an agent_id without control characters"),
                );
                problem(!self.customers.is_empty(), format!("api key {name:?}: an ingest key needs customers (\"*\" for any)"));
            }
            ApiRole::Query => {
                problem(!self.customers.is_empty(), format!("api key {name:?}: a query key needs customers (\"*\" for any)"));
                problem(self.signing_key_file.is_none(), format!("api key {name:?}: only ingest keys sign events"));
            }
            ApiRole::Admin => {
                problem(
                    self.customers.is_empty() && self.agent_id.is_empty() && self.signing_key_file.is_none(),
                    format!("api key {name:?}: an admin key reads every customer; give it no customers, agent_id or signing key"),
                );
            }
        }
    }
}

impl Section for ServeConfig {
    const NAME: &'static str = "serve";

    fn check(&self, p: &mut Problems) {
        p.check(!self.listen.trim().is_empty(), "serve.listen is empty");
        p.check(self.max_body_bytes >= 1024, "serve.max_body_bytes must be at least 1024");
        p.check(self.max_batch_events >= 1, "serve.max_batch_events must be at least 1");
        p.check(self.max_in_flight_events >= self.max_batch_events, "serve.max_in_flight_events must be at least serve.max_batch_events");
        p.check(self.delivery_timeout_ms >= 1_000, "serve.delivery_timeout_ms must be at least 1000");
        p.check(self.retry_after_s >= 1, "serve.retry_after_s must be at least 1");
        p.check(self.max_concurrent_posts >= 1, "serve.max_concurrent_posts must be at least 1");
        p.check(self.body_timeout_ms >= 100, "serve.body_timeout_ms must be at least 100");
        p.check(self.horizon_margin_ms >= 0, "serve.horizon_margin_ms must not be negative");
        p.check(self.max_query_windows >= 1, "serve.max_query_windows must be at least 1");
        p.check((1..=1_000_000).contains(&self.max_page_rows), "serve.max_page_rows must be in 1..=1000000");
        p.check(self.query_timeout_ms >= 100, "serve.query_timeout_ms must be at least 100");
        // The keys file is read by `keys()` when the server starts; the
        // inline keys are checked here so `meter config check` shows them.
        let mut problems = Vec::new();
        for (name, key) in &self.api_keys {
            key.check(name, &mut problems);
        }
        for msg in problems {
            p.check(false, &msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn key(role: ApiRole) -> ApiKey {
        ApiKey { sha256: HASH.into(), role, agent_id: String::new(), customers: Vec::new(), signing_key_file: None }
    }

    #[test]
    fn keys_are_checked_by_role() {
        let mut p = Vec::new();
        key(ApiRole::Admin).check("a", &mut p);
        assert!(p.is_empty(), "{p:?}");
        key(ApiRole::Ingest).check("i", &mut p);
        assert_eq!(p.len(), 2, "{p:?}");
        let mut p = Vec::new();
        ApiKey { sha256: "test".into(), customers: vec!["*".into()], ..key(ApiRole::Query) }.check("q", &mut p);
        assert_eq!(p, vec!["api key \"q\": sha256 must be 64 hex digits (the SHA-256 of the token, not the token)".to_owned()]);
    }

    #[test]
    fn a_keys_file_adds_keys_and_may_not_repeat_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys.toml");
        std::fs::write(&file, format!("[api_keys.ops]\nsha256 = \"{}\"\nrole = \"admin\"\n", HASH.replace('9', "8"))).expect("write");
        let mut cfg = ServeConfig { api_keys_file: Some(file.clone()), ..ServeConfig::default() };
        cfg.api_keys.insert("web".into(), ApiKey { customers: vec!["c-1".into()], ..key(ApiRole::Query) });
        let keys = cfg.keys().expect("keys");
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ops", "web"]);
        cfg.api_keys.insert("ops".into(), key(ApiRole::Admin));
        let problems = cfg.keys().expect_err("repeated");
        assert!(problems.iter().any(|p| p.contains("\"ops\" is in serve.api_keys and in")), "{problems:?}");
        std::fs::write(&file, "[api_keys.x]\nrole = \"admin\"\n").expect("write");
        let problems = ServeConfig { api_keys_file: Some(file), ..ServeConfig::default() }.keys().expect_err("no sha256");
        assert!(problems[0].contains("missing field `sha256`"), "{problems:?}");
    }
}
