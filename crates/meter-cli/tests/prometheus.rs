//! A real Prometheus (Debian's `prometheus` package, installed by
//! `ops/install`) scrapes a running pipeline: `meter process`, `meter sink`
//! and a spooling `meter agent` as separate processes on the local Kafka and
//! ClickHouse. Through
//! Prometheus' HTTP API the test checks that the targets are up and that the
//! counters move with the input, to the event: what the agent published is
//! what the processor counts as aggregated, and a record that is not Avro is counted
//! under its dead-letter reason.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meter_agent as agent;
use meter_agent::SimConfig;
use meter_config::Config;
use meter_kafka::admin;

const DAY_MS: i64 = 86_400_000;

/// Kills the child when dropped, so a failing assertion leaves no process behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A blocking HTTP GET on loopback: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let out = String::from_utf8_lossy(&out);
    let status = out.get(9..12)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    // Prometheus answers API queries in one chunk when small; undo chunking if used.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The single value of an instant PromQL query, if it returns exactly one series.
fn query(port: u16, q: &str) -> Option<f64> {
    let (status, body) = get(port, &format!("/api/v1/query?query={}", encode(q)))?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// Waits until `q` evaluates to `want` in Prometheus; returns the last value seen.
fn wait_for(port: u16, q: &str, want: f64, timeout: Duration) -> Result<(), Option<f64>> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        last = query(port, q);
        if last == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

fn spawn_meter(config: &std::path::Path, args: &[&str], metrics_port: u16) -> Guard {
    spawn_meter_with(config, args, metrics_port, &[])
}

fn spawn_meter_with(config: &std::path::Path, args: &[&str], metrics_port: u16, env: &[(&str, &str)]) -> Guard {
    let child = Command::new(env!("CARGO_BIN_EXE_meter"))
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("METER__METRICS__LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("METER__METRICS__KAFKA_STATISTICS_INTERVAL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Guard(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_pipeline_and_counters_follow_the_input() {
    let prometheus_bin = which("prometheus").expect("the `prometheus` binary is missing: run ops/install (Debian package `prometheus`)");
    let dir = tempfile::tempdir().unwrap();
    let id = format!("prom_{}", std::process::id());
    let config = dir.path().join("meter.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[topics]
events = "test.{id}.usage.events"
aggregates = "test.{id}.usage.aggregates"
dlq = "test.{id}.usage.dlq"
partitions = 2

[clickhouse]
database = "test_{id}"

[processor]
group_id = "test-processor-{id}"
instance_id = "prom-test"
commit_interval_ms = 300
idle_timeout_ms = 1000

[sink]
group_id = "test-sink-{id}"
batch_ms = 300
"#
        ),
    )
    .unwrap();
    let cfg = Config::load(Some(&config)).unwrap();
    admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");

    let (process_port, sink_port, agent_port, prom_port) = (free_port(), free_port(), free_port(), free_port());
    let _processor = spawn_meter(&config, &["process"], process_port);
    let _sink = spawn_meter(&config, &["sink"], sink_port);
    // The spooling agent publishes one simulated second per second to a
    // topic of its own, so that the processor's counts stay exact below.
    let agent_topic = format!("test.{id}.agent.events");
    let mut agent_cfg = cfg.clone().into_inner();
    agent_cfg.topics.events = agent_topic.clone();
    admin::ensure_topics(&agent_cfg).await.unwrap();
    let state_dir = dir.path().join("agent-state");
    let _agent = spawn_meter_with(
        &config,
        &[
            "agent",
            "--simulate",
            "--customers",
            "2",
            "--duration",
            "1h",
            "--speed",
            "1",
            "--agent-id",
            "prom-agent",
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
        agent_port,
        &[("METER__TOPICS__EVENTS", agent_topic.as_str())],
    );

    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: processor\n    static_configs:\n      - targets: ['127.0.0.1:{process_port}']\n  - job_name: sink\n    static_configs:\n      - targets: ['127.0.0.1:{sink_port}']\n  - job_name: agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Guard(
        Command::new(prometheus_bin)
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let minute = Duration::from_secs(60);
    wait_for(prom_port, r#"up{job="processor"}"#, 1.0, minute).expect("processor target up");
    wait_for(prom_port, r#"up{job="sink"}"#, 1.0, minute).expect("sink target up");
    wait_for(prom_port, r#"up{job="agent"}"#, 1.0, minute).expect("agent target up");
    assert_eq!(get(process_port, "/health/live").map(|r| r.0), Some(200));

    // First batch: one simulated fleet and one malformed record.
    let now = meter_model::now_ms();
    let start = now - now.rem_euclid(DAY_MS) - 2 * DAY_MS;
    let sim = |seed, agent_id: &str| SimConfig {
        seed,
        customers: 3,
        agent_id: agent_id.into(),
        start,
        duration_s: 120,
        customer_prefix: "cust-".into(),
    };
    let (first, _) = agent::run_simulated(&cfg, sim(5, "prom-a"), 0.0, None).await.unwrap();
    let producer = meter_kafka::publish::producer(&cfg.kafka, meter_kafka::publish::Tuning::bulk()).unwrap();
    producer
        .send(rdkafka::producer::FutureRecord::to(&cfg.topics.events).key("cust-0001").payload(&b"not avro"[..]), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let aggregated = "sum(meter_events_aggregated_total)";
    let first_events = first.events as f64;
    if let Err(last) = wait_for(prom_port, aggregated, first_events, minute) {
        panic!("Prometheus saw {last:?} aggregated events, the agent published {first_events}");
    }
    wait_for(prom_port, r#"sum(meter_events_dead_lettered_total{reason="bad_magic"})"#, 1.0, minute).expect("dead letter counted");
    wait_for(prom_port, "sum(meter_events_received_total)", first_events + 1.0, minute).expect("every record received");
    assert_eq!(get(process_port, "/health/ready").map(|r| r.0), Some(200), "an assigned, restored processor is ready");

    // Second batch: the counters move by exactly what was added.
    let (second, _) = agent::run_simulated(&cfg, sim(6, "prom-b"), 0.0, None).await.unwrap();
    let total = (first.events + second.events) as f64;
    if let Err(last) = wait_for(prom_port, aggregated, total, minute) {
        panic!("Prometheus saw {last:?} aggregated events after the second batch, want {total}");
    }
    let committed = query(prom_port, "sum(meter_transactions_committed_total)").unwrap_or(0.0);
    assert!(committed >= 2.0, "transactions committed: {committed}");
    let deadline = Instant::now() + minute;
    let rows = loop {
        let rows = query(prom_port, "sum(meter_sink_rows_inserted_total)").unwrap_or(0.0);
        if rows > 0.0 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(rows > 0.0, "the sink inserted no rows according to Prometheus");
    assert_eq!(get(sink_port, "/health/ready").map(|r| r.0), Some(200));
    // The agent's counters move while it runs, and its spool limit is known.
    let produced = || query(prom_port, r#"meter_agent_events_produced_total{job="agent"}"#).unwrap_or(0.0);
    let deadline = Instant::now() + minute;
    let first_seen = loop {
        let p = produced();
        if p > 0.0 || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(first_seen > 0.0, "the agent's produced counter never moved");
    let deadline = Instant::now() + minute;
    while produced() <= first_seen && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(produced() > first_seen, "the agent's produced counter stopped at {first_seen}");
    assert!(query(prom_port, "meter_agent_spool_limit_bytes").unwrap_or(0.0) > 0.0);
    assert_eq!(get(agent_port, "/health/ready").map(|r| r.0), Some(200));
    // librdkafka statistics reach Prometheus too.
    assert!(
        wait_for(prom_port, r#"max(meter_kafka_broker_up{job="processor",client="consumer"})"#, 1.0, minute).is_ok(),
        "broker state from librdkafka statistics"
    );
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(bin)).find(|p| p.is_file())
}
