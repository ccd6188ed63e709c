//! Metrics of `meter agent`.

use prometheus::{IntCounter, IntGauge};

use crate::Telemetry;

#[derive(Clone)]
pub struct AgentMetrics {
    pub events_produced: IntCounter,
    pub events_spooled: IntCounter,
    pub events_replayed: IntCounter,
    pub events_dropped: IntCounter,
    pub spool_bytes: IntGauge,
    pub spool_limit_bytes: IntGauge,
    pub ticks_caught_up: IntCounter,
}

impl AgentMetrics {
    pub fn register(t: &Telemetry) -> Self {
        AgentMetrics {
            events_produced: t.counter("meter_agent_events_produced_total", "Events acknowledged by Kafka."),
            events_spooled: t.counter("meter_agent_events_spooled_total", "Events written to the on-disk spool."),
            events_replayed: t.counter("meter_agent_events_replayed_total", "Spooled events sent again once Kafka answered."),
            events_dropped: t.counter("meter_agent_events_dropped_total", "Events that could not be kept because the spool was full."),
            spool_bytes: t.gauge("meter_agent_spool_bytes", "Bytes held in the on-disk spool."),
            spool_limit_bytes: t.gauge("meter_agent_spool_limit_bytes", "Configured size limit of the spool."),
            ticks_caught_up: t
                .counter("meter_agent_ticks_caught_up_total", "One-second ticks emitted late, with their correct timestamps."),
        }
    }
}
