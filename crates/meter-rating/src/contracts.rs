//! Customer contracts: subscription plans, who subscribes to them,
//! reservations and savings plans (commitments), and credits granted to
//! customers. Parsed from a TOML file
//! (`rating.contracts`; the sample is `schemas/contracts.toml`).
//!
//! [`Contracts::parse`] checks everything the file says about itself and
//! reports every problem at once, as [`crate::PriceBook::parse`] does.
//! What contracts charge is [`crate::charges`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::date::{Date, YearMonth};
use crate::decimal::Dec;
use crate::error::{Error, Result};
use crate::model::Tier;

/// The sample contracts shipped with this build, `schemas/contracts.toml`.
pub const SAMPLE_CONTRACTS: &str = include_str!("../../../schemas/contracts.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContracts {
    #[serde(default, rename = "plan")]
    plans: Vec<RawPlan>,
    #[serde(default, rename = "subscription")]
    subscriptions: Vec<RawSubscription>,
    #[serde(default, rename = "credit")]
    credits: Vec<RawCredit>,
    #[serde(default, rename = "reservation")]
    reservations: Vec<RawReservation>,
    #[serde(default, rename = "savings_plan")]
    savings_plans: Vec<RawSavingsPlan>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    /// Stable identifier; its lines are usage types `DiscountedUsage:<id>` and `RIFee:<id>`.
    id: String,
    customer_id: String,
    /// The usage reserved: one usage type in one region, priced per unit in hours.
    service: String,
    usage_type: String,
    region: String,
    /// Instances reserved: each hour covers up to this many instance-hours.
    count: u32,
    /// Price of one reserved instance-hour, billed whether used or not.
    hourly_rate: Dec,
    /// First day reserved.
    start: Date,
    /// First day no longer reserved (exclusive).
    end: Date,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSavingsPlan {
    /// Stable identifier; its lines are usage types `SavingsPlanCoveredUsage:<id>:<usage type>`,
    /// `SavingsPlanNegation:<id>:<usage type>` and `SavingsPlanRecurringFee:<id>`.
    id: String,
    customer_id: String,
    /// Dollars an hour spent at savings-plan rates, billed whether used or not.
    commitment: Dec,
    start: Date,
    /// Exclusive.
    end: Date,
    /// The eligible usage types and their rates per pricing unit (hours):
    /// `{ service = "compute", usage_type = "BoxUsage:m5.large", rate = "0.060" }`,
    /// with an optional `region` (omitted: every region).
    rates: Vec<RawPlanRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlanRate {
    service: String,
    usage_type: String,
    #[serde(default)]
    region: Option<String>,
    rate: Dec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    /// Stable identifier; the fee's invoice line is usage type `Fee:<id>`.
    id: String,
    /// The service the fee is billed under, e.g. "support".
    service: String,
    /// `flat` (a monthly fee) or `percent_of_usage` (tiers of the month's usage charges).
    fee: FeeKind,
    /// flat: the fee for a whole month, prorated by day.
    #[serde(default)]
    monthly: Option<Dec>,
    /// percent_of_usage: tiers over the usage charges, `{ up_to = 10000, percent = "10" }`,
    /// ascending, the last without `up_to`; each tier's percent applies to the part inside it.
    #[serde(default)]
    tiers: Option<Vec<RawPercentTier>>,
    /// percent_of_usage: the least the fee is for a whole month, prorated by day.
    #[serde(default)]
    minimum: Option<Dec>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FeeKind {
    Flat,
    PercentOfUsage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPercentTier {
    #[serde(default)]
    up_to: Option<Dec>,
    percent: Dec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    customer_id: String,
    plan: String,
    /// First day subscribed (UTC).
    start: Date,
    /// First day no longer subscribed (exclusive); omitted: open-ended.
    #[serde(default)]
    end: Option<Date>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredit {
    /// Stable identifier; its invoice lines are usage type `Credit:<id>`.
    id: String,
    customer_id: String,
    /// The credit's value in the price book's currency.
    amount: Dec,
    /// Services whose charges it may pay; empty or omitted: every service.
    #[serde(default)]
    services: Vec<String>,
    /// First day whose charges it may pay.
    start: Date,
    /// First day whose charges it may no longer pay (exclusive).
    expires: Date,
    #[serde(default)]
    description: String,
}

/// What a plan charges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "fee", rename_all = "snake_case")]
pub enum Fee {
    /// A fixed fee per month, prorated by the days subscribed.
    Flat { monthly: Decimal },
    /// Graduated percentages of the month's usage charges (tier bounds in
    /// currency, rates as fractions: 10 % is 0.1), at least `minimum` for a
    /// whole month (prorated by the days subscribed).
    PercentOfUsage { tiers: Vec<Tier>, minimum: Decimal },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub id: String,
    pub service: String,
    pub fee: Fee,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub customer_id: String,
    pub plan: String,
    pub start: Date,
    /// Exclusive.
    pub end: Option<Date>,
}

impl Subscription {
    /// Whether `day` is subscribed.
    pub fn covers(&self, day: Date) -> bool {
        self.start <= day && self.end.is_none_or(|e| day < e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credit {
    pub id: String,
    pub customer_id: String,
    pub amount: Decimal,
    /// Empty: every service.
    pub services: Vec<String>,
    pub start: Date,
    /// Exclusive.
    pub expires: Date,
    pub description: String,
}

impl Credit {
    /// Whether the credit may pay a charge of `service` on `day`.
    pub fn pays(&self, service: &str, day: Date) -> bool {
        self.start <= day && day < self.expires && (self.services.is_empty() || self.services.iter().any(|s| s == service))
    }

    /// Whether any day of `month` is inside the credit's validity.
    pub fn overlaps(&self, month: YearMonth) -> bool {
        self.start <= month.last_day() && self.expires > month.first_day()
    }
}

/// N instances of one usage type in one region, reserved at an hourly rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub id: String,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub count: u32,
    pub hourly_rate: Decimal,
    pub start: Date,
    /// Exclusive.
    pub end: Date,
}

/// An hourly spend commitment at discounted rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SavingsPlan {
    pub id: String,
    pub customer_id: String,
    pub commitment: Decimal,
    pub start: Date,
    /// Exclusive.
    pub end: Date,
    /// (service, usage_type, region or None for every region, rate).
    pub rates: Vec<(String, String, Option<String>, Decimal)>,
}

impl SavingsPlan {
    /// The plan's rate for usage of (service, usage_type) in `region`: the
    /// region's own entry, else the region-less one.
    pub fn rate_for(&self, service: &str, usage_type: &str, region: &str) -> Option<Decimal> {
        let mut default = None;
        for (s, u, r, rate) in &self.rates {
            if s == service && u == usage_type {
                match r.as_deref() {
                    Some(r) if r == region => return Some(*rate),
                    None => default = Some(*rate),
                    Some(_) => {}
                }
            }
        }
        default
    }
}

/// Parsed, self-consistent contracts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Contracts {
    pub plans: Vec<Plan>,
    pub subscriptions: Vec<Subscription>,
    pub credits: Vec<Credit>,
    pub reservations: Vec<Reservation>,
    pub savings_plans: Vec<SavingsPlan>,
}

impl Contracts {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// The sample, `schemas/contracts.toml`.
    pub fn sample() -> Result<Self> {
        Self::parse(SAMPLE_CONTRACTS)
    }

    /// Parse and check: unique plan and credit ids, every subscription of a
    /// known plan and ending after it starts, no two subscriptions of one
    /// customer to one plan overlapping, positive credits with a
    /// currency-sized amount and an expiry after the start. Every problem is
    /// reported in one [`Error::Invalid`].
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawContracts = toml::from_str(text).map_err(|e| Error::Invalid(vec![format!("contracts: {e}")]))?;
        let mut problems = Vec::new();
        let mut plans = Vec::new();
        let mut ids = HashSet::new();
        for p in raw.plans {
            let where_ = format!("plan {:?}", p.id);
            if p.id.trim().is_empty() || p.service.trim().is_empty() {
                problems.push(format!("{where_}: id and service must not be empty"));
            }
            if !ids.insert(p.id.clone()) {
                problems.push(format!("{where_}: defined twice"));
            }
            let negative = |d: &Option<Dec>| d.is_some_and(|d| d.0.is_sign_negative() && !d.0.is_zero());
            if negative(&p.monthly) || negative(&p.minimum) {
                problems.push(format!("{where_}: a fee is negative"));
            }
            let fee = match p.fee {
                FeeKind::Flat => {
                    if p.tiers.is_some() || p.minimum.is_some() {
                        problems.push(format!("{where_}: tiers and minimum are for percent_of_usage"));
                    }
                    match p.monthly {
                        Some(m) => Fee::Flat { monthly: m.0 },
                        None => {
                            problems.push(format!("{where_}: monthly is required for a flat fee"));
                            Fee::Flat { monthly: Decimal::ZERO }
                        }
                    }
                }
                FeeKind::PercentOfUsage => {
                    if p.monthly.is_some() {
                        problems.push(format!("{where_}: monthly is for a flat fee"));
                    }
                    let raw = p.tiers.unwrap_or_default();
                    if raw.is_empty() {
                        problems.push(format!("{where_}: tiers is required for percent_of_usage"));
                    }
                    let n = raw.len();
                    let mut prev = Decimal::ZERO;
                    let mut tiers = Vec::new();
                    for (i, t) in raw.into_iter().enumerate() {
                        match (t.up_to, i + 1 == n) {
                            (None, false) => problems.push(format!("{where_}: tier {} has no up_to but is not the last", i + 1)),
                            (Some(_), true) => problems.push(format!("{where_}: the last tier must be open-ended (no up_to)")),
                            _ => {}
                        }
                        if let Some(up) = t.up_to.filter(|up| up.0 <= prev) {
                            problems.push(format!("{where_}: tier {} up_to {} must be greater than {prev}", i + 1, up.0));
                        }
                        if t.percent.0.is_sign_negative() || t.percent.0 > Decimal::ONE_HUNDRED {
                            problems.push(format!("{where_}: tier {} percent {} is not between 0 and 100", i + 1, t.percent.0));
                        }
                        if let Some(up) = t.up_to {
                            prev = prev.max(up.0);
                        }
                        tiers.push(Tier { up_to: t.up_to.map(|d| d.0), rate: t.percent.0 / Decimal::ONE_HUNDRED });
                    }
                    Fee::PercentOfUsage { tiers, minimum: p.minimum.map_or(Decimal::ZERO, |d| d.0) }
                }
            };
            plans.push(Plan { id: p.id, service: p.service, fee, description: p.description });
        }
        let mut subscriptions: Vec<Subscription> = Vec::new();
        for s in raw.subscriptions {
            let where_ = format!("subscription of {:?} to {:?} from {}", s.customer_id, s.plan, s.start);
            if s.customer_id.trim().is_empty() {
                problems.push(format!("{where_}: customer_id is empty"));
            }
            if !ids.contains(&s.plan) {
                problems.push(format!("{where_}: no plan {:?}", s.plan));
            }
            if s.end.is_some_and(|e| e <= s.start) {
                problems.push(format!("{where_}: end must be after start"));
            }
            let sub = Subscription { customer_id: s.customer_id, plan: s.plan, start: s.start, end: s.end };
            let overlaps = |o: &Subscription| {
                o.customer_id == sub.customer_id
                    && o.plan == sub.plan
                    && sub.end.is_none_or(|e| o.start < e)
                    && o.end.is_none_or(|e| sub.start < e)
            };
            if subscriptions.iter().any(overlaps) {
                problems.push(format!("{where_}: overlaps another subscription of the customer to the plan"));
            }
            subscriptions.push(sub);
        }
        let mut credits = Vec::new();
        let mut credit_ids = HashSet::new();
        for c in raw.credits {
            let where_ = format!("credit {:?}", c.id);
            if c.id.trim().is_empty() || c.customer_id.trim().is_empty() {
                problems.push(format!("{where_}: id and customer_id must not be empty"));
            }
            if !credit_ids.insert(c.id.clone()) {
                problems.push(format!("{where_}: defined twice"));
            }
            if c.amount.0 <= Decimal::ZERO {
                problems.push(format!("{where_}: amount must be positive"));
            }
            if c.amount.0.scale() > 2 && c.amount.0.normalize().scale() > 2 {
                problems.push(format!("{where_}: amount {} has more places than cents", c.amount.0));
            }
            if c.expires <= c.start {
                problems.push(format!("{where_}: expires must be after start"));
            }
            credits.push(Credit {
                id: c.id,
                customer_id: c.customer_id,
                amount: c.amount.0,
                services: c.services,
                start: c.start,
                expires: c.expires,
                description: c.description,
            });
        }
        let mut commitment_ids = HashSet::new();
        let mut reservations = Vec::new();
        for r in raw.reservations {
            let where_ = format!("reservation {:?}", r.id);
            if r.id.trim().is_empty() || r.customer_id.trim().is_empty() || r.region.trim().is_empty() {
                problems.push(format!("{where_}: id, customer_id and region must not be empty"));
            }
            if !commitment_ids.insert(r.id.clone()) {
                problems.push(format!("{where_}: id used twice among reservations and savings plans"));
            }
            if r.count == 0 {
                problems.push(format!("{where_}: count must be positive"));
            }
            if r.hourly_rate.0.is_sign_negative() && !r.hourly_rate.0.is_zero() {
                problems.push(format!("{where_}: hourly_rate is negative"));
            }
            if r.end <= r.start {
                problems.push(format!("{where_}: end must be after start"));
            }
            reservations.push(Reservation {
                id: r.id,
                customer_id: r.customer_id,
                service: r.service,
                usage_type: r.usage_type,
                region: r.region,
                count: r.count,
                hourly_rate: r.hourly_rate.0,
                start: r.start,
                end: r.end,
            });
        }
        let mut savings_plans = Vec::new();
        for p in raw.savings_plans {
            let where_ = format!("savings plan {:?}", p.id);
            if p.id.trim().is_empty() || p.customer_id.trim().is_empty() {
                problems.push(format!("{where_}: id and customer_id must not be empty"));
            }
            if !commitment_ids.insert(p.id.clone()) {
                problems.push(format!("{where_}: id used twice among reservations and savings plans"));
            }
            if p.commitment.0 <= Decimal::ZERO {
                problems.push(format!("{where_}: commitment must be positive"));
            }
            if p.end <= p.start {
                problems.push(format!("{where_}: end must be after start"));
            }
            if p.rates.is_empty() {
                problems.push(format!("{where_}: rates is empty: nothing would be covered"));
            }
            let mut keys = HashSet::new();
            for r in &p.rates {
                if !keys.insert((r.service.clone(), r.usage_type.clone(), r.region.clone())) {
                    problems.push(format!("{where_}: {}/{} has two rates for one region", r.service, r.usage_type));
                }
                if r.rate.0 <= Decimal::ZERO {
                    problems.push(format!("{where_}: {}/{} rate must be positive", r.service, r.usage_type));
                }
            }
            savings_plans.push(SavingsPlan {
                id: p.id,
                customer_id: p.customer_id,
                commitment: p.commitment.0,
                start: p.start,
                end: p.end,
                rates: p.rates.into_iter().map(|r| (r.service, r.usage_type, r.region, r.rate.0)).collect(),
            });
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        Ok(Contracts { plans, subscriptions, credits, reservations, savings_plans })
    }

    /// The (service, usage_type) pairs a reservation or savings plan of a
    /// customer covers in `month`: rating needs their hourly usage.
    pub fn committed_usage_types(&self, month: YearMonth) -> Vec<(String, String)> {
        let (first, last) = (month.first_day(), month.last_day());
        let mut out: Vec<(String, String)> = self
            .reservations
            .iter()
            .filter(|r| r.start <= last && r.end > first)
            .map(|r| (r.service.clone(), r.usage_type.clone()))
            .chain(
                self.savings_plans
                    .iter()
                    .filter(|p| p.start <= last && p.end > first)
                    .flat_map(|p| p.rates.iter().map(|(s, u, _, _)| (s.clone(), u.clone()))),
            )
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    /// The days of `month` each (customer, plan) is subscribed, ascending.
    pub fn subscribed_days(&self, month: YearMonth) -> BTreeMap<(String, String), Vec<Date>> {
        let mut out: BTreeMap<(String, String), Vec<Date>> = BTreeMap::new();
        for s in &self.subscriptions {
            let days: Vec<Date> = month.iter_days().filter(|d| s.covers(*d)).collect();
            if !days.is_empty() {
                out.entry((s.customer_id.clone(), s.plan.clone())).or_default().extend(days);
            }
        }
        for days in out.values_mut() {
            days.sort_unstable();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_parses() {
        let c = Contracts::sample().unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.plans.is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[[plan]]
id = "support"
service = "support"
fee = "percent_of_usage"
tiers = [{ up_to = 100, percent = "10" }, { up_to = 50, percent = "120" }]
[[subscription]]
customer_id = "acme"
plan = "gold"
start = 2026-02-10
end = 2026-02-01
[[credit]]
id = "c1"
customer_id = "acme"
amount = "0.001"
start = 2026-02-01
expires = 2026-02-01
"#;
        let Err(Error::Invalid(problems)) = Contracts::parse(text) else { panic!("must be refused") };
        let all = problems.join("\n");
        for want in [
            "last tier must be open-ended",
            "up_to 50 must be greater",
            "percent 120",
            "no plan \"gold\"",
            "end must be after start",
            "more places than cents",
            "expires must be after start",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }
}
