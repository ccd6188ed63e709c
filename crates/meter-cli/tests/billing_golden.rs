//! The golden billing scenario (`tests/golden/billing/`, priced by hand in
//! its README) end to end on the local ClickHouse and Kafka (`ops/up`), own
//! database and topics, through the `meter` binary: usage rows as the sink
//! writes them, `meter prices load`, `meter rate` for May and June 2026 with
//! the scenario's contracts, `meter audit`, `meter report cur`.
//!
//! - invoice lines (usage, fees, credits), invoices and the credit ledger
//!   in ClickHouse equal the expected files to the cent, and the lines on
//!   `billing.invoice_lines` carry the same amounts and line types;
//! - rating again writes and publishes nothing;
//! - the audit passes, and catches a month rated out of order (June's
//!   credits rated before May's use of them was known);
//! - a contracts file that names an unknown plan stops the run before it
//!   writes anything.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meter_config::Config;
use meter_rating::fixture::{usage_csv, BILLING_EXPECTED_INVOICES, BILLING_EXPECTED_LEDGER, BILLING_EXPECTED_LINES, BILLING_USAGE};
use meter_rating::Decimal;
use meter_sink::UsageRow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn contracts_path() -> String {
    format!("{}/../../tests/golden/billing/contracts.toml", env!("CARGO_MANIFEST_DIR"))
}

fn unique_config(name: &str) -> Config {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{}_{}_{}", name, std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut cfg = Config::default().scoped(&format!("test-{id}"));
    cfg.topics.partitions = 1;
    cfg.validate().unwrap().into_inner()
}

fn meter(cfg: &Config, contracts: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meter"))
        .args(args)
        .env("METER__CLICKHOUSE__DATABASE", &cfg.clickhouse.database)
        .env("METER__TOPICS__INVOICE_LINES", &cfg.topics.invoice_lines)
        .env("METER__RATING__CONTRACTS", contracts)
        .env_remove("METER_CONFIG")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn meter_ok(cfg: &Config, args: &[&str]) -> String {
    let (code, stdout, stderr) = meter(cfg, &contracts_path(), args);
    assert_eq!(code, 0, "meter {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// The scenario's daily usage as final minute, hour and day rows (each day's
/// quantity in its first minute), as the processor would have written them.
async fn write_usage(client: &clickhouse::Client) {
    for (table, size) in [("usage_minute", MINUTE), ("usage_hour", HOUR), ("usage_day", DAY)] {
        let mut insert = client.insert::<UsageRow>(table).await.unwrap();
        for r in usage_csv(BILLING_USAGE).unwrap() {
            let start = r.day.start_millis();
            insert
                .write(&UsageRow {
                    window_start: meter_clickhouse::seconds(start),
                    window_end: meter_clickhouse::seconds(start + size),
                    customer_id: r.customer_id,
                    service: r.service,
                    usage_type: r.usage_type,
                    region: r.region,
                    resource_id: r.resource_id,
                    event_count: 1,
                    quantity_sum: r.quantity,
                    quantity_min: 0,
                    quantity_max: 0,
                    first_event_time_ms: start,
                    last_event_time_ms: start,
                    revision: 1,
                    is_final: 1,
                    delta_sum: r.quantity,
                })
                .await
                .unwrap();
        }
        insert.end().await.unwrap();
    }
}

fn expected(csv: &str) -> Vec<String> {
    csv.lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

async fn strings(client: &clickhouse::Client, sql: &str) -> Vec<String> {
    client.query(sql).fetch_all::<String>().await.unwrap()
}

const SQL_LINES: &str =
    "SELECT concat(substring(toString(month), 1, 7), ',', customer_id, ',', service, ',', usage_type, ',', region, ',', \
    line_type, ',', toString(amount)) FROM invoice_lines FINAL ORDER BY month, customer_id, service, usage_type, region";
const SQL_INVOICES: &str =
    "SELECT concat(substring(toString(month), 1, 7), ',', customer_id, ',', toString(line_count), ',', toString(total)) \
    FROM invoices FINAL ORDER BY month, customer_id";
const SQL_LEDGER: &str = "SELECT concat(substring(toString(month), 1, 7), ',', customer_id, ',', credit_id, ',', toString(amount), ',', \
    toString(opening), ',', toString(used), ',', toString(expired), ',', toString(remaining)) FROM credit_ledger FINAL \
    ORDER BY month, customer_id, credit_id";

/// ClickHouse 18.16 prints Decimal(38, 2) without trailing zeros in some
/// versions and with them in others: compare as decimals.
fn normalized(rows: Vec<String>) -> Vec<String> {
    rows.into_iter()
        .map(|r| {
            r.split(',')
                .map(|f| {
                    if f.contains('.') || f.parse::<i64>().is_ok() {
                        f.parse::<Decimal>().map_or(f.to_owned(), |d| d.normalize().to_string())
                    } else {
                        f.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

fn topic_lines(cfg: &Config, at_least: usize) -> Vec<meter_rating::InvoiceLine> {
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(m) => out.push(codec.decode(m.unwrap().payload().unwrap()).unwrap()),
            None if out.len() >= at_least => break,
            None => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_golden_scenario_bills_fees_and_credits_to_the_cent_on_clickhouse_and_kafka() {
    let cfg = unique_config("billing");
    meter_kafka::admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    let client = conn.client().unwrap();
    write_usage(&client).await;
    meter_ok(&cfg, &["prices", "load"]);

    // A contracts file with a subscription to an unknown plan: refused, nothing written.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "[[subscription]]\ncustomer_id = \"initech\"\nplan = \"gold\"\nstart = 2026-05-01\n").unwrap();
    let (code, stdout, stderr) = meter(&cfg, bad.path().to_str().unwrap(), &["rate", "--month", "2026-05"]);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("no plan \"gold\""), "the error names the problem: {stderr}");
    assert!(strings(&client, SQL_LINES).await.is_empty(), "nothing may be written");

    // Rated in order: May, then June (whose credits start from May's ledger).
    let may = meter_ok(&cfg, &["rate", "--month", "2026-05"]);
    assert!(may.contains("invoice_lines: 8 new, 0 changed"), "{may}");
    assert!(may.contains("credit_ledger: 2 new"), "{may}");
    let june = meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    assert!(june.contains("invoice_lines: 4 new"), "{june}");

    assert_eq!(normalized(strings(&client, SQL_LINES).await), normalized(expected(BILLING_EXPECTED_LINES)));
    assert_eq!(normalized(strings(&client, SQL_INVOICES).await), normalized(expected(BILLING_EXPECTED_INVOICES)));
    assert_eq!(normalized(strings(&client, SQL_LEDGER).await), normalized(expected(BILLING_EXPECTED_LEDGER)));

    // The topic carries every line, with its type and amount.
    let mut published: Vec<String> = topic_lines(&cfg, 12)
        .iter()
        .map(|l| {
            let k = &l.key;
            format!("{},{},{},{},{},{},{}", l.month, k.customer_id, k.service, k.usage_type, k.region, l.line_type, l.amount)
        })
        .collect();
    published.sort();
    assert_eq!(published, expected(BILLING_EXPECTED_LINES));

    // Idempotent: a second run writes and publishes nothing.
    for month in ["2026-05", "2026-06"] {
        let again = meter_ok(&cfg, &["rate", "--month", month]);
        assert!(again.contains("invoice_lines: 0 new, 0 changed"), "{again}");
        assert!(again.contains("credit_ledger: 0 new, 0 changed"), "{again}");
        assert!(again.contains("published 0 invoice lines"), "{again}");
        let audit = meter_ok(&cfg, &["audit", "--month", month]);
        assert!(audit.contains(&format!("audit {month}: ok")), "{audit}");
    }

    // The CUR export has the fee and credit line items, each day's.
    let cur = meter_ok(&cfg, &["report", "cur", "--month", "2026-05"]);
    let count = |t: &str| cur.lines().filter(|l| l.split(',').nth(1) == Some(t)).count();
    assert_eq!(count("Fee"), 31 + 21, "support every day of May, the platform fee from the 11th:\n{cur}");
    assert_eq!(count("Credit"), 7 + 24, "the launch credit pays May 1-7, the goodwill credit May 8-31:\n{cur}");
    assert_eq!(count("Usage"), 31 + 2 + 1 + 31);

    // The analyst examples of docs/analysts.md run on this data.
    let analyst = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_user("analyst")
        .with_password(std::env::var("METER_ANALYST_PASSWORD").unwrap_or_default())
        .with_database(&cfg.clickhouse.database)
        .with_validation(false);
    for sql in meter_clickhouse::analyst_examples() {
        analyst.query(&sql).execute().await.unwrap_or_else(|e| panic!("docs/analysts.md example fails as analyst: {e}\n{sql}"));
    }

    conn.server_client().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_rated_before_the_month_whose_credits_it_inherits_is_caught_by_the_audit() {
    let cfg = unique_config("billing_order");
    meter_kafka::admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    let client = conn.client().unwrap();
    write_usage(&client).await;
    meter_ok(&cfg, &["prices", "load"]);

    // June first: the goodwill credit looks unused, so it pays all of June's $10.
    meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    meter_ok(&cfg, &["rate", "--month", "2026-05"]);
    let ledger: BTreeMap<String, String> =
        strings(&client, SQL_LEDGER).await.into_iter().map(|l| (l.split(',').take(3).collect::<Vec<_>>().join(","), l)).collect();
    assert!(ledger["2026-06,hooli,hooli-goodwill"].contains(",100"), "{ledger:?}");
    let (code, stdout, _) = meter(&cfg, &contracts_path(), &["audit", "--month", "2026-06"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("ledger/earlier months: hooli/Credit:hooli-goodwill opening: 4.00 != 100.00"), "{stdout}");

    // Rating June again, now that May is rated, puts it right.
    let again = meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    assert!(again.contains("credit_ledger: 0 new, 1 changed"), "{again}");
    let audit = meter_ok(&cfg, &["audit", "--month", "2026-06"]);
    assert!(audit.contains("audit 2026-06: ok"), "{audit}");
    assert_eq!(normalized(strings(&client, SQL_LEDGER).await), normalized(expected(BILLING_EXPECTED_LEDGER)));

    conn.server_client().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}
