//! The processor's on-disk state store (issue 13): every committed
//! changelog entry of the partitions this instance owns or owned, in one
//! redb file per instance, with a checkpoint per partition saying up to
//! which changelog offset it is complete.
//!
//! The changelog topic stays the durable copy: the store is a local,
//! disposable materialisation of it. Each committed transaction's changes
//! are applied right after the commit (and never before), in one redb
//! transaction together with the new checkpoints, so data and checkpoint
//! can never disagree; a crash rolls both back to the last durable commit,
//! which only means replaying a longer changelog tail. A store that cannot
//! be opened (torn, corrupt, another version) is set aside and rebuilt from
//! the changelog.
//!
//! Keys sort by (partition, entry kind, index time, changelog key), so the
//! engine finds the windows that are still hot, and the ones past the
//! horizon, with one range read.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use meter_engine::state::{index, EntryKind};
use meter_engine::ColdState;
use meter_model::fnv::Fnv1a;
use meter_model::Millis;
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tracing::warn;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const CHECKPOINTS: TableDefinition<u32, &[u8]> = TableDefinition::new("checkpoints");
const CHECKPOINT_VERSION: u8 = 1;

/// Up to where a partition's entries in the store are complete: every
/// changelog record before `next_offset` is applied. `last_offset` and
/// `last_hash` identify the last record applied, so that a checkpoint that
/// does not describe this changelog (another cluster, a recreated topic, a
/// copy from elsewhere, an edited file) is caught before it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub next_offset: i64,
    pub last_offset: i64,
    pub last_hash: u64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; 25] {
        let mut b = [0u8; 25];
        b[0] = CHECKPOINT_VERSION;
        b[1..9].copy_from_slice(&self.next_offset.to_be_bytes());
        b[9..17].copy_from_slice(&self.last_offset.to_be_bytes());
        b[17..25].copy_from_slice(&self.last_hash.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 25 || b[0] != CHECKPOINT_VERSION {
            return None;
        }
        let long = |r: std::ops::Range<usize>| b.get(r).and_then(|s| s.try_into().ok()).map(i64::from_be_bytes);
        Some(Checkpoint { next_offset: long(1..9)?, last_offset: long(9..17)?, last_hash: long(17..25)? as u64 })
    }
}

/// The identity of a changelog record: FNV-1a over its key, a separator
/// and its value (a tombstone hashes differently from an empty value).
pub fn record_hash(key: &[u8], value: Option<&[u8]>) -> u64 {
    let mut h = Fnv1a::default();
    h.update(key);
    match value {
        None => h.update(&[0]),
        Some(v) => h.update(&[1]).update(v),
    };
    h.finish()
}

/// A partition as an unsigned number that sorts like the partition.
fn partition_number(partition: i32) -> u32 {
    partition as u32 ^ 0x8000_0000
}

fn partition_prefix(partition: i32) -> [u8; 4] {
    partition_number(partition).to_be_bytes()
}

fn time_bytes(t: Millis) -> [u8; 8] {
    (t as u64 ^ (1 << 63)).to_be_bytes()
}

fn prefix(partition: i32, kind: EntryKind, t: Millis) -> Vec<u8> {
    let mut k = Vec::with_capacity(13 + 64);
    k.extend_from_slice(&partition_prefix(partition));
    k.push(kind as u8);
    k.extend_from_slice(&time_bytes(t));
    k
}

/// The store key of a changelog entry.
fn store_key(partition: i32, key: &[u8]) -> Result<Vec<u8>, String> {
    let (kind, t) = index(key).map_err(|e| format!("changelog key: {e}"))?;
    let mut k = prefix(partition, kind, t);
    k.extend_from_slice(key);
    Ok(k)
}

/// The fault harness (testkit builds only): with
/// `METER_TESTKIT_ABORT_IN_STORE_APPLY=N`, the process aborts inside the
/// first store write from the Nth on that has two records or more (restore
/// batches and committed transactions alike), after one record is written
/// and before the store transaction commits.
#[cfg(feature = "testkit")]
fn testkit_abort_point() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let Some(n) = std::env::var("METER_TESTKIT_ABORT_IN_STORE_APPLY").ok().and_then(|v| v.parse::<u64>().ok()) else { return false };
    CALLS.fetch_add(1, Ordering::SeqCst) + 1 >= n
}

/// The store of one processor instance.
pub struct Store {
    db: Database,
    path: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("state store {}: {e}", path.display())
}

impl Store {
    /// The store file of `instance` of `group` under `dir`.
    pub fn path(dir: &Path, group: &str, instance: &str) -> PathBuf {
        let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect::<String>();
        dir.join(format!("{}--{}.redb", clean(group), clean(instance)))
    }

    /// Opens the store at `path`, creating it (and its folder) if needed.
    /// A file that cannot be opened as a store is renamed to `*.unusable`
    /// (kept for inspection, replaced on the next occurrence) and a new one
    /// created: returns whether that happened. A store another process (or
    /// another processor in this one) holds open is an error: two
    /// processors with the same group and instance id on one host.
    pub fn open(path: &Path) -> anyhow::Result<(Store, bool)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating the state folder {} (processor.state_dir)", dir.display()))?;
        }
        let mut builder = Database::builder();
        // The store is read on misses only and written near its end (new
        // windows sort last): a small cache is enough, and memory must
        // not grow with the store (redb's default is 1 GiB).
        builder.set_cache_size(16 << 20);
        let mut replaced = false;
        let db = match builder.create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => bail!(
                "state store {} is in use by another processor: two instances share processor.group_id and processor.instance_id on this host",
                path.display()
            ),
            Err(e) => {
                let aside = path.with_extension("redb.unusable");
                warn!(path = %path.display(), error = %e, aside = %aside.display(), "the state store cannot be opened; setting it aside and rebuilding it from the changelog");
                std::fs::rename(path, &aside).with_context(|| format!("moving the unusable state store {} aside", path.display()))?;
                replaced = true;
                builder.create(path).with_context(|| format!("creating the state store {}", path.display()))?
            }
        };
        let store = Store { db, path: path.to_owned() };
        // Create the tables, so that readers find them.
        store.write(|_, _| Ok(()), true)?;
        Ok((store, replaced))
    }

    /// Size of the store file in bytes.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &'static [u8], &'static [u8]>, &mut redb::Table<'_, u32, &'static [u8]>) -> anyhow::Result<R>,
        durable: bool,
    ) -> anyhow::Result<R> {
        let mut txn = self.db.begin_write().map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None })
            .map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
        // A crash then costs no scan of the whole file on the next open.
        txn.set_quick_repair(true);
        let r = {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
            let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
            f(&mut entries, &mut checkpoints)?
        };
        txn.commit().map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
        Ok(r)
    }

    /// The checkpoint of `partition`, if any (an unreadable one is none).
    pub fn checkpoint(&self, partition: i32) -> anyhow::Result<Option<Checkpoint>> {
        let txn = self.db.begin_read().map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
        let t = txn.open_table(CHECKPOINTS).map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
        let v = t.get(partition_number(partition))?;
        Ok(v.and_then(|v| Checkpoint::decode(v.value())))
    }

    /// Applies changelog records (`(partition, key, value or tombstone)`)
    /// and sets checkpoints, in one transaction; `durable` waits for the
    /// disk (else a crash may roll it back, together with its checkpoints).
    pub fn apply<'a>(
        &self,
        records: impl IntoIterator<Item = (i32, &'a [u8], Option<&'a [u8]>)>,
        checkpoints: &[(i32, Checkpoint)],
        durable: bool,
    ) -> anyhow::Result<()> {
        #[cfg(feature = "testkit")]
        let abort_at = testkit_abort_point();
        self.write(
            |entries, cps| {
                #[cfg(feature = "testkit")]
                let mut written = 0u64;
                for (p, key, value) in records {
                    #[cfg(feature = "testkit")]
                    {
                        written += 1;
                        if abort_at && written == 2 {
                            // The fault harness: die with the store
                            // transaction half written (no destructor runs).
                            std::process::abort();
                        }
                    }
                    let k = store_key(p, key).map_err(|e| anyhow::anyhow!(err(&self.path, e)))?;
                    match value {
                        Some(v) => entries.insert(k.as_slice(), v)?,
                        None => entries.remove(k.as_slice())?,
                    };
                }
                for (p, c) in checkpoints {
                    cps.insert(partition_number(*p), c.encode().as_slice())?;
                }
                Ok(())
            },
            durable,
        )
    }

    /// Forgets everything of `partition`, its checkpoint too (before a
    /// full restore from the changelog).
    pub fn clear_partition(&self, partition: i32) -> anyhow::Result<()> {
        self.write(
            |entries, cps| {
                let from = partition_prefix(partition).to_vec();
                let to = match partition.checked_add(1) {
                    Some(next) => partition_prefix(next).to_vec(),
                    None => vec![0xFF; 5],
                };
                entries.retain_in(from.as_slice()..to.as_slice(), |_, _| false)?;
                cps.remove(partition_number(partition))?;
                Ok(())
            },
            true,
        )
    }

    /// Entries of `kind` of `partition` held.
    pub fn count(&self, partition: i32, kind: EntryKind) -> anyhow::Result<u64> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ENTRIES)?;
        let (a, b) = Self::range(partition, kind, Millis::MIN..=Millis::MAX);
        let mut n = 0;
        for e in t.range(a.as_slice()..b.as_slice())? {
            e?;
            n += 1;
        }
        Ok(n)
    }

    /// The store keys of entries of `kind` whose time lies in `times`, as
    /// a half-open range.
    fn range(partition: i32, kind: EntryKind, times: RangeInclusive<Millis>) -> (Vec<u8>, Vec<u8>) {
        let from = prefix(partition, kind, *times.start());
        let to = match times.end().checked_add(1) {
            Some(t) => prefix(partition, kind, t),
            None => {
                let mut k = partition_prefix(partition).to_vec();
                k.push(kind as u8 + 1);
                k
            }
        };
        (from, to)
    }
}

/// Commits that did not wait for the disk are made durable when the store
/// closes: a clean stop leaves a checkpoint at the changelog's end.
impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.write(|_, _| Ok(()), true) {
            warn!(path = %self.path.display(), error = %format!("{e:#}"), "the state store could not be synced on close; the next start replays a longer changelog tail");
        }
    }
}

impl ColdState for Store {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let k = store_key(partition, key)?;
        let txn = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let t = txn.open_table(ENTRIES).map_err(|e| err(&self.path, e))?;
        let v = t.get(k.as_slice()).map_err(|e| err(&self.path, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        partition: i32,
        kind: EntryKind,
        from: Millis,
        to: Millis,
        limit: usize,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, String> {
        if from > to {
            return Ok(0);
        }
        let (a, b) = Self::range(partition, kind, from..=to);
        let txn = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let t = txn.open_table(ENTRIES).map_err(|e| err(&self.path, e))?;
        let mut n = 0;
        for e in t.range(a.as_slice()..b.as_slice()).map_err(|e| err(&self.path, e))? {
            if n >= limit {
                break;
            }
            let (k, v) = e.map_err(|e| err(&self.path, e))?;
            f(&k.value()[13..], v.value());
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_reject_garbage() {
        let c = Checkpoint { next_offset: 1234, last_offset: 1230, last_hash: u64::MAX - 7 };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(&c.encode()[..24]), None);
        let mut other = c.encode();
        other[0] = 9;
        assert_eq!(Checkpoint::decode(&other), None);
    }

    #[test]
    fn a_tombstone_hashes_unlike_an_empty_value() {
        assert_ne!(record_hash(b"k", None), record_hash(b"k", Some(b"")));
        assert_ne!(record_hash(b"k", Some(b"a")), record_hash(b"ka", None));
    }

    #[test]
    fn partitions_sort_in_numeric_order() {
        assert!(partition_prefix(-1) < partition_prefix(0));
        assert!(partition_prefix(9) < partition_prefix(10));
        assert!(time_bytes(-5) < time_bytes(3));
    }
}
