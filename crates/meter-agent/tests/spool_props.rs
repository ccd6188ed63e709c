//! Property test of the spool's guarantee under any interleaving of ticks,
//! sends, acknowledgements, failed deliveries, checkpoints, crashes and
//! torn writes: every appended event reaches "Kafka" (is acknowledged after
//! being handed out by `peek`) at least once, each customer's seqs run 1, 2, 3... without a
//! hole, a seq is never used for two different events, and the spool never
//! exceeds its size limit.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use meter_agent::spool::{Appended, Batch, Fsync, Spool, SpoolSettings};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// A tick with this many events, for customers chosen by the seeds.
    Tick(Vec<u8>),
    /// Hand out up to this many events.
    Send(u8),
    /// Kafka acknowledges up to this many of the events handed out.
    Ack(u8),
    /// A delivery failed: everything unacknowledged goes again.
    Fail,
    Checkpoint,
    /// SIGKILL: the process and its memory are gone.
    Crash,
    /// SIGKILL in the middle of a write: garbage at the end of the log.
    TornCrash(Vec<u8>),
    /// A crash that leaves `checkpoint.json` cut to this fraction (of 256)
    /// of its length: disk corruption, or a writer before this release.
    TornCheckpoint(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u8..4, 0..6).prop_map(Op::Tick),
        3 => (1u8..20).prop_map(Op::Send),
        3 => (1u8..20).prop_map(Op::Ack),
        1 => Just(Op::Fail),
        2 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Op::TornCrash),
        1 => any::<u8>().prop_map(Op::TornCheckpoint),
    ]
}

const MAX_BYTES: u64 = 16 * 1024;

fn open(dir: &Path) -> (Spool, meter_agent::spool::Recovered) {
    Spool::open(
        SpoolSettings { dir: dir.to_owned(), max_bytes: MAX_BYTES, segment_bytes: 4096, fsync: Fsync::Never, reserve_bytes: 0 },
        "prop",
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn nothing_appended_is_lost_and_no_seq_is_reused(ops in prop::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, rec) = open(dir.path());
        let mut seqs: HashMap<String, i64> = rec.seqs;
        // Everything appended, and everything "Kafka" received, by (customer, seq).
        let mut appended: BTreeMap<(String, i64), Vec<u8>> = BTreeMap::new();
        let mut received: BTreeMap<(String, i64), Vec<Vec<u8>>> = BTreeMap::new();
        // Handed out, not yet acknowledged, in order. Kafka has an event
        // only once it is acknowledged: a failure or a crash loses the rest.
        let mut in_flight: Vec<(u64, (String, i64), Vec<u8>)> = Vec::new();
        let mut tick_no = 0u64;
        let send = |spool: &mut Spool, n: usize, in_flight: &mut Vec<(u64, (String, i64), Vec<u8>)>| {
            for _ in 0..n {
                let Some(r) = spool.peek().unwrap() else { break };
                let key = (String::from_utf8(r.key.to_vec()).unwrap(), r.seq);
                in_flight.push((r.index, key, r.payload.to_vec()));
                spool.advance();
            }
        };
        for op in ops {
            match op {
                Op::Tick(customers) => {
                    tick_no += 1;
                    let mut batch = Batch::default();
                    batch.start(tick_no as i64, b"m");
                    let mut tentative = seqs.clone();
                    let mut events = Vec::new();
                    for (i, c) in customers.iter().enumerate() {
                        let customer = format!("c{c}");
                        let s = tentative.entry(customer.clone()).or_insert(0);
                        *s += 1;
                        let payload = format!("tick {tick_no} event {i} {}", "x".repeat(i * 40)).into_bytes();
                        batch.push(*s, customer.as_bytes(), &payload);
                        events.push(((customer, *s), payload));
                    }
                    if spool.append(&mut batch).unwrap() == Appended::Kept {
                        seqs = tentative;
                        appended.extend(events);
                    }
                }
                Op::Send(n) => send(&mut spool, n.into(), &mut in_flight),
                Op::Ack(n) => {
                    let n = usize::from(n).min(in_flight.len());
                    if n > 0 {
                        spool.ack(in_flight[n - 1].0);
                        for (_, key, payload) in in_flight.drain(..n) {
                            received.entry(key).or_default().push(payload);
                        }
                    }
                }
                Op::Fail => {
                    spool.rewind_to_acked().unwrap();
                    in_flight.clear();
                }
                Op::Checkpoint => spool.checkpoint(&seqs, Some(tick_no as i64)).unwrap(),
                Op::Crash | Op::TornCrash(_) | Op::TornCheckpoint(_) => {
                    drop(spool);
                    if let Op::TornCheckpoint(fraction) = &op {
                        let path = dir.path().join("checkpoint.json");
                        if let Ok(bytes) = std::fs::read(&path) {
                            std::fs::write(&path, &bytes[..bytes.len() * usize::from(*fraction) / 256]).unwrap();
                        }
                    }
                    if let Op::TornCrash(garbage) = &op {
                        let mut segs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path())
                            .filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
                        segs.sort();
                        if let Some(last) = segs.last() {
                            std::fs::OpenOptions::new().append(true).open(last).unwrap().write_all(garbage).unwrap();
                        }
                    }
                    let (s, rec) = open(dir.path());
                    spool = s;
                    // Never reuse a seq: the recovered counters cover
                    // everything appended, exactly.
                    for (c, s) in appended.keys() {
                        prop_assert!(rec.seqs.get(c).copied().unwrap_or(0) >= *s, "{c} recovered below seq {s}");
                    }
                    seqs = rec.seqs;
                    in_flight.clear();
                }
            }
            prop_assert!(spool.bytes() <= MAX_BYTES);
        }
        // Finally Kafka answers: everything still in the spool goes out.
        drop(spool);
        let (mut spool, _) = open(dir.path());
        in_flight.clear();
        send(&mut spool, usize::MAX, &mut in_flight);
        for (_, key, payload) in in_flight.drain(..) {
            received.entry(key).or_default().push(payload);
        }
        for (key, payload) in &appended {
            let got = received.get(key);
            prop_assert!(got.is_some(), "{key:?} was appended but never sent");
            prop_assert!(got.unwrap().iter().all(|p| p == payload), "{key:?} was sent with another payload: seq reused");
        }
        prop_assert_eq!(received.len(), appended.len(), "something never appended was sent");
        let mut per_customer: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (c, s) in appended.keys() {
            per_customer.entry(c).or_default().push(*s);
        }
        for (c, s) in per_customer {
            prop_assert_eq!(s.clone(), (1..=s.len() as i64).collect::<Vec<_>>(), "{} has holes", c);
        }
    }
}
