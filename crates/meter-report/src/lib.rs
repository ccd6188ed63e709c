//! The rating stage's ClickHouse side, and what analysts and finance read:
//! the price book, rated lines, invoice lines (usage, fees, credits),
//! invoices and the credit ledger in ClickHouse ([`rating`], idempotent per
//! month and price-book version), `meter rate`
//! without its Kafka edge ([`rate`]), usage and cost reports and the CUR
//! export ([`report`], [`cost_report`], [`cost`]), and the month's audit
//! ([`audit`]).
//!
//! Pure rating (prices, tiers, minimums, the idempotency plan) is
//! `meter-rating`; this crate reads and writes ClickHouse through
//! `meter-clickhouse` and never talks to Kafka: publishing invoice lines is
//! the caller's [`rate::LinePublisher`].
//!
//! No SQL here is built from user strings: values are bound with `?`.

pub mod api;
pub mod audit;
pub mod close;
pub mod cost;
pub mod cost_report;
pub mod prices;
pub mod rate;
pub mod rating;
pub mod report;

pub use meter_clickhouse::{Error, Result};

/// Every rating, report and audit query with sample arguments written as SQL
/// literals, in bind order: the chDB test runs each of them on current
/// ClickHouse (the integration tests run them on the local 18.16 through
/// the functions that use them).
pub fn checked_queries() -> Vec<(String, String, Vec<&'static str>)> {
    let month = ["'2026-02-01'", "'2026-02-01'", "'acme'", "'acme'"];
    let range = ["1769904000", "1772323200", "''", "''"];
    let mut q: Vec<(String, String, Vec<&'static str>)> = vec![
        ("stored price book".into(), rating::SQL_STORED_PRICE_BOOK.into(), vec![]),
        ("month usage".into(), rating::SQL_MONTH_USAGE.into(), range.to_vec()),
        (
            "minute series".into(),
            rating::SQL_MINUTE_SERIES.into(),
            vec!["1769903940", "1772359200", "'acme'", "'acme'", "['compute/BoxUsage:t3.micro','database/InstanceUsage:db.t3.medium']"],
        ),
        ("stored rated usage".into(), rating::SQL_STORED_RATED_USAGE.into(), vec!["'2026-02-01'", "'2026-01'", "''", "''"]),
        ("stored invoice lines".into(), rating::SQL_STORED_INVOICE_LINES.into(), vec!["'2026-02-01'", "'2026-01'", "''", "''"]),
        ("stored invoices".into(), rating::SQL_STORED_INVOICES.into(), vec!["'2026-02-01'", "'2026-01'", "'acme'", "'acme'"]),
        ("hour usage".into(), rating::SQL_HOUR_USAGE.into(), vec!["1769904000", "1772323200", "''", "''", "['compute/BoxUsage:m5.large']"]),
        ("closed periods".into(), close::SQL_CLOSED.into(), vec!["'2026-02-01'", "''", "''"]),
        ("stored credit ledger".into(), rating::SQL_STORED_CREDIT_LEDGER.into(), vec!["'2026-02-01'", "''", "''"]),
        ("prior credit use".into(), rating::SQL_PRIOR_CREDIT_USE.into(), vec!["'2026-02-01'", "'acme'", "'acme'"]),
        ("audit credit ledger".into(), audit::SQL_LEDGER.into(), vec!["'2026-02-01'", "''", "''"]),
        ("audit adjusted usage".into(), audit::SQL_ADJUSTED_USAGE.into(), vec!["'2026-02-01'", "'Adjustment:2026-02:%'", "''", "''"]),
        ("audit closed lines".into(), audit::SQL_CLOSED_LINES.into(), vec!["'2026-02-01'", "'2026-01'", "'acme'"]),
        ("top customers".into(), cost::SQL_TOP_CUSTOMERS.into(), vec!["'2026-02-01'", "'2026-02-01'", "10"]),
        ("cur export".into(), cost::SQL_CUR.into(), month.to_vec()),
        ("audit rated by day".into(), audit::SQL_RATED_BY_DAY.into(), month.to_vec()),
        ("audit lines".into(), audit::SQL_LINES.into(), month.to_vec()),
        ("audit invoices".into(), audit::SQL_INVOICES.into(), month.to_vec()),
    ];
    for g in cost::CostGrouping::ALL {
        q.push((format!("cost by {g:?}"), cost::cost_sql(g), month.to_vec()));
    }
    for t in ["usage_minute", "usage_hour", "usage_day"] {
        q.push((format!("audit {t}"), audit::usage_sql(t), range.to_vec()));
    }
    q.extend(api::checked_queries());
    q
}
