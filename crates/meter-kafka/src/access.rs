//! The check every stage makes of its Kafka settings at start
//! ([`check_access`]): a wrong password, a certificate the client does not
//! trust or a plain-text client on a TLS listener would otherwise show only
//! as librdkafka retrying forever in the background, and the service would
//! look idle rather than broken.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use meter_config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

use crate::client_config;

/// Why the brokers could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The brokers refused this client: credentials, TLS or protocol.
    /// Waiting does not help; the settings must change.
    #[error("Kafka refused the connection: {0}")]
    Refused(String),
    /// No broker answered in time (down, or not reachable from here).
    #[error("Kafka did not answer within {secs} s at {brokers}{last}")]
    Unreachable { brokers: String, secs: u64, last: String },
    /// The client could not be created from the settings.
    #[error("Kafka client settings: {0}")]
    Settings(#[from] KafkaError),
}

/// Records the errors librdkafka reports while connecting.
#[derive(Default)]
struct Recorder {
    refusal: Mutex<Option<String>>,
    last: Mutex<Option<String>>,
    /// Connections the broker closed at the client's first request.
    closed_at_first_request: std::sync::atomic::AtomicU32,
}

impl Recorder {
    fn note(&self, error: &KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let text = if reason.is_empty() { error.to_string() } else { reason.to_owned() };
        self.note_text(code, &text);
        if let Ok(mut l) = self.last.lock() {
            *l = Some(text);
        }
    }

    fn note_text(&self, code: Option<RDKafkaErrorCode>, text: &str) {
        let mut found = refusal(code, text);
        // A TLS listener closes a plain-text client's connection at its
        // first request (ApiVersion); librdkafka says only "Disconnected".
        // Twice in a row is not a broker restarting.
        if text.contains("Disconnected") && text.contains("APIVERSION_QUERY") {
            let n = self.closed_at_first_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n >= 2 {
                found.get_or_insert(format!(
                    "{text}: the broker closes every connection at its first request, as a TLS listener does to a plain-text client \
                     (check security.protocol: SSL or SASL_SSL for a TLS listener)"
                ));
            }
        }
        if let Some(refusal) = found {
            if let Ok(mut r) = self.refusal.lock() {
                r.get_or_insert(refusal);
            }
        }
    }
}

/// The refusal `text` describes, said with what to check, or `None` for a
/// broker that is merely unreachable.
fn refusal(code: Option<RDKafkaErrorCode>, text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Some(format!("{text} (check sasl.mechanism, sasl.username and sasl.password)"))
        }
        Some(RDKafkaErrorCode::SSL) => Some(format!("{text} (check ssl.ca.location, and the certificate and key the client presents)")),
        _ if lower.contains("security.protocol") || lower.contains("ssl handshake") => Some(text.to_owned()),
        _ if lower.contains("authorization") && lower.contains("failed") => Some(format!("{text} (check this principal's ACLs)")),
        _ => None,
    }
}

impl ClientContext for Recorder {
    fn error(&self, error: KafkaError, reason: &str) {
        self.note(&error, reason);
        tracing::warn!(error = %error, reason, "kafka: connecting");
    }

    /// Some of what tells a refusal apart comes in log lines only (a
    /// plain-text client on a TLS listener), not as errors.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        self.note_text(None, message);
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }
}

impl ConsumerContext for Recorder {}

/// Connects with `kafka`'s settings and asks for the cluster's metadata,
/// for up to `timeout`. A refusal (authentication, TLS, a plain-text client
/// on a TLS listener) is returned as soon as librdkafka reports it.
pub fn check_access(kafka: &KafkaConfig, timeout: Duration) -> Result<(), AccessError> {
    let recorder = Recorder::default();
    // librdkafka's log level follows the `log` crate's, off without a
    // logger; the connection's log lines are needed here whatever it is.
    let client: BaseConsumer<Recorder> =
        client_config(kafka).set_log_level(rdkafka::config::RDKafkaLogLevel::Info).create_with_context(recorder)?;
    let deadline = Instant::now() + timeout;
    loop {
        let asked = client.fetch_metadata(None, Duration::from_millis(500));
        // Serve the error callbacks of what happened meanwhile.
        let _ = client.poll(Duration::ZERO);
        let context = client.context();
        if let Some(refusal) = context.refusal.lock().ok().and_then(|r| r.clone()) {
            return Err(AccessError::Refused(refusal));
        }
        match asked {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let last = context.last.lock().ok().and_then(|l| l.clone()).unwrap_or_else(|| e.to_string());
                return Err(AccessError::Unreachable {
                    brokers: kafka.brokers.clone(),
                    secs: timeout.as_secs(),
                    last: format!(": {last}"),
                });
            }
            Err(_) => {}
        }
    }
}

/// [`check_access`] off the async runtime's threads.
pub async fn check_access_async(kafka: &KafkaConfig, timeout: Duration) -> Result<(), AccessError> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || check_access(&kafka, timeout))
        .await
        .unwrap_or_else(|e| Err(AccessError::Refused(format!("the connection check did not finish: {e}"))))
}

/// The start of a service (processor, sink): a refusal stops it; an
/// unreachable Kafka is logged and waited for, as the service always has.
pub async fn check_service_access(kafka: &KafkaConfig) -> Result<(), AccessError> {
    match check_access_async(kafka, Duration::from_secs(10)).await {
        Err(e @ AccessError::Unreachable { .. }) => {
            tracing::warn!(error = %e, "Kafka does not answer yet; starting anyway and waiting for it");
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka is built with TLS and the SASL mechanisms managed Kafka
    /// services ask for (SCRAM on MSK and Aiven, PLAIN on Confluent Cloud).
    #[test]
    fn librdkafka_is_built_with_tls_and_sasl() {
        let features = rdkafka::ClientConfig::new().create_native_config().unwrap().get("builtin.features").unwrap();
        for f in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer"] {
            assert!(features.split(',').any(|x| x == f), "builtin.features lacks {f}: {features}");
        }
    }

    #[test]
    fn refusals_are_told_apart_from_an_unreachable_broker() {
        let auth = "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512";
        assert!(refusal(Some(RDKafkaErrorCode::Authentication), auth).unwrap().contains("sasl.password"));
        let tls = "ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed";
        assert!(refusal(Some(RDKafkaErrorCode::SSL), tls).unwrap().contains("ssl.ca.location"));
        let plain = "127.0.0.1:9094/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10";
        assert!(refusal(Some(RDKafkaErrorCode::BrokerTransportFailure), plain).is_some());
        let r = Recorder::default();
        let closed = "127.0.0.1:9094/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 1ms in state APIVERSION_QUERY)";
        r.note_text(None, closed);
        assert!(r.refusal.lock().unwrap().is_none(), "once may be a broker restarting");
        r.note_text(None, closed);
        assert!(r.refusal.lock().unwrap().as_deref().unwrap().contains("security.protocol"));
        let down = "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused";
        assert_eq!(refusal(Some(RDKafkaErrorCode::BrokerTransportFailure), down), None);
        assert_eq!(refusal(Some(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down"), None);
    }

    #[test]
    fn a_broker_that_is_not_there_is_unreachable_after_the_timeout() {
        let kafka = KafkaConfig { brokers: "127.0.0.1:9".into(), ..KafkaConfig::default() };
        let started = Instant::now();
        let err = check_access(&kafka, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, AccessError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
