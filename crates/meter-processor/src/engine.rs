//! Validation, deduplication, watermarks and window aggregation.

use std::collections::{BTreeMap, HashMap, HashSet};

use meter_avro::Codec;
use meter_model::catalog::Lookup;
use meter_model::{AggregatedUsage, Catalog, DeadLetterReason, Granularity, Millis, UsageEvent, WindowKey};

use crate::auth::AgentRegistry;
use crate::dedup::SeqTracker;
use crate::state::{self, StateChange};

/// 2100-01-01T00:00:00Z: event times at or past it are not believable.
const MAX_EVENT_TIME: Millis = 4_102_444_800_000;

/// Limits and time settings of the engine (see `meter-config` for their
/// meaning and defaults).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub allowed_lateness_ms: Millis,
    pub correction_horizon_ms: Millis,
    pub max_clock_skew_ms: Millis,
    pub idle_timeout_ms: Millis,
    pub max_payload_bytes: usize,
    pub max_string_bytes: usize,
    /// Agents and the customers they may publish for.
    pub agents: AgentRegistry,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            allowed_lateness_ms: 5 * 60_000,
            correction_horizon_ms: 35 * 86_400_000,
            max_clock_skew_ms: 5 * 60_000,
            idle_timeout_ms: 10_000,
            max_payload_bytes: 64 * 1024,
            max_string_bytes: 256,
            agents: AgentRegistry::default(),
        }
    }
}

/// One input record as read from `usage.events`.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// What became of one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Aggregated,
    Duplicate,
    DeadLetter { reason: DeadLetterReason, detail: String },
}

/// Totals of outcomes since the engine started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub aggregated: u64,
    pub duplicates: u64,
    pub dead_letters: BTreeMap<DeadLetterReason, u64>,
}

impl Counters {
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    pub fn total(&self) -> u64 {
        self.aggregated + self.duplicates + self.dead_lettered()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowState {
    pub(crate) partition: i32,
    pub(crate) count: i64,
    pub(crate) sum: i128,
    pub(crate) min: i64,
    pub(crate) max: i64,
    pub(crate) first: Millis,
    pub(crate) last: Millis,
    pub(crate) revision: i64,
    pub(crate) emitted_sum: i128,
    pub(crate) is_final: bool,
    pub(crate) dirty: bool,
}

/// Event-time progress of one input partition.
#[derive(Debug, Clone, Copy)]
struct PartitionClock {
    watermark: Millis,
    max_event_time: Millis,
    last_record_at: Millis,
    /// (watermark, max_event_time) as last written to the changelog.
    saved: (Millis, Millis),
}

impl PartitionClock {
    /// Advances the watermark: the highest event time seen, never ahead of
    /// the wall clock, and moving with the wall clock once the partition has
    /// been idle for `idle_timeout`.
    fn advance(&mut self, now: Millis, idle_timeout: Millis) {
        let mut wm = self.watermark.max(self.max_event_time.min(now));
        if now - self.last_record_at >= idle_timeout {
            wm = wm.max(now - idle_timeout);
        }
        self.watermark = wm;
    }
}

pub struct Engine {
    catalog: Catalog,
    codec: Codec,
    cfg: EngineConfig,
    windows: HashMap<WindowKey, WindowState>,
    dirty: Vec<WindowKey>,
    clocks: HashMap<i32, PartitionClock>,
    /// Dedup state per (agent_id, customer_id), with the input partition
    /// the stream's events arrive on (a customer's events share one).
    streams: HashMap<(String, String), (i32, SeqTracker)>,
    /// Streams changed since the last [`Engine::take_changes`].
    changed_streams: HashSet<(String, String)>,
    /// Event ids of seq-less events remembered since the last take_changes.
    new_unsequenced: Vec<(i32, Millis, String, u64)>,
    /// Changelog entries produced by flushes and not yet taken.
    changes: Vec<StateChange>,
    /// Wall-clock time of the last flush.
    last_flush: Millis,
    /// Fallback dedup for events without a seq: event ids per partition and
    /// day window, forgotten with the day window.
    /// event id -> FNV-1a hash of its payload, to tell a replay (same
    /// bytes: duplicate) from a conflict (same id, other bytes).
    unsequenced: HashMap<(i32, Millis), HashMap<String, u64>>,
    counters: Counters,
}

type Rejection = (DeadLetterReason, String);

impl Engine {
    pub fn new(catalog: Catalog, codec: Codec, cfg: EngineConfig) -> Self {
        Engine {
            catalog,
            codec,
            cfg,
            windows: HashMap::new(),
            dirty: Vec::new(),
            clocks: HashMap::new(),
            streams: HashMap::new(),
            changed_streams: HashSet::new(),
            new_unsequenced: Vec::new(),
            changes: Vec::new(),
            last_flush: Millis::MIN,
            unsequenced: HashMap::new(),
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// (agent, customer) seq streams held in dedup state.
    pub fn dedup_streams(&self) -> usize {
        self.streams.len()
    }

    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Windows whose final revision has not been emitted yet, plus windows
    /// changed since the last flush.
    pub fn unsettled_windows(&self) -> usize {
        self.dirty.len() + self.windows.values().filter(|w| !w.is_final && !w.dirty).count()
    }

    /// True when, as of the last flush, nothing is left to emit: no window
    /// changed since, every partition was idle long enough at that flush for
    /// its watermark to follow the wall clock, and every window that
    /// watermark closes is final. Windows the wall clock has not closed yet
    /// (e.g. today's day window) stay open.
    pub fn drained(&self) -> bool {
        let lateness = self.cfg.allowed_lateness_ms;
        self.dirty.is_empty()
            && self.clocks.values().all(|c| self.last_flush.saturating_sub(c.last_record_at) >= self.cfg.idle_timeout_ms)
            && self.windows.iter().all(|(k, w)| {
                w.is_final || self.clocks.get(&w.partition).is_none_or(|c| k.window_end().saturating_add(lateness) > c.watermark)
            })
    }

    /// The watermark of `partition`, if it has seen any record.
    pub fn watermark(&self, partition: i32) -> Option<Millis> {
        self.clocks.get(&partition).map(|c| c.watermark)
    }

    /// Classifies and, where valid and new, aggregates one record.
    pub fn process(&mut self, input: Input<'_>, now: Millis) -> Outcome {
        let outcome = match self.try_process(input, now) {
            Ok(true) => Outcome::Aggregated,
            Ok(false) => Outcome::Duplicate,
            Err((reason, detail)) => Outcome::DeadLetter { reason, detail },
        };
        match &outcome {
            Outcome::Aggregated => self.counters.aggregated += 1,
            Outcome::Duplicate => self.counters.duplicates += 1,
            Outcome::DeadLetter { reason, .. } => *self.counters.dead_letters.entry(*reason).or_default() += 1,
        }
        outcome
    }

    fn try_process(&mut self, input: Input<'_>, now: Millis) -> Result<bool, Rejection> {
        let clock = self.clocks.entry(input.partition).or_insert(PartitionClock {
            watermark: Millis::MIN,
            max_event_time: Millis::MIN,
            last_record_at: now,
            saved: (Millis::MIN, Millis::MIN),
        });
        clock.last_record_at = now;
        let payload = match input.payload {
            None | Some([]) => return Err((DeadLetterReason::EmptyPayload, "record has no value".into())),
            Some(p) => p,
        };
        if payload.len() > self.cfg.max_payload_bytes {
            return Err((
                DeadLetterReason::OversizePayload,
                format!("payload of {} bytes exceeds the limit of {}", payload.len(), self.cfg.max_payload_bytes),
            ));
        }
        let key = match input.key {
            None | Some([]) => return Err((DeadLetterReason::MissingKey, "record has no key; events are keyed by customer_id".into())),
            Some(k) => k,
        };
        let event = self.codec.decode_event(payload).map_err(|e| (e.reason(), e.to_string()))?;
        self.validate(&event, key, now)?;
        let windows = self.check_time(&event, input.partition)?;
        // Only events without a seq are deduplicated by id and need the hash.
        let payload_hash = if event.seq.is_none() { fnv1a(payload) } else { 0 };
        if self.is_duplicate(&event, input.partition, payload_hash)? {
            return Ok(false);
        }
        self.check_overflow(&event, &windows)?;
        self.remember(&event, input.partition, payload_hash);
        self.aggregate(&event, windows, input.partition);
        if let Some(clock) = self.clocks.get_mut(&input.partition) {
            clock.max_event_time = clock.max_event_time.max(event.event_time);
        }
        Ok(true)
    }

    fn validate(&self, e: &UsageEvent, key: &[u8], now: Millis) -> Result<(), Rejection> {
        if e.customer_id.is_empty() {
            return Err((DeadLetterReason::EmptyCustomerId, "customer_id is empty".into()));
        }
        if key != e.customer_id.as_bytes() {
            return Err((DeadLetterReason::KeyMismatch, "record key differs from customer_id".into()));
        }
        let max = self.cfg.max_string_bytes;
        let fields = [
            ("event_id", &e.event_id),
            ("agent_id", &e.agent_id),
            ("customer_id", &e.customer_id),
            ("service", &e.service),
            ("usage_type", &e.usage_type),
            ("resource_id", &e.resource_id),
            ("region", &e.region),
        ];
        for (name, value) in fields {
            if value.len() > max {
                return Err((DeadLetterReason::StringTooLong, format!("{name} is {} bytes, the limit is {max}", value.len())));
            }
        }
        if e.attributes.iter().any(|(k, v)| k.len() > max || v.len() > max) {
            return Err((DeadLetterReason::StringTooLong, format!("an attribute is longer than {max} bytes")));
        }
        self.cfg.agents.check(&e.agent_id, &e.customer_id).map_err(|detail| (DeadLetterReason::Unauthorized, detail))?;
        match self.catalog.lookup(&e.service, &e.usage_type) {
            Lookup::Known(_) => {}
            Lookup::UnknownService => {
                return Err((DeadLetterReason::UnknownService, format!("service {:?} is not in the catalog", e.service)))
            }
            Lookup::UnknownUsageType => {
                return Err((
                    DeadLetterReason::UnknownUsageType,
                    format!("usage type {:?} of service {:?} is not in the catalog", e.usage_type, e.service),
                ))
            }
        }
        if e.quantity < 0 {
            return Err((DeadLetterReason::NegativeQuantity, format!("quantity {} is negative", e.quantity)));
        }
        if e.event_time <= 0 || e.event_time >= MAX_EVENT_TIME {
            return Err((DeadLetterReason::InvalidTimestamp, format!("event_time {} is outside 1970..2100", e.event_time)));
        }
        if e.event_time > now + self.cfg.max_clock_skew_ms {
            return Err((
                DeadLetterReason::FutureTimestamp,
                format!("event_time {} is {} ms ahead of the processor clock", e.event_time, e.event_time - now),
            ));
        }
        Ok(())
    }

    fn window_keys(&self, e: &UsageEvent) -> [WindowKey; 3] {
        let resource_id = match self.catalog.lookup(&e.service, &e.usage_type) {
            Lookup::Known(info) if info.key_by_resource => e.resource_id.clone(),
            _ => String::new(),
        };
        Granularity::ALL.map(|g| WindowKey {
            granularity: g,
            window_start: g.window_start(e.event_time),
            customer_id: e.customer_id.clone(),
            service: e.service.clone(),
            usage_type: e.usage_type.clone(),
            region: e.region.clone(),
            resource_id: resource_id.clone(),
        })
    }

    /// Rejects events whose minute window is past the correction horizon.
    /// The minute window closes first, so its hour and day windows are then
    /// still within the horizon too.
    fn check_time(&self, e: &UsageEvent, partition: i32) -> Result<[WindowKey; 3], Rejection> {
        let keys = self.window_keys(e);
        let watermark = self.clocks.get(&partition).map_or(Millis::MIN, |c| c.watermark);
        let minute_end = keys[0].window_end();
        if minute_end.saturating_add(self.cfg.correction_horizon_ms) <= watermark {
            return Err((
                DeadLetterReason::TooLate,
                format!("event_time {} is past the correction horizon (watermark {watermark})", e.event_time),
            ));
        }
        Ok(keys)
    }

    fn is_duplicate(&self, e: &UsageEvent, partition: i32, payload_hash: u64) -> Result<bool, Rejection> {
        match e.seq {
            Some(seq) => Ok(self.streams.get(&(e.agent_id.clone(), e.customer_id.clone())).is_some_and(|(_, t)| t.is_duplicate(seq))),
            None => {
                match self.unsequenced.get(&(partition, Granularity::Day.window_start(e.event_time))).and_then(|ids| ids.get(&e.event_id)) {
                    None => Ok(false),
                    Some(&h) if h == payload_hash => Ok(true),
                    Some(_) => Err((
                        DeadLetterReason::EventIdConflict,
                        format!("event_id {:?} was seen before with a different payload", e.event_id),
                    )),
                }
            }
        }
    }

    fn remember(&mut self, e: &UsageEvent, partition: i32, payload_hash: u64) {
        match e.seq {
            Some(seq) => {
                let id = (e.agent_id.clone(), e.customer_id.clone());
                let entry = self.streams.entry(id.clone()).or_insert_with(|| (partition, SeqTracker::default()));
                entry.0 = partition;
                entry.1.record(seq);
                self.changed_streams.insert(id);
            }
            None => {
                let day = Granularity::Day.window_start(e.event_time);
                self.unsequenced.entry((partition, day)).or_default().insert(e.event_id.clone(), payload_hash);
                self.new_unsequenced.push((partition, day, e.event_id.clone(), payload_hash));
            }
        }
    }

    fn check_overflow(&self, e: &UsageEvent, keys: &[WindowKey; 3]) -> Result<(), Rejection> {
        for k in keys {
            if let Some(w) = self.windows.get(k) {
                if w.sum.checked_add(i128::from(e.quantity)).is_none() || w.count == i64::MAX {
                    return Err((
                        DeadLetterReason::QuantityOverflow,
                        format!("adding {} would overflow the {} window sum", e.quantity, k.granularity.as_str()),
                    ));
                }
            }
        }
        Ok(())
    }

    fn aggregate(&mut self, e: &UsageEvent, keys: [WindowKey; 3], partition: i32) {
        for k in keys {
            let w = self.windows.entry(k.clone()).or_insert(WindowState {
                partition,
                count: 0,
                sum: 0,
                min: i64::MAX,
                max: i64::MIN,
                first: Millis::MAX,
                last: Millis::MIN,
                revision: 0,
                emitted_sum: 0,
                is_final: false,
                dirty: false,
            });
            w.count += 1;
            w.sum += i128::from(e.quantity);
            w.min = w.min.min(e.quantity);
            w.max = w.max.max(e.quantity);
            w.first = w.first.min(e.event_time);
            w.last = w.last.max(e.event_time);
            if !w.dirty {
                w.dirty = true;
                self.dirty.push(k);
            }
        }
    }

    /// Advances watermarks and returns one new revision for every window
    /// changed since the last flush and for every window whose final
    /// revision is now due. Forgets windows past the correction horizon.
    pub fn flush(&mut self, now: Millis) -> Vec<AggregatedUsage> {
        self.last_flush = now;
        for clock in self.clocks.values_mut() {
            clock.advance(now, self.cfg.idle_timeout_ms);
        }
        let lateness = self.cfg.allowed_lateness_ms;
        let clocks = &self.clocks;
        let closed = |k: &WindowKey, w: &WindowState| {
            clocks.get(&w.partition).is_some_and(|c| k.window_end().saturating_add(lateness) <= c.watermark)
        };
        let mut out = Vec::with_capacity(self.dirty.len());
        let changes = &mut self.changes;
        for k in self.dirty.drain(..) {
            if let Some(w) = self.windows.get_mut(&k) {
                w.dirty = false;
                w.is_final |= closed(&k, w);
                let a = emit(k, w);
                changes.push(state::window_entry(&a.key, w));
                out.push(a);
            }
        }
        for (k, w) in self.windows.iter_mut() {
            if !w.is_final && closed(k, w) {
                w.is_final = true;
                let a = emit(k.clone(), w);
                changes.push(state::window_entry(&a.key, w));
                out.push(a);
            }
        }
        let horizon = self.cfg.correction_horizon_ms;
        self.windows.retain(|k, w| {
            let expired = w.is_final && clocks.get(&w.partition).is_some_and(|c| k.window_end().saturating_add(horizon) <= c.watermark);
            if expired {
                changes.push(state::window_tombstone(k, w.partition));
            }
            !expired
        });
        self.unsequenced.retain(|&(p, day), ids| {
            let keep = clocks.get(&p).is_none_or(|c| (day + Granularity::Day.size_ms()).saturating_add(horizon) > c.watermark);
            if !keep {
                changes.extend(ids.keys().map(|id| state::unsequenced_tombstone(p, day, id)));
            }
            keep
        });
        for (&p, c) in self.clocks.iter_mut() {
            if c.saved != (c.watermark, c.max_event_time) {
                c.saved = (c.watermark, c.max_event_time);
                changes.push(state::clock_entry(p, c.watermark, c.max_event_time));
            }
        }
        out
    }

    /// The state changelog entries for everything changed since the last
    /// call, to be written in the same transaction as the revisions of the
    /// preceding [`Engine::flush`] and the consumed offsets. Call right
    /// after `flush`.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut out = std::mem::take(&mut self.changes);
        for id in self.changed_streams.drain() {
            if let Some((p, t)) = self.streams.get(&id) {
                out.push(state::stream_entry(&id.0, &id.1, *p, t));
            }
        }
        out.extend(self.new_unsequenced.drain(..).map(|(p, day, id, hash)| state::unsequenced_entry(p, day, &id, hash)));
        out
    }

    /// Applies one changelog entry (a tombstone when `value` is None) while
    /// restoring the state of `partition` before processing it.
    pub fn restore(&mut self, partition: i32, key: &[u8], value: Option<&[u8]>, now: Millis) -> Result<(), meter_avro::DecodeError> {
        match state::decode_key(key)? {
            state::Key::Window(k) => match value {
                None => {
                    self.windows.remove(&k);
                }
                Some(v) => {
                    let w = state::decode_window(v, partition)?;
                    self.windows.insert(k, w);
                }
            },
            state::Key::Stream(agent, customer) => match value {
                None => {
                    self.streams.remove(&(agent, customer));
                }
                Some(v) => {
                    let t = state::decode_stream(v)?;
                    self.streams.insert((agent, customer), (partition, t));
                }
            },
            state::Key::Clock(p) => {
                if let Some(v) = value {
                    let (watermark, max_event_time) = state::decode_clock(v)?;
                    let saved = (watermark, max_event_time);
                    self.clocks.insert(p, PartitionClock { watermark, max_event_time, last_record_at: now, saved });
                }
            }
            state::Key::Unsequenced(p, day, id) => match value {
                None => {
                    if let Some(ids) = self.unsequenced.get_mut(&(p, day)) {
                        ids.remove(&id);
                    }
                }
                Some(v) => {
                    let hash = state::decode_unsequenced(v)?;
                    self.unsequenced.entry((p, day)).or_default().insert(id, hash);
                }
            },
        }
        Ok(())
    }

    /// Forgets the windows and clock of a partition this instance no longer
    /// owns.
    pub fn drop_partition(&mut self, partition: i32) {
        self.windows.retain(|_, w| w.partition != partition);
        let windows = &self.windows;
        self.dirty.retain(|k| windows.contains_key(k));
        self.clocks.remove(&partition);
        self.unsequenced.retain(|(p, _), _| *p != partition);
        self.streams.retain(|_, (p, _)| *p != partition);
        let streams = &self.streams;
        self.changed_streams.retain(|id| streams.contains_key(id));
        self.new_unsequenced.retain(|(p, _, _, _)| *p != partition);
        self.changes.retain(|c| c.partition != partition);
    }

    /// Forgets everything: after an aborted transaction the state must be
    /// restored from the changelog again.
    pub fn reset(&mut self) {
        let counters = std::mem::take(&mut self.counters);
        *self = Engine::new(self.catalog.clone(), self.codec.clone(), self.cfg.clone());
        self.counters = counters;
    }
}

/// FNV-1a, 64 bit: a payload fingerprint that stays the same across
/// builds (it is stored in the changelog), unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn emit(key: WindowKey, w: &mut WindowState) -> AggregatedUsage {
    w.revision += 1;
    let delta = w.sum - w.emitted_sum;
    w.emitted_sum = w.sum;
    AggregatedUsage {
        key,
        event_count: w.count,
        quantity_sum: w.sum,
        quantity_min: w.min,
        quantity_max: w.max,
        first_event_time: w.first,
        last_event_time: w.last,
        revision: w.revision,
        is_final: w.is_final,
        delta_sum: delta,
    }
}

#[cfg(test)]
mod tests;
