//! `[serialization]`: how payloads are framed on each topic, the schema
//! registry, and which writer schemas are accepted on `usage.events`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

/// How records name their writer schema on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// Avro single-object encoding: `C3 01` + the schema's CRC-64-AVRO
    /// fingerprint; readers need only the `.avsc` file.
    #[default]
    SingleObject,
    /// The Confluent Schema Registry wire format: `00` + the 4-byte id the
    /// registry gave the schema (subject `<topic>-value`, BACKWARD
    /// compatibility); needs `serialization.registry_url`.
    Confluent,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerializationConfig {
    /// Framing of what meterline's agents write to `usage.events`. The
    /// processor reads both framings whatever this says.
    #[serde(default)]
    pub events: Framing,
    /// Framing of the processor's window revisions on `usage.aggregates`.
    #[serde(default)]
    pub aggregates: Framing,
    /// Framing of the processor's dead letters on `usage.dlq`.
    #[serde(default)]
    pub dlq: Framing,
    /// Framing of `meter rate`'s invoice lines on `billing.invoice_lines`.
    #[serde(default)]
    pub invoice_lines: Framing,
    /// Base URL of a schema registry serving the Confluent REST API (for
    /// Apicurio: `http://host:8080/apis/ccompat/v7`). Needed when any topic
    /// is `confluent`, and to read Confluent-framed records from producers
    /// outside meterline. Empty: none.
    #[serde(default)]
    pub registry_url: String,
    /// How long one request to the registry may take.
    #[serde(default = "default_registry_timeout_ms")]
    pub registry_timeout_ms: u64,
    /// Accept events whose single-object header carries the fingerprint
    /// meterline computed before it followed the Avro specification (what
    /// agents before this release write; counted in
    /// `meter_events_legacy_fingerprint_total`). Turn it off once that
    /// counter stays at 0 (see the upgrade runbook); such events are then
    /// dead-lettered as `unknown_schema`.
    #[serde(default = "default_true")]
    pub accept_legacy_fingerprint: bool,
    /// More UsageEvent writer schemas (`.avsc` files) accepted on
    /// `usage.events` in single-object framing: versions third-party
    /// producers write (a field added with a default, one removed that had
    /// one). Their records are resolved to the current schema. Confluent
    /// framing needs none of this: the registry knows the writer schema.
    #[serde(default)]
    pub writer_schemas: Vec<PathBuf>,
}

fn default_registry_timeout_ms() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}

impl Default for SerializationConfig {
    fn default() -> Self {
        SerializationConfig {
            events: Framing::default(),
            aggregates: Framing::default(),
            dlq: Framing::default(),
            invoice_lines: Framing::default(),
            registry_url: String::new(),
            registry_timeout_ms: default_registry_timeout_ms(),
            accept_legacy_fingerprint: true,
            writer_schemas: Vec::new(),
        }
    }
}

impl SerializationConfig {
    /// Whether any topic is written in the Confluent framing.
    pub fn uses_registry(&self) -> bool {
        [self.events, self.aggregates, self.dlq, self.invoice_lines].contains(&Framing::Confluent)
    }
}

impl Section for SerializationConfig {
    const NAME: &'static str = "serialization";

    fn check(&self, p: &mut Problems) {
        let url = self.registry_url.trim();
        p.check(!self.uses_registry() || !url.is_empty(), "serialization.registry_url must be set when a topic is `confluent`");
        p.check(
            url.is_empty() || url.starts_with("http://") || url.starts_with("https://"),
            &format!("serialization.registry_url must be an http:// or https:// URL, not `{url}`"),
        );
        p.check(self.registry_timeout_ms >= 100, "serialization.registry_timeout_ms must be at least 100");
        for path in &self.writer_schemas {
            p.check(path.is_file(), &format!("serialization.writer_schemas: {} is not a readable file", path.display()));
        }
    }
}
