//! `meter demo`: the whole pipeline on the local stack, then a usage report,
//! a reconciliation of ClickHouse and `usage.aggregates` against the
//! simulator's ledger, and the demo period rated with the sample price book
//! (cost by service).
//!
//! Each run uses fresh topics (suffixed with a run id) and consumer groups,
//! and recreates the `meterline_demo` database, so runs never mix.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use meter_clickhouse::Connection;
use meter_config::Config;
use meter_kafka::Signal;
use meter_model::Date;
use meter_report::cost_report::{self, CostArgs, CostBy};
use meter_report::prices::{self, PricesCommand};
use meter_report::report::{self, By, Format, UsageArgs};
use meter_sink::reconcile::reconcile;

use crate::rate;
use crate::SimArgs;

#[derive(clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// ClickHouse database for the demo; dropped and recreated.
    #[arg(long, default_value = "meterline_demo")]
    database: String,
    /// Where to write the ledger (CSV).
    #[arg(long)]
    ledger: Option<std::path::PathBuf>,
}

pub async fn run(base: Config, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let run_id = meter_model::now_ms();
    let mut cfg = base.scoped(&format!("demo-{run_id}"));
    cfg.clickhouse.database = args.database.clone();
    // Short idle timeout and commit interval: the demo's fleet stops, and
    // its windows should become final soon after.
    cfg.processor.idle_timeout_ms = 2_000;
    cfg.processor.commit_interval_ms = 500;
    // The demo's processor state is disposable: kept out of /var/lib.
    cfg.processor.state_dir = std::env::temp_dir().join("meter-demo-state");
    cfg.sink.batch_ms = 500;
    let cfg = cfg.validate()?;

    let started = Instant::now();
    let conn = Connection::from(&cfg.clickhouse);
    meter_clickhouse::check_identifier(&cfg.clickhouse.database)?;
    conn.server_client()?
        .query(&format!("DROP DATABASE IF EXISTS {}", cfg.clickhouse.database))
        .execute()
        .await
        .context("is ClickHouse running? (ops/up starts it)")?;
    meter_clickhouse::migrate(&conn).await.context("applying migrations")?;
    meter_kafka::admin::ensure_topics(&cfg).await.context("creating topics (is Kafka running? ops/up starts it)")?;
    println!("demo: topics {}, {}, {}; database {}", cfg.topics.events, cfg.topics.aggregates, cfg.topics.dlq, cfg.clickhouse.database);

    let cfg = Arc::new(cfg);
    let (proc_drain, sink_drain, stop) = (Signal::default(), Signal::default(), Signal::default());
    let processor = tokio::spawn({
        let (cfg, drain, stop) = (cfg.clone(), proc_drain.clone(), stop.clone());
        async move { meter_processor::run(&cfg, stop, drain).await }
    });
    let sink = tokio::spawn({
        let (cfg, drain, stop) = (cfg.clone(), sink_drain.clone(), stop.clone());
        async move { meter_sink::run(&cfg, stop, drain).await }
    });

    let sim = args.sim.sim_config();
    let (from, to) = (sim.start, sim.start + 1000 * sim.duration_s as i64);
    let (agent, ledger) = meter_agent::run_simulated(&cfg, sim, 0.0, args.ledger.as_deref()).await?;
    println!(
        "agent: {} events ({} simulated seconds, {} customers) in {:.1}s: {:.0} events/s",
        agent.events,
        agent.simulated_seconds,
        args.sim.customers,
        agent.elapsed.as_secs_f64(),
        agent.events as f64 / agent.elapsed.as_secs_f64().max(1e-9)
    );
    proc_drain.raise();
    let proc_stats = processor.await.context("processor task")??;
    let counters = &proc_stats.counters;
    let processed_at = started.elapsed();
    sink_drain.raise();
    let sink_stats = sink.await.context("sink task")??;
    println!(
        "processor: {} aggregated, {} duplicates, {} dead-lettered ({:.0} events/s while consuming)",
        counters.aggregated,
        counters.duplicates,
        counters.dead_lettered(),
        proc_stats.records_per_second()
    );
    println!(
        "sink: {} usage rows and {} dead letters in {} batches ({:.0} rows/s while inserting)",
        sink_stats.usage_rows,
        sink_stats.dead_letter_rows,
        sink_stats.batches,
        sink_stats.usage_rows as f64 / sink_stats.insert_time.as_secs_f64().max(1e-9)
    );
    println!("pipeline drained in {:.1}s (processor done at {:.1}s)\n", started.elapsed().as_secs_f64(), processed_at.as_secs_f64());

    let usage_args = UsageArgs { from, to, customer: None, by: By::Service, format: Format::Table };
    let rows = report::usage(&cfg, &usage_args).await?;
    println!(
        "usage {} .. {} (UTC), latest revision per window:\n",
        meter_model::time::format_date(from),
        meter_model::time::format_date(to)
    );
    print!("{}", report::render_usage(&rows, By::Service, Format::Table, &cfg.catalog()?));
    let families: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    println!("\nservice families: {}", families.into_iter().collect::<Vec<_>>().join(", "));

    let rec = reconcile(&cfg, &ledger).await?;
    println!("{}: {} windows, {} final (latest revision per window)", cfg.topics.aggregates, rec.windows, rec.final_windows);
    let mut ok = rec.mismatches.is_empty();
    if counters.aggregated != agent.events || counters.total() != agent.events {
        println!("processor outcomes {} do not match the {} events produced", counters.total(), agent.events);
        ok = false;
    }
    for (source, m) in rec.mismatches.iter().take(50) {
        println!("  mismatch in {source}: {m}");
    }
    if rec.mismatches.len() > 50 {
        println!("  ... and {} more", rec.mismatches.len() - 50);
    }
    println!("{}", rec.summary());

    // Rating: the sample price book, every month the demo touched.
    println!();
    prices::run(&cfg, PricesCommand::Load { file: None, replace: false }).await?;
    let month_of = |ms: i64| Date::from_millis(ms).map(Date::year_month).context("the demo period is not a calendar date");
    let last = month_of(to - 1)?;
    let mut month = month_of(from)?;
    loop {
        rate::run(&cfg, &rate::RateArgs { month, customer: None }).await?;
        println!("\ncost {month} by service (sample price book):\n");
        cost_report::cost(&cfg, &CostArgs { month, customer: None, by: CostBy::Service, format: Format::Table }).await?;
        if month >= last {
            break;
        }
        month = month_of(month.end_millis())?;
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
