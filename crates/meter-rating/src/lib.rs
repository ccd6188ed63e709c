//! The rating core of meterline: a versioned price book and a pure function
//! that turns a month's final usage into daily rated lines and monthly
//! invoice lines. No I/O beyond reading a price book file; the ClickHouse
//! and Kafka edges live elsewhere.
//!
//! Money is `rust_decimal::Decimal`, never floating point. Quantities in
//! pricing units and amounts are carried at [`INTERNAL_SCALE`] decimal
//! places (see there for why a fixed scale); invoice lines are rounded half
//! to even to the currency's minor unit, and an invoice total is the sum of
//! its rounded lines.

pub mod book;
pub mod date;
pub mod decimal;
pub mod error;
pub mod fixture;
pub mod line_id;
pub mod model;
pub mod rate;
pub mod runs;
pub mod units;

pub use book::{Price, PriceBook, Version, SAMPLE_PRICE_BOOK};
pub use date::{Date, YearMonth};
pub use decimal::INTERNAL_SCALE;
pub use error::{Error, Result};
pub use model::{Charge, Model, Tier, TierCharge};
pub use rate::{rate_month, DailyLine, Invoice, InvoiceLine, LineKey, MinuteRow, RatedMonth, UsageRow};
pub use runs::minute_series_range;
pub use rust_decimal::Decimal;
pub use units::Conversion;
