//! `meter chaos`: the fault-injection harness behind the exactly-once claim.
//!
//! It runs two simulated agents whose output is disturbed on purpose
//! (duplicates, reordering, late events that correct final windows, and a
//! list of poison records), two `meter process` instances in one consumer
//! group, and `meter sink`, all as child processes on the local stack. While
//! they run it kills processors with SIGKILL, kills the sink, restarts the
//! Kafka broker and stops ClickHouse. Then it drains and checks, per key and
//! to the unit: ClickHouse (minute, hour, day) = latest revisions on the
//! aggregates topic = the agents' ledger; aggregated + duplicates +
//! dead-lettered = records produced; dead letters by reason = what was
//! injected.
//!
//! With `--cluster` it runs on the local cluster (`ops/cluster`: three
//! brokers, two ClickHouse shards of two replicas) with three processors
//! and two sinks, and its faults are those of a cluster: SIGKILL of the
//! broker that leads the most partitions (the transaction coordinator
//! among them) and, in turn, of one ClickHouse replica per shard, each
//! brought back later. The configuration (from the environment) names the
//! cluster's brokers, a ClickHouse node that stays up, and
//! `clickhouse.cluster`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meter_agent::{SimConfig, Simulator};
use meter_avro::Codec;
use meter_clickhouse::Connection;
use meter_config::Config;
use meter_model::ledger::Ledger;
use meter_model::{DeadLetterReason, UsageEvent};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use meter_model::time;

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Wall-clock length of the faulty phase (agents publishing, faults
    /// injected); draining and checking come after.
    #[arg(long, default_value = "5m", value_parser = time::parse_duration)]
    duration: Duration,
    /// SIGKILLs of processor instances, spread over the run.
    #[arg(long, default_value_t = 20)]
    processor_kills: u32,
    /// SIGKILLs of the sink.
    #[arg(long, default_value_t = 3)]
    sink_kills: u32,
    /// How long ClickHouse is stopped (0s: not at all).
    #[arg(long, default_value = "60s", value_parser = time::parse_duration)]
    clickhouse_outage: Duration,
    /// Do not restart the Kafka broker.
    #[arg(long)]
    no_broker_restart: bool,
    /// Break the guarantee on purpose (processors skip restoring their
    /// state): the checks must then fail.
    #[arg(long)]
    negative_control: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Customers per simulated agent.
    #[arg(long, default_value_t = 6)]
    customers: usize,
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 20.0)]
    speed: f64,
    /// The ops/ scripts that stop and start the local services.
    #[arg(long, default_value = "ops")]
    ops_dir: PathBuf,
    /// Run on the local cluster (`ops/cluster`): three processors, two
    /// sinks, the leading broker and a replica per shard killed.
    #[arg(long)]
    cluster: bool,
    /// How long a killed broker or ClickHouse replica stays down (cluster).
    #[arg(long, default_value = "30s", value_parser = time::parse_duration)]
    node_outage: Duration,
}

/// A fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillProcessor(usize),
    KillSink(usize),
    RestartKafka,
    StopClickHouse,
    /// Cluster: SIGKILL the broker leading the most partitions.
    KillLeadingBroker,
    /// Cluster: SIGKILL a replica of this shard (1-based).
    KillReplica(u32),
}

/// The replica killed in `shard`: never replica 1 of shard 1, the node the
/// harness and its children reach ClickHouse through.
fn replica_to_kill(shard: u32) -> u32 {
    if shard == 1 {
        2
    } else {
        1
    }
}

/// xorshift: the harness's own deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the injector sent.
#[derive(Debug, Default)]
struct Injected {
    records: u64,
    duplicates: u64,
    late: u64,
    dead_letters: BTreeMap<String, u64>,
}

struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(&self.args).envs(self.env.iter().cloned()).env("RUST_LOG", "info,librdkafka=warn").stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.name))?);
        self.starts += 1;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Restarts the child if it exited on its own; returns true if it had.
    fn revive(&mut self) -> anyhow::Result<bool> {
        let exited = match &mut self.child {
            Some(c) => c.try_wait()?.is_some(),
            None => false,
        };
        if exited {
            self.child = None;
            self.start()?;
        }
        Ok(exited)
    }
}

/// What an ops script printed.
fn ops_output(ops_dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(ops_dir.join(args[0]))
        .args(&args[1..])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running ops/{}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ops/{} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ops(ops_dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(ops_dir.join(args[0]))
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running ops/{}", args.join(" ")))?;
    if !status.success() {
        bail!("ops/{} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn child_env(cfg: &Config, instance: &str, negative: bool) -> Vec<(String, String)> {
    let p = &cfg.processor;
    [
        ("METER__KAFKA__BROKERS", cfg.kafka.brokers.clone()),
        ("METER__TOPICS__EVENTS", cfg.topics.events.clone()),
        ("METER__TOPICS__AGGREGATES", cfg.topics.aggregates.clone()),
        ("METER__TOPICS__DLQ", cfg.topics.dlq.clone()),
        ("METER__TOPICS__PARTITIONS", cfg.topics.partitions.to_string()),
        ("METER__CLICKHOUSE__URL", cfg.clickhouse.url.clone()),
        ("METER__CLICKHOUSE__DATABASE", cfg.clickhouse.database.clone()),
        ("METER__CLICKHOUSE__CLUSTER", cfg.clickhouse.cluster.clone()),
        ("METER__PROCESSOR__GROUP_ID", p.group_id.clone()),
        ("METER__PROCESSOR__INSTANCE_ID", instance.to_owned()),
        ("METER__PROCESSOR__COMMIT_INTERVAL_MS", p.commit_interval_ms.to_string()),
        ("METER__PROCESSOR__IDLE_TIMEOUT_MS", p.idle_timeout_ms.to_string()),
        ("METER__PROCESSOR__ALLOWED_LATENESS_MS", p.allowed_lateness_ms.to_string()),
        ("METER__PROCESSOR__CORRECTION_HORIZON_MS", p.correction_horizon_ms.to_string()),
        ("METER__PROCESSOR__TRANSACTION_TIMEOUT_MS", p.transaction_timeout_ms.to_string()),
        ("METER__PROCESSOR__UNSAFE_SKIP_STATE_RESTORE", negative.to_string()),
        ("METER__SINK__GROUP_ID", cfg.sink.group_id.clone()),
        // The sink and its restarts (and its drain) are one static member.
        ("METER__SINK__INSTANCE_ID", instance.to_owned()),
        // Two processors run side by side: each takes a free metrics port.
        ("METER__METRICS__LISTEN", "127.0.0.1:0".to_owned()),
        ("METER__SINK__BATCH_MS", cfg.sink.batch_ms.to_string()),
        ("METER__SINK__MAX_BACKOFF_MS", cfg.sink.max_backoff_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Per events partition: (committed offset of the processor group, high
/// watermark). Committed offsets are read without waiting for pending
/// transactions.
fn group_progress(consumer: &BaseConsumer, cfg: &Config) -> Option<Vec<(i64, i64)>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..cfg.topics.partitions {
        tpl.add_partition(&cfg.topics.events, p);
    }
    let c = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    let mut out = Vec::new();
    for p in 0..cfg.topics.partitions {
        let committed = match c.find_partition(&cfg.topics.events, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        let (_, high) = consumer.fetch_watermarks(&cfg.topics.events, p, Duration::from_secs(5)).ok()?;
        out.push((committed, high));
    }
    Some(out)
}

/// The poison records: (expected reason, key, payload).
fn poison(codec: &Codec, customer: &str, now: i64, sim_start: i64, n: u64) -> Vec<(DeadLetterReason, Option<Vec<u8>>, Vec<u8>)> {
    let base = UsageEvent {
        event_id: format!("chaos-poison/{customer}/{n}"),
        agent_id: "chaos-poison".into(),
        seq: None,
        customer_id: customer.to_owned(),
        service: "compute".into(),
        usage_type: "BoxUsage:m5.large".into(),
        resource_id: "i-poison".into(),
        region: "us-east-1".into(),
        quantity: 1,
        event_time: sim_start + 1000,
        attributes: Default::default(),
        incarnation: String::new(),
    };
    let enc = |e: &UsageEvent| {
        let mut b = Vec::new();
        codec.encode_event(e, &mut b);
        b
    };
    let key = Some(customer.as_bytes().to_vec());
    let good = enc(&base);
    let mut unknown_fp = good.clone();
    unknown_fp[4] ^= 0x5A;
    let mut wrong_magic = good.clone();
    wrong_magic[1] = 0x02;
    let mut oversize = good.clone();
    oversize.resize(70 * 1024, 0);
    use DeadLetterReason as R;
    vec![
        (R::BadMagic, key.clone(), b"{\"json\": \"not avro\"}".to_vec()),
        (R::BadMagic, key.clone(), wrong_magic),
        (R::MalformedAvro, key.clone(), good[..good.len() / 2].to_vec()),
        (R::UnknownSchema, key.clone(), unknown_fp),
        // The Confluent framing with a schema id nobody registered (the
        // processors here have no registry configured).
        (R::UnknownSchema, key.clone(), [&[0u8, 0, 0, 0x30, 0x39][..], &good[10..]].concat()),
        (R::EmptyPayload, key.clone(), Vec::new()),
        (R::MissingKey, None, good.clone()),
        (R::KeyMismatch, Some(b"someone-else".to_vec()), good.clone()),
        (R::OversizePayload, key.clone(), oversize),
        (R::UnknownService, key.clone(), enc(&UsageEvent { service: "mainframe".into(), ..base.clone() })),
        (R::UnknownUsageType, key.clone(), enc(&UsageEvent { usage_type: "BoxUsage:z9.huge".into(), ..base.clone() })),
        (R::NegativeQuantity, key.clone(), enc(&UsageEvent { quantity: -7, ..base.clone() })),
        (R::InvalidSeq, key.clone(), enc(&UsageEvent { seq: Some(0), ..base.clone() })),
        (R::InvalidSeq, key.clone(), enc(&UsageEvent { seq: Some(i64::MAX), ..base.clone() })),
        (R::EmptyCustomerId, key.clone(), enc(&UsageEvent { customer_id: String::new(), ..base.clone() })),
        (R::StringTooLong, key.clone(), enc(&UsageEvent { resource_id: "r".repeat(300), ..base.clone() })),
        (R::InvalidTimestamp, key.clone(), enc(&UsageEvent { event_time: 0, ..base.clone() })),
        (R::InvalidTimestamp, key.clone(), enc(&UsageEvent { event_time: -86_400_000, ..base.clone() })),
        (R::InvalidTimestamp, key.clone(), enc(&UsageEvent { event_time: 4_102_444_800_000 + 1, ..base.clone() })),
        (R::FutureTimestamp, key.clone(), enc(&UsageEvent { event_time: now + 86_400_000, ..base.clone() })),
        // Three days before the simulated period: past the correction
        // horizon once the partition's watermark follows the simulation.
        (R::TooLate, key.clone(), enc(&UsageEvent { event_time: sim_start - 3 * 86_400_000, ..base.clone() })),
    ]
}

/// A seq-less event and a second one with the same event_id but another
/// payload: the first is aggregated (it belongs in the ledger), the second
/// is dead-lettered as `event_id_conflict`.
fn conflict_pair(codec: &Codec, customer: &str, t: i64, n: u64) -> (UsageEvent, Vec<u8>, Vec<u8>) {
    let first = UsageEvent {
        event_id: format!("chaos-conflict/{customer}/{n}"),
        agent_id: "chaos-conflict".into(),
        seq: None,
        customer_id: customer.to_owned(),
        service: "cdn".into(),
        usage_type: "Requests-HTTPS".into(),
        resource_id: "dist-conflict".into(),
        region: "edge-eu".into(),
        quantity: 1000 + n as i64,
        event_time: t,
        attributes: Default::default(),
        incarnation: String::new(),
    };
    let second = UsageEvent { quantity: first.quantity + 1, ..first.clone() };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    codec.encode_event(&first, &mut a);
    codec.encode_event(&second, &mut b);
    (first, a, b)
}

/// Publishes the two agents' events with duplicates, reordering, late
/// events and poison. Returns what was sent and the ledger.
async fn inject(cfg: &Config, args: &ChaosArgs, sim_start: i64, progress: Arc<AtomicU64>) -> anyhow::Result<(Injected, Ledger)> {
    let codec = Codec::new()?;
    let producer = meter_kafka::publish::producer(&cfg.kafka, meter_kafka::publish::Tuning::bulk())?;
    let mut out = meter_kafka::publish::Publisher::new(&producer, &cfg.topics.events);
    let sim_seconds = (args.duration.as_secs_f64() * args.speed) as u64;
    let mut sims: Vec<Simulator> = (0..2u64)
        .map(|i| {
            Simulator::new(SimConfig {
                seed: args.seed * 100 + i,
                customers: args.customers,
                agent_id: format!("chaos-a{}", i + 1),
                start: sim_start,
                duration_s: sim_seconds,
                customer_prefix: "cust-".into(),
            })
        })
        .collect();
    let customers = sims[0].customers().to_vec();
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut injected = Injected::default();
    // (due, key, payload, is_duplicate)
    let mut delayed: Vec<(Instant, Vec<u8>, Vec<u8>, bool)> = Vec::new();
    let started = Instant::now();
    let mut events = Vec::new();
    let mut poison_rounds = 0u64;
    // Usage injected outside the simulators that must be aggregated.
    let mut extra = Ledger::default();
    for second in 0..sim_seconds {
        let due = started + Duration::from_secs_f64(second as f64 / args.speed);
        tokio::time::sleep_until(due.into()).await;
        events.clear();
        for sim in &mut sims {
            sim.next_second(&mut events);
        }
        // Reordering: shuffle the second's events (Fisher-Yates).
        for i in (1..events.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            events.swap(i, j);
        }
        for e in &events {
            let mut payload = Vec::with_capacity(200);
            codec.encode_event(e, &mut payload);
            let key = e.customer_id.as_bytes().to_vec();
            if rng.chance(2) {
                // Late: delivered 10 to 30 s of wall time later, far behind
                // the watermark, so it corrects a final window.
                injected.late += 1;
                delayed.push((Instant::now() + Duration::from_millis(10_000 + rng.below(20_000)), key.clone(), payload.clone(), false));
            } else {
                out.send(Some(&key), &payload).await?;
            }
            if rng.chance(11) {
                injected.duplicates += 1;
                if rng.chance(50) {
                    out.send(Some(&key), &payload).await?;
                } else {
                    delayed.push((Instant::now() + Duration::from_millis(rng.below(20_000)), key, payload, true));
                }
            }
        }
        let now = Instant::now();
        let (ready, rest): (Vec<_>, Vec<_>) = delayed.drain(..).partition(|d| d.0 <= now);
        delayed = rest;
        for (_, key, payload, _) in ready {
            out.send(Some(&key), &payload).await?;
        }
        // Poison at a quarter, half and three quarters of the run.
        let fraction = (second + 1) as f64 / sim_seconds as f64;
        if poison_rounds < 3 && fraction >= 0.25 * (poison_rounds + 1) as f64 {
            poison_rounds += 1;
            let customer = &customers[(poison_rounds as usize) % customers.len()];
            for (reason, key, payload) in poison(&codec, customer, meter_model::now_ms(), sim_start, poison_rounds) {
                out.send(key.as_deref(), &payload).await?;
                *injected.dead_letters.entry(reason.to_string()).or_default() += 1;
            }
            let t = sim_start + (second as i64) * 1000;
            let (first, a, b) = conflict_pair(&codec, customer, t, poison_rounds);
            out.send(Some(customer.as_bytes()), &a).await?;
            out.send(Some(customer.as_bytes()), &b).await?;
            extra.record(&first.customer_id, &first.service, &first.usage_type, &first.region, first.event_time, first.quantity);
            *injected.dead_letters.entry(DeadLetterReason::EventIdConflict.to_string()).or_default() += 1;
        }
        progress.store(second + 1, Ordering::Relaxed);
    }
    delayed.sort_by_key(|d| d.0);
    for (_, key, payload, _) in delayed {
        out.send(Some(&key), &payload).await?;
    }
    out.finish().await?;
    injected.records = out.sent;
    let mut ledger = extra;
    for sim in &sims {
        ledger.merge(sim.ledger());
    }
    Ok((injected, ledger))
}

/// Counts the dead letters on the DLQ topic by reason (read_committed).
fn dlq_reasons(cfg: &Config) -> anyhow::Result<BTreeMap<String, u64>> {
    let codec = Codec::new()?;
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka)
        .set("group.id", "meter-chaos-check")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut open = meter_kafka::assign_from_beginning(&consumer, &consumer, &cfg.topics.dlq, 0..cfg.topics.partitions)?;
    let mut out = BTreeMap::new();
    if open.is_empty() {
        return Ok(out);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !open.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let d = codec.decode_dead_letter(m.payload().unwrap_or_default())?;
                *out.entry(d.reason).or_default() += 1;
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            _ => {}
        }
    }
    if !open.is_empty() {
        bail!("could not read {} to its end", cfg.topics.dlq);
    }
    Ok(out)
}

pub async fn run(base: Config, args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let run_id = meter_model::now_ms();
    let mut cfg = base.scoped(&format!("chaos-{run_id}"));
    cfg.topics.partitions = 6;
    cfg.processor.commit_interval_ms = 300;
    cfg.processor.idle_timeout_ms = 2_000;
    cfg.processor.allowed_lateness_ms = 60_000;
    cfg.processor.correction_horizon_ms = 86_400_000;
    cfg.processor.transaction_timeout_ms = 10_000;
    cfg.sink.batch_ms = 300;
    cfg.sink.max_backoff_ms = 2_000;
    if args.cluster && (cfg.clickhouse.cluster.is_empty() || cfg.kafka.brokers.split(',').count() < 3) {
        bail!("--cluster needs the cluster's configuration: three brokers in kafka.brokers and clickhouse.cluster (ops/chaos --cluster sets them)");
    }
    let cfg = cfg.validate()?;
    let run_dir = args.ops_dir.join("..").join(".local/chaos").join(run_id.to_string());
    std::fs::create_dir_all(&run_dir)?;

    meter_kafka::admin::ensure_topics(&cfg).await.context("creating topics (is Kafka running? ops/up)")?;
    meter_clickhouse::migrate(&Connection::from(&cfg.clickhouse)).await.context("migrating (is ClickHouse running? ops/up)")?;
    println!(
        "chaos: run {run_id} for {}s: topics *.chaos-{run_id}, database {}, logs in {}{}",
        args.duration.as_secs(),
        cfg.clickhouse.database,
        run_dir.display(),
        if args.negative_control { " -- NEGATIVE CONTROL: state restore disabled" } else { "" }
    );

    let proc = |name: &str, args_: &[&str], instance: &str| Proc {
        name: name.to_owned(),
        args: args_.iter().map(|s| (*s).to_owned()).collect(),
        env: child_env(&cfg, instance, args.negative_control),
        child: None,
        log: run_dir.join(format!("{name}.log")),
        starts: 0,
    };
    let (n_processors, n_sinks) = if args.cluster { (3, 2) } else { (2, 1) };
    let mut procs: Vec<Proc> = (1..=n_processors).map(|i| proc(&format!("p{i}"), &["process"], &format!("p{i}"))).collect();
    let sink_names: Vec<String> = (1..=n_sinks).map(|i| if n_sinks == 1 { "sink".to_owned() } else { format!("sink{i}") }).collect();
    for name in &sink_names {
        procs.push(proc(name, &["sink"], name));
    }
    for p in &mut procs {
        p.start()?;
    }

    // Simulated time runs `speed` times faster than the wall clock and must
    // end in the past; it starts so that it ends half an hour before now.
    // Idle partitions advance their watermark with the wall clock, so events
    // behind it are corrections, never too late (the horizon is a day).
    let now = meter_model::now_ms();
    let span_ms = (args.duration.as_secs_f64() * args.speed * 1000.0) as i64;
    let sim_start = {
        let t = now - span_ms - 1_800_000;
        t - t.rem_euclid(60_000)
    };
    let progress = Arc::new(AtomicU64::new(0));
    let injector = tokio::spawn({
        let (cfg, progress) = (cfg.clone(), progress.clone());
        let a = ChaosArgs { ops_dir: args.ops_dir.clone(), ..args.clone_settings() };
        async move { inject(&cfg, &a, sim_start, progress).await }
    });

    // The fault schedule, in seconds from the start.
    let total = args.duration.as_secs_f64();
    let mut rng = Rng(args.seed ^ 0xD1B5_4A32_D192_ED03);
    let mut schedule: Vec<(f64, Fault)> = Vec::new();
    for i in 0..args.processor_kills {
        let at = total * (i as f64 + 0.5) / args.processor_kills as f64 + (rng.below(1000) as f64 / 1000.0 - 0.5);
        schedule.push((at.max(1.0), Fault::KillProcessor(i as usize % n_processors)));
    }
    for i in 0..args.sink_kills {
        schedule.push((total * (i as f64 + 0.7) / (args.sink_kills as f64 + 1.0), Fault::KillSink(n_processors + i as usize % n_sinks)));
    }
    if args.cluster {
        if !args.no_broker_restart {
            schedule.push((total * 0.3, Fault::KillLeadingBroker));
        }
        if !args.clickhouse_outage.is_zero() {
            schedule.push((total * 0.45, Fault::KillReplica(1)));
            schedule.push((total * 0.7, Fault::KillReplica(2)));
        }
    } else {
        if !args.no_broker_restart {
            schedule.push((total * 0.35, Fault::RestartKafka));
        }
        if !args.clickhouse_outage.is_zero() {
            schedule.push((total * 0.5, Fault::StopClickHouse));
        }
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));

    let monitor: BaseConsumer = meter_kafka::client_config(&cfg.kafka)
        .set("group.id", &cfg.processor.group_id)
        .set("isolation.level", "read_uncommitted")
        // The broker restart is on purpose; its connection errors are noise.
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Critical)
        .create()?;
    let started = Instant::now();
    let mut kills = (0u32, 0u32);
    let mut unexpected_exits = 0u32;
    // A kill has been recovered from once every partition either committed
    // past its offset at the kill or is caught up.
    let mut pending_recovery: Vec<(Instant, Vec<i64>)> = Vec::new();
    let mut committed_now: Vec<i64> = Vec::new();
    let mut longest_recovery = Duration::ZERO;
    let mut next = 0;
    let mut clickhouse_down_for = Duration::ZERO;
    let mut clickhouse_stopped_at = None;
    let mut broker_restarts = 0;
    // Cluster: (what to start again, when, its name).
    let mut down_nodes: Vec<(Vec<String>, Instant, String)> = Vec::new();
    let mut node_kills: Vec<String> = Vec::new();
    while !injector.is_finished() || next < schedule.len() || clickhouse_stopped_at.is_some() || !down_nodes.is_empty() {
        let elapsed = started.elapsed().as_secs_f64();
        while next < schedule.len() && schedule[next].0 <= elapsed {
            let action = schedule[next].1;
            next += 1;
            match action {
                Fault::KillProcessor(idx) => {
                    procs[idx].kill();
                    kills.0 += 1;
                    pending_recovery.push((Instant::now(), committed_now.clone()));
                    tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
                    procs[idx].start()?;
                }
                Fault::KillSink(idx) => {
                    procs[idx].kill();
                    procs[idx].start()?;
                    kills.1 += 1;
                }
                Fault::RestartKafka => {
                    println!("chaos: {elapsed:.0}s restarting the Kafka broker");
                    ops(&args.ops_dir, &["kafka", "restart"])?;
                    broker_restarts += 1;
                }
                Fault::StopClickHouse => {
                    println!("chaos: {elapsed:.0}s stopping ClickHouse for {}s", args.clickhouse_outage.as_secs());
                    ops(&args.ops_dir, &["clickhouse", "stop"])?;
                    clickhouse_stopped_at = Some(Instant::now());
                }
                Fault::KillLeadingBroker => {
                    let leader = ops_output(&args.ops_dir, &["cluster", "leader-broker"])?;
                    println!("chaos: {elapsed:.0}s SIGKILL of broker {leader}, the leader of the most partitions");
                    ops(&args.ops_dir, &["cluster", "kill-broker", &leader])?;
                    down_nodes.push((
                        vec!["start-broker".into(), leader.clone()],
                        Instant::now() + args.node_outage,
                        format!("broker {leader}"),
                    ));
                    node_kills.push(format!("broker {leader}"));
                    broker_restarts += 1;
                }
                Fault::KillReplica(shard) => {
                    let replica = replica_to_kill(shard).to_string();
                    let shard = shard.to_string();
                    println!("chaos: {elapsed:.0}s SIGKILL of ClickHouse shard {shard} replica {replica}");
                    ops(&args.ops_dir, &["cluster", "kill-clickhouse", &shard, &replica])?;
                    let name = format!("clickhouse {shard}/{replica}");
                    down_nodes.push((vec!["start-clickhouse".into(), shard, replica], Instant::now() + args.node_outage, name.clone()));
                    node_kills.push(name);
                }
            }
        }
        let mut back = Vec::new();
        down_nodes.retain(|(cmd, at, name)| {
            if Instant::now() < *at {
                return true;
            }
            back.push((cmd.clone(), name.clone()));
            false
        });
        for (cmd, name) in back {
            let mut a = vec!["cluster"];
            a.extend(cmd.iter().map(String::as_str));
            ops(&args.ops_dir, &a)?;
            println!("chaos: {:.0}s {name} back", started.elapsed().as_secs_f64());
        }
        if clickhouse_stopped_at.is_some_and(|t| t.elapsed() >= args.clickhouse_outage) {
            ops(&args.ops_dir, &["clickhouse", "start"])?;
            if let Some(t) = clickhouse_stopped_at.take() {
                clickhouse_down_for = t.elapsed();
            }
            println!("chaos: {:.0}s ClickHouse back after {:.0}s", started.elapsed().as_secs_f64(), clickhouse_down_for.as_secs_f64());
        }
        for p in &mut procs {
            if p.revive()? {
                unexpected_exits += 1;
            }
        }
        if let Some(state) = group_progress(&monitor, &cfg) {
            committed_now = state.iter().map(|(c, _)| *c).collect();
            pending_recovery.retain(|(t, at_kill)| {
                let recovered = state.iter().enumerate().all(|(p, &(c, high))| c >= high || at_kill.get(p).is_none_or(|&k| c > k));
                if recovered {
                    longest_recovery = longest_recovery.max(t.elapsed());
                }
                !recovered
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (injected, ledger) = injector.await.context("injector")??;
    println!(
        "chaos: faulty phase over after {:.0}s: {} records sent ({} duplicates, {} late, {} poison); draining",
        started.elapsed().as_secs_f64(),
        injected.records,
        injected.duplicates,
        injected.late,
        injected.dead_letters.values().sum::<u64>()
    );

    // Drain: the two instances are killed one last time and restarted with
    // --drain (same static member ids, so each gets its partitions back at
    // once); each restores, catches up, finalizes and exits.
    for p in &mut procs {
        p.kill();
    }
    if args.cluster {
        ops(&args.ops_dir, &["cluster", "start"])?;
    } else {
        ops(&args.ops_dir, &["clickhouse", "start"])?;
        ops(&args.ops_dir, &["kafka", "start"])?;
    }
    let drain_started = Instant::now();
    let mut drainers: Vec<Proc> =
        (1..=n_processors).map(|i| proc(&format!("p{i}-drain"), &["process", "--drain"], &format!("p{i}"))).collect();
    for d in &mut drainers {
        d.start()?;
    }
    for d in &mut drainers {
        wait_for(d, Duration::from_secs(600)).await?;
    }
    // Kills not recovered from before the drain count until it ended.
    for (t, _) in pending_recovery.drain(..) {
        longest_recovery = longest_recovery.max(t.elapsed());
    }
    // One sink drains: a draining sink waits to own every partition (the
    // other sink's static membership lapses after its session timeout).
    let mut sink = proc(&format!("{}-drain", sink_names[0]), &["sink", "--drain"], &sink_names[0]);
    sink.start()?;
    wait_for(&mut sink, Duration::from_secs(600)).await?;
    println!("chaos: drained in {:.0}s", drain_started.elapsed().as_secs_f64());

    // Checks.
    let mut failures: Vec<String> = Vec::new();
    let rec = meter_sink::reconcile::reconcile(&cfg, &ledger).await?;
    for (source, m) in rec.mismatches.iter().take(100) {
        failures.push(format!("{source}: {m}"));
    }
    if rec.mismatches.len() > 100 {
        failures.push(format!("... {} more key mismatches", rec.mismatches.len() - 100));
    }
    // Windows the wall clock closed before the drain must be final; only
    // windows still open (today's day window) may lack a final revision.
    let closed_by = meter_model::now_ms() - cfg.processor.idle_timeout_ms - cfg.processor.allowed_lateness_ms - 60_000;
    let not_final_closed = rec.not_final.iter().filter(|k| k.window_end() < closed_by).count();
    if not_final_closed > 0 {
        failures.push(format!("{not_final_closed} closed windows have no final revision"));
    }
    let dlq = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || dlq_reasons(&cfg)
    })
    .await??;
    if dlq != injected.dead_letters {
        failures.push(format!("dead letters on {} by reason {dlq:?}, injected {:?}", cfg.topics.dlq, injected.dead_letters));
    }
    let client = Connection::from(&cfg.clickhouse).client()?;
    let rows: Vec<(String, u64)> =
        client.query("SELECT reason, count() FROM dead_letters FINAL GROUP BY reason ORDER BY reason").fetch_all().await?;
    let in_clickhouse: BTreeMap<String, u64> = rows.into_iter().collect();
    if in_clickhouse != injected.dead_letters {
        failures.push(format!("dead letters in ClickHouse by reason {in_clickhouse:?}, injected {:?}", injected.dead_letters));
    }
    let aggregated = rec.aggregated_events;
    let dead: u64 = dlq.values().sum();
    let duplicates = injected.records as i64 - aggregated - dead as i64;
    if duplicates != injected.duplicates as i64 {
        failures.push(format!(
            "records produced {} = aggregated {aggregated} + dead-lettered {dead} + duplicates {duplicates}, but {} duplicates were injected",
            injected.records, injected.duplicates
        ));
    }
    if kills.0 < args.processor_kills {
        failures.push(format!("only {} of {} processor kills happened", kills.0, args.processor_kills));
    }
    let figures = format!(
        "{}{} processor kills, {} sink kills, {} broker restart(s), ClickHouse down {:.0}s, {} unexpected exits restarted; \
         {} records: {} events aggregated, {} duplicates, {} dead letters ({} reasons), {} late; {} keys ({} still open); longest recovery {:.1}s",
        if args.cluster {
            let killed = if node_kills.is_empty() { "no node".to_owned() } else { node_kills.join(", ") };
            format!("cluster: {n_processors} processors, {n_sinks} sinks, killed {killed}; ")
        } else {
            String::new()
        },
        kills.0,
        kills.1,
        broker_restarts,
        clickhouse_down_for.as_secs_f64(),
        unexpected_exits,
        injected.records,
        aggregated,
        duplicates,
        dead,
        dlq.len(),
        injected.late,
        rec.keys,
        rec.not_final.len(),
        longest_recovery.as_secs_f64()
    );
    if failures.is_empty() {
        println!("chaos: ok ({figures})");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            println!("  {f}");
        }
        println!("chaos: FAILED ({} problems; {figures})", failures.len());
        Ok(ExitCode::FAILURE)
    }
}

async fn wait_for(p: &mut Proc, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = &mut p.child {
            if let Some(status) = c.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!("{} exited with {status}; see {}", p.name, p.log.display());
            }
        }
        if Instant::now() > deadline {
            p.kill();
            bail!("{} did not finish in {}s; see {}", p.name, timeout.as_secs(), p.log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl ChaosArgs {
    fn clone_settings(&self) -> ChaosArgs {
        ChaosArgs {
            duration: self.duration,
            processor_kills: self.processor_kills,
            sink_kills: self.sink_kills,
            clickhouse_outage: self.clickhouse_outage,
            no_broker_restart: self.no_broker_restart,
            negative_control: self.negative_control,
            seed: self.seed,
            customers: self.customers,
            speed: self.speed,
            ops_dir: self.ops_dir.clone(),
            cluster: self.cluster,
            node_outage: self.node_outage,
        }
    }
}
