//! Exactly-once under crashes: `meter process` is killed with SIGKILL at
//! random moments while a fleet publishes, restarted each time, and in the
//! end ClickHouse and the latest revisions on the aggregates topic equal the
//! ledger to the unit. Runs on the real local Kafka and ClickHouse.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meter_agent as agent;
use meter_agent::SimConfig;
use meter_config::Config;
use meter_kafka::{admin, Signal};
use meter_sink::reconcile;

const DAY_MS: i64 = 86_400_000;

fn config_file(dir: &std::path::Path, id: &str) -> (std::path::PathBuf, meter_config::Valid<Config>) {
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
instance_id = "crash-test"
commit_interval_ms = 200
idle_timeout_ms = 1000
transaction_timeout_ms = 10000

[sink]
group_id = "test-sink-{id}"
batch_ms = 300
"#
    );
    let path = dir.join("meter.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(Some(&path)).unwrap();
    (path, cfg)
}

fn spawn_processor(config: &std::path::Path, drain: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meter"));
    cmd.arg("--config")
        .arg(config)
        .arg("process")
        .env("RUST_LOG", "warn")
        .env("METER__METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if drain {
        cmd.arg("--drain");
    }
    cmd.spawn().unwrap()
}

/// Sum of the processor group's committed offsets on the events topic.
fn committed_offsets(cfg: &Config) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        // read_uncommitted: do not wait for the killed instance's pending
        // transaction (require_stable); its offsets are not committed anyway.
        meter_kafka::client_config(&cfg.kafka).set("group.id", &cfg.processor.group_id).set("isolation.level", "read_uncommitted").create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..cfg.topics.partitions {
        tpl.add_partition(&cfg.topics.events, p);
    }
    let c = consumer.committed_offsets(tpl, Duration::from_secs(30)).unwrap();
    c.elements().iter().map(|e| if let rdkafka::Offset::Offset(o) = e.offset() { o } else { 0 }).sum()
}

/// A small deterministic sequence of kill delays.
fn delays(seed: u64, n: usize) -> Vec<Duration> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            Duration::from_millis(1500 + (x >> 33) % 3000)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processors_neither_lose_nor_double_count() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("crash_{}", std::process::id());
    let (path, cfg) = config_file(dir.path(), &id);
    admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");
    let cfg = Arc::new(cfg);

    let sink_drain = Signal::default();
    let sink_task = tokio::spawn({
        let (cfg, drain) = (cfg.clone(), sink_drain.clone());
        async move { meter_sink::run(&cfg, Signal::default(), drain).await }
    });

    // 50 simulated minutes at 120x: about 25 s of publishing, while the
    // processors are killed eight times.
    let now = meter_model::now_ms();
    let sim = SimConfig {
        seed: 11,
        customers: 6,
        agent_id: "crash-agent".into(),
        start: now - now.rem_euclid(DAY_MS) - 2 * DAY_MS + 23 * 3_600_000 + 45 * 60_000,
        duration_s: 50 * 60,
        customer_prefix: "cust-".into(),
    };
    let agent_task = tokio::spawn({
        let cfg = cfg.clone();
        async move { agent::run_simulated(&cfg, sim, 120.0, None).await }
    });

    let mut kills = 0;
    let mut kills_after_progress = 0;
    let mut committed = 0;
    let started = Instant::now();
    for d in delays(42, 8) {
        let mut child = spawn_processor(&path, false);
        tokio::time::sleep(d).await;
        child.kill().unwrap(); // SIGKILL: no flush, no commit, no goodbye
        child.wait().unwrap();
        kills += 1;
        // Count kills of an instance that had committed work, so the test
        // proves crashes mid-stream, not only crashes before the start.
        let now_committed = committed_offsets(&cfg);
        if now_committed > committed {
            kills_after_progress += 1;
        }
        committed = now_committed;
    }
    eprintln!("{kills} kills in {:.1}s", started.elapsed().as_secs_f64());
    let (stats, ledger) = agent_task.await.unwrap().unwrap();
    assert!(kills >= 5, "only {kills} kills");
    assert!(kills_after_progress >= 3, "only {kills_after_progress} of {kills} killed instances had committed anything");

    let mut last = spawn_processor(&path, true);
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = last.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "processor did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "draining processor failed: {status}");
    sink_drain.raise();
    tokio::time::timeout(Duration::from_secs(120), sink_task).await.unwrap().unwrap().unwrap();

    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(20) {
        eprintln!("mismatch in {source}: {m}");
    }
    eprintln!("{} after {kills} kills ({kills_after_progress} with committed progress)", rec.summary());
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, stats.events as i64);
    assert_eq!(rec.windows, rec.final_windows);
}

/// SIGABRT inside the store's write of a committed transaction (the fault
/// harness's `METER_TESTKIT_ABORT_IN_STORE_APPLY`): the Kafka transaction is
/// committed, the store transaction half written. Three such deaths in a
/// row, then a draining run: it restores from the store's last consistent
/// checkpoint and the changelog after it, and the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_inside_its_store_write_restarts_exactly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let id = format!("storekill_{}", std::process::id());
    let (path, cfg) = config_file(dir.path(), &id);
    admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");
    let now = meter_model::now_ms();
    let start = now - now.rem_euclid(DAY_MS) - 2 * DAY_MS + 22 * 3_600_000;
    let sim =
        SimConfig { seed: 5, customers: 6, agent_id: "store-agent".into(), start, duration_s: 40 * 60, customer_prefix: "cust-".into() };
    let (stats, ledger) = agent::run_simulated(&cfg, sim, 0.0, None).await.unwrap();
    let state = dir.path().join("state");
    let run = |abort_at: Option<u64>, log: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meter"));
        cmd.arg("--config")
            .arg(&path)
            .args(["process", "--drain"])
            .env("RUST_LOG", "info,librdkafka=warn")
            .env("METER__METRICS__LISTEN", "127.0.0.1:0")
            .env("METER__PROCESSOR__STATE_DIR", &state)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap());
        if let Some(n) = abort_at {
            cmd.env("METER_TESTKIT_ABORT_IN_STORE_APPLY", n.to_string());
        }
        cmd.status().unwrap()
    };
    for (i, n) in [3, 4, 6].into_iter().enumerate() {
        let status = run(Some(n), &format!("abort-{i}.log"));
        assert_eq!(status.signal(), Some(6), "run {i} should die inside its store write, exited {status}");
    }
    let status = run(None, "final.log");
    assert!(status.success(), "the draining run failed: {status}");
    // The runs after an abort found the store usable and read the
    // changelog after its checkpoint: what the half-written store
    // transaction lost, and the aborted run's committed work. (The first
    // run's checkpoints were all in store commits that had not waited for
    // the disk yet, so the second restores in full: that is exact too.)
    let mut tail = 0;
    for log in ["abort-2.log", "final.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
        let restored =
            text.lines().find(|l| l.contains("partition state restored")).unwrap_or_else(|| panic!("{log}: no restore:\n{text}"));
        assert!(
            restored.contains("\"checkpoint\""),
            "{log}: the store survived the abort, so the restore starts from its checkpoint: {restored}"
        );
        tail += restored.split("entries=").nth(1).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0);
    }
    assert!(tail > 0, "the restores after the aborts read no changelog tail");

    let drain = Signal::default();
    drain.raise();
    tokio::time::timeout(Duration::from_secs(120), meter_sink::run(&cfg, Signal::default(), drain)).await.unwrap().unwrap();
    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(20) {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, stats.events as i64);
    assert_eq!(rec.windows, rec.final_windows);
}
