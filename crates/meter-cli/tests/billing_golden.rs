//! The golden billing scenario (`tests/golden/billing/`, priced by hand in
//! its README) end to end on the local ClickHouse and Kafka (`ops/up`), own
//! database and topics, through the `meter` binary: usage rows (minute, hour
//! and day) as the sink writes them, `meter prices load`, `meter rate` for May and June 2026 with
//! the scenario's contracts, `meter audit`, `meter report cur`.
//!
//! - invoice lines (usage, reservations, savings plans, fees, credits),
//!   invoices and the credit ledger
//!   in ClickHouse equal the expected files to the cent, and the lines on
//!   `billing.invoice_lines` carry the same amounts and line types;
//! - rating again writes and publishes nothing;
//! - the audit passes, and catches a month rated out of order (June's
//!   credits rated before May's use of them was known);
//! - a contracts file that names an unknown plan stops the run before it
//!   writes anything;
//! - `meter close` freezes May (refused for a month inside the correction
//!   horizon), publishes close records that fastavro reads and whose
//!   checksums match the lines on `billing.invoice_lines`; late usage for
//!   May is billed on June as an adjustment, never by changing May, and
//!   the audit accounts for it.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

mod agent_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_support::analyst_password;
use meter_config::Config;
use meter_rating::fixture::{
    usage_csv, Scenario, BILLING_EXPECTED_INVOICES, BILLING_EXPECTED_LEDGER, BILLING_EXPECTED_LINES, BILLING_RUNS, BILLING_USAGE,
};
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
        .env("METER__TOPICS__PERIOD_CLOSE", &cfg.topics.period_close)
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

/// The scenario's usage as final minute, hour and day rows, as the processor
/// would have written them: the daily rows of `usage.csv` in the first
/// minute and hour of their day, the instance runs of `runs.toml` minute by
/// minute.
async fn write_usage(client: &clickhouse::Client) {
    type Key = (String, String, String, String, String);
    let mut minutes: BTreeMap<(Key, i64), i128> = BTreeMap::new();
    for r in usage_csv(BILLING_USAGE).unwrap() {
        *minutes.entry(((r.customer_id, r.service, r.usage_type, r.region, r.resource_id), r.day.start_millis())).or_default() +=
            r.quantity;
    }
    for m in Scenario::parse(BILLING_RUNS).unwrap().minute_rows() {
        *minutes.entry(((m.customer_id, m.service, m.usage_type, m.region, m.resource_id), m.minute_start)).or_default() += m.quantity;
    }
    for (table, size) in [("usage_minute", MINUTE), ("usage_hour", HOUR), ("usage_day", DAY)] {
        let mut windows: BTreeMap<(Key, i64), i128> = BTreeMap::new();
        for ((k, t), q) in &minutes {
            *windows.entry((k.clone(), t - t.rem_euclid(size))).or_default() += q;
        }
        let mut insert = client.insert::<UsageRow>(table).await.unwrap();
        for ((k, start), q) in windows {
            insert
                .write(&UsageRow {
                    window_start: meter_clickhouse::seconds(start),
                    window_end: meter_clickhouse::seconds(start + size),
                    customer_id: k.0,
                    service: k.1,
                    usage_type: k.2,
                    region: k.3,
                    resource_id: k.4,
                    event_count: 1,
                    quantity_sum: q,
                    quantity_min: 0,
                    quantity_max: 0,
                    first_event_time_ms: start,
                    last_event_time_ms: start,
                    revision: 1,
                    is_final: 1,
                    delta_sum: q,
                })
                .await
                .unwrap();
        }
        insert.end().await.unwrap();
    }
}

/// Own topics and database, the scenario's usage written, the price book loaded.
async fn setup(name: &str) -> (Config, meter_clickhouse::Connection, clickhouse::Client) {
    let cfg = unique_config(name);
    meter_kafka::admin::ensure_topics(&cfg).await.expect("Kafka must be running (ops/up)");
    let conn = meter_clickhouse::Connection::from(&cfg.clickhouse);
    meter_clickhouse::migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    let client = conn.client().unwrap();
    write_usage(&client).await;
    meter_ok(&cfg, &["prices", "load"]);
    (cfg, conn, client)
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
    let (cfg, conn, client) = setup("billing").await;

    // A contracts file with a subscription to an unknown plan: refused, nothing written.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "[[subscription]]\ncustomer_id = \"initech\"\nplan = \"gold\"\nstart = 2026-05-01\n").unwrap();
    let (code, stdout, stderr) = meter(&cfg, bad.path().to_str().unwrap(), &["rate", "--month", "2026-05"]);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("no plan \"gold\""), "the error names the problem: {stderr}");
    assert!(strings(&client, SQL_LINES).await.is_empty(), "nothing may be written");

    // Rated in order: May, then June (whose credits start from May's ledger).
    let may = meter_ok(&cfg, &["rate", "--month", "2026-05"]);
    assert!(may.contains("invoice_lines: 18 new, 0 changed"), "{may}");
    assert!(may.contains("credit_ledger: 2 new"), "{may}");
    let june = meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    assert!(june.contains("invoice_lines: 4 new"), "{june}");
    // July is priced by two versions: 2026-04 to the 14th, 2026-07-15 from the 15th.
    let july = meter_ok(&cfg, &["rate", "--month", "2026-07"]);
    assert!(july.contains("price-book version 2026-04+2026-07-15") && july.contains("invoice_lines: 3 new"), "{july}");
    let wayne = strings(
        &client,
        "SELECT concat(price_version_id, ':', toString(count()), ':', toString(sum(cost))) FROM rated_usage FINAL \
         WHERE customer_id = 'wayne' GROUP BY price_version_id ORDER BY price_version_id",
    )
    .await;
    assert_eq!(normalized(wayne.iter().map(|w| w.replace(':', ",")).collect()), vec!["2026-04,14,161", "2026-07-15,17,170"]);

    assert_eq!(normalized(strings(&client, SQL_LINES).await), normalized(expected(BILLING_EXPECTED_LINES)));
    assert_eq!(normalized(strings(&client, SQL_INVOICES).await), normalized(expected(BILLING_EXPECTED_INVOICES)));
    assert_eq!(normalized(strings(&client, SQL_LEDGER).await), normalized(expected(BILLING_EXPECTED_LEDGER)));

    // The topic carries every line, with its type and amount.
    let mut published: Vec<String> = topic_lines(&cfg, 25)
        .iter()
        .map(|l| {
            let k = &l.key;
            format!("{},{},{},{},{},{},{}", l.month, k.customer_id, k.service, k.usage_type, k.region, l.line_type, l.amount)
        })
        .collect();
    published.sort();
    assert_eq!(published, expected(BILLING_EXPECTED_LINES));

    // Idempotent: a second run writes and publishes nothing.
    for month in ["2026-05", "2026-06", "2026-07"] {
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
    assert_eq!(count("Usage"), 31 + 2 + 1 + 31 + 3, "one row per key and day with usage, covered or not");
    assert_eq!(count("RIFee"), 31, "reserved hours are billed every day of the term, used or not");
    assert_eq!(count("DiscountedUsage"), 1);
    assert_eq!(count("SavingsPlanRecurringFee"), 31);
    assert_eq!((count("SavingsPlanCoveredUsage"), count("SavingsPlanNegation")), (2, 2));

    // The analyst examples of docs/analysts.md run on this data.
    let analyst = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_user("analyst")
        .with_password(analyst_password())
        .with_database(&cfg.clickhouse.database)
        .with_validation(false);
    for sql in meter_clickhouse::analyst_examples() {
        analyst.query(&sql).execute().await.unwrap_or_else(|e| panic!("docs/analysts.md example fails as analyst: {e}\n{sql}"));
    }

    conn.server_client().unwrap().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_rated_before_the_month_whose_credits_it_inherits_is_caught_by_the_audit() {
    let (cfg, conn, client) = setup("billing_order").await;

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

    conn.server_client().unwrap().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}

/// Every record of `topic` as the independent reader (confluent-kafka and
/// fastavro, tests/interop/python) prints it.
fn python_records(cfg: &Config, topic: &str, schema: &str) -> Vec<serde_json::Value> {
    let repo = format!("{}/../..", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(format!("{repo}/tests/interop/python/read_topic.py"))
        .args(["--bootstrap", &cfg.kafka.brokers, "--topic", topic, "--schema", &format!("{repo}/schemas/avro/{schema}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "read_topic.py failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_month_is_frozen_and_late_usage_is_billed_on_the_next_open_month() {
    let (cfg, conn, client) = setup("billing_close").await;
    meter_ok(&cfg, &["rate", "--month", "2026-05"]);
    meter_ok(&cfg, &["rate", "--month", "2026-06"]);

    // The current month is inside its correction horizon: refused, nothing closed.
    let now = meter_rating::Date::from_millis(meter_model::now_ms()).unwrap().year_month().to_string();
    let (code, _, stderr) = meter(&cfg, &contracts_path(), &["close", "--month", &now]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot be closed before") && stderr.contains("correction_horizon_ms"), "{stderr}");
    assert!(strings(&client, "SELECT customer_id FROM closed_periods").await.is_empty());

    let out = meter_ok(&cfg, &["close", "--month", "2026-05"]);
    assert!(out.contains("closed 4 customers (0 closed before)"), "{out}");
    let again = meter_ok(&cfg, &["close", "--month", "2026-05"]);
    assert!(again.contains("closed 0 customers (4 closed before)"), "{again}");

    // The close records, read by fastavro: one per customer, each checksum the
    // one a billing consumer computes from the May lines it received.
    let records = python_records(&cfg, &cfg.topics.period_close, "period_close.avsc");
    assert_eq!(records.len(), 4, "{records:?}");
    let mut by_customer: BTreeMap<String, Vec<(String, meter_rating::LineType, Decimal)>> = BTreeMap::new();
    for l in topic_lines(&cfg, 22).into_iter().filter(|l| l.month.to_string() == "2026-05") {
        by_customer.entry(l.key.customer_id.clone()).or_default().push((l.line_id.clone(), l.line_type, l.amount));
    }
    for r in &records {
        let v = &r["value"];
        assert_eq!(v["month"], "2026-05");
        let customer = v["customer_id"].as_str().unwrap();
        assert_eq!(r["key"].as_str(), Some(format!("2026-05/{customer}").as_str()));
        let lines = &by_customer[customer];
        assert_eq!(v["checksum"].as_str(), Some(meter_rating::close::checksum(lines).as_str()), "{customer}");
        assert_eq!(v["line_count"].as_u64(), Some(lines.len() as u64));
    }
    let closed_may = strings(&client, SQL_LINES).await;

    // Late usage for May (a new final revision of hooli's May 20): 5,000,000 GET more, $2.00.
    let k = ("hooli", "object-storage", "Requests-GET", "us-east-1");
    let t = meter_rating::Date::new(2026, 5, 20).unwrap().start_millis();
    for (table, size) in [("usage_minute", MINUTE), ("usage_hour", HOUR), ("usage_day", DAY)] {
        let mut insert = client.insert::<UsageRow>(table).await.unwrap();
        insert
            .write(&UsageRow {
                window_start: meter_clickhouse::seconds(t),
                window_end: meter_clickhouse::seconds(t + size),
                customer_id: k.0.into(),
                service: k.1.into(),
                usage_type: k.2.into(),
                region: k.3.into(),
                resource_id: String::new(),
                event_count: 2,
                quantity_sum: 15_000_000,
                quantity_min: 0,
                quantity_max: 0,
                first_event_time_ms: t,
                last_event_time_ms: t,
                revision: 2,
                is_final: 1,
                delta_sum: 5_000_000,
            })
            .await
            .unwrap();
        insert.end().await.unwrap();
    }
    let may = meter_ok(&cfg, &["rate", "--month", "2026-05"]);
    assert!(may.contains("invoice_lines: 0 new, 0 changed"), "a closed month is never rewritten: {may}");
    assert_eq!(strings(&client, SQL_LINES).await, closed_may);
    let (code, audit, _) = meter(&cfg, &contracts_path(), &["audit", "--month", "2026-05"]);
    assert_eq!(code, 1, "late usage not billed yet is a difference: {audit}");
    assert!(
        audit.contains("usage/closed+adjusted: hooli/object-storage/Requests-GET/us-east-1 usage quantity: 317345678 != 312345678"),
        "{audit}"
    );

    // June bills it: +$2.00 on hooli's June, which its goodwill credit does not reach (it has $4.00 left).
    let june = meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    assert!(june.contains("invoice_lines: 1 new, 0 changed"), "{june}");
    let lines = strings(&client, SQL_LINES).await;
    assert!(
        lines.contains(&"2026-06,hooli,object-storage,Adjustment:2026-05:Requests-GET,us-east-1,Adjustment,2".to_owned())
            || lines.contains(&"2026-06,hooli,object-storage,Adjustment:2026-05:Requests-GET,us-east-1,Adjustment,2.00".to_owned()),
        "{lines:#?}"
    );
    assert!(normalized(strings(&client, SQL_INVOICES).await).contains(&"2026-06,hooli,3,8".to_owned()));
    for month in ["2026-05", "2026-06"] {
        let audit = meter_ok(&cfg, &["audit", "--month", month]);
        assert!(audit.contains(&format!("audit {month}: ok")), "{audit}");
    }
    let again = meter_ok(&cfg, &["rate", "--month", "2026-06"]);
    assert!(again.contains("invoice_lines: 0 new, 0 changed"), "{again}");

    conn.server_client().unwrap().query(&format!("DROP DATABASE {}", cfg.clickhouse.database)).execute().await.unwrap();
}
