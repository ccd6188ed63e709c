use super::*;
use meter_model::UsageEvent;
use proptest::prelude::*;
use std::collections::HashSet;

const T0: Millis = 1_764_000_000_000 - 1_764_000_000_000 % 86_400_000; // a UTC midnight
const NOW: Millis = T0 + 2 * 86_400_000;

fn engine() -> Engine {
    Engine::new(Catalog::builtin(), Codec::new().unwrap(), EngineConfig::default())
}

fn event(seq: i64, t: Millis, q: i64) -> UsageEvent {
    UsageEvent {
        event_id: meter_model::event_id("a1", "", "c1", seq),
        agent_id: "a1".into(),
        seq: Some(seq),
        customer_id: "c1".into(),
        service: "compute".into(),
        usage_type: "BoxUsage:m5.large".into(),
        resource_id: "i-1".into(),
        region: "us-east-1".into(),
        quantity: q,
        event_time: t,
        attributes: Default::default(),
        incarnation: String::new(),
    }
}

fn encode(e: &UsageEvent) -> Vec<u8> {
    let mut buf = Vec::new();
    Codec::new().unwrap().encode_event(e, &mut buf);
    buf
}

fn feed(en: &mut Engine, e: &UsageEvent, now: Millis) -> Outcome {
    let payload = encode(e);
    en.process(Input { partition: 0, key: Some(e.customer_id.as_bytes()), payload: Some(&payload), signature: None }, now)
}

fn latest(out: &[AggregatedUsage], g: Granularity) -> Vec<&AggregatedUsage> {
    out.iter().filter(|a| a.key.granularity == g).collect()
}

#[test]
fn aggregates_into_all_three_granularities_with_revisions() {
    let mut en = engine();
    for s in 1..=120 {
        assert_eq!(feed(&mut en, &event(s, T0 + (s - 1) * 1000, 1), NOW), Outcome::Aggregated);
    }
    let out = en.flush(T0 + 200_000);
    assert_eq!(latest(&out, Granularity::Minute).len(), 2);
    let day = latest(&out, Granularity::Day)[0];
    assert_eq!((day.event_count, day.quantity_sum, day.revision, day.delta_sum), (120, 120, 1, 120));
    assert!(!day.is_final);
    feed(&mut en, &event(121, T0 + 121_000, 5), NOW);
    let out = en.flush(T0 + 201_000);
    let day = latest(&out, Granularity::Day)[0];
    assert_eq!((day.quantity_sum, day.revision, day.delta_sum), (125, 2, 5));
    assert_eq!(day.quantity_min, 1);
    assert_eq!(day.quantity_max, 5);
}

#[test]
fn duplicates_are_counted_not_aggregated() {
    let mut en = engine();
    let e = event(1, T0, 7);
    assert_eq!(feed(&mut en, &e, NOW), Outcome::Aggregated);
    assert_eq!(feed(&mut en, &e, NOW), Outcome::Duplicate);
    let out = en.flush(T0 + 1000);
    assert_eq!(latest(&out, Granularity::Hour)[0].quantity_sum, 7);
    assert_eq!(en.counters().duplicates, 1);

    let mut unsequenced = event(0, T0, 3);
    unsequenced.seq = None;
    unsequenced.event_id = "x-1".into();
    assert_eq!(feed(&mut en, &unsequenced, NOW), Outcome::Aggregated);
    assert_eq!(feed(&mut en, &unsequenced, NOW), Outcome::Duplicate);
}

#[test]
fn each_kind_of_bad_input_gets_its_reason() {
    let mut en = engine();
    let good = event(1, T0, 1);
    let reason = |o: Outcome| match o {
        Outcome::DeadLetter { reason, .. } => reason,
        other => panic!("expected a dead letter, got {other:?}"),
    };
    let cases: Vec<(UsageEvent, DeadLetterReason)> = vec![
        (UsageEvent { usage_type: "BoxUsage:z9.huge".into(), ..good.clone() }, DeadLetterReason::UnknownUsageType),
        (UsageEvent { service: "mainframe".into(), ..good.clone() }, DeadLetterReason::UnknownService),
        (UsageEvent { quantity: -5, ..good.clone() }, DeadLetterReason::NegativeQuantity),
        (UsageEvent { event_time: 0, ..good.clone() }, DeadLetterReason::InvalidTimestamp),
        (UsageEvent { event_time: -1, ..good.clone() }, DeadLetterReason::InvalidTimestamp),
        (UsageEvent { event_time: MAX_EVENT_TIME, ..good.clone() }, DeadLetterReason::InvalidTimestamp),
        (UsageEvent { event_time: NOW + 3_600_000, ..good.clone() }, DeadLetterReason::FutureTimestamp),
        (UsageEvent { region: "r".repeat(300), ..good.clone() }, DeadLetterReason::StringTooLong),
        (UsageEvent { seq: Some(0), ..good.clone() }, DeadLetterReason::InvalidSeq),
        (UsageEvent { seq: Some(-3), ..good.clone() }, DeadLetterReason::InvalidSeq),
        (UsageEvent { seq: Some(i64::MAX), ..good.clone() }, DeadLetterReason::InvalidSeq),
    ];
    for (e, want) in cases {
        let payload = encode(&e);
        let got = reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&payload), signature: None }, NOW));
        assert_eq!(got, want);
    }
    let empty_customer = UsageEvent { customer_id: String::new(), ..good.clone() };
    let payload = encode(&empty_customer);
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&payload), signature: None }, NOW)),
        DeadLetterReason::EmptyCustomerId
    );
    let payload = encode(&good);
    assert_eq!(
        reason(en.process(Input { partition: 0, key: None, payload: Some(&payload), signature: None }, NOW)),
        DeadLetterReason::MissingKey
    );
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c2"), payload: Some(&payload), signature: None }, NOW)),
        DeadLetterReason::KeyMismatch
    );
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: None, signature: None }, NOW)),
        DeadLetterReason::EmptyPayload
    );
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(b"garbage bytes"), signature: None }, NOW)),
        DeadLetterReason::BadMagic
    );
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&payload[..20]), signature: None }, NOW)),
        DeadLetterReason::MalformedAvro
    );
    let big = vec![0xC3; 70_000];
    assert_eq!(
        reason(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&big), signature: None }, NOW)),
        DeadLetterReason::OversizePayload
    );
    // Nothing bad reached a window, and the good event is still accepted.
    assert!(en.flush(T0).is_empty());
    assert_eq!(feed(&mut en, &good, NOW), Outcome::Aggregated);
    assert_eq!(en.counters().total(), 19);
    assert_eq!(en.counters().dead_lettered(), 18);
}

#[test]
fn sums_past_i64_stay_exact() {
    let mut en = engine();
    for s in 1..=4 {
        feed(&mut en, &event(s, T0 + s * 1000, i64::MAX), NOW);
    }
    let out = en.flush(T0 + 10_000);
    assert_eq!(latest(&out, Granularity::Day)[0].quantity_sum, 4 * i128::from(i64::MAX));
}

#[test]
fn windows_finalize_after_lateness_and_late_events_correct_them() {
    let mut en = engine();
    feed(&mut en, &event(1, T0 + 1_000, 10), NOW);
    en.flush(T0 + 2_000);
    // Event time moves past the first minute's end plus the allowed lateness.
    feed(&mut en, &event(2, T0 + 10 * 60_000, 1), NOW);
    let out = en.flush(T0 + 10 * 60_000);
    let first_minute: Vec<_> = out.iter().filter(|a| a.key.granularity == Granularity::Minute && a.key.window_start == T0).collect();
    assert_eq!(first_minute.len(), 1);
    assert!(first_minute[0].is_final);
    assert_eq!((first_minute[0].revision, first_minute[0].delta_sum, first_minute[0].quantity_sum), (2, 0, 10));
    // A late event for the final minute is a correction, not a drop.
    assert_eq!(feed(&mut en, &event(3, T0 + 2_000, 4), NOW), Outcome::Aggregated);
    let out = en.flush(T0 + 10 * 60_000 + 1);
    let m: Vec<_> = out.iter().filter(|a| a.key.granularity == Granularity::Minute && a.key.window_start == T0).collect();
    assert_eq!((m[0].revision, m[0].delta_sum, m[0].quantity_sum, m[0].is_final), (3, 4, 14, true));
}

#[test]
fn events_past_the_correction_horizon_are_too_late() {
    let cfg = EngineConfig { correction_horizon_ms: 3_600_000, ..EngineConfig::default() };
    let mut en = Engine::new(Catalog::builtin(), Codec::new().unwrap(), cfg);
    feed(&mut en, &event(1, T0 + 3 * 3_600_000, 1), NOW);
    en.flush(T0 + 3 * 3_600_000);
    let outcome = feed(&mut en, &event(2, T0 + 1_000, 1), NOW);
    assert!(matches!(outcome, Outcome::DeadLetter { reason: DeadLetterReason::TooLate, .. }), "{outcome:?}");
}

#[test]
fn idle_partitions_advance_with_the_wall_clock_and_finalize() {
    let mut en = engine();
    feed(&mut en, &event(1, T0 + 1_000, 1), T0 + 1_000);
    en.flush(T0 + 1_000);
    let out = en.flush(NOW);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|a| a.is_final && a.delta_sum == 0 && a.revision == 2));
    assert!(en.flush(NOW + 1).is_empty());
}

proptest! {
    /// Whatever the order and duplication of input, the highest revision of
    /// every window equals the ground truth.
    #[test]
    fn latest_revisions_equal_ground_truth(
        events in proptest::collection::vec((1i64..200, 0i64..7_200_000, 0i64..1_000_000), 1..300),
        dup_every in 2usize..6,
        flush_every in 1usize..50,
    ) {
        let mut en = engine();
        let mut truth: HashMap<WindowKey, i128> = HashMap::new();
        let mut latest: HashMap<WindowKey, (i64, i128)> = HashMap::new();
        let mut seen = HashSet::new();
        fn collect(out: Vec<AggregatedUsage>, latest: &mut HashMap<WindowKey, (i64, i128)>) -> Result<(), TestCaseError> {
            for a in out {
                let e = latest.entry(a.key.clone()).or_insert((0, 0));
                prop_assert!(a.revision > e.0);
                *e = (a.revision, a.quantity_sum);
            }
            Ok(())
        }
        for (i, (seq, dt, q)) in events.iter().enumerate() {
            // The same seq always carries the same payload.
            let e = event(*seq, T0 + dt % 7_200_000 + seq, (q + seq) % 1_000_000);
            let e = UsageEvent { event_time: T0 + (seq * 36_000), ..e };
            let copies = if i % dup_every == 0 { 2 } else { 1 };
            for _ in 0..copies {
                let o = feed(&mut en, &e, NOW);
                if seen.insert(*seq) {
                    prop_assert_eq!(o, Outcome::Aggregated);
                    for g in Granularity::ALL {
                        let k = WindowKey { granularity: g, window_start: g.window_start(e.event_time), customer_id: "c1".into(), service: "compute".into(), usage_type: "BoxUsage:m5.large".into(), region: "us-east-1".into(), resource_id: "i-1".into() };
                        *truth.entry(k).or_default() += i128::from(e.quantity);
                    }
                } else {
                    prop_assert_eq!(o, Outcome::Duplicate);
                }
            }
            if i % flush_every == 0 {
                collect(en.flush(T0 + 1), &mut latest)?;
            }
        }
        collect(en.flush(NOW), &mut latest)?;
        let latest: HashMap<WindowKey, i128> = latest.into_iter().map(|(k, (_, s))| (k, s)).collect();
        prop_assert_eq!(latest, truth);
    }
}

/// Replays the changelog the way a restoring instance sees it after
/// compaction: the latest value per key, tombstones removing keys.
fn compacted(log: &[StateChange]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut m: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
    for c in log {
        m.insert(c.key.clone(), c.value.clone());
    }
    m.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
}

proptest! {
    /// An instance restored from the changelog at any commit point continues
    /// exactly like the instance that wrote it: same revisions, same
    /// duplicate decisions.
    #[test]
    fn restored_state_continues_identically(
        events in proptest::collection::vec((1i64..120, 0i64..7_200_000, 0i64..1_000), 2..200),
        cut in 0usize..200,
        unsequenced_every in 3usize..9,
    ) {
        let cut = cut % events.len();
        let mut original = engine();
        let mut log = Vec::new();
        let make = |i: usize, (seq, dt, q): (i64, i64, i64)| {
            let mut e = event(seq, T0 + dt, q + seq);
            e.event_time = T0 + seq * 60_000 + dt % 1000;
            if i.is_multiple_of(unsequenced_every) {
                e.seq = None;
                e.event_id = format!("u-{seq}");
            }
            e
        };
        for (i, ev) in events.iter().take(cut).enumerate() {
            feed(&mut original, &make(i, *ev), NOW);
            if i % 7 == 0 {
                original.flush(T0 + i as i64 * 1000);
                log.extend(original.take_changes());
            }
        }
        original.flush(T0 + cut as i64 * 1000);
        log.extend(original.take_changes());

        let mut restored = engine();
        for (k, v) in compacted(&log) {
            restored.restore(0, &k, Some(&v), NOW).unwrap();
        }
        for (i, ev) in events.iter().enumerate().skip(cut) {
            let e = make(i, *ev);
            prop_assert_eq!(feed(&mut original, &e, NOW), feed(&mut restored, &e, NOW));
            if i % 5 == 0 {
                let now = T0 + i as i64 * 1000;
                let mut a = original.flush(now);
                let mut b = restored.flush(now);
                a.sort_by(|x, y| x.key.cmp(&y.key));
                b.sort_by(|x, y| x.key.cmp(&y.key));
                prop_assert_eq!(a, b);
            }
        }
        let mut a = original.flush(NOW);
        let mut b = restored.flush(NOW);
        a.sort_by(|x, y| x.key.cmp(&y.key));
        b.sort_by(|x, y| x.key.cmp(&y.key));
        prop_assert_eq!(a, b);
    }
}

#[test]
fn evicted_windows_leave_tombstones() {
    let cfg = EngineConfig { correction_horizon_ms: 3_600_000, ..EngineConfig::default() };
    let mut en = Engine::new(Catalog::builtin(), Codec::new().unwrap(), cfg);
    feed(&mut en, &event(1, T0 + 1_000, 1), T0 + 1_000);
    en.flush(T0 + 2_000);
    let first = en.take_changes();
    assert!(first.iter().all(|c| c.value.is_some()));
    en.flush(NOW);
    let later = en.take_changes();
    assert_eq!(later.iter().filter(|c| c.value.is_none()).count(), 3, "minute, hour and day windows expire");
    assert_eq!(en.open_windows(), 0);
}

#[test]
fn drained_once_idle_and_closed_windows_are_final_while_today_stays_open() {
    let mut en = engine();
    // An event two hours before "now": its minute and hour close, its day does not.
    let now = T0 + 12 * 3_600_000;
    feed(&mut en, &event(1, now - 7_200_000, 1), now);
    en.flush(now);
    assert!(!en.drained(), "the partition is not idle yet");
    let later = now + 11_000;
    let out = en.flush(later);
    assert!(en.drained());
    assert_eq!(out.iter().filter(|a| a.is_final).count(), 2, "minute and hour final");
    assert_eq!(en.unsettled_windows(), 1, "the day window stays open");
    feed(&mut en, &event(2, now - 7_200_000, 1), later);
    assert!(!en.drained());
}

#[test]
fn same_event_id_with_another_payload_is_a_conflict_and_survives_restore() {
    let mut en = engine();
    let mut e = event(0, T0 + 1_000, 5);
    e.seq = None;
    e.event_id = "ext-42".into();
    assert_eq!(feed(&mut en, &e, NOW), Outcome::Aggregated);
    assert_eq!(feed(&mut en, &e, NOW), Outcome::Duplicate);
    let other = UsageEvent { quantity: 6, ..e.clone() };
    assert!(matches!(feed(&mut en, &other, NOW), Outcome::DeadLetter { reason: DeadLetterReason::EventIdConflict, .. }));
    en.flush(T0 + 2_000);
    let log = en.take_changes();
    let mut restored = engine();
    for (k, v) in compacted(&log) {
        restored.restore(0, &k, Some(&v), NOW).unwrap();
    }
    assert_eq!(feed(&mut restored, &e, NOW), Outcome::Duplicate);
    assert!(matches!(feed(&mut restored, &other, NOW), Outcome::DeadLetter { reason: DeadLetterReason::EventIdConflict, .. }));
}

#[test]
fn unregistered_agents_are_dead_lettered_without_touching_totals_or_dedup_state() {
    let mut agents = std::collections::BTreeMap::new();
    agents.insert("a1".to_owned(), vec!["c1".to_owned()]);
    let cfg = EngineConfig { agents: AgentRegistry::new(&agents), ..EngineConfig::default() };
    let mut en = Engine::new(Catalog::builtin(), Codec::new().unwrap(), cfg);
    assert_eq!(feed(&mut en, &event(1, T0, 10), NOW), Outcome::Aggregated);
    // Another agent claiming c1's usage, with a seq a1 has not used yet.
    let intruder = UsageEvent { agent_id: "a2".into(), event_id: meter_model::event_id("a2", "", "c1", 2), ..event(2, T0 + 1000, 1000) };
    let Outcome::DeadLetter { reason, detail } = feed(&mut en, &intruder, NOW) else { panic!("intruder aggregated") };
    assert_eq!((reason, detail.as_str()), (DeadLetterReason::Unauthorized, "agent \"a2\" is not registered"));
    // a1 publishing for a customer it is not registered for.
    let other = UsageEvent { customer_id: "c2".into(), ..event(3, T0 + 2000, 1000) };
    assert!(matches!(feed(&mut en, &other, NOW), Outcome::DeadLetter { reason: DeadLetterReason::Unauthorized, .. }));
    assert_eq!(en.dedup_streams(), 1, "refused events leave no dedup state");
    // a1's own next seq is still accepted: nothing was consumed by the refusals.
    assert_eq!(feed(&mut en, &event(2, T0 + 3000, 5), NOW), Outcome::Aggregated);
    let out = en.flush(T0 + 120_000);
    let day = latest(&out, Granularity::Day)[0];
    assert_eq!((day.key.customer_id.as_str(), day.quantity_sum, day.event_count), ("c1", 15, 2));
    assert_eq!(out.iter().filter(|a| a.key.customer_id == "c2").count(), 0);
    assert_eq!(en.counters().dead_letters.get(&DeadLetterReason::Unauthorized), Some(&2));
}

#[test]
fn interning_tables_are_rebuilt_once_windows_expire_and_keys_stay_right() {
    let cfg = EngineConfig { correction_horizon_ms: 3_600_000, ..EngineConfig::default() };
    let mut en = Engine::new(Catalog::builtin(), Codec::new().unwrap(), cfg);
    let customer_event = |c: usize, seq: i64, t: Millis| UsageEvent {
        event_id: meter_model::event_id("a1", "", &format!("c{c}"), seq),
        customer_id: format!("c{c}"),
        ..event(seq, t, c as i64)
    };
    let n = 2 * MIN_GC_SERIES;
    for c in 0..n {
        assert_eq!(feed(&mut en, &customer_event(c, 1, T0 + 1_000), T0 + 1_000), Outcome::Aggregated);
    }
    en.flush(T0 + 2_000);
    // Everything is final and past the horizon: windows expire, and the
    // tables of their series are rebuilt without them.
    en.flush(NOW);
    assert_eq!(en.open_windows(), 0);
    assert!(en.series_keys.len() < MIN_GC_SERIES, "{} series kept", en.series_keys.len());
    // Dedup streams survive the rebuild under their new ids.
    assert_eq!(feed(&mut en, &customer_event(7, 1, NOW - 1_000), NOW), Outcome::Duplicate);
    assert_eq!(feed(&mut en, &customer_event(7, 2, NOW - 1_000), NOW), Outcome::Aggregated);
    let out = en.flush(NOW);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|a| a.key.customer_id == "c7" && a.quantity_sum == 7 && a.key.region == "us-east-1"));
}

/// A producer that does not follow the key contract would split a
/// customer's windows across two partitions (two instances, two sets of
/// windows under one record key: consumers keep the higher revision and
/// lose the other's usage). Records off their key's partition are
/// dead-lettered before they touch any state.
#[test]
fn a_record_off_its_keys_partition_is_dead_lettered_before_dedup() {
    let mut en = engine();
    en.set_partitions(6);
    let e = event(1, T0, 7);
    let payload = encode(&e);
    let right = Partitioner::Murmur2.partition(b"c1", 6);
    let wrong = (right + 1) % 6;
    let outcome = en.process(Input { partition: wrong, key: Some(b"c1"), payload: Some(&payload), signature: None }, NOW);
    assert!(
        matches!(&outcome, Outcome::DeadLetter { reason: DeadLetterReason::WrongPartition, detail } if detail.contains(&format!("partition {right} of 6"))),
        "{outcome:?}"
    );
    // Nothing was remembered: the same seq on the right partition counts.
    assert_eq!(
        en.process(Input { partition: right, key: Some(b"c1"), payload: Some(&payload), signature: None }, NOW),
        Outcome::Aggregated
    );
    assert_eq!(en.counters().dead_letters.get(&DeadLetterReason::WrongPartition), Some(&1));
    // Engines that were not told the partition count do not check.
    let mut unchecked = engine();
    assert_eq!(
        unchecked.process(Input { partition: wrong, key: Some(b"c1"), payload: Some(&payload), signature: None }, NOW),
        Outcome::Aggregated
    );
}

#[test]
fn legacy_and_resolved_records_are_counted_and_aggregate_like_current_ones() {
    let mut en = engine();
    let e = event(1, T0, 7);
    let current = encode(&e);
    let mut legacy = vec![0xC3, 0x01];
    // Deployed agents write version 1 (no incarnation) under it.
    legacy
        .extend_from_slice(&meter_avro::framing::legacy_fingerprint("UsageEvent", meter_avro::USAGE_EVENT_V1_AVSC).unwrap().to_le_bytes());
    legacy.extend_from_slice(&current[10..current.len() - 1]);
    assert_eq!(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&legacy), signature: None }, NOW), Outcome::Aggregated);
    // The same event under the current fingerprint is its duplicate.
    assert_eq!(en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&current), signature: None }, NOW), Outcome::Duplicate);
    assert_eq!(en.counters().legacy_fingerprint, 1);
    let mut strict = Codec::new().unwrap();
    strict.events_mut().set_accept_legacy(false);
    let mut en = Engine::new(Catalog::builtin(), strict, EngineConfig::default());
    let outcome = en.process(Input { partition: 0, key: Some(b"c1"), payload: Some(&legacy), signature: None }, NOW);
    assert!(matches!(outcome, Outcome::DeadLetter { reason: DeadLetterReason::UnknownSchema, .. }), "{outcome:?}");
}

fn of(incarnation: &str, seq: i64, t: Millis, q: i64) -> UsageEvent {
    UsageEvent { incarnation: incarnation.into(), event_id: meter_model::event_id("a1", incarnation, "c1", seq), ..event(seq, t, q) }
}

fn feed_signed(en: &mut Engine, e: &UsageEvent, key: Option<&meter_model::signing::Key>) -> Outcome {
    let payload = encode(e);
    let sig = key.map(|k| k.sign(&payload));
    en.process(
        Input { partition: 0, key: Some(e.customer_id.as_bytes()), payload: Some(&payload), signature: sig.as_deref().map(str::as_bytes) },
        NOW,
    )
}

fn day_sum(en: &mut Engine, now: Millis) -> i128 {
    en.flush(now).iter().filter(|a| a.key.granularity == Granularity::Day).map(|a| a.quantity_sum).sum()
}

/// Two hosts with one agent id (a cloned image): their seqs collide, but
/// their incarnations differ, so both streams count. Without incarnations
/// (the behaviour before) the second host's events were duplicates.
#[test]
fn two_incarnations_of_one_agent_id_are_separate_streams() {
    let mut en = engine();
    for s in 1..=100 {
        assert_eq!(feed(&mut en, &of("aaaaaaaaaaaaaaaa", s, T0 + s * 1000, 1), NOW), Outcome::Aggregated);
        assert_eq!(feed(&mut en, &of("bbbbbbbbbbbbbbbb", s, T0 + s * 1000, 10), NOW), Outcome::Aggregated);
    }
    // Retries are still duplicates, per incarnation.
    assert_eq!(feed(&mut en, &of("aaaaaaaaaaaaaaaa", 50, T0 + 50_000, 1), NOW), Outcome::Duplicate);
    assert_eq!(day_sum(&mut en, T0 + 200_000), 1100);
    assert_eq!(en.dedup_streams(), 2);
    // Both event-time ranges overlap: reported once as a shared agent id.
    assert!(en.counters().incarnation_overlaps > 0);
    let shared = en.take_shared_identities();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0].agent_id, "a1");
    assert!(en.take_shared_identities().is_empty());

    // The same events without incarnations: the second host's are lost.
    let mut old = engine();
    for s in 1..=100 {
        feed(&mut old, &of("", s, T0 + s * 1000, 1), NOW);
        assert_eq!(feed(&mut old, &UsageEvent { quantity: 10, ..of("", s, T0 + s * 1000, 1) }, NOW), Outcome::Duplicate);
    }
    assert_eq!(day_sum(&mut old, T0 + 200_000), 100);
    assert_eq!(old.counters().without_incarnation, 200);
}

/// A host that moves to a new incarnation (state dir found on another
/// machine) sends its spooled events of the old one after the new ones
/// start: one after the other in event time, not an overlap.
#[test]
fn a_renewed_incarnation_is_not_reported_as_shared() {
    let mut en = engine();
    for s in 1..=300 {
        feed(&mut en, &of("aaaaaaaaaaaaaaaa", s, T0 + s * 1000, 1), NOW);
    }
    for s in 301..=600 {
        feed(&mut en, &of("bbbbbbbbbbbbbbbb", s, T0 + s * 1000, 1), NOW);
        // The old incarnation's spool tail, sent again, interleaved.
        feed(&mut en, &of("aaaaaaaaaaaaaaaa", s - 300, T0 + (s - 300) * 1000, 1), NOW);
    }
    assert_eq!(en.counters().incarnation_overlaps, 0);
    assert!(en.take_shared_identities().is_empty());
    assert_eq!(day_sum(&mut en, T0 + 700_000), 600);
}

/// A forger claims an enrolled agent's id with a high seq: dead-lettered as
/// `bad_signature` before dedup, so the agent's own events still count.
#[test]
fn a_forged_event_under_an_enrolled_agent_id_is_dead_lettered_and_the_victim_stays_exact() {
    use meter_model::signing::Key;
    let key = Key::new("a1.k1", "00112233445566778899aabbccddeeff").unwrap();
    let next = Key::new("a1.k2", "102132435465768798a9bacbdcedfe0f").unwrap();
    let forger = Key::new("a1.k1", "ffffffffffffffffffffffffffffffff").unwrap();
    let keys = AgentKeys::from_toml(
        "[agents.\"a1\"]\n\"a1.k1\" = \"00112233445566778899aabbccddeeff\"\n\"a1.k2\" = \"102132435465768798a9bacbdcedfe0f\"\n",
    )
    .unwrap();
    let mut en = Engine::new(Catalog::builtin(), Codec::new().unwrap(), EngineConfig { keys: Arc::new(keys), ..EngineConfig::default() });
    let inc = "aaaaaaaaaaaaaaaa";
    for (forged, k) in [(None, None), (Some(&forger), None), (Some(&key), Some("x"))] {
        let e = of(inc, i64::MAX - 1, T0 + 1000, 1_000_000);
        let e = if k.is_some() { UsageEvent { customer_id: "c1".into(), ..e } } else { e };
        let payload = encode(&e);
        let mut sig = forged.map(|f| f.sign(&payload));
        if k.is_some() {
            // A valid signature of other bytes.
            sig = Some(key.sign(b"something else"));
        }
        let o = en
            .process(Input { partition: 0, key: Some(b"c1"), payload: Some(&payload), signature: sig.as_deref().map(str::as_bytes) }, NOW);
        assert!(matches!(o, Outcome::DeadLetter { reason: DeadLetterReason::BadSignature, .. }), "{o:?}");
    }
    assert_eq!(en.dedup_streams(), 0, "dedup state untouched");
    // The agent's own events, signed with either key of the rotation.
    for s in 1..=10 {
        let k = if s % 2 == 0 { &key } else { &next };
        assert_eq!(feed_signed(&mut en, &of(inc, s, T0 + s * 1000, 3), Some(k)), Outcome::Aggregated);
    }
    assert_eq!(day_sum(&mut en, T0 + 100_000), 30);
    // Agents without keys: accepted and counted, unless switched off.
    let other = UsageEvent { agent_id: "a2".into(), ..of(inc, 1, T0 + 1000, 1) };
    assert_eq!(feed_signed(&mut en, &other, None), Outcome::Aggregated);
    assert_eq!(en.counters().unsigned, 1);
    let mut strict = Engine::new(
        Catalog::builtin(),
        Codec::new().unwrap(),
        EngineConfig { accept_unsigned: false, accept_no_incarnation: false, ..EngineConfig::default() },
    );
    let o = feed_signed(&mut strict, &other, None);
    assert!(matches!(o, Outcome::DeadLetter { reason: DeadLetterReason::BadSignature, .. }), "{o:?}");
    let o = feed(&mut strict, &of("", 1, T0 + 1000, 1), NOW);
    assert!(matches!(o, Outcome::DeadLetter { reason: DeadLetterReason::InvalidIdentity, .. }), "{o:?}");
    // A separator smuggled into an id cannot alias another stream.
    let smuggled = UsageEvent { agent_id: format!("a1{}{inc}", meter_model::identity::SEPARATOR), ..of("", 1, T0 + 1000, 1) };
    let o = feed(&mut en, &smuggled, NOW);
    assert!(matches!(o, Outcome::DeadLetter { reason: DeadLetterReason::InvalidIdentity, .. }), "{o:?}");
}
