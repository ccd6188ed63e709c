//! `POST /v1/events`: CloudEvents in, usage events on `usage.events`,
//! 202 only once the broker acknowledged every one of them.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meter_config::ApiRole;
use meter_model::{signing, DeadLetterReason, UsageEvent};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::warn;

use crate::cloudevents::{self, Framing};
use crate::error::{ApiError, EventProblem};
use crate::{authenticate, AppState};

/// The reason of an event outside its key's customers.
const FORBIDDEN: &str = "forbidden";

/// One event ready to produce: its key (the customer), payload and signature.
struct Record {
    event_id: String,
    customer: String,
    payload: Vec<u8>,
    signature: Option<String>,
}

pub async fn post_events(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let r = ingest(&app, &headers, body).await;
    let status = match &r {
        Ok(_) => StatusCode::ACCEPTED,
        Err(e) => e.status,
    };
    app.metrics.observe("events", status, started);
    match r {
        Ok(n) => (StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], format!("{{\"accepted\":{n}}}")).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn ingest(app: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<usize, ApiError> {
    let who = authenticate(app, headers)?;
    if who.role != ApiRole::Ingest {
        return Err(ApiError::forbidden(format!("api key {:?} is a {:?} key; only ingest keys post events", who.name, who.role)));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let framing = Framing::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {content_type:?}: send application/cloudevents+json (one event), \
                 application/cloudevents-batch+json (an array) or application/json"
            ),
        )
    })?;
    if let Some(enc) = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).filter(|e| !e.eq_ignore_ascii_case("identity")) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content encoding {enc:?}: send the body uncompressed"),
        ));
    }
    // Before the body is read: its memory is what this bounds.
    let Ok(_post) = app.posts.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!("more than serve.max_concurrent_posts ({}) requests are in progress", app.cfg.serve.max_concurrent_posts),
        )
        .retry_after(app.cfg.serve.retry_after_s));
    };
    let limit = app.cfg.serve.max_body_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(format!("the body is larger than serve.max_body_bytes ({limit} bytes)")));
    }
    let timeout = app.cfg.serve.body_timeout_ms;
    let bytes = match tokio::time::timeout(std::time::Duration::from_millis(timeout), axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(ApiError::too_large(format!("the body is larger than serve.max_body_bytes ({limit} bytes)"))),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within serve.body_timeout_ms ({timeout} ms)"),
            ))
        }
    };
    let events = cloudevents::split(&bytes, framing).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", m))?;
    let max = app.cfg.serve.max_batch_events;
    if events.len() > max {
        return Err(ApiError::too_large(format!("{} events in one request; serve.max_batch_events is {max}", events.len())));
    }
    if events.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_events", "the batch holds no event"));
    }
    let n = events.len();
    let overloaded = || {
        app.metrics.events.with_label_values(&["overloaded"]).inc_by(n as u64);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!("more than serve.max_in_flight_events ({}) events are waiting for the broker", app.cfg.serve.max_in_flight_events),
        )
        .retry_after(app.cfg.serve.retry_after_s)
    };
    // Cheap first: no parsing and encoding for a request that cannot fit.
    if app.in_flight.available_permits() < n {
        return Err(overloaded());
    }
    let records = prepare(app, who, events)?;
    // Room for every event of the request, or none of it is produced.
    let Ok(permit) = app.in_flight.clone().try_acquire_many_owned(n as u32) else { return Err(overloaded()) };
    // Produced in a task of its own: a client that hangs up drops this
    // handler, and must not release the permits (or skip the counters)
    // while librdkafka still holds its records.
    let task = {
        let app = app.clone();
        tokio::spawn(async move {
            app.metrics.in_flight.add(n as i64);
            let result = produce(&app, &records).await;
            app.metrics.in_flight.sub(n as i64);
            drop(permit);
            if result.is_ok() {
                app.metrics.events.with_label_values(&["accepted"]).inc_by(n as u64);
            }
            result
        })
    };
    match task.await {
        Ok(result) => result.map(|()| n),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("producing the request failed: {e}"))),
    }
}

/// Maps, checks and encodes every event; any refusal refuses the request.
fn prepare(app: &AppState, who: &crate::keys::Principal, events: Vec<cloudevents::RawEvent>) -> Result<Vec<Record>, ApiError> {
    let now = meter_model::now_ms();
    let mut problems = Vec::new();
    let mut records: Vec<Record> = Vec::with_capacity(events.len());
    // Event id -> where it first is in `records`: the same event twice is
    // one event to the processor, the same id with other content would be
    // dead-lettered there as event_id_conflict after the 202.
    let mut seen: std::collections::HashMap<String, (usize, usize)> = std::collections::HashMap::new();
    for (index, event) in events.iter().enumerate() {
        match prepare_one(app, who, event, now) {
            Ok(r) => match seen.get(&r.event_id) {
                Some(&(first, at)) if records[at].payload != r.payload => problems.push(EventProblem {
                    index,
                    reason: DeadLetterReason::EventIdConflict.as_str().into(),
                    detail: format!("event {index} has the source and id of event {first} with other content"),
                }),
                _ => {
                    seen.entry(r.event_id.clone()).or_insert((index, records.len()));
                    records.push(r);
                }
            },
            Err((reason, detail)) => problems.push(EventProblem { index, reason, detail }),
        }
    }
    if problems.is_empty() {
        return Ok(records);
    }
    app.metrics.events.with_label_values(&["refused"]).inc_by((records.len() + problems.len()) as u64);
    let denied = problems.iter().any(|p| p.reason == FORBIDDEN || p.reason == DeadLetterReason::Unauthorized.as_str());
    let total = records.len() + problems.len();
    let message = format!("{} of {total} events refused; nothing was produced", problems.len());
    Err(if denied { ApiError::forbidden(message) } else { ApiError::new(StatusCode::BAD_REQUEST, "invalid_events", message) }
        .with_events(problems))
}

fn prepare_one(
    app: &AppState,
    who: &crate::keys::Principal,
    raw: &serde_json::value::RawValue,
    now: i64,
) -> Result<Record, (String, String)> {
    let event = cloudevents::to_usage_event(raw, &who.agent_id).map_err(|d| (cloudevents::INVALID.to_owned(), d))?;
    if !who.covers(&event.customer_id) {
        return Err((FORBIDDEN.into(), format!("api key {:?} may not report usage for customer {:?}", who.name, event.customer_id)));
    }
    too_late(app, &event, now)?;
    let mut payload = Vec::with_capacity(256);
    app.codec.encode_event(&event, &mut payload);
    // The processor's own rules, on the bytes it will read.
    let decoded = app.codec.decode_event_ref(&payload).map_err(|e| (e.reason().as_str().to_owned(), e.to_string()))?;
    app.rules
        .check(&decoded, &payload, event.customer_id.as_bytes(), now)
        .map_err(|(reason, detail)| (reason.as_str().to_owned(), detail))?;
    let signature = who.signer.as_ref().map(|k| k.sign(&payload));
    Ok(Record { event_id: event.event_id, customer: event.customer_id, payload, signature })
}

/// Past the correction horizon, or within `serve.horizon_margin_ms` of
/// it: the processor judges an event against its watermark when it reads
/// it, which may be later than now (a lagging processor) and up to its
/// clock; an event it would dead-letter as `too_late` must not get a 202.
fn too_late(app: &AppState, e: &UsageEvent, now: i64) -> Result<(), (String, String)> {
    let horizon = app.cfg.processor.correction_horizon_ms;
    if app.rules.past_horizon(e.event_time, now.saturating_add(app.cfg.serve.horizon_margin_ms)) {
        return Err((
            DeadLetterReason::TooLate.as_str().into(),
            format!(
                "time is past the correction horizon ({horizon} ms), or within serve.horizon_margin_ms ({} ms) of it",
                app.cfg.serve.horizon_margin_ms
            ),
        ));
    }
    Ok(())
}

/// Hands every record to the producer, then waits for every
/// acknowledgement: Ok only if the broker acknowledged all of them.
async fn produce(app: &AppState, records: &[Record]) -> Result<(), ApiError> {
    let topic = app.cfg.topics.events.as_str();
    let producer = app.producer();
    let mut pending = Vec::with_capacity(records.len());
    let mut failed = 0usize;
    let mut first_error = None;
    for r in records {
        let mut record = FutureRecord::to(topic).key(r.customer.as_str()).payload(r.payload.as_slice());
        if let Some(sig) = &r.signature {
            record = record.headers(OwnedHeaders::new().insert(Header { key: signing::HEADER, value: Some(sig.as_str()) }));
        }
        match producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    for delivery in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                failed += 1;
                first_error.get_or_insert_with(|| "the producer went away".into());
            }
        }
    }
    if failed == 0 {
        return Ok(());
    }
    app.metrics.events.with_label_values(&["unacknowledged"]).inc_by(failed as u64);
    app.mend_producer(&producer);
    let error = first_error.unwrap_or_default();
    warn!(failed, of = records.len(), %error, "events not acknowledged by Kafka; answered 503");
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_acknowledged",
        format!(
            "{failed} of {} events were not acknowledged by Kafka ({error}); retry the whole request: \
             events already produced are counted once",
            records.len()
        ),
    )
    .retry_after(app.cfg.serve.retry_after_s))
}
