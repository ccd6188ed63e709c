//! Types shared by every meterline component: the usage event, the
//! aggregated window revision, dead-letter reasons, event-time windows and
//! the catalog of accepted usage types.
//!
//! This crate does no I/O beyond reading a catalog file and the wall clock;
//! everything here is plain data and arithmetic that the processor, sink and
//! reports agree on: the calendar ([`date`]), the clock and the durations
//! and instants users type ([`time`]).

pub mod catalog;
pub mod date;
pub mod fnv;
pub mod ledger;
pub mod partition;
pub mod signing;
pub mod time;
pub mod window;

use std::collections::BTreeMap;

pub use catalog::{Catalog, UsageTypeInfo};
pub use date::{Date, YearMonth};
pub use time::now_ms;
pub use window::Granularity;

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// One measurement of one resource's usage of one usage type over one
/// second, as published by an agent on `usage.events`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageEvent {
    /// Unique and deterministic: see [`event_id`].
    pub event_id: String,
    pub agent_id: String,
    /// Per (agent_id, incarnation, customer_id) stream, strictly increasing.
    pub seq: Option<i64>,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub resource_id: String,
    pub region: String,
    /// In the usage type's base unit.
    pub quantity: i64,
    pub event_time: Millis,
    pub attributes: BTreeMap<String, String>,
    /// The agent's incarnation (see [`identity`]): empty from producers of
    /// schema version 1 and from those that keep none.
    pub incarnation: String,
}

/// The deterministic event id of the `seq`-th event of an agent
/// incarnation's stream for a customer, so that a replayed event carries
/// the same id. Without an incarnation it is the version-1 id.
pub fn event_id(agent_id: &str, incarnation: &str, customer_id: &str, seq: i64) -> String {
    if incarnation.is_empty() {
        format!("{agent_id}/{customer_id}/{seq}")
    } else {
        format!("{agent_id}/{incarnation}/{customer_id}/{seq}")
    }
}

/// How an agent's identity is told apart.
pub mod identity {
    /// Separates the agent id from the incarnation in the name of a dedup
    /// stream's agent. It may appear in neither (the processor refuses
    /// events whose agent id or incarnation holds a control character), so
    /// that `(agent, incarnation)` pairs map to distinct names, and an event
    /// without an incarnation keeps the name it had before incarnations.
    pub const SEPARATOR: char = '\u{1f}';

    /// The name of the dedup stream's agent: the agent id alone without an
    /// incarnation, else `agent_id` SEPARATOR `incarnation`, built in `buf`
    /// (reused: the processor names a stream per event).
    pub fn stream_agent<'a>(buf: &'a mut String, agent_id: &'a str, incarnation: &str) -> &'a str {
        if incarnation.is_empty() {
            return agent_id;
        }
        buf.clear();
        buf.push_str(agent_id);
        buf.push(SEPARATOR);
        buf.push_str(incarnation);
        buf
    }

    /// Whether `s` may be an agent id or an incarnation: no control
    /// characters (the separator is one).
    pub fn is_valid(s: &str) -> bool {
        // The hot path (every event): printable ASCII in one pass.
        s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(char::is_control)
    }
}

/// The dimensions that identify one aggregated window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub granularity: Granularity,
    pub window_start: Millis,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    /// Empty unless the catalog keeps resource_id in this usage type's key.
    pub resource_id: String,
}

impl WindowKey {
    pub fn window_end(&self) -> Millis {
        self.window_start + self.granularity.size_ms()
    }

    /// The Kafka record key of the window's revisions on `usage.aggregates`:
    /// its fields joined by `|`, with `\` and `|` inside fields escaped by
    /// a `\`, so that distinct windows never share a key (the topic is
    /// compacted by key).
    pub fn record_key(&self) -> String {
        let mut s = format!("{}|{}", self.granularity.as_str(), self.window_start);
        for f in [&self.customer_id, &self.service, &self.usage_type, &self.region, &self.resource_id] {
            s.push('|');
            for c in f.chars() {
                if c == '|' || c == '\\' {
                    s.push('\\');
                }
                s.push(c);
            }
        }
        s
    }
}

/// One revision of one window, as published on `usage.aggregates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatedUsage {
    pub key: WindowKey,
    pub event_count: i64,
    pub quantity_sum: i128,
    pub quantity_min: i64,
    pub quantity_max: i64,
    pub first_event_time: Millis,
    pub last_event_time: Millis,
    pub revision: i64,
    pub is_final: bool,
    /// `quantity_sum` minus that of the previous revision.
    pub delta_sum: i128,
}

/// Why an input record was dead-lettered. The string forms are stable: they
/// are stored in ClickHouse and used as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DeadLetterReason {
    EmptyPayload,
    OversizePayload,
    BadMagic,
    UnknownSchema,
    MalformedAvro,
    MissingKey,
    KeyMismatch,
    EmptyCustomerId,
    StringTooLong,
    UnknownService,
    UnknownUsageType,
    NegativeQuantity,
    QuantityOverflow,
    InvalidTimestamp,
    FutureTimestamp,
    TooLate,
    EventIdConflict,
    Unauthorized,
    InvalidSeq,
    WrongPartition,
    BadSignature,
    InvalidIdentity,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 22] = [
        Self::EmptyPayload,
        Self::OversizePayload,
        Self::BadMagic,
        Self::UnknownSchema,
        Self::MalformedAvro,
        Self::MissingKey,
        Self::KeyMismatch,
        Self::EmptyCustomerId,
        Self::StringTooLong,
        Self::UnknownService,
        Self::UnknownUsageType,
        Self::NegativeQuantity,
        Self::QuantityOverflow,
        Self::InvalidTimestamp,
        Self::FutureTimestamp,
        Self::TooLate,
        Self::EventIdConflict,
        Self::Unauthorized,
        Self::InvalidSeq,
        Self::WrongPartition,
        Self::BadSignature,
        Self::InvalidIdentity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::OversizePayload => "oversize_payload",
            Self::BadMagic => "bad_magic",
            Self::UnknownSchema => "unknown_schema",
            Self::MalformedAvro => "malformed_avro",
            Self::MissingKey => "missing_key",
            Self::KeyMismatch => "key_mismatch",
            Self::EmptyCustomerId => "empty_customer_id",
            Self::StringTooLong => "string_too_long",
            Self::UnknownService => "unknown_service",
            Self::UnknownUsageType => "unknown_usage_type",
            Self::NegativeQuantity => "negative_quantity",
            Self::QuantityOverflow => "quantity_overflow",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::FutureTimestamp => "future_timestamp",
            Self::TooLate => "too_late",
            Self::EventIdConflict => "event_id_conflict",
            Self::Unauthorized => "unauthorized",
            Self::InvalidSeq => "invalid_seq",
            Self::WrongPartition => "wrong_partition",
            Self::BadSignature => "bad_signature",
            Self::InvalidIdentity => "invalid_identity",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record the processor refused, with the original bytes, as published on
/// `usage.dlq` and stored in the `dead_letters` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// A [`DeadLetterReason`] as a string: read back from the topic it may be
    /// one that a newer processor added, and it is kept as it came.
    pub reason: String,
    pub detail: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub dead_lettered_at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_with_control_characters_are_invalid() {
        for ok in ["host-a", "", "höst-ä", "5f1c9a0e7d2b4c31"] {
            assert!(identity::is_valid(ok), "{ok:?}");
        }
        for bad in ["a\u{1f}b", "a\0", "a\u{7f}", "h\u{85}", "\u{9f}", "x\n"] {
            assert!(!identity::is_valid(bad), "{bad:?}");
        }
        let mut buf = String::new();
        assert_eq!(identity::stream_agent(&mut buf, "a", "i"), "a\u{1f}i");
        assert_eq!(identity::stream_agent(&mut buf, "a", ""), "a");
    }

    #[test]
    fn record_keys_of_distinct_windows_differ_even_with_separators_in_fields() {
        let k = |customer: &str, service: &str| WindowKey {
            granularity: Granularity::Hour,
            window_start: 0,
            customer_id: customer.into(),
            service: service.into(),
            usage_type: "u".into(),
            region: "r".into(),
            resource_id: String::new(),
        };
        assert_eq!(k("c", "s").record_key(), "HOUR|0|c|s|u|r|");
        assert_ne!(k("a|b", "s").record_key(), k("a", "b|s").record_key());
        assert_ne!(k("a\\", "|s").record_key(), k("a\\|", "s").record_key());
    }
}
