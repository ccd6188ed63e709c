//! Topic creation for `meter init`, the demo and the tests.

use std::time::Duration;

use anyhow::{bail, Context};
use meter_config::Config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::client_config;

/// Creates the events, aggregates, dead-letter, state, invoice-line,
/// period-close and agent-lease topics when missing. `usage.aggregates`,
/// `billing.invoice_lines`, `billing.period_close` and `usage.agents` are
/// compacted: for each window key (line id, closed month, agent identity)
/// only the latest value matters to its consumers.
pub async fn ensure_topics(cfg: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(&cfg.kafka).create().context("creating Kafka admin client")?;
    let t = &cfg.topics;
    let state = cfg.state_topic();
    let replication = || TopicReplication::Fixed(t.replication_factor);
    let topics = [
        NewTopic::new(&t.events, t.partitions, replication()),
        NewTopic::new(&t.aggregates, t.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.dlq, t.partitions, replication()),
        // Same partition count as the events topic: the state of events
        // partition p lives in changelog partition p.
        NewTopic::new(&state, t.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.invoice_lines, t.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.period_close, t.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.agents, t.partitions, replication()).set("cleanup.policy", "compact"),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(topics.iter(), &opts).await.context("creating topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    // Topic creation returns before every broker's metadata shows the topic;
    // a consumer subscribing in that gap sees no partitions and waits for
    // the next metadata refresh (minutes). Wait until all partitions have
    // leaders.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let want = usize::try_from(t.partitions).unwrap_or(0);
    // Invoice lines are shared by every configuration that rates (demo and
    // test runs use their own usage topics but the same billing topic): any
    // partition count serves them, since nothing depends on their partitioning.
    for (topic, partitions) in [
        (&t.events, want),
        (&t.aggregates, want),
        (&t.dlq, want),
        (&state, want),
        (&t.invoice_lines, 1),
        (&t.period_close, 1),
        (&t.agents, want),
    ] {
        loop {
            let md = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(5));
            let ready = md.as_ref().is_ok_and(|md| {
                md.topics().iter().any(|mt| {
                    mt.name() == topic.as_str()
                        && mt.error().is_none()
                        && mt.partitions().len() >= partitions
                        && mt.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
                })
            });
            if ready {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("topic {topic} has no leaders for all partitions after 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
