//! Live settings: what a reload (SIGHUP) or a change of the router's
//! addresses alters while the agent runs. One watch channel carries them;
//! every peer task applies the newest to its signal server before it
//! handles input, and uses its transports and credentials at its next dial.

use std::net::IpAddr;

use dots_daemon::transport::{Credentials, Transport};
use dots_proto::signal::{EnforcementMode, ExemptSet, MitigationBudget, ServerConfig};
use ipnet::IpNet;

use super::AgentOptions;
use crate::netif::{self, InterfaceFilter};

/// What peer tasks take from the runtime while running.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Live {
    /// The signal server's settings, with the effective local domain.
    pub(crate) server: ServerConfig,
    pub(crate) transports: Vec<Transport>,
    pub(crate) credentials: Credentials,
    /// Bumped by every reload: a peer task builds a new dialer (reading the
    /// certificate files again, e.g. renewed in place) before its next dial.
    pub(crate) generation: u64,
}

/// What every peer's signal server shares, made once and kept across
/// reloads (a reload changes their settings, not their contents): the
/// prefixes requests are judged exempt by (never-block, and the peers'
/// addresses as they are dialled) and the agent-wide count of mitigations,
/// one data-plane slot each.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    exempt: ExemptSet,
    budget: MitigationBudget,
}

impl Shared {
    pub(crate) fn new(opts: &AgentOptions) -> Shared {
        Shared {
            exempt: ExemptSet::new(&opts.never_block),
            budget: MitigationBudget::new(Some(opts.policy.max_mitigations)),
        }
    }

    /// A reload: the configured never-block list and the agent-wide limit.
    pub(crate) fn update(&self, opts: &AgentOptions) {
        self.exempt.set_configured(&opts.never_block);
        self.budget.set_limit(Some(opts.policy.max_mitigations));
    }
}

impl AgentOptions {
    /// The signal server's settings, with `domain` as the local domain.
    pub(crate) fn server_config(&self, domain: Vec<IpNet>, shared: &Shared) -> ServerConfig {
        let mut config = ServerConfig {
            limits: self.limits,
            exempt: shared.exempt.clone(),
            budget: shared.budget.clone(),
            domain,
            consent: self.consent,
            mode: if self.monitor {
                EnforcementMode::Monitor
            } else {
                EnforcementMode::Enforce
            },
            notify_period: self.notify_interval,
            consent_timeout: self.consent_timeout,
            consent_timeout_approves: self.consent_timeout_approves,
            max_mitigations_per_cuid: self.max_mitigations_per_cuid,
            ..ServerConfig::default()
        };
        self.policy.apply(&mut config);
        config
    }

    /// The local domain (RFC 9066 §5.3.1): the configured prefixes, plus
    /// the router's addresses (`router`, all of them) as
    /// `interface_addresses` filters them, unless a configured prefix
    /// already covers one.
    pub fn effective_domain(&self, router: &[IpNet]) -> Vec<IpNet> {
        let mut domain = self.domain.clone();
        if let Some(f) = self.interface_addresses {
            for p in netif::filtered(router, f) {
                if !domain.iter().any(|d| d.contains(&p)) {
                    domain.push(p);
                }
            }
        }
        domain
    }

    pub(crate) fn live(&self, router: &[IpNet], generation: u64, shared: &Shared) -> Live {
        Live {
            server: self.server_config(self.effective_domain(router), shared),
            transports: self.transports.clone(),
            credentials: self.credentials.clone(),
            generation,
        }
    }
}

/// The router's addresses that NAT correlation takes as its own external
/// addresses: loopback and link-local left out.
pub(crate) fn nat_router(router: &[IpNet]) -> Vec<IpAddr> {
    netif::filtered(router, InterfaceFilter::default())
        .into_iter()
        .map(|p| p.addr())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn opts(filter: Option<InterfaceFilter>) -> AgentOptions {
        let c = crate::config::AgentConfig::from_str(
            "ca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[peers]]\naddress = \"isp.example\"\n[domain]\nprefixes = [\"192.0.2.0/24\"]\n",
            "/x/agent.toml",
        )
        .unwrap();
        let mut o = c.to_options().unwrap();
        o.interface_addresses = filter;
        o
    }

    #[test]
    fn the_domain_follows_the_addresses() {
        let router = [
            net("127.0.0.1/32"),
            net("192.0.2.1/32"),
            net("203.0.113.1/32"),
            net("fe80::1/128"),
        ];
        let o = opts(Some(InterfaceFilter::default()));
        assert_eq!(
            o.effective_domain(&router),
            [net("192.0.2.0/24"), net("203.0.113.1/32")]
        );
        let all = opts(Some(InterfaceFilter {
            loopback: true,
            link_local: true,
        }));
        assert_eq!(all.effective_domain(&router).len(), 4);
        assert_eq!(opts(None).effective_domain(&router), [net("192.0.2.0/24")]);
        // The live settings carry it to the signal server.
        let live = o.live(&router[..2], 3, &Shared::new(&o));
        assert_eq!(live.server.domain, [net("192.0.2.0/24")]);
        assert_eq!(live.generation, 3);
        assert_eq!(
            nat_router(&router),
            [
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "203.0.113.1".parse().unwrap()
            ]
        );
    }
}
