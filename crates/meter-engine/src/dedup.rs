//! Duplicate detection by (agent_id, customer_id, seq).
//!
//! Each stream keeps its highest seq and the gaps below it (seqs not yet
//! seen) as ranges, so state grows with the number of streams and gaps, not
//! with the number of events, and nothing expires with time. An agent that
//! skips seqs (e.g. after a crash it reserves a new block) leaves a single
//! range behind.

use std::collections::BTreeMap;

/// Gap ranges kept per stream. When a stream has more gaps than this, the
/// oldest gap is forgotten: seqs from it that arrive afterwards are counted
/// as duplicates. Reordering that deep does not happen with one producer per
/// stream; the bound keeps a misbehaving agent from growing state.
pub const MAX_GAPS: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqTracker {
    /// Highest seq seen; `None` before the first.
    high: Option<i64>,
    /// Missing seqs below `high`: start -> end, both inclusive.
    gaps: BTreeMap<i64, i64>,
}

impl SeqTracker {
    /// Whether `seq` was already seen. Seqs start at 1; a first seq above 1
    /// leaves a gap below it so that earlier seqs arriving later still count.
    pub fn is_duplicate(&self, seq: i64) -> bool {
        match self.high {
            None => false,
            Some(h) if seq > h => false,
            Some(_) => !self.in_gap(seq),
        }
    }

    fn in_gap(&self, seq: i64) -> bool {
        self.gaps.range(..=seq).next_back().is_some_and(|(_, &end)| seq <= end)
    }

    /// Marks `seq` as seen. Call only when `is_duplicate(seq)` is false.
    pub fn record(&mut self, seq: i64) {
        let floor = self.high.map_or(1, |h| h + 1);
        if seq >= floor {
            if seq > floor {
                self.gaps.insert(floor, seq - 1);
            }
            self.high = Some(seq);
        } else if let Some((&start, &end)) = self.gaps.range(..=seq).next_back() {
            // Split the gap that contains seq.
            self.gaps.remove(&start);
            if start < seq {
                self.gaps.insert(start, seq - 1);
            }
            if seq < end {
                self.gaps.insert(seq + 1, end);
            }
        }
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }

    /// Highest seq seen and the gap ranges below it, for the changelog.
    pub fn parts(&self) -> (Option<i64>, &BTreeMap<i64, i64>) {
        (self.high, &self.gaps)
    }

    pub fn from_parts(high: Option<i64>, gaps: BTreeMap<i64, i64>) -> Self {
        SeqTracker { high, gaps }
    }

    pub fn gap_count(&self) -> usize {
        self.gaps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn in_order_stream_keeps_no_gaps() {
        let mut t = SeqTracker::default();
        for s in 1..=1000 {
            assert!(!t.is_duplicate(s));
            t.record(s);
        }
        assert!(t.is_duplicate(500));
        assert_eq!(t.gap_count(), 0);
    }

    #[test]
    fn a_skipped_block_is_one_gap_and_fills_in() {
        let mut t = SeqTracker::default();
        t.record(1);
        t.record(1001);
        assert_eq!(t.gap_count(), 1);
        assert!(!t.is_duplicate(500));
        t.record(500);
        assert!(t.is_duplicate(500));
        assert_eq!(t.gap_count(), 2);
    }

    proptest! {
        /// Any arrival order with any duplicates: exactly the first arrival of
        /// each seq is accepted.
        #[test]
        fn accepts_each_seq_exactly_once(seqs in proptest::collection::vec(1i64..300, 0..600)) {
            let mut t = SeqTracker::default();
            let mut seen = HashSet::new();
            for s in seqs {
                let dup = t.is_duplicate(s);
                prop_assert_eq!(dup, !seen.insert(s));
                if !dup {
                    t.record(s);
                }
            }
        }
    }
}
