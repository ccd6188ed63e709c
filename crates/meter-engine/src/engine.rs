//! Validation, deduplication, watermarks and window aggregation.

//!
//! The hot path ([`Engine::process`]) allocates nothing for a valid event
//! that lands in existing windows: the payload is decoded borrowed, strings
//! are interned to small ids (customer, agent, region, resource), a window
//! is found by one 64-bit id per granularity, and its state is a fixed-size
//! record. Strings are materialised again only when a revision or changelog
//! entry is emitted, i.e. per window per commit, not per event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use foldhash::fast::RandomState;
use meter_avro::{Codec, DecodeError, UsageEventRef, Via};
use meter_model::fnv::fnv1a;
use meter_model::partition::Partitioner;
use meter_model::{identity, AggregatedUsage, Catalog, DeadLetterReason, Granularity, Millis, WindowKey};

use crate::auth::AgentRegistry;
use crate::cold::ColdState;
use crate::dedup::SeqTracker;
use crate::keys::{AgentKeys, Verdict};
use crate::state::{self, EntryKind, StateChange, WindowValue};

/// Hash maps of the engine: foldhash is several times faster than SipHash
/// on the short keys used here, and its per-process random seed keeps
/// hash flooding by crafted ids impractical.
type Map<K, V> = HashMap<K, V, RandomState>;

/// Below this many series the interning tables are never rebuilt.
const MIN_GC_SERIES: usize = 1024;

/// 2100-01-01T00:00:00Z: event times at or past it are not believable.
const MAX_EVENT_TIME: Millis = 4_102_444_800_000;

/// Limits and time settings of the engine (see `meter-config` for their
/// meaning and defaults).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub allowed_lateness_ms: Millis,
    pub correction_horizon_ms: Millis,
    /// With a [`ColdState`] attached: how long after a window's close
    /// (end + allowed lateness) it stays in memory; then it lives on disk
    /// only, until a late event reads it back.
    pub hot_window_ms: Millis,
    pub max_clock_skew_ms: Millis,
    pub idle_timeout_ms: Millis,
    pub max_payload_bytes: usize,
    pub max_string_bytes: usize,
    /// Agents and the customers they may publish for.
    pub agents: AgentRegistry,
    /// How producers must map a record's key to its partition (the key
    /// contract of `usage.events`).
    pub partitioner: Partitioner,
    /// Verification keys of the enrolled agents.
    pub keys: Arc<AgentKeys>,
    /// Whether events of agents that are not enrolled are accepted.
    pub accept_unsigned: bool,
    /// Whether events without an incarnation are accepted.
    pub accept_no_incarnation: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            allowed_lateness_ms: 5 * 60_000,
            correction_horizon_ms: 35 * 86_400_000,
            hot_window_ms: 15 * 60_000,
            max_clock_skew_ms: 5 * 60_000,
            idle_timeout_ms: 10_000,
            max_payload_bytes: 64 * 1024,
            max_string_bytes: 256,
            agents: AgentRegistry::default(),
            partitioner: Partitioner::default(),
            keys: Arc::default(),
            accept_unsigned: true,
            accept_no_incarnation: true,
        }
    }
}

/// One input record as read from `usage.events`.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// The `meterline-signature` header's value, if any.
    pub signature: Option<&'a [u8]>,
}

/// What became of one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Aggregated,
    Duplicate,
    DeadLetter {
        reason: DeadLetterReason,
        detail: String,
    },
    /// The on-disk state could not be read: nothing was done with the
    /// record, and the caller must stop before committing (the record is
    /// handled again by whoever restores the partition next).
    Unavailable {
        detail: String,
    },
}

/// Totals of outcomes since the engine started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub aggregated: u64,
    pub duplicates: u64,
    pub dead_letters: BTreeMap<DeadLetterReason, u64>,
    /// Records whose single-object header carries the fingerprint meterline
    /// wrote before it followed the specification (counted whatever their
    /// outcome; see `serialization.accept_legacy_fingerprint`).
    pub legacy_fingerprint: u64,
    /// Records written with another version of the UsageEvent schema,
    /// resolved to the current one (whatever their outcome).
    pub resolved_schema: u64,
    /// Accepted events of agents that are not enrolled (unsigned).
    pub unsigned: u64,
    /// Events without an incarnation (whatever their outcome).
    pub without_incarnation: u64,
    /// Events that extended an incarnation's event-time range while it
    /// overlapped another incarnation's of the same agent id by more than a
    /// minute: two live hosts share the id.
    pub incarnation_overlaps: u64,
}

/// Two incarnations of one agent id producing usage for the same time: two
/// hosts share the agent id (a cloned image, a reused host name). Both are
/// counted (their seq streams are separate); the ids should still be made
/// unique, so that usage can be traced to its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedIdentity {
    pub agent_id: String,
    pub incarnations: [String; 2],
}

/// By how much two incarnations' event-time ranges must overlap to count:
/// a host that renews its incarnation (moved, or its file lost) sends its
/// spooled events of the old one afterwards, with their old times, and the
/// new ones start after them.
const OVERLAP_TOLERANCE_MS: Millis = 60_000;

/// Incarnations remembered per agent id for the overlap check.
const INCARNATIONS_PER_AGENT: usize = 4;

/// Event-time range of one incarnation of an agent id.
#[derive(Debug, Clone)]
struct IncarnationSeen {
    incarnation: Box<str>,
    first: Millis,
    last: Millis,
    reported: bool,
}

impl Counters {
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    pub fn total(&self) -> u64 {
        self.aggregated + self.duplicates + self.dead_lettered()
    }
}

/// An i128 stored as two 64-bit halves: i128 is 16-byte aligned, which
/// would pad [`WindowState`] from 80 to 96 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wide {
    lo: u64,
    hi: i64,
}

impl Wide {
    fn get(self) -> i128 {
        (i128::from(self.hi) << 64) | i128::from(self.lo)
    }

    fn new(v: i128) -> Self {
        Wide { lo: v as u64, hi: (v >> 64) as i64 }
    }
}

/// The running state of one window (80 bytes). First and last event times
/// are offsets from the window start (a day is < 2^32 ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowState {
    count: i64,
    sum: Wide,
    min: i64,
    max: i64,
    revision: i64,
    emitted_sum: Wide,
    first: u32,
    last: u32,
    partition: i32,
    is_final: bool,
    dirty: bool,
}

impl WindowState {
    fn value(&self, start: Millis) -> WindowValue {
        WindowValue {
            count: self.count,
            sum: self.sum.get(),
            min: self.min,
            max: self.max,
            first: start + Millis::from(self.first),
            last: start + Millis::from(self.last),
            revision: self.revision,
            emitted_sum: self.emitted_sum.get(),
            is_final: self.is_final,
        }
    }

    /// The compact form of a changelog value; None when its event times lie
    /// outside the window (never written by an engine).
    fn from_value(v: &WindowValue, id: WindowId, partition: i32) -> Option<Self> {
        let start = id.window_start();
        let offset = |t: Millis| u32::try_from(t.checked_sub(start)?).ok().filter(|&o| Millis::from(o) < id.granularity().size_ms());
        Some(WindowState {
            count: v.count,
            sum: Wide::new(v.sum),
            min: v.min,
            max: v.max,
            revision: v.revision,
            emitted_sum: Wide::new(v.emitted_sum),
            first: offset(v.first)?,
            last: offset(v.last)?,
            partition,
            is_final: v.is_final,
            dirty: false,
        })
    }
}

/// A window: its series, granularity and window number (start / size) in
/// one u64: series << 32 | granularity << 30 | number. Window numbers of
/// valid event times (1970..2100) fit in 30 bits even for minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct WindowId(u64);

impl WindowId {
    const NUMBER_BITS: u32 = 30;

    fn new(series: u32, g: Granularity, window_start: Millis) -> Option<Self> {
        let size = g.size_ms();
        if window_start < 0 || window_start % size != 0 {
            return None;
        }
        let number = u64::try_from(window_start / size).ok().filter(|&n| n < 1 << Self::NUMBER_BITS)?;
        Some(WindowId(u64::from(series) << 32 | (g.index() as u64) << Self::NUMBER_BITS | number))
    }

    fn series(self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn granularity(self) -> Granularity {
        match (self.0 >> Self::NUMBER_BITS) & 3 {
            0 => Granularity::Minute,
            1 => Granularity::Hour,
            _ => Granularity::Day,
        }
    }

    fn window_start(self) -> Millis {
        (self.0 & ((1 << Self::NUMBER_BITS) - 1)) as Millis * self.granularity().size_ms()
    }

    fn window_end(self) -> Millis {
        self.window_start() + self.granularity().size_ms()
    }
}

/// Strings interned to dense u32 ids. Ids are never reused while the engine
/// lives; [`Engine::flush`] rebuilds the tables when most entries are dead.
#[derive(Debug, Clone)]
struct Symbols {
    ids: Map<Box<str>, u32>,
    names: Vec<Box<str>>,
}

/// The empty string's id in every [`Symbols`]: the resource of usage types
/// not keyed by resource, looked up without hashing.
const EMPTY: u32 = 0;

impl Default for Symbols {
    fn default() -> Self {
        let mut s = Symbols { ids: Map::default(), names: Vec::new() };
        s.intern("");
        s
    }
}

impl Symbols {
    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.get(s) {
            return id;
        }
        // 2^32 distinct strings would need far more memory than a process
        // has, so the id cannot wrap in practice.
        let id = self.names.len() as u32;
        self.names.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |s| s)
    }
}

/// The dimensions of a window key without its time: interned customer,
/// (service, usage type), region and resource (the empty string unless the
/// catalog keys the usage type by resource).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    customer: u32,
    kind: u32,
    region: u32,
    resource: u32,
}

/// A service's usage types: kind id and whether resource_id is in the key.
type UsageTypes = Map<Box<str>, (u32, bool)>;

/// Usage types by (service, usage type), borrowable by `&str` on the hot
/// path. Starts with the catalog's; restored windows may add types the
/// current catalog no longer lists.
#[derive(Debug, Clone, Default)]
struct Kinds {
    by_service: Map<Box<str>, UsageTypes>,
    names: Vec<(Box<str>, Box<str>)>,
}

impl Kinds {
    fn from_catalog(catalog: &Catalog) -> Self {
        let mut k = Kinds::default();
        for s in catalog.service_names() {
            k.by_service.entry(s.into()).or_default();
        }
        for t in catalog.usage_types() {
            k.add(&t.service, &t.name, true, t.key_by_resource);
        }
        k
    }

    /// Registers a kind; `known` kinds are accepted by validation.
    fn add(&mut self, service: &str, usage_type: &str, known: bool, key_by_resource: bool) -> u32 {
        if let Some(&(id, _)) = self.by_service.get(service).and_then(|t| t.get(usage_type)) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push((service.into(), usage_type.into()));
        if known {
            self.by_service.entry(service.into()).or_default().insert(usage_type.into(), (id, key_by_resource));
        }
        id
    }

    /// Id of a kind restored from the changelog (known or not).
    fn restored(&mut self, service: &str, usage_type: &str) -> u32 {
        if let Some(&(id, _)) = self.by_service.get(service).and_then(|t| t.get(usage_type)) {
            return id;
        }
        match self.names.iter().position(|(s, u)| &**s == service && &**u == usage_type) {
            Some(i) => i as u32,
            None => self.add(service, usage_type, false, false),
        }
    }
}

/// Dedup state of one (agent_id, customer_id) stream and the input
/// partition its events arrive on (a customer's events share one).
#[derive(Debug, Clone)]
struct Stream {
    partition: i32,
    /// Listed in `changed_streams` since the last take_changes.
    changed: bool,
    /// Recorded a seq since the last sweep of idle streams.
    used: bool,
    tracker: SeqTracker,
    /// The event-time range already given to the incarnation overlap check
    /// (not persisted): only events outside it are checked, about one per
    /// stream per second.
    tracked: (Millis, Millis),
}

const UNTRACKED: (Millis, Millis) = (Millis::MAX, Millis::MIN);

fn stream_id(agent: u32, customer: u32) -> u64 {
    u64::from(agent) << 32 | u64::from(customer)
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
    /// Scratch: the dedup stream's agent name of the event in hand.
    stream_agent: String,
    /// Per agent id, the event-time ranges of its latest incarnations
    /// (not in the changelog: detection restarts with the processor).
    incarnations: Map<Box<str>, Vec<IncarnationSeen>>,
    shared: Vec<SharedIdentity>,
    catalog: Catalog,
    codec: Codec,
    cfg: EngineConfig,
    kinds: Kinds,
    /// Customers, agents, regions and resource ids.
    symbols: Symbols,
    series: Map<SeriesKey, u32>,
    series_keys: Vec<SeriesKey>,
    windows: Map<WindowId, WindowState>,
    dirty: Vec<WindowId>,
    /// Windows in memory that are not final yet, by (partition, window
    /// end): the flush closes them in order as the watermark passes, without
    /// looking at any other window. May hold stale entries (checked on use).
    closing: BTreeSet<(i32, Millis, WindowId)>,
    /// Final windows in memory by (partition, window end), evicted to the
    /// cold store or expired in order. May hold stale entries.
    settled: BTreeSet<(i32, Millis, WindowId)>,
    /// The on-disk state, when attached (see [`crate::cold`]).
    cold: Option<Arc<dyn ColdState>>,
    /// The first error reading it; the caller stops on one.
    cold_error: Option<String>,
    flushes: u64,
    clocks: Map<i32, PartitionClock>,
    /// Dedup state per (agent_id, customer_id), see [`stream_id`].
    streams: Map<u64, Stream>,
    /// Streams changed since the last [`Engine::take_changes`].
    changed_streams: Vec<u64>,
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
    unsequenced: Map<(i32, Millis), Map<String, u64>>,
    counters: Counters,
    /// Partitions of `usage.events`: when known, a record on a partition its
    /// key does not map to is dead-lettered (`wrong_partition`).
    partitions: Option<i32>,
}

type Rejection = (DeadLetterReason, String);

/// The processor's rules for one event's content, apart from the engine:
/// what [`Engine::process`] checks once an event is decoded (customer and
/// key, string lengths, authorization by `agents`, catalog, seq, quantity,
/// timestamp and clock skew) and the payload's size, for a producer that
/// wants to refuse at its edge what the processor would dead-letter
/// (`meter serve`). Dedup, signatures and the correction horizon need the
/// processor's state and are not here.
#[derive(Clone)]
pub struct Rules {
    kinds: Kinds,
    cfg: EngineConfig,
}

impl Rules {
    pub fn new(catalog: &Catalog, cfg: EngineConfig) -> Self {
        Rules { kinds: Kinds::from_catalog(catalog), cfg }
    }

    /// Whether an event at `event_time` is past the correction horizon when
    /// judged against `bound` (the processor's bound is its watermark).
    pub fn past_horizon(&self, event_time: Millis, bound: Millis) -> bool {
        past_horizon(event_time, self.cfg.correction_horizon_ms, bound)
    }

    /// Ok, or the dead-letter reason and detail the processor would give
    /// the record of `payload` (the event `e` decoded) keyed by `key`.
    pub fn check(&self, e: &UsageEventRef<'_>, payload: &[u8], key: &[u8], now: Millis) -> Result<(), (DeadLetterReason, String)> {
        if payload.len() > self.cfg.max_payload_bytes {
            return Err((
                DeadLetterReason::OversizePayload,
                format!("payload of {} bytes exceeds the limit of {}", payload.len(), self.cfg.max_payload_bytes),
            ));
        }
        validate(&self.kinds, &self.cfg, e, key, now).map(|_| ())
    }
}

/// Whether the minute window of `event_time` is past the correction
/// horizon at `bound`. The minute window closes first, so its hour and day
/// windows are then still within the horizon too.
fn past_horizon(event_time: Millis, horizon_ms: Millis, bound: Millis) -> bool {
    let minute_end = Granularity::Minute.window_start(event_time) + Granularity::Minute.size_ms();
    minute_end.saturating_add(horizon_ms) <= bound
}

fn validate(kinds: &Kinds, cfg: &EngineConfig, e: &UsageEventRef<'_>, key: &[u8], now: Millis) -> Result<Kind, Rejection> {
    if e.customer_id.is_empty() {
        return Err((DeadLetterReason::EmptyCustomerId, "customer_id is empty".into()));
    }
    if key != e.customer_id.as_bytes() {
        return Err((DeadLetterReason::KeyMismatch, "record key differs from customer_id".into()));
    }
    let max = cfg.max_string_bytes;
    let fields = [
        ("event_id", e.event_id),
        ("agent_id", e.agent_id),
        ("customer_id", e.customer_id),
        ("service", e.service),
        ("usage_type", e.usage_type),
        ("resource_id", e.resource_id),
        ("region", e.region),
    ];
    for (name, value) in fields {
        if value.len() > max {
            return Err((DeadLetterReason::StringTooLong, format!("{name} is {} bytes, the limit is {max}", value.len())));
        }
    }
    // A long entry that a later duplicate key overrides is not part of
    // the event's map: only then is the map built to decide.
    if e.attributes.longest() > max && e.attributes.to_map().iter().any(|(k, v)| k.len() > max || v.len() > max) {
        return Err((DeadLetterReason::StringTooLong, format!("an attribute is longer than {max} bytes")));
    }
    cfg.agents.check(e.agent_id, e.customer_id).map_err(|detail| (DeadLetterReason::Unauthorized, detail))?;
    let kind = match kinds.by_service.get(e.service) {
        None => return Err((DeadLetterReason::UnknownService, format!("service {:?} is not in the catalog", e.service))),
        Some(types) => match types.get(e.usage_type) {
            Some(&(id, key_by_resource)) => Kind { id, key_by_resource },
            None => {
                return Err((
                    DeadLetterReason::UnknownUsageType,
                    format!("usage type {:?} of service {:?} is not in the catalog", e.usage_type, e.service),
                ))
            }
        },
    };
    // Seqs start at 1. A seq below that would never be recorded as seen
    // (every replay aggregated again), and i64::MAX leaves no room above
    // it for the dedup high-water mark.
    if let Some(seq) = e.seq.filter(|&s| !(1..i64::MAX).contains(&s)) {
        return Err((DeadLetterReason::InvalidSeq, format!("seq {seq} is outside 1..{}", i64::MAX)));
    }
    if e.quantity < 0 {
        return Err((DeadLetterReason::NegativeQuantity, format!("quantity {} is negative", e.quantity)));
    }
    if e.event_time <= 0 || e.event_time >= MAX_EVENT_TIME {
        return Err((DeadLetterReason::InvalidTimestamp, format!("event_time {} is outside 1970..2100", e.event_time)));
    }
    if e.event_time > now + cfg.max_clock_skew_ms {
        return Err((
            DeadLetterReason::FutureTimestamp,
            format!("event_time {} is {} ms ahead of the processor clock", e.event_time, e.event_time - now),
        ));
    }
    Ok(kind)
}

/// What validation learnt about an event's usage type.
#[derive(Clone, Copy)]
struct Kind {
    id: u32,
    key_by_resource: bool,
}

impl Engine {
    pub fn new(catalog: Catalog, codec: Codec, cfg: EngineConfig) -> Self {
        Engine {
            incarnations: Map::default(),
            shared: Vec::new(),
            stream_agent: String::new(),
            kinds: Kinds::from_catalog(&catalog),
            catalog,
            codec,
            cfg,
            symbols: Symbols::default(),
            series: Map::default(),
            series_keys: Vec::new(),
            windows: Map::default(),
            dirty: Vec::new(),
            closing: BTreeSet::new(),
            settled: BTreeSet::new(),
            cold: None,
            cold_error: None,
            flushes: 0,
            clocks: Map::default(),
            streams: Map::default(),
            changed_streams: Vec::new(),
            new_unsequenced: Vec::new(),
            changes: Vec::new(),
            last_flush: Millis::MIN,
            unsequenced: Map::default(),
            counters: Counters::default(),
            partitions: None,
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

    /// Checks from now on that every record is on the partition its key maps
    /// to among `partitions` (the runner tells it on every assignment).
    pub fn set_partitions(&mut self, partitions: i32) {
        self.partitions = (partitions > 0).then_some(partitions);
    }

    /// Classifies and, where valid and new, aggregates one record.
    pub fn process(&mut self, input: Input<'_>, now: Millis) -> Outcome {
        if let Some(detail) = &self.cold_error {
            return Outcome::Unavailable { detail: detail.clone() };
        }
        let outcome = match self.try_process(input, now) {
            _ if self.cold_error.is_some() => {
                return Outcome::Unavailable { detail: self.cold_error.clone().unwrap_or_default() };
            }
            Ok(true) => Outcome::Aggregated,
            Ok(false) => Outcome::Duplicate,
            Err((reason, detail)) => Outcome::DeadLetter { reason, detail },
        };
        match &outcome {
            Outcome::Unavailable { .. } => {}
            Outcome::Aggregated => self.counters.aggregated += 1,
            Outcome::Duplicate => self.counters.duplicates += 1,
            Outcome::DeadLetter { reason, .. } => *self.counters.dead_letters.entry(*reason).or_default() += 1,
        }
        outcome
    }

    /// Attaches the on-disk state: from now on final windows leave memory
    /// `hot_window_ms` after they close, idle dedup streams and the id sets
    /// of past days leave it too, and all of them are read back on demand.
    /// Restore partitions with [`Engine::load_partition`] then.
    pub fn set_cold(&mut self, cold: Arc<dyn ColdState>) {
        self.cold = Some(cold);
    }

    /// The error that made the engine stop using its cold state, if any
    /// (the caller must not commit what it handled since).
    pub fn cold_error(&self) -> Option<&str> {
        self.cold_error.as_deref()
    }

    /// Windows, seq-less id sets and streams of `partition` whose end is at
    /// or before this bound may be on disk only (a window that closed more
    /// than `hot_window_ms` ago). None without a cold store.
    fn cold_bound(&self, partition: i32) -> Option<Millis> {
        self.cold.as_ref()?;
        let wm = self.clocks.get(&partition)?.watermark;
        Some(wm.saturating_sub(self.cfg.allowed_lateness_ms).saturating_sub(self.cfg.hot_window_ms))
    }

    /// Reads a key from the cold store; an error stops the engine.
    fn cold_get(&mut self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, Rejection> {
        let Some(cold) = self.cold.clone() else { return Ok(None) };
        cold.get(partition, key).map_err(|e| self.cold_failed(e))
    }

    /// Records a cold-store error. The rejection it returns only unwinds
    /// `try_process`: `process` reports the record as
    /// [`Outcome::Unavailable`], never with this reason.
    fn cold_failed(&mut self, e: String) -> Rejection {
        let e = format!("the processor's state store cannot be read: {e}");
        self.cold_error.get_or_insert(e.clone());
        (DeadLetterReason::TooLate, e)
    }

    /// Reads a dedup stream back from the cold store into memory.
    fn load_stream(&mut self, agent: &str, customer: &str, partition: i32) -> Result<Option<u64>, Rejection> {
        if self.cold.is_none() {
            return Ok(None);
        }
        let Some(v) = self.cold_get(partition, &state::stream_key(agent, customer))? else { return Ok(None) };
        let tracker = state::decode_stream(&v).map_err(|e| self.cold_failed(format!("stream {agent:?}/{customer:?}: {e}")))?;
        let id = stream_id(self.symbols.intern(agent), self.symbols.intern(customer));
        self.streams.insert(id, Stream { partition, changed: false, used: true, tracker, tracked: UNTRACKED });
        Ok(Some(id))
    }

    /// Reads a window back from the cold store into memory, if it is there.
    fn load_window(&mut self, id: WindowId, partition: i32) -> Result<(), Rejection> {
        let key = state::window_key(&self.window_key(id));
        let Some(v) = self.cold_get(partition, &key)? else { return Ok(()) };
        let w = state::decode_window(&v)
            .ok()
            .and_then(|v| WindowState::from_value(&v, id, partition))
            .ok_or_else(|| self.cold_failed(format!("window {:?} does not decode", self.window_key(id))))?;
        self.insert_window(id, w);
        Ok(())
    }

    /// Puts a window in memory and in the queue its finality decides.
    fn insert_window(&mut self, id: WindowId, w: WindowState) {
        let entry = (w.partition, id.window_end(), id);
        if w.is_final {
            self.settled.insert(entry);
        } else {
            self.closing.insert(entry);
        }
        self.windows.insert(id, w);
    }

    /// Restores `partition` from the cold store (after the caller brought
    /// the store up to the changelog's end): its clock, every window that
    /// is not final or closed less than `hot_window_ms` ago, and the
    /// seq-less id sets of those days. Dedup streams are read on demand.
    /// Returns the entries read.
    pub fn load_partition(&mut self, partition: i32, now: Millis) -> Result<u64, String> {
        let cold = self.cold.clone().ok_or("no state store attached")?;
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let clock = state::clock_key(partition);
        let mut n = 0;
        if let Some(v) = cold.get(partition, &clock)? {
            self.restore(partition, &clock, Some(&v), now).map_err(|e| format!("clock of partition {partition}: {e}"))?;
            n += 1;
        }
        let bound = self.cold_bound(partition).unwrap_or(Millis::MIN);
        let mut push = |k: &[u8], v: &[u8]| entries.push((k.to_vec(), v.to_vec()));
        cold.scan(partition, EntryKind::Window, bound.saturating_add(1), Millis::MAX, usize::MAX, &mut push)?;
        let days_from = bound.saturating_sub(Granularity::Day.size_ms()).saturating_add(1);
        cold.scan(partition, EntryKind::Unsequenced, days_from, Millis::MAX, usize::MAX, &mut push)?;
        n += entries.len() as u64;
        for (k, v) in entries {
            self.restore(partition, &k, Some(&v), now).map_err(|e| format!("partition {partition}: {e}"))?;
        }
        Ok(n)
    }

    fn try_process(&mut self, input: Input<'_>, now: Millis) -> Result<bool, Rejection> {
        let clock = self.clocks.entry(input.partition).or_insert(PartitionClock {
            watermark: Millis::MIN,
            max_event_time: Millis::MIN,
            last_record_at: now,
            saved: (Millis::MIN, Millis::MIN),
        });
        clock.last_record_at = now;
        let watermark = clock.watermark;
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
        if let Some(n) = self.partitions {
            let expected = self.cfg.partitioner.partition(key, n);
            if expected != input.partition {
                return Err((
                    DeadLetterReason::WrongPartition,
                    format!(
                        "the key belongs on partition {expected} of {n} ({:?} partitioner), not {}: the producer does not follow the key contract",
                        self.cfg.partitioner,
                        input.partition
                    ),
                ));
            }
        }
        let mut scratch = Vec::new();
        let decoded = self.codec.decode_event_with(payload, &mut scratch);
        if matches!(decoded, Err(DecodeError::LegacyFingerprint(_))) {
            self.counters.legacy_fingerprint += 1;
        }
        let (event, body, via) = decoded.map_err(|e| (e.reason(), e.to_string()))?;
        match via {
            Via::LegacyFingerprint => self.counters.legacy_fingerprint += 1,
            Via::Resolved => self.counters.resolved_schema += 1,
            Via::SingleObject | Via::Confluent => {}
        }
        self.check_identity(&event, payload, input.signature)?;
        let kind = self.validate(&event, key, now)?;
        self.check_time(&event, watermark)?;
        // Only events without a seq are deduplicated by id and need the
        // hash: of the body in the current schema, so that the same event
        // framed or versioned otherwise is the same event.
        let payload_hash = if event.seq.is_none() { fnv1a(body) } else { 0 };
        // Looked up once for the dedup stream and the series (lookups
        // only: see find_series).
        let mut customer = self.symbols.get(event.customer_id);
        // The stream is the agent id's and the incarnation's.
        let mut buf = std::mem::take(&mut self.stream_agent);
        let agent = identity::stream_agent(&mut buf, event.agent_id, event.incarnation);
        let mut stream = if event.seq.is_some() { self.find_stream(agent, customer) } else { None };
        let mut cold_hash = None;
        let looked_up = if event.seq.is_some() && stream.is_none() {
            self.load_stream(agent, event.customer_id, input.partition).map(|s| {
                stream = s;
                customer = self.symbols.get(event.customer_id);
            })
        } else if event.seq.is_none() {
            self.cold_unsequenced(&event, input.partition).map(|h| cold_hash = h)
        } else {
            Ok(())
        };
        if let Err(e) = looked_up {
            self.stream_agent = buf;
            return Err(e);
        }
        let dup = match cold_hash {
            None => self.is_duplicate(&event, stream, input.partition, payload_hash),
            Some(h) if h == payload_hash => Ok(true),
            Some(_) => Err(Self::conflict(&event)),
        };
        let result = match dup {
            Ok(true) => Ok(None),
            Ok(false) => self
                .aggregate(&event, kind, customer, input.partition)
                .map(|()| Some(self.remember(&event, agent, stream, input.partition, payload_hash))),
            Err(e) => Err(e),
        };
        self.stream_agent = buf;
        // Ok(None): a duplicate; Ok(Some(track)): aggregated.
        let track = match result? {
            None => return Ok(false),
            Some(track) => track,
        };
        if track && !event.incarnation.is_empty() {
            self.track_incarnation(event.agent_id, event.incarnation, event.event_time);
        }
        if let Some(clock) = self.clocks.get_mut(&input.partition) {
            clock.max_event_time = clock.max_event_time.max(event.event_time);
        }
        Ok(true)
    }

    fn validate(&self, e: &UsageEventRef<'_>, key: &[u8], now: Millis) -> Result<Kind, Rejection> {
        validate(&self.kinds, &self.cfg, e, key, now)
    }

    /// Rejects events whose minute window is past the correction horizon.
    fn check_time(&self, e: &UsageEventRef<'_>, watermark: Millis) -> Result<(), Rejection> {
        if past_horizon(e.event_time, self.cfg.correction_horizon_ms, watermark) {
            return Err((
                DeadLetterReason::TooLate,
                format!("event_time {} is past the correction horizon (watermark {watermark})", e.event_time),
            ));
        }
        Ok(())
    }

    fn resource<'a>(e: &UsageEventRef<'a>, kind: Kind) -> &'a str {
        if kind.key_by_resource {
            e.resource_id
        } else {
            ""
        }
    }

    /// The series of an event if it has one already (lookups only: input
    /// that is rejected or a duplicate must not grow the tables).
    fn find_series(&self, e: &UsageEventRef<'_>, kind: Kind, customer: Option<u32>) -> Option<u32> {
        let key = SeriesKey {
            customer: customer?,
            kind: kind.id,
            region: self.symbols.get(e.region)?,
            resource: if kind.key_by_resource { self.symbols.get(e.resource_id)? } else { EMPTY },
        };
        self.series.get(&key).copied()
    }

    fn intern_series(&mut self, key: &WindowKeyParts<'_>) -> u32 {
        let key = SeriesKey {
            customer: self.symbols.intern(key.customer),
            kind: key.kind,
            region: self.symbols.intern(key.region),
            resource: self.symbols.intern(key.resource),
        };
        if let Some(&id) = self.series.get(&key) {
            return id;
        }
        let id = self.series_keys.len() as u32;
        self.series_keys.push(key);
        self.series.insert(key, id);
        id
    }

    /// The identity checks, before anything else looks at the event: the
    /// agent id and incarnation are well formed, and the signature is that
    /// of the claimed agent (when it is enrolled).
    fn check_identity(&mut self, e: &UsageEventRef<'_>, payload: &[u8], signature: Option<&[u8]>) -> Result<(), Rejection> {
        if !identity::is_valid(e.agent_id) || !identity::is_valid(e.incarnation) {
            return Err((DeadLetterReason::InvalidIdentity, "agent_id or incarnation holds a control character".into()));
        }
        if e.incarnation.is_empty() {
            self.counters.without_incarnation += 1;
            if !self.cfg.accept_no_incarnation {
                return Err((
                    DeadLetterReason::InvalidIdentity,
                    "the event has no incarnation (an agent before incarnations) and processor.accept_no_incarnation is off".into(),
                ));
            }
        }
        match self.cfg.keys.verify(e.agent_id, payload, signature) {
            Ok(Verdict::Verified) => Ok(()),
            Ok(Verdict::NotEnrolled) if self.cfg.accept_unsigned => {
                self.counters.unsigned += 1;
                Ok(())
            }
            Ok(Verdict::NotEnrolled) => Err((
                DeadLetterReason::BadSignature,
                format!("agent {:?} has no key in processor.agent_keys_file and processor.accept_unsigned is off", e.agent_id),
            )),
            Err(detail) => Err((DeadLetterReason::BadSignature, detail)),
        }
    }

    /// Notes the event time of an incarnation of an agent id, and reports
    /// an overlap of its event-time range with another incarnation's by more
    /// than [`OVERLAP_TOLERANCE_MS`] (see [`SharedIdentity`]).
    fn track_incarnation(&mut self, agent_id: &str, incarnation: &str, t: Millis) {
        let seen = match self.incarnations.get_mut(agent_id) {
            Some(v) => v,
            None => self.incarnations.entry(agent_id.into()).or_default(),
        };
        let i = match seen.iter().position(|s| &*s.incarnation == incarnation) {
            Some(i) => {
                let s = &mut seen[i];
                if t >= s.first && t <= s.last {
                    // Inside its own range: nothing new (the common case).
                    return;
                }
                s.first = s.first.min(t);
                s.last = s.last.max(t);
                i
            }
            None => {
                if seen.len() >= INCARNATIONS_PER_AGENT {
                    // Forget the one whose usage ended first.
                    if let Some(oldest) = (0..seen.len()).min_by_key(|&j| seen[j].last) {
                        seen.swap_remove(oldest);
                    }
                }
                seen.push(IncarnationSeen { incarnation: incarnation.into(), first: t, last: t, reported: false });
                seen.len() - 1
            }
        };
        let (first, last) = (seen[i].first, seen[i].last);
        let Some(j) = (0..seen.len()).find(|&j| j != i && last.min(seen[j].last) - first.max(seen[j].first) > OVERLAP_TOLERANCE_MS) else {
            return;
        };
        self.counters.incarnation_overlaps += 1;
        if !(seen[i].reported && seen[j].reported) {
            seen[i].reported = true;
            seen[j].reported = true;
            self.shared.push(SharedIdentity {
                agent_id: agent_id.to_owned(),
                incarnations: [seen[j].incarnation.to_string(), seen[i].incarnation.to_string()],
            });
        }
    }

    /// Agent ids found shared by two live incarnations since the last call
    /// (each pair once).
    pub fn take_shared_identities(&mut self) -> Vec<SharedIdentity> {
        std::mem::take(&mut self.shared)
    }

    /// Replaces the verification keys (the keys file changed).
    pub fn set_agent_keys(&mut self, keys: Arc<AgentKeys>) {
        self.cfg.keys = keys;
    }

    /// The id of the event's dedup stream, if that stream exists.
    fn find_stream(&self, agent: &str, customer: Option<u32>) -> Option<u64> {
        let id = stream_id(self.symbols.get(agent)?, customer?);
        self.streams.contains_key(&id).then_some(id)
    }

    fn is_duplicate(&self, e: &UsageEventRef<'_>, stream: Option<u64>, partition: i32, payload_hash: u64) -> Result<bool, Rejection> {
        match e.seq {
            Some(seq) => Ok(stream.and_then(|id| self.streams.get(&id)).is_some_and(|s| s.tracker.is_duplicate(seq))),
            None => {
                match self.unsequenced.get(&(partition, Granularity::Day.window_start(e.event_time))).and_then(|ids| ids.get(e.event_id)) {
                    None => Ok(false),
                    Some(&h) if h == payload_hash => Ok(true),
                    Some(_) => Err(Self::conflict(e)),
                }
            }
        }
    }

    fn conflict(e: &UsageEventRef<'_>) -> Rejection {
        (DeadLetterReason::EventIdConflict, format!("event_id {:?} was seen before with a different payload", e.event_id))
    }

    /// The payload hash a seq-less event's id has in the cold store, when
    /// its day may be on disk only and memory does not know the id.
    fn cold_unsequenced(&mut self, e: &UsageEventRef<'_>, partition: i32) -> Result<Option<u64>, Rejection> {
        let day = Granularity::Day.window_start(e.event_time);
        let cold = self.cold_bound(partition).is_some_and(|b| day + Granularity::Day.size_ms() <= b);
        if !cold || self.unsequenced.get(&(partition, day)).is_some_and(|ids| ids.contains_key(e.event_id)) {
            return Ok(None);
        }
        match self.cold_get(partition, &state::unsequenced_key(partition, day, e.event_id))? {
            None => Ok(None),
            Some(v) => state::decode_unsequenced(&v).map(Some).map_err(|err| self.cold_failed(format!("event id {:?}: {err}", e.event_id))),
        }
    }

    /// Records the event in dedup state; returns whether the incarnation
    /// overlap check should see its time.
    fn remember(&mut self, e: &UsageEventRef<'_>, agent: &str, stream: Option<u64>, partition: i32, payload_hash: u64) -> bool {
        match e.seq {
            Some(seq) => {
                let id = match stream {
                    Some(id) => id,
                    None => stream_id(self.symbols.intern(agent), self.symbols.intern(e.customer_id)),
                };
                let s = self.streams.entry(id).or_insert_with(|| Stream {
                    partition,
                    changed: false,
                    used: true,
                    tracker: SeqTracker::default(),
                    tracked: UNTRACKED,
                });
                s.partition = partition;
                s.used = true;
                s.tracker.record(seq);
                if !s.changed {
                    s.changed = true;
                    self.changed_streams.push(id);
                }
                let t = e.event_time;
                // To the second: the check's tolerance is a minute.
                let outside = t < s.tracked.0 || t >= s.tracked.1.saturating_add(1000);
                if outside {
                    s.tracked = (s.tracked.0.min(t), s.tracked.1.max(t));
                }
                outside
            }
            None => {
                let day = Granularity::Day.window_start(e.event_time);
                self.unsequenced.entry((partition, day)).or_default().insert(e.event_id.to_owned(), payload_hash);
                self.new_unsequenced.push((partition, day, e.event_id.to_owned(), payload_hash));
                true
            }
        }
    }

    /// Adds the event to its minute, hour and day windows, or rejects it
    /// (changing nothing) when a sum or count would overflow.
    fn aggregate(&mut self, e: &UsageEventRef<'_>, kind: Kind, customer: Option<u32>, partition: i32) -> Result<(), Rejection> {
        let series = self.find_series(e, kind, customer);
        let ids = series.and_then(|s| Self::window_ids(s, e.event_time));
        let q = e.quantity;
        if let Some(ids) = ids {
            // The common case: one lookup per granularity, updated in place.
            let [a, b, c] = &ids;
            let found = self.windows.get_disjoint_mut([a, b, c]);
            for (w, &id) in found.iter().zip(&ids) {
                if let Some(w) = w {
                    Self::check_room(w, q, id)?;
                }
            }
            if found.iter().all(Option::is_some) {
                for (w, id) in found.into_iter().zip(ids) {
                    if let Some(w) = w {
                        Self::add(w, q, e.event_time - id.window_start());
                        if !w.dirty {
                            w.dirty = true;
                            self.dirty.push(id);
                        }
                    }
                }
                return Ok(());
            }
        }
        let parts = WindowKeyParts { customer: e.customer_id, kind: kind.id, region: e.region, resource: Self::resource(e, kind) };
        let series = self.intern_series(&parts);
        let Some(ids) = Self::window_ids(series, e.event_time) else {
            // Validation bounds event_time to 1970..2100, where every window has an id.
            return Err((DeadLetterReason::InvalidTimestamp, format!("event_time {} is outside 1970..2100", e.event_time)));
        };
        // A window that closed long enough ago may be on disk only: read
        // back before anything changes, so that a correction continues its
        // revisions and sums.
        if let Some(bound) = self.cold_bound(partition) {
            for id in ids {
                if id.window_end() <= bound && !self.windows.contains_key(&id) {
                    self.load_window(id, partition)?;
                }
            }
        }
        for &id in &ids {
            if let Some(w) = self.windows.get(&id) {
                Self::check_room(w, q, id)?;
            }
        }
        for id in ids {
            let offset = e.event_time - id.window_start();
            if !self.windows.contains_key(&id) {
                let fresh = WindowState {
                    count: 0,
                    sum: Wide::default(),
                    min: i64::MAX,
                    max: i64::MIN,
                    revision: 0,
                    emitted_sum: Wide::default(),
                    first: u32::MAX,
                    last: 0,
                    partition,
                    is_final: false,
                    dirty: false,
                };
                self.insert_window(id, fresh);
            }
            let Some(w) = self.windows.get_mut(&id) else { continue };
            Self::add(w, q, offset);
            if !w.dirty {
                w.dirty = true;
                self.dirty.push(id);
            }
        }
        Ok(())
    }

    /// Rejects adding `q` to a window whose sum or count would overflow.
    fn check_room(w: &WindowState, q: i64, id: WindowId) -> Result<(), Rejection> {
        if w.sum.get().checked_add(i128::from(q)).is_none() || w.count == i64::MAX {
            return Err((
                DeadLetterReason::QuantityOverflow,
                format!("adding {q} would overflow the {} window sum", id.granularity().as_str()),
            ));
        }
        Ok(())
    }

    fn window_ids(series: u32, t: Millis) -> Option<[WindowId; 3]> {
        Some([
            WindowId::new(series, Granularity::Minute, Granularity::Minute.window_start(t))?,
            WindowId::new(series, Granularity::Hour, Granularity::Hour.window_start(t))?,
            WindowId::new(series, Granularity::Day, Granularity::Day.window_start(t))?,
        ])
    }

    fn add(w: &mut WindowState, q: i64, offset: Millis) {
        // The offset of an event in its window is below a day's size.
        let offset = offset as u32;
        w.count += 1;
        w.sum = Wide::new(w.sum.get() + i128::from(q));
        w.min = w.min.min(q);
        w.max = w.max.max(q);
        w.first = w.first.min(offset);
        w.last = w.last.max(offset);
    }

    /// The window key of a window id, with its strings.
    fn window_key(&self, id: WindowId) -> WindowKey {
        let s = self.series_keys.get(id.series() as usize).copied().unwrap_or(SeriesKey { customer: 0, kind: 0, region: 0, resource: 0 });
        let (service, usage_type) = self.kinds.names.get(s.kind as usize).map_or(("", ""), |(a, b)| (&**a, &**b));
        WindowKey {
            granularity: id.granularity(),
            window_start: id.window_start(),
            customer_id: self.symbols.name(s.customer).to_owned(),
            service: service.to_owned(),
            usage_type: usage_type.to_owned(),
            region: self.symbols.name(s.region).to_owned(),
            resource_id: self.symbols.name(s.resource).to_owned(),
        }
    }

    /// Advances watermarks and returns one new revision for every window
    /// changed since the last flush and for every window whose final
    /// revision is now due. Forgets windows past the correction horizon,
    /// and with a cold store, moves what is no longer hot out of memory.
    ///
    /// The cost follows the windows that changed and those the watermark
    /// passed (the time-ordered `closing` and `settled` queues), not the
    /// windows held.
    pub fn flush(&mut self, now: Millis) -> Vec<AggregatedUsage> {
        self.last_flush = now;
        self.flushes += 1;
        for clock in self.clocks.values_mut() {
            clock.advance(now, self.cfg.idle_timeout_ms);
        }
        let lateness = self.cfg.allowed_lateness_ms;
        let horizon = self.cfg.correction_horizon_ms;
        let marks: Vec<(i32, Millis)> = self.clocks.iter().map(|(&p, c)| (p, c.watermark)).collect();
        let mut emitted = Vec::with_capacity(self.dirty.len());
        // Windows the watermark closed: final now.
        for &(p, wm) in &marks {
            for (_, end, id) in pop_until(&mut self.closing, p, wm.saturating_sub(lateness)) {
                if let Some(w) = self.windows.get_mut(&id).filter(|w| !w.is_final) {
                    w.is_final = true;
                    self.settled.insert((p, end, id));
                    if !w.dirty {
                        emitted.push(id);
                    }
                }
            }
        }
        for id in std::mem::take(&mut self.dirty) {
            if let Some(w) = self.windows.get_mut(&id) {
                w.dirty = false;
                emitted.push(id);
            }
        }
        let mut out = Vec::with_capacity(emitted.len());
        for id in emitted {
            let key = self.window_key(id);
            if let Some(w) = self.windows.get_mut(&id) {
                let a = emit(key, w);
                self.changes.push(state::window_entry(&a.key, w.partition, &w.value(id.window_start())));
                out.push(a);
            }
        }
        let cold = self.cold.clone();
        // Final windows past the horizon leave; with a cold store, so do
        // those that closed more than hot_window_ms ago (the store has or,
        // once this flush commits, will have their last value).
        for &(p, wm) in &marks {
            let expire_to = wm.saturating_sub(horizon);
            let to = match cold {
                Some(_) => expire_to.max(wm.saturating_sub(lateness).saturating_sub(self.cfg.hot_window_ms)),
                None => expire_to,
            };
            for (_, end, id) in pop_until(&mut self.settled, p, to) {
                if !self.windows.get(&id).is_some_and(|w| w.is_final) {
                    continue;
                }
                if cold.is_none() && end <= expire_to {
                    let key = self.window_key(id);
                    self.changes.push(state::window_tombstone(&key, p));
                }
                self.windows.remove(&id);
            }
        }
        let day = Granularity::Day.size_ms();
        match &cold {
            None => {
                let clocks = &self.clocks;
                let changes = &mut self.changes;
                self.unsequenced.retain(|&(p, d), ids| {
                    let keep = clocks.get(&p).is_none_or(|c| (d + day).saturating_add(horizon) > c.watermark);
                    if !keep {
                        changes.extend(ids.keys().map(|id| state::unsequenced_tombstone(p, d, id)));
                    }
                    keep
                });
            }
            Some(cold) => {
                // Memory keeps the id sets of hot days only.
                let bounds: Map<i32, Millis> = marks.iter().filter_map(|&(p, _)| Some((p, self.cold_bound(p)?))).collect();
                self.unsequenced.retain(|(p, d), _| bounds.get(p).is_none_or(|&b| d + day > b));
                // Expiry reads the store: it holds every window and id set.
                for &(p, wm) in &marks {
                    let mut gone = Vec::new();
                    let mut push = |k: &[u8], _: &[u8]| gone.push(k.to_vec());
                    let scanned = cold
                        .scan(p, EntryKind::Window, Millis::MIN, wm.saturating_sub(horizon), EXPIRE_PER_FLUSH, &mut push)
                        .and_then(|_| {
                            let to = wm.saturating_sub(horizon).saturating_sub(day);
                            cold.scan(p, EntryKind::Unsequenced, Millis::MIN, to, EXPIRE_PER_FLUSH, &mut push)
                        });
                    if let Err(e) = scanned {
                        self.cold_failed(e);
                    }
                    self.changes.extend(gone.into_iter().map(|key| StateChange { partition: p, key, value: None }));
                }
                if self.flushes.is_multiple_of(STREAM_SWEEP_FLUSHES) {
                    // A changed stream's entry is not committed yet: it stays.
                    self.streams.retain(|_, s| {
                        let keep = s.used || s.changed;
                        s.used = false;
                        keep
                    });
                }
            }
        }
        let changes = &mut self.changes;
        for (&p, c) in self.clocks.iter_mut() {
            if c.saved != (c.watermark, c.max_event_time) {
                c.saved = (c.watermark, c.max_event_time);
                changes.push(state::clock_entry(p, c.watermark, c.max_event_time));
            }
        }
        self.collect_garbage();
        out
    }

    /// Rebuilds the interning tables once more than half of the series
    /// cannot have a window any more (their windows expired or their
    /// partition moved away), so that memory follows the live state instead
    /// of every key ever seen. Every live series has a window, so the
    /// check is O(1) and a rebuild, one pass over the state, happens only
    /// when it at least halves the series: the tables never hold more than
    /// twice the series the windows need.
    fn collect_garbage(&mut self) {
        if self.series_keys.len() < MIN_GC_SERIES || self.series_keys.len() <= 2 * self.windows.len() {
            return;
        }
        let mut live = vec![false; self.series_keys.len()];
        for id in self.windows.keys() {
            if let Some(l) = live.get_mut(id.series() as usize) {
                *l = true;
            }
        }
        let old_symbols = std::mem::take(&mut self.symbols);
        let old_series = std::mem::take(&mut self.series_keys);
        self.series.clear();
        let mut renumbered = vec![u32::MAX; old_series.len()];
        for (i, key) in old_series.iter().enumerate() {
            if live[i] {
                let parts = WindowKeyParts {
                    customer: old_symbols.name(key.customer),
                    kind: key.kind,
                    region: old_symbols.name(key.region),
                    resource: old_symbols.name(key.resource),
                };
                renumbered[i] = self.intern_series(&parts);
            }
        }
        let renumber = |id: WindowId| WindowId(u64::from(renumbered[id.series() as usize]) << 32 | (id.0 & 0xFFFF_FFFF));
        self.windows = std::mem::take(&mut self.windows).into_iter().map(|(id, w)| (renumber(id), w)).collect();
        for id in &mut self.dirty {
            *id = renumber(*id);
        }
        // Stale queue entries of dead series are dropped with them.
        let live = |&(_, _, id): &(i32, Millis, WindowId)| renumbered[id.series() as usize] != u32::MAX;
        let requeue = |(p, t, id): (i32, Millis, WindowId)| (p, t, renumber(id));
        self.closing = std::mem::take(&mut self.closing).into_iter().filter(live).map(requeue).collect();
        self.settled = std::mem::take(&mut self.settled).into_iter().filter(live).map(requeue).collect();
        let symbols = &mut self.symbols;
        let mut restream =
            |id: u64| stream_id(symbols.intern(old_symbols.name((id >> 32) as u32)), symbols.intern(old_symbols.name(id as u32)));
        self.streams = std::mem::take(&mut self.streams).into_iter().map(|(id, s)| (restream(id), s)).collect();
        for id in &mut self.changed_streams {
            *id = restream(*id);
        }
    }

    /// The state changelog entries for everything changed since the last
    /// call, to be written in the same transaction as the revisions of the
    /// preceding [`Engine::flush`] and the consumed offsets. Call right
    /// after `flush`.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut out = std::mem::take(&mut self.changes);
        for id in self.changed_streams.drain(..) {
            if let Some(s) = self.streams.get_mut(&id) {
                s.changed = false;
                let agent = self.symbols.name((id >> 32) as u32);
                let customer = self.symbols.name(id as u32);
                out.push(state::stream_entry(agent, customer, s.partition, &s.tracker));
            }
        }
        out.extend(self.new_unsequenced.drain(..).map(|(p, day, id, hash)| state::unsequenced_entry(p, day, &id, hash)));
        out
    }

    /// Applies one changelog entry (a tombstone when `value` is None) while
    /// restoring the state of `partition` before processing it.
    pub fn restore(&mut self, partition: i32, key: &[u8], value: Option<&[u8]>, now: Millis) -> Result<(), meter_avro::DecodeError> {
        match state::decode_key(key)? {
            state::Key::Window(k) => {
                let kind = self.kinds.restored(&k.service, &k.usage_type);
                let parts = WindowKeyParts { customer: &k.customer_id, kind, region: &k.region, resource: &k.resource_id };
                let series = self.intern_series(&parts);
                let id = WindowId::new(series, k.granularity, k.window_start)
                    .ok_or_else(|| meter_avro::DecodeError::Malformed("state changelog: window start out of range".into()))?;
                match value {
                    None => {
                        self.windows.remove(&id);
                    }
                    Some(v) => {
                        let w = state::decode_window(v)?;
                        let w = WindowState::from_value(&w, id, partition)
                            .ok_or_else(|| meter_avro::DecodeError::Malformed("state changelog: event time outside its window".into()))?;
                        self.insert_window(id, w);
                    }
                }
            }
            state::Key::Stream(agent, customer) => {
                let id = stream_id(self.symbols.intern(&agent), self.symbols.intern(&customer));
                match value {
                    None => {
                        self.streams.remove(&id);
                    }
                    Some(v) => {
                        let tracker = state::decode_stream(v)?;
                        let changed = self.streams.get(&id).is_some_and(|s| s.changed);
                        self.streams.insert(id, Stream { partition, changed, used: true, tracker, tracked: UNTRACKED });
                    }
                }
            }
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
        self.closing.retain(|&(p, _, _)| p != partition);
        self.settled.retain(|&(p, _, _)| p != partition);
        self.clocks.remove(&partition);
        self.unsequenced.retain(|(p, _), _| *p != partition);
        self.streams.retain(|_, s| s.partition != partition);
        let streams = &self.streams;
        self.changed_streams.retain(|id| streams.contains_key(id));
        self.new_unsequenced.retain(|(p, _, _, _)| *p != partition);
        self.changes.retain(|c| c.partition != partition);
    }

    /// Forgets everything: after an aborted transaction the state must be
    /// restored from the changelog again.
    pub fn reset(&mut self) {
        let counters = std::mem::take(&mut self.counters);
        let partitions = self.partitions;
        let cold = self.cold.take();
        *self = Engine::new(self.catalog.clone(), self.codec.clone(), self.cfg.clone());
        self.partitions = partitions;
        self.cold = cold;
        self.counters = counters;
    }
}

/// Tombstones of each kind one flush writes per partition at most; the
/// rest follow in the next flushes.
const EXPIRE_PER_FLUSH: usize = 4096;

/// With a cold store, dedup streams that recorded no seq for this many
/// flushes leave memory.
const STREAM_SWEEP_FLUSHES: u64 = 64;

/// Removes and returns the entries of `partition` whose time is at most `to`.
fn pop_until(queue: &mut BTreeSet<(i32, Millis, WindowId)>, partition: i32, to: Millis) -> Vec<(i32, Millis, WindowId)> {
    let start = (partition, Millis::MIN, WindowId(0));
    let due: Vec<_> = queue.range(start..).take_while(|&&(p, t, _)| p == partition && t <= to).copied().collect();
    for e in &due {
        queue.remove(e);
    }
    due
}

/// The string dimensions of a series.
struct WindowKeyParts<'a> {
    customer: &'a str,
    kind: u32,
    region: &'a str,
    resource: &'a str,
}

fn emit(key: WindowKey, w: &mut WindowState) -> AggregatedUsage {
    w.revision += 1;
    let sum = w.sum.get();
    let delta = sum - w.emitted_sum.get();
    w.emitted_sum = w.sum;
    let start = key.window_start;
    AggregatedUsage {
        key,
        event_count: w.count,
        quantity_sum: sum,
        quantity_min: w.min,
        quantity_max: w.max,
        first_event_time: start + Millis::from(w.first),
        last_event_time: start + Millis::from(w.last),
        revision: w.revision,
        is_final: w.is_final,
        delta_sum: delta,
    }
}

#[cfg(test)]
mod tests;
