//! Numbered, idempotent schema migrations from `schemas/clickhouse/`.
//!
//! Every statement is `CREATE ... IF NOT EXISTS` or `ALTER TABLE ... ADD
//! COLUMN`, which is skipped when the column exists (18.16 has no `ADD
//! COLUMN IF NOT EXISTS`), and applied versions are
//! recorded in `schema_migrations`, so running `meter migrate` again (or
//! concurrently from two hosts) leaves the schema as it is.
//!
//! On a cluster (`clickhouse.cluster`) the same files are laid out by
//! [`cluster_statements`]: every statement runs `ON CLUSTER`; a table keyed
//! by customer becomes `{table}_local`, a `ReplicatedReplacingMergeTree`
//! on each shard, under a `Distributed` table of the original name sharded
//! by `cityHash64(customer_id)`, so that every revision of a window key
//! lands on one shard and `FINAL` and `argMax` stay correct; the dead
//! letters are sharded by their whole key; `schema_migrations` and
//! `price_book` are replicated to every node (one replica set across all
//! shards), so they read the same everywhere.

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

/// Tables replicated to every node of a cluster rather than sharded: small,
/// read whole, and `schema_migrations` must say the same on every node.
const EVERYWHERE: &[&str] = &["schema_migrations", "price_book"];

/// One step of applying a migration statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run as it is.
    Sql(String),
    /// `ALTER TABLE .. ADD COLUMN`, skipped when `table` has `column`.
    AddColumn { table: String, column: String, sql: String },
    /// A cluster's `Distributed` table `table` lacks `column`, just added to
    /// `{table}_local`: 18.16 refuses `ALTER .. ON CLUSTER` on a
    /// `Distributed` table over replicated shards (code 371), so it is
    /// dropped and created again `AS` the local table, with the layout's
    /// engine. It holds no data (inserts into it are synchronous).
    RebuildDistributed { table: String, column: String },
}

/// `stmt` (a statement of a migration, `{db}` already replaced by `db`) on
/// one server.
fn single_steps(stmt: &str) -> Vec<Step> {
    match added_column(stmt) {
        Some((table, column)) => vec![Step::AddColumn { table: table.to_owned(), column: column.to_owned(), sql: stmt.to_owned() }],
        None => vec![Step::Sql(stmt.to_owned())],
    }
}

/// `stmt` (a statement of a migration, `{db}` already replaced by `db`)
/// laid out on `cluster`: see the module's documentation. Statements it
/// does not know are refused rather than run on one node only.
pub fn cluster_statements(stmt: &str, db: &str, cluster: &str) -> Result<Vec<Step>> {
    let unknown = || crate::Error::Value(format!("a migration statement the cluster layout does not know: {stmt}"));
    if let Some(rest) = stmt.strip_prefix("CREATE DATABASE IF NOT EXISTS ") {
        return Ok(vec![Step::Sql(format!("CREATE DATABASE IF NOT EXISTS {} ON CLUSTER {cluster}", rest.trim()))]);
    }
    if let Some((table, column)) = added_column(stmt) {
        let alter = |t: &str| Step::AddColumn {
            table: t.to_owned(),
            column: column.to_owned(),
            sql: stmt.replacen(&format!("ALTER TABLE {db}.{table} "), &format!("ALTER TABLE {db}.{t} ON CLUSTER {cluster} "), 1),
        };
        if EVERYWHERE.contains(&table) {
            return Ok(vec![alter(table)]);
        }
        return Ok(vec![alter(&format!("{table}_local")), Step::RebuildDistributed { table: table.to_owned(), column: column.to_owned() }]);
    }
    let Some(rest) = stmt.strip_prefix(&format!("CREATE TABLE IF NOT EXISTS {db}.")) else { return Err(unknown()) };
    let table: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    let body = &rest[table.len()..];
    let engine_at = body.find("ENGINE = ReplacingMergeTree(").ok_or_else(unknown)?;
    let args_from = engine_at + "ENGINE = ReplacingMergeTree(".len();
    let args_len = body[args_from..].find(')').ok_or_else(unknown)?;
    let args = body[args_from..args_from + args_len].trim();
    let args = if args.is_empty() { String::new() } else { format!(", {args}") };
    let tail = &body[args_from + args_len + 1..];
    let columns = &body[..engine_at];
    let order_by = tail.split("ORDER BY").nth(1).ok_or_else(unknown)?.trim();
    let replicated = |name: &str, path: &str, replica: &str| {
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{name} ON CLUSTER {cluster}{columns}ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{path}/{db}/{name}', '{replica}'{args}){tail}"
        ))
    };
    if EVERYWHERE.contains(&table.as_str()) {
        return Ok(vec![replicated(&table, "all", "{shard}-{replica}")]);
    }
    let key = order_by.trim_start_matches('(').trim_end_matches(')');
    let shard_by = if key.split(',').any(|c| c.trim() == "customer_id") { "customer_id".to_owned() } else { key.to_owned() };
    let local = format!("{table}_local");
    Ok(vec![
        replicated(&local, "{shard}", "{replica}"),
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table} ON CLUSTER {cluster} AS {db}.{local} ENGINE = Distributed({cluster}, {db}, {local}, cityHash64({shard_by}))"
        )),
    ])
}

/// The `CREATE` of `table`'s `Distributed` table on `cluster`, as the
/// migration that created the table lays it out.
fn distributed_table(db: &str, cluster: &str, table: &str) -> Option<String> {
    let prefix = format!("CREATE TABLE IF NOT EXISTS {db}.{table} ON CLUSTER {cluster} AS ");
    MIGRATIONS.iter().flat_map(|(_, _, sql)| statements(&sql.replace("{db}", db))).find_map(|stmt| {
        cluster_statements(&stmt, db, cluster).ok()?.into_iter().find_map(|step| match step {
            Step::Sql(sql) if sql.starts_with(&prefix) => Some(sql),
            _ => None,
        })
    })
}

/// `stmt` as the connection's layout runs it.
fn laid_out(conn: &Connection, stmt: &str) -> Result<Vec<Step>> {
    match &conn.cluster {
        Some(cluster) => cluster_statements(stmt, &conn.database, cluster),
        None => Ok(single_steps(stmt)),
    }
}

/// Runs `step` (idempotent: see [`Step`]).
async fn run(server: &Client, conn: &Connection, step: &Step) -> Result<()> {
    let db = &conn.database;
    match step {
        Step::Sql(sql) => Ok(server.query(sql).execute().await?),
        Step::AddColumn { table, column, sql } => add_column(server, db, table, column, sql).await,
        Step::RebuildDistributed { table, column } => {
            if column_exists(server, db, table, column).await? {
                return Ok(());
            }
            // The engine is the layout's own, not read back from the table:
            // a rebuild cut short between DROP and CREATE (or a DROP that
            // timed out on a node that is down) is finished by the next run.
            let cluster = conn.cluster.as_deref().unwrap_or_default();
            let create = distributed_table(db, cluster, table)
                .ok_or_else(|| crate::Error::Value(format!("no migration creates {db}.{table} as a Distributed table")))?;
            server.query(&format!("DROP TABLE IF EXISTS {db}.{table} ON CLUSTER {cluster}")).execute().await?;
            server.query(&create).execute().await?;
            Ok(())
        }
    }
}

/// Creates the database and applies every migration not yet recorded.
/// Returns the names of the migrations applied by this call.
pub async fn migrate(conn: &Connection) -> Result<Vec<String>> {
    check_identifier(&conn.database)?;
    if let Some(cluster) = &conn.cluster {
        check_identifier(cluster)?;
    }
    let db = &conn.database;
    let server = conn.server_client()?;
    for step in laid_out(conn, &format!("CREATE DATABASE IF NOT EXISTS {db}"))?
        .iter()
        .chain(&laid_out(conn, &SCHEMA_MIGRATIONS_TABLE.replace("{db}", db))?)
    {
        run(&server, conn, step).await?;
    }
    let client: Client = conn.writer()?;
    let applied: Vec<Applied> = client.query("SELECT version, name FROM schema_migrations FINAL").fetch_all().await?;
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.iter().any(|a| a.version == *version) {
            continue;
        }
        for stmt in statements(&sql.replace("{db}", db)) {
            for step in laid_out(conn, &stmt)? {
                run(&server, conn, &step).await?;
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
    fn every_shipped_statement_has_a_cluster_layout() {
        let layout = |s: &str| -> Vec<String> {
            cluster_statements(&s.replace("{db}", "m"), "m", "c")
                .unwrap()
                .into_iter()
                .map(|step| match step {
                    Step::Sql(sql) | Step::AddColumn { sql, .. } => sql,
                    Step::RebuildDistributed { table, column } => format!("rebuild {table} for {column}"),
                })
                .collect()
        };
        let usage = layout(statements(MIGRATIONS[0].2)[0].as_str());
        assert_eq!(usage.len(), 2);
        assert!(usage[0].starts_with("CREATE TABLE IF NOT EXISTS m.usage_minute_local ON CLUSTER c\n("), "{}", usage[0]);
        assert!(usage[0].contains("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/m/usage_minute_local', '{replica}', revision)\nPARTITION BY toYYYYMM(window_start)\nORDER BY (customer_id"), "{}", usage[0]);
        assert_eq!(usage[1], "CREATE TABLE IF NOT EXISTS m.usage_minute ON CLUSTER c AS m.usage_minute_local ENGINE = Distributed(c, m, usage_minute_local, cityHash64(customer_id))");
        let dlq = layout(statements(MIGRATIONS[1].2)[0].as_str());
        assert!(
            dlq[0].contains("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/m/dead_letters_local', '{replica}')"),
            "{}",
            dlq[0]
        );
        assert!(dlq[1].ends_with("cityHash64(source_topic, source_partition, source_offset))"), "{}", dlq[1]);
        let migrations = layout(SCHEMA_MIGRATIONS_TABLE);
        assert_eq!(migrations.len(), 1);
        assert!(
            migrations[0].contains("ReplicatedReplacingMergeTree('/clickhouse/tables/all/m/schema_migrations', '{shard}-{replica}')"),
            "{}",
            migrations[0]
        );
        let alter = layout("ALTER TABLE {db}.rated_usage ADD COLUMN line_type String DEFAULT 'Usage'");
        assert_eq!(
            alter,
            vec![
                "ALTER TABLE m.rated_usage_local ON CLUSTER c ADD COLUMN line_type String DEFAULT 'Usage'".to_owned(),
                "rebuild rated_usage for line_type".to_owned(),
            ]
        );
        assert_eq!(layout("CREATE DATABASE IF NOT EXISTS {db}"), vec!["CREATE DATABASE IF NOT EXISTS m ON CLUSTER c".to_owned()]);
        for (_, _, sql) in MIGRATIONS {
            for s in statements(sql) {
                let out = layout(&s);
                assert!(out.iter().all(|o| o.contains(" ON CLUSTER c") || o.starts_with("rebuild ")), "{out:?}");
            }
        }
        assert!(cluster_statements("DROP TABLE m.x", "m", "c").is_err());
        assert_eq!(
            distributed_table("m", "c", "rated_usage").as_deref(),
            Some("CREATE TABLE IF NOT EXISTS m.rated_usage ON CLUSTER c AS m.rated_usage_local ENGINE = Distributed(c, m, rated_usage_local, cityHash64(customer_id))")
        );
    }

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
