//! `meter rate --month YYYY-MM [--customer C]`: rates a month's final usage
//! from ClickHouse, bills the contracts' fees and credits on top
//! ([`meter_rating::charges`]), and writes daily rated lines, invoice lines,
//! invoices and the credit ledger back, idempotently per (month, price-book
//! version). Credits start from what the credit ledger says earlier months
//! used, so months are rated in order.
//!
//! Order of effects, and why: the new and changed invoice lines are handed
//! to the [`LinePublisher`] first (the binary publishes them to
//! `billing.invoice_lines`: idempotent producer, key = line id, every
//! delivery acknowledged), and only then inserted into ClickHouse. If the
//! run dies in between, the next run finds the same lines still new or
//! changed and publishes them again, with the same key and the same bytes,
//! so a consumer keeping the latest value per key sees no difference; the
//! other order could leave a line in ClickHouse that never reached the topic.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use meter_config::Config;
use meter_rating::{charges, rate_month, Contracts, CreditBalance, InvoiceLine, PriceBook, RatedMonth, YearMonth};

use crate::close::ClosedPeriodRow;
use crate::rating::{self, MonthUsage, Plan};

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

/// The contracts named by `rating.contracts` (or the sample built in).
pub fn contracts(cfg: &Config) -> anyhow::Result<Contracts> {
    match &cfg.rating.contracts {
        Some(p) => Contracts::load(p).with_context(|| format!("loading contracts {}", p.display())),
        None => Contracts::sample().context("the built-in sample contracts"),
    }
}

/// A month rated from ClickHouse usage (nothing written).
pub struct RatedFromUsage {
    pub book: PriceBook,
    pub usage: MonthUsage,
    /// Usage, fee and credit lines.
    pub rated: RatedMonth,
    /// The month's credit ledger.
    pub ledger: Vec<CreditBalance>,
    /// Closed (month, customer) pairs up to the month, read when rating with
    /// adjustments (empty otherwise).
    pub closed: BTreeMap<(YearMonth, String), ClosedPeriodRow>,
}

/// Reads the month's usage (final windows only unless `include_open`) and
/// rates it, with the adjustments it bills for closed months before it
/// when `adjust` (see [`crate::close::pending_adjustments`]).
pub async fn rate_from_clickhouse(
    cfg: &Config,
    client: &clickhouse::Client,
    month: YearMonth,
    customer: Option<&str>,
    include_open: bool,
    adjust: bool,
) -> anyhow::Result<RatedFromUsage> {
    let book = price_book(cfg)?;
    let catalog = cfg.catalog()?;
    let version = book.version_for_month(month).with_context(|| format!("no price-book version is in effect for {month}"))?;
    let minimum = book.minute_series_range(month).map(|range| {
        let types = version.usage_types_with_minimum().into_iter().map(|(s, u)| (s.to_owned(), u.to_owned())).collect();
        (range, types)
    });
    let contracts = contracts(cfg)?;
    let hourly = contracts.committed_usage_types(month);
    eprintln!("reading usage of {month} from ClickHouse ...");
    let usage = rating::month_usage(client, month, customer, include_open, minimum, &hourly).await.context("reading usage")?;
    eprintln!(
        "read {} daily rows, {} minute rows and {} hour rows ({} day windows not final yet{})",
        usage.days.len(),
        usage.minutes.len(),
        usage.hours.len(),
        usage.open_days,
        if include_open { ", included" } else { ", left out" }
    );
    let mut rated = rate_month(&book, &catalog, month, &usage.days, &usage.minutes).with_context(|| format!("rating {month}"))?;
    let mut closed = BTreeMap::new();
    if adjust {
        closed = crate::close::closed(client, month, customer).await.context("reading closed months")?;
        let (mut daily, mut lines) = crate::close::pending_adjustments(cfg, client, month, customer, &closed, &rated.version_id).await?;
        rated.daily.append(&mut daily);
        rated.lines.append(&mut lines);
    }
    let prior = rating::prior_credit_use(client, month, customer).await.context("reading the credit ledger")?;
    let inputs = charges::Inputs {
        prior: &prior,
        hours: &usage.hours,
        book: &book,
        catalog: &catalog,
        customer,
        minor_unit_digits: book.minor_unit_digits,
    };
    let ledger = charges::apply(&mut rated, &contracts, &inputs).with_context(|| format!("billing the contracts of {month}"))?;
    Ok(RatedFromUsage { book, usage, rated, ledger, closed })
}

/// Where a rating run sends the invoice lines it is about to write, before
/// writing them (`billing.invoice_lines` in the binary).
pub trait LinePublisher {
    /// Publishes `lines` and returns once every one is acknowledged.
    fn publish(&mut self, lines: &[InvoiceLine]) -> impl std::future::Future<Output = anyhow::Result<()>>;
}

/// What a rating run did.
pub struct RateRun {
    pub version_id: String,
    pub plan: Plan,
    /// Invoice lines published.
    pub published: usize,
    /// Day windows not final yet, left for a later run.
    pub open_days: usize,
    /// Customers whose month was closed already: nothing of theirs was written.
    pub frozen: BTreeSet<String>,
}

/// Rates `month` (optionally one customer): new and changed invoice lines
/// go to `publisher`, then every new or changed row to ClickHouse.
pub async fn rate(cfg: &Config, month: YearMonth, customer: Option<&str>, publisher: &mut impl LinePublisher) -> anyhow::Result<RateRun> {
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).writer()?;
    let r = rate_from_clickhouse(cfg, &client, month, customer, false, true).await?;
    let mut rows = rating::rated_rows(&r.rated, &r.ledger, &r.usage.days, r.book.minor_unit_digits)?;
    // A closed month's customers are frozen: nothing of theirs is written or zeroed.
    let frozen: BTreeSet<String> = r.closed.keys().filter(|(m, _)| *m == month).map(|(_, c)| c.clone()).collect();
    if !frozen.is_empty() {
        eprintln!("{month} is closed for {} customers: their changes are billed as adjustments on their next open month", frozen.len());
    }
    rows.retain_customers(|c| !frozen.contains(c));
    eprintln!(
        "rated {} daily lines, {} invoice lines, {} invoices; comparing with ClickHouse ...",
        rows.daily.len(),
        rows.lines.len(),
        rows.invoices.len()
    );
    let mut stored = rating::stored_rows(&client, month, &r.rated.version_id, customer).await.context("reading stored lines")?;
    stored.retain_customers(|c| !frozen.contains(c));
    let plan = rating::plan(&rows, &stored, meter_model::now_ms());
    let lines = plan.lines.write.iter().map(rating::invoice_line_of).collect::<Result<Vec<_>, _>>()?;
    if !lines.is_empty() {
        publisher.publish(&lines).await?;
    }
    plan.apply(&client).await.context("writing rated lines to ClickHouse")?;
    Ok(RateRun { version_id: r.rated.version_id, plan, published: lines.len(), open_days: r.usage.open_days, frozen })
}
