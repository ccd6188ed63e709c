//! `[topics]`: the names and shape of meterline's topics.

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Usage events published by agents, keyed by customer_id.
    #[serde(default = "default_events_topic")]
    pub events: String,
    /// Window revisions published by the processor, keyed by window key.
    #[serde(default = "default_aggregates_topic")]
    pub aggregates: String,
    /// Records the processor refused, with the reason and original bytes.
    #[serde(default = "default_dlq_topic")]
    pub dlq: String,
    /// The processor's state changelog (compacted, internal; one partition
    /// per events partition). Empty: `{processor.group_id}-state`, so that
    /// every processor group has its own. Use [`crate::Config::state_topic`].
    #[serde(default)]
    pub state: String,
    /// Monthly invoice lines published by `meter rate` (Avro InvoiceLine,
    /// keyed by line id, compacted: the latest value of a line id wins).
    #[serde(default = "default_invoice_lines_topic")]
    pub invoice_lines: String,
    /// Closed months published by `meter close` (Avro PeriodClose, keyed
    /// `<month>/<customer_id>`, compacted): a customer's invoice is final.
    #[serde(default = "default_period_close_topic")]
    pub period_close: String,
    /// The agents' leases (compacted, keyed by agent id and incarnation):
    /// written by each agent's transactional lease producer, which Kafka
    /// fences when a second instance of the same identity starts.
    #[serde(default = "default_agents_topic")]
    pub agents: String,
    /// Partitions used when `meter init` creates the topics.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor used when `meter init` creates the topics.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
}

fn default_events_topic() -> String {
    "usage.events".into()
}
fn default_aggregates_topic() -> String {
    "usage.aggregates".into()
}
fn default_dlq_topic() -> String {
    "usage.dlq".into()
}
fn default_invoice_lines_topic() -> String {
    "billing.invoice_lines".into()
}
fn default_period_close_topic() -> String {
    "billing.period_close".into()
}
fn default_agents_topic() -> String {
    "usage.agents".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    1
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            events: default_events_topic(),
            aggregates: default_aggregates_topic(),
            dlq: default_dlq_topic(),
            state: String::new(),
            invoice_lines: default_invoice_lines_topic(),
            period_close: default_period_close_topic(),
            agents: default_agents_topic(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
        }
    }
}

impl Section for TopicsConfig {
    const NAME: &'static str = "topics";

    fn check(&self, p: &mut Problems) {
        p.check(self.partitions > 0, "topics.partitions must be positive");
        p.check(self.replication_factor > 0, "topics.replication_factor must be positive");
        for (name, t) in [
            ("events", &self.events),
            ("aggregates", &self.aggregates),
            ("dlq", &self.dlq),
            ("invoice_lines", &self.invoice_lines),
            ("period_close", &self.period_close),
            ("agents", &self.agents),
        ] {
            p.check(!t.is_empty(), &format!("topics.{name} must not be empty"));
        }
    }
}
