//! How a record names its writer schema on the wire, written and read.
//!
//! Two framings, for any payload schema:
//! - Avro single-object encoding (the default): `C3 01`, the 8-byte
//!   little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing
//!   Canonical Form ([`crate::canonical`]), the Avro body;
//! - the Confluent Schema Registry wire format: `00`, the 4-byte big-endian
//!   schema id the registry gave the writer schema, the body.
//!
//! Reading, a [`Framed`] accepts both, whatever it writes. The writer schema
//! is then one of:
//! - the current schema (`schemas/avro/*.avsc`): the body is decoded by the
//!   hand-written decoders with no schema resolution (the hot path);
//! - the schema under the fingerprint meterline wrote before it computed
//!   fingerprints by the specification (`legacy`, accepted unless switched
//!   off: deployed agents write it, and compacted topics keep it); for
//!   UsageEvent and InvoiceLine that is version 1
//!   (`history/usage_event.v1.avsc`, `history/invoice_line.v1.avsc`);
//! - another version known to the [`SchemaStore`] (a schema of
//!   `schemas/avro/history/`, one configured for a third-party producer, or
//!   one the registry answered for an id): the body is resolved from that
//!   writer schema to the current one by Avro's resolution rules.
//!
//! Anything else is an unknown schema: dead-lettered on input, an error
//! everywhere else. A Confluent id the store has not seen yet is
//! [`DecodeError::UnknownSchemaId`]: the caller asks the registry
//! (`meter_kafka::registry`) and tells the store ([`SchemaStore::add_id`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;

use crate::canonical;
use crate::{DecodeError, SchemaError};

const MAGIC: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_LEN: usize = 10;
const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_LEN: usize = 5;

/// What a record is framed as, on output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Avro single-object encoding.
    #[default]
    SingleObject,
    /// The Confluent wire format with the registry's id of the current schema.
    Confluent { id: u32 },
}

/// How an input record was framed and resolved, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Single-object, the current fingerprint.
    SingleObject,
    /// Single-object, the fingerprint meterline wrote before the fix.
    LegacyFingerprint,
    /// Confluent, the current schema's id.
    Confluent,
    /// Another version of the schema, resolved to the current one.
    Resolved,
}

/// The writer schema of an input record and its Avro body.
#[derive(Debug, Clone)]
pub enum Body<'a> {
    /// Written with the current schema.
    Current(&'a [u8]),
    /// Written with another (known) version of it, of that fingerprint.
    Other(Arc<Schema>, u64, &'a [u8]),
}

/// Writer schemas known by fingerprint and by registry id, shared by every
/// codec of a process (cloning shares it).
#[derive(Debug, Clone, Default)]
pub struct SchemaStore {
    inner: Arc<RwLock<StoreInner>>,
}

#[derive(Debug, Default)]
struct StoreInner {
    by_fingerprint: HashMap<u64, Arc<Schema>>,
    /// Registry ids; `None`: the registry has no such id.
    ids: HashMap<u32, Option<u64>>,
}

impl SchemaStore {
    /// Knows `avsc` as a writer schema; returns its fingerprint.
    pub fn add_schema(&self, avsc: &str) -> Result<u64, SchemaError> {
        let fp = canonical::fingerprint(avsc).map_err(|e| SchemaError::new("writer schema", e.to_string()))?;
        let schema = Schema::parse_str(avsc).map_err(|e| SchemaError::new("writer schema", e.to_string()))?;
        if let Ok(mut s) = self.inner.write() {
            s.by_fingerprint.entry(fp).or_insert_with(|| Arc::new(schema));
        }
        Ok(fp)
    }

    /// Knows the registry's schema `id`: its text, or `None` when the
    /// registry has no such id (records naming it are then unknown).
    pub fn add_id(&self, id: u32, avsc: Option<&str>) -> Result<(), SchemaError> {
        let fp = avsc.map(|a| self.add_schema(a)).transpose()?;
        if let Ok(mut s) = self.inner.write() {
            s.ids.insert(id, fp);
        }
        Ok(())
    }

    /// Whether the store has an answer for `id` (known or known absent).
    pub fn knows_id(&self, id: u32) -> bool {
        self.inner.read().map(|s| s.ids.contains_key(&id)).unwrap_or(false)
    }

    fn id(&self, id: u32) -> Option<Option<u64>> {
        self.inner.read().ok().and_then(|s| s.ids.get(&id).copied())
    }

    fn schema(&self, fp: u64) -> Option<Arc<Schema>> {
        self.inner.read().ok().and_then(|s| s.by_fingerprint.get(&fp).cloned())
    }
}

/// The Confluent schema id of `payload`, if it is in that framing.
pub fn confluent_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The framing of one payload schema: the header it writes, and what it
/// accepts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Framed {
    name: &'static str,
    avsc: &'static str,
    fingerprint: u64,
    header: [u8; SINGLE_OBJECT_LEN],
    legacy: [u8; SINGLE_OBJECT_LEN],
    /// The schema written under the legacy fingerprint, when it is not the
    /// current one.
    legacy_schema: Option<Arc<Schema>>,
    accept_legacy: bool,
    output: [u8; SINGLE_OBJECT_LEN],
    output_len: usize,
    store: SchemaStore,
}

fn single_object(fp: u64) -> [u8; SINGLE_OBJECT_LEN] {
    let mut h = [0u8; SINGLE_OBJECT_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2..].copy_from_slice(&fp.to_le_bytes());
    h
}

/// The fingerprint meterline wrote before it followed the specification:
/// `apache-avro`'s Rabin fingerprint of its own canonical form, which keeps
/// logical types and decimal precision and scale.
pub fn legacy_fingerprint(name: &'static str, avsc: &str) -> Result<u64, SchemaError> {
    use apache_avro::rabin::Rabin;
    let schema = Schema::parse_str(avsc).map_err(|e| SchemaError::new(name, e.to_string()))?;
    let fp = schema.fingerprint::<Rabin>();
    let mut b = [0u8; 8];
    b.copy_from_slice(&fp.bytes[..8]);
    Ok(u64::from_le_bytes(b))
}

impl Framed {
    /// The framing of the schema `avsc` (named `name` in errors), writing
    /// single-object records, accepting the legacy fingerprint.
    pub fn new(name: &'static str, avsc: &'static str, store: &SchemaStore) -> Result<Self, SchemaError> {
        Framed::with_legacy_of(name, avsc, avsc, store)
    }

    /// [`Framed::new`] for a schema that changed since meterline wrote the
    /// legacy fingerprint: records with the legacy fingerprint of
    /// `legacy_avsc` are of that version (read as [`Body::Other`]).
    pub fn with_legacy_of(
        name: &'static str,
        avsc: &'static str,
        legacy_avsc: &'static str,
        store: &SchemaStore,
    ) -> Result<Self, SchemaError> {
        let fingerprint = canonical::fingerprint(avsc).map_err(|e| SchemaError::new(name, e.to_string()))?;
        store.add_schema(avsc)?;
        let header = single_object(fingerprint);
        let legacy_schema = if legacy_avsc == avsc {
            None
        } else {
            let fp = store.add_schema(legacy_avsc)?;
            store.schema(fp)
        };
        Ok(Framed {
            name,
            avsc,
            fingerprint,
            header,
            legacy: single_object(legacy_fingerprint(name, legacy_avsc)?),
            legacy_schema,
            accept_legacy: true,
            output: header,
            output_len: SINGLE_OBJECT_LEN,
            store: store.clone(),
        })
    }

    /// Writes `output` framing from now on.
    pub fn set_output(&mut self, output: Output) {
        match output {
            Output::SingleObject => {
                self.output = self.header;
                self.output_len = SINGLE_OBJECT_LEN;
            }
            Output::Confluent { id } => {
                self.output = [0; SINGLE_OBJECT_LEN];
                self.output[0] = CONFLUENT_MAGIC;
                self.output[1..CONFLUENT_LEN].copy_from_slice(&id.to_be_bytes());
                self.output_len = CONFLUENT_LEN;
            }
        }
    }

    /// Whether records with the legacy fingerprint are read (default: yes).
    pub fn set_accept_legacy(&mut self, accept: bool) {
        self.accept_legacy = accept;
    }

    /// The specification's fingerprint of the current schema.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The legacy fingerprint this framing accepts (see
    /// [`legacy_fingerprint`]).
    pub fn legacy_fingerprint(&self) -> u64 {
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&self.legacy[2..SINGLE_OBJECT_LEN]);
        u64::from_le_bytes(fp)
    }

    /// The current schema, as written in `schemas/avro/`.
    pub fn avsc(&self) -> &'static str {
        self.avsc
    }

    pub fn store(&self) -> &SchemaStore {
        &self.store
    }

    /// Appends the header: the record's Avro body follows it.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.output[..self.output_len]);
    }

    /// The writer schema of `payload` and its body.
    pub fn read<'a>(&self, payload: &'a [u8]) -> Result<(Body<'a>, Via), DecodeError> {
        // The hot path: the current single-object header.
        if payload.len() >= SINGLE_OBJECT_LEN && payload[..SINGLE_OBJECT_LEN] == self.header {
            return Ok((Body::Current(&payload[SINGLE_OBJECT_LEN..]), Via::SingleObject));
        }
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        if let Some(id) = confluent_id(payload) {
            let body = &payload[CONFLUENT_LEN..];
            return match self.store.id(id) {
                None => Err(DecodeError::UnknownSchemaId(id)),
                Some(None) => Err(DecodeError::NoSuchSchemaId(id)),
                Some(Some(fp)) if fp == self.fingerprint => Ok((Body::Current(body), Via::Confluent)),
                Some(Some(fp)) => self.other(fp, body),
            };
        }
        if payload.len() < 2 || payload[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if payload.len() < SINGLE_OBJECT_LEN {
            return Err(DecodeError::Malformed("truncated single-object header".into()));
        }
        let body = &payload[SINGLE_OBJECT_LEN..];
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&payload[2..SINGLE_OBJECT_LEN]);
        let fp = u64::from_le_bytes(fp);
        if payload[..SINGLE_OBJECT_LEN] == self.legacy {
            return if self.accept_legacy {
                match &self.legacy_schema {
                    None => Ok((Body::Current(body), Via::LegacyFingerprint)),
                    Some(schema) => Ok((Body::Other(schema.clone(), fp, body), Via::LegacyFingerprint)),
                }
            } else {
                Err(DecodeError::LegacyFingerprint(fp))
            };
        }
        self.other(fp, body)
    }

    fn other<'a>(&self, fp: u64, body: &'a [u8]) -> Result<(Body<'a>, Via), DecodeError> {
        match self.store.schema(fp) {
            Some(schema) if schema_name(&schema) == Some(self.name) => Ok((Body::Other(schema, fp, body), Via::Resolved)),
            _ => Err(DecodeError::UnknownSchema(fp)),
        }
    }

    /// The body of a record written with the current schema; any other
    /// writer schema is an error (for payloads with no resolution path).
    pub fn current_body<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], DecodeError> {
        match self.read(payload)? {
            (Body::Current(b), _) => Ok(b),
            (Body::Other(_, fp, _), _) => Err(DecodeError::UnknownSchema(fp)),
        }
    }
}

/// The record name of a schema (`UsageEvent`), to keep another schema's
/// versions from being taken for this one's.
fn schema_name(s: &Schema) -> Option<&str> {
    match s {
        Schema::Record(r) => Some(r.name.name.as_str()),
        _ => None,
    }
}
