//! Kafka plumbing shared by every stage: client settings from
//! configuration, librdkafka statistics as metrics and rebalance logs
//! ([`StatsContext`]), topic setup ([`admin`]), producing with backpressure
//! ([`publish`]), reading a topic whole ([`assign_from_beginning`],
//! [`forget_reached`]) and the drain checks ([`DrainProbe`]). The stages
//! (`meter-agent`, `meter-processor`, `meter-sink`, `meter rate`) build on
//! it; nothing here knows their payloads.

pub mod access;
pub mod admin;
pub mod publish;
pub mod registry;

pub use access::{check_access, check_access_async, check_service_access, AccessError};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Duration;

use meter_config::{Config, KafkaConfig};
use meter_telemetry::kafka::{ClientSample, KafkaMetrics};
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList};

/// Base client configuration: brokers plus pass-through properties.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// [`client_config`] for a producer: keys go to the partition the key
/// contract gives them (`kafka.partitioner`, Java's murmur2 by default:
/// whichever client writes a customer's events, they land on one partition).
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(kafka);
    c.set("partitioner", kafka.partitioner.librdkafka());
    c
}

/// [`client_config`] plus librdkafka statistics every
/// `metrics.kafka_statistics_interval_ms`, for a client whose context is a
/// [`StatsContext`] (or another context that reports them).
pub fn observed_client_config(cfg: &Config) -> ClientConfig {
    let mut c = client_config(&cfg.kafka);
    if cfg.metrics.kafka_statistics_interval_ms > 0 {
        c.set("statistics.interval.ms", cfg.metrics.kafka_statistics_interval_ms.to_string());
    }
    c
}

/// A client context that turns librdkafka's statistics into the
/// `meter_kafka_*` and `meter_consumer_lag_records` metrics.
#[derive(Clone)]
pub struct StatsContext {
    client: &'static str,
    metrics: KafkaMetrics,
}

impl StatsContext {
    /// `client` is `producer` or `consumer`.
    pub fn new(client: &'static str, metrics: KafkaMetrics) -> Self {
        StatsContext { client, metrics }
    }

    pub fn observe(&self, s: &Statistics) {
        self.metrics.observe(&sample(self.client, s));
    }
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        self.observe(&statistics);
    }
}

/// Rebalances are logged: which partitions an instance owns is the first
/// thing an operator asks when input stops moving.
impl ConsumerContext for StatsContext {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        use rdkafka::consumer::Rebalance;
        let list = |tpl: &TopicPartitionList| -> Vec<String> {
            tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(partitions = ?list(tpl), "partitions assigned"),
            Rebalance::Revoke(tpl) => tracing::info!(partitions = ?list(tpl), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

/// Delivery failures surface where they matter: in `commit_transaction` for
/// the processor, in the agent's own delivery handling.
impl rdkafka::producer::ProducerContext for StatsContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// What [`KafkaMetrics`] needs from one statistics report.
fn sample(client: &'static str, s: &Statistics) -> ClientSample {
    ClientSample {
        client,
        messages_queued: i64::try_from(s.msg_cnt).unwrap_or(i64::MAX),
        tx: u64::try_from(s.tx).unwrap_or(0),
        rx: u64::try_from(s.rx).unwrap_or(0),
        // Only brokers learned from metadata: the bootstrap entry and the
        // logical coordinator entries would duplicate them.
        brokers: s
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0 && b.source == "learned")
            .map(|b| (b.name.clone(), b.rtt.as_ref().map_or(0, |w| w.avg), b.state == "UP"))
            .collect(),
        lag: s
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.consumer_lag >= 0 && p.fetch_state != "none")
                    .map(move |p| (topic.clone(), p.partition, p.consumer_lag))
            })
            .collect(),
    }
}

/// librdkafka's `fetch.queue.backoff.ms` for consumers that must keep up
/// with a backlog, unless `kafka.properties` sets it (perf, issue 6). Its
/// default (1000 ms) pauses fetching a partition for a whole second each
/// time its local queue passes `queued.min.messages`: on a backlog that
/// capped the processor, and a bare consumer, at about 250k records/s.
pub fn fetch_queue_backoff_ms(kafka: &KafkaConfig) -> String {
    kafka.properties.get("fetch.queue.backoff.ms").cloned().unwrap_or_else(|| "10".into())
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

/// Assigns `consumer` every partition of `topic` among `partitions` that
/// holds records, from its beginning, and returns the high watermark of each
/// as `watermarks` answers it now: where reading it whole ends. Empty
/// partitions are left out; nothing is assigned when all are empty.
pub fn assign_from_beginning<C: Consumer<X>, X: ConsumerContext, W: Consumer<Y>, Y: ConsumerContext>(
    consumer: &C,
    watermarks: &W,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> rdkafka::error::KafkaResult<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in partitions {
        let (low, high) = watermarks.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            ends.insert(p, high);
        }
    }
    if !ends.is_empty() {
        consumer.assign(&tpl)?;
    }
    Ok(ends)
}

/// Forgets the partitions of `ends` that `consumer`'s position has reached.
/// Positions pass transaction markers, which occupy offsets but are never
/// delivered, so this is how a read_committed reader knows it is at the end.
pub fn forget_reached<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    topic: &str,
    ends: &mut BTreeMap<i32, i64>,
) -> rdkafka::error::KafkaResult<()> {
    let position = consumer.position()?;
    ends.retain(|&p, &mut high| !matches!(position.find_partition(topic, p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= high));
    Ok(())
}

/// The consumer's fatal error, if librdkafka raised one: the client is
/// unusable then, and retrying would only stall. The usual cause is a second
/// live instance with the same `instance_id` in the group (static
/// membership fences the older one).
pub fn fatal<C: Consumer<X>, X: ConsumerContext>(consumer: &C, what: &str) -> Option<anyhow::Error> {
    consumer.client().fatal_error().map(|(code, reason)| {
        anyhow::anyhow!(
            "fatal Kafka error in the {what} consumer: {code:?}: {reason} (is another instance running with the same instance_id?)"
        )
    })
}

/// The client that answers a drain's questions (partition counts, watermarks,
/// committed offsets) for a consumer in `group`, over its own connection.
/// Asked on the consumer's own connection, each of those requests queues
/// behind the fetch the broker holds open for up to `fetch.wait.max.ms`
/// (500 ms), and a drain check asks one per partition: with 12 partitions
/// a check took 6 s. It reads with `read_committed` like the consumers it
/// serves, so "the end" of a partition is its last stable offset.
pub struct DrainProbe {
    client: rdkafka::consumer::BaseConsumer,
}

impl DrainProbe {
    /// A probe for the consumers of `group` (it never joins the group).
    pub fn new(kafka: &KafkaConfig, group: &str) -> rdkafka::error::KafkaResult<Self> {
        let client = client_config(kafka).set("group.id", group).set("isolation.level", "read_committed").create()?;
        Ok(DrainProbe { client })
    }

    /// The probe in `slot`, created there on first use (most runs never
    /// drain, and a probe is a client with its own threads).
    pub fn in_slot<'a>(slot: &'a mut Option<DrainProbe>, kafka: &KafkaConfig, group: &str) -> rdkafka::error::KafkaResult<&'a DrainProbe> {
        Ok(match slot.take() {
            Some(p) => slot.insert(p),
            None => slot.insert(DrainProbe::new(kafka, group)?),
        })
    }

    /// How many partitions `topics` have, and how many of them are assigned
    /// to `consumer`; `None` when the metadata or the assignment cannot be
    /// read.
    pub fn assignment_coverage<C: Consumer<X>, X: ConsumerContext>(&self, consumer: &C, topics: &[&str]) -> Option<(usize, usize)> {
        let assignment = consumer.assignment().ok()?;
        let (mut owned, mut total) = (0, 0);
        for topic in topics {
            let metadata = self.client.fetch_metadata(Some(topic), PROBE_TIMEOUT).ok()?;
            let t = metadata.topics().iter().find(|t| t.name() == *topic)?;
            for p in t.partitions() {
                total += 1;
                owned += usize::from(assignment.find_partition(topic, p.id()).is_some());
            }
        }
        Some((owned, total))
    }

    /// True when `consumer` has an assignment and, for every assigned
    /// partition, the next offset it would read (its position, else the
    /// group's committed offset) is at the partition's end. Blocking: for
    /// draining, not for the hot path.
    pub fn caught_up<C: Consumer<X>, X: ConsumerContext>(&self, consumer: &C) -> bool {
        let Ok(assignment) = consumer.assignment() else { return false };
        if assignment.count() == 0 {
            return false;
        }
        let next = |list: &TopicPartitionList, topic: &str, partition: i32| match list.find_partition(topic, partition).map(|x| x.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let Ok(position) = consumer.position() else { return false };
        let mut committed: Option<TopicPartitionList> = None;
        for e in assignment.elements() {
            let Ok((low, high)) = self.client.fetch_watermarks(e.topic(), e.partition(), PROBE_TIMEOUT) else { return false };
            let mut at = next(&position, e.topic(), e.partition());
            if at.is_none() {
                // Not fetched yet: where the group would start it.
                if committed.is_none() {
                    match self.client.committed_offsets(assignment.clone(), PROBE_TIMEOUT) {
                        Ok(c) => committed = Some(c),
                        Err(_) => return false,
                    }
                }
                at = committed.as_ref().and_then(|c| next(c, e.topic(), e.partition()));
            }
            let done = match at {
                Some(o) => o >= high,
                None => high == low,
            };
            if !done {
                return false;
            }
        }
        true
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
