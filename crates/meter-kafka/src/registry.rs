//! A client of a schema registry that serves the Confluent REST API
//! (Confluent Schema Registry, Apicurio's `ccompat` API, Karapace).
//!
//! Subjects follow TopicNameStrategy (`<topic>-value`) with BACKWARD
//! compatibility: a new version of a schema must read records of the
//! previous one. Writer schemas are looked up by id once and kept in the
//! process's [`SchemaStore`]; ids are global in the registry, so an id
//! always names the same schema.
//!
//! Blocking (the processor calls it from its own thread); from async code
//! call it inside `spawn_blocking`.

use std::time::Duration;

use meter_avro::SchemaStore;
use serde_json::json;

/// What went wrong talking to the registry. `retry` says whether asking
/// again can help (the registry was unreachable or answered 5xx), or not
/// (it refused the request: an incompatible schema, a bad URL).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("schema registry at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("schema registry refused {what}: HTTP {status}: {body}")]
    Refused { what: String, status: u16, body: String },
}

impl RegistryError {
    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Refused { status, .. } => *status >= 500,
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A registry at a base URL.
#[derive(Clone)]
pub struct Registry {
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("base", &self.base).finish()
    }
}

/// The subject of a topic's record values (TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

impl Registry {
    /// The registry at `base_url` (e.g. `http://127.0.0.1:8081/apis/ccompat/v7`);
    /// every request gives up after `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
        Registry { base: base_url.trim_end_matches('/').to_owned(), agent }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: ureq::Error) -> RegistryError {
        RegistryError::Unreachable { url: self.base.clone(), message: e.to_string() }
    }

    fn call(&self, what: &str, request: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<(u16, String)> {
        let mut response = request.map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(|e| self.unreachable(e))?;
        if status >= 500 {
            return Err(RegistryError::Refused { what: what.to_owned(), status, body });
        }
        Ok((status, body))
    }

    /// The schema the registry gave `id`, or `None` if it has no such id.
    pub fn schema_by_id(&self, id: u32) -> Result<Option<String>> {
        let what = format!("GET /schemas/ids/{id}");
        let (status, body) = self.call(&what, self.agent.get(&format!("{}/schemas/ids/{id}", self.base)).call())?;
        match status {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| RegistryError::Refused {
                    what: what.clone(),
                    status,
                    body: format!("not JSON ({e}): {body}"),
                })?;
                match v.get("schemaType").and_then(|t| t.as_str()) {
                    None | Some("AVRO") => {}
                    Some(other) => return Err(RegistryError::Refused { what, status, body: format!("schema {id} is {other}, not Avro") }),
                }
                v.get("schema").and_then(|s| s.as_str()).map(|s| Some(s.to_owned())).ok_or(RegistryError::Refused {
                    what,
                    status,
                    body: "no `schema` in the answer".into(),
                })
            }
            404 => Ok(None),
            _ => Err(RegistryError::Refused { what, status, body }),
        }
    }

    /// Registers `avsc` under `subject` (or finds it there) and returns its id.
    pub fn register(&self, subject: &str, avsc: &str) -> Result<u32> {
        let what = format!("registering a schema under {subject}");
        let body = json!({ "schema": avsc }).to_string();
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let (status, answer) = self.call(&what, self.agent.post(&url).header("Content-Type", CONTENT_TYPE).send(body.as_str()))?;
        if status != 200 {
            return Err(RegistryError::Refused { what, status, body: answer });
        }
        serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(RegistryError::Refused { what, status, body: answer })
    }

    /// Sets the compatibility level of `subject` (`BACKWARD`).
    pub fn set_compatibility(&self, subject: &str, level: &str) -> Result<()> {
        let what = format!("setting {level} compatibility on {subject}");
        let body = json!({ "compatibility": level }).to_string();
        let url = format!("{}/config/{subject}", self.base);
        let (status, answer) = self.call(&what, self.agent.put(&url).header("Content-Type", CONTENT_TYPE).send(body.as_str()))?;
        if status != 200 {
            return Err(RegistryError::Refused { what, status, body: answer });
        }
        Ok(())
    }

    /// Registers `avsc` as the value schema of `topic` with BACKWARD
    /// compatibility, and teaches `store` its id; returns the id.
    pub fn register_value_schema(&self, topic: &str, avsc: &str, store: &SchemaStore) -> Result<u32> {
        let subject = value_subject(topic);
        self.set_compatibility(&subject, "BACKWARD")?;
        let id = self.register(&subject, avsc)?;
        store.add_id(id, Some(avsc)).map_err(|e| RegistryError::Refused {
            what: format!("schema {id}"),
            status: 200,
            body: e.to_string(),
        })?;
        Ok(id)
    }

    /// Looks up every schema id of `ids` that `store` does not know yet and
    /// tells `store` the answer (a schema, or that there is none).
    pub fn learn_ids(&self, ids: impl IntoIterator<Item = u32>, store: &SchemaStore) -> Result<()> {
        for id in ids {
            if store.knows_id(id) {
                continue;
            }
            let schema = self.schema_by_id(id)?;
            if let Err(e) = store.add_id(id, schema.as_deref()) {
                // The registry answered something no Avro parser takes: the
                // records naming it are unknown, not a reason to stop.
                tracing::warn!(id, error = %e, "the registry's schema cannot be parsed; its records are dead-lettered");
                let _ = store.add_id(id, None);
            }
        }
        Ok(())
    }
}

/// Which of meterline's payloads a service writes, and so registers when
/// its topic is in the Confluent framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    Events,
    Aggregates,
    DeadLetters,
}

/// The codec of a service as `[serialization]` configures it: the legacy
/// fingerprint accepted or not, the configured writer schemas known, and
/// for each payload in `writes` whose topic is `confluent`, its schema
/// registered (subject `<topic>-value`, BACKWARD) and written with its id.
/// Returns the registry too when one is configured, for looking up the ids
/// of records from elsewhere.
pub fn codec_for(cfg: &meter_config::Config, writes: &[Writes]) -> anyhow::Result<(meter_avro::Codec, Option<Registry>)> {
    use anyhow::Context;
    use meter_config::Framing;
    let s = &cfg.serialization;
    let store = SchemaStore::default();
    let mut codec = meter_avro::Codec::with_store(&store)?;
    codec.events_mut().set_accept_legacy(s.accept_legacy_fingerprint);
    for path in &s.writer_schemas {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading writer schema {}", path.display()))?;
        store.add_schema(&text).with_context(|| format!("serialization.writer_schemas: {}", path.display()))?;
    }
    let registry =
        (!s.registry_url.trim().is_empty()).then(|| Registry::new(s.registry_url.trim(), Duration::from_millis(s.registry_timeout_ms)));
    for w in writes {
        let (framing, topic) = match w {
            Writes::Events => (s.events, &cfg.topics.events),
            Writes::Aggregates => (s.aggregates, &cfg.topics.aggregates),
            Writes::DeadLetters => (s.dlq, &cfg.topics.dlq),
        };
        if framing != Framing::Confluent {
            continue;
        }
        let registry = registry.as_ref().context("serialization.registry_url is not set")?;
        let framed = match w {
            Writes::Events => codec.events_mut(),
            Writes::Aggregates => codec.aggregates_mut(),
            Writes::DeadLetters => codec.dead_letters_mut(),
        };
        let id = registry
            .register_value_schema(topic, framed.avsc(), &store)
            .with_context(|| format!("registering the schema of {topic} with the schema registry"))?;
        framed.set_output(meter_avro::Output::Confluent { id });
        tracing::info!(topic = %topic, id, registry = registry.url(), "schema registered; records carry its id");
    }
    Ok((codec, registry))
}
