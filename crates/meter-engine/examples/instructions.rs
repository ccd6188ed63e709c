//! A fixed workload for `valgrind --tool=callgrind`: the instructions one
//! event costs in the engine, repeatable on a busy machine (the criterion
//! benchmark measures time). `process_all` is the only function to collect;
//! `check` turns the key-contract check on (one partition: it always passes):
//! `valgrind --tool=callgrind --toggle-collect='*process_all*' target/release/examples/instructions [check]`.
use std::hint::black_box;

use meter_avro::Codec;
use meter_engine::{Engine, EngineConfig, Input};
use meter_model::{Catalog, Millis, UsageEvent};

const T0: Millis = 1_764_028_800_000;
const KEYS_PER_CUSTOMER: usize = 16;
const TYPES: [(&str, &str); 4] = [
    ("compute", "BoxUsage:m5.large"),
    ("compute", "DataTransfer-Out-Bytes"),
    ("object-storage", "Requests-GET"),
    ("cdn", "Requests-HTTPS"),
];
const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "ap-southeast-2", "sa-east-1"];

fn encode(codec: &Codec, keys: usize, round: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..keys)
        .map(|k| {
            let customer = k / KEYS_PER_CUSTOMER;
            let slot = k % KEYS_PER_CUSTOMER;
            let (service, usage_type) = TYPES[slot % TYPES.len()];
            let customer_id = format!("cust-{customer:07}");
            let agent_id = format!("agent-{customer:07}");
            let seq = (round * KEYS_PER_CUSTOMER + slot + 1) as i64;
            let e = UsageEvent {
                event_id: meter_model::event_id(&agent_id, &customer_id, seq),
                agent_id,
                seq: Some(seq),
                customer_id: customer_id.clone(),
                service: service.into(),
                usage_type: usage_type.into(),
                resource_id: format!("i-{k:016x}"),
                region: REGIONS[slot / TYPES.len()].into(),
                quantity: 1 + (k as i64 * 7919 + round as i64) % 1_000_000,
                event_time: T0 + round as i64 * 1000 + (k % 1000) as i64,
                attributes: Default::default(),
            };
            let mut p = Vec::new();
            codec.encode_event(&e, &mut p);
            (p, customer_id.into_bytes())
        })
        .collect()
}

#[inline(never)]
fn process_all(en: &mut Engine, events: &[(Vec<u8>, Vec<u8>)]) {
    for (p, k) in events {
        black_box(en.process(Input { partition: 0, key: Some(k), payload: Some(p) }, T0 + 3_600_000));
    }
}

fn main() {
    let codec = Codec::new().expect("schemas");
    let mut en = Engine::new(Catalog::builtin(), codec.clone(), EngineConfig::default());
    if std::env::args().nth(1).as_deref() == Some("check") {
        en.set_partitions(1);
    }
    let keys = 20_000;
    let warm = encode(&codec, keys, 0);
    for (p, k) in &warm {
        en.process(Input { partition: 0, key: Some(k), payload: Some(p) }, T0 + 3_600_000);
    }
    let timed: Vec<_> = (1..6).flat_map(|r| encode(&codec, keys, r)).collect();
    process_all(&mut en, &timed);
    println!("{} events, {} aggregated", timed.len(), en.counters().aggregated);
}
