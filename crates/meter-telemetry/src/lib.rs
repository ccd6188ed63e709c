//! Metrics and health of meterline's long-running services.
//!
//! Every service (agent, processor, sink) owns one [`Telemetry`]: a
//! Prometheus registry holding the metrics of its component and a [`Health`]
//! its loop keeps current. [`http::serve`] exposes both: `GET /metrics`
//! (Prometheus text format 0.0.4), `GET /health/live` and
//! `GET /health/ready`. Each stage registers its own metrics and the named
//! events that move them in its crate (`meter_processor::metrics`,
//! `meter_sink::metrics`, `meter_agent::metrics`); the librdkafka client
//! metrics every stage shares are here ([`kafka`]).
//!
//! Metric names and labels are a contract with the dashboards and alert rules
//! in `ops/` (see `ops/prometheus/alerts.yml`): `meter_<noun>_<verb>_total`,
//! units in the name, and no unbounded label values — never a customer id.
//! Counters of outcomes are advanced per committed batch, not per event, so
//! they cost nothing on the hot path and never count work that was rolled
//! back.

mod health;
pub mod http;
pub mod kafka;

use std::sync::Arc;

pub use health::Health;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The metrics registry and health of one service.
#[derive(Clone)]
pub struct Telemetry {
    registry: Registry,
    health: Arc<Health>,
    component: &'static str,
}

impl Telemetry {
    /// A registry with `meter_build_info` and `meter_up_since_timestamp_seconds`
    /// for `component` (`agent`, `processor` or `sink`).
    pub fn new(component: &'static str) -> Self {
        let registry = Registry::new();
        let t = Telemetry { registry, health: Arc::new(Health::new()), component };
        let info = t.gauge_vec("meter_build_info", "Build of the running meter binary; always 1.", &["component", "version"]);
        info.with_label_values(&[component, env!("CARGO_PKG_VERSION")]).set(1);
        let since = t.gauge("meter_up_since_timestamp_seconds", "Unix time at which this process started.");
        since.set(unix_seconds());
        t
    }

    pub fn component(&self) -> &'static str {
        self.component
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    // Registration can only fail on an invalid or duplicate name, which is a
    // bug in the registering crate, not something the outside world can
    // cause.

    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.registry.register(Box::new(c.clone())).expect("metric names are valid and registered once");
        c
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid metric"))
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid metric"))
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        self.register(prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric"))
    }
}

/// Buckets for durations of network round trips and transactions.
pub const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Unix time now, in seconds.
pub fn unix_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
