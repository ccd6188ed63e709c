//! The pipeline on the local cluster (`ops/cluster start`): three Kafka
//! brokers (topics with replication factor 3, `min.insync.replicas` 2) and
//! ClickHouse as two shards of two replicas under ZooKeeper, the schema laid
//! out with `clickhouse.cluster` (replicated tables under `Distributed`
//! ones).
//!
//! These tests need the cluster, which the single-node suite does not
//! start: `ops/test` runs them in a phase of their own (`--ignored`, after
//! stopping the single-node stack), and so can anyone:
//!
//! ```sh
//! ops/cluster start && cargo test -p meter-cli --features testkit --test cluster -- --ignored
//! ```
//!
//! Brokers and nodes come from `METER_CLUSTER_KAFKA` (default
//! 127.0.0.1:19092,19093,19094) and `METER_CLUSTER_CLICKHOUSE` (the four
//! HTTP urls, comma separated; the first is the one written through).

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

mod agent_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent_support::{analyst_password, expected_ledger, sim_config, spawn_agent_cmd};
use meter_config::{Config, Valid};
use meter_model::ledger::Ledger;

const CLUSTER: &str = "meterline";

fn brokers() -> String {
    std::env::var("METER_CLUSTER_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094".into())
}

fn nodes() -> Vec<String> {
    std::env::var("METER_CLUSTER_CLICKHOUSE")
        .unwrap_or_else(|_| (0..4).map(|i| format!("http://127.0.0.1:{}", 18123 + i)).collect::<Vec<_>>().join(","))
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn ops_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ops")
}

fn config_file(dir: &Path, tag: &str) -> PathBuf {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"

[topics]
events = "usage.events.{tag}"
aggregates = "usage.aggregates.{tag}"
dlq = "usage.dlq.{tag}"
agents = "usage.agents.{tag}"
invoice_lines = "billing.invoice_lines.{tag}"
period_close = "billing.period_close.{tag}"
partitions = 6
replication_factor = 3

[clickhouse]
url = "{url}"
database = "meterline_{tag}"
cluster = "{CLUSTER}"

[processor]
group_id = "meter-processor-{tag}"
instance_id = "cluster-test"
commit_interval_ms = 300
idle_timeout_ms = 1000

[sink]
group_id = "meter-sink-{tag}"
batch_ms = 300

[metrics]
listen = "off"

[agent]
checkpoint_interval_ms = 200
"#,
        brokers = brokers(),
        url = nodes()[0],
    );
    let path = dir.join("meter.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Valid<Config> {
    Config::load(Some(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `cfg` reaching ClickHouse through `url` instead.
fn through(cfg: &Config, url: &str) -> Valid<Config> {
    let mut c = cfg.clone();
    c.clickhouse.url = url.to_owned();
    c.validate().unwrap()
}

fn client(url: &str, db: &str) -> clickhouse::Client {
    clickhouse::Client::default().with_url(url).with_database(db).with_validation(false)
}

fn meter(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meter")).arg("--config").arg(config).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster (ops/cluster start); ops/test runs it in its cluster phase"]
async fn cluster_pipeline_is_exact_through_the_distributed_tables_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("cl{}", std::process::id());
    let path = config_file(dir.path(), &tag);
    let cfg = load(&path);
    meter_kafka::admin::ensure_topics(&cfg).await.expect("creating topics on the cluster (ops/cluster start)");
    let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
    let applied = meter_clickhouse::migrate(&conn).await.expect("migrating the cluster");
    assert_eq!(applied.len(), meter_clickhouse::MIGRATIONS.len());
    // Run again from another node: nothing left to apply, on any node.
    let again = meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&through(&cfg, &nodes()[3]).clickhouse)).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    for url in nodes() {
        let versions: Vec<u32> = client(&url, &cfg.clickhouse.database)
            .query("SELECT version FROM schema_migrations FINAL ORDER BY version")
            .fetch_all()
            .await
            .unwrap();
        assert_eq!(versions, (1..=meter_clickhouse::MIGRATIONS.len() as u32).collect::<Vec<_>>(), "schema_migrations on {url}");
    }

    // Every topic of the run is replicated three times.
    let probe: rdkafka::consumer::BaseConsumer = meter_kafka::client_config(&cfg.kafka).create().unwrap();
    for topic in [&cfg.topics.events, &cfg.topics.aggregates, &cfg.topics.dlq, &cfg.state_topic()] {
        let md = rdkafka::consumer::Consumer::fetch_metadata(&probe, Some(topic), Duration::from_secs(10)).unwrap();
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            assert_eq!(p.replicas().len(), 3, "{topic} partition {} has replicas {:?}", p.id(), p.replicas());
        }
    }

    let sim = sim_config(21, 6, "cluster-agent", 180);
    let expected = expected_ledger(&sim);
    let ledger_path = dir.path().join("ledger.csv");
    let out = spawn_agent_cmd(&path, &dir.path().join("state"), &sim, 0.0, Some(&ledger_path)).output().unwrap();
    assert!(out.status.success(), "agent: {}", String::from_utf8_lossy(&out.stdout));
    let ledger = Ledger::from_csv(&std::fs::read_to_string(&ledger_path).unwrap()).unwrap();
    assert_eq!(ledger, expected);

    let counters = agent_support::drain(&cfg).await;
    assert_eq!(counters.dead_lettered(), 0);

    // The same answer through every node's Distributed tables.
    for url in nodes() {
        let rec = meter_sink::reconcile::reconcile(&through(&cfg, &url), &ledger).await.unwrap();
        assert!(rec.mismatches.is_empty(), "through {url}: {}", rec.summary());
        assert_eq!(rec.aggregated_events, expected.event_count(), "through {url}");
    }
    // Each shard's two replicas hold the same rows, the shards hold
    // different customers, and together they are the Distributed table.
    let mut per_node: Vec<BTreeMap<String, u64>> = Vec::new();
    for url in nodes() {
        let c = client(&url, &cfg.clickhouse.database);
        c.query("SYSTEM SYNC REPLICA usage_minute_local").execute().await.unwrap();
        let rows: Vec<(String, u64)> =
            c.query("SELECT customer_id, count() FROM usage_minute_local FINAL GROUP BY customer_id").fetch_all().await.unwrap();
        per_node.push(rows.into_iter().collect());
    }
    assert_eq!(per_node[0], per_node[1], "shard 1's replicas differ");
    assert_eq!(per_node[2], per_node[3], "shard 2's replicas differ");
    assert!(per_node[0].keys().all(|k| !per_node[2].contains_key(k)), "a customer on both shards");
    assert!(!per_node[0].is_empty() && !per_node[2].is_empty(), "a shard holds nothing: {per_node:?}");
    let total: u64 =
        client(&nodes()[0], &cfg.clickhouse.database).query("SELECT count() FROM usage_minute FINAL").fetch_one().await.unwrap();
    assert_eq!(total, per_node[0].values().sum::<u64>() + per_node[2].values().sum::<u64>());

    // Rating, the audit and the analysts' examples through the cluster.
    let month = meter_model::date::Date::from_millis(sim.start).unwrap().year_month().to_string();
    let (ok, out) = meter(&path, &["rate", "--month", &month]);
    assert!(ok, "meter rate: {out}");
    let (ok, out) = meter(&path, &["audit", "--month", &month]);
    assert!(ok, "meter audit: {out}");
    let (ok, out) = meter(&path, &["report", "cost", "--month", &month]);
    assert!(ok && out.contains("cust-"), "meter report cost: {out}");
    let analyst = client(&nodes()[2], &cfg.clickhouse.database).with_user("analyst").with_password(analyst_password());
    for sql in meter_clickhouse::analyst_examples() {
        analyst
            .query(&sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("docs/analysts.md example fails on the cluster as analyst: {e}\n{sql}"));
    }
}

#[test]
#[ignore = "needs the local cluster (ops/cluster start); ops/test runs it in its cluster phase"]
fn cluster_chaos_keeps_every_unit_and_the_negative_control_is_caught() {
    let chaos = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meter"))
            .args(["chaos", "--cluster", "--ops-dir", ops_dir().to_str().unwrap()])
            .args(args)
            .env("RUST_LOG", "off")
            .env("METER__KAFKA__BROKERS", brokers())
            .env("METER__TOPICS__REPLICATION_FACTOR", "3")
            .env("METER__CLICKHOUSE__URL", &nodes()[0])
            .env("METER__CLICKHOUSE__CLUSTER", CLUSTER)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}\n--- stderr ---\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, output) = chaos(&["--duration", "60s", "--processor-kills", "6", "--sink-kills", "2", "--node-outage", "10s"]);
    eprintln!("{output}");
    assert!(ok && output.lines().any(|l| l.starts_with("chaos: ok (")), "cluster chaos run failed:\n{output}");
    let (ok, output) = chaos(&[
        "--duration",
        "40s",
        "--processor-kills",
        "5",
        "--sink-kills",
        "0",
        "--negative-control",
        "--no-broker-restart",
        "--clickhouse-outage",
        "0s",
    ]);
    eprintln!("{output}");
    assert!(!ok && output.lines().any(|l| l.starts_with("chaos: FAILED (")), "negative control not caught on the cluster:\n{output}");
}
