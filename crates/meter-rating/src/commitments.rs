//! Reservations and savings plans: usage committed to in advance, covered
//! hour by hour and taken off the list-price usage lines. Pure, run by
//! [`crate::charges::apply`] before fees and credits.
//!
//! Each hour of a customer's month, in this order:
//! 1. **Reservations** (by id): a reservation of N instances of a usage
//!    type in a region covers up to N instance-hours of that usage in the
//!    hour. Reservations go first because they are the most specific
//!    commitment (one usage type, one region), as AWS applies reserved
//!    instances before savings plans.
//! 2. **Savings plans** (by id): what is left of eligible usage is covered
//!    at the plan's rates until the hour's commitment is spent, the usage
//!    with the highest discount (`1 - plan rate / list rate`) first, ties in
//!    key order; the last one covered may be covered in part.
//! 3. What is still left is billed at list price on the usage line.
//!
//! Lines, as the AWS Cost and Usage Report shows them: the usage line keeps
//! the metered usage (`usage_quantity`) but bills only what no commitment
//! covered; `DiscountedUsage:<reservation>` carries the reserved hours used,
//! at no cost; `RIFee:<reservation>` bills every reserved instance-hour of
//! the month, used or not; `SavingsPlanCoveredUsage:<plan>:<usage type>`
//! bills the covered usage at list price and
//! `SavingsPlanNegation:<plan>:<usage type>` takes it off again;
//! `SavingsPlanRecurringFee:<plan>` bills the commitment for every hour of
//! the month, spent or not.
//!
//! Commitments cover usage priced per unit in hours with no free allowance
//! (instance usage); hourly usage comes from `usage_hour` and must add up
//! to the daily rows ([`Error::HourMismatch`]). Seconds added by per-run
//! minimums are not in the hourly usage, so they stay at list price.

use std::collections::BTreeMap;

use meter_model::catalog::Lookup;
use meter_model::Catalog;
use rust_decimal::Decimal;

use crate::book::{PriceBook, Version};
use crate::contracts::{Contracts, Reservation, SavingsPlan};
use crate::date::{Date, YearMonth};
use crate::decimal::{internal, to_minor_unit};
use crate::error::{Error, Result};
use crate::line_id::line_id;
use crate::model::{Model, TierCharge};
use crate::rate::{DailyLine, HourRow, InvoiceLine, LineKey, LineType, RatedMonth};
use crate::units::Conversion;

const HOUR_MS: i64 = 3_600_000;

fn overflow(what: &str) -> Error {
    Error::Overflow { context: what.to_owned() }
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal> {
    a.checked_mul(b).map(internal).ok_or_else(|| overflow("commitment amount"))
}

/// Quantities per line key and day, pricing units.
type PerDay = BTreeMap<LineKey, BTreeMap<Date, Decimal>>;

struct Covered {
    /// reservation id -> key and days
    reserved: BTreeMap<String, (LineKey, BTreeMap<Date, Decimal>)>,
    /// (plan id, key) -> days
    planned: BTreeMap<(String, LineKey), BTreeMap<Date, Decimal>>,
    /// everything covered, per usage key and day
    total: PerDay,
}

/// Covers `rated`'s usage with the contracts' reservations and savings plans
/// (for `customer` alone, or everyone) and adds their lines; invoices are
/// left for the caller to recompute.
pub fn apply(
    rated: &mut RatedMonth,
    contracts: &Contracts,
    book: &PriceBook,
    catalog: &Catalog,
    hours: &[HourRow],
    customer: Option<&str>,
    digits: u32,
) -> Result<()> {
    let month = rated.month;
    let (first, last) = (month.first_day(), month.last_day());
    let selected = |c: &str| customer.is_none_or(|want| want == c);
    let reservations: Vec<&Reservation> =
        contracts.reservations.iter().filter(|r| r.start <= last && r.end > first && selected(&r.customer_id)).collect();
    let plans: Vec<&SavingsPlan> =
        contracts.savings_plans.iter().filter(|p| p.start <= last && p.end > first && selected(&p.customer_id)).collect();
    if reservations.is_empty() && plans.is_empty() {
        return Ok(());
    }
    let versions: Vec<&Version> = book.versions_for_month(month).into_iter().map(|(_, v)| v).collect();
    let list = list_rates(rated, &versions, &reservations, &plans)?;
    let usage = hourly_usage(rated, catalog, hours, &list)?;
    let covered = cover(&usage, &list, &reservations, &plans)?;
    take_off_usage_lines(rated, &covered.total, &list, digits)?;
    add_lines(rated, &covered, &list, &reservations, &plans, digits)
}

/// The list rate of every usage line a commitment may cover: per unit in
/// hours, without a free allowance, and the same in every version pricing
/// the month, or it is refused.
fn list_rates(
    rated: &RatedMonth,
    versions: &[&Version],
    reservations: &[&Reservation],
    plans: &[&SavingsPlan],
) -> Result<BTreeMap<LineKey, Decimal>> {
    let mut out = BTreeMap::new();
    for l in rated.lines.iter().filter(|l| l.line_type == LineType::Usage) {
        let k = &l.key;
        let reserved = reservations
            .iter()
            .any(|r| r.customer_id == k.customer_id && r.service == k.service && r.usage_type == k.usage_type && r.region == k.region);
        let planned = plans.iter().any(|p| p.customer_id == k.customer_id && p.rate_for(&k.service, &k.usage_type, &k.region).is_some());
        if !reserved && !planned {
            continue;
        }
        let mut rates = Vec::new();
        for version in versions {
            let price = version
                .price_for(&k.service, &k.usage_type, &k.region)
                .ok_or_else(|| Error::NoPrice { key: k.to_string(), version: version.id.clone() })?;
            match price.model {
                Model::PerUnit { rate } if price.pricing_unit == "hours" && price.free_allowance.is_zero() => rates.push(rate),
                _ => {
                    return Err(Error::Invalid(vec![format!(
                        "{k}: reservations and savings plans cover usage priced per unit in hours without a free allowance, \
                         and version {} prices it otherwise",
                        version.id
                    )]))
                }
            }
        }
        rates.dedup();
        match rates[..] {
            [rate] => {
                out.insert(k.clone(), rate);
            }
            _ => {
                return Err(Error::Invalid(vec![format!(
                    "{k}: its list price changes inside {}, and reservations and savings plans apply one list price a month",
                    rated.month
                )]))
            }
        }
    }
    Ok(out)
}

/// Hourly usage of the covered keys in pricing units (hours), checked
/// against the daily usage lines.
fn hourly_usage(
    rated: &RatedMonth,
    catalog: &Catalog,
    hours: &[HourRow],
    list: &BTreeMap<LineKey, Decimal>,
) -> Result<BTreeMap<LineKey, BTreeMap<i64, Decimal>>> {
    let month = rated.month;
    let mut seconds: BTreeMap<LineKey, BTreeMap<i64, i128>> = BTreeMap::new();
    for h in hours {
        let key = LineKey {
            customer_id: h.customer_id.clone(),
            service: h.service.clone(),
            usage_type: h.usage_type.clone(),
            region: h.region.clone(),
        };
        if !list.contains_key(&key) || !Date::from_millis(h.hour_start).is_some_and(|d| month.contains(d)) {
            continue;
        }
        if h.hour_start.rem_euclid(HOUR_MS) != 0 || h.quantity < 0 {
            return Err(Error::BadMinuteSeries { key: key.to_string(), reason: format!("hour row at {} of {}", h.hour_start, h.quantity) });
        }
        let e = seconds.entry(key).or_default().entry(h.hour_start).or_insert(0);
        *e = e.checked_add(h.quantity).ok_or_else(|| overflow("hourly usage"))?;
    }
    // The hours must add up to the days, or a commitment could cover usage that is not billed.
    let mut days: BTreeMap<(&LineKey, Date), (i128, i128)> = BTreeMap::new();
    for d in rated.daily.iter().filter(|d| d.line_type == LineType::Usage && list.contains_key(&d.key)) {
        days.entry((&d.key, d.day)).or_default().0 += d.usage_quantity;
    }
    for (k, per_hour) in &seconds {
        for (t, q) in per_hour {
            let day = Date::from_millis(*t).ok_or_else(|| Error::Internal(format!("hour {t}")))?;
            days.entry((k, day)).or_default().1 += q;
        }
    }
    for ((k, day), (daily, hourly)) in &days {
        if daily != hourly {
            return Err(Error::HourMismatch { key: k.to_string(), day: day.to_string(), daily: *daily, hours: *hourly });
        }
    }
    let mut out = BTreeMap::new();
    for (k, per_hour) in seconds {
        let info = match catalog.lookup(&k.service, &k.usage_type) {
            Lookup::Known(info) => info,
            _ => return Err(Error::UnknownUsageType { key: k.to_string() }),
        };
        let conversion = Conversion::find(info.base_unit.as_str(), "hours").ok_or_else(|| Error::UnknownConversion {
            key: k.to_string(),
            base_unit: info.base_unit.as_str().to_owned(),
            pricing_unit: "hours".into(),
        })?;
        let mut h = BTreeMap::new();
        for (t, q) in per_hour {
            h.insert(t, conversion.to_pricing(q, month)?);
        }
        out.insert(k, h);
    }
    Ok(out)
}

fn cover(
    usage: &BTreeMap<LineKey, BTreeMap<i64, Decimal>>,
    list: &BTreeMap<LineKey, Decimal>,
    reservations: &[&Reservation],
    plans: &[&SavingsPlan],
) -> Result<Covered> {
    let mut covered = Covered { reserved: BTreeMap::new(), planned: BTreeMap::new(), total: BTreeMap::new() };
    // hour -> key -> usage left to cover
    let mut by_hour: BTreeMap<i64, BTreeMap<&LineKey, Decimal>> = BTreeMap::new();
    for (k, per_hour) in usage {
        for (t, q) in per_hour {
            by_hour.entry(*t).or_default().insert(k, *q);
        }
    }
    let mut reservations = reservations.to_vec();
    reservations.sort_by(|a, b| a.id.cmp(&b.id));
    let mut plans = plans.to_vec();
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    for (t, left) in &mut by_hour {
        let day = Date::from_millis(*t).ok_or_else(|| Error::Internal(format!("hour {t}")))?;
        for r in reservations.iter().filter(|r| r.start <= day && day < r.end) {
            let key = LineKey {
                customer_id: r.customer_id.clone(),
                service: r.service.clone(),
                usage_type: r.usage_type.clone(),
                region: r.region.clone(),
            };
            let Some(q) = left.get_mut(&key) else { continue };
            let take = (*q).min(Decimal::from(r.count));
            if take > Decimal::ZERO {
                *q -= take;
                *covered.reserved.entry(r.id.clone()).or_insert_with(|| (key.clone(), BTreeMap::new())).1.entry(day).or_default() += take;
                *covered.total.entry(key).or_default().entry(day).or_default() += take;
            }
        }
        for p in plans.iter().filter(|p| p.start <= day && day < p.end) {
            let mut candidates: Vec<(Decimal, &LineKey, Decimal, Decimal)> = Vec::new();
            for (k, q) in left.iter().filter(|(k, q)| k.customer_id == p.customer_id && **q > Decimal::ZERO) {
                let (Some(rate), Some(list_rate)) = (p.rate_for(&k.service, &k.usage_type, &k.region), list.get(*k)) else { continue };
                let discount = if list_rate.is_zero() { Decimal::ZERO } else { Decimal::ONE - rate / *list_rate };
                candidates.push((discount, *k, rate, *q));
            }
            // Highest discount first; ties in key order.
            candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            let mut budget = p.commitment;
            for (_, k, rate, q) in candidates {
                if budget <= Decimal::ZERO {
                    break;
                }
                let cost = mul(q, rate)?;
                let take = if cost <= budget { q } else { internal(budget / rate) };
                budget -= mul(take, rate)?;
                if take > Decimal::ZERO {
                    if let Some(l) = left.get_mut(k) {
                        *l -= take;
                    }
                    *covered.planned.entry((p.id.clone(), k.clone())).or_default().entry(day).or_default() += take;
                    *covered.total.entry(k.clone()).or_default().entry(day).or_default() += take;
                }
            }
        }
    }
    Ok(covered)
}

/// The usage lines bill only what no commitment covered.
fn take_off_usage_lines(rated: &mut RatedMonth, covered: &PerDay, list: &BTreeMap<LineKey, Decimal>, digits: u32) -> Result<()> {
    for d in rated.daily.iter_mut().filter(|d| d.line_type == LineType::Usage) {
        let Some(q) = covered.get(&d.key).and_then(|days| days.get(&d.day)) else { continue };
        let rate = list[&d.key];
        d.quantity -= *q;
        d.cost -= mul(*q, rate)?;
    }
    let mut costs: BTreeMap<LineKey, Decimal> = BTreeMap::new();
    for d in rated.daily.iter().filter(|d| d.line_type == LineType::Usage && covered.contains_key(&d.key)) {
        *costs.entry(d.key.clone()).or_default() += d.cost;
    }
    for l in rated.lines.iter_mut().filter(|l| l.line_type == LineType::Usage) {
        let Some(days) = covered.get(&l.key) else { continue };
        let q: Decimal = days.values().copied().sum();
        let rate = list[&l.key];
        l.quantity -= q;
        l.billable_quantity -= q;
        l.amount_full = costs.get(&l.key).copied().unwrap_or_default();
        l.amount = to_minor_unit(l.amount_full, digits)?;
        l.tiers = if l.billable_quantity.is_zero() {
            Vec::new()
        } else {
            vec![TierCharge { from: Decimal::ZERO, up_to: None, quantity: l.billable_quantity, unit_rate: rate, amount: l.amount_full }]
        };
    }
    Ok(())
}

struct LineMaker<'a> {
    month: YearMonth,
    month_s: String,
    version_id: &'a str,
    currency: &'a str,
    digits: u32,
}

impl LineMaker<'_> {
    /// Daily lines of `(day, quantity, cost)` and their invoice line.
    fn lines(
        &self,
        key: LineKey,
        line_type: LineType,
        pricing_unit: &str,
        unit_rate: Option<Decimal>,
        days: &[(Date, Decimal, Decimal)],
    ) -> Result<(Vec<DailyLine>, InvoiceLine)> {
        let ids = [self.month_s.as_str(), self.version_id, &key.customer_id, &key.service, &key.usage_type, &key.region];
        let mut daily = Vec::new();
        let (mut quantity, mut amount) = (Decimal::ZERO, Decimal::ZERO);
        for (day, q, cost) in days {
            let day_s = day.to_string();
            daily.push(DailyLine {
                line_id: line_id(&[&["daily"], &ids[..], &[day_s.as_str()]].concat()),
                month: self.month,
                day: *day,
                key: key.clone(),
                line_type,
                usage_quantity: 0,
                minimum_uplift: 0,
                pricing_unit: pricing_unit.to_owned(),
                quantity: *q,
                cost: *cost,
                version_id: self.version_id.to_owned(),
                price_version_id: String::new(),
                currency: self.currency.to_owned(),
            });
            quantity += q;
            amount += cost;
        }
        let tiers = match unit_rate {
            Some(rate) if !quantity.is_zero() => vec![TierCharge { from: Decimal::ZERO, up_to: None, quantity, unit_rate: rate, amount }],
            _ => Vec::new(),
        };
        let line = InvoiceLine {
            line_id: line_id(&[&["invoice-line"], &ids[..]].concat()),
            month: self.month,
            key,
            line_type,
            usage_quantity: 0,
            minimum_uplift: 0,
            pricing_unit: pricing_unit.to_owned(),
            quantity,
            free_allowance_used: Decimal::ZERO,
            billable_quantity: quantity,
            tiers,
            packages: None,
            unit_rate,
            amount_full: amount,
            amount: to_minor_unit(amount, self.digits)?,
            version_id: self.version_id.to_owned(),
            currency: self.currency.to_owned(),
        };
        Ok((daily, line))
    }
}

fn add_lines(
    rated: &mut RatedMonth,
    covered: &Covered,
    list: &BTreeMap<LineKey, Decimal>,
    reservations: &[&Reservation],
    plans: &[&SavingsPlan],
    digits: u32,
) -> Result<()> {
    let month = rated.month;
    let version_id = rated.version_id.clone();
    let currency = rated.currency.clone();
    let maker = LineMaker { month, month_s: month.to_string(), version_id: &version_id, currency: &currency, digits };
    let mut out: Vec<(Vec<DailyLine>, InvoiceLine)> = Vec::new();
    let hours_per_day = Decimal::from(24);
    for r in reservations {
        let key = |kind: &str| LineKey {
            customer_id: r.customer_id.clone(),
            service: r.service.clone(),
            usage_type: format!("{kind}:{}", r.id),
            region: r.region.clone(),
        };
        if let Some((_, days)) = covered.reserved.get(&r.id) {
            let days: Vec<(Date, Decimal, Decimal)> = days.iter().map(|(d, q)| (*d, *q, Decimal::ZERO)).collect();
            out.push(maker.lines(key("DiscountedUsage"), LineType::DiscountedUsage, "hours", Some(Decimal::ZERO), &days)?);
        }
        let reserved = mul(Decimal::from(r.count), hours_per_day)?;
        let days: Vec<(Date, Decimal, Decimal)> = month
            .iter_days()
            .filter(|d| r.start <= *d && *d < r.end)
            .map(|d| Ok((d, reserved, mul(reserved, r.hourly_rate)?)))
            .collect::<Result<_>>()?;
        out.push(maker.lines(key("RIFee"), LineType::RIFee, "hours", Some(r.hourly_rate), &days)?);
    }
    for ((plan_id, k), days) in &covered.planned {
        let rate = list[k];
        let key = |kind: &str| LineKey {
            customer_id: k.customer_id.clone(),
            service: k.service.clone(),
            usage_type: format!("{kind}:{plan_id}:{}", k.usage_type),
            region: k.region.clone(),
        };
        let at_list: Vec<(Date, Decimal, Decimal)> = days.iter().map(|(d, q)| Ok((*d, *q, mul(*q, rate)?))).collect::<Result<_>>()?;
        let negated: Vec<(Date, Decimal, Decimal)> = at_list.iter().map(|(d, q, c)| (*d, *q, -*c)).collect();
        out.push(maker.lines(key("SavingsPlanCoveredUsage"), LineType::SavingsPlanCoveredUsage, "hours", Some(rate), &at_list)?);
        out.push(maker.lines(key("SavingsPlanNegation"), LineType::SavingsPlanNegation, "hours", Some(-rate), &negated)?);
    }
    for p in plans {
        let key = LineKey {
            customer_id: p.customer_id.clone(),
            service: "savings-plans".to_owned(),
            usage_type: format!("SavingsPlanRecurringFee:{}", p.id),
            region: String::new(),
        };
        let days: Vec<(Date, Decimal, Decimal)> = month
            .iter_days()
            .filter(|d| p.start <= *d && *d < p.end)
            .map(|d| Ok((d, hours_per_day, mul(hours_per_day, p.commitment)?)))
            .collect::<Result<_>>()?;
        out.push(maker.lines(key, LineType::SavingsPlanRecurringFee, "hours", Some(p.commitment), &days)?);
    }
    for (mut daily, line) in out {
        rated.daily.append(&mut daily);
        rated.lines.push(line);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charges::{Inputs, PriorUse};
    use crate::fixture::{hour_rows, Scenario};
    use crate::{rate_month, PriceBook};

    const RUNS: &str = r#"
[[run]]
customer_id = "c"
service = "compute"
usage_type = "BoxUsage:m5.large"
region = "us-east-1"
resource_id = "i-1"
start = 2026-05-03T10:00:00Z
seconds = "1 * hour"
repeat = 5
every_minutes = 0
"#;

    const CONTRACTS: &str = r#"
[[reservation]]
id = "ri"
customer_id = "c"
service = "compute"
usage_type = "BoxUsage:m5.large"
region = "us-east-1"
count = 2
hourly_rate = "0.06"
start = 2026-05-01
end = 2026-06-01

[[savings_plan]]
id = "sp"
customer_id = "c"
commitment = "0.12"
start = 2026-05-01
end = 2026-06-01
rates = [{ service = "compute", usage_type = "BoxUsage:m5.large", rate = "0.06" }]
"#;

    fn bill(contracts: &str, drop_hours: bool) -> Result<RatedMonth> {
        let book = PriceBook::sample()?;
        let catalog = Catalog::builtin();
        let month: YearMonth = "2026-05".parse().map_err(|_| Error::Internal("month".into()))?;
        let (rows, minutes) = Scenario::parse(RUNS)?.usage(month)?;
        let mut rated = rate_month(&book, &catalog, month, &rows, &minutes)?;
        let hours = if drop_hours { Vec::new() } else { hour_rows(&minutes) };
        let inputs =
            Inputs { prior: &PriorUse::new(), hours: &hours, book: &book, catalog: &catalog, customer: None, minor_unit_digits: 2 };
        crate::charges::apply(&mut rated, &Contracts::parse(contracts)?, &inputs)?;
        Ok(rated)
    }

    fn line<'a>(rated: &'a RatedMonth, usage_type: &str) -> &'a InvoiceLine {
        rated.lines.iter().find(|l| l.key.usage_type == usage_type).unwrap_or_else(|| panic!("no {usage_type} line"))
    }

    #[test]
    fn a_reservation_covers_first_then_the_savings_plan_then_list_price() {
        // 5 instance-hours in one hour: 2 reserved, 2 at the plan's rate ($0.12 / $0.06), 1 at list.
        let rated = bill(CONTRACTS, false).unwrap_or_else(|e| panic!("{e}"));
        let d = |s: &str| s.parse::<Decimal>().unwrap_or_default();
        let usage = line(&rated, "BoxUsage:m5.large");
        assert_eq!((usage.usage_quantity, usage.quantity, usage.amount_full), (5 * 3600, d("1"), d("0.096")));
        assert_eq!(line(&rated, "DiscountedUsage:ri").quantity, d("2"));
        assert_eq!(line(&rated, "RIFee:ri").amount_full, d("2") * d("744") * d("0.06"));
        assert_eq!(line(&rated, "SavingsPlanCoveredUsage:sp:BoxUsage:m5.large").amount_full, d("0.192"));
        assert_eq!(line(&rated, "SavingsPlanNegation:sp:BoxUsage:m5.large").amount_full, d("-0.192"));
        assert_eq!(line(&rated, "SavingsPlanRecurringFee:sp").amount_full, d("0.12") * d("744"));
        let total: Decimal = rated.lines.iter().map(|l| l.amount_full).sum();
        assert_eq!(total, d("0.096") + d("89.28") + d("89.28"));
    }

    #[test]
    fn hourly_usage_that_does_not_add_up_to_the_days_is_refused() {
        match bill(CONTRACTS, true) {
            Err(Error::HourMismatch { daily, hours, .. }) => assert_eq!((daily, hours), (5 * 3600, 0)),
            other => panic!("must be refused, got {other:?}"),
        }
    }

    #[test]
    fn a_regional_plan_rate_covers_and_a_reservation_of_no_instances_is_refused() {
        let text = CONTRACTS.replace(
            "rates = [{ service = \"compute\", usage_type = \"BoxUsage:m5.large\"",
            "rates = [{ service = \"compute\", usage_type = \"BoxUsage:m5.large\" , region = \"us-east-1\"",
        );
        assert!(bill(&text, false).is_ok(), "a region's own rate is a rate");
        let Err(Error::Invalid(_)) = Contracts::parse(&CONTRACTS.replace("count = 2", "count = 0")) else { panic!("count 0 accepted") };
    }
}
