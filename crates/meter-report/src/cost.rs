//! Cost reports over the rating tables. Every filter is a bound parameter.
//!
//! A month's figures come from the price-book version rated last for it
//! (`argMax(version_id, revision)` over its invoices), so an older
//! version's lines never add to a newer one's.
//!
//! Cost by customer, service and usage type sums invoice lines: the billed
//! (rounded) amounts, which add up to the invoices exactly. Cost by day sums
//! the daily rated lines at full precision (a day has no billed amount of
//! its own); rounded per day they need not add up to the invoices to the
//! cent.

use clickhouse::Client;
use meter_rating::YearMonth;
use serde::Deserialize;

use crate::Result;

/// The version rated last for the month bound to the `?`.
pub const CURRENT_VERSION: &str = "(SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?))";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostGrouping {
    Customer,
    Service,
    /// service and usage type
    UsageType,
    Day,
}

impl CostGrouping {
    pub const ALL: [CostGrouping; 4] = [CostGrouping::Customer, CostGrouping::Service, CostGrouping::UsageType, CostGrouping::Day];
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct CostRow {
    /// customer_id, service, service or day (YYYY-MM-DD).
    pub k1: String,
    /// usage_type when grouped by usage type, else empty.
    pub k2: String,
    /// Billed amount, scale 2 (0 when grouped by day).
    pub amount: i128,
    /// Full-precision amount, scale 12.
    pub amount_full: i128,
    pub currency: String,
}

/// The SQL of a cost report; binds: month, month, customer, customer.
pub fn cost_sql(grouping: CostGrouping) -> String {
    let (k1, k2) = match grouping {
        CostGrouping::Customer => ("customer_id", "''"),
        CostGrouping::Service => ("service", "''"),
        CostGrouping::UsageType => ("service", "usage_type"),
        CostGrouping::Day => ("toString(day)", "''"),
    };
    let (table, amount, full, order) = match grouping {
        CostGrouping::Day => ("rated_usage", "toDecimal128(0, 2)", "sum(cost)", "k1, k2"),
        _ => ("invoice_lines", "sum(amount)", "sum(amount_full)", "amount DESC, k1, k2"),
    };
    format!(
        "SELECT {k1} AS k1, {k2} AS k2, {amount} AS amount, {full} AS amount_full, any(currency) AS currency \
         FROM {table} FINAL \
         WHERE month = toDate(?) AND version_id = {CURRENT_VERSION} AND (? = '' OR customer_id = ?) \
         GROUP BY k1, k2 ORDER BY {order}"
    )
}

fn month_arg(month: YearMonth) -> String {
    month.first_day().to_string()
}

/// Cost of `month` grouped as asked, optionally for one customer.
pub async fn cost_report(client: &Client, month: YearMonth, customer: Option<&str>, grouping: CostGrouping) -> Result<Vec<CostRow>> {
    let m = month_arg(month);
    let c = customer.unwrap_or("");
    Ok(client.query(&cost_sql(grouping)).bind(m.as_str()).bind(m.as_str()).bind(c).bind(c).fetch_all().await?)
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct TopRow {
    pub customer_id: String,
    /// Scale 2.
    pub total: i128,
    pub line_count: u32,
    pub currency: String,
}

/// Binds: month, month, limit.
pub const SQL_TOP_CUSTOMERS: &str = "SELECT customer_id, total, line_count, currency FROM invoices FINAL \
    WHERE month = toDate(?) AND version_id = (SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?)) \
    ORDER BY total DESC, customer_id LIMIT ?";

/// The `limit` customers with the highest invoice totals of `month`.
pub async fn top_customers(client: &Client, month: YearMonth, limit: u32) -> Result<Vec<TopRow>> {
    let m = month_arg(month);
    Ok(client.query(SQL_TOP_CUSTOMERS).bind(m.as_str()).bind(m.as_str()).bind(limit).fetch_all().await?)
}

/// One daily rated line as a Cost-and-Usage-Report line item.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct CurRow {
    pub line_id: String,
    /// Usage | Fee | Credit: the CUR's lineItem/LineItemType.
    pub line_type: String,
    /// ClickHouse Date (days since the epoch): the usage is [day, day + 1).
    pub day: u16,
    pub customer_id: String,
    pub service: String,
    pub usage_type: String,
    pub resource_ids: Vec<String>,
    pub region: String,
    /// Pricing units, scale 12.
    pub quantity: i128,
    pub pricing_unit: String,
    /// Scale 12, when the line has a single rate.
    pub unit_rate: Option<i128>,
    /// Scale 12.
    pub cost: i128,
    pub currency: String,
}

/// Binds: month, month, customer, customer.
pub const SQL_CUR: &str =
    "SELECT line_id, line_type, day, customer_id, service, usage_type, resource_ids, region, quantity, pricing_unit, \
    unit_rate, cost, currency FROM rated_usage FINAL \
    WHERE month = toDate(?) AND version_id = (SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?)) \
      AND (? = '' OR customer_id = ?) \
    ORDER BY customer_id, day, service, usage_type, region";

/// A cursor over the CUR line items of `month` (streamed: a month can hold
/// many lines).
pub fn cur_cursor(client: &Client, month: YearMonth, customer: Option<&str>) -> Result<clickhouse::query::RowCursor<CurRow>> {
    let m = month_arg(month);
    let c = customer.unwrap_or("");
    Ok(client.query(SQL_CUR).bind(m.as_str()).bind(m.as_str()).bind(c).bind(c).fetch()?)
}
