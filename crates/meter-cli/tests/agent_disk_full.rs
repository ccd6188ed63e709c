//! Full disks and torn files, on real file systems: size-limited (and
//! inode-limited) tmpfs mounts (the tests mount them, so they run as root,
//! as CI does). After each fault the agent restarts by itself and delivers
//! every spooled event exactly once: ClickHouse equals the simulator's
//! ledger minus what the dropped ledger says was dropped, and the drops
//! are exactly what the metrics counted.

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent_support::*;
use meter_agent::dropped::DroppedLedger;
use meter_agent::{run_agent, AgentMetrics, AgentRun, SimConfig, Simulator, Source};
use meter_config::{Config, Valid};
use meter_kafka::Signal;

/// A tmpfs of `size` (and at most `inodes` files) mounted on a temporary
/// folder, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str, inodes: Option<u32>) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = format!("size={size}");
        if let Some(n) = inodes {
            opts.push_str(&format!(",nr_inodes={n}"));
        }
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mounting a tmpfs needs root (CI runs as root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { path: dir.path().to_owned(), _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The identity `meter agent --simulate` gives its state folder.
fn identity(sim: &SimConfig) -> String {
    format!("simulator agent_id={} seed={} customers={} start={}", sim.agent_id, sim.seed, sim.customers, sim.start)
}

fn down(cfg: &Valid<Config>) -> Valid<Config> {
    let mut c = cfg.clone().into_inner();
    c.kafka.brokers = "127.0.0.1:9".into();
    c.validate().unwrap()
}

fn source(sim: &SimConfig, speed: f64) -> Source {
    Source::Simulated { sim: Box::new(Simulator::new(sim.clone())), speed }
}

/// The agent in process with Kafka unreachable, until `stop` says so.
async fn run_until(
    cfg: &Valid<Config>,
    state: &Path,
    sim: &SimConfig,
    speed: f64,
    mut stop: impl FnMut(&AgentMetrics) -> bool + Send + 'static,
) -> (AgentRun, AgentMetrics) {
    let metrics = AgentMetrics::unserved();
    let shutdown = Signal::default();
    let watcher = tokio::spawn({
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        async move {
            while !stop(&metrics) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shutdown.raise();
        }
    });
    let run = tokio::time::timeout(
        Duration::from_secs(300),
        run_agent(&down(cfg), state, &identity(sim), source(sim, speed), metrics.clone(), shutdown, true),
    )
    .await
    .unwrap_or_else(|_| panic!("the agent did not stop: {}", metrics.summary()))
    .unwrap();
    watcher.await.unwrap();
    (run, metrics)
}

fn failures(m: &AgentMetrics) -> String {
    ["spool", "checkpoint", "dropped_ledger"]
        .iter()
        .map(|f| format!("{f}: {}", m.state_write_failures.with_label_values(&[f]).get()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Kafka is back: a new process sends what the spool kept, then processor
/// and sink drain; ClickHouse and the topic must equal the simulator's
/// ledger minus the recorded drops, and every seq on the topic is used
/// once, without holes.
async fn deliver_and_reconcile(cfg: &Valid<Config>, state: &Path, sim: &SimConfig) -> AgentMetrics {
    let metrics = AgentMetrics::unserved();
    let run = tokio::time::timeout(
        Duration::from_secs(180),
        run_agent(cfg, state, &identity(sim), source(sim, 0.0), metrics.clone(), Signal::default(), true),
    )
    .await
    .expect("the agent drains once Kafka answers")
    .unwrap();
    assert!(run.drained && run.checkpointed, "{}", metrics.summary());
    let (dropped, _) = DroppedLedger::load(state.join("dropped-ledger.csv")).unwrap();
    let mut expected = expected_ledger(sim);
    dropped.subtract_from(&mut expected);
    assert_eq!(run.ledger.as_ref(), Some(&expected), "the agent's own ledger");
    let events = read_events(cfg);
    let (distinct, _) = check_seqs(&events);
    assert_eq!(distinct as i64, expected.event_count(), "every kept event on the topic, once");
    let rec = drain_and_reconcile(cfg, &expected).await;
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    metrics
}

fn dropped_events(state: &Path) -> i64 {
    DroppedLedger::load(state.join("dropped-ledger.csv")).unwrap().0.ledger().event_count()
}

/// The reproduction of the issue: 2 customers, 30 simulated minutes, the
/// state folder on a 2 MB tmpfs, Kafka unreachable. The disk fills long
/// before `agent.spool_max_bytes`; whole ticks are then dropped, counted
/// and recorded, the checkpoint and the dropped ledger still fit (the
/// reserve), SIGTERM ends cleanly, and once Kafka is back every spooled
/// event is delivered. Before the fix the dropped ledger was torn by the
/// full disk and the next start refused to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_whole_ticks_and_everything_spooled_is_delivered_later() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("diskfull_{}", std::process::id());
    let (_, cfg) = config_file(
        work.path(),
        &id,
        "spool_segment_bytes = 65536\ndisk_reserve_bytes = 131072\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let fs = Tmpfs::mount("2m", None);
    let state = fs.path.join("state");
    let sim = sim_config(11, 2, "disk-agent", 1800);
    let (first, m) = run_until(&cfg, &state, &sim, 0.0, |m| m.ticks.get() >= 1800).await;
    eprintln!("first run: {}", m.summary());
    assert!(m.dropped.get() > 0, "the disk never filled");
    assert!(m.spooled.get() > 0);
    assert_eq!(m.spooled.get() + m.dropped.get(), m.generated.get(), "every event is kept or counted as dropped");
    assert!(first.checkpointed, "the reserve keeps room for the checkpoint; write failures: {}", failures(&m));
    assert_eq!(m.state_write_failures.with_label_values(&["checkpoint"]).get(), 0);
    assert_eq!(m.state_write_failures.with_label_values(&["dropped_ledger"]).get(), 0);
    assert_eq!(dropped_events(&state), m.dropped.get() as i64, "the dropped ledger holds exactly what was counted");
    assert!(meter_agent::spool::free_bytes(&state).unwrap() < 2 << 20);
    let second = deliver_and_reconcile(&cfg, &state, &sim).await;
    assert_eq!(second.produced.get(), m.spooled.get());
}

/// Fill every byte the file system has left (another writer took the
/// reserve too).
fn fill(path: &Path) {
    if let Ok(mut f) = std::fs::File::create(path) {
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
    }
}

/// The disk fills completely (another writer took the reserve too): the
/// checkpoint cannot be written, appends are refused and ticks dropped;
/// once space returns the checkpoint succeeds and ticks are kept again,
/// with nobody restarting anything. Then the disk is full again at
/// SIGTERM: the final checkpoint and the dropped ledger cannot be written,
/// the agent still stops cleanly, and the next start (space back, Kafka
/// back) delivers exactly once: the unwritten drops are emitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_and_dropped_ledger_writes_refused_by_a_full_disk_cost_nothing() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("diskfill_{}", std::process::id());
    let (_, cfg) = config_file(
        work.path(),
        &id,
        "spool_segment_bytes = 16384\ndisk_reserve_bytes = 65536\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let fs = Tmpfs::mount("4m", None);
    let state = fs.path.join("state");
    let filler = fs.path.join("filler");
    let sim = sim_config(12, 2, "disk-agent", 1200);
    let (first, m) = run_until(&cfg, &state, &sim, 100.0, {
        let filler = filler.clone();
        let mut phase = 0;
        move |m| {
            let checkpoint_failures = m.state_write_failures.with_label_values(&["checkpoint"]).get();
            match phase {
                0 if m.ticks.get() >= 200 => {
                    fill(&filler);
                    phase = 1;
                }
                1 if checkpoint_failures >= 3 => {
                    let _ = std::fs::remove_file(&filler);
                    phase = 2;
                }
                2 if m.ticks.get() >= 700 => {
                    fill(&filler);
                    phase = 3;
                }
                // Dropped ticks waiting to be recorded, on a full disk.
                3 => return m.ticks.get() >= 900 && checkpoint_failures >= 6,
                _ => {}
            }
            false
        }
    })
    .await;
    eprintln!("first run: {} ({})", m.summary(), failures(&m));
    assert!(m.dropped.get() > 0);
    assert!(!first.checkpointed, "the final checkpoint met the full disk");
    assert!(m.state_write_failures.with_label_values(&["dropped_ledger"]).get() > 0, "the final drops met the full disk");
    assert!(dropped_events(&state) < m.dropped.get() as i64, "the last drops were not written");
    std::fs::remove_file(&filler).unwrap();
    deliver_and_reconcile(&cfg, &state, &sim).await;
}

/// No inode left: no new segment, and no checkpoint (its temporary file),
/// can be created. The spool refuses to start a segment that would take
/// the last inodes (ticks dropped, recorded once a tick is kept again);
/// once inodes are free again the agent goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_inode_left_drops_ticks_until_there_are_and_the_agent_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("diskinode_{}", std::process::id());
    let (_, cfg) = config_file(
        work.path(),
        &id,
        "spool_segment_bytes = 4096\ndisk_reserve_bytes = 0\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    // Segments of 4096 bytes hold about one tick each: about 100 inodes by
    // tick 100, when the test takes the rest.
    let fs = Tmpfs::mount("8m", Some(400));
    let state = fs.path.join("state");
    let spare = fs.path.join("spare");
    let sim = sim_config(13, 2, "disk-agent", 900);
    let (first, m) = run_until(&cfg, &state, &sim, 100.0, {
        let spare = spare.clone();
        let mut freed = false;
        move |m| {
            if m.ticks.get() >= 100 && !spare.exists() && !freed && std::fs::create_dir_all(&spare).is_ok() {
                let mut n = 0;
                while std::fs::File::create(spare.join(n.to_string())).is_ok() {
                    n += 1;
                }
            }
            if spare.exists() && m.state_write_failures.with_label_values(&["checkpoint"]).get() >= 3 {
                freed = true;
                let _ = std::fs::remove_dir_all(&spare);
            }
            m.ticks.get() >= 900
        }
    })
    .await;
    eprintln!("first run: {} ({})", m.summary(), failures(&m));
    assert!(m.dropped.get() > 0, "no tick was dropped for want of an inode");
    assert!(first.checkpointed);
    assert_eq!(dropped_events(&state), m.dropped.get() as i64);
    deliver_and_reconcile(&cfg, &state, &sim).await;
}

/// A segment write that fails (`ulimit -f`: the write site itself; on a
/// full disk the free-space check refuses first, so the write fails only
/// when another writer takes the space in between): the batch is cut off
/// again, its tick dropped, and the log keeps no hole. The agent is then
/// killed, restarted without the limit, and delivers exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_segment_write_drops_its_tick_and_leaves_no_hole() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("diskwrite_{}", std::process::id());
    let (config, cfg) = config_file(
        work.path(),
        &id,
        "spool_segment_bytes = 1048576\ndisk_reserve_bytes = 0\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let state = work.path().join("state");
    let sim = sim_config(17, 2, "disk-agent", 600);
    let agent = spawn_agent_cmd(&config, &state, &sim, 200.0, None);
    // bash: SIGXFSZ ignored (inherited by exec), files limited to 64 KiB.
    let log = work.path().join("agent.log");
    let line = format!("trap '' XFSZ; ulimit -f 64; exec {} 2>{}", shell_words(&agent), log.display());
    let mut child = Killed(Command::new("bash").args(["-c", &line]).env("METER__KAFKA__BROKERS", "127.0.0.1:9").spawn().unwrap());
    let seg = state.join("spool/00000000000000000000.seg");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&seg).map_or(0, |m| m.len()) < 60_000 {
        assert!(Instant::now() < deadline, "the segment never reached the limit");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A few turns against the limit, then SIGKILL.
    std::thread::sleep(Duration::from_millis(800));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(std::fs::metadata(&seg).unwrap().len() <= 65_536, "nothing past the limit");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("cannot write the state folder") && log.contains("spool"), "no failed segment write in the log:\n{log}");
    deliver_and_reconcile(&cfg, &state, &sim).await;
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` as a shell command line (its arguments single-quoted).
fn shell_words(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote)).collect::<Vec<_>>().join(" ")
}

fn segments(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// A torn last frame in the spool and a torn `checkpoint.json` (what a
/// crash during a write, or a disk that lost the end of a file, leaves):
/// the next start cuts the frame off, counts it, continues from the
/// previous checkpoint, and delivers everything exactly once. Before the
/// fix a torn checkpoint stopped the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_frame_and_a_torn_checkpoint_cost_nothing() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("torn_{}", std::process::id());
    let (_, cfg) = config_file(
        work.path(),
        &id,
        "spool_max_bytes = 65536\nspool_segment_bytes = 16384\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let fs = Tmpfs::mount("16m", None);
    let state = fs.path.join("state");
    let sim = sim_config(14, 2, "disk-agent", 600);
    let (_, m) = run_until(&cfg, &state, &sim, 0.0, |m| m.ticks.get() >= 600).await;
    assert!(m.dropped.get() > 0, "the spool limit should drop some ticks too");
    let last = segments(&state).pop().unwrap();
    std::fs::OpenOptions::new().append(true).open(&last).unwrap().write_all(&[200, 0, 0, 0, 9, 9, 9]).unwrap();
    let cp = state.join("spool/checkpoint.json");
    let bytes = std::fs::read(&cp).unwrap();
    std::fs::write(&cp, &bytes[..bytes.len() / 2]).unwrap();
    let second = deliver_and_reconcile(&cfg, &state, &sim).await;
    assert!(second.state_torn_bytes.get() >= 7, "{}", second.summary());
}

/// A torn last group in the dropped ledger (a crash during its write): cut
/// off and counted; the agent starts, resumes before that tick (its record
/// is gone, so it is emitted again) and delivers exactly once. Before the
/// fix the agent refused to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_dropped_ledger_is_cut_and_its_tick_emitted_again() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("tornledger_{}", std::process::id());
    let (_, cfg) = config_file(
        work.path(),
        &id,
        "spool_max_bytes = 65536\nspool_segment_bytes = 16384\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let fs = Tmpfs::mount("16m", None);
    let state = fs.path.join("state");
    let sim = sim_config(15, 2, "disk-agent", 600);
    let (_, m) = run_until(&cfg, &state, &sim, 0.0, |m| m.ticks.get() >= 600).await;
    assert!(m.dropped.get() > 0);
    let path = state.join("dropped-ledger.csv");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let second = deliver_and_reconcile(&cfg, &state, &sim).await;
    assert!(second.state_torn_bytes.get() > 0, "{}", second.summary());
}

/// SIGKILL of the agent process while the disk is full, at different
/// moments of a turn: every restart recovers every file, and the last one
/// (space and Kafka back) delivers exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_the_disk_is_full_loses_and_doubles_nothing() {
    let work = tempfile::tempdir().unwrap();
    let id = format!("diskkill_{}", std::process::id());
    let (config, cfg) = config_file(
        work.path(),
        &id,
        "spool_segment_bytes = 65536\ndisk_reserve_bytes = 131072\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000",
    );
    setup(&cfg).await;
    let fs = Tmpfs::mount("2m", None);
    let state = fs.path.join("state");
    let sim = sim_config(16, 2, "disk-agent", 1800);
    for round in 0..3u64 {
        let mut cmd = spawn_agent_cmd(&config, &state, &sim, 400.0, None);
        cmd.env("METER__KAFKA__BROKERS", "127.0.0.1:9");
        let mut child = Killed(cmd.spawn().unwrap());
        // Until the disk is as full as the reserve lets the spool make it,
        // then a while more, different each round.
        let deadline = Instant::now() + Duration::from_secs(60);
        while meter_agent::spool::free_bytes(&fs.path).unwrap() > 131_072 + 65_536 {
            assert!(Instant::now() < deadline, "the disk never filled");
            assert!(child.0.try_wait().unwrap().is_none(), "the agent exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300 + 137 * round));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    deliver_and_reconcile(&cfg, &state, &sim).await;
}
