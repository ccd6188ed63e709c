//! `meter agent`: the host sampler (default) or the simulated fleet
//! (`--simulate`), `--check` to validate a configuration and show what
//! would be emitted, `--report-usage` for the agent's own CPU and memory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use meter_agent::{procfs, run_agent, AgentMetrics, Source};
use meter_config::{Config, Valid};

use crate::SimArgs;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Run the deterministic fleet simulator instead of sampling this host.
    #[arg(long)]
    simulate: bool,
    #[command(flatten)]
    sim: SimArgs,
    /// Write the ground-truth ledger (CSV) here when done.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Simulated seconds per wall-clock second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    speed: f64,
    /// With --simulate: keep seqs and the spool in this folder, as the host
    /// agent does in `agent.state_dir`, so that a restarted run resumes
    /// where it stopped and nothing is lost while Kafka is down. Without
    /// it the simulator publishes from memory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Validate the configuration, print what the agent would emit, exit.
    #[arg(long)]
    check: bool,
    /// When done, print the agent's CPU time and resident memory
    /// (from /proc/self), e.g. for ops/bench-agent.
    #[arg(long)]
    report_usage: bool,
}

/// Raises the shutdown signal on SIGINT or SIGTERM.
fn shutdown_signal() -> meter_kafka::Signal {
    let s = meter_kafka::Signal::default();
    crate::on_signal(s.clone());
    s
}

pub async fn run(cfg: Valid<Config>, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let problems = if args.simulate { Vec::new() } else { cfg.agent.sampler_problems() };
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("invalid configuration: {p}");
        }
        return Ok(ExitCode::FAILURE);
    }
    if args.check {
        return check(&cfg, &args).await;
    }
    if args.simulate && args.state_dir.is_none() {
        let sc = args.sim.sim_config();
        let fleet = meter_agent::Simulator::new(sc.clone());
        println!("fleet: {} resources, {} customers", fleet.resource_count(), fleet.customers().len());
        drop(fleet);
        // From memory there is no spool: ticks and acknowledged events are
        // all there is to export.
        let metrics = AgentMetrics::register(&crate::telemetry(&cfg, "agent", "127.0.0.1:9466").await?);
        metrics.started(Duration::from_millis(cfg.metrics.liveness_timeout_ms));
        let (stats, ledger) =
            meter_agent::run_simulated_observed(&cfg, args.sim.sim_config(), args.speed, args.ledger.as_deref(), &metrics).await?;
        println!(
            "agent: {} events for {} simulated seconds in {:.1}s ({} ledger keys)",
            stats.events,
            stats.simulated_seconds,
            stats.elapsed.as_secs_f64(),
            ledger.entries.len()
        );
        if args.report_usage {
            println!("{}", usage_report(cfg.agent.clock_ticks_per_second, stats.elapsed)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (source, state_dir, identity) = if args.simulate {
        let sc = args.sim.sim_config();
        let identity = format!("simulator agent_id={} seed={} customers={} start={}", sc.agent_id, sc.seed, sc.customers, sc.start);
        let sim = meter_agent::Simulator::new(sc);
        println!("fleet: {} resources, {} customers", sim.resource_count(), sim.customers().len());
        let dir = args.state_dir.clone().unwrap_or_default();
        (Source::Simulated { sim: Box::new(sim), speed: args.speed }, dir, identity)
    } else {
        let identity = format!("host agent_id={}", cfg.agent.agent_id);
        (Source::host(&cfg.agent), cfg.agent.state_dir.clone(), identity)
    };
    let shutdown = shutdown_signal();
    let metrics = AgentMetrics::register(&crate::telemetry(&cfg, "agent", "127.0.0.1:9466").await?);
    metrics.started(Duration::from_millis(cfg.metrics.liveness_timeout_ms));
    let reporter = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                tracing::info!(summary = %metrics.summary(), "agent");
            }
        }
    });
    let run = run_agent(&cfg, &state_dir, &identity, source, metrics.clone(), shutdown, args.ledger.is_some()).await;
    reporter.abort();
    let run = match run {
        Ok(run) => run,
        // Another instance of this identity: a distinct exit code, so that
        // a supervisor does not restart it in a loop (the systemd unit's
        // RestartPreventExitStatus).
        Err(e) if e.downcast_ref::<meter_agent::lease::LeaseError>().is_some() => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(IDENTITY_CONFLICT));
        }
        Err(e) => return Err(e),
    };
    if let (Some(path), Some(ledger)) = (&args.ledger, &run.ledger) {
        std::fs::write(path, ledger.to_csv()).with_context(|| format!("writing ledger {}", path.display()))?;
    }
    println!("agent: {} in {:.1}s", metrics.summary(), run.elapsed.as_secs_f64());
    if args.report_usage {
        println!("{}", usage_report(cfg.agent.clock_ticks_per_second, run.elapsed)?);
    }
    if !run.drained {
        eprintln!(
            "agent: stopped with {} events not yet acknowledged; they stay in the spool for the next start",
            metrics.spool_backlog.get()
        );
    }
    if !run.checkpointed {
        eprintln!(
            "agent: the last checkpoint or dropped-ledger record could not be written (see the log; a full disk?); \
             nothing is lost: the next start sends again what the previous checkpoint does not cover"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit code of an agent that stopped because another instance has
/// its identity (a twin runs, or Kafka fenced its lease).
pub const IDENTITY_CONFLICT: u8 = 3;

async fn check(cfg: &Config, args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let a = &cfg.agent;
    println!("configuration: ok");
    println!("  kafka.brokers      {}", cfg.kafka.brokers);
    println!("  topics.events      {}", cfg.topics.events);
    println!("  agent.fsync        {:?}, spool up to {} bytes in segments of {}", a.fsync, a.spool_max_bytes, a.spool_segment_bytes);
    if args.simulate {
        let mut sim = meter_agent::Simulator::new(args.sim.sim_config());
        let mut events = Vec::new();
        sim.next_second(&mut events);
        println!("  source             simulator: {} customers, {} resources", sim.customers().len(), sim.resource_count());
        println!(
            "  state              {}",
            args.state_dir.as_ref().map_or("in memory (no --state-dir)".into(), |d| d.display().to_string())
        );
        println!("first second: {} events", events.len());
        for e in events.iter().take(20) {
            println!("  {} {:<14} {:<28} {:<22} {:>14}", e.customer_id, e.service, e.usage_type, e.resource_id, e.quantity);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("  agent              {} (customer {}, region {}, resource {})", a.agent_id, a.customer_id, a.region, a.host_resource_id());
    println!("  agent.state_dir    {}", a.state_dir.display());
    // Identity: what a start would use (nothing is created here).
    let machine = meter_agent::identity::machine_identity(&a.host_identity);
    match (&meter_agent::identity::recorded(&a.state_dir), machine.is_empty()) {
        (_, true) => println!(
            "  identity           WARNING: no machine identity (no /etc/machine-id, agent.host_identity unset): \
             a copy of this state dir on another host would keep its incarnation"
        ),
        (Some(r), false) if r.is_for(&a.agent_id, &machine) => {
            println!("  identity           incarnation {} (machine {machine})", r.incarnation)
        }
        (Some(r), false) => println!(
            "  identity           the recorded incarnation {} is of another machine or agent id: the next start begins a new one",
            r.incarnation
        ),
        (None, false) => println!("  identity           new state dir: the first start creates an incarnation (machine {machine})"),
    }
    match meter_agent::identity::signing_key(a.signing_key_file.as_deref()) {
        Ok(Some(k)) => println!("  signing            with key {}", k.id),
        Ok(None) => println!("  signing            none (events go unsigned; see processor.accept_unsigned)"),
        Err(e) => anyhow::bail!("{e:#}"),
    }
    // The spool must be writable; Kafka need not be up (the agent spools
    // until it is), so an unreachable broker is reported, not an error.
    let probe = a.state_dir.join(".check-probe");
    std::fs::create_dir_all(&a.state_dir)
        .and_then(|_| std::fs::write(&probe, b"ok"))
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("agent.state_dir {} is not writable", a.state_dir.display()))?;
    match meter_agent::spool::free_bytes(&a.state_dir) {
        Ok(free) if free < a.disk_reserve_bytes => println!(
            "  disk               WARNING: {free} bytes free, less than agent.disk_reserve_bytes ({}): \
             every tick is dropped (counted and recorded) until space is freed or the reserve lowered",
            a.disk_reserve_bytes
        ),
        Ok(free) if free < a.spool_max_bytes.saturating_add(a.disk_reserve_bytes) => println!(
            "  disk               WARNING: {free} bytes free, less than agent.spool_max_bytes ({}) + agent.disk_reserve_bytes ({}): \
             a long Kafka outage fills the disk before the spool, and ticks are dropped then (counted and recorded)",
            a.spool_max_bytes, a.disk_reserve_bytes
        ),
        Ok(free) => println!("  disk               {free} bytes free"),
        Err(e) => println!("  disk               free space unknown ({e})"),
    }
    println!("  kafka              {}", kafka_reachable(cfg).await);
    println!("  agent.proc_root    {}", a.proc_root.display());
    let Source::Host { mut sampler, proc_root, interfaces, disks } = Source::host(a) else { return Ok(ExitCode::FAILURE) };
    let first = procfs::read_sample(&proc_root, &interfaces, &disks).context("sampling /proc")?;
    println!("  interfaces         {}", first.net.keys().cloned().collect::<Vec<_>>().join(", "));
    println!("  disks              {}", first.disks.keys().cloned().collect::<Vec<_>>().join(", "));
    let mut ticks = Vec::new();
    let t0 = meter_model::now_ms();
    sampler.observe(first, t0, &mut ticks);
    tokio::time::sleep(Duration::from_millis((1000 - t0.rem_euclid(1000)) as u64 + 10)).await;
    let second = procfs::read_sample(&proc_root, &interfaces, &disks).context("sampling /proc")?;
    sampler.observe(second, meter_model::now_ms(), &mut ticks);
    for t in &ticks {
        println!("would emit for the second starting at {} ({} events):", t.time, t.events.len());
        for e in &t.events {
            println!("  {} {} {:<18} {:<24} {:>16}", e.customer_id, e.service, e.usage_type, e.resource_id, e.quantity);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether the brokers answer a metadata request within 5 s.
async fn kafka_reachable(cfg: &Config) -> String {
    let cfg = cfg.clone();
    let r = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = meter_kafka::client_config(&cfg.kafka).create()?;
        Ok(c.fetch_metadata(Some(&cfg.topics.events), Duration::from_secs(5))?.topics().len())
    })
    .await;
    match r {
        Ok(Ok(_)) => "reachable".into(),
        Ok(Err(e)) => format!("NOT reachable ({e:#}); the agent spools until it is"),
        Err(e) => format!("NOT checked ({e})"),
    }
}

/// CPU time and resident memory of this process, from /proc/self.
fn usage_report(clock_ticks: u64, wall: Duration) -> anyhow::Result<String> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may contain spaces), 1-based
    // from field 3: utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu_s = (ticks(14) + ticks(15)) as f64 / clock_ticks.max(1) as f64;
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let wall_s = wall.as_secs_f64().max(0.001);
    Ok(format!(
        "usage: cpu {:.2} s in {:.1} s wall = {:.2}% of one core; VmHWM {:.1} MB; VmRSS {:.1} MB",
        cpu_s,
        wall_s,
        100.0 * cpu_s / wall_s,
        kb("VmHWM:") as f64 / 1024.0,
        kb("VmRSS:") as f64 / 1024.0
    ))
}
