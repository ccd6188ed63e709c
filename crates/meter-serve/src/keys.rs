//! Bearer API keys: the server keeps the SHA-256 of each token, and a
//! request's token is hashed and looked up. Tokens are random (32 bytes
//! from the OS, see [`new_token`]), so an unsalted hash is enough: there
//! is no dictionary to try.

use std::collections::{BTreeMap, HashMap};

use meter_config::{ApiKey, ApiRole};
use meter_model::signing::Key;
use sha2::{Digest, Sha256};

/// Who a request is: one configured API key.
#[derive(Debug)]
pub struct Principal {
    /// The key's name in the configuration (logged, never the token).
    pub name: String,
    pub role: ApiRole,
    /// `ingest` keys: the agent id of their events.
    pub agent_id: String,
    customers: Scope,
    /// `ingest` keys of an enrolled agent: the key their events are signed with.
    pub signer: Option<Key>,
}

#[derive(Debug)]
enum Scope {
    All,
    Only(Vec<String>),
}

impl Principal {
    /// Whether the key may report for or read `customer`.
    pub fn covers(&self, customer: &str) -> bool {
        match &self.customers {
            Scope::All => true,
            Scope::Only(c) => c.iter().any(|c| c == customer),
        }
    }

    /// Whether the key may read (`query`, `admin`).
    pub fn reads(&self) -> bool {
        matches!(self.role, ApiRole::Query | ApiRole::Admin)
    }
}

/// Every API key, by the SHA-256 of its token.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Principal>,
}

/// Why a request's credentials are refused (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    Unknown,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => "no Authorization header: send `Authorization: Bearer <token>`",
            AuthError::Malformed => "the Authorization header is not `Bearer <token>`",
            AuthError::Unknown => "the bearer token is not an API key of this server",
        })
    }
}

impl ApiKeys {
    /// From the configuration's keys (checked there); reads the signing
    /// key files.
    pub fn new(keys: &BTreeMap<String, ApiKey>) -> anyhow::Result<Self> {
        let mut by_hash = HashMap::new();
        for (name, k) in keys {
            let hash = from_hex(&k.sha256).ok_or_else(|| anyhow::anyhow!("api key {name:?}: sha256 is not 64 hex digits"))?;
            let signer = match &k.signing_key_file {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("api key {name:?}: cannot read signing key {}: {e}", path.display()))?;
                    Some(Key::parse(text.trim()).map_err(|e| anyhow::anyhow!("api key {name:?}: signing key {}: {e}", path.display()))?)
                }
            };
            let customers = match k.role {
                ApiRole::Admin => Scope::All,
                _ if k.customers.iter().any(|c| c == "*") => Scope::All,
                _ => Scope::Only(k.customers.clone()),
            };
            by_hash.insert(hash, Principal { name: name.clone(), role: k.role, agent_id: k.agent_id.clone(), customers, signer });
        }
        Ok(ApiKeys { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.by_hash.values()
    }

    /// Where the processor's signature rules (`processor.agent_keys_file`,
    /// `processor.accept_unsigned`) would dead-letter an ingest key's events
    /// as `bad_signature` after the client got its 202: an enrolled agent
    /// without the key's `signing_key_file`, a signing key the processor
    /// does not hold, or unsigned events that are not accepted.
    pub fn signature_mismatches(&self, agent_keys: &meter_engine::AgentKeys, accept_unsigned: bool) -> Vec<String> {
        const PROBE: &[u8] = b"meter serve: does the processor verify this key's signature?";
        let mut out = Vec::new();
        let mut ingest: Vec<&Principal> = self.principals().filter(|p| p.role == ApiRole::Ingest).collect();
        ingest.sort_by(|a, b| a.name.cmp(&b.name));
        for p in ingest {
            let header = p.signer.as_ref().map(|k| k.sign(PROBE));
            match agent_keys.verify(&p.agent_id, PROBE, header.as_deref().map(str::as_bytes)) {
                Err(e) => out.push(format!("api key {:?}: {e}", p.name)),
                Ok(meter_engine::Verdict::NotEnrolled) if !accept_unsigned => out.push(format!(
                    "api key {:?}: agent {:?} is not enrolled in processor.agent_keys_file and processor.accept_unsigned is false",
                    p.name, p.agent_id
                )),
                Ok(_) => {}
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The principal of an `Authorization` header's value.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<&Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthError::Malformed);
        }
        self.by_hash.get(&sha256(token)).ok_or(AuthError::Unknown)
    }
}

/// Where an ingest key would post events that the processor's
/// `processor.agents` (when set) dead-letters as `unauthorized` after the
/// client got its 202: its agent is not registered, or it covers a
/// customer its agent is not registered for. Empty when they agree.
pub fn registry_mismatches(keys: &BTreeMap<String, ApiKey>, agents: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    if agents.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, k) in keys.iter().filter(|(_, k)| k.role == ApiRole::Ingest) {
        let Some(registered) = agents.get(&k.agent_id) else {
            out.push(format!("api key {name:?}: agent {:?} is not in processor.agents", k.agent_id));
            continue;
        };
        if registered.iter().any(|c| c == "*") {
            continue;
        }
        for c in &k.customers {
            if c == "*" || !registered.contains(c) {
                out.push(format!("api key {name:?}: agent {:?} is not registered for customer {c:?} in processor.agents", k.agent_id));
            }
        }
    }
    out
}

/// The SHA-256 of a token, as stored in `serve.api_keys.<name>.sha256`.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub use meter_model::signing::to_hex;

/// A stored `sha256`: 64 hex digits.
fn from_hex(s: &str) -> Option<[u8; 32]> {
    meter_model::signing::from_hex(s.trim())?.try_into().ok()
}

/// A new token: `mtr_` and 64 hex digits of OS randomness.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(format!("mtr_{}", to_hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(token: &str, role: ApiRole, customers: &[&str]) -> ApiKey {
        ApiKey {
            sha256: to_hex(&sha256(token)),
            role,
            agent_id: "api-web".into(),
            customers: customers.iter().map(|c| c.to_string()).collect(),
            signing_key_file: None,
        }
    }

    #[test]
    fn a_token_is_found_by_its_hash_and_scoped_to_its_customers() {
        let mut cfg = BTreeMap::new();
        cfg.insert("web".to_owned(), key("tok-web", ApiRole::Ingest, &["c-1"]));
        cfg.insert("all".to_owned(), key("tok-all", ApiRole::Query, &["*"]));
        let keys = ApiKeys::new(&cfg).expect("keys");
        let web = keys.authenticate(Some(b"Bearer tok-web")).expect("web");
        assert_eq!(web.name, "web");
        assert!(web.covers("c-1") && !web.covers("c-2") && !web.reads());
        assert!(keys.authenticate(Some(b"bearer  tok-all ")).expect("all").covers("anyone"));
        assert_eq!(keys.authenticate(None).unwrap_err(), AuthError::Missing);
        assert_eq!(keys.authenticate(Some(b"Basic dG9rLXdlYg==")).unwrap_err(), AuthError::Malformed);
        assert_eq!(keys.authenticate(Some(b"Bearer tok-weB")).unwrap_err(), AuthError::Unknown);
        // The stored hash is not a token.
        let stored = to_hex(&sha256("tok-web"));
        assert_eq!(keys.authenticate(Some(format!("Bearer {stored}").as_bytes())).unwrap_err(), AuthError::Unknown);
        let t = new_token().expect("token");
        let mut agents = BTreeMap::new();
        assert!(registry_mismatches(&cfg, &agents).is_empty(), "no registry: nothing to compare");
        agents.insert("api-web".to_owned(), vec!["c-1".to_owned()]);
        assert!(registry_mismatches(&cfg, &agents).is_empty());
        cfg.get_mut("web").expect("web").customers.push("c-2".into());
        assert_eq!(
            registry_mismatches(&cfg, &agents),
            ["api key \"web\": agent \"api-web\" is not registered for customer \"c-2\" in processor.agents"]
        );
        cfg.get_mut("web").expect("web").agent_id = "other".into();
        assert_eq!(registry_mismatches(&cfg, &agents), ["api key \"web\": agent \"other\" is not in processor.agents"]);
        assert!(t.starts_with("mtr_") && t.len() == 68 && t != new_token().expect("token"));
    }
}
