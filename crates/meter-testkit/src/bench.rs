//! `meter bench` (run by `ops/bench`): the end-to-end benchmark on the local
//! stack, every figure next to a baseline measured in the same run.
//!
//! 1. Pre-loads the simulated fleet into a fresh events topic.
//! 2. Bare consumer: a librdkafka consumer (read_committed, like the
//!    processor) reads the topic to its end without decoding: the limit.
//! 3. `meter process` (exactly once) consumes the same topic to its end.
//! 4. `meter sink` inserts the processor's revisions into ClickHouse; then
//!    `clickhouse-client` bulk-inserts the same rows (exported in Native
//!    format) into copies of the tables; `--repeat` times, each into a
//!    fresh database.
//! 5. Latency: a fleet publishing in real time through processor and sink
//!    at their default commit interval and batch time; ClickHouse is polled
//!    for the newest event time it can answer for.
//! 6. Scale-out: 1, 2, 3 processor instances in one group on the same topic,
//!    and how long the group takes to settle when an instance joins or
//!    leaves.
//!
//! Throughput is measured from the first record handled to the last
//! (processor and bare consumer alike), so group joins and the drain
//! detection at the end do not count. Topics, consumer groups and the
//! database carry a unique suffix and are deleted afterwards (unless
//! `--keep`); the shared broker and server are never restarted.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meter_clickhouse::Connection;
use meter_config::{Config, Valid};
use meter_kafka::{assign_from_beginning, client_config, fetch_queue_backoff_ms, Signal};
use meter_model::now_ms;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Customers of the pre-loaded fleet (about 760 events per simulated
    /// minute each).
    #[arg(long, default_value_t = 40)]
    customers: usize,
    /// Simulated time of the pre-loaded fleet, e.g. 30m, 1h.
    #[arg(long, default_value = "1h", value_parser = meter_model::time::parse_duration)]
    duration: Duration,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Customers of the real-time fleet for the latency figure.
    #[arg(long, default_value_t = 20)]
    latency_customers: usize,
    /// How long to measure latency (0s skips it).
    #[arg(long, default_value = "30s", value_parser = meter_model::time::parse_duration)]
    latency_duration: Duration,
    /// Processor instance counts for the scale-out figure (empty skips it).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    instances: Vec<usize>,
    /// The ops/ scripts (for `ops/clickhouse client`).
    #[arg(long, default_value = "ops")]
    ops_dir: PathBuf,
    /// How often to measure the bare consumer and the processor, and the
    /// sink and clickhouse-client (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Keep the topics and the database afterwards.
    #[arg(long)]
    keep: bool,
    /// Run the state benchmark instead (see `state_bench`): peak RSS,
    /// restart time, store and changelog size for each of `--histories`.
    #[arg(long)]
    state: bool,
    /// Histories of the state benchmark, in days.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    histories: Vec<u64>,
    /// Run the `meter serve` benchmark instead (see `serve_bench`): HTTP
    /// ingestion against producing straight to Kafka, and query latency.
    #[arg(long)]
    serve: bool,
    #[command(flatten)]
    serve_bench: crate::serve_bench::ServeBenchArgs,
}

/// Everything a bench run creates, for the clean-up.
#[derive(Default)]
pub(crate) struct Created {
    pub(crate) topics: Vec<String>,
    pub(crate) databases: Vec<String>,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A configuration the bench derived, checked again before a service runs on it.
fn valid(c: &Config) -> anyhow::Result<Valid<Config>> {
    Ok(c.clone().validate()?)
}

pub(crate) fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// A configuration with fresh topics, groups and database named after `tag`.
pub(crate) fn fresh(base: &Config, tag: &str, created: &mut Created) -> Config {
    let cfg = base.scoped(tag);
    created.topics.extend([cfg.topics.events.clone(), cfg.topics.aggregates.clone(), cfg.topics.dlq.clone(), cfg.state_topic()]);
    created.databases.push(cfg.clickhouse.database.clone());
    cfg
}

pub async fn run(mut base: Config, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let run_id = now_ms();
    base.topics.partitions = args.partitions;
    // The pre-loaded fleet stops: windows should settle soon after, so that
    // `--drain` ends promptly (the drain tail is not part of any figure).
    base.processor.idle_timeout_ms = 2_000;
    base.processor.instance_id = "bench-1".into();
    let base = base.validate()?.into_inner();
    if args.state {
        crate::state_bench::run(&base, &args.histories, &args.ops_dir).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.serve {
        return crate::serve_bench::run(&base, &args.serve_bench, args.repeat, &args.ops_dir, args.keep).await;
    }
    let mut created = Created::default();
    let result = run_phases(&base, &args, run_id, &mut created).await;
    if !args.keep {
        clean_up(&base, &created).await;
    }
    result
}

async fn run_phases(base: &Config, args: &BenchArgs, run_id: i64, created: &mut Created) -> anyhow::Result<ExitCode> {
    let cfg = fresh(base, &format!("bench-{run_id}"), created);
    let conn = Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await.context("applying migrations (is ClickHouse running? ops/up starts it)")?;
    meter_kafka::admin::ensure_topics(&cfg).await.context("creating topics (is Kafka running? ops/up starts it)")?;
    println!("bench: topic {} ({} partitions), database {}", cfg.topics.events, cfg.topics.partitions, cfg.clickhouse.database);

    // 1. Pre-load.
    let sim = meter_agent::SimConfig {
        seed: 1,
        customers: args.customers,
        agent_id: "bench-agent".into(),
        start: meter_model::time::day_floor(now_ms()) - 2 * 86_400_000,
        duration_s: args.duration.as_secs(),
        customer_prefix: "cust-".into(),
    };
    let (agent, _) = meter_agent::run_simulated(&valid(&cfg)?, sim, 0.0, None).await?;
    let n = agent.events;
    println!("preload: {n} events in {:.1}s ({:.0} events/s produced)", agent.elapsed.as_secs_f64(), rate(n, agent.elapsed));

    // 2. and 3. The limit (a bare consumer) and the processor (exactly
    // once), alternately, `--repeat` times: medians of each and of the
    // ratio, since one run on a shared machine is noisy. Repeats after the
    // first write to their own output topics, so the sink sees one run's.
    let (mut bare_rates, mut proc_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.repeat.max(1) {
        let bare = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || bare_consume(&cfg)).await??
        };
        if bare.0 != n {
            bail!("bare consumer read {} records, {n} were produced", bare.0);
        }
        let bare_rate = rate(bare.0, bare.1);
        println!("bare consumer: {} records in {:.2}s = {bare_rate:.0} records/s", bare.0, bare.1.as_secs_f64());
        let mut pcfg = cfg.clone();
        if i > 0 {
            for topic in [&mut pcfg.topics.aggregates, &mut pcfg.topics.dlq, &mut pcfg.processor.group_id] {
                *topic = format!("{topic}-r{i}");
            }
            created.topics.extend([pcfg.topics.aggregates.clone(), pcfg.topics.dlq.clone(), pcfg.state_topic()]);
            meter_kafka::admin::ensure_topics(&pcfg).await?;
        }
        let (stop, drain) = (Signal::default(), Signal::default());
        drain.raise();
        let p = meter_processor::run(&valid(&pcfg)?, stop, drain).await?;
        if p.counters.total() != n || p.counters.aggregated != n {
            bail!("processor handled {} records ({} aggregated), {n} were produced", p.counters.total(), p.counters.aggregated);
        }
        let proc_rate = p.records_per_second();
        println!(
            "meter process: {} records in {:.2}s = {proc_rate:.0} records/s ({} transactions); processor/bare {:.2}",
            p.counters.total(),
            p.busy.as_secs_f64(),
            p.commits,
            proc_rate / bare_rate
        );
        bare_rates.push(bare_rate);
        proc_rates.push(proc_rate);
        ratios.push(proc_rate / bare_rate);
    }
    let (bare_rate, proc_rate, proc_ratio) = (median(&mut bare_rates), median(&mut proc_rates), median(&mut ratios));

    // 4. The sink against clickhouse-client, `--repeat` times (medians),
    // each time into a fresh database with a fresh group on the same
    // revisions: one run inserts ~35k rows in a few hundredths of a second,
    // so a single figure is at the mercy of anything else on the machine.
    let (mut sink_rates, mut client_rates, mut row_binary_rates, mut sink_ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.repeat.max(1) {
        let mut scfg = cfg.clone();
        if i > 0 {
            scfg.sink.group_id = format!("{}-r{i}", cfg.sink.group_id);
            scfg.clickhouse.database = format!("{}_r{i}", cfg.clickhouse.database);
            created.databases.push(scfg.clickhouse.database.clone());
            meter_clickhouse::migrate(&Connection::from(&scfg.clickhouse)).await?;
        }
        let started = Instant::now();
        let (stop, drain) = (Signal::default(), Signal::default());
        drain.raise();
        let s = meter_sink::run(&valid(&scfg)?, stop, drain).await?;
        let sink_wall = started.elapsed();
        let sink_rate = rate(s.usage_rows, s.insert_time);
        println!(
            "meter sink: {} rows in {} batches; inserting {:.3}s = {sink_rate:.0} rows/s ({:.0} rows/s over its whole run of {:.1}s incl. group join and drain)",
            s.usage_rows,
            s.batches,
            s.insert_time.as_secs_f64(),
            rate(s.usage_rows, sink_wall),
            sink_wall.as_secs_f64()
        );
        let copy = format!("{}_copy", scfg.clickhouse.database);
        created.databases.push(copy.clone());
        let (client_rows, client_time, row_binary_time) = client_insert(&args.ops_dir, &scfg.clickhouse.database, &copy, run_id)?;
        if client_rows != s.usage_rows {
            println!("note: the tables hold {client_rows} rows, the sink reported {}", s.usage_rows);
        }
        let client_rate = rate(client_rows, client_time);
        let row_binary_rate = rate(client_rows, row_binary_time);
        println!(
            "clickhouse-client: {client_rows} rows in {:.3}s = {client_rate:.0} rows/s (Native); {:.3}s = {row_binary_rate:.0} rows/s (RowBinary); sink/clickhouse-client {:.2}",
            client_time.as_secs_f64(),
            row_binary_time.as_secs_f64(),
            sink_rate / client_rate
        );
        sink_rates.push(sink_rate);
        client_rates.push(client_rate);
        row_binary_rates.push(row_binary_rate);
        sink_ratios.push((sink_rate / client_rate, sink_rate / row_binary_rate));
    }
    let (sink_rate, client_rate, row_binary_rate) = (median(&mut sink_rates), median(&mut client_rates), median(&mut row_binary_rates));
    let sink_ratio = median(&mut sink_ratios.iter().map(|r| r.0).collect::<Vec<_>>());
    let sink_ratio_row_binary = median(&mut sink_ratios.iter().map(|r| r.1).collect::<Vec<_>>());

    // 5. Latency at a steady rate.
    let latency = if args.latency_duration.is_zero() {
        None
    } else {
        let lcfg = fresh(base, &format!("bench-{run_id}-latency"), created);
        Some(latency(&lcfg, args).await?)
    };

    // 6. Scale-out. Each instance count gets its own copy of the topic,
    // written in one transaction that stays open until every instance has
    // joined the group: read_committed consumers see nothing before, so all
    // instances start on the backlog together (otherwise the first to join
    // takes every partition and is done before the others arrive).
    let mut scale = Vec::new();
    for &k in &args.instances {
        let mut scfg = cfg.clone();
        scfg.topics.events = format!("{}-x{k}", cfg.topics.events);
        scfg.processor.group_id = format!("{}-x{k}", cfg.processor.group_id);
        created.topics.extend([scfg.topics.events.clone(), scfg.state_topic()]);
        meter_kafka::admin::ensure_topics(&scfg).await?;
        let (records, busy, per) = scale_out(&cfg, &scfg, k).await?;
        if records != n {
            bail!("{k} instances handled {records} records, {n} were produced");
        }
        println!(
            "scale-out: {k} instance(s): {records} records in {:.2}s = {:.0} records/s (per instance: {})",
            busy.as_secs_f64(),
            rate(records, busy),
            per.iter().map(|(r, d)| format!("{r} in {:.2}s", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
        );
        scale.push((k, rate(records, busy)));
    }
    let rebalance = if args.instances.iter().any(|&k| k > 1) {
        let mut rcfg = cfg.clone();
        rcfg.processor.group_id = format!("{}-rebalance", cfg.processor.group_id);
        created.topics.push(rcfg.state_topic());
        meter_kafka::admin::ensure_topics(&rcfg).await?;
        Some(rebalance(&rcfg).await?)
    } else {
        None
    };

    println!("\nsummary (one run, same machine; ratios are what to compare across runs):");
    println!("  events                      {n}");
    println!("  bare consumer               {bare_rate:>12.0} records/s");
    println!(
        "  meter process               {proc_rate:>12.0} records/s   processor/bare = {proc_ratio:.2} (target >= 0.8; median of {})",
        ratios.len()
    );
    println!("  clickhouse-client insert    {client_rate:>12.0} rows/s      (Native; RowBinary {row_binary_rate:.0} rows/s)");
    println!(
        "  meter sink insert           {sink_rate:>12.0} rows/s      sink/clickhouse-client = {sink_ratio:.2} (target >= 0.8; {sink_ratio_row_binary:.2} against RowBinary; median of {})",
        sink_ratios.len()
    );
    if let Some((p50, p99, samples, events)) = latency {
        println!("  event-to-queryable latency  p50 {p50} ms, p99 {p99} ms ({samples} event seconds, {events} events)");
    }
    if let Some(&(_, one)) = scale.first() {
        for (k, r) in &scale {
            println!("  scale-out {k} instance(s)     {r:>12.0} records/s   x{:.2} of the first", r / one);
        }
    }
    if let Some((join, leave)) = rebalance {
        println!(
            "  rebalance                   join {} ms, leave {} ms (session_timeout_ms {})",
            join.as_millis(),
            leave.as_millis(),
            cfg.processor.session_timeout_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads every partition of the events topic to its end, as the processor's
/// consumer would (read_committed, the same fetch settings), and only
/// counts. Returns the records and the time from the first to the last.
fn bare_consume(cfg: &Config) -> anyhow::Result<(u64, Duration)> {
    let consumer: BaseConsumer = client_config(&cfg.kafka)
        .set("group.id", format!("{}-bare", cfg.processor.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.queue.backoff.ms", fetch_queue_backoff_ms(&cfg.kafka))
        .create()
        .context("creating bare consumer")?;
    let mut remaining = assign_from_beginning(&consumer, &consumer, &cfg.topics.events, 0..cfg.topics.partitions)?;
    let (mut n, mut bytes) = (0u64, 0usize);
    let (mut first, mut last) = (None, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(600);
    while !remaining.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
                last = Instant::now();
                first.get_or_insert(last);
                if remaining.get(&m.partition()).is_some_and(|&high| m.offset() + 1 >= high) {
                    remaining.remove(&m.partition());
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "bare consumer error"),
            None => {}
        }
        if Instant::now() > deadline {
            bail!("bare consumer did not reach the end in 600s");
        }
    }
    std::hint::black_box(bytes);
    Ok((n, first.map_or(Duration::ZERO, |f| last - f)))
}

/// Exports the sink's rows and has `clickhouse-client` insert them into
/// empty copies of the tables, in Native format (its fastest: the
/// baseline) and in RowBinary (the sink's wire format). The times are what
/// `clickhouse-client --time` reports for each insert (the client's own
/// start-up excluded, as the sink's figure excludes its start-up).
fn client_insert(ops_dir: &std::path::Path, db: &str, copy: &str, run_id: i64) -> anyhow::Result<(u64, Duration, Duration)> {
    let client = |args: &[&str], stdin: Stdio| -> anyhow::Result<(Vec<u8>, String)> {
        let out = Command::new(ops_dir.join("clickhouse"))
            .arg("client")
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running ops/clickhouse client {args:?}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("clickhouse-client {args:?} failed: {stderr}");
        }
        Ok((out.stdout, stderr))
    };
    client(&["--query", &format!("CREATE DATABASE IF NOT EXISTS {copy}")], Stdio::null())?;
    let dir = std::env::temp_dir().join(format!("meter-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let (mut rows, mut time, mut row_binary) = (0u64, Duration::ZERO, Duration::ZERO);
    for table in ["usage_minute", "usage_hour", "usage_day"] {
        let (count, _) = client(&["--query", &format!("SELECT count() FROM {db}.{table}")], Stdio::null())?;
        rows += String::from_utf8_lossy(&count).trim().parse::<u64>().context("counting rows")?;
        for format in ["Native", "RowBinary"] {
            let target = format!("{copy}.{table}_{}", format.to_lowercase());
            client(&["--query", &format!("CREATE TABLE {target} AS {db}.{table}")], Stdio::null())?;
            let file = dir.join(format!("{table}.{format}"));
            let (data, _) = client(&["--query", &format!("SELECT * FROM {db}.{table} FORMAT {format}")], Stdio::null())?;
            std::fs::write(&file, &data)?;
            let (_, stderr) =
                client(&["--time", "--query", &format!("INSERT INTO {target} FORMAT {format}")], Stdio::from(std::fs::File::open(&file)?))?;
            let secs: f64 = stderr
                .lines()
                .filter_map(|l| l.trim().parse::<f64>().ok())
                .next_back()
                .with_context(|| format!("no time in clickhouse-client --time output: {stderr:?}"))?;
            if format == "Native" {
                time += Duration::from_secs_f64(secs);
            } else {
                row_binary += Duration::from_secs_f64(secs);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((rows, time, row_binary))
}

/// Publishes a fleet in real time (event time = wall clock) through a
/// processor and a sink with their configured commit interval and batch
/// time, and polls ClickHouse every 50 ms for the newest event time it
/// holds. The agent sends each simulated second's events together when
/// that second is over; the first poll that sees the second is when they
/// became queryable (so figures are up to 50 ms high).
/// Returns p50 and p99 over the seconds (in ms), their count and the events.
async fn latency(cfg: &Config, args: &BenchArgs) -> anyhow::Result<(i64, i64, usize, u64)> {
    let conn = Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await?;
    meter_kafka::admin::ensure_topics(cfg).await?;
    let client = conn.client()?;
    let stop = Signal::default();
    let processor = tokio::spawn({
        let (cfg, stop) = (cfg.clone(), stop.clone());
        async move { meter_processor::run(&valid(&cfg)?, stop, Signal::default()).await }
    });
    let sink = tokio::spawn({
        let (cfg, stop) = (cfg.clone(), stop.clone());
        async move { meter_sink::run(&valid(&cfg)?, stop, Signal::default()).await }
    });
    // Let the group settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start = now_ms();
    let sim = meter_agent::SimConfig {
        seed: 2,
        customers: args.latency_customers,
        agent_id: "bench-latency".into(),
        start,
        duration_s: args.latency_duration.as_secs(),
        customer_prefix: "lat-".into(),
    };
    let agent = tokio::spawn({
        let cfg = cfg.clone();
        async move { meter_agent::run_simulated(&valid(&cfg)?, sim, 1.0, None).await }
    });
    let end = start + 1000 * args.latency_duration.as_secs() as i64;
    let mut newest = start - 1;
    let mut samples = Vec::new();
    let deadline = Instant::now() + args.latency_duration + Duration::from_secs(60);
    while newest < end - 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen: i64 = client
            .query("SELECT max(last_event_time_ms) FROM usage_minute")
            .fetch_one()
            .await
            .context("polling ClickHouse for the newest event")?;
        let at = now_ms();
        // Every simulated second in (newest, seen] became queryable now; the
        // agent publishes a second's events when that second is over.
        let mut t = start + ((newest - start).div_euclid(1000) + 1) * 1000;
        while t <= seen {
            samples.push(at - (t + 1000));
            t += 1000;
        }
        newest = newest.max(seen);
    }
    let (agent_stats, _) = agent.await??;
    stop.raise();
    processor.await??;
    sink.await??;
    if samples.is_empty() {
        bail!("no event became queryable within the latency run");
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok((pct(0.5), pct(0.99), samples.len(), agent_stats.events))
}

/// Copies `from` into `to` (same partitions, keys and payloads) in one
/// transaction and returns the producer with that transaction still open.
fn copy_uncommitted(cfg: &Config, from: &str, to: &str) -> anyhow::Result<BaseProducer> {
    let producer: BaseProducer = client_config(&cfg.kafka)
        .set("transactional.id", format!("{to}-copy"))
        .set("transaction.timeout.ms", "600000")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .context("creating the copying producer")?;
    producer.init_transactions(Duration::from_secs(60))?;
    producer.begin_transaction()?;
    let consumer: BaseConsumer = client_config(&cfg.kafka)
        .set("group.id", format!("{to}-copy"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.queue.backoff.ms", fetch_queue_backoff_ms(&cfg.kafka))
        .create()?;
    let mut remaining = assign_from_beginning(&consumer, &consumer, from, 0..cfg.topics.partitions)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !remaining.is_empty() {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(to).partition(m.partition()).payload(m.payload().unwrap_or_default());
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => bail!("copying into {to}: {e}"),
                }
            }
            if remaining.get(&m.partition()).is_some_and(|&high| m.offset() + 1 >= high) {
                remaining.remove(&m.partition());
            }
        }
        if Instant::now() > deadline {
            bail!("copying {from} did not reach its end in 600s");
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(producer)
}

/// Runs `k` processor instances in one group on a copy of the events topic
/// that becomes visible only once all have joined. Returns the records
/// handled, the longest busy span, and each instance's records and span.
async fn scale_out(cfg: &Config, scfg: &Config, k: usize) -> anyhow::Result<(u64, Duration, Vec<(u64, Duration)>)> {
    let producer = {
        let (cfg, from, to) = (cfg.clone(), cfg.topics.events.clone(), scfg.topics.events.clone());
        tokio::task::spawn_blocking(move || copy_uncommitted(&cfg, &from, &to)).await??
    };
    // Draining is raised only after the commit: until then read_committed
    // offset queries report the topic as empty, i.e. caught up.
    let drain = Signal::default();
    let mut tasks = Vec::new();
    for i in 0..k {
        let mut c = scfg.clone();
        c.processor.instance_id = format!("bench-{}", i + 1);
        let drain = drain.clone();
        tasks.push(tokio::spawn(async move { meter_processor::run(&valid(&c)?, Signal::default(), drain).await }));
    }
    let probe: BaseConsumer = client_config(&cfg.kafka).create()?;
    wait_stable(&probe, &scfg.processor.group_id, k).await?;
    let producer = tokio::task::spawn_blocking(move || producer.commit_transaction(Duration::from_secs(60))).await?;
    producer.context("committing the copy")?;
    drain.raise();
    let mut per = Vec::new();
    for t in tasks {
        let s = t.await??;
        per.push((s.counters.total(), s.busy));
    }
    let records = per.iter().map(|(r, _)| r).sum();
    let busy = per.iter().map(|(_, d)| *d).max().unwrap_or_default();
    Ok((records, busy, per))
}

/// The group's state and member count as the coordinator reports them.
fn group_state(probe: &BaseConsumer, group: &str) -> Option<(String, usize)> {
    let list = probe.fetch_group_list(Some(group), Duration::from_secs(5)).ok()?;
    let g = list.groups().iter().find(|g| g.name() == group)?;
    Some((g.state().to_owned(), g.members().len()))
}

async fn wait_stable(probe: &BaseConsumer, group: &str, members: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = group_state(probe, group);
        if state.as_ref().is_some_and(|(s, m)| s == "Stable" && *m == members) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("group {group} did not settle with {members} members in 120s (last seen: {state:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time for the group to be stable again when a second instance joins a
/// running one, and when it leaves (SIGTERM-like shutdown: it commits and
/// closes its consumer).
async fn rebalance(cfg: &Config) -> anyhow::Result<(Duration, Duration)> {
    let probe: BaseConsumer = client_config(&cfg.kafka).create()?;
    let group = cfg.processor.group_id.clone();
    let start = |instance: &str| {
        let mut c = cfg.clone();
        c.processor.instance_id = instance.into();
        let stop = Signal::default();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { meter_processor::run(&valid(&c)?, stop, Signal::default()).await }
        });
        (stop, task)
    };
    let (stop_a, a) = start("bench-a");
    wait_stable(&probe, &group, 1).await?;
    let joined = Instant::now();
    let (stop_b, b) = start("bench-b");
    tokio::time::sleep(Duration::from_millis(100)).await;
    wait_stable(&probe, &group, 2).await?;
    let join = joined.elapsed();
    let left = Instant::now();
    stop_b.raise();
    b.await??;
    wait_stable(&probe, &group, 1).await?;
    let leave = left.elapsed();
    stop_a.raise();
    a.await??;
    Ok((join, leave))
}

pub(crate) async fn clean_up(cfg: &Config, created: &Created) {
    if let Ok(admin) = client_config(&cfg.kafka).create::<AdminClient<DefaultClientContext>>() {
        let topics: Vec<&str> = created.topics.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await {
            tracing::warn!(error = %e, "deleting the bench topics");
        }
    }
    let conn = Connection::from(&cfg.clickhouse);
    for db in &created.databases {
        if meter_clickhouse::check_identifier(db).is_ok() {
            let dropped = match conn.server_client() {
                Ok(client) => client.query(&format!("DROP DATABASE IF EXISTS {db}")).execute().await.map_err(meter_clickhouse::Error::from),
                Err(e) => Err(e),
            };
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "dropping {db}");
            }
        }
    }
}
