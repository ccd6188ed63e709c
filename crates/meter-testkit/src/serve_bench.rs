//! `meter bench --serve` (run by `ops/bench --serve`): what `meter serve`
//! costs over producing the same events straight to Kafka, and how fast it
//! answers a month of a customer's daily usage (issue 17), in one run.
//!
//! Ingestion. `--serve-events` CloudEvents (the mapping of
//! `meter_serve::cloudevents`: type `service/usage_type` from the catalog,
//! subject the customer, a time within the last day) are serialized as
//! whole HTTP requests in batches of 100 and of 1,000 before any clock
//! starts. Each of `--repeat` rounds then
//!
//! 1. produces the same usage events (mapped by the server's own
//!    `to_usage_event`) straight to a fresh topic with the project's
//!    idempotent producer, tuned as `meter serve` tunes its own, encoding
//!    each event and waiting for every acknowledgement: the baseline;
//! 2. posts the batches of 100, then those of 1,000, to a `meter serve`
//!    child process over `--serve-connections` keep-alive HTTP/1.1
//!    connections; every answer must be 202 with the batch's count.
//!
//! Each figure runs from the first record (request) sent to the last
//! acknowledgement (answer), after an untimed warm-up. Both HTTP batch
//! sizes go to the server's one topic; the baseline has its own. The
//! record counts of both topics are checked at the end.
//!
//! Queries. `--serve-customers` customers' day windows of last month and of
//! the day on either side (every usage type of the catalog, three regions,
//! two resources where the type keys by resource, three revisions of each
//! window, inserted unmerged so that `argMax` has every revision to read;
//! the row count afterwards says whether merges kept them)
//! go into `usage_day`; then `--serve-queries` sequential `GET /v1/usage`
//! for one customer's month, by day and by month, over one connection,
//! and the same queries (the server's SQL, client and user) straight to
//! ClickHouse: the baseline. Every answer is checked against the inserted
//! rows.
//!
//! Any other answer than the expected one makes the run fail (exit 1)
//! after the figures are printed, with the statuses counted.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meter_clickhouse::Connection;
use meter_config::{ApiKey, ApiRole, Config};
use meter_kafka::publish::{Publisher, Tuning};
use meter_model::date::format_rfc3339;
use meter_model::{now_ms, UsageEvent, YearMonth};
use meter_report::api::{Dim, UsageQuery, UsageWindow};
use meter_sink::UsageRow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::{clean_up, fresh, median, rate, Created};

/// The agent id of the ingest key (what the events carry).
const AGENT: &str = "bench-serve";
const SOURCE: &str = "//bench/serve";
const INGEST_CUSTOMERS: usize = 100;
const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];
const REVISIONS: u64 = 3;
const BATCH_SIZES: [usize; 2] = [100, 1_000];
const DAY_MS: i64 = 86_400_000;
/// Untimed requests before each query series (connection, ClickHouse's caches).
const QUERY_WARM_UP: usize = 5;

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// `--serve`: events posted per measurement (and produced for the
    /// baseline).
    #[arg(long, default_value_t = 200_000)]
    serve_events: usize,
    /// `--serve`: concurrent keep-alive connections posting them.
    #[arg(long, default_value_t = 4)]
    serve_connections: usize,
    /// `--serve`: sequential usage queries timed per window (day, month).
    #[arg(long, default_value_t = 200)]
    serve_queries: usize,
    /// `--serve`: customers with a month of daily usage in ClickHouse, queried in turn.
    #[arg(long, default_value_t = 50)]
    serve_customers: usize,
}

/// A usage type of the catalog.
struct Kind {
    service: String,
    usage_type: String,
    key_by_resource: bool,
}

fn kinds(cfg: &Config) -> anyhow::Result<Vec<Kind>> {
    let mut kinds: Vec<Kind> = cfg
        .catalog()?
        .usage_types()
        .map(|t| Kind { service: t.service.clone(), usage_type: t.name.clone(), key_by_resource: t.key_by_resource })
        .collect();
    kinds.sort_by(|a, b| (&a.service, &a.usage_type).cmp(&(&b.service, &b.usage_type)));
    if kinds.is_empty() {
        bail!("the catalog has no usage type");
    }
    Ok(kinds)
}

/// Runs the `meter serve` benchmark; `base` is validated, `repeat` and
/// `keep` are `meter bench`'s.
pub async fn run(base: &Config, args: &ServeBenchArgs, repeat: usize, ops_dir: &Path, keep: bool) -> anyhow::Result<ExitCode> {
    let run_id = now_ms();
    let work = ops_dir.join("..").join(".local").join("serve-bench").join(run_id.to_string());
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut created = Created::default();
    let result = Bench::new(base, args, repeat.max(1), ops_dir, run_id, &work, &mut created).await;
    let result = match result {
        Ok(bench) => bench.run().await,
        Err(e) => Err(e),
    };
    if !keep {
        clean_up(base, &created).await;
    }
    if matches!(result, Ok(true)) && !keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("serve bench: configuration and server log kept in {}", work.display());
    }
    Ok(if result? { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A run scope with its own topics and database, every topic it creates
/// registered for the clean-up.
fn scope(base: &Config, tag: &str, created: &mut Created) -> Config {
    let cfg = fresh(base, tag, created);
    created.topics.extend([cfg.topics.invoice_lines.clone(), cfg.topics.period_close.clone(), cfg.topics.agents.clone()]);
    cfg
}

struct Bench {
    /// The server's scope (its topic and database).
    http: Config,
    /// The baseline's topic.
    direct: Config,
    kinds: Vec<Kind>,
    repeat: usize,
    connections: usize,
    queries: usize,
    query_customers: usize,
    events: Vec<UsageEvent>,
    /// The same events as whole requests, for each of [`BATCH_SIZES`].
    requests: Vec<(usize, Arc<Vec<Request>>)>,
    server: Server,
    admin_token: String,
    analyst_password: String,
}

/// One POST, framed and ready to write, and the answer it must get.
#[derive(Clone)]
struct Request {
    bytes: Vec<u8>,
    events: usize,
    accepted: Vec<u8>,
}

impl Bench {
    async fn new(
        base: &Config,
        args: &ServeBenchArgs,
        repeat: usize,
        ops_dir: &Path,
        run_id: i64,
        work: &Path,
        created: &mut Created,
    ) -> anyhow::Result<Bench> {
        let mut http = scope(base, &format!("serve-{run_id}"), created);
        let direct = scope(base, &format!("serve-{run_id}-direct"), created);
        if !http.processor.agents.is_empty() {
            // An enforced registry would refuse the bench's agent.
            http.processor.agents.insert(AGENT.into(), vec!["*".into()]);
        }
        meter_kafka::admin::ensure_topics(&http).await.context("creating topics (is Kafka running? ops/up starts it)")?;
        meter_kafka::admin::ensure_topics(&direct).await.context("creating topics")?;
        meter_clickhouse::migrate(&Connection::from(&http.clickhouse))
            .await
            .context("applying migrations (is ClickHouse running? ops/up starts it)")?;
        let kinds = kinds(&http)?;
        let (ingest_token, admin_token) = (meter_serve::keys::new_token()?, meter_serve::keys::new_token()?);
        let analyst_password = analyst_password(ops_dir)?;
        let server = Server::start(&http, &ingest_token, &admin_token, work, &analyst_password).await?;

        let n = args.serve_events.max(BATCH_SIZES[1]);
        let now = now_ms();
        let cloudevents: Vec<Value> = (0..n).map(|i| cloudevent(i, &kinds, now)).collect();
        let events = cloudevents
            .iter()
            .map(|v| {
                let raw = serde_json::value::RawValue::from_string(v.to_string())?;
                meter_serve::cloudevents::to_usage_event(&raw, AGENT).map_err(|m| anyhow::anyhow!("event {v}: {m}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut requests = Vec::new();
        for size in BATCH_SIZES {
            let batch: Vec<Request> = cloudevents
                .chunks(size)
                .map(|chunk| {
                    let body = serde_json::to_vec(chunk)?;
                    Ok(Request {
                        bytes: post_request(server.addr, &ingest_token, &body),
                        events: chunk.len(),
                        accepted: format!("{{\"accepted\":{}}}", chunk.len()).into_bytes(),
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            requests.push((size, Arc::new(batch)));
        }
        let body_bytes: usize = requests[0].1.iter().map(|r| r.bytes.len()).sum();
        println!(
            "serve bench: {n} events ({} usage types, {INGEST_CUSTOMERS} customers, {:.0} bytes of JSON each), {} connections, --repeat {repeat}",
            kinds.len(),
            body_bytes as f64 / n as f64,
            args.serve_connections.max(1)
        );
        println!(
            "serve bench: meter serve on {} (pid {}) -> topic {}; direct Kafka -> topic {}; {} partitions each; database {}",
            server.addr,
            server.child.id(),
            http.topics.events,
            direct.topics.events,
            http.topics.partitions,
            http.clickhouse.database
        );
        Ok(Bench {
            http,
            direct,
            kinds,
            repeat,
            connections: args.serve_connections.max(1),
            queries: args.serve_queries.max(1),
            query_customers: args.serve_customers.max(1),
            events,
            requests,
            server,
            admin_token,
            analyst_password,
        })
    }

    /// Runs every measurement and prints it; false if any answer was wrong.
    async fn run(self) -> anyhow::Result<bool> {
        let n = self.events.len() as u64;
        let mut failed = Vec::new();

        // The baseline's producer: `meter serve`'s settings (its `state()`),
        // the same codec, one producer for every round as the server keeps one.
        let s = &self.http.serve;
        let tuning = Tuning {
            linger_ms: Some(5),
            queue_messages: Some((s.max_in_flight_events * 2).max(1000)),
            message_timeout_ms: Some(s.delivery_timeout_ms),
            bulk: true,
        };
        let producer = meter_kafka::publish::producer(&self.direct.kafka, tuning)?;
        let (codec, _) = meter_kafka::registry::codec_for(&self.direct, &[meter_kafka::registry::Writes::Events])?;
        let topic = self.direct.topics.events.as_str();
        let warm = &self.events[..BATCH_SIZES[0]];
        direct(&producer, topic, &codec, warm).await.context("warming up the direct producer")?;
        let mut direct_sent = warm.len() as u64;
        let mut posted = 0u64;
        let warm_up = self.requests[0].1.iter().take(self.connections).map(|r| r.events as u64).sum::<u64>();
        let w = ingest(&self.server, &Arc::new(self.requests[0].1.iter().take(self.connections).cloned().collect()), self.connections)
            .await
            .context("warming up meter serve")?;
        posted += w.accepted;
        if w.accepted != warm_up {
            failed.push(format!("warm-up: {}", w.describe_failures()));
        }

        let mut direct_rates = Vec::new();
        let mut http_rates: Vec<Vec<f64>> = vec![Vec::new(); BATCH_SIZES.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); BATCH_SIZES.len()];
        let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); BATCH_SIZES.len()];
        let mut server_cpu: Vec<Vec<f64>> = vec![Vec::new(); BATCH_SIZES.len()];
        let mut direct_cpu = Vec::new();
        for round in 1..=self.repeat {
            let d = direct(&producer, topic, &codec, &self.events).await?;
            direct_sent += n;
            let direct_rate = rate(n, d.elapsed);
            println!(
                "[{round}/{}] direct Kafka: {n} events in {:.2}s = {} ev/s (this process's CPU {:.2}s, {:.1} us/event)",
                self.repeat,
                d.elapsed.as_secs_f64(),
                thousands(direct_rate),
                d.cpu,
                d.cpu * 1e6 / n as f64
            );
            direct_rates.push(direct_rate);
            direct_cpu.push(d.cpu * 1e6 / n as f64);
            for (i, (size, requests)) in self.requests.iter().enumerate() {
                let r = ingest(&self.server, requests, self.connections).await?;
                posted += r.accepted;
                let http_rate = rate(r.accepted, r.elapsed);
                let mut lat = r.latencies.clone();
                println!(
                    "[{round}/{}] serve ingest, batches of {}: {} events in {} requests, {:.2}s = {} ev/s ({:.2} of direct); request p50 {:.1} ms, p99 {:.1} ms; CPU server {:.2}s ({:.1} us/event), client {:.2}s{}",
                    self.repeat,
                    thousands(*size as f64),
                    r.accepted,
                    requests.len(),
                    r.elapsed.as_secs_f64(),
                    thousands(http_rate),
                    http_rate / direct_rate,
                    ms(percentile(&mut lat, 0.5)),
                    ms(percentile(&mut lat, 0.99)),
                    r.server_cpu,
                    r.server_cpu * 1e6 / r.accepted.max(1) as f64,
                    r.client_cpu,
                    if r.failures.is_empty() { String::new() } else { format!("; FAILED: {}", r.describe_failures()) }
                );
                if !r.failures.is_empty() {
                    failed.push(format!("round {round}, batches of {size}: {}", r.describe_failures()));
                }
                http_rates[i].push(http_rate);
                ratios[i].push(http_rate / direct_rate);
                latencies[i].extend(r.latencies);
                server_cpu[i].push(r.server_cpu * 1e6 / r.accepted.max(1) as f64);
            }
        }
        drop(producer);
        for (cfg, want, what) in [(&self.http, posted, "meter serve's"), (&self.direct, direct_sent, "the direct")] {
            let have = topic_records(cfg, &cfg.topics.events)?;
            if have != want as i64 {
                failed.push(format!("{what} topic {} holds {have} records, {want} were acknowledged", cfg.topics.events));
            }
        }

        let month = last_month()?;
        let usage = MonthOfUsage { month, kinds: &self.kinds, customers: self.query_customers };
        let inserted = usage.insert(&self.http).await?;
        let mut series = Vec::new();
        for window in [UsageWindow::Day, UsageWindow::Month] {
            series.push((self.query_series(&usage, window).await?, self.clickhouse_series(&usage, window).await?));
        }
        for q in series.iter().flat_map(|(a, b)| [a, b]) {
            if q.failures > 0 {
                failed.push(format!(
                    "{}, window={}: {} of {} answers wrong: {}",
                    q.via,
                    q.window.as_str(),
                    q.failures,
                    q.samples + QUERY_WARM_UP,
                    q.first_failure
                ));
            }
        }
        let kept = usage.stored_rows(&self.http).await?;

        let direct_rate = median(&mut direct_rates);
        println!("\nsummary (one run, same machine; the ratios are what to compare across runs; medians of {}):", self.repeat);
        println!(
            "  direct Kafka (idempotent producer, serve's settings): {} ev/s ({:.1} us CPU/event)",
            thousands(direct_rate),
            median(&mut direct_cpu)
        );
        for (i, size) in BATCH_SIZES.iter().enumerate() {
            let lat = &mut latencies[i];
            println!(
                "  serve ingest, batches of {}: {} ev/s ({:.2} of direct Kafka {} ev/s; {} connections, request p50 {:.1} ms, p99 {:.1} ms; server {:.1} us CPU/event)",
                thousands(*size as f64),
                thousands(median(&mut http_rates[i])),
                median(&mut ratios[i]),
                thousands(direct_rate),
                self.connections,
                ms(percentile(lat, 0.5)),
                ms(percentile(lat, 0.99)),
                median(&mut server_cpu[i]),
            );
        }
        for (q, ch) in &series {
            let what = match q.window {
                UsageWindow::Month => "the month's total (window=month)",
                _ => "a month of daily usage (window=day)",
            };
            println!(
                "  serve query, {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} requests, {} rows each; the same query straight to ClickHouse p50 {:.1} ms, p99 {:.1} ms)",
                q.p50, q.p99, q.max, q.samples, q.rows, ch.p50, ch.p99
            );
        }
        println!(
            "  (queries: {} customers' {month} in usage_day, {inserted} rows{}; analyst user; {QUERY_WARM_UP} untimed requests first)",
            self.query_customers,
            if kept == inserted {
                format!(", all {REVISIONS} revisions of each window unmerged")
            } else {
                format!(", {kept} after merges")
            }
        );
        if failed.is_empty() {
            return Ok(true);
        }
        println!("\nFAILED: the figures above do not count; what went wrong:");
        for f in &failed {
            println!("  - {f}");
        }
        Ok(false)
    }

    /// `--serve-queries` sequential usage queries for a month, over one
    /// connection, customer after customer; every answer checked.
    async fn query_series(&self, usage: &MonthOfUsage<'_>, window: UsageWindow) -> anyhow::Result<QuerySeries> {
        let (from, to) = (format_rfc3339(usage.month.start_millis()), format_rfc3339(usage.month.end_millis()));
        let per_customer: Vec<(Vec<u8>, Expected)> = (0..usage.customers)
            .map(|c| {
                let path = format!(
                    "/v1/usage?customer={}&from={from}&to={to}&window={}&group_by=service,usage_type",
                    query_customer(c),
                    window.as_str()
                );
                (get_request(self.server.addr, &path, Some(&self.admin_token)), usage.expected(c, window))
            })
            .collect();
        let mut conn = Conn::connect(self.server.addr).await?;
        let mut body = Vec::new();
        let mut series = QuerySeries::new("meter serve", window, per_customer[0].1.len());
        let mut cpu = 0.0;
        for i in 0..QUERY_WARM_UP + self.queries {
            let (request, expected) = &per_customer[i % per_customer.len()];
            if i == QUERY_WARM_UP {
                cpu = self.server.cpu();
            }
            let started = Instant::now();
            let status = conn.exchange(request, &mut body).await.context("querying meter serve")?;
            series.record(i, started.elapsed(), check_usage(status, &body, expected));
        }
        series.server_cpu_ms = Some((self.server.cpu() - cpu) * 1e3 / self.queries as f64);
        series.finish();
        Ok(series)
    }

    /// The same queries as [`Bench::query_series`] (the server's own SQL
    /// and client, the same user) straight to ClickHouse: the baseline.
    async fn clickhouse_series(&self, usage: &MonthOfUsage<'_>, window: UsageWindow) -> anyhow::Result<QuerySeries> {
        let mut ch = self.http.clickhouse.clone();
        ch.user = "analyst".into();
        ch.password = self.analyst_password.clone();
        let client = Connection::from(&ch).client()?;
        let (from_s, to_s) = (meter_clickhouse::seconds(usage.month.start_millis()), meter_clickhouse::seconds(usage.month.end_millis()));
        let expected: Vec<Expected> = (0..usage.customers).map(|c| usage.expected(c, window)).collect();
        let mut series = QuerySeries::new("ClickHouse", window, expected[0].len());
        for i in 0..QUERY_WARM_UP + self.queries {
            let c = i % usage.customers;
            let q = UsageQuery {
                customer: query_customer(c),
                from_s,
                to_s,
                window,
                group_by: vec![Dim::Service, Dim::UsageType],
                service: String::new(),
                usage_type: String::new(),
                region: String::new(),
                resource: String::new(),
                offset: 0,
                limit: 1_000,
            };
            let started = Instant::now();
            let (rows, more) = meter_report::api::usage(&client, &q).await.context("querying ClickHouse")?;
            let took = started.elapsed();
            let got: Expected = rows
                .iter()
                .map(|r| {
                    let start = match window {
                        UsageWindow::Month => YearMonth::new((r.bucket / 100) as i32, r.bucket % 100).map_or(0, |m| m.start_millis()),
                        _ => i64::from(r.bucket) * 1000,
                    };
                    let dim = |i: usize| r.dims.get(i).cloned().unwrap_or_default();
                    ((format_rfc3339(start), dim(0), dim(1)), (r.quantity.to_string(), r.event_count))
                })
                .collect();
            let answer = if !more && got == expected[c] {
                Ok(())
            } else {
                Err(format!("{} rows{}, {} expected", rows.len(), if more { " and more" } else { "" }, expected[c].len()))
            };
            series.record(i, took, answer);
        }
        series.finish();
        Ok(series)
    }
}

/// The `i`th event: the catalog's usage types in turn, a customer every
/// `kinds` events, a time within the last day.
fn cloudevent(i: usize, kinds: &[Kind], now: i64) -> Value {
    let k = &kinds[i % kinds.len()];
    json!({
        "specversion": "1.0",
        "id": format!("e-{i}"),
        "source": SOURCE,
        "type": format!("{}/{}", k.service, k.usage_type),
        "subject": format!("serve-cust-{:03}", i / kinds.len() % INGEST_CUSTOMERS),
        "time": format_rfc3339(now - 60_000 - (i as i64 * 7_919_003) % (DAY_MS - 120_000)),
        "datacontenttype": "application/json",
        "data": {"quantity": 1 + (i as i64 * 7919) % 100_000, "resource": format!("r-{}", i % 7), "region": REGIONS[i % REGIONS.len()]},
    })
}

/// A baseline run: its time and this process's CPU time.
struct DirectRun {
    elapsed: Duration,
    cpu: f64,
}

/// Encodes and produces `events` (key = customer) and waits for every
/// acknowledgement.
async fn direct(producer: &FutureProducer, topic: &str, codec: &meter_avro::Codec, events: &[UsageEvent]) -> anyhow::Result<DirectRun> {
    let cpu = cpu_seconds("self");
    let started = Instant::now();
    let mut publisher = Publisher::new(producer, topic);
    let mut payload = Vec::with_capacity(256);
    for e in events {
        payload.clear();
        codec.encode_event(e, &mut payload);
        publisher.send(Some(e.customer_id.as_bytes()), &payload).await?;
    }
    publisher.finish().await?;
    let elapsed = started.elapsed();
    if publisher.acknowledged != events.len() as u64 {
        bail!("{} of {} events acknowledged on {topic}", publisher.acknowledged, events.len());
    }
    Ok(DirectRun { elapsed, cpu: cpu_seconds("self") - cpu })
}

/// One series of POSTs.
struct IngestRun {
    accepted: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Requests by status, of those not answered 202 with their count.
    failures: BTreeMap<u16, u64>,
    first_failure: String,
    server_cpu: f64,
    client_cpu: f64,
}

impl IngestRun {
    fn describe_failures(&self) -> String {
        let statuses: Vec<String> = self.failures.iter().map(|(s, n)| format!("{n} answered {s}")).collect();
        format!("{} (first: {})", statuses.join(", "), self.first_failure)
    }
}

/// What one connection did.
#[derive(Default)]
struct Posted {
    accepted: u64,
    latencies: Vec<Duration>,
    failures: BTreeMap<u16, u64>,
    first_failure: String,
}

/// Posts every request over `connections` connections (each takes the next
/// request when its answer is in), from the first request to the last answer.
async fn ingest(server: &Server, requests: &Arc<Vec<Request>>, connections: usize) -> anyhow::Result<IngestRun> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::connect(server.addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let (server_cpu, client_cpu) = (server.cpu(), cpu_seconds("self"));
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (next, requests) = (next.clone(), requests.clone());
            tokio::spawn(async move {
                let mut p = Posted::default();
                let mut body = Vec::new();
                loop {
                    let Some(r) = requests.get(next.fetch_add(1, Ordering::Relaxed)) else { return anyhow::Ok(p) };
                    let sent = Instant::now();
                    let status = conn.exchange(&r.bytes, &mut body).await.context("posting to meter serve")?;
                    p.latencies.push(sent.elapsed());
                    if status == 202 && body == r.accepted {
                        p.accepted += r.events as u64;
                    } else {
                        *p.failures.entry(status).or_default() += 1;
                        if p.first_failure.is_empty() {
                            p.first_failure = format!("{status} {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
                        }
                    }
                }
            })
        })
        .collect();
    let mut run = IngestRun {
        accepted: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(requests.len()),
        failures: BTreeMap::new(),
        first_failure: String::new(),
        server_cpu: 0.0,
        client_cpu: 0.0,
    };
    for t in tasks {
        let p = t.await??;
        run.accepted += p.accepted;
        run.latencies.extend(p.latencies);
        for (status, n) in p.failures {
            *run.failures.entry(status).or_default() += n;
        }
        if run.first_failure.is_empty() {
            run.first_failure = p.first_failure;
        }
    }
    run.elapsed = started.elapsed();
    run.server_cpu = server.cpu() - server_cpu;
    run.client_cpu = cpu_seconds("self") - client_cpu;
    Ok(run)
}

/// A running `meter serve` child, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts `meter --config <file> serve` on a free port with an ingest
    /// and an admin key, reading ClickHouse as the read-only analyst, and
    /// waits until it answers.
    async fn start(cfg: &Config, ingest: &str, admin: &str, work: &Path, analyst_password: &str) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let hash = |token: &str| meter_serve::keys::to_hex(&meter_serve::keys::sha256(token));
        let mut c = cfg.clone();
        c.serve.listen = format!("127.0.0.1:{port}");
        c.serve.api_keys_file = None;
        c.serve.api_keys = BTreeMap::from([
            (
                "bench-ingest".to_owned(),
                ApiKey {
                    sha256: hash(ingest),
                    role: ApiRole::Ingest,
                    agent_id: AGENT.into(),
                    customers: vec!["*".into()],
                    signing_key_file: None,
                },
            ),
            (
                "bench-admin".to_owned(),
                ApiKey {
                    sha256: hash(admin),
                    role: ApiRole::Admin,
                    agent_id: String::new(),
                    customers: Vec::new(),
                    signing_key_file: None,
                },
            ),
        ]);
        c.clickhouse.user = "analyst".into();
        c.clickhouse.password = String::new();
        c.clickhouse.password_file = None;
        let config = work.join("serve.toml");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&config)?;
            f.write_all(toml::to_string(&c).context("writing the server's configuration")?.as_bytes())?;
        }
        let log = work.join("serve.log");
        let mut cmd = Command::new(std::env::current_exe()?);
        // The file holds the whole configuration, environment overrides
        // included: the parent's `METER__` variables would undo its scope.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("METER__") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .env("METER__METRICS__LISTEN", "off")
            .env("METER__CLICKHOUSE__PASSWORD", analyst_password)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn().context("starting meter serve")?;
        let mut server = Server { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
        let probe = get_request(server.addr, "/v1/openapi.yaml", None);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut body = Vec::new();
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("meter serve exited with {status}: {}", server.log_text());
            }
            if let Ok(mut conn) = Conn::connect(server.addr).await {
                if conn.exchange(&probe, &mut body).await.is_ok_and(|s| s == 200) {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("meter serve did not answer within 60 s: {}", server.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(&self.child.id().to_string())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU time of a process (`self` or a pid), in seconds
/// (Linux's clock tick is 10 ms).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The analyst's password on the local stack: `METER_ANALYST_PASSWORD` when
/// `ops/clickhouse` was started with it, else the one it generated.
fn analyst_password(ops_dir: &Path) -> anyhow::Result<String> {
    if let Some(p) = std::env::var("METER_ANALYST_PASSWORD").ok().filter(|p| !p.is_empty()) {
        return Ok(p);
    }
    let file = ops_dir.join("..").join(".local/secure/secrets/clickhouse-analyst.password");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the analyst's password from {} (ops/clickhouse makes it)", file.display()))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Records on every partition of `topic`, by the watermarks.
fn topic_records(cfg: &Config, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka).create().context("creating a Kafka client")?;
    let mut records = 0;
    for p in 0..cfg.topics.partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30))?;
        records += high - low;
    }
    Ok(records)
}

/// One keep-alive HTTP/1.1 connection, one request at a time: the answer
/// is read by its `Content-Length` (or chunks), and the connection opened
/// again only if the server said `Connection: close`.
struct Conn {
    addr: SocketAddr,
    io: Option<BufReader<TcpStream>>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let mut c = Conn { addr, io: None };
        c.open().await?;
        Ok(c)
    }

    async fn open(&mut self) -> anyhow::Result<&mut BufReader<TcpStream>> {
        if self.io.is_none() {
            let s = TcpStream::connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
            s.set_nodelay(true)?;
            self.io = Some(BufReader::with_capacity(64 * 1024, s));
        }
        self.io.as_mut().context("no connection")
    }

    /// Writes `request` (framed: head and body) and reads the answer's
    /// status, its body into `body`.
    async fn exchange(&mut self, request: &[u8], body: &mut Vec<u8>) -> anyhow::Result<u16> {
        let io = self.open().await?;
        io.get_mut().write_all(request).await?;
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            self.io = None;
            bail!("the server closed the connection");
        }
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .with_context(|| format!("not an HTTP/1.1 status line: {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            io.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else { bail!("malformed header {header:?}") };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().with_context(|| format!("content-length {value:?}"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        body.clear();
        if chunked {
            loop {
                line.clear();
                io.read_line(&mut line).await?;
                let size = line.trim_end().split(';').next().unwrap_or_default();
                let size = usize::from_str_radix(size, 16).with_context(|| format!("chunk size {size:?}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        line.clear();
                        if io.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                io.read_exact(&mut body[start..]).await?;
                line.clear();
                io.read_line(&mut line).await?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            io.read_exact(body).await?;
        } else {
            bail!("an answer of status {status} without Content-Length on a keep-alive connection");
        }
        if close {
            self.io = None;
        }
        Ok(status)
    }
}

fn post_request(addr: SocketAddr, token: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/cloudevents-batch+json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn get_request(addr: SocketAddr, path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n").into_bytes()
}

/// The month before the current one.
fn last_month() -> anyhow::Result<YearMonth> {
    let this = meter_model::Date::from_millis(now_ms()).context("the clock is outside the calendar")?.year_month();
    Ok(meter_model::Date::from_millis(this.start_millis() - 1).context("no month before this one")?.year_month())
}

fn query_customer(c: usize) -> String {
    format!("query-cust-{c:03}")
}

/// A usage row's (window_start, service, usage_type) and its quantity and
/// event count, as `GET /v1/usage` answers them.
type Expected = BTreeMap<(String, String, String), (String, i64)>;

/// Day windows of `customers` customers for `month` and the day on either
/// side, every usage type, region, resource and revision.
struct MonthOfUsage<'a> {
    month: YearMonth,
    kinds: &'a [Kind],
    customers: usize,
}

impl MonthOfUsage<'_> {
    fn resources(k: &Kind) -> &'static [&'static str] {
        if k.key_by_resource {
            &["i-1", "i-2"]
        } else {
            &[""]
        }
    }

    /// Quantity and event count of a window at a revision; both grow with
    /// the revision, as corrections add usage.
    fn window(c: usize, day: usize, k: usize, region: usize, resource: usize, revision: u64) -> (i128, i64) {
        let base = (1 + c * 7 + day * 13 + k * 31 + region * 3 + resource) as i128 * 1_000 + 17;
        (base * i128::from(revision), 10 + ((c + day + k) % 50) as i64 + revision as i64)
    }

    /// Days from the one before the month to the one after: index 0 is the
    /// day before, 1..=days the month.
    fn day_start(&self, day: usize) -> i64 {
        self.month.start_millis() + (day as i64 - 1) * DAY_MS
    }

    fn rows(&self) -> Vec<UsageRow> {
        let days = self.month.days() as usize;
        let mut rows = Vec::new();
        for c in 0..self.customers {
            for day in 0..days + 2 {
                let start = self.day_start(day);
                for (ki, k) in self.kinds.iter().enumerate() {
                    for (ri, region) in REGIONS.iter().enumerate() {
                        for (xi, resource) in Self::resources(k).iter().enumerate() {
                            let mut previous = 0;
                            for revision in 1..=REVISIONS {
                                let (q, n) = Self::window(c, day, ki, ri, xi, revision);
                                rows.push(UsageRow {
                                    window_start: meter_clickhouse::seconds(start),
                                    window_end: meter_clickhouse::seconds(start + DAY_MS),
                                    customer_id: query_customer(c),
                                    service: k.service.clone(),
                                    usage_type: k.usage_type.clone(),
                                    region: (*region).to_owned(),
                                    resource_id: (*resource).to_owned(),
                                    event_count: n,
                                    quantity_sum: q,
                                    quantity_min: 1,
                                    quantity_max: 1_000,
                                    first_event_time_ms: start + 1_000,
                                    last_event_time_ms: start + DAY_MS - 1_000,
                                    revision,
                                    is_final: u8::from(revision == REVISIONS),
                                    delta_sum: q - previous,
                                });
                                previous = q;
                            }
                        }
                    }
                }
            }
        }
        rows
    }

    /// Inserts every row in one INSERT, so that the revisions of a window
    /// stay apart in one part per month partition, with nothing to merge
    /// (servers that have `optimize_on_insert` would collapse them in the
    /// insert itself: it is turned off); returns the rows.
    async fn insert(&self, cfg: &Config) -> anyhow::Result<u64> {
        let rows = self.rows();
        let mut client = Connection::from(&cfg.clickhouse).writer()?;
        let setting: u64 = client.query("SELECT count() FROM system.settings WHERE name = 'optimize_on_insert'").fetch_one().await?;
        if setting > 0 {
            client = client.with_setting("optimize_on_insert", "0");
        }
        let started = Instant::now();
        let mut insert = client.insert::<UsageRow>("usage_day").await?;
        for r in &rows {
            insert.write(r).await?;
        }
        insert.end().await.context("inserting the month of usage")?;
        println!(
            "serve query: {} usage_day rows ({} customers x {} days x {} usage types, regions, resources x {REVISIONS} revisions) inserted in {:.2}s",
            rows.len(),
            self.customers,
            self.month.days() + 2,
            self.kinds.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(rows.len() as u64)
    }

    /// Rows in `usage_day` now (fewer than inserted once merges dropped revisions).
    async fn stored_rows(&self, cfg: &Config) -> anyhow::Result<u64> {
        let client = Connection::from(&cfg.clickhouse).client()?;
        Ok(client.query("SELECT count() FROM usage_day").fetch_one::<u64>().await?)
    }

    /// What `GET /v1/usage` grouped by service and usage type must answer
    /// for customer `c`: the last revision of every window of the month,
    /// summed over regions and resources, by day or for the month.
    fn expected(&self, c: usize, window: UsageWindow) -> Expected {
        let mut out: BTreeMap<(String, String, String), (i128, i64)> = BTreeMap::new();
        for day in 1..=self.month.days() as usize {
            let start = if window == UsageWindow::Month { self.month.start_millis() } else { self.day_start(day) };
            for (ki, k) in self.kinds.iter().enumerate() {
                let e = out.entry((format_rfc3339(start), k.service.clone(), k.usage_type.clone())).or_default();
                for ri in 0..REGIONS.len() {
                    for xi in 0..Self::resources(k).len() {
                        let (q, n) = Self::window(c, day, ki, ri, xi, REVISIONS);
                        e.0 += q;
                        e.1 += n;
                    }
                }
            }
        }
        out.into_iter().map(|(k, (q, n))| (k, (q.to_string(), n))).collect()
    }
}

/// Whether a usage answer is 200 with exactly the expected rows on one page.
fn check_usage(status: u16, body: &[u8], expected: &Expected) -> Result<(), String> {
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status != 200 {
        return Err(format!("answered {status}: {}", text()));
    }
    let page: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e}): {}", text()))?;
    if !page["next_page_token"].is_null() {
        return Err("the answer has more than one page".into());
    }
    let rows = page["rows"].as_array().ok_or_else(|| format!("no rows: {}", text()))?;
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or_default().to_owned();
    let got: Expected = rows
        .iter()
        .map(|r| ((s(r, "window_start"), s(r, "service"), s(r, "usage_type")), (s(r, "quantity"), r["event_count"].as_i64().unwrap_or(-1))))
        .collect();
    if got.len() != rows.len() || &got != expected {
        let wrong = expected.iter().find(|(k, v)| got.get(*k) != Some(*v)).map(|(k, v)| format!("{k:?}: want {v:?}, got {:?}", got.get(k)));
        return Err(format!(
            "{} rows, {} expected; {}",
            rows.len(),
            expected.len(),
            wrong.unwrap_or_else(|| "rows nobody inserted".into())
        ));
    }
    Ok(())
}

/// A series of usage queries, in ms; the first [`QUERY_WARM_UP`] untimed.
struct QuerySeries {
    via: &'static str,
    window: UsageWindow,
    rows: usize,
    times: Vec<Duration>,
    p50: f64,
    p99: f64,
    max: f64,
    samples: usize,
    failures: usize,
    first_failure: String,
    /// The server's CPU time per timed query.
    server_cpu_ms: Option<f64>,
}

impl QuerySeries {
    fn new(via: &'static str, window: UsageWindow, rows: usize) -> Self {
        QuerySeries {
            via,
            window,
            rows,
            times: Vec::new(),
            p50: 0.0,
            p99: 0.0,
            max: 0.0,
            samples: 0,
            failures: 0,
            first_failure: String::new(),
            server_cpu_ms: None,
        }
    }

    /// The `i`th query's time and whether its answer was right.
    fn record(&mut self, i: usize, took: Duration, answer: Result<(), String>) {
        if let Err(why) = answer {
            self.failures += 1;
            if self.first_failure.is_empty() {
                self.first_failure = format!("query {i}: {why}");
            }
        }
        if i >= QUERY_WARM_UP {
            self.times.push(took);
        }
    }

    fn finish(&mut self) {
        self.p50 = ms(percentile(&mut self.times, 0.5));
        self.p99 = ms(percentile(&mut self.times, 0.99));
        self.max = ms(self.times.iter().max().copied().unwrap_or_default());
        self.samples = self.times.len();
        println!(
            "query via {}, window={}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} requests of {} rows{}{}",
            self.via,
            self.window.as_str(),
            self.p50,
            self.p99,
            self.max,
            self.samples,
            self.rows,
            self.server_cpu_ms.map(|c| format!(" (server CPU {c:.2} ms/query)")).unwrap_or_default(),
            if self.failures == 0 { String::new() } else { format!("; FAILED: {} wrong answers", self.failures) }
        );
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `41200.4` as `41,200`.
fn thousands(x: f64) -> String {
    let digits = (x.round().max(0.0) as u64).to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.2), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(41_200.4), "41,200");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn the_expected_answer_sums_the_last_revision_over_regions_and_resources() {
        let kinds = vec![
            Kind { service: "compute".into(), usage_type: "BoxUsage:m5.large".into(), key_by_resource: true },
            Kind { service: "cdn".into(), usage_type: "Requests-HTTPS".into(), key_by_resource: false },
        ];
        let month = YearMonth::new(2026, 2).expect("month");
        let u = MonthOfUsage { month, kinds: &kinds, customers: 2 };
        let rows = u.rows();
        assert_eq!(rows.len(), 2 * 30 * (3 * 2 + 3) * REVISIONS as usize);
        let by_day = u.expected(1, UsageWindow::Day);
        assert_eq!(by_day.len(), 28 * 2);
        let by_month = u.expected(1, UsageWindow::Month);
        assert_eq!(by_month.len(), 2);
        // From the rows themselves: the month's windows of customer 1 at
        // their last revision.
        let (from, to) = (meter_clickhouse::seconds(month.start_millis()), meter_clickhouse::seconds(month.end_millis()));
        let want: i128 = rows
            .iter()
            .filter(|r| r.customer_id == query_customer(1) && r.service == "compute" && r.revision == REVISIONS)
            .filter(|r| r.window_start >= from && r.window_start < to)
            .map(|r| r.quantity_sum)
            .sum();
        let got = &by_month[&(format_rfc3339(month.start_millis()), "compute".to_owned(), "BoxUsage:m5.large".to_owned())];
        assert_eq!(got.0, want.to_string());
        let day_sum: i128 = by_day.iter().filter(|(k, _)| k.1 == "compute").map(|(_, v)| v.0.parse::<i128>().expect("a number")).sum();
        assert_eq!(day_sum, want);
    }
}
