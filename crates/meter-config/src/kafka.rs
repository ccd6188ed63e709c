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
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig { brokers: default_brokers(), properties: BTreeMap::new() }
    }
}

impl Section for KafkaConfig {
    const NAME: &'static str = "kafka";

    fn check(&self, p: &mut Problems) {
        p.check(!self.brokers.trim().is_empty(), "kafka.brokers must not be empty");
    }
}
