//! librdkafka statistics that matter to an operator, per client.
//!
//! The Kafka edge turns librdkafka's periodic statistics (every
//! `statistics.interval.ms`) into a [`ClientSample`]; this crate stays free
//! of the Kafka client.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec};

use crate::Telemetry;

#[derive(Clone)]
pub struct KafkaMetrics {
    pub messages_queued: IntGaugeVec,
    pub requests: IntCounterVec,
    pub broker_rtt: GaugeVec,
    pub broker_up: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
}

/// One statistics report of a client.
#[derive(Debug, Default)]
pub struct ClientSample {
    /// `producer` or `consumer`.
    pub client: &'static str,
    pub messages_queued: i64,
    /// Requests sent and responses received since the client started.
    pub tx: u64,
    pub rx: u64,
    /// (broker name, average round trip in microseconds, state is UP).
    pub brokers: Vec<(String, i64, bool)>,
    /// (topic, partition, records behind the high watermark) of partitions
    /// this client consumes.
    pub lag: Vec<(String, i32, i64)>,
}

impl KafkaMetrics {
    pub fn register(t: &Telemetry) -> Self {
        KafkaMetrics {
            messages_queued: t.gauge_vec("meter_kafka_client_messages_queued", "Messages waiting in librdkafka's queues.", &["client"]),
            requests: t.counter_vec(
                "meter_kafka_client_requests_total",
                "Requests sent (tx) and responses received (rx) by librdkafka.",
                &["client", "direction"],
            ),
            broker_rtt: t.float_gauge_vec("meter_kafka_broker_rtt_seconds", "Average broker round-trip time.", &["client", "broker"]),
            broker_up: t.gauge_vec("meter_kafka_broker_up", "1 when librdkafka's connection to the broker is up.", &["client", "broker"]),
            consumer_lag: t.gauge_vec(
                "meter_consumer_lag_records",
                "Records between the consumer's position and the high watermark, per consumed partition.",
                &["topic", "partition"],
            ),
        }
    }

    pub fn observe(&self, s: &ClientSample) {
        self.messages_queued.with_label_values(&[s.client]).set(s.messages_queued);
        for (direction, total) in [("tx", s.tx), ("rx", s.rx)] {
            let c = self.requests.with_label_values(&[s.client, direction]);
            // librdkafka reports totals; a restarted client starts again at 0.
            c.inc_by(total.saturating_sub(c.get()));
        }
        for (broker, rtt_us, up) in &s.brokers {
            self.broker_rtt.with_label_values(&[s.client, broker]).set(*rtt_us as f64 / 1e6);
            self.broker_up.with_label_values(&[s.client, broker]).set(i64::from(*up));
        }
        if s.client == "consumer" {
            // Each report lists every consumed partition: forget revoked ones.
            self.consumer_lag.reset();
            for (topic, partition, lag) in &s.lag {
                self.consumer_lag.with_label_values(&[topic.as_str(), &partition.to_string()]).set(*lag);
            }
        }
    }
}
