//! A full spool: with Kafka unreachable and a small spool, the agent keeps
//! running, drops whole ticks, counts them and gives their seqs back; the
//! next start (Kafka reachable) sends exactly what was kept, with seqs
//! 1, 2, 3... per customer, and its ledger leaves out what was dropped,
//! even though the dropping happened in the previous process.

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::time::Duration;

use agent_support::*;
use meter_agent::{run_agent, AgentMetrics, Simulator, Source};
use meter_avro::Codec;
use meter_kafka::Signal;
use meter_model::ledger::Ledger;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_counted_ticks_without_seq_holes_and_the_ledger_knows() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("agentfull_{}", std::process::id());
    let extra = "spool_max_bytes = 65536\nspool_segment_bytes = 16384\ndelivery_timeout_ms = 1000\nshutdown_timeout_ms = 1000";
    let (_, cfg) = config_file(dir.path(), &id, extra);
    setup(&cfg).await;
    let state = dir.path().join("state");
    let sim = sim_config(5, 3, "full-agent", 120);
    let identity = "simulator full-agent";

    // 1. Kafka unreachable: everything goes to the spool until it is full.
    let mut down = cfg.clone().into_inner();
    down.kafka.brokers = "127.0.0.1:9".into();
    let down = down.validate().unwrap();
    let stats = AgentMetrics::unserved();
    let shutdown = Signal::default();
    let watcher = tokio::spawn({
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        async move {
            while stats.ticks.get() < 120 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            shutdown.raise();
        }
    });
    let source = Source::Simulated { sim: Box::new(Simulator::new(sim.clone())), speed: 0.0 };
    let first = run_agent(&down, &state, identity, source, stats.clone(), shutdown, true).await.unwrap();
    watcher.await.unwrap();
    let g = |c: &prometheus::IntCounter| c.get();
    eprintln!("first run: {}", stats.summary());
    assert!(!first.drained);
    assert!(g(&stats.dropped) > 0, "the spool never filled");
    assert!(g(&stats.spooled) > 0);
    assert_eq!(g(&stats.spooled) + g(&stats.dropped), g(&stats.generated), "every event is either kept or counted as dropped");
    assert_eq!(g(&stats.produced), 0);
    assert!(stats.spool_bytes.get() <= 65536);
    let kept = first.ledger.unwrap();
    assert_eq!(kept.event_count() as u64, g(&stats.spooled));

    // 2. Kafka is back: a new process sends what was kept and ends.
    let stats2 = AgentMetrics::unserved();
    let source = Source::Simulated { sim: Box::new(Simulator::new(sim.clone())), speed: 0.0 };
    let second =
        tokio::time::timeout(Duration::from_secs(120), run_agent(&cfg, &state, identity, source, stats2.clone(), Signal::default(), true))
            .await
            .expect("the second run drains")
            .unwrap();
    eprintln!("second run: {}", stats2.summary());
    assert!(second.drained);
    assert_eq!(g(&stats2.generated), 0, "the simulator resumed after the last tick of the first run");
    assert_eq!(g(&stats2.produced), g(&stats.spooled));
    assert_eq!(second.ledger.unwrap(), kept, "the drops of the first process are left out of the ledger");

    let events = read_events(&cfg);
    let (distinct, _) = check_seqs(&events);
    assert_eq!(distinct as u64, g(&stats.spooled));
    let codec = Codec::new().unwrap();
    let mut on_topic = Ledger::default();
    for payloads in events.values() {
        let e = codec.decode_event(&payloads[0]).unwrap();
        on_topic.record(&e.customer_id, &e.service, &e.usage_type, &e.region, e.event_time, e.quantity);
    }
    assert_eq!(on_topic, kept);
}
