//! ClickHouse access for meterline: migrations, the sink's inserts, and the
//! queries behind reports and reconciliation.
//!
//! Talks HTTP with RowBinary through the official `clickhouse` crate, with
//! schema validation off: the Debian-packaged server (18.16) lacks the
//! setting the crate probes for it. Row structs therefore must match the
//! column order of `schemas/clickhouse/*.sql` exactly; the integration tests
//! insert and read back through them on the real server.
//!
//! No SQL here is built from user strings: identifiers come from validated
//! configuration, values are bound with `?` (escaped client-side by the
//! crate, the only parameter mechanism 18.16 understands).

pub mod audit;
pub mod cost;
mod migrate;
mod query;
pub mod rating;
mod rows;

pub use migrate::{migrate, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE};
pub use query::{latest_totals, usage_report, ReportGrouping, ReportRow};
pub use rows::{seconds, DeadLetterRow, UsageRow};

/// The analysts' guide, `docs/analysts.md`.
pub const ANALYSTS_GUIDE: &str = include_str!("../../../docs/analysts.md");

/// The example queries of the analysts' guide (its ```sql blocks), so that
/// tests can run every documented query on each supported ClickHouse.
pub fn analyst_examples() -> Vec<String> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in ANALYSTS_GUIDE.lines() {
        match (&mut block, line.trim()) {
            (None, "```sql") => block = Some(String::new()),
            (Some(b), "```") => {
                out.push(b.trim().to_owned());
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

use clickhouse::Client;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// ClickHouse refused a request or could not be reached; retrying may help
    /// when the server is down or overloaded.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("invalid identifier {0:?}: use letters, digits and _")]
    InvalidIdentifier(String),
    /// A value that does not fit its column (ours or the input's: the
    /// message says which value; retrying does not help).
    #[error("value out of range: {0}")]
    Value(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Connection settings (see `meter_config::ClickHouseConfig`).
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

impl Connection {
    /// A client bound to no database (for `CREATE DATABASE`).
    pub fn server_client(&self) -> Client {
        nodelay_client()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_validation(false)
            .with_compression(compression_for(&self.url))
    }

    /// A client whose unqualified table names resolve in the configured
    /// database.
    pub fn client(&self) -> Result<Client> {
        check_identifier(&self.database)?;
        Ok(self.server_client().with_database(&self.database))
    }
}

/// A [`Client`] over the crate's default HTTP client (keepalive, 2 s idle
/// pool timeout, below the server's 3 s) plus TCP_NODELAY.
///
/// Without TCP_NODELAY every INSERT stalled about 40 ms at its end (perf,
/// issue 6): the body's last small write (the final chunk and the chunked
/// terminator) waits under Nagle's algorithm for the ACK of the previous
/// segment, which the server delays. A sink batch is one INSERT per table,
/// so this cost 0.1 s per batch and capped the sink at a third of
/// `clickhouse-client`'s rate.
fn nodelay_client() -> Client {
    use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
    let mut connector = HttpConnector::new();
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    connector.set_nodelay(true);
    // The body type is the crate's (private) request body, inferred here.
    Client::with_http_client(
        HyperClient::builder(hyper_util::rt::TokioExecutor::new()).pool_idle_timeout(std::time::Duration::from_secs(2)).build(connector),
    )
}

/// LZ4 for INSERT bodies unless the server is on this host: over loopback
/// there is no bandwidth to save, and compressing and decompressing costs
/// both ends CPU on the same cores (issue 6: inserts were 0-20 % faster
/// uncompressed on the local stack, within the noise of a shared machine).
fn compression_for(url: &str) -> clickhouse::Compression {
    if is_loopback(url) {
        clickhouse::Compression::None
    } else {
        clickhouse::Compression::Lz4
    }
}

/// Whether `url`'s host is `localhost`, `127.x.y.z` or `[::1]`.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks that `name` can be used as a ClickHouse identifier unquoted.
pub fn check_identifier(name: &str) -> Result<()> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(Error::InvalidIdentifier(name.to_owned()))
    }
}

/// Every rating, report and audit query with sample arguments written as SQL
/// literals, in bind order: the chDB test runs each of them on current
/// ClickHouse (the integration tests run them on the local 18.16 through
/// the functions that use them).
pub fn checked_queries() -> Vec<(String, String, Vec<&'static str>)> {
    let month = ["'2026-02-01'", "'2026-02-01'", "'acme'", "'acme'"];
    let range = ["1769904000", "1772323200", "''", "''"];
    let mut q: Vec<(String, String, Vec<&'static str>)> = vec![
        ("stored price book".into(), rating::SQL_STORED_PRICE_BOOK.into(), vec![]),
        ("month usage".into(), rating::SQL_MONTH_USAGE.into(), range.to_vec()),
        (
            "minute series".into(),
            rating::SQL_MINUTE_SERIES.into(),
            vec!["1769903940", "1772359200", "'acme'", "'acme'", "['compute/BoxUsage:t3.micro','database/InstanceUsage:db.t3.medium']"],
        ),
        ("stored rated usage".into(), rating::SQL_STORED_RATED_USAGE.into(), vec!["'2026-02-01'", "'2026-01'", "''", "''"]),
        ("stored invoice lines".into(), rating::SQL_STORED_INVOICE_LINES.into(), vec!["'2026-02-01'", "'2026-01'", "''", "''"]),
        ("stored invoices".into(), rating::SQL_STORED_INVOICES.into(), vec!["'2026-02-01'", "'2026-01'", "'acme'", "'acme'"]),
        ("top customers".into(), cost::SQL_TOP_CUSTOMERS.into(), vec!["'2026-02-01'", "'2026-02-01'", "10"]),
        ("cur export".into(), cost::SQL_CUR.into(), month.to_vec()),
        ("audit rated by day".into(), audit::SQL_RATED_BY_DAY.into(), month.to_vec()),
        ("audit lines".into(), audit::SQL_LINES.into(), month.to_vec()),
        ("audit invoices".into(), audit::SQL_INVOICES.into(), month.to_vec()),
    ];
    for g in cost::CostGrouping::ALL {
        q.push((format!("cost by {g:?}"), cost::cost_sql(g), month.to_vec()));
    }
    for t in ["usage_minute", "usage_hour", "usage_day"] {
        q.push((format!("audit {t}"), audit::usage_sql(t), range.to_vec()));
    }
    q
}

/// `sql` with each `?` replaced by the next of `args` (SQL literals), for
/// running a query outside the client (chDB, clickhouse-client).
pub fn with_literals(sql: &str, args: &[&str]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut args = args.iter();
    for ch in sql.chars() {
        match (ch, args.len()) {
            ('?', n) if n > 0 => out.push_str(args.next().copied().unwrap_or("")),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        for url in
            ["http://127.0.0.1:8123", "http://localhost:8123/", "http://LOCALHOST", "http://[::1]:8123", "http://u:p@127.0.0.2:8123?x=1"]
        {
            assert!(is_loopback(url), "{url}");
            assert_eq!(compression_for(url), clickhouse::Compression::None, "{url}");
        }
        for url in [
            "http://10.0.0.5:8123",
            "http://clickhouse.internal:8123",
            "http://localhost.example.com",
            "http://[2001:db8::1]:8123",
            "http://127.0.0.1.example.com",
        ] {
            assert!(!is_loopback(url), "{url}");
            assert_eq!(compression_for(url), clickhouse::Compression::Lz4, "{url}");
        }
    }
}
