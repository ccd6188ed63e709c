//! Integration tests against the real local Kafka and ClickHouse that
//! `ops/up` starts (each test on its own topics, groups and database).
//! They fail, rather than skip, when the stack is not running.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meter_agent::{self as agent, SimConfig};
use meter_avro::Codec;
use meter_clickhouse::Connection;
use meter_config::{Config, Valid};
use meter_kafka::{admin, Signal};
use meter_model::{DeadLetterReason, Granularity, UsageEvent};
use meter_sink::{self as sink, reconcile};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const DAY_MS: i64 = 86_400_000;

/// A configuration with topics, groups and a database no other test uses.
fn unique_config(name: &str) -> Valid<Config> {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{}_{}_{}", name, std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut cfg = Config::default().scoped(&format!("test-{id}"));
    cfg.topics.partitions = 3;
    cfg.processor.idle_timeout_ms = 1_000;
    cfg.processor.commit_interval_ms = 300;
    cfg.sink.batch_ms = 300;
    cfg.validate().unwrap()
}

async fn setup(cfg: &Config) {
    admin::ensure_topics(cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&Connection::from(&cfg.clickhouse)).await.expect("ClickHouse must be running (ops/up)");
}

fn past_midnight() -> i64 {
    let now = meter_model::now_ms();
    now - now.rem_euclid(DAY_MS) - 2 * DAY_MS
}

/// A simulated fleet: `customers` customers of agent `agent_id` for
/// `duration_s` simulated seconds from `start`.
fn fleet(seed: u64, customers: usize, agent_id: &str, start: i64, duration_s: u64) -> SimConfig {
    SimConfig { seed, customers, agent_id: agent_id.into(), start, duration_s, customer_prefix: "cust-".into() }
}

struct Running {
    processor: tokio::task::JoinHandle<anyhow::Result<meter_processor::ProcessorStats>>,
    sink: tokio::task::JoinHandle<anyhow::Result<sink::SinkStats>>,
    proc_drain: Signal,
    sink_drain: Signal,
}

fn start(cfg: &Arc<Valid<Config>>) -> Running {
    let (proc_drain, sink_drain) = (Signal::default(), Signal::default());
    let processor = tokio::spawn({
        let (cfg, drain) = (cfg.clone(), proc_drain.clone());
        async move { meter_processor::run(&cfg, Signal::default(), drain).await }
    });
    let sink = tokio::spawn({
        let (cfg, drain) = (cfg.clone(), sink_drain.clone());
        async move { sink::run(&cfg, Signal::default(), drain).await }
    });
    Running { processor, sink, proc_drain, sink_drain }
}

impl Running {
    async fn drain(self) -> (meter_engine::Counters, sink::SinkStats) {
        self.proc_drain.raise();
        let counters =
            tokio::time::timeout(Duration::from_secs(120), self.processor).await.expect("processor drains").unwrap().unwrap().counters;
        self.sink_drain.raise();
        let stats = tokio::time::timeout(Duration::from_secs(120), self.sink).await.expect("sink drains").unwrap().unwrap();
        (counters, stats)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_equals_clickhouse_and_final_revisions_on_the_topic() {
    let cfg = Arc::new(unique_config("e2e"));
    setup(&cfg).await;
    let running = start(&cfg);
    // Two simulated hours across a day boundary... of the same past day:
    // minute, hour and day windows all get several revisions.
    let sim = fleet(7, 5, "it-1", past_midnight() + 22 * 3_600_000, 2 * 3600);
    let (stats, ledger) = agent::run_simulated(&cfg, sim, 0.0, None).await.unwrap();
    let (counters, sink_stats) = running.drain().await;

    assert_eq!(counters.aggregated, stats.events);
    assert_eq!(counters.total(), stats.events);
    assert!(sink_stats.usage_rows > 0);
    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    for (source, m) in &rec.mismatches {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{} mismatches", rec.mismatches.len());
    assert_eq!(rec.events, stats.events as i64);
    assert_eq!(rec.windows, rec.final_windows, "every window of a closed past period must be final");
    for g in Granularity::ALL {
        assert!(ledger.with_rollups().entries.keys().any(|k| k.granularity == g));
    }
    // The ledger is not trivially equal: a changed ledger must mismatch.
    let mut wrong = ledger.clone();
    if let Some(t) = wrong.entries.values_mut().next() {
        t.quantity_sum += 1;
    }
    let rec = reconcile::reconcile(&cfg, &wrong).await.unwrap();
    assert_eq!(rec.mismatches.len(), 2 * 3, "one minute key off changes its minute, hour and day in both sources");
}

fn encode(e: &UsageEvent) -> Vec<u8> {
    let mut buf = Vec::new();
    Codec::new().unwrap().encode_event(e, &mut buf);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_reasons_and_totals_stay_exact() {
    let cfg = Arc::new(unique_config("bad"));
    setup(&cfg).await;
    let running = start(&cfg);

    let t = past_midnight() + 3_600_000;
    let good = UsageEvent {
        event_id: "bad-test/cust-0001/1".into(),
        agent_id: "bad-test".into(),
        seq: Some(1),
        customer_id: "cust-0001".into(),
        service: "compute".into(),
        usage_type: "BoxUsage:m5.large".into(),
        resource_id: "i-1".into(),
        region: "us-east-1".into(),
        quantity: 1,
        event_time: t,
        attributes: Default::default(),
        incarnation: String::new(),
    };
    let bad: Vec<(DeadLetterReason, Vec<u8>)> = vec![
        // Not 0x00 first: that is the Confluent framing (an unknown schema id).
        (DeadLetterReason::BadMagic, b"{\"not\": \"avro\"}".to_vec()),
        (DeadLetterReason::UnknownUsageType, encode(&UsageEvent { usage_type: "BoxUsage:x99.mega".into(), seq: Some(2), ..good.clone() })),
        (DeadLetterReason::NegativeQuantity, encode(&UsageEvent { quantity: -40, seq: Some(3), ..good.clone() })),
        (DeadLetterReason::EmptyCustomerId, encode(&UsageEvent { customer_id: String::new(), seq: Some(4), ..good.clone() })),
    ];
    let producer: FutureProducer = meter_kafka::publish::producer(&cfg.kafka, meter_kafka::publish::Tuning::bulk()).unwrap();
    // Bad records first: the processor must keep going past them.
    for (_, payload) in &bad {
        producer
            .send(FutureRecord::to(&cfg.topics.events).key("cust-0001").payload(payload.as_slice()), Duration::from_secs(10))
            .await
            .unwrap();
    }
    let sim = fleet(3, 3, "it-2", past_midnight(), 600);
    let (stats, ledger) = agent::run_simulated(&cfg, sim, 0.0, None).await.unwrap();
    let (counters, sink_stats) = running.drain().await;

    assert_eq!(counters.aggregated, stats.events);
    assert_eq!(counters.dead_lettered(), bad.len() as u64);
    for (reason, _) in &bad {
        assert_eq!(counters.dead_letters.get(reason), Some(&1), "{reason}");
    }
    assert_eq!(sink_stats.dead_letter_rows, bad.len() as u64);

    // usage.dlq holds each original payload with its reason.
    let codec = Codec::new().unwrap();
    let consumer: BaseConsumer =
        meter_kafka::client_config(&cfg.kafka).set("group.id", "dlq-reader").set("isolation.level", "read_committed").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..cfg.topics.partitions {
        tpl.add_partition_offset(&cfg.topics.dlq, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut found = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while found.len() < bad.len() && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let d = codec.decode_dead_letter(m.unwrap().payload().unwrap()).unwrap();
            found.push((d.reason, d.payload, d.source_topic));
        }
    }
    found.sort();
    let mut expected: Vec<(String, Vec<u8>, String)> =
        bad.iter().map(|(r, p)| (r.to_string(), p.clone(), cfg.topics.events.clone())).collect();
    expected.sort();
    assert_eq!(found, expected);

    // ClickHouse has them too, by reason.
    let client = Connection::from(&cfg.clickhouse).client().unwrap();
    let mut reasons: Vec<String> = client.query("SELECT reason FROM dead_letters FINAL ORDER BY reason").fetch_all().await.unwrap();
    reasons.sort();
    let mut want: Vec<String> = bad.iter().map(|(r, _)| r.to_string()).collect();
    want.sort();
    assert_eq!(reasons, want);

    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_to_the_local_server_and_are_idempotent() {
    let cfg = unique_config("migrate");
    let conn = Connection::from(&cfg.clickhouse);
    let first = meter_clickhouse::migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    assert_eq!(first.len(), meter_clickhouse::MIGRATIONS.len());
    let second = meter_clickhouse::migrate(&conn).await.unwrap();
    assert!(second.is_empty(), "{second:?}");
    let client = conn.client().unwrap();
    let tables: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(cfg.clickhouse.database.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        vec![
            "closed_periods",
            "credit_ledger",
            "dead_letters",
            "invoice_lines",
            "invoices",
            "price_book",
            "rated_usage",
            "schema_migrations",
            "usage_day",
            "usage_hour",
            "usage_minute"
        ]
    );
}

#[test]
fn migrations_apply_to_current_clickhouse_through_chdb() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/tests/sql/check_chdb.py"))
        .arg(format!("{root}/schemas/clickhouse"))
        .output()
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chdb check failed (ops/install installs chdb):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("chdb: ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_agents_are_dead_lettered_and_totals_stay_exact() {
    let mut cfg = unique_config("auth").into_inner();
    let sim = |seed, agent_id: &str| fleet(seed, 3, agent_id, past_midnight() + 5 * 3_600_000, 300);
    let customers = meter_agent::Simulator::new(sim(1, "x")).customers().to_vec();
    let first = customers[0].clone();
    // it-legit may publish for all three customers, it-narrow only for the
    // first; it-rogue is not registered at all.
    cfg.processor.agents.insert("it-legit".into(), customers.clone());
    cfg.processor.agents.insert("it-narrow".into(), vec![first.clone()]);
    let cfg = Arc::new(cfg.validate().unwrap());
    setup(&cfg).await;
    let running = start(&cfg);

    let (legit, legit_ledger) = agent::run_simulated(&cfg, sim(21, "it-legit"), 0.0, None).await.unwrap();
    let (rogue, _) = agent::run_simulated(&cfg, sim(22, "it-rogue"), 0.0, None).await.unwrap();
    let (narrow, narrow_ledger) = agent::run_simulated(&cfg, sim(23, "it-narrow"), 0.0, None).await.unwrap();
    let (counters, _) = running.drain().await;

    // Only the first customer's share of it-narrow's usage counts.
    let mut expected = legit_ledger.clone();
    let narrow_allowed = meter_model::ledger::Ledger {
        entries: narrow_ledger.entries.iter().filter(|(k, _)| k.customer_id == first).map(|(k, t)| (k.clone(), *t)).collect(),
    };
    expected.merge(&narrow_allowed);
    let narrow_refused = narrow.events - u64::try_from(narrow_allowed.event_count()).unwrap();
    assert!(narrow_refused > 0 && narrow_allowed.event_count() > 0, "the narrow agent must publish on both sides of its registration");

    let unauthorized = rogue.events + narrow_refused;
    assert_eq!(counters.dead_letters.get(&DeadLetterReason::Unauthorized), Some(&unauthorized));
    assert_eq!(counters.dead_lettered(), unauthorized, "nothing else was refused");
    assert_eq!(counters.aggregated, legit.events + narrow.events - narrow_refused);

    let client = Connection::from(&cfg.clickhouse).client().unwrap();
    let in_clickhouse: u64 =
        client.query("SELECT count() FROM dead_letters FINAL WHERE reason = ?").bind("unauthorized").fetch_one().await.unwrap();
    assert_eq!(in_clickhouse, unauthorized);
    let rec = reconcile::reconcile(&cfg, &expected).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, expected.event_count());
}

/// A draining sink must not stop while another member of its group holds
/// partitions (in production: a dead sink whose session has not expired):
/// caught up on its own share is not done. Once the other member leaves, it
/// takes over, inserts the rest and only then stops, with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_sink_waits_for_partitions_another_member_holds() {
    let cfg = Arc::new(unique_config("drain"));
    setup(&cfg).await;
    let processor_drain = Signal::default();
    let processor = tokio::spawn({
        let (cfg, drain) = (cfg.clone(), processor_drain.clone());
        async move { meter_processor::run(&cfg, Signal::default(), drain).await }
    });
    let sim = fleet(11, 6, "it-drain", past_midnight() + 3_600_000, 600);
    let (_, ledger) = agent::run_simulated(&cfg, sim, 0.0, None).await.unwrap();
    processor_drain.raise();
    tokio::time::timeout(Duration::from_secs(120), processor).await.expect("processor drains").unwrap().unwrap();

    // Another member of the sink group that holds its share and never
    // commits: it polls (so it stays in the group and takes part in the
    // rebalance) until told to leave.
    let leave = Signal::default();
    let (assigned_tx, assigned_rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn({
        let (cfg, leave) = (cfg.clone(), leave.clone());
        move || {
            let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka)
                .set("group.id", &cfg.sink.group_id)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            consumer.subscribe(&[&cfg.topics.aggregates, &cfg.topics.dlq]).unwrap();
            let mut told = false;
            while !leave.is_raised() {
                let _ = consumer.poll(Duration::from_millis(100));
                if !told && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                    told = true;
                    assigned_tx.send(()).unwrap();
                }
            }
            // Dynamic member: closing sends LeaveGroup, the sink gets its share.
            drop(consumer);
        }
    });
    assigned_rx.recv_timeout(Duration::from_secs(60)).expect("the other member gets partitions");

    let sink_drain = Signal::default();
    sink_drain.raise();
    let sink = tokio::spawn({
        let (cfg, drain) = (cfg.clone(), sink_drain.clone());
        async move { sink::run(&cfg, Signal::default(), drain).await }
    });
    // Wait until the sink has inserted its share and the row count stands
    // still for 3 s: a sink that drained only its own partitions has
    // stopped by then.
    let client = Connection::from(&cfg.clickhouse).client().unwrap();
    let rows = || async { client.query("SELECT count() FROM usage_minute").fetch_one::<u64>().await.unwrap() };
    let (mut last, mut still_since) = (0u64, std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rows().await;
        if now != last {
            (last, still_since) = (now, std::time::Instant::now());
        } else if last > 0 && still_since.elapsed() >= Duration::from_secs(3) {
            break;
        }
        assert!(still_since.elapsed() < Duration::from_secs(90), "the sink inserted nothing");
    }
    assert!(!sink.is_finished(), "the draining sink stopped while another member held partitions: {:?}", sink.await);
    let partial = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    assert!(!partial.mismatches.is_empty(), "the other member's share must still be missing");

    leave.raise();
    other.join().unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(120), sink).await.expect("sink drains").unwrap().unwrap();
    assert!(stats.usage_rows > 0);
    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

/// A record near Kafka's size limit (here a 500 KB key and a 400 KB payload)
/// is dead-lettered with its bytes truncated, saying so: whole, the dead
/// letter (key twice, payload) would be too large to produce, and the
/// processor retried that transaction forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_near_the_size_limit_is_dead_lettered_truncated_and_the_processor_keeps_going() {
    let cfg = Arc::new(unique_config("huge"));
    setup(&cfg).await;
    let running = start(&cfg);
    let key = vec![b'k'; 500_000];
    let payload = vec![0xC3; 400_000];
    let producer: FutureProducer = meter_kafka::publish::producer(&cfg.kafka, meter_kafka::publish::Tuning::bulk()).unwrap();
    producer
        .send(FutureRecord::to(&cfg.topics.events).key(key.as_slice()).payload(payload.as_slice()), Duration::from_secs(10))
        .await
        .unwrap();
    let sim = fleet(5, 2, "it-huge", past_midnight() + 7_200_000, 120);
    let (stats, ledger) = agent::run_simulated(&cfg, sim, 0.0, None).await.unwrap();
    let (counters, sink_stats) = running.drain().await;
    assert_eq!(counters.aggregated, stats.events);
    assert_eq!(counters.dead_letters.get(&DeadLetterReason::OversizePayload), Some(&1));
    assert_eq!(sink_stats.dead_letter_rows, 1);

    let client = Connection::from(&cfg.clickhouse).client().unwrap();
    let (detail, key_len, payload_len): (String, u64, u64) =
        client.query("SELECT detail, length(record_key), length(payload) FROM dead_letters FINAL").fetch_one().await.unwrap();
    assert_eq!((key_len, payload_len), (4 * 1024, 256 * 1024));
    assert!(detail.contains("key truncated to its first 4096 of 500000 bytes"), "{detail}");
    assert!(detail.contains("payload truncated to its first 262144 of 400000 bytes"), "{detail}");
    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

/// Waits until the processor group has committed every events partition to
/// its end.
async fn wait_committed(cfg: &Config) {
    let probe: BaseConsumer = meter_kafka::client_config(&cfg.kafka).set("group.id", &cfg.processor.group_id).create().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut tpl = TopicPartitionList::new();
        for p in 0..cfg.topics.partitions {
            tpl.add_partition(&cfg.topics.events, p);
        }
        let committed = probe.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        let done = (0..cfg.topics.partitions).all(|p| {
            let (low, high) = probe.fetch_watermarks(&cfg.topics.events, p, Duration::from_secs(10)).unwrap();
            match committed.find_partition(&cfg.topics.events, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o >= high,
                _ => high == low,
            }
        });
        if done {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the processor did not commit its input in 120s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A transaction left open on the changelog (an instance that died mid-commit
/// and never came back under its transactional id) holds the last stable
/// offset back. The state the new owner commits after it is invisible to a
/// read_committed reader until the broker aborts it; a restore in that time
/// must wait for it, not restore the older state under the newer committed
/// offsets (which lost the usage in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_transaction_left_open_on_the_changelog() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cfg = Arc::new(unique_config("zombie"));
    setup(&cfg).await;
    // Three consecutive minutes of one hour: its hour and day windows hold
    // all three batches.
    let sim = |n: i64| fleet(40 + n as u64, 3, &format!("it-zombie-{n}"), past_midnight() + 3_600_000 + n * 60_000, 60);
    let mut ledger = meter_model::ledger::Ledger::default();

    let shutdown = Signal::default();
    let first = tokio::spawn({
        let (cfg, shutdown) = (cfg.clone(), shutdown.clone());
        async move { meter_processor::run(&cfg, shutdown, Signal::default()).await }
    });
    ledger.merge(&agent::run_simulated(&cfg, sim(0), 0.0, None).await.unwrap().1);
    wait_committed(&cfg).await;

    // The zombie: a transaction with a record on every changelog partition,
    // never committed nor aborted (the broker aborts it after 10 s).
    let zombie: BaseProducer = meter_kafka::client_config(&cfg.kafka)
        .set("transactional.id", format!("{}-zombie", cfg.processor.group_id))
        .set("transaction.timeout.ms", "10000")
        .create()
        .unwrap();
    zombie.init_transactions(Duration::from_secs(30)).unwrap();
    zombie.begin_transaction().unwrap();
    for p in 0..cfg.topics.partitions {
        zombie.send(BaseRecord::<[u8], [u8]>::to(&cfg.state_topic()).partition(p).key(b"zombie").payload(b"never committed")).unwrap();
    }
    zombie.flush(Duration::from_secs(10)).unwrap();

    // Committed after the zombie's records: invisible to a read_committed
    // restore until the broker aborts the zombie.
    ledger.merge(&agent::run_simulated(&cfg, sim(1), 0.0, None).await.unwrap().1);
    wait_committed(&cfg).await;
    shutdown.raise();
    first.await.unwrap().unwrap();

    // The same instance again: it restores every partition at once.
    let running = start(&cfg);
    ledger.merge(&agent::run_simulated(&cfg, sim(2), 0.0, None).await.unwrap().1);
    let (counters, _) = running.drain().await;
    assert!(counters.aggregated > 0);
    drop(zombie);
    let rec = reconcile::reconcile(&cfg, &ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(10) {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

/// An aggregate the sink cannot decode stops it without committing past the
/// record: skipped, its usage would be missing from ClickHouse for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_aggregate_stops_the_sink_uncommitted() {
    let cfg = Arc::new(unique_config("undecodable"));
    setup(&cfg).await;
    let producer: FutureProducer = meter_kafka::publish::producer(&cfg.kafka, meter_kafka::publish::Tuning::bulk()).unwrap();
    producer
        .send(
            FutureRecord::to(&cfg.topics.aggregates).key("cust-0001").partition(0).payload(&b"\x00not an aggregate"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let drain = Signal::default();
    drain.raise();
    let result = tokio::time::timeout(Duration::from_secs(60), sink::run(&cfg, Signal::default(), drain)).await.expect("the sink stops");
    let error = format!("{:#}", result.expect_err("an undecodable aggregate is an error"));
    assert!(error.contains("undecodable aggregate at") && error.contains("offset 0"), "{error}");
    let probe: BaseConsumer = meter_kafka::client_config(&cfg.kafka).set("group.id", &cfg.sink.group_id).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&cfg.topics.aggregates, 0);
    let committed = probe.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let offset = committed.find_partition(&cfg.topics.aggregates, 0).map(|e| e.offset());
    assert!(!matches!(offset, Some(Offset::Offset(o)) if o > 0), "committed past the undecodable record: {offset:?}");
}

/// Two live sinks with the same `sink.instance_id`: static membership fences
/// the older one, whose client is then unusable. It must stop with an error
/// that names the cause, not sit in the group consuming nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_sink_stops_with_an_error() {
    let cfg = Arc::new(unique_config("fenced"));
    setup(&cfg).await;
    let run = |cfg: &Arc<Valid<Config>>, shutdown: Signal| {
        let cfg = cfg.clone();
        tokio::spawn(async move { sink::run(&cfg, shutdown, Signal::default()).await })
    };
    let first = run(&cfg, Signal::default());
    // Let the first one join and get its assignment.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!first.is_finished());
    let second_stop = Signal::default();
    let second = run(&cfg, second_stop.clone());
    let result = tokio::time::timeout(Duration::from_secs(60), first).await.expect("the fenced sink stops").unwrap();
    let error = format!("{:#}", result.expect_err("fenced is an error"));
    assert!(error.contains("fatal Kafka error in the sink consumer") && error.contains("instance_id"), "{error}");
    second_stop.raise();
    tokio::time::timeout(Duration::from_secs(60), second).await.expect("the second sink stops").unwrap().unwrap();
}
