//! The price book: currency, versions with effective dates, and one price per
//! (service, usage_type[, region]) in each version.
//!
//! A version is effective from 00:00 UTC of a day. The version pricing a
//! day is the latest one effective on or before it; a month whose days are
//! priced by more than one version ([`PriceBook::versions_for_month`]) is
//! rated across them, each day at its version's prices (see
//! [`crate::rate`]). A price change is a new version, so re-rating an old
//! month keeps giving the same amounts.
//!
//! [`PriceBook::parse`] checks everything the file can say about itself;
//! [`PriceBook::validate`] checks it against the catalog. Both report every
//! problem at once.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use meter_model::catalog::Lookup;
use meter_model::Catalog;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::date::{Date, YearMonth};
use crate::decimal::Dec;
use crate::error::{Error, Result};
use crate::model::{Model, Tier};
use crate::units::Conversion;

/// The price book shipped with this build, `schemas/pricebook.toml`.
pub const SAMPLE_PRICE_BOOK: &str = include_str!("../../../schemas/pricebook.toml");

// ---- the file, as written ---------------------------------------------------

/// The price book file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    /// ISO 4217 code of every price in the book, e.g. "USD".
    currency: String,
    /// Decimal places of the currency's minor unit, to which invoice lines
    /// are rounded (half to even). Defaults to the ISO 4217 value for common
    /// currencies (2 for USD, 0 for JPY); required for others.
    #[serde(default)]
    minor_unit_digits: Option<u32>,
    /// Free text for people.
    #[serde(default)]
    description: String,
    /// The price lists, each effective from 00:00 UTC of a day.
    #[serde(default, rename = "version")]
    versions: Vec<RawVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    /// Stable identifier, recorded on every rated line (e.g. "2026-01").
    id: String,
    /// First day this version prices, from 00:00 UTC (a TOML date or
    /// "YYYY-MM-DD"). Usually the 1st of a month; any day is allowed, and
    /// splits its month between this version and the one before.
    effective_from: Date,
    /// Free text for people.
    #[serde(default)]
    description: String,
    /// Id of an earlier version whose prices and free pools this one starts
    /// from: its own entries replace those with the same (service,
    /// usage_type, region), or the same pool id. Omitted: only its own.
    #[serde(default)]
    inherits: Option<String>,
    /// One entry per (service, usage_type) and optionally per region.
    #[serde(default, rename = "price")]
    prices: Vec<RawPrice>,
    /// Free allowances shared by several usage types (`[[version.free_pool]]`).
    #[serde(default, rename = "free_pool")]
    free_pools: Vec<RawPool>,
}

/// A monthly free allowance shared by a customer's usage of several usage
/// types (in every region), as AWS pools 100 GB of data transfer out across
/// services.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    /// Stable identifier, e.g. "data-transfer-out".
    id: String,
    /// The pricing unit of the allowance and of every member's price.
    pricing_unit: String,
    /// Pricing units free per customer and month.
    allowance: Dec,
    /// The usage types that draw on it, `{ service = "...", usage_type = "..." }`.
    members: Vec<RawMember>,
    /// Free text for people.
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    service: String,
    usage_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    /// Catalog service name, e.g. "compute".
    service: String,
    /// Catalog usage type, e.g. "BoxUsage:m5.large".
    usage_type: String,
    /// Region this price applies to. Omitted: the default for every region
    /// without its own entry (a region's own entry always wins).
    #[serde(default)]
    region: Option<String>,
    /// The unit prices are quoted in; must equal the catalog's pricing_unit
    /// and be reachable from its base unit (seconds→hours, bytes→GB,
    /// byte-seconds→GB-month, requests→requests, or the base unit itself).
    pricing_unit: String,
    /// per_unit | graduated | volume | package.
    model: ModelKind,
    /// per_unit: price per pricing unit.
    #[serde(default)]
    rate: Option<Dec>,
    /// graduated / volume: tiers in ascending order, the last without `up_to`.
    #[serde(default)]
    tiers: Option<Vec<RawTier>>,
    /// package: pricing units per package (e.g. 1000 requests).
    #[serde(default)]
    package_size: Option<Dec>,
    /// package: price of one package; partial packages are rounded up.
    #[serde(default)]
    package_price: Option<Dec>,
    /// Pricing units free each month per invoice line (customer, service,
    /// usage type, region), taken off before any tier. Default 0.
    #[serde(default)]
    free_allowance: Option<Dec>,
    /// Per-second billing with a minimum: each run of a resource (a maximal
    /// sequence of minutes with usage) is billed at least this many seconds.
    /// Only for base unit seconds; the catalog must key the usage type by
    /// resource_id so that per-resource minute series exist.
    #[serde(default)]
    minimum_seconds: Option<u32>,
    /// Free text for people.
    #[serde(default)]
    description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ModelKind {
    PerUnit,
    Graduated,
    Volume,
    Package,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    /// Inclusive upper bound in pricing units; omitted on the last tier.
    #[serde(default)]
    up_to: Option<Dec>,
    /// Price per pricing unit inside this tier.
    rate: Dec,
}

// ---- the validated book -----------------------------------------------------

/// A parsed, self-consistent price book. Versions are sorted by `effective_from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceBook {
    pub currency: String,
    /// Decimal places invoice amounts are rounded to.
    pub minor_unit_digits: u32,
    pub description: String,
    versions: Vec<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Version {
    pub id: String,
    /// 00:00 UTC of this day: usually the 1st of a month.
    pub effective_from: Date,
    pub description: String,
    /// Every price of the version, inherited ones included.
    pub prices: Vec<Price>,
    /// Free allowances shared across usage types.
    pub free_pools: Vec<FreePool>,
}

/// A free allowance shared by several usage types. Each customer's month
/// draws on it in time order: day by day, and within a day in the order of
/// the invoice lines' keys (service, usage type, region), so the earliest
/// usage is free, whichever service it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FreePool {
    pub id: String,
    pub pricing_unit: String,
    /// Pricing units free per customer and month.
    pub allowance: Decimal,
    /// (service, usage_type), every region.
    pub members: Vec<(String, String)>,
    pub description: String,
}

/// The price of one usage type (in one region, or by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Price {
    pub service: String,
    pub usage_type: String,
    /// `None`: the default for regions without their own entry.
    pub region: Option<String>,
    pub pricing_unit: String,
    pub model: Model,
    /// Pricing units free per month and invoice line.
    pub free_allowance: Decimal,
    /// Minimum billed seconds per resource run.
    pub minimum_seconds: Option<u32>,
    pub description: String,
}

fn default_minor_digits(currency: &str) -> Option<u32> {
    match currency {
        "USD" | "EUR" | "GBP" | "CHF" | "CAD" | "AUD" | "NZD" | "SEK" | "NOK" | "DKK" | "PLN" | "CZK" | "SGD" | "HKD" | "CNY" | "INR"
        | "BRL" | "MXN" | "ZAR" => Some(2),
        "JPY" | "KRW" | "ISK" | "CLP" | "VND" => Some(0),
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" => Some(3),
        _ => None,
    }
}

fn tiers(where_: &str, raw: Vec<RawTier>, problems: &mut Vec<String>) -> Vec<Tier> {
    if raw.is_empty() {
        problems.push(format!("{where_}: tiers is empty"));
    }
    let n = raw.len();
    let mut prev = Decimal::ZERO;
    let mut out = Vec::with_capacity(n);
    for (i, t) in raw.into_iter().enumerate() {
        let last = i + 1 == n;
        match (t.up_to, last) {
            (None, false) => problems.push(format!("{where_}: tier {} has no up_to but is not the last tier", i + 1)),
            (Some(_), true) => problems.push(format!("{where_}: the last tier must be open-ended (no up_to) so every quantity is priced")),
            _ => {}
        }
        if let Some(Dec(up)) = t.up_to.filter(|up| up.0 <= prev) {
            problems.push(format!("{where_}: tier {} up_to {up} must be greater than {prev}", i + 1));
        }
        if let Some(Dec(up)) = t.up_to {
            prev = prev.max(up);
        }
        if t.rate.0.is_sign_negative() {
            problems.push(format!("{where_}: tier {} rate {} is negative", i + 1, t.rate.0));
        }
        out.push(Tier { up_to: t.up_to.map(|d| d.0), rate: t.rate.0 });
    }
    out
}

fn price(where_: &str, p: RawPrice, problems: &mut Vec<String>) -> Price {
    let mut unexpected = |field: &str, present: bool| {
        if present {
            problems.push(format!("{where_}: {field} does not apply to model {:?}", p.model));
        }
    };
    let model = match p.model {
        ModelKind::PerUnit => {
            unexpected("tiers", p.tiers.is_some());
            unexpected("package_size", p.package_size.is_some());
            unexpected("package_price", p.package_price.is_some());
            Model::PerUnit { rate: p.rate.map_or(Decimal::ZERO, |d| d.0) }
        }
        ModelKind::Graduated | ModelKind::Volume => {
            unexpected("rate", p.rate.is_some());
            unexpected("package_size", p.package_size.is_some());
            unexpected("package_price", p.package_price.is_some());
            let t = tiers(where_, p.tiers.unwrap_or_default(), problems);
            if p.model == ModelKind::Graduated {
                Model::Graduated { tiers: t }
            } else {
                Model::Volume { tiers: t }
            }
        }
        ModelKind::Package => {
            unexpected("rate", p.rate.is_some());
            unexpected("tiers", p.tiers.is_some());
            let size = p.package_size.map_or(Decimal::ZERO, |d| d.0);
            if size <= Decimal::ZERO {
                problems.push(format!("{where_}: package_size must be given and positive"));
            }
            if p.package_price.is_none() {
                problems.push(format!("{where_}: package_price is required"));
            }
            Model::Package { size, price: p.package_price.map_or(Decimal::ZERO, |d| d.0) }
        }
    };
    if p.model == ModelKind::PerUnit && p.rate.is_none() {
        problems.push(format!("{where_}: rate is required"));
    }
    let negative = |d: &Option<Dec>| d.is_some_and(|d| d.0.is_sign_negative() && !d.0.is_zero());
    for (name, v) in [("rate", &p.rate), ("package_price", &p.package_price), ("free_allowance", &p.free_allowance)] {
        if negative(v) {
            problems.push(format!("{where_}: {name} is negative"));
        }
    }
    if p.minimum_seconds == Some(0) {
        problems.push(format!("{where_}: minimum_seconds must be positive (omit it for no minimum)"));
    }
    if p.region.as_deref() == Some("") {
        problems.push(format!("{where_}: region is empty (omit it for the default price)"));
    }
    if p.pricing_unit.is_empty() {
        problems.push(format!("{where_}: pricing_unit is empty"));
    }
    Price {
        service: p.service,
        usage_type: p.usage_type,
        region: p.region,
        pricing_unit: p.pricing_unit,
        model,
        free_allowance: p.free_allowance.map_or(Decimal::ZERO, |d| d.0),
        minimum_seconds: p.minimum_seconds,
        description: p.description,
    }
}

fn free_pool(where_: &str, p: RawPool, problems: &mut Vec<String>) -> FreePool {
    if p.id.trim().is_empty() {
        problems.push(format!("{where_}: id is empty"));
    }
    if p.allowance.0.is_sign_negative() && !p.allowance.0.is_zero() {
        problems.push(format!("{where_}: allowance is negative"));
    }
    if p.members.is_empty() {
        problems.push(format!("{where_}: members is empty"));
    }
    let mut members: Vec<(String, String)> = p.members.into_iter().map(|m| (m.service, m.usage_type)).collect();
    let n = members.len();
    members.sort();
    members.dedup();
    if members.len() != n {
        problems.push(format!("{where_}: a member is listed twice"));
    }
    FreePool { id: p.id, pricing_unit: p.pricing_unit, allowance: p.allowance.0, members, description: p.description }
}

/// Pools and prices agree: each member is priced in the pool's unit, has no
/// free allowance of its own (it would be free twice), and belongs to one
/// pool only.
fn check_pools(vwhere: &str, prices: &[Price], pools: &[FreePool], problems: &mut Vec<String>) {
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut ids = HashSet::new();
    for pool in pools {
        if !ids.insert(pool.id.as_str()) {
            problems.push(format!("{vwhere}: free_pool {:?} defined twice", pool.id));
        }
        for (service, usage_type) in &pool.members {
            let where_ = format!("{vwhere} free_pool {:?} member {service}/{usage_type}", pool.id);
            if !seen.insert((service, usage_type)) {
                problems.push(format!("{where_}: already a member of another pool"));
            }
            let priced: Vec<&Price> = prices.iter().filter(|p| &p.service == service && &p.usage_type == usage_type).collect();
            if priced.is_empty() {
                problems.push(format!("{where_}: not priced in this version"));
            }
            for p in priced {
                let region = p.region.as_deref().unwrap_or("*");
                if p.pricing_unit != pool.pricing_unit {
                    problems.push(format!("{where_} ({region}): priced in {}, the pool is in {}", p.pricing_unit, pool.pricing_unit));
                }
                if !p.free_allowance.is_zero() {
                    problems.push(format!("{where_} ({region}): has a free_allowance of its own as well as the pool's"));
                }
            }
        }
    }
}

impl PriceBook {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// The sample book, `schemas/pricebook.toml`.
    pub fn sample() -> Result<Self> {
        Self::parse(SAMPLE_PRICE_BOOK)
    }

    /// Parse and check everything the book says about itself (tiers ascending
    /// and open-ended, model fields, versions on the 1st of a month, unique
    /// ids and entries); every problem is reported in one [`Error::Invalid`].
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawBook = toml::from_str(text)?;
        let mut problems = Vec::new();
        let currency_ok = raw.currency.len() == 3 && raw.currency.bytes().all(|b| b.is_ascii_uppercase());
        if !currency_ok {
            problems.push(format!("currency {:?} is not an ISO 4217 code like \"USD\"", raw.currency));
        }
        let minor_unit_digits = match raw.minor_unit_digits.or_else(|| default_minor_digits(&raw.currency)) {
            Some(d) if d <= 6 => d,
            Some(d) => {
                problems.push(format!("minor_unit_digits {d} is more than 6"));
                2
            }
            None => {
                if currency_ok {
                    problems.push(format!("set minor_unit_digits for currency {}", raw.currency));
                }
                2
            }
        };
        if raw.versions.is_empty() {
            problems.push("no [[version]]".to_owned());
        }
        let mut ids = HashSet::new();
        let mut dates = HashSet::new();
        let mut versions: Vec<Version> = Vec::new();
        for v in raw.versions {
            let vwhere = format!("version {:?}", v.id);
            if v.id.trim().is_empty() {
                problems.push("a version has an empty id".to_owned());
            }
            if !ids.insert(v.id.clone()) {
                problems.push(format!("{vwhere}: id used twice"));
            }
            if !dates.insert(v.effective_from) {
                problems.push(format!("{vwhere}: another version is also effective from {}", v.effective_from));
            }
            let mut keys = HashSet::new();
            let mut prices = Vec::new();
            for p in v.prices {
                let region = p.region.as_deref().unwrap_or("*");
                let where_ = format!("{vwhere} {}/{}/{region}", p.service, p.usage_type);
                if !keys.insert((p.service.clone(), p.usage_type.clone(), p.region.clone())) {
                    problems.push(format!("{where_}: priced twice"));
                }
                prices.push(price(&where_, p, &mut problems));
            }
            let mut pools = Vec::new();
            for p in v.free_pools {
                pools.push(free_pool(&format!("{vwhere} free_pool {:?}", p.id), p, &mut problems));
            }
            if let Some(parent) = &v.inherits {
                // Versions are listed in any order; the parent must come first in the file.
                match versions.iter().find(|p| &p.id == parent) {
                    Some(p) if p.effective_from < v.effective_from => {
                        let own: HashSet<(String, String, Option<String>)> =
                            prices.iter().map(|q: &Price| (q.service.clone(), q.usage_type.clone(), q.region.clone())).collect();
                        let inherited =
                            p.prices.iter().filter(|q| !own.contains(&(q.service.clone(), q.usage_type.clone(), q.region.clone())));
                        prices = inherited.cloned().chain(prices).collect();
                        let own: HashSet<String> = pools.iter().map(|q: &FreePool| q.id.clone()).collect();
                        pools = p.free_pools.iter().filter(|q| !own.contains(&q.id)).cloned().chain(pools).collect();
                    }
                    Some(_) => problems.push(format!("{vwhere}: inherits {parent:?}, which is not effective earlier")),
                    None => problems.push(format!("{vwhere}: inherits {parent:?}, which is not a version listed before it")),
                }
            }
            check_pools(&vwhere, &prices, &pools, &mut problems);
            versions.push(Version { id: v.id, effective_from: v.effective_from, description: v.description, prices, free_pools: pools });
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        versions.sort_by_key(|v| v.effective_from);
        Ok(PriceBook { currency: raw.currency, minor_unit_digits, description: raw.description, versions })
    }

    /// Check the book against the catalog: every priced usage type exists,
    /// its pricing unit is the catalog's and reachable from the base unit,
    /// minimums only on seconds. Every problem is reported in one
    /// [`Error::Invalid`]. On success, returns warnings that do not stop
    /// rating (a catalog usage type without a default price in a version).
    /// A per-run minimum on a usage type the catalog does not key by
    /// resource is a problem: its minute series cannot be per resource.
    pub fn validate(&self, catalog: &Catalog) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for v in &self.versions {
            for p in &v.prices {
                let where_ = format!("version {:?} {}/{}/{}", v.id, p.service, p.usage_type, p.region.as_deref().unwrap_or("*"));
                let info = match catalog.lookup(&p.service, &p.usage_type) {
                    Lookup::Known(info) => info,
                    Lookup::UnknownService => {
                        problems.push(format!("{where_}: service {} is not in the catalog", p.service));
                        continue;
                    }
                    Lookup::UnknownUsageType => {
                        problems.push(format!("{where_}: usage type {} is not in the catalog", p.usage_type));
                        continue;
                    }
                };
                if p.pricing_unit != info.pricing_unit {
                    problems.push(format!("{where_}: pricing_unit {} differs from the catalog's {}", p.pricing_unit, info.pricing_unit));
                }
                let base = info.base_unit.as_str();
                if Conversion::find(base, &p.pricing_unit).is_none() {
                    problems.push(format!("{where_}: no known conversion from base unit {base} to {}", p.pricing_unit));
                }
                if p.minimum_seconds.is_some() {
                    if base != "seconds" {
                        problems.push(format!("{where_}: minimum_seconds needs base unit seconds, not {base}"));
                    } else if !info.key_by_resource {
                        // Without per-resource windows there are no runs to
                        // apply the minimum to: rating would misbill.
                        problems.push(format!(
                            "{where_}: minimum_seconds is set but the catalog does not key this usage type by resource_id (set key_by_resource = true)"
                        ));
                    }
                }
            }
            let defaults: HashSet<(&str, &str)> =
                v.prices.iter().filter(|p| p.region.is_none()).map(|p| (p.service.as_str(), p.usage_type.as_str())).collect();
            let mut unpriced: Vec<String> = catalog
                .usage_types()
                .filter(|u| !defaults.contains(&(u.service.as_str(), u.name.as_str())))
                .map(|u| format!("{}/{}", u.service, u.name))
                .collect();
            unpriced.sort();
            for u in unpriced {
                warnings.push(format!("version {:?}: catalog usage type {u} has no default (region-less) price", v.id));
            }
        }
        if problems.is_empty() {
            Ok(warnings)
        } else {
            Err(Error::Invalid(problems))
        }
    }

    /// All versions, oldest first.
    pub fn versions(&self) -> &[Version] {
        &self.versions
    }

    /// The version pricing `year`-`month`: the latest one effective on or
    /// before the month's first day.
    pub fn version_for(&self, year: i32, month: u32) -> Option<&Version> {
        self.version_for_month(YearMonth::new(year, month)?)
    }

    /// The version in effect on the month's first day.
    pub fn version_for_month(&self, month: YearMonth) -> Option<&Version> {
        self.version_at(month.first_day())
    }

    /// The version pricing `day`.
    pub fn version_at(&self, day: Date) -> Option<&Version> {
        self.versions.iter().rev().find(|v| v.effective_from <= day)
    }

    /// The versions pricing the days of `month`, each with the first day it
    /// prices, in order: one, unless a version takes effect inside the month.
    /// Empty when no version is in effect on its first day.
    pub fn versions_for_month(&self, month: YearMonth) -> Vec<(Date, &Version)> {
        let Some(first) = self.version_for_month(month) else { return Vec::new() };
        let mut out = vec![(month.first_day(), first)];
        for v in self.versions.iter().filter(|v| month.contains(v.effective_from) && v.effective_from > month.first_day()) {
            out.push((v.effective_from, v));
        }
        out
    }

    /// The id a month's rating is recorded under: its version's, or the ids
    /// of every version pricing it joined by `+` ("2026-04+2026-07-15").
    pub fn rating_id(&self, month: YearMonth) -> Option<String> {
        let v = self.versions_for_month(month);
        (!v.is_empty()).then(|| v.iter().map(|(_, v)| v.id.as_str()).collect::<Vec<_>>().join("+"))
    }

    /// The `usage_minute` range `[from, to)` (epoch milliseconds) to load for
    /// rating `month`, or `None` when its version has no per-run minimum
    /// (then no minute rows are needed at all).
    pub fn minute_series_range(&self, month: YearMonth) -> Option<(i64, i64)> {
        let max = self.versions_for_month(month).iter().flat_map(|(_, v)| v.prices.iter()).filter_map(|p| p.minimum_seconds).max()?;
        Some(crate::runs::minute_series_range(month, max))
    }
}

impl Version {
    /// The price of a usage type in a region: the region's own entry, else
    /// the region-less default.
    pub fn price_for(&self, service: &str, usage_type: &str, region: &str) -> Option<&Price> {
        let mut default = None;
        for p in &self.prices {
            if p.service == service && p.usage_type == usage_type {
                match p.region.as_deref() {
                    Some(r) if r == region => return Some(p),
                    None => default = Some(p),
                    Some(_) => {}
                }
            }
        }
        default
    }

    /// The (service, usage_type) pairs with a per-run minimum in any region:
    /// rating needs their per-resource minute series.
    pub fn usage_types_with_minimum(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> =
            self.prices.iter().filter(|p| p.minimum_seconds.is_some()).map(|p| (p.service.as_str(), p.usage_type.as_str())).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The free pool a (service, usage_type) draws on, if any.
    pub fn pool_of(&self, service: &str, usage_type: &str) -> Option<&FreePool> {
        self.free_pools.iter().find(|p| p.members.iter().any(|(s, u)| s == service && u == usage_type))
    }

    /// Prices by (service, usage_type, region or "*"), for listing.
    pub fn index(&self) -> BTreeMap<(String, String, String), &Price> {
        self.prices.iter().map(|p| ((p.service.clone(), p.usage_type.clone(), p.region.clone().unwrap_or_else(|| "*".into())), p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
currency = "USD"

[[version]]
id = "v1"
effective_from = 2026-01-01

[[version.price]]
service = "compute"
usage_type = "BoxUsage:m5.large"
pricing_unit = "hours"
model = "per_unit"
rate = "0.096"
minimum_seconds = 60

[[version.price]]
service = "compute"
usage_type = "BoxUsage:m5.large"
region = "eu-west-1"
pricing_unit = "hours"
model = "per_unit"
rate = "0.107"

[[version]]
id = "v2"
effective_from = "2026-04-01"

[[version.price]]
service = "compute"
usage_type = "BoxUsage:m5.large"
pricing_unit = "hours"
model = "per_unit"
rate = "0.090"
"#;

    #[test]
    fn picks_the_version_and_the_regional_price() {
        let b = PriceBook::parse(SMALL).unwrap();
        assert_eq!(b.minor_unit_digits, 2);
        assert!(b.version_for(2025, 12).is_none());
        assert_eq!(b.version_for(2026, 1).unwrap().id, "v1");
        assert_eq!(b.version_for(2026, 3).unwrap().id, "v1");
        assert_eq!(b.version_for(2026, 4).unwrap().id, "v2");
        assert_eq!(b.version_for(2030, 12).unwrap().id, "v2");
        let v1 = b.version_for(2026, 2).unwrap();
        let rate = |r: &str| match &v1.price_for("compute", "BoxUsage:m5.large", r).unwrap().model {
            Model::PerUnit { rate } => rate.to_string(),
            m => panic!("{m:?}"),
        };
        assert_eq!(rate("eu-west-1"), "0.107");
        assert_eq!(rate("us-east-1"), "0.096");
        assert!(v1.price_for("compute", "BoxUsage:t3.micro", "us-east-1").is_none());
        // Against the built-in catalog: valid, with warnings for what is not priced.
        let warnings = b.validate(&Catalog::builtin()).unwrap();
        assert!(warnings.iter().any(|w| w.contains("compute/BoxUsage:t3.micro")), "{warnings:?}");
        // A catalog that does not key instances by resource cannot carry a per-run minimum.
        let unkeyed = Catalog::parse(&meter_model::catalog::BUILTIN_CATALOG.replace("key_by_resource = true", "")).unwrap();
        let Err(Error::Invalid(problems)) = b.validate(&unkeyed) else { panic!("an unkeyed minimum must be refused") };
        assert!(problems.iter().any(|p| p.contains("key_by_resource")), "{problems:?}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let bad = r#"
currency = "usd"
[[version]]
id = "v1"
effective_from = 2026-01-15
[[version.price]]
service = "compute"
usage_type = "BoxUsage:m5.large"
pricing_unit = "hours"
model = "graduated"
rate = "1"
tiers = [{ up_to = 10, rate = "0.1" }, { up_to = 5, rate = "0.2" }]
[[version.price]]
service = "compute"
usage_type = "BoxUsage:m5.large"
pricing_unit = "hours"
model = "package"
[[version]]
id = "v1"
effective_from = 2026-01-01
"#;
        let Err(Error::Invalid(p)) = PriceBook::parse(bad) else { panic!("expected Invalid") };
        let all = p.join("\n");
        for needle in [
            "currency \"usd\"",
            "rate does not apply",
            "up_to 5 must be greater than 10",
            "last tier must be open-ended",
            "priced twice",
            "package_size must be given",
            "package_price is required",
            "id used twice",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn refuses_floats_and_unknown_fields() {
        let float = SMALL.replace("rate = \"0.096\"", "rate = 0.096");
        let e = PriceBook::parse(&float).unwrap_err().to_string();
        assert!(e.contains("float"), "{e}");
        let unknown = SMALL.replace("model = \"per_unit\"\nrate = \"0.096\"", "model = \"per_unit\"\nrate = \"0.096\"\ncolour = \"red\"");
        assert!(matches!(PriceBook::parse(&unknown), Err(Error::Parse(_))));
    }

    #[test]
    fn validate_reports_catalog_problems() {
        let bad = SMALL
            .replace(
                "BoxUsage:m5.large\"\npricing_unit = \"hours\"\nmodel = \"per_unit\"\nrate = \"0.096\"",
                "BoxUsage:z9\"\npricing_unit = \"hours\"\nmodel = \"per_unit\"\nrate = \"0.096\"",
            )
            .replace("region = \"eu-west-1\"\npricing_unit = \"hours\"", "region = \"eu-west-1\"\npricing_unit = \"GB\"");
        let Err(Error::Invalid(p)) = PriceBook::parse(&bad).unwrap().validate(&Catalog::builtin()) else { panic!("expected Invalid") };
        let all = p.join("\n");
        assert!(all.contains("BoxUsage:z9 is not in the catalog"), "{all}");
        assert!(all.contains("pricing_unit GB differs"), "{all}");
        assert!(all.contains("no known conversion from base unit seconds to GB"), "{all}");
    }
}
