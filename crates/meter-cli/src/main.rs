//! `meter`: the one binary of meterline. Each subcommand is a thin shell
//! around a library crate.

mod agent;
mod demo;
mod rate;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meter_config::{Config, Valid};
use meter_kafka::Signal;
use meter_model::time;

#[derive(Parser)]
#[command(name = "meter", version, about = "meterline: per-second usage metering, exactly to the unit")]
struct Cli {
    /// Configuration file (TOML). Environment variables METER__SECTION__KEY
    /// override it.
    #[arg(long, short, global = true, env = "METER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the Kafka topics and apply ClickHouse migrations.
    Init,
    /// Apply ClickHouse migrations (idempotent).
    Migrate,
    /// Sample this host from /proc and publish its usage (the simulated
    /// fleet with --simulate), through an on-disk spool.
    Agent(agent::AgentArgs),
    /// Aggregate usage.events into windows on usage.aggregates, exactly once.
    Process {
        /// Exit once every assigned partition is consumed to its end and
        /// every window is final and committed (for backfills and tests).
        #[arg(long)]
        drain: bool,
    },
    /// The HTTP API: CloudEvents ingestion into usage.events, and usage,
    /// cost-to-date and invoice queries (schemas/openapi/meter-serve.yaml).
    Serve,
    /// Make an API key for `meter serve`: prints the token once (to give
    /// to the client) and the `[api_keys.<name>]` entry holding only its
    /// SHA-256 (for serve.api_keys_file; in the configuration itself it is
    /// `[serve.api_keys.<name>]`).
    ApiKey(ApiKeyArgs),
    /// Insert usage.aggregates and usage.dlq into ClickHouse.
    Sink {
        /// Exit once both topics are consumed to their end and inserted.
        #[arg(long)]
        drain: bool,
    },
    /// Fault-injection harness: agents with duplicates, reordering, late
    /// and poison input; two processors killed with SIGKILL again and
    /// again; the sink killed; the broker restarted; ClickHouse stopped.
    /// Then checks everything against the ledger. (Builds with the
    /// `testkit` feature only.)
    #[cfg(feature = "testkit")]
    Chaos(meter_testkit::chaos::ChaosArgs),
    /// The price book: `meter prices load` writes it to ClickHouse.
    Prices {
        #[command(subcommand)]
        command: meter_report::prices::PricesCommand,
    },
    /// Rate a month's final usage into rated lines, invoice lines and
    /// invoices (idempotent) and publish changed invoice lines.
    Rate(rate::RateArgs),
    /// Close a month once its correction horizon has passed: rate it a last
    /// time, freeze each invoice and publish a close record per customer to
    /// billing.period_close. Later usage for it is billed on the next open
    /// month as adjustments.
    Close(rate::CloseArgs),
    /// Reconcile a month: minute/hour/day usage, rated lines, invoice lines
    /// and invoices. Exit code 1 on any difference.
    Audit(meter_report::audit::AuditArgs),
    /// Reports from ClickHouse.
    Report {
        #[command(subcommand)]
        report: meter_report::report::ReportCommand,
    },
    /// Run agent, processor and sink on the local stack, then print a usage
    /// report and a reconciliation against the agent's ledger.
    Demo(demo::DemoArgs),
    /// Print any meterline topic as JSON lines, whatever framing and schema
    /// version its records carry.
    Tail(tail::TailArgs),
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// End-to-end benchmark on the local stack (run by ops/bench). (Builds
    /// with the `testkit` feature only.)
    #[cfg(feature = "testkit")]
    Bench(meter_testkit::bench::BenchArgs),
}

#[derive(clap::Args)]
struct ApiKeyArgs {
    /// The key's name (in logs and metrics).
    #[arg(long)]
    name: String,
    /// ingest, query or admin.
    #[arg(long)]
    role: String,
    /// ingest keys: the agent id of their events.
    #[arg(long, default_value = "")]
    agent_id: String,
    /// ingest and query keys: a customer they cover (repeat; `*`: any).
    #[arg(long = "customer")]
    customers: Vec<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE with the METER__* environment applied and print the
    /// effective configuration, secrets masked. Lists every problem at once
    /// and exits 2 when there is any.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
pub struct SimArgs {
    /// Seed of the simulated fleet.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of simulated customers.
    #[arg(long, default_value_t = 8)]
    customers: usize,
    /// Simulated usage to produce, e.g. 60s, 10m, 1h, 1d.
    #[arg(long, default_value = "10m", value_parser = time::parse_duration)]
    duration: std::time::Duration,
    /// Event time of the first second (YYYY-MM-DD[THH:MM:SSZ]); default:
    /// midnight UTC two days ago, so every window can be final.
    #[arg(long, value_parser = time::parse_instant)]
    start: Option<i64>,
    /// Agent id stamped on the events.
    #[arg(long, default_value = "sim-1")]
    agent_id: String,
}

impl SimArgs {
    pub fn sim_config(&self) -> meter_agent::SimConfig {
        let start = self.start.unwrap_or_else(|| time::day_floor(meter_model::now_ms()) - 2 * time::DAY_MS);
        meter_agent::SimConfig {
            seed: self.seed,
            customers: self.customers,
            agent_id: self.agent_id.clone(),
            start,
            duration_s: self.duration.as_secs(),
            customer_prefix: "cust-".into(),
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Raises `shutdown` on SIGINT or SIGTERM.
fn on_signal(shutdown: Signal) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: flushing and committing");
        shutdown.raise();
    });
}

/// The shutdown signal of a long-running service (raised by SIGINT or
/// SIGTERM) and its drain signal (raised from the start with `--drain`).
fn service_signals(drain: bool) -> (Signal, Signal) {
    let shutdown = Signal::default();
    on_signal(shutdown.clone());
    let drain_signal = Signal::default();
    if drain {
        drain_signal.raise();
    }
    (shutdown, drain_signal)
}

/// A telemetry registry for `component`, served on `metrics.listen` (or
/// `default_listen`) unless metrics are turned off.
pub(crate) async fn telemetry(
    cfg: &Valid<Config>,
    component: &'static str,
    default_listen: &str,
) -> anyhow::Result<meter_telemetry::Telemetry> {
    let t = meter_telemetry::Telemetry::new(component);
    if let Some(addr) = cfg.metrics.listen_or(default_listen) {
        meter_telemetry::http::serve(&addr, t.clone()).await?;
    }
    Ok(t)
}

fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    match Config::load(Some(file)) {
        Ok(cfg) => {
            print!("{}", cfg.to_masked_toml());
            if let Err(e) = cfg.catalog() {
                eprintln!("{}: catalog: {e}", file.display());
                return Ok(ExitCode::from(2));
            }
            if cfg.processor.agents.is_empty() {
                eprintln!("note: processor.agents is empty: any agent may publish usage for any customer");
            }
            let serve = match cfg.serve.keys() {
                Ok(keys) => meter_serve::keys::registry_mismatches(&keys, &cfg.processor.agents),
                Err(problems) => problems,
            };
            if !serve.is_empty() {
                eprintln!("{}: serve: {} problem(s):", file.display(), serve.len());
                for p in serve {
                    eprintln!("  - {p}");
                }
                return Ok(ExitCode::from(2));
            }
            eprintln!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(meter_config::ConfigError::Invalid(problems)) => {
            eprintln!("{}: {} problem(s):", file.display(), problems.len());
            for p in problems {
                eprintln!("  - {p}");
            }
            Ok(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::from(2))
        }
    }
}

fn api_key(args: &ApiKeyArgs) -> anyhow::Result<ExitCode> {
    let role: meter_config::ApiRole = serde_json::from_value(serde_json::Value::String(args.role.clone()))
        .map_err(|_| anyhow::anyhow!("--role {:?} is not ingest, query or admin", args.role))?;
    let token = meter_serve::keys::new_token()?;
    let key = meter_config::ApiKey {
        sha256: meter_serve::keys::to_hex(&meter_serve::keys::sha256(&token)),
        role,
        agent_id: args.agent_id.clone(),
        customers: args.customers.clone(),
        signing_key_file: None,
    };
    let mut keys = std::collections::BTreeMap::new();
    keys.insert(args.name.clone(), key);
    let cfg = meter_config::ServeConfig { api_keys: keys, ..Default::default() };
    let mut problems = meter_config::Problems::default();
    meter_config::Section::check(&cfg, &mut problems);
    if !problems.is_empty() {
        for p in problems.into_vec() {
            eprintln!("  - {p}");
        }
        return Ok(ExitCode::from(2));
    }
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        api_keys: &'a std::collections::BTreeMap<String, meter_config::ApiKey>,
    }
    // The token on stderr, once: stdout is the entry, safe to append to a file.
    eprintln!("token (give it to the client; it is not stored anywhere): {token}");
    print!("{}", toml::to_string(&Entry { api_keys: &cfg.api_keys })?);
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let load = || Config::load(cli.config.as_deref()).context("loading configuration");
    match cli.command {
        Command::Init => {
            init_logging("info");
            let cfg = load()?;
            meter_kafka::check_access_async(&cfg.kafka, std::time::Duration::from_secs(10)).await?;
            meter_kafka::admin::ensure_topics(&cfg).await?;
            let applied = meter_clickhouse::migrate(&(&cfg.clickhouse).into()).await.context("applying migrations")?;
            println!(
                "topics ready; migrations applied: {}",
                if applied.is_empty() { "none (up to date)".into() } else { applied.join(", ") }
            );
        }
        Command::Migrate => {
            init_logging("info");
            let cfg = load()?;
            let applied = meter_clickhouse::migrate(&(&cfg.clickhouse).into()).await.context("applying migrations")?;
            println!("migrations applied: {}", if applied.is_empty() { "none (up to date)".into() } else { applied.join(", ") });
        }
        Command::Agent(args) => {
            init_logging("info");
            return agent::run(load()?, args).await;
        }
        Command::Process { drain } => {
            init_logging("info");
            let cfg = load()?;
            let (shutdown, drain) = service_signals(drain);
            let t = telemetry(&cfg, "processor", "127.0.0.1:9464").await?;
            let s = meter_processor::run_observed(&cfg, shutdown, drain, t).await?;
            let c = &s.counters;
            println!("processor: {} aggregated, {} duplicates, {} dead-lettered", c.aggregated, c.duplicates, c.dead_lettered());
        }
        Command::Sink { drain } => {
            init_logging("info");
            let cfg = load()?;
            let (shutdown, drain) = service_signals(drain);
            let t = telemetry(&cfg, "sink", "127.0.0.1:9465").await?;
            let s = meter_sink::run_observed(&cfg, shutdown, drain, t).await?;
            println!("sink: {} usage rows, {} dead letters in {} batches", s.usage_rows, s.dead_letter_rows, s.batches);
        }
        Command::Serve => {
            init_logging("info");
            let cfg = load()?;
            let shutdown = Signal::default();
            on_signal(shutdown.clone());
            let t = telemetry(&cfg, "serve", "127.0.0.1:9467").await?;
            meter_serve::run(&cfg, shutdown, t, None).await?;
        }
        Command::ApiKey(args) => return api_key(&args),
        Command::Report { report } => {
            init_logging("warn");
            let cfg = load()?;
            meter_report::report::run(&cfg, report).await?;
        }
        Command::Prices { command } => {
            init_logging("warn");
            meter_report::prices::run(&*load()?, command).await?;
        }
        Command::Rate(args) => {
            init_logging("warn");
            rate::run(&*load()?, &args).await?;
        }
        Command::Close(args) => {
            init_logging("warn");
            rate::close(&*load()?, &args).await?;
        }
        Command::Audit(args) => {
            init_logging("warn");
            return meter_report::audit::run(&*load()?, &args).await;
        }
        #[cfg(feature = "testkit")]
        Command::Chaos(args) => {
            init_logging("warn");
            let cfg = load()?;
            return meter_testkit::chaos::run(cfg.into_inner(), args).await;
        }
        Command::Config { command: ConfigCommand::Check { file } } => return check_config(&file),
        Command::Tail(args) => {
            init_logging("warn");
            let cfg = load()?;
            let shutdown = Signal::default();
            on_signal(shutdown.clone());
            return tail::run(&cfg, args, shutdown).await;
        }
        Command::Demo(args) => {
            init_logging("warn");
            let cfg = load()?;
            return demo::run(cfg.into_inner(), args).await;
        }
        #[cfg(feature = "testkit")]
        Command::Bench(args) => {
            init_logging("warn");
            return meter_testkit::bench::run(load()?.into_inner(), args).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
