//! `meter bench --state` (run by `ops/bench --state`): what the processor's
//! state costs as history grows (issue 13), for one fleet and histories of
//! 1, 8 and 32 days by default, in one run.
//!
//! For each history, on fresh topics:
//!
//! 1. the fleet's events over the whole history are published (ending an
//!    hour ago, so that every window closes);
//! 2. `meter process --drain` runs as a child process with the default
//!    tiered state, and again on another group with every window kept in
//!    memory (`hot_window_ms` = the correction horizon: the behaviour before
//!    issue 13), the baseline; the peak RSS of each (`VmHWM`) is sampled;
//! 3. a minute of new events is published and the tiered processor
//!    restarted on the same disk: the time from its start to its first
//!    committed transaction (its metrics endpoint polled), and its restore;
//! 4. the same after deleting its store (a lost disk: a full restore).
//!
//! It prints a table: events, peak RSS (tiered, in-memory baseline),
//! restart-to-first-commit (checkpoint, full), the changelog records read on
//! the checkpoint restart, the store file and the changelog.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meter_config::Config;
use meter_model::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// One history's figures.
struct Row {
    days: u64,
    events: u64,
    rss_tiered: u64,
    rss_memory: u64,
    process_s: f64,
    restart_checkpoint: Duration,
    restart_full: Duration,
    tail_records: u64,
    rss_restart: u64,
    store_bytes: u64,
    changelog_records: i64,
    changelog_bytes: u64,
}

/// A processor child: `meter process --drain` with the scope's settings.
struct Proc {
    child: Child,
    peak_rss: u64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(cfg: &Config, state_dir: &Path, hot_window_ms: i64, metrics_port: u16, log: &Path) -> anyhow::Result<Proc> {
    let p = &cfg.processor;
    let env = [
        ("METER__KAFKA__BROKERS", cfg.kafka.brokers.clone()),
        ("METER__TOPICS__EVENTS", cfg.topics.events.clone()),
        ("METER__TOPICS__AGGREGATES", cfg.topics.aggregates.clone()),
        ("METER__TOPICS__DLQ", cfg.topics.dlq.clone()),
        ("METER__TOPICS__PARTITIONS", cfg.topics.partitions.to_string()),
        ("METER__PROCESSOR__GROUP_ID", p.group_id.clone()),
        ("METER__PROCESSOR__INSTANCE_ID", "state-bench".to_owned()),
        ("METER__PROCESSOR__IDLE_TIMEOUT_MS", p.idle_timeout_ms.to_string()),
        ("METER__PROCESSOR__STATE_DIR", state_dir.display().to_string()),
        ("METER__PROCESSOR__HOT_WINDOW_MS", hot_window_ms.to_string()),
        ("METER__METRICS__LISTEN", format!("127.0.0.1:{metrics_port}")),
    ];
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["process", "--drain"])
        .envs(env)
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting meter process")?;
    Ok(Proc { child, peak_rss: 0 })
}

impl Proc {
    /// The child's peak resident set so far (VmHWM), in bytes.
    fn sample(&mut self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        if let Some(kb) =
            status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        {
            self.peak_rss = self.peak_rss.max(kb * 1024);
        }
    }

    /// Waits for the child to drain and exit, sampling its RSS.
    fn finish(mut self, what: &str) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            self.sample();
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{what}: meter process exited with {status}");
                }
                return Ok(self.peak_rss);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{what}: meter process did not drain within an hour");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A counter from a Prometheus text endpoint, if it answers.
fn scrape(port: u16, metric: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find(|l| l.split_whitespace().next() == Some(metric)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Starts the tiered processor on `state_dir` and returns the time to its
/// first committed transaction and its peak RSS once drained.
fn restart(cfg: &Config, state_dir: &Path, log: &Path, what: &str) -> anyhow::Result<(Duration, u64)> {
    let port = free_port()?;
    let started = Instant::now();
    let mut child = spawn(cfg, state_dir, cfg.processor.hot_window_ms, port, log)?;
    let first_commit = loop {
        child.sample();
        if scrape(port, "meter_transactions_committed_total").is_some_and(|n| n >= 1.0) {
            break started.elapsed();
        }
        if child.child.try_wait()?.is_some() {
            bail!("{what}: meter process exited before its first commit (see {})", log.display());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("{what}: no commit within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rss = child.finish(what)?;
    Ok((first_commit, rss))
}

/// Records and on-disk bytes of the changelog topic (its log folders under
/// the local stack's data directory).
fn changelog_size(cfg: &Config, local: &Path) -> anyhow::Result<(i64, u64)> {
    let topic = cfg.state_topic();
    let c: BaseConsumer = meter_kafka::client_config(&cfg.kafka).create()?;
    let mut records = 0;
    for p in 0..cfg.topics.partitions {
        let (low, high) = c.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        records += high - low;
    }
    let mut bytes = 0;
    let mut stack = vec![local.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name.rsplit_once('-').is_some_and(|(t, p)| t == topic && p.parse::<u32>().is_ok()) {
                    // Segments only: Kafka preallocates its index files.
                    let segments = std::fs::read_dir(&path)?.flatten().filter(|f| f.file_name().to_string_lossy().ends_with(".log"));
                    bytes += segments.filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum::<u64>();
                } else if !name.starts_with('.') && stack.len() < 10_000 {
                    stack.push(path);
                }
            }
        }
    }
    Ok((records, bytes))
}

fn publish_sync(cfg: &Config, seed: u64, agent: &str, start: i64, duration_s: u64) -> anyhow::Result<u64> {
    let sim = meter_agent::SimConfig { seed, customers: 1, agent_id: agent.into(), start, duration_s, customer_prefix: "state-".into() };
    let cfg = cfg.clone().validate()?;
    let rt = tokio::runtime::Handle::current();
    let (run, _) = rt.block_on(meter_agent::run_simulated(&cfg, sim, 0.0, None))?;
    Ok(run.events)
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Runs the state benchmark for `histories` (in days).
pub async fn run(base: &Config, histories: &[u64], ops_dir: &Path) -> anyhow::Result<()> {
    let run_id = now_ms();
    let local = ops_dir.join("..").join(".local");
    let work: PathBuf = local.join("state-bench").join(run_id.to_string());
    std::fs::create_dir_all(&work)?;
    println!("state bench: run {run_id}, one customer's fleet, histories {histories:?} days; logs and stores in {}", work.display());
    let mut rows = Vec::new();
    for &days in histories {
        let mut cfg = base.scoped(&format!("state-{run_id}-{days}d"));
        cfg.topics.partitions = 3;
        cfg.processor.idle_timeout_ms = 2_000;
        let cfg = cfg.validate()?.into_inner();
        meter_kafka::admin::ensure_topics(&cfg).await.context("creating topics (is Kafka running? ops/up)")?;
        let end = now_ms() - 3_600_000;
        let end = end - end.rem_euclid(60_000);
        let start = end - days as i64 * 86_400_000;
        let row = {
            let (cfg, work) = (cfg.clone(), work.clone());
            let local = local.clone();
            tokio::task::spawn_blocking(move || one_history(&cfg, days, start, end, &work, &local)).await??
        };
        print_row(&row);
        rows.push(row);
    }
    println!();
    println!("| history | events | peak RSS tiered | peak RSS all in memory | restart to first commit (checkpoint) | changelog records read | restart (full restore) | store on disk | changelog |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} d | {:.2}M | {:.1} MB | {:.1} MB | {:.2} s | {} | {:.2} s | {:.1} MB | {} records, {:.1} MB |",
            r.days,
            r.events as f64 / 1e6,
            mb(r.rss_tiered),
            mb(r.rss_memory),
            r.restart_checkpoint.as_secs_f64(),
            r.tail_records,
            r.restart_full.as_secs_f64(),
            mb(r.store_bytes),
            r.changelog_records,
            mb(r.changelog_bytes)
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        println!(
            "ratios {}d / {}d: peak RSS tiered x{:.2} (in memory x{:.2}), restart from checkpoint x{:.2} (full restore x{:.2})",
            last.days,
            first.days,
            last.rss_tiered as f64 / first.rss_tiered.max(1) as f64,
            last.rss_memory as f64 / first.rss_memory.max(1) as f64,
            last.restart_checkpoint.as_secs_f64() / first.restart_checkpoint.as_secs_f64().max(1e-9),
            last.restart_full.as_secs_f64() / first.restart_full.as_secs_f64().max(1e-9),
        );
    }
    Ok(())
}

fn one_history(cfg: &Config, days: u64, start: i64, end: i64, work: &Path, local: &Path) -> anyhow::Result<Row> {
    let dir = work.join(format!("{days}d"));
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let events = publish_sync(cfg, 1, "state-agent", start, days * 86_400)?;
    println!("{days} d: {events} events published in {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let tiered = spawn(cfg, &dir.join("tiered"), cfg.processor.hot_window_ms, free_port()?, &dir.join("tiered.log"))?;
    let rss_tiered = tiered.finish("tiered")?;
    let process_s = t.elapsed().as_secs_f64();
    println!("{days} d: tiered processor drained in {process_s:.1}s, peak RSS {:.1} MB", mb(rss_tiered));

    let mut memory_cfg = cfg.clone();
    memory_cfg.processor.group_id = format!("{}-memory", cfg.processor.group_id);
    tokio::runtime::Handle::current().block_on(meter_kafka::admin::ensure_topics(&memory_cfg))?;
    let memory = spawn(&memory_cfg, &dir.join("memory"), cfg.processor.correction_horizon_ms, free_port()?, &dir.join("memory.log"))?;
    let t = Instant::now();
    let rss_memory = memory.finish("all in memory")?;
    println!("{days} d: all-in-memory processor drained in {:.1}s, peak RSS {:.1} MB", t.elapsed().as_secs_f64(), mb(rss_memory));

    let store = meter_processor::store::Store::path(&dir.join("tiered"), &cfg.processor.group_id, "state-bench");
    let store_bytes = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
    let (changelog_records, changelog_bytes) = changelog_size(cfg, local)?;

    // A minute of new usage, then a restart on the same disk.
    publish_sync(cfg, 2, "state-agent-2", end, 60)?;
    let log = dir.join("restart.log");
    let (restart_checkpoint, rss_restart) = restart(cfg, &dir.join("tiered"), &log, "restart")?;
    let tail_records = restored_entries(&log);
    println!(
        "{days} d: restart on the same disk: first commit after {:.2}s, {tail_records} changelog records read",
        restart_checkpoint.as_secs_f64()
    );

    // Another minute, and a restart without the store (a lost disk).
    publish_sync(cfg, 3, "state-agent-3", end + 60_000, 60)?;
    std::fs::remove_file(&store).with_context(|| format!("removing {}", store.display()))?;
    let (restart_full, _) = restart(cfg, &dir.join("tiered"), &dir.join("full.log"), "full restore")?;
    println!("{days} d: restart with no store: first commit after {:.2}s", restart_full.as_secs_f64());
    Ok(Row {
        days,
        events,
        rss_tiered,
        rss_memory,
        process_s,
        restart_checkpoint,
        restart_full,
        tail_records,
        rss_restart,
        store_bytes,
        changelog_records,
        changelog_bytes,
    })
}

/// The changelog records the restore logged (`entries=` of "partition state
/// restored"), summed.
fn restored_entries(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("partition state restored"))
        .filter_map(|l| l.split("entries=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn print_row(r: &Row) {
    println!(
        "{} d: {} events; processed in {:.1}s; peak RSS {:.1} MB tiered / {:.1} MB in memory; restart {:.2}s from the checkpoint ({} records read, RSS {:.1} MB) / {:.2}s full; store {:.1} MB; changelog {} records, {:.1} MB",
        r.days,
        r.events,
        r.process_s,
        mb(r.rss_tiered),
        mb(r.rss_memory),
        r.restart_checkpoint.as_secs_f64(),
        r.tail_records,
        mb(r.rss_restart),
        r.restart_full.as_secs_f64(),
        mb(r.store_bytes),
        r.changelog_records,
        mb(r.changelog_bytes)
    );
}
