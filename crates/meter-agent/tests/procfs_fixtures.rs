//! The /proc sampler's byte and CPU arithmetic against fixture /proc
//! folders (`tests/fixtures/proc/t{0,1,2}`): normal deltas, a network
//! counter reset, a 32-bit wrap, partitions and virtual disks left out, and
//! three seconds caught up after a stall, each with its own timestamp.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use meter_agent::procfs::{read_sample, Anomalies, HostIdentity, Sampler, SamplerSettings, Tick};

const B0: i64 = 1_764_000_000_000;

fn fixture(t: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc").join(t)
}

fn sampler(bits: u32, hz: u64) -> Sampler {
    Sampler::new(
        HostIdentity { agent_id: "host-a".into(), customer_id: "cust-9".into(), region: "eu-west-1".into(), resource_id: "host-a".into() },
        SamplerSettings { clock_ticks_per_second: hz, counter_bits: bits, max_catch_up_s: 3600 },
    )
}

/// (time, usage type, resource) -> quantity
fn table(ticks: &[Tick]) -> BTreeMap<(i64, String, String), i64> {
    let mut m = BTreeMap::new();
    for t in ticks {
        for e in &t.events {
            assert_eq!(e.event_time, t.time);
            assert_eq!((e.service.as_str(), e.customer_id.as_str(), e.region.as_str()), ("host", "cust-9", "eu-west-1"));
            assert!(
                m.insert((t.time - B0, e.usage_type.clone(), e.resource_id.clone()), e.quantity).is_none(),
                "one event per resource, type and second"
            );
        }
    }
    m
}

fn run(bits: u32, hz: u64) -> (Vec<Tick>, [u64; 3], Anomalies) {
    let (ifs, disks): (Vec<String>, Vec<String>) = (vec![], vec![]);
    let mut s = sampler(bits, hz);
    let mut ticks = Vec::new();
    let n0 = s.observe(read_sample(&fixture("t0"), &ifs, &disks).unwrap(), B0 + 400, &mut ticks);
    let n1 = s.observe(read_sample(&fixture("t1"), &ifs, &disks).unwrap(), B0 + 1250, &mut ticks);
    let n2 = s.observe(read_sample(&fixture("t2"), &ifs, &disks).unwrap(), B0 + 4010, &mut ticks);
    (ticks, [n0, n1, n2], s.anomalies)
}

#[test]
fn bytes_and_cpu_milliseconds_match_the_fixtures_with_wrap_reset_and_catch_up() {
    let (ticks, counts, anomalies) = run(32, 100);
    assert_eq!(counts, [0, 1, 3], "baseline, one second, then three seconds caught up");
    assert_eq!(ticks.iter().map(|t| t.time - B0).collect::<Vec<_>>(), [0, 1000, 2000, 3000]);
    let m = table(&ticks);
    let q = |t: i64, ut: &str, r: &str| *m.get(&(t, ut.to_owned(), r.to_owned())).unwrap_or_else(|| panic!("no {ut} {r} at {t}"));
    // CPU busy = user+nice+system+irq+softirq+steal: 1367 -> 1372 -> 1380 ticks
    // of 10 ms; guest (inside user) is not added again.
    assert_eq!(q(0, "CPU-VcpuMs", "host-a"), 50);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "CPU-VcpuMs", "host-a")), [27, 27, 26]);
    // Memory: (MemTotal - MemAvailable) kB * 1024, for one second each.
    for t in [0, 1000, 2000, 3000] {
        assert_eq!(q(t, "Memory-ByteSec", "host-a"), 4_097_000 * 1024);
    }
    // eth0: +1500/+100, then rx reset to 300 (counted from 0) spread over
    // three seconds, tx +300.
    assert_eq!(q(0, "Network-In-Bytes", "host-a/eth0"), 1500);
    assert_eq!(q(0, "Network-Out-Bytes", "host-a/eth0"), 100);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "Network-In-Bytes", "host-a/eth0")), [100, 100, 100]);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "Network-Out-Bytes", "host-a/eth0")), [100, 100, 100]);
    // eth1: a 32-bit counter wraps from 4294967000 to 200: 296 + 200.
    assert_eq!(q(0, "Network-In-Bytes", "host-a/eth1"), 496);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "Network-In-Bytes", "host-a/eth1")), [234, 233, 233]);
    // sda (sda1 and loop0 left out): sectors of 512 bytes.
    assert_eq!(q(0, "Disk-Read-Bytes", "host-a/sda"), 5120);
    assert_eq!(q(0, "Disk-Write-Bytes", "host-a/sda"), 0);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "Disk-Write-Bytes", "host-a/sda")), [1024, 1024, 1024]);
    assert_eq!(q(0, "Disk-Write-Bytes", "host-a/nvme0n1"), 4096);
    assert_eq!([1000, 2000, 3000].map(|t| q(t, "Disk-Write-Bytes", "host-a/nvme0n1")), [342, 341, 341]);
    assert!(!m.keys().any(|(_, _, r)| r.ends_with("/lo") || r.ends_with("/sda1") || r.ends_with("/loop0")));
    // 4 seconds x (cpu, memory, 2 interfaces x 2, 2 disks x 2).
    assert_eq!(m.len(), 4 * 10);
    assert_eq!(anomalies, Anomalies { wraps: 1, resets: 1 });
    assert!(m.values().all(|&v| v >= 0));
}

#[test]
fn on_a_64_bit_kernel_the_same_drop_is_a_reset() {
    let (ticks, _, anomalies) = run(64, 100);
    let m = table(&ticks);
    assert_eq!(m[&(0, "Network-In-Bytes".to_owned(), "host-a/eth1".to_owned())], 200);
    assert_eq!(anomalies, Anomalies { wraps: 0, resets: 2 });
}

#[test]
fn cpu_milliseconds_stay_exact_when_user_hz_does_not_divide_1000() {
    // 5 then 8 ticks at 300 Hz: 16.67 ms then 26.67 ms; the remainder is
    // carried, so the total is exactly 13 * 1000 / 300 rounded down once.
    let (ticks, _, _) = run(64, 300);
    let cpu: i64 = table(&ticks).iter().filter(|(k, _)| k.1 == "CPU-VcpuMs").map(|(_, v)| v).sum();
    assert_eq!(cpu, 13 * 1000 / 300);
    assert_eq!(table(&ticks)[&(0, "CPU-VcpuMs".to_owned(), "host-a".to_owned())], 16);
}

#[test]
fn configured_interfaces_and_disks_limit_what_is_metered() {
    let s = read_sample(&fixture("t0"), &["eth1".into()], &["sda1".into()]).unwrap();
    assert_eq!(s.net.keys().collect::<Vec<_>>(), ["eth1"]);
    assert_eq!(s.disks.keys().collect::<Vec<_>>(), ["sda1"]);
    assert!(read_sample(&fixture("missing"), &[], &[]).is_err());
}

#[test]
fn a_restored_sampler_continues_exactly_where_the_last_one_stopped() {
    let (ifs, disks): (Vec<String>, Vec<String>) = (vec![], vec![]);
    let (continuous, _, _) = run(32, 300);
    // First agent: t0 and t1, then "killed"; its state goes through JSON
    // as it does through the spool.
    let mut a = sampler(32, 300);
    let mut ticks = Vec::new();
    a.observe(read_sample(&fixture("t0"), &ifs, &disks).unwrap(), B0 + 400, &mut ticks);
    a.observe(read_sample(&fixture("t1"), &ifs, &disks).unwrap(), B0 + 1250, &mut ticks);
    let json = serde_json::to_vec(&a.state("boot-1").unwrap()).unwrap();
    drop(a);
    let mut b = sampler(32, 300);
    b.restore(Some(serde_json::from_slice(&json).unwrap()), "boot-1", 0);
    b.observe(read_sample(&fixture("t2"), &ifs, &disks).unwrap(), B0 + 4010, &mut ticks);
    assert_eq!(table(&ticks), table(&continuous), "a restart changes nothing, the CPU remainder included");
}

#[test]
fn after_a_reboot_everything_counted_since_the_boot_is_emitted_from_the_boot_on() {
    let (ifs, disks): (Vec<String>, Vec<String>) = (vec![], vec![]);
    let mut a = sampler(64, 100);
    let mut ticks = Vec::new();
    a.observe(read_sample(&fixture("t2"), &ifs, &disks).unwrap(), B0 + 400, &mut ticks);
    let state = a.state("boot-1");
    let mut b = sampler(64, 100);
    // Rebooted 2.5 s before the agent's first sample of t0.
    b.restore(state, "boot-2", B0 + 7_500);
    b.observe(read_sample(&fixture("t0"), &ifs, &disks).unwrap(), B0 + 10_001, &mut ticks);
    let m = table(&ticks);
    assert_eq!(ticks.iter().map(|t| t.time - B0).collect::<Vec<_>>(), [7000, 8000, 9000]);
    let sum = |ut: &str, r: &str| m.iter().filter(|(k, _)| k.1 == ut && k.2 == r).map(|(_, v)| *v).sum::<i64>();
    assert_eq!(sum("CPU-VcpuMs", "host-a"), 1367 * 10);
    assert_eq!(sum("Network-In-Bytes", "host-a/eth0"), 1_000_000);
    assert_eq!(sum("Disk-Write-Bytes", "host-a/sda"), 4000 * 512);
}

#[test]
fn a_gap_longer_than_the_catch_up_limit_keeps_its_total_in_the_last_seconds() {
    let (ifs, disks): (Vec<String>, Vec<String>) = (vec![], vec![]);
    let mut s = Sampler::new(
        HostIdentity { agent_id: "host-a".into(), customer_id: "cust-9".into(), region: "eu-west-1".into(), resource_id: "host-a".into() },
        SamplerSettings { clock_ticks_per_second: 100, counter_bits: 64, max_catch_up_s: 2 },
    );
    let mut ticks = Vec::new();
    s.observe(read_sample(&fixture("t0"), &ifs, &disks).unwrap(), B0, &mut ticks);
    assert_eq!(s.observe(read_sample(&fixture("t2"), &ifs, &disks).unwrap(), B0 + 10_000, &mut ticks), 2);
    assert_eq!(s.compressed_seconds, 8);
    assert_eq!(ticks.iter().map(|t| t.time - B0).collect::<Vec<_>>(), [8000, 9000]);
    let cpu: i64 = table(&ticks).iter().filter(|(k, _)| k.1 == "CPU-VcpuMs").map(|(_, v)| *v).sum();
    assert_eq!(cpu, (1380 - 1367) * 10);
}
