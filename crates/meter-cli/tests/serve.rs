//! `meter serve` on the local Kafka and ClickHouse, reached with `curl`:
//!
//! - events posted over HTTP (with a batch retried whole and events
//!   repeated across batches) come out exact in ClickHouse, on the
//!   aggregates topic and in `GET /v1/usage` (every window size, paged,
//!   JSON and CSV), against the ledger of the distinct events;
//! - the OpenAPI document matches the running server, checked by Python's
//!   openapi-core (`tests/interop/python/openapi_check.py`);
//! - refused requests (no or unknown key, wrong role, customer outside the
//!   key, malformed JSON, unknown usage type, too large, wrong media type)
//!   get their status and reasons, and put nothing on the topic.

#![allow(clippy::unwrap_used)]

mod agent_support;
mod serve_support;

use std::collections::BTreeMap;
use std::process::Command;

use agent_support::*;
use meter_model::ledger::Ledger;
use meter_model::Granularity;
use serde_json::Value;
use serve_support::*;

const BATCH: &str = "application/cloudevents-batch+json";

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `meter` with the test's configuration; its stdout.
fn meter_ok(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meter")).arg("--config").arg(config).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "meter {args:?} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

fn with_serve(dir: &std::path::Path, id: &str, extra: &str) -> (std::path::PathBuf, meter_config::Valid<meter_config::Config>, u16) {
    let (path, _) = config_file(dir, id, "");
    let port = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&serve_section(port, extra));
    std::fs::write(&path, text).unwrap();
    let cfg = meter_config::Config::load(Some(&path)).unwrap();
    (path, cfg, port)
}

const SECRET: &str = "5e7c1a0f9b2d4e6a8c0e2f4a6b8d0f1e";

/// Enrolls the keys' agent (`processor.agent_keys_file`, unsigned events
/// refused) and, when `sign`, gives both ingest keys its signing key file.
fn enroll(dir: &std::path::Path, config: &std::path::Path, sign: bool) -> meter_config::Valid<meter_config::Config> {
    let processor_keys = dir.join("agent-keys.toml");
    std::fs::write(&processor_keys, format!("[agents.\"{AGENT}\"]\n\"api.1\" = \"{SECRET}\"\n")).unwrap();
    let agent_key = dir.join("api-test.key");
    std::fs::write(&agent_key, format!("api.1:{SECRET}\n")).unwrap();
    let mut text = std::fs::read_to_string(config).unwrap();
    text = text
        .replace("[processor]\n", &format!("[processor]\nagent_keys_file = \"{}\"\naccept_unsigned = false\n", processor_keys.display()));
    if sign {
        text = text.replace(
            &format!("agent_id = \"{AGENT}\"\n"),
            &format!("agent_id = \"{AGENT}\"\nsigning_key_file = \"{}\"\n", agent_key.display()),
        );
    }
    std::fs::write(config, text).unwrap();
    meter_config::Config::load(Some(config)).unwrap()
}

/// The ledger's entries of `customer` at granularity `g`, keyed as
/// `/v1/usage` rows grouped by service, usage_type and region.
fn expected_rows(ledger: &Ledger, customer: &str, g: Granularity) -> BTreeMap<(String, String, String, String), (String, i64)> {
    ledger
        .with_rollups()
        .entries
        .iter()
        .filter(|(k, _)| k.granularity == g && k.customer_id == customer)
        .map(|(k, t)| {
            (
                (meter_model::date::format_rfc3339(k.window_start), k.service.clone(), k.usage_type.clone(), k.region.clone()),
                (t.quantity_sum.to_string(), t.event_count),
            )
        })
        .collect()
}

/// Every page of a usage query, following `next_page_token`.
fn all_pages(server: &Server, token: &str, query: &str) -> (Vec<Value>, usize) {
    let (mut rows, mut pages, mut next) = (Vec::new(), 0, None::<String>);
    loop {
        let q = match &next {
            None => query.to_owned(),
            Some(t) => format!("{query}&page_token={t}"),
        };
        let a = get(server, token, &format!("/v1/usage?{q}"));
        assert_eq!(a.status, 200, "{}", a.body);
        let page = a.json();
        rows.extend(page["rows"].as_array().unwrap().iter().cloned());
        pages += 1;
        match page["next_page_token"].as_str() {
            Some(t) => {
                assert_eq!(a.header("x-next-page-token").as_deref(), Some(t));
                next = Some(t.to_owned());
            }
            None => return (rows, pages),
        }
    }
}

fn as_rows(rows: &[Value]) -> BTreeMap<(String, String, String, String), (String, i64)> {
    rows.iter()
        .map(|r| {
            assert_eq!(r["is_final"], Value::Bool(true), "{r}");
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            ((s("window_start"), s("service"), s("usage_type"), s("region")), (s("quantity"), r["event_count"].as_i64().unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_events_come_out_exact_in_clickhouse_the_topic_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("serve{}", std::process::id());
    let (config, _, port) = with_serve(dir.path(), &id, "");
    // The keys' agent is enrolled: the processor takes only events signed
    // with its key, and serve signs with it.
    let cfg = enroll(dir.path(), &config, true);
    setup(&cfg).await;
    let server = Server::start(&config, port);

    let start = meter_model::time::day_floor(meter_model::now_ms()) - 2 * DAY_MS;
    let all = events("e", 1200, &["c-1", "c-2"], start);
    let batches: Vec<&[Usage]> = all.chunks(100).collect();
    let mut posted = 0usize;
    for b in &batches {
        let a = post(&server, INGEST, BATCH, &batch(b));
        assert_eq!(a.status, 202, "{}", a.body);
        assert_eq!(a.json()["accepted"], b.len());
        posted += b.len();
    }
    // A client that lost the answer retries the whole batch, twice.
    for _ in 0..2 {
        let a = post(&server, INGEST, BATCH, &batch(batches[3]));
        assert_eq!(a.status, 202, "{}", a.body);
        posted += batches[3].len();
    }
    // Events repeated across batches: the first ten of every batch, again,
    // and one event alone as a structured CloudEvent.
    let again: Vec<Usage> = batches.iter().flat_map(|b| b[..10].to_vec()).collect();
    assert_eq!(post(&server, INGEST, BATCH, &batch(&again)).status, 202);
    posted += again.len();
    let single = post(&server, INGEST, "application/cloudevents+json", &all[5].cloudevent().to_string());
    assert_eq!(single.status, 202, "{}", single.body);
    posted += 1;
    assert_eq!(topic_records(&cfg, &cfg.topics.events), posted as i64, "every accepted event is on the topic, once per post");

    let ledger = ledger(&all);
    let rec = drain_and_reconcile(&cfg, &ledger).await;
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, all.len() as i64);
    eprintln!("{} ({posted} posted)", rec.summary());

    // The API reads the same numbers, for every window size.
    for (window, g, limit) in [("minute", Granularity::Minute, 250), ("hour", Granularity::Hour, 7), ("day", Granularity::Day, 1000)] {
        let q = format!(
            "customer=c-1&from={}&to={}&window={window}&group_by=service,usage_type,region&limit={limit}",
            start / 1000,
            (start + DAY_MS) / 1000
        );
        let (rows, pages) = all_pages(&server, QUERY_C1, &q);
        assert_eq!(as_rows(&rows), expected_rows(&ledger, "c-1", g), "window={window}");
        eprintln!("window={window}: {} rows in {pages} pages", rows.len());
        if window == "hour" {
            assert!(pages > 1, "paging was exercised");
        }
    }
    // A month sums the days (and is final only once the month has ended).
    let month = meter_model::Date::from_millis(start).unwrap().year_month();
    let q = format!(
        "customer=c-2&from={}&to={}&window=month&group_by=usage_type",
        month.first_day(),
        meter_model::Date::from_millis(month.end_millis()).unwrap()
    );
    let a = get(&server, ADMIN, &format!("/v1/usage?{q}"));
    assert_eq!(a.status, 200, "{}", a.body);
    let mut want: BTreeMap<String, i128> = BTreeMap::new();
    for e in all.iter().filter(|e| e.customer == "c-2") {
        *want.entry(e.usage_type.to_owned()).or_default() += i128::from(e.quantity);
    }
    let page = a.json();
    let got: BTreeMap<String, i128> = page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["usage_type"].as_str().unwrap().to_owned(), r["quantity"].as_str().unwrap().parse().unwrap()))
        .collect();
    assert_eq!(got, want);
    // CSV: the same rows as JSON.
    let day = format!("customer=c-1&from={}&to={}&group_by=service", start / 1000, (start + DAY_MS) / 1000);
    let json_rows = get(&server, QUERY_C1, &format!("/v1/usage?{day}")).json()["rows"].as_array().unwrap().clone();
    let csv = get(&server, QUERY_C1, &format!("/v1/usage?{day}&format=csv"));
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines[0], "window_start,window_end,service,quantity,event_count,is_final");
    assert_eq!(lines.len(), json_rows.len() + 1);
    for (line, r) in lines[1..].iter().zip(&json_rows) {
        let want = format!(
            "{},{},{},{},{},{}",
            r["window_start"].as_str().unwrap(),
            r["window_end"].as_str().unwrap(),
            r["service"].as_str().unwrap(),
            r["quantity"].as_str().unwrap(),
            r["event_count"],
            r["is_final"]
        );
        assert_eq!(*line, want);
    }

    // Rated, the month's invoice and lines read back; then the OpenAPI
    // document is checked against this server by an independent client.
    meter_ok(&config, &["prices", "load"]);
    meter_ok(&config, &["rate", "--month", &month.to_string()]);
    let inv = get(&server, QUERY_C1, &format!("/v1/customers/c-1/invoices/{month}"));
    assert_eq!(inv.status, 200, "{}", inv.body);
    let lines = get(&server, QUERY_C1, &format!("/v1/customers/c-1/invoices/{month}/lines")).json();
    let sum: rust_decimal::Decimal =
        lines["lines"].as_array().unwrap().iter().map(|l| l["amount"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap()).sum();
    assert_eq!(sum.to_string(), inv.json()["total"].as_str().unwrap(), "the lines add up to the invoice");
    assert_eq!(inv.json()["line_count"].as_u64().unwrap() as usize, lines["lines"].as_array().unwrap().len());
    let checker = Command::new("python3")
        .current_dir(repo())
        .arg("tests/interop/python/openapi_check.py")
        .args(["--doc", "schemas/openapi/meter-serve.yaml", "--base", &server.base])
        .args(["--ingest-token", INGEST_C1, "--query-token", QUERY_C1, "--admin-token", ADMIN])
        .args(["--customer", "c-1", "--other-customer", "c-2", "--month", &month.to_string()])
        .args(["--usage-from", &meter_model::Date::from_millis(start).unwrap().to_string()])
        .args(["--usage-to", &meter_model::Date::from_millis(start + DAY_MS).unwrap().to_string()])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&checker.stdout), String::from_utf8_lossy(&checker.stderr));
    assert!(checker.status.success(), "the OpenAPI check failed:\n{stdout}\n{stderr}");
    eprintln!("{}", stdout.trim());
    let routes: Vec<(String, String)> = meter_serve::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(routes, documented_routes(), "the server's routes are the document's");
}

/// (method, path) of every operation in the OpenAPI document.
fn documented_routes() -> Vec<(String, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(meter_serve::OPENAPI).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            out.push((method.as_str().unwrap().to_owned(), path.as_str().unwrap().to_owned()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_their_status_and_put_nothing_on_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("serverefuse{}", std::process::id());
    let (config, cfg, port) = with_serve(dir.path(), &id, "max_body_bytes = 65536\nmax_batch_events = 50");
    setup(&cfg).await;
    let server = Server::start(&config, port);
    let start = meter_model::time::day_floor(meter_model::now_ms()) - DAY_MS;
    let good = events("r", 3, &["c-1"], start);
    let body = batch(&good);

    let no_key = curl(&server.url("/v1/events"), &["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", &body]);
    assert_eq!((no_key.status, no_key.json()["error"].as_str()), (401, Some("unauthorized")));
    assert!(no_key.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(post(&server, "mtr_not_a_key", BATCH, &body).status, 401);
    // The stored hash is not a token.
    let hash = meter_serve::keys::to_hex(&meter_serve::keys::sha256(INGEST));
    assert_eq!(post(&server, &hash, BATCH, &body).status, 401);

    let read_only = post(&server, QUERY_C1, BATCH, &body);
    assert_eq!((read_only.status, read_only.json()["error"].as_str()), (403, Some("forbidden")));
    // One event of the batch is for a customer the key does not cover.
    let mut outside = good.clone();
    outside[1].customer = "c-2".into();
    let a = post(&server, INGEST_C1, BATCH, &batch(&outside));
    assert_eq!(a.status, 403, "{}", a.body);
    let problems = a.json()["events"].as_array().unwrap().clone();
    assert_eq!(problems.len(), 1);
    assert_eq!((problems[0]["index"].as_u64(), problems[0]["reason"].as_str()), (Some(1), Some("forbidden")));

    let malformed = post(&server, INGEST, BATCH, "[{\"specversion\": \"1.0\",");
    assert_eq!((malformed.status, malformed.json()["error"].as_str()), (400, Some("malformed_json")));
    // Every bad event is listed with the processor's reason.
    let mut bad = events("b", 4, &["c-1"], start);
    bad[1].usage_type = "BoxUsage:no.such";
    bad[3].quantity = -1;
    let mut body_bad = batch(&bad);
    body_bad = body_bad.replacen("\"specversion\":\"1.0\"", "\"specversion\":\"0.3\"", 1);
    let a = post(&server, INGEST, BATCH, &body_bad);
    assert_eq!((a.status, a.json()["error"].as_str()), (400, Some("invalid_events")), "{}", a.body);
    let reasons: Vec<(u64, String)> = a.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["index"].as_u64().unwrap(), p["reason"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(reasons, [(0, "invalid_cloudevent".to_owned()), (1, "unknown_usage_type".to_owned()), (3, "negative_quantity".to_owned())]);
    let future = Usage { time_ms: meter_model::now_ms() + 3_600_000, ..good[0].clone() };
    let a = post(&server, INGEST, BATCH, &batch(&[future]));
    assert_eq!(a.json()["events"][0]["reason"], "future_timestamp", "{}", a.body);
    let ancient = Usage { time_ms: meter_model::now_ms() - 40 * DAY_MS, ..good[0].clone() };
    assert_eq!(post(&server, INGEST, BATCH, &batch(&[ancient])).json()["events"][0]["reason"], "too_late");
    // Within serve.horizon_margin_ms (1 h) of the 35-day horizon: refused
    // too, as the processor may judge it later than now.
    let edge = Usage { time_ms: meter_model::now_ms() - 35 * DAY_MS + 30 * 60_000, ..good[0].clone() };
    assert_eq!(post(&server, INGEST, BATCH, &batch(&[edge])).json()["events"][0]["reason"], "too_late");
    // The same source and id twice in one request with other content.
    let twice = [good[0].clone(), Usage { quantity: good[0].quantity + 1, ..good[0].clone() }];
    let a = post(&server, INGEST, BATCH, &batch(&twice));
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!((a.json()["events"][0]["index"].as_u64(), a.json()["events"][0]["reason"].as_str()), (Some(1), Some("event_id_conflict")));

    let many = events("m", 51, &["c-1"], start);
    let a = post(&server, INGEST, BATCH, &batch(&many));
    assert_eq!((a.status, a.json()["error"].as_str()), (413, Some("too_large")), "{}", a.body);
    let huge = format!("[{}]", vec![good[0].cloudevent().to_string(); 400].join(","));
    assert!(huge.len() > 65536);
    assert_eq!(post(&server, INGEST, BATCH, &huge).status, 413);
    let gz = curl(
        &server.url("/v1/events"),
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {INGEST}"),
            "-H",
            "Content-Type: application/json",
            "-H",
            "Content-Encoding: gzip",
            "--data-binary",
            &body,
        ],
    );
    assert_eq!((gz.status, gz.json()["error"].as_str()), (415, Some("unsupported_media_type")));
    let text = post(&server, INGEST, "text/plain", &body);
    assert_eq!((text.status, text.json()["error"].as_str()), (415, Some("unsupported_media_type")));
    let wrong_shape = post(&server, INGEST, "application/cloudevents+json", &body);
    assert_eq!(wrong_shape.status, 400);

    assert_eq!(topic_records(&cfg, &cfg.topics.events), 0, "no refused request produced anything");
    // The control: a good request does reach the topic.
    assert_eq!(post(&server, INGEST, BATCH, &body).status, 202);
    assert_eq!(topic_records(&cfg, &cfg.topics.events), good.len() as i64);

    // Reads: the scope of a query key, the role of an ingest key, bad parameters.
    let q = format!("from={}&to={}", start / 1000, (start + DAY_MS) / 1000);
    assert_eq!(get(&server, QUERY_C1, &format!("/v1/usage?customer=c-2&{q}")).status, 403);
    assert_eq!(get(&server, INGEST, &format!("/v1/usage?customer=c-1&{q}")).status, 403);
    assert_eq!(get(&server, ADMIN, &format!("/v1/usage?customer=c-2&{q}")).status, 200);
    for bad in ["window=week", "group_by=colour", "limit=0", "limit=20000", "page_token=x", "format=xml", "from=yesterday", "colour=red"] {
        let a = get(&server, ADMIN, &format!("/v1/usage?customer=c-1&{q}&{bad}"));
        assert_eq!((a.status, a.json()["error"].as_str()), (400, Some("bad_request")), "{bad}: {}", a.body);
    }
    assert_eq!(get(&server, ADMIN, "/v1/customers/c-1/invoices/2026-13").status, 400);
    assert_eq!(get(&server, ADMIN, "/v1/customers/c-1/invoices/1999-01").status, 404);
    assert_eq!(get(&server, ADMIN, "/v1/nothing").status, 404);
    let wrong_method = curl(&server.url("/v1/usage"), &["-X", "DELETE", "-H", &format!("Authorization: Bearer {ADMIN}")]);
    assert_eq!((wrong_method.status, wrong_method.json()["error"].as_str()), (405, Some("method_not_allowed")));
    let bad_path = get(&server, ADMIN, "/v1/customers/%FF/cost");
    assert_eq!((bad_path.status, bad_path.json()["error"].as_str()), (400, Some("bad_request")), "{}", bad_path.body);
    let long =
        get(&server, ADMIN, &format!("/v1/usage?customer=c-1&window=minute&from={}&to={}", start / 1000 - 60 * 86_400, start / 1000));
    assert_eq!(long.status, 400, "{}", long.body);
    assert!(long.json()["message"].as_str().unwrap().contains("serve.max_query_windows"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_is_429_with_retry_after_and_a_lost_broker_503() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("servefull{}", std::process::id());
    let (config, _, port) = with_serve(dir.path(), &id, "max_batch_events = 50\nmax_in_flight_events = 50\ndelivery_timeout_ms = 6000");
    // No broker answers there: what is handed to the producer waits until
    // the delivery timeout.
    let server = std::sync::Arc::new(Server::start_with(&config, port, &[("METER__KAFKA__BROKERS", "127.0.0.1:9")]));
    let start = meter_model::time::day_floor(meter_model::now_ms()) - DAY_MS;
    let first = events("f", 50, &["c-1"], start);
    let holder = {
        let server = server.clone();
        std::thread::spawn(move || post(&server, INGEST, BATCH, &batch(&first)))
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let more = post(&server, INGEST, BATCH, &batch(&events("g", 1, &["c-1"], start)));
    assert_eq!((more.status, more.json()["error"].as_str()), (429, Some("overloaded")), "{}", more.body);
    assert_eq!(more.header("retry-after").as_deref(), Some("1"));
    let held = holder.join().unwrap();
    assert_eq!((held.status, held.json()["error"].as_str()), (503, Some("not_acknowledged")), "{}", held.body);
    assert!(held.json()["message"].as_str().unwrap().starts_with("50 of 50 events were not acknowledged"), "{}", held.body);
    assert_eq!(held.header("retry-after").as_deref(), Some("1"));
    // The permits came back with the answer: the next request is not 429.
    let after = post(&server, INGEST, BATCH, &batch(&events("h", 1, &["c-1"], start)));
    assert_eq!(after.status, 503, "{}", after.body);
}

#[test]
fn serve_refuses_keys_the_processor_would_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = with_serve(dir.path(), "servemismatch", "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    // The ingest keys post for c-1 and c-2 as api-test; the processor
    // registers api-test for c-1 only.
    text = text.replace("[processor]\n", &format!("[processor]\nagents = {{ \"{AGENT}\" = [\"c-1\"] }}\n"));
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meter")).arg("--config").arg(&config).arg("serve").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("api key \"ingest\": agent \"api-test\" is not registered for customer \"c-2\" in processor.agents"),
        "{stderr}"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_meter")).args(["config", "check"]).arg(&config).output().unwrap();
    assert_eq!(check.status.code(), Some(2), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stderr).contains("not registered for customer \"c-2\""));
    // An enrolled agent whose key does not sign: refused too.
    let (config, _, _) = with_serve(dir.path(), "servemismatch", "");
    enroll(dir.path(), &config, false);
    let out = Command::new(env!("CARGO_BIN_EXE_meter")).arg("--config").arg(&config).arg("serve").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad_signature") && stderr.contains("api key \"ingest\": agent \"api-test\" is enrolled"), "{stderr}");
}

/// With `serialization.events = "confluent"`, serve registers UsageEvent
/// and writes the registry framing: confluent-kafka's AvroDeserializer
/// (Python, no meterline code) reads every posted event back, and the
/// processor aggregates them exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_writes_the_configured_wire_format_and_confluent_kafka_reads_it() {
    let registry = std::env::var("METER_TEST_REGISTRY_URL").unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".into());
    let dir = tempfile::tempdir().unwrap();
    let id = format!("serveconfluent{}", std::process::id());
    let (config, _, port) = with_serve(dir.path(), &id, "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[serialization]\nevents = \"confluent\"\nregistry_url = \"{registry}\"\n"));
    std::fs::write(&config, text).unwrap();
    let cfg = meter_config::Config::load(Some(&config)).unwrap();
    setup(&cfg).await;
    let server = Server::start(&config, port);
    let start = meter_model::time::day_floor(meter_model::now_ms()) - DAY_MS;
    let posted = events("w", 40, &["c-1", "c-2"], start);
    let a = post(&server, INGEST, BATCH, &batch(&posted));
    assert_eq!(a.status, 202, "{}", a.body);

    let out = Command::new("python3")
        .arg(repo().join("tests/interop/python/read_topic.py"))
        .args(["--bootstrap", &cfg.kafka.brokers, "--topic", &cfg.topics.events])
        .arg("--schema")
        .arg(repo().join("schemas/avro/usage_event.avsc"))
        .args(["--framing", "confluent", "--registry", &registry])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "read_topic.py: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut read: Vec<(String, String, String, i64)> = stdout
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            let v = &r["value"];
            assert_eq!(r["key"], v["customer_id"], "{l}");
            assert_eq!(v["agent_id"], AGENT, "{l}");
            let quantity = v["quantity"].as_i64().unwrap_or_else(|| v["quantity"].as_str().unwrap().parse().unwrap());
            (
                v["event_id"].as_str().unwrap().to_owned(),
                v["customer_id"].as_str().unwrap().to_owned(),
                v["usage_type"].as_str().unwrap().to_owned(),
                quantity,
            )
        })
        .collect();
    read.sort();
    let mut want: Vec<(String, String, String, i64)> = posted
        .iter()
        .map(|e| {
            (
                meter_serve::cloudevents::event_id(AGENT, &e.customer, "//tests/serve", &e.id),
                e.customer.clone(),
                e.usage_type.to_owned(),
                e.quantity,
            )
        })
        .collect();
    want.sort();
    assert_eq!(read, want);
    let rec = drain_and_reconcile(&cfg, &ledger(&posted)).await;
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
}

/// A stalled upload is cut off at `serve.body_timeout_ms` with 408, and
/// while it holds the only `serve.max_concurrent_posts` slot, another post
/// is answered 429 before its body is read; then posts go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_408_and_posts_beyond_max_concurrent_posts_are_429() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("serveslow{}", std::process::id());
    let (config, cfg, port) = with_serve(dir.path(), &id, "max_concurrent_posts = 1\nbody_timeout_ms = 2000");
    setup(&cfg).await;
    let server = std::sync::Arc::new(Server::start(&config, port));
    let start = meter_model::time::day_floor(meter_model::now_ms()) - DAY_MS;
    let slow_body = batch(&events("s", 40, &["c-1"], start));
    assert!(slow_body.len() > 8_000);
    let slow = {
        let server = server.clone();
        std::thread::spawn(move || {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &slow_body).unwrap();
            let data = format!("@{}", file.path().display());
            let auth = format!("Authorization: Bearer {INGEST}");
            // 1 kB/s: the body would take several seconds.
            curl(
                &server.url("/v1/events"),
                &["-X", "POST", "-H", &auth, "-H", "Content-Type: application/json", "--limit-rate", "1000", "--data-binary", &data],
            )
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(700));
    let busy = post(&server, INGEST, BATCH, &batch(&events("b", 1, &["c-1"], start)));
    assert_eq!((busy.status, busy.json()["error"].as_str()), (429, Some("overloaded")), "{}", busy.body);
    assert!(busy.json()["message"].as_str().unwrap().contains("serve.max_concurrent_posts"));
    let cut = slow.join().unwrap();
    assert_eq!((cut.status, cut.json()["error"].as_str()), (408, Some("request_timeout")), "{}", cut.body);
    let after = post(&server, INGEST, BATCH, &batch(&events("a", 2, &["c-1"], start)));
    assert_eq!(after.status, 202, "{}", after.body);
    assert_eq!(topic_records(&cfg, &cfg.topics.events), 2, "only the last request produced anything");
}
