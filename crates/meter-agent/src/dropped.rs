//! The dropped ledger (`dropped-ledger.csv` in the state folder): the usage
//! of every tick the spool could not keep, across restarts, and the last
//! such tick.
//!
//! The simulator's ledger replays every second of its run, including those
//! before a restart, so what a previous process dropped must be remembered
//! to leave it out, and a restarted simulator resumes after the last tick
//! kept *or dropped*; for the host sampler it is the record of what was
//! lost and why.
//!
//! Drops become final when a later tick is kept (or the agent stops): until
//! then they are held in memory, merged per minute key, so that a disk that
//! stays full for hours costs memory per minute key, not a record per
//! second on the very disk that is full. A restart before that resumes at
//! the last tick kept, so the simulator emits the dropped ticks again and
//! the host sampler meters them again from its last spooled baseline:
//! nothing is lost by not having written them.
//!
//! Written so that a crash or a full disk never leaves a torn file that
//! stops the agent, and never a record without its tick or a tick without
//! its record: each write is one group of lines `tick_ms,customer_id,
//! service,usage_type,region,minute_start_ms,event_count,quantity_sum`
//! closed by `end,tick_ms` (the last tick it covers), appended in one write
//! and synced. A group that is not closed (a crash during the write) is cut
//! off at start and its bytes counted: then neither its usage nor its tick
//! counts, and the ticks are emitted again. An append that fails (a full
//! disk) is cut off again at once and stays in memory; the agent keeps no
//! later tick until it is written. The spool keeps
//! `agent.disk_reserve_bytes` free so that this file can grow.
//!
//! A file in the format before this release (the plain ledger CSV, no
//! ticks) is renamed to `dropped-ledger.v1.csv` and read alongside.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use meter_model::ledger::{Ledger, LedgerKey, Totals};
use meter_model::{Granularity, Millis};

const HEADER: &str = "tick_ms,customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum";
/// The first line of the format before this release.
const V1_HEADER: &str = "customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum";

/// What the spool could not keep, in memory and in its file.
#[derive(Debug)]
pub struct DroppedLedger {
    path: PathBuf,
    /// Everything dropped, written or not.
    ledger: Ledger,
    /// The last tick of the groups in the file.
    last_tick: Option<Millis>,
    /// Drops not in the file yet, and the last tick they cover.
    pending: Ledger,
    pending_tick: Option<Millis>,
}

/// What [`DroppedLedger::load`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Bytes of a torn last group that were cut off.
    pub torn_bytes: u64,
}

fn parse_row(line: &str) -> Option<(Millis, LedgerKey, Totals)> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() != 8 {
        return None;
    }
    let key = LedgerKey {
        granularity: Granularity::Minute,
        window_start: f[5].parse().ok()?,
        customer_id: f[1].to_owned(),
        service: f[2].to_owned(),
        usage_type: f[3].to_owned(),
        region: f[4].to_owned(),
    };
    Some((f[0].parse().ok()?, key, Totals { event_count: f[6].parse().ok()?, quantity_sum: f[7].parse().ok()? }))
}

impl DroppedLedger {
    /// Reads the ledger at `path` (none yet: empty), cutting off a group
    /// the last write did not close. A malformed line inside a closed group
    /// is corruption, not a torn write: an error.
    pub fn load(path: PathBuf) -> anyhow::Result<(Self, Loaded)> {
        let mut ledger = Ledger::default();
        let v1 = path.with_file_name("dropped-ledger.v1.csv");
        let mut bytes = read(&path)?;
        if bytes.starts_with(V1_HEADER.as_bytes()) {
            std::fs::rename(&path, &v1).with_context(|| format!("renaming {} to {}", path.display(), v1.display()))?;
            bytes.clear();
        }
        let old = read(&v1)?;
        if !old.is_empty() {
            ledger = Ledger::from_csv(&String::from_utf8_lossy(&old)).with_context(|| format!("reading {}", v1.display()))?;
        }
        let mut last_tick = None;
        let mut group: Vec<(LedgerKey, Totals)> = Vec::new();
        let mut keep = 0usize;
        let mut at = 0usize;
        for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            let start = at;
            at += line.len();
            let Some(text) = line.strip_suffix(b"\n").and_then(|l| std::str::from_utf8(l).ok()) else { break };
            if i == 0 {
                if text != HEADER {
                    bail!("{}: expected the header {HEADER:?}", path.display());
                }
                keep = at;
                continue;
            }
            if let Some(t) = text.strip_prefix("end,") {
                let Ok(tick) = t.parse::<Millis>() else { break };
                for (k, v) in group.drain(..) {
                    ledger.entries.entry(k).or_default().add(v);
                }
                last_tick = Some(last_tick.map_or(tick, |l: Millis| l.max(tick)));
                keep = at;
                continue;
            }
            match parse_row(text) {
                Some((_, k, v)) => group.push((k, v)),
                // A bad line in the group the file ends with is its torn
                // end; before that it is corruption.
                None if !bytes[at..].windows(4).any(|w| w == b"end,") => break,
                None => bail!("{}: malformed line {} at byte {start}", path.display(), i + 1),
            }
        }
        let torn_bytes = (bytes.len() - keep) as u64;
        if torn_bytes > 0 {
            let f = std::fs::OpenOptions::new().write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
            f.set_len(keep as u64).with_context(|| format!("cutting the torn end off {}", path.display()))?;
            f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        }
        Ok((DroppedLedger { path, ledger, last_tick, pending: Ledger::default(), pending_tick: None }, Loaded { torn_bytes }))
    }

    /// Remembers the usage of ticks dropped in one turn, the last of which
    /// starts at `tick` (in memory: see the module docs for when it is
    /// written).
    pub fn record(&mut self, dropped: &Ledger, tick: Millis) {
        self.ledger.merge(dropped);
        self.pending.merge(dropped);
        self.pending_tick = Some(self.pending_tick.map_or(tick, |l| l.max(tick)));
    }

    /// Writes the pending drops as one group, if any: before a later tick
    /// is kept, and when the agent stops. On an error the file is as it
    /// was and the drops stay pending.
    pub fn flush(&mut self) -> std::io::Result<()> {
        let Some(tick) = self.pending_tick else { return Ok(()) };
        let mut text = String::new();
        for (k, t) in self.pending.entries.iter().filter(|(k, _)| k.granularity == Granularity::Minute) {
            text.push_str(&format!(
                "{tick},{},{},{},{},{},{},{}\n",
                k.customer_id, k.service, k.usage_type, k.region, k.window_start, t.event_count, t.quantity_sum
            ));
        }
        text.push_str(&format!("end,{tick}\n"));
        append(&self.path, &text)?;
        self.pending = Ledger::default();
        self.pending_tick = None;
        self.last_tick = Some(self.last_tick.map_or(tick, |l| l.max(tick)));
        Ok(())
    }

    /// Whether some drops are only in memory.
    pub fn has_pending(&self) -> bool {
        self.pending_tick.is_some()
    }

    /// Everything dropped so far, this run and before.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The start of the last dropped tick in the file, this run or before
    /// (none for drops recorded before this release).
    pub fn last_tick(&self) -> Option<Millis> {
        self.last_tick
    }

    /// Subtracts what was dropped from `ledger` (a simulator's ledger of
    /// every second it generated).
    pub fn subtract_from(&self, ledger: &mut Ledger) {
        for (k, t) in &self.ledger.entries {
            if let Some(e) = ledger.entries.get_mut(k) {
                e.event_count -= t.event_count;
                e.quantity_sum -= t.quantity_sum;
                if e.event_count == 0 && e.quantity_sum == 0 {
                    ledger.entries.remove(k);
                }
            }
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Appends `text` (whole groups) to the file at `path` (created with its
/// header) as one write and syncs it; on failure the file is cut back to
/// its length before.
fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let before = f.metadata()?.len();
    let body = if before == 0 { format!("{HEADER}\n{text}") } else { text.to_owned() };
    if let Err(e) = f.write_all(body.as_bytes()).and_then(|()| f.sync_data()) {
        let _ = f.set_len(before);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(q: i64) -> Ledger {
        let mut l = Ledger::default();
        l.record("c1", "compute", "BoxUsage:m5.large", "r", 60_000, q);
        l.record("c2", "compute", "BoxUsage:m5.large", "r", 60_000, q);
        l
    }

    #[test]
    fn an_unclosed_group_is_cut_off_with_its_tick_and_the_rest_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped-ledger.csv");
        let (mut d, _) = DroppedLedger::load(path.clone()).unwrap();
        d.record(&ledger(5), 61_000);
        d.flush().unwrap();
        d.record(&ledger(3), 61_500);
        d.record(&ledger(4), 62_000);
        assert!(d.has_pending());
        d.flush().unwrap();
        assert!(!d.has_pending());
        let whole = std::fs::read(&path).unwrap();
        let (back, loaded) = DroppedLedger::load(path.clone()).unwrap();
        assert_eq!((back.ledger(), back.last_tick(), loaded.torn_bytes), (d.ledger(), Some(62_000), 0));
        // Every cut inside the last group loses the whole group and its
        // tick, never part of it.
        let second_group_starts =
            whole.len() - String::from_utf8_lossy(&whole).split_inclusive('\n').rev().take(3).map(str::len).sum::<usize>();
        for cut in second_group_starts + 1..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (d, loaded) = DroppedLedger::load(path.clone()).unwrap();
            assert_eq!((d.ledger(), d.last_tick()), (&ledger(5), Some(61_000)), "cut at {cut}");
            assert_eq!(loaded.torn_bytes as usize, cut - second_group_starts, "cut at {cut}");
            assert_eq!(std::fs::read(&path).unwrap().len(), second_group_starts, "the torn end is gone from the file");
        }
        // A bad line inside a closed group is corruption.
        let text = String::from_utf8_lossy(&whole).replacen("c1,compute", "c1,compute,extra", 1);
        std::fs::write(&path, text).unwrap();
        assert!(DroppedLedger::load(path).is_err());
    }

    #[test]
    fn a_ledger_of_the_previous_format_is_kept_and_read_alongside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped-ledger.csv");
        std::fs::write(&path, ledger(3).to_csv()).unwrap();
        let (mut d, _) = DroppedLedger::load(path.clone()).unwrap();
        assert_eq!((d.ledger(), d.last_tick()), (&ledger(3), None));
        d.record(&ledger(4), 90_000);
        d.flush().unwrap();
        let (d, _) = DroppedLedger::load(path).unwrap();
        let mut both = ledger(3);
        both.merge(&ledger(4));
        assert_eq!((d.ledger(), d.last_tick()), (&both, Some(90_000)));
        assert!(dir.path().join("dropped-ledger.v1.csv").exists());
    }
}
