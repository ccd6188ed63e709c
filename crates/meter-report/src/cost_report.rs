//! Cost reports (`meter report cost|invoice|top|cur`): tables for people,
//! CSV and JSON for machines. Amounts are exact decimals everywhere (JSON
//! carries them as strings); tables round full-precision amounts half to
//! even to the cent.

use std::io::Write;

use crate::cost::{self, CostGrouping};
use crate::rating::{decimal, AMOUNT_SCALE, FULL_SCALE};
use anyhow::Context;
use meter_config::Config;
use meter_rating::{Date, Decimal, InvoiceLine, RatedMonth, YearMonth};

use crate::report::{csv_field, group_digits, render, Format};

#[derive(clap::Args)]
pub struct CostArgs {
    /// The rated month, YYYY-MM.
    #[arg(long)]
    pub month: YearMonth,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
    #[arg(long, value_enum, default_value_t = CostBy::Customer)]
    pub by: CostBy,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CostBy {
    Customer,
    Service,
    UsageType,
    Day,
}

#[derive(clap::Args)]
pub struct InvoiceArgs {
    /// The customer.
    #[arg(long)]
    pub customer: String,
    /// The month, YYYY-MM; default: the current month (UTC).
    #[arg(long)]
    pub month: Option<YearMonth>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(clap::Args)]
pub struct TopArgs {
    /// The rated month, YYYY-MM.
    #[arg(long)]
    pub month: YearMonth,
    /// How many customers.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(clap::Args)]
pub struct CurArgs {
    /// The rated month, YYYY-MM.
    #[arg(long)]
    pub month: YearMonth,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
    /// Write the CSV here instead of stdout.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

/// A decimal without trailing zeros ("1.44", "0.0104", "12288").
fn plain(d: Decimal) -> String {
    d.normalize().to_string()
}

/// Cents for people: half to even, two places, digits grouped.
fn money(d: Decimal) -> String {
    let mut r = d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    r.rescale(2);
    let s = r.to_string();
    match s.split_once('.') {
        Some((int, frac)) => format!("{}.{frac}", group_digits(int)),
        None => group_digits(&s),
    }
}

/// A full-precision amount for people: every significant digit, at least
/// two places, digits grouped ("870.40", "4.9384", "1,177.60").
fn money_full(d: Decimal) -> String {
    let mut r = d.normalize();
    if r.scale() < 2 {
        r.rescale(2);
    }
    let s = r.to_string();
    match s.split_once('.') {
        Some((int, frac)) => format!("{}.{frac}", group_digits(int)),
        None => group_digits(&s),
    }
}

fn full(m: i128) -> anyhow::Result<Decimal> {
    Ok(decimal(m, FULL_SCALE)?)
}

fn cents(m: i128) -> anyhow::Result<Decimal> {
    Ok(decimal(m, AMOUNT_SCALE)?)
}

fn client(cfg: &Config) -> anyhow::Result<clickhouse::Client> {
    Ok(meter_clickhouse::Connection::from(&cfg.clickhouse).client()?)
}

pub async fn cost(cfg: &Config, args: &CostArgs) -> anyhow::Result<()> {
    let grouping = match args.by {
        CostBy::Customer => CostGrouping::Customer,
        CostBy::Service => CostGrouping::Service,
        CostBy::UsageType => CostGrouping::UsageType,
        CostBy::Day => CostGrouping::Day,
    };
    let rows = cost::cost_report(&client(cfg)?, args.month, args.customer.as_deref(), grouping).await.context("querying cost")?;
    print!("{}", render_cost(&rows, grouping, args.format)?);
    Ok(())
}

/// Renders a cost report. By day the billed column is the full-precision
/// daily sum rounded half to even (days have no billed amount of their own).
pub fn render_cost(rows: &[cost::CostRow], grouping: CostGrouping, format: Format) -> anyhow::Result<String> {
    let mut header: Vec<&str> = match grouping {
        CostGrouping::Customer => vec!["customer_id"],
        CostGrouping::Service => vec!["service"],
        CostGrouping::UsageType => vec!["service", "usage_type"],
        CostGrouping::Day => vec!["day"],
    };
    let keys = header.len();
    header.push("cost");
    if !matches!(format, Format::Table) {
        header.push("cost_full");
    }
    header.push("currency");
    let mut cells = Vec::new();
    let mut total = Decimal::ZERO;
    let mut total_full = Decimal::ZERO;
    for r in rows {
        let amount_full = full(r.amount_full)?;
        let amount = if grouping == CostGrouping::Day {
            amount_full.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven)
        } else {
            cents(r.amount)?
        };
        total += amount;
        total_full += amount_full;
        let mut c = vec![r.k1.clone()];
        if keys == 2 {
            c.push(r.k2.clone());
        }
        match format {
            Format::Table => c.push(money(amount)),
            _ => {
                let mut a = amount;
                a.rescale(2);
                c.push(a.to_string());
                c.push(plain(amount_full));
            }
        }
        c.push(r.currency.clone());
        cells.push(c);
    }
    let mut out = render(&header, &cells, &[keys], &[], format);
    if matches!(format, Format::Table) && !rows.is_empty() {
        let currency = rows.first().map(|r| r.currency.as_str()).unwrap_or("");
        out += &format!("total {} {currency}\n", money(total));
        if grouping == CostGrouping::Day {
            out += &format!("(daily costs at full precision add up to {}; invoices round each line)\n", plain(total_full));
        }
    }
    Ok(out)
}

pub async fn top(cfg: &Config, args: &TopArgs) -> anyhow::Result<()> {
    let rows = cost::top_customers(&client(cfg)?, args.month, args.limit).await.context("querying top customers")?;
    let header = ["rank", "customer_id", "total", "lines", "currency"];
    let mut cells = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let total = cents(r.total)?;
        let total = if matches!(args.format, Format::Table) { money(total) } else { total.to_string() };
        cells.push(vec![(i + 1).to_string(), r.customer_id.clone(), total, r.line_count.to_string(), r.currency.clone()]);
    }
    print!("{}", render(&header, &cells, &[0, 2, 3], &["rank", "lines"], args.format));
    Ok(())
}

fn tier_bounds(from: Decimal, up_to: Option<Decimal>) -> String {
    match up_to {
        Some(u) => format!("({}, {}]", plain(from), plain(u)),
        None => format!("> {}", plain(from)),
    }
}

/// Renders an invoice preview: one row per line, then one per tier of it
/// (and one for the free allowance used), then the total.
pub fn render_invoice(rated: &RatedMonth, customer: &str, open_days: usize, format: Format) -> String {
    let lines: Vec<&InvoiceLine> = rated.lines.iter().filter(|l| l.key.customer_id == customer).collect();
    let header = ["service", "usage_type", "region", "tier", "quantity", "pricing_unit", "unit_rate", "amount"];
    let mut cells = Vec::new();
    let table = matches!(format, Format::Table);
    for l in &lines {
        let amount = if table { money(l.amount) } else { l.amount.to_string() };
        let rate = l.unit_rate.map(plain).unwrap_or_default();
        cells.push(vec![
            l.key.service.clone(),
            l.key.usage_type.clone(),
            l.key.region.clone(),
            String::new(),
            plain(l.quantity),
            l.pricing_unit.clone(),
            rate,
            amount,
        ]);
        let tier_amount = |d: Decimal| if table { money_full(d) } else { plain(d) };
        let sub = |tier: String, q: Decimal, rate: String, amount: String| {
            let first = if table { "  ".to_owned() } else { l.key.service.clone() };
            let rest = if table { (String::new(), String::new()) } else { (l.key.usage_type.clone(), l.key.region.clone()) };
            vec![first, rest.0, rest.1, tier, plain(q), l.pricing_unit.clone(), rate, amount]
        };
        if !l.free_allowance_used.is_zero() {
            cells.push(sub("free".into(), l.free_allowance_used, "0".into(), tier_amount(Decimal::ZERO)));
        }
        if let Some(p) = l.packages {
            for t in &l.tiers {
                cells.push(sub(format!("{} packages", plain(p)), t.quantity, plain(t.unit_rate), tier_amount(t.amount)));
            }
        } else if l.tiers.len() > 1 || l.tiers.iter().any(|t| t.up_to.is_some() || !t.from.is_zero()) {
            for t in &l.tiers {
                cells.push(sub(tier_bounds(t.from, t.up_to), t.quantity, plain(t.unit_rate), tier_amount(t.amount)));
            }
        }
    }
    let total: Decimal = lines.iter().map(|l| l.amount).sum();
    match format {
        Format::Table => {
            let mut s = format!(
                "invoice preview: {customer}, {} (price-book version {}, {}), month to date{}\n",
                rated.month,
                rated.version_id,
                rated.currency,
                if open_days > 0 { format!(", {open_days} day windows not final yet") } else { String::new() }
            );
            s += &render(&header, &cells, &[4, 6, 7], &[], format);
            s += &format!("total {} {} ({} lines)\n", money(total), rated.currency, lines.len());
            s
        }
        Format::Csv => render(&header, &cells, &[], &[], format),
        Format::Json => {
            let value = serde_json::json!({
                "customer_id": customer,
                "month": rated.month.to_string(),
                "version_id": rated.version_id,
                "currency": rated.currency,
                "open_day_windows": open_days,
                "total": total.to_string(),
                "lines": lines,
            });
            serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
        }
    }
}

pub async fn invoice(cfg: &Config, args: &InvoiceArgs) -> anyhow::Result<()> {
    let month = match args.month {
        Some(m) => m,
        None => Date::from_millis(meter_model::now_ms()).context("the clock is outside the calendar")?.year_month(),
    };
    let client = client(cfg)?;
    let r = crate::rate::rate_from_clickhouse(cfg, &client, month, Some(&args.customer), true, true).await?;
    print!("{}", render_invoice(&r.rated, &args.customer, r.usage.open_days, args.format));
    Ok(())
}

fn iso(day: Date) -> String {
    format!("{day}T00:00:00Z")
}

pub async fn cur(cfg: &Config, args: &CurArgs) -> anyhow::Result<()> {
    let client = client(cfg)?;
    let mut cursor = cost::cur_cursor(&client, args.month, args.customer.as_deref())?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    writeln!(
        out,
        "line_item_id,line_item_type,usage_start,usage_end,customer_id,service,usage_type,resource_id,region,usage_amount,pricing_unit,unit_rate,cost,currency"
    )?;
    let mut n = 0u64;
    while let Some(r) = cursor.next().await.context("reading line items")? {
        let day = crate::rating::from_ch_date(r.day)?;
        let next = Date::from_millis(day.start_millis() + 86_400_000).context("day after the calendar")?;
        let fields = [
            r.line_id,
            r.line_type,
            iso(day),
            iso(next),
            r.customer_id,
            r.service,
            r.usage_type,
            r.resource_ids.join(" "),
            r.region,
            plain(full(r.quantity)?),
            r.pricing_unit,
            r.unit_rate.map(full).transpose()?.map(plain).unwrap_or_default(),
            plain(full(r.cost)?),
            r.currency,
        ];
        writeln!(out, "{}", fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","))?;
        n += 1;
        if n.is_multiple_of(50_000) {
            eprintln!("exported {n} line items ...");
        }
    }
    out.flush()?;
    eprintln!("exported {n} line items of {}", args.month);
    Ok(())
}
