//! The pipeline on the secure local stack (`ops/up --secure`): Kafka over
//! SASL_SSL with one SCRAM principal per service and least-privilege ACLs,
//! ClickHouse over HTTPS with passworded users, every secret read from a
//! file. The stack's material is in `.local/secure` (`METER_SECURE_DIR`),
//! the broker on 127.0.0.1:9094 (`METER_SECURE_KAFKA`), ClickHouse's HTTPS
//! port on 8443 (`METER_SECURE_CLICKHOUSE`).
//!
//! - The whole pipeline, agent → process → sink → rate → audit, each stage
//!   as its own principal, is exact against the agent's ledger.
//! - The agent's principal is refused writing the aggregates topic: counted,
//!   logged, nothing written.
//! - A wrong password, an untrusted certificate and a plain-text client on
//!   the TLS port each stop a stage with an error naming the cause, long
//!   before any timeout.
//! - `meter serve` as `serve` (Write on the events topic, nothing else) and
//!   the read-only analyst: events posted over HTTP come out exact in
//!   ClickHouse and in its own `GET /v1/usage`; with a wrong password it
//!   refuses to start, naming the refusal.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

mod agent_support;
mod serve_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent_support::{expected_ledger, sim_config, spawn_agent_cmd};
use meter_config::{Config, Valid};
use meter_kafka::{AccessError, Signal};
use meter_model::ledger::Ledger;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn secure_dir() -> PathBuf {
    let dir = std::env::var("METER_SECURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.local/secure"));
    assert!(dir.join("pki/ca.pem").is_file(), "{} has no pki/ca.pem: start the secure stack with ops/up --secure", dir.display());
    dir
}

fn kafka_brokers() -> String {
    std::env::var("METER_SECURE_KAFKA").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

fn clickhouse_url() -> String {
    std::env::var("METER_SECURE_CLICKHOUSE").unwrap_or_else(|_| "https://127.0.0.1:8443".into())
}

/// Who a configuration acts as.
struct As<'a> {
    kafka_user: &'a str,
    kafka_password_file: PathBuf,
    ca: PathBuf,
    clickhouse_user: &'a str,
    clickhouse_password_file: PathBuf,
}

impl<'a> As<'a> {
    fn new(kafka_user: &'a str, clickhouse_user: &'a str) -> Self {
        let dir = secure_dir();
        As {
            kafka_user,
            kafka_password_file: dir.join(format!("secrets/kafka-{kafka_user}.password")),
            ca: dir.join("pki/ca.pem"),
            clickhouse_user,
            clickhouse_password_file: dir.join(format!("secrets/clickhouse-{clickhouse_user}.password")),
        }
    }
}

/// A configuration file for `who` in scope `tag`: topics and groups carry
/// the tag after the names the ACLs grant (`usage.events.{tag}`,
/// `meter-processor-{tag}`), as [`Config::scoped`] names them.
fn config_file(dir: &Path, tag: &str, who: &As<'_>, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{kafka_user}"
"sasl.password_file" = "{kafka_password}"
"ssl.ca.location" = "{ca}"

[topics]
events = "usage.events.{tag}"
aggregates = "usage.aggregates.{tag}"
dlq = "usage.dlq.{tag}"
agents = "usage.agents.{tag}"
invoice_lines = "billing.invoice_lines.{tag}"
period_close = "billing.period_close.{tag}"
partitions = 3

[clickhouse]
url = "{ch_url}"
database = "meterline_{tag}"
user = "{ch_user}"
password_file = "{ch_password}"
ca_file = "{ca}"

[processor]
group_id = "meter-processor-{tag}"
instance_id = "secure-test"
commit_interval_ms = 300
idle_timeout_ms = 1000

[sink]
group_id = "meter-sink-{tag}"
batch_ms = 300

[metrics]
listen = "off"

[agent]
checkpoint_interval_ms = 200
{extra}
"#,
        brokers = kafka_brokers(),
        kafka_user = who.kafka_user,
        kafka_password = who.kafka_password_file.display(),
        ca = who.ca.display(),
        ch_url = clickhouse_url(),
        ch_user = who.clickhouse_user,
        ch_password = who.clickhouse_password_file.display(),
    );
    let path = dir.join(format!("{}-{}.toml", who.kafka_user, who.clickhouse_user));
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Valid<Config> {
    Config::load(Some(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `meter ARGS` with `config`, its output once it exits (killed after
/// `limit`, so that a hang fails the test instead of stalling it).
fn meter(config: &Path, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meter"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_at_most(&mut child, limit);
    child.wait_with_output().unwrap()
}

fn wait_at_most(child: &mut std::process::Child, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Topics (as admin) and tables (as the ClickHouse writer) of scope `tag`.
async fn setup(dir: &Path, tag: &str) {
    let admin = load(&config_file(dir, tag, &As::new("admin", "writer"), ""));
    meter_kafka::admin::ensure_topics(&admin).await.expect("creating topics as admin on the secure broker (ops/up --secure)");
    meter_clickhouse::migrate(&meter_clickhouse::Connection::from(&admin.clickhouse)).await.expect("migrating as writer over HTTPS");
}

/// The processor and the sink, in this process, each as its own
/// principal, until the processor has drained the events topic and the
/// sink has written what it produced; the processor's counters.
async fn process_and_sink(processor: Valid<Config>, sink: Valid<Config>) -> meter_engine::Counters {
    let (pd, sd) = (Signal::default(), Signal::default());
    pd.raise();
    let p = tokio::spawn({
        let cfg = Arc::new(processor);
        async move { meter_processor::run(&cfg, Signal::default(), pd).await }
    });
    let s = tokio::spawn({
        let (cfg, sd) = (Arc::new(sink), sd.clone());
        async move { meter_sink::run(&cfg, Signal::default(), sd).await }
    });
    let counters = tokio::time::timeout(Duration::from_secs(180), p).await.expect("processor drains").unwrap().unwrap().counters;
    sd.raise();
    tokio::time::timeout(Duration::from_secs(120), s).await.expect("sink drains").unwrap().unwrap();
    counters
}

/// Records on `topic` (read as `cfg`'s principal).
fn records(cfg: &Config, topic: &str) -> i64 {
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka).create().unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut n = 0;
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
        n += high - low;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_pipeline_each_stage_its_own_principal_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("sec{}", std::process::id());
    setup(dir.path(), &tag).await;
    let agent = config_file(dir.path(), &tag, &As::new("agent", "writer"), "");
    let processor = load(&config_file(dir.path(), &tag, &As::new("processor", "writer"), ""));
    let sink = load(&config_file(dir.path(), &tag, &As::new("sink", "writer"), ""));
    let rating = config_file(dir.path(), &tag, &As::new("rating", "writer"), "");
    let billing_path = config_file(dir.path(), &tag, &As::new("billing", "analyst"), "");
    let billing = load(&billing_path);

    // The agent, a separate process, as `agent`.
    let sim = sim_config(15, 3, "secure-agent", 120);
    let expected = expected_ledger(&sim);
    let ledger_path = dir.path().join("ledger.csv");
    let mut child =
        spawn_agent_cmd(&agent, &dir.path().join("state"), &sim, 0.0, Some(&ledger_path)).stderr(Stdio::piped()).spawn().unwrap();
    wait_at_most(&mut child, Duration::from_secs(120));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "agent: {}", text(&out));
    let ledger = Ledger::from_csv(&std::fs::read_to_string(&ledger_path).unwrap()).unwrap();
    assert_eq!(ledger, expected);

    // Processor and sink, in this process, each as itself.
    let counters = process_and_sink(processor, sink).await;
    assert_eq!(counters.dead_lettered(), 0);
    assert_eq!(counters.aggregated as i64, expected.event_count());

    // The billing reader and the read-only analyst see exactly the ledger,
    // on the aggregates topic and in ClickHouse.
    let rec = meter_sink::reconcile::reconcile(&billing, &ledger).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.aggregated_events, expected.event_count());
    eprintln!("{}", rec.summary());

    // Rating as `rating` (writes invoice tables as writer, publishes invoice
    // lines), then the month audited and reported by the analyst.
    let month = meter_model::date::Date::from_millis(sim.start).unwrap().year_month().to_string();
    let out = meter(&rating, &["rate", "--month", &month], Duration::from_secs(120));
    assert!(out.status.success(), "meter rate: {}", text(&out));
    let published = records(&billing, &billing.topics.invoice_lines);
    assert!(published > 0, "no invoice line reached {}: {}", billing.topics.invoice_lines, text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("published {published} invoice lines")), "{}", text(&out));
    let out = meter(&billing_path, &["audit", "--month", &month], Duration::from_secs(120));
    assert!(out.status.success(), "meter audit as the analyst: {}", text(&out));
    let out = meter(&billing_path, &["report", "cost", "--month", &month], Duration::from_secs(60));
    assert!(out.status.success(), "meter report cost as the analyst: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cust-"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_agent_is_refused_writing_the_aggregates_topic() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("secacl{}", std::process::id());
    setup(dir.path(), &tag).await;
    // A misconfigured agent: its events topic is the processor's output.
    let agent = config_file(dir.path(), &tag, &As::new("agent", "writer"), "shutdown_timeout_ms = 1000");
    let text_cfg = std::fs::read_to_string(&agent).unwrap();
    std::fs::write(&agent, text_cfg.replace(&format!("events = \"usage.events.{tag}\""), &format!("events = \"usage.aggregates.{tag}\"")))
        .unwrap();
    let sim = sim_config(16, 1, "secure-acl-agent", 5);
    let mut child = spawn_agent_cmd(&agent, &dir.path().join("state"), &sim, 0.0, None)
        .stderr(Stdio::piped())
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    if child.try_wait().unwrap().is_some() {
        panic!(
            "the agent stopped; it should keep its events and retry until the ACL is fixed: {}",
            text(&child.wait_with_output().unwrap())
        );
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    wait_at_most(&mut child, Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    eprintln!("{all}");
    let summary = String::from_utf8_lossy(&out.stdout);
    let denied = summary.split(" denied)").next().and_then(|s| s.rsplit('(').next()).and_then(|n| n.trim().parse::<u64>().ok());
    assert!(denied.is_some_and(|n| n > 0), "the refusals are counted: {summary}");
    assert!(all.contains("Kafka refused this agent's principal the write"), "the refusal is logged clearly: {all}");
    assert!(all.contains("TopicAuthorizationFailed") || all.contains("authorization failed"), "{all}");
    let admin = load(&config_file(dir.path(), &tag, &As::new("admin", "writer"), ""));
    assert_eq!(records(&admin, &admin.topics.aggregates), 0, "nothing reached the aggregates topic");
}

/// A configuration for `processor` (and the ClickHouse writer) whose
/// `what` is wrong.
fn broken(dir: &Path, tag: &str, what: &str) -> PathBuf {
    let path = config_file(dir, tag, &As::new("processor", "writer"), "");
    let wrong = dir.join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let d = secure_dir();
    let (ca, other_ca) = (d.join("pki/ca.pem").display().to_string(), d.join("pki/other-ca.pem").display().to_string());
    let swap = |cfg: String, from: &str, to: &str| {
        assert!(cfg.contains(from), "{from} is not in {cfg}");
        cfg.replace(from, to)
    };
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg = match what {
        "kafka password" => swap(cfg, &d.join("secrets/kafka-processor.password").display().to_string(), &wrong.display().to_string()),
        "kafka ca" => swap(cfg, &format!("\"ssl.ca.location\" = \"{ca}\""), &format!("\"ssl.ca.location\" = \"{other_ca}\"")),
        "kafka plaintext" => {
            let mut c = swap(cfg, "\"security.protocol\" = \"SASL_SSL\"", "\"security.protocol\" = \"PLAINTEXT\"");
            for k in ["sasl.mechanism", "sasl.username", "sasl.password_file", "ssl.ca.location"] {
                c = swap(c, &format!("\"{k}\""), &format!("# \"{k}\""));
            }
            c
        }
        "clickhouse password" => {
            swap(cfg, &d.join("secrets/clickhouse-writer.password").display().to_string(), &wrong.display().to_string())
        }
        "clickhouse ca" => swap(cfg, &format!("ca_file = \"{ca}\""), &format!("ca_file = \"{other_ca}\"")),
        "clickhouse plaintext" => {
            let c = swap(
                cfg,
                &format!("url = \"{}\"", clickhouse_url()),
                &format!("url = \"{}\"", clickhouse_url().replace("https://", "http://")),
            );
            swap(c, "ca_file =", "# ca_file =")
        }
        other => panic!("{other}"),
    };
    std::fs::write(&path, cfg).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_bad_credentials_and_certificates_fail_fast_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("secbad{}", std::process::id());
    setup(dir.path(), &tag).await;
    // The check itself, with a timeout far beyond what it takes: a refusal
    // comes back as one, not as the broker "not answering".
    for (what, cause) in
        [("kafka password", "Authentication failed"), ("kafka ca", "certificate verify failed"), ("kafka plaintext", "security.protocol")]
    {
        let cfg = load(&broken(dir.path(), &tag, what));
        let kafka = cfg.kafka.clone();
        let result = tokio::task::spawn_blocking(move || meter_kafka::check_access(&kafka, Duration::from_secs(120))).await.unwrap();
        match result {
            Err(AccessError::Refused(why)) => assert!(why.contains(cause), "{what}: {why}"),
            other => panic!("{what}: expected a refusal naming {cause:?}, got {other:?}"),
        }
        // And the processor, as an operator would start it.
        let out = meter(&broken(dir.path(), &tag, what), &["process"], Duration::from_secs(60));
        assert!(!out.status.success(), "{what}: the processor started: {}", text(&out));
        assert!(text(&out).contains(cause), "{what}: {}", text(&out));
    }
    for (what, cause) in [
        ("clickhouse password", "check clickhouse.user and clickhouse.password"),
        ("clickhouse ca", "not signed by a CA in clickhouse.ca_file"),
        ("clickhouse plaintext", "the url must start with https://"),
    ] {
        let cfg = load(&broken(dir.path(), &tag, what));
        let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
        match conn.check(Duration::from_secs(120)).await {
            Err(meter_clickhouse::Error::Refused(why)) => assert!(why.contains(cause), "{what}: {why}"),
            other => panic!("{what}: expected a refusal naming {cause:?}, got {other:?}"),
        }
        let out = meter(&broken(dir.path(), &tag, what), &["sink"], Duration::from_secs(60));
        assert!(!out.status.success(), "{what}: the sink started: {}", text(&out));
        assert!(text(&out).contains(cause), "{what}: {}", text(&out));
    }
    // The secrets never reach the output.
    let out = meter(&broken(dir.path(), &tag, "kafka password"), &["process"], Duration::from_secs(60));
    for secret in ["not-the-password", std::fs::read_to_string(secure_dir().join("secrets/clickhouse-writer.password")).unwrap().trim()] {
        assert!(!text(&out).contains(secret), "a secret was printed: {}", text(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_clickhouse_client_certificate_and_a_numeric_password() {
    let dir = tempfile::tempdir().unwrap();
    let d = secure_dir();
    let path = config_file(dir.path(), "seccert", &As::new("sink", "writer"), "");
    let cfg = std::fs::read_to_string(&path).unwrap().replace(
        "ca_file = \"",
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"",
            d.join("pki/client.pem").display(),
            d.join("pki/client.key").display()
        ),
    );
    std::fs::write(&path, cfg).unwrap();
    let cfg = load(&path);
    // The writer's and the sink's passwords are digits only: they stay
    // strings (they were refused as integers when given in the environment).
    assert!(cfg.clickhouse.password.chars().all(|c| c.is_ascii_digit()), "the stack's writer password is numeric-looking");
    assert!(cfg.kafka.properties["sasl.password"].chars().all(|c| c.is_ascii_digit()), "the stack's sink password is numeric-looking");
    meter_clickhouse::Connection::from(&cfg.clickhouse).check(Duration::from_secs(30)).await.unwrap();
    let kafka = cfg.kafka.clone();
    tokio::task::spawn_blocking(move || meter_kafka::check_access(&kafka, Duration::from_secs(30))).await.unwrap().unwrap();
}

/// `meter serve`'s configuration in scope `tag`: Kafka as `serve`,
/// ClickHouse as the analyst (password_file, HTTPS, the CA), its `[serve]`
/// on `port`.
fn serve_config(dir: &Path, tag: &str, port: u16) -> PathBuf {
    let path = config_file(dir, tag, &As::new("serve", "analyst"), "");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&serve_support::serve_section(port, ""));
    std::fs::write(&path, text).unwrap();
    path
}

/// (service, usage_type, region) -> (quantity, events) of `customer`.
type Totals = std::collections::BTreeMap<(String, String, String), (i128, i64)>;

fn posted_totals(events: &[serve_support::Usage], customer: &str) -> Totals {
    let mut t = Totals::new();
    for e in events.iter().filter(|e| e.customer == customer) {
        let v = t.entry((e.service.to_owned(), e.usage_type.to_owned(), e.region.to_owned())).or_default();
        v.0 += i128::from(e.quantity);
        v.1 += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_serve_as_its_own_principal_is_exact() {
    use serve_support::{batch, events, get, ledger, post, Server, ADMIN, INGEST};
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("secsrv{}", std::process::id());
    setup(dir.path(), &tag).await;
    let port = serve_support::free_port();
    let config = serve_config(dir.path(), &tag, port);
    let server = Server::start_as_configured(&config, port, &[]);

    let start = meter_model::time::day_floor(meter_model::now_ms()) - 2 * agent_support::DAY_MS;
    let all = events(&tag, 300, &["c-1", "c-2"], start);
    for b in all.chunks(100) {
        let a = post(&server, INGEST, "application/cloudevents-batch+json", &batch(b));
        assert_eq!(a.status, 202, "{}", a.body);
        assert_eq!(a.json()["accepted"], b.len());
    }

    let processor = load(&config_file(dir.path(), &tag, &As::new("processor", "writer"), ""));
    let sink = load(&config_file(dir.path(), &tag, &As::new("sink", "writer"), ""));
    let counters = process_and_sink(processor, sink).await;
    assert_eq!(counters.dead_lettered(), 0);
    assert_eq!(counters.aggregated, all.len() as u64);

    // ClickHouse, read by the analyst, is the ledger of the posted events.
    let billing = load(&config_file(dir.path(), &tag, &As::new("billing", "analyst"), ""));
    let rec = meter_sink::reconcile::reconcile(&billing, &ledger(&all)).await.unwrap();
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, all.len() as i64);
    eprintln!("{}", rec.summary());

    // And so is serve's own answer, read through the analyst over HTTPS.
    for customer in ["c-1", "c-2"] {
        let q = format!(
            "/v1/usage?customer={customer}&from={}&to={}&window=day&group_by=service,usage_type,region",
            start / 1000,
            (start + agent_support::DAY_MS) / 1000
        );
        let a = get(&server, ADMIN, &q);
        assert_eq!(a.status, 200, "{}", a.body);
        let page = a.json();
        assert!(page["next_page_token"].is_null(), "one page: {}", a.body);
        let mut got = Totals::new();
        for r in page["rows"].as_array().unwrap() {
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            let v = got.entry((s("service"), s("usage_type"), s("region"))).or_default();
            v.0 += s("quantity").parse::<i128>().unwrap();
            v.1 += r["event_count"].as_i64().unwrap();
        }
        assert_eq!(got, posted_totals(&all, customer), "GET /v1/usage for {customer}");
    }
}

#[test]
fn secure_serve_with_a_wrong_password_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(dir.path(), "secsrvbad", serve_support::free_port());
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-serve-password\n").unwrap();
    let right = secure_dir().join("secrets/kafka-serve.password");
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    assert!(text_cfg.contains(&right.display().to_string()));
    std::fs::write(&config, text_cfg.replace(&right.display().to_string(), &wrong.display().to_string())).unwrap();
    let started = std::time::Instant::now();
    let out = meter(&config, &["serve"], Duration::from_secs(60));
    let all = text(&out);
    assert!(!out.status.success(), "meter serve started with a wrong password: {all}");
    for cause in ["Kafka refused the connection", "Authentication failed", "sasl.password"] {
        assert!(all.contains(cause), "the refusal is named ({cause}): {all}");
    }
    assert!(started.elapsed() < Duration::from_secs(30), "it took {:?}: {all}", started.elapsed());
    for secret in ["not-the-serve-password", std::fs::read_to_string(&right).unwrap().trim()] {
        assert!(!all.contains(secret), "a secret was printed: {all}");
    }
}
