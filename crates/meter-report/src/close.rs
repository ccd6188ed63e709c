//! Closed months in ClickHouse (`schemas/clickhouse/0005_close.sql`): which
//! (month, customer) pairs are closed, `meter close` without its Kafka edge
//! ([`close`]), and the adjustments rating bills for them
//! ([`pending_adjustments`]).
//!
//! Order of effects in [`close`], and why: the month is rated first (so the
//! freeze holds everything final), then each customer's close record is
//! handed to the [`ClosePublisher`] (the binary publishes it to
//! `billing.period_close`, every delivery acknowledged), and only then is
//! the `closed_periods` row written. A run that dies in between publishes
//! the record again next time (same key, same lines and checksum, a later
//! `closed_at`); the other order could leave a month closed that billing
//! was never told about.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context};
use clickhouse::Client;
use meter_config::Config;
use meter_rating::close::{adjusted_month, adjustments, closable, close_record, CloseRecord};
use meter_rating::{DailyLine, InvoiceLine, YearMonth};
use serde::{Deserialize, Serialize};

use crate::rate::{rate, LinePublisher, RateRun};
use crate::rating::{ch_date, from_ch_date, invoice_line_of, mantissa, stored_rows, AMOUNT_SCALE};
use crate::Result;

/// One closed (month, customer) (`closed_periods`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct ClosedPeriodRow {
    pub month: u16,
    pub customer_id: String,
    pub version_id: String,
    pub invoice_id: String,
    pub currency: String,
    pub line_count: u32,
    /// Scale 2.
    pub total: i128,
    pub checksum: String,
    pub closed_at: u32,
    pub revision: u64,
}

/// Closed (month, customer) pairs up to `up_to`; binds: month, customer, customer.
pub const SQL_CLOSED: &str = "SELECT month, customer_id, version_id, invoice_id, currency, line_count, total, checksum, \
    toUInt32(closed_at) AS closed_at, revision FROM closed_periods FINAL \
    WHERE month <= toDate(?) AND (? = '' OR customer_id = ?) ORDER BY month, customer_id";

/// Every closed month up to `up_to` (of `customer`, or everyone's), by (month, customer).
pub async fn closed(client: &Client, up_to: YearMonth, customer: Option<&str>) -> Result<BTreeMap<(YearMonth, String), ClosedPeriodRow>> {
    let c = customer.unwrap_or("");
    let rows: Vec<ClosedPeriodRow> = client.query(SQL_CLOSED).bind(up_to.first_day().to_string()).bind(c).bind(c).fetch_all().await?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert((from_ch_date(r.month)?.year_month(), r.customer_id.clone()), r);
    }
    Ok(out)
}

fn previous(m: YearMonth) -> Option<YearMonth> {
    let d = meter_rating::Date::from_millis(m.start_millis() - 1)?;
    Some(d.year_month())
}

/// The lines of `customer` in `month` as stored under `version_id`.
async fn stored_lines(client: &Client, month: YearMonth, version_id: &str, customer: &str) -> Result<Vec<InvoiceLine>> {
    let rows = stored_rows(client, month, version_id, Some(customer)).await?;
    rows.lines.iter().map(invoice_line_of).collect()
}

/// The adjustments `target` (an open month) bills for its customers' closed
/// months: for each customer not closed in `target`, every closed month M
/// right before it (the months between M and `target` all closed too)
/// rated again now, less its frozen lines, less the adjustments of M that
/// months in between billed. Credit lines are not adjusted: a closed month's
/// credits are final, and the open month's credits pay its adjustments.
pub async fn pending_adjustments(
    cfg: &Config,
    client: &Client,
    target: YearMonth,
    customer: Option<&str>,
    closed: &BTreeMap<(YearMonth, String), ClosedPeriodRow>,
    version_id: &str,
) -> anyhow::Result<(Vec<DailyLine>, Vec<InvoiceLine>)> {
    // closed month -> customers whose next open month is `target`
    let mut due: BTreeMap<YearMonth, BTreeSet<String>> = BTreeMap::new();
    let customers: BTreeSet<&String> = closed.keys().map(|(_, c)| c).collect();
    for c in customers {
        if closed.contains_key(&(target, c.clone())) {
            continue;
        }
        let mut m = previous(target);
        while let Some(month) = m.filter(|month| closed.contains_key(&(*month, c.clone()))) {
            due.entry(month).or_default().insert(c.clone());
            m = previous(month);
        }
    }
    let (mut daily, mut lines) = (Vec::new(), Vec::new());
    for (month, customers) in due {
        let fresh = Box::pin(crate::rate::rate_from_clickhouse(cfg, client, month, customer, false, false))
            .await
            .with_context(|| format!("rating closed month {month} again for its adjustments"))?;
        for c in customers {
            let not_credit = |l: &&InvoiceLine| l.key.customer_id == c && l.line_type != meter_rating::LineType::Credit;
            let now: Vec<InvoiceLine> = fresh.rated.lines.iter().filter(not_credit).cloned().collect();
            let frozen_version = &closed[&(month, c.clone())].version_id;
            let frozen: Vec<InvoiceLine> = stored_lines(client, month, frozen_version, &c)
                .await?
                .into_iter()
                .filter(|l| l.line_type != meter_rating::LineType::Credit)
                .collect();
            let mut billed = Vec::new();
            let mut between = month;
            while let Some(next) = meter_rating::Date::from_millis(between.end_millis()).map(|d| d.year_month()).filter(|n| *n < target) {
                let v = &closed[&(next, c.clone())].version_id;
                billed.extend(stored_lines(client, next, v, &c).await?.into_iter().filter(|l| adjusted_month(l) == Some(month)));
                between = next;
            }
            let (mut d, mut l) = adjustments(month, &now, &frozen, &billed, target, version_id)?;
            daily.append(&mut d);
            lines.append(&mut l);
        }
    }
    Ok((daily, lines))
}

/// Where `meter close` sends the close records (`billing.period_close` in the binary).
pub trait ClosePublisher {
    /// Publishes `records` and returns once every one is acknowledged.
    fn publish(&mut self, records: &[CloseRecord]) -> impl std::future::Future<Output = anyhow::Result<()>>;
}

/// What closing a month did.
pub struct CloseRun {
    pub rate: RateRun,
    /// Customers closed by this run.
    pub closed: Vec<CloseRecord>,
    /// Customers closed before.
    pub already: usize,
}

/// Closes `month` for `customer` (or every customer with an invoice): rates
/// it one last time, then freezes each invoice and publishes its record.
/// Refused before the correction horizon of the month's last day has
/// passed, and while any of its day windows is not final.
pub async fn close(
    cfg: &Config,
    month: YearMonth,
    customer: Option<&str>,
    now_ms: i64,
    lines: &mut impl LinePublisher,
    records: &mut impl ClosePublisher,
) -> anyhow::Result<CloseRun> {
    let horizon = cfg.processor.correction_horizon_ms;
    if !closable(month, horizon, now_ms) {
        let when = month.end_millis().saturating_add(horizon);
        bail!(
            "{month} cannot be closed before {} (its last day plus processor.correction_horizon_ms = {} days): \
             late usage inside the horizon may still change it",
            meter_model::time::format_date(when),
            horizon / 86_400_000
        );
    }
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).writer()?;
    let rate_run = rate(cfg, month, customer, lines).await?;
    if rate_run.open_days > 0 {
        bail!("{month} has {} day windows that are not final yet: close it once they are", rate_run.open_days);
    }
    let stored = stored_rows(&client, month, &rate_run.version_id, customer).await.context("reading the month's invoices")?;
    let digits = crate::rate::price_book(cfg)?.minor_unit_digits;
    let all_lines: Vec<InvoiceLine> = stored.lines.iter().map(invoice_line_of).collect::<Result<_>>()?;
    let mut out = Vec::new();
    let mut already = 0;
    for inv in &stored.invoices {
        if inv.line_count == 0 {
            continue;
        }
        if rate_run.frozen.contains(&inv.customer_id) {
            already += 1;
            continue;
        }
        let record = close_record(month, &inv.customer_id, &inv.invoice_id, &all_lines, digits, now_ms)?;
        let stored_total = crate::rating::decimal(inv.total, AMOUNT_SCALE)?;
        // Every stored line counts, zeroed ones too (their latest value on the topic is zero).
        if record.total != stored_total {
            bail!("{month} {}: invoice total {stored_total} does not match its lines ({}); run meter audit", inv.customer_id, record.total);
        }
        out.push(record);
    }
    if !out.is_empty() {
        records.publish(&out).await?;
        let mut insert = client.insert::<ClosedPeriodRow>("closed_periods").await?;
        for r in &out {
            insert
                .write(&ClosedPeriodRow {
                    month: ch_date(month.first_day())?,
                    customer_id: r.customer_id.clone(),
                    version_id: r.version_id.clone(),
                    invoice_id: r.invoice_id.clone(),
                    currency: r.currency.clone(),
                    line_count: u32::try_from(r.line_count).unwrap_or(u32::MAX),
                    total: mantissa(r.total, AMOUNT_SCALE)?,
                    checksum: r.checksum.clone(),
                    closed_at: u32::try_from(now_ms.div_euclid(1000)).unwrap_or(0),
                    revision: u64::try_from(now_ms).unwrap_or(0),
                })
                .await?;
        }
        insert.end().await?;
    }
    Ok(CloseRun { rate: rate_run, closed: out, already })
}
