//! The broker is SIGKILLed (`ops/kafka kill`) while clients post batches to
//! `meter serve`, and started again 10 s later:
//!
//! - every batch answered 202 is on the events topic, each of its events
//!   (no 202 for an event the broker did not acknowledge);
//! - the batches in flight during the outage are answered 503 with
//!   `Retry-After`, none 202;
//! - once the clients have retried those, ClickHouse and the aggregates
//!   topic equal the ledger of the distinct events to the unit (whatever
//!   the broker had taken of a 503'd batch is counted once).
//!
//! This test KILLS AND STARTS THE BROKER it is pointed at (the test name
//! contains `chaos`, like the other broker-restarting tests; its own test
//! binary, so no other test runs beside it). See `agent_outage.rs` for
//! running it against a private broker (`METER__KAFKA__BROKERS`,
//! `METER_TEST_KAFKA_CTL`).

#![allow(clippy::unwrap_used)]

mod agent_support;
mod serve_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::*;
use serve_support::*;

/// (batch, status, Retry-After) of an answer.
type Answered = (usize, u16, Option<String>);

const BATCHES: usize = 60;
const PER_BATCH: usize = 50;

/// The event ids on the events topic (see `meter_serve::cloudevents::event_id`).
fn event_ids_on_topic(cfg: &meter_config::Config) -> HashSet<String> {
    let codec = meter_avro::Codec::new().unwrap();
    event_records(cfg).into_iter().map(|(_, payload)| codec.decode_event(&payload).unwrap().event_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_serve_answers_202_only_for_what_the_broker_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("servebroker{}", std::process::id());
    let (path, _) = config_file(dir.path(), &id, "");
    let port = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&serve_section(port, "delivery_timeout_ms = 3000\nretry_after_s = 2"));
    std::fs::write(&path, text).unwrap();
    let cfg = meter_config::Config::load(Some(&path)).unwrap();
    setup(&cfg).await;
    let server = Arc::new(Server::start(&path, port));

    let start = meter_model::time::day_floor(meter_model::now_ms()) - DAY_MS;
    let all = events("k", BATCHES * PER_BATCH, &["c-1", "c-2"], start);
    let batches: Vec<Vec<Usage>> = all.chunks(PER_BATCH).map(<[Usage]>::to_vec).collect();
    // (batch, status, Retry-After) of every first attempt, in order.
    let answers: Arc<Mutex<Vec<Answered>>> = Arc::default();
    let poster = {
        let (server, answers, batches) = (server.clone(), answers.clone(), batches.clone());
        std::thread::spawn(move || {
            for (i, b) in batches.iter().enumerate() {
                let a = post(&server, INGEST, "application/cloudevents-batch+json", &batch(b));
                answers.lock().unwrap().push((i, a.status, a.header("retry-after")));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let answered = || answers.lock().unwrap().len();
    while answered() < 5 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let guard = BrokerBack;
    kafka_ctl("kill");
    let killed_after = answered();
    std::thread::sleep(Duration::from_secs(10));
    kafka_ctl("start");
    drop(guard);
    tokio::task::spawn_blocking(move || poster.join().unwrap()).await.unwrap();

    let answers = answers.lock().unwrap().clone();
    let accepted: Vec<usize> = answers.iter().filter(|a| a.1 == 202).map(|a| a.0).collect();
    let refused: Vec<&Answered> = answers.iter().filter(|a| a.1 != 202).collect();
    eprintln!(
        "killed after {killed_after} answers; {} batches answered 202, {} not: {:?}",
        accepted.len(),
        refused.len(),
        refused.iter().map(|a| a.1).collect::<Vec<_>>()
    );
    assert!(!refused.is_empty(), "the outage did not reach the server");
    for (i, status, retry_after) in &refused {
        assert_eq!(*status, 503, "batch {i}");
        assert_eq!(retry_after.as_deref(), Some("2"), "batch {i}");
    }
    let on_topic = event_ids_on_topic(&cfg);
    for i in &accepted {
        for e in &batches[*i] {
            assert!(
                on_topic.contains(&meter_serve::cloudevents::event_id(AGENT, &e.customer, "//tests/serve", &e.id)),
                "batch {i} was answered 202 but {} is not on the topic",
                e.id
            );
        }
    }
    let partly = refused
        .iter()
        .filter(|(i, ..)| {
            batches[*i].iter().any(|e| on_topic.contains(&meter_serve::cloudevents::event_id(AGENT, &e.customer, "//tests/serve", &e.id)))
        })
        .count();
    eprintln!("{partly} of the 503'd batches were partly or wholly on the topic already");

    // The clients retry what was not accepted.
    for (i, ..) in &refused {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let a = post(&server, INGEST, "application/cloudevents-batch+json", &batch(&batches[*i]));
            if a.status == 202 {
                break;
            }
            assert!(Instant::now() < deadline, "batch {i} still refused after the broker came back: {} {}", a.status, a.body);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let rec = drain_and_reconcile(&cfg, &ledger(&all)).await;
    eprintln!("{}", rec.summary());
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.events, all.len() as i64);
}
