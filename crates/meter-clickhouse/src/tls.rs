//! TLS for an `https://` ClickHouse url: the server is verified against
//! `clickhouse.ca_file` (or the system's trust store), and a client
//! certificate is presented when `clickhouse.cert_file` and `key_file` are
//! set. rustls with the ring provider: no second OpenSSL linkage to keep in
//! step with librdkafka's, and errors that name the cause
//! ("invalid peer certificate: UnknownIssuer").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// Where a connection's TLS material is (see
/// [`meter_config::ClickHouseConfig`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what} {}: {e}", path.display()))
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(what, path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, path, e))?;
    if certs.is_empty() {
        return Err(tls_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

impl TlsFiles {
    /// The rustls client configuration these files describe.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in certificates("clickhouse.ca_file", path)? {
                    roots.add(cert).map_err(|e| tls_error("clickhouse.ca_file", path, e))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(Error::Tls(format!(
                        "no CA certificate in the system trust store ({} errors): set clickhouse.ca_file",
                        found.errors.len()
                    )));
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("clickhouse.cert_file", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_error("clickhouse.key_file", key, format!("{e} (an unencrypted PEM key: PKCS#8, SEC1 or PKCS#1)")))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| Error::Tls(format!("client certificate: {e}")))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(Error::Tls("clickhouse.cert_file and clickhouse.key_file go together".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_material_names_the_setting_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsFiles { ca_file: Some(empty.clone()), ..TlsFiles::default() }.client_config().unwrap_err().to_string();
        assert!(err.contains("clickhouse.ca_file") && err.contains("empty.pem") && err.contains("no PEM certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = TlsFiles { ca_file: Some(missing), ..TlsFiles::default() }.client_config().unwrap_err().to_string();
        assert!(err.contains("clickhouse.ca_file") && err.contains("missing.pem"), "{err}");
    }
}
