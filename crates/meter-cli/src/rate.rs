//! `meter rate --month YYYY-MM [--customer C]`: rates a month's final usage
//! from ClickHouse and writes daily rated lines, invoice lines and invoices
//! back, idempotently per (month, price-book version).
//!
//! Order of effects, and why: the new and changed invoice lines are
//! published to `billing.invoice_lines` first (idempotent producer, key =
//! line id, every delivery acknowledged), and only then inserted into
//! ClickHouse. If the run dies in between, the next run finds the same lines
//! still new or changed and publishes them again, with the same key and the
//! same bytes, so a consumer keeping the latest value per key sees no
//! difference; the other order could leave a line in ClickHouse that never
//! reached the topic.

use std::time::Duration;

use anyhow::Context;
use meter_clickhouse::rating::{self, MonthUsage, Plan};
use meter_config::Config;
use meter_rating::{rate_month, PriceBook, RatedMonth, YearMonth};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[derive(clap::Args)]
pub struct RateArgs {
    /// The month to rate, YYYY-MM (UTC).
    #[arg(long)]
    pub month: YearMonth,
    /// Rate only this customer (the others' lines are left as they are).
    #[arg(long)]
    pub customer: Option<String>,
}

/// The price book named by `rating.price_book` (or the sample built in),
/// checked against the catalog; warnings go to stderr.
pub fn price_book(cfg: &Config) -> anyhow::Result<PriceBook> {
    let book = match &cfg.rating.price_book {
        Some(p) => PriceBook::load(p).with_context(|| format!("loading price book {}", p.display()))?,
        None => PriceBook::sample().context("the built-in sample price book")?,
    };
    let catalog = cfg.catalog().context("loading the catalog")?;
    for w in book.validate(&catalog).context("checking the price book against the catalog")? {
        eprintln!("price book: warning: {w}");
    }
    Ok(book)
}

/// A month rated from ClickHouse usage (nothing written).
pub struct RatedFromUsage {
    pub book: PriceBook,
    pub usage: MonthUsage,
    pub rated: RatedMonth,
}

/// Reads the month's usage (final windows only unless `include_open`) and
/// rates it.
pub async fn rate_from_clickhouse(
    cfg: &Config,
    client: &clickhouse::Client,
    month: YearMonth,
    customer: Option<&str>,
    include_open: bool,
) -> anyhow::Result<RatedFromUsage> {
    let book = price_book(cfg)?;
    let catalog = cfg.catalog()?;
    let version = book.version_for_month(month).with_context(|| format!("no price-book version is in effect for {month}"))?;
    let minimum = book.minute_series_range(month).map(|range| {
        let types = version.usage_types_with_minimum().into_iter().map(|(s, u)| (s.to_owned(), u.to_owned())).collect();
        (range, types)
    });
    eprintln!("reading usage of {month} from ClickHouse ...");
    let usage = rating::month_usage(client, month, customer, include_open, minimum).await.context("reading usage")?;
    eprintln!(
        "read {} daily rows and {} minute rows ({} day windows not final yet{})",
        usage.days.len(),
        usage.minutes.len(),
        usage.open_days,
        if include_open { ", included" } else { ", left out" }
    );
    let rated = rate_month(&book, &catalog, month, &usage.days, &usage.minutes).with_context(|| format!("rating {month}"))?;
    Ok(RatedFromUsage { book, usage, rated })
}

pub async fn run(cfg: &Config, args: &RateArgs) -> anyhow::Result<()> {
    let client = meter_kafka::sink::connection(cfg).client()?;
    let customer = args.customer.as_deref();
    let r = rate_from_clickhouse(cfg, &client, args.month, customer, false).await?;
    let rows = rating::rated_rows(&r.rated, &r.usage.days, r.book.minor_unit_digits)?;
    eprintln!(
        "rated {} daily lines, {} invoice lines, {} invoices; comparing with ClickHouse ...",
        rows.daily.len(),
        rows.lines.len(),
        rows.invoices.len()
    );
    let stored = rating::stored_rows(&client, args.month, &r.rated.version_id, customer).await.context("reading stored lines")?;
    let plan = rating::plan(&rows, &stored, meter_kafka::now_ms());
    let published = publish(cfg, &plan).await?;
    plan.apply(&client).await.context("writing rated lines to ClickHouse")?;
    println!(
        "rated {} with price-book version {}{}",
        args.month,
        r.rated.version_id,
        customer.map(|c| format!(" for customer {c}")).unwrap_or_default()
    );
    println!("  rated_usage:   {}", plan.daily.counts);
    println!("  invoice_lines: {}", plan.lines.counts);
    println!("  invoices:      {}", plan.invoices.counts);
    println!("  published {published} invoice lines to {}", cfg.topics.invoice_lines);
    if r.usage.open_days > 0 {
        println!("  note: {} day windows are not final yet and were not rated; rate again once they are", r.usage.open_days);
    }
    Ok(())
}

/// Publishes the invoice lines the plan writes; returns how many.
async fn publish(cfg: &Config, plan: &Plan) -> anyhow::Result<usize> {
    let lines = &plan.lines.write;
    if lines.is_empty() {
        return Ok(0);
    }
    let codec = meter_avro::Codec::new()?;
    let producer: FutureProducer = meter_kafka::client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating the invoice-line producer")?;
    let topic = cfg.topics.invoice_lines.as_str();
    let mut pending = Vec::with_capacity(lines.len());
    for (i, row) in lines.iter().enumerate() {
        let line = rating::invoice_line_of(row)?;
        let mut payload = Vec::new();
        codec.encode_invoice_line(&line, &mut payload).with_context(|| format!("encoding invoice line {}", line.line_id))?;
        let mut record = FutureRecord::to(topic).key(line.line_id.as_bytes()).payload(&payload);
        // Queue full: wait for deliveries to drain, then try the same record again.
        let delivery = loop {
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((e, _)) => return Err(e).context("publishing an invoice line"),
            }
        };
        pending.push((line.line_id, delivery));
        if (i + 1).is_multiple_of(10_000) {
            eprintln!("published {}/{} invoice lines ...", i + 1, lines.len());
        }
    }
    for (id, d) in pending {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e).with_context(|| format!("delivering invoice line {id} to {topic}")),
            Err(_) => anyhow::bail!("delivery of invoice line {id} to {topic} was cancelled"),
        }
    }
    Ok(lines.len())
}
