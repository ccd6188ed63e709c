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

async fn settle(pending: &mut VecDeque<DeliveryFuture>, keep: usize) -> anyhow::Result<()> {
    while pending.len() > keep {
        let Some(f) = pending.pop_front() else { break };
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(anyhow!("event delivery failed: {e}")),
            Err(_) => return Err(anyhow!("producer dropped an in-flight event")),
        }
    }
    Ok(())
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
    let topic = cfg.topics.events.as_str();
    let started = Instant::now();
    let mut stats = AgentStats::default();
    let mut events = Vec::new();
    let mut payload = Vec::with_capacity(256);
    let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
    while sim.next_second(&mut events) {
        stats.simulated_seconds += 1;
        if speed > 0.0 {
            let due = started + Duration::from_secs_f64(stats.simulated_seconds as f64 / speed);
            tokio::time::sleep_until(due.into()).await;
        }
        for e in events.drain(..) {
            payload.clear();
            codec.encode_event(&e, &mut payload);
            let mut record = FutureRecord::to(topic).key(e.customer_id.as_str()).payload(payload.as_slice());
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push_back(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        let keep = pending.len() / 2;
                        settle(&mut pending, keep).await?;
                        if pending.is_empty() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err((e, _)) => return Err(anyhow!("producing event: {e}")),
                }
            }
            stats.events += 1;
            if pending.len() >= MAX_IN_FLIGHT {
                settle(&mut pending, MAX_IN_FLIGHT / 2).await?;
            }
        }
    }
    settle(&mut pending, 0).await?;
    producer.flush(Duration::from_secs(30)).context("flushing producer")?;
    stats.elapsed = started.elapsed();
    let ledger = sim.ledger().clone();
    if let Some(path) = ledger_path {
        std::fs::write(path, ledger.to_csv()).with_context(|| format!("writing ledger {}", path.display()))?;
    }
    info!(events = stats.events, seconds = stats.simulated_seconds, elapsed_ms = stats.elapsed.as_millis() as u64, "agent finished");
    Ok((stats, ledger))
}
