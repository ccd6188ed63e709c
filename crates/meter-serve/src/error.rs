//! Every error answer: a status and `{"error", "message", "events"?}`
//! (the `Error` schema of `schemas/openapi/meter-serve.yaml`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One refused event of an ingestion request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventProblem {
    pub index: usize,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [EventProblem]>,
}

/// An answer other than success.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub events: Option<Vec<EventProblem>>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), events: None, retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// ClickHouse failed or did not answer in time.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u64) -> Self {
        ApiError { retry_after_s: Some(retry_after_s), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }

    pub fn with_events(mut self, events: Vec<EventProblem>) -> Self {
        self.events = Some(events);
        self
    }

    pub fn retry_after(mut self, s: u64) -> Self {
        self.retry_after_s = Some(s);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: self.code, message: &self.message, events: self.events.as_deref() };
        let text = serde_json::to_string(&body).unwrap_or_else(|_| format!("{{\"error\":\"{}\",\"message\":\"\"}}", self.code));
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], text).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"meterline\""));
        }
        r
    }
}
