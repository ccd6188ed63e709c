//! What `meter serve` reads: a customer's usage per window, grouped and
//! filtered and paged, and a month's stored invoice with its lines.
//!
//! Every window is read at its latest revision (`argMax(x, revision)` per
//! window key, as the audit reads), so a retried or replayed insert and a
//! correction both count once. Only column names from [`Dim`] and
//! [`UsageWindow`] are written into the SQL; every value is bound.

use serde::Deserialize;

use crate::rating::{InvoiceLineRow, InvoiceRow, SQL_STORED_INVOICES, SQL_STORED_INVOICE_LINES};
use crate::Result;
use meter_model::{Granularity, YearMonth};

/// A dimension usage can be grouped by or filtered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Service,
    UsageType,
    Region,
    Resource,
}

impl Dim {
    pub const ALL: [Dim; 4] = [Dim::Service, Dim::UsageType, Dim::Region, Dim::Resource];

    /// The name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Service => "service",
            Dim::UsageType => "usage_type",
            Dim::Region => "region",
            Dim::Resource => "resource",
        }
    }

    fn column(self) -> &'static str {
        match self {
            Dim::Resource => "resource_id",
            other => other.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Dim> {
        Dim::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// The window size of a usage query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageWindow {
    Minute,
    Hour,
    Day,
    /// Day windows summed by calendar month (UTC).
    Month,
}

impl UsageWindow {
    pub fn parse(s: &str) -> Option<UsageWindow> {
        Some(match s {
            "minute" => UsageWindow::Minute,
            "hour" => UsageWindow::Hour,
            "day" => UsageWindow::Day,
            "month" => UsageWindow::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UsageWindow::Minute => "minute",
            UsageWindow::Hour => "hour",
            UsageWindow::Day => "day",
            UsageWindow::Month => "month",
        }
    }

    /// The windows read: a month sums day windows.
    pub fn granularity(self) -> Granularity {
        match self {
            UsageWindow::Minute => Granularity::Minute,
            UsageWindow::Hour => Granularity::Hour,
            UsageWindow::Day | UsageWindow::Month => Granularity::Day,
        }
    }

    fn table(self) -> &'static str {
        match self {
            UsageWindow::Minute => "usage_minute",
            UsageWindow::Hour => "usage_hour",
            UsageWindow::Day | UsageWindow::Month => "usage_day",
        }
    }

    /// The bucket column: the window start in epoch seconds, or for a
    /// month `YYYYMM`.
    fn bucket(self) -> &'static str {
        match self {
            UsageWindow::Month => "toUInt32(toYYYYMM(window_start))",
            _ => "toUInt32(window_start)",
        }
    }
}

/// One customer's usage query. `from`/`to` are epoch seconds (windows
/// starting in `[from, to)`); an empty filter matches everything.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub customer: String,
    pub from_s: u32,
    pub to_s: u32,
    pub window: UsageWindow,
    pub group_by: Vec<Dim>,
    pub service: String,
    pub usage_type: String,
    pub region: String,
    pub resource: String,
    pub offset: u64,
    pub limit: u64,
}

/// One row of a usage query: `dims` in the order of `group_by`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Epoch seconds, or `YYYYMM` for a month.
    pub bucket: u32,
    pub dims: Vec<String>,
    pub quantity: i128,
    pub event_count: i64,
    pub is_final: bool,
}

/// The SQL of a usage query grouped by `dims` over `window`; binds:
/// customer, from, to, then each filter twice (service, usage_type,
/// region, resource). Windows are read at their latest revision, then
/// summed per bucket and group; a group is final when all its windows are.
pub fn usage_sql(window: UsageWindow, dims: &[Dim], offset: u64, limit: u64) -> String {
    let group: String = dims.iter().map(|d| format!(", {}", d.column())).collect();
    // Every grouped dimension as one array column, so one row type serves
    // every grouping.
    let dims_array = if dims.is_empty() {
        "emptyArrayString()".to_owned()
    } else {
        format!("[{}]", dims.iter().map(|d| d.column()).collect::<Vec<_>>().join(", "))
    };
    format!(
        "SELECT bucket, {dims_array} AS dims, sum(q) AS quantity, sum(n) AS event_count, min(f) AS is_final \
         FROM (SELECT {bucket} AS bucket, service, usage_type, region, resource_id, \
                      argMax(quantity_sum, revision) AS q, argMax(event_count, revision) AS n, argMax(is_final, revision) AS f \
               FROM {table} \
               WHERE customer_id = ? AND window_start >= toDateTime(?) AND window_start < toDateTime(?) \
                 AND (? = '' OR service = ?) AND (? = '' OR usage_type = ?) AND (? = '' OR region = ?) AND (? = '' OR resource_id = ?) \
               GROUP BY service, usage_type, region, resource_id, window_start) \
         GROUP BY bucket{group} \
         ORDER BY bucket{group} \
         LIMIT {offset}, {limit}",
        bucket = window.bucket(),
        table = window.table(),
    )
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageRecord {
    bucket: u32,
    dims: Vec<String>,
    quantity: i128,
    event_count: i64,
    is_final: u8,
}

/// One page of `q`: up to `q.limit` rows, and whether there are more.
pub async fn usage(client: &clickhouse::Client, q: &UsageQuery) -> Result<(Vec<UsageRow>, bool)> {
    let sql = usage_sql(q.window, &q.group_by, q.offset, q.limit + 1);
    let mut query = client.query(&sql).bind(q.customer.as_str()).bind(q.from_s).bind(q.to_s);
    for f in [&q.service, &q.usage_type, &q.region, &q.resource] {
        query = query.bind(f.as_str()).bind(f.as_str());
    }
    let mut rows: Vec<UsageRow> = query
        .fetch_all::<UsageRecord>()
        .await?
        .into_iter()
        .map(|r| UsageRow { bucket: r.bucket, dims: r.dims, quantity: r.quantity, event_count: r.event_count, is_final: r.is_final == 1 })
        .collect();
    let more = rows.len() as u64 > q.limit;
    rows.truncate(q.limit as usize);
    Ok((rows, more))
}

/// The price-book version a month was rated with last (what reports read).
/// Binds: month.
pub const SQL_RATED_VERSION: &str =
    "SELECT argMax(version_id, revision) AS version_id, count() AS invoices FROM invoices WHERE month = toDate(?)";

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RatedVersion {
    version_id: String,
    invoices: u64,
}

/// A month's stored invoice of one customer, at the version rated last,
/// with its lines (none for a customer without usage lines).
#[derive(Debug, Clone)]
pub struct StoredInvoice {
    pub invoice: InvoiceRow,
    pub lines: Vec<InvoiceLineRow>,
}

/// The stored invoice of `customer` for `month`, or `None` when the month
/// is not rated or has no invoice for the customer. `with_lines` also
/// reads its lines.
pub async fn stored_invoice(
    client: &clickhouse::Client,
    month: YearMonth,
    customer: &str,
    with_lines: bool,
) -> Result<Option<StoredInvoice>> {
    let m = month.first_day().to_string();
    let v: RatedVersion = client.query(SQL_RATED_VERSION).bind(m.as_str()).fetch_one().await?;
    if v.invoices == 0 {
        return Ok(None);
    }
    let invoices: Vec<InvoiceRow> =
        client.query(SQL_STORED_INVOICES).bind(m.as_str()).bind(v.version_id.as_str()).bind(customer).bind(customer).fetch_all().await?;
    let Some(invoice) = invoices.into_iter().next() else { return Ok(None) };
    let lines = if with_lines {
        let all: Vec<InvoiceLineRow> = client
            .query(SQL_STORED_INVOICE_LINES)
            .bind(m.as_str())
            .bind(v.version_id.as_str())
            .bind(customer)
            .bind(customer)
            .fetch_all()
            .await?;
        // A line a re-rating dropped is stored zeroed (see rating::plan).
        all.into_iter().filter(|l| !(l.usage_quantity == 0 && l.quantity == 0 && l.amount_full == 0 && l.amount == 0)).collect()
    } else {
        Vec::new()
    };
    Ok(Some(StoredInvoice { invoice, lines }))
}

/// The queries above with sample arguments, for the chDB check.
pub(crate) fn checked_queries() -> Vec<(String, String, Vec<&'static str>)> {
    let filters = ["''", "''", "'us-east-1'", "'us-east-1'", "''", "''", "''", "''"];
    let mut q = Vec::new();
    for window in [UsageWindow::Minute, UsageWindow::Hour, UsageWindow::Day, UsageWindow::Month] {
        for dims in [&[][..], &[Dim::Service, Dim::UsageType][..], &Dim::ALL[..]] {
            let mut args = vec!["'acme'", "1769904000", "1772323200"];
            args.extend(filters);
            q.push((format!("api usage by {} {dims:?}", window.as_str()), usage_sql(window, dims, 10, 101), args));
        }
    }
    q.push(("api rated version".into(), SQL_RATED_VERSION.into(), vec!["'2026-02-01'"]));
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_column_names_are_written_into_the_sql() {
        let sql = usage_sql(UsageWindow::Month, &[Dim::Resource, Dim::Service], 0, 11);
        assert!(sql.contains("[resource_id, service] AS dims"), "{sql}");
        assert!(sql.contains("GROUP BY bucket, resource_id, service"), "{sql}");
        assert!(sql.contains("toYYYYMM(window_start)") && sql.contains("FROM usage_day"), "{sql}");
        assert!(sql.ends_with("LIMIT 0, 11"), "{sql}");
        assert_eq!(sql.matches('?').count(), 11);
        assert!(usage_sql(UsageWindow::Minute, &[], 5, 2).contains("emptyArrayString() AS dims"));
        assert_eq!(Dim::parse("resource"), Some(Dim::Resource));
        assert_eq!(Dim::parse("resource_id"), None);
    }
}
