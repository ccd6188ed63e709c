//! Idempotent rating runs: what a run must write, given what it rated and
//! what is stored for the same (month, price-book version[, customer]).
//!
//! Guarantee: [`diff`] writes only rows that are new or changed, plus a
//! zeroed row for a stored one that rating no longer produces (its sums drop
//! out of every report), and every written row gets one [`next_revision`]
//! above everything stored. Rating twice therefore writes nothing the
//! second time, and after a correction only the affected rows get a new
//! revision. The row types and their storage are the caller's
//! (`meter-report`); this is the comparison alone, with no I/O.

use std::collections::{BTreeSet, HashMap};

/// A stored row of a rating table: its identity, its stamp, and its content
/// without the stamp for comparison.
pub trait Versioned: Clone + PartialEq {
    fn id(&self) -> String;
    /// Sets the run's time (seconds) and revision.
    fn stamp(&mut self, rated_at: u32, revision: u64);
    fn revision(&self) -> u64;
    /// The row for a line rating no longer produces: same key, zero amounts.
    fn zeroed(&self) -> Self;
    /// Equal but for the stamp.
    fn same(&self, other: &Self) -> bool {
        let (mut a, mut b) = (self.clone(), other.clone());
        a.stamp(0, 0);
        b.stamp(0, 0);
        a == b
    }
}

/// What a comparison found, per table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub new: usize,
    pub changed: usize,
    pub unchanged: usize,
    /// Stored rows the new content no longer has (zeroed or left, see the caller).
    pub removed: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} new, {} changed, {} unchanged, {} removed", self.new, self.changed, self.unchanged, self.removed)
    }
}

/// Rows to write for one table, and what they are.
#[derive(Debug, Clone)]
pub struct TablePlan<R> {
    /// New, changed and zeroed rows, in that order of discovery.
    pub write: Vec<R>,
    pub counts: Counts,
}

impl<R: Versioned> TablePlan<R> {
    /// Stamps every row to write.
    pub fn stamp(&mut self, rated_at: u32, revision: u64) {
        self.write.iter_mut().for_each(|r| r.stamp(rated_at, revision));
    }
}

/// Compares `new` with `stored`; returns what to write (not stamped yet) and
/// the highest stored revision.
pub fn diff<R: Versioned>(new: &[R], stored: &[R]) -> (TablePlan<R>, u64) {
    let by_id: HashMap<String, &R> = stored.iter().map(|r| (r.id(), r)).collect();
    let max_rev = stored.iter().map(Versioned::revision).max().unwrap_or(0);
    let mut plan = TablePlan { write: Vec::new(), counts: Counts::default() };
    let mut seen = BTreeSet::new();
    for r in new {
        let id = r.id();
        match by_id.get(&id) {
            Some(s) if s.same(r) => plan.counts.unchanged += 1,
            Some(_) => {
                plan.counts.changed += 1;
                plan.write.push(r.clone());
            }
            None => {
                plan.counts.new += 1;
                plan.write.push(r.clone());
            }
        }
        seen.insert(id);
    }
    for s in stored {
        if !seen.contains(&s.id()) {
            let z = s.zeroed();
            // Already zeroed by an earlier run: nothing changes.
            if s.same(&z) {
                plan.counts.unchanged += 1;
            } else {
                plan.counts.removed += 1;
                plan.write.push(z);
            }
        }
    }
    (plan, max_rev)
}

/// The revision of a run's rows: above every stored revision (`stored_max`)
/// and at least the run's clock in milliseconds, so that a later run wins
/// even when nothing is stored.
pub fn next_revision(stored_max: u64, now_ms: i64) -> u64 {
    (stored_max + 1).max(u64::try_from(now_ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Row {
        id: &'static str,
        total: i128,
        lines: u32,
        rated_at: u32,
        revision: u64,
    }

    impl Versioned for Row {
        fn id(&self) -> String {
            self.id.into()
        }
        fn stamp(&mut self, rated_at: u32, revision: u64) {
            (self.rated_at, self.revision) = (rated_at, revision);
        }
        fn revision(&self) -> u64 {
            self.revision
        }
        fn zeroed(&self) -> Self {
            Row { total: 0, lines: 0, ..self.clone() }
        }
    }

    fn row(id: &'static str, total: i128) -> Row {
        Row { id, total, lines: 1, rated_at: 0, revision: 0 }
    }

    #[test]
    fn plan_writes_only_new_changed_and_removed_rows() {
        let mut stored = vec![row("a", 1), row("b", 2), row("c", 3)];
        stored.iter_mut().for_each(|r| r.stamp(5, 7));
        let new = vec![row("a", 1), row("b", 20), row("d", 4)];
        let (p, max) = diff(&new, &stored);
        assert_eq!(max, 7);
        assert_eq!(p.counts, Counts { new: 1, changed: 1, unchanged: 1, removed: 1 });
        let ids: Vec<(String, i128)> = p.write.iter().map(|r| (r.id(), r.total)).collect();
        assert_eq!(ids, vec![("b".into(), 20), ("d".into(), 4), ("c".into(), 0)]);
        // A zeroed row stored already is not written again.
        let mut z = row("c", 0);
        z.lines = 0;
        let (p, _) = diff(&[], &[z]);
        assert_eq!(p.counts, Counts { unchanged: 1, ..Counts::default() });
        assert_eq!(next_revision(7, 3), 8);
        assert_eq!(next_revision(7, 1_000), 1_000);
    }
}
