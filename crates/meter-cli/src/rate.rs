//! `meter rate --month YYYY-MM [--customer C]`: `meter_report::rate` with
//! the invoice lines published to `billing.invoice_lines` (see there for
//! the order of effects); `meter close --month YYYY-MM`: `meter_report::close`
//! with the close records published to `billing.period_close`.

use anyhow::Context;
use meter_avro::SchemaStore;
use meter_config::{Config, Framing};
use meter_kafka::publish::{Publisher, Tuning};
use meter_kafka::registry::Registry;
use meter_rating::close::CloseRecord;
use meter_rating::wire::{CloseRecordCodec, InvoiceLineCodec};
use meter_rating::{InvoiceLine, YearMonth};
use meter_report::close::ClosePublisher;
use meter_report::rate::LinePublisher;

#[derive(clap::Args)]
pub struct RateArgs {
    /// The month to rate, YYYY-MM (UTC).
    #[arg(long)]
    pub month: YearMonth,
    /// Rate only this customer (the others' lines are left as they are).
    #[arg(long)]
    pub customer: Option<String>,
}

/// How long publishing waits for Kafka to answer before it gives up.
const KAFKA_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Invoice lines to `topics.invoice_lines`: idempotent producer, key = line
/// id, every delivery acknowledged.
struct KafkaLines<'a> {
    cfg: &'a Config,
}

impl LinePublisher for KafkaLines<'_> {
    async fn publish(&mut self, lines: &[InvoiceLine]) -> anyhow::Result<()> {
        let mut codec = InvoiceLineCodec::new()?;
        if self.cfg.serialization.invoice_lines == Framing::Confluent {
            let s = &self.cfg.serialization;
            let registry = Registry::new(s.registry_url.trim(), std::time::Duration::from_millis(s.registry_timeout_ms));
            let topic = &self.cfg.topics.invoice_lines;
            let id =
                tokio::task::block_in_place(|| registry.register_value_schema(topic, codec.framing_mut().avsc(), &SchemaStore::default()))
                    .with_context(|| format!("registering the schema of {topic} with the schema registry"))?;
            codec.framing_mut().set_output(meter_avro::Output::Confluent { id });
        }
        meter_kafka::check_access_async(&self.cfg.kafka, KAFKA_CHECK).await?;
        let producer = meter_kafka::publish::producer(&self.cfg.kafka, Tuning::billing()).context("creating the invoice-line producer")?;
        let mut out = Publisher::new(&producer, &self.cfg.topics.invoice_lines);
        let mut payload = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            payload.clear();
            codec.encode(line, &mut payload).with_context(|| format!("encoding invoice line {}", line.line_id))?;
            out.send(Some(line.line_id.as_bytes()), &payload).await?;
            if (i + 1).is_multiple_of(10_000) {
                eprintln!("published {}/{} invoice lines ...", i + 1, lines.len());
            }
        }
        out.finish().await
    }
}

#[derive(clap::Args)]
pub struct CloseArgs {
    /// The month to close, YYYY-MM (UTC).
    #[arg(long)]
    pub month: YearMonth,
    /// Close only this customer's month.
    #[arg(long)]
    pub customer: Option<String>,
}

/// Close records to `topics.period_close`: idempotent producer, key =
/// `<month>/<customer_id>`, every delivery acknowledged.
struct KafkaCloses<'a> {
    cfg: &'a Config,
}

impl ClosePublisher for KafkaCloses<'_> {
    async fn publish(&mut self, records: &[CloseRecord]) -> anyhow::Result<()> {
        let codec = CloseRecordCodec::new()?;
        meter_kafka::check_access_async(&self.cfg.kafka, KAFKA_CHECK).await?;
        let producer = meter_kafka::publish::producer(&self.cfg.kafka, Tuning::billing()).context("creating the period-close producer")?;
        let mut out = Publisher::new(&producer, &self.cfg.topics.period_close);
        let mut payload = Vec::new();
        for r in records {
            payload.clear();
            codec.encode(r, &mut payload).with_context(|| format!("encoding the close of {} for {}", r.month, r.customer_id))?;
            out.send(Some(CloseRecordCodec::key(r).as_bytes()), &payload).await?;
        }
        out.finish().await
    }
}

pub async fn close(cfg: &Config, args: &CloseArgs) -> anyhow::Result<()> {
    let customer = args.customer.as_deref();
    let now = meter_model::now_ms();
    let r = meter_report::close::close(cfg, args.month, customer, now, &mut KafkaLines { cfg }, &mut KafkaCloses { cfg }).await?;
    println!("rated {} a last time: invoice_lines {}, published {} invoice lines", args.month, r.rate.plan.lines.counts, r.rate.published);
    for c in &r.closed {
        println!(
            "closed {} for {}: {} lines, total {} {}, checksum {}",
            c.month, c.customer_id, c.line_count, c.total, c.currency, c.checksum
        );
    }
    println!(
        "closed {} customers ({} closed before); published {} records to {}",
        r.closed.len(),
        r.already,
        r.closed.len(),
        cfg.topics.period_close
    );
    Ok(())
}

pub async fn run(cfg: &Config, args: &RateArgs) -> anyhow::Result<()> {
    let customer = args.customer.as_deref();
    let r = meter_report::rate::rate(cfg, args.month, customer, &mut KafkaLines { cfg }).await?;
    println!(
        "rated {} with price-book version {}{}",
        args.month,
        r.version_id,
        customer.map(|c| format!(" for customer {c}")).unwrap_or_default()
    );
    println!("  rated_usage:   {}", r.plan.daily.counts);
    println!("  invoice_lines: {}", r.plan.lines.counts);
    println!("  invoices:      {}", r.plan.invoices.counts);
    println!("  credit_ledger: {}", r.plan.ledger.counts);
    println!("  published {} invoice lines to {}", r.published, cfg.topics.invoice_lines);
    if r.open_days > 0 {
        println!("  note: {} day windows are not final yet and were not rated; rate again once they are", r.open_days);
    }
    Ok(())
}
