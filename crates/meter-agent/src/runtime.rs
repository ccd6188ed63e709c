//! `meter agent`: the spooled runtime.
//!
//! A source (the /proc sampler or the simulator) emits one tick per second;
//! each tick's events get their seq per (agent, customer), are appended to
//! the spool (a write-ahead log on disk) and only then handed to an
//! idempotent producer. Guarantee: every event that was appended reaches
//! `usage.events` at least once, whatever happens to Kafka (down, slow) or
//! to the agent (SIGTERM, SIGKILL): the acknowledged position is
//! checkpointed, and everything after it is sent again on the next start or
//! after a failed delivery, in order, while new ticks keep being appended.
//! Copies carry the same (agent, customer, seq), which the processor
//! deduplicates, and a seq is never used for two different events. What the
//! spool cannot keep (full, or the disk failed) is counted and logged, and
//! recorded in the dropped ledger ([`crate::dropped`]), never silently lost.
//!
//! [`Runtime`] is the loop, one method per step of a turn: take the ticks
//! that are due ([`Runtime::collect_ticks`]), seq and spool them
//! ([`Runtime::spool_ticks`]), hand spooled events to the producer
//! ([`Runtime::hand_over`]), settle delivery reports ([`Runtime::settle`]),
//! checkpoint ([`Runtime::checkpoint`]), and sleep until the next thing is
//! due.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use meter_avro::Codec;
use meter_config::{AgentConfig, Config, FsyncPolicy, Valid};
use meter_kafka::publish::{idempotent_config, Tuning};
use meter_kafka::Signal;
use meter_model::ledger::Ledger;
use meter_model::{event_id, now_ms, signing, Millis};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::dropped::DroppedLedger;
use crate::metrics::{
    AgentMetrics, CountersWentDown, DeliveryFailed, DiskBelowReserve, EventsAcknowledged, GapCompressed, IdentityReady, SpoolMeasured,
    SpoolRecovered, StateWriteFailed, TicksCaughtUp, TicksDropped, TicksEmitted, TicksSpooled, TornTailCut,
};
use crate::procfs::{self, Sampler, Tick};
use crate::sim::Simulator;
use crate::spool::{Appended, Batch, Fsync, Spool, SpoolSettings};

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
    /// Whether the last checkpoint and the dropped ledger were written (if
    /// not, the disk refused: the next start sends again what the previous
    /// checkpoint does not cover, and nothing is lost).
    pub checkpointed: bool,
    pub elapsed: Duration,
}

/// Delivery reports of the agent's producer: (opaque, error), appended by
/// librdkafka's callback during [`BaseProducer::poll`].
#[derive(Clone, Default)]
struct Deliveries(Arc<Mutex<Vec<Report>>>);

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

struct AgentContext(Deliveries);

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
fn agent_producer(cfg: &Config, deliveries: &Deliveries) -> anyhow::Result<BaseProducer<AgentContext>> {
    idempotent_config(&cfg.kafka, Tuning::agent(cfg.agent.max_in_flight, cfg.agent.delivery_timeout_ms))
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
        reserve_bytes: a.disk_reserve_bytes,
        fsync: match a.fsync {
            FsyncPolicy::Always => Fsync::Always,
            FsyncPolicy::Interval => Fsync::Interval(Duration::from_millis(a.fsync_interval_ms)),
            FsyncPolicy::Never => Fsync::Never,
        },
    }
}

/// Runs the agent until the source ends (simulator) and everything is
/// acknowledged, or until `shutdown` is raised; then flushes (waits up to
/// `agent.shutdown_timeout_ms` for outstanding deliveries), syncs the spool
/// and checkpoints. `identity` names the stream the state folder belongs
/// to (agent id and source); a folder of another identity is refused.
pub async fn run_agent(
    cfg: &Valid<Config>,
    state_dir: &Path,
    identity: &str,
    source: Source,
    metrics: AgentMetrics,
    shutdown: Signal,
    keep_ledger: bool,
) -> anyhow::Result<AgentRun> {
    Runtime::open(cfg, state_dir, identity, source, metrics, keep_ledger)?.run(&shutdown).await
}

/// The agent's loop and everything it carries from one turn to the next.
pub struct Runtime<'a> {
    cfg: &'a Config,
    started: Instant,
    source: Source,
    /// Wall-clock start of the paced simulation and seconds emitted since.
    sim_t0: Instant,
    sim_k: u64,
    /// Boot id and boot time of the host (the sampler's baseline key).
    boot: (String, Millis),
    spool: Spool,
    seqs: HashMap<String, i64>,
    last_tick: Option<Millis>,
    codec: Codec,
    deliveries: Deliveries,
    producer: BaseProducer<AgentContext>,
    inflight: InFlight,
    reports: Vec<Report>,
    /// Ticks taken this turn, not spooled yet.
    ticks: Vec<Tick>,
    batch: Batch,
    payload: Vec<u8>,
    own_ledger: Option<Ledger>,
    keep_ledger: bool,
    dropped: DroppedLedger,
    dropped_logged: Instant,
    source_done: bool,
    shutting_down: Option<Instant>,
    resend_after: Option<Instant>,
    next_checkpoint: Instant,
    next_host_sample: Instant,
    metrics: AgentMetrics,
    /// Stamped on every event spooled from now on.
    incarnation: crate::identity::Incarnation,
    signing_key: Option<meter_model::signing::Key>,
    lease: Option<crate::lease::Lease>,
}

impl<'a> Runtime<'a> {
    /// Opens the spool in `state_dir` (recovering what the last run left),
    /// resumes the source after the last spooled tick and connects the
    /// producer.
    pub fn open(
        cfg: &'a Valid<Config>,
        state_dir: &Path,
        identity: &str,
        mut source: Source,
        metrics: AgentMetrics,
        keep_ledger: bool,
    ) -> anyhow::Result<Self> {
        let a = &cfg.agent;
        let started = Instant::now();
        let (spool, rec) = Spool::open(spool_settings(a, state_dir), identity)?;
        SpoolRecovered {
            truncated_bytes: rec.truncated_bytes,
            unacked: rec.unacked,
            checkpoint_fallback: rec.checkpoint_fallback.as_deref(),
        }
        .emit(&metrics);
        if let Ok(free) = spool.free_bytes() {
            DiskBelowReserve { free, reserve: a.disk_reserve_bytes }.emit(&metrics);
        }
        let (dropped, loaded) = DroppedLedger::load(state_dir.join("dropped-ledger.csv"))?;
        TornTailCut { file: "dropped_ledger", bytes: loaded.torn_bytes }.emit(&metrics);
        // The last tick kept (in the log or the checkpoint) or dropped (in
        // the dropped ledger, with its record).
        let last_tick = rec.last_tick.max(dropped.last_tick());
        // The simulator resumes after the last tick kept (or dropped) before
        // a restart; the skipped seconds still count in its ledger.
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
        let agent_id = match &source {
            Source::Host { .. } => a.agent_id.clone(),
            Source::Simulated { sim, .. } => sim.agent_id().to_owned(),
        };
        let machine = crate::identity::machine_identity(&a.host_identity);
        let (incarnation, origin) = crate::identity::load_or_create(state_dir, &agent_id, &machine, meter_model::now_ms())?;
        let signing_key = crate::identity::signing_key(a.signing_key_file.as_deref())?;
        IdentityReady { incarnation: &incarnation, origin: &origin, signing_key: signing_key.as_ref().map(|k| k.id.as_str()) }
            .emit(&metrics);
        let lease = crate::lease::Lease::start(cfg, &incarnation, &meter_config::default_instance_id(), metrics.lease_renewals.clone())?;
        // With `serialization.events = "confluent"` the schema is
        // registered now: the spool keeps records framed as they are sent.
        let (codec, _) = meter_kafka::registry::codec_for(cfg, &[meter_kafka::registry::Writes::Events])?;
        let deliveries = Deliveries::default();
        let producer = agent_producer(cfg, &deliveries)?;
        metrics.spool_limit_bytes.set(i64::try_from(a.spool_max_bytes).unwrap_or(i64::MAX));
        let now = Instant::now();
        Ok(Runtime {
            cfg,
            started,
            source,
            sim_t0: now,
            sim_k: 0,
            boot,
            spool,
            seqs: rec.seqs,
            last_tick,
            codec,
            deliveries,
            producer,
            inflight: InFlight::default(),
            reports: Vec::new(),
            ticks: Vec::new(),
            batch: Batch::default(),
            payload: Vec::with_capacity(256),
            own_ledger: keep_ledger.then(Ledger::default),
            keep_ledger,
            dropped,
            dropped_logged: now - Duration::from_secs(3600),
            source_done: false,
            shutting_down: None,
            resend_after: None,
            next_checkpoint: now + Duration::from_millis(a.checkpoint_interval_ms),
            next_host_sample: now,
            metrics,
            incarnation,
            signing_key,
            lease: Some(lease),
        })
    }

    /// Turns until the source is done and everything is acknowledged, or
    /// until `shutdown` and what is outstanding is acknowledged (or the
    /// shutdown timeout passed); then flushes and checkpoints.
    pub async fn run(mut self, shutdown: &Signal) -> anyhow::Result<AgentRun> {
        let shutdown_timeout = Duration::from_millis(self.cfg.agent.shutdown_timeout_ms);
        loop {
            let now = Instant::now();
            if self.shutting_down.is_none() && shutdown.is_raised() {
                info!("shutting down: flushing the spool");
                self.shutting_down = Some(now);
            }
            let mut wake = now + Duration::from_millis(100);
            if self.shutting_down.is_none() && !self.source_done {
                wake = wake.min(self.collect_ticks(now));
            }
            if let Some(lost) = self.lease.as_ref().and_then(|l| l.failed()) {
                // Spooled events stay for the next start; the checkpoint
                // keeps what was acknowledged.
                let _ = self.spool.checkpoint(&self.seqs, self.last_tick);
                return Err(lost.into());
            }
            if let Some(why) = self.lease.as_ref().and_then(|l| l.refused()) {
                let _ = self.spool.checkpoint(&self.seqs, self.last_tick);
                return Err(anyhow::anyhow!("{why}; what is spooled stays in the spool"));
            }
            self.spool_ticks();
            self.hand_over()?;
            self.settle()?;
            self.checkpoint();
            let all_acked = self.spool.backlog() == 0 && self.inflight.len() == 0;
            if let Some(since) = self.shutting_down {
                if all_acked || since.elapsed() >= shutdown_timeout {
                    break;
                }
            } else if self.source_done && all_acked {
                break;
            }
            // Until the next tick, the next look at delivery reports (20 ms
            // while deliveries are outstanding) or a 100 ms heartbeat.
            if self.inflight.len() > 0 || self.spool.unsent() > 0 {
                wake = wake.min(Instant::now() + Duration::from_millis(20));
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake.max(Instant::now()))).await;
        }
        self.finish()
    }

    /// Step 1: the ticks that are due. Returns when the next one is.
    fn collect_ticks(&mut self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_millis(100);
        match &mut self.source {
            Source::Simulated { sim, speed } => {
                let mut emitted = 0u64;
                // Catch up with every due second, each at its own time; as
                // fast as possible: a bounded chunk per turn so that
                // deliveries interleave.
                while let Some(t) = sim.next_time() {
                    let due = if *speed > 0.0 { self.sim_t0 + Duration::from_secs_f64(self.sim_k as f64 / *speed) } else { now };
                    if due > now || (*speed <= 0.0 && emitted >= 10) {
                        wake = wake.min(due.max(now));
                        break;
                    }
                    let mut events = Vec::new();
                    sim.next_second(&mut events);
                    self.ticks.push(Tick { time: t, events });
                    self.sim_k += 1;
                    emitted += 1;
                }
                if *speed > 0.0 && emitted > 1 {
                    TicksCaughtUp { ticks: emitted - 1, sampler: false }.emit(&self.metrics);
                }
                if sim.next_time().is_none() {
                    self.source_done = true;
                }
            }
            Source::Host { sampler, proc_root, interfaces, disks } => {
                if now >= self.next_host_sample {
                    match procfs::read_sample(proc_root, interfaces, disks) {
                        Ok(sample) => {
                            let before = sampler.anomalies;
                            let compressed = sampler.compressed_seconds;
                            let n = sampler.observe(sample, now_ms(), &mut self.ticks);
                            if sampler.compressed_seconds > compressed {
                                let seconds = sampler.compressed_seconds - compressed;
                                GapCompressed { seconds, max_catch_up_s: self.cfg.agent.max_catch_up_s }.emit(&self.metrics);
                            }
                            if n > 1 {
                                TicksCaughtUp { ticks: n - 1, sampler: true }.emit(&self.metrics);
                            }
                            let after = sampler.anomalies;
                            CountersWentDown { resets: after.resets - before.resets, wraps: after.wraps - before.wraps }
                                .emit(&self.metrics);
                        }
                        // The next good sample covers the gap: the baseline
                        // is kept, nothing is lost.
                        Err(e) => warn!(error = %e, "cannot sample /proc; retrying next second"),
                    }
                    // Just after the next wall-clock second boundary.
                    let ms = now_ms().rem_euclid(1000);
                    self.next_host_sample = Instant::now() + Duration::from_millis((1000 - ms) as u64 + 5);
                }
                wake = wake.min(self.next_host_sample);
            }
        }
        wake
    }

    /// Step 2: seq, encode, append to the spool (before anything is sent):
    /// the ticks of this turn as one batch, with the source's state after
    /// them, so that a crash keeps or loses them together.
    fn spool_ticks(&mut self) {
        if self.ticks.is_empty() {
            return;
        }
        // The simulator catches up many ticks in one turn: appended as one
        // batch they could exceed a small spool even when it is empty, and
        // every tick of the turn would be dropped. So its turns go in
        // batches of at most ~512 bytes per event of the smaller bound.
        // (The host sampler's turn stays one batch: the sampler state
        // stored with it is that of the turn's last tick.)
        let a = &self.cfg.agent;
        let limit = usize::try_from(a.spool_max_bytes.min(a.spool_segment_bytes) / 512).unwrap_or(usize::MAX).max(1);
        let total: usize = self.ticks.iter().map(|t| t.events.len()).sum();
        if !matches!(self.source, Source::Simulated { .. }) || total <= limit {
            return self.spool_turn();
        }
        let all = std::mem::take(&mut self.ticks);
        let mut n = 0;
        for tick in all {
            if !self.ticks.is_empty() && n + tick.events.len() > limit {
                self.spool_turn();
                n = 0;
            }
            n += tick.events.len();
            self.ticks.push(tick);
        }
        self.spool_turn();
    }

    /// [`Runtime::spool_ticks`] of the ticks in `self.ticks`, one batch.
    fn spool_turn(&mut self) {
        if self.ticks.is_empty() {
            return;
        }
        let n: u64 = self.ticks.iter().map(|t| t.events.len() as u64).sum();
        let turn_last = self.ticks.iter().map(|t| t.time).max().unwrap_or_default();
        TicksEmitted { ticks: self.ticks.len() as u64, events: n }.emit(&self.metrics);
        let meta = match &self.source {
            Source::Host { sampler, .. } => {
                sampler.state(&self.boot.0).map(|st| serde_json::to_vec(&st).unwrap_or_default()).unwrap_or_default()
            }
            Source::Simulated { .. } => Vec::new(),
        };
        self.batch.start(turn_last, &meta);
        for tick in &mut self.ticks {
            for e in &mut tick.events {
                let seq = self.seqs.entry(e.customer_id.clone()).or_insert(0);
                *seq += 1;
                e.seq = Some(*seq);
                e.incarnation.clone_from(&self.incarnation.incarnation);
                e.event_id = event_id(&e.agent_id, &e.incarnation, &e.customer_id, *seq);
                self.payload.clear();
                self.codec.encode_event(e, &mut self.payload);
                self.batch.push(*seq, e.customer_id.as_bytes(), &self.payload);
            }
        }
        // Drops become final before a later tick is kept: written first,
        // or this tick is not kept either (see `crate::dropped`).
        let appended = match self.spool.room_for(&self.batch) {
            Ok(Appended::Kept) => match self.dropped.flush() {
                Ok(()) => match self.spool.append(&mut self.batch) {
                    Ok(a) => a,
                    Err(e) => {
                        StateWriteFailed { file: "spool", error: &e.to_string() }.emit(&self.metrics);
                        Appended::Full
                    }
                },
                Err(e) => {
                    StateWriteFailed { file: "dropped_ledger", error: &e.to_string() }.emit(&self.metrics);
                    Appended::DiskLow { free: 0 }
                }
            },
            Ok(other) => other,
            Err(e) => {
                StateWriteFailed { file: "spool", error: &e.to_string() }.emit(&self.metrics);
                Appended::Full
            }
        };
        if let Appended::DiskLow { free } = appended {
            self.metrics.disk_free_bytes.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let kept = appended == Appended::Kept;
        if kept {
            // A restart resumes after the last tick kept, or the last one
            // the dropped ledger holds (each file knows its own: a torn
            // record cannot leave a resume point past what it lost).
            self.last_tick = Some(self.last_tick.map_or(turn_last, |t| t.max(turn_last)));
        }
        let events = self.ticks.drain(..).flat_map(|t| t.events);
        if kept {
            TicksSpooled { events: n }.emit(&self.metrics);
            if let Some(l) = self.own_ledger.as_mut() {
                for e in events {
                    l.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
                }
            }
        } else {
            // Give the seqs back: nothing with them was kept or sent.
            let mut dropped_now = Ledger::default();
            for e in events {
                if let Some(s) = self.seqs.get_mut(&e.customer_id) {
                    *s -= 1;
                }
                dropped_now.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
            }
            // Written before any later tick is kept.
            self.dropped.record(&dropped_now, turn_last);
            let log = self.dropped_logged.elapsed() >= Duration::from_secs(10);
            if log {
                self.dropped_logged = Instant::now();
            }
            let why = match appended {
                Appended::DiskLow { .. } => "the disk is full (less free than agent.disk_reserve_bytes)",
                _ => "the spool is full (agent.spool_max_bytes) or failing",
            };
            TicksDropped { events: n, tick: turn_last, spool_bytes: self.spool.bytes(), why, log }.emit(&self.metrics);
        }
    }

    /// Step 3: hand spooled events to the producer, up to
    /// `agent.max_in_flight` (none during the backoff after a failure).
    fn hand_over(&mut self) -> anyhow::Result<()> {
        if self.resend_after.is_some_and(|t| Instant::now() >= t) {
            self.resend_after = None;
        }
        if self.resend_after.is_some() {
            return Ok(());
        }
        // Nothing goes out before the twin check (see crate::lease).
        if self.lease.as_ref().is_some_and(|l| !l.checked()) {
            return Ok(());
        }
        let topic = self.cfg.topics.events.as_str();
        while self.inflight.len() < self.cfg.agent.max_in_flight {
            let Some(r) = self.spool.peek()? else { break };
            let mut record =
                BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, self.inflight.opaque(r.index)).key(r.key).payload(r.payload);
            if let Some(k) = &self.signing_key {
                let sig = k.sign(r.payload);
                record = record.headers(OwnedHeaders::new().insert(Header { key: signing::HEADER, value: Some(sig.as_bytes()) }));
                self.metrics.signed.inc();
            }
            let index = r.index;
            match self.producer.send(record) {
                Ok(()) => {
                    self.inflight.push(index);
                    self.spool.advance();
                }
                // The rest waits in the spool for the next turn.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => break,
                Err((e, _)) if self.producer.client().fatal_error().is_some() => {
                    self.inflight.failed = Some(format!("fatal producer error: {e}"));
                    break;
                }
                // The broker refuses this principal the topic: like a failed
                // delivery (counted, logged, sent again from the spool), so
                // that the agent keeps metering into its spool and delivers
                // once the ACL is granted.
                Err((
                    e @ KafkaError::MessageProduction(
                        RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
                    ),
                    _,
                )) => {
                    self.inflight.failed = Some(e.to_string());
                    break;
                }
                Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
            }
        }
        Ok(())
    }

    /// Step 4: delivery reports: acknowledge the settled prefix; on a
    /// failure send everything unacknowledged again, in order, after a
    /// backoff.
    fn settle(&mut self) -> anyhow::Result<()> {
        loop {
            let before = self.deliveries.len();
            self.producer.poll(Duration::ZERO);
            if self.deliveries.len() == before {
                break;
            }
        }
        self.deliveries.take(&mut self.reports);
        for (opaque, err) in self.reports.drain(..) {
            self.inflight.report(opaque, err);
        }
        if let Some((last, n)) = self.inflight.settle() {
            self.spool.ack(last);
            EventsAcknowledged { events: n }.emit(&self.metrics);
        }
        if let Some(reason) = self.inflight.failed.take() {
            self.inflight.reset();
            let again = self.spool.rewind_to_acked()?;
            DeliveryFailed { error: &reason, resend: again, backlog: self.spool.backlog() }.emit(&self.metrics);
            self.resend_after = Some(Instant::now() + Duration::from_secs(1));
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                // The idempotent producer gave up: a new one gets a new
                // producer id; the spool resends.
                warn!(?code, %reason, "Kafka producer failed fatally; starting a new one");
                self.producer = agent_producer(self.cfg, &self.deliveries)?;
            }
        }
        Ok(())
    }

    /// Step 5: checkpoint and sync when due. A failing disk must not stop
    /// the metering: the log keeps what was appended, and the next
    /// checkpoint tries again.
    fn checkpoint(&mut self) {
        if Instant::now() >= self.next_checkpoint {
            if let Err(e) = self.spool.checkpoint(&self.seqs, self.last_tick) {
                StateWriteFailed { file: "checkpoint", error: &e.to_string() }.emit(&self.metrics);
            }
            self.measure_disk();
            self.next_checkpoint = Instant::now() + Duration::from_millis(self.cfg.agent.checkpoint_interval_ms);
        }
        if let Err(e) = self.spool.sync(false) {
            StateWriteFailed { file: "spool", error: &e.to_string() }.emit(&self.metrics);
        }
        SpoolMeasured { bytes: self.spool.bytes(), backlog: self.spool.backlog() }.emit(&self.metrics);
    }

    fn measure_disk(&self) {
        if let Ok(free) = self.spool.free_bytes() {
            self.metrics.disk_free_bytes.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
    }

    /// Flush: outstanding deliveries get what is left of the shutdown time;
    /// then the spool is synced and checkpointed. A disk that refuses loses
    /// nothing (the log holds everything after the last checkpoint, sent
    /// again by the next start), so it is reported, not fatal.
    fn finish(mut self) -> anyhow::Result<AgentRun> {
        let _ = self.producer.flush(Duration::from_millis(200));
        if let Some(lease) = self.lease.take() {
            lease.stop();
        }
        let mut checkpointed = true;
        if let Err(e) = self.spool.sync(true) {
            StateWriteFailed { file: "spool", error: &e.to_string() }.emit(&self.metrics);
        }
        // The drops of the last turns are final now.
        if let Err(e) = self.dropped.flush() {
            StateWriteFailed { file: "dropped_ledger", error: &e.to_string() }.emit(&self.metrics);
            checkpointed = false;
        }
        if let Err(e) = self.spool.checkpoint(&self.seqs, self.last_tick) {
            StateWriteFailed { file: "checkpoint", error: &e.to_string() }.emit(&self.metrics);
            checkpointed = false;
        }
        SpoolMeasured { bytes: self.spool.bytes(), backlog: self.spool.backlog() }.emit(&self.metrics);
        let drained = self.spool.backlog() == 0;
        let ledger = match self.source {
            Source::Simulated { sim, .. } if self.keep_ledger => {
                let mut l = sim.ledger().clone();
                self.dropped.subtract_from(&mut l);
                Some(l)
            }
            _ => self.own_ledger,
        };
        info!(summary = %self.metrics.summary(), drained, checkpointed, "agent stopped");
        Ok(AgentRun { ledger, drained, checkpointed, elapsed: self.started.elapsed() })
    }
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
