//! `meter audit --month YYYY-MM [--customer C]`: reconciles minute, hour and
//! day usage with each other, final usage with the rated lines, the daily
//! rated lines with the invoice lines and those with the invoice totals
//! (see `meter_clickhouse::audit`). Prints every difference; exit code 1
//! when there is any.

use std::process::ExitCode;

use anyhow::Context;
use meter_config::Config;
use meter_rating::YearMonth;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The month to audit, YYYY-MM (UTC).
    #[arg(long)]
    pub month: YearMonth,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
}

pub async fn run(cfg: &Config, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let client = meter_kafka::sink::connection(cfg).client()?;
    eprintln!("auditing {} ...", args.month);
    let r = meter_clickhouse::audit::audit(&client, args.month, args.customer.as_deref()).await.context("auditing")?;
    for d in &r.differences {
        println!("{d}");
    }
    let figures =
        format!("{} usage key-days, {} rated key-days, {} invoice lines, {} invoices", r.usage_keys, r.rated_keys, r.lines, r.invoices);
    if r.differences.is_empty() {
        println!("audit {}: ok ({figures}, 0 differences)", args.month);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("audit {}: FAILED ({figures}, {} differences)", args.month, r.differences.len());
        Ok(ExitCode::from(1))
    }
}
