//! The catalog of services and usage types (`schemas/catalog.toml`).
//!
//! The processor accepts an event only if its (service, usage_type) pair is
//! listed; the base unit fixes what an event's integer quantity means.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

/// The catalog shipped with this build, `schemas/catalog.toml`.
pub const BUILTIN_CATALOG: &str = include_str!("../../../schemas/catalog.toml");

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error("cannot read catalog {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid catalog: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid catalog: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseUnit {
    Seconds,
    /// vCPU time of host agents (exact: the kernel counts in 10 ms ticks).
    Milliseconds,
    Bytes,
    ByteSeconds,
    Requests,
}

impl BaseUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseUnit::Seconds => "seconds",
            BaseUnit::Milliseconds => "milliseconds",
            BaseUnit::Bytes => "bytes",
            BaseUnit::ByteSeconds => "byte-seconds",
            BaseUnit::Requests => "requests",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    #[serde(default)]
    description: String,
}

/// One accepted usage type of one service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageTypeInfo {
    pub service: String,
    pub name: String,
    pub base_unit: BaseUnit,
    pub pricing_unit: String,
    #[serde(default)]
    pub description: String,
    /// When true, resource_id is part of this usage type's window key (needed
    /// where pricing works per resource, e.g. a per-run minimum).
    #[serde(default)]
    pub key_by_resource: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: u32,
    #[serde(default)]
    service: Vec<ServiceEntry>,
    #[serde(default)]
    usage_type: Vec<UsageTypeInfo>,
}

/// The validated catalog, indexed for lookups on the hot path.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub version: u32,
    services: HashMap<String, String>,
    usage_types: HashMap<(String, String), UsageTypeInfo>,
}

/// The outcome of looking up an event's (service, usage_type).
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Known(&'a UsageTypeInfo),
    UnknownService,
    UnknownUsageType,
}

impl Catalog {
    pub fn builtin() -> Self {
        // The builtin catalog is validated by a unit test, so a failure here
        // is a build defect, not an input problem.
        #[allow(clippy::expect_used)]
        Self::parse(BUILTIN_CATALOG).expect("builtin catalog is valid")
    }

    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = toml::from_str(text)?;
        let mut problems = Vec::new();
        let mut services = HashMap::new();
        for s in file.service {
            if services.insert(s.name.clone(), s.description).is_some() {
                problems.push(format!("service {} listed twice", s.name));
            }
        }
        let mut usage_types = HashMap::new();
        let mut seen = HashSet::new();
        for u in file.usage_type {
            if !services.contains_key(&u.service) {
                problems.push(format!("usage type {} names unknown service {}", u.name, u.service));
            }
            if !seen.insert((u.service.clone(), u.name.clone())) {
                problems.push(format!("usage type {}/{} listed twice", u.service, u.name));
            }
            usage_types.insert((u.service.clone(), u.name.clone()), u);
        }
        if !problems.is_empty() {
            return Err(CatalogError::Invalid(problems.join("; ")));
        }
        Ok(Catalog { version: file.version, services, usage_types })
    }

    pub fn lookup(&self, service: &str, usage_type: &str) -> Lookup<'_> {
        // The tuple key needs owned strings; the catalog is small, so a
        // linear fallback is avoided by probing with a borrowed pair.
        match self.usage_types.get(&(service.to_owned(), usage_type.to_owned())) {
            Some(info) => Lookup::Known(info),
            None if self.services.contains_key(service) => Lookup::UnknownUsageType,
            None => Lookup::UnknownService,
        }
    }

    pub fn usage_types(&self) -> impl Iterator<Item = &UsageTypeInfo> {
        self.usage_types.values()
    }

    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_covers_all_four_families() {
        let c = Catalog::builtin();
        for s in ["compute", "object-storage", "database", "cdn"] {
            assert!(c.service_names().any(|n| n == s), "missing {s}");
        }
        assert!(matches!(c.lookup("compute", "BoxUsage:m5.large"), Lookup::Known(_)));
        assert_eq!(c.lookup("compute", "BoxUsage:nope"), Lookup::UnknownUsageType);
        assert_eq!(c.lookup("mainframe", "BoxUsage:m5.large"), Lookup::UnknownService);
    }

    #[test]
    fn builtin_catalog_lists_the_host_agent_usage_types() {
        let c = Catalog::builtin();
        let unit = |t: &str| match c.lookup("host", t) {
            Lookup::Known(i) => i.base_unit,
            other => panic!("host/{t}: {other:?}"),
        };
        assert_eq!(unit("CPU-VcpuMs"), BaseUnit::Milliseconds);
        assert_eq!(unit("Memory-ByteSec"), BaseUnit::ByteSeconds);
        for t in ["Network-In-Bytes", "Network-Out-Bytes", "Disk-Read-Bytes", "Disk-Write-Bytes"] {
            assert_eq!(unit(t), BaseUnit::Bytes);
        }
    }

    #[test]
    fn rejects_usage_type_of_unknown_service_and_unknown_fields() {
        let bad = "version = 1\n[[usage_type]]\nservice = \"x\"\nname = \"y\"\nbase_unit = \"bytes\"\npricing_unit = \"GB\"\n";
        assert!(matches!(Catalog::parse(bad), Err(CatalogError::Invalid(_))));
        let unknown = "version = 1\ncolour = \"red\"\n";
        assert!(matches!(Catalog::parse(unknown), Err(CatalogError::Parse(_))));
    }
}
