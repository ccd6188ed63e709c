//! ClickHouse plumbing for meterline: the one connection builder every
//! ClickHouse client in the project uses, migrations, and the usage queries
//! that reconciliation and reports share. The stages own their rows and
//! queries (`meter-sink`'s inserts, `meter-report`'s rating and reports).
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

mod migrate;
mod query;
mod tls;

pub use migrate::{migrate, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE};
pub use query::{latest_totals, usage_report, ReportGrouping, ReportRow};
pub use tls::TlsFiles;

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
use meter_config::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// ClickHouse refused a request or could not be reached; retrying may help
    /// when the server is down or overloaded.
    #[error("clickhouse: {}", explain(.0))]
    ClickHouse(#[from] clickhouse::error::Error),
    /// The TLS settings cannot be used (a file unreadable, no certificate
    /// in it, a key that does not match).
    #[error("clickhouse TLS: {0}")]
    Tls(String),
    /// The server did not answer in time.
    #[error("clickhouse: {0}")]
    Unreachable(String),
    /// The server refused this client: credentials, TLS or protocol.
    /// Retrying does not help; the settings must change.
    #[error("clickhouse refused the connection: {0}")]
    Refused(String),
    #[error("invalid identifier {0:?}: use letters, digits and _")]
    InvalidIdentifier(String),
    /// A value that does not fit its column (ours or the input's: the
    /// message says which value; retrying does not help).
    #[error("value out of range: {0}")]
    Value(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Connection settings (see [`meter_config::ClickHouseConfig`]).
#[derive(Clone)]
pub struct Connection {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    /// CA and client certificate for an `https://` url.
    pub tls: TlsFiles,
    /// The cluster (`remote_servers` name) the schema is laid out on; none:
    /// one server.
    pub cluster: Option<String>,
}

/// The password never reaches a log line through `{:?}`.
impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &if self.password.is_empty() { "" } else { "***" })
            .field("tls", &self.tls)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl From<&ClickHouseConfig> for Connection {
    fn from(c: &ClickHouseConfig) -> Self {
        Connection {
            url: c.url.clone(),
            database: c.database.clone(),
            user: c.user.clone(),
            password: c.password.clone(),
            tls: TlsFiles { ca_file: c.ca_file.clone(), cert_file: c.cert_file.clone(), key_file: c.key_file.clone() },
            cluster: (!c.cluster.is_empty()).then(|| c.cluster.clone()),
        }
    }
}

impl Connection {
    /// A client bound to no database (for `CREATE DATABASE`). Fails only
    /// when the TLS material of an `https://` url cannot be used.
    pub fn server_client(&self) -> Result<Client> {
        Ok(self
            .http_client()?
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_validation(false)
            .with_compression(compression_for(&self.url)))
    }

    /// A client whose unqualified table names resolve in the configured
    /// database.
    pub fn client(&self) -> Result<Client> {
        check_identifier(&self.database)?;
        Ok(self.server_client()?.with_database(&self.database))
    }

    /// [`Connection::client`] for a writer: on a cluster its inserts into a
    /// `Distributed` table return only once every row is on its shard
    /// (`insert_distributed_sync`), so that a sink commits offsets only for
    /// rows that are stored, and what was just written reads back at once.
    /// (Not for a `readonly = 1` user, which may not change settings.)
    pub fn writer(&self) -> Result<Client> {
        let client = self.client()?;
        Ok(match &self.cluster {
            Some(_) => client.with_setting("insert_distributed_sync", "1"),
            None => client,
        })
    }

    /// Asks the server `SELECT 1` within `timeout`: a service checks its
    /// ClickHouse once at start, so that a wrong password, an untrusted
    /// certificate or a plain-text url for a TLS port stops it at once with
    /// the cause named, rather than in its first batch.
    pub async fn check(&self, timeout: std::time::Duration) -> Result<()> {
        let client = self.server_client()?;
        match tokio::time::timeout(timeout, client.query("SELECT 1").fetch_one::<u8>()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let (text, refused) = explained(&e);
                Err(if refused { Error::Refused(text) } else { Error::ClickHouse(e) })
            }
            Err(_) => Err(Error::Unreachable(format!(
                "{} did not answer within {} s{}",
                self.url,
                timeout.as_secs(),
                if self.tls_expected() { "" } else { " (if that port serves HTTPS, the url must start with https://)" }
            ))),
        }
    }

    fn tls_expected(&self) -> bool {
        self.url.trim().to_ascii_lowercase().starts_with("https://")
    }

    fn http_client(&self) -> Result<Client> {
        if self.tls_expected() {
            let tls = self.tls.client_config()?;
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only()
                .enable_http1()
                .wrap_connector(nodelay_connector());
            Ok(Client::with_http_client(pool().build(https)))
        } else {
            Ok(Client::with_http_client(pool().build(nodelay_connector())))
        }
    }
}

/// The error with its causes (the crate's "network error" says only
/// "client error (Connect)"; the cause under it says what happened), and
/// what to check when the server refused the credentials or the
/// connection.
fn explain(e: &clickhouse::error::Error) -> String {
    explained(e).0
}

/// [`explain`], and whether the error is a refusal (there is a hint).
fn explained(e: &clickhouse::error::Error) -> (String, bool) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    let lower = text.to_ascii_lowercase();
    let hint = if ["code: 516", "code: 192", "code: 193", "authentication failed", "wrong password", "unknown user"]
        .iter()
        .any(|m| lower.contains(m))
    {
        " (check clickhouse.user and clickhouse.password)"
    } else if lower.contains("invalid peer certificate") || lower.contains("certificate") && lower.contains("unknownissuer") {
        " (the server's certificate is not signed by a CA in clickhouse.ca_file)"
    } else if ["connection closed before message completed", "connection reset", "unexpected eof", "invalid http version"]
        .iter()
        .any(|m| lower.contains(m))
    {
        " (if that port serves HTTPS, the url must start with https://)"
    } else if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
        " (the port does not speak TLS: is the url's port the server's https_port?)"
    } else {
        ""
    };
    text.push_str(hint);
    (text, !hint.is_empty())
}

/// The connector of every [`Client`]: the crate's default HTTP client (keepalive, 2 s idle
/// pool timeout, below the server's 3 s) plus TCP_NODELAY.
///
/// Without TCP_NODELAY every INSERT stalled about 40 ms at its end (perf,
/// issue 6): the body's last small write (the final chunk and the chunked
/// terminator) waits under Nagle's algorithm for the ACK of the previous
/// segment, which the server delays. A sink batch is one INSERT per table,
/// so this cost 0.1 s per batch and capped the sink at a third of
/// `clickhouse-client`'s rate.
fn nodelay_connector() -> hyper_util::client::legacy::connect::HttpConnector {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    connector.set_nodelay(true);
    // Let the TLS connector wrapped around it connect for https:// urls.
    connector.enforce_http(false);
    connector
}

/// The HTTP client's pool settings. The body type is the crate's (private)
/// request body, inferred where the client is built and handed to it.
fn pool() -> hyper_util::client::legacy::Builder {
    let mut b = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    b.pool_idle_timeout(std::time::Duration::from_secs(2));
    b
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

/// Epoch milliseconds as ClickHouse DateTime seconds.
pub fn seconds(ms: i64) -> u32 {
    // Event times are validated to lie in 1970..2100, which fits u32 seconds
    // until 2106.
    u32::try_from(ms.div_euclid(1000)).unwrap_or(u32::MAX)
}

/// Checks that `name` can be used as a ClickHouse identifier unquoted.
pub fn check_identifier(name: &str) -> Result<()> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(Error::InvalidIdentifier(name.to_owned()))
    }
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
