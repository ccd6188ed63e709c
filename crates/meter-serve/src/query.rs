//! The `GET` routes: usage per window, cost to date, stored invoices. All
//! read ClickHouse at the latest revision of every window.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meter_model::date::format_rfc3339;
use meter_model::{Date, YearMonth};
use meter_report::api::{Dim, UsageQuery, UsageRow, UsageWindow};
use meter_report::rating::{decimal, AMOUNT_SCALE, FULL_SCALE};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::{authenticate, AppState};

const PARAMS: [&str; 11] =
    ["customer", "from", "to", "window", "group_by", "service", "usage_type", "region", "resource", "format", "limit"];
const DEFAULT_LIMIT: u64 = 1000;

/// The caller may read `customer`.
fn reader<'a>(app: &'a AppState, headers: &HeaderMap, customer: &str) -> Result<&'a crate::keys::Principal, ApiError> {
    let who = authenticate(app, headers)?;
    if !who.reads() {
        return Err(ApiError::forbidden(format!("api key {:?} is an ingest key; it reads nothing", who.name)));
    }
    if !who.covers(customer) {
        return Err(ApiError::forbidden(format!("api key {:?} may not read customer {customer:?}", who.name)));
    }
    Ok(who)
}

/// Runs a ClickHouse read within `serve.query_timeout_ms`.
async fn read<T>(app: &AppState, what: &str, f: impl Future<Output = anyhow::Result<T>>) -> Result<T, ApiError> {
    let retry = app.cfg.serve.retry_after_s;
    match tokio::time::timeout(Duration::from_millis(app.cfg.serve.query_timeout_ms), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            // The cause (tables, users, SQL) is the operator's to read, not the client's.
            tracing::warn!(error = %format!("{e:#}"), "{what} failed");
            Err(ApiError::unavailable(format!("reading {what} from ClickHouse failed; the server's log has the cause"), retry))
        }
        Err(_) => Err(ApiError::unavailable(format!("ClickHouse did not answer within serve.query_timeout_ms reading {what}"), retry)),
    }
}

fn timed(app: &AppState, route: &'static str, started: Instant, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(|e| e.into_response());
    app.metrics.observe(route, r.status(), started);
    r
}

fn json_response(v: &Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// The parameters of a request, or the `Error` answer axum's own
/// rejection would have given as plain text.
type Params<T> = Result<T, ApiError>;

fn path<T>(p: Result<Path<T>, PathRejection>) -> Params<T> {
    p.map(|Path(v)| v).map_err(|e| ApiError::bad_request(format!("the path: {}", e.body_text())))
}

pub async fn get_usage(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let r = match params {
        Ok(Query(params)) => usage(&app, &headers, params).await,
        Err(e) => Err(ApiError::bad_request(format!("the query string: {}", e.body_text()))),
    };
    timed(&app, "usage", started, r)
}

/// The instant of a `from`/`to` parameter in epoch seconds.
fn instant(name: &str, s: &str) -> Result<u32, ApiError> {
    let ms = meter_model::date::parse_rfc3339_millis(s)
        .or_else(|_| meter_model::time::parse_instant(s))
        .map_err(|m| ApiError::bad_request(format!("{name}: {m}")))?;
    u32::try_from(ms.div_euclid(1000)).map_err(|_| ApiError::bad_request(format!("{name}: {s:?} is outside 1970..2106")))
}

async fn usage(app: &AppState, headers: &HeaderMap, params: Vec<(String, String)>) -> Result<Response, ApiError> {
    let mut p: HashMap<String, String> = HashMap::new();
    for (k, v) in params {
        if !PARAMS.contains(&k.as_str()) && k != "page_token" {
            return Err(ApiError::bad_request(format!("unknown parameter {k:?}; the parameters are {}, page_token", PARAMS.join(", "))));
        }
        if p.insert(k.clone(), v).is_some() {
            return Err(ApiError::bad_request(format!("parameter {k:?} is given twice")));
        }
    }
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default();
    let customer = get("customer");
    if customer.is_empty() {
        return Err(ApiError::bad_request("customer is required"));
    }
    reader(app, headers, customer)?;
    let (from, to) = match (p.get("from"), p.get("to")) {
        (Some(f), Some(t)) => (instant("from", f)?, instant("to", t)?),
        _ => return Err(ApiError::bad_request("from and to are required")),
    };
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    let window = match p.get("window") {
        None => UsageWindow::Day,
        Some(w) => UsageWindow::parse(w).ok_or_else(|| ApiError::bad_request(format!("window {w:?} is not minute, hour, day or month")))?,
    };
    if window == UsageWindow::Month {
        for (name, s) in [("from", from), ("to", to)] {
            let day =
                Date::from_millis(i64::from(s) * 1000).ok_or_else(|| ApiError::bad_request(format!("{name} is outside the calendar")))?;
            if day.day() != 1 || i64::from(s) * 1000 != day.start_millis() {
                return Err(ApiError::bad_request(format!("window=month: {name} must be the first day of a month (00:00 UTC)")));
            }
        }
    }
    let size_s = (window.granularity().size_ms() / 1000) as u64;
    let windows = u64::from(to - from).div_ceil(size_s);
    let max_windows = app.cfg.serve.max_query_windows;
    if windows > max_windows {
        return Err(ApiError::bad_request(format!(
            "from..to spans {windows} {} windows; serve.max_query_windows is {max_windows}: query a shorter span or a larger window",
            window.as_str()
        )));
    }
    let group_by = match p.get("group_by") {
        None => vec![Dim::Service, Dim::UsageType],
        Some(g) if g.is_empty() => Vec::new(),
        Some(g) => {
            let mut dims = Vec::new();
            for name in g.split(',') {
                let d = Dim::parse(name.trim())
                    .ok_or_else(|| ApiError::bad_request(format!("group_by {name:?} is not service, usage_type, region or resource")))?;
                if dims.contains(&d) {
                    return Err(ApiError::bad_request(format!("group_by names {name:?} twice")));
                }
                dims.push(d);
            }
            dims
        }
    };
    let csv = match get("format") {
        "" | "json" => false,
        "csv" => true,
        other => return Err(ApiError::bad_request(format!("format {other:?} is not json or csv"))),
    };
    let max = app.cfg.serve.max_page_rows as u64;
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT.min(max),
        Some(l) => l
            .parse::<u64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::bad_request(format!("limit {l:?} is not in 1..={max} (serve.max_page_rows)")))?,
    };
    let offset = match p.get("page_token") {
        None => 0,
        Some(t) => t.parse::<u64>().map_err(|_| ApiError::bad_request(format!("page_token {t:?} is not one this server gave")))?,
    };
    let q = UsageQuery {
        customer: customer.to_owned(),
        from_s: from,
        to_s: to,
        window,
        group_by: group_by.clone(),
        service: get("service").to_owned(),
        usage_type: get("usage_type").to_owned(),
        region: get("region").to_owned(),
        resource: get("resource").to_owned(),
        offset,
        limit,
    };
    let (rows, more) = read(app, "usage", async { Ok(meter_report::api::usage(&app.clickhouse, &q).await?) }).await?;
    let next = more.then(|| (offset + rows.len() as u64).to_string());
    let now = meter_model::now_ms();
    let lateness = app.cfg.processor.allowed_lateness_ms;
    let mut r = if csv {
        let mut out = String::from("window_start,window_end");
        for d in &group_by {
            out.push(',');
            out.push_str(d.as_str());
        }
        out.push_str(",quantity,event_count,is_final\n");
        for row in &rows {
            let (start, end, fin) = bounds(window, row, now, lateness);
            out.push_str(&format!("{},{}", format_rfc3339(start), format_rfc3339(end)));
            for v in &row.dims {
                out.push(',');
                out.push_str(&csv_field(v));
            }
            out.push_str(&format!(",{},{},{}\n", row.quantity, row.event_count, fin));
        }
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response()
    } else {
        let rows: Vec<RowOut<'_>> = rows
            .iter()
            .map(|row| {
                let (start, end, fin) = bounds(window, row, now, lateness);
                let mut out = RowOut {
                    window_start: format_rfc3339(start),
                    window_end: format_rfc3339(end),
                    service: None,
                    usage_type: None,
                    region: None,
                    resource: None,
                    quantity: row.quantity.to_string(),
                    event_count: row.event_count,
                    is_final: fin,
                };
                for (d, v) in group_by.iter().zip(&row.dims) {
                    let slot = match d {
                        Dim::Service => &mut out.service,
                        Dim::UsageType => &mut out.usage_type,
                        Dim::Region => &mut out.region,
                        Dim::Resource => &mut out.resource,
                    };
                    *slot = Some(v.as_str());
                }
                out
            })
            .collect();
        let page = PageOut {
            customer,
            window: window.as_str(),
            from: format_rfc3339(i64::from(from) * 1000),
            to: format_rfc3339(i64::from(to) * 1000),
            group_by: group_by.iter().map(|d| d.as_str()).collect(),
            rows,
            next_page_token: next.as_deref(),
        };
        let body = serde_json::to_string(&page).map_err(|e| ApiError::unavailable(format!("rendering the page: {e}"), 1))?;
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    if let Some(t) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        r.headers_mut().insert("x-next-page-token", t);
    }
    Ok(r)
}

/// One row of a usage page: the grouped dimensions only.
#[derive(Serialize)]
struct RowOut<'a> {
    window_start: String,
    window_end: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    /// A string: sums pass 2^53.
    quantity: String,
    event_count: i64,
    is_final: bool,
}

#[derive(Serialize)]
struct PageOut<'a> {
    customer: &'a str,
    window: &'a str,
    from: String,
    to: String,
    group_by: Vec<&'a str>,
    rows: Vec<RowOut<'a>>,
    next_page_token: Option<&'a str>,
}

/// A row's window in epoch ms and whether it is final: a month only once
/// every day window in it is and the month has closed (end + lateness).
fn bounds(window: UsageWindow, row: &UsageRow, now: i64, lateness: i64) -> (i64, i64, bool) {
    if window == UsageWindow::Month {
        let m = YearMonth::new((row.bucket / 100) as i32, row.bucket % 100);
        let (start, end) = m.map_or((0, 0), |m| (m.start_millis(), m.end_millis()));
        return (start, end, row.is_final && end + lateness <= now);
    }
    let start = i64::from(row.bucket) * 1000;
    (start, start + window.granularity().size_ms(), row.is_final)
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break. A
/// value that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`
/// first: resource ids and regions come from ingest clients) gets a `'`
/// in front.
fn csv_field(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@']) { format!("'{v}") } else { v.to_owned() };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

fn month_param(s: &str) -> Result<YearMonth, ApiError> {
    s.parse().map_err(|m: String| ApiError::bad_request(m))
}

fn dec(m: i128, scale: u32) -> Result<String, ApiError> {
    decimal(m, scale)
        .map(|d| plain(d, scale))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("a stored amount is out of range: {e}")))
}

/// A decimal without trailing zeros beyond `keep` places... except money,
/// which keeps its minor units.
fn plain(d: Decimal, scale: u32) -> String {
    if scale == AMOUNT_SCALE {
        d.to_string()
    } else {
        d.normalize().to_string()
    }
}

pub async fn get_invoice(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((customer, month)): Path<(String, String)>,
) -> Response {
    let started = Instant::now();
    let r = invoice(&app, &headers, &customer, &month, false).await;
    timed(&app, "invoice", started, r)
}

pub async fn get_invoice_lines(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let started = Instant::now();
    let r = match path(p) {
        Ok((customer, month)) => invoice(&app, &headers, &customer, &month, true).await,
        Err(e) => Err(e),
    };
    timed(&app, "invoice_lines", started, r)
}

async fn invoice(app: &AppState, headers: &HeaderMap, customer: &str, month: &str, lines: bool) -> Result<Response, ApiError> {
    reader(app, headers, customer)?;
    let month = month_param(month)?;
    let client = &app.clickhouse;
    let (stored, closed) = read(app, "the invoice", async {
        let stored = meter_report::api::stored_invoice(client, month, customer, lines).await?;
        let closed = meter_report::close::closed(client, month, Some(customer)).await?;
        Ok((stored, closed.contains_key(&(month, customer.to_owned()))))
    })
    .await?;
    let s = stored.ok_or_else(|| {
        ApiError::not_found(format!("no invoice of {customer:?} for {month} is stored (run `meter rate --month {month}`)"))
    })?;
    let i = &s.invoice;
    if !lines {
        return Ok(json_response(&json!({
            "customer": customer,
            "month": month.to_string(),
            "version_id": i.version_id,
            "invoice_id": i.invoice_id,
            "currency": i.currency,
            "total": dec(i.total, AMOUNT_SCALE)?,
            "line_count": i.line_count,
            "rated_at": format_rfc3339(i64::from(i.rated_at) * 1000),
            "closed": closed,
        })));
    }
    let mut out = Vec::with_capacity(s.lines.len());
    for l in &s.lines {
        out.push(json!({
            "line_id": l.line_id,
            "line_type": l.line_type,
            "service": l.service,
            "usage_type": l.usage_type,
            "region": l.region,
            "usage_quantity": l.usage_quantity.to_string(),
            "pricing_unit": l.pricing_unit,
            "quantity": dec(l.quantity, FULL_SCALE)?,
            "billable_quantity": dec(l.billable_quantity, FULL_SCALE)?,
            "unit_rate": l.unit_rate.map(|r| dec(r, FULL_SCALE)).transpose()?,
            "amount": dec(l.amount, AMOUNT_SCALE)?,
        }));
    }
    Ok(json_response(&json!({
        "customer": customer,
        "month": month.to_string(),
        "version_id": i.version_id,
        "currency": i.currency,
        "closed": closed,
        "lines": out,
    })))
}

pub async fn get_cost(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Result<Path<String>, PathRejection>) -> Response {
    let started = Instant::now();
    let r = match path(p) {
        Ok(customer) => cost(&app, &headers, &customer).await,
        Err(e) => Err(e),
    };
    timed(&app, "cost", started, r)
}

async fn cost(app: &AppState, headers: &HeaderMap, customer: &str) -> Result<Response, ApiError> {
    reader(app, headers, customer)?;
    let now = meter_model::now_ms();
    let month = Date::from_millis(now).ok_or_else(|| ApiError::unavailable("the clock is outside the calendar", 1))?.year_month();
    let client = &app.clickhouse;
    let r =
        read(app, "cost to date", meter_report::rate::rate_from_clickhouse(&app.cfg, client, month, Some(customer), true, true)).await?;
    let lines: Vec<&meter_rating::InvoiceLine> = r.rated.lines.iter().filter(|l| l.key.customer_id == customer).collect();
    let total: Decimal = lines.iter().map(|l| l.amount).sum();
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| {
            json!({
                "line_type": l.line_type.as_str(),
                "service": l.key.service,
                "usage_type": l.key.usage_type,
                "region": l.key.region,
                "quantity": l.quantity.normalize().to_string(),
                "pricing_unit": l.pricing_unit,
                "amount": l.amount.to_string(),
            })
        })
        .collect();
    Ok(json_response(&json!({
        "customer": customer,
        "month": month.to_string(),
        "as_of": format_rfc3339(now),
        "version_id": r.rated.version_id,
        "currency": r.rated.currency,
        "total": total.to_string(),
        "open_day_windows": r.usage.open_days,
        "lines": lines,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("i-0abc"), "i-0abc");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-1"), "'-1");
    }
}
