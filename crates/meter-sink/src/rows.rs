//! The sink's rows as stored in ClickHouse, and their mapping from what the
//! processor publishes. Field order is column order
//! (`schemas/clickhouse/0001_usage_tables.sql`, `0002_dead_letters.sql`):
//! the crate's RowBinary writer does not check it against the server (see
//! `meter-clickhouse`), the integration tests do.

use meter_clickhouse::seconds;
use meter_model::{AggregatedUsage, DeadLetter};
use serde::{Deserialize, Serialize};

/// One window revision in `usage_minute`, `usage_hour` or `usage_day`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct UsageRow {
    /// DateTime('UTC') as seconds since the epoch.
    pub window_start: u32,
    pub window_end: u32,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub resource_id: String,
    pub event_count: i64,
    /// Decimal(38, 0): a little-endian 128-bit integer in RowBinary.
    pub quantity_sum: i128,
    pub quantity_min: i64,
    pub quantity_max: i64,
    pub first_event_time_ms: i64,
    pub last_event_time_ms: i64,
    pub revision: u64,
    pub is_final: u8,
    pub delta_sum: i128,
}

impl From<&AggregatedUsage> for UsageRow {
    fn from(a: &AggregatedUsage) -> Self {
        UsageRow {
            window_start: seconds(a.key.window_start),
            window_end: seconds(a.key.window_end()),
            customer_id: a.key.customer_id.clone(),
            service: a.key.service.clone(),
            usage_type: a.key.usage_type.clone(),
            region: a.key.region.clone(),
            resource_id: a.key.resource_id.clone(),
            event_count: a.event_count,
            quantity_sum: a.quantity_sum,
            quantity_min: a.quantity_min,
            quantity_max: a.quantity_max,
            first_event_time_ms: a.first_event_time,
            last_event_time_ms: a.last_event_time,
            revision: u64::try_from(a.revision).unwrap_or(0),
            is_final: u8::from(a.is_final),
            delta_sum: a.delta_sum,
        }
    }
}

/// One refused input record in `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct DeadLetterRow {
    pub dead_lettered_at: u32,
    pub reason: String,
    pub detail: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub has_key: u8,
    /// Original key bytes (ClickHouse String holds arbitrary bytes).
    #[serde(with = "serde_bytes_compat")]
    pub record_key: Vec<u8>,
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

impl From<DeadLetter> for DeadLetterRow {
    fn from(d: DeadLetter) -> Self {
        DeadLetterRow {
            dead_lettered_at: seconds(d.dead_lettered_at),
            reason: d.reason,
            detail: d.detail,
            source_topic: d.source_topic,
            source_partition: d.source_partition,
            source_offset: d.source_offset,
            has_key: u8::from(d.key.is_some()),
            record_key: d.key.unwrap_or_default(),
            payload: d.payload,
        }
    }
}

/// Serializes `Vec<u8>` as a byte string (RowBinary String) rather than as a
/// sequence of u8 (which would be an Array(UInt8)).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_str<E>(self, v: &str) -> Result<Vec<u8>, E> {
                Ok(v.as_bytes().to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_string<E>(self, v: String) -> Result<Vec<u8>, E> {
                Ok(v.into_bytes())
            }
        }
        d.deserialize_byte_buf(V)
    }
}
