//! Engine throughput and state size: decode + validate + dedup + window
//! aggregation over pre-encoded `UsageEvent` payloads, for 1k, 100k and 1M
//! active keys, in process (no broker).
//!
//! An *active key* is one aggregation key (customer, service, usage type,
//! region) that has received events in the current minute, so it holds a
//! minute, an hour and a day window. Every 16 keys share one customer and
//! one agent, i.e. one dedup stream (agent, customer). Each key emits one
//! event per simulated second with the next seq of its stream.
//!
//! Each timed iteration starts from a fresh engine that has already seen one
//! event per key (untimed), so the timed events update existing windows and
//! streams the way a running processor does; `process+commit` also flushes
//! and takes the changelog entries every 500k events (see `COMMIT_EVERY`).
//!
//! State size is measured with a counting global allocator (`stats_alloc`:
//! the workspace forbids `unsafe_code`, and implementing `GlobalAlloc`
//! needs it, so the counting lives in that crate): the bytes the engine holds
//! after one event per key and a flush, divided by the number of keys and by
//! the number of open windows. It is printed before the timings, e.g.
//!
//! ```text
//! state 100000 keys: 12345678 bytes = 123.4 bytes/key (300000 windows, 41.1 bytes/window)
//! ```
//!
//! Run: `cargo bench -p meter-engine --bench engine`
//! (`-- --quick` style filters work, e.g. `-- 100k`).

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use meter_avro::Codec;
use meter_engine::{Engine, EngineConfig, Input, Outcome};
use meter_model::{Catalog, Millis, UsageEvent};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A UTC midnight; all events fall in its first hour.
const T0: Millis = 1_764_028_800_000;
/// Keys per customer (and per agent): the (usage type, region) pairs below.
const KEYS_PER_CUSTOMER: usize = 16;
const TYPES: [(&str, &str); 4] = [
    ("compute", "BoxUsage:m5.large"),
    ("compute", "DataTransfer-Out-Bytes"),
    ("object-storage", "Requests-GET"),
    ("cdn", "Requests-HTTPS"),
];
const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "ap-southeast-2", "sa-east-1"];
/// Events per commit in `process+commit`: a 1 s commit interval at 500k
/// events/s, or 0.5 s at the 1M events/s target. With 100k keys each
/// commit then emits about 300k revisions (every key's three windows).
const COMMIT_EVERY: usize = 500_000;

/// Encoded events, back to back, with the customer id (the record key) of each.
struct Payloads {
    bytes: Vec<u8>,
    /// (start, end) of payload i in `bytes`, and the key's (start, end).
    spans: Vec<(u32, u32, u32, u32)>,
    /// The signature header of payload i, when signed.
    signatures: Vec<String>,
}

impl Payloads {
    fn get(&self, i: usize) -> (&[u8], &[u8]) {
        let (ps, pe, ks, ke) = self.spans[i];
        (&self.bytes[ps as usize..pe as usize], &self.bytes[ks as usize..ke as usize])
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn signature(&self, i: usize) -> Option<&[u8]> {
        self.signatures.get(i).map(|s| s.as_bytes())
    }
}

/// How the events identify their agent: as version-1 agents do (no
/// incarnation, unsigned), with an incarnation, or also signed (and every
/// agent enrolled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ident {
    V1,
    Incarnation,
    Signed,
}

/// The benchmark's key of an agent (not a real secret).
fn agent_key(agent_id: &str) -> meter_model::signing::Key {
    meter_model::signing::Key::new(&format!("{agent_id}.1"), "00112233445566778899aabbccddeeff").expect("key")
}

/// One round = one event per key, at second `round`, seq `round + 1` of
/// each key's position in its stream.
fn encode_rounds(codec: &Codec, keys: usize, rounds: std::ops::Range<usize>) -> Payloads {
    encode_rounds_as(codec, keys, rounds, Ident::V1)
}

fn encode_rounds_as(codec: &Codec, keys: usize, rounds: std::ops::Range<usize>, ident: Ident) -> Payloads {
    let incarnation = if ident == Ident::V1 { "" } else { "5f1c9a0e7d2b4c31" };
    let mut p = Payloads {
        bytes: Vec::with_capacity(keys * rounds.len() * 150),
        spans: Vec::with_capacity(keys * rounds.len()),
        signatures: Vec::new(),
    };
    for round in rounds {
        for k in 0..keys {
            let customer = k / KEYS_PER_CUSTOMER;
            let slot = k % KEYS_PER_CUSTOMER;
            let (service, usage_type) = TYPES[slot % TYPES.len()];
            let customer_id = format!("cust-{customer:07}");
            let agent_id = format!("agent-{customer:07}");
            let seq = (round * KEYS_PER_CUSTOMER + slot + 1) as i64;
            let e = UsageEvent {
                event_id: meter_model::event_id(&agent_id, incarnation, &customer_id, seq),
                agent_id,
                seq: Some(seq),
                customer_id,
                service: service.into(),
                usage_type: usage_type.into(),
                resource_id: format!("i-{k:016x}"),
                region: REGIONS[slot / TYPES.len()].into(),
                quantity: 1 + (k as i64 * 7919 + round as i64) % 1_000_000,
                event_time: T0 + round as i64 * 1000 + (k % 1000) as i64,
                attributes: Default::default(),
                incarnation: incarnation.into(),
            };
            let ps = p.bytes.len() as u32;
            codec.encode_event(&e, &mut p.bytes);
            let pe = p.bytes.len() as u32;
            if ident == Ident::Signed {
                p.signatures.push(agent_key(&e.agent_id).sign(&p.bytes[ps as usize..pe as usize]));
            }
            p.bytes.extend_from_slice(e.customer_id.as_bytes());
            p.spans.push((ps, pe, pe, p.bytes.len() as u32));
        }
    }
    p
}

/// The engine as the processor runs it, the key contract checked: with one
/// partition every key belongs on partition 0, so the check costs its hash
/// and passes.
fn engine() -> Engine {
    let mut en = Engine::new(Catalog::builtin(), Codec::new().expect("schemas parse"), EngineConfig::default());
    en.set_partitions(1);
    en
}

/// Wall-clock "now" for the engine: after all events, within the clock skew.
const NOW: Millis = T0 + 3_600_000;

fn feed(en: &mut Engine, p: &Payloads, i: usize) {
    let (payload, key) = p.get(i);
    let o = en.process(Input { partition: 0, key: Some(key), payload: Some(payload), signature: p.signature(i) }, NOW);
    debug_assert_eq!(o, Outcome::Aggregated);
    black_box(o);
}

fn feed_all(en: &mut Engine, p: &Payloads) {
    for i in 0..p.len() {
        feed(en, p, i);
    }
}

/// Timed rounds per key count: about 1M timed events each.
fn rounds_for(keys: usize) -> usize {
    (1_000_000 / keys).max(1)
}

fn label(keys: usize) -> String {
    match keys {
        k if k >= 1_000_000 => format!("{}M", k / 1_000_000),
        k if k >= 1000 => format!("{}k", k / 1000),
        k => k.to_string(),
    }
}

/// Bytes the engine holds for `keys` active keys: one event per key, then
/// a flush (its revisions and changelog entries dropped, as after a
/// commit). Also counts the allocations of a second event per key (keys
/// and streams exist by then: the steady state of a running processor).
fn state_bytes(codec: &Codec, keys: usize) {
    let warm = encode_rounds(codec, keys, 0..1);
    let steady = encode_rounds(codec, keys, 1..2);
    let region = Region::new(GLOBAL);
    let mut en = engine();
    feed_all(&mut en, &warm);
    let first = region.change();
    drop(en.flush(T0 + 1));
    drop(en.take_changes());
    let stats = region.change();
    assert_eq!(en.counters().aggregated, keys as u64, "every event is aggregated");
    // bytes_allocated includes what reallocations added, bytes_deallocated
    // what they removed.
    let held = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64;
    let windows = en.open_windows();
    let region = Region::new(GLOBAL);
    feed_all(&mut en, &steady);
    let again = region.change();
    assert_eq!(en.counters().aggregated, 2 * keys as u64, "every event is aggregated");
    println!(
        "state {keys} keys: {held} bytes = {:.1} bytes/key ({windows} windows, {:.1} bytes/window); \
         allocations per event: {:.2} for new keys, {:.2} for existing keys",
        held as f64 / keys as f64,
        held as f64 / windows as f64,
        first.allocations as f64 / keys as f64,
        (again.allocations + again.reallocations) as f64 / keys as f64,
    );
    black_box(&en);
}

fn bench_engine(c: &mut Criterion) {
    let codec = Codec::new().expect("schemas parse");
    let sizes = [1_000, 100_000, 1_000_000];
    for &keys in &sizes {
        state_bytes(&codec, keys);
    }
    let mut group = c.benchmark_group("engine");
    // Every iteration processes ~1M events: a handful of flat samples is
    // plenty and keeps the run to minutes on a shared machine.
    group.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for &keys in &sizes {
        let rounds = rounds_for(keys);
        let warm = encode_rounds(&codec, keys, 0..1);
        let timed = encode_rounds(&codec, keys, 1..1 + rounds);
        group.throughput(Throughput::Elements(timed.len() as u64));
        group.bench_with_input(BenchmarkId::new("process", label(keys)), &keys, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut en = engine();
                    feed_all(&mut en, &warm);
                    let start = Instant::now();
                    feed_all(&mut en, &timed);
                    total += start.elapsed();
                    // The timed events must all take the aggregation path.
                    assert_eq!(en.counters().aggregated, (warm.len() + timed.len()) as u64);
                    drop(en);
                }
                total
            })
        });
        if keys == 100_000 {
            group.bench_with_input(BenchmarkId::new("process+commit", label(keys)), &keys, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut en = engine();
                        feed_all(&mut en, &warm);
                        drop(en.flush(T0 + 1));
                        drop(en.take_changes());
                        let start = Instant::now();
                        for i in 0..timed.len() {
                            feed(&mut en, &timed, i);
                            if (i + 1) % COMMIT_EVERY == 0 {
                                black_box(en.flush(T0 + 1 + i as i64));
                                black_box(en.take_changes());
                            }
                        }
                        black_box(en.flush(NOW));
                        black_box(en.take_changes());
                        total += start.elapsed();
                        assert_eq!(en.counters().aggregated, (warm.len() + timed.len()) as u64);
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

/// The cost of agent identity at 100k keys (6,250 agents), in one
/// invocation so that the ratios compare like with like: version-1 events,
/// events with an incarnation, and signed events from enrolled agents (the
/// HMAC-SHA256 verification of every record).
fn bench_identity(c: &mut Criterion) {
    let codec = Codec::new().expect("schemas parse");
    let keys = 100_000;
    let mut group = c.benchmark_group("identity");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let mut toml = String::new();
    for a in 0..keys / KEYS_PER_CUSTOMER {
        let id = format!("agent-{a:07}");
        toml.push_str(&format!("[agents.\"{id}\"]\n\"{id}.1\" = \"00112233445566778899aabbccddeeff\"\n"));
    }
    let enrolled = std::sync::Arc::new(meter_engine::AgentKeys::from_toml(&toml).expect("keys"));
    for (name, ident) in [("v1", Ident::V1), ("incarnation", Ident::Incarnation), ("signed", Ident::Signed)] {
        let warm = encode_rounds_as(&codec, keys, 0..1, ident);
        let timed = encode_rounds_as(&codec, keys, 1..1 + rounds_for(keys), ident);
        let cfg =
            EngineConfig { keys: if ident == Ident::Signed { enrolled.clone() } else { Default::default() }, ..EngineConfig::default() };
        group.throughput(Throughput::Elements(timed.len() as u64));
        group.bench_with_input(BenchmarkId::new("process", name), &keys, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut en = Engine::new(Catalog::builtin(), codec.clone(), cfg.clone());
                    en.set_partitions(1);
                    feed_all(&mut en, &warm);
                    let start = Instant::now();
                    feed_all(&mut en, &timed);
                    total += start.elapsed();
                    assert_eq!(en.counters().aggregated, (warm.len() + timed.len()) as u64);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_engine, bench_identity);
criterion_main!(benches);
