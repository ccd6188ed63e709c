//! Agent identity on the real pipeline (`meter agent` processes, Kafka,
//! the processor, the sink, ClickHouse):
//!
//! - two hosts with one agent id (the reproduction): both counted,
//!   ClickHouse equals the sum of both ledgers, and the shared id is
//!   reported;
//! - a forger claiming an enrolled agent's id with high seqs: dead-lettered
//!   as `bad_signature`, the agent's totals exact; a third-party producer
//!   signing with the documented recipe (Python's hmac) is accepted;
//! - a second instance of one identity (a copied state dir): refused at
//!   start while the first runs; a producer that takes the identity's lease
//!   fences the running agent, which stops with a clear error; a restart
//!   after a crash is not taken for a twin; the totals stay exact.

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_support::*;
use meter_agent::identity::Incarnation;
use meter_config::Config;
use meter_model::ledger::Ledger;
use meter_model::{DeadLetterReason, UsageEvent};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn assert_exact(cfg: &Config, ledger: &Ledger) {
    let rec = meter_sink::reconcile::reconcile(cfg, ledger).await.unwrap();
    for (source, m) in rec.mismatches.iter().take(20) {
        eprintln!("mismatch in {source}: {m}");
    }
    assert!(rec.mismatches.is_empty(), "{} mismatches against the ledger ({} events)", rec.mismatches.len(), rec.events);
    assert_eq!(rec.events, ledger.event_count());
}

fn wait_ok(child: &mut std::process::Child, what: &str) {
    let status = child.wait().unwrap();
    assert!(status.success(), "{what} exited with {status}");
}

fn incarnation(state: &Path) -> Incarnation {
    serde_json::from_slice(&std::fs::read(state.join("incarnation.json")).unwrap()).unwrap()
}

/// The reproduction: fleets of seeds 1 and 2 (2 customers, 10
/// minutes each) under one `--agent-id host-a`. Before incarnations
/// ClickHouse held 53% of the two ledgers and nothing said why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_with_one_agent_id_are_both_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cfg) = config_file(dir.path(), &format!("ident_shared_{}", std::process::id()), "");
    setup(&cfg).await;
    let sims = [sim_config(1, 2, "host-a", 600), sim_config(2, 2, "host-a", 600)];
    // Side by side: each with a metrics port of its own.
    let mut agents: Vec<_> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = spawn_agent_cmd(&config, &dir.path().join(format!("state-{i}")), s, 0.0, None);
            c.env("METER__METRICS__LISTEN", "127.0.0.1:0");
            c.spawn().unwrap()
        })
        .collect();
    for (i, a) in agents.iter_mut().enumerate() {
        wait_ok(a, &format!("agent {i}"));
    }
    let (a, b) = (incarnation(&dir.path().join("state-0")), incarnation(&dir.path().join("state-1")));
    assert_eq!((a.agent_id.as_str(), b.agent_id.as_str()), ("host-a", "host-a"));
    assert_ne!(a.incarnation, b.incarnation, "each state dir has its own incarnation");
    let mut ledger = expected_ledger(&sims[0]);
    ledger.merge(&expected_ledger(&sims[1]));
    let counters = drain(&cfg).await;
    assert_eq!(counters.dead_lettered(), 0);
    assert_eq!(counters.aggregated as i64, ledger.event_count(), "every event of both hosts counted once");
    assert!(counters.incarnation_overlaps > 0, "two live incarnations of host-a are reported");
    assert_eq!(counters.without_incarnation, 0);
    assert_exact(&cfg, &ledger).await;
}

const VICTIM_KEY: &str = "host-v.2026-12:8f0d6c2a51b34e7d9a1c0b2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708";
const NEXT_KEY: &str = "host-v.2027-01:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const PYTHON_KEY: &str = "py-signer.1:a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f";

/// A process that can write `usage.events` claims an enrolled agent's id
/// and incarnation with seqs far above the agent's, unsigned or signed
/// with a key of its own. Before signatures its events set the stream's
/// high-water mark and every later event of the agent was dropped as a
/// duplicate. Now they are dead-lettered as `bad_signature` before dedup,
/// and the agent's totals are exact. A Python producer signing with the
/// documented recipe is accepted; with the wrong key it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_under_an_enrolled_id_are_dead_lettered_and_the_victim_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cfg) = config_file(dir.path(), &format!("ident_forged_{}", std::process::id()), "");
    let mut c = cfg.into_inner();
    // Two keys for the victim (a rotation): it signs with the first.
    let secret = |k: &str| k.split_once(':').unwrap().1.to_owned();
    let keys = dir.path().join("agent-keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[agents.\"host-v\"]\n\"host-v.2026-12\" = \"{}\"\n\"host-v.2027-01\" = \"{}\"\n[agents.\"py-signer\"]\n\"py-signer.1\" = \"{}\"\n",
            secret(VICTIM_KEY),
            secret(NEXT_KEY),
            secret(PYTHON_KEY)
        ),
    )
    .unwrap();
    c.processor.agent_keys_file = Some(keys.clone());
    let cfg = c.validate().unwrap();
    setup(&cfg).await;

    // The victim's first two minutes: its incarnation exists from now on.
    let state = dir.path().join("state");
    let first = sim_config(3, 2, "host-v", 120);
    let mut a = spawn_agent_cmd(&config, &state, &first, 0.0, None);
    a.env("METER_AGENT_SIGNING_KEY", VICTIM_KEY);
    wait_ok(&mut a.spawn().unwrap(), "victim, first run");
    let inc = incarnation(&state).incarnation;

    // The forger: the victim's id and incarnation, and the seqs the victim
    // uses next (from its checkpoint; they are easy to guess from the
    // topic too), every other one signed with a key of the forger's own,
    // plus one near i64::MAX. Without signatures the victim's own events
    // with these seqs were then dropped as duplicates.
    let checkpoint: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("spool/checkpoint.json")).unwrap()).unwrap();
    let codec = meter_avro::Codec::new().unwrap();
    let producer: BaseProducer = meter_kafka::producer_config(&cfg.kafka).create().unwrap();
    let forger_key = meter_model::signing::Key::parse("host-v.2026-12:ffffffffffffffffffffffffffffffff").unwrap();
    let mut forged = 0;
    for (customer, next) in checkpoint["seqs"].as_object().unwrap() {
        let next = next.as_i64().unwrap() + 1;
        for (k, seq) in (next..next + 200).chain([i64::MAX - 1]).enumerate() {
            let e = UsageEvent {
                event_id: meter_model::event_id("host-v", &inc, customer, seq),
                agent_id: "host-v".into(),
                seq: Some(seq),
                customer_id: customer.clone(),
                service: "compute".into(),
                usage_type: "BoxUsage:m5.large".into(),
                resource_id: "i-forged".into(),
                region: "us-east-1".into(),
                quantity: 0,
                event_time: first.start + 130_000,
                attributes: Default::default(),
                incarnation: inc.clone(),
            };
            let mut payload = Vec::new();
            codec.encode_event(&e, &mut payload);
            let sig = forger_key.sign(&payload);
            let mut record = BaseRecord::to(&cfg.topics.events).key(customer.as_bytes()).payload(&payload);
            if k % 2 == 1 {
                record = record.headers(
                    rdkafka::message::OwnedHeaders::new()
                        .insert(rdkafka::message::Header { key: meter_model::signing::HEADER, value: Some(sig.as_bytes()) }),
                );
            }
            meter_kafka::publish::send_blocking(&producer, record).unwrap();
            forged += 1;
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // The victim goes on to 10 minutes (it resumes after its last tick).
    let whole = sim_config(3, 2, "host-v", 600);
    let mut a = spawn_agent_cmd(&config, &state, &whole, 0.0, None);
    a.env("METER_AGENT_SIGNING_KEY", VICTIM_KEY);
    wait_ok(&mut a.spawn().unwrap(), "victim, second run");
    assert_eq!(incarnation(&state).incarnation, inc, "same host, same incarnation");

    // A third-party producer with the Python recipe, and one with a wrong key.
    let start = whole.start;
    let py = |agent: &str, key: &str, ledger: &Path| {
        let out = Command::new("python3")
            .arg(repo().join("tests/interop/python/produce_events.py"))
            .args(["--bootstrap", &cfg.kafka.brokers, "--topic", &cfg.topics.events])
            .arg("--schema")
            .arg(repo().join("schemas/avro/usage_event.avsc"))
            .args(["--customers", "2", "--seconds", "60", "--start-ms", &start.to_string(), "--agent-id", agent])
            .args(["--incarnation", "py0000000000000a", "--sign", key, "--ledger"])
            .arg(ledger)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "produce_events.py: {}", String::from_utf8_lossy(&out.stderr));
        Ledger::from_csv(&std::fs::read_to_string(ledger).unwrap()).unwrap()
    };
    let python_ledger = py("py-signer", PYTHON_KEY, &dir.path().join("py.csv"));
    let refused =
        py("py-signer", "py-signer.1:0000000000000000000000000000000000000000000000000000000000000000", &dir.path().join("bad.csv"));

    let counters = drain(&cfg).await;
    let bad = counters.dead_letters.get(&DeadLetterReason::BadSignature).copied().unwrap_or(0);
    assert_eq!(bad as i64, forged + refused.event_count(), "every forged record, and every one signed with a wrong key, dead-lettered");
    assert_eq!(counters.dead_lettered(), bad);
    assert_eq!(counters.unsigned, 0, "every agent here is enrolled");
    let mut ledger = expected_ledger(&whole);
    ledger.merge(&python_ledger);
    assert_eq!(counters.aggregated as i64, ledger.event_count());
    assert_exact(&cfg, &ledger).await;
}

fn spawn_captured(config: &Path, state: &Path, sim: &meter_agent::SimConfig, speed: f64) -> std::process::Child {
    let mut cmd = spawn_agent_cmd(config, state, sim, speed, None);
    cmd.stderr(Stdio::piped()).env("RUST_LOG", "info").env("METER__METRICS__LISTEN", "127.0.0.1:0");
    cmd.spawn().unwrap()
}

fn stderr_of(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// One identity, two instances: the state dir copied (with the machine id)
/// while the agent runs. The copy refuses to start, naming the running
/// one; a producer that takes the identity's lease anyway (a twin that
/// started while Kafka was unreachable) fences the running agent, which
/// stops with an error naming the cause. A restart right after that is not
/// taken for a twin, and the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_of_one_identity_is_refused_or_fenced_never_merged() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cfg) =
        config_file(dir.path(), &format!("ident_twin_{}", std::process::id()), "lease_interval_ms = 500\nhost_identity = \"test-machine\"");
    setup(&cfg).await;
    let sim = sim_config(4, 2, "host-t", 900);
    let state = dir.path().join("state");
    // 900 simulated seconds at 15 per second: about a minute.
    let mut a = spawn_captured(&config, &state, &sim, 15.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.join("incarnation.json").exists() {
        assert!(Instant::now() < deadline, "the agent creates its incarnation");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let me = incarnation(&state);

    // The copy: same incarnation, same machine identity.
    let copy = dir.path().join("copy");
    let cp = Command::new("cp").arg("-a").arg(&state).arg(&copy).status().unwrap();
    assert!(cp.success());
    let mut b = spawn_captured(&config, &copy, &sim, 15.0);
    let status = b.wait().unwrap();
    let err = stderr_of(&mut b);
    assert_eq!(status.code(), Some(3), "the copy must not run beside the original:\n{err}");
    assert!(err.contains("is already running") && err.contains(&me.incarnation), "a clear error:\n{err}");
    eprintln!("the copy said: {}", err.lines().last().unwrap_or_default());

    // A producer takes the identity's lease: the original is fenced.
    let mut pc = meter_kafka::client_config(&cfg.kafka);
    pc.set("transactional.id", meter_agent::lease::transactional_id(&me.agent_id, &me.incarnation));
    let thief: BaseProducer = pc.create().unwrap();
    thief.init_transactions(Duration::from_secs(30)).unwrap();
    let status = a.wait().unwrap();
    let err = stderr_of(&mut a);
    assert_eq!(status.code(), Some(3), "the fenced agent stops:\n{err}");
    assert!(err.contains("another instance with the same identity started"), "a clear error:\n{err}");
    eprintln!("the fenced agent said: {}", err.lines().last().unwrap_or_default());
    drop(thief);

    // The original again, right away: its own last lease is recent, but
    // nobody renews it, so it starts (after waiting it out) and finishes.
    let mut again = spawn_agent(&config, &state, &sim, 0.0, None);
    wait_ok(&mut again, "the restarted agent");
    let counters = drain(&cfg).await;
    assert_eq!(counters.dead_lettered(), 0);
    assert_eq!(counters.incarnation_overlaps, 0, "one incarnation only");
    assert_exact(&cfg, &expected_ledger(&sim)).await;
}
