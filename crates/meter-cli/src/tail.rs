//! `meter tail TOPIC`: any meterline topic as JSON lines, whatever framing
//! (single-object or Confluent) and schema version each record carries;
//! what `kcat -s avro` gives a Kafka user.
//!
//! Each line is `{"partition":P,"offset":O,"key":"…","value":{…}}` (the
//! contract of the interoperability readers in `tests/interop/`); a record
//! that cannot be decoded is a line with `"error"` instead of `"value"`, and
//! makes the exit code 1. Reads `read_committed`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use meter_avro::{Codec, DecodeError, Framed};
use meter_config::Config;
use meter_kafka::{assign_from_beginning, client_config, forget_reached, Signal};
use meter_rating::wire::InvoiceLineCodec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

#[derive(clap::Args)]
pub struct TailArgs {
    /// The topic: usage.events, usage.aggregates, usage.dlq,
    /// billing.invoice_lines, usage.agents (lease heartbeats, JSON), or any
    /// topic holding those records.
    pub topic: String,
    /// Start at the beginning of every partition (default: only records
    /// written from now on).
    #[arg(long)]
    pub from_beginning: bool,
    /// Exit after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit once every partition is read to where it ended at the start.
    #[arg(long)]
    pub to_end: bool,
    #[arg(long, value_enum, default_value_t = TailFormat::Json)]
    pub format: TailFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TailFormat {
    /// One JSON object per line.
    Json,
    /// Indented JSON, one object after the other.
    Pretty,
}

/// The schemas a record of `topic` may carry: the topic's own if it is one
/// of the configured topics, else every payload schema (the first that
/// recognises the record's writer schema decodes it).
fn framings(cfg: &Config, codec: &Codec, invoices: &InvoiceLineCodec, topic: &str) -> Vec<Framed> {
    let t = &cfg.topics;
    let all = [codec.events(), codec.aggregates(), codec.dead_letters(), invoices.framing()];
    let own = [&t.events, &t.aggregates, &t.dlq, &t.invoice_lines].iter().position(|name| name.as_str() == topic);
    match own {
        Some(i) => vec![all[i].clone()],
        None => all.into_iter().cloned().collect(),
    }
}

fn render(framings: &[Framed], payload: &[u8]) -> Result<serde_json::Value, DecodeError> {
    let mut last = DecodeError::Empty;
    for f in framings {
        match meter_avro::json::to_json(f, payload) {
            Ok(v) => return Ok(v),
            // Another schema's record: try the next one.
            Err(e @ (DecodeError::UnknownSchema(_) | DecodeError::Unresolvable(_))) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

pub async fn run(cfg: &Config, args: TailArgs, shutdown: Signal) -> anyhow::Result<ExitCode> {
    meter_kafka::check_access_async(&cfg.kafka, std::time::Duration::from_secs(10)).await?;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || tail(&cfg, &args, &shutdown)).await.context("tail thread")?
}

fn tail(cfg: &Config, args: &TailArgs, shutdown: &Signal) -> anyhow::Result<ExitCode> {
    let (codec, registry) = meter_kafka::registry::codec_for(cfg, &[])?;
    let invoices = InvoiceLineCodec::with_store(codec.store())?;
    let framings = framings(cfg, &codec, &invoices, &args.topic);
    let consumer: BaseConsumer = client_config(&cfg.kafka)
        .set("group.id", "meter-tail")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the consumer")?;
    let topic = args.topic.as_str();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).context("fetching metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist or has no partitions");
    let mut ends = if args.from_beginning {
        assign_from_beginning(&consumer, &consumer, topic, partitions.iter().copied())?
    } else {
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        Default::default()
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut n, mut errors) = (0u64, 0u64);
    let mut last_flush = Instant::now();
    loop {
        if shutdown.is_raised() || args.count.is_some_and(|c| n >= c) || (args.to_end && ends.is_empty()) {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            out.flush()?;
            let _ = forget_reached(&consumer, topic, &mut ends);
            if args.to_end && !args.from_beginning {
                break;
            }
            continue;
        };
        let m = m.context("reading the topic")?;
        if ends.get(&m.partition()).is_some_and(|&h| m.offset() + 1 >= h) {
            ends.remove(&m.partition());
        }
        let payload = m.payload().unwrap_or_default();
        if let (Some(registry), Some(id)) = (&registry, meter_avro::confluent_id(payload)) {
            registry.learn_ids([id], codec.store()).context("looking up a writer schema in the registry")?;
        }
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let mut line = serde_json::json!({ "partition": m.partition(), "offset": m.offset(), "key": key });
        // The agents' lease heartbeats are JSON, not Avro.
        let value = if topic == cfg.topics.agents {
            serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(format!("lease heartbeat: {e}")))
        } else {
            render(&framings, payload)
        };
        match value {
            Ok(v) => line["value"] = v,
            Err(e) => {
                errors += 1;
                line["error"] = e.to_string().into();
            }
        }
        match args.format {
            TailFormat::Json => writeln!(out, "{line}")?,
            TailFormat::Pretty => writeln!(out, "{}", serde_json::to_string_pretty(&line)?)?,
        }
        n += 1;
        if last_flush.elapsed() >= Duration::from_millis(200) {
            out.flush()?;
            last_flush = Instant::now();
        }
    }
    out.flush()?;
    if errors > 0 {
        eprintln!("tail: {errors} of {n} records could not be decoded");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
