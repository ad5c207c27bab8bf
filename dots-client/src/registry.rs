//! The customer registry: which customer prefixes each agent serves (the
//! WAN addresses and delegated prefixes the ISP assigned to the router
//! whose certificate carries that identity).
//!
//! It answers the two questions a mitigation request raises (RFC 9066
//! §5.3.1: "The Call Home DOTS client MUST validate that attacker prefixes
//! are within the scope of the Call Home DOTS server domain"):
//! which agent to ask, when a detector names only the attacker, and whether
//! the sources lie inside that agent's prefixes.
//!
//! Prefixes come from `[[customer]]` in client.toml (replaced on reload)
//! and from the API (kept in `<state-dir>/customers.json`, and taking
//! precedence over the file for that agent). No prefix may lie inside
//! another agent's prefix: every address belongs to at most one customer,
//! so the agent for an address is never ambiguous.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError};

/// Where an agent's prefixes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Config,
    Api,
}

/// One agent's entry, as `agents` and the API show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Customer {
    pub agent: String,
    pub prefixes: Vec<IpNet>,
    pub origin: Origin,
}

/// Why the registry refused a change or a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("an agent identity cannot be empty")]
    EmptyAgent,
    #[error("agent {agent}: {prefix} has host bits set: write {}", prefix.trunc())]
    HostBits { agent: String, prefix: IpNet },
    #[error("agent {agent}: {prefix} is not a routable customer prefix (loopback, multicast, broadcast or unspecified)")]
    NotRoutable { agent: String, prefix: IpNet },
    #[error("agent {agent}: {prefix} overlaps {other_prefix} of agent {other}: an address belongs to one customer")]
    Overlap {
        agent: String,
        prefix: IpNet,
        other: String,
        other_prefix: IpNet,
    },
    #[error("no customer prefix contains {0}: no agent serves it")]
    NoCustomer(IpNet),
    #[error("agent {0} has no customer prefixes, so its sources cannot be checked (RFC 9066 §5.3.1): add a [[customer]] entry or set them through the API")]
    NoPrefixes(String),
    #[error(
        "source {prefix} is outside the customer prefixes of agent {agent} ({})",
        list(prefixes)
    )]
    SourceOutside {
        prefix: IpNet,
        agent: String,
        prefixes: Vec<IpNet>,
    },
    #[error("the sources belong to different agents ({}): send one request per agent", .0.join(", "))]
    SeveralAgents(Vec<String>),
    #[error("a mitigation needs at least one source prefix")]
    NoSource,
}

fn list(prefixes: &[IpNet]) -> String {
    prefixes
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn routable(p: &IpNet) -> bool {
    let a = p.addr();
    !(a.is_loopback()
        || a.is_multicast()
        || a.is_unspecified()
        || matches!(a, std::net::IpAddr::V4(v4) if v4.is_broadcast()))
}

/// The on-disk form of the API's entries.
#[derive(Default, Serialize, Deserialize)]
struct ApiFile {
    agents: BTreeMap<String, Vec<IpNet>>,
}

/// Customer prefixes per agent identity.
#[derive(Default)]
pub struct CustomerRegistry {
    config: BTreeMap<String, Vec<IpNet>>,
    api: BTreeMap<String, Vec<IpNet>>,
    /// Every effective prefix -> its agent.
    index: HashMap<IpNet, String>,
    /// `<state-dir>/customers.json`; `None`: API entries live in memory.
    path: Option<PathBuf>,
}

impl CustomerRegistry {
    /// The registry from the configuration's entries and the API entries
    /// kept in `state_dir`.
    pub fn new(
        config: BTreeMap<String, Vec<IpNet>>,
        state_dir: Option<PathBuf>,
    ) -> Result<CustomerRegistry, LoadError> {
        let path = state_dir.map(|d| d.join("customers.json"));
        let api = match &path {
            Some(p) => store::read::<ApiFile>(p)?.unwrap_or_default().agents,
            None => BTreeMap::new(),
        };
        let index = build_index(&config, &api)?;
        Ok(CustomerRegistry {
            config,
            api,
            index,
            path,
        })
    }

    /// Replaces the configuration's entries (reload); on error nothing changes.
    pub fn replace_config(
        &mut self,
        config: BTreeMap<String, Vec<IpNet>>,
    ) -> Result<(), RegistryError> {
        self.index = build_index(&config, &self.api)?;
        self.config = config;
        Ok(())
    }

    /// Sets an agent's prefixes through the API (replacing the file's for
    /// that agent); on error nothing changes.
    pub fn set(&mut self, agent: &str, prefixes: Vec<IpNet>) -> Result<(), SetError> {
        let mut api = self.api.clone();
        api.insert(agent.to_string(), prefixes);
        let index = build_index(&self.config, &api)?;
        self.persist(&api)?;
        self.api = api;
        self.index = index;
        Ok(())
    }

    /// Drops an agent's API entry (the file's entry applies again); returns
    /// whether there was one.
    pub fn remove(&mut self, agent: &str) -> Result<bool, SetError> {
        if !self.api.contains_key(agent) {
            return Ok(false);
        }
        let mut api = self.api.clone();
        api.remove(agent);
        let index = build_index(&self.config, &api)?;
        self.persist(&api)?;
        self.api = api;
        self.index = index;
        Ok(true)
    }

    fn persist(&self, api: &BTreeMap<String, Vec<IpNet>>) -> Result<(), StoreError> {
        match &self.path {
            Some(p) => store::write(
                p,
                &ApiFile {
                    agents: api.clone(),
                },
            ),
            None => Ok(()),
        }
    }

    /// The agent's entry, if it has one.
    pub fn get(&self, agent: &str) -> Option<Customer> {
        let (prefixes, origin) = match self.api.get(agent) {
            Some(p) => (p, Origin::Api),
            None => (self.config.get(agent)?, Origin::Config),
        };
        Some(Customer {
            agent: agent.to_string(),
            prefixes: prefixes.clone(),
            origin,
        })
    }

    /// Every entry, by agent identity.
    pub fn all(&self) -> Vec<Customer> {
        let mut agents: Vec<&String> = self.config.keys().chain(self.api.keys()).collect();
        agents.sort();
        agents.dedup();
        agents.into_iter().filter_map(|a| self.get(a)).collect()
    }

    /// The agent whose prefixes contain `source`.
    pub fn agent_for(&self, source: &IpNet) -> Option<&str> {
        (0..=source.prefix_len()).rev().find_map(|len| {
            let covering = IpNet::new(source.addr(), len).ok()?.trunc();
            self.index.get(&covering).map(String::as_str)
        })
    }

    /// The agent to ask about `sources`: `agent` when given, else the one
    /// whose prefixes contain them; every source must lie inside that
    /// agent's prefixes.
    pub fn resolve(&self, agent: Option<&str>, sources: &[IpNet]) -> Result<String, RegistryError> {
        let first = sources.first().ok_or(RegistryError::NoSource)?;
        let agent = match agent {
            Some(a) => a.to_string(),
            None => {
                let mut agents: Vec<String> = Vec::new();
                for s in sources {
                    let a = self.agent_for(s).ok_or(RegistryError::NoCustomer(*s))?;
                    if !agents.iter().any(|x| x == a) {
                        agents.push(a.to_string());
                    }
                }
                if agents.len() > 1 {
                    return Err(RegistryError::SeveralAgents(agents));
                }
                agents.pop().ok_or(RegistryError::NoCustomer(*first))?
            }
        };
        let prefixes = self
            .get(&agent)
            .map(|c| c.prefixes)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| RegistryError::NoPrefixes(agent.clone()))?;
        for s in sources {
            if !prefixes.iter().any(|p| p.contains(s)) {
                return Err(RegistryError::SourceOutside {
                    prefix: *s,
                    agent,
                    prefixes,
                });
            }
        }
        Ok(agent)
    }
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] RegistryError),
}

/// Why an API change was refused.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error(transparent)]
    Invalid(#[from] RegistryError),
    #[error("saving the registry: {0}")]
    Store(#[from] StoreError),
}

/// Checks the effective entries (API over config) and indexes them.
fn build_index(
    config: &BTreeMap<String, Vec<IpNet>>,
    api: &BTreeMap<String, Vec<IpNet>>,
) -> Result<HashMap<IpNet, String>, RegistryError> {
    let effective = config
        .iter()
        .filter(|(a, _)| !api.contains_key(*a))
        .chain(api.iter());
    let mut index: HashMap<IpNet, String> = HashMap::new();
    for (agent, prefixes) in effective {
        if agent.trim().is_empty() {
            return Err(RegistryError::EmptyAgent);
        }
        for p in prefixes {
            if p.trunc() != *p {
                return Err(RegistryError::HostBits {
                    agent: agent.clone(),
                    prefix: *p,
                });
            }
            if !routable(p) {
                return Err(RegistryError::NotRoutable {
                    agent: agent.clone(),
                    prefix: *p,
                });
            }
            if let Some(other) = index.get(p).filter(|o| *o != agent) {
                return Err(RegistryError::Overlap {
                    agent: agent.clone(),
                    prefix: *p,
                    other: other.clone(),
                    other_prefix: *p,
                });
            }
            index.insert(*p, agent.clone());
        }
    }
    // Nesting: a prefix inside another agent's shorter prefix. Checking
    // each prefix's strict supernets finds every nested pair once.
    for (p, agent) in &index {
        for len in 0..p.prefix_len() {
            let Ok(sup) = IpNet::new(p.addr(), len) else {
                continue;
            };
            let sup = sup.trunc();
            if let Some(other) = index.get(&sup).filter(|o| *o != agent) {
                return Err(RegistryError::Overlap {
                    agent: agent.clone(),
                    prefix: *p,
                    other: other.clone(),
                    other_prefix: sup,
                });
            }
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn config(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpNet>> {
        entries
            .iter()
            .map(|(a, ps)| (a.to_string(), ps.iter().map(|p| net(p)).collect()))
            .collect()
    }

    fn registry() -> CustomerRegistry {
        CustomerRegistry::new(
            config(&[
                (
                    "cpe1",
                    &["203.0.113.1/32", "192.0.2.0/24", "2001:db8:1::/48"],
                ),
                ("cpe2", &["203.0.113.5/32", "2001:db8:2::/48"]),
            ]),
            None,
        )
        .unwrap()
    }

    #[test]
    fn the_agent_of_an_address() {
        let r = registry();
        assert_eq!(r.agent_for(&net("203.0.113.1/32")), Some("cpe1"));
        assert_eq!(r.agent_for(&net("192.0.2.77/32")), Some("cpe1"));
        assert_eq!(r.agent_for(&net("192.0.2.0/25")), Some("cpe1"));
        assert_eq!(r.agent_for(&net("2001:db8:2:5::1/128")), Some("cpe2"));
        assert_eq!(r.agent_for(&net("203.0.113.2/32")), None);
        assert_eq!(r.agent_for(&net("192.0.0.0/16")), None, "wider than any");
        assert_eq!(
            r.resolve(None, &[net("203.0.113.5/32")]).unwrap(),
            "cpe2".to_string()
        );
    }

    #[test]
    fn sources_are_checked_against_the_agents_prefixes() {
        let r = registry();
        assert_eq!(
            r.resolve(Some("cpe1"), &[net("192.0.2.10/32"), net("203.0.113.1/32")]),
            Ok("cpe1".into())
        );
        let e = r
            .resolve(Some("cpe1"), &[net("203.0.113.5/32")])
            .unwrap_err();
        assert!(matches!(e, RegistryError::SourceOutside { .. }), "{e}");
        assert!(
            e.to_string().starts_with(
                "source 203.0.113.5/32 is outside the customer prefixes of agent cpe1 (203.0.113.1/32"
            ),
            "{e}"
        );
        assert_eq!(
            r.resolve(None, &[net("10.0.0.1/32")]),
            Err(RegistryError::NoCustomer(net("10.0.0.1/32")))
        );
        assert_eq!(
            r.resolve(None, &[net("203.0.113.1/32"), net("203.0.113.5/32")]),
            Err(RegistryError::SeveralAgents(vec![
                "cpe1".into(),
                "cpe2".into()
            ]))
        );
        assert_eq!(
            r.resolve(Some("cpe9"), &[net("203.0.113.1/32")]),
            Err(RegistryError::NoPrefixes("cpe9".into()))
        );
        assert_eq!(r.resolve(None, &[]), Err(RegistryError::NoSource));
    }

    #[test]
    fn overlapping_and_bad_prefixes_are_refused() {
        let e = CustomerRegistry::new(
            config(&[("a", &["192.0.2.0/24"]), ("b", &["192.0.2.128/25"])]),
            None,
        )
        .err()
        .unwrap();
        let text = e.to_string();
        assert!(text.contains("overlaps"), "{text}");
        assert!(
            text.contains("192.0.2.128/25") && text.contains("192.0.2.0/24"),
            "{text}"
        );
        // Same prefix twice for one agent, and nesting within one agent: fine.
        CustomerRegistry::new(config(&[("a", &["192.0.2.0/24", "192.0.2.0/25"])]), None).unwrap();
        for bad in [
            "192.0.2.1/24",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "255.255.255.255/32",
        ] {
            let e = CustomerRegistry::new(config(&[("a", &[bad])]), None).err();
            assert!(e.is_some(), "{bad} accepted");
        }
        let mut r = registry();
        let before = r.all();
        let e = r.set("cpe3", vec![net("192.0.2.8/29")]).unwrap_err();
        assert!(e.to_string().contains("agent cpe1"), "{e}");
        assert_eq!(r.all(), before, "a refused change changes nothing");
        let e = r
            .replace_config(config(&[
                ("x", &["2001:db8::/32"]),
                ("y", &["2001:db8:5::/48"]),
            ]))
            .unwrap_err();
        assert!(matches!(e, RegistryError::Overlap { .. }));
        assert_eq!(r.all(), before);
    }

    #[test]
    fn api_entries_win_and_persist() {
        let dir = std::env::temp_dir().join(format!("dots-client-reg-{}", std::process::id()));
        let cfg = config(&[("cpe1", &["203.0.113.1/32"])]);
        let mut r = CustomerRegistry::new(cfg.clone(), Some(dir.clone())).unwrap();
        r.set("cpe1", vec![net("203.0.113.9/32")]).unwrap();
        r.set("cpe7", vec![net("198.18.0.0/24")]).unwrap();
        assert_eq!(
            r.agent_for(&net("203.0.113.1/32")),
            None,
            "replaced by the API"
        );
        let again = CustomerRegistry::new(cfg, Some(dir.clone())).unwrap();
        assert_eq!(again.get("cpe1").unwrap().origin, Origin::Api);
        assert_eq!(again.agent_for(&net("198.18.0.5/32")), Some("cpe7"));
        let mut again = again;
        assert!(again.remove("cpe1").unwrap());
        assert!(!again.remove("cpe1").unwrap());
        assert_eq!(again.get("cpe1").unwrap().origin, Origin::Config);
        assert_eq!(again.agent_for(&net("203.0.113.1/32")), Some("cpe1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
