//! The monitoring files in `ops/` are code that pages people: these tests
//! keep them valid and tied to the metrics contract.
//!
//! - `promtool check rules` on the alert rules, `promtool test rules` on their
//!   unit tests (each alert fires on a synthetic failure and stays quiet on a
//!   healthy series), `promtool check config` on both Prometheus configs;
//! - every alert names only contract metrics, carries a summary, a
//!   description and a runbook link whose anchor exists in
//!   `docs/operations.md`, and has a unit test that expects it to fire;
//! - every query of the Grafana dashboard is valid PromQL (checked by
//!   promtool as a recording rule) and names only contract metrics; every
//!   contract metric is on the dashboard or in an alert;
//! - docker-compose.yml mounts files that exist, and Prometheus there
//!   scrapes the services compose runs (those under a profile too); the
//!   API (`serve`) is under profile `api` with a keys file that parses.
//!
//! promtool comes with Debian's `prometheus` package (`ops/install`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metric names of the metrics contract (every long-running `meter`
/// subcommand serves them on `metrics.listen`). Histograms are listed
/// separately: queries use their `_bucket`, `_sum` and `_count` series.
const METRICS: &[&str] = &[
    // all components
    "meter_build_info",
    "meter_up_since_timestamp_seconds",
    "meter_kafka_client_messages_queued",
    "meter_kafka_client_requests_total",
    "meter_kafka_broker_rtt_seconds",
    "meter_kafka_broker_up",
    // processor
    "meter_events_received_total",
    "meter_events_aggregated_total",
    "meter_events_deduplicated_total",
    "meter_events_dead_lettered_total",
    "meter_events_legacy_fingerprint_total",
    "meter_events_schema_resolved_total",
    "meter_events_unsigned_total",
    "meter_events_without_incarnation_total",
    "meter_agent_incarnation_overlaps_total",
    "meter_agent_ids_shared_total",
    "meter_agent_keys_reload_failures_total",
    "meter_aggregates_emitted_total",
    "meter_consumer_lag_records",
    "meter_watermark_delay_seconds",
    "meter_windows_open",
    "meter_dedup_streams",
    "meter_processor_state_restores_total",
    "meter_processor_state_entries_restored_total",
    "meter_processor_state_store_bytes",
    "meter_partitions_assigned",
    "meter_transactions_committed_total",
    "meter_transactions_aborted_total",
    // sink
    "meter_sink_rows_inserted_total",
    "meter_sink_insert_retries_total",
    "meter_sink_insert_failures_total",
    "meter_sink_last_success_timestamp_seconds",
    // agent
    "meter_agent_events_generated_total",
    "meter_agent_events_produced_total",
    "meter_agent_events_spooled_total",
    "meter_agent_events_replayed_total",
    "meter_agent_events_dropped_total",
    "meter_agent_spool_bytes",
    "meter_agent_spool_limit_bytes",
    "meter_agent_ticks_caught_up_total",
    "meter_agent_ticks_total",
    "meter_agent_delivery_failures_total",
    "meter_agent_delivery_denied_total",
    "meter_agent_seconds_compressed_total",
    "meter_agent_counter_resets_total",
    "meter_agent_counter_wraps_total",
    "meter_agent_spool_backlog_events",
    "meter_agent_disk_free_bytes",
    "meter_agent_state_write_failures_total",
    "meter_agent_state_torn_bytes_total",
    "meter_agent_incarnations_started_total",
    "meter_agent_lease_renewals_total",
    "meter_agent_events_signed_total",
    // serve (the HTTP API; no meter_kafka_* client metrics)
    "meter_serve_requests_total",
    "meter_serve_events_total",
    "meter_serve_in_flight_events",
];

const HISTOGRAMS: &[&str] = &[
    "meter_transaction_commit_duration_seconds",
    "meter_state_restore_duration_seconds",
    "meter_sink_batch_rows",
    "meter_sink_insert_duration_seconds",
    "meter_serve_request_seconds",
];

/// Series Prometheus itself writes for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// PromQL words that are not metric names even when they are not followed by
/// `(` (aggregations may be: `sum by (job) (...)`).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Runs promtool with ARGS in DIR; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("promtool").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run promtool ({e}): it comes with Debian's `prometheus` package; \
             run ops/install (or apt-get install prometheus)"
        ),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed ({}):\n{text}", args.join(" "), out.status);
    text
}

/// The metric names an expression selects: identifiers that are not
/// functions (followed by `(`), keywords, label names (inside `{}` or after
/// `by`, `on`, ...), numbers, durations, strings or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop string literals (label values, regexes) and Grafana variables.
    let mut cleaned = String::with_capacity(expr.len());
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
                cleaned.push_str("\"\"");
            }
            '$' => {
                if chars.peek() == Some(&'{') {
                    for d in chars.by_ref() {
                        if d == '}' {
                            break;
                        }
                    }
                } else {
                    while chars.peek().is_some_and(|d| d.is_ascii_alphanumeric() || *d == '_') {
                        chars.next();
                    }
                }
                cleaned.push('0');
            }
            _ => cleaned.push(c),
        }
    }

    let bytes = cleaned.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut braces = 0usize;
    let mut label_list = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'{' {
            braces += 1;
        } else if b == b'}' {
            braces = braces.saturating_sub(1);
        } else if b == b')' {
            label_list = false;
        }
        if !word(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && word(bytes[i]) {
            i += 1;
        }
        let ident = &cleaned[start..i];
        let next = cleaned[i..].trim_start().chars().next();
        if ident.as_bytes()[0].is_ascii_digit() || braces > 0 || label_list {
            continue; // number, duration, label matcher or label list
        }
        if LABEL_LIST_KEYWORDS.contains(&ident) {
            label_list = next == Some('(');
            continue;
        }
        if KEYWORDS.contains(&ident) || next == Some('(') {
            continue;
        }
        names.insert(ident.to_owned());
    }
    names
}

/// Names in EXPR that are not in the contract (or Prometheus' own `up`).
fn unknown_metrics(expr: &str) -> Vec<String> {
    let known = |name: &str| {
        METRICS.contains(&name)
            || PROMETHEUS_SERIES.contains(&name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s).is_some_and(|h| HISTOGRAMS.contains(&h)))
    };
    metric_names(expr).into_iter().filter(|n| !known(n)).collect()
}

/// Every PromQL query of a Grafana dashboard, with where it is: panel
/// targets (rows' nested panels too) and query variables. Grafana's
/// `label_values(SELECTOR, LABEL)` is reduced to its selector.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                out.push((format!("panel {title:?} {}", t["refId"]), expr.to_owned()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        let q = match q.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            Some(args) => args.rsplit_once(',').map_or("", |(sel, _label)| sel).to_owned(),
            None => q.to_owned(),
        };
        if !q.trim().is_empty() {
            out.push((format!("variable {}", v["name"]), q));
        }
    }
    out
}

/// The problems the dashboard check reports for DASH (empty = fine).
fn dashboard_problems(dash: &serde_json::Value) -> Vec<String> {
    let mut problems = Vec::new();
    let queries = dashboard_queries(dash);
    if queries.is_empty() {
        problems.push("the dashboard has no queries".to_owned());
    }
    for (place, expr) in &queries {
        let unknown = unknown_metrics(expr);
        if !unknown.is_empty() {
            problems.push(format!("{place}: unknown metric(s) {unknown:?} in {expr}"));
        }
    }
    problems
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("ops/grafana/dashboards/meterline.json")).expect("dashboard is valid JSON")
}

fn alert_rules() -> Vec<serde_yaml::Value> {
    let rules: serde_yaml::Value = serde_yaml::from_str(&read("ops/prometheus/alerts.yml")).expect("alerts.yml is YAML");
    let groups = rules["groups"].as_sequence().expect("groups");
    groups.iter().flat_map(|g| g["rules"].as_sequence().expect("rules").iter().cloned()).collect()
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = promtool(&repo().join("ops/prometheus"), &["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alerts_fire_on_failures_and_stay_quiet_when_healthy() {
    let out = promtool(&repo().join("ops/prometheus"), &["test", "rules", "alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_configs_pass_promtool_check() {
    for config in ["prometheus.yml", "prometheus.compose.yml"] {
        let out = promtool(&repo().join("ops/prometheus"), &["check", "config", config]);
        assert!(out.contains("valid prometheus config"), "{config}: {out}");
    }
}

#[test]
fn every_alert_uses_contract_metrics_links_its_runbook_and_is_unit_tested() {
    let runbook = read("docs/operations.md");
    let anchors: BTreeSet<String> =
        runbook.lines().filter_map(|l| l.strip_prefix('#')).map(|h| anchor(h.trim_start_matches('#'))).collect();
    let tests: serde_yaml::Value = serde_yaml::from_str(&read("ops/prometheus/alerts.test.yml")).expect("alerts.test.yml is YAML");
    // alertname -> (a case where it fires, a case where it must not)
    let mut tested: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for case in tests["tests"].as_sequence().expect("tests").iter().flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten()) {
        let name = case["alertname"].as_str().expect("alertname").to_owned();
        let fires = case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
        let entry = tested.entry(name).or_default();
        entry.0 |= fires;
        entry.1 |= !fires;
    }

    let rules = alert_rules();
    assert!(rules.len() >= 8, "only {} rules", rules.len());
    let mut problems = Vec::new();
    for rule in &rules {
        let Some(name) = rule["alert"].as_str() else { continue };
        let expr = rule["expr"].as_str().expect("expr");
        let unknown = unknown_metrics(expr);
        if !unknown.is_empty() {
            problems.push(format!("{name}: unknown metric(s) {unknown:?}"));
        }
        if !rule["labels"]["severity"].as_str().is_some_and(|s| ["warning", "critical"].contains(&s)) {
            problems.push(format!("{name}: severity must be warning or critical"));
        }
        for key in ["summary", "description"] {
            if rule["annotations"][key].as_str().is_none_or(|s| s.trim().is_empty()) {
                problems.push(format!("{name}: no {key}"));
            }
        }
        match rule["annotations"]["runbook_url"].as_str().and_then(|u| u.split_once('#')) {
            Some(("docs/operations.md", a)) if anchors.contains(a) => {}
            other => problems.push(format!("{name}: runbook_url {other:?} is not a heading of docs/operations.md")),
        }
        match tested.get(name) {
            Some((true, true)) => {}
            Some((fires, quiet)) => {
                problems.push(format!("{name}: unit tests lack a case where it fires ({fires}) or stays quiet ({quiet})"))
            }
            None => problems.push(format!("{name}: no unit test in alerts.test.yml")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_queries_use_only_contract_metrics() {
    let problems = dashboard_problems(&dashboard());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool has no query linter; as recording rules the queries get the
    // same parser Prometheus uses. Grafana's variables become plain values.
    let rules: Vec<serde_yaml::Value> = dashboard_queries(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h")
                .replace("${instance}", ".*")
                .replace("$instance", ".*");
            let mut rule = serde_yaml::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), expr.into());
            serde_yaml::Value::Mapping(rule)
        })
        .collect();
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), serde_yaml::Value::Sequence(rules));
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), serde_yaml::Value::Sequence(vec![serde_yaml::Value::Mapping(group)]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yml"), serde_yaml::to_string(&file).unwrap()).unwrap();
    promtool(dir.path(), &["check", "rules", "dashboard.rules.yml"]);
}

#[test]
fn every_contract_metric_is_on_the_dashboard_or_in_an_alert() {
    let mut used = BTreeSet::new();
    for (_, expr) in dashboard_queries(&dashboard()) {
        used.extend(metric_names(&expr));
    }
    for rule in alert_rules() {
        used.extend(metric_names(rule["expr"].as_str().unwrap_or_default()));
    }
    let missing: Vec<&str> = METRICS
        .iter()
        .copied()
        .filter(|m| !used.contains(*m))
        .chain(HISTOGRAMS.iter().copied().filter(|h| !used.contains(&format!("{h}_bucket"))))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard nor in an alert: {missing:?}");
}

#[test]
fn dashboard_structure_is_what_grafana_provisions() {
    let dash = dashboard();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    assert!(dash["title"].as_str().is_some(), "title");
    let mut ids = BTreeSet::new();
    fn walk(list: &serde_json::Value, ids: &mut BTreeSet<i64>) {
        for p in list.as_array().into_iter().flatten() {
            let id = p["id"].as_i64().expect("panel id");
            assert!(ids.insert(id), "duplicate panel id {id}");
            for k in ["h", "w", "x", "y"] {
                assert!(p["gridPos"][k].as_i64().is_some(), "panel {id}: gridPos.{k}");
            }
            assert!(p["gridPos"]["x"].as_i64().unwrap() + p["gridPos"]["w"].as_i64().unwrap() <= 24, "panel {id} wider than the grid");
            let refs: Vec<_> = p["targets"].as_array().into_iter().flatten().map(|t| t["refId"].as_str().expect("refId")).collect();
            assert_eq!(refs.len(), refs.iter().collect::<BTreeSet<_>>().len(), "panel {id}: duplicate refId");
            walk(&p["panels"], ids);
        }
    }
    walk(&dash["panels"], &mut ids);

    // The datasource variable defaults to the provisioned datasource.
    let provisioned: serde_yaml::Value =
        serde_yaml::from_str(&read("ops/grafana/provisioning/datasources/prometheus.yml")).expect("datasource provisioning is YAML");
    let uid = provisioned["datasources"][0]["uid"].as_str().expect("datasource uid");
    assert_eq!(provisioned["datasources"][0]["type"].as_str(), Some("prometheus"));
    let var =
        dash["templating"]["list"].as_array().expect("templating").iter().find(|v| v["type"] == "datasource").expect("datasource variable");
    assert_eq!(var["current"]["value"].as_str(), Some(uid));
}

/// The long-running `meter` subcommands and their Prometheus jobs.
const SCRAPED: &[(&str, &str)] =
    &[("process", "meter-process"), ("sink", "meter-sink"), ("agent", "meter-agent"), ("serve", "meter-serve")];

fn compose() -> serde_yaml::Value {
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML");
    compose.apply_merge().expect("merge keys resolve");
    compose
}

/// The `./...` sources of a compose service's bind mounts.
fn binds(service: &serde_yaml::Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned())
        })
        .collect()
}

#[test]
fn compose_runs_prometheus_and_grafana_on_the_files_in_ops() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    for s in ["prometheus", "grafana"] {
        let service = services.get(s).unwrap_or_else(|| panic!("no compose service {s}"));
        assert!(!binds(service).is_empty(), "{s} mounts nothing from the repo");
    }
    for (name, service) in services {
        for (src, _) in binds(service) {
            assert!(repo().join(&src).exists(), "{name:?} mounts {src}, which does not exist");
        }
    }
    // Prometheus in compose scrapes every long-running meter service by its
    // compose name on the port the services listen on, whether or not the
    // service is under a profile (`serve` is: its job has no targets until
    // it runs).
    let prom: serde_yaml::Value =
        serde_yaml::from_str(&read("ops/prometheus/prometheus.compose.yml")).expect("prometheus.compose.yml is YAML");
    let jobs: BTreeMap<&str, &serde_yaml::Value> = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|j| (j["job_name"].as_str().expect("job_name"), j))
        .collect();
    let mut scraped = BTreeSet::new();
    for (name, service) in services {
        let command: Vec<&str> = service["command"].as_sequence().into_iter().flatten().filter_map(|c| c.as_str()).collect();
        let Some((_, job)) = SCRAPED.iter().find(|(sub, _)| command.len() >= 2 && command[0] == "meter" && command[1] == *sub) else {
            continue;
        };
        let name = name.as_str().expect("service name");
        scraped.insert(*job);
        let sd = &jobs.get(job).unwrap_or_else(|| panic!("{name}: no job {job}"))["dns_sd_configs"][0];
        assert_eq!(sd["names"][0].as_str(), Some(name), "{job}");
        let listen =
            service["environment"]["METER__METRICS__LISTEN"].as_str().unwrap_or_else(|| panic!("{name}: no METER__METRICS__LISTEN"));
        assert_eq!(listen.rsplit(':').next().and_then(|p| p.parse().ok()), sd["port"].as_u64(), "{name} listens on {listen}");
    }
    assert_eq!(scraped, SCRAPED.iter().map(|(_, job)| *job).collect(), "compose runs every long-running meter service");
    // The local Prometheus has the same jobs.
    let local: serde_yaml::Value = serde_yaml::from_str(&read("ops/prometheus/prometheus.yml")).expect("prometheus.yml is YAML");
    let local_jobs: BTreeSet<&str> =
        local["scrape_configs"].as_sequence().expect("scrape_configs").iter().filter_map(|j| j["job_name"].as_str()).collect();
    for (_, job) in SCRAPED {
        assert!(local_jobs.contains(job), "ops/prometheus/prometheus.yml has no job {job}");
    }
}

/// `serve` refuses to start without an API key and the repository ships
/// none: it is under profile `api`, so that a plain `docker compose up`
/// does not start it; its keys file is mounted where
/// `serve.api_keys_file` says, and parses as a keys file.
#[test]
fn compose_serves_the_api_under_a_profile_with_a_keys_file() {
    let compose = compose();
    let serve = &compose["services"]["serve"];
    let profiles: Vec<&str> = serve["profiles"].as_sequence().into_iter().flatten().filter_map(|p| p.as_str()).collect();
    assert_eq!(profiles, ["api"], "serve's profiles");
    let env = serve["environment"].as_mapping().expect("serve's environment");
    let mut sections: BTreeMap<String, toml::Table> = BTreeMap::new();
    for (k, v) in env {
        let Some(key) = k.as_str().and_then(|k| k.strip_prefix("METER__")) else { continue };
        let (section, field) = key.split_once("__").unwrap_or_else(|| panic!("{key} is not SECTION__KEY"));
        let value = v.as_str().map(str::to_owned).unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_owned());
        sections.entry(section.to_lowercase()).or_default().insert(field.to_lowercase(), toml::Value::String(value));
    }
    let text = toml::to_string(&sections).unwrap();
    let cfg: meter_config::Config = toml::from_str(&text).unwrap_or_else(|e| panic!("serve: {e}\n{text}"));
    let cfg = cfg.validate().unwrap_or_else(|e| panic!("serve: {e}"));
    assert_eq!(cfg.serve.listen, "0.0.0.0:8480");
    let target = cfg.serve.api_keys_file.clone().expect("serve.api_keys_file");
    let (src, _) = binds(serve)
        .into_iter()
        .find(|(_, dst)| Path::new(dst) == target)
        .unwrap_or_else(|| panic!("serve mounts nothing at serve.api_keys_file {}", target.display()));
    assert!(
        serve["volumes"].as_sequence().unwrap().iter().any(|v| v.as_str() == Some(&format!("{src}:{}:ro", target.display()))),
        "read-only"
    );
    let file = meter_config::ServeConfig { api_keys_file: Some(repo().join(&src)), ..Default::default() };
    file.keys().unwrap_or_else(|p| panic!("{src}: {p:?}"));
}

/// The list above is the one the runbook documents (docs/operations.md,
/// "Metrics"): a metric added to one must be added to the other.
#[test]
fn the_contract_here_is_the_one_in_the_runbook() {
    let doc = read("docs/operations.md");
    let section = doc.split("\n## Metrics\n").nth(1).expect("docs/operations.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let documented: BTreeSet<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("meter_"))
        .collect();
    let listed: BTreeSet<&str> = METRICS.iter().chain(HISTOGRAMS).copied().collect();
    assert_eq!(documented, listed);
}

/// The checks above must be able to fail: an unknown or misspelt metric is
/// reported, label names, functions and Grafana variables are not.
#[test]
fn the_metric_check_rejects_unknown_names() {
    assert_eq!(
        metric_names(
            r#"sum by (job, le) (rate(meter_sink_batch_rows_bucket{instance=~"$instance",job!="x"}[$__rate_interval])) / on (job) group_left max(up) > bool 0"#
        ),
        BTreeSet::from(["meter_sink_batch_rows_bucket".to_owned(), "up".to_owned()])
    );
    assert_eq!(metric_names("histogram_quantile(0.99, sum(rate(a_b[5m])) by (le)) or vector(1e3)"), BTreeSet::from(["a_b".to_owned()]));
    let dash = serde_json::json!({
        "panels": [
            {"title": "ok", "targets": [{"refId": "A", "expr": "sum(rate(meter_events_received_total[5m]))"}]},
            {"title": "row", "type": "row", "panels": [
                {"title": "typo", "targets": [{"refId": "A", "expr": "sum(rate(meter_events_recieved_total[5m]))"}]},
                {"title": "foreign", "targets": [{"refId": "B", "expr": "node_cpu_seconds_total{mode=\"idle\"}"}]}
            ]}
        ],
        "templating": {"list": [{"name": "x", "type": "query", "query": {"query": "label_values(meter_nope, instance)"}}]}
    });
    let problems = dashboard_problems(&dash).join("\n");
    for bad in ["meter_events_recieved_total", "node_cpu_seconds_total", "meter_nope"] {
        assert!(problems.contains(bad), "{bad} not reported:\n{problems}");
    }
    assert!(!problems.contains("meter_events_received_total"), "{problems}");
    assert!(unknown_metrics("meter_sink_insert_duration_seconds_count").is_empty());
    assert_eq!(unknown_metrics("meter_sink_rows_inserted_total_bucket"), vec!["meter_sink_rows_inserted_total_bucket".to_owned()]);
}
