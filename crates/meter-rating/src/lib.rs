//! The rating core of meterline: a versioned price book and a pure function
//! that turns a month's final usage into daily rated lines and monthly
//! invoice lines, the idempotent comparison of a rating run with what is
//! stored ([`plan`]), and the wire format of invoice lines ([`wire`]). No
//! I/O beyond reading a price book file; the ClickHouse edge is
//! `meter-report`, the Kafka edge `meter rate`.
//!
//! Money is `rust_decimal::Decimal`, never floating point. Quantities in
//! pricing units and amounts are carried at [`INTERNAL_SCALE`] decimal
//! places (see there for why a fixed scale); invoice lines are rounded half
//! to even to the currency's minor unit, and an invoice total is the sum of
//! its rounded lines.
//!
//! ```
//! use meter_model::Catalog;
//! use meter_rating::{rate_month, fixture::Scenario, PriceBook, YearMonth};
//!
//! let book = PriceBook::sample()?;
//! let catalog = Catalog::builtin();
//! for warning in book.validate(&catalog)? {
//!     eprintln!("price book: {warning}");
//! }
//! let month: YearMonth = "2026-02".parse()?;
//! // In production: usage_day rows of the month (FINAL), and usage_minute rows in
//! // `book.minute_series_range(month)` for `version.usage_types_with_minimum()`.
//! let (days, minutes) = Scenario::golden()?.usage(month)?;
//! let rated = rate_month(&book, &catalog, month, &days, &minutes)?;
//! let acme = rated.invoices.iter().find(|i| i.customer_id == "acme").unwrap();
//! assert_eq!(acme.total.to_string(), "2615.80");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod book;
pub mod charges;
pub mod close;
pub mod commitments;
pub mod contracts;
pub use meter_model::date;
pub mod decimal;
pub mod error;
pub mod fixture;
pub mod line_id;
pub mod model;
pub mod plan;
pub mod rate;
pub mod runs;
pub mod units;
pub mod wire;

pub use book::{FreePool, Price, PriceBook, Version, SAMPLE_PRICE_BOOK};
pub use charges::{CreditBalance, Inputs, PriorUse};
pub use contracts::{Contracts, SAMPLE_CONTRACTS};
pub use date::{Date, YearMonth};
pub use decimal::{Rounding, AMOUNT_SCALE, FULL_SCALE, INTERNAL_SCALE};
pub use error::{Error, Result};
pub use model::{Charge, Model, Tier, TierCharge};
pub use rate::{rate_month, DailyLine, HourRow, Invoice, InvoiceLine, LineKey, LineType, MinuteRow, RatedMonth, UsageRow};
pub use runs::minute_series_range;
pub use rust_decimal::Decimal;
pub use units::Conversion;
