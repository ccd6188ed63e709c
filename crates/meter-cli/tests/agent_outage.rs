//! The broker is stopped for 60 s while a spooled agent publishes, then
//! started again: the agent keeps ticking into its spool, sends it in order
//! when the broker is back, and after draining ClickHouse equals the
//! agent's ledger to the unit.
//!
//! This test STOPS AND STARTS THE BROKER it is pointed at (the test name
//! contains `chaos`, like the other broker-restarting tests). It takes the
//! broker from the configuration (`METER__KAFKA__BROKERS`) and the control
//! command from `METER_TEST_KAFKA_CTL` (default: the repository's
//! `ops/kafka`, which honours `KAFKA_PORT`/`KAFKA_CONTROLLER_PORT`), so on a
//! shared machine it runs against a private broker:
//!
//! ```sh
//! KAFKA_PORT=19092 KAFKA_CONTROLLER_PORT=19093 ops/kafka start
//! KAFKA_PORT=19092 KAFKA_CONTROLLER_PORT=19093 METER__KAFKA__BROKERS=127.0.0.1:19092 \
//!     cargo test -p meter-cli --test agent_outage
//! ```
//!
//! `METER_TEST_OUTAGE_S` shortens the outage (default 60).

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::*;
use meter_model::ledger::Ledger;

/// `N label` out of the agent's summary line.
fn figure(summary: &str, label: &str) -> u64 {
    let at = summary.find(label).unwrap_or_else(|| panic!("no '{label}' in {summary}"));
    summary[..at].trim_end().rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_agent_spools_through_a_broker_outage_and_reconciles() {
    let outage = Duration::from_secs(std::env::var("METER_TEST_OUTAGE_S").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let dir = tempfile::tempdir().unwrap();
    let id = format!("agentoutage_{}", std::process::id());
    // Short delivery timeout: the outage also exercises failed deliveries
    // and the resend from the spool, not only a queue that waits.
    let (path, cfg) = config_file(dir.path(), &id, "delivery_timeout_ms = 5000\nfsync = \"always\"");
    setup(&cfg).await;
    eprintln!("broker {}", cfg.kafka.brokers);
    let state = dir.path().join("state");
    let ledger_path = dir.path().join("ledger.csv");
    // Real time: 10 s before the outage, about 30 s after it (the broker
    // takes some of them to start).
    let run_s = outage.as_secs() + 40;
    let sim = sim_config(33, 4, "outage-agent", run_s);
    let expected = expected_ledger(&sim);
    let agent = spawn_agent(&path, &state, &sim, 1.0, Some(&ledger_path));
    let started = Instant::now();

    tokio::time::sleep(Duration::from_secs(10)).await;
    let guard = BrokerBack;
    kafka_ctl("stop");
    let stopped = Instant::now();
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
    kafka_ctl("start");
    drop(guard);
    eprintln!("broker was down {:.0} s (from {:.0} s into the run)", stopped.elapsed().as_secs_f64(), (stopped - started).as_secs_f64());

    let out = tokio::task::spawn_blocking(move || agent.wait_with_output().unwrap()).await.unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{summary}");
    assert!(out.status.success(), "agent failed: {}", out.status);
    assert_eq!(figure(&summary, "dropped"), 0);
    assert!(figure(&summary, "delivery failures") > 0, "the outage did not reach the agent: {summary}");
    assert!(figure(&summary, "replayed") > 0, "nothing was sent again from the spool: {summary}");
    let agent_ledger = Ledger::from_csv(&std::fs::read_to_string(&ledger_path).unwrap()).unwrap();
    assert_eq!(agent_ledger, expected);

    let events = read_events(&cfg);
    let (distinct, copies) = check_seqs(&events);
    eprintln!("{distinct} distinct events, {copies} sent twice");
    assert_eq!(distinct as i64, expected.event_count());
    let rec = drain_and_reconcile(&cfg, &agent_ledger).await;
    eprintln!("{}", rec.summary());
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.aggregated_events, expected.event_count());
}
