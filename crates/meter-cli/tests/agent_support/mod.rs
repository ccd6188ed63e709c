//! Shared by the agent tests: a private configuration, the agent binary,
//! reading back the events topic, and draining processor and sink into
//! ClickHouse for a reconciliation against the ledger.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meter_agent::{SimConfig, Simulator};
use meter_avro::Codec;
use meter_config::{Config, Valid};
use meter_kafka::{admin, Signal};
use meter_model::ledger::Ledger;
use meter_sink::reconcile;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub const DAY_MS: i64 = 86_400_000;

/// A configuration file with topics, groups and a database of its own;
/// `extra_agent` goes into `[agent]`. Brokers come from the environment
/// (`METER__KAFKA__BROKERS`) like every other setting.
pub fn config_file(dir: &Path, id: &str, extra_agent: &str) -> (PathBuf, Valid<Config>) {
    let text = format!(
        r#"
[topics]
events = "test.{id}.usage.events"
aggregates = "test.{id}.usage.aggregates"
dlq = "test.{id}.usage.dlq"
partitions = 3

[clickhouse]
database = "test_{id}"

[processor]
group_id = "test-processor-{id}"
instance_id = "agent-test"
commit_interval_ms = 300
idle_timeout_ms = 1000

[sink]
group_id = "test-sink-{id}"
batch_ms = 300

[agent]
checkpoint_interval_ms = 200
{extra_agent}
"#
    );
    let path = dir.join("meter.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(Some(&path)).unwrap();
    (path, cfg)
}

/// The analyst's password on the local stack: `METER_ANALYST_PASSWORD` when
/// `ops/clickhouse` was started with it, else the one it generated.
pub fn analyst_password() -> String {
    std::env::var("METER_ANALYST_PASSWORD").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.local/secure/secrets/clickhouse-analyst.password");
        std::fs::read_to_string(&file).map(|p| p.trim_end_matches(['\r', '\n']).to_owned()).unwrap_or_default()
    })
}

pub async fn setup(cfg: &Config) {
    admin::ensure_topics(cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");
}

/// A simulated fleet starting two days ago, so every window can be final.
pub fn sim_config(seed: u64, customers: usize, agent_id: &str, duration_s: u64) -> SimConfig {
    let now = meter_model::now_ms();
    SimConfig {
        seed,
        customers,
        agent_id: agent_id.into(),
        start: now - now.rem_euclid(DAY_MS) - 2 * DAY_MS + 3_600_000,
        duration_s,
        customer_prefix: "cust-".into(),
    }
}

/// The ground truth, computed here independently of the agent process.
pub fn expected_ledger(sim: &SimConfig) -> Ledger {
    let mut s = Simulator::new(sim.clone());
    let mut events = Vec::new();
    while s.next_second(&mut events) {
        events.clear();
    }
    s.ledger().clone()
}

/// `meter agent --simulate --state-dir ...` for `sim`, paced at `speed`.
pub fn spawn_agent(config: &Path, state: &Path, sim: &SimConfig, speed: f64, ledger: Option<&Path>) -> Child {
    spawn_agent_cmd(config, state, sim, speed, ledger).spawn().unwrap()
}

/// The command of [`spawn_agent`], to add to before spawning it.
pub fn spawn_agent_cmd(config: &Path, state: &Path, sim: &SimConfig, speed: f64, ledger: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meter"));
    cmd.arg("--config")
        .arg(config)
        .args(["agent", "--simulate", "--state-dir"])
        .arg(state)
        .args(["--seed", &sim.seed.to_string(), "--customers", &sim.customers.to_string()])
        .args(["--agent-id", &sim.agent_id, "--start", &(sim.start / 1000).to_string()])
        .args(["--duration", &format!("{}s", sim.duration_s), "--speed", &speed.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(l) = ledger {
        cmd.arg("--ledger").arg(l);
    }
    cmd
}

/// Every record on the events topic: (key, payload), read from the
/// beginning to the end offsets it had when called.
pub fn event_records(cfg: &Config) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka).set("group.id", "agent-test-reader").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for p in 0..cfg.topics.partitions {
        let (low, high) = consumer.fetch_watermarks(&cfg.topics.events, p, Duration::from_secs(60)).unwrap();
        remaining += high - low;
        tpl.add_partition_offset(&cfg.topics.events, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while remaining > 0 {
        assert!(std::time::Instant::now() < deadline, "could not read the events topic back ({remaining} left)");
        let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
        let m = m.unwrap();
        out.push((m.key().map(<[u8]>::to_vec), m.payload().unwrap().to_vec()));
        remaining -= 1;
    }
    out
}

/// Every record on the events topic as (agent, customer, seq) -> payloads.
pub fn read_events(cfg: &Config) -> HashMap<(String, String, i64), Vec<Vec<u8>>> {
    let codec = Codec::new().unwrap();
    let mut out: HashMap<(String, String, i64), Vec<Vec<u8>>> = HashMap::new();
    for (key, payload) in event_records(cfg) {
        let e = codec.decode_event(&payload).unwrap();
        assert_eq!(key.as_deref(), Some(e.customer_id.as_bytes()));
        out.entry((e.agent_id, e.customer_id, e.seq.unwrap())).or_default().push(payload);
    }
    out
}

/// No seq was used for two different events, and each customer's seqs run
/// 1..=n without a hole. Returns (distinct events, copies sent twice).
pub fn check_seqs(events: &HashMap<(String, String, i64), Vec<Vec<u8>>>) -> (usize, usize) {
    let mut copies = 0;
    let mut max: HashMap<(&str, &str), (i64, usize)> = HashMap::new();
    for ((agent, customer, seq), payloads) in events {
        assert!(payloads.iter().all(|p| p == &payloads[0]), "seq {seq} of {agent}/{customer} was reused for different events");
        copies += payloads.len() - 1;
        let m = max.entry((agent, customer)).or_default();
        m.0 = m.0.max(*seq);
        m.1 += 1;
    }
    for ((agent, customer), (high, n)) in max {
        assert_eq!(high, n as i64, "{agent}/{customer}: seqs are not 1..={high}");
    }
    (events.len(), copies)
}

/// Runs the broker's control command: `METER_TEST_KAFKA_CTL`, default the
/// repository's `ops/kafka` (which honours `KAFKA_PORT`/`KAFKA_CONTROLLER_PORT`).
pub fn kafka_ctl(action: &str) {
    let ctl = std::env::var("METER_TEST_KAFKA_CTL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ops/kafka"));
    let status = Command::new(&ctl).arg(action).status().unwrap_or_else(|e| panic!("{}: {e}", ctl.display()));
    assert!(status.success(), "{} {action}: {status}", ctl.display());
}

/// Starts the broker again even when the test fails half-way.
pub struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            kafka_ctl("start");
        }
    }
}

/// Runs processor and sink until both drained (in process): the
/// processor's counters.
pub async fn drain(cfg: &Valid<Config>) -> meter_engine::Counters {
    let cfg = Arc::new(cfg.clone());
    let (pd, sd) = (Signal::default(), Signal::default());
    pd.raise();
    let p = tokio::spawn({
        let cfg = cfg.clone();
        async move { meter_processor::run(&cfg, Signal::default(), pd).await }
    });
    let s = tokio::spawn({
        let (cfg, sd) = (cfg.clone(), sd.clone());
        async move { meter_sink::run(&cfg, Signal::default(), sd).await }
    });
    let counters = tokio::time::timeout(Duration::from_secs(180), p).await.expect("processor drains").unwrap().unwrap().counters;
    sd.raise();
    tokio::time::timeout(Duration::from_secs(120), s).await.expect("sink drains").unwrap().unwrap();
    eprintln!(
        "processor: {} aggregated, {} duplicates, {:?} dead-lettered, {} incarnation overlaps, {} unsigned",
        counters.aggregated, counters.duplicates, counters.dead_letters, counters.incarnation_overlaps, counters.unsigned
    );
    counters
}

/// Runs processor and sink until both drained, then reconciles ClickHouse
/// and the aggregates topic against `ledger`.
pub async fn drain_and_reconcile(cfg: &Valid<Config>, ledger: &Ledger) -> reconcile::Reconciliation {
    let counters = drain(cfg).await;
    assert_eq!(counters.dead_lettered(), 0);
    let rec = reconcile::reconcile(cfg, ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(20) {
        eprintln!("mismatch in {source}: {m}");
    }
    rec
}
