//! `[rating]` and `[catalog]`: the price book and the catalog of usage types.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Problems, Section};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Catalog file; the catalog built into the binary when unset.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RatingConfig {
    /// Price book file (TOML, see `schemas/pricebook.toml`) used by `meter
    /// prices load`, `meter rate` and the invoice preview; the sample price
    /// book built into the binary when unset.
    #[serde(default)]
    pub price_book: Option<PathBuf>,
    /// Path of the contracts file (subscription plans, subscriptions,
    /// credits; see `schemas/contracts.toml`) that `meter rate` bills on top
    /// of usage; the sample built into the binary, which subscribes nobody,
    /// when unset.
    #[serde(default)]
    pub contracts: Option<PathBuf>,
}

impl Section for CatalogConfig {
    const NAME: &'static str = "catalog";

    fn check(&self, _: &mut Problems) {}
}

impl Section for RatingConfig {
    const NAME: &'static str = "rating";

    fn check(&self, _: &mut Problems) {}
}
