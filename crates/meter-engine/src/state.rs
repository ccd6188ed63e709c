//! The processor's state changelog encoding.
//!
//! Every change to a window, a dedup stream, a partition clock or a seq-less
//! event id is written as one record to the compacted state topic, on the
//! partition of the input partition it belongs to, in the same Kafka
//! transaction as the window revisions and the consumed offsets. Restoring a
//! partition replays its changelog partition; a tombstone (no value) removes
//! the entry. Keys identify the entry unambiguously (length-prefixed fields),
//! so compaction keeps exactly the latest value of each.

use std::collections::BTreeMap;

use meter_avro::binary::{Reader, Writer};
use meter_avro::DecodeError;
use meter_model::{Granularity, Millis, WindowKey};

use crate::dedup::SeqTracker;

const WINDOW: i64 = EntryKind::Window as i64;
const STREAM: i64 = EntryKind::Stream as i64;
const CLOCK: i64 = EntryKind::Clock as i64;
const UNSEQUENCED: i64 = EntryKind::Unsequenced as i64;
/// Version of the value encodings, first in every value.
const VERSION: i64 = 1;

/// One changelog record: the input partition it belongs to (and is written
/// to), its key, and its value or None for a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The kinds of changelog entries: the first field of every key, and the
/// order the on-disk store sorts them in within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    Window = 1,
    Stream = 2,
    Clock = 3,
    Unsequenced = 4,
}

/// The kind of a changelog entry and the time it is indexed by in the
/// on-disk store: a window's end, a seq-less id set's day start, 0 for
/// streams and clocks. Decodes only the key's leading fields.
pub fn index(key: &[u8]) -> Result<(EntryKind, Millis), DecodeError> {
    let mut r = Reader::new(key);
    match r.long()? {
        WINDOW => {
            let g = Granularity::from_index(r.long()?).ok_or_else(|| malformed("granularity"))?;
            let start = r.long()?;
            Ok((EntryKind::Window, start.saturating_add(g.size_ms())))
        }
        STREAM => Ok((EntryKind::Stream, 0)),
        CLOCK => Ok((EntryKind::Clock, 0)),
        UNSEQUENCED => {
            r.long()?;
            Ok((EntryKind::Unsequenced, r.long()?))
        }
        t => Err(malformed(&format!("unknown entry type {t}"))),
    }
}

pub(crate) enum Key {
    Window(WindowKey),
    Stream(String, String),
    Clock(i32),
    Unsequenced(i32, Millis, String),
}

pub(crate) fn window_key(k: &WindowKey) -> Vec<u8> {
    let mut buf = Vec::with_capacity(96);
    let mut w = Writer(&mut buf);
    w.long(WINDOW);
    w.long(i64::from(k.granularity.index()));
    w.long(k.window_start);
    for s in [&k.customer_id, &k.service, &k.usage_type, &k.region, &k.resource_id] {
        w.string(s);
    }
    buf
}

/// A window's state as written to and read from the changelog: absolute
/// times and full-width sums (the engine keeps a more compact form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowValue {
    pub(crate) count: i64,
    pub(crate) sum: i128,
    pub(crate) min: i64,
    pub(crate) max: i64,
    pub(crate) first: Millis,
    pub(crate) last: Millis,
    pub(crate) revision: i64,
    pub(crate) emitted_sum: i128,
    pub(crate) is_final: bool,
}

pub(crate) fn window_entry(k: &WindowKey, partition: i32, s: &WindowValue) -> StateChange {
    let mut v = Vec::with_capacity(64);
    let mut w = Writer(&mut v);
    w.long(VERSION);
    w.long(s.count);
    w.decimal(s.sum);
    w.long(s.min);
    w.long(s.max);
    w.long(s.first);
    w.long(s.last);
    w.long(s.revision);
    w.decimal(s.emitted_sum);
    w.boolean(s.is_final);
    StateChange { partition, key: window_key(k), value: Some(v) }
}

pub(crate) fn window_tombstone(k: &WindowKey, partition: i32) -> StateChange {
    StateChange { partition, key: window_key(k), value: None }
}

pub(crate) fn stream_key(agent: &str, customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(48);
    let mut w = Writer(&mut key);
    w.long(STREAM);
    w.string(agent);
    w.string(customer);
    key
}

pub(crate) fn stream_entry(agent: &str, customer: &str, partition: i32, t: &SeqTracker) -> StateChange {
    let key = stream_key(agent, customer);
    let (high, gaps) = t.parts();
    let mut v = Vec::with_capacity(16 + 8 * gaps.len());
    let mut w = Writer(&mut v);
    w.long(VERSION);
    match high {
        None => w.long(0),
        Some(h) => {
            w.long(1);
            w.long(h);
        }
    }
    w.long(gaps.len() as i64);
    for (&start, &end) in gaps {
        w.long(start);
        w.long(end);
    }
    StateChange { partition, key, value: Some(v) }
}

pub(crate) fn clock_key(partition: i32) -> Vec<u8> {
    let mut key = Vec::with_capacity(4);
    Writer(&mut key).long(CLOCK);
    Writer(&mut key).long(i64::from(partition));
    key
}

pub(crate) fn clock_entry(partition: i32, watermark: Millis, max_event_time: Millis) -> StateChange {
    let key = clock_key(partition);
    let mut v = Vec::with_capacity(24);
    let mut w = Writer(&mut v);
    w.long(VERSION);
    w.long(watermark);
    w.long(max_event_time);
    StateChange { partition, key, value: Some(v) }
}

pub(crate) fn unsequenced_key(partition: i32, day: Millis, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + id.len());
    let mut w = Writer(&mut key);
    w.long(UNSEQUENCED);
    w.long(i64::from(partition));
    w.long(day);
    w.string(id);
    key
}

pub(crate) fn unsequenced_entry(partition: i32, day: Millis, id: &str, payload_hash: u64) -> StateChange {
    let mut v = Vec::with_capacity(12);
    let mut w = Writer(&mut v);
    w.long(VERSION);
    w.long(payload_hash as i64);
    StateChange { partition, key: unsequenced_key(partition, day, id), value: Some(v) }
}

pub(crate) fn unsequenced_tombstone(partition: i32, day: Millis, id: &str) -> StateChange {
    StateChange { partition, key: unsequenced_key(partition, day, id), value: None }
}

fn malformed(msg: &str) -> DecodeError {
    DecodeError::Malformed(format!("state changelog: {msg}"))
}

fn int(v: i64) -> Result<i32, DecodeError> {
    i32::try_from(v).map_err(|_| malformed("partition out of range"))
}

pub(crate) fn decode_key(key: &[u8]) -> Result<Key, DecodeError> {
    let mut r = Reader::new(key);
    let k = match r.long()? {
        WINDOW => {
            let g = r.long()?;
            let granularity = Granularity::from_index(g).ok_or_else(|| malformed("granularity"))?;
            Key::Window(WindowKey {
                granularity,
                window_start: r.long()?,
                customer_id: r.string()?,
                service: r.string()?,
                usage_type: r.string()?,
                region: r.string()?,
                resource_id: r.string()?,
            })
        }
        STREAM => Key::Stream(r.string()?, r.string()?),
        CLOCK => Key::Clock(int(r.long()?)?),
        UNSEQUENCED => Key::Unsequenced(int(r.long()?)?, r.long()?, r.string()?),
        t => return Err(malformed(&format!("unknown entry type {t}"))),
    };
    r.finish()?;
    Ok(k)
}

fn version(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    match r.long()? {
        VERSION => Ok(()),
        v => Err(malformed(&format!("unknown value version {v}"))),
    }
}

pub(crate) fn decode_window(v: &[u8]) -> Result<WindowValue, DecodeError> {
    let mut r = Reader::new(v);
    version(&mut r)?;
    let w = WindowValue {
        count: r.long()?,
        sum: r.decimal()?,
        min: r.long()?,
        max: r.long()?,
        first: r.long()?,
        last: r.long()?,
        revision: r.long()?,
        emitted_sum: r.decimal()?,
        is_final: r.boolean()?,
    };
    r.finish()?;
    Ok(w)
}

pub(crate) fn decode_stream(v: &[u8]) -> Result<SeqTracker, DecodeError> {
    let mut r = Reader::new(v);
    version(&mut r)?;
    let high = match r.long()? {
        0 => None,
        1 => Some(r.long()?),
        _ => return Err(malformed("stream high branch")),
    };
    let n = r.long()?;
    if n < 0 || n as usize > v.len() {
        return Err(malformed("gap count"));
    }
    let mut gaps = BTreeMap::new();
    for _ in 0..n {
        gaps.insert(r.long()?, r.long()?);
    }
    r.finish()?;
    Ok(SeqTracker::from_parts(high, gaps))
}

pub(crate) fn decode_clock(v: &[u8]) -> Result<(Millis, Millis), DecodeError> {
    let mut r = Reader::new(v);
    version(&mut r)?;
    let c = (r.long()?, r.long()?);
    r.finish()?;
    Ok(c)
}

pub(crate) fn decode_unsequenced(v: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new(v);
    version(&mut r)?;
    let h = r.long()? as u64;
    r.finish()?;
    Ok(h)
}
