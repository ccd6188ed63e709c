//! Configuration of every meterline component, one TOML file per deployment.
//!
//! Layering, lowest to highest precedence: the defaults written on each field
//! (one `default_*` function per field, in the section's module), then the
//! TOML file (if any), then environment variables named
//! `METER__SECTION__KEY` (e.g. `METER__KAFKA__BROKERS`,
//! `METER__CLICKHOUSE__PASSWORD`). Secrets such as the ClickHouse password
//! belong in the environment or in a file of their own
//! (`clickhouse.password_file`, `kafka.properties."sasl.password_file"`),
//! never in the configuration file; environment values are text, so a
//! numeric-looking password stays a string.
//!
//! One module per section ([`kafka`], [`topics`], [`clickhouse`],
//! [`processor`], [`sink`], [`agent`], [`metrics`], [`rating`],
//! [`serialization`]); each checks
//! its own values ([`Section::check`]). [`Config::load`] reports every
//! problem of every section at once, each with its path, and returns the
//! configuration only as [`Valid`]: the services take a `&Valid<Config>`,
//! so nothing starts on a configuration that was not checked. Unknown
//! fields are rejected so that a misspelt key is an error rather than a
//! silently ignored setting.

pub mod agent;
pub mod clickhouse;
pub mod kafka;
pub mod metrics;
pub mod processor;
pub mod rating;
pub mod serialization;
pub mod serve;
pub mod sink;
pub mod topics;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use agent::{AgentConfig, FsyncPolicy};
pub use clickhouse::ClickHouseConfig;
pub use kafka::{KafkaConfig, KeyPartitioner};
pub use metrics::MetricsConfig;
pub use processor::ProcessorConfig;
pub use rating::{CatalogConfig, RatingConfig};
pub use serialization::{Framing, SerializationConfig};
pub use serve::{ApiKey, ApiRole, ServeConfig};
pub use sink::SinkConfig;
pub use topics::TopicsConfig;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The problems found in a configuration, each one message naming its
/// path (`section.key ...`).
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records `msg` unless `ok`.
    pub fn check(&mut self, ok: bool, msg: &str) {
        if !ok {
            self.0.push(msg.to_owned());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// A section of the configuration (or the whole of it) that checks its own
/// values.
pub trait Section: Sized {
    /// The section's name in the file: `[kafka]`.
    const NAME: &'static str;

    /// Records every invalid value.
    fn check(&self, problems: &mut Problems);

    /// This section once it has no problem, or every problem it has.
    fn validate(self) -> Result<Valid<Self>> {
        let mut p = Problems::default();
        self.check(&mut p);
        if p.is_empty() {
            Ok(Valid(self))
        } else {
            Err(ConfigError::Invalid(p.into_vec()))
        }
    }
}

/// A configuration (or section) that [`Section::validate`] found no problem
/// in. It reads like the value it holds; changing it means taking it out
/// ([`Valid::into_inner`]) and validating it again.
#[derive(Debug, Clone)]
pub struct Valid<T>(T);

impl<T> Valid<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Valid<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub topics: TopicsConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub processor: ProcessorConfig,
    #[serde(default)]
    pub sink: SinkConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub rating: RatingConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub serialization: SerializationConfig,
    #[serde(default)]
    pub serve: ServeConfig,
}

impl Section for Config {
    const NAME: &'static str = "";

    fn check(&self, p: &mut Problems) {
        self.kafka.check(p);
        self.topics.check(p);
        self.clickhouse.check(p);
        self.processor.check(p);
        self.sink.check(p);
        self.catalog.check(p);
        self.metrics.check(p);
        self.rating.check(p);
        self.agent.check(p);
        self.serialization.check(p);
        self.serve.check(p);
    }
}

/// The host name: the default identity of instances and agents.
pub fn default_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "meter".into())
}
const MASK: &str = "***";

/// The secret in `path`: its content less one trailing line ending. The
/// error names the file, never its content.
pub(crate) fn read_secret_file(path: &Path) -> std::result::Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(value.to_owned())
}

/// Pass-through librdkafka properties that carry credentials or key material.
fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "sasl.jaas.config", "sasl.oauthbearer.config", "ssl.key.pem", "ssl.keystore", "token"]
        .iter()
        .any(|s| k.contains(s))
}

/// Removes the value at `path` (object keys; array indices as numbers).
fn remove_path(tree: &mut serde_json::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = tree;
    for seg in parents {
        node = match node {
            serde_json::Value::Object(m) => match m.get_mut(seg) {
                Some(n) => n,
                None => return false,
            },
            serde_json::Value::Array(a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        serde_json::Value::Object(m) => m.remove(last).is_some(),
        serde_json::Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Text where the defaults have a number or a bool becomes that number or
/// bool when it reads as one (otherwise it is left, and reported as the
/// wrong type with its path). Every other value is left as it is.
fn coerce_like(tree: &mut serde_json::Value, like: &serde_json::Value) {
    use serde_json::Value;
    match (tree, like) {
        (Value::Object(t), Value::Object(l)) => {
            for (k, v) in t.iter_mut() {
                if let Some(lv) = l.get(k) {
                    coerce_like(v, lv);
                }
            }
        }
        (v, Value::Number(_)) => {
            if let Value::String(s) = &*v {
                let n = s.trim().parse::<i64>().map(Value::from).or_else(|_| s.trim().parse::<u64>().map(Value::from));
                if let Ok(n) = n {
                    *v = n;
                }
            }
        }
        (v, Value::Bool(_)) => {
            if let Value::String(s) = &*v {
                if let Ok(b) = s.trim().parse::<bool>() {
                    *v = Value::Bool(b);
                }
            }
        }
        _ => {}
    }
}

impl Config {
    /// Loads defaults, then `file` (if given), then `METER__*` variables,
    /// reads the secrets named by `..._file` settings, and validates the
    /// result, reporting every problem found.
    pub fn load(file: Option<&Path>) -> Result<Valid<Config>> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        // Environment values stay text here; `coerce_like` then parses only
        // those whose field is a number or a bool, so that a secret such as
        // METER__CLICKHOUSE__PASSWORD=007 stays the string "007".
        builder = builder.add_source(config::Environment::with_prefix("METER").prefix_separator("__").separator("__").try_parsing(false));
        let mut tree: serde_json::Value = builder.build()?.try_deserialize()?;
        let defaults = serde_json::to_value(Config::default()).map_err(|e| ConfigError::Invalid(vec![format!("defaults: {e}")]))?;
        coerce_like(&mut tree, &defaults);
        Config::from_tree(tree)
    }

    /// Deserializes the merged settings, collecting every field that cannot
    /// be read (unknown, or of the wrong type) and then every invalid value,
    /// so that one run reports all problems, each with its path.
    fn from_tree(mut tree: serde_json::Value) -> Result<Valid<Config>> {
        let mut problems = Vec::new();
        let cfg = loop {
            match serde_path_to_error::deserialize::<_, Config>(&tree) {
                Ok(cfg) => break cfg,
                Err(e) => {
                    let mut path: Vec<String> = e.path().iter().map(|s| s.to_string()).collect();
                    let message = e.inner().to_string();
                    // Make sure the path names an unknown field itself, not
                    // only its parent.
                    if let Some(field) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                        if path.last().map(String::as_str) != Some(field) {
                            path.push(field.to_owned());
                        }
                    }
                    problems.push(format!("{}: {message}", path.join(".")));
                    // Drop what could not be read and carry on, to find the
                    // rest; give up if it cannot be dropped (nothing to gain).
                    if problems.len() >= 100 || !remove_path(&mut tree, &path) {
                        return Err(ConfigError::Invalid(problems));
                    }
                }
            }
        };
        let mut cfg = cfg;
        let mut p = Problems::default();
        cfg.kafka.resolve_properties(&mut p);
        cfg.clickhouse.resolve_password(&mut p);
        cfg.check(&mut p);
        problems.extend(p.into_vec());
        if problems.is_empty() {
            Ok(Valid(cfg))
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The configuration as TOML, with secrets (passwords, SASL and TLS key
    /// material among the pass-through Kafka properties) replaced by `***`.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if !c.clickhouse.password.is_empty() {
            c.clickhouse.password = MASK.into();
        }
        for (k, v) in c.kafka.properties.iter_mut() {
            if is_secret_property(k) {
                *v = MASK.into();
            }
        }
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

    /// The configuration once every section is checked (see [`Section`]).
    pub fn validate(self) -> Result<Valid<Config>> {
        Section::validate(self)
    }

    /// This configuration with topics, consumer groups and the ClickHouse
    /// database of its own, named after `tag` (letters, digits, `-`, `.`,
    /// `_`): `{topic}.{tag}`, `{group_id}-{tag}` (and so the state topic),
    /// `{database}_{tag}`. The demo, the fault harness, the benchmark and
    /// the tests each run in such a scope, so that runs never share state.
    pub fn scoped(&self, tag: &str) -> Config {
        let mut c = self.clone();
        for topic in [
            &mut c.topics.events,
            &mut c.topics.aggregates,
            &mut c.topics.dlq,
            &mut c.topics.invoice_lines,
            &mut c.topics.period_close,
            &mut c.topics.agents,
        ] {
            *topic = format!("{topic}.{tag}");
        }
        if !c.topics.state.is_empty() {
            c.topics.state = format!("{}.{tag}", c.topics.state);
        }
        c.processor.group_id = format!("{}-{tag}", c.processor.group_id);
        c.sink.group_id = format!("{}-{tag}", c.sink.group_id);
        let db_tag: String = tag.chars().map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' }).collect();
        c.clickhouse.database = format!("{}_{db_tag}", c.clickhouse.database);
        c
    }

    /// The processor's state changelog topic.
    pub fn state_topic(&self) -> String {
        if self.topics.state.is_empty() {
            format!("{}-state", self.processor.group_id)
        } else {
            self.topics.state.clone()
        }
    }

    /// The catalog named by the configuration, or the built-in one.
    pub fn catalog(&self) -> Result<meter_model::Catalog, meter_model::catalog::CatalogError> {
        match &self.catalog.path {
            Some(p) => meter_model::Catalog::load(p),
            None => Ok(meter_model::Catalog::builtin()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid_and_match_ops() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.topics.events, "usage.events");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
    }

    #[test]
    fn file_values_override_defaults() {
        let f = write("[topics]\nevents = \"x.events\"\n[sink]\nbatch_rows = 7\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.topics.events, "x.events");
        assert_eq!(c.sink.batch_rows, 7);
        assert_eq!(c.topics.dlq, "usage.dlq");
    }

    #[test]
    fn agent_section_from_file_is_validated_reporting_every_problem() {
        let f = write("[agent]\ncustomer_id = \"cust-7\"\nfsync = \"always\"\nspool_max_bytes = 100000\nspool_segment_bytes = 65536\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.agent.customer_id, "cust-7");
        assert_eq!(c.agent.fsync, FsyncPolicy::Always);
        assert!(c.agent.sampler_problems().is_empty());
        assert!(!Config::default().agent.sampler_problems().is_empty(), "the sampler needs a customer");
        let f = write("[agent]\ncounter_bits = 16\nmax_in_flight = 0\nfsync = \"sometimes\"\n");
        assert!(Config::load(Some(f.path())).is_err());
        let f = write("[agent]\ncounter_bits = 16\nmax_in_flight = 0\n");
        let err = Config::load(Some(f.path())).unwrap_err().to_string();
        assert!(err.contains("agent.counter_bits") && err.contains("agent.max_in_flight"), "{err}");
        let f = write("[agent]\nspool_dir = \"/tmp\"\n");
        assert!(Config::load(Some(f.path())).is_err(), "unknown agent fields are rejected");
    }

    #[test]
    fn rating_section_and_invoice_topic() {
        let c = Config::default();
        assert_eq!(c.topics.invoice_lines, "billing.invoice_lines");
        assert_eq!(c.rating.price_book, None);
        let f = write("[rating]\nprice_book = \"/etc/meter/prices.toml\"\n[topics]\ninvoice_lines = \"b.lines\"\n");
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.rating.price_book.as_deref(), Some(Path::new("/etc/meter/prices.toml")));
        assert_eq!(c.topics.invoice_lines, "b.lines");
        let f = write("[rating]\nprice_bok = \"x\"\n[topics]\ninvoice_lines = \"\"\n");
        let Err(ConfigError::Invalid(problems)) = Config::load(Some(f.path())) else { panic!("accepted") };
        assert!(problems.iter().any(|p| p.starts_with("rating.price_bok")), "{problems:?}");
        assert!(problems.iter().any(|p| p == "topics.invoice_lines must not be empty"), "{problems:?}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        let f = write("[topics]\nevnts = \"x\"\n");
        assert!(Config::load(Some(f.path())).is_err());
        let f = write("[sink]\nbatch_rows = 0\n[processor]\ncommit_interval_ms = 0\n");
        let err = Config::load(Some(f.path())).unwrap_err().to_string();
        assert!(err.contains("sink.batch_rows") && err.contains("processor.commit_interval_ms"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let f = write(
            "[topics]\nevnts = \"x\"\n[processor]\ncommit_interval_ms = \"soon\"\nsession_timeout_ms = 10\n[sink]\nbatch_rows = 0\n[bogus]\nx = 1\n",
        );
        let ConfigError::Invalid(problems) = Config::load(Some(f.path())).unwrap_err() else { panic!("expected Invalid") };
        let all = problems.join("\n");
        assert_eq!(problems.len(), 5, "{all}");
        assert!(problems.iter().any(|p| p.starts_with("topics.evnts: unknown field `evnts`")), "{all}");
        assert!(problems.iter().any(|p| p.starts_with("bogus: unknown field `bogus`")), "{all}");
        assert!(problems.iter().any(|p| p.starts_with("processor.commit_interval_ms: invalid type: string \"soon\"")), "{all}");
        assert!(problems.iter().any(|p| p.contains("processor.session_timeout_ms must be at least 6000")), "{all}");
        assert!(problems.iter().any(|p| p.contains("sink.batch_rows must be positive")), "{all}");
    }

    #[test]
    fn masked_output_hides_secrets_and_keeps_the_rest() {
        let mut c = Config::default();
        c.clickhouse.password = "hunter2".into();
        c.kafka.properties.insert("sasl.password".into(), "s3cret".into());
        c.kafka.properties.insert("sasl.mechanism".into(), "PLAIN".into());
        c.processor.agents.insert("host-1".into(), vec!["cust-0001".into()]);
        let text = c.to_masked_toml();
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        assert!(text.contains("password = \"***\"") && text.contains("\"sasl.password\" = \"***\""), "{text}");
        assert!(text.contains("PLAIN") && text.contains("cust-0001"), "{text}");
        // What is printed loads back into the same configuration.
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.processor.agents, c.processor.agents);
    }

    #[test]
    fn secrets_come_from_files_named_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("kafka-password");
        std::fs::write(&secret, "0123\r\n").unwrap();
        let f = write(&format!(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password_file\" = {:?}\n[clickhouse]\npassword_file = {:?}\n",
            secret.display().to_string(),
            secret.display().to_string()
        ));
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.kafka.properties.get("sasl.password").map(String::as_str), Some("0123"));
        assert_eq!(c.kafka.properties.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        assert!(!c.kafka.properties.contains_key("sasl.password_file"), "{:?}", c.kafka.properties.keys());
        assert_eq!(c.clickhouse.password, "0123");
        let text = c.to_masked_toml();
        assert!(!text.contains("0123"), "{text}");
    }

    #[test]
    fn a_scoped_configuration_shares_no_topic_group_or_database() {
        let base = Config::default();
        let a = base.scoped("run-1.x");
        let b = base.scoped("run-2");
        for c in [&a, &b] {
            assert_ne!(c.topics.events, base.topics.events);
            assert_ne!(c.topics.invoice_lines, base.topics.invoice_lines);
            assert_ne!(c.state_topic(), base.state_topic());
            assert_ne!(c.sink.group_id, base.sink.group_id);
        }
        assert_eq!(a.topics.events, "usage.events.run-1.x");
        assert_eq!(a.clickhouse.database, "meterline_run_1_x");
        assert_ne!(a.state_topic(), b.state_topic());
        a.validate().unwrap();
    }

    /// The negative control of the fault harness breaks exactly-once on
    /// purpose: a release build must refuse it like any unknown key.
    #[cfg(not(feature = "testkit"))]
    #[test]
    fn the_release_build_refuses_the_negative_control_setting() {
        let f = write("[processor]\nunsafe_skip_state_restore = true\n");
        let Err(ConfigError::Invalid(problems)) = Config::load(Some(f.path())) else { panic!("accepted") };
        assert!(problems.iter().any(|p| p.starts_with("processor.unsafe_skip_state_restore: unknown field")), "{problems:?}");
    }

    #[test]
    fn metrics_listen_defaults_per_component_and_turns_off() {
        let mut m = MetricsConfig::default();
        assert_eq!(m.listen_or("127.0.0.1:9464").as_deref(), Some("127.0.0.1:9464"));
        m.listen = "off".into();
        assert_eq!(m.listen_or("127.0.0.1:9464"), None);
        m.listen = "0.0.0.0:9999".into();
        assert_eq!(m.listen_or("127.0.0.1:9464").as_deref(), Some("0.0.0.0:9999"));
        let mut c = Config::default();
        c.metrics.listen = "nonsense".into();
        assert!(c.validate().unwrap_err().to_string().contains("metrics.listen must be host:port"));
    }
}

#[cfg(test)]
mod compose_tests {
    //! docker-compose.yml cannot run on the build machines (no Docker
    //! engine); these tests keep it consistent with the configuration that
    //! `ops/` and the binaries use.

    use super::*;
    use std::collections::BTreeMap;

    fn compose() -> serde_yaml::Value {
        let text = include_str!("../../../docker-compose.yml");
        let mut v: serde_yaml::Value = serde_yaml::from_str(text).expect("docker-compose.yml is valid YAML");
        // Resolve `<<: *anchor` merge keys as Compose does.
        v.apply_merge().expect("merge keys resolve");
        v
    }

    #[test]
    fn compose_runs_the_stack_and_every_meter_stage() {
        let c = compose();
        let services = c["services"].as_mapping().expect("services");
        for s in ["kafka", "clickhouse", "registry", "init", "agent", "process", "sink"] {
            assert!(services.contains_key(s), "docker-compose.yml lacks service {s}");
        }
        let cmd =
            |s: &str| c["services"][s]["command"].as_sequence().map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "));
        assert_eq!(cmd("init").as_deref(), Some("meter init"));
        assert_eq!(cmd("process").as_deref(), Some("meter process"));
        assert_eq!(cmd("sink").as_deref(), Some("meter sink"));
        assert_eq!(cmd("agent").as_deref(), Some("meter agent --simulate --speed 1 --duration 30d"));
        let kafka_env = &c["services"]["kafka"]["environment"];
        assert_eq!(kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"].as_i64(), Some(1));
        assert_eq!(kafka_env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"].as_i64(), Some(1));
    }

    fn compose_secure() -> serde_yaml::Value {
        let text = include_str!("../../../docker-compose.secure.yml");
        let mut v: serde_yaml::Value = serde_yaml::from_str(text).expect("docker-compose.secure.yml is valid YAML");
        v.apply_merge().expect("merge keys resolve");
        v
    }

    /// The secure overlay, merged onto the base file as Compose merges
    /// `environment`: every meter service is its own principal over
    /// SASL_SSL, reads its passwords from mounted secrets (never a value in
    /// the file), reaches ClickHouse over HTTPS, and its settings are real
    /// configuration keys that do not give a secret twice. kafka-setup
    /// creates each of these principals from the secret the service mounts.
    #[test]
    fn compose_secure_overlay_gives_each_service_its_principal_and_secret_files() {
        let (base, secure) = (compose(), compose_secure());
        let setup = &secure["services"]["kafka-setup"];
        let script = setup["command"][0].as_str().expect("kafka-setup's script");
        let setup_users: Vec<&str> = script
            .lines()
            .find_map(|l| l.trim().strip_prefix("for user in ")?.strip_suffix("; do"))
            .expect("kafka-setup's `for user in ...; do` loop")
            .split_whitespace()
            .collect();
        let setup_secrets: Vec<&str> = setup["secrets"].as_sequence().unwrap().iter().filter_map(|s| s.as_str()).collect();
        for (service, principal, clickhouse_user) in [
            ("init", "admin", Some("writer")),
            ("agent", "agent", None),
            ("process", "processor", None),
            ("sink", "sink", Some("writer")),
            ("rate", "rating", Some("writer")),
            ("serve", "serve", Some("analyst")),
        ] {
            assert!(setup_users.contains(&principal), "kafka-setup does not create the SCRAM user {principal}: {setup_users:?}");
            let secret = format!("kafka-{principal}-password");
            assert!(setup_secrets.contains(&secret.as_str()), "kafka-setup does not mount {secret}: {setup_secrets:?}");
            assert!(
                principal == "admin" || script.contains(&format!("--allow-principal User:{principal} ")),
                "kafka-setup grants {principal} no ACL"
            );
            let mut env: BTreeMap<String, String> = BTreeMap::new();
            for layer in [&base, &secure] {
                let Some(m) = layer["services"][service]["environment"].as_mapping() else { continue };
                for (k, v) in m {
                    let value = v.as_str().map(str::to_owned).unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_owned());
                    env.insert(k.as_str().unwrap().to_owned(), value);
                }
            }
            let mut tree = serde_json::json!({});
            for (k, v) in &env {
                let Some(key) = k.strip_prefix("METER__") else { continue };
                let parts: Vec<String> = key.split("__").map(str::to_lowercase).collect();
                let mut node = &mut tree;
                for p in &parts[..parts.len() - 1] {
                    node = node.as_object_mut().unwrap().entry(p.clone()).or_insert_with(|| serde_json::json!({}));
                }
                node[parts.last().unwrap().as_str()] = serde_json::Value::String(v.clone());
            }
            let defaults = serde_json::to_value(Config::default()).unwrap();
            coerce_like(&mut tree, &defaults);
            let mut cfg: Config = serde_json::from_value(tree).unwrap_or_else(|e| panic!("{service}: {e}"));
            let mut p = Problems::default();
            // The secret files exist only in the containers: check the names.
            let props: BTreeMap<String, String> = cfg
                .kafka
                .properties
                .iter()
                .map(|(k, v)| (kafka::property_name(k).0 + if kafka::property_name(k).1 { "_file" } else { "" }, v.clone()))
                .collect();
            assert_eq!(props.get("security.protocol").map(String::as_str), Some("SASL_SSL"), "{service}");
            assert_eq!(props.get("sasl.username").map(String::as_str), Some(principal), "{service}");
            let password_file = props.get("sasl.password_file").unwrap_or_else(|| panic!("{service}: no sasl.password_file"));
            assert!(password_file.starts_with("/run/secrets/"), "{service}: {password_file}");
            assert!(!props.contains_key("sasl.password"), "{service}: a password value in the overlay");
            let mounted = secure["services"][service]["secrets"].as_sequence().unwrap_or_else(|| panic!("{service} mounts no secrets"));
            let names: Vec<String> = mounted
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_owned).or_else(|| s["target"].as_str().or(s["source"].as_str()).map(str::to_owned)).unwrap()
                })
                .collect();
            let file = password_file.trim_start_matches("/run/secrets/");
            assert!(names.iter().any(|n| n == file || n.ends_with(file)), "{service}: {file} is not among its secrets {names:?}");
            assert!(cfg.clickhouse.is_https(), "{service}: {}", cfg.clickhouse.url);
            if cfg.clickhouse.password_file.is_some() {
                assert_eq!(cfg.clickhouse.password, "", "{service}: password and password_file both set");
            }
            match clickhouse_user {
                Some(user) => {
                    assert_eq!(cfg.clickhouse.user, user, "{service}'s ClickHouse user");
                    let file = cfg.clickhouse.password_file.as_ref().unwrap_or_else(|| panic!("{service}: no clickhouse.password_file"));
                    let file = file.to_str().unwrap().trim_start_matches("/run/secrets/");
                    assert_eq!(file, format!("clickhouse-{user}-password"), "{service}");
                    assert!(names.iter().any(|n| n == file), "{service}: {file} is not among its secrets {names:?}");
                }
                None => assert!(cfg.clickhouse.password_file.is_none(), "{service} gets a ClickHouse password it does not use"),
            }
            cfg.kafka.properties.clear();
            cfg.clickhouse.ca_file = None;
            cfg.clickhouse.check(&mut p);
            assert!(p.is_empty(), "{service}: {:?}", p.into_vec());
        }
    }

    /// The cluster overlay, merged onto the base file: three brokers, four
    /// ClickHouse nodes with their own macros, ZooKeeper, and every meter
    /// service configured for the cluster with real configuration keys.
    #[test]
    fn compose_cluster_overlay_runs_the_cluster_and_points_every_stage_at_it() {
        let text = include_str!("../../../docker-compose.cluster.yml");
        let mut overlay: serde_yaml::Value = serde_yaml::from_str(text).expect("docker-compose.cluster.yml is valid YAML");
        overlay.apply_merge().expect("merge keys resolve");
        let base = compose();
        let services = overlay["services"].as_mapping().expect("services");
        for s in ["kafka", "kafka-2", "kafka-3", "zookeeper", "clickhouse", "clickhouse-1-2", "clickhouse-2-1", "clickhouse-2-2"] {
            assert!(services.contains_key(s), "docker-compose.cluster.yml lacks service {s}");
        }
        let mut macros = std::collections::BTreeSet::new();
        for s in ["clickhouse", "clickhouse-1-2", "clickhouse-2-1", "clickhouse-2-2"] {
            let volumes: Vec<&str> = overlay["services"][s]["volumes"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
            let m = volumes.iter().find(|v| v.contains("macros-")).unwrap_or_else(|| panic!("{s} mounts no macros"));
            assert!(macros.insert(m.split(':').next().unwrap().to_owned()), "{s} shares its macros file");
        }
        for service in ["init", "agent", "process", "sink"] {
            let mut env: BTreeMap<String, String> = BTreeMap::new();
            for layer in [&base, &overlay] {
                let Some(m) = layer["services"][service]["environment"].as_mapping() else { continue };
                for (k, v) in m {
                    let value = v.as_str().map(str::to_owned).unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_owned());
                    env.insert(k.as_str().unwrap().to_owned(), value);
                }
            }
            let mut sections: BTreeMap<String, toml::Table> = BTreeMap::new();
            for (k, v) in &env {
                let Some(key) = k.strip_prefix("METER__") else { continue };
                let (section, field) = key.split_once("__").unwrap_or_else(|| panic!("{key} is not SECTION__KEY"));
                sections.entry(section.to_lowercase()).or_default().insert(field.to_lowercase(), toml::Value::String(v.clone()));
            }
            let mut tree = serde_json::to_value(&sections).unwrap();
            coerce_like(&mut tree, &serde_json::to_value(Config::default()).unwrap());
            let cfg: Config = serde_json::from_value(tree).unwrap_or_else(|e| panic!("{service}: {e}"));
            let cfg = cfg.validate().unwrap_or_else(|e| panic!("{service}: {e}"));
            assert_eq!(cfg.kafka.brokers.split(',').count(), 3, "{service}: {}", cfg.kafka.brokers);
            assert_eq!(cfg.topics.replication_factor, 3, "{service}");
            assert_eq!(cfg.clickhouse.cluster, "meterline", "{service}");
        }
    }

    /// Every METER__SECTION__KEY the compose file sets is a real, valid
    /// configuration field (unknown fields are rejected by the same
    /// deserializer the binaries use).
    #[test]
    fn compose_environment_uses_real_config_keys() {
        let c = compose();
        for service in ["init", "agent", "process", "sink"] {
            let env = c["services"][service]["environment"].as_mapping().unwrap_or_else(|| panic!("{service} has no environment"));
            let mut sections: BTreeMap<String, toml::Table> = BTreeMap::new();
            for (k, v) in env {
                let Some(key) = k.as_str().and_then(|k| k.strip_prefix("METER__")) else { continue };
                let (section, field) = key.split_once("__").unwrap_or_else(|| panic!("{key} is not SECTION__KEY"));
                let value = v.as_str().map(str::to_owned).unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_owned());
                sections.entry(section.to_lowercase()).or_default().insert(field.to_lowercase(), toml::Value::String(value));
            }
            assert!(sections.contains_key("kafka") && sections.contains_key("clickhouse"), "{service}");
            let text = toml::to_string(&sections).unwrap();
            let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{service}: {e}\n{text}"));
            let cfg = cfg.validate().unwrap();
            // Topic names are the defaults, the same as ops/ and the demo's base names.
            assert_eq!(cfg.topics.events, "usage.events");
            assert_eq!(cfg.topics.aggregates, "usage.aggregates");
            assert_eq!(cfg.topics.dlq, "usage.dlq");
        }
    }
}
