//! Reconciliation of a month, per customer, usage type and day:
//!
//! 1. usage_minute = usage_hour = usage_day (latest revision of every
//!    window, final or not: the processor emits all three from the same
//!    events in the same commit);
//! 2. final usage_day = rated_usage.usage_quantity (what `meter rate` rated);
//! 3. sum of the daily costs = invoice line amount_full, and their usage =
//!    the line's usage_quantity;
//! 4. sum of a customer's billed invoice line amounts = the invoice total;
//! 5. per credit, its Credit lines' amounts = what the credit ledger says it
//!    used, its opening balance = its amount less what earlier months used,
//!    and opening - used - expired = remaining.
//!
//! Checks 3 and 4 cover every line type (usage, commitments, fees,
//! credits, adjustments); check 2 only usage lines, the ones with metered
//! usage behind them.
//!
//! For a customer whose month is closed, check 2 is per key over the
//! month: final usage = the frozen rated usage + the usage of the
//! adjustments later months billed for it (late usage not billed yet is a
//! difference until the next open month is rated); and 6. the closed
//! invoice is unchanged: its total, line count and checksum are those
//! `meter close` recorded.
//! The rating side is the price-book version rated last for the month.
//! Every difference is returned; none is hidden behind a tolerance (all
//! quantities are exact integers and all amounts exact decimals).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use clickhouse::Client;
use meter_config::Config;
use meter_rating::{Date, YearMonth};
use serde::Deserialize;

use crate::rating::{decimal, AMOUNT_SCALE, FULL_SCALE};
use crate::Result;

const DAY_S: u32 = 86_400;

/// Per (key, day) usage of one granularity table; binds: from, to, customer, customer.
pub fn usage_sql(table: &str) -> String {
    format!(
        "SELECT customer_id, service, usage_type, region, toUInt32(intDiv(toUInt32(window_start), {DAY_S})) AS day, \
                sum(q) AS quantity, sumIf(q, f = 1) AS final_quantity \
         FROM (SELECT customer_id, service, usage_type, region, resource_id, window_start, \
                      argMax(quantity_sum, revision) AS q, argMax(is_final, revision) AS f \
               FROM {table} \
               WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) AND (? = '' OR customer_id = ?) \
               GROUP BY customer_id, service, usage_type, region, resource_id, window_start) \
         GROUP BY customer_id, service, usage_type, region, day"
    )
}

/// Binds: month, month, customer, customer.
pub const SQL_RATED_BY_DAY: &str = "SELECT customer_id, service, usage_type, region, toUInt32(day) AS day, \
    sum(usage_quantity) AS quantity, sumIf(usage_quantity, line_type = 'Usage') AS usage_only, sum(cost) AS cost \
    FROM rated_usage FINAL WHERE month = toDate(?) AND version_id = (SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?)) \
      AND (? = '' OR customer_id = ?) \
    GROUP BY customer_id, service, usage_type, region, day";

/// Binds: month, month, customer, customer.
pub const SQL_LINES: &str = "SELECT customer_id, service, usage_type, region, usage_quantity, amount_full, amount \
    FROM invoice_lines FINAL WHERE month = toDate(?) AND version_id = (SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?)) \
      AND (? = '' OR customer_id = ?)";

/// Binds: month, month, customer, customer.
pub const SQL_INVOICES: &str = "SELECT customer_id, total FROM invoices FINAL \
    WHERE month = toDate(?) AND version_id = (SELECT argMax(version_id, revision) FROM invoices WHERE month = toDate(?)) \
      AND (? = '' OR customer_id = ?)";

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageDay {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    day: u32,
    quantity: i128,
    final_quantity: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RatedDay {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    day: u32,
    quantity: i128,
    usage_only: i128,
    cost: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Line {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    usage_quantity: i128,
    amount_full: i128,
    amount: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct InvoiceTotal {
    customer_id: String,
    total: i128,
}

/// One difference found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Which reconciliation: `minute/hour`, `hour/day`, `usage/rated`, `rated/line`, `lines/invoice`.
    pub check: &'static str,
    /// customer/service/usage_type/region[/day], or the customer.
    pub key: String,
    pub what: &'static str,
    pub left: String,
    pub right: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}: {} != {}", self.check, self.key, self.what, self.left, self.right)
    }
}

/// What an audit compared, and every difference.
#[derive(Debug, Default, Clone)]
pub struct AuditReport {
    pub usage_keys: usize,
    pub rated_keys: usize,
    pub lines: usize,
    pub invoices: usize,
    pub credits: usize,
    pub differences: Vec<Difference>,
}

type Key = (String, String, String, String);

fn key_str(k: &Key) -> String {
    format!("{}/{}/{}/{}", k.0, k.1, k.2, k.3)
}

fn day_str(day: u32) -> String {
    Date::from_millis(i64::from(day) * 86_400_000).map_or_else(|| day.to_string(), |d| d.to_string())
}

fn dec(m: i128, scale: u32) -> String {
    decimal(m, scale).map_or_else(|_| format!("{m}e-{scale}"), |d| d.to_string())
}

fn compare<V: PartialEq + Copy + Default>(
    out: &mut Vec<Difference>,
    check: &'static str,
    what: &'static str,
    left: &BTreeMap<(Key, u32), V>,
    right: &BTreeMap<(Key, u32), V>,
    show: impl Fn(V) -> String,
    with_day: bool,
) {
    let keys: std::collections::BTreeSet<&(Key, u32)> = left.keys().chain(right.keys()).collect();
    for k in keys {
        let (a, b) = (left.get(k).copied().unwrap_or_default(), right.get(k).copied().unwrap_or_default());
        if a != b {
            let key = if with_day { format!("{}/{}", key_str(&k.0), day_str(k.1)) } else { key_str(&k.0) };
            out.push(Difference { check, key, what, left: show(a), right: show(b) });
        }
    }
}

/// Audits `month` (optionally one customer).
pub async fn audit(client: &Client, month: YearMonth, customer: Option<&str>) -> Result<AuditReport> {
    let c = customer.unwrap_or("");
    let (from, to) = (month.start_millis().div_euclid(1000), month.end_millis().div_euclid(1000));
    let (from, to) = (u32::try_from(from).unwrap_or(0), u32::try_from(to).unwrap_or(u32::MAX));
    let mut usage: Vec<BTreeMap<(Key, u32), (i128, i128)>> = Vec::new();
    for table in ["usage_minute", "usage_hour", "usage_day"] {
        let rows: Vec<UsageDay> = client.query(&usage_sql(table)).bind(from).bind(to).bind(c).bind(c).fetch_all().await?;
        usage.push(
            rows.into_iter()
                .map(|r| (((r.customer_id, r.service, r.usage_type, r.region), r.day), (r.quantity, r.final_quantity)))
                .collect(),
        );
    }
    let m = month.first_day().to_string();
    let rated: Vec<RatedDay> = client.query(SQL_RATED_BY_DAY).bind(m.as_str()).bind(m.as_str()).bind(c).bind(c).fetch_all().await?;
    let lines: Vec<Line> = client.query(SQL_LINES).bind(m.as_str()).bind(m.as_str()).bind(c).bind(c).fetch_all().await?;
    let invoices: Vec<InvoiceTotal> = client.query(SQL_INVOICES).bind(m.as_str()).bind(m.as_str()).bind(c).bind(c).fetch_all().await?;

    let mut report = AuditReport { lines: lines.len(), invoices: invoices.len(), ..AuditReport::default() };
    let d = &mut report.differences;
    let all = |t: &BTreeMap<(Key, u32), (i128, i128)>| t.iter().map(|(k, v)| (k.clone(), v.0)).collect::<BTreeMap<_, _>>();
    let (minute, hour, day) = (all(&usage[0]), all(&usage[1]), all(&usage[2]));
    report.usage_keys = day.len();
    compare(d, "minute/hour", "quantity", &minute, &hour, |v: i128| v.to_string(), true);
    compare(d, "hour/day", "quantity", &hour, &day, |v: i128| v.to_string(), true);

    // Rating only prices final days; days that are not final yet are not expected in rated_usage.
    let final_day: BTreeMap<(Key, u32), i128> = usage[2].iter().filter(|(_, v)| v.1 != 0).map(|(k, v)| (k.clone(), v.1)).collect();
    let rated_usage: BTreeMap<(Key, u32), i128> = rated
        .iter()
        .filter(|r| r.usage_only != 0)
        .map(|r| (((r.customer_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone()), r.day), r.usage_only))
        .collect();
    report.rated_keys = rated_usage.len();
    let closed: BTreeMap<String, crate::close::ClosedPeriodRow> = crate::close::closed(client, month, customer)
        .await?
        .into_iter()
        .filter(|((m, _), _)| *m == month)
        .map(|((_, c), r)| (c, r))
        .collect();
    let is_closed = |k: &(Key, u32)| closed.contains_key(&k.0 .0);
    let open_part =
        |t: &BTreeMap<(Key, u32), i128>| t.iter().filter(|(k, _)| !is_closed(k)).map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>();
    let closed_month = |t: &BTreeMap<(Key, u32), i128>| {
        let mut out: BTreeMap<(Key, u32), i128> = BTreeMap::new();
        for (k, v) in t.iter().filter(|(k, _)| is_closed(k)) {
            *out.entry((k.0.clone(), 0)).or_default() += v;
        }
        out
    };
    compare(d, "usage/rated", "usage quantity", &open_part(&final_day), &open_part(&rated_usage), |v: i128| v.to_string(), true);
    if !closed.is_empty() {
        let mut billed = closed_month(&rated_usage);
        let prefix = format!("Adjustment:{month}:%");
        let adjusted: Vec<Adjusted> =
            client.query(SQL_ADJUSTED_USAGE).bind(m.as_str()).bind(prefix.as_str()).bind(c).bind(c).fetch_all().await?;
        let cut = format!("Adjustment:{month}:").len();
        for a in adjusted.into_iter().filter(|a| closed.contains_key(&a.customer_id)) {
            let usage_type = a.usage_type.get(cut..).unwrap_or_default().to_owned();
            *billed.entry(((a.customer_id, a.service, usage_type, a.region), 0)).or_default() += a.quantity;
        }
        compare(d, "usage/closed+adjusted", "usage quantity", &closed_month(&final_day), &billed, |v: i128| v.to_string(), false);
        for (cust, row) in &closed {
            let lines: Vec<ClosedLine> =
                client.query(SQL_CLOSED_LINES).bind(m.as_str()).bind(row.version_id.as_str()).bind(cust.as_str()).fetch_all().await?;
            let mut parts = Vec::with_capacity(lines.len());
            let mut total = 0i128;
            for l in lines {
                let t = l.line_type.parse().map_err(crate::Error::Value)?;
                total += l.amount;
                parts.push((l.line_id, t, decimal(l.amount, AMOUNT_SCALE)?));
            }
            let key = || ((cust.clone(), String::new(), String::new(), String::new()), 0u32);
            let one = |v: i128| BTreeMap::from([(key(), v)]);
            compare(d, "closed invoice", "total", &one(row.total), &one(total), |v: i128| dec(v, AMOUNT_SCALE), false);
            compare(
                d,
                "closed invoice",
                "line count",
                &one(i128::from(row.line_count)),
                &one(parts.len() as i128),
                |v: i128| v.to_string(),
                false,
            );
            let sum = meter_rating::close::checksum(&parts);
            if sum != row.checksum {
                d.push(Difference { check: "closed invoice", key: cust.clone(), what: "checksum", left: row.checksum.clone(), right: sum });
            }
        }
        for diff in d.iter_mut().filter(|x| x.check == "closed invoice") {
            diff.key = diff.key.trim_end_matches('/').to_owned();
        }
    }

    let mut rated_key: BTreeMap<(Key, u32), (i128, i128)> = BTreeMap::new();
    for r in &rated {
        let e = rated_key.entry(((r.customer_id.clone(), r.service.clone(), r.usage_type.clone(), r.region.clone()), 0)).or_default();
        e.0 += r.quantity;
        e.1 += r.cost;
    }
    let line_key: BTreeMap<(Key, u32), (i128, i128)> = lines
        .iter()
        .map(|l| {
            (((l.customer_id.clone(), l.service.clone(), l.usage_type.clone(), l.region.clone()), 0), (l.usage_quantity, l.amount_full))
        })
        .collect();
    let part = |t: &BTreeMap<(Key, u32), (i128, i128)>, i: usize| {
        t.iter().map(|(k, v)| (k.clone(), if i == 0 { v.0 } else { v.1 })).collect::<BTreeMap<_, _>>()
    };
    compare(d, "rated/line", "usage quantity", &part(&rated_key, 0), &part(&line_key, 0), |v: i128| v.to_string(), false);
    compare(d, "rated/line", "amount_full", &part(&rated_key, 1), &part(&line_key, 1), |v: i128| dec(v, FULL_SCALE), false);

    let mut per_customer: BTreeMap<(Key, u32), i128> = BTreeMap::new();
    for l in &lines {
        *per_customer.entry(((l.customer_id.clone(), String::new(), String::new(), String::new()), 0)).or_default() += l.amount;
    }
    let totals: BTreeMap<(Key, u32), i128> =
        invoices.iter().map(|i| (((i.customer_id.clone(), String::new(), String::new(), String::new()), 0), i.total)).collect();
    let before = d.len();
    compare(d, "lines/invoice", "total", &per_customer, &totals, |v: i128| dec(v, AMOUNT_SCALE), false);
    for diff in &mut d[before..] {
        diff.key = diff.key.trim_end_matches('/').to_owned();
    }

    // 5. The credit ledger against the Credit lines and earlier months.
    let ledger: Vec<LedgerRow> = client.query(SQL_LEDGER).bind(m.as_str()).bind(c).bind(c).fetch_all().await?;
    let credit_key = |cust: &str, credit: &str| ((cust.to_owned(), format!("Credit:{credit}"), String::new(), String::new()), 0);
    let mut credited: BTreeMap<(Key, u32), i128> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.usage_type.starts_with("Credit:")) {
        *credited.entry(((l.customer_id.clone(), l.usage_type.clone(), String::new(), String::new()), 0)).or_default() -= l.amount;
    }
    let used: BTreeMap<(Key, u32), i128> = ledger.iter().map(|r| (credit_key(&r.customer_id, &r.credit_id), r.used)).collect();
    let before = d.len();
    compare(d, "lines/ledger", "credit used", &credited, &used, |v: i128| dec(v, AMOUNT_SCALE), false);
    let opening: BTreeMap<(Key, u32), i128> = ledger.iter().map(|r| (credit_key(&r.customer_id, &r.credit_id), r.opening)).collect();
    let before_month = crate::rating::prior_credit_use(client, month, customer).await?;
    let mut expected_opening: BTreeMap<(Key, u32), i128> = BTreeMap::new();
    for r in &ledger {
        let used_before = before_month.get(&r.credit_id).map(|u| crate::rating::mantissa(*u, AMOUNT_SCALE)).transpose()?.unwrap_or(0);
        expected_opening.insert(credit_key(&r.customer_id, &r.credit_id), (r.amount - used_before).max(0));
    }
    compare(d, "ledger/earlier months", "opening", &expected_opening, &opening, |v: i128| dec(v, AMOUNT_SCALE), false);
    let remaining: BTreeMap<(Key, u32), i128> = ledger.iter().map(|r| (credit_key(&r.customer_id, &r.credit_id), r.remaining)).collect();
    let balance: BTreeMap<(Key, u32), i128> =
        ledger.iter().map(|r| (credit_key(&r.customer_id, &r.credit_id), r.opening - r.used - r.expired)).collect();
    compare(d, "ledger", "remaining", &balance, &remaining, |v: i128| dec(v, AMOUNT_SCALE), false);
    for diff in &mut d[before..] {
        diff.key = diff.key.trim_end_matches('/').to_owned();
    }
    report.credits = ledger.len();
    Ok(report)
}

/// Usage billed as adjustments of a closed month in later months (the version
/// rated last of each); binds: month, `Adjustment:<month>:%`, customer, customer.
pub const SQL_ADJUSTED_USAGE: &str = "SELECT customer_id, service, usage_type, region, sum(usage_quantity) AS quantity \
    FROM invoice_lines FINAL WHERE month > toDate(?) AND usage_type LIKE ? \
      AND (month, version_id) GLOBAL IN (SELECT month, argMax(version_id, revision) FROM invoices GROUP BY month) \
      AND (? = '' OR customer_id = ?) \
    GROUP BY customer_id, service, usage_type, region";

/// A closed invoice's lines; binds: month, version, customer.
pub const SQL_CLOSED_LINES: &str = "SELECT line_id, line_type, amount FROM invoice_lines FINAL \
    WHERE month = toDate(?) AND version_id = ? AND customer_id = ?";

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Adjusted {
    customer_id: String,
    service: String,
    usage_type: String,
    region: String,
    quantity: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ClosedLine {
    line_id: String,
    line_type: String,
    amount: i128,
}

/// The month's credit ledger; binds: month, customer, customer.
pub const SQL_LEDGER: &str = "SELECT customer_id, credit_id, amount, opening, used, expired, remaining \
    FROM credit_ledger FINAL WHERE month = toDate(?) AND (? = '' OR customer_id = ?)";

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LedgerRow {
    customer_id: String,
    credit_id: String,
    amount: i128,
    opening: i128,
    used: i128,
    expired: i128,
    remaining: i128,
}

/// `meter audit --month YYYY-MM [--customer C]`.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// The month to audit, YYYY-MM (UTC).
    #[arg(long)]
    pub month: YearMonth,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
}

/// Prints every difference; exit code 1 when there is any.
pub async fn run(cfg: &Config, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).client()?;
    eprintln!("auditing {} ...", args.month);
    let r = audit(&client, args.month, args.customer.as_deref()).await.context("auditing")?;
    for d in &r.differences {
        println!("{d}");
    }
    let figures =
        format!("{} usage key-days, {} rated key-days, {} invoice lines, {} invoices", r.usage_keys, r.rated_keys, r.lines, r.invoices);
    let figures = if r.credits > 0 { format!("{figures}, {} credits", r.credits) } else { figures };
    if r.differences.is_empty() {
        println!("audit {}: ok ({figures}, 0 differences)", args.month);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("audit {}: FAILED ({figures}, {} differences)", args.month, r.differences.len());
        Ok(ExitCode::from(1))
    }
}
