//! `meter sink`: `usage.aggregates` and `usage.dlq` -> ClickHouse, with the
//! row mapping ([`rows`]), its metrics ([`metrics`]) and the reconciliation
//! of ClickHouse and the topic against a ledger ([`reconcile`]).
//!
//! Guarantee: offsets are committed only after the batch holding every
//! record before them was inserted and acknowledged by ClickHouse. Inserting
//! a row twice is harmless: the tables are ReplacingMergeTree keyed by the
//! window (revision wins) or by the source position (dead letters). A failed
//! insert is retried with exponential backoff, keeping the batch, for as
//! long as it takes; nothing is consumed meanwhile. Past librdkafka's
//! `max.poll.interval.ms` without a poll the group drops the sink, its
//! offset commit fails and it exits; restarted, it inserts the batch again.

pub mod metrics;
pub mod reconcile;
pub mod rows;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_avro::Codec;
use meter_clickhouse::Connection;
use meter_config::{Config, Valid};
use meter_kafka::{fetch_queue_backoff_ms, observed_client_config, DrainProbe, Signal, StatsContext};
use meter_model::Granularity;
use meter_telemetry::kafka::KafkaMetrics;
use meter_telemetry::{Health, Telemetry};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::metrics::{BatchInserted, InsertFailed, SinkMetrics};
pub use crate::rows::{DeadLetterRow, UsageRow};

type SinkConsumer = StreamConsumer<StatsContext>;

#[derive(Debug, Clone, Default)]
pub struct SinkStats {
    pub usage_rows: u64,
    pub dead_letter_rows: u64,
    pub batches: u64,
    pub retries: u64,
    pub insert_time: Duration,
}

#[derive(Default)]
struct Batch {
    usage: BTreeMap<Granularity, Vec<UsageRow>>,
    dead_letters: Vec<DeadLetterRow>,
    offsets: BTreeMap<(String, i32), i64>,
    rows: usize,
    started: Option<Instant>,
}

/// One INSERT of `rows` into `table` (none if there are no rows).
async fn insert_rows<T>(client: &clickhouse::Client, table: &str, rows: &[T]) -> Result<(), clickhouse::error::Error>
where
    T: clickhouse::Row + clickhouse::RowWrite + for<'a> clickhouse::Row<Value<'a> = T>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<T>(table).await?;
    for row in rows {
        // Serializes into the insert's 256 KiB buffer; awaits only when a
        // full chunk goes to the socket.
        insert.write(row).await?;
    }
    insert.end().await
}

/// Inserts the batch: one INSERT per table, all at once, so that the server
/// parses them in parallel and their round trips overlap. The batch counts
/// as inserted only when every INSERT is acknowledged; if one fails, the
/// others are dropped (aborted) and the whole batch is retried, which
/// re-inserts rows that may already be in (harmless, see the module docs).
async fn insert_batch(client: &clickhouse::Client, batch: &Batch) -> Result<(), clickhouse::error::Error> {
    let rows = |g: Granularity| batch.usage.get(&g).map_or(&[][..], Vec::as_slice);
    let [minute, hour, day] = Granularity::ALL;
    tokio::try_join!(
        insert_rows(client, minute.table(), rows(minute)),
        insert_rows(client, hour.table(), rows(hour)),
        insert_rows(client, day.table(), rows(day)),
        insert_rows(client, "dead_letters", &batch.dead_letters),
    )?;
    Ok(())
}

/// Runs the sink until `shutdown`, or, once `drain` is raised, until this
/// instance owns every partition of both topics, has consumed each to its
/// end and everything is inserted.
pub async fn run(cfg: &Valid<Config>, shutdown: Signal, drain: Signal) -> anyhow::Result<SinkStats> {
    run_observed(cfg, shutdown, drain, Telemetry::new("sink")).await
}

/// [`run`], reporting metrics and health to `telemetry`. Ready while
/// inserts succeed; not ready while ClickHouse refuses them.
pub async fn run_observed(cfg: &Valid<Config>, shutdown: Signal, drain: Signal, telemetry: Telemetry) -> anyhow::Result<SinkStats> {
    let (codec, registry) = meter_kafka::registry::codec_for(cfg, &[])?;
    let conn = Connection::from(&cfg.clickhouse);
    let client = conn.writer()?;
    // A refusal (credentials, TLS, protocol) stops the sink at once, naming
    // the cause; a server that is down is waited for as before.
    meter_kafka::check_service_access(&cfg.kafka).await?;
    match conn.check(Duration::from_secs(10)).await {
        Err(e @ meter_clickhouse::Error::Refused(_)) => return Err(e.into()),
        Err(e) => tracing::warn!(error = %e, "ClickHouse does not answer yet; starting anyway and waiting for it"),
        Ok(()) => {}
    }
    let metrics = SinkMetrics::register(&telemetry);
    let health = telemetry.health();
    health.set_live_timeout(Duration::from_millis(cfg.metrics.liveness_timeout_ms));
    health.beat();
    let consumer: SinkConsumer = observed_client_config(cfg)
        .set("group.id", &cfg.sink.group_id)
        // Static membership: a restarted sink takes its partitions back at
        // once; without it they sat unread until the dead member's session
        // expired (45 s by librdkafka's default).
        .set("group.instance.id", &cfg.sink.instance_id)
        .set("session.timeout.ms", cfg.sink.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // As for the processor: librdkafka's 1 s default pauses a partition
        // whenever its local queue fills, which throttles a backlog.
        .set("fetch.queue.backoff.ms", fetch_queue_backoff_ms(&cfg.kafka))
        .create_with_context(StatsContext::new("consumer", KafkaMetrics::register(&telemetry)))
        .context("creating sink consumer")?;
    consumer.subscribe(&[&cfg.topics.aggregates, &cfg.topics.dlq]).context("subscribing sink")?;
    let mut stats = SinkStats::default();
    let mut batch = Batch::default();
    let max_wait = Duration::from_millis(cfg.sink.batch_ms);
    let mut drain_probe: Option<DrainProbe> = None;
    let mut drain_waiting_logged: Option<Instant> = None;
    info!(database = %cfg.clickhouse.database, "sink started");
    health.set_ready();
    loop {
        health.beat();
        if shutdown.is_raised() && batch.rows == 0 {
            break;
        }
        let wait =
            batch.started.map_or(Duration::from_millis(200), |s| max_wait.saturating_sub(s.elapsed())).min(Duration::from_millis(200));
        let mut idle = false;
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                let topic = m.topic().to_owned();
                let payload = m.payload().unwrap_or_default();
                learn_schema_id(registry.as_ref(), &codec, payload).await?;
                if topic == cfg.topics.aggregates {
                    match codec.decode_aggregate(payload) {
                        Ok(a) => batch.usage.entry(a.key.granularity).or_default().push(UsageRow::from(&a)),
                        Err(e) => return Err(undecodable(&m, "aggregate", e)),
                    }
                } else {
                    match codec.decode_dead_letter(payload) {
                        Ok(d) => batch.dead_letters.push(DeadLetterRow::from(d)),
                        Err(e) => return Err(undecodable(&m, "dead letter", e)),
                    }
                }
                batch.offsets.insert((topic, m.partition()), m.offset() + 1);
                batch.rows += 1;
                batch.started.get_or_insert_with(Instant::now);
            }
            Ok(Err(e)) => {
                if let Some(fatal) = meter_kafka::fatal(&consumer, "sink") {
                    return Err(fatal);
                }
                warn!(error = %e, "consumer error; librdkafka retries on its own");
            }
            Err(_) => idle = true,
        }
        let due = batch.rows >= cfg.sink.batch_rows || batch.started.is_some_and(|s| s.elapsed() >= max_wait);
        if due || (shutdown.is_raised() && batch.rows > 0) {
            flush(cfg, &client, &consumer, &mut batch, &mut stats, &shutdown, (health, &metrics)).await?;
        }
        // Checking the high watermarks blocks on the broker, so only when idle.
        if idle && drain.is_raised() && batch.rows == 0 {
            let probe = DrainProbe::in_slot(&mut drain_probe, &cfg.kafka, &cfg.sink.group_id).context("creating the drain probe")?;
            if drained(cfg, &consumer, probe, &mut drain_waiting_logged) {
                break;
            }
        }
    }
    health.set_not_ready("stopped");
    info!(usage_rows = stats.usage_rows, dead_letter_rows = stats.dead_letter_rows, batches = stats.batches, "sink stopped");
    Ok(stats)
}

/// The registry's answer for the schema id of a Confluent-framed record the
/// codec has not seen (once per id). An unreachable registry is an error:
/// the sink stops uncommitted and its supervisor restarts it.
async fn learn_schema_id(registry: Option<&meter_kafka::registry::Registry>, codec: &Codec, payload: &[u8]) -> anyhow::Result<()> {
    let (Some(registry), Some(id)) = (registry, meter_avro::confluent_id(payload)) else { return Ok(()) };
    if codec.store().knows_id(id) {
        return Ok(());
    }
    let (registry, store) = (registry.clone(), codec.store().clone());
    tokio::task::spawn_blocking(move || registry.learn_ids([id], &store)).await?.context("looking up a writer schema in the registry")?;
    Ok(())
}

/// A record the sink cannot decode stops it, uncommitted: skipping it would
/// leave its usage out of ClickHouse for good. The processor writes these
/// topics, so this means a schema the sink does not know (upgrade the sink
/// first, see the runbook) or a foreign producer on the topic.
fn undecodable(m: &rdkafka::message::BorrowedMessage<'_>, what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "undecodable {what} at {}/{} offset {}: {e}; the sink stops without committing it (is the sink older than the processor?)",
        m.topic(),
        m.partition(),
        m.offset()
    )
}

/// Draining is done when this instance owns every partition of both topics
/// and has consumed each to its end. Being caught up on its own assignment
/// is not enough: partitions held by another member, possibly a dead one
/// whose session has not expired yet, are nobody's to insert meanwhile.
fn drained(cfg: &Config, consumer: &SinkConsumer, probe: &DrainProbe, waiting_logged: &mut Option<Instant>) -> bool {
    match probe.assignment_coverage(consumer, &[&cfg.topics.aggregates, &cfg.topics.dlq]) {
        Some((owned, total)) if owned == total => probe.caught_up(consumer),
        coverage => {
            if waiting_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *waiting_logged = Some(Instant::now());
                let (owned, total) = coverage.unwrap_or_default();
                info!(owned, total, "draining: waiting to own every partition of both topics (stop the group's other sinks)");
            }
            false
        }
    }
}

async fn flush(
    cfg: &Config,
    client: &clickhouse::Client,
    consumer: &SinkConsumer,
    batch: &mut Batch,
    stats: &mut SinkStats,
    shutdown: &Signal,
    (health, metrics): (&Health, &SinkMetrics),
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(cfg.sink.backoff_ms);
    let started = Instant::now();
    loop {
        match insert_batch(client, batch).await {
            Ok(()) => break,
            Err(e) => {
                stats.retries += 1;
                let error = e.to_string();
                InsertFailed { error: &error, rows: batch.rows, retry_in: backoff }.emit(metrics);
                // Alive and retrying, but not doing its job.
                health.beat();
                health.set_not_ready(format!("ClickHouse inserts failing: {error}"));
                if shutdown.is_raised() {
                    anyhow::bail!("ClickHouse insert failed during shutdown; offsets not committed: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(cfg.sink.max_backoff_ms));
            }
        }
    }
    let insert_duration = started.elapsed();
    stats.insert_time += insert_duration;
    health.set_ready();
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), o) in &batch.offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).context("building offset list")?;
    }
    // The rows are in ClickHouse; a commit that fails (e.g. the coordinator
    // is still loading after a broker restart) is retried, and if it keeps
    // failing the process exits: the batch is then inserted again by the
    // next owner, which changes nothing (ReplacingMergeTree).
    let mut attempt = 0;
    loop {
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => break,
            Err(e) if attempt < 20 && !shutdown.is_raised() => {
                attempt += 1;
                warn!(error = %e, attempt, "committing sink offsets failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            }
            Err(e) => return Err(e).context("committing sink offsets"),
        }
    }
    stats.batches += 1;
    stats.usage_rows += batch.usage.values().map(|v| v.len() as u64).sum::<u64>();
    stats.dead_letter_rows += batch.dead_letters.len() as u64;
    let mut rows_by_table: Vec<(&str, u64)> = batch.usage.iter().map(|(g, rows)| (g.table(), rows.len() as u64)).collect();
    rows_by_table.push(("dead_letters", batch.dead_letters.len() as u64));
    BatchInserted { rows_by_table: &rows_by_table, duration: insert_duration }.emit(metrics);
    *batch = Batch::default();
    Ok(())
}
