//! Errors of the rating core.
//!
//! Every variant is the user's problem (a price book or usage input that
//! cannot be priced as given), except [`Error::Internal`], which is ours.
//! None of them is helped by retrying: the same input gives the same error.

use crate::date::YearMonth;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The price book file could not be read (user's: path or permissions).
    #[error("cannot read price book {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The price book is not valid TOML for the schema (user's).
    #[error("invalid price book: {0}")]
    Parse(#[from] toml::de::Error),
    /// The price book parsed but breaks rules; every problem found is listed.
    #[error("invalid price book: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A usage fixture could not be read or parsed (user's).
    #[error("invalid usage fixture: {0}")]
    Fixture(String),
    /// No price-book version is effective on the first day of the month.
    #[error("no price-book version is in effect for {month}")]
    NoVersion { month: YearMonth },
    /// Usage of a (service, usage_type) that the catalog does not list.
    #[error("{key}: usage type is not in the catalog")]
    UnknownUsageType { key: String },
    /// Usage that the effective price-book version does not price.
    #[error("{key}: no price in price-book version {version}")]
    NoPrice { key: String, version: String },
    /// The pricing unit cannot be derived from the base unit by a known conversion.
    #[error("{key}: no known conversion from base unit {base_unit} to pricing unit {pricing_unit}")]
    UnknownConversion { key: String, base_unit: String, pricing_unit: String },
    /// A usage row dated outside the month being rated.
    #[error("{key}: usage dated {day} is outside {month}")]
    DayOutsideMonth { key: String, day: String, month: YearMonth },
    /// Usage quantities are never negative in final usage.
    #[error("{key}: negative quantity {quantity}")]
    NegativeQuantity { key: String, quantity: i128 },
    /// A minute series lists the same minute twice or a time that is not a minute start.
    #[error("{key}: bad minute series: {reason}")]
    BadMinuteSeries { key: String, reason: String },
    /// For a usage type with a per-run minimum, the daily usage and the minute
    /// series it was derived from disagree, so runs cannot be trusted.
    #[error("{key} on {day}: daily usage {daily} differs from the minute series sum {minutes}")]
    MinuteMismatch { key: String, day: String, daily: i128, minutes: i128 },
    /// For a usage type covered by a reservation or savings plan, the daily
    /// usage and the hourly usage disagree, so coverage cannot be trusted.
    #[error("{key} on {day}: daily usage {daily} differs from the hourly usage sum {hours}")]
    HourMismatch { key: String, day: String, daily: i128, hours: i128 },
    /// A quantity or amount does not fit the decimal range (about 7.9e16 at 12 decimals).
    #[error("{context}: number out of range")]
    Overflow { context: String },
    /// An invariant of the rating core was broken: a bug, not an input problem.
    #[error("internal rating error (a bug): {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True only for [`Error::Internal`]: a defect of the rating core, to
    /// be reported, not fixed by changing the input.
    pub fn is_internal(&self) -> bool {
        matches!(self, Error::Internal(_))
    }

    /// Whether the same call can succeed later unchanged: only reading a
    /// price book file (the file system); everything else is deterministic.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Read { .. })
    }
}
