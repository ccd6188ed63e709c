//! Which agents may publish usage for which customers.
//!
//! A compromised or misconfigured host must not be able to bill (or
//! un-bill) someone else: when a registry is configured, an event is only
//! aggregated if its `agent_id` is registered and its `customer_id` is one
//! of that agent's customers. Anything else is dead-lettered as
//! `unauthorized` before it touches dedup state or windows.

use std::collections::{BTreeMap, HashMap, HashSet};

/// The agent → customers registry; empty means every agent may publish for
/// every customer.
#[derive(Debug, Clone, Default)]
pub struct AgentRegistry {
    agents: HashMap<String, Customers>,
}

#[derive(Debug, Clone)]
enum Customers {
    Any,
    Only(HashSet<String>),
}

impl AgentRegistry {
    /// From the configuration's `processor.agents` (`*` means any customer).
    pub fn new(agents: &BTreeMap<String, Vec<String>>) -> Self {
        let agents = agents
            .iter()
            .map(|(agent, customers)| {
                let c =
                    if customers.iter().any(|c| c == "*") { Customers::Any } else { Customers::Only(customers.iter().cloned().collect()) };
                (agent.clone(), c)
            })
            .collect();
        AgentRegistry { agents }
    }

    pub fn is_enforced(&self) -> bool {
        !self.agents.is_empty()
    }

    /// Ok, or why `agent_id` may not publish for `customer_id`.
    pub fn check(&self, agent_id: &str, customer_id: &str) -> Result<(), String> {
        if self.agents.is_empty() {
            return Ok(());
        }
        match self.agents.get(agent_id) {
            None => Err(format!("agent {agent_id:?} is not registered")),
            Some(Customers::Any) => Ok(()),
            Some(Customers::Only(customers)) if customers.contains(customer_id) => Ok(()),
            Some(Customers::Only(_)) => Err(format!("agent {agent_id:?} is not registered for customer {customer_id:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_agents_publish_only_for_their_customers() {
        let mut cfg = BTreeMap::new();
        cfg.insert("host-1".to_owned(), vec!["cust-1".to_owned(), "cust-2".to_owned()]);
        cfg.insert("edge".to_owned(), vec!["*".to_owned()]);
        let r = AgentRegistry::new(&cfg);
        assert!(r.is_enforced());
        assert!(r.check("host-1", "cust-2").is_ok());
        assert_eq!(r.check("host-1", "cust-3"), Err("agent \"host-1\" is not registered for customer \"cust-3\"".into()));
        assert_eq!(r.check("host-9", "cust-1"), Err("agent \"host-9\" is not registered".into()));
        assert!(r.check("edge", "anyone").is_ok());
        let open = AgentRegistry::new(&BTreeMap::new());
        assert!(!open.is_enforced());
        assert!(open.check("whoever", "whatever").is_ok());
    }
}
