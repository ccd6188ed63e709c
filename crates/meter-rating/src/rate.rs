//! Rating: a month's final usage in, daily rated lines and monthly invoice
//! lines out. Pure: same input, same output, byte for byte.
//!
//! Guarantees:
//! - Each (customer, service, usage_type, region) is priced on its own with
//!   the version in effect for the month, except that the members of a free
//!   pool ([`crate::FreePool`]) share one allowance per customer; so rating
//!   one customer alone gives the same lines as rating everyone.
//! - Daily lines sum exactly (at full internal precision) to the monthly
//!   amount: day d is charged `price(month-to-date through d) - price(month-to-date
//!   through d-1)`. For graduated tiers and packages this puts each day in
//!   the tier (or package) the month had reached by then; the free
//!   allowance is used up by the first days of the month. For volume tiers
//!   the whole month-to-date quantity is re-priced each day, so the day that
//!   crosses into a cheaper tier can carry a negative cost (a credit for
//!   the earlier days, now priced at the lower rate).
//! - Invoice lines are rounded half to even to the currency's minor unit; an
//!   invoice total is the sum of its rounded lines.
//! - Every line has a deterministic id from (kind, month, version, key).

use std::collections::BTreeMap;

use meter_model::catalog::Lookup;
use meter_model::Catalog;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::book::{Price, PriceBook};
use crate::date::{Date, YearMonth};
use crate::decimal::to_minor_unit;
use crate::error::{Error, Result};
use crate::line_id::line_id;
use crate::model::{self, TierCharge};
use crate::runs::uplift_by_day;
use crate::units::Conversion;

/// Final usage of one resource on one UTC day (a `usage_day` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    /// Empty unless the catalog keys the usage type by resource.
    pub resource_id: String,
    pub day: Date,
    /// Base units (seconds, bytes, byte-seconds, requests).
    pub quantity: i128,
}

/// Final usage of one resource in one minute (a `usage_minute` row), needed
/// only for usage types priced with a per-run minimum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MinuteRow {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub resource_id: String,
    /// Start of the minute, epoch milliseconds (a multiple of 60 000).
    pub minute_start: i64,
    /// Seconds used in the minute.
    pub quantity: i128,
}

/// Final usage of one (customer, service, usage type, region) in one hour,
/// summed over its resources (`usage_hour` rows): what reservations and
/// savings plans cover, hour by hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HourRow {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    /// Start of the hour, epoch milliseconds (a multiple of 3 600 000).
    pub hour_start: i64,
    /// Base units (seconds).
    pub quantity: i128,
}

/// What an invoice line is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LineKey {
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
}

impl std::fmt::Display for LineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}/{}", self.customer_id, self.service, self.usage_type, self.region)
    }
}

/// What a line charges for, named as the AWS Cost and Usage Report names
/// its `lineItem/LineItemType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub enum LineType {
    /// Metered usage at the price book's prices.
    #[default]
    Usage,
    /// A subscription's recurring fee (flat, or a percentage of usage).
    Fee,
    /// A credit applied to eligible charges (a negative amount).
    Credit,
    /// Usage covered by a reservation: its quantity, at no cost (the
    /// reservation's fee pays for it).
    DiscountedUsage,
    /// A reservation's fee: every reserved instance-hour, used or not.
    RIFee,
    /// Usage covered by a savings plan, at list price ...
    SavingsPlanCoveredUsage,
    /// ... and the same amount taken off again.
    SavingsPlanNegation,
    /// A savings plan's commitment: every hour, used or not.
    SavingsPlanRecurringFee,
    /// A change to a closed month, billed on a later open one
    /// (usage type `Adjustment:<month>:<usage type>`).
    Adjustment,
}

impl LineType {
    pub const ALL: [LineType; 9] = [
        LineType::Usage,
        LineType::Fee,
        LineType::Credit,
        LineType::DiscountedUsage,
        LineType::RIFee,
        LineType::SavingsPlanCoveredUsage,
        LineType::SavingsPlanNegation,
        LineType::SavingsPlanRecurringFee,
        LineType::Adjustment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LineType::Usage => "Usage",
            LineType::Fee => "Fee",
            LineType::Credit => "Credit",
            LineType::DiscountedUsage => "DiscountedUsage",
            LineType::RIFee => "RIFee",
            LineType::SavingsPlanCoveredUsage => "SavingsPlanCoveredUsage",
            LineType::SavingsPlanNegation => "SavingsPlanNegation",
            LineType::SavingsPlanRecurringFee => "SavingsPlanRecurringFee",
            LineType::Adjustment => "Adjustment",
        }
    }
}

impl std::fmt::Display for LineType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LineType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        LineType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| format!("unknown line type {s:?}"))
    }
}

/// One key's usage and cost on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyLine {
    pub line_id: String,
    pub month: YearMonth,
    pub day: Date,
    #[serde(flatten)]
    pub key: LineKey,
    pub line_type: LineType,
    /// Metered usage, base units.
    pub usage_quantity: i128,
    /// Seconds added by per-run minimums for runs that started this day.
    pub minimum_uplift: i128,
    pub pricing_unit: String,
    /// Rated quantity (usage + uplift), pricing units, internal precision.
    pub quantity: Decimal,
    /// Cost at full internal precision (never rounded; may be negative only under volume tiers).
    pub cost: Decimal,
    /// The month's rating id ([`PriceBook::rating_id`]).
    pub version_id: String,
    /// The price-book version whose prices priced this day (usage lines;
    /// empty for the lines contracts add).
    pub price_version_id: String,
    pub currency: String,
}

/// One line of a monthly invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub line_id: String,
    pub month: YearMonth,
    #[serde(flatten)]
    pub key: LineKey,
    pub line_type: LineType,
    /// Metered usage, base units.
    pub usage_quantity: i128,
    /// Seconds added by per-run minimums.
    pub minimum_uplift: i128,
    pub pricing_unit: String,
    /// Rated quantity, pricing units.
    pub quantity: Decimal,
    pub free_allowance_used: Decimal,
    /// `quantity - free_allowance_used`.
    pub billable_quantity: Decimal,
    /// Tiers with quantity, lowest first (one entry for per-unit, volume and package).
    pub tiers: Vec<TierCharge>,
    /// Packages billed (package model).
    pub packages: Option<Decimal>,
    /// Rate per pricing unit when the line has a single rate.
    pub unit_rate: Option<Decimal>,
    /// Amount before rounding: exactly the sum of the daily costs.
    pub amount_full: Decimal,
    /// `amount_full` rounded half to even to the currency's minor unit.
    pub amount: Decimal,
    pub version_id: String,
    pub currency: String,
}

/// A customer's invoice for the month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub invoice_id: String,
    pub month: YearMonth,
    pub customer_id: String,
    /// Sum of the rounded line amounts.
    pub total: Decimal,
    pub line_count: usize,
    pub version_id: String,
    pub currency: String,
}

/// Everything rating a month produces, sorted by key (and day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RatedMonth {
    pub month: YearMonth,
    pub version_id: String,
    pub currency: String,
    pub daily: Vec<DailyLine>,
    pub lines: Vec<InvoiceLine>,
    pub invoices: Vec<Invoice>,
}

struct Resolved<'a> {
    price: &'a Price,
    conversion: Conversion,
    /// Set when the price has a per-run minimum (base unit seconds).
    minimum: Option<u32>,
}

fn resolve<'a>(catalog: &Catalog, version: &'a crate::book::Version, key: &LineKey) -> Result<Resolved<'a>> {
    let info = match catalog.lookup(&key.service, &key.usage_type) {
        Lookup::Known(info) => info,
        _ => return Err(Error::UnknownUsageType { key: key.to_string() }),
    };
    let price = version
        .price_for(&key.service, &key.usage_type, &key.region)
        .ok_or_else(|| Error::NoPrice { key: key.to_string(), version: version.id.clone() })?;
    let base = info.base_unit.as_str();
    let conversion = Conversion::find(base, &price.pricing_unit).ok_or_else(|| Error::UnknownConversion {
        key: key.to_string(),
        base_unit: base.to_owned(),
        pricing_unit: price.pricing_unit.clone(),
    })?;
    if price.minimum_seconds.is_some() && base != "seconds" {
        return Err(Error::Invalid(vec![format!("{key}: minimum_seconds needs base unit seconds, not {base}")]));
    }
    Ok(Resolved { price, conversion, minimum: price.minimum_seconds })
}

fn add(a: i128, b: i128, key: &LineKey) -> Result<i128> {
    a.checked_add(b).ok_or_else(|| Error::Overflow { context: format!("{key}: usage sum") })
}

#[derive(Default, Clone, Copy)]
struct DayUsage {
    usage: i128,
    uplift: i128,
}

type ResourceDays = BTreeMap<(LineKey, String), BTreeMap<Date, i128>>;
type Series = BTreeMap<(LineKey, String), Vec<(i64, i128)>>;

/// The checked minute series of every minimum-priced (key, resource) of the
/// customers in `usage`, sorted by minute.
fn minute_series<'a>(
    catalog: &Catalog,
    version: &'a crate::book::Version,
    month: YearMonth,
    usage: &[UsageRow],
    minutes: &[MinuteRow],
    resolved: &mut BTreeMap<LineKey, Resolved<'a>>,
    resource_days: &ResourceDays,
) -> Result<Series> {
    let customers: std::collections::BTreeSet<&str> = usage.iter().map(|r| r.customer_id.as_str()).collect();
    let mut series: Series = BTreeMap::new();
    for m in minutes {
        // The daily rows select the customers being rated (e.g. `--customer C`).
        if !customers.contains(m.customer_id.as_str()) {
            continue;
        }
        let key = LineKey {
            customer_id: m.customer_id.clone(),
            service: m.service.clone(),
            usage_type: m.usage_type.clone(),
            region: m.region.clone(),
        };
        if !resolved.contains_key(&key) {
            // Minute rows of keys without daily usage still matter if they are minimum-priced
            // (their in-month minutes must then be empty); others are not needed.
            match resolve(catalog, version, &key) {
                Ok(r) if r.minimum.is_some() => {
                    resolved.insert(key.clone(), r);
                }
                _ => continue,
            }
        }
        if resolved.get(&key).is_some_and(|r| r.minimum.is_some()) {
            series.entry((key, m.resource_id.clone())).or_default().push((m.minute_start, m.quantity));
        }
    }
    for ((key, resource), s) in &mut series {
        let what = || format!("{key}/{resource}");
        s.sort_unstable();
        for w in s.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(Error::BadMinuteSeries { key: what(), reason: format!("minute {} listed twice", w[0].0) });
            }
        }
        for &(t, q) in s.iter() {
            if t.rem_euclid(60_000) != 0 {
                return Err(Error::BadMinuteSeries { key: what(), reason: format!("{t} is not the start of a minute") });
            }
            if q < 0 {
                return Err(Error::NegativeQuantity { key: what(), quantity: q });
            }
        }
    }
    // The minute series must add up to the daily rows, both ways, or runs would bill usage that the days do not show.
    let mut minute_days: ResourceDays = BTreeMap::new();
    for (k, s) in &series {
        let per_day = minute_days.entry(k.clone()).or_default();
        for &(t, q) in s {
            if let Some(day) = Date::from_millis(t).filter(|d| month.contains(*d)) {
                let e = per_day.entry(day).or_insert(0);
                *e = add(*e, q, &k.0)?;
            }
        }
    }
    let empty = BTreeMap::new();
    for k in resource_days.keys().chain(minute_days.keys()) {
        let (daily, mins) = (resource_days.get(k).unwrap_or(&empty), minute_days.get(k).unwrap_or(&empty));
        for day in daily.keys().chain(mins.keys()) {
            let (a, b) = (daily.get(day).copied().unwrap_or(0), mins.get(day).copied().unwrap_or(0));
            if a != b {
                return Err(Error::MinuteMismatch { key: format!("{}/{}", k.0, k.1), day: day.to_string(), daily: a, minutes: b });
            }
        }
    }
    Ok(series)
}

/// What each key of a free pool drew from it, cumulatively through each of
/// its days (pricing units). A customer's pool is drawn on day by day, and
/// within a day in key order (service, usage type, region): the month's
/// earliest usage is free, whichever member it belongs to, and the pool is
/// never drawn beyond its allowance.
fn pool_allocations(
    version: &crate::book::Version,
    month: YearMonth,
    days: &BTreeMap<LineKey, BTreeMap<Date, DayUsage>>,
    resolved: &BTreeMap<LineKey, Resolved<'_>>,
) -> Result<BTreeMap<LineKey, BTreeMap<Date, Decimal>>> {
    let mut out: BTreeMap<LineKey, BTreeMap<Date, Decimal>> = BTreeMap::new();
    if version.free_pools.is_empty() {
        return Ok(out);
    }
    // (customer, pool) -> day -> [(key, quantity that day in pricing units)], keys in order.
    type Draws<'k> = BTreeMap<(&'k str, &'k str), BTreeMap<Date, Vec<(&'k LineKey, Decimal)>>>;
    let mut draws: Draws<'_> = BTreeMap::new();
    for (key, per_day) in days {
        let Some(pool) = version.pool_of(&key.service, &key.usage_type) else { continue };
        let r = resolved.get(key).ok_or_else(|| Error::Internal(format!("{key}: unresolved key")))?;
        let (mut cum, mut prev) = (0i128, Decimal::ZERO);
        for (day, d) in per_day {
            cum = add(cum, d.usage + d.uplift, key)?;
            let q = r.conversion.to_pricing(cum, month)?;
            draws.entry((key.customer_id.as_str(), pool.id.as_str())).or_default().entry(*day).or_default().push((key, q - prev));
            prev = q;
        }
    }
    for ((_, pool_id), per_day) in draws {
        let pool = version.free_pools.iter().find(|p| p.id == pool_id).ok_or_else(|| Error::Internal(format!("pool {pool_id}")))?;
        let mut left = pool.allowance.max(Decimal::ZERO);
        for (day, keys) in per_day {
            for (key, q) in keys {
                let take = q.max(Decimal::ZERO).min(left);
                left -= take;
                let free = out.entry(key.clone()).or_default();
                let before = free.values().next_back().copied().unwrap_or(Decimal::ZERO);
                free.insert(day, before + take);
            }
        }
    }
    Ok(out)
}

/// Rate `month`: `usage` holds the month's daily rows (any number of
/// customers), `minutes` the per-resource minute series of usage types with
/// a per-run minimum (see [`crate::runs::minute_series_range`] for the
/// range to pass). Minute rows of other usage types, and of customers with
/// no daily row, are ignored; for the rest, the in-month minutes must add up
/// to the daily rows per resource and day ([`Error::MinuteMismatch`]).
pub fn rate_month(book: &PriceBook, catalog: &Catalog, month: YearMonth, usage: &[UsageRow], minutes: &[MinuteRow]) -> Result<RatedMonth> {
    let segments = book.versions_for_month(month);
    let version = segments.first().map(|(_, v)| *v).ok_or(Error::NoVersion { month })?;
    let rating_id = book.rating_id(month).ok_or(Error::NoVersion { month })?;
    let mut resolved: BTreeMap<LineKey, Resolved<'_>> = BTreeMap::new();
    let mut days: BTreeMap<LineKey, BTreeMap<Date, DayUsage>> = BTreeMap::new();
    // Daily usage per resource for minimum-priced keys, to check against the minute series.
    let mut resource_days: ResourceDays = BTreeMap::new();

    for row in usage {
        let key = LineKey {
            customer_id: row.customer_id.clone(),
            service: row.service.clone(),
            usage_type: row.usage_type.clone(),
            region: row.region.clone(),
        };
        if !month.contains(row.day) {
            return Err(Error::DayOutsideMonth { key: key.to_string(), day: row.day.to_string(), month });
        }
        if row.quantity < 0 {
            return Err(Error::NegativeQuantity { key: key.to_string(), quantity: row.quantity });
        }
        if !resolved.contains_key(&key) {
            let r = resolve(catalog, version, &key)?;
            resolved.insert(key.clone(), r);
        }
        let has_minimum = resolved.get(&key).is_some_and(|r| r.minimum.is_some());
        let d = days.entry(key.clone()).or_default().entry(row.day).or_default();
        d.usage = add(d.usage, row.quantity, &key)?;
        if has_minimum {
            let e = resource_days.entry((key, row.resource_id.clone())).or_default().entry(row.day).or_insert(0);
            *e = e.checked_add(row.quantity).ok_or_else(|| Error::Overflow { context: "usage sum".into() })?;
        }
    }

    let series = minute_series(catalog, version, month, usage, minutes, &mut resolved, &resource_days)?;
    for ((key, _), s) in &series {
        let Some(minimum) = resolved.get(key).and_then(|r| r.minimum) else { continue };
        for (day, extra) in uplift_by_day(s, minimum, month) {
            // The run's start minute is in this day, so the consistency check guarantees a daily row.
            let d = days.entry(key.clone()).or_default().entry(day).or_default();
            d.uplift = add(d.uplift, extra, key)?;
        }
    }

    let pooled = pool_allocations(version, month, &days, &resolved)?;

    // Prices of the versions that take effect inside the month, per key; a
    // per-run minimum must not change mid-month (runs span the change).
    let mut later: BTreeMap<(LineKey, usize), Resolved<'_>> = BTreeMap::new();
    for (key, r) in &resolved {
        for (i, (_, v)) in segments.iter().enumerate().skip(1) {
            let rl = resolve(catalog, v, key)?;
            if rl.minimum != r.minimum {
                return Err(Error::Invalid(vec![format!(
                    "{key}: version {} changes minimum_seconds mid-month ({:?} to {:?}); start it on the 1st",
                    v.id, r.minimum, rl.minimum
                )]));
            }
            later.insert((key.clone(), i), rl);
        }
    }
    let segment_of = |day: Date| segments.iter().rposition(|(from, _)| *from <= day).unwrap_or(0);

    let month_s = month.to_string();
    let mut out = RatedMonth {
        month,
        version_id: rating_id.clone(),
        currency: book.currency.clone(),
        daily: Vec::new(),
        lines: Vec::new(),
        invoices: Vec::new(),
    };
    for (key, per_day) in &days {
        let first_r = resolved.get(key).ok_or_else(|| Error::Internal(format!("{key}: unresolved key")))?;
        let ids = [month_s.as_str(), rating_id.as_str(), &key.customer_id, &key.service, &key.usage_type, &key.region];
        let (mut cum, mut usage_total, mut uplift_total) = (0i128, 0i128, 0i128);
        let (mut prev_q, mut prev_cost, mut prev_allowance) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
        let mut prev_segment = 0;
        let mut used_segments = std::collections::BTreeSet::new();
        let mut last = None;
        let first_daily = out.daily.len();
        for (day, d) in per_day {
            let segment = segment_of(*day);
            let r = if segment == 0 {
                first_r
            } else {
                later.get(&(key.clone(), segment)).ok_or_else(|| Error::Internal(format!("{key}: unresolved")))?
            };
            usage_total = add(usage_total, d.usage, key)?;
            uplift_total = add(uplift_total, d.uplift, key)?;
            cum = add(cum, d.usage + d.uplift, key)?;
            let q = r.conversion.to_pricing(cum, month)?;
            // A pooled key's allowance is what it drew from the pool through this day.
            let allowance = match pooled.get(key) {
                Some(free) => free.get(day).copied().unwrap_or(Decimal::ZERO),
                None => r.price.free_allowance,
            };
            let priced = model::price(&r.price.model, allowance, q)?;
            // A day priced by another version than the day before costs the
            // change of the month to date at this day's prices.
            if segment != prev_segment {
                let allowance_before = if pooled.contains_key(key) { prev_allowance } else { r.price.free_allowance };
                prev_cost = model::price(&r.price.model, allowance_before, prev_q)?.charge.amount;
                prev_segment = segment;
            }
            used_segments.insert(segment);
            prev_allowance = allowance;
            let day_s = day.to_string();
            out.daily.push(DailyLine {
                line_id: line_id(&[&["daily"], &ids[..], &[day_s.as_str()]].concat()),
                month,
                day: *day,
                key: key.clone(),
                line_type: LineType::Usage,
                usage_quantity: d.usage,
                minimum_uplift: d.uplift,
                pricing_unit: r.price.pricing_unit.clone(),
                quantity: q - prev_q,
                cost: priced.charge.amount - prev_cost,
                version_id: rating_id.clone(),
                price_version_id: segments[segment].1.id.clone(),
                currency: book.currency.clone(),
            });
            prev_q = q;
            prev_cost = priced.charge.amount;
            last = Some(priced);
        }
        let Some(priced) = last else { continue };
        let daily_sum: Decimal = out.daily[first_daily..].iter().map(|l| l.cost).sum();
        // One version: the month's price. Several: the sum of the days, each at its version's prices,
        // and the breakdown is in the daily lines (the tiers of one version would not add up).
        let split = used_segments.len() > 1 || used_segments.iter().any(|s| *s != 0);
        if !split && daily_sum != priced.charge.amount {
            return Err(Error::Internal(format!("{key}: daily costs {daily_sum} do not add up to {}", priced.charge.amount)));
        }
        let (tiers, packages, unit_rate) = if used_segments.len() > 1 {
            (Vec::new(), None, None)
        } else {
            (priced.charge.tiers, priced.charge.packages, priced.charge.unit_rate)
        };
        let r = first_r;
        out.lines.push(InvoiceLine {
            line_id: line_id(&[&["invoice-line"], &ids[..]].concat()),
            month,
            key: key.clone(),
            line_type: LineType::Usage,
            usage_quantity: usage_total,
            minimum_uplift: uplift_total,
            pricing_unit: r.price.pricing_unit.clone(),
            quantity: priced.quantity,
            free_allowance_used: priced.free_allowance_used,
            billable_quantity: priced.billable,
            tiers,
            packages,
            unit_rate,
            amount_full: daily_sum,
            amount: to_minor_unit(daily_sum, book.minor_unit_digits)?,
            version_id: rating_id.clone(),
            currency: book.currency.clone(),
        });
    }
    out.invoices = invoices(&out.lines, month, &rating_id, &book.currency)?;
    Ok(out)
}

/// One invoice per customer of `lines`: the sum of its rounded lines.
pub(crate) fn invoices(lines: &[InvoiceLine], month: YearMonth, version_id: &str, currency: &str) -> Result<Vec<Invoice>> {
    let month_s = month.to_string();
    let mut per_customer: BTreeMap<&str, (Decimal, usize)> = BTreeMap::new();
    for l in lines {
        let e = per_customer.entry(l.key.customer_id.as_str()).or_default();
        e.0 = e.0.checked_add(l.amount).ok_or_else(|| Error::Overflow { context: format!("invoice total of {}", l.key.customer_id) })?;
        e.1 += 1;
    }
    Ok(per_customer
        .into_iter()
        .map(|(c, (total, line_count))| Invoice {
            invoice_id: line_id(&["invoice", &month_s, version_id, c]),
            month,
            customer_id: c.to_owned(),
            total,
            line_count,
            version_id: version_id.to_owned(),
            currency: currency.to_owned(),
        })
        .collect())
}
