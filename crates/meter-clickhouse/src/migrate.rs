//! Numbered, idempotent schema migrations from `schemas/clickhouse/`.
//!
//! Every statement is `CREATE ... IF NOT EXISTS` or `ALTER TABLE ... ADD
//! COLUMN`, which is skipped when the column exists (18.16 has no `ADD
//! COLUMN IF NOT EXISTS`), and applied versions are
//! recorded in `schema_migrations`, so running `meter migrate` again (or
//! concurrently from two hosts) leaves the schema as it is.

use clickhouse::Client;

use crate::{check_identifier, Connection, Result};

/// (version, name, SQL with `{db}` placeholders), in order.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "0001_usage_tables", include_str!("../../../schemas/clickhouse/0001_usage_tables.sql")),
    (2, "0002_dead_letters", include_str!("../../../schemas/clickhouse/0002_dead_letters.sql")),
    (3, "0003_rating", include_str!("../../../schemas/clickhouse/0003_rating.sql")),
    (4, "0004_billing", include_str!("../../../schemas/clickhouse/0004_billing.sql")),
    (5, "0005_close", include_str!("../../../schemas/clickhouse/0005_close.sql")),
    (6, "0006_price_versions", include_str!("../../../schemas/clickhouse/0006_price_versions.sql")),
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
    let server = conn.server_client()?;
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
            match added_column(&stmt) {
                Some((table, column)) => add_column(&server, db, table, column, &stmt).await?,
                None => server.query(&stmt).execute().await?,
            }
        }
        client.query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)").bind(*version).bind(*name).execute().await?;
        done.push((*name).to_owned());
    }
    Ok(done)
}

/// `(table, column)` of an `ALTER TABLE db.table ADD COLUMN column ...` statement.
fn added_column(stmt: &str) -> Option<(&str, &str)> {
    let rest = stmt.strip_prefix("ALTER TABLE ")?;
    let (table, rest) = rest.split_once(' ')?;
    let table = table.rsplit('.').next()?;
    let column = rest.trim_start().strip_prefix("ADD COLUMN ")?.split_whitespace().next()?;
    Some((table, column))
}

async fn column_exists(server: &Client, db: &str, table: &str, column: &str) -> Result<bool> {
    let n: u64 = server
        .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
        .bind(db)
        .bind(table)
        .bind(column)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// Runs `stmt` unless the column is there already; a concurrent migration
/// that added it first is not an error either.
async fn add_column(server: &Client, db: &str, table: &str, column: &str, stmt: &str) -> Result<()> {
    if column_exists(server, db, table, column).await? {
        return Ok(());
    }
    match server.query(stmt).execute().await {
        Ok(()) => Ok(()),
        Err(_) if column_exists(server, db, table, column).await? => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_shipped_migrations_into_create_statements() {
        let n: Vec<usize> = MIGRATIONS.iter().map(|(_, _, sql)| statements(sql).len()).collect();
        assert_eq!(n, vec![3, 1, 4, 3, 1, 1]);
        let alter = "ALTER TABLE {db}.rated_usage ADD COLUMN line_type String DEFAULT 'Usage'";
        assert_eq!(added_column(alter), Some(("rated_usage", "line_type")));
        assert_eq!(added_column("ALTER TABLE {db}.rated_usage DROP COLUMN line_type"), None);
        for (_, _, sql) in MIGRATIONS {
            for s in statements(sql) {
                let idempotent = s.starts_with("CREATE TABLE IF NOT EXISTS {db}.") || added_column(&s).is_some();
                assert!(idempotent, "{s}");
                assert!(!s.contains(';'));
            }
        }
    }
}
