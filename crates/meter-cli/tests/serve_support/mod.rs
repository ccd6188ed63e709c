//! Shared by the `meter serve` tests: a server process on a free port with
//! its own API keys, requests made with `curl` (an HTTP client the project
//! does not use), and CloudEvents with the ledger they should add up to.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meter_model::ledger::Ledger;

use super::agent_support::analyst_password;
use serde_json::{json, Value};

/// The tokens of the test server's keys (their hashes go in the config).
pub const INGEST: &str = "mtr_test_ingest_c1_c2";
pub const INGEST_C1: &str = "mtr_test_ingest_c1_only";
pub const QUERY_C1: &str = "mtr_test_query_c1";
pub const ADMIN: &str = "mtr_test_admin";
pub const AGENT: &str = "api-test";

fn hash(token: &str) -> String {
    meter_serve::keys::to_hex(&meter_serve::keys::sha256(token))
}

/// The `[serve]` section of a test: the four keys, `extra` appended.
pub fn serve_section(port: u16, extra: &str) -> String {
    format!(
        r#"
[serve]
listen = "127.0.0.1:{port}"
{extra}

[serve.api_keys.ingest]
sha256 = "{}"
role = "ingest"
agent_id = "{AGENT}"
customers = ["c-1", "c-2"]

[serve.api_keys.ingest-c1]
sha256 = "{}"
role = "ingest"
agent_id = "{AGENT}"
customers = ["c-1"]

[serve.api_keys.query-c1]
sha256 = "{}"
role = "query"
customers = ["c-1"]

[serve.api_keys.admin]
sha256 = "{}"
role = "admin"
"#,
        hash(INGEST),
        hash(INGEST_C1),
        hash(QUERY_C1),
        hash(ADMIN)
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `meter serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `meter serve` with `config` (its `[serve]` from
    /// [`serve_section`] on `port`) reading ClickHouse as the analyst, and
    /// waits until it answers.
    pub fn start(config: &Path, port: u16) -> Server {
        Server::start_with(config, port, &[])
    }

    /// [`Server::start`] with more environment (settings) for the server.
    pub fn start_with(config: &Path, port: u16, env: &[(&str, &str)]) -> Server {
        let analyst = analyst_password();
        let mut all = vec![("METER__CLICKHOUSE__USER", "analyst"), ("METER__CLICKHOUSE__PASSWORD", analyst.as_str())];
        all.extend_from_slice(env);
        Server::start_as_configured(config, port, &all)
    }

    /// [`Server::start_with`] reading ClickHouse as `config` says (its
    /// user, password or password_file), not as the local analyst.
    pub fn start_as_configured(config: &Path, port: u16, env: &[(&str, &str)]) -> Server {
        let log = config.with_extension("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_meter"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env("METER__METRICS__LISTEN", "off")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Server { child, base: format!("http://127.0.0.1:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("meter serve exited with {status}: {}", s.log_text());
            }
            if curl(&s.url("/v1/openapi.yaml"), &[]).status == 200 {
                return s;
            }
            assert!(Instant::now() < deadline, "meter serve did not answer within 60 s: {}", s.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("meter serve log:\n{}", self.log_text());
        }
    }
}

/// What `curl` got back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// `curl` of `url` with `args` (method, headers, data); status 0 when
/// curl itself failed (no connection, timeout).
pub fn curl(url: &str, args: &[&str]) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let (body, headers) = (dir.path().join("body"), dir.path().join("headers"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-o", body.to_str().unwrap(), "-D", headers.to_str().unwrap(), "-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl must be installed");
    Answer {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read_to_string(&body).unwrap_or_default(),
    }
}

/// POSTs `body` (written to a file: curl sends it byte for byte).
pub fn post(server: &Server, token: &str, content_type: &str, body: &str) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, body).unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let ct = format!("Content-Type: {content_type}");
    let data = format!("@{}", file.display());
    curl(&server.url("/v1/events"), &["-X", "POST", "-H", &auth, "-H", &ct, "--data-binary", &data])
}

pub fn get(server: &Server, token: &str, path_and_query: &str) -> Answer {
    let auth = format!("Authorization: Bearer {token}");
    curl(&server.url(path_and_query), &["-H", &auth])
}

/// One usage event as posted.
#[derive(Debug, Clone)]
pub struct Usage {
    pub id: String,
    pub customer: String,
    pub service: &'static str,
    pub usage_type: &'static str,
    pub region: &'static str,
    pub resource: String,
    pub quantity: i64,
    pub time_ms: i64,
}

impl Usage {
    pub fn cloudevent(&self) -> Value {
        json!({
            "specversion": "1.0",
            "id": self.id,
            "source": "//tests/serve",
            "type": format!("{}/{}", self.service, self.usage_type),
            "subject": self.customer,
            "time": meter_model::date::format_rfc3339(self.time_ms),
            "datacontenttype": "application/json",
            "data": {"quantity": self.quantity, "resource": self.resource, "region": self.region},
        })
    }
}

const KINDS: [(&str, &str, &str); 4] = [
    ("compute", "BoxUsage:m5.large", "us-east-1"),
    ("object-storage", "TimedStorage-ByteSec", "eu-west-1"),
    ("cdn", "DataTransfer-Out-Bytes", "us-east-1"),
    ("database", "InstanceUsage:db.t3.medium", "eu-west-1"),
];

/// `n` distinct events for `customers`, spread over two hours from
/// `start_ms`, ids prefixed by `tag`.
pub fn events(tag: &str, n: usize, customers: &[&str], start_ms: i64) -> Vec<Usage> {
    (0..n)
        .map(|i| {
            let (service, usage_type, region) = KINDS[i % KINDS.len()];
            Usage {
                id: format!("{tag}-{i}"),
                customer: customers[i / KINDS.len() % customers.len()].to_owned(),
                service,
                usage_type,
                region,
                resource: format!("r-{}", i % 7),
                quantity: 1 + (i as i64 * 7919) % 100_000,
                time_ms: start_ms + (i as i64 * 37_003) % (2 * 3_600_000),
            }
        })
        .collect()
}

pub fn batch(events: &[Usage]) -> String {
    Value::Array(events.iter().map(Usage::cloudevent).collect()).to_string()
}

pub fn ledger(events: &[Usage]) -> Ledger {
    let mut l = Ledger::default();
    for e in events {
        l.record(&e.customer, e.service, e.usage_type, e.region, e.time_ms, e.quantity);
    }
    l
}

/// Records on `topic` (all partitions), by the watermarks.
pub fn topic_records(cfg: &meter_config::Config, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka).create().unwrap();
    (0..cfg.topics.partitions)
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30)).unwrap();
            high - low
        })
        .sum()
}
