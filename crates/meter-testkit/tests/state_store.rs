//! The processor's local state store (issue 13) against the real local
//! Kafka and ClickHouse: restarts read only the changelog after the
//! checkpoint, late corrections of windows that live on disk only are
//! exact, and a checkpoint that is rolled back, or does not match the
//! changelog, never costs a unit.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meter_agent::{self as agent, SimConfig};
use meter_clickhouse::Connection;
use meter_config::{Config, Valid};
use meter_engine::state::EntryKind;
use meter_kafka::{admin, Signal};
use meter_model::ledger::Ledger;
use meter_processor::store::{Checkpoint, Store};
use meter_processor::ProcessorStats;
use meter_sink::{self as sink, reconcile};

const DAY_MS: i64 = 86_400_000;

/// A configuration of its own, whose final windows leave memory as soon as
/// they close (`hot_window_ms = 0`): every late event below is a
/// correction read back from disk.
fn config(name: &str, state_dir: &Path) -> Valid<Config> {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{}_{}_{}", name, std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut cfg = Config::default().scoped(&format!("test-{id}"));
    cfg.topics.partitions = 3;
    cfg.processor.idle_timeout_ms = 1_000;
    cfg.processor.commit_interval_ms = 300;
    cfg.processor.hot_window_ms = 0;
    cfg.processor.state_dir = state_dir.to_owned();
    cfg.sink.batch_ms = 300;
    cfg.validate().unwrap()
}

fn two_days_ago() -> i64 {
    let now = meter_model::now_ms();
    now - now.rem_euclid(DAY_MS) - 2 * DAY_MS
}

fn fleet(seed: u64, agent_id: &str) -> SimConfig {
    SimConfig {
        seed,
        customers: 4,
        agent_id: agent_id.into(),
        start: two_days_ago() + 3_600_000,
        duration_s: 1800,
        customer_prefix: "cust-".into(),
    }
}

/// Runs the processor until it has drained what was published.
async fn process(cfg: &Valid<Config>) -> ProcessorStats {
    let drain = Signal::default();
    drain.raise();
    tokio::time::timeout(Duration::from_secs(180), meter_processor::run(cfg, Signal::default(), drain))
        .await
        .expect("the processor drains")
        .unwrap()
}

/// Publishes a simulated fleet (the same seed and agent again are exact
/// duplicates: same seqs) and adds what it sent to `ledger`.
async fn publish(cfg: &Valid<Config>, sim: SimConfig, ledger: &mut Ledger, count: bool) -> u64 {
    let (stats, l) = agent::run_simulated(cfg, sim, 0.0, None).await.unwrap();
    if count {
        ledger.merge(&l);
    }
    stats.events
}

async fn assert_exact(cfg: &Valid<Config>, ledger: &Ledger) {
    let drain = Signal::default();
    drain.raise();
    tokio::time::timeout(Duration::from_secs(120), sink::run(cfg, Signal::default(), drain)).await.expect("the sink drains").unwrap();
    let rec = reconcile::reconcile(cfg, ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(5) {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{} mismatches", rec.mismatches.len());
    assert_eq!(rec.windows, rec.final_windows);
}

async fn setup(cfg: &Config) {
    admin::ensure_topics(cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");
}

fn store_file(cfg: &Config) -> std::path::PathBuf {
    Store::path(&cfg.processor.state_dir, &cfg.processor.group_id, &cfg.processor.instance_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_read_the_tail_and_a_rolled_back_store_is_caught_up_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("tail", dir.path());
    setup(&cfg).await;
    let mut ledger = Ledger::default();

    let sent = publish(&cfg, fleet(1, "a"), &mut ledger, true).await;
    let first = process(&cfg).await;
    assert_eq!(first.counters.aggregated, sent);
    assert_eq!(first.restore_sources.get("checkpoint"), None, "a new disk has no checkpoint: {:?}", first.restore_sources);
    // Every window is final and, with hot_window_ms = 0, on disk only.
    let (store, _) = Store::open(&store_file(&cfg)).unwrap();
    let windows: u64 = (0..3).map(|p| store.count(p, EntryKind::Window).unwrap()).sum();
    assert!(windows > 0);
    drop(store);
    let rolled_back = dir.path().join("rolled-back.redb");
    std::fs::copy(store_file(&cfg), &rolled_back).unwrap();

    // The same events again (duplicates, found through streams read back
    // from disk) and another agent's for the same customers and minutes
    // (corrections of windows read back from disk).
    let dups = publish(&cfg, fleet(1, "a"), &mut ledger, false).await;
    let more = publish(&cfg, fleet(2, "b"), &mut ledger, true).await;
    let second = process(&cfg).await;
    assert_eq!(second.restore_sources.get("checkpoint"), Some(&3), "{:?}", second.restore_sources);
    assert_eq!(second.restored_entries, 0, "a restart on the same disk reads no changelog it already has");
    assert_eq!(second.counters.duplicates, dups);
    assert_eq!(second.counters.aggregated, more);

    // The store goes back to its copy from before the second run: its
    // checkpoint is older but true, so the restore reads the tail since.
    std::fs::copy(&rolled_back, store_file(&cfg)).unwrap();
    let late = publish(&cfg, fleet(3, "c"), &mut ledger, true).await;
    let third = process(&cfg).await;
    assert_eq!(third.restore_sources.get("checkpoint"), Some(&3), "{:?}", third.restore_sources);
    assert!(third.restored_entries > 0, "the rolled-back store must read the second run's changes");
    assert_eq!(third.counters.aggregated, late);
    assert_eq!(third.counters.duplicates, 0);
    assert_exact(&cfg, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_does_not_match_the_changelog_is_rejected_and_the_restore_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("forged", dir.path());
    setup(&cfg).await;
    let mut ledger = Ledger::default();
    publish(&cfg, fleet(4, "a"), &mut ledger, true).await;
    process(&cfg).await;

    // The store loses its data but claims to be complete: a checkpoint at
    // the changelog's end naming a record that is not there. Trusted, it
    // would restore nothing, and the duplicates below would count again.
    let (store, _) = Store::open(&store_file(&cfg)).unwrap();
    let mut forged = Vec::new();
    for p in 0..3 {
        let real = store.checkpoint(p).unwrap().expect("a checkpoint per partition with records");
        store.clear_partition(p).unwrap();
        forged.push((p, Checkpoint { last_hash: real.last_hash ^ 1, ..real }));
    }
    store.apply(std::iter::empty(), &forged, true).unwrap();
    drop(store);

    let dups = publish(&cfg, fleet(4, "a"), &mut ledger, false).await;
    let more = publish(&cfg, fleet(5, "b"), &mut ledger, true).await;
    let second = process(&cfg).await;
    assert_eq!(second.counters.duplicates, dups, "the replayed events must be found as duplicates");
    assert_eq!(second.counters.aggregated, more);
    assert_eq!(second.restore_sources.get("rejected"), Some(&3), "{:?}", second.restore_sources);
    assert!(second.restored_entries > 0, "a rejected checkpoint restores the whole changelog");

    // A store file that is not a store at all is set aside and rebuilt.
    std::fs::write(store_file(&cfg), b"not a redb file").unwrap();
    let third = process(&cfg).await;
    assert_eq!(third.restore_sources.get("full"), Some(&3), "{:?}", third.restore_sources);
    assert!(dir.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".unusable")));
    assert_exact(&cfg, &ledger).await;
}

/// A tmpfs of `size` on a temporary folder, unmounted when dropped (the
/// test mounts it, so it runs as root, as CI does).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a tmpfs needs root (CI runs as root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_stops_the_processor_with_its_cause_and_nothing_is_lost() {
    let fs = Tmpfs::mount("2m");
    let cfg = config("diskfull", fs.dir.path());
    setup(&cfg).await;
    let mut ledger = Ledger::default();
    // Six customers over four hours: a store of several MB.
    let sim = SimConfig { customers: 6, duration_s: 4 * 3600, ..fleet(6, "a") };
    let sent = publish(&cfg, sim, &mut ledger, true).await;

    let drain = Signal::default();
    drain.raise();
    let failed = tokio::time::timeout(Duration::from_secs(180), meter_processor::run(&cfg, Signal::default(), drain))
        .await
        .expect("the processor stops rather than hangs");
    let err = format!("{:#}", failed.expect_err("a full state disk must stop the processor"));
    eprintln!("the processor stopped: {err}");
    assert!(err.contains("state store") && err.contains("No space left"), "the error names the store and the cause: {err}");

    // Restarted on a disk with room (another instance, or this one after
    // the operator freed space), it restores from the changelog: exact.
    let roomy = tempfile::tempdir().unwrap();
    let mut moved = cfg.clone().into_inner();
    moved.processor.state_dir = roomy.path().to_owned();
    let moved = moved.validate().unwrap();
    let second = process(&moved).await;
    assert!(second.counters.aggregated < sent, "the first run committed part of the input before its disk filled");
    assert_exact(&moved, &ledger).await;
}
