//! The agents' signature verification keys (see `meter_model::signing`).
//!
//! An agent listed here is *enrolled*: each of its events must carry a
//! signature by one of its keys, or it is dead-lettered as `bad_signature`
//! before it touches dedup state, authorization or windows. A forger that
//! claims an enrolled agent's id therefore cannot move that agent's seq
//! high-water mark. Two keys (or more) of one agent are valid at once, so
//! that a key can be rotated without a gap: add the new one here, switch
//! the agent, remove the old one.
//!
//! The file (`processor.agent_keys_file`) is TOML:
//!
//! ```toml
//! [agents."host-a"]
//! "host-a.2026-12" = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
//! ```

use std::collections::{BTreeMap, HashMap};

use meter_model::signing::{Key, Signature};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    agents: BTreeMap<String, BTreeMap<String, String>>,
}

/// Verification keys by agent id.
#[derive(Debug, Clone, Default)]
pub struct AgentKeys {
    agents: HashMap<String, Vec<Key>>,
}

/// What a record's signature says about its claimed agent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by a key of the enrolled agent.
    Verified,
    /// The agent is not enrolled (its events are unsigned, or signed with
    /// a key nobody can check).
    NotEnrolled,
}

impl AgentKeys {
    /// Parses a keys file. Errors name the agent and key, never a secret.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let f: KeysFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut agents = HashMap::new();
        for (agent, keys) in f.agents {
            if keys.is_empty() {
                return Err(format!("agents.{agent:?} lists no keys"));
            }
            let keys = keys
                .iter()
                .map(|(id, secret)| Key::new(id, secret).map_err(|e| format!("agents.{agent:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            agents.insert(agent, keys);
        }
        Ok(AgentKeys { agents })
    }

    /// Enrolled agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Checks the [`meter_model::signing::HEADER`] value `header` of a
    /// record whose value is `payload` and whose agent id is `agent_id`.
    /// Err: why it is a `bad_signature`.
    pub fn verify(&self, agent_id: &str, payload: &[u8], header: Option<&[u8]>) -> Result<Verdict, String> {
        let Some(keys) = self.agents.get(agent_id) else { return Ok(Verdict::NotEnrolled) };
        let Some(header) = header else {
            return Err(format!(
                "agent {agent_id:?} is enrolled (processor.agent_keys_file) and must sign its events; this record has no signature"
            ));
        };
        let Some(sig) = Signature::parse(header) else {
            return Err("the meterline-signature header is not v1:<key id>:<64 hex digits>".into());
        };
        let Some(key) = keys.iter().find(|k| k.id == sig.key_id) else {
            return Err(format!("key {:?} is not one of agent {agent_id:?}'s keys", sig.key_id));
        };
        if key.verify(payload, &sig.tag) {
            Ok(Verdict::Verified)
        } else {
            Err(format!("the signature by key {:?} does not match the record", sig.key_id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[agents."host-a"]
"a.1" = "00112233445566778899aabbccddeeff"
"a.2" = "ffeeddccbbaa99887766554433221100"
"#;

    #[test]
    fn either_key_of_a_rotation_verifies_and_nothing_else_does() {
        let keys = AgentKeys::from_toml(FILE).unwrap();
        let old = Key::new("a.1", "00112233445566778899aabbccddeeff").unwrap();
        let new = Key::new("a.2", "ffeeddccbbaa99887766554433221100").unwrap();
        for k in [&old, &new] {
            assert_eq!(keys.verify("host-a", b"v", Some(k.sign(b"v").as_bytes())), Ok(Verdict::Verified));
        }
        // Another agent's key, a changed record, no header, garbage.
        let forged = Key::new("a.1", "0123456789abcdef0123456789abcdef").unwrap();
        assert!(keys.verify("host-a", b"v", Some(forged.sign(b"v").as_bytes())).unwrap_err().contains("does not match"));
        assert!(keys.verify("host-a", b"w", Some(old.sign(b"v").as_bytes())).is_err());
        assert!(keys.verify("host-a", b"v", None).unwrap_err().contains("must sign"));
        assert!(keys.verify("host-a", b"v", Some(b"v1:zz")).is_err());
        let other = Key::new("b.1", "00112233445566778899aabbccddeeff").unwrap();
        assert!(keys.verify("host-a", b"v", Some(other.sign(b"v").as_bytes())).unwrap_err().contains("not one of"));
        assert_eq!(keys.verify("host-b", b"v", None), Ok(Verdict::NotEnrolled));
    }

    #[test]
    fn bad_files_are_refused_without_their_secrets() {
        let e = AgentKeys::from_toml("[agents.\"h\"]\nk = \"0011\"\n").unwrap_err();
        assert!(e.contains("\"h\"") && !e.contains("0011"), "{e}");
        assert!(AgentKeys::from_toml("[agents.\"h\"]\n").unwrap_err().contains("no keys"));
        assert!(AgentKeys::from_toml("agentz = 1").is_err());
    }
}
