//! The agent's lease: at most one live instance per (agent id,
//! incarnation).
//!
//! Two instances with one identity (a state dir copied together with a
//! machine id, an image cloned with both, two agents pointed at copies of
//! one folder) write one seq stream, and the processor would take the
//! events of one for duplicates of the other's. Kafka's transaction fencing
//! stops that: each agent holds a transactional producer whose
//! `transactional.id` is `meterline-agent/{agent id}/{incarnation}` and
//! renews its lease every `agent.lease_interval_ms` with a transaction that
//! writes a heartbeat to `topics.agents` (compacted, keyed by
//! `{agent id}/{incarnation}`). When a second instance initialises the same
//! transactional id, the broker fences the first: its next renewal fails
//! with a fenced error and it stops, saying why ([`LeaseLost`]).
//!
//! Fencing alone lets the newcomer win, and the newcomer's seqs trail the
//! running instance's: its events would be taken for duplicates. So before
//! it takes the lease, a starting agent reads the recent heartbeats of its
//! identity; one from another instance that is still renewing means a live
//! twin, and the newcomer stops instead ([`TwinRunning`]). The check runs
//! on the lease's thread: the agent ticks and spools meanwhile, and hands
//! nothing to Kafka until it is done ([`Lease::checked`]). A recent
//! heartbeat (less than two intervals old) of this machine's own previous
//! run (same boot id, its pid gone: killed) is no twin; any other is waited
//! out once, for an interval and a half: one that does not come again was a
//! run that died.
//!
//! The data path stays the idempotent producer: one transaction per lease
//! renewal costs nothing per event, and an agent keeps spooling while
//! Kafka is down (the lease is then retried, never fatal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_config::Config;
use meter_model::{now_ms, Millis};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::identity::Incarnation;

/// One heartbeat on `topics.agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_id: String,
    pub incarnation: String,
    /// Random per process: tells two instances of one identity apart.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): with the
    /// pid, whether the instance was this machine's and is gone.
    #[serde(default)]
    pub boot_id: String,
    /// `running`, or `stopped` (the last one of a clean shutdown).
    pub state: String,
    pub sent_ms: Millis,
}

/// The record key of an identity's heartbeats.
pub fn lease_key(agent_id: &str, incarnation: &str) -> String {
    format!("{agent_id}/{incarnation}")
}

/// The transactional id of an identity's lease producer.
pub fn transactional_id(agent_id: &str, incarnation: &str) -> String {
    format!("meterline-agent/{agent_id}/{incarnation}")
}

/// Another instance of this identity is alive: the agent does not start.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "agent id {agent_id:?} incarnation {incarnation} is already running on host {host:?} (pid {pid}, its lease renewed {age_ms} ms ago); \
     two agents share one identity (a cloned image or a copied state dir with the same machine id), and their events would be \
     taken for each other's duplicates. Give this host its own agent.agent_id, or its own agent.host_identity (a new incarnation), \
     or stop the other one (docs/operations.md, \"Agent identity\")"
)]
pub struct TwinRunning {
    pub agent_id: String,
    pub incarnation: String,
    pub host: String,
    pub pid: u32,
    pub age_ms: Millis,
}

/// Kafka fenced this agent's lease: another instance took the identity.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "agent id {agent_id:?} incarnation {incarnation}: another instance with the same identity started (Kafka fenced this \
     agent's lease producer: {cause}); stopping so that the two do not share one seq stream. What is spooled stays in the \
     spool. Give one of the hosts its own agent.agent_id or agent.host_identity (docs/operations.md, \"Agent identity\")"
)]
pub struct LeaseLost {
    pub agent_id: String,
    pub incarnation: String,
    pub cause: String,
}

/// Why the agent must stop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Twin(#[from] TwinRunning),
    #[error(transparent)]
    Lost(#[from] LeaseLost),
}

#[derive(Debug, Default)]
struct Shared {
    /// The twin check is done (passed, or could not read the topic).
    checked: bool,
    failed: Option<LeaseError>,
    /// Kafka refused this agent's settings (credentials, TLS, protocol).
    refused: Option<String>,
}

/// How long the lease thread waits, at start, for Kafka to either answer
/// or refuse this agent's settings; an unreachable Kafka is not an error
/// (the agent spools), a refusal stops the agent.
const ACCESS_CHECK: Duration = Duration::from_secs(5);

/// The running lease: a thread that renews it until [`Lease::stop`].
pub struct Lease {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    /// Starts the lease's thread: it checks for a live twin (waiting out a
    /// recent heartbeat of another instance once), then takes the lease
    /// and renews it. With Kafka unreachable the check passes after a few
    /// seconds, and the lease is taken when Kafka is back (fencing still
    /// stops a twin then).
    pub fn start(cfg: &Config, me: &Incarnation, host: &str, renewals: prometheus::IntCounter) -> anyhow::Result<Lease> {
        let interval = Duration::from_millis(cfg.agent.lease_interval_ms);
        let instance = crate::identity::random_id()?;
        let key = lease_key(&me.agent_id, &me.incarnation);
        let check_cfg = cfg.clone();
        let mut pc = meter_kafka::client_config(&cfg.kafka);
        pc.set("transactional.id", transactional_id(&me.agent_id, &me.incarnation))
            .set("transaction.timeout.ms", (interval.as_millis() * 4).max(10_000).to_string())
            .set("message.timeout.ms", (interval.as_millis() * 2).max(5_000).to_string());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let topic = cfg.topics.agents.clone();
        let beat = Heartbeat {
            agent_id: me.agent_id.clone(),
            incarnation: me.incarnation.clone(),
            instance,
            host: host.to_owned(),
            pid: std::process::id(),
            boot_id: boot_id(),
            state: "running".into(),
            sent_ms: 0,
        };
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("meter-agent-lease".into())
            .spawn(move || {
                if let Err(meter_kafka::AccessError::Refused(why)) = meter_kafka::check_access(&check_cfg.kafka, ACCESS_CHECK) {
                    if let Ok(mut s) = s.lock() {
                        s.checked = true;
                        s.refused = Some(format!("Kafka refused the connection: {why}"));
                    }
                    return;
                }
                let twin = check_no_twin(&check_cfg, &key, &beat, interval, &st);
                let failed = twin.is_err();
                if let Ok(mut s) = s.lock() {
                    s.checked = true;
                    s.failed = twin.err().map(LeaseError::from);
                }
                if !failed {
                    renew(pc, topic, key, beat, interval, s, st, renewals);
                }
            })
            .context("starting the lease thread")?;
        Ok(Lease { shared, stop, thread: Some(thread) })
    }

    /// Whether the twin check is done: until then the agent sends nothing.
    pub fn checked(&self) -> bool {
        self.shared.lock().map(|s| s.checked).unwrap_or(true)
    }

    /// Set when a twin runs or Kafka fenced the lease: the agent must stop.
    pub fn failed(&self) -> Option<LeaseError> {
        self.shared.lock().ok().and_then(|s| s.failed.clone())
    }

    /// Set when Kafka refused the agent's settings at start (a wrong
    /// password, an untrusted certificate, plain text to a TLS listener):
    /// the agent must stop, naming the cause.
    pub fn refused(&self) -> Option<String> {
        self.shared.lock().ok().and_then(|s| s.refused.clone())
    }

    /// Ends the lease with a `stopped` heartbeat (best effort), so that
    /// the next start of this identity does not wait for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The renewing thread.
#[allow(clippy::too_many_arguments)]
fn renew(
    pc: rdkafka::ClientConfig,
    topic: String,
    key: String,
    mut beat: Heartbeat,
    interval: Duration,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    renewals: prometheus::IntCounter,
) {
    let lose = |cause: String, beat: &Heartbeat| {
        let lost = LeaseLost { agent_id: beat.agent_id.clone(), incarnation: beat.incarnation.clone(), cause };
        warn!(error = %lost, "agent lease lost");
        if let Ok(mut s) = shared.lock() {
            s.failed = Some(lost.into());
        }
    };
    let mut producer: Option<BaseProducer> = None;
    let mut next = Instant::now();
    let mut warned = false;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if !stopping && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        next = Instant::now() + interval;
        if producer.is_none() {
            match pc.create::<BaseProducer>() {
                Ok(p) => match p.init_transactions(interval.max(Duration::from_secs(5))) {
                    Ok(()) => {
                        info!(transactional_id = ?pc.get("transactional.id"), "agent lease taken");
                        producer = Some(p);
                    }
                    Err(e) if is_fenced(&e) => return lose(e.to_string(), &beat),
                    Err(e) => {
                        if !warned {
                            warn!(error = %e, "cannot take the agent lease yet (Kafka unreachable?); retrying");
                            warned = true;
                        }
                    }
                },
                Err(e) => warn!(error = %e, "creating the agent lease producer"),
            }
        }
        if let Some(p) = &producer {
            beat.sent_ms = now_ms();
            if stopping {
                beat.state = "stopped".into();
            }
            match heartbeat(p, &topic, &key, &beat, interval) {
                Ok(()) => {
                    warned = false;
                    renewals.inc();
                }
                Err(e) if is_fenced(&e) => return lose(e.to_string(), &beat),
                Err(e) => {
                    let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
                    if !fatal {
                        let _ = p.abort_transaction(interval);
                    }
                    if !warned {
                        warn!(error = %e, "renewing the agent lease failed; retrying");
                        warned = true;
                    }
                    if fatal {
                        producer = None;
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

fn heartbeat(p: &BaseProducer, topic: &str, key: &str, beat: &Heartbeat, interval: Duration) -> Result<(), KafkaError> {
    p.begin_transaction()?;
    let value = serde_json::to_vec(beat).unwrap_or_default();
    p.send(BaseRecord::to(topic).key(key).payload(&value)).map_err(|(e, _)| e)?;
    p.commit_transaction(interval.max(Duration::from_secs(5)))
}

/// Whether `e` says that another producer with this transactional id took
/// over.
fn is_fenced(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::Transaction(t) => t.code(),
        other => match other.rdkafka_error_code() {
            Some(c) => c,
            None => return false,
        },
    };
    matches!(code, RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
}

/// This machine's boot id ("" when unknown).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Refuses to start while another instance of `key` renews its lease.
fn check_no_twin(cfg: &Config, key: &str, me: &Heartbeat, interval: Duration, stop: &AtomicBool) -> Result<(), TwinRunning> {
    let instance = me.instance.as_str();
    let fresh = interval * 2;
    let fresh_ms = i64::try_from(fresh.as_millis()).unwrap_or(i64::MAX);
    let wait = interval * 3 / 2;
    let Some(first) = latest_other(cfg, key, instance, fresh * 2) else { return Ok(()) };
    let age = now_ms() - first.sent_ms;
    if first.state != "running" || age > fresh_ms {
        return Ok(());
    }
    let gone = !me.boot_id.is_empty() && first.boot_id == me.boot_id && !std::path::Path::new(&format!("/proc/{}", first.pid)).exists();
    if gone {
        info!(pid = first.pid, "the previous run of this agent on this machine is gone (killed): taking over its lease");
        return Ok(());
    }
    info!(host = %first.host, pid = first.pid, age_ms = age, "another instance of this agent identity renewed its lease recently; waiting to see whether it is alive");
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alive: the same instance renewed since, or another one renews now.
    let alive = |b: &Heartbeat| {
        b.state == "running" && if b.instance == first.instance { b.sent_ms > first.sent_ms } else { now_ms() - b.sent_ms < fresh_ms }
    };
    match latest_other(cfg, key, instance, fresh * 2) {
        Some(again) if alive(&again) => Err(TwinRunning {
            age_ms: now_ms() - again.sent_ms,
            agent_id: again.agent_id,
            incarnation: again.incarnation,
            host: again.host,
            pid: again.pid,
        }),
        _ => Ok(()),
    }
}

/// The latest heartbeat of `key` from an instance other than `instance`
/// within the last `window`; `None` also when the topic cannot be read
/// (the check is best effort: fencing still stops a twin).
fn latest_other(cfg: &Config, key: &str, instance: &str, window: Duration) -> Option<Heartbeat> {
    let topic = cfg.topics.agents.as_str();
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka)
        .set("group.id", "meterline-agent-lease-check")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .ok()?;
    // Short: with Kafka down the agent starts anyway (and spools).
    let timeout = Duration::from_secs(3);
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let partitions: Vec<i32> = md.topics().iter().find(|t| t.name() == topic)?.partitions().iter().map(|p| p.id()).collect();
    let since = now_ms() - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(since)).ok()?;
    }
    let starts = consumer.offsets_for_times(tpl, timeout).ok()?;
    let mut assign = TopicPartitionList::new();
    for e in starts.elements() {
        if let Offset::Offset(o) = e.offset() {
            assign.add_partition_offset(topic, e.partition(), Offset::Offset(o)).ok()?;
        }
    }
    if assign.count() == 0 {
        return None;
    }
    consumer.assign(&assign).ok()?;
    // What the window holds is already on the broker: read until the
    // fetches come back empty (transaction markers hide the exact end).
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let mut best: Option<Heartbeat> = None;
    let (mut seen, mut empty) = (false, 0);
    while Instant::now() < deadline {
        let m = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            _ => {
                empty += 1;
                if (seen || started.elapsed() > Duration::from_secs(3)) && empty >= 2 {
                    break;
                }
                continue;
            }
        };
        (seen, empty) = (true, 0);
        if m.key() != Some(key.as_bytes()) {
            continue;
        }
        let Some(b) = m.payload().and_then(|v| serde_json::from_slice::<Heartbeat>(v).ok()) else { continue };
        if b.instance != instance && best.as_ref().is_none_or(|x| b.sent_ms >= x.sent_ms) {
            best = Some(b);
        }
    }
    best
}
