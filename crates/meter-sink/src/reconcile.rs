//! Reconciliation: ClickHouse and `usage.aggregates` against a ledger,
//! per key and to the unit. The topic is read back as a billing consumer
//! would ([`read_latest`]): from the beginning, read_committed, keeping the
//! highest revision of every window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meter_config::Config;
use meter_kafka::{assign_from_beginning, client_config, forget_reached};
use meter_model::ledger::{compare, Ledger, LedgerKey, Mismatch, Totals};
use meter_model::{AggregatedUsage, Granularity, WindowKey};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

/// Everything a reconciliation found.
pub struct Reconciliation {
    pub events: i64,
    pub keys: usize,
    pub mismatches: Vec<(String, Mismatch)>,
    pub final_windows: usize,
    pub windows: usize,
    /// Events aggregated according to the topic's minute windows.
    pub aggregated_events: i64,
    /// Windows whose latest revision is not final.
    pub not_final: Vec<meter_model::WindowKey>,
}

impl Reconciliation {
    pub fn summary(&self) -> String {
        if self.mismatches.is_empty() {
            format!("reconciliation: ok ({} events, {} keys, 0 mismatches)", self.events, self.keys)
        } else {
            format!("reconciliation: FAILED ({} events, {} keys, {} mismatches)", self.events, self.keys, self.mismatches.len())
        }
    }
}

/// Compares ClickHouse (minute, hour, day; latest revision per window) and
/// the latest revisions on the aggregates topic with the ledger, per key and
/// to the unit.
pub async fn reconcile(cfg: &Config, ledger: &Ledger) -> anyhow::Result<Reconciliation> {
    let expected = ledger.with_rollups();
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).client()?;
    let mut clickhouse = Ledger::default();
    for g in Granularity::ALL {
        clickhouse.merge(&meter_clickhouse::latest_totals(&client, g).await.with_context(|| format!("reading {}", g.table()))?);
    }
    let kafka_cfg = cfg.clone();
    let latest = tokio::task::spawn_blocking(move || read_latest(&kafka_cfg, Duration::from_secs(120))).await??;
    let mut mismatches: Vec<(String, Mismatch)> = Vec::new();
    mismatches.extend(compare(&expected, &clickhouse).into_iter().map(|m| ("clickhouse".to_owned(), m)));
    mismatches.extend(compare(&expected, &latest.totals()).into_iter().map(|m| (cfg.topics.aggregates.clone(), m)));
    Ok(Reconciliation {
        events: ledger.event_count(),
        keys: expected.entries.len(),
        mismatches,
        final_windows: latest.final_count(),
        windows: latest.windows.len(),
        not_final: latest.windows.values().filter(|a| !a.is_final).map(|a| a.key.clone()).collect(),
        aggregated_events: latest
            .windows
            .values()
            .filter(|a| a.key.granularity == meter_model::Granularity::Minute)
            .map(|a| a.event_count)
            .sum(),
    })
}

/// The highest revision of every window on the topic, and how many of them
/// are final.
#[derive(Debug, Default)]
pub struct LatestRevisions {
    pub windows: HashMap<WindowKey, AggregatedUsage>,
    pub records: u64,
}

impl LatestRevisions {
    /// Totals per ledger key (summed over resource_id).
    pub fn totals(&self) -> Ledger {
        let mut l = Ledger::default();
        for a in self.windows.values() {
            let k = &a.key;
            let key = LedgerKey {
                granularity: k.granularity,
                window_start: k.window_start,
                customer_id: k.customer_id.clone(),
                service: k.service.clone(),
                usage_type: k.usage_type.clone(),
                region: k.region.clone(),
            };
            l.entries.entry(key).or_default().add(Totals { event_count: a.event_count, quantity_sum: a.quantity_sum });
        }
        l
    }

    pub fn final_count(&self) -> usize {
        self.windows.values().filter(|a| a.is_final).count()
    }
}

/// Reads the whole aggregates topic up to its current end.
pub fn read_latest(cfg: &Config, timeout: Duration) -> anyhow::Result<LatestRevisions> {
    let (codec, registry) = meter_kafka::registry::codec_for(cfg, &[])?;
    let consumer: BaseConsumer = client_config(&cfg.kafka)
        .set("group.id", "meter-reconcile")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating reader")?;
    let topic = &cfg.topics.aggregates;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).context("fetching metadata")?;
    let partitions: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut ends = assign_from_beginning(&consumer, &consumer, topic, partitions).context("assigning the aggregates topic")?;
    let mut out = LatestRevisions::default();
    if ends.is_empty() {
        return Ok(out);
    }
    let deadline = Instant::now() + timeout;
    while !ends.is_empty() {
        if Instant::now() > deadline {
            bail!("timed out reading {topic}: partitions {:?} not read to their end", ends.keys().collect::<Vec<_>>());
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            // Markers at a partition's end are never delivered; a position
            // that cannot be read now is read again at the next idle poll.
            let _ = forget_reached(&consumer, topic, &mut ends);
            continue;
        };
        let m = m.context("reading aggregates")?;
        out.records += 1;
        if let (Some(registry), Some(id)) = (&registry, m.payload().and_then(meter_avro::confluent_id)) {
            registry.learn_ids([id], codec.store()).context("looking up a writer schema in the registry")?;
        }
        let a = codec
            .decode_aggregate(m.payload().unwrap_or_default())
            .with_context(|| format!("decoding aggregate at offset {}", m.offset()))?;
        match out.windows.get(&a.key) {
            Some(prev) if prev.revision >= a.revision => {}
            _ => {
                out.windows.insert(a.key.clone(), a);
            }
        }
        if ends.get(&m.partition()).is_some_and(|&h| m.offset() + 1 >= h) {
            ends.remove(&m.partition());
        }
    }
    Ok(out)
}
