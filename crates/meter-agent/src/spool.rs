//! The agent's spool: a bounded, segmented, append-only write-ahead log of
//! encoded events, plus a checkpoint of what Kafka acknowledged.
//!
//! Guarantee: an event is appended (one write per tick, CRC-framed) before
//! it is handed to Kafka, and the acknowledged position only moves over
//! events whose delivery was confirmed. After any crash (SIGKILL included;
//! power loss too with `fsync = always`) [`Spool::open`] finds every
//! appended event after the checkpoint and sends it again, so nothing is
//! lost; events may be sent twice, with the same (agent, customer, seq), and
//! the processor drops the second copy. A torn last tick (crash during its
//! write) fails its CRC and is cut off: it was never sent, so its seqs were
//! never used. The highest seq per customer is the maximum of the checkpoint
//! and the log, so a restarted agent never reuses a seq.
//!
//! Every file is written so that a crash or a full disk leaves the old or
//! the new version, never a torn one that stops the agent:
//! - segments: one write per batch, CRC-framed; a write that fails (a full
//!   disk) is cut off again at once, and a torn tail (a crash during the
//!   write) fails its CRC and is cut off at open;
//! - the checkpoint: written to a temporary file, synced, and renamed over
//!   `checkpoint.json` after the previous one is renamed to
//!   `checkpoint.prev.json`. Segments are deleted only once the *previous*
//!   checkpoint covers them, so that if `checkpoint.json` cannot be read, the
//!   previous one with the segments still on disk gives the same seqs and
//!   sends again, never less.
//!
//! The spool also keeps room on the disk: an append that would leave less
//! than `reserve_bytes` free is refused like one past `max_bytes` (the tick
//! is dropped and counted), so the checkpoint and the dropped ledger can
//! always be written.
//!
//! Layout of `dir`: `checkpoint.json`, `checkpoint.prev.json` and segments
//! `{first_event_index:020}.seg`, each a sequence of
//! batches `[u32 body_len][u32 crc32(body)][body]` with body
//! `[u64 first_index][i64 tick_time][u32 count][u32 meta_len][meta]` then
//! per event `[i64 seq][u16 key_len][key][u32 payload_len][payload]`
//! (little endian). A batch holds the ticks of one turn of the agent; `meta`
//! is the source's state after them (the sampler's baseline), so that a
//! restart continues exactly where the log ends.
//! A segment is deleted once all its events are acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The disk or the folder failed us (permissions, full disk, I/O error).
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The state folder belongs to another agent or run (the user's error).
    #[error("state folder {path} belongs to {found:?}, not {expected:?}: use another folder or the same identity")]
    Identity { path: PathBuf, found: String, expected: String },
    /// Another agent holds the state folder.
    #[error("state folder {0} is in use by another agent")]
    Locked(PathBuf),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

pub type Result<T, E = SpoolError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), source }
}

/// When appended data is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Interval(Duration),
    Never,
}

#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: Fsync,
    /// Free space an append must leave on the spool's file system.
    pub reserve_bytes: u64,
}

/// What [`Spool::append`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Kept,
    /// Not kept: the spool holds `max_bytes`.
    Full,
    /// Not kept: the file system has `free` bytes, fewer than the batch and
    /// the reserve need.
    DiskLow {
        free: u64,
    },
}

/// Free bytes of the file system holding `dir` (for unprivileged writers).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Inodes a new segment must leave free: for the checkpoint's temporary
/// file, the dropped ledger and the lock (file systems that report none,
/// like some network ones, say 0 free and u64::MAX total: not checked).
const MIN_FREE_INODES: u64 = 8;

fn inodes_low(dir: &Path) -> std::io::Result<bool> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_files > 0 && s.f_files != u64::MAX && s.f_favail < MIN_FREE_INODES)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Checkpoint {
    identity: String,
    /// Every event with a lower index is acknowledged.
    acked: u64,
    /// Start of the last tick appended or dropped.
    last_tick: Option<i64>,
    /// Highest seq used per customer.
    seqs: BTreeMap<String, i64>,
    /// `meta` of the last appended batch, for when its segment is gone.
    #[serde(default)]
    meta: Option<Vec<u8>>,
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Highest seq used per customer (checkpoint and log).
    pub seqs: HashMap<String, i64>,
    /// Start of the last tick appended or dropped before the restart.
    pub last_tick: Option<i64>,
    /// Appended but unacknowledged events, sent again first.
    pub unacked: u64,
    /// Bytes of a torn or corrupt tail that were cut off.
    pub truncated_bytes: u64,
    /// `meta` of the last batch in the log that had one.
    pub last_meta: Option<Vec<u8>>,
    /// `checkpoint.json` could not be read, and the previous checkpoint was
    /// used (why, for the log).
    pub checkpoint_fallback: Option<String>,
}

/// One batch (a tick's events) being built before it is appended.
#[derive(Debug, Default)]
pub struct Batch {
    body: Vec<u8>,
    count: u32,
    tick_time: i64,
}

const HEADER: usize = 8;
const BODY_HEADER: usize = 8 + 8 + 4;
const META_AT: usize = BODY_HEADER;

impl Batch {
    /// Starts a batch whose last tick begins at `tick_time`, carrying
    /// `meta` (the source's state after this batch; may be empty).
    pub fn start(&mut self, tick_time: i64, meta: &[u8]) {
        self.body.clear();
        self.body.extend_from_slice(&[0; BODY_HEADER]);
        self.body.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        self.body.extend_from_slice(meta);
        self.count = 0;
        self.tick_time = tick_time;
    }

    /// Adds an event; `key` is the Kafka record key (the customer id) and
    /// must be at most 65535 bytes.
    pub fn push(&mut self, seq: i64, key: &[u8], payload: &[u8]) {
        self.body.extend_from_slice(&seq.to_le_bytes());
        let klen = u16::try_from(key.len()).unwrap_or(u16::MAX);
        self.body.extend_from_slice(&klen.to_le_bytes());
        self.body.extend_from_slice(&key[..usize::from(klen)]);
        self.body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.body.extend_from_slice(payload);
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch takes on disk.
    pub fn framed_bytes(&self) -> u64 {
        (HEADER + self.body.len()) as u64
    }
}

/// An event read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub index: u64,
    pub seq: i64,
    pub key: &'a [u8],
    pub payload: &'a [u8],
}

#[derive(Debug)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
}

/// An event inside a batch body: (seq, key start, key end, payload start,
/// payload end).
type EventSpan = (i64, usize, usize, usize, usize);

/// A parsed batch body: its events as (seq, key range, payload range).
#[derive(Debug, Default)]
struct Cursor {
    body: Vec<u8>,
    first: u64,
    events: Vec<EventSpan>,
    /// Next event of `events` to hand out.
    pos: usize,
    /// Segment first index and byte offset of the next batch to read.
    next_segment: u64,
    next_offset: u64,
}

pub struct Spool {
    settings: SpoolSettings,
    identity: String,
    segments: Vec<Segment>,
    writer: Option<File>,
    total_bytes: u64,
    next_index: u64,
    acked: u64,
    /// Index of the next event [`Spool::peek`] returns.
    send_index: u64,
    cursor: Cursor,
    dirty_since: Option<Instant>,
    /// `meta` of the last appended batch.
    last_meta: Option<Vec<u8>>,
    /// `acked` of the checkpoint on disk, and of the one before it:
    /// segments below the previous one's go (see the module docs).
    durable_acked: u64,
    prev_acked: u64,
    /// The next append starts a new segment (the current one is fully
    /// acknowledged and big: it goes once both checkpoints cover it).
    roll_next: bool,
    _lock: File,
}

fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// A parsed batch: first index, tick time, meta range, events.
type Parsed = (u64, i64, (usize, usize), Vec<EventSpan>);

/// Parses a batch body; None if it is malformed (the CRC matched, so this
/// is a bug or a foreign file).
fn parse_body(body: &[u8]) -> Option<Parsed> {
    let first = le_u64(body, 0)?;
    let tick = le_u64(body, 8)? as i64;
    let count = le_u32(body, 16)? as usize;
    let meta_len = le_u32(body, META_AT)? as usize;
    let meta = (META_AT + 4, META_AT + 4 + meta_len);
    if meta.1 > body.len() {
        return None;
    }
    let mut events = Vec::with_capacity(count);
    let mut at = meta.1;
    for _ in 0..count {
        let seq = le_u64(body, at)? as i64;
        let klen = usize::from(u16::from_le_bytes([*body.get(at + 8)?, *body.get(at + 9)?]));
        let ks = at + 10;
        let plen = le_u32(body, ks + klen)? as usize;
        let ps = ks + klen + 4;
        if ps + plen > body.len() {
            return None;
        }
        events.push((seq, ks, ks + klen, ps, ps + plen));
        at = ps + plen;
    }
    (at == body.len()).then_some((first, tick, meta, events))
}

impl Spool {
    /// Opens (or creates) the spool in `settings.dir` for `identity` (the
    /// agent and source the events come from; a folder written for another
    /// identity is refused), recovering seqs and the unacknowledged tail.
    pub fn open(settings: SpoolSettings, identity: &str) -> Result<(Spool, Recovered)> {
        let dir = settings.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::Locked(dir));
        }
        let cp_path = dir.join("checkpoint.json");
        let prev_path = dir.join("checkpoint.prev.json");
        let read = |path: &Path| -> Result<Option<Checkpoint>, String> {
            match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice::<Checkpoint>(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        };
        let (current, prev) = (read(&cp_path), read(&prev_path));
        let mut fallback = None;
        let (checkpoint, prev_acked) = match (current, prev) {
            (Ok(Some(c)), p) => {
                let prev_acked = p.ok().flatten().map_or(c.acked, |p| p.acked.min(c.acked));
                (c, prev_acked)
            }
            (Ok(None), Ok(None)) => (Checkpoint { identity: identity.to_owned(), ..Default::default() }, 0),
            // Torn, unreadable, or gone between the two renames of a write:
            // the previous checkpoint and the segments it does not cover are
            // consistent (segments go only once that one covers them).
            (why, Ok(Some(p))) => {
                fallback = Some(match why {
                    Err(e) => e,
                    _ => format!("{} is missing", cp_path.display()),
                });
                let acked = p.acked;
                (p, acked)
            }
            // No previous checkpoint means none was ever renamed away, and
            // segments go only after that: the log is whole from its start.
            (Err(e), Ok(None)) => {
                fallback = Some(format!("{e}; no previous checkpoint: the log is whole, every event in it is sent again"));
                (Checkpoint { identity: identity.to_owned(), ..Default::default() }, 0)
            }
            (Err(e), Err(_)) | (Ok(None), Err(e)) => {
                return Err(SpoolError::Checkpoint {
                    path: cp_path,
                    message: format!(
                        "{e}; and no readable previous checkpoint. The seqs already used cannot be known: move the folder away and start the agent with a new identity"
                    ),
                })
            }
        };
        if fallback.is_some() {
            // The unreadable file must never become the previous checkpoint
            // (the next write renames the current one to it).
            match std::fs::remove_file(&cp_path) {
                Ok(()) => File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&cp_path)(e)),
            }
        }
        if checkpoint.identity != identity {
            return Err(SpoolError::Identity { path: dir, found: checkpoint.identity, expected: identity.to_owned() });
        }
        let mut rec = Recovered {
            seqs: checkpoint.seqs.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            last_tick: checkpoint.last_tick,
            checkpoint_fallback: fallback,
            ..Default::default()
        };
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let Some(first) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok()) else { continue };
            names.push((first, entry.path()));
        }
        names.sort();
        let mut segments = Vec::new();
        let mut next_index = checkpoint.acked;
        let mut broken = false;
        for (first, path) in names {
            if broken {
                // Everything after a corrupt batch is unreachable: its
                // indexes would not follow on. It was never sent either.
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                rec.truncated_bytes += len;
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let data = std::fs::read(&path).map_err(io(&path))?;
            let mut at = 0usize;
            let mut expected = first;
            while at < data.len() {
                let ok = (|| {
                    let len = le_u32(&data, at)? as usize;
                    let crc = le_u32(&data, at + 4)?;
                    let body = data.get(at + HEADER..at + HEADER + len)?;
                    if crc32(body) != crc {
                        return None;
                    }
                    let (bfirst, tick, meta, events) = parse_body(body)?;
                    if bfirst != expected {
                        return None;
                    }
                    Some((len, tick, meta, events, body))
                })();
                let Some((len, tick, meta, events, body)) = ok else { break };
                if meta.1 > meta.0 {
                    rec.last_meta = Some(body[meta.0..meta.1].to_vec());
                }
                for &(seq, ks, ke, _, _) in &events {
                    let customer = String::from_utf8_lossy(&body[ks..ke]).into_owned();
                    let s = rec.seqs.entry(customer).or_insert(0);
                    *s = (*s).max(seq);
                }
                rec.last_tick = Some(rec.last_tick.map_or(tick, |t| t.max(tick)));
                expected += events.len() as u64;
                at += HEADER + len;
            }
            if at < data.len() {
                rec.truncated_bytes += (data.len() - at) as u64;
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                f.set_len(at as u64).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                broken = true;
            }
            next_index = next_index.max(expected);
            segments.push(Segment { first, path, bytes: at as u64 });
        }
        if rec.last_meta.is_none() {
            rec.last_meta = checkpoint.meta.clone();
        }
        let acked = checkpoint.acked.min(next_index);
        rec.unacked = next_index - acked;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut spool = Spool {
            settings,
            identity: identity.to_owned(),
            segments,
            writer: None,
            total_bytes,
            next_index,
            acked,
            send_index: acked,
            cursor: Cursor::default(),
            dirty_since: None,
            last_meta: rec.last_meta.clone(),
            durable_acked: acked,
            prev_acked: prev_acked.min(acked),
            roll_next: false,
            _lock: lock,
        };
        spool.seek(acked)?;
        Ok((spool, rec))
    }

    /// Free bytes of the file system holding the spool.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        free_bytes(&self.settings.dir)
    }

    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Appended events not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.next_index - self.acked
    }

    /// Appended events not yet handed out by [`Spool::peek`].
    pub fn unsent(&self) -> u64 {
        self.next_index - self.send_index
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Whether [`Spool::append`] would keep `batch`: within the size limit,
    /// leaving the reserve free on the file system (and a few inodes, if it
    /// starts a segment).
    pub fn room_for(&self, batch: &Batch) -> Result<Appended> {
        let framed = batch.framed_bytes();
        if batch.is_empty() {
            return Ok(Appended::Kept);
        }
        if self.total_bytes + framed > self.settings.max_bytes {
            return Ok(Appended::Full);
        }
        let free = free_bytes(&self.settings.dir).map_err(io(&self.settings.dir))?;
        if free < framed.saturating_add(self.settings.reserve_bytes) {
            return Ok(Appended::DiskLow { free });
        }
        if self.rolls(framed) && inodes_low(&self.settings.dir).map_err(io(&self.settings.dir))? {
            return Ok(Appended::DiskLow { free });
        }
        Ok(Appended::Kept)
    }

    fn rolls(&self, framed: u64) -> bool {
        self.roll_next
            || match self.segments.last() {
                None => true,
                Some(s) => s.bytes > 0 && s.bytes + framed > self.settings.segment_bytes,
            }
    }

    /// Appends a batch as one write, unless the spool would exceed its size
    /// limit or leave less than the reserve free on its file system (then
    /// nothing is appended; see [`Spool::room_for`]). An error means
    /// nothing was appended either.
    pub fn append(&mut self, batch: &mut Batch) -> Result<Appended> {
        if batch.is_empty() {
            return Ok(Appended::Kept);
        }
        let room = self.room_for(batch)?;
        if room != Appended::Kept {
            return Ok(room);
        }
        let framed = batch.framed_bytes();
        let roll = self.rolls(framed);
        if roll || self.writer.is_none() {
            self.open_writer(roll)?;
            self.roll_next = false;
        }
        batch.body[0..8].copy_from_slice(&self.next_index.to_le_bytes());
        batch.body[8..16].copy_from_slice(&batch.tick_time.to_le_bytes());
        batch.body[16..20].copy_from_slice(&batch.count.to_le_bytes());
        let mut frame = Vec::with_capacity(framed as usize);
        frame.extend_from_slice(&(batch.body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32(&batch.body).to_le_bytes());
        frame.extend_from_slice(&batch.body);
        let (Some(seg), Some(w)) = (self.segments.last_mut(), self.writer.as_mut()) else {
            return Ok(Appended::Full);
        };
        // One write per tick: a crash tears at most this batch (CRC).
        let written = w.write_all(&frame).and_then(|()| match self.settings.fsync {
            Fsync::Always => w.sync_data(),
            Fsync::Interval(_) | Fsync::Never => Ok(()),
        });
        if let Err(e) = written {
            // Not kept, and the caller is told so (it gives the seqs back and
            // records the tick as dropped): cut the batch off so that the log
            // never holds, and never replays, what was reported lost. The
            // cursor goes back too: a new segment is not in append mode, and
            // the next frame must start where the log ends, not after a hole.
            let _ = w.set_len(seg.bytes);
            let _ = w.seek(SeekFrom::Start(seg.bytes));
            return Err(io(&seg.path)(e));
        }
        seg.bytes += framed;
        self.total_bytes += framed;
        let meta_len = le_u32(&batch.body, META_AT).unwrap_or(0) as usize;
        if meta_len > 0 {
            self.last_meta = Some(batch.body[META_AT + 4..META_AT + 4 + meta_len].to_vec());
        }
        self.next_index += u64::from(batch.count);
        if let Fsync::Interval(_) = self.settings.fsync {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        Ok(Appended::Kept)
    }

    fn open_writer(&mut self, new_segment: bool) -> Result<()> {
        if new_segment || self.segments.is_empty() {
            if let Some(w) = self.writer.take() {
                if self.settings.fsync != Fsync::Never {
                    if let Some(seg) = self.segments.last() {
                        w.sync_data().map_err(io(&seg.path))?;
                    }
                }
            }
            let path = self.settings.dir.join(format!("{:020}.seg", self.next_index));
            let f = OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(io(&path))?;
            self.sync_dir()?;
            self.segments.push(Segment { first: self.next_index, path, bytes: 0 });
            self.writer = Some(f);
        } else if let Some(seg) = self.segments.last() {
            let f = OpenOptions::new().append(true).open(&seg.path).map_err(io(&seg.path))?;
            self.writer = Some(f);
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<()> {
        if self.settings.fsync != Fsync::Never {
            let d = &self.settings.dir;
            File::open(d).and_then(|f| f.sync_all()).map_err(io(d))?;
        }
        Ok(())
    }

    /// Forces appended data to disk if the interval policy says it is time
    /// (or `force`).
    pub fn sync(&mut self, force: bool) -> Result<()> {
        let due = match (self.settings.fsync, self.dirty_since) {
            (_, None) => false,
            (Fsync::Interval(d), Some(t)) => force || t.elapsed() >= d,
            _ => force,
        };
        if due {
            if let (Some(w), Some(seg)) = (self.writer.as_ref(), self.segments.last()) {
                w.sync_data().map_err(io(&seg.path))?;
            }
            self.dirty_since = None;
        }
        Ok(())
    }

    /// The next event to send, if any was appended and not handed out.
    pub fn peek(&mut self) -> Result<Option<Record<'_>>> {
        if self.send_index >= self.next_index {
            return Ok(None);
        }
        if self.cursor.pos >= self.cursor.events.len() && !self.read_next_batch()? {
            return Ok(None);
        }
        let c = &self.cursor;
        let (seq, ks, ke, ps, pe) = c.events[c.pos];
        Ok(Some(Record { index: c.first + c.pos as u64, seq, key: &c.body[ks..ke], payload: &c.body[ps..pe] }))
    }

    /// Moves past the event [`Spool::peek`] returned.
    pub fn advance(&mut self) {
        if self.cursor.pos < self.cursor.events.len() {
            self.cursor.pos += 1;
            self.send_index += 1;
        }
    }

    /// Reads the batch at the cursor's file position; false at the end.
    fn read_next_batch(&mut self) -> Result<bool> {
        loop {
            let Some(i) = self.segments.iter().position(|s| s.first == self.cursor.next_segment) else {
                // The cursor's segment is gone (acknowledged and deleted
                // while the cursor waited at its end): continue in the
                // segment that holds the next event to send.
                match self.segments.iter().rev().find(|s| s.first <= self.send_index) {
                    Some(seg) if seg.first != self.cursor.next_segment => {
                        self.cursor.next_segment = seg.first;
                        self.cursor.next_offset = 0;
                        continue;
                    }
                    _ => return Ok(false),
                }
            };
            let seg = &self.segments[i];
            if self.cursor.next_offset >= seg.bytes {
                match self.segments.get(i + 1) {
                    Some(next) => {
                        self.cursor.next_segment = next.first;
                        self.cursor.next_offset = 0;
                        continue;
                    }
                    None => return Ok(false),
                }
            }
            let f = File::open(&seg.path).map_err(io(&seg.path))?;
            let mut head = [0u8; HEADER];
            f.read_exact_at(&mut head, self.cursor.next_offset).map_err(io(&seg.path))?;
            let len = le_u32(&head, 0).unwrap_or(0) as usize;
            let mut body = std::mem::take(&mut self.cursor.body);
            body.resize(len, 0);
            f.read_exact_at(&mut body, self.cursor.next_offset + HEADER as u64).map_err(io(&seg.path))?;
            let Some((first, _, _, events)) = parse_body(&body) else {
                return Err(SpoolError::Io {
                    path: seg.path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt batch in a segment this agent wrote"),
                });
            };
            self.cursor.next_offset += (HEADER + len) as u64;
            self.cursor.body = body;
            self.cursor.first = first;
            self.cursor.events = events;
            self.cursor.pos = 0;
            if first + self.cursor.events.len() as u64 <= self.send_index {
                continue;
            }
            self.cursor.pos = (self.send_index.saturating_sub(first)) as usize;
            return Ok(true);
        }
    }

    /// Positions the reader at event `index` (acked <= index <= next).
    fn seek(&mut self, index: u64) -> Result<()> {
        self.send_index = index;
        let seg = self.segments.iter().rev().find(|s| s.first <= index).or(self.segments.first());
        self.cursor = Cursor { next_segment: seg.map_or(self.next_index, |s| s.first), ..Cursor::default() };
        Ok(())
    }

    /// After a failed delivery: hand out everything unacknowledged again.
    /// Returns how many events will be sent again.
    pub fn rewind_to_acked(&mut self) -> Result<u64> {
        let again = self.send_index - self.acked;
        self.seek(self.acked)?;
        Ok(again)
    }

    /// Marks every event below `index` + 1 as acknowledged (deliveries are
    /// confirmed in order).
    pub fn ack(&mut self, index: u64) {
        self.acked = self.acked.max((index + 1).min(self.send_index));
    }

    /// Writes the checkpoint (acknowledged position, seqs, last tick) and
    /// deletes the segments the previous checkpoint already covered. On an
    /// error (a full disk) the checkpoints on disk are as they were, and
    /// nothing is deleted.
    pub fn checkpoint(&mut self, seqs: &HashMap<String, i64>, last_tick: Option<i64>) -> Result<()> {
        let cp = Checkpoint {
            identity: self.identity.clone(),
            acked: self.acked,
            last_tick,
            seqs: seqs.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            meta: self.last_meta.clone(),
        };
        let path = self.settings.dir.join("checkpoint.json");
        let prev = self.settings.dir.join("checkpoint.prev.json");
        let tmp = self.settings.dir.join("checkpoint.json.tmp");
        let bytes = serde_json::to_vec(&cp).map_err(|e| SpoolError::Checkpoint { path: path.clone(), message: e.to_string() })?;
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            if self.settings.fsync != Fsync::Never {
                f.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            // Leave no partial file behind to fill the disk further.
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        match std::fs::rename(&path, &prev) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&prev)(e)),
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.sync_dir()?;
        self.prev_acked = self.durable_acked;
        self.durable_acked = self.acked;
        let covered = self.prev_acked;
        // A segment is done when the next one starts at or below what the
        // previous checkpoint covers; the last segment stays (it is being
        // written).
        while self.segments.len() > 1 && self.segments[1].first <= covered {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            self.total_bytes -= seg.bytes;
        }
        // Acknowledged data must not fill the spool: the segment being
        // written goes too once both checkpoints cover everything in it and
        // it is big enough to matter (the checkpoints hold the seqs, the last
        // tick and the meta it would have given); while new ticks keep
        // coming, a fully acknowledged big one is closed instead, so that it
        // goes at the next checkpoint like any other.
        let min_roll = self.settings.segment_bytes.min(self.settings.max_bytes / 4).max(1);
        let big = self.segments.last().is_some_and(|s| s.bytes >= min_roll);
        if covered == self.next_index && self.segments.len() == 1 && big {
            self.writer = None;
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            self.total_bytes -= seg.bytes;
            self.seek(self.next_index)?;
        } else if self.durable_acked == self.next_index && big {
            self.roll_next = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max: u64) -> SpoolSettings {
        SpoolSettings { dir: dir.to_owned(), max_bytes: max, segment_bytes: 4096, fsync: Fsync::Never, reserve_bytes: 0 }
    }

    fn tick(spool: &mut Spool, t: i64, seqs: &mut HashMap<String, i64>, n: usize) -> bool {
        let mut b = Batch::default();
        b.start(t, format!("meta {t}").as_bytes());
        for i in 0..n {
            let c = format!("c{}", i % 3);
            let s = seqs.entry(c.clone()).or_insert(0);
            *s += 1;
            b.push(*s, c.as_bytes(), format!("payload {t} {i} {}", "x".repeat(100)).as_bytes());
        }
        spool.append(&mut b).unwrap() == Appended::Kept
    }

    fn drain(spool: &mut Spool) -> Vec<(u64, i64, String)> {
        let mut out = Vec::new();
        while let Some(r) = spool.peek().unwrap() {
            out.push((r.index, r.seq, String::from_utf8(r.payload.to_vec()).unwrap()));
            spool.advance();
        }
        out
    }

    #[test]
    fn replays_in_order_after_restart_and_never_reuses_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut seqs = HashMap::new();
        {
            let (mut s, rec) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
            assert_eq!(rec.unacked, 0);
            for t in 0..30 {
                assert!(tick(&mut s, t * 1000, &mut seqs, 7));
            }
            let sent = drain(&mut s);
            assert_eq!(sent.len(), 210);
            assert!(sent.windows(2).all(|w| w[1].0 == w[0].0 + 1));
            s.ack(99);
            s.checkpoint(&seqs, Some(29_000)).unwrap();
            // More ticks after the checkpoint, then a "crash" (drop).
            assert!(tick(&mut s, 30_000, &mut seqs, 7));
        }
        let (mut s, rec) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
        assert_eq!(rec.unacked, 217 - 100);
        assert_eq!(rec.seqs, seqs, "seqs recovered from checkpoint + log");
        assert_eq!(rec.last_tick, Some(30_000));
        assert_eq!(rec.last_meta.as_deref(), Some(&b"meta 30000"[..]));
        let again = drain(&mut s);
        assert_eq!(again.first().unwrap().0, 100);
        assert_eq!(again.len(), 117);
        assert!(again.last().unwrap().2.starts_with("payload 30000 6"));
        // Another identity is refused; a second agent on the folder too.
        drop(s);
        assert!(matches!(Spool::open(settings(dir.path(), 1 << 20), "b"), Err(SpoolError::Identity { .. })));
        let (_held, _) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
        assert!(matches!(Spool::open(settings(dir.path(), 1 << 20), "a"), Err(SpoolError::Locked(_))));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut seqs = HashMap::new();
        {
            let (mut s, _) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
            for t in 0..20 {
                tick(&mut s, t, &mut seqs, 10);
            }
            assert!(s.segments.len() > 3, "segments roll at 4096 bytes");
            let before = s.bytes();
            drain(&mut s);
            s.ack(149);
            s.checkpoint(&seqs, None).unwrap();
            assert_eq!(s.bytes(), before, "segments go once the previous checkpoint covers them too");
            s.checkpoint(&seqs, None).unwrap();
            assert!(s.bytes() < before);
            assert!(s.segments[0].first <= 150);
        }
        // Tear the last batch: append half a frame of garbage.
        let mut segs: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut f = OpenOptions::new().append(true).open(last).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
        drop(f);
        let (mut s, rec) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
        assert_eq!(rec.truncated_bytes, 9);
        assert_eq!(rec.unacked, 50);
        assert_eq!(drain(&mut s).len(), 50);
        // Appending continues cleanly after the cut.
        assert!(tick(&mut s, 99, &mut seqs, 4));
        assert_eq!(drain(&mut s).len(), 4);
    }

    #[test]
    fn acknowledged_data_never_fills_the_spool_and_state_survives_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut seqs = HashMap::new();
        let mut last = 0i64;
        {
            let (mut s, _) = Spool::open(settings(dir.path(), 8192), "a").unwrap();
            // Until at least 200 ticks are through and the log is empty
            // (everything acknowledged and rolled away).
            loop {
                assert!(tick(&mut s, last, &mut seqs, 3), "tick {last} refused although everything was acknowledged");
                let sent = drain(&mut s);
                s.ack(sent.last().unwrap().0);
                s.checkpoint(&seqs, Some(last)).unwrap();
                assert!(s.bytes() < 8192);
                // An idle turn: both checkpoints cover everything.
                if last % 7 == 0 {
                    s.checkpoint(&seqs, Some(last)).unwrap();
                }
                if last >= 200 && s.segments.is_empty() {
                    break;
                }
                last += 1;
            }
        }
        let (mut s, rec) = Spool::open(settings(dir.path(), 8192), "a").unwrap();
        assert_eq!(rec.seqs, seqs);
        assert_eq!(rec.unacked, 0);
        assert_eq!(rec.last_meta, Some(format!("meta {last}").into_bytes()));
        assert_eq!(rec.last_tick, Some(last));
        assert!(drain(&mut s).is_empty());
        assert!(tick(&mut s, 1001, &mut seqs, 3));
        assert_eq!(drain(&mut s).len(), 3);
    }

    #[test]
    fn reader_continues_when_the_segment_it_finished_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut seqs = HashMap::new();
        let (mut s, _) = Spool::open(settings(dir.path(), 1 << 20), "a").unwrap();
        // Fill the first segment, send and acknowledge all of it.
        while s.segments.len() < 2 {
            tick(&mut s, 0, &mut seqs, 5);
            if s.segments.len() < 2 {
                let sent = drain(&mut s);
                s.ack(sent.last().unwrap().0);
            }
        }
        // The batch that rolled into segment 2 is not read yet; the first
        // segment is fully acknowledged and goes once two checkpoints cover it.
        assert_eq!(s.acked(), s.segments[1].first);
        s.checkpoint(&seqs, None).unwrap();
        assert_eq!(s.segments.len(), 2);
        s.checkpoint(&seqs, None).unwrap();
        assert_eq!(s.segments.len(), 1);
        assert_eq!(drain(&mut s).len(), 5);
    }

    #[test]
    fn full_spool_refuses_whole_ticks_and_rewind_sends_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut seqs = HashMap::new();
        let (mut s, _) = Spool::open(settings(dir.path(), 8192), "a").unwrap();
        let mut kept = 0;
        let mut refused = 0;
        for t in 0..40 {
            if tick(&mut s, t, &mut seqs, 5) {
                kept += 5;
            } else {
                refused += 5;
            }
        }
        assert!(refused > 0 && kept > 0);
        assert!(s.bytes() <= 8192);
        assert_eq!(s.backlog(), kept);
        let first = drain(&mut s);
        s.ack(9);
        assert_eq!(s.rewind_to_acked().unwrap(), kept - 10);
        let second = drain(&mut s);
        assert_eq!(&first[10..], &second[..]);
    }
}
