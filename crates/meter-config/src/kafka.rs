//! `[kafka]`: how every client reaches the brokers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Extra librdkafka client properties passed through unchanged to every
    /// client (e.g. `security.protocol`, `sasl.mechanism`). Put credentials in
    /// the environment: `METER__KAFKA__PROPERTIES__SASL.PASSWORD` is not a
    /// valid variable name, so prefer `sasl.username`/`sasl.password` via a
    /// file readable only by the service.
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

impl KeyPartitioner {
    /// The matching librdkafka `partitioner` setting.
    pub fn librdkafka(self) -> &'static str {
        match self {
            KeyPartitioner::Murmur2 => "murmur2_random",
            KeyPartitioner::Crc32 => "consistent_random",
        }
    }
}
