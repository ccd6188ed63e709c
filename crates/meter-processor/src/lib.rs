//! `meter process`: `usage.events` -> engine -> `usage.aggregates`,
//! `usage.dlq` and the state changelog, exactly once. The engine
//! (`meter-engine`) decides what each record does; this crate decides when
//! that becomes durable. Its metrics and their named events are in
//! [`metrics`].
//!
//! Guarantee: every commit interval one Kafka transaction carries the window
//! revisions emitted since the last one, the dead letters, the state
//! changelog entries of every change, and the consumed offsets of every
//! owned partition (`send_offsets_to_transaction` with the consumer's group
//! metadata read fresh for that transaction). read_committed readers see all
//! of it or nothing. Whatever fails, the committed offsets and the committed
//! changelog describe the same input, so a restarted or new owner restores
//! the state of a partition from its changelog partition and resumes from
//! its committed offset: no input is aggregated twice or lost.
//!
//! librdkafka pitfalls handled here:
//! - A consumer that subscribes to a topic created moments ago sees no
//!   partitions until the next metadata refresh; `admin::ensure_topics`
//!   waits for leaders.
//! - Offsets must be sent with the group metadata of the current
//!   generation: the coordinator then rejects the commit of an instance
//!   that lost its partitions in a rebalance (zombie fencing, KIP-447), and
//!   the transaction is aborted instead of double counting.
//! - Every transaction sends offsets, even with no new input: a transaction
//!   without offsets is not fenced by the group, so a zombie could commit
//!   stale changelog entries over its successor's.
//! - With `isolation.level=read_committed` librdkafka fetches committed
//!   offsets with `require_stable`, which waits for a predecessor's pending
//!   transaction; restoring after that fetch sees every committed change.
//! - Restoring reads the changelog partition to its end under
//!   read_committed: aborted and open transactions stay invisible.
//! - Rebalance callbacks run inside `poll`. The runner lives in the
//!   consumer's context so that the revocation callback can commit the open
//!   transaction before the partitions are released (or abort it when the
//!   assignment was lost); the loop never polls while holding the runner,
//!   and takes it out before the consumer closes.
//! - A failed commit whose error allows abort (`txn_requires_abort`) is
//!   aborted; a fatal error (fenced producer) needs a new producer. Either
//!   way the engine state is dropped and every owned partition is restored
//!   and rewound to its committed offset.

pub mod metrics;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use meter_avro::{confluent_id, Codec, SchemaStore};
use meter_config::{Config, KeyPartitioner, Valid};
use meter_engine::{Counters, Engine, EngineConfig, Input, Outcome, StateChange};
use meter_kafka::publish::send_blocking;
use meter_kafka::registry::{codec_for, Registry, Writes};
use meter_kafka::{client_config, fetch_queue_backoff_ms, forget_reached, observed_client_config, DrainProbe, Signal, StatsContext};
use meter_model::partition::Partitioner;
use meter_model::{now_ms, DeadLetter, Millis};
use meter_telemetry::kafka::KafkaMetrics;
use meter_telemetry::{Health, Telemetry};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::metrics::{
    AgentIdShared, CheckpointRejected, OutcomesCommitted, ProcessorMetrics, StateRestored, TransactionAborted, TransactionCommitted,
};
use crate::store::{record_hash, Checkpoint, Store};

/// How often the store's commits wait for the disk; between them a crash
/// loses only store commits that the changelog tail replays.
const DURABLE_EVERY: Duration = Duration::from_secs(5);

/// Records the changelog offsets the broker acknowledged, per partition,
/// so that the store's checkpoint names the exact last record applied.
#[derive(Clone)]
struct TxnContext {
    stats: StatsContext,
    state_topic: String,
    delivered: std::sync::Arc<Mutex<Delivered>>,
}

#[derive(Default)]
struct Delivered {
    /// Highest acknowledged offset per changelog partition.
    last: BTreeMap<i32, i64>,
    /// Changelog records acknowledged, and failed.
    acked: u64,
    failed: u64,
}

impl TxnContext {
    fn delivered(&self) -> std::sync::MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for TxnContext {
    fn stats(&self, statistics: Statistics) {
        self.stats.observe(&statistics);
    }
}

impl rdkafka::producer::ProducerContext for TxnContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        let mut d = self.delivered();
        match result {
            Ok(m) if m.topic() == self.state_topic => {
                d.acked += 1;
                let e = d.last.entry(m.partition()).or_insert(m.offset());
                *e = (*e).max(m.offset());
            }
            Ok(_) => {}
            Err((_, m)) if m.topic() == self.state_topic => d.failed += 1,
            Err(_) => {}
        }
    }
}

/// The agents' verification keys from `processor.agent_keys_file` (none
/// when unset). Errors name the file and the agent, never a secret.
pub fn agent_keys(cfg: &Config) -> anyhow::Result<meter_engine::AgentKeys> {
    let Some(path) = &cfg.processor.agent_keys_file else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading processor.agent_keys_file {}", path.display()))?;
    meter_engine::AgentKeys::from_toml(&text).map_err(|e| anyhow::anyhow!("processor.agent_keys_file {}: {e}", path.display()))
}

/// The modification time of the keys file, to notice a rotation.
fn keys_mtime(cfg: &Config) -> Option<std::time::SystemTime> {
    cfg.processor.agent_keys_file.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The engine's settings from `[processor]`.
pub fn engine_config(cfg: &Config) -> anyhow::Result<EngineConfig> {
    let p = &cfg.processor;
    let keys = agent_keys(cfg)?;
    if !keys.is_empty() {
        info!(agents = keys.len(), "agent signature keys loaded");
    }
    Ok(EngineConfig {
        allowed_lateness_ms: p.allowed_lateness_ms,
        correction_horizon_ms: p.correction_horizon_ms,
        hot_window_ms: p.hot_window_ms,
        max_clock_skew_ms: p.max_clock_skew_ms,
        idle_timeout_ms: p.idle_timeout_ms,
        max_payload_bytes: p.max_payload_bytes,
        max_string_bytes: p.max_string_bytes,
        agents: meter_engine::AgentRegistry::new(&p.agents),
        partitioner: match cfg.kafka.partitioner {
            KeyPartitioner::Murmur2 => Partitioner::Murmur2,
            KeyPartitioner::Crc32 => Partitioner::Crc32,
        },
        keys: std::sync::Arc::new(keys),
        accept_unsigned: p.accept_unsigned,
        accept_no_incarnation: p.accept_no_incarnation,
    })
}

/// What a processor run did.
#[derive(Debug, Clone, Default)]
pub struct ProcessorStats {
    pub counters: Counters,
    /// From the first record received to the last one handled: the span
    /// over which input was consumed (for throughput figures).
    pub busy: Duration,
    pub commits: u64,
    pub aborts: u64,
    pub restores: u64,
    /// Partition restores by how they began (`checkpoint`, `full`,
    /// `rejected`), and the changelog records they read.
    pub restore_sources: BTreeMap<&'static str, u64>,
    pub restored_entries: u64,
}

impl ProcessorStats {
    pub fn records_per_second(&self) -> f64 {
        self.counters.total() as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// The consumer's context owns the runner, so that librdkafka's rebalance
/// callbacks (which run inside `poll`, never while the loop holds the runner)
/// can commit the open transaction before revoked partitions are released.
struct Ctx {
    topic: String,
    runner: Mutex<Option<Runner>>,
    stats: StatsContext,
}

fn lock(m: &Mutex<Option<Runner>>) -> std::sync::MutexGuard<'_, Option<Runner>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ctx {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        self.stats.observe(&statistics);
    }
}

impl ConsumerContext for Ctx {
    /// Revocation: the open transaction is committed while the partitions
    /// are still ours (or aborted when the assignment was lost, e.g. after a
    /// session timeout: the group has moved on and would fence the commit),
    /// then their state is forgotten.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let parts = self.partitions(tpl);
        let mut guard = lock(&self.runner);
        let Some(r) = guard.as_mut() else { return };
        if consumer.assignment_lost() {
            r.abort("assignment lost before the open transaction committed");
        } else if let Err(e) = r.commit(consumer) {
            r.abort(&format!("commit on revocation of {parts:?} failed: {e:#}"));
        } else {
            info!(?parts, "partitions revoked after committing");
        }
        for p in parts {
            r.engine.drop_partition(p);
            r.positions.remove(&p);
            r.owned.remove(&p);
            r.unrestored.retain(|&u| u != p);
        }
    }

    /// Assignment: restored by the loop before any of their records is
    /// handled (restoring needs the committed offsets, fetched after this).
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.partitions(tpl);
            info!(?parts, "partitions assigned");
            if let Some(r) = lock(&self.runner).as_mut() {
                r.owned.extend(parts.iter().copied());
                r.unrestored.extend(parts);
                r.assigned_once = true;
            }
        }
    }
}

/// The restore consumer's context: end-of-partition events are how it knows
/// it is done, not errors worth logging.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            warn!(error = %error, reason, "restore consumer error");
        }
    }
}

impl ConsumerContext for QuietEof {}

struct Runner {
    cfg: Config,
    codec: Codec,
    engine: Engine,
    producer: BaseProducer<TxnContext>,
    restorer: BaseConsumer<QuietEof>,
    /// The local state store (see [`store`]); the engine reads it too.
    store: std::sync::Arc<Store>,
    /// When the store last committed durably.
    last_durable: Instant,
    /// Set when the store failed: the processor stops (its partitions move
    /// to other instances; a restart restores from the changelog).
    store_failed: Option<String>,
    /// Reads the changelog's high watermarks (read_uncommitted: the
    /// restorer's own ListOffsets would answer the last stable offset).
    watermarks: BaseConsumer,
    /// Next offset to read per owned events partition (committed offset
    /// after a restore, then advanced per record).
    positions: BTreeMap<i32, i64>,
    /// Owned partitions, as of the last rebalance event. Kept here because
    /// asking librdkafka for the assignment is a round trip to its group
    /// thread, far too slow to do per record.
    owned: std::collections::BTreeSet<i32>,
    /// Owned partitions not restored yet.
    unrestored: Vec<i32>,
    dead_letters: Vec<DeadLetter>,
    dirty_input: bool,
    /// Set when a transaction was aborted: state must be restored and the
    /// owned partitions rewound before handling more records.
    needs_recover: bool,
    producer_broken: bool,
    stats: ProcessorStats,
    buf: Vec<u8>,
    metrics: ProcessorMetrics,
    producer_context: TxnContext,
    /// Engine counters already counted in the metrics: outcomes are counted
    /// when their transaction commits, never twice after an abort.
    counted: Counters,
    /// A first assignment (possibly empty) has been received.
    assigned_once: bool,
    /// When the keys file was last looked at, and its modification time.
    keys_checked: (Instant, Option<std::time::SystemTime>),
}

/// The most of an input record's payload and key a dead letter keeps. A dead
/// letter carries the key twice (record key and Avro field) besides the
/// payload, so a record near Kafka's 1 MB limit would make one too large to
/// produce; its transaction would then fail and be retried forever, stalling
/// every partition of the instance. Input within `max_payload_bytes` (64 KiB
/// by default) is always kept whole; the detail says what was cut.
const DLQ_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
const DLQ_MAX_KEY_BYTES: usize = 4 * 1024;

fn keep_at_most(bytes: &[u8], limit: usize, what: &str, detail: &mut String) -> Vec<u8> {
    if bytes.len() <= limit {
        return bytes.to_vec();
    }
    detail.push_str(&format!(" ({what} truncated to its first {limit} of {} bytes)", bytes.len()));
    bytes[..limit].to_vec()
}

/// The negative control of the fault harness (builds with `testkit` only).
#[cfg(feature = "testkit")]
fn skip_restore(cfg: &Config) -> bool {
    cfg.processor.unsafe_skip_state_restore
}

#[cfg(not(feature = "testkit"))]
fn skip_restore(_: &Config) -> bool {
    false
}

fn transactional_producer(cfg: &Config, context: TxnContext) -> anyhow::Result<BaseProducer<TxnContext>> {
    let producer: BaseProducer<TxnContext> = observed_client_config(cfg)
        .set("partitioner", cfg.kafka.partitioner.librdkafka())
        .set("transactional.id", format!("{}-{}", cfg.processor.group_id, cfg.processor.instance_id))
        .set("transaction.timeout.ms", cfg.processor.transaction_timeout_ms.to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create_with_context(context)
        .context("creating transactional producer")?;
    producer.init_transactions(Duration::from_secs(60)).context("initialising transactions")?;
    Ok(producer)
}

impl Runner {
    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>, now: i64) {
        let partition = m.partition();
        let signature = m.headers().and_then(|h| h.iter().find(|h| h.key == meter_model::signing::HEADER)).and_then(|h| h.value);
        let outcome = self.engine.process(Input { partition, key: m.key(), payload: m.payload(), signature }, now);
        if let Outcome::Unavailable { detail } = outcome {
            // Not handled: the record is not ours to skip (see store_failed).
            self.store_failed.get_or_insert(detail);
            return;
        }
        if let Outcome::DeadLetter { reason, mut detail } = outcome {
            debug!(partition, offset = m.offset(), %reason, %detail, "dead-lettering record");
            let key = m.key().map(|k| keep_at_most(k, DLQ_MAX_KEY_BYTES, "key", &mut detail));
            let payload = keep_at_most(m.payload().unwrap_or_default(), DLQ_MAX_PAYLOAD_BYTES, "payload", &mut detail);
            self.dead_letters.push(DeadLetter {
                reason: reason.as_str().to_owned(),
                detail,
                source_topic: m.topic().to_owned(),
                source_partition: partition,
                source_offset: m.offset(),
                key,
                payload,
                dead_lettered_at: now,
            });
        }
        self.positions.insert(partition, m.offset() + 1);
        self.dirty_input = true;
    }

    /// Before handling records: restore newly assigned partitions, and after
    /// an aborted transaction restore and rewind everything owned. Returns
    /// the partitions rewound to their committed offsets: records of theirs
    /// fetched before are stale and must not be handled (see `run_loop`).
    fn prepare(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<Vec<i32>> {
        let mut rewound = Vec::new();
        if self.needs_recover {
            self.needs_recover = false;
            rewound.extend(self.recover(consumer)?);
        }
        if !self.unrestored.is_empty() {
            let parts = std::mem::take(&mut self.unrestored);
            self.restore(consumer, &parts)?;
            rewound.extend(parts);
        }
        Ok(rewound)
    }

    /// Restores `parts` from the changelog and seeks them to their committed
    /// offsets.
    fn restore(&mut self, consumer: &BaseConsumer<Ctx>, parts: &[i32]) -> anyhow::Result<()> {
        if parts.is_empty() {
            return Ok(());
        }
        let events = self.cfg.topics.events.clone();
        let mut tpl = TopicPartitionList::new();
        for &p in parts {
            tpl.add_partition(&events, p);
        }
        // read_committed: waits for pending transactional offsets (require_stable).
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(60)).context("fetching committed offsets")?;
        // The key contract is checked against the topic's partition count
        // as it is now (partitions can be added; a key's partition moves).
        let metadata = consumer.fetch_metadata(Some(&events), Duration::from_secs(30)).context("fetching the events topic's metadata")?;
        let count = metadata.topics().iter().find(|t| t.name() == events).map_or(0, |t| t.partitions().len());
        self.engine.set_partitions(i32::try_from(count).unwrap_or(0));
        let started = Instant::now();
        for &p in parts {
            self.engine.drop_partition(p);
        }
        let (entries, loaded, sources) = if skip_restore(&self.cfg) {
            warn!("unsafe_skip_state_restore is set: state NOT restored, exactly-once is broken on purpose");
            for &p in parts {
                self.store.clear_partition(p)?;
            }
            (0, 0, Vec::new())
        } else {
            let (entries, sources) = self.restore_partitions(parts)?;
            let now = now_ms();
            let mut loaded = 0;
            for &p in parts {
                loaded += self.engine.load_partition(p, now).map_err(|e| anyhow!("loading partition {p} from the state store: {e}"))?;
            }
            (entries, loaded, sources)
        };
        for e in committed.elements() {
            let p = e.partition();
            let offset = match e.offset() {
                Offset::Offset(o) => {
                    self.positions.insert(p, o);
                    Offset::Offset(o)
                }
                _ => {
                    self.positions.remove(&p);
                    Offset::Beginning
                }
            };
            // After a failed transaction the fetch position is ahead of the
            // committed offset; continuing from it would lose input.
            consumer.seek(&events, p, offset, Duration::from_secs(10)).with_context(|| format!("rewinding {events}/{p} to {offset:?}"))?;
        }
        self.stats.restores += 1;
        self.stats.restored_entries += entries;
        for (_, source) in &sources {
            *self.stats.restore_sources.entry(source).or_default() += 1;
        }
        StateRestored { partitions: parts, entries, loaded, sources: &sources, duration: started.elapsed() }.emit(&self.metrics);
        Ok(())
    }

    /// Brings the local store of `parts` up to the changelog's end: from
    /// each partition's checkpoint when it matches the changelog, else from
    /// the beginning (after forgetting what the store held of it). Returns
    /// the records read and how each partition began.
    ///
    /// Reading to the end a read_committed consumer sees (the last stable
    /// offset) is not enough: a transaction left open by an instance that
    /// died without a successor under its transactional id holds the LSO
    /// back, and the changelog entries committed after it (ours, since we
    /// took the partition over) stay invisible until the broker aborts it.
    /// The committed offsets already include them, so restoring without them
    /// would silently drop the input they aggregated. Waiting for the high
    /// watermark waits for every earlier transaction to end (at most the
    /// dead instance's transaction timeout plus the broker's abort check).
    fn restore_partitions(&mut self, parts: &[i32]) -> anyhow::Result<(u64, Vec<(i32, &'static str)>)> {
        let topic = self.cfg.state_topic();
        let mut tpl = TopicPartitionList::new();
        let mut target = BTreeMap::new();
        let mut sources = Vec::new();
        for &p in parts {
            let (low, high) =
                self.watermarks.fetch_watermarks(&topic, p, Duration::from_secs(10)).with_context(|| format!("{topic}/{p}"))?;
            let start = match self.store.checkpoint(p)? {
                Some(c) => match self.checkpoint_matches(&topic, p, c, low, high) {
                    Ok(()) => {
                        sources.push((p, "checkpoint"));
                        c.next_offset
                    }
                    Err(reason) => {
                        CheckpointRejected { partition: p, reason: &reason }.emit();
                        self.store.clear_partition(p)?;
                        sources.push((p, "rejected"));
                        low
                    }
                },
                None => {
                    self.store.clear_partition(p)?;
                    sources.push((p, "full"));
                    low
                }
            };
            if high > start {
                tpl.add_partition_offset(&topic, p, Offset::Offset(start))?;
                target.insert(p, high);
            }
        }
        if target.is_empty() {
            return Ok((0, sources));
        }
        self.restorer.assign(&tpl).with_context(|| format!("assigning {topic}"))?;
        let ends = target.clone();
        let mut batch: Vec<(i32, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut last: BTreeMap<i32, (i64, u64)> = BTreeMap::new();
        let mut n = 0u64;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(300);
        let mut waiting_logged = false;
        while !target.is_empty() {
            let check = match self.restorer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let key = m.key().unwrap_or_default();
                    last.insert(m.partition(), (m.offset(), record_hash(key, m.payload())));
                    batch.push((m.partition(), key.to_vec(), m.payload().map(<[u8]>::to_vec)));
                    n += 1;
                    if batch.len() >= 20_000 {
                        self.store.apply(batch.iter().map(|(p, k, v)| (*p, k.as_slice(), v.as_deref())), &[], false)?;
                        batch.clear();
                    }
                    false
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => true,
                Some(Err(e)) => {
                    warn!(error = %e, "restore consumer error");
                    true
                }
            };
            if check {
                // The position passes commit and abort markers too, so it
                // reaches the high watermark once every transaction below it
                // has ended.
                forget_reached(&self.restorer, &topic, &mut target)?;
                if !target.is_empty() && !waiting_logged && started.elapsed() > Duration::from_secs(5) {
                    waiting_logged = true;
                    warn!(partitions = ?target.keys().collect::<Vec<_>>(), "restore waits for a transaction left open on the changelog (a dead instance's; the broker aborts it after its timeout)");
                }
            }
            if Instant::now() > deadline {
                bail!("restoring {topic} partitions {:?} did not reach their high watermark in 300s", target.keys().collect::<Vec<_>>());
            }
        }
        self.restorer.unassign()?;
        let checkpoints: Vec<(i32, Checkpoint)> = last
            .iter()
            .filter_map(|(&p, &(offset, hash))| Some((p, Checkpoint { next_offset: *ends.get(&p)?, last_offset: offset, last_hash: hash })))
            .collect();
        self.store.apply(batch.iter().map(|(p, k, v)| (*p, k.as_slice(), v.as_deref())), &checkpoints, true)?;
        self.last_durable = Instant::now();
        Ok((n, sources))
    }

    /// Whether a checkpoint describes this changelog partition: its offsets
    /// lie within the partition, and the record it names as the last one
    /// applied is there, committed, with the same key and value. A store
    /// copied from another cluster or group, kept across a recreated topic,
    /// rolled forward or edited, fails one of these.
    fn checkpoint_matches(&self, topic: &str, p: i32, c: Checkpoint, low: i64, high: i64) -> Result<(), String> {
        if !(low <= c.last_offset && c.last_offset < c.next_offset && c.next_offset <= high) {
            return Err(format!("checkpoint offsets {}..{} lie outside the changelog's {low}..{high}", c.last_offset, c.next_offset));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(c.last_offset)).map_err(|e| e.to_string())?;
        self.restorer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            match self.restorer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => break Some((m.offset(), record_hash(m.key().unwrap_or_default(), m.payload()))),
                Some(Err(KafkaError::PartitionEOF(_))) => break None,
                _ if Instant::now() > deadline => break None,
                _ => {}
            }
        };
        let _ = self.restorer.unassign();
        match found {
            Some((o, h)) if o == c.last_offset && h == c.last_hash => Ok(()),
            Some((o, _)) if o == c.last_offset => Err(format!("the record at offset {o} is not the one the checkpoint names")),
            Some((o, _)) => Err(format!("offset {} holds no committed record (the next is {o})", c.last_offset)),
            None => Err(format!("offset {} holds no committed record", c.last_offset)),
        }
    }

    /// Applies a committed transaction's changelog entries to the local
    /// store, with a checkpoint for each partition written (the offsets
    /// the broker acknowledged). Without every acknowledgement the
    /// checkpoints stay where they were, which only lengthens a restore.
    fn apply_committed(&mut self, changes: &[StateChange]) -> anyhow::Result<()> {
        let expected = changes.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        let delivered = loop {
            {
                let mut d = self.producer_context.delivered();
                if d.acked + d.failed >= expected || Instant::now() > deadline {
                    break std::mem::take(&mut *d);
                }
            }
            self.producer.poll(Duration::from_millis(1));
        };
        let mut checkpoints = Vec::new();
        if delivered.acked == expected && delivered.failed == 0 {
            let mut last: BTreeMap<i32, &StateChange> = BTreeMap::new();
            for c in changes {
                last.insert(c.partition, c);
            }
            for (p, c) in last {
                if let Some(&offset) = delivered.last.get(&p) {
                    let last_hash = record_hash(&c.key, c.value.as_deref());
                    checkpoints.push((p, Checkpoint { next_offset: offset + 1, last_offset: offset, last_hash }));
                }
            }
        }
        let durable = self.last_durable.elapsed() >= DURABLE_EVERY;
        self.store.apply(changes.iter().map(|c| (c.partition, c.key.as_slice(), c.value.as_deref())), &checkpoints, durable)?;
        if durable {
            self.last_durable = Instant::now();
        }
        Ok(())
    }

    /// One transaction: revisions, dead letters, changelog entries and the
    /// offsets of every owned partition.
    fn commit(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
        let revisions = self.engine.flush(now_ms());
        let changes = self.engine.take_changes();
        if let Some(e) = self.engine.cold_error() {
            self.store_failed.get_or_insert_with(|| e.to_owned());
            bail!("{e}");
        }
        if revisions.is_empty() && changes.is_empty() && self.dead_letters.is_empty() && !self.dirty_input {
            return Ok(());
        }
        let started = Instant::now();
        let dead_letters = self.dead_letters.len();
        // Reports of an aborted transaction must not count for this one.
        *self.producer_context.delivered() = Delivered::default();
        self.producer.begin_transaction().context("beginning transaction")?;
        let topics = &self.cfg.topics;
        let state_topic = self.cfg.state_topic();
        for a in &revisions {
            self.buf.clear();
            self.codec.encode_aggregate(a, &mut self.buf);
            let key = a.key.record_key();
            send_blocking(&self.producer, BaseRecord::to(&topics.aggregates).key(key.as_str()).payload(self.buf.as_slice()))
                .context("producing")?;
        }
        for d in std::mem::take(&mut self.dead_letters) {
            self.buf.clear();
            self.codec.encode_dead_letter(&d, &mut self.buf);
            let mut record = BaseRecord::to(&topics.dlq).payload(self.buf.as_slice());
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            send_blocking(&self.producer, record).context("producing")?;
        }
        for StateChange { partition, key, value } in &changes {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&state_topic).partition(*partition).key(key.as_slice());
            if let Some(v) = value {
                record = record.payload(v.as_slice());
            }
            send_blocking(&self.producer, record).context("producing")?;
        }
        let mut offsets = TopicPartitionList::new();
        for (&p, &o) in &self.positions {
            offsets.add_partition_offset(&topics.events, p, Offset::Offset(o))?;
        }
        if offsets.count() > 0 {
            let group = consumer.group_metadata().ok_or_else(|| anyhow!("consumer has no group metadata"))?;
            self.producer
                .send_offsets_to_transaction(&offsets, &group, Duration::from_secs(30))
                .context("sending offsets to transaction")?;
        }
        self.producer.commit_transaction(Duration::from_secs(60)).context("committing transaction")?;
        if let Err(e) = self.apply_committed(&changes) {
            // Committed to Kafka, so nothing is lost; the memory no longer
            // matches the store, so the processor stops.
            self.store_failed.get_or_insert_with(|| format!("{e:#}"));
        }
        self.dirty_input = false;
        self.stats.commits += 1;
        let mut by_kind: BTreeMap<(&'static str, bool), u64> = BTreeMap::new();
        for a in &revisions {
            *by_kind.entry((a.key.granularity.as_str(), a.is_final)).or_default() += 1;
        }
        TransactionCommitted {
            revisions: by_kind.into_iter().map(|((g, f), n)| (g, f, n)).collect(),
            changes: changes.len(),
            dead_letters,
            duration: started.elapsed(),
        }
        .emit(&self.metrics);
        self.count_outcomes();
        for shared in self.engine.take_shared_identities() {
            AgentIdShared { shared: &shared }.emit(&self.metrics);
        }
        self.reload_keys();
        self.update_gauges();
        Ok(())
    }

    /// Counts the outcomes of the records whose transaction just committed.
    fn count_outcomes(&mut self) {
        let now = self.engine.counters();
        let before = &self.counted;
        let dead_letters = now
            .dead_letters
            .iter()
            .map(|(reason, n)| (reason.as_str(), n - before.dead_letters.get(reason).copied().unwrap_or(0)))
            .collect();
        OutcomesCommitted {
            aggregated: now.aggregated - before.aggregated,
            duplicates: now.duplicates - before.duplicates,
            dead_letters,
            legacy_fingerprint: now.legacy_fingerprint - before.legacy_fingerprint,
            resolved_schema: now.resolved_schema - before.resolved_schema,
            unsigned: now.unsigned - before.unsigned,
            without_incarnation: now.without_incarnation - before.without_incarnation,
            incarnation_overlaps: now.incarnation_overlaps - before.incarnation_overlaps,
        }
        .emit(&self.metrics);
        self.counted = now.clone();
    }

    /// Re-reads the keys file when it changed (checked every few seconds):
    /// a rotation needs no restart. A file that does not parse keeps the
    /// keys in use, and says so.
    fn reload_keys(&mut self) {
        if self.keys_checked.0.elapsed() < Duration::from_secs(5) {
            return;
        }
        let mtime = keys_mtime(&self.cfg);
        let before = std::mem::replace(&mut self.keys_checked, (Instant::now(), mtime));
        if mtime == before.1 {
            return;
        }
        match agent_keys(&self.cfg) {
            Ok(keys) => {
                info!(agents = keys.len(), "agent signature keys reloaded");
                self.engine.set_agent_keys(std::sync::Arc::new(keys));
            }
            Err(e) => {
                self.metrics.agent_keys_reload_failures.inc();
                warn!(error = %format!("{e:#}"), "the agent keys file changed but cannot be used; keeping the keys loaded before");
            }
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.windows_open.set(i64::try_from(self.engine.open_windows()).unwrap_or(i64::MAX));
        m.dedup_streams.set(i64::try_from(self.engine.dedup_streams()).unwrap_or(i64::MAX));
        m.state_store_bytes.set(i64::try_from(self.store.disk_bytes()).unwrap_or(i64::MAX));
        m.partitions_assigned.set(i64::try_from(self.owned.len()).unwrap_or(i64::MAX));
        m.watermark_delay.reset();
        let now = now_ms();
        for &p in &self.owned {
            // A partition that has seen no record has no watermark yet.
            if let Some(wm) = self.engine.watermark(p).filter(|&wm| wm > Millis::MIN) {
                m.watermark_delay.with_label_values(&[&p.to_string()]).set(now.saturating_sub(wm) as f64 / 1000.0);
            }
        }
    }

    /// Aborts the open transaction (rebuilding the producer if it is fenced
    /// or otherwise unusable) and drops all state; [`Runner::prepare`] then
    /// restores and rewinds what is still owned.
    fn abort(&mut self, error: &str) {
        TransactionAborted { error }.emit(&self.metrics);
        // What was handled in the aborted transaction is handled again.
        self.counted = self.engine.counters().clone();
        self.stats.aborts += 1;
        if let Err(e) = self.producer.abort_transaction(Duration::from_secs(30)) {
            warn!(error = %e, "abort failed; the producer will be rebuilt");
            self.producer_broken = true;
        }
        self.engine.reset();
        self.dead_letters.clear();
        self.dirty_input = false;
        self.positions.clear();
        self.needs_recover = true;
    }

    /// Stops the processor once the state store failed: the open
    /// transaction is aborted, so that whoever restores the partitions next
    /// (this instance after a restart, or another) handles its input again.
    fn check_store(&mut self) -> anyhow::Result<()> {
        let Some(e) = self.store_failed.clone() else { return Ok(()) };
        let _ = self.producer.abort_transaction(Duration::from_secs(30));
        Err(anyhow!("{e}; stopping (the open transaction is aborted; restarted, the processor restores from its store and the changelog)"))
    }

    /// Returns the partitions restored and rewound (everything owned).
    fn recover(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<Vec<i32>> {
        if self.producer_broken {
            self.producer = transactional_producer(&self.cfg, self.producer_context.clone())?;
            self.producer_broken = false;
        }
        let owned: Vec<i32> = self.owned.iter().copied().collect();
        self.unrestored.retain(|p| !owned.contains(p));
        self.restore(consumer, &owned)?;
        Ok(owned)
    }
}

/// Runs the processor until `shutdown` is raised, or, when `drain` is
/// raised, until every owned partition is consumed to its end and every
/// window the wall clock has closed is final and committed (see
/// [`meter_engine::Engine::drained`]). Returns what it did.
pub async fn run(cfg: &Valid<Config>, shutdown: Signal, drain: Signal) -> anyhow::Result<ProcessorStats> {
    run_observed(cfg, shutdown, drain, Telemetry::new("processor")).await
}

/// [`run`], reporting metrics and health to `telemetry` (which the caller
/// may serve with [`meter_telemetry::http::serve`]).
pub async fn run_observed(cfg: &Valid<Config>, shutdown: Signal, drain: Signal, telemetry: Telemetry) -> anyhow::Result<ProcessorStats> {
    // A refusal (credentials, TLS, protocol) stops the processor at once,
    // naming the cause; a broker that is down is waited for as before.
    meter_kafka::check_service_access(&cfg.kafka).await?;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || run_blocking(&cfg, &shutdown, &drain, &telemetry)).await.context("processor thread")?
}

fn run_blocking(cfg: &Config, shutdown: &Signal, drain: &Signal, telemetry: &Telemetry) -> anyhow::Result<ProcessorStats> {
    let catalog = cfg.catalog().context("loading catalog")?;
    let (codec, registry) = codec_for(cfg, &[Writes::Aggregates, Writes::DeadLetters])?;
    let ids = registry.map(|r| (r, codec.store().clone()));
    let metrics = ProcessorMetrics::register(telemetry);
    let kafka_metrics = KafkaMetrics::register(telemetry);
    telemetry.health().set_live_timeout(Duration::from_millis(cfg.metrics.liveness_timeout_ms));
    telemetry.health().beat();
    let ctx =
        Ctx { topic: cfg.topics.events.clone(), runner: Mutex::new(None), stats: StatsContext::new("consumer", kafka_metrics.clone()) };
    let consumer: BaseConsumer<Ctx> = observed_client_config(cfg)
        .set("group.id", &cfg.processor.group_id)
        // Static membership: a restarted instance takes over its own
        // partitions at once instead of waiting for a rebalance after its
        // predecessor's session times out.
        .set("group.instance.id", &cfg.processor.instance_id)
        .set("session.timeout.ms", cfg.processor.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.queue.backoff.ms", fetch_queue_backoff_ms(&cfg.kafka))
        .create_with_context(ctx)
        .context("creating processor consumer")?;
    let restorer: BaseConsumer<QuietEof> = client_config(&cfg.kafka)
        .set("group.id", format!("{}-restore", cfg.processor.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // Reach the end quickly: do not wait for more data on empty fetches.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", fetch_queue_backoff_ms(&cfg.kafka))
        .create_with_context(QuietEof)
        .context("creating restore consumer")?;
    let watermarks: BaseConsumer =
        client_config(&cfg.kafka).set("isolation.level", "read_uncommitted").create().context("creating the changelog watermark client")?;
    let producer_context =
        TxnContext { stats: StatsContext::new("producer", kafka_metrics), state_topic: cfg.state_topic(), delivered: Default::default() };
    let store_path = Store::path(&cfg.processor.state_dir, &cfg.processor.group_id, &cfg.processor.instance_id);
    let (store, replaced) = Store::open(&store_path)?;
    if replaced {
        metrics.state_restores.with_label_values(&["unusable_store"]).inc();
    }
    info!(path = %store_path.display(), bytes = store.disk_bytes(), "state store opened");
    let store = std::sync::Arc::new(store);
    let mut engine = Engine::new(catalog, codec.clone(), engine_config(cfg)?);
    engine.set_cold(store.clone());
    let producer = transactional_producer(cfg, producer_context.clone())?;
    consumer.subscribe(&[&cfg.topics.events]).context("subscribing to events topic")?;
    let runner = Runner {
        cfg: cfg.clone(),
        codec: codec.clone(),
        engine,
        store,
        last_durable: Instant::now(),
        store_failed: None,
        keys_checked: (Instant::now(), keys_mtime(cfg)),
        producer,
        restorer,
        watermarks,
        positions: BTreeMap::new(),
        owned: Default::default(),
        unrestored: Vec::new(),
        dead_letters: Vec::new(),
        dirty_input: false,
        needs_recover: false,
        producer_broken: false,
        stats: ProcessorStats::default(),
        buf: Vec::with_capacity(512),
        metrics,
        producer_context,
        counted: Counters::default(),
        assigned_once: false,
    };
    *lock(&consumer.context().runner) = Some(runner);
    info!(topic = %cfg.topics.events, group = %cfg.processor.group_id, instance = %cfg.processor.instance_id, "processor started");
    let result = run_loop(cfg, &consumer, shutdown, drain, telemetry, ids.as_ref());
    telemetry.health().set_not_ready("stopped");
    // Take the runner out before the consumer closes: closing revokes the
    // partitions, and the callback must find nothing left to commit.
    let runner = lock(&consumer.context().runner).take();
    let (first_record, last_record) = result?;
    let stats = runner
        .map(|mut r| {
            let mut s = std::mem::take(&mut r.stats);
            s.counters = r.engine.counters().clone();
            s
        })
        .unwrap_or_default();
    let stats = ProcessorStats {
        busy: match (first_record, last_record) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        },
        ..stats
    };
    info!(
        aggregated = stats.counters.aggregated,
        duplicates = stats.counters.duplicates,
        dead_lettered = stats.counters.dead_lettered(),
        commits = stats.commits,
        aborts = stats.aborts,
        "processor stopped"
    );
    Ok(stats)
}

type Span = (Option<Instant>, Option<Instant>);

/// Looks up in the schema registry the ids of the batch's Confluent-framed
/// records that `store` does not know yet. While the registry cannot be
/// reached nothing is handled (dead-lettering those records would need a
/// replay to count them), and the processor reports not ready; a registry
/// that refuses the request (a wrong URL, no permission) stops it.
fn learn_schema_ids(
    registry: &Registry,
    store: &SchemaStore,
    batch: &[rdkafka::message::BorrowedMessage<'_>],
    shutdown: &Signal,
    health: &Health,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let unknown: std::collections::BTreeSet<u32> =
            batch.iter().filter_map(|m| m.payload().and_then(confluent_id)).filter(|&id| !store.knows_id(id)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        match registry.learn_ids(unknown.iter().copied(), store) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && !shutdown.is_raised() => {
                warn!(error = %e, ids = ?unknown, retry_in_ms = backoff.as_millis() as u64, "cannot look up writer schemas; waiting for the registry");
                health.set_not_ready(format!("schema registry unreachable: {e}"));
                health.beat();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) if e.is_retryable() => return Ok(()),
            Err(e) => return Err(e).context("looking up writer schemas in the registry"),
        }
    }
}

/// Records taken from librdkafka before the runner is locked once for all
/// of them (perf, issue 6): locking, `prepare` and the clock reads then cost
/// per batch instead of per record, where they took as long as the engine's
/// work on the record. A batch ends at the first empty poll, so it never
/// waits for input that is not there yet.
const MAX_BATCH: usize = 1024;

fn run_loop(
    cfg: &Config,
    consumer: &BaseConsumer<Ctx>,
    shutdown: &Signal,
    drain: &Signal,
    telemetry: &Telemetry,
    ids: Option<&(Registry, SchemaStore)>,
) -> anyhow::Result<Span> {
    let health = telemetry.health();
    let interval = Duration::from_millis(cfg.processor.commit_interval_ms);
    let mut next_commit = Instant::now() + interval;
    let (mut first_record, mut last_record): Span = (None, None);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut drain_probe: Option<DrainProbe> = None;
    loop {
        let wait = next_commit.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        // Never poll while holding the runner: rebalance callbacks lock it.
        // Every record of the batch is checked against the ownership and
        // positions of the moment it is handled, as a single record was.
        let mut idle = false;
        if !shutdown.is_raised() {
            let mut timeout = wait;
            while batch.len() < MAX_BATCH {
                match consumer.poll(timeout) {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        if let Some(fatal) = meter_kafka::fatal(consumer, "processor") {
                            return Err(fatal);
                        }
                        warn!(error = %e, "consumer error; librdkafka retries on its own");
                        break;
                    }
                    None => {
                        idle = batch.is_empty();
                        break;
                    }
                }
                timeout = Duration::ZERO;
            }
        }
        if let Some((registry, store)) = ids {
            learn_schema_ids(registry, store, &batch, shutdown, health)?;
        }
        let mut guard = lock(&consumer.context().runner);
        let r = guard.as_mut().ok_or_else(|| anyhow!("processor runner missing"))?;
        r.check_store()?;
        if shutdown.is_raised() {
            r.commit(consumer)?;
            break;
        }
        health.beat();
        let rewound = r.prepare(consumer)?;
        if !rewound.is_empty() {
            // The batch may hold records fetched before a rebalance or an
            // aborted transaction rewound these partitions. Their committed
            // offset can be older than those records (the aborted
            // transaction had handled the ones in between), so handling
            // them now would skip that gap for good. Dropped here, they are
            // fetched again from the committed offset.
            batch.retain(|m| !rewound.contains(&m.partition()));
        }
        if !r.assigned_once {
            health.set_not_ready("waiting for a partition assignment");
        } else {
            health.set_ready();
        }
        if !batch.is_empty() {
            let now = now_ms();
            let mut handled = false;
            for m in batch.drain(..) {
                // A record fetched before its partition was revoked or
                // rewound is not ours to handle.
                let expected = r.positions.get(&m.partition()).copied();
                if r.owned.contains(&m.partition()) && !r.unrestored.contains(&m.partition()) && expected.is_none_or(|o| m.offset() >= o) {
                    r.handle(&m, now);
                    handled = true;
                } else {
                    debug!(partition = m.partition(), offset = m.offset(), ?expected, "skipping record outside the owned position");
                }
            }
            r.check_store()?;
            if handled {
                let now = Instant::now();
                first_record.get_or_insert(now);
                last_record = Some(now);
            }
        }
        if Instant::now() >= next_commit {
            if let Err(e) = r.commit(consumer) {
                r.check_store()?;
                r.abort(&format!("{e:#}"));
                // The batch is empty here: nothing fetched is stale.
                r.prepare(consumer)?;
            }
            next_commit = Instant::now() + interval;
            // Checking the high watermarks blocks on the broker, so only
            // when no record arrived for a while.
            if idle && drain.is_raised() && r.engine.drained() {
                let probe =
                    DrainProbe::in_slot(&mut drain_probe, &cfg.kafka, &cfg.processor.group_id).context("creating the drain probe")?;
                if probe.caught_up(consumer) {
                    r.commit(consumer)?;
                    break;
                }
            }
        }
    }
    Ok((first_record, last_record))
}
