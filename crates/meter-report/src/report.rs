//! `meter report ...`: readable tables for people, CSV and JSON for machines.

use std::collections::HashMap;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use meter_clickhouse::{ReportGrouping, ReportRow};
use meter_config::Config;
use meter_model::Catalog;

use meter_model::time;

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Usage per customer and usage type between two instants (latest
    /// revision of each window).
    Usage(UsageArgs),
    /// Cost of a rated month by customer, service, usage type or day.
    Cost(crate::cost_report::CostArgs),
    /// Month-to-date invoice preview of one customer with its tier
    /// breakdown, rated now from usage in ClickHouse (nothing is written).
    Invoice(crate::cost_report::InvoiceArgs),
    /// Customers with the highest invoice totals of a rated month.
    Top(crate::cost_report::TopArgs),
    /// Cost-and-Usage-Report-style CSV of a rated month: one line item per
    /// customer, usage type, region and day.
    Cur(crate::cost_report::CurArgs),
}

#[derive(clap::Args)]
pub struct UsageArgs {
    /// Inclusive start: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
    #[arg(long, value_parser = time::parse_instant)]
    pub from: i64,
    /// Exclusive end, same forms.
    #[arg(long, value_parser = time::parse_instant)]
    pub to: i64,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
    #[arg(long, value_enum, default_value_t = By::Service)]
    pub by: By,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum By {
    Service,
    UsageType,
    Day,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub async fn run(cfg: &Config, cmd: ReportCommand) -> anyhow::Result<()> {
    match cmd {
        ReportCommand::Usage(args) => {
            let rows = usage(cfg, &args).await?;
            print!("{}", render_usage(&rows, args.by, args.format, &cfg.catalog()?));
        }
        ReportCommand::Cost(args) => crate::cost_report::cost(cfg, &args).await?,
        ReportCommand::Invoice(args) => crate::cost_report::invoice(cfg, &args).await?,
        ReportCommand::Top(args) => crate::cost_report::top(cfg, &args).await?,
        ReportCommand::Cur(args) => crate::cost_report::cur(cfg, &args).await?,
    }
    Ok(())
}

pub async fn usage(cfg: &Config, args: &UsageArgs) -> anyhow::Result<Vec<ReportRow>> {
    anyhow::ensure!(args.from < args.to, "--from must be before --to");
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).client()?;
    let grouping = match args.by {
        By::Service => ReportGrouping::Service,
        By::UsageType => ReportGrouping::UsageType,
        By::Day => ReportGrouping::Day,
    };
    let secs = |ms: i64| u32::try_from(ms.div_euclid(1000)).context("instant outside 1970..2106");
    meter_clickhouse::usage_report(&client, secs(args.from)?, secs(args.to)?, args.customer.as_deref(), grouping)
        .await
        .context("querying usage")
}

fn unit_of(catalog: &Catalog, service: &str, usage_type: &str) -> &'static str {
    let mut units: HashMap<&str, &'static str> = HashMap::new();
    for u in catalog.usage_types() {
        if u.service == service || service.is_empty() {
            units.insert(&u.name, u.base_unit.as_str());
        }
    }
    units.get(usage_type).copied().unwrap_or("")
}

/// Renders report rows; the table groups digits for people, CSV and JSON
/// keep exact integers (JSON quantities are strings: 128-bit sums do not fit
/// a JSON number safely).
pub fn render_usage(rows: &[ReportRow], by: By, format: Format, catalog: &Catalog) -> String {
    let mut header: Vec<&str> = vec!["customer_id"];
    if matches!(by, By::Day) {
        header.push("day");
    }
    if !matches!(by, By::UsageType) {
        header.push("service");
    }
    header.extend(["usage_type", "quantity", "unit", "events"]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![r.customer_id.clone()];
            if matches!(by, By::Day) {
                c.push(r.day.clone());
            }
            if !matches!(by, By::UsageType) {
                c.push(r.service.clone());
            }
            c.push(r.usage_type.clone());
            c.push(match format {
                Format::Table => group_digits(&r.quantity_sum.to_string()),
                _ => r.quantity_sum.to_string(),
            });
            c.push(unit_of(catalog, &r.service, &r.usage_type).to_owned());
            c.push(match format {
                Format::Table => group_digits(&r.event_count.to_string()),
                _ => r.event_count.to_string(),
            });
            c
        })
        .collect();
    render(&header, &cells, &[header.len() - 3, header.len() - 1], &["events"], format)
}

pub fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}

pub fn group_digits(s: &str) -> String {
    let (sign, digits) = s.strip_prefix('-').map_or(("", s), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

/// Rows as a table (columns in `right` right-aligned), CSV, or JSON objects
/// whose values are strings except for the columns in `numbers` (exact
/// decimals stay strings so no reader turns money into floating point).
pub fn render(header: &[&str], cells: &[Vec<String>], right: &[usize], numbers: &[&str], format: Format) -> String {
    match format {
        Format::Csv => {
            let mut s = header.join(",") + "\n";
            for c in cells {
                s += &c.iter().map(|v| csv_field(v)).collect::<Vec<_>>().join(",");
                s.push('\n');
            }
            s
        }
        Format::Json => {
            let items: Vec<serde_json::Value> = cells
                .iter()
                .map(|c| {
                    let mut m = serde_json::Map::new();
                    for (h, v) in header.iter().zip(c) {
                        let value = if numbers.contains(h) {
                            v.parse::<i64>().map_or_else(|_| v.clone().into(), Into::into)
                        } else {
                            v.clone().into()
                        };
                        m.insert((*h).to_owned(), value);
                    }
                    serde_json::Value::Object(m)
                })
                .collect();
            serde_json::to_string_pretty(&items).unwrap_or_default() + "\n"
        }
        Format::Table => table(header, cells, right),
    }
}

/// A plain text table; columns in `right` are right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = widths[i] - c.chars().count();
            if right.contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut s = line(header.to_vec());
    s += &line(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for r in rows {
        s += &line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        s += "(no rows)\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<ReportRow> {
        vec![ReportRow {
            customer_id: "cust-0001".into(),
            service: "compute".into(),
            usage_type: "BoxUsage:m5.large".into(),
            day: String::new(),
            event_count: 3600,
            quantity_sum: 1_234_567,
        }]
    }

    #[test]
    fn renders_table_csv_and_json() {
        let c = Catalog::builtin();
        let t = render_usage(&rows(), By::Service, Format::Table, &c);
        let want = [
            "customer_id  service  usage_type          quantity  unit     events",
            "-----------  -------  -----------------  ---------  -------  ------",
            "cust-0001    compute  BoxUsage:m5.large  1,234,567  seconds   3,600",
        ];
        assert_eq!(t, want.join("\n") + "\n");
        assert_eq!(
            render_usage(&rows(), By::Service, Format::Csv, &c),
            "customer_id,service,usage_type,quantity,unit,events\ncust-0001,compute,BoxUsage:m5.large,1234567,seconds,3600\n"
        );
        let j: serde_json::Value = serde_json::from_str(&render_usage(&rows(), By::Service, Format::Json, &c)).unwrap();
        assert_eq!(j[0]["quantity"], "1234567");
        assert_eq!(j[0]["events"], 3600);
    }

    #[test]
    fn groups_digits() {
        assert_eq!(group_digits("1234567"), "1,234,567");
        assert_eq!(group_digits("-123"), "-123");
        assert_eq!(group_digits("100"), "100");
    }
}
