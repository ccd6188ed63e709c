//! `meter config check` with settings from the environment, as an operator
//! gives secrets to a container: a numeric-looking password stays the
//! string it is (it was refused as `invalid type: integer`, and a
//! leading zero would have been lost), numbers and bools still parse, a
//! value that is not one is reported with its path, and no secret is
//! printed.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::process::Command;

fn check(env: &[(&str, &str)]) -> (i32, String, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meter"));
    cmd.args(["config", "check", file.path().to_str().unwrap()]).env_remove("METER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_numeric_looking_secret_from_the_environment_stays_a_masked_string() {
    let (code, stdout, stderr) = check(&[
        ("METER__CLICKHOUSE__PASSWORD", "007123"),
        ("METER__CLICKHOUSE__USER", "12345"),
        ("METER__TOPICS__PARTITIONS", "3"),
        ("METER__PROCESSOR__ACCEPT_UNSIGNED", "false"),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!stdout.contains("007123") && !stderr.contains("007123"), "the password is never printed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("password = \"***\""), "{stdout}");
    assert!(stdout.contains("user = \"12345\""), "a numeric user name stays a string: {stdout}");
    assert!(stdout.contains("partitions = 3"), "{stdout}");
    assert!(stdout.contains("accept_unsigned = false"), "{stdout}");
}

#[test]
fn a_number_that_is_not_one_is_reported_with_its_path() {
    let (code, _, stderr) = check(&[("METER__TOPICS__PARTITIONS", "three")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("topics.partitions"), "{stderr}");
}

fn secret_file(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Pass-through librdkafka properties can be named in the environment
/// (`_` for `.`), and every secret can come from a file, as Docker and
/// Kubernetes mount them; the values never reach the output.
#[test]
fn kafka_properties_and_secret_files_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = secret_file(&dir, "kafka", "0042-kafka-secret\n");
    let ch = secret_file(&dir, "ch", "99887766\n");
    let (code, stdout, stderr) = check(&[
        ("METER__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
        ("METER__KAFKA__PROPERTIES__SASL_USERNAME", "12345"),
        ("METER__KAFKA__PROPERTIES__SASL_PASSWORD_FILE", &kafka),
        ("METER__KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "31337"),
        ("METER__CLICKHOUSE__PASSWORD_FILE", &ch),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for secret in ["0042-kafka-secret", "99887766", "31337"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    assert!(stdout.contains("\"security.protocol\" = \"SASL_SSL\""), "{stdout}");
    assert!(stdout.contains("\"sasl.username\" = \"12345\""), "{stdout}");
    assert!(stdout.contains("\"sasl.password\" = \"***\""), "{stdout}");
    assert!(stdout.contains("\"ssl.key.password\" = \"***\""), "{stdout}");
    assert!(stdout.contains("password = \"***\""), "{stdout}");
    assert!(stdout.contains(&format!("password_file = \"{ch}\"")), "{stdout}");
}

#[test]
fn a_secret_given_twice_or_a_missing_secret_file_is_reported_without_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = secret_file(&dir, "kafka", "from-the-file");
    let empty = secret_file(&dir, "empty", "\n");
    let (code, stdout, stderr) = check(&[
        ("METER__KAFKA__PROPERTIES__SASL_PASSWORD", "from-the-env"),
        ("METER__KAFKA__PROPERTIES__SASL_PASSWORD_FILE", &kafka),
        ("METER__KAFKA__PROPERTIES__SSL_KEY_PASSWORD_FILE", &empty),
        ("METER__CLICKHOUSE__PASSWORD", "hunter2"),
        ("METER__CLICKHOUSE__PASSWORD_FILE", "/nonexistent/ch-password"),
    ]);
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("sasl.password is given twice"), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");
    assert!(stderr.contains("clickhouse.password and clickhouse.password_file are both set"), "{stderr}");
    for secret in ["from-the-file", "from-the-env", "hunter2"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    let (code, _, stderr) = check(&[("METER__CLICKHOUSE__PASSWORD_FILE", "/nonexistent/ch-password")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("clickhouse.password_file: cannot read /nonexistent/ch-password"), "{stderr}");
}

#[test]
fn tls_files_need_an_https_url() {
    let (code, _, stderr) = check(&[("METER__CLICKHOUSE__CA_FILE", "/etc/hostname"), ("METER__CLICKHOUSE__CERT_FILE", "/etc/hostname")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("clickhouse.ca_file is set but clickhouse.url is not https://"), "{stderr}");
    assert!(stderr.contains("clickhouse.cert_file and clickhouse.key_file go together"), "{stderr}");
}
