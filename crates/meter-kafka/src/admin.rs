//! Topic creation for `meter init`, the demo and the tests.

use std::time::Duration;

use anyhow::{bail, Context};
use meter_config::Config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::client_config;

/// Creates the events, aggregates and dead-letter topics when missing.
/// `usage.aggregates` is compacted: for each window key only the highest
/// revision matters to its consumers.
pub async fn ensure_topics(cfg: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(&cfg.kafka).create().context("creating Kafka admin client")?;
    let t = &cfg.topics;
    let replication = || TopicReplication::Fixed(t.replication_factor);
    let topics = [
        NewTopic::new(&t.events, t.partitions, replication()),
        NewTopic::new(&t.aggregates, t.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.dlq, t.partitions, replication()),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(topics.iter(), &opts).await.context("creating topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}
