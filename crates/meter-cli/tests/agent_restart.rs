//! A spooled agent killed with SIGKILL mid-run and restarted on the same
//! state folder: no seq is ever reused, every second of the run arrives,
//! and after the processor's dedup ClickHouse equals the ledger to the
//! unit. Runs on the real local Kafka and ClickHouse (does not touch the
//! broker's process).

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::time::Duration;

use agent_support::*;
use meter_model::ledger::Ledger;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_with_sigkill_resumes_without_reusing_a_seq_or_losing_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("agentkill_{}", std::process::id());
    let (path, cfg) = config_file(dir.path(), &id, "");
    setup(&cfg).await;
    let state = dir.path().join("state");
    // 40 simulated minutes at 100x: about 24 s of publishing, killed three
    // times on the way.
    let sim = sim_config(21, 5, "kill-agent", 40 * 60);
    let expected = expected_ledger(&sim);
    let mut kills = 0;
    for delay_ms in [2_500u64, 1_700, 3_100] {
        let mut child = spawn_agent(&path, &state, &sim, 100.0, None);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        assert!(child.try_wait().unwrap().is_none(), "the agent ended before it was killed");
        child.kill().unwrap(); // SIGKILL: no flush, no checkpoint
        child.wait().unwrap();
        kills += 1;
    }
    let ledger_path = dir.path().join("ledger.csv");
    let last = spawn_agent(&path, &state, &sim, 100.0, Some(&ledger_path));
    let out = tokio::task::spawn_blocking(move || last.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "final agent run failed: {}", out.status);
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{summary}");
    assert!(summary.contains(" 0 dropped"), "{summary}");
    let agent_ledger = Ledger::from_csv(&std::fs::read_to_string(&ledger_path).unwrap()).unwrap();
    assert_eq!(agent_ledger, expected, "the agent's ledger covers every second of the run, before and after the kills");

    let events = read_events(&cfg);
    let (distinct, copies) = check_seqs(&events);
    eprintln!("{kills} kills: {distinct} distinct events, {copies} sent again after a kill");
    assert_eq!(distinct as i64, expected.event_count(), "every event of the run reached the topic");

    let rec = drain_and_reconcile(&cfg, &expected).await;
    eprintln!("{}", rec.summary());
    assert!(rec.mismatches.is_empty(), "{}", rec.summary());
    assert_eq!(rec.aggregated_events, expected.event_count());
}
