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

mod migrate;
mod query;
mod rows;

pub use migrate::{migrate, MIGRATIONS};
pub use query::{latest_totals, usage_report, ReportGrouping, ReportRow};
pub use rows::{seconds, DeadLetterRow, UsageRow};

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
        Client::default().with_url(&self.url).with_user(&self.user).with_password(&self.password).with_validation(false)
    }

    /// A client whose unqualified table names resolve in the configured
    /// database.
    pub fn client(&self) -> Result<Client> {
        check_identifier(&self.database)?;
        Ok(self.server_client().with_database(&self.database))
    }
}

/// Checks that `name` can be used as a ClickHouse identifier unquoted.
pub fn check_identifier(name: &str) -> Result<()> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(Error::InvalidIdentifier(name.to_owned()))
    }
}
