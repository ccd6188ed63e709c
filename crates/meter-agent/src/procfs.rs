//! The host sampler: what a real host used, per second, from /proc.
//!
//! Guarantee: every unit the kernel's counters advanced between two samples
//! is emitted exactly once, as integers in the catalog's base units
//! (`host` service): CPU in vCPU-milliseconds (carrying the remainder when
//! USER_HZ does not divide 1000), memory in byte-seconds, network and disk in
//! bytes. A counter that goes down is a wrap when the configured counter
//! width makes that plausible, else a reset (the device or the kernel
//! restarted it): then it is counted from 0, never negative. When samples are
//! more than a second apart (the agent was starved or suspended), the usage
//! is spread over every missed second, each with its own timestamp, and the
//! extra seconds are reported as caught up.
//!
//! Parsing and arithmetic are pure functions of the file contents; only
//! [`read_sample`] touches the file system, under a configurable proc root
//! (tests feed fixture folders).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meter_model::{Millis, UsageEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The file is missing or unreadable (the host's problem or a wrong
    /// `agent.proc_root`; retrying may help for transient errors).
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The kernel wrote something this parser does not understand (ours).
    #[error("cannot parse {file}: {message}")]
    Parse { file: &'static str, message: String },
}

pub type Result<T, E = ProcError> = std::result::Result<T, E>;

fn parse_err(file: &'static str, message: impl Into<String>) -> ProcError {
    ProcError::Parse { file, message: message.into() }
}

/// One reading of the host's cumulative counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Busy CPU time of all CPUs in USER_HZ ticks: user + nice + system +
    /// irq + softirq + steal (guest time is already inside user and nice).
    pub cpu_busy_ticks: u64,
    /// MemTotal - MemAvailable, in bytes (a gauge, not a counter).
    pub mem_used_bytes: u64,
    /// Interface -> (received bytes, transmitted bytes).
    pub net: BTreeMap<String, (u64, u64)>,
    /// Block device -> (bytes read, bytes written).
    pub disks: BTreeMap<String, (u64, u64)>,
}

/// The `cpu` line of /proc/stat.
pub fn parse_stat(text: &str) -> Result<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| parse_err("stat", "no aggregate cpu line"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| parse_err("stat", e.to_string()))?;
    if f.len() < 8 {
        return Err(parse_err("stat", format!("cpu line has {} fields, expected at least 8", f.len())));
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    Ok([f[0], f[1], f[2], f[5], f[6], f[7]].iter().fold(0u64, |a, &x| a.saturating_add(x)))
}

/// Boot time (`btime`, epoch seconds) from /proc/stat.
pub fn parse_btime(text: &str) -> Result<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .ok_or_else(|| parse_err("stat", "no btime line"))
}

/// MemTotal - MemAvailable from /proc/meminfo, in bytes.
pub fn parse_meminfo(text: &str) -> Result<u64> {
    let field = |name: &str| -> Result<u64> {
        let line = text.lines().find(|l| l.starts_with(name)).ok_or_else(|| parse_err("meminfo", format!("no {name}")))?;
        let kb = line[name.len()..]
            .trim_start_matches(':')
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| parse_err("meminfo", format!("bad {name} line: {line}")))?;
        Ok(kb.saturating_mul(1024))
    };
    Ok(field("MemTotal")?.saturating_sub(field("MemAvailable")?))
}

/// /proc/net/dev: interface -> (rx bytes, tx bytes).
pub fn parse_net_dev(text: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 16 {
            return Err(parse_err("net/dev", format!("interface {} has {} fields, expected 16", name.trim(), f.len())));
        }
        let n = |i: usize| f[i].parse::<u64>().map_err(|e| parse_err("net/dev", format!("{}: {e}", name.trim())));
        out.insert(name.trim().to_owned(), (n(0)?, n(8)?));
    }
    Ok(out)
}

/// /proc/diskstats: device -> (bytes read, bytes written). Sector counts are
/// always in 512-byte units, whatever the device's sector size.
pub fn parse_diskstats(text: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            return Err(parse_err("diskstats", format!("line has {} fields, expected at least 10: {line}", f.len())));
        }
        let n = |i: usize| f[i].parse::<u64>().map_err(|e| parse_err("diskstats", format!("{}: {e}", f[2])));
        out.insert(f[2].to_owned(), (n(5)?.saturating_mul(512), n(9)?.saturating_mul(512)));
    }
    Ok(out)
}

/// The interfaces to meter: the configured ones, else all but loopback.
pub fn select_interfaces(all: &mut BTreeMap<String, (u64, u64)>, configured: &[String]) {
    if configured.is_empty() {
        all.remove("lo");
    } else {
        all.retain(|k, _| configured.contains(k));
    }
}

/// The disks to meter: the configured ones, else every whole disk. Loop,
/// ram and zram devices are not disks; a partition (`sda1` of `sda`,
/// `nvme0n1p1` of `nvme0n1`) is inside its disk and would count twice.
pub fn select_disks(all: &mut BTreeMap<String, (u64, u64)>, configured: &[String]) {
    if !configured.is_empty() {
        all.retain(|k, _| configured.contains(k));
        return;
    }
    let names: Vec<String> = all.keys().cloned().collect();
    let is_partition = |n: &str| {
        names.iter().any(|d| {
            d.len() < n.len() && n.starts_with(d.as_str()) && {
                let rest = &n[d.len()..];
                // A disk whose name ends in a digit separates partitions
                // with `p` (nvme0n1p1, mmcblk0p1); nvme0n10 is another disk.
                let rest = if d.ends_with(|c: char| c.is_ascii_digit()) { rest.strip_prefix('p') } else { Some(rest) };
                rest.is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
            }
        })
    };
    all.retain(|k, _| !(k.starts_with("loop") || k.starts_with("ram") || k.starts_with("zram") || is_partition(k)));
}

/// Reads one sample under `root` (normally `/proc`).
pub fn read_sample(root: &Path, interfaces: &[String], disks: &[String]) -> Result<Sample> {
    let read = |rel: &str| {
        let path = root.join(rel);
        std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
    };
    let mut net = parse_net_dev(&read("net/dev")?)?;
    select_interfaces(&mut net, interfaces);
    let mut disk = parse_diskstats(&read("diskstats")?)?;
    select_disks(&mut disk, disks);
    Ok(Sample { cpu_busy_ticks: parse_stat(&read("stat")?)?, mem_used_bytes: parse_meminfo(&read("meminfo")?)?, net, disks: disk })
}

/// This boot's id and start (epoch ms) under `root`: counters only continue
/// across an agent restart within the same boot. A root without a boot id
/// (fixtures) has the empty id.
pub fn read_boot(root: &Path) -> Result<(String, Millis)> {
    let stat_path = root.join("stat");
    let stat = std::fs::read_to_string(&stat_path).map_err(|source| ProcError::Read { path: stat_path, source })?;
    let id = std::fs::read_to_string(root.join("sys/kernel/random/boot_id")).map(|s| s.trim().to_owned()).unwrap_or_default();
    Ok((id, parse_btime(&stat)?.saturating_mul(1000)))
}

/// How a counter moved between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// It went up by this much.
    Counted(u64),
    /// It passed the top of its `bits`-wide range and started again from 0.
    Wrapped(u64),
    /// It was restarted (went down by more than a wrap explains): counted
    /// from 0, i.e. the delta is the new value.
    Reset(u64),
}

impl Delta {
    pub fn value(self) -> u64 {
        match self {
            Delta::Counted(v) | Delta::Wrapped(v) | Delta::Reset(v) => v,
        }
    }
}

/// The change of a `bits`-wide kernel counter from `prev` to `cur`. Going
/// down is a wrap only if `prev` fits the width and the wrapped distance is
/// under half the range (a counter does not advance 2^(bits-1) in one
/// sampling interval); anything else is a reset.
pub fn counter_delta(prev: u64, cur: u64, bits: u32) -> Delta {
    if cur >= prev {
        return Delta::Counted(cur - prev);
    }
    let range: u128 = 1u128 << bits.clamp(1, 64);
    if u128::from(prev) < range && u128::from(cur) < range {
        let wrapped = range - u128::from(prev) + u128::from(cur);
        if wrapped < range / 2 {
            return Delta::Wrapped(wrapped as u64);
        }
    }
    Delta::Reset(cur)
}

/// Share `i` (0-based) of `total` split into `n` integer parts that sum to
/// `total` exactly (the first `total % n` parts get one more).
pub fn split_even(total: u64, n: u64, i: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    total / n + u64::from(i < total % n)
}

/// Who and where the host's usage is billed.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    pub agent_id: String,
    pub customer_id: String,
    pub region: String,
    /// Resource id of the host; interfaces and disks are `{resource_id}/{name}`.
    pub resource_id: String,
}

/// Sampler settings from `[agent]`.
#[derive(Debug, Clone)]
pub struct SamplerSettings {
    pub clock_ticks_per_second: u64,
    pub counter_bits: u32,
    /// At most this many seconds are caught up after a gap; the usage of a
    /// longer gap is spread over its last `max_catch_up_s` seconds (totals
    /// stay exact, timestamps are compressed; counted and logged).
    pub max_catch_up_s: u64,
}

/// What a restarted sampler needs to continue exactly where the last one
/// stopped: the last sample, its boundary and the CPU remainder, within
/// one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub boot_id: String,
    pub sample: Sample,
    pub boundary: Millis,
    pub cpu_remainder: u64,
}

/// Counts of counter anomalies seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Anomalies {
    pub wraps: u64,
    pub resets: u64,
}

/// Turns successive samples into per-second usage events. Pure: the caller
/// reads the sample and says when it was taken.
#[derive(Debug)]
pub struct Sampler {
    host: HostIdentity,
    settings: SamplerSettings,
    /// Last sample and the second boundary it closed.
    prev: Option<(Sample, Millis)>,
    /// CPU ticks x 1000 not yet emitted as whole milliseconds.
    cpu_remainder: u64,
    pub anomalies: Anomalies,
    /// Seconds whose usage was folded into later seconds because a gap
    /// exceeded `max_catch_up_s`.
    pub compressed_seconds: u64,
    /// After a reboot: the boot's second; the next sample is measured from
    /// zero counters at that time.
    boot_baseline: Option<Millis>,
}

/// The usage of one second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// Start of the second (UTC, multiple of 1000).
    pub time: Millis,
    /// Events without seq and event_id (the runner assigns them).
    pub events: Vec<UsageEvent>,
}

impl Sampler {
    pub fn new(host: HostIdentity, settings: SamplerSettings) -> Self {
        Sampler {
            host,
            settings,
            prev: None,
            cpu_remainder: 0,
            anomalies: Anomalies::default(),
            compressed_seconds: 0,
            boot_baseline: None,
        }
    }

    /// The state to persist with the ticks just emitted; None before the
    /// first sample.
    pub fn state(&self, boot_id: &str) -> Option<SamplerState> {
        self.prev.as_ref().map(|(sample, boundary)| SamplerState {
            boot_id: boot_id.to_owned(),
            sample: sample.clone(),
            boundary: *boundary,
            cpu_remainder: self.cpu_remainder,
        })
    }

    /// Continues from a persisted state. In the same boot the next sample
    /// covers the whole time the agent was down; after a reboot the
    /// counters restarted from 0 at `boot_ms`, so everything counted since
    /// then is usage not yet emitted (memory excepted, a gauge).
    pub fn restore(&mut self, state: Option<SamplerState>, boot_id: &str, boot_ms: Millis) {
        match state {
            Some(s) if s.boot_id == boot_id => {
                self.cpu_remainder = s.cpu_remainder;
                self.prev = Some((s.sample, s.boundary));
            }
            Some(_) => {
                // The counters count from zero since the boot: the next
                // sample's baseline is all zeros at the boot.
                self.prev = None;
                self.boot_baseline = Some(boot_ms - boot_ms.rem_euclid(1000));
            }
            None => {}
        }
    }

    /// The boundary of the last observed sample (the next tick starts there).
    pub fn last_boundary(&self) -> Option<Millis> {
        self.prev.as_ref().map(|(_, b)| *b)
    }

    fn delta(&mut self, prev: u64, cur: u64) -> u64 {
        let d = counter_delta(prev, cur, self.settings.counter_bits);
        match d {
            Delta::Wrapped(_) => self.anomalies.wraps += 1,
            Delta::Reset(_) => self.anomalies.resets += 1,
            Delta::Counted(_) => {}
        }
        d.value()
    }

    /// Feeds a sample taken at wall time `now` and appends one [`Tick`] per
    /// whole second since the previous sample's boundary (none for the first
    /// sample, which is the baseline, or for a second sample within the same
    /// second). Returns how many ticks were appended.
    pub fn observe(&mut self, sample: Sample, now: Millis, out: &mut Vec<Tick>) -> u64 {
        let boundary = now - now.rem_euclid(1000);
        if let (None, Some(boot)) = (&self.prev, self.boot_baseline.take()) {
            let zero = |m: &BTreeMap<String, (u64, u64)>| m.keys().map(|k| (k.clone(), (0, 0))).collect();
            let base = Sample { cpu_busy_ticks: 0, mem_used_bytes: 0, net: zero(&sample.net), disks: zero(&sample.disks) };
            self.prev = Some((base, boot.min(boundary)));
        }
        let Some((prev, prev_boundary)) = self.prev.take() else {
            self.prev = Some((sample, boundary));
            return 0;
        };
        if boundary <= prev_boundary {
            // Same second (or the clock stepped back): keep the older
            // baseline so that no usage is lost, emit nothing yet.
            self.prev = Some((prev, prev_boundary));
            return 0;
        }
        let mut n = ((boundary - prev_boundary) / 1000) as u64;
        let mut prev_boundary = prev_boundary;
        let cap = self.settings.max_catch_up_s.max(1);
        if n > cap {
            // Never silently skipped: the whole delta lands in the last
            // `cap` seconds.
            self.compressed_seconds += n - cap;
            prev_boundary = boundary - (cap as i64) * 1000;
            n = cap;
        }
        // CPU: 64-bit cumulative ticks (u64 on every kernel).
        let cpu_ticks = match counter_delta(prev.cpu_busy_ticks, sample.cpu_busy_ticks, 64) {
            Delta::Counted(v) => v,
            other => {
                self.anomalies.resets += 1;
                other.value()
            }
        };
        let hz = self.settings.clock_ticks_per_second.max(1);
        let scaled = u128::from(cpu_ticks) * 1000 + u128::from(self.cpu_remainder);
        let cpu_ms = u64::try_from(scaled / u128::from(hz)).unwrap_or(u64::MAX);
        self.cpu_remainder = (scaled % u128::from(hz)) as u64;
        let mut net = Vec::new();
        for (name, &(rx, tx)) in &sample.net {
            if let Some(&(prx, ptx)) = prev.net.get(name) {
                net.push((name.clone(), self.delta(prx, rx), self.delta(ptx, tx)));
            }
        }
        let mut disks = Vec::new();
        for (name, &(rd, wr)) in &sample.disks {
            if let Some(&(prd, pwr)) = prev.disks.get(name) {
                disks.push((name.clone(), self.delta(prd, rd), self.delta(pwr, wr)));
            }
        }
        for i in 0..n {
            let time = prev_boundary + (i as i64) * 1000;
            let mut events = Vec::with_capacity(2 + 2 * (net.len() + disks.len()));
            let host = self.host.resource_id.as_str();
            events.push(self.event(time, "CPU-VcpuMs", host.to_owned(), split_even(cpu_ms, n, i)));
            events.push(self.event(time, "Memory-ByteSec", host.to_owned(), sample.mem_used_bytes));
            for (name, rx, tx) in &net {
                let r = format!("{host}/{name}");
                events.push(self.event(time, "Network-In-Bytes", r.clone(), split_even(*rx, n, i)));
                events.push(self.event(time, "Network-Out-Bytes", r, split_even(*tx, n, i)));
            }
            for (name, rd, wr) in &disks {
                let r = format!("{host}/{name}");
                events.push(self.event(time, "Disk-Read-Bytes", r.clone(), split_even(*rd, n, i)));
                events.push(self.event(time, "Disk-Write-Bytes", r, split_even(*wr, n, i)));
            }
            out.push(Tick { time, events });
        }
        self.prev = Some((sample, boundary));
        n
    }

    fn event(&self, time: Millis, usage_type: &str, resource_id: String, quantity: u64) -> UsageEvent {
        UsageEvent {
            event_id: String::new(),
            agent_id: self.host.agent_id.clone(),
            seq: None,
            customer_id: self.host.customer_id.clone(),
            service: "host".into(),
            usage_type: usage_type.into(),
            resource_id,
            region: self.host.region.clone(),
            // A one-second delta above i64::MAX is physically impossible;
            // saturate rather than wrap into a negative quantity.
            quantity: i64::try_from(quantity).unwrap_or(i64::MAX),
            event_time: time,
            attributes: Default::default(),
            incarnation: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_wrap_and_reset() {
        assert_eq!(counter_delta(10, 25, 64), Delta::Counted(15));
        assert_eq!(counter_delta(u32::MAX as u64 - 4, 10, 32), Delta::Wrapped(15));
        // 64-bit counters near the top wrap too.
        assert_eq!(counter_delta(u64::MAX - 1, 3, 64), Delta::Wrapped(5));
        // Going down from the middle of the range is a restart, counted from 0.
        assert_eq!(counter_delta(1_000_000, 700, 64), Delta::Reset(700));
        assert_eq!(counter_delta(1_000_000, 700, 32), Delta::Reset(700));
        // A value above 32 bits cannot have wrapped a 32-bit counter.
        assert_eq!(counter_delta(u32::MAX as u64 + 10, 5, 32), Delta::Reset(5));
    }

    #[test]
    fn split_even_sums_exactly() {
        for total in [0u64, 1, 7, 1000, 999_999_937] {
            for n in 1..9 {
                let parts: Vec<u64> = (0..n).map(|i| split_even(total, n, i)).collect();
                assert_eq!(parts.iter().sum::<u64>(), total);
                assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn disks_leave_out_partitions_and_virtual_devices() {
        let mut all: BTreeMap<String, (u64, u64)> =
            ["sda", "sda1", "sda2", "nvme0n1", "nvme0n1p1", "nvme0n10", "loop0", "ram0", "zram0", "vdb", "md0"]
                .iter()
                .map(|n| (n.to_string(), (0, 0)))
                .collect();
        select_disks(&mut all, &[]);
        assert_eq!(all.keys().map(String::as_str).collect::<Vec<_>>(), ["md0", "nvme0n1", "nvme0n10", "sda", "vdb"]);
    }
}
