//! Earlier versions of meterline's own payload schemas, still accepted as
//! writer schemas: records written by a component of a previous release
//! are read as the current schema would resolve them (Avro resolution
//! rules; a version whose fields the current one only appends to is read
//! by hand, see [`crate::EarlierVersion`]). A schema that changes leaves
//! its old text here, so that every schema version can read the previous
//! one (the tests check it).

/// The earlier versions, as written in `schemas/avro/history/`.
pub const SCHEMAS: &[&str] = &[crate::USAGE_EVENT_V1_AVSC, crate::INVOICE_LINE_V1_AVSC];
