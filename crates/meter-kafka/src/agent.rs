//! Publishes the simulator's events to `usage.events` through an idempotent
//! producer.
//!
//! Guarantee: when [`run_simulated`] returns Ok, every event it generated
//! was acknowledged by all in-sync replicas exactly once (the idempotent
//! producer removes retry duplicates), and the returned ledger is their
//! ground truth. On Err, some events may not have been delivered.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use meter_agent::{SimConfig, Simulator};
use meter_avro::Codec;
use meter_config::Config;
use meter_model::ledger::Ledger;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::info;

use crate::client_config;

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
}

impl<'a> Publisher<'a> {
    pub fn new(producer: &'a FutureProducer, topic: &'a str) -> Self {
        Publisher { producer, topic, pending: VecDeque::new(), sent: 0 }
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

    /// Waits until every record sent so far is acknowledged.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.settle(0).await?;
        self.producer.flush(Duration::from_secs(30)).context("flushing producer")
    }

    async fn settle(&mut self, keep: usize) -> anyhow::Result<()> {
        while self.pending.len() > keep {
            let Some(f) = self.pending.pop_front() else { break };
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(anyhow!("delivery to {} failed: {e}", self.topic)),
                Err(_) => return Err(anyhow!("producer dropped an in-flight record")),
            }
        }
        Ok(())
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
    }
    out.finish().await?;
    stats.events = out.sent;
    stats.elapsed = started.elapsed();
    let ledger = sim.ledger().clone();
    if let Some(path) = ledger_path {
        std::fs::write(path, ledger.to_csv()).with_context(|| format!("writing ledger {}", path.display()))?;
    }
    info!(events = stats.events, seconds = stats.simulated_seconds, elapsed_ms = stats.elapsed.as_millis() as u64, "agent finished");
    Ok((stats, ledger))
}
