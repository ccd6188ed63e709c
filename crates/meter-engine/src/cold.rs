//! The engine's view of the state kept on disk (issue 13).
//!
//! With a [`ColdState`] attached, the engine keeps in memory only the state
//! that is likely to change: open windows, final windows until
//! `hot_window_ms` after they closed, the seq-less id sets of those days,
//! and the dedup streams in use. Everything else is read back from the
//! store when an input needs it. The store holds every committed changelog
//! entry of the partitions the engine owns (the processor applies each
//! committed transaction's changes to it before the next record is
//! handled), so memory plus store is always the whole state: the engine
//! only drops from memory what the store already has or will have before
//! the next record.

use meter_model::Millis;

use crate::state::EntryKind;

/// Read access to the committed state on disk, by changelog key.
///
/// Errors are strings naming the store and the cause; the engine stops
/// handling input on one (see [`crate::Outcome::Unavailable`]).
pub trait ColdState: Send + Sync {
    /// The committed value of a changelog key of `partition`.
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, String>;

    /// Calls `f` with the changelog key and value of each entry of `kind`
    /// of `partition` whose index time ([`crate::state::index`]) lies in
    /// `from..=to`, in index-time order, at most `limit` of them. Returns
    /// how many it visited.
    fn scan(
        &self,
        partition: i32,
        kind: EntryKind,
        from: Millis,
        to: Millis,
        limit: usize,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, String>;
}
