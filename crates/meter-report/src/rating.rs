//! The rating tables (`schemas/clickhouse/0003_rating.sql`): the price book,
//! daily rated lines, invoice lines and invoices, and the usage reads that
//! feed `meter_rating::rate_month`.
//!
//! Guarantee: [`plan`] compares what rating produced with what is stored for
//! the same (month, price-book version[, customer]) with
//! [`meter_rating::plan`], and [`Plan::apply`] inserts only the lines that
//! are new or changed, with a revision above every stored one (see there).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use meter_model::time::DAY_MS;
use meter_rating::plan::{diff, next_revision, Counts, TablePlan, Versioned};
use meter_rating::{CreditBalance, Date, Decimal, HourRow, MinuteRow, PriceBook, PriorUse, RatedMonth, Rounding, UsageRow, YearMonth};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use meter_rating::{AMOUNT_SCALE, FULL_SCALE};

/// `d` as the mantissa of a decimal column with `scale` places, rounded half
/// to even: rating keeps amounts at 12 places, so only derived unit rates
/// such as a package price / size can lose digits.
pub fn mantissa(d: Decimal, scale: u32) -> Result<i128> {
    meter_rating::decimal::mantissa(d, scale, Rounding::HalfEven).map_err(|e| Error::Value(e.to_string()))
}

/// The decimal whose mantissa at `scale` places is `m`.
pub fn decimal(m: i128, scale: u32) -> Result<Decimal> {
    meter_rating::decimal::from_mantissa(m, scale).map_err(|e| Error::Value(e.to_string()))
}

/// A ClickHouse `Date` (days since 1970-01-01).
pub fn ch_date(d: Date) -> Result<u16> {
    u16::try_from(d.start_millis().div_euclid(DAY_MS)).map_err(|_| Error::Value(format!("date {d} outside ClickHouse Date")))
}

/// The date of a ClickHouse `Date`.
pub fn from_ch_date(days: u16) -> Result<Date> {
    Date::from_millis(i64::from(days) * DAY_MS).ok_or_else(|| Error::Value(format!("day number {days}")))
}

fn month_date(m: YearMonth) -> Result<u16> {
    ch_date(m.first_day())
}

// ---- rows (field order is column order) --------------------------------------

/// One price (or one tier of a tiered price) of one price-book version.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct PriceBookRow {
    pub version_id: String,
    pub effective_from: u16,
    pub currency: String,
    pub service: String,
    pub usage_type: String,
    /// Empty: the default for regions without their own entry.
    pub region: String,
    pub pricing_unit: String,
    /// per_unit | graduated | volume | package.
    pub model: String,
    /// 1-based; 1 for per_unit and package.
    pub tier: u16,
    pub tier_from: i128,
    pub tier_up_to: Option<i128>,
    pub rate: Option<i128>,
    pub package_size: Option<i128>,
    pub package_price: Option<i128>,
    pub free_allowance: i128,
    /// 0: no per-run minimum.
    pub minimum_seconds: u32,
    pub description: String,
    pub loaded_at: u32,
    pub revision: u64,
}

/// One key's usage and cost on one day (`rated_usage`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct RatedUsageRow {
    pub month: u16,
    pub version_id: String,
    pub day: u16,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub resource_ids: Vec<String>,
    /// Usage | Fee | Credit ([`meter_rating::LineType`]).
    pub line_type: String,
    pub usage_quantity: i128,
    pub minimum_uplift: i128,
    pub pricing_unit: String,
    pub quantity: i128,
    pub cost: i128,
    pub unit_rate: Option<i128>,
    pub currency: String,
    pub line_id: String,
    pub rated_at: u32,
    pub revision: u64,
    /// The price-book version that priced the day (usage lines; empty otherwise).
    pub price_version_id: String,
}

/// One monthly invoice line with its tier breakdown (`invoice_lines`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct InvoiceLineRow {
    pub month: u16,
    pub version_id: String,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub line_id: String,
    /// Usage | Fee | Credit ([`meter_rating::LineType`]).
    pub line_type: String,
    pub usage_quantity: i128,
    pub minimum_uplift: i128,
    pub pricing_unit: String,
    pub quantity: i128,
    pub free_allowance_used: i128,
    pub billable_quantity: i128,
    pub tier_from: Vec<i128>,
    pub tier_up_to: Vec<Option<i128>>,
    pub tier_quantity: Vec<i128>,
    pub tier_unit_rate: Vec<i128>,
    pub tier_amount: Vec<i128>,
    pub packages: Option<i128>,
    pub unit_rate: Option<i128>,
    pub amount_full: i128,
    /// Scale 2.
    pub amount: i128,
    pub currency: String,
    pub rated_at: u32,
    pub revision: u64,
}

/// A customer's total for the month (`invoices`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct InvoiceRow {
    pub month: u16,
    pub version_id: String,
    pub customer_id: String,
    pub invoice_id: String,
    pub currency: String,
    pub line_count: u32,
    /// Scale 2.
    pub total: i128,
    pub rated_at: u32,
    pub revision: u64,
}

/// A credit's account for one month (`credit_ledger`); amounts at scale 2.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct CreditLedgerRow {
    pub month: u16,
    pub customer_id: String,
    pub credit_id: String,
    pub currency: String,
    pub amount: i128,
    pub starts: u16,
    pub expires: u16,
    pub opening: i128,
    pub used: i128,
    pub expired: i128,
    pub remaining: i128,
    pub version_id: String,
    pub rated_at: u32,
    pub revision: u64,
}

// ---- price book ----------------------------------------------------------------

/// The price book flattened into rows: one per price, or per tier of a tiered price.
pub fn price_book_rows(book: &PriceBook, loaded_at: u32, revision: u64) -> Result<Vec<PriceBookRow>> {
    let m = |d: Decimal| mantissa(d, FULL_SCALE);
    let mut out = Vec::new();
    for v in book.versions() {
        for p in &v.prices {
            let base = PriceBookRow {
                version_id: v.id.clone(),
                effective_from: ch_date(v.effective_from)?,
                currency: book.currency.clone(),
                service: p.service.clone(),
                usage_type: p.usage_type.clone(),
                region: p.region.clone().unwrap_or_default(),
                pricing_unit: p.pricing_unit.clone(),
                model: String::new(),
                tier: 1,
                tier_from: 0,
                tier_up_to: None,
                rate: None,
                package_size: None,
                package_price: None,
                free_allowance: m(p.free_allowance)?,
                minimum_seconds: p.minimum_seconds.unwrap_or(0),
                description: p.description.clone(),
                loaded_at,
                revision,
            };
            match &p.model {
                meter_rating::Model::PerUnit { rate } => {
                    out.push(PriceBookRow { model: "per_unit".into(), rate: Some(m(*rate)?), ..base });
                }
                meter_rating::Model::Graduated { tiers } | meter_rating::Model::Volume { tiers } => {
                    let name = if matches!(p.model, meter_rating::Model::Graduated { .. }) { "graduated" } else { "volume" };
                    let mut from = Decimal::ZERO;
                    for (i, t) in tiers.iter().enumerate() {
                        out.push(PriceBookRow {
                            model: name.into(),
                            tier: u16::try_from(i + 1).map_err(|_| Error::Value("more than 65535 tiers".into()))?,
                            tier_from: m(from)?,
                            tier_up_to: t.up_to.map(m).transpose()?,
                            rate: Some(m(t.rate)?),
                            ..base.clone()
                        });
                        from = t.up_to.unwrap_or(from);
                    }
                }
                meter_rating::Model::Package { size, price } => {
                    out.push(PriceBookRow {
                        model: "package".into(),
                        package_size: Some(m(*size)?),
                        package_price: Some(m(*price)?),
                        ..base
                    });
                }
                other => return Err(Error::Value(format!("pricing model {other:?} has no price_book representation"))),
            }
        }
    }
    Ok(out)
}

fn strip_price(r: &PriceBookRow) -> PriceBookRow {
    PriceBookRow { loaded_at: 0, revision: 0, ..r.clone() }
}

/// Writes the price book: rows that are new or differ from the stored ones
/// get a new revision; identical rows are left alone. Stored rows of a
/// version that the book no longer has (a removed tier) are reported in
/// `removed` and left in place: a version that has priced a month must not
/// change, and `meter prices load` refuses that before calling this.
pub async fn load_price_book(client: &Client, rows: &[PriceBookRow]) -> Result<Counts> {
    let stored = stored_price_book(client).await?;
    let stored: HashMap<(String, String, String, String, u16), PriceBookRow> = stored
        .into_iter()
        .map(|r| ((r.version_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone(), r.tier), r))
        .collect();
    let max_rev = stored.values().map(|r| r.revision).max().unwrap_or(0);
    let mut counts = Counts::default();
    let mut write = Vec::new();
    let mut seen = BTreeSet::new();
    for r in rows {
        let k = (r.version_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone(), r.tier);
        match stored.get(&k) {
            Some(s) if strip_price(s) == strip_price(r) => counts.unchanged += 1,
            Some(_) => {
                counts.changed += 1;
                write.push(r.clone());
            }
            None => {
                counts.new += 1;
                write.push(r.clone());
            }
        }
        seen.insert(k);
    }
    let versions: BTreeSet<&str> = rows.iter().map(|r| r.version_id.as_str()).collect();
    counts.removed = stored.keys().filter(|k| versions.contains(k.0.as_str()) && !seen.contains(*k)).count();
    if !write.is_empty() {
        let mut insert = client.insert::<PriceBookRow>("price_book").await?;
        for mut r in write {
            r.revision = r.revision.max(max_rev + 1);
            insert.write(&r).await?;
        }
        insert.end().await?;
    }
    Ok(counts)
}

pub const SQL_STORED_PRICE_BOOK: &str =
    "SELECT version_id, effective_from, currency, service, usage_type, region, pricing_unit, model, tier, \
    tier_from, tier_up_to, rate, package_size, package_price, free_allowance, minimum_seconds, description, \
    toUInt32(loaded_at) AS loaded_at, revision \
    FROM price_book FINAL ORDER BY version_id, service, usage_type, region, tier";

/// The stored price book (latest revision of every row).
pub async fn stored_price_book(client: &Client) -> Result<Vec<PriceBookRow>> {
    Ok(client.query(SQL_STORED_PRICE_BOOK).fetch_all().await?)
}

// ---- usage in ------------------------------------------------------------------

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DayRow {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    resource_id: String,
    window_start: u32,
    quantity: i128,
    is_final: u8,
}

/// Daily usage of a month, latest revision per window: rows of final windows
/// (or of every window with `include_open`), and how many open windows were
/// left out (or included).
pub const SQL_MONTH_USAGE: &str = "SELECT customer_id, service, usage_type, region, resource_id, toUInt32(window_start) AS window_start, \
    q AS quantity, f AS is_final \
    FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                 argMax(quantity_sum, revision) AS q, argMax(is_final, revision) AS f \
          FROM usage_day \
          WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) AND (? = '' OR customer_id = ?) \
          GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
    ORDER BY customer_id, service, usage_type, region, resource_id, window_start";

/// The minute series of the given (service, usage_type) pairs in `[from, to)`.
pub const SQL_MINUTE_SERIES: &str =
    "SELECT customer_id, service, usage_type, region, resource_id, toUInt32(window_start) AS window_start, \
    q AS quantity, f AS is_final \
    FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                 argMax(quantity_sum, revision) AS q, argMax(is_final, revision) AS f \
          FROM usage_minute \
          WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) AND (? = '' OR customer_id = ?) \
            AND has(?, concat(service, '/', usage_type)) \
          GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
    ORDER BY customer_id, service, usage_type, region, resource_id, window_start";

/// Hourly usage of the given (service, usage_type) pairs in `[from, to)`,
/// per (customer, key, resource, hour): what reservations and savings plans cover.
pub const SQL_HOUR_USAGE: &str = "SELECT customer_id, service, usage_type, region, resource_id, toUInt32(window_start) AS window_start, \
    q AS quantity, f AS is_final \
    FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                 argMax(quantity_sum, revision) AS q, argMax(is_final, revision) AS f \
          FROM usage_hour \
          WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) AND (? = '' OR customer_id = ?) \
            AND has(?, concat(service, '/', usage_type)) \
          GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
    ORDER BY customer_id, service, usage_type, region, resource_id, window_start";

/// The minute series rating needs: the range `[from, to)` in epoch ms and
/// the (service, usage_type) pairs priced with a per-run minimum.
pub type MinuteSeries = ((i64, i64), Vec<(String, String)>);

/// A month's usage as rating takes it.
#[derive(Debug, Default)]
pub struct MonthUsage {
    pub days: Vec<UsageRow>,
    pub minutes: Vec<MinuteRow>,
    /// Hourly usage of the usage types commitments cover, summed over resources.
    pub hours: Vec<HourRow>,
    /// Day windows whose latest revision is not final (left out unless included).
    pub open_days: usize,
}

fn secs(ms: i64) -> Result<u32> {
    u32::try_from(ms.div_euclid(1000)).map_err(|_| Error::Value(format!("instant {ms} ms outside 1970..2106")))
}

/// Reads the month's usage_day rows (latest revision; only final windows
/// unless `include_open`) and, when `minimum` is given (the price book's
/// `minute_series_range` and the usage types with a per-run minimum), the
/// usage_minute series, and the usage_hour rows of the `hourly` (service,
/// usage_type) pairs (what reservations and savings plans cover). Minutes
/// and hours of a (resource, day) whose day row was left out are dropped
/// too, so they always add up to the days rating sees.
pub async fn month_usage(
    client: &Client,
    month: YearMonth,
    customer: Option<&str>,
    include_open: bool,
    minimum: Option<MinuteSeries>,
    hourly: &[(String, String)],
) -> Result<MonthUsage> {
    let c = customer.unwrap_or("");
    let rows: Vec<DayRow> =
        client.query(SQL_MONTH_USAGE).bind(secs(month.start_millis())?).bind(secs(month.end_millis())?).bind(c).bind(c).fetch_all().await?;
    let mut out = MonthUsage::default();
    let mut kept: BTreeSet<(String, String, String, String, String, Date)> = BTreeSet::new();
    for r in rows {
        if r.is_final == 0 {
            out.open_days += 1;
            if !include_open {
                continue;
            }
        }
        let day = Date::from_millis(i64::from(r.window_start) * 1000).ok_or_else(|| Error::Value(format!("window {}", r.window_start)))?;
        kept.insert((r.customer_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone(), r.resource_id.clone(), day));
        out.days.push(UsageRow {
            customer_id: r.customer_id,
            service: r.service,
            usage_type: r.usage_type,
            region: r.region,
            resource_id: r.resource_id,
            day,
            quantity: r.quantity,
        });
    }
    if !hourly.is_empty() {
        let types: Vec<String> = hourly.iter().map(|(s, u)| format!("{s}/{u}")).collect();
        let rows: Vec<DayRow> = client
            .query(SQL_HOUR_USAGE)
            .bind(secs(month.start_millis())?)
            .bind(secs(month.end_millis())?)
            .bind(c)
            .bind(c)
            .bind(types)
            .fetch_all()
            .await?;
        let mut per: BTreeMap<(String, String, String, String, i64), i128> = BTreeMap::new();
        for r in rows {
            let start = i64::from(r.window_start) * 1000;
            let day = Date::from_millis(start).ok_or_else(|| Error::Value(format!("window {}", r.window_start)))?;
            let resource = (r.customer_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone(), r.resource_id.clone(), day);
            if !kept.contains(&resource) {
                continue;
            }
            *per.entry((r.customer_id, r.service, r.usage_type, r.region, start)).or_insert(0) += r.quantity;
        }
        out.hours = per
            .into_iter()
            .map(|((customer_id, service, usage_type, region, hour_start), quantity)| HourRow {
                customer_id,
                service,
                usage_type,
                region,
                hour_start,
                quantity,
            })
            .collect();
    }
    if let Some(((from, to), types)) = minimum {
        let types: Vec<String> = types.iter().map(|(s, u)| format!("{s}/{u}")).collect();
        let rows: Vec<DayRow> =
            client.query(SQL_MINUTE_SERIES).bind(secs(from)?).bind(secs(to)?).bind(c).bind(c).bind(types).fetch_all().await?;
        for r in rows {
            let start = i64::from(r.window_start) * 1000;
            let day = Date::from_millis(start).ok_or_else(|| Error::Value(format!("window {}", r.window_start)))?;
            if month.contains(day)
                && !kept.contains(&(
                    r.customer_id.clone(),
                    r.service.clone(),
                    r.usage_type.clone(),
                    r.region.clone(),
                    r.resource_id.clone(),
                    day,
                ))
            {
                continue;
            }
            out.minutes.push(MinuteRow {
                customer_id: r.customer_id,
                service: r.service,
                usage_type: r.usage_type,
                region: r.region,
                resource_id: r.resource_id,
                minute_start: start,
                quantity: r.quantity,
            });
        }
    }
    Ok(out)
}

// ---- rated rows out --------------------------------------------------------------

/// The rows of a rated month (with `rated_at` and `revision` still 0).
#[derive(Debug, Default, Clone)]
pub struct RatedRows {
    pub daily: Vec<RatedUsageRow>,
    pub lines: Vec<InvoiceLineRow>,
    pub invoices: Vec<InvoiceRow>,
    pub ledger: Vec<CreditLedgerRow>,
}

impl RatedRows {
    /// Keeps the rows of the customers `keep` says yes to.
    pub fn retain_customers(&mut self, keep: impl Fn(&str) -> bool) {
        self.daily.retain(|r| keep(&r.customer_id));
        self.lines.retain(|r| keep(&r.customer_id));
        self.invoices.retain(|r| keep(&r.customer_id));
        self.ledger.retain(|r| keep(&r.customer_id));
    }
}

/// Converts a rated month into table rows. `usage` (the rows rated) gives
/// each daily line the resources it covers.
pub fn rated_rows(rated: &RatedMonth, ledger: &[CreditBalance], usage: &[UsageRow], minor_unit_digits: u32) -> Result<RatedRows> {
    if minor_unit_digits > AMOUNT_SCALE {
        return Err(Error::Value(format!(
            "currency {} has {minor_unit_digits} minor-unit digits; invoice amounts are stored with {AMOUNT_SCALE}",
            rated.currency
        )));
    }
    let full = |d: Decimal| mantissa(d, FULL_SCALE);
    let month = month_date(rated.month)?;
    let mut resources: BTreeMap<(&str, &str, &str, &str, Date), BTreeSet<&str>> = BTreeMap::new();
    for u in usage.iter().filter(|u| !u.resource_id.is_empty()) {
        resources
            .entry((u.customer_id.as_str(), u.service.as_str(), u.usage_type.as_str(), u.region.as_str(), u.day))
            .or_default()
            .insert(u.resource_id.as_str());
    }
    let unit_rates: HashMap<&meter_rating::LineKey, Option<Decimal>> = rated.lines.iter().map(|l| (&l.key, l.unit_rate)).collect();
    let mut out = RatedRows::default();
    for d in &rated.daily {
        let k = &d.key;
        out.daily.push(RatedUsageRow {
            month,
            version_id: d.version_id.clone(),
            day: ch_date(d.day)?,
            customer_id: k.customer_id.clone(),
            service: k.service.clone(),
            usage_type: k.usage_type.clone(),
            region: k.region.clone(),
            resource_ids: resources
                .get(&(k.customer_id.as_str(), k.service.as_str(), k.usage_type.as_str(), k.region.as_str(), d.day))
                .map(|s| s.iter().map(|r| (*r).to_owned()).collect())
                .unwrap_or_default(),
            line_type: d.line_type.to_string(),
            usage_quantity: d.usage_quantity,
            minimum_uplift: d.minimum_uplift,
            pricing_unit: d.pricing_unit.clone(),
            quantity: full(d.quantity)?,
            cost: full(d.cost)?,
            unit_rate: unit_rates.get(k).copied().flatten().map(full).transpose()?,
            currency: d.currency.clone(),
            line_id: d.line_id.clone(),
            rated_at: 0,
            revision: 0,
            price_version_id: d.price_version_id.clone(),
        });
    }
    for l in &rated.lines {
        let k = &l.key;
        out.lines.push(InvoiceLineRow {
            month,
            version_id: l.version_id.clone(),
            customer_id: k.customer_id.clone(),
            service: k.service.clone(),
            usage_type: k.usage_type.clone(),
            region: k.region.clone(),
            line_id: l.line_id.clone(),
            line_type: l.line_type.to_string(),
            usage_quantity: l.usage_quantity,
            minimum_uplift: l.minimum_uplift,
            pricing_unit: l.pricing_unit.clone(),
            quantity: full(l.quantity)?,
            free_allowance_used: full(l.free_allowance_used)?,
            billable_quantity: full(l.billable_quantity)?,
            tier_from: l.tiers.iter().map(|t| full(t.from)).collect::<Result<_>>()?,
            tier_up_to: l.tiers.iter().map(|t| t.up_to.map(full).transpose()).collect::<Result<_>>()?,
            tier_quantity: l.tiers.iter().map(|t| full(t.quantity)).collect::<Result<_>>()?,
            tier_unit_rate: l.tiers.iter().map(|t| full(t.unit_rate)).collect::<Result<_>>()?,
            tier_amount: l.tiers.iter().map(|t| full(t.amount)).collect::<Result<_>>()?,
            packages: l.packages.map(full).transpose()?,
            unit_rate: l.unit_rate.map(full).transpose()?,
            amount_full: full(l.amount_full)?,
            amount: mantissa(l.amount, AMOUNT_SCALE)?,
            currency: l.currency.clone(),
            rated_at: 0,
            revision: 0,
        });
    }
    for i in &rated.invoices {
        out.invoices.push(InvoiceRow {
            month,
            version_id: i.version_id.clone(),
            customer_id: i.customer_id.clone(),
            invoice_id: i.invoice_id.clone(),
            currency: i.currency.clone(),
            line_count: u32::try_from(i.line_count).map_err(|_| Error::Value("line count".into()))?,
            total: mantissa(i.total, AMOUNT_SCALE)?,
            rated_at: 0,
            revision: 0,
        });
    }
    let cents = |d: Decimal| mantissa(d, AMOUNT_SCALE);
    for b in ledger {
        out.ledger.push(CreditLedgerRow {
            month,
            customer_id: b.customer_id.clone(),
            credit_id: b.credit_id.clone(),
            currency: rated.currency.clone(),
            amount: cents(b.amount)?,
            starts: ch_date(b.start)?,
            expires: ch_date(b.expires)?,
            opening: cents(b.opening)?,
            used: cents(b.used)?,
            expired: cents(b.expired)?,
            remaining: cents(b.remaining)?,
            version_id: rated.version_id.clone(),
            rated_at: 0,
            revision: 0,
        });
    }
    Ok(out)
}

// ---- stored rows -----------------------------------------------------------------

pub const SQL_STORED_RATED_USAGE: &str = "SELECT month, version_id, day, customer_id, service, usage_type, region, resource_ids, \
    line_type, usage_quantity, minimum_uplift, pricing_unit, quantity, cost, unit_rate, currency, line_id, toUInt32(rated_at) AS rated_at, revision, \
    price_version_id FROM rated_usage FINAL WHERE month = toDate(?) AND version_id = ? AND (? = '' OR customer_id = ?)";

pub const SQL_STORED_INVOICE_LINES: &str = "SELECT month, version_id, customer_id, service, usage_type, region, line_id, \
    line_type, usage_quantity, minimum_uplift, pricing_unit, quantity, free_allowance_used, billable_quantity, \
    tier_from, tier_up_to, tier_quantity, tier_unit_rate, tier_amount, packages, unit_rate, amount_full, amount, currency, \
    toUInt32(rated_at) AS rated_at, revision \
    FROM invoice_lines FINAL WHERE month = toDate(?) AND version_id = ? AND (? = '' OR customer_id = ?)";

pub const SQL_STORED_INVOICES: &str = "SELECT month, version_id, customer_id, invoice_id, currency, line_count, total, \
    toUInt32(rated_at) AS rated_at, revision \
    FROM invoices FINAL WHERE month = toDate(?) AND version_id = ? AND (? = '' OR customer_id = ?)";

pub const SQL_STORED_CREDIT_LEDGER: &str = "SELECT month, customer_id, credit_id, currency, amount, starts, expires, opening, used, \
    expired, remaining, version_id, toUInt32(rated_at) AS rated_at, revision \
    FROM credit_ledger FINAL WHERE month = toDate(?) AND (? = '' OR customer_id = ?)";

/// Credit used before a month, per credit: the latest rating of every earlier month.
pub const SQL_PRIOR_CREDIT_USE: &str =
    "SELECT credit_id, sum(used) AS used FROM credit_ledger FINAL WHERE month < toDate(?) AND (? = '' OR customer_id = ?) \
    GROUP BY credit_id ORDER BY credit_id";

/// Credit used in the months before `month` (what `meter_rating::charges` starts from).
pub async fn prior_credit_use(client: &Client, month: YearMonth, customer: Option<&str>) -> Result<PriorUse> {
    #[derive(clickhouse::Row, Deserialize)]
    struct Used {
        credit_id: String,
        used: i128,
    }
    let m = month.first_day().to_string();
    let c = customer.unwrap_or("");
    let rows: Vec<Used> = client.query(SQL_PRIOR_CREDIT_USE).bind(m.as_str()).bind(c).bind(c).fetch_all().await?;
    rows.into_iter().map(|r| Ok((r.credit_id, decimal(r.used, AMOUNT_SCALE)?))).collect()
}

/// What is stored for (month, version[, customer]), and the month's credit ledger.
pub async fn stored_rows(client: &Client, month: YearMonth, version_id: &str, customer: Option<&str>) -> Result<RatedRows> {
    let m = month.first_day().to_string();
    let c = customer.unwrap_or("");
    Ok(RatedRows {
        daily: client.query(SQL_STORED_RATED_USAGE).bind(m.as_str()).bind(version_id).bind(c).bind(c).fetch_all().await?,
        lines: client.query(SQL_STORED_INVOICE_LINES).bind(m.as_str()).bind(version_id).bind(c).bind(c).fetch_all().await?,
        invoices: client.query(SQL_STORED_INVOICES).bind(m.as_str()).bind(version_id).bind(c).bind(c).fetch_all().await?,
        ledger: client.query(SQL_STORED_CREDIT_LEDGER).bind(m.as_str()).bind(c).bind(c).fetch_all().await?,
    })
}

// ---- plan and apply ----------------------------------------------------------------

/// `id`, `stamp` and `revision` read and write the same fields in every
/// rating row; only the identity's field name differs.
macro_rules! versioned_fields {
    ($id:ident) => {
        fn id(&self) -> String {
            self.$id.clone()
        }
        fn stamp(&mut self, rated_at: u32, revision: u64) {
            (self.rated_at, self.revision) = (rated_at, revision);
        }
        fn revision(&self) -> u64 {
            self.revision
        }
    };
}

impl Versioned for RatedUsageRow {
    versioned_fields!(line_id);
    fn zeroed(&self) -> Self {
        RatedUsageRow { usage_quantity: 0, minimum_uplift: 0, quantity: 0, cost: 0, resource_ids: Vec::new(), ..self.clone() }
    }
}

impl Versioned for InvoiceLineRow {
    versioned_fields!(line_id);
    fn zeroed(&self) -> Self {
        InvoiceLineRow {
            usage_quantity: 0,
            minimum_uplift: 0,
            quantity: 0,
            free_allowance_used: 0,
            billable_quantity: 0,
            tier_from: Vec::new(),
            tier_up_to: Vec::new(),
            tier_quantity: Vec::new(),
            tier_unit_rate: Vec::new(),
            tier_amount: Vec::new(),
            packages: None,
            amount_full: 0,
            amount: 0,
            ..self.clone()
        }
    }
}

impl Versioned for InvoiceRow {
    versioned_fields!(invoice_id);
    fn zeroed(&self) -> Self {
        InvoiceRow { line_count: 0, total: 0, ..self.clone() }
    }
}

impl Versioned for CreditLedgerRow {
    versioned_fields!(credit_id);
    fn zeroed(&self) -> Self {
        CreditLedgerRow { opening: 0, used: 0, expired: 0, remaining: 0, ..self.clone() }
    }
}

/// What a rating run writes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub daily: TablePlan<RatedUsageRow>,
    pub lines: TablePlan<InvoiceLineRow>,
    pub invoices: TablePlan<InvoiceRow>,
    pub ledger: TablePlan<CreditLedgerRow>,
    /// Revision stamped on every written row: above every stored revision
    /// of this (month, version), and at least the run's clock in ms.
    pub revision: u64,
    pub rated_at: u32,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.daily.write.is_empty() && self.lines.write.is_empty() && self.invoices.write.is_empty() && self.ledger.write.is_empty()
    }

    /// Inserts the rows to write; invoices last, so a reader that sees an
    /// invoice total also sees its lines and its credits' ledger.
    pub async fn apply(&self, client: &Client) -> Result<()> {
        write(client, "rated_usage", &self.daily.write).await?;
        write(client, "invoice_lines", &self.lines.write).await?;
        write(client, "credit_ledger", &self.ledger.write).await?;
        write(client, "invoices", &self.invoices.write).await?;
        Ok(())
    }
}

async fn write<R: clickhouse::RowOwned + clickhouse::RowWrite + Serialize>(client: &Client, table: &str, rows: &[R]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<R>(table).await?;
    for r in rows {
        insert.write(r).await?;
    }
    insert.end().await?;
    Ok(())
}

/// Compares `new` with `stored` and stamps what must be written with one
/// revision above everything stored (and at least `now_ms`).
pub fn plan(new: &RatedRows, stored: &RatedRows, now_ms: i64) -> Plan {
    let (mut daily, r1) = diff(&new.daily, &stored.daily);
    let (mut lines, r2) = diff(&new.lines, &stored.lines);
    let (mut invoices, r3) = diff(&new.invoices, &stored.invoices);
    let (mut ledger, r4) = diff(&new.ledger, &stored.ledger);
    let revision = next_revision(r1.max(r2).max(r3).max(r4), now_ms);
    let rated_at = u32::try_from(now_ms.div_euclid(1000)).unwrap_or(0);
    daily.stamp(rated_at, revision);
    lines.stamp(rated_at, revision);
    invoices.stamp(rated_at, revision);
    ledger.stamp(rated_at, revision);
    Plan { daily, lines, invoices, ledger, revision, rated_at }
}

/// An invoice line row back as the rating type (for publishing to Kafka).
pub fn invoice_line_of(row: &InvoiceLineRow) -> Result<meter_rating::InvoiceLine> {
    let d = |m: i128| decimal(m, FULL_SCALE);
    let month = from_ch_date(row.month)?.year_month();
    let mut tiers = Vec::with_capacity(row.tier_from.len());
    for i in 0..row.tier_from.len() {
        let get = |v: &Vec<i128>| v.get(i).copied().ok_or_else(|| Error::Value("tier arrays of different lengths".into()));
        tiers.push(meter_rating::TierCharge {
            from: d(row.tier_from[i])?,
            up_to: row.tier_up_to.get(i).copied().flatten().map(d).transpose()?,
            quantity: d(get(&row.tier_quantity)?)?,
            unit_rate: d(get(&row.tier_unit_rate)?)?,
            amount: d(get(&row.tier_amount)?)?,
        });
    }
    Ok(meter_rating::InvoiceLine {
        line_id: row.line_id.clone(),
        month,
        key: meter_rating::LineKey {
            customer_id: row.customer_id.clone(),
            service: row.service.clone(),
            usage_type: row.usage_type.clone(),
            region: row.region.clone(),
        },
        line_type: row.line_type.parse().map_err(Error::Value)?,
        usage_quantity: row.usage_quantity,
        minimum_uplift: row.minimum_uplift,
        pricing_unit: row.pricing_unit.clone(),
        quantity: d(row.quantity)?,
        free_allowance_used: d(row.free_allowance_used)?,
        billable_quantity: d(row.billable_quantity)?,
        tiers,
        packages: row.packages.map(d).transpose()?,
        unit_rate: row.unit_rate.map(d).transpose()?,
        amount_full: d(row.amount_full)?,
        amount: decimal(row.amount, AMOUNT_SCALE)?,
        version_id: row.version_id.clone(),
        currency: row.currency.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip_through_mantissas() {
        let d: Decimal = "1402.880000000000".parse().unwrap_or_default();
        assert_eq!(mantissa(d, 12).ok(), Some(1_402_880_000_000_000));
        assert_eq!(decimal(1_402_880_000_000_000, 12).ok(), Some(d));
        assert_eq!(mantissa("3.48".parse().unwrap_or_default(), 2).ok(), Some(348));
        let date = Date::new(2026, 2, 1).unwrap_or_else(|| unreachable!());
        assert_eq!(from_ch_date(ch_date(date).unwrap_or(0)).ok(), Some(date));
    }
}
