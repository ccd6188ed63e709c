//! A fixed workload for `valgrind --tool=callgrind`: the instructions one
//! event costs in the engine, repeatable on a busy machine (the criterion
//! benchmark measures time). `process_all` is the only function to collect;
//! `check` turns the key-contract check on (one partition: it always passes),
//! `incarnation` gives the events an incarnation, `signed` also enrolls every
//! agent and signs every event (the HMAC-SHA256 verification's cost):
//! `valgrind --tool=callgrind --toggle-collect='*process_all*' target/release/examples/instructions [check] [incarnation] [signed]`.
use std::hint::black_box;

use meter_avro::Codec;
use meter_engine::{AgentKeys, Engine, EngineConfig, Input};
use meter_model::signing::Key;
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

/// The secret of an agent's key (the benchmark's, not a real one).
fn key(agent_id: &str) -> Key {
    Key::new(&format!("{agent_id}.1"), "00112233445566778899aabbccddeeff").expect("key")
}

type Encoded = Vec<(Vec<u8>, Vec<u8>, Option<String>)>;

fn encode(codec: &Codec, keys: usize, round: usize, mode: &Mode) -> Encoded {
    (0..keys)
        .map(|k| {
            let customer = k / KEYS_PER_CUSTOMER;
            let slot = k % KEYS_PER_CUSTOMER;
            let (service, usage_type) = TYPES[slot % TYPES.len()];
            let customer_id = format!("cust-{customer:07}");
            let agent_id = format!("agent-{customer:07}");
            let seq = (round * KEYS_PER_CUSTOMER + slot + 1) as i64;
            let e = UsageEvent {
                event_id: meter_model::event_id(&agent_id, mode.incarnation, &customer_id, seq),
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
                incarnation: mode.incarnation.into(),
            };
            let mut p = Vec::new();
            codec.encode_event(&e, &mut p);
            let sig = mode.signed.then(|| key(&e.agent_id).sign(&p));
            (p, customer_id.into_bytes(), sig)
        })
        .collect()
}

struct Mode {
    incarnation: &'static str,
    signed: bool,
}

#[inline(never)]
fn process_all(en: &mut Engine, events: &Encoded) {
    for (p, k, sig) in events {
        let signature = sig.as_deref().map(str::as_bytes);
        black_box(en.process(Input { partition: 0, key: Some(k), payload: Some(p), signature }, T0 + 3_600_000));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    let signed = has("signed");
    let mode = Mode { incarnation: if has("incarnation") || signed { "5f1c9a0e7d2b4c31" } else { "" }, signed };
    let codec = Codec::new().expect("schemas");
    let keys = 20_000;
    let mut cfg = EngineConfig::default();
    if signed {
        let mut toml = String::new();
        for c in 0..keys / KEYS_PER_CUSTOMER {
            toml.push_str(&format!("[agents.\"agent-{c:07}\"]\n\"agent-{c:07}.1\" = \"00112233445566778899aabbccddeeff\"\n"));
        }
        cfg.keys = std::sync::Arc::new(AgentKeys::from_toml(&toml).expect("keys"));
    }
    let mut en = Engine::new(Catalog::builtin(), codec.clone(), cfg);
    if has("check") {
        en.set_partitions(1);
    }
    // Not collected: every key's windows and stream exist before.
    for (p, k, sig) in &encode(&codec, keys, 0, &mode) {
        en.process(Input { partition: 0, key: Some(k), payload: Some(p), signature: sig.as_deref().map(str::as_bytes) }, T0 + 3_600_000);
    }
    let timed: Vec<_> = (1..6).flat_map(|r| encode(&codec, keys, r, &mode)).collect();
    process_all(&mut en, &timed);
    println!("{} events, {} aggregated", timed.len(), en.counters().aggregated);
}
