//! Every rating, report and audit query (`meter_report::checked_queries`)
//! runs on the local ClickHouse 18.16 (`ops/up`) and on current ClickHouse
//! through chDB, against the migrated schema with a few rows in each table;
//! the chDB run also takes the examples of docs/analysts.md (the end-to-end
//! test in meter-cli runs them on 18.16 as the analyst user).

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::sync::atomic::{AtomicU32, Ordering};

use meter_clickhouse::{migrate, with_literals, Connection, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE};
use meter_report::checked_queries;

/// Sample rows for every table the queries read (`{db}` is the database).
const SAMPLE_ROWS: &[&str] = &[
    "INSERT INTO {db}.usage_day VALUES (1769990400, 1770076800, 'acme', 'compute', 'BoxUsage:t3.micro', 'us-east-1', 'i-1', 3600, 3600, 1, 1, 0, 0, 1, 1, 3600)",
    "INSERT INTO {db}.usage_hour VALUES (1769990400, 1769994000, 'acme', 'compute', 'BoxUsage:t3.micro', 'us-east-1', 'i-1', 3600, 3600, 1, 1, 0, 0, 1, 1, 3600)",
    "INSERT INTO {db}.usage_minute VALUES (1769990400, 1769990460, 'acme', 'compute', 'BoxUsage:t3.micro', 'us-east-1', 'i-1', 60, 60, 1, 1, 0, 0, 1, 1, 60)",
    "INSERT INTO {db}.price_book VALUES ('2026-01', '2026-01-01', 'USD', 'compute', 'BoxUsage:t3.micro', '', 'hours', 'per_unit', 1, 0, NULL, 0.0104, NULL, NULL, 0, 60, '', 1769990400, 1)",
    "INSERT INTO {db}.rated_usage VALUES ('2026-02-01', '2026-01', '2026-02-02', 'acme', 'compute', 'BoxUsage:t3.micro', 'us-east-1', ['i-1'], 3600, 0, 'hours', 1, 0.0104, 0.0104, 'USD', 'l1', 1769990400, 1, 'Usage', '2026-01')",
    "INSERT INTO {db}.invoice_lines VALUES ('2026-02-01', '2026-01', 'acme', 'compute', 'BoxUsage:t3.micro', 'us-east-1', 'il1', 3600, 0, 'hours', 1, 0, 1, [0], [NULL], [1], [0.0104], [0.0104], NULL, 0.0104, 0.0104, 0.01, 'USD', 1769990400, 1, 'Usage')",
    "INSERT INTO {db}.invoice_lines VALUES ('2026-02-01', '2026-01', 'acme', 'object-storage', 'Credit:c1', '', 'il2', 0, 0, 'USD', 0.01, 0, 0.01, [], [], [], [], [], NULL, NULL, -0.01, -0.01, 'USD', 1769990400, 1, 'Credit')",
    "INSERT INTO {db}.credit_ledger VALUES ('2026-02-01', 'acme', 'c1', 'USD', 5, '2026-02-01', '2026-03-01', 5, 0.01, 4.99, 0, '2026-01', 1769990400, 1)",
    "INSERT INTO {db}.invoices VALUES ('2026-02-01', '2026-01', 'acme', 'i1', 'USD', 1, 0.01, 1769990400, 1)",
];

fn unique_db() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("test_queries_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_runs_on_the_local_clickhouse() {
    let db = unique_db();
    let conn = Connection {
        url: "http://127.0.0.1:8123".into(),
        database: db.clone(),
        user: "default".into(),
        password: String::new(),
        tls: Default::default(),
        cluster: None,
    };
    migrate(&conn).await.expect("ClickHouse must be running (ops/up)");
    let client = conn.client().unwrap();
    for stmt in SAMPLE_ROWS {
        client.query(&stmt.replace("{db}", &db)).execute().await.unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    for (name, sql, args) in checked_queries() {
        let sql = with_literals(&sql, &args);
        assert!(!sql.contains('?'), "{name}: unbound parameter in {sql}");
        client.query(&sql).execute().await.unwrap_or_else(|e| panic!("{name}: {e}\n{sql}"));
    }
    conn.server_client().unwrap().query(&format!("DROP DATABASE {db}")).execute().await.unwrap();
}

#[test]
fn every_query_runs_on_current_clickhouse_through_chdb() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dir = tempfile::tempdir().unwrap();
    for (_, name, sql) in MIGRATIONS {
        std::fs::write(dir.path().join(format!("{name}.sql")), sql).unwrap();
    }
    // check_chdb.py applies the files in order in one session: sample rows, then every query.
    let mut text = format!("{SCHEMA_MIGRATIONS_TABLE};\nUSE {{db}};\n");
    for stmt in SAMPLE_ROWS {
        text += &format!("{stmt};\n");
    }
    let queries = checked_queries();
    for (name, sql, args) in &queries {
        text += &format!("-- {name}\n{};\n", with_literals(sql, args));
    }
    // The examples of docs/analysts.md too.
    let examples = meter_clickhouse::analyst_examples();
    assert!(examples.len() >= 10);
    for sql in &examples {
        text += &format!("{sql};\n");
    }
    std::fs::write(dir.path().join("9999_queries.sql"), text).unwrap();
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/tests/sql/check_chdb.py"))
        .arg(dir.path())
        .output()
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chdb check failed (ops/install installs chdb):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Statements end a line with `;` in the migrations (their comments may hold `;` mid-line).
    let migration_statements: usize = MIGRATIONS
        .iter()
        .map(|(_, _, s)| s.lines().filter(|l| !l.trim_start().starts_with("--") && l.trim_end().ends_with(';')).count())
        .sum();
    let want = migration_statements + 2 + SAMPLE_ROWS.len() + queries.len() + examples.len();
    assert!(stdout.contains(&format!("{} statements", want)), "expected {want} statements: {stdout}");
}
