//! What contracts charge on top of rated usage: commitments, subscription
//! fees, then credits. Pure, like [`crate::rate`]: same input, same lines.
//!
//! Order, and why: usage is priced first at list prices
//! ([`crate::rate_month`]); reservations and savings plans then cover what
//! they cover hour by hour ([`crate::commitments`]); fees come next,
//! because a percentage-of-usage fee is a function of the usage charges
//! (list-price usage and commitments, never other fees or credits); credits
//! come last and pay usage, commitments and fees alike, so that "after
//! discounts" holds.
//!
//! Fees ([`Fee`]), per (customer, plan) and month, one daily line per
//! subscribed day and one invoice line `Fee:<plan>` under the plan's
//! service:
//! - flat: the month-to-date fee after the k-th subscribed day is `monthly
//!   × k / days in month`, so a subscription that starts or ends mid-month
//!   pays for its days, and a whole month pays exactly `monthly`;
//! - percent of usage: the month-to-date fee is the graduated percentage of
//!   the usage charges of the subscribed days so far (full precision), but at least the minimum ×
//!   subscribed days / days in month. Each day carries the change, so the
//!   first day carries the (prorated) minimum.
//!
//! Credits ([`Credit`]), per customer: oldest-expiring first (then earliest
//! start, then id); each pays the charges of its services on the days it is
//! valid, earliest day first, up to its balance (its amount less what
//! earlier months used, which the caller reads from the credit ledger).
//! A credit never takes a service's month-to-date charges below zero (under
//! volume tiers a day's cost can be negative), so no invoice line of a
//! service goes negative through credits. Each (credit, service) is an
//! invoice line `Credit:<id>` with a negative amount; the lines of one
//! credit are rounded so that they add up to its use rounded to the cent,
//! which is what its ledger entry records.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::Serialize;

use meter_model::Catalog;

use crate::book::PriceBook;
use crate::contracts::{Contracts, Credit, Fee};
use crate::date::{Date, YearMonth};
use crate::decimal::{internal, to_minor_unit};
use crate::error::{Error, Result};
use crate::line_id::line_id;
use crate::model::Model;
use crate::rate::{invoices, DailyLine, HourRow, InvoiceLine, LineKey, LineType, RatedMonth};

/// Credit used in months before the one being rated, by credit id.
pub type PriorUse = BTreeMap<String, Decimal>;

/// A credit's account for one month (a `credit_ledger` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditBalance {
    pub month: YearMonth,
    pub credit_id: String,
    pub customer_id: String,
    /// The amount granted.
    pub amount: Decimal,
    pub start: Date,
    pub expires: Date,
    /// Left at the start of the month: `amount` less earlier months' use.
    pub opening: Decimal,
    /// Applied to this month's charges, rounded to the currency: the sum of
    /// its invoice lines, negated.
    pub used: Decimal,
    /// Lost this month because the credit expires by the month's end.
    pub expired: Decimal,
    /// Carried to the next month: `opening - used - expired`.
    pub remaining: Decimal,
}

fn overflow(what: &str) -> Error {
    Error::Overflow { context: what.to_owned() }
}

/// `a × k / n` at the internal scale.
fn prorate(a: Decimal, k: usize, n: u32) -> Result<Decimal> {
    let k = Decimal::from(k as u64);
    a.checked_mul(k).and_then(|x| x.checked_div(Decimal::from(n))).map(internal).ok_or_else(|| overflow("prorated fee"))
}

fn ids<'a>(kind: &'a str, month: &'a str, version: &'a str, key: &'a LineKey) -> [&'a str; 7] {
    [kind, month, version, &key.customer_id, &key.service, &key.usage_type, &key.region]
}

/// What billing contracts needs besides the rated month.
pub struct Inputs<'a> {
    /// Credit used in earlier months (from the credit ledger).
    pub prior: &'a PriorUse,
    /// Hourly usage of the usage types reservations and savings plans cover
    /// ([`Contracts::committed_usage_types`]); may hold more.
    pub hours: &'a [HourRow],
    /// The price book that rated the month.
    pub book: &'a PriceBook,
    pub catalog: &'a Catalog,
    /// Only this customer's contracts (as the month was rated), or everyone's.
    pub customer: Option<&'a str>,
    pub minor_unit_digits: u32,
}

/// Adds the commitment, fee and credit lines of `contracts` to `rated`,
/// recomputes the invoices, and returns the credit ledger of the month.
pub fn apply(rated: &mut RatedMonth, contracts: &Contracts, inputs: &Inputs<'_>) -> Result<Vec<CreditBalance>> {
    let (prior, customer, minor_unit_digits) = (inputs.prior, inputs.customer, inputs.minor_unit_digits);
    crate::commitments::apply(rated, contracts, inputs.book, inputs.catalog, inputs.hours, customer, minor_unit_digits)?;
    let month = rated.month;
    let month_s = month.to_string();
    let selected = |c: &str| customer.is_none_or(|want| want == c);

    // Usage charges per customer and day: what percentages of usage apply to.
    let mut usage_cost: BTreeMap<(&str, Date), Decimal> = BTreeMap::new();
    for d in rated.daily.iter().filter(|d| !matches!(d.line_type, LineType::Fee | LineType::Credit | LineType::Adjustment)) {
        let e = usage_cost.entry((d.key.customer_id.as_str(), d.day)).or_default();
        *e = e.checked_add(d.cost).ok_or_else(|| overflow("usage charges"))?;
    }

    let mut daily = Vec::new();
    let mut lines = Vec::new();
    for ((cust, plan_id), days) in contracts.subscribed_days(month) {
        if !selected(&cust) {
            continue;
        }
        let plan = contracts.plan(&plan_id).ok_or_else(|| Error::Internal(format!("subscription to unknown plan {plan_id}")))?;
        let key = LineKey {
            customer_id: cust.clone(),
            service: plan.service.clone(),
            usage_type: format!("Fee:{}", plan.id),
            region: String::new(),
        };
        let n = month.days();
        let (mut prev_fee, mut prev_q) = (Decimal::ZERO, Decimal::ZERO);
        let mut base = Decimal::ZERO;
        let mut tiers = Vec::new();
        let minimum = match &plan.fee {
            Fee::PercentOfUsage { minimum, .. } => prorate(*minimum, days.len(), n)?,
            Fee::Flat { .. } => Decimal::ZERO,
        };
        for (k, day) in days.iter().enumerate() {
            let (fee, q) = match &plan.fee {
                Fee::Flat { monthly } => {
                    let q = prorate(Decimal::ONE, k + 1, n)?;
                    (prorate(*monthly, k + 1, n)?, q)
                }
                Fee::PercentOfUsage { tiers: t, .. } => {
                    base += usage_cost.get(&(cust.as_str(), *day)).copied().unwrap_or(Decimal::ZERO);
                    let charge = Model::Graduated { tiers: t.clone() }.charge(base.max(Decimal::ZERO))?;
                    tiers = charge.tiers;
                    (charge.amount.max(minimum), base)
                }
            };
            let day_s = day.to_string();
            daily.push(DailyLine {
                line_id: line_id(&[&ids("daily", &month_s, &rated.version_id, &key)[..], &[day_s.as_str()]].concat()),
                month,
                day: *day,
                key: key.clone(),
                line_type: LineType::Fee,
                usage_quantity: 1,
                minimum_uplift: 0,
                pricing_unit: fee_unit(&plan.fee, &rated.currency),
                quantity: q - prev_q,
                cost: fee - prev_fee,
                version_id: rated.version_id.clone(),
                price_version_id: String::new(),
                currency: rated.currency.clone(),
            });
            (prev_fee, prev_q) = (fee, q);
        }
        let unit_rate = match &plan.fee {
            Fee::Flat { monthly } => Some(*monthly),
            Fee::PercentOfUsage { .. } => None,
        };
        lines.push(InvoiceLine {
            line_id: line_id(&ids("invoice-line", &month_s, &rated.version_id, &key)),
            month,
            key,
            line_type: LineType::Fee,
            usage_quantity: days.len() as i128,
            minimum_uplift: 0,
            pricing_unit: fee_unit(&plan.fee, &rated.currency),
            quantity: prev_q,
            free_allowance_used: Decimal::ZERO,
            billable_quantity: prev_q,
            tiers,
            packages: None,
            unit_rate,
            amount_full: prev_fee,
            amount: to_minor_unit(prev_fee, minor_unit_digits)?,
            version_id: rated.version_id.clone(),
            currency: rated.currency.clone(),
        });
    }
    rated.daily.append(&mut daily);
    rated.lines.append(&mut lines);

    let ledger = apply_credits(rated, contracts, prior, &selected, minor_unit_digits)?;

    rated.daily.sort_by(|a, b| (&a.key, a.day).cmp(&(&b.key, b.day)));
    rated.lines.sort_by(|a, b| a.key.cmp(&b.key));
    rated.invoices = invoices(&rated.lines, month, &rated.version_id, &rated.currency)?;
    Ok(ledger)
}

fn fee_unit(fee: &Fee, currency: &str) -> String {
    match fee {
        Fee::Flat { .. } => "months".to_owned(),
        Fee::PercentOfUsage { .. } => currency.to_owned(),
    }
}

/// Charges of one customer per service and day (usage and fees), and what
/// credits took of them so far.
struct Ledger {
    charged: BTreeMap<String, BTreeMap<Date, Decimal>>,
    credited: BTreeMap<String, BTreeMap<Date, Decimal>>,
}

impl Ledger {
    /// The most a credit may take from `service` on `day`: the least, over
    /// `day` and every later day, of month-to-date charges less credits.
    fn slack(&self, service: &str, day: Date) -> Decimal {
        let empty = BTreeMap::new();
        let charged = self.charged.get(service).unwrap_or(&empty);
        let credited = self.credited.get(service).unwrap_or(&empty);
        let days: BTreeSet<Date> = charged.keys().chain(credited.keys()).copied().collect();
        let (mut c, mut a) = (Decimal::ZERO, Decimal::ZERO);
        let mut least: Option<Decimal> = None;
        for d in days {
            c += charged.get(&d).copied().unwrap_or_default();
            a += credited.get(&d).copied().unwrap_or_default();
            if d >= day {
                least = Some(least.map_or(c - a, |l: Decimal| l.min(c - a)));
            }
        }
        least.unwrap_or(Decimal::ZERO).max(Decimal::ZERO)
    }
}

fn credit_order(a: &&Credit, b: &&Credit) -> std::cmp::Ordering {
    (a.expires, a.start, &a.id).cmp(&(b.expires, b.start, &b.id))
}

fn apply_credits(
    rated: &mut RatedMonth,
    contracts: &Contracts,
    prior: &PriorUse,
    selected: &dyn Fn(&str) -> bool,
    digits: u32,
) -> Result<Vec<CreditBalance>> {
    let month = rated.month;
    let month_s = month.to_string();
    let mut by_customer: BTreeMap<&str, Vec<&Credit>> = BTreeMap::new();
    for c in contracts.credits.iter().filter(|c| c.overlaps(month) && selected(&c.customer_id)) {
        by_customer.entry(c.customer_id.as_str()).or_default().push(c);
    }
    let mut out = Vec::new();
    let mut daily = Vec::new();
    let mut lines = Vec::new();
    // Charges per customer with credits, service and day: one pass over the daily lines.
    type Charged = BTreeMap<String, BTreeMap<Date, Decimal>>;
    let mut charged: BTreeMap<&str, Charged> = by_customer.keys().map(|c| (*c, Charged::new())).collect();
    for d in &rated.daily {
        if let Some(per_service) = charged.get_mut(d.key.customer_id.as_str()) {
            let e = per_service.entry(d.key.service.clone()).or_default().entry(d.day).or_default();
            *e = e.checked_add(d.cost).ok_or_else(|| overflow("charges"))?;
        }
    }
    for (cust, mut credits) in by_customer {
        credits.sort_by(credit_order);
        let mut ledger = Ledger { charged: charged.remove(cust).unwrap_or_default(), credited: BTreeMap::new() };
        let services: Vec<String> = ledger.charged.keys().cloned().collect();
        for credit in credits {
            let opening = (credit.amount - prior.get(&credit.id).copied().unwrap_or_default()).max(Decimal::ZERO);
            let mut balance = opening;
            // service -> day -> amount taken
            let mut taken: BTreeMap<&str, BTreeMap<Date, Decimal>> = BTreeMap::new();
            for day in month.iter_days() {
                for s in &services {
                    if balance <= Decimal::ZERO || !credit.pays(s, day) {
                        continue;
                    }
                    let take = balance.min(ledger.slack(s, day));
                    if take > Decimal::ZERO {
                        balance -= take;
                        *ledger.credited.entry(s.clone()).or_default().entry(day).or_default() += take;
                        *taken.entry(s.as_str()).or_default().entry(day).or_default() += take;
                    }
                }
            }
            let total: Decimal = taken.values().flat_map(|d| d.values()).copied().sum();
            let used = to_minor_unit(total, digits)?;
            let mut credit_lines = Vec::new();
            for (service, days) in &taken {
                let key = LineKey {
                    customer_id: cust.to_owned(),
                    service: (*service).to_owned(),
                    usage_type: format!("Credit:{}", credit.id),
                    region: String::new(),
                };
                for (day, amount) in days {
                    let day_s = day.to_string();
                    daily.push(DailyLine {
                        line_id: line_id(&[&ids("daily", &month_s, &rated.version_id, &key)[..], &[day_s.as_str()]].concat()),
                        month,
                        day: *day,
                        key: key.clone(),
                        line_type: LineType::Credit,
                        usage_quantity: 0,
                        minimum_uplift: 0,
                        pricing_unit: rated.currency.clone(),
                        quantity: *amount,
                        cost: -*amount,
                        version_id: rated.version_id.clone(),
                        price_version_id: String::new(),
                        currency: rated.currency.clone(),
                    });
                }
                let sum: Decimal = days.values().copied().sum();
                credit_lines.push(InvoiceLine {
                    line_id: line_id(&ids("invoice-line", &month_s, &rated.version_id, &key)),
                    month,
                    key,
                    line_type: LineType::Credit,
                    usage_quantity: 0,
                    minimum_uplift: 0,
                    pricing_unit: rated.currency.clone(),
                    quantity: sum,
                    free_allowance_used: Decimal::ZERO,
                    billable_quantity: sum,
                    tiers: Vec::new(),
                    packages: None,
                    unit_rate: None,
                    amount_full: -sum,
                    amount: to_minor_unit(-sum, digits)?,
                    version_id: rated.version_id.clone(),
                    currency: rated.currency.clone(),
                });
            }
            // Rounded lines add up to the rounded use: the largest line takes the difference.
            let rounded: Decimal = credit_lines.iter().map(|l| l.amount).sum();
            let diff = -used - rounded;
            if !diff.is_zero() {
                let largest = credit_lines.iter_mut().max_by(|a, b| a.amount_full.abs().cmp(&b.amount_full.abs()));
                let l = largest.ok_or_else(|| Error::Internal(format!("credit {}: rounding without lines", credit.id)))?;
                l.amount = to_minor_unit(l.amount + diff, digits)?;
            }
            lines.extend(credit_lines);
            let left = opening - used;
            let expired = if credit.expires.start_millis() <= month.end_millis() { left } else { Decimal::ZERO };
            out.push(CreditBalance {
                month,
                credit_id: credit.id.clone(),
                customer_id: cust.to_owned(),
                amount: credit.amount,
                start: credit.start,
                expires: credit.expires,
                opening,
                used,
                expired,
                remaining: left - expired,
            });
        }
    }
    rated.daily.append(&mut daily);
    rated.lines.append(&mut lines);
    out.sort_by(|a, b| (&a.customer_id, &a.credit_id).cmp(&(&b.customer_id, &b.credit_id)));
    Ok(out)
}
