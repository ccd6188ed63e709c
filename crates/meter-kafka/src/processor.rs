//! The processor runner: `usage.events` -> engine -> `usage.aggregates` and
//! `usage.dlq`.
//!
//! Guarantee (at-least-once): consumed offsets are committed only after
//! every window revision and dead letter produced from the records before
//! them has been acknowledged by Kafka. A crash between the two replays
//! input; window state lives in memory only, so a restarted instance
//! re-emits windows from the replayed input. The exactly-once design
//! (transactions carrying output, state changelog and offsets together)
//! replaces [`Runner::commit`] without changing the loop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use meter_avro::Codec;
use meter_config::Config;
use meter_model::{DeadLetter, DeadLetterReason};
use meter_processor::{Counters, Engine, EngineConfig, Input, Outcome};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::{caught_up, client_config, now_ms, Signal};

pub fn engine_config(cfg: &Config) -> EngineConfig {
    let p = &cfg.processor;
    EngineConfig {
        allowed_lateness_ms: p.allowed_lateness_ms,
        correction_horizon_ms: p.correction_horizon_ms,
        max_clock_skew_ms: p.max_clock_skew_ms,
        idle_timeout_ms: p.idle_timeout_ms,
        max_payload_bytes: p.max_payload_bytes,
        max_string_bytes: p.max_string_bytes,
    }
}

struct Runner<'a> {
    cfg: &'a Config,
    codec: Codec,
    engine: Engine,
    producer: FutureProducer,
    /// Next offset to commit per events partition.
    offsets: BTreeMap<i32, i64>,
    /// Dead letters waiting for the next commit.
    dead_letters: Vec<DeadLetter>,
    buf: Vec<u8>,
}

impl Runner<'_> {
    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let now = now_ms();
        let partition = m.partition();
        let outcome = self.engine.process(Input { partition, key: m.key(), payload: m.payload() }, now);
        if let Outcome::DeadLetter { reason, detail } = outcome {
            debug!(partition, offset = m.offset(), %reason, %detail, "dead-lettering record");
            self.dead_letters.push(DeadLetter {
                reason,
                detail,
                source_topic: m.topic().to_owned(),
                source_partition: partition,
                source_offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                dead_lettered_at: now,
            });
        }
        self.offsets.insert(partition, m.offset() + 1);
    }

    /// Emits changed windows and pending dead letters, waits until Kafka
    /// acknowledged all of them, then commits the consumed offsets.
    async fn commit(&mut self, consumer: &StreamConsumer) -> anyhow::Result<usize> {
        let revisions = self.engine.flush(now_ms());
        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(revisions.len() + self.dead_letters.len());
        for a in &revisions {
            self.buf.clear();
            self.codec.encode_aggregate(a, &mut self.buf);
            let key = a.key.record_key();
            deliveries.push(
                send(&self.producer, FutureRecord::to(&self.cfg.topics.aggregates).key(key.as_str()).payload(self.buf.as_slice())).await?,
            );
        }
        for d in self.dead_letters.drain(..) {
            self.buf.clear();
            self.codec.encode_dead_letter(&d, &mut self.buf);
            let mut record = FutureRecord::to(&self.cfg.topics.dlq).payload(self.buf.as_slice());
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            deliveries.push(send(&self.producer, record).await?);
        }
        for f in deliveries {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(anyhow!("producing output failed, offsets not committed: {e}")),
                Err(_) => return Err(anyhow!("producer dropped output, offsets not committed")),
            }
        }
        if !self.offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (&p, &o) in &self.offsets {
                tpl.add_partition_offset(&self.cfg.topics.events, p, Offset::Offset(o)).context("building offset list")?;
            }
            consumer.commit(&tpl, CommitMode::Sync).context("committing offsets")?;
            self.offsets.clear();
        }
        Ok(revisions.len())
    }
}

/// Sends one record, waiting for queue space when the producer is full.
async fn send(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, impl rdkafka::message::ToBytes + ?Sized, [u8]>,
) -> anyhow::Result<DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((e, _)) => return Err(anyhow!("producing output: {e}")),
        }
    }
}

/// Runs the processor until `shutdown` is raised, or, when `drain` is
/// raised, until every assigned partition is consumed to its end and every
/// window is final and published. Returns the outcome counters.
/// What a processor run did.
#[derive(Debug, Clone, Default)]
pub struct ProcessorStats {
    pub counters: Counters,
    /// From the first record received to the last one handled: the span
    /// over which input was consumed (for throughput figures).
    pub busy: Duration,
    pub commits: u64,
}

impl ProcessorStats {
    pub fn records_per_second(&self) -> f64 {
        self.counters.total() as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

pub async fn run(cfg: &Config, shutdown: Signal, drain: Signal) -> anyhow::Result<ProcessorStats> {
    let catalog = cfg.catalog().context("loading catalog")?;
    let codec = Codec::new()?;
    let consumer: StreamConsumer = client_config(&cfg.kafka)
        .set("group.id", &cfg.processor.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating processor consumer")?;
    consumer.subscribe(&[&cfg.topics.events]).context("subscribing to events topic")?;
    let producer: FutureProducer = client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        .create()
        .context("creating processor producer")?;
    let mut r = Runner {
        cfg,
        codec: codec.clone(),
        engine: Engine::new(catalog, codec, engine_config(cfg)),
        producer,
        offsets: BTreeMap::new(),
        dead_letters: Vec::new(),
        buf: Vec::with_capacity(512),
    };
    let interval = Duration::from_millis(cfg.processor.commit_interval_ms);
    let mut next_commit = Instant::now() + interval;
    let mut stats = ProcessorStats::default();
    let (mut first_record, mut last_record): (Option<Instant>, Option<Instant>) = (None, None);
    info!(topic = %cfg.topics.events, group = %cfg.processor.group_id, "processor started");
    loop {
        if shutdown.is_raised() {
            r.commit(&consumer).await?;
            break;
        }
        let wait = next_commit.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        let mut idle = false;
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                r.handle(&m);
                let now = Instant::now();
                first_record.get_or_insert(now);
                last_record = Some(now);
            }
            Ok(Err(e)) => warn!(error = %e, "consumer error; librdkafka retries on its own"),
            Err(_) => idle = true,
        }
        if Instant::now() >= next_commit {
            let t = Instant::now();
            let emitted = r.commit(&consumer).await?;
            stats.commits += 1;
            debug!(emitted, handled = r.engine.counters().total(), commit_ms = t.elapsed().as_millis() as u64, "committed");
            next_commit = Instant::now() + interval;
            // Checking the high watermarks blocks on the broker, so only
            // when no record arrived for a while.
            if idle && drain.is_raised() && caught_up(&consumer) && r.engine.unsettled_windows() == 0 {
                break;
            }
        }
    }
    let c = r.engine.counters().clone();
    stats.counters = c.clone();
    stats.busy = match (first_record, last_record) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    info!(aggregated = c.aggregated, duplicates = c.duplicates, dead_lettered = c.dead_lettered(), "processor stopped");
    Ok(stats)
}

/// Dead-letter counts by reason, for printing.
pub fn reasons(c: &Counters) -> Vec<(DeadLetterReason, u64)> {
    c.dead_letters.iter().map(|(r, n)| (*r, *n)).collect()
}
