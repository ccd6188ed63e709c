//! `meter serve`: meterline over HTTP.
//!
//! - `POST /v1/events` takes CloudEvents 1.0 JSON ([`cloudevents`]),
//!   checks them with the processor's own rules ([`meter_engine::Rules`])
//!   and produces them to `usage.events` with an idempotent producer, in
//!   the configured wire format and signed when the key's agent is
//!   enrolled. It answers 202 only once the broker acknowledged every event
//!   of the request ([`ingest`]).
//! - The `GET` routes answer usage, cost-to-date and invoice queries from
//!   ClickHouse through the configured (read-only) user ([`query`]).
//! - Bearer API keys, kept as SHA-256 hashes, scope every request to an
//!   agent id and customers ([`keys`]).
//!
//! The contract is `schemas/openapi/meter-serve.yaml`, served at
//! `GET /v1/openapi.yaml` and checked against this server by a test.

pub mod cloudevents;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod query;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use meter_config::{Config, Valid};
use meter_engine::Rules;
use meter_kafka::publish::Tuning;
use meter_kafka::Signal;
use meter_telemetry::Telemetry;
use prometheus::{HistogramVec, IntCounterVec, IntGauge};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::Semaphore;
use tracing::info;

use crate::error::ApiError;
use crate::keys::{ApiKeys, Principal};

/// The OpenAPI document this server implements.
pub const OPENAPI: &str = include_str!("../../../schemas/openapi/meter-serve.yaml");

/// Every route and method the server answers (the OpenAPI test compares
/// them with the document's paths).
pub const ROUTES: [(&str, &str); 6] = [
    ("post", "/v1/events"),
    ("get", "/v1/usage"),
    ("get", "/v1/customers/{customer}/cost"),
    ("get", "/v1/customers/{customer}/invoices/{month}"),
    ("get", "/v1/customers/{customer}/invoices/{month}/lines"),
    ("get", "/v1/openapi.yaml"),
];

/// What every handler shares.
pub struct AppState {
    pub cfg: Config,
    pub keys: ApiKeys,
    pub codec: meter_avro::Codec,
    pub rules: Rules,
    /// Replaced when librdkafka reports a fatal error (see
    /// [`AppState::mend_producer`]).
    producer: std::sync::RwLock<FutureProducer>,
    tuning: Tuning,
    pub clickhouse: clickhouse::Client,
    /// One permit per event handed to Kafka and not acknowledged yet.
    pub in_flight: Arc<Semaphore>,
    /// One permit per `POST /v1/events` in progress.
    pub posts: Arc<Semaphore>,
    pub metrics: Metrics,
}

pub struct Metrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
    /// Events by outcome: accepted, refused, overloaded, unacknowledged.
    pub events: IntCounterVec,
    pub in_flight: IntGauge,
}

impl Metrics {
    fn new(t: &Telemetry) -> anyhow::Result<Self> {
        let seconds = HistogramVec::new(
            prometheus::HistogramOpts::new("meter_serve_request_seconds", "Time to answer an API request, by route.")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["route"],
        )?;
        t.registry().register(Box::new(seconds.clone()))?;
        let events = t.counter_vec("meter_serve_events_total", "Events posted, by outcome.", &["outcome"]);
        // Every outcome from 0, so that `increase()` sees the first ones.
        for outcome in ["accepted", "refused", "overloaded", "unacknowledged"] {
            events.with_label_values(&[outcome]);
        }
        Ok(Metrics {
            requests: t.counter_vec("meter_serve_requests_total", "API requests answered, by route and status.", &["route", "status"]),
            seconds,
            events,
            in_flight: t.gauge("meter_serve_in_flight_events", "Events handed to Kafka and not acknowledged yet."),
        })
    }

    pub fn observe(&self, route: &'static str, status: StatusCode, started: Instant) {
        self.requests.with_label_values(&[route, status.as_str()]).inc();
        self.seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    }
}

impl AppState {
    /// The producer to hand a request's records to.
    pub fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// After failed deliveries: when `used` has a fatal error (an
    /// idempotent producer that lost its sequence, say), every later send
    /// would fail too, so it is replaced by a new producer (once, however
    /// many requests saw the error). What it had not delivered was answered
    /// 503 and is retried by the clients.
    pub fn mend_producer(&self, used: &FutureProducer) {
        let Some((code, reason)) = used.client().fatal_error() else { return };
        let mut current = self.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.client().native_ptr() != used.client().native_ptr() {
            return;
        }
        tracing::error!(?code, %reason, "the Kafka producer failed fatally; replacing it");
        match meter_kafka::publish::producer(&self.cfg.kafka, self.tuning) {
            Ok(p) => *current = p,
            Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot create a new Kafka producer; keeping the failed one"),
        }
    }
}

/// The principal of a request, or 401.
pub(crate) fn authenticate<'a>(app: &'a AppState, headers: &HeaderMap) -> Result<&'a Principal, ApiError> {
    app.keys
        .authenticate(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
}

/// The router over `app` (for `run` and for tests that bind it themselves).
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/usage", get(query::get_usage))
        .route("/v1/customers/{customer}/cost", get(query::get_cost))
        .route("/v1/customers/{customer}/invoices/{month}", get(query::get_invoice))
        .route("/v1/customers/{customer}/invoices/{month}/lines", get(query::get_invoice_lines))
        .route("/v1/openapi.yaml", get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }))
        .fallback(|| async { ApiError::not_found("no such route; see GET /v1/openapi.yaml").into_response() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see GET /v1/openapi.yaml",
            )
            .into_response()
        })
        .with_state(app)
}

/// Everything `meter serve` needs, from the configuration.
pub async fn state(cfg: &Valid<Config>, telemetry: &Telemetry) -> anyhow::Result<AppState> {
    let s = &cfg.serve;
    let configured = s.keys().map_err(|p| anyhow::anyhow!("serve: {}", p.join("; ")))?;
    let mismatches = keys::registry_mismatches(&configured, &cfg.processor.agents);
    if !mismatches.is_empty() {
        anyhow::bail!(
            "serve: the processor would dead-letter these keys' events as unauthorized after answering 202: {}; \
             register the agents in processor.agents or narrow the keys' customers",
            mismatches.join("; ")
        );
    }
    if cfg.processor.agents.is_empty() {
        tracing::info!("processor.agents is empty here: any agent may post for any customer (give serve the processor's registry to check keys against it)");
    }
    let keys = ApiKeys::new(&configured)?;
    // The processor's own settings, signature keys included: what serve
    // checks at its edge is what the processor will check.
    let engine = meter_processor::engine_config(cfg)?;
    let mismatches = keys.signature_mismatches(&engine.keys, cfg.processor.accept_unsigned);
    if !mismatches.is_empty() {
        anyhow::bail!(
            "serve: the processor would dead-letter these keys' events as bad_signature after answering 202: {}; \
             give the key the agent's signing_key_file",
            mismatches.join("; ")
        );
    }
    let rules = Rules::new(&cfg.catalog()?, engine);
    if keys.is_empty() {
        anyhow::bail!("serve: no API key is configured (serve.api_keys or serve.api_keys_file): every request would be refused");
    }
    meter_kafka::check_service_access(&cfg.kafka).await?;
    let (codec, _) = meter_kafka::registry::codec_for(cfg, &[meter_kafka::registry::Writes::Events])?;
    let tuning = Tuning {
        linger_ms: Some(5),
        queue_messages: Some((s.max_in_flight_events * 2).max(1000)),
        message_timeout_ms: Some(s.delivery_timeout_ms),
        bulk: true,
    };
    let producer = meter_kafka::publish::producer(&cfg.kafka, tuning)?;
    let connection = meter_clickhouse::Connection::from(&cfg.clickhouse);
    // A wrong password or certificate is refused at once; a ClickHouse that
    // does not answer yet is waited for by the queries (503 meanwhile).
    match connection.check(Duration::from_secs(10)).await {
        Err(e @ meter_clickhouse::Error::Refused(_)) => return Err(anyhow::anyhow!(e).context("ClickHouse refused meter serve")),
        Err(e) => tracing::warn!(error = %e, "ClickHouse does not answer yet; queries are answered 503 until it does"),
        Ok(()) => {}
    }
    let clickhouse = connection.client()?;
    Ok(AppState {
        rules,
        cfg: (**cfg).clone(),
        keys,
        codec,
        producer: std::sync::RwLock::new(producer),
        tuning,
        clickhouse,
        in_flight: Arc::new(Semaphore::new(s.max_in_flight_events)),
        posts: Arc::new(Semaphore::new(s.max_concurrent_posts)),
        metrics: Metrics::new(telemetry)?,
    })
}

/// Serves the API on `serve.listen` until `shutdown` is raised; requests
/// in progress are answered first. `bound` learns the address.
pub async fn run(
    cfg: &Valid<Config>,
    shutdown: Signal,
    telemetry: Telemetry,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let app = Arc::new(state(cfg, &telemetry).await?);
    let listen = cfg.serve.listen.trim();
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("serve.listen {listen}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, keys = app.keys.len(), topic = %cfg.topics.events, "serving the API");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    telemetry.health().set_live_timeout(Duration::from_millis(cfg.metrics.liveness_timeout_ms));
    telemetry.health().set_ready();
    let beat = {
        let t = telemetry.clone();
        tokio::spawn(async move {
            loop {
                t.health().beat();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let stop = shutdown.clone();
    let draining = telemetry.clone();
    axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async move {
            while !stop.is_raised() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Load balancers stop sending while the requests in progress finish.
            draining.health().set_not_ready("shutting down");
        })
        .await
        .context("serving the API")?;
    beat.abort();
    telemetry.health().set_not_ready("shutting down");
    let producer = app.producer();
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await?.context("flushing the producer")?;
    info!("API stopped");
    Ok(())
}
