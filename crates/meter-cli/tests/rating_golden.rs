//! End to end on the local ClickHouse and Kafka (`ops/up`), own database and
//! topics: the hand-priced golden scenario of meter-rating is written as
//! final usage rows (minute, hour, day), then `meter prices load`, `meter
//! rate`, `meter report` and `meter audit` run as the binary:
//!
//! - invoice lines and invoice totals in ClickHouse equal
//!   `expected_lines.csv` / `expected_invoices.csv` to the cent, and the
//!   lines on `billing.invoice_lines` decode to the same amounts;
//! - rating again inserts and publishes nothing;
//! - a correction (a new revision of one day) changes exactly the daily
//!   line, the invoice line and the invoice it affects;
//! - report output equals the golden files in `tests/golden/`
//!   (`UPDATE_GOLDEN=1` rewrites them);
//! - `meter audit` passes on this data and finds an altered hour row.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

mod agent_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_support::analyst_password;
use meter_config::Config;
use meter_rating::fixture::{Scenario, GOLDEN_EXPECTED_INVOICES, GOLDEN_EXPECTED_LINES};
use meter_rating::{Date, YearMonth};
use meter_sink::UsageRow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn unique_config(name: &str) -> Config {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{}_{}_{}", name, std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut cfg = Config::default().scoped(&format!("test-{id}"));
    cfg.topics.partitions = 1;
    cfg.validate().unwrap().into_inner()
}

/// Runs the `meter` binary against the test's database and topics.
fn meter(cfg: &Config, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meter"))
        .args(args)
        .env("METER__CLICKHOUSE__DATABASE", &cfg.clickhouse.database)
        .env("METER__TOPICS__INVOICE_LINES", &cfg.topics.invoice_lines)
        .env_remove("METER_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn meter_ok(cfg: &Config, args: &[&str]) -> String {
    let (code, stdout, stderr) = meter(cfg, args);
    assert_eq!(code, 0, "meter {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

type Key = (String, String, String, String, String);

fn usage_row(k: &Key, start: i64, size: i64, quantity: i128, revision: u64) -> UsageRow {
    UsageRow {
        window_start: meter_clickhouse::seconds(start),
        window_end: meter_clickhouse::seconds(start + size),
        customer_id: k.0.clone(),
        service: k.1.clone(),
        usage_type: k.2.clone(),
        region: k.3.clone(),
        resource_id: k.4.clone(),
        event_count: 1,
        quantity_sum: quantity,
        quantity_min: 0,
        quantity_max: 0,
        first_event_time_ms: start,
        last_event_time_ms: start,
        revision,
        is_final: 1,
        delta_sum: quantity,
    }
}

/// Minute, hour and day rows of the golden scenario (February and March):
/// runs minute by minute, daily quantities in the first minute of their day.
fn golden_windows() -> [BTreeMap<(Key, i64), i128>; 3] {
    let s = Scenario::golden().unwrap();
    let mut minutes: BTreeMap<(Key, i64), i128> = BTreeMap::new();
    for m in s.minute_rows() {
        *minutes.entry(((m.customer_id, m.service, m.usage_type, m.region, m.resource_id), m.minute_start)).or_default() += m.quantity;
    }
    for d in &s.daily {
        let k = (d.customer_id.clone(), d.service.clone(), d.usage_type.clone(), d.region.clone(), d.resource_id.clone());
        let mut day = d.first_day;
        loop {
            *minutes.entry((k.clone(), day.start_millis())).or_default() += d.quantity;
            if day >= d.last_day.unwrap_or(d.first_day) {
                break;
            }
            day = Date::from_millis(day.start_millis() + DAY).unwrap();
        }
    }
    let roll = |size: i64| {
        let mut out: BTreeMap<(Key, i64), i128> = BTreeMap::new();
        for ((k, t), q) in &minutes {
            *out.entry((k.clone(), t - t.rem_euclid(size))).or_default() += q;
        }
        out
    };
    let (hours, days) = (roll(HOUR), roll(DAY));
    // The fixture's own daily rows are what rating is checked against by hand.
    for month in ["2026-02", "2026-03"] {
        let month: YearMonth = month.parse().unwrap();
        let (rows, _) = s.usage(month).unwrap();
        for r in rows {
            let k = (r.customer_id, r.service, r.usage_type, r.region, r.resource_id);
            assert_eq!(days.get(&(k.clone(), r.day.start_millis())), Some(&r.quantity), "{k:?} {}", r.day);
        }
    }
    [minutes, hours, days]
}

async fn insert(client: &clickhouse::Client, table: &str, rows: &[UsageRow]) {
    let mut insert = client.insert::<UsageRow>(table).await.unwrap();
    for r in rows {
        insert.write(r).await.unwrap();
    }
    insert.end().await.unwrap();
}

fn dec(s: &str) -> meter_rating::Decimal {
    s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct StoredLine {
    month: String,
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    amount_full: i128,
    amount: i128,
}

async fn stored_lines(client: &clickhouse::Client) -> BTreeMap<(String, String, String, String, String), (i128, i128)> {
    let rows: Vec<StoredLine> = client
        .query(
            "SELECT substring(toString(month), 1, 7) AS month, customer_id, service, usage_type, region, amount_full, amount \
             FROM invoice_lines FINAL",
        )
        .fetch_all()
        .await
        .unwrap();
    rows.into_iter().map(|r| ((r.month, r.customer_id, r.service, r.usage_type, r.region), (r.amount_full, r.amount))).collect()
}

async fn stored_invoices(client: &clickhouse::Client) -> Vec<String> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Inv {
        month: String,
        customer_id: String,
        line_count: u32,
        total: i128,
    }
    let rows: Vec<Inv> = client
        .query(
            "SELECT substring(toString(month), 1, 7) AS month, customer_id, line_count, total FROM invoices FINAL \
             ORDER BY month, customer_id",
        )
        .fetch_all()
        .await
        .unwrap();
    rows.iter()
        .map(|i| format!("{},{},{},{}", i.month, i.customer_id, i.line_count, meter_rating::Decimal::from_i128_with_scale(i.total, 2)))
        .collect()
}

async fn row_count(client: &clickhouse::Client, table: &str) -> u64 {
    client.query(&format!("SELECT count() FROM {table}")).fetch_one::<u64>().await.unwrap()
}

/// Every invoice line on the topic so far (waits up to `wait` for at least `at_least`).
fn topic_lines(cfg: &Config, at_least: usize, wait: Duration) -> Vec<meter_rating::InvoiceLine> {
    let consumer: BaseConsumer = meter_kafka::client_config(&cfg.kafka)
        .set("group.id", format!("{}-reader", cfg.topics.invoice_lines))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&cfg.topics.invoice_lines, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let codec = meter_rating::wire::InvoiceLineCodec::new().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let line = codec.decode(m.payload().unwrap()).unwrap();
            assert_eq!(m.key(), Some(line.line_id.as_bytes()));
            out.push(line);
        } else if out.len() >= at_least {
            break;
        }
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (UPDATE_GOLDEN=1 writes it)"));
    assert_eq!(actual, want, "{name} differs from {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_scenario_rates_reports_and_audits_to_the_cent() {
    let cfg = unique_config("rating");
    meter_kafka::admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    let client = conn.client().unwrap();

    let [minutes, hours, days] = golden_windows();
    for (table, windows, size) in [("usage_minute", &minutes, MINUTE), ("usage_hour", &hours, HOUR), ("usage_day", &days, DAY)] {
        let rows: Vec<UsageRow> = windows.iter().map(|((k, t), q)| usage_row(k, *t, size, *q, 1)).collect();
        insert(&client, table, &rows).await;
    }

    let out = meter_ok(&cfg, &["prices", "load"]);
    assert!(out.contains("versions 2026-01") && out.contains("0 changed, 0 unchanged"), "{out}");
    let out = meter_ok(&cfg, &["prices", "load"]);
    assert!(out.contains(" 0 new, 0 changed"), "loading the same price book twice changes nothing: {out}");

    // First rating: everything is new.
    let feb = meter_ok(&cfg, &["rate", "--month", "2026-02"]);
    assert!(feb.contains("invoice_lines: 16 new, 0 changed, 0 unchanged, 0 removed"), "{feb}");
    assert!(feb.contains("invoices:      2 new, 0 changed"), "{feb}");
    assert!(feb.contains("published 16 invoice lines"), "{feb}");
    let mar = meter_ok(&cfg, &["rate", "--month", "2026-03"]);
    assert!(mar.contains("invoice_lines: 4 new"), "{mar}");

    // Invoice lines and totals equal the hand-priced ones to the cent.
    let lines = stored_lines(&client).await;
    let mut expected = 0;
    for l in GOLDEN_EXPECTED_LINES.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = l.split(',').collect();
        let key = (f[0].to_owned(), f[1].to_owned(), f[2].to_owned(), f[3].to_owned(), f[4].to_owned());
        let (full, amount) = lines.get(&key).unwrap_or_else(|| panic!("missing line {key:?}"));
        assert_eq!(meter_rating::Decimal::from_i128_with_scale(*full, 12), dec(f[10]), "amount_full {key:?}");
        assert_eq!(meter_rating::Decimal::from_i128_with_scale(*amount, 2).to_string(), f[11], "amount {key:?}");
        expected += 1;
    }
    assert_eq!(lines.len(), expected, "unexpected lines: {lines:#?}");
    let want: Vec<String> = GOLDEN_EXPECTED_INVOICES.lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
    assert_eq!(stored_invoices(&client).await, want);

    // The topic carries the same lines.
    let published = topic_lines(&cfg, 20, Duration::from_secs(30));
    assert_eq!(published.len(), 20);
    for p in &published {
        let key = (p.month.to_string(), p.key.customer_id.clone(), p.key.service.clone(), p.key.usage_type.clone(), p.key.region.clone());
        assert_eq!(lines.get(&key).map(|l| l.1), Some(p.amount.mantissa() * 10i128.pow(2 - p.amount.scale())), "{key:?}");
    }

    // Rating again changes nothing: no row inserted, nothing published.
    let counts: Vec<u64> = futures_counts(&client, &["rated_usage", "invoice_lines", "invoices"]).await;
    let again = meter_ok(&cfg, &["rate", "--month", "2026-02"]);
    assert!(again.contains("rated_usage:   0 new, 0 changed,"), "{again}");
    assert!(again.contains("invoice_lines: 0 new, 0 changed, 16 unchanged, 0 removed"), "{again}");
    assert!(again.contains("invoices:      0 new, 0 changed, 2 unchanged"), "{again}");
    assert!(again.contains("published 0 invoice lines"), "{again}");
    assert_eq!(futures_counts(&client, &["rated_usage", "invoice_lines", "invoices"]).await, counts);

    // Rating one customer touches only that customer's lines (and changes nothing here either).
    let one = meter_ok(&cfg, &["rate", "--month", "2026-02", "--customer", "globex"]);
    assert!(one.contains("invoice_lines: 0 new, 0 changed, 3 unchanged, 0 removed"), "{one}");
    assert!(one.contains("invoices:      0 new, 0 changed, 1 unchanged, 0 removed"), "{one}");

    // Reports, checked against golden files.
    for (name, args) in [
        ("cost_by_customer.txt", vec!["report", "cost", "--month", "2026-02"]),
        ("cost_by_service.csv", vec!["report", "cost", "--month", "2026-02", "--by", "service", "--format", "csv"]),
        ("cost_by_usage_type.txt", vec!["report", "cost", "--month", "2026-02", "--by", "usage-type", "--customer", "acme"]),
        ("cost_by_day.txt", vec!["report", "cost", "--month", "2026-02", "--by", "day"]),
        ("cost_by_customer.json", vec!["report", "cost", "--month", "2026-02", "--format", "json"]),
        ("top_customers.txt", vec!["report", "top", "--month", "2026-02"]),
        ("invoice_preview_acme.txt", vec!["report", "invoice", "--customer", "acme", "--month", "2026-02"]),
        ("invoice_preview_globex.csv", vec!["report", "invoice", "--customer", "globex", "--month", "2026-02", "--format", "csv"]),
        ("cur_2026-03.csv", vec!["report", "cur", "--month", "2026-03"]),
    ] {
        golden(name, &meter_ok(&cfg, &args));
    }
    let cur = meter_ok(&cfg, &["report", "cur", "--month", "2026-02"]);
    assert_eq!(cur.lines().count(), 1 + row_count_where(&client, "rated_usage FINAL WHERE month = toDate('2026-02-01')").await);

    // Consistent data: the audit passes.
    let audit = meter_ok(&cfg, &["audit", "--month", "2026-02"]);
    assert!(audit.contains("audit 2026-02: ok"), "{audit}");

    // A correction: 28 GiB-days more database storage on Feb 10 (+1 GB-month, +0.115 USD),
    // as the processor would write it: a new final revision of the minute, hour and day.
    let k: Key = ("acme".into(), "database".into(), "StorageUsage-ByteSec".into(), "us-east-1".into(), String::new());
    let t = Date::new(2026, 2, 10).unwrap().start_millis();
    let extra: i128 = 28 * (1i128 << 30) * 86_400;
    for (table, windows, size) in [("usage_minute", &minutes, MINUTE), ("usage_hour", &hours, HOUR), ("usage_day", &days, DAY)] {
        let q = windows[&(k.clone(), t)] + extra;
        insert(&client, table, &[usage_row(&k, t, size, q, 2)]).await;
    }
    let corrected = meter_ok(&cfg, &["rate", "--month", "2026-02"]);
    assert!(corrected.contains("rated_usage:   0 new, 1 changed,"), "{corrected}");
    assert!(corrected.contains("invoice_lines: 0 new, 1 changed, 15 unchanged, 0 removed"), "{corrected}");
    assert!(corrected.contains("invoices:      0 new, 1 changed, 1 unchanged"), "{corrected}");
    assert!(corrected.contains("published 1 invoice lines"), "{corrected}");
    let after = stored_lines(&client).await;
    let changed: Vec<_> = after.iter().filter(|(k, v)| lines.get(*k) != Some(*v)).collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].0 .3, "StorageUsage-ByteSec");
    assert_eq!(changed[0].1 .1, 1162, "101 GB-month x 0.115 = 11.615 -> 11.62 (half to even)");
    assert!(stored_invoices(&client).await.contains(&"2026-02,acme,13,2615.92".to_owned()));
    let published = topic_lines(&cfg, 21, Duration::from_secs(30));
    assert_eq!(published.len(), 21);
    assert_eq!(published[20].amount.to_string(), "11.62");
    let audit = meter_ok(&cfg, &["audit", "--month", "2026-02"]);
    assert!(audit.contains("audit 2026-02: ok"), "{audit}");

    // An altered hour row: the audit names it and fails.
    let h = Date::new(2026, 2, 20).unwrap().start_millis();
    let k: Key = ("acme".into(), "cdn".into(), "DataTransfer-Out-Bytes".into(), "edge-us".into(), String::new());
    insert(&client, "usage_hour", &[usage_row(&k, h, HOUR, hours[&(k.clone(), h)] - 1, 9)]).await;
    let (code, stdout, _) = meter(&cfg, &["audit", "--month", "2026-02"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("minute/hour: acme/cdn/DataTransfer-Out-Bytes/edge-us/2026-02-20 quantity"), "{stdout}");
    assert!(stdout.contains("hour/day: acme/cdn/DataTransfer-Out-Bytes/edge-us/2026-02-20 quantity"), "{stdout}");
    assert!(stdout.contains("audit 2026-02: FAILED"), "{stdout}");
    assert_eq!(stdout.lines().count(), 3, "exactly the two differences and the verdict: {stdout}");

    // The read-only analyst (ops/) runs every example of docs/analysts.md on this data, and cannot write.
    let analyst = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_user("analyst")
        .with_password(analyst_password())
        .with_database(&cfg.clickhouse.database)
        .with_validation(false);
    let examples = meter_clickhouse::analyst_examples();
    assert!(examples.len() >= 10, "{examples:?}");
    for sql in &examples {
        analyst.query(sql).execute().await.unwrap_or_else(|e| panic!("docs/analysts.md example fails as analyst: {e}\n{sql}"));
    }
    let refused = analyst.query("INSERT INTO invoices (customer_id) VALUES ('mallory')").execute().await;
    assert!(refused.is_err(), "the analyst user must be read-only");

    conn.server_client().unwrap().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}

async fn futures_counts(client: &clickhouse::Client, tables: &[&str]) -> Vec<u64> {
    let mut out = Vec::new();
    for t in tables {
        out.push(row_count(client, t).await);
    }
    out
}

async fn row_count_where(client: &clickhouse::Client, from: &str) -> usize {
    usize::try_from(client.query(&format!("SELECT count() FROM {from}")).fetch_one::<u64>().await.unwrap()).unwrap()
}
