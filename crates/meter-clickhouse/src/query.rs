//! Read queries: latest revision per window, and usage reports.

use clickhouse::Client;
use meter_model::ledger::{Ledger, LedgerKey, Totals};
use meter_model::Granularity;
use serde::{Deserialize, Serialize};

use crate::Result;

#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
struct TotalsRow {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    window_start: u32,
    event_count: i64,
    quantity_sum: i128,
}

/// The latest revision of every window of one granularity, summed over
/// resource_id, as ledger entries. Uses argMax(…, revision) so the answer
/// does not depend on whether ReplacingMergeTree has merged yet.
pub async fn latest_totals(client: &Client, granularity: Granularity) -> Result<Ledger> {
    let table = granularity.table();
    let sql = format!(
        "SELECT customer_id, service, usage_type, region, toUInt32(window_start) AS window_start, \
                sum(c) AS event_count, sum(q) AS quantity_sum \
         FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                      argMax(event_count, revision) AS c, argMax(quantity_sum, revision) AS q \
               FROM {table} \
               GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
         GROUP BY customer_id, service, usage_type, region, window_start"
    );
    let rows: Vec<TotalsRow> = client.query(&sql).fetch_all().await?;
    let mut ledger = Ledger::default();
    for r in rows {
        let key = LedgerKey {
            granularity,
            window_start: i64::from(r.window_start) * 1000,
            customer_id: r.customer_id,
            service: r.service,
            usage_type: r.usage_type,
            region: r.region,
        };
        ledger.entries.insert(key, Totals { event_count: r.event_count, quantity_sum: r.quantity_sum });
    }
    Ok(ledger)
}

/// How `meter report usage` groups rows (always per customer and usage type,
/// since quantities of different usage types have different units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportGrouping {
    /// customer, service, usage type
    Service,
    /// customer, usage type (across services)
    UsageType,
    /// customer, day, service, usage type
    Day,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct ReportRow {
    pub customer_id: String,
    /// Empty when grouped by usage type only.
    pub service: String,
    pub usage_type: String,
    /// `YYYY-MM-DD` when grouped by day, else empty.
    pub day: String,
    pub event_count: i64,
    pub quantity_sum: i128,
}

/// Usage between `from` and `to` (epoch seconds, `to` exclusive), from the
/// latest revision of each hourly window.
pub async fn usage_report(client: &Client, from: u32, to: u32, customer: Option<&str>, grouping: ReportGrouping) -> Result<Vec<ReportRow>> {
    let (service, day) = match grouping {
        ReportGrouping::Service => ("service", "''"),
        ReportGrouping::UsageType => ("''", "''"),
        ReportGrouping::Day => ("service", "toString(toDate(window_start))"),
    };
    let sql = format!(
        "SELECT customer_id, {service} AS service_, usage_type, {day} AS day, sum(c) AS event_count, sum(q) AS quantity_sum \
         FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                      argMax(event_count, revision) AS c, argMax(quantity_sum, revision) AS q \
               FROM usage_hour \
               WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) AND (? = '' OR customer_id = ?) \
               GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
         GROUP BY customer_id, service_, usage_type, day \
         ORDER BY customer_id, day, service_, usage_type"
    );
    let customer = customer.unwrap_or("");
    let rows = client.query(&sql).bind(from).bind(to).bind(customer).bind(customer).fetch_all().await?;
    Ok(rows)
}
