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
