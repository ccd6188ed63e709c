//! Pricing models: what a month's quantity (in pricing units) costs.
//!
//! Every function here is pure and total over non-negative quantities;
//! amounts are at [`INTERNAL_SCALE`](crate::decimal::INTERNAL_SCALE) and are
//! rounded to the currency only on invoice lines.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::decimal::internal;
use crate::error::{Error, Result};

/// One tier of a graduated or volume model, in pricing units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tier {
    /// Inclusive upper bound of the tier; `None` for the last, open-ended tier.
    /// The tier starts where the previous one ends (the first at 0).
    pub up_to: Option<Decimal>,
    /// Price per pricing unit in this tier.
    pub rate: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "model", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Model {
    /// `quantity × rate`.
    PerUnit { rate: Decimal },
    /// Each tier prices the part of the quantity that falls inside it
    /// (the first 50 TB at one rate, the next 450 TB at another, ...).
    Graduated { tiers: Vec<Tier> },
    /// The tier the whole quantity falls in prices all of it. Note that
    /// volume pricing is not monotonic across a tier bound when rates fall:
    /// one unit more can cost less in total (that is the model, not a bug).
    Volume { tiers: Vec<Tier> },
    /// `ceil(quantity / size) × price`: sold in whole packages.
    Package { size: Decimal, price: Decimal },
}

/// The part of a charge priced at one rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierCharge {
    /// Lower bound of the tier (exclusive), pricing units.
    pub from: Decimal,
    /// Upper bound of the tier (inclusive), `None` when open-ended.
    pub up_to: Option<Decimal>,
    /// Quantity priced in this tier, pricing units.
    pub quantity: Decimal,
    /// Price per pricing unit (for a package: package price / package size).
    pub unit_rate: Decimal,
    /// Amount at full (internal) precision.
    pub amount: Decimal,
}

/// What a billable quantity costs under a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// Total at full (internal) precision; for graduated, exactly the sum of the tier amounts.
    pub amount: Decimal,
    /// Tiers with a non-zero quantity, lowest first.
    pub tiers: Vec<TierCharge>,
    /// The rate per pricing unit when all of the quantity is priced at one
    /// rate (per-unit, volume, graduated within its first tier; a package's
    /// price / size), else `None`.
    pub unit_rate: Option<Decimal>,
    /// Whole packages billed (package model only).
    pub packages: Option<Decimal>,
}

fn overflow(what: &str) -> Error {
    Error::Overflow { context: what.to_owned() }
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal> {
    a.checked_mul(b).map(internal).ok_or_else(|| overflow("amount"))
}

impl Model {
    /// The charge for `billable` pricing units (after any free allowance).
    /// Negative quantities are treated as zero.
    pub fn charge(&self, billable: Decimal) -> Result<Charge> {
        let q = billable.max(Decimal::ZERO);
        match self {
            Model::PerUnit { rate } => {
                let amount = mul(q, *rate)?;
                let tiers = if q.is_zero() {
                    Vec::new()
                } else {
                    vec![TierCharge { from: Decimal::ZERO, up_to: None, quantity: q, unit_rate: *rate, amount }]
                };
                Ok(Charge { amount, tiers, unit_rate: Some(*rate), packages: None })
            }
            Model::Graduated { tiers } => {
                let mut out = Vec::new();
                let mut from = Decimal::ZERO;
                let mut amount = Decimal::ZERO;
                for t in tiers {
                    if q <= from {
                        break;
                    }
                    let in_tier = match t.up_to {
                        Some(up) => q.min(up) - from,
                        None => q - from,
                    };
                    let a = mul(in_tier, t.rate)?;
                    amount = amount.checked_add(a).ok_or_else(|| overflow("amount"))?;
                    out.push(TierCharge { from, up_to: t.up_to, quantity: in_tier, unit_rate: t.rate, amount: a });
                    match t.up_to {
                        Some(up) => from = up,
                        None => break,
                    }
                }
                let first = tiers.first();
                let unit_rate = match first {
                    Some(t) if t.up_to.is_none_or(|up| q <= up) => Some(t.rate),
                    _ => None,
                };
                Ok(Charge { amount, tiers: out, unit_rate, packages: None })
            }
            Model::Volume { tiers } => {
                let mut from = Decimal::ZERO;
                let mut chosen = None;
                for t in tiers {
                    if t.up_to.is_none_or(|up| q <= up) {
                        chosen = Some((from, t));
                        break;
                    }
                    from = t.up_to.unwrap_or(from);
                }
                // A validated book ends in an open tier, so `chosen` is always found.
                let (from, t) = chosen.ok_or_else(|| Error::Internal("volume tiers without an open last tier".into()))?;
                let amount = mul(q, t.rate)?;
                let tiers = if q.is_zero() {
                    Vec::new()
                } else {
                    vec![TierCharge { from, up_to: t.up_to, quantity: q, unit_rate: t.rate, amount }]
                };
                Ok(Charge { amount, tiers, unit_rate: Some(t.rate), packages: None })
            }
            Model::Package { size, price } => {
                if *size <= Decimal::ZERO {
                    return Err(Error::Internal("package size must be positive".into()));
                }
                // The quotient can be inexact (size 3); fix the ceiling with exact products.
                let mut packages = q.checked_div(*size).ok_or_else(|| overflow("packages"))?.ceil();
                let covers = |n: Decimal| n.checked_mul(*size).is_some_and(|c| c >= q);
                while packages > Decimal::ZERO && covers(packages - Decimal::ONE) {
                    packages -= Decimal::ONE;
                }
                while !covers(packages) {
                    packages += Decimal::ONE;
                }
                let amount = mul(packages, *price)?;
                let unit_rate = price.checked_div(*size).ok_or_else(|| overflow("unit rate"))?;
                let tiers = if q.is_zero() {
                    Vec::new()
                } else {
                    vec![TierCharge { from: Decimal::ZERO, up_to: None, quantity: q, unit_rate, amount }]
                };
                Ok(Charge { amount, tiers, unit_rate: Some(unit_rate), packages: Some(packages) })
            }
        }
    }
}

/// A month-to-date quantity priced with its free allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Priced {
    /// Quantity in pricing units (including any per-run minimum uplift).
    pub quantity: Decimal,
    /// The part of `quantity` covered by the monthly free allowance.
    pub free_allowance_used: Decimal,
    /// `quantity - free_allowance_used`: what the model prices.
    pub billable: Decimal,
    pub charge: Charge,
}

/// Apply the monthly free allowance first (never below zero), then the model.
pub fn price(model: &Model, free_allowance: Decimal, quantity: Decimal) -> Result<Priced> {
    let quantity = quantity.max(Decimal::ZERO);
    let free_allowance_used = quantity.min(free_allowance.max(Decimal::ZERO));
    let billable = quantity - free_allowance_used;
    let charge = model.charge(billable)?;
    Ok(Priced { quantity, free_allowance_used, billable, charge })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn s3_tiers() -> Vec<Tier> {
        vec![
            Tier { up_to: Some(d("51200")), rate: d("0.023") },
            Tier { up_to: Some(d("512000")), rate: d("0.022") },
            Tier { up_to: None, rate: d("0.021") },
        ]
    }

    #[test]
    fn graduated_splits_across_tiers() {
        let c = Model::Graduated { tiers: s3_tiers() }.charge(d("61440")).unwrap();
        assert_eq!(c.amount, d("1402.88"));
        assert_eq!(c.tiers.len(), 2);
        assert_eq!((c.tiers[1].from, c.tiers[1].quantity, c.tiers[1].amount), (d("51200"), d("10240"), d("225.28")));
        assert_eq!(c.unit_rate, None);
        let c = Model::Graduated { tiers: s3_tiers() }.charge(d("51200")).unwrap();
        assert_eq!((c.amount, c.unit_rate, c.tiers.len()), (d("1177.6"), Some(d("0.023")), 1));
    }

    #[test]
    fn volume_prices_everything_at_the_reached_tier_including_the_cliff() {
        let m = Model::Volume { tiers: s3_tiers() };
        assert_eq!(m.charge(d("51200")).unwrap().amount, d("1177.6"));
        // One GB-month more moves all of it to the cheaper tier: cheaper in total.
        assert_eq!(m.charge(d("51201")).unwrap().amount, d("1126.422"));
        assert_eq!(m.charge(d("0")).unwrap().amount, Decimal::ZERO);
    }

    #[test]
    fn packages_round_up_and_free_allowance_comes_first() {
        let get = Model::Package { size: d("1000"), price: d("0.0004") };
        let c = get.charge(d("12345678")).unwrap();
        assert_eq!((c.packages, c.amount), (Some(d("12346")), d("4.9384")));
        assert_eq!(get.charge(d("1000")).unwrap().packages, Some(d("1")));
        assert_eq!(get.charge(d("0")).unwrap().packages, Some(d("0")));
        let thirds = Model::Package { size: d("3"), price: d("1") };
        assert_eq!(thirds.charge(d("9")).unwrap().packages, Some(d("3")));
        assert_eq!(thirds.charge(d("9.000000000001")).unwrap().packages, Some(d("4")));
        let p = price(&Model::PerUnit { rate: d("0.09") }, d("100"), d("350")).unwrap();
        assert_eq!((p.free_allowance_used, p.billable, p.charge.amount), (d("100"), d("250"), d("22.5")));
        let p = price(&Model::PerUnit { rate: d("0.09") }, d("100"), d("60")).unwrap();
        assert_eq!((p.free_allowance_used, p.billable, p.charge.amount), (d("60"), d("0"), d("0")));
    }
}
