//! The agent's Kafka edge.
//!
//! [`run_agent`] is `meter agent`: a source (the /proc sampler or the
//! simulator) emits one tick per second; each tick's events get their seq
//! per (agent, customer), are appended to the spool (a write-ahead log on
//! disk) and only then handed to an idempotent producer. Guarantee: every
//! event that was appended reaches `usage.events` at least once, whatever
//! happens to Kafka (down, slow) or to the agent (SIGTERM, SIGKILL): the
//! acknowledged position is checkpointed, and everything after it is sent
//! again on the next start or after a failed delivery, in order, while new
//! ticks keep being appended. Copies carry the same (agent, customer, seq),
//! which the processor deduplicates, and a seq is never used for two
//! different events. What the spool cannot keep (full, or the disk failed)
//! is counted and logged, never silently lost.
//!
//! [`run_simulated`] is the in-memory path of the demo and the tests: when it
//! returns Ok, every event it generated was acknowledged by all in-sync
//! replicas exactly once (the idempotent producer removes retry duplicates),
//! and the returned ledger is their ground truth. On Err, some events may
//! not have been delivered.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use meter_agent::procfs::{self, Sampler, Tick};
use meter_agent::spool::{Batch, Fsync, Spool, SpoolSettings};
use meter_agent::stats::AgentStats as Counters;
use meter_agent::{SimConfig, Simulator};
use meter_avro::Codec;
use meter_config::{AgentConfig, Config, FsyncPolicy};
use meter_model::ledger::Ledger;
use meter_model::{event_id, Millis};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryFuture, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{error, info, warn};

use crate::{client_config, now_ms, Signal};

/// Outstanding deliveries before the agent waits for acknowledgements.
const MAX_IN_FLIGHT: usize = 100_000;

#[derive(Debug, Clone, Default)]
pub struct AgentStats {
    pub events: u64,
    pub simulated_seconds: u64,
    pub elapsed: Duration,
}

pub fn producer(cfg: &Config) -> anyhow::Result<FutureProducer> {
    client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .context("creating Kafka producer")
}

/// Publishes records to one topic with up to [`MAX_IN_FLIGHT`] deliveries
/// outstanding, waiting for acknowledgements when the producer's queue is
/// full. A failed delivery is an error: nothing is dropped silently.
pub struct Publisher<'a> {
    producer: &'a FutureProducer,
    topic: &'a str,
    pending: VecDeque<DeliveryFuture>,
    /// Records handed to the producer so far.
    pub sent: u64,
    /// Records the broker acknowledged so far.
    pub acknowledged: u64,
}

impl<'a> Publisher<'a> {
    pub fn new(producer: &'a FutureProducer, topic: &'a str) -> Self {
        Publisher { producer, topic, pending: VecDeque::new(), sent: 0, acknowledged: 0 }
    }

    pub async fn send(&mut self, key: Option<&[u8]>, payload: &[u8]) -> anyhow::Result<()> {
        let mut record = FutureRecord::<[u8], [u8]>::to(self.topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    let keep = self.pending.len() / 2;
                    self.settle(keep).await?;
                    if self.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err((e, _)) => return Err(anyhow!("producing to {}: {e}", self.topic)),
            }
        }
        self.sent += 1;
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.settle(MAX_IN_FLIGHT / 2).await?;
        }
        Ok(())
    }

    /// Counts the deliveries already settled at the front of the queue,
    /// without waiting for the others.
    pub fn reap(&mut self) -> anyhow::Result<()> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while let Some(front) = self.pending.front_mut() {
            match std::pin::Pin::new(front).poll(&mut cx) {
                std::task::Poll::Pending => break,
                std::task::Poll::Ready(result) => {
                    self.pending.pop_front();
                    self.settled(result)?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every record sent so far is acknowledged.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.settle(0).await?;
        self.producer.flush(Duration::from_secs(30)).context("flushing producer")
    }

    async fn settle(&mut self, keep: usize) -> anyhow::Result<()> {
        while self.pending.len() > keep {
            let Some(f) = self.pending.pop_front() else { break };
            self.settled(f.await)?;
        }
        Ok(())
    }

    /// Counts one delivery report; a failed delivery is an error.
    fn settled(&mut self, report: <DeliveryFuture as Future>::Output) -> anyhow::Result<()> {
        match report {
            Ok(Ok(_)) => {
                self.acknowledged += 1;
                Ok(())
            }
            Ok(Err((e, _))) => Err(anyhow!("delivery to {} failed: {e}", self.topic)),
            Err(_) => Err(anyhow!("producer dropped an in-flight record")),
        }
    }
}

/// Runs the simulator to the end of its duration, pacing simulated seconds
/// at `speed` times real time (0 = as fast as possible), and writes the
/// ledger to `ledger_path` once everything is acknowledged.
pub async fn run_simulated(
    cfg: &Config,
    sim_cfg: SimConfig,
    speed: f64,
    ledger_path: Option<&Path>,
) -> anyhow::Result<(AgentStats, Ledger)> {
    run_simulated_observed(cfg, sim_cfg, speed, ledger_path, &Counters::default()).await
}

/// [`run_simulated`], keeping `counters.ticks` (simulated seconds) and
/// `counters.produced` (acknowledged events) current after every simulated
/// second, for the agent's metrics and liveness.
pub async fn run_simulated_observed(
    cfg: &Config,
    sim_cfg: SimConfig,
    speed: f64,
    ledger_path: Option<&Path>,
    counters: &Counters,
) -> anyhow::Result<(AgentStats, Ledger)> {
    let producer = producer(cfg)?;
    let codec = Codec::new()?;
    let mut sim = Simulator::new(sim_cfg);
    let mut out = Publisher::new(&producer, &cfg.topics.events);
    let started = Instant::now();
    let mut stats = AgentStats::default();
    let mut events = Vec::new();
    let mut payload = Vec::with_capacity(256);
    while sim.next_second(&mut events) {
        stats.simulated_seconds += 1;
        if speed > 0.0 {
            let due = started + Duration::from_secs_f64(stats.simulated_seconds as f64 / speed);
            tokio::time::sleep_until(due.into()).await;
        }
        for e in events.drain(..) {
            payload.clear();
            codec.encode_event(&e, &mut payload);
            out.send(Some(e.customer_id.as_bytes()), &payload).await?;
        }
        out.reap()?;
        Counters::set(&counters.produced, out.acknowledged);
        Counters::set(&counters.ticks, stats.simulated_seconds);
    }
    out.finish().await?;
    Counters::set(&counters.produced, out.acknowledged);
    stats.events = out.sent;
    stats.elapsed = started.elapsed();
    let ledger = sim.ledger().clone();
    if let Some(path) = ledger_path {
        std::fs::write(path, ledger.to_csv()).with_context(|| format!("writing ledger {}", path.display()))?;
    }
    info!(events = stats.events, seconds = stats.simulated_seconds, elapsed_ms = stats.elapsed.as_millis() as u64, "agent finished");
    Ok((stats, ledger))
}

/// Where `meter agent`'s ticks come from.
// One per process: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// The host, sampled from /proc once per wall-clock second.
    Host { sampler: Sampler, proc_root: PathBuf, interfaces: Vec<String>, disks: Vec<String> },
    /// The simulated fleet, `speed` simulated seconds per wall-clock second
    /// (0: as fast as possible). Resumes after the last tick in the spool.
    Simulated { sim: Box<Simulator>, speed: f64 },
}

impl Source {
    /// The host sampler configured by `[agent]`.
    pub fn host(a: &AgentConfig) -> Source {
        let host = procfs::HostIdentity {
            agent_id: a.agent_id.clone(),
            customer_id: a.customer_id.clone(),
            region: a.region.clone(),
            resource_id: a.host_resource_id().to_owned(),
        };
        let settings = procfs::SamplerSettings {
            clock_ticks_per_second: a.clock_ticks_per_second,
            counter_bits: a.counter_bits,
            max_catch_up_s: a.max_catch_up_s,
        };
        Source::Host {
            sampler: Sampler::new(host, settings),
            proc_root: a.proc_root.clone(),
            interfaces: a.interfaces.clone(),
            disks: a.disks.clone(),
        }
    }
}

/// What a finished [`run_agent`] reports.
#[derive(Debug)]
pub struct AgentRun {
    /// Ground truth of the events kept (spooled): for the simulator, every
    /// second of its run, including those before a restart; for the host
    /// sampler, what this process emitted. None unless asked for.
    pub ledger: Option<Ledger>,
    /// Whether everything spooled was acknowledged before returning.
    pub drained: bool,
    pub elapsed: Duration,
}

/// Delivery reports of the agent's producer: (opaque, error), appended by
/// librdkafka's callback during [`BaseProducer::poll`].
#[derive(Clone, Default)]
pub struct Deliveries(Arc<Mutex<Vec<Report>>>);

/// A delivery report: the record's opaque and the error, if it failed.
type Report = (usize, Option<String>);

impl Deliveries {
    fn take(&self, into: &mut Vec<Report>) {
        if let Ok(mut v) = self.0.lock() {
            into.append(&mut v);
        }
    }

    fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }
}

pub struct AgentContext(Deliveries);

impl ClientContext for AgentContext {}

impl ProducerContext for AgentContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let err = result.as_ref().err().map(|(e, _)| e.to_string());
        if let Ok(mut v) = (self.0).0.lock() {
            v.push((opaque, err));
        }
    }
}

/// The producer of `meter agent`: idempotent, acks=all, lz4, and deliveries
/// time out after `agent.delivery_timeout_ms` so that a dead broker turns
/// into a resend from the spool rather than an unbounded in-memory queue.
/// A `BaseProducer` polled by the agent's own loop: no polling thread that
/// costs CPU while the host is idle.
pub fn agent_producer(cfg: &Config, deliveries: &Deliveries) -> anyhow::Result<BaseProducer<AgentContext>> {
    client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", (cfg.agent.max_in_flight * 2).max(1000).to_string())
        .set("message.timeout.ms", cfg.agent.delivery_timeout_ms.to_string())
        .create_with_context(AgentContext(deliveries.clone()))
        .context("creating Kafka producer")
}

const INDEX_BITS: u32 = 48;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// Events handed to the producer and not yet settled, in spool order. A
/// delivery's opaque carries its spool index and the epoch it was sent in,
/// so that reports of deliveries abandoned by a resend are ignored.
#[derive(Debug, Default)]
struct InFlight {
    epoch: u16,
    /// Spool index of `acked[0]`.
    base: u64,
    acked: VecDeque<bool>,
    failed: Option<String>,
}

impl InFlight {
    fn opaque(&self, index: u64) -> usize {
        ((u64::from(self.epoch) << INDEX_BITS) | (index & INDEX_MASK)) as usize
    }

    fn push(&mut self, index: u64) {
        if self.acked.is_empty() {
            self.base = index;
        }
        self.acked.push_back(false);
    }

    fn report(&mut self, opaque: usize, err: Option<String>) {
        let (epoch, index) = (((opaque as u64) >> INDEX_BITS) as u16, opaque as u64 & INDEX_MASK);
        let base = self.base & INDEX_MASK;
        if epoch != self.epoch || index < base {
            return;
        }
        let Some(slot) = self.acked.get_mut((index - base) as usize) else { return };
        match err {
            None => *slot = true,
            Some(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// Drops the acknowledged prefix; returns (last acknowledged index, count).
    fn settle(&mut self) -> Option<(u64, u64)> {
        let mut n = 0;
        while self.acked.front() == Some(&true) {
            self.acked.pop_front();
            self.base += 1;
            n += 1;
        }
        (n > 0).then(|| (self.base - 1, n))
    }

    /// Forgets everything in flight (a resend follows).
    fn reset(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.acked.clear();
        self.failed = None;
    }

    fn len(&self) -> usize {
        self.acked.len()
    }
}

fn spool_settings(a: &AgentConfig, state_dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: state_dir.join("spool"),
        max_bytes: a.spool_max_bytes,
        segment_bytes: a.spool_segment_bytes,
        fsync: match a.fsync {
            FsyncPolicy::Always => Fsync::Always,
            FsyncPolicy::Interval => Fsync::Interval(Duration::from_millis(a.fsync_interval_ms)),
            FsyncPolicy::Never => Fsync::Never,
        },
    }
}

/// Appends `ledger`'s minute entries to the CSV ledger at `path` (created
/// with its header); reading it back sums repeated keys.
fn append_ledger(path: &Path, ledger: &Ledger) -> std::io::Result<()> {
    use std::io::Write;
    let csv = ledger.to_csv();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let fresh = f.metadata()?.len() == 0;
    let body = if fresh { csv.as_str() } else { csv.split_once('\n').map_or("", |(_, rest)| rest) };
    f.write_all(body.as_bytes())
}

/// Subtracts `minus` from `ledger` (events the spool could not keep).
fn subtract(ledger: &mut Ledger, minus: &Ledger) {
    for (k, t) in &minus.entries {
        if let Some(e) = ledger.entries.get_mut(k) {
            e.event_count -= t.event_count;
            e.quantity_sum -= t.quantity_sum;
            if e.event_count == 0 && e.quantity_sum == 0 {
                ledger.entries.remove(k);
            }
        }
    }
}

/// Runs the agent until the source ends (simulator) and everything is
/// acknowledged, or until `shutdown` is raised; then flushes (waits up to
/// `agent.shutdown_timeout_ms` for outstanding deliveries), syncs the spool
/// and checkpoints. `identity` names the stream the state folder belongs
/// to (agent id and source); a folder of another identity is refused.
pub async fn run_agent(
    cfg: &Config,
    state_dir: &Path,
    identity: &str,
    mut source: Source,
    stats: Arc<Counters>,
    shutdown: Signal,
    keep_ledger: bool,
) -> anyhow::Result<AgentRun> {
    let a = &cfg.agent;
    let started = Instant::now();
    let (mut spool, rec) = Spool::open(spool_settings(a, state_dir), identity)?;
    if rec.truncated_bytes > 0 {
        warn!(bytes = rec.truncated_bytes, "cut off a torn tick at the end of the spool (it was never sent)");
    }
    if rec.unacked > 0 {
        info!(events = rec.unacked, "sending the unacknowledged tail of the spool again");
        Counters::add(&stats.replayed, rec.unacked);
    }
    let mut seqs: HashMap<String, i64> = rec.seqs;
    let mut last_tick: Option<Millis> = rec.last_tick;
    // The simulator resumes after the last tick kept (or dropped) before a
    // restart; the skipped seconds still count in its ledger.
    // Wall-clock start of the paced simulation and seconds emitted since.
    let mut sim_t0 = Instant::now();
    let mut sim_k = 0u64;
    if let Source::Simulated { sim, .. } = &mut source {
        let mut skipped = Vec::new();
        let mut n = 0u64;
        while let (Some(t), Some(last)) = (sim.next_time(), last_tick) {
            if t > last {
                break;
            }
            skipped.clear();
            sim.next_second(&mut skipped);
            n += 1;
        }
        if n > 0 {
            info!(seconds = n, "simulator resumes after the last spooled tick");
        }
        sim_t0 = Instant::now();
    }
    // The host sampler continues from the state stored with the last
    // spooled tick: the time the agent was down is caught up, not lost.
    let mut boot = (String::new(), 0);
    if let Source::Host { sampler, proc_root, .. } = &mut source {
        boot = procfs::read_boot(proc_root).context("reading the boot id and time")?;
        let state = rec.last_meta.as_deref().and_then(|m| match serde_json::from_slice::<procfs::SamplerState>(m) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot read the sampler state in the spool; starting from a new baseline");
                None
            }
        });
        if let Some(st) = &state {
            let same_boot = st.boot_id == boot.0;
            info!(since = st.boundary, same_boot, "sampler continues from the last spooled tick");
        }
        sampler.restore(state, &boot.0, boot.1);
    }
    let deliveries = Deliveries::default();
    let mut producer = agent_producer(cfg, &deliveries)?;
    let codec = Codec::new()?;
    let topic = cfg.topics.events.as_str();
    let mut inflight = InFlight::default();
    let mut reports = Vec::new();
    let mut ticks: Vec<Tick> = Vec::new();
    let mut batch = Batch::default();
    let mut payload = Vec::with_capacity(256);
    let mut own_ledger = keep_ledger.then(Ledger::default);
    // What the full spool could not keep, across restarts (the simulator's
    // ledger replays every second, so its drops must be remembered).
    let dropped_path = state_dir.join("dropped-ledger.csv");
    let mut dropped_ledger = match std::fs::read_to_string(&dropped_path) {
        Ok(text) => Ledger::from_csv(&text).with_context(|| format!("reading {}", dropped_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dropped_path.display())),
    };

    let mut source_done = false;
    let mut shutting_down: Option<Instant> = None;
    let mut resend_after: Option<Instant> = None;
    let mut next_checkpoint = Instant::now() + Duration::from_millis(a.checkpoint_interval_ms);
    let mut next_host_sample = Instant::now();
    let mut dropped_logged = Instant::now() - Duration::from_secs(3600);
    let shutdown_timeout = Duration::from_millis(a.shutdown_timeout_ms);

    loop {
        let now = Instant::now();
        if shutting_down.is_none() && shutdown.is_raised() {
            info!("shutting down: flushing the spool");
            shutting_down = Some(now);
        }
        // 1. Ticks that are due.
        let mut wake = now + Duration::from_millis(100);
        if shutting_down.is_none() && !source_done {
            match &mut source {
                Source::Simulated { sim, speed } => {
                    let mut emitted = 0u64;
                    // Catch up with every due second, each at its own time;
                    // as fast as possible: a bounded chunk per turn so that
                    // deliveries interleave.
                    while let Some(t) = sim.next_time() {
                        let due = if *speed > 0.0 { sim_t0 + Duration::from_secs_f64(sim_k as f64 / *speed) } else { now };
                        if due > now || (*speed <= 0.0 && emitted >= 10) {
                            wake = wake.min(due.max(now));
                            break;
                        }
                        let mut events = Vec::new();
                        sim.next_second(&mut events);
                        ticks.push(Tick { time: t, events });
                        sim_k += 1;
                        emitted += 1;
                    }
                    if *speed > 0.0 && emitted > 1 {
                        Counters::add(&stats.caught_up_ticks, emitted - 1);
                    }
                    if sim.next_time().is_none() {
                        source_done = true;
                    }
                }
                Source::Host { sampler, proc_root, interfaces, disks } => {
                    if now >= next_host_sample {
                        match procfs::read_sample(proc_root, interfaces, disks) {
                            Ok(sample) => {
                                let before = sampler.anomalies;
                                let compressed = sampler.compressed_seconds;
                                let n = sampler.observe(sample, now_ms(), &mut ticks);
                                if sampler.compressed_seconds > compressed {
                                    let c = sampler.compressed_seconds - compressed;
                                    Counters::add(&stats.compressed_seconds, c);
                                    warn!(
                                        seconds = c,
                                        max_catch_up_s = a.max_catch_up_s,
                                        "gap longer than agent.max_catch_up_s: its usage is spread over the last seconds"
                                    );
                                }
                                if n > 1 {
                                    Counters::add(&stats.caught_up_ticks, n - 1);
                                    warn!(seconds = n - 1, "sampler fell behind; caught up with one tick per missed second");
                                }
                                let after = sampler.anomalies;
                                Counters::add(&stats.counter_resets, after.resets - before.resets);
                                Counters::add(&stats.counter_wraps, after.wraps - before.wraps);
                                if after.resets > before.resets {
                                    warn!(resets = after.resets - before.resets, "a kernel counter went down; counted from 0");
                                }
                            }
                            // The next good sample covers the gap: the
                            // baseline is kept, nothing is lost.
                            Err(e) => warn!(error = %e, "cannot sample /proc; retrying next second"),
                        }
                        // Just after the next wall-clock second boundary.
                        let ms = now_ms().rem_euclid(1000);
                        next_host_sample = Instant::now() + Duration::from_millis((1000 - ms) as u64 + 5);
                    }
                    wake = wake.min(next_host_sample);
                }
            }
        }
        // 2. Seq, encode, append to the spool (before anything is sent): the
        // ticks of this turn as one batch, with the source's state after
        // them, so that a crash keeps or loses them together.
        if !ticks.is_empty() {
            let n: u64 = ticks.iter().map(|t| t.events.len() as u64).sum();
            let turn_last = ticks.iter().map(|t| t.time).max().unwrap_or_default();
            Counters::add(&stats.generated, n);
            Counters::add(&stats.ticks, ticks.len() as u64);
            let meta = match &source {
                Source::Host { sampler, .. } => {
                    sampler.state(&boot.0).map(|st| serde_json::to_vec(&st).unwrap_or_default()).unwrap_or_default()
                }
                Source::Simulated { .. } => Vec::new(),
            };
            batch.start(turn_last, &meta);
            for tick in &mut ticks {
                for e in &mut tick.events {
                    let seq = seqs.entry(e.customer_id.clone()).or_insert(0);
                    *seq += 1;
                    e.seq = Some(*seq);
                    e.event_id = event_id(&e.agent_id, &e.customer_id, *seq);
                    payload.clear();
                    codec.encode_event(e, &mut payload);
                    batch.push(*seq, e.customer_id.as_bytes(), &payload);
                }
            }
            last_tick = Some(last_tick.map_or(turn_last, |t| t.max(turn_last)));
            let kept = match spool.append(&mut batch) {
                Ok(k) => k,
                Err(e) => {
                    error!(error = %e, "cannot append to the spool");
                    false
                }
            };
            let events = ticks.drain(..).flat_map(|t| t.events);
            if kept {
                Counters::add(&stats.spooled, n);
                if let Some(l) = own_ledger.as_mut() {
                    for e in events {
                        l.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
                    }
                }
            } else {
                // Give the seqs back: nothing with them was kept or sent.
                let mut dropped_now = Ledger::default();
                for e in events {
                    if let Some(s) = seqs.get_mut(&e.customer_id) {
                        *s -= 1;
                    }
                    dropped_now.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
                }
                // Remembered before any later tick is kept (a restart
                // resumes after the last tick in the log).
                if let Err(e) = append_ledger(&dropped_path, &dropped_now) {
                    error!(error = %e, path = %dropped_path.display(), "cannot record dropped usage");
                }
                dropped_ledger.merge(&dropped_now);
                Counters::add(&stats.dropped, n);
                if dropped_logged.elapsed() >= Duration::from_secs(10) {
                    dropped_logged = Instant::now();
                    error!(
                        events = n,
                        tick = turn_last,
                        dropped_total = Counters::get(&stats.dropped),
                        spool_bytes = spool.bytes(),
                        "spool full or failing: dropped ticks (counted in meter_agent_events_dropped_total)"
                    );
                }
            }
        }
        // 3. Hand spooled events to the producer, up to max_in_flight.
        if resend_after.is_some_and(|t| Instant::now() >= t) {
            resend_after = None;
        }
        if resend_after.is_none() {
            while inflight.len() < a.max_in_flight {
                let Some(r) = spool.peek()? else { break };
                let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, inflight.opaque(r.index)).key(r.key).payload(r.payload);
                let index = r.index;
                match producer.send(record) {
                    Ok(()) => {
                        inflight.push(index);
                        spool.advance();
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => break,
                    Err((e, _)) if producer.client().fatal_error().is_some() => {
                        inflight.failed = Some(format!("fatal producer error: {e}"));
                        break;
                    }
                    Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
                }
            }
        }
        // Delivery reports: acknowledge the settled prefix; on a failure
        // send everything unacknowledged again, in order, after a backoff.
        loop {
            let before = deliveries.len();
            producer.poll(Duration::ZERO);
            if deliveries.len() == before {
                break;
            }
        }
        deliveries.take(&mut reports);
        for (opaque, err) in reports.drain(..) {
            inflight.report(opaque, err);
        }
        if let Some((last, n)) = inflight.settle() {
            spool.ack(last);
            Counters::add(&stats.produced, n);
        }
        if let Some(reason) = inflight.failed.take() {
            Counters::add(&stats.delivery_failures, 1);
            inflight.reset();
            let again = spool.rewind_to_acked()?;
            Counters::add(&stats.replayed, again);
            warn!(error = %reason, resend = again, backlog = spool.backlog(), "delivery failed; sending again from the spool in 1 s");
            resend_after = Some(Instant::now() + Duration::from_secs(1));
            if let Some((code, reason)) = producer.client().fatal_error() {
                // The idempotent producer gave up: a new one gets a new
                // producer id; the spool resends.
                warn!(?code, %reason, "Kafka producer failed fatally; starting a new one");
                producer = agent_producer(cfg, &deliveries)?;
            }
        }
        // 4. Checkpoint, sync, gauges.
        // A failing disk must not stop the metering: the log keeps what
        // was appended, and the next checkpoint tries again.
        if Instant::now() >= next_checkpoint {
            if let Err(e) = spool.checkpoint(&seqs, last_tick) {
                error!(error = %e, "cannot checkpoint the spool");
            }
            next_checkpoint = Instant::now() + Duration::from_millis(a.checkpoint_interval_ms);
        }
        if let Err(e) = spool.sync(false) {
            error!(error = %e, "cannot sync the spool");
        }
        Counters::set(&stats.spool_bytes, spool.bytes());
        Counters::set(&stats.backlog, spool.backlog());
        // 5. Done?
        let all_acked = spool.backlog() == 0 && inflight.len() == 0;
        if let Some(since) = shutting_down {
            if all_acked || since.elapsed() >= shutdown_timeout {
                break;
            }
        } else if source_done && all_acked {
            break;
        }
        // 6. Sleep until the next tick, the next look at delivery reports
        // (20 ms while deliveries are outstanding) or a 100 ms heartbeat.
        if inflight.len() > 0 || spool.unsent() > 0 {
            wake = wake.min(Instant::now() + Duration::from_millis(20));
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake.max(Instant::now()))).await;
    }
    // Flush: outstanding deliveries get what is left of the shutdown time.
    let _ = producer.flush(Duration::from_millis(200));
    spool.sync(true)?;
    spool.checkpoint(&seqs, last_tick)?;
    Counters::set(&stats.spool_bytes, spool.bytes());
    Counters::set(&stats.backlog, spool.backlog());
    let drained = spool.backlog() == 0;
    let ledger = match source {
        Source::Simulated { sim, .. } if keep_ledger => {
            let mut l = sim.ledger().clone();
            subtract(&mut l, &dropped_ledger);
            Some(l)
        }
        _ => own_ledger,
    };
    info!(summary = %stats.summary(), drained, "agent stopped");
    Ok(AgentRun { ledger, drained, elapsed: started.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_settles_in_order_and_ignores_reports_from_before_a_resend() {
        let mut f = InFlight::default();
        for i in 10..15 {
            f.push(i);
        }
        // Out of order (other partitions): only the contiguous prefix settles.
        f.report(f.opaque(12), None);
        f.report(f.opaque(10), None);
        assert_eq!(f.settle(), Some((10, 1)));
        f.report(f.opaque(11), None);
        assert_eq!(f.settle(), Some((12, 2)));
        let stale = f.opaque(13);
        f.report(f.opaque(13), Some("timed out".into()));
        assert_eq!(f.failed.as_deref(), Some("timed out"));
        f.reset();
        f.push(13);
        // A late report of the abandoned send changes nothing.
        f.report(stale, None);
        assert_eq!(f.settle(), None);
        f.report(f.opaque(13), None);
        assert_eq!(f.settle(), Some((13, 1)));
        assert_eq!(f.len(), 0);
    }
}
