//! Avro codecs for meterline's Kafka payloads.
//!
//! Payloads use Avro single-object encoding by default: the two magic bytes
//! `C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
//! schema's Parsing Canonical Form as the specification defines it
//! ([`canonical`]), then the Avro binary encoding of the record. Any Avro
//! library decodes them with only the `.avsc` files in `schemas/avro/`
//! (`tests/interop/` proves it with Java's and Python's). The Confluent
//! Schema Registry wire format is the other framing ([`framing`]); records
//! written with another compatible version of a schema are resolved to the
//! current one.
//!
//! The per-record encoders and decoders of the current schemas are written
//! out by hand: no `Value` tree, no schema resolution per record. Unit tests
//! check them byte for byte against `apache-avro`'s generic writer and
//! reader so the two cannot drift apart; `apache-avro` resolves the records
//! of other schema versions. Other stages write their own records with the
//! same framing through [`Framed`] and [`binary`] (the InvoiceLine codec is
//! `meter_rating::wire`). [`json`] renders any record as JSON (`meter tail`).

pub mod binary;
pub mod canonical;
pub mod framing;
pub mod history;
pub mod json;

use std::collections::BTreeMap;
use std::sync::Arc;

use apache_avro::types::Value;
use apache_avro::Schema;
use meter_model::{AggregatedUsage, DeadLetter, DeadLetterReason, Granularity, UsageEvent, WindowKey};

use binary::{Reader, Writer};
pub use framing::{confluent_id, Body, Framed, Output, SchemaStore, Via};

pub const USAGE_EVENT_AVSC: &str = include_str!("../../../schemas/avro/usage_event.avsc");
/// UsageEvent version 1, without `incarnation`: what agents before
/// incarnations write. Its body is a prefix of the current one's, so it is
/// decoded by hand too, not resolved record by record.
pub const USAGE_EVENT_V1_AVSC: &str = include_str!("../../../schemas/avro/history/usage_event.v1.avsc");
pub const AGGREGATED_USAGE_AVSC: &str = include_str!("../../../schemas/avro/aggregated_usage.avsc");
pub const DEAD_LETTER_AVSC: &str = include_str!("../../../schemas/avro/dead_letter.avsc");
pub const INVOICE_LINE_AVSC: &str = include_str!("../../../schemas/avro/invoice_line.avsc");
pub const PERIOD_CLOSE_AVSC: &str = include_str!("../../../schemas/avro/period_close.avsc");
/// InvoiceLine version 1, without `line_type`: what releases before line
/// types write (every line of theirs is usage). Its body is a prefix of the
/// current one's, so it is decoded by hand too (`meter_rating::wire`).
pub const INVOICE_LINE_V1_AVSC: &str = include_str!("../../../schemas/avro/history/invoice_line.v1.avsc");

/// Why a payload could not be decoded. Each kind maps to one dead-letter
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("neither Avro single-object encoding (C3 01) nor the Confluent wire format (00)")]
    BadMagic,
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownSchema(u64),
    /// A Confluent schema id the store has no answer for yet: ask the
    /// registry, then decode again.
    #[error("schema id {0} not looked up in the schema registry (is serialization.registry_url set?)")]
    UnknownSchemaId(u32),
    #[error("the schema registry has no schema with id {0}")]
    NoSuchSchemaId(u32),
    #[error("the fingerprint {0:016x} meterline wrote before it followed the Avro specification, refused (serialization.accept_legacy_fingerprint is off)")]
    LegacyFingerprint(u64),
    #[error("writer schema cannot be resolved to the current one: {0}")]
    Unresolvable(String),
    #[error("malformed avro: {0}")]
    Malformed(String),
}

impl DecodeError {
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            DecodeError::Empty => DeadLetterReason::EmptyPayload,
            DecodeError::BadMagic => DeadLetterReason::BadMagic,
            DecodeError::UnknownSchema(_)
            | DecodeError::UnknownSchemaId(_)
            | DecodeError::NoSuchSchemaId(_)
            | DecodeError::LegacyFingerprint(_)
            | DecodeError::Unresolvable(_) => DeadLetterReason::UnknownSchema,
            DecodeError::Malformed(_) => DeadLetterReason::MalformedAvro,
        }
    }
}

/// A schema this build cannot parse is a defect of the build; a writer
/// schema from outside (configuration, the registry) that cannot be parsed
/// is that source's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid schema {name}: {message}")]
pub struct SchemaError {
    name: &'static str,
    message: String,
}

impl SchemaError {
    pub fn new(name: &'static str, message: impl Into<String>) -> Self {
        SchemaError { name, message: message.into() }
    }
}

/// An earlier version of a payload schema whose body is a prefix of the
/// current one's (fields were only appended), so that the hand-written
/// decoder reads it too: tells which records [`Framed::read`] gives as
/// [`Body::Other`] were written with it.
///
/// A record names its writer schema by the specification's fingerprint,
/// the legacy one or a registry id, and the framing gives the schema it
/// knows under that fingerprint. The specification's fingerprint leaves
/// logical types out, so the store could know another schema under the
/// version's (one with other decimal scales, added first): each of the two
/// fingerprints counts only if the schema the framing gives for it has the
/// version's canonical form as apache-avro writes it (logical types,
/// precision and scale kept). That is checked once, here, as a framing
/// gives the same schema for a fingerprint for good (its store never
/// replaces one, its legacy schema is fixed): per record it is a
/// comparison of fingerprints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlierVersion {
    /// The specification's fingerprint and the legacy one, each when it
    /// gives this version.
    fingerprints: [Option<u64>; 2],
}

impl EarlierVersion {
    /// Version `avsc` of `framing`'s schema (`name` in errors), made known
    /// to its store. Build it while the framing accepts the legacy
    /// fingerprint (as it does when created).
    pub fn new(name: &'static str, avsc: &str, framing: &Framed) -> Result<Self, SchemaError> {
        let canonical = Schema::parse_str(avsc).map_err(|e| SchemaError::new(name, e.to_string()))?.canonical_form();
        let spec = framing.store().add_schema(avsc)?;
        let legacy = framing.legacy_fingerprint();
        // The writer schema the framing gives a record with the fingerprint.
        let writer = |fp: u64| {
            let mut header = vec![0xC3, 0x01];
            header.extend_from_slice(&fp.to_le_bytes());
            match framing.read(&header) {
                Ok((Body::Other(writer, got, _), _)) if got == fp => Some(writer),
                _ => None,
            }
        };
        let is_it = |w: &Option<Arc<Schema>>| w.as_ref().is_some_and(|w| w.canonical_form() == canonical);
        let (spec_writer, legacy_writer) = (writer(spec), writer(legacy));
        let spec_ok = is_it(&spec_writer);
        // Usually one schema: the legacy one is the store's (a canonical form costs).
        let legacy_ok = match (&spec_writer, &legacy_writer) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => spec_ok,
            _ => is_it(&legacy_writer),
        };
        Ok(EarlierVersion { fingerprints: [Some(spec).filter(|_| spec_ok), Some(legacy).filter(|_| legacy_ok)] })
    }

    /// Whether a record the framing gave as `Body::Other(_, fp, _)` was
    /// written with this version.
    pub fn wrote(&self, fp: u64) -> bool {
        self.fingerprints.contains(&Some(fp))
    }
}

/// Encoders and decoders for the usage payload schemas. Cheap to clone;
/// clones share their [`SchemaStore`].
#[derive(Debug, Clone)]
pub struct Codec {
    event: Framed,
    aggregate: Framed,
    dead_letter: Framed,
    /// The current UsageEvent schema, the reader of resolutions.
    event_reader: Arc<Schema>,
    /// UsageEvent version 1, read by hand.
    event_v1: EarlierVersion,
}

impl Codec {
    /// Codecs writing single-object records, with a store of their own.
    pub fn new() -> Result<Self, SchemaError> {
        Codec::with_store(&SchemaStore::default())
    }

    /// Codecs whose writer schemas are known to `store` (shared with
    /// whatever else uses it: other codecs, the registry lookups).
    pub fn with_store(store: &SchemaStore) -> Result<Self, SchemaError> {
        for avsc in history::SCHEMAS {
            store.add_schema(avsc)?;
        }
        let event_reader = Schema::parse_str(USAGE_EVENT_AVSC).map_err(|e| SchemaError::new("UsageEvent", e.to_string()))?;
        // Deployed agents with the legacy fingerprint write version 1.
        let event = Framed::with_legacy_of("UsageEvent", USAGE_EVENT_AVSC, USAGE_EVENT_V1_AVSC, store)?;
        Ok(Codec {
            event_v1: EarlierVersion::new("UsageEvent v1", USAGE_EVENT_V1_AVSC, &event)?,
            event,
            aggregate: Framed::new("AggregatedUsage", AGGREGATED_USAGE_AVSC, store)?,
            dead_letter: Framed::new("DeadLetter", DEAD_LETTER_AVSC, store)?,
            event_reader: Arc::new(event_reader),
        })
    }

    pub fn store(&self) -> &SchemaStore {
        self.event.store()
    }

    /// The framing of events, to set what it writes and accepts.
    pub fn events_mut(&mut self) -> &mut Framed {
        &mut self.event
    }

    pub fn aggregates_mut(&mut self) -> &mut Framed {
        &mut self.aggregate
    }

    pub fn dead_letters_mut(&mut self) -> &mut Framed {
        &mut self.dead_letter
    }

    pub fn events(&self) -> &Framed {
        &self.event
    }

    pub fn aggregates(&self) -> &Framed {
        &self.aggregate
    }

    pub fn dead_letters(&self) -> &Framed {
        &self.dead_letter
    }

    pub fn encode_event(&self, e: &UsageEvent, out: &mut Vec<u8>) {
        self.event.write_header(out);
        encode_event_body(e, out);
    }

    /// Decodes an event, whatever its framing and (known) writer schema.
    pub fn decode_event(&self, payload: &[u8]) -> Result<UsageEvent, DecodeError> {
        match self.event.read(payload)?.0 {
            Body::Current(body) => decode_event_body(body, true),
            Body::Other(_, fp, body) if self.event_v1.wrote(fp) => decode_event_body(body, false),
            Body::Other(writer, _, body) => self.resolve_event(&writer, body),
        }
    }

    /// Decodes an event without copying its strings: they borrow from
    /// `payload` or, for a writer schema other than the current one, from
    /// `scratch`, which receives the record resolved to the current schema.
    /// Returns the event, the current-schema body it was read from, and how
    /// it came. Accepts and rejects exactly the payloads
    /// [`Codec::decode_event`] does, with the same errors; the hot path of
    /// the processor uses it so that a record costs no allocation.
    pub fn decode_event_with<'a>(
        &self,
        payload: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<(UsageEventRef<'a>, &'a [u8], Via), DecodeError> {
        match self.event.read(payload)? {
            (Body::Current(body), via) => Ok((decode_event_body_ref(body)?, body, via)),
            // A version-1 body plus an empty incarnation is the current body.
            (Body::Other(_, fp, body), via) if self.event_v1.wrote(fp) => {
                scratch.clear();
                scratch.extend_from_slice(body);
                Writer(scratch).string("");
                let body: &'a [u8] = scratch.as_slice();
                Ok((decode_event_body_ref(body)?, body, via))
            }
            (Body::Other(writer, _, body), via) => {
                let e = self.resolve_event(&writer, body)?;
                scratch.clear();
                encode_event_body(&e, scratch);
                let body: &'a [u8] = scratch.as_slice();
                Ok((decode_event_body_ref(body)?, body, via))
            }
        }
    }

    /// [`Codec::decode_event_with`] for records of the current schema only
    /// (no scratch space for a resolution).
    pub fn decode_event_ref<'a>(&self, payload: &'a [u8]) -> Result<UsageEventRef<'a>, DecodeError> {
        match self.event.read(payload)?.0 {
            Body::Current(body) => decode_event_body_ref(body),
            Body::Other(_, fp, _) => Err(DecodeError::UnknownSchema(fp)),
        }
    }

    /// A record of another UsageEvent version, resolved to the current one.
    fn resolve_event(&self, writer: &Schema, body: &[u8]) -> Result<UsageEvent, DecodeError> {
        let value = decode_generic(writer, body)?;
        event_from_value(value.resolve(&self.event_reader).map_err(|e| DecodeError::Unresolvable(e.to_string()))?)
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
        let mut r = Reader::new(self.aggregate.current_body(payload)?);
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
        let mut r = Reader::new(self.dead_letter.current_body(payload)?);
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

/// The Avro body of `e` in the current UsageEvent schema.
fn encode_event_body(e: &UsageEvent, out: &mut Vec<u8>) {
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
    w.string(&e.incarnation);
}

/// A body of the current schema, or of version 1 (no incarnation).
fn decode_event_body(body: &[u8], current: bool) -> Result<UsageEvent, DecodeError> {
    let mut r = Reader::new(body);
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
        incarnation: if current { r.string()? } else { String::new() },
    };
    r.finish()?;
    Ok(event)
}

fn decode_event_body_ref(body: &[u8]) -> Result<UsageEventRef<'_>, DecodeError> {
    let mut r = Reader::new(body);
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
    let incarnation = r.str()?;
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
        incarnation,
    })
}

/// `body` decoded with its writer schema by apache-avro, checked to be
/// whole: apache-avro reads a string cut short as null instead of failing,
/// so the value is validated against the schema, and nothing may follow it.
pub(crate) fn decode_generic(writer: &Schema, body: &[u8]) -> Result<Value, DecodeError> {
    let mut cursor = std::io::Cursor::new(body);
    let value = apache_avro::from_avro_datum(writer, &mut cursor, None).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if cursor.position() as usize != body.len() {
        return Err(DecodeError::Malformed(format!("{} bytes after the record", body.len() - cursor.position() as usize)));
    }
    if !value.validate(writer) {
        return Err(DecodeError::Malformed("the record does not match its writer schema (truncated?)".into()));
    }
    Ok(value)
}

/// A resolved UsageEvent value as the model type.
fn event_from_value(v: Value) -> Result<UsageEvent, DecodeError> {
    let Value::Record(fields) = v else { return Err(DecodeError::Unresolvable("not a record".into())) };
    let mut e = UsageEvent {
        event_id: String::new(),
        agent_id: String::new(),
        seq: None,
        customer_id: String::new(),
        service: String::new(),
        usage_type: String::new(),
        resource_id: String::new(),
        region: String::new(),
        quantity: 0,
        event_time: 0,
        attributes: Attributes::new(),
        incarnation: String::new(),
    };
    let bad = |name: &str, v: &Value| DecodeError::Unresolvable(format!("field {name}: unexpected value {v:?}"));
    for (name, value) in fields {
        let value = match value {
            Value::Union(_, inner) => *inner,
            v => v,
        };
        match (name.as_str(), value) {
            ("event_id", Value::String(s)) => e.event_id = s,
            ("agent_id", Value::String(s)) => e.agent_id = s,
            ("customer_id", Value::String(s)) => e.customer_id = s,
            ("service", Value::String(s)) => e.service = s,
            ("usage_type", Value::String(s)) => e.usage_type = s,
            ("resource_id", Value::String(s)) => e.resource_id = s,
            ("region", Value::String(s)) => e.region = s,
            ("incarnation", Value::String(s)) => e.incarnation = s,
            ("seq", Value::Null) => e.seq = None,
            ("seq", Value::Long(n)) => e.seq = Some(n),
            ("quantity", Value::Long(n)) => e.quantity = n,
            ("event_time", Value::Long(n) | Value::TimestampMillis(n)) => e.event_time = n,
            ("attributes", Value::Map(m)) => {
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            e.attributes.insert(k, s);
                        }
                        other => return Err(bad("attributes", &other)),
                    }
                }
            }
            (name, other) => return Err(bad(name, &other)),
        }
    }
    Ok(e)
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
    pub incarnation: &'a str,
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
            incarnation: self.incarnation.to_owned(),
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

/// Checks of hand-written codecs against `apache-avro` (tests of this
/// crate and of the other codecs' crates).
#[doc(hidden)]
pub mod testing {
    use apache_avro::types::Value;
    use apache_avro::Schema;

    /// Decodes the body of a framed record (`header_len` header bytes) with
    /// apache-avro's generic reader and encodes the value again with its
    /// generic writer: the bytes must come back unchanged.
    pub fn apache_round_trip_framed(avsc: &str, bytes: &[u8], header_len: usize) -> (Value, Vec<u8>) {
        let schema = Schema::parse_str(avsc).expect("valid schema");
        let (header, mut body) = bytes.split_at(header_len);
        let value = apache_avro::from_avro_datum(&schema, &mut body, None).expect("apache-avro decodes the body");
        assert!(body.is_empty(), "{} bytes left after the record", body.len());
        let mut out = header.to_vec();
        out.extend(apache_avro::to_avro_datum(&schema, value.clone()).expect("apache-avro encodes the value"));
        (value, out)
    }

    /// [`apache_round_trip_framed`] of a single-object record.
    pub fn apache_round_trip(avsc: &str, bytes: &[u8]) -> (Value, Vec<u8>) {
        apache_round_trip_framed(avsc, bytes, 10)
    }

    /// The value of field `name` of a record.
    pub fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
        match v {
            Value::Record(fields) => &fields.iter().find(|(n, _)| n == name).expect("the field exists").1,
            _ => panic!("not a record"),
        }
    }
}

#[cfg(test)]
mod tests;
