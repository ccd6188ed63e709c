//! Avro codecs for meterline's Kafka payloads.
//!
//! Payloads use Avro single-object encoding: the two magic bytes `C3 01`, the
//! 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of the writer schema's
//! canonical form, then the Avro binary encoding of the record. Any Avro
//! library can decode them with only the `.avsc` files in `schemas/avro/`.
//!
//! `apache-avro` parses the schemas and computes the fingerprints once, at
//! start-up. The per-record encoders and decoders are written out by hand for
//! these schemas: no `Value` tree, no schema resolution per record. Unit
//! tests check them byte for byte against `apache-avro`'s generic writer and
//! reader so the two cannot drift apart. Other stages write their own
//! records with the same framing through [`SingleObject`] and [`binary`]
//! (the InvoiceLine codec is `meter_rating::wire`).

pub mod binary;

use std::collections::BTreeMap;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use meter_model::{AggregatedUsage, DeadLetter, DeadLetterReason, Granularity, UsageEvent, WindowKey};

use binary::{Reader, Writer};

pub const USAGE_EVENT_AVSC: &str = include_str!("../../../schemas/avro/usage_event.avsc");
pub const AGGREGATED_USAGE_AVSC: &str = include_str!("../../../schemas/avro/aggregated_usage.avsc");
pub const DEAD_LETTER_AVSC: &str = include_str!("../../../schemas/avro/dead_letter.avsc");
pub const INVOICE_LINE_AVSC: &str = include_str!("../../../schemas/avro/invoice_line.avsc");

const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Why a payload could not be decoded. Each kind maps to one dead-letter
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("not Avro single-object encoding: payload does not start with C3 01")]
    BadMagic,
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownSchema(u64),
    #[error("malformed avro: {0}")]
    Malformed(String),
}

impl DecodeError {
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            DecodeError::Empty => DeadLetterReason::EmptyPayload,
            DecodeError::BadMagic => DeadLetterReason::BadMagic,
            DecodeError::UnknownSchema(_) => DeadLetterReason::UnknownSchema,
            DecodeError::Malformed(_) => DeadLetterReason::MalformedAvro,
        }
    }
}

/// A schema this build cannot parse is a defect of the build, not of input.
#[derive(Debug, thiserror::Error)]
#[error("invalid built-in schema {name}: {source}")]
pub struct SchemaError {
    name: &'static str,
    source: apache_avro::Error,
}

/// The single-object framing of one schema: the header its records start
/// with, and the check of a payload against it. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleObject {
    header: [u8; HEADER_LEN],
}

impl SingleObject {
    /// The framing of the schema `avsc` (named `name` in errors).
    pub fn new(name: &'static str, avsc: &str) -> Result<Self, SchemaError> {
        let schema = Schema::parse_str(avsc).map_err(|source| SchemaError { name, source })?;
        let fp = schema.fingerprint::<Rabin>();
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&fp.bytes[..8]);
        Ok(SingleObject { header })
    }

    /// Appends the header: the record's Avro body follows it.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header);
    }

    /// The Avro body of `payload`, once its header is checked to be this
    /// schema's.
    pub fn body<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        if payload.len() < 2 || payload[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if payload.len() < HEADER_LEN {
            return Err(DecodeError::Malformed("truncated single-object header".into()));
        }
        if payload[..HEADER_LEN] != self.header[..] {
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&payload[2..HEADER_LEN]);
            return Err(DecodeError::UnknownSchema(u64::from_le_bytes(fp)));
        }
        Ok(&payload[HEADER_LEN..])
    }
}

/// Encoders and decoders for the usage payload schemas. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Codec {
    event: SingleObject,
    aggregate: SingleObject,
    dead_letter: SingleObject,
}

impl Codec {
    pub fn new() -> Result<Self, SchemaError> {
        Ok(Codec {
            event: SingleObject::new("UsageEvent", USAGE_EVENT_AVSC)?,
            aggregate: SingleObject::new("AggregatedUsage", AGGREGATED_USAGE_AVSC)?,
            dead_letter: SingleObject::new("DeadLetter", DEAD_LETTER_AVSC)?,
        })
    }

    pub fn encode_event(&self, e: &UsageEvent, out: &mut Vec<u8>) {
        self.event.write_header(out);
        let mut w = Writer(out);
        w.string(&e.event_id);
        w.string(&e.agent_id);
        match e.seq {
            None => w.long(0),
            Some(s) => {
                w.long(1);
                w.long(s);
            }
        }
        w.string(&e.customer_id);
        w.string(&e.service);
        w.string(&e.usage_type);
        w.string(&e.resource_id);
        w.string(&e.region);
        w.long(e.quantity);
        w.long(e.event_time);
        w.string_map(&e.attributes);
    }

    pub fn decode_event(&self, payload: &[u8]) -> Result<UsageEvent, DecodeError> {
        let mut r = Reader::new(self.event.body(payload)?);
        let event = UsageEvent {
            event_id: r.string()?,
            agent_id: r.string()?,
            seq: match r.long()? {
                0 => None,
                1 => Some(r.long()?),
                b => return Err(DecodeError::Malformed(format!("seq: union branch {b} out of range"))),
            },
            customer_id: r.string()?,
            service: r.string()?,
            usage_type: r.string()?,
            resource_id: r.string()?,
            region: r.string()?,
            quantity: r.long()?,
            event_time: r.long()?,
            attributes: r.string_map()?,
        };
        r.finish()?;
        Ok(event)
    }

    /// Decodes an event without copying its strings: they borrow from
    /// `payload`. Accepts and rejects exactly the payloads
    /// [`Codec::decode_event`] does, with the same errors; the hot path of
    /// the processor uses it so that a record costs no allocation.
    pub fn decode_event_ref<'a>(&self, payload: &'a [u8]) -> Result<UsageEventRef<'a>, DecodeError> {
        let mut r = Reader::new(self.event.body(payload)?);
        let event_id = r.str()?;
        let agent_id = r.str()?;
        let seq = match r.long()? {
            0 => None,
            1 => Some(r.long()?),
            b => return Err(DecodeError::Malformed(format!("seq: union branch {b} out of range"))),
        };
        let customer_id = r.str()?;
        let service = r.str()?;
        let usage_type = r.str()?;
        let resource_id = r.str()?;
        let region = r.str()?;
        let quantity = r.long()?;
        let event_time = r.long()?;
        let start = r.position();
        let mut longest_attribute = 0;
        r.each_string_pair(|k, v| longest_attribute = longest_attribute.max(k.len()).max(v.len()))?;
        let attributes = r.since(start);
        r.finish()?;
        Ok(UsageEventRef {
            event_id,
            agent_id,
            seq,
            customer_id,
            service,
            usage_type,
            resource_id,
            region,
            quantity,
            event_time,
            attributes: EncodedAttributes { bytes: attributes, longest: longest_attribute },
        })
    }

    pub fn encode_aggregate(&self, a: &AggregatedUsage, out: &mut Vec<u8>) {
        self.aggregate.write_header(out);
        let mut w = Writer(out);
        let k = &a.key;
        w.long(k.window_start);
        w.long(k.window_end());
        w.long(i64::from(k.granularity.index()));
        w.string(&k.customer_id);
        w.string(&k.service);
        w.string(&k.usage_type);
        w.string(&k.region);
        w.string(&k.resource_id);
        w.long(a.event_count);
        w.decimal(a.quantity_sum);
        w.long(a.quantity_min);
        w.long(a.quantity_max);
        w.long(a.first_event_time);
        w.long(a.last_event_time);
        w.long(a.revision);
        w.boolean(a.is_final);
        w.decimal(a.delta_sum);
    }

    pub fn decode_aggregate(&self, payload: &[u8]) -> Result<AggregatedUsage, DecodeError> {
        let mut r = Reader::new(self.aggregate.body(payload)?);
        let window_start = r.long()?;
        let window_end = r.long()?;
        let g = r.long()?;
        let granularity =
            Granularity::from_index(g).ok_or_else(|| DecodeError::Malformed(format!("granularity: enum index {g} out of range")))?;
        if window_end != window_start + granularity.size_ms() {
            return Err(DecodeError::Malformed("window_end does not match granularity".into()));
        }
        let key = WindowKey {
            granularity,
            window_start,
            customer_id: r.string()?,
            service: r.string()?,
            usage_type: r.string()?,
            region: r.string()?,
            resource_id: r.string()?,
        };
        let a = AggregatedUsage {
            key,
            event_count: r.long()?,
            quantity_sum: r.decimal()?,
            quantity_min: r.long()?,
            quantity_max: r.long()?,
            first_event_time: r.long()?,
            last_event_time: r.long()?,
            revision: r.long()?,
            is_final: r.boolean()?,
            delta_sum: r.decimal()?,
        };
        r.finish()?;
        Ok(a)
    }

    pub fn encode_dead_letter(&self, d: &DeadLetter, out: &mut Vec<u8>) {
        self.dead_letter.write_header(out);
        let mut w = Writer(out);
        w.string(&d.reason);
        w.string(&d.detail);
        w.string(&d.source_topic);
        w.long(i64::from(d.source_partition));
        w.long(d.source_offset);
        match &d.key {
            None => w.long(0),
            Some(k) => {
                w.long(1);
                w.bytes(k);
            }
        }
        w.bytes(&d.payload);
        w.long(d.dead_lettered_at);
    }

    /// Decodes a dead letter (its reason may be one a newer processor added).
    pub fn decode_dead_letter(&self, payload: &[u8]) -> Result<DeadLetter, DecodeError> {
        let mut r = Reader::new(self.dead_letter.body(payload)?);
        let d = DeadLetter {
            reason: r.string()?,
            detail: r.string()?,
            source_topic: r.string()?,
            source_partition: i32::try_from(r.long()?).map_err(|_| DecodeError::Malformed("source_partition out of int range".into()))?,
            source_offset: r.long()?,
            key: match r.long()? {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                b => return Err(DecodeError::Malformed(format!("key: union branch {b} out of range"))),
            },
            payload: r.bytes()?.to_vec(),
            dead_lettered_at: r.long()?,
        };
        r.finish()?;
        Ok(d)
    }
}

/// A [`UsageEvent`] whose strings borrow from the payload it was decoded
/// from (see [`Codec::decode_event_ref`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageEventRef<'a> {
    pub event_id: &'a str,
    pub agent_id: &'a str,
    pub seq: Option<i64>,
    pub customer_id: &'a str,
    pub service: &'a str,
    pub usage_type: &'a str,
    pub resource_id: &'a str,
    pub region: &'a str,
    pub quantity: i64,
    pub event_time: i64,
    pub attributes: EncodedAttributes<'a>,
}

impl UsageEventRef<'_> {
    pub fn to_owned_event(&self) -> UsageEvent {
        UsageEvent {
            event_id: self.event_id.to_owned(),
            agent_id: self.agent_id.to_owned(),
            seq: self.seq,
            customer_id: self.customer_id.to_owned(),
            service: self.service.to_owned(),
            usage_type: self.usage_type.to_owned(),
            resource_id: self.resource_id.to_owned(),
            region: self.region.to_owned(),
            quantity: self.quantity,
            event_time: self.event_time,
            attributes: self.attributes.to_map(),
        }
    }
}

/// The attribute map of a borrowed event, still encoded (already checked to
/// be well formed), with the length of its longest key or value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedAttributes<'a> {
    bytes: &'a [u8],
    longest: usize,
}

impl EncodedAttributes<'_> {
    /// Length in bytes of the longest key or value of any entry, including
    /// entries a later duplicate key overrides.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// The map as [`Codec::decode_event`] builds it: a later duplicate key
    /// overrides an earlier one.
    pub fn to_map(&self) -> Attributes {
        let mut m = Attributes::new();
        // Checked when the event was decoded, so this cannot fail.
        let _ = Reader::new(self.bytes).each_string_pair(|k, v| {
            m.insert(k.to_owned(), v.to_owned());
        });
        m
    }
}

/// Attribute maps are small; a BTreeMap keeps their encoding deterministic.
pub type Attributes = BTreeMap<String, String>;

#[cfg(test)]
mod tests;
