//! Earlier versions of meterline's own payload schemas, still accepted as
//! writer schemas: records written by a component of a previous release
//! are resolved to the current schema (Avro resolution rules). A schema
//! that changes leaves its old text here, so that every schema version can
//! read the previous one (the tests check it).

/// The earlier versions, as written in `schemas/avro/history/`.
pub const SCHEMAS: &[&str] = &[crate::USAGE_EVENT_V1_AVSC];
