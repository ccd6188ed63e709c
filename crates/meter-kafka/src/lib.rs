//! Kafka edges of meterline: topic setup, the simulated agent's producer,
//! the processor and sink runners, and reading back `usage.aggregates`.
//!
//! Each runner is thin: decoding, validation and aggregation live in
//! `meter-processor`, ClickHouse access in `meter-clickhouse`.

pub mod admin;
pub mod agent;
pub mod aggregates;
pub mod processor;
pub mod reconcile;
pub mod sink;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Duration;

use meter_config::KafkaConfig;
use rdkafka::consumer::Consumer;
use rdkafka::{ClientConfig, Offset};

/// Base client configuration: brokers plus pass-through properties.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// Milliseconds since the epoch from the wall clock.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A flag the orchestrator raises to tell a runner something: stop now
/// (shutdown) or stop once caught up (drain).
#[derive(Debug, Clone, Default)]
pub struct Signal(Arc<AtomicBool>);

impl Signal {
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// True when the consumer has an assignment and, for every assigned
/// partition, the next offset it would read (its position, else its
/// committed offset) is at the partition's high watermark. Blocking
/// metadata calls: use it for draining, not on the hot path.
pub fn caught_up<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(consumer: &C) -> bool {
    let timeout = Duration::from_secs(5);
    let Ok(assignment) = consumer.assignment() else { return false };
    if assignment.count() == 0 {
        return false;
    }
    let position = consumer.position().ok();
    let committed = consumer.committed(timeout).ok();
    assignment.elements().iter().all(|e| {
        let Ok((low, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout) else { return false };
        let next = |list: &Option<rdkafka::TopicPartitionList>| match list
            .as_ref()
            .and_then(|l| l.find_partition(e.topic(), e.partition()))
            .map(|x| x.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        match next(&position).or_else(|| next(&committed)) {
            Some(o) => o >= high,
            None => high == low,
        }
    })
}
