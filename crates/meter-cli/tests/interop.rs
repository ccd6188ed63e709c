//! Interoperability with Avro and Kafka implementations meterline does not
//! use: Python (confluent-kafka + fastavro) writes the events, Java's Apache
//! Avro and Python read every output topic with the `.avsc` files alone,
//! and their totals equal ClickHouse and the producer's own ledger; the same
//! with the Confluent Schema Registry framing through a real registry
//! (`ops/registry`, Apicurio) and confluent-kafka's serializers; a newer
//! writer schema from Python is resolved; the key contract puts a customer
//! on one partition whichever client writes it, and a record off its
//! partition is dead-lettered, never silently split into a second set of
//! windows.
//!
//! The tools are in `tests/interop/` (no meterline code in them); `ops/up`
//! installs and starts what they need (the registry included).

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meter_config::{Config, Framing, Valid};
use meter_kafka::publish::{producer, Publisher, Tuning};
use meter_kafka::{admin, Signal};
use meter_model::ledger::Ledger;
use meter_model::partition::Partitioner;
use meter_model::{DeadLetterReason, UsageEvent};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

const DAY_MS: i64 = 86_400_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn avsc(name: &str) -> String {
    repo().join("schemas/avro").join(name).display().to_string()
}

fn registry_url() -> String {
    std::env::var("METER_TEST_REGISTRY_URL").unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".into())
}

/// Runs `cmd`; its stdout, or a panic with everything it printed.
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{stdout}\n--- stderr ---\n{stderr}", out.status);
    stdout
}

fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/interop/python").join(script));
    c
}

/// The Java tool (Apache Avro for Java, the Kafka Java client), built once.
fn java() -> Command {
    static JAR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let jar = JAR.get_or_init(|| run(&mut Command::new(repo().join("tests/interop/java/build.sh"))).trim().to_owned());
    let mut c = Command::new("java");
    c.args(["-jar", jar]);
    c
}

fn framing_arg(f: Framing) -> &'static str {
    match f {
        Framing::SingleObject => "single-object",
        Framing::Confluent => "confluent",
    }
}

/// Every record of `topic` as the Python and the Java reader print them:
/// they must agree byte for byte.
fn read_both(cfg: &Config, topic: &str, schema: &str, framing: Framing) -> Vec<Value> {
    let args = |c: &mut Command| {
        c.args(["--bootstrap", &cfg.kafka.brokers, "--topic", topic, "--schema", &avsc(schema), "--framing", framing_arg(framing)]);
        if framing == Framing::Confluent {
            c.args(["--registry", &registry_url()]);
        }
    };
    let mut py = python("read_topic.py");
    args(&mut py);
    let mut jv = java();
    jv.arg("read");
    args(&mut jv);
    let (py, jv) = (run(&mut py), run(&mut jv));
    assert_eq!(py, jv, "Python and Java read {topic} differently");
    let lines: Vec<Value> = py.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "{topic} is empty");
    lines
}

fn config(name: &str, framing: Framing, partitions: i32) -> Valid<Config> {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{name}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut cfg = Config::default().scoped(&format!("test-{id}"));
    cfg.topics.partitions = partitions;
    cfg.processor.idle_timeout_ms = 1_000;
    cfg.processor.commit_interval_ms = 300;
    cfg.sink.batch_ms = 300;
    let s = &mut cfg.serialization;
    (s.events, s.aggregates, s.dlq, s.invoice_lines) = (framing, framing, framing, framing);
    if framing == Framing::Confluent {
        s.registry_url = registry_url();
    }
    cfg.validate().unwrap()
}

async fn setup(cfg: &Config) {
    admin::ensure_topics(cfg).await.expect("Kafka must be running (ops/up)");
    meter_clickhouse::migrate(&(&cfg.clickhouse).into()).await.expect("ClickHouse must be running (ops/up)");
}

fn two_days_ago() -> i64 {
    let now = meter_model::now_ms();
    now - now.rem_euclid(DAY_MS) - 2 * DAY_MS + 3_600_000
}

/// Python's producer: events of `customers` customers for `seconds`
/// seconds; its ledger and its summary line.
#[allow(clippy::too_many_arguments)]
fn produce_python(
    cfg: &Config,
    dir: &Path,
    agent: &str,
    schema: &str,
    framing: Framing,
    customers: usize,
    seconds: u64,
    extra: &[&str],
) -> (Ledger, Value) {
    let ledger = dir.join(format!("{agent}.ledger.csv"));
    let mut c = python("produce_events.py");
    c.args(["--bootstrap", &cfg.kafka.brokers, "--topic", &cfg.topics.events, "--schema", schema, "--framing", framing_arg(framing)]);
    c.args(["--customers", &customers.to_string(), "--seconds", &seconds.to_string(), "--start-ms", &two_days_ago().to_string()]);
    c.args(["--agent-id", agent, "--ledger"]).arg(&ledger).args(extra);
    if framing == Framing::Confluent {
        c.args(["--registry", &registry_url()]);
    }
    let summary: Value = serde_json::from_str(run(&mut c).lines().last().unwrap()).unwrap();
    (Ledger::from_csv(&std::fs::read_to_string(&ledger).unwrap()).unwrap(), summary)
}

/// Processor and sink until both drained (in process).
async fn drain(cfg: &Valid<Config>) -> meter_engine::Counters {
    let cfg = Arc::new(cfg.clone());
    let (pd, sd) = (Signal::default(), Signal::default());
    pd.raise();
    let p = tokio::spawn({
        let cfg = cfg.clone();
        async move { meter_processor::run(&cfg, Signal::default(), pd).await }
    });
    let s = tokio::spawn({
        let (cfg, sd) = (cfg.clone(), sd.clone());
        async move { meter_sink::run(&cfg, Signal::default(), sd).await }
    });
    let counters = tokio::time::timeout(Duration::from_secs(180), p).await.expect("processor drains").unwrap().unwrap().counters;
    sd.raise();
    tokio::time::timeout(Duration::from_secs(120), s).await.expect("sink drains").unwrap().unwrap();
    counters
}

async fn reconcile_exactly(cfg: &Config, ledger: &Ledger) {
    let rec = meter_sink::reconcile::reconcile(cfg, ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(20) {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

/// `meter` as a user runs it, on the test's database and topics.
fn meter(cfg: &Config, args: &[&str]) -> String {
    let s = &cfg.serialization;
    run(Command::new(env!("CARGO_BIN_EXE_meter"))
        .args(args)
        .env_remove("METER_CONFIG")
        .env("RUST_LOG", "warn")
        .env("METER__KAFKA__BROKERS", &cfg.kafka.brokers)
        .env("METER__CLICKHOUSE__DATABASE", &cfg.clickhouse.database)
        .env("METER__TOPICS__EVENTS", &cfg.topics.events)
        .env("METER__TOPICS__AGGREGATES", &cfg.topics.aggregates)
        .env("METER__TOPICS__DLQ", &cfg.topics.dlq)
        .env("METER__TOPICS__INVOICE_LINES", &cfg.topics.invoice_lines)
        .env("METER__SERIALIZATION__INVOICE_LINES", framing_arg(s.invoice_lines))
        .env("METER__SERIALIZATION__REGISTRY_URL", &s.registry_url))
}

/// A record that is not Avro, on its key's partition: a dead letter.
async fn send_poison(cfg: &Config, key: &str, payload: &[u8]) {
    let p = producer(&cfg.kafka, Tuning::bulk()).unwrap();
    let mut out = Publisher::new(&p, &cfg.topics.events);
    out.send(Some(key.as_bytes()), payload).await.unwrap();
    out.finish().await.unwrap();
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The whole pipeline fed and read by the independent implementations.
async fn events_from_python_and_every_output_read_by_java_and_python(framing: Framing) {
    let cfg = config("interop", framing, 3);
    setup(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let (ledger, summary) =
        produce_python(&cfg, dir.path(), "py-1", &avsc("usage_event.avsc"), framing, 4, 180, &["--duplicates-percent", "5", "--seed", "7"]);
    let duplicates = summary["duplicates"].as_u64().unwrap();
    assert!(duplicates > 0, "{summary}");
    send_poison(&cfg, "cust-0001", b"not avro at all").await;
    let counters = drain(&cfg).await;
    assert_eq!(counters.aggregated as i64, ledger.event_count(), "every Python event is aggregated once");
    assert_eq!(counters.duplicates, duplicates);
    assert_eq!(counters.dead_letters.get(&DeadLetterReason::BadMagic), Some(&1), "{counters:?}");
    assert_eq!(counters.dead_lettered(), 1, "{counters:?}");
    reconcile_exactly(&cfg, &ledger).await;

    let month = meter_model::Date::from_millis(two_days_ago()).unwrap().year_month().to_string();
    let rated = meter(&cfg, &["rate", "--month", &month]);
    assert!(rated.contains("published"), "{rated}");

    // usage.aggregates: the latest revision per window, summed, is Python's ledger.
    let aggregates = read_both(&cfg, &cfg.topics.aggregates, "aggregated_usage.avsc", framing);
    let text: String = aggregates.iter().map(|l| format!("{l}\n")).collect();
    let mut sum = python("sum_aggregates.py");
    let mut child = sum.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(Ledger::from_csv(&String::from_utf8_lossy(&out.stdout)).unwrap(), ledger, "Python's totals of the topic");

    // usage.dlq: the one poison record, with its original bytes.
    let dlq = read_both(&cfg, &cfg.topics.dlq, "dead_letter.avsc", framing);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["value"]["reason"], "bad_magic");
    assert_eq!(dlq[0]["value"]["payload"], base64(b"not avro at all"));
    assert_eq!(dlq[0]["key"], "cust-0001");

    // billing.invoice_lines: as many lines, and the same total, as ClickHouse.
    let lines = read_both(&cfg, &cfg.topics.invoice_lines, "invoice_line.avsc", framing);
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).client().unwrap();
    let (count, total): (u64, String) =
        client.query("SELECT count(), toString(sum(amount)) FROM invoice_lines FINAL").fetch_one().await.unwrap();
    assert_eq!(lines.len() as u64, count);
    let cents: i128 = lines.iter().map(|l| l["value"]["amount"].as_str().unwrap().replace('.', "").parse::<i128>().unwrap()).sum();
    let want: f64 = total.parse().unwrap();
    assert_eq!(cents, (want * 100.0).round() as i128, "invoice line amounts on the topic vs ClickHouse");
    assert!(cents > 0);

    // `meter tail` decodes the same records to the same values.
    for (topic, records) in [(&cfg.topics.dlq, &dlq), (&cfg.topics.invoice_lines, &lines)] {
        let tailed = meter(&cfg, &["tail", topic, "--from-beginning", "--to-end"]);
        let mut by_position: BTreeMap<(i64, i64), Value> = BTreeMap::new();
        for l in tailed.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            by_position.insert((v["partition"].as_i64().unwrap(), v["offset"].as_i64().unwrap()), v["value"].clone());
        }
        assert_eq!(by_position.len(), records.len(), "{topic}");
        for r in records {
            let at = (r["partition"].as_i64().unwrap(), r["offset"].as_i64().unwrap());
            assert_eq!(by_position.get(&at), Some(&r["value"]), "meter tail {topic} at {at:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_events_aggregate_exactly_and_java_and_python_read_every_output_topic() {
    events_from_python_and_every_output_read_by_java_and_python(Framing::SingleObject).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_through_a_schema_registry_with_confluent_serializers() {
    events_from_python_and_every_output_read_by_java_and_python(Framing::Confluent).await;
}

/// Python writes with a v2 `.avsc` (a field added with a default, one with a
/// default removed): in single-object framing (the processor is configured
/// with the writer schema) and in the registry framing (the registry knows
/// it); both are resolved to the current schema and aggregate exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_newer_schema_version_from_python_are_resolved() {
    let v2 = repo().join("tests/interop/schemas/usage_event_v2.avsc");
    let mut cfg = config("v2", Framing::SingleObject, 3).into_inner();
    cfg.serialization.writer_schemas = vec![v2.clone()];
    cfg.serialization.registry_url = registry_url();
    let cfg = cfg.validate().unwrap();
    setup(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let v2 = v2.display().to_string();
    let (mut ledger, _) = produce_python(&cfg, dir.path(), "py-v2-so", &v2, Framing::SingleObject, 2, 120, &[]);
    let (confluent, _) = produce_python(&cfg, dir.path(), "py-v2-cf", &v2, Framing::Confluent, 2, 120, &[]);
    ledger.merge(&confluent);
    let counters = drain(&cfg).await;
    assert_eq!(counters.dead_lettered(), 0, "{counters:?}");
    assert_eq!(counters.resolved_schema as i64, ledger.event_count(), "every v2 record was resolved");
    reconcile_exactly(&cfg, &ledger).await;
}

/// The partition each record of `topic` landed on, by its event id.
fn partitions_of(cfg: &Config) -> BTreeMap<String, i32> {
    let codec = meter_avro::Codec::new().unwrap();
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka).set("group.id", "interop-partitions").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..cfg.topics.partitions {
        let (low, high) = consumer.fetch_watermarks(&cfg.topics.events, p, Duration::from_secs(10)).unwrap();
        remaining += high - low;
        tpl.add_partition_offset(&cfg.topics.events, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            if let Ok(e) = codec.decode_event(m.payload().unwrap_or_default()) {
                out.insert(e.event_id, m.partition());
            }
            remaining -= 1;
        }
    }
    out
}

/// Whichever client writes a customer's events, the key contract puts them
/// on one partition; a producer that breaks it (librdkafka's default CRC-32
/// partitioner) would split a customer across two partitions: two sets of
/// windows under one record key, of which consumers keep the higher
/// revision and lose the other's usage. The processor dead-letters every
/// record off its key's partition (`wrong_partition`), so nothing is lost
/// silently: ClickHouse holds what was on the right partition, the DLQ the
/// rest, and together they are the whole ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_split_across_partitions_is_dead_lettered_not_lost() {
    let cfg = config("split", Framing::SingleObject, 6);
    setup(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = produce_python(&cfg, dir.path(), "py-murmur2", &avsc("usage_event.avsc"), Framing::SingleObject, 3, 60, &[]);
    let (crc, _) = produce_python(
        &cfg,
        dir.path(),
        "py-crc32",
        &avsc("usage_event.avsc"),
        Framing::SingleObject,
        3,
        60,
        &["--partitioner", "consistent_random"],
    );
    // meterline's own producer, for the same customers.
    let codec = meter_avro::Codec::new().unwrap();
    let p = producer(&cfg.kafka, Tuning::bulk()).unwrap();
    let mut out = Publisher::new(&p, &cfg.topics.events);
    let mut ours = Ledger::default();
    for c in 0..3 {
        let customer = format!("cust-{c:04}");
        let e = UsageEvent {
            event_id: format!("rs:{customer}:1"),
            agent_id: "rs".into(),
            seq: Some(1),
            customer_id: customer.clone(),
            service: "compute".into(),
            usage_type: "BoxUsage:m5.large".into(),
            resource_id: "i-rs".into(),
            region: "us-east-1".into(),
            quantity: 1,
            event_time: two_days_ago() + 5_000,
            attributes: Default::default(),
            incarnation: String::new(),
        };
        let mut payload = Vec::new();
        codec.encode_event(&e, &mut payload);
        out.send(Some(customer.as_bytes()), &payload).await.unwrap();
        ours.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
    }
    out.finish().await.unwrap();

    // Python (murmur2) and meterline put each customer on the same
    // partition, the one Java's partitioner names.
    let at = partitions_of(&cfg);
    let java_partitions = run(java().args(["partition", "--partitions", "6", "cust-0000", "cust-0001", "cust-0002"]));
    for (c, line) in (0..3).zip(java_partitions.lines()) {
        let customer = format!("cust-{c:04}");
        let java: i32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(at[&format!("rs:{customer}:1")], java, "{customer}: meterline vs Java");
        assert_eq!(at[&format!("py-murmur2:{customer}:1")], java, "{customer}: Python (murmur2) vs Java");
        assert_eq!(java, Partitioner::Murmur2.partition(customer.as_bytes(), 6));
    }
    // The CRC-32 producer's customers whose partition differs are dead-lettered.
    let split: Vec<String> = (0..3)
        .map(|c| format!("cust-{c:04}"))
        .filter(|c| Partitioner::Crc32.partition(c.as_bytes(), 6) != Partitioner::Murmur2.partition(c.as_bytes(), 6))
        .collect();
    assert!(!split.is_empty(), "the test needs a customer the two partitioners place apart");
    let mut expected = good.clone();
    expected.merge(&ours);
    let mut misrouted = 0;
    for (k, t) in &crc.entries {
        if split.contains(&k.customer_id) {
            misrouted += t.event_count;
        } else {
            expected.entries.entry(k.clone()).or_default().add(*t);
        }
    }
    let counters = drain(&cfg).await;
    assert_eq!(counters.dead_letters.get(&DeadLetterReason::WrongPartition).copied().unwrap_or(0) as i64, misrouted, "{counters:?}");
    assert_eq!(counters.dead_lettered() as i64, misrouted, "{counters:?}");
    reconcile_exactly(&cfg, &expected).await;
    assert_eq!(
        expected.event_count() + misrouted,
        good.event_count() + crc.event_count() + ours.event_count(),
        "every event is accounted for"
    );
}

/// Deployed agents write the fingerprint meterline computed before it
/// followed the specification: accepted and counted, or, once switched
/// off, dead-lettered as `unknown_schema`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_the_previous_fingerprint_are_counted_or_refused() {
    for accept in [true, false] {
        let mut cfg = config("legacy", Framing::SingleObject, 1).into_inner();
        cfg.serialization.accept_legacy_fingerprint = accept;
        let cfg = cfg.validate().unwrap();
        setup(&cfg).await;
        let codec = meter_avro::Codec::new().unwrap();
        // What they write is version 1 of the schema (no incarnation).
        let legacy = meter_avro::framing::legacy_fingerprint("UsageEvent", meter_avro::USAGE_EVENT_V1_AVSC).unwrap();
        let mut ledger = Ledger::default();
        for seq in 1..=10 {
            let e = UsageEvent {
                event_id: format!("old-agent:cust-7:{seq}"),
                agent_id: "old-agent".into(),
                seq: Some(seq),
                customer_id: "cust-7".into(),
                service: "compute".into(),
                usage_type: "BoxUsage:m5.large".into(),
                resource_id: "i-old".into(),
                region: "us-east-1".into(),
                quantity: 1,
                event_time: two_days_ago() + seq * 1000,
                attributes: Default::default(),
                incarnation: String::new(),
            };
            let mut payload = vec![0xC3, 0x01];
            payload.extend_from_slice(&legacy.to_le_bytes());
            let mut current = Vec::new();
            codec.encode_event(&e, &mut current);
            // The current body less its empty incarnation: the v1 body.
            payload.extend_from_slice(&current[10..current.len() - 1]);
            send_poison(&cfg, "cust-7", &payload).await;
            ledger.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
        }
        let counters = drain(&cfg).await;
        assert_eq!(counters.legacy_fingerprint, 10, "counted whether accepted or not");
        if accept {
            assert_eq!(counters.aggregated, 10);
            reconcile_exactly(&cfg, &ledger).await;
        } else {
            assert_eq!(counters.dead_letters.get(&DeadLetterReason::UnknownSchema), Some(&10), "{counters:?}");
        }
    }
}

/// Every schema meterline writes or accepts, including the versions in
/// `schemas/avro/history/`: the fingerprint in its single-object header is
/// the one Java's `SchemaNormalization` and fastavro compute.
#[test]
fn fingerprints_are_those_java_and_fastavro_compute() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["schemas/avro", "schemas/avro/history"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "avsc") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let ours: Vec<String> = files
        .iter()
        .map(|f| {
            let fp = meter_avro::canonical::fingerprint(&std::fs::read_to_string(f).unwrap()).unwrap();
            format!("{} {}", f.display(), fp.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>())
        })
        .collect();
    let java = run(java().arg("fingerprint").args(&files));
    let fastavro = run(python("fingerprint.py").args(&files));
    for (name, out) in [("java", java), ("fastavro", fastavro)] {
        let theirs: Vec<&str> = out.lines().collect();
        assert_eq!(theirs, ours.iter().map(String::as_str).collect::<Vec<_>>(), "{name}");
    }
}
