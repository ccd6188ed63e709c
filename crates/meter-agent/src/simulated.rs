//! The in-memory simulated agent of the demo, the benchmark and the tests:
//! the fleet simulator published straight from memory, with no spool.
//!
//! Guarantee: when [`run_simulated`] returns Ok, every event it generated
//! was acknowledged by all in-sync replicas exactly once (the idempotent
//! producer removes retry duplicates), and the returned ledger is their
//! ground truth. On Err, some events may not have been delivered. For an
//! agent that survives Kafka outages and restarts, see [`crate::runtime`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_config::{Config, Valid};
use meter_kafka::publish::{producer, Publisher, Tuning};
use meter_model::ledger::Ledger;
use tracing::info;

use crate::metrics::{AgentMetrics, EventsAcknowledged, TicksEmitted};
use crate::sim::{SimConfig, Simulator};

/// What a simulated run published.
#[derive(Debug, Clone, Default)]
pub struct SimulatedRun {
    pub events: u64,
    pub simulated_seconds: u64,
    pub elapsed: Duration,
}

/// Runs the simulator to the end of its duration, pacing simulated seconds
/// at `speed` times real time (0 = as fast as possible), and writes the
/// ledger to `ledger_path` once everything is acknowledged.
pub async fn run_simulated(
    cfg: &Valid<Config>,
    sim_cfg: SimConfig,
    speed: f64,
    ledger_path: Option<&Path>,
) -> anyhow::Result<(SimulatedRun, Ledger)> {
    run_simulated_observed(cfg, sim_cfg, speed, ledger_path, &AgentMetrics::unserved()).await
}

/// [`run_simulated`], counting ticks and acknowledged events in `metrics`
/// after every simulated second (its liveness follows the loop).
pub async fn run_simulated_observed(
    cfg: &Valid<Config>,
    sim_cfg: SimConfig,
    speed: f64,
    ledger_path: Option<&Path>,
    metrics: &AgentMetrics,
) -> anyhow::Result<(SimulatedRun, Ledger)> {
    let producer = producer(&cfg.kafka, Tuning::bulk())?;
    let (codec, _) = meter_kafka::registry::codec_for(cfg, &[meter_kafka::registry::Writes::Events])?;
    let mut sim = Simulator::new(sim_cfg);
    let mut out = Publisher::new(&producer, &cfg.topics.events);
    let started = Instant::now();
    let mut run = SimulatedRun::default();
    let mut events = Vec::new();
    let mut payload = Vec::with_capacity(256);
    let mut acknowledged = 0;
    while sim.next_second(&mut events) {
        run.simulated_seconds += 1;
        if speed > 0.0 {
            let due = started + Duration::from_secs_f64(run.simulated_seconds as f64 / speed);
            tokio::time::sleep_until(due.into()).await;
        }
        TicksEmitted { ticks: 1, events: events.len() as u64 }.emit(metrics);
        for e in events.drain(..) {
            payload.clear();
            codec.encode_event(&e, &mut payload);
            out.send(Some(e.customer_id.as_bytes()), &payload).await?;
        }
        out.reap()?;
        EventsAcknowledged { events: out.acknowledged - acknowledged }.emit(metrics);
        acknowledged = out.acknowledged;
    }
    out.finish().await?;
    EventsAcknowledged { events: out.acknowledged - acknowledged }.emit(metrics);
    run.events = out.sent;
    run.elapsed = started.elapsed();
    let ledger = sim.ledger().clone();
    if let Some(path) = ledger_path {
        std::fs::write(path, ledger.to_csv()).with_context(|| format!("writing ledger {}", path.display()))?;
    }
    info!(events = run.events, seconds = run.simulated_seconds, elapsed_ms = run.elapsed.as_millis() as u64, "agent finished");
    Ok((run, ledger))
}
