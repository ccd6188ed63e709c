//! Numbered, idempotent schema migrations from `schemas/clickhouse/`.
//!
//! Every statement is `CREATE ... IF NOT EXISTS`, and applied versions are
//! recorded in `schema_migrations`, so running `meter migrate` again (or
//! concurrently from two hosts) leaves the schema as it is.

use clickhouse::Client;

use crate::{check_identifier, Connection, Result};

/// (version, name, SQL with `{db}` placeholders), in order.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "0001_usage_tables", include_str!("../../../schemas/clickhouse/0001_usage_tables.sql")),
    (2, "0002_dead_letters", include_str!("../../../schemas/clickhouse/0002_dead_letters.sql")),
    (3, "0003_rating", include_str!("../../../schemas/clickhouse/0003_rating.sql")),
];

/// The table recording applied migrations (`{db}` is the database).
pub const SCHEMA_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
    (version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) ENGINE = ReplacingMergeTree() ORDER BY version";

#[derive(clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct Applied {
    version: u32,
    name: String,
}

/// Splits a migration into statements at `;` ending a line, dropping `--`
/// comment lines. Migrations keep `;` out of string literals.
pub(crate) fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_owned();
            out.push(stmt);
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_owned());
    }
    out
}

/// Creates the database and applies every migration not yet recorded.
/// Returns the names of the migrations applied by this call.
pub async fn migrate(conn: &Connection) -> Result<Vec<String>> {
    check_identifier(&conn.database)?;
    let db = &conn.database;
    let server = conn.server_client();
    server.query(&format!("CREATE DATABASE IF NOT EXISTS {db}")).execute().await?;
    server.query(&SCHEMA_MIGRATIONS_TABLE.replace("{db}", db)).execute().await?;
    let client: Client = conn.client()?;
    let applied: Vec<Applied> = client.query("SELECT version, name FROM schema_migrations FINAL").fetch_all().await?;
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.iter().any(|a| a.version == *version) {
            continue;
        }
        for stmt in statements(&sql.replace("{db}", db)) {
            server.query(&stmt).execute().await?;
        }
        client.query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)").bind(*version).bind(*name).execute().await?;
        done.push((*name).to_owned());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_shipped_migrations_into_create_statements() {
        let n: Vec<usize> = MIGRATIONS.iter().map(|(_, _, sql)| statements(sql).len()).collect();
        assert_eq!(n, vec![3, 1, 4]);
        for (_, _, sql) in MIGRATIONS {
            for s in statements(sql) {
                assert!(s.starts_with("CREATE TABLE IF NOT EXISTS {db}."), "{s}");
                assert!(!s.contains(';'));
            }
        }
    }
}
