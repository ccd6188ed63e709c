//! Producing: the idempotent producer settings every stage shares, and the
//! two ways of waiting when librdkafka's queue is full.
//!
//! - [`Publisher`] (async, over a `FutureProducer`): up to
//!   [`MAX_IN_FLIGHT`] deliveries outstanding; on a full queue it waits for
//!   the oldest half of them. Every delivery report is checked: a failed
//!   delivery is an error, never a silent drop. For the simulated fleets,
//!   the fault harness, the benchmark and `meter rate`.
//! - [`send_blocking`] (over a `BaseProducer` in a blocking thread): on a
//!   full queue it serves delivery reports until there is room. For the
//!   processor's transactions, whose delivery errors surface in
//!   `commit_transaction`.
//!
//! The agent's spooled runtime does neither: on a full queue it leaves the
//! rest in its spool and hands it over on its next turn.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use meter_config::KafkaConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::producer_config;

/// Outstanding deliveries before a [`Publisher`] waits for acknowledgements.
pub const MAX_IN_FLIGHT: usize = 100_000;

/// How a producer batches and how long a delivery may take; the rest of its
/// settings (idempotence, `acks=all`) are the same for every producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub linger_ms: Option<u32>,
    /// librdkafka's `queue.buffering.max.messages`.
    pub queue_messages: Option<usize>,
    /// librdkafka's `message.timeout.ms`: after it a delivery fails.
    pub message_timeout_ms: Option<u64>,
    /// Large batches, lz4-compressed: for a steady stream of small records.
    pub bulk: bool,
}

impl Tuning {
    /// As many records as fast as possible (simulated fleets, chaos, bench).
    pub fn bulk() -> Self {
        Tuning { linger_ms: Some(20), queue_messages: Some(500_000), message_timeout_ms: None, bulk: true }
    }

    /// The agent: a delivery that is not acknowledged in time turns into a
    /// resend from the spool rather than an unbounded in-memory queue.
    pub fn agent(max_in_flight: usize, delivery_timeout_ms: u64) -> Self {
        Tuning {
            linger_ms: Some(50),
            queue_messages: Some((max_in_flight * 2).max(1000)),
            message_timeout_ms: Some(delivery_timeout_ms),
            bulk: true,
        }
    }

    /// A few records that must each arrive: invoice lines.
    pub fn billing() -> Self {
        Tuning { linger_ms: None, queue_messages: None, message_timeout_ms: Some(60_000), bulk: false }
    }
}

/// The settings of an idempotent producer (`acks=all`, no duplicates from
/// retries, order kept per partition, keys partitioned by the key contract)
/// tuned by `tuning`.
pub fn idempotent_config(kafka: &KafkaConfig, tuning: Tuning) -> ClientConfig {
    let mut c = producer_config(kafka);
    c.set("enable.idempotence", "true").set("acks", "all");
    if let Some(ms) = tuning.linger_ms {
        c.set("linger.ms", ms.to_string());
    }
    if tuning.bulk {
        c.set("batch.size", "1000000").set("compression.type", "lz4");
    }
    if let Some(n) = tuning.queue_messages {
        c.set("queue.buffering.max.messages", n.to_string());
    }
    if let Some(ms) = tuning.message_timeout_ms {
        c.set("message.timeout.ms", ms.to_string());
    }
    c
}

/// An idempotent `FutureProducer` for a [`Publisher`].
pub fn producer(kafka: &KafkaConfig, tuning: Tuning) -> anyhow::Result<FutureProducer> {
    idempotent_config(kafka, tuning).create().context("creating Kafka producer")
}

/// Publishes records to one topic with up to [`MAX_IN_FLIGHT`] deliveries
/// outstanding, waiting for acknowledgements when the producer's queue is
/// full. A failed delivery is an error: nothing is dropped silently.
pub struct Publisher<'a> {
    producer: &'a FutureProducer,
    topic: &'a str,
    pending: VecDeque<DeliveryFuture>,
    /// Records handed to the producer so far.
    pub sent: u64,
    /// Records the broker acknowledged so far.
    pub acknowledged: u64,
}

impl<'a> Publisher<'a> {
    pub fn new(producer: &'a FutureProducer, topic: &'a str) -> Self {
        Publisher { producer, topic, pending: VecDeque::new(), sent: 0, acknowledged: 0 }
    }

    pub async fn send(&mut self, key: Option<&[u8]>, payload: &[u8]) -> anyhow::Result<()> {
        let mut record = FutureRecord::<[u8], [u8]>::to(self.topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    let keep = self.pending.len() / 2;
                    self.settle(keep).await?;
                    if self.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err((e, _)) => return Err(anyhow!("producing to {}: {e}", self.topic)),
            }
        }
        self.sent += 1;
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.settle(MAX_IN_FLIGHT / 2).await?;
        }
        Ok(())
    }

    /// Counts the deliveries already settled at the front of the queue,
    /// without waiting for the others.
    pub fn reap(&mut self) -> anyhow::Result<()> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while let Some(front) = self.pending.front_mut() {
            match std::pin::Pin::new(front).poll(&mut cx) {
                std::task::Poll::Pending => break,
                std::task::Poll::Ready(result) => {
                    self.pending.pop_front();
                    self.settled(result)?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every record sent so far is acknowledged.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.settle(0).await?;
        self.producer.flush(Duration::from_secs(30)).context("flushing producer")
    }

    async fn settle(&mut self, keep: usize) -> anyhow::Result<()> {
        while self.pending.len() > keep {
            let Some(f) = self.pending.pop_front() else { break };
            self.settled(f.await)?;
        }
        Ok(())
    }

    /// Counts one delivery report; a failed delivery is an error.
    fn settled(&mut self, report: <DeliveryFuture as Future>::Output) -> anyhow::Result<()> {
        match report {
            Ok(Ok(_)) => {
                self.acknowledged += 1;
                Ok(())
            }
            Ok(Err((e, _))) => Err(anyhow!("delivery to {} failed: {e}", self.topic)),
            Err(_) => Err(anyhow!("producer dropped an in-flight record")),
        }
    }
}

/// Enqueues one record, serving delivery reports while the queue is full.
pub fn send_blocking<C: ProducerContext, K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> KafkaResult<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
