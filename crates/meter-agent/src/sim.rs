//! The deterministic fleet simulator behind `meter agent --simulate`.
//!
//! A seeded fleet of customers, each with EC2-like instances, an S3-like
//! bucket, an RDS-like database and a CloudFront-like distribution, emits one
//! event per resource and usage type per simulated second. Instances stop
//! and start (some runs are shorter than the 60-second billing minimum);
//! request and transfer volumes follow the local time of day of the region
//! or edge. The same seed and settings always produce the same events, seqs
//! and ledger. The simulator does no I/O: the runtimes publish what
//! [`Simulator::next_second`] returns.

use std::collections::HashMap;

use meter_model::ledger::Ledger;
use meter_model::{event_id, Millis, UsageEvent};

/// splitmix64: tiny, fast and stable across versions, so a seed keeps
/// meaning the same fleet forever.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub customers: usize,
    pub agent_id: String,
    /// Event time of the first simulated second.
    pub start: Millis,
    /// Simulated seconds to produce.
    pub duration_s: u64,
    /// Customer ids are `{customer_prefix}{n:04}`.
    pub customer_prefix: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { seed: 1, customers: 8, agent_id: "sim-1".into(), start: 0, duration_s: 60, customer_prefix: "cust-".into() }
    }
}

const REGIONS: &[&str] = &["us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2"];
const EDGES: &[&str] = &["edge-us", "edge-eu", "edge-ap"];
const INSTANCE_TYPES: &[&str] = &["BoxUsage:t3.micro", "BoxUsage:m5.large", "BoxUsage:c5.xlarge"];
const DB_TYPES: &[&str] = &["InstanceUsage:db.t3.medium", "InstanceUsage:db.m5.large"];
const GIB: i64 = 1 << 30;

/// Traffic by local hour of day in per mille of the daily mean (quiet at
/// night, peaks in the evening), so that CDN and S3 request windows look
/// like a real day rather than flat noise.
const DIURNAL: [i64; 24] =
    [450, 350, 300, 280, 300, 400, 600, 850, 1050, 1150, 1200, 1200, 1180, 1150, 1150, 1200, 1250, 1350, 1500, 1600, 1550, 1300, 900, 600];

/// UTC offset in hours of a region or edge (for its traffic's local time).
fn utc_offset_h(region: &str) -> i64 {
    match region {
        "us-east-1" | "edge-us" => -5,
        "us-west-2" => -8,
        "eu-west-1" => 0,
        "edge-eu" => 1,
        "ap-southeast-2" => 10,
        "edge-ap" => 8,
        _ => 0,
    }
}

/// `n` scaled by the diurnal factor of `region` at event time `t`.
fn diurnal(n: u64, region: &str, t: Millis) -> i64 {
    let hour = (t.div_euclid(3_600_000) + utc_offset_h(region)).rem_euclid(24) as usize;
    (n as i64) * DIURNAL[hour] / 1000
}

#[derive(Debug, Clone)]
enum Kind {
    Instance { usage_type: &'static str, running: bool },
    Bucket { stored_bytes: i64 },
    Database { usage_type: &'static str, storage_bytes: i64 },
    Distribution,
}

#[derive(Debug, Clone)]
struct Resource {
    customer: usize,
    resource_id: String,
    region: &'static str,
    kind: Kind,
}

pub struct Simulator {
    cfg: SimConfig,
    rng: Rng,
    customers: Vec<String>,
    resources: Vec<Resource>,
    second: u64,
    seqs: HashMap<usize, i64>,
    ledger: Ledger,
}

impl Simulator {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng(cfg.seed);
        let customers: Vec<String> = (0..cfg.customers).map(|i| format!("{}{:04}", cfg.customer_prefix, i + 1)).collect();
        let mut resources = Vec::new();
        let id = |rng: &mut Rng, prefix: &str| format!("{prefix}-{:012x}", rng.next() & 0xFFFF_FFFF_FFFF);
        for c in 0..customers.len() {
            for _ in 0..1 + rng.below(3) {
                let usage_type = rng.pick(INSTANCE_TYPES);
                resources.push(Resource {
                    customer: c,
                    resource_id: id(&mut rng, "i"),
                    region: rng.pick(REGIONS),
                    kind: Kind::Instance { usage_type, running: true },
                });
            }
            resources.push(Resource {
                customer: c,
                resource_id: id(&mut rng, "bucket"),
                region: rng.pick(REGIONS),
                kind: Kind::Bucket { stored_bytes: (1 + rng.below(500) as i64) * GIB },
            });
            resources.push(Resource {
                customer: c,
                resource_id: id(&mut rng, "db"),
                region: rng.pick(REGIONS),
                kind: Kind::Database { usage_type: rng.pick(DB_TYPES), storage_bytes: (20 + rng.below(200) as i64) * GIB },
            });
            resources.push(Resource { customer: c, resource_id: id(&mut rng, "dist"), region: rng.pick(EDGES), kind: Kind::Distribution });
        }
        Simulator { cfg, rng, customers, resources, second: 0, seqs: HashMap::new(), ledger: Ledger::default() }
    }

    /// The agent id stamped on the events.
    pub fn agent_id(&self) -> &str {
        &self.cfg.agent_id
    }

    pub fn customers(&self) -> &[String] {
        &self.customers
    }

    /// Simulated resources (instances, buckets, databases, distributions).
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Event time of the second [`Simulator::next_second`] produces next;
    /// None once the duration is done.
    pub fn next_time(&self) -> Option<Millis> {
        (self.second < self.cfg.duration_s).then(|| self.cfg.start + (self.second as i64) * 1000)
    }

    /// Events of the next simulated second, appended to `out`; false once
    /// the configured duration has been produced.
    pub fn next_second(&mut self, out: &mut Vec<UsageEvent>) -> bool {
        if self.second >= self.cfg.duration_s {
            return false;
        }
        let t = self.cfg.start + (self.second as i64) * 1000;
        self.second += 1;
        let mut usage: Vec<(usize, &'static str, &'static str, i64)> = Vec::new();
        for i in 0..self.resources.len() {
            usage.clear();
            let rng = &mut self.rng;
            let r = &mut self.resources[i];
            match &mut r.kind {
                Kind::Instance { usage_type, running } => {
                    // Instances stop and start now and then, so some runs are short.
                    if rng.chance(if *running { 500 } else { 20_000 }) {
                        *running = !*running;
                    }
                    if *running {
                        usage.push((i, "compute", usage_type, 1));
                        let out_bytes = diurnal(rng.below(2_000_000), r.region, t);
                        if out_bytes > 0 {
                            usage.push((i, "compute", "DataTransfer-Out-Bytes", out_bytes));
                        }
                    }
                }
                Kind::Bucket { stored_bytes } => {
                    let gets = diurnal(rng.below(40), r.region, t);
                    let puts = rng.below(8) as i64;
                    *stored_bytes += puts * (rng.below(4_000_000) as i64);
                    usage.push((i, "object-storage", "TimedStorage-ByteSec", *stored_bytes));
                    if gets > 0 {
                        usage.push((i, "object-storage", "Requests-GET", gets));
                        usage.push((i, "object-storage", "DataTransfer-Out-Bytes", gets * (rng.below(300_000) as i64 + 1)));
                    }
                    if puts > 0 {
                        usage.push((i, "object-storage", "Requests-PUT", puts));
                    }
                }
                Kind::Database { usage_type, storage_bytes } => {
                    usage.push((i, "database", usage_type, 1));
                    usage.push((i, "database", "StorageUsage-ByteSec", *storage_bytes));
                }
                Kind::Distribution => {
                    let requests = diurnal(rng.below(500), r.region, t);
                    if requests > 0 {
                        usage.push((i, "cdn", "Requests-HTTPS", requests));
                        usage.push((i, "cdn", "DataTransfer-Out-Bytes", requests * (rng.below(100_000) as i64 + 200)));
                    }
                }
            }
            for &(ri, service, usage_type, quantity) in &usage {
                let r = &self.resources[ri];
                let seq = self.seqs.entry(r.customer).or_insert(0);
                *seq += 1;
                let customer_id = &self.customers[r.customer];
                self.ledger.record(customer_id, service, usage_type, r.region, t, quantity);
                out.push(UsageEvent {
                    event_id: event_id(&self.cfg.agent_id, "", customer_id, *seq),
                    agent_id: self.cfg.agent_id.clone(),
                    seq: Some(*seq),
                    customer_id: customer_id.clone(),
                    service: service.to_owned(),
                    usage_type: usage_type.to_owned(),
                    resource_id: r.resource_id.clone(),
                    region: r.region.to_owned(),
                    quantity,
                    event_time: t,
                    attributes: Default::default(),
                    // `meter agent` sets its own when it spools the event.
                    incarnation: String::new(),
                });
            }
        }
        true
    }

    /// Ground truth of everything produced so far.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter_model::catalog::Lookup;
    use meter_model::Catalog;

    fn run(cfg: SimConfig) -> (Vec<UsageEvent>, Ledger) {
        let mut sim = Simulator::new(cfg);
        let mut events = Vec::new();
        while sim.next_second(&mut events) {}
        (events, sim.ledger().clone())
    }

    #[test]
    fn same_seed_same_events_and_all_families_in_the_catalog() {
        let cfg = SimConfig { duration_s: 120, start: 1_764_000_000_000, ..SimConfig::default() };
        let (a, la) = run(cfg.clone());
        let (b, _) = run(cfg);
        assert_eq!(a, b);
        let catalog = Catalog::builtin();
        for e in &a {
            assert!(matches!(catalog.lookup(&e.service, &e.usage_type), Lookup::Known(_)), "{e:?}");
            assert!(e.quantity >= 0);
        }
        for s in ["compute", "object-storage", "database", "cdn"] {
            assert!(a.iter().any(|e| e.service == s), "no {s} events");
        }
        assert_eq!(la.event_count(), a.len() as i64);
        let total: i128 = a.iter().map(|e| i128::from(e.quantity)).sum();
        let ledger_total: i128 = la.entries.values().map(|t| t.quantity_sum).sum();
        assert_eq!(total, ledger_total);
    }

    #[test]
    fn cdn_traffic_follows_the_time_of_day() {
        let day = 1_764_000_000_000 - 1_764_000_000_000 % 86_400_000;
        let requests = |hour_utc: i64| {
            let cfg = SimConfig { duration_s: 600, start: day + hour_utc * 3_600_000, customers: 20, ..SimConfig::default() };
            let (events, _) = run(cfg);
            events.iter().filter(|e| e.usage_type == "Requests-HTTPS" && e.region == "edge-eu").map(|e| e.quantity).sum::<i64>()
        };
        // 03:00 CET is the quietest hour, 20:00 CET the busiest.
        let (night, evening) = (requests(2), requests(19));
        assert!(evening > 3 * night, "evening {evening} vs night {night}");
    }

    #[test]
    fn seqs_increase_by_one_per_customer_and_event_ids_are_unique() {
        let (events, _) = run(SimConfig { duration_s: 30, ..SimConfig::default() });
        let mut last: HashMap<&str, i64> = HashMap::new();
        for e in &events {
            let prev = last.insert(&e.customer_id, e.seq.unwrap()).unwrap_or(0);
            assert_eq!(e.seq.unwrap(), prev + 1);
        }
        let ids: std::collections::HashSet<_> = events.iter().map(|e| &e.event_id).collect();
        assert_eq!(ids.len(), events.len());
    }
}
