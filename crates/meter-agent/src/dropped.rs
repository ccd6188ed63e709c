//! The dropped ledger (`dropped-ledger.csv` in the state folder): the usage
//! of every tick the spool could not keep, across restarts.
//!
//! The simulator's ledger replays every second of its run, including those
//! before a restart, so what a previous process dropped must be remembered
//! to leave it out; for the host sampler it is the record of what was lost
//! and why. A tick's drop is appended before any later tick is kept (a
//! restart resumes after the last tick in the log).

use std::path::PathBuf;

use anyhow::Context;
use meter_model::ledger::Ledger;
use tracing::error;

/// What the spool could not keep, in memory and in its file.
#[derive(Debug)]
pub struct DroppedLedger {
    path: PathBuf,
    ledger: Ledger,
}

impl DroppedLedger {
    /// Reads the ledger at `path` (none yet: empty).
    pub fn load(path: PathBuf) -> anyhow::Result<Self> {
        let ledger = match std::fs::read_to_string(&path) {
            Ok(text) => Ledger::from_csv(&text).with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(DroppedLedger { path, ledger })
    }

    /// Records the usage of dropped ticks: appended to the file (a failure
    /// is logged; the drops are still counted in the metrics) and kept in
    /// memory.
    pub fn record(&mut self, dropped: &Ledger) {
        if let Err(e) = append_ledger(&self.path, dropped) {
            error!(error = %e, path = %self.path.display(), "cannot record dropped usage");
        }
        self.ledger.merge(dropped);
    }

    /// Everything dropped so far, this run and before.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
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

/// Appends `ledger`'s minute entries to the CSV ledger at `path` (created
/// with its header); reading it back sums repeated keys.
fn append_ledger(path: &std::path::Path, ledger: &Ledger) -> std::io::Result<()> {
    use std::io::Write;
    let csv = ledger.to_csv();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let fresh = f.metadata()?.len() == 0;
    let body = if fresh { csv.as_str() } else { csv.split_once('\n').map_or("", |(_, rest)| rest) };
    f.write_all(body.as_bytes())
}
