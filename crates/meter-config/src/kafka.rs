//! `[kafka]`: how every client reaches the brokers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{read_secret_file, Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Extra librdkafka client properties passed to every client (e.g.
    /// `security.protocol`, `sasl.mechanism`, `ssl.ca.location`).
    ///
    /// librdkafka's names have no `_`, so a `_` in a name reads as `.`:
    /// `METER__KAFKA__PROPERTIES__SASL_USERNAME=agent` sets
    /// `sasl.username`. A name ending in `_file` takes the property's value
    /// from that file (one line; a trailing newline is dropped), which is
    /// how secrets mounted by Docker, Kubernetes or systemd's
    /// `LoadCredential=` are given: `"sasl.password_file" =
    /// "/run/secrets/kafka-password"`, or
    /// `METER__KAFKA__PROPERTIES__SASL_PASSWORD_FILE=...`. Files are read
    /// when the configuration is loaded ([`crate::Config::load`]).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// How meterline's producers map a record's key to its partition, and
    /// the key contract the processor checks on `usage.events`: a record on
    /// any other partition is dead-lettered as `wrong_partition`, so that no
    /// customer's windows are ever split across two partitions.
    #[serde(default)]
    pub partitioner: KeyPartitioner,
}

/// How producers map a record's key to its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPartitioner {
    /// murmur2 of the key, as Java's default partitioner and librdkafka's
    /// `murmur2_random`: the key contract of `usage.events`.
    #[default]
    Murmur2,
    /// CRC-32 of the key, librdkafka's default (`consistent_random`): what
    /// meterline's agents used before; only for a fleet not upgraded yet.
    Crc32,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig { brokers: default_brokers(), properties: BTreeMap::new(), partitioner: KeyPartitioner::default() }
    }
}

impl Section for KafkaConfig {
    const NAME: &'static str = "kafka";

    fn check(&self, p: &mut Problems) {
        p.check(!self.brokers.trim().is_empty(), "kafka.brokers must not be empty");
        p.check(
            !self.properties.contains_key("partitioner"),
            "kafka.properties.partitioner: set kafka.partitioner instead (the processor checks the key contract with it)",
        );
    }
}

/// The librdkafka name of a property as written in the file or the
/// environment (`sasl_password` → `sasl.password`), and whether its value
/// names a file to read it from (`sasl.password_file`).
pub fn property_name(key: &str) -> (String, bool) {
    let key = key.trim().to_ascii_lowercase();
    match key.strip_suffix("_file") {
        Some(base) => (base.replace('_', "."), true),
        None => (key.replace('_', "."), false),
    }
}

impl KafkaConfig {
    /// Rewrites [`KafkaConfig::properties`] under librdkafka's names, each
    /// `..._file` property replaced by the file's content. A property given
    /// twice (as `sasl_password` and `sasl.password`, or also as a file) is
    /// a problem: which one was meant cannot be told.
    pub(crate) fn resolve_properties(&mut self, p: &mut Problems) {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        let mut given: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in std::mem::take(&mut self.properties) {
            let (name, from_file) = property_name(&key);
            let value = if from_file {
                match read_secret_file(value.as_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        p.check(false, &format!("kafka.properties.{key}: {e}"));
                        continue;
                    }
                }
            } else {
                value
            };
            if let Some(first) = given.insert(name.clone(), key.clone()) {
                p.check(false, &format!("kafka.properties: {name} is given twice (as {first} and as {key}); keep one"));
                continue;
            }
            out.insert(name, value);
        }
        self.properties = out;
    }
}

impl KeyPartitioner {
    /// The matching librdkafka `partitioner` setting.
    pub fn librdkafka(self) -> &'static str {
        match self {
            KeyPartitioner::Murmur2 => "murmur2_random",
            KeyPartitioner::Crc32 => "consistent_random",
        }
    }
}
