//! Discovery of the Call Home DOTS client (RFC 8973).
//!
//! Order of preference (RFC 8973 §4): explicit configuration, then DHCP
//! (options 147/148 for DHCPv4, 141/142 for DHCPv6), then S-NAPTR service
//! resolution (`DOTS-CALL-HOME` with `signal.udp` / `signal.tcp`), then
//! DNS-SD (`_dots-call-home._udp` / `._tcp`).
//!
//! Every mechanism yields [`Candidate`]s: where to dial, over which
//! transport, which reference identifier the peer's certificate must carry,
//! and how long the information stays valid. Discovery is repeated when a
//! validity timer expires ([`next_refresh`]), when the peer certificate
//! expires ([`cert_expiry`]) and on attachment to a new network; failed DNS
//! lookups are retried after a delay that depends on the error
//! ([`RetryPolicy`]).
//!
//! - [`dhcp`]: sans-IO decoders of the DHCP options and of the values DHCP
//!   clients hand to their hook scripts.
//! - [`state`]: the `discovered.json` file that `dots-agent dhcp-hook`
//!   writes and the running agent watches.
//! - [`srv`]: RFC 2782 ordering (priority, weighted random) with a seedable
//!   RNG.
//! - [`dns`]: S-NAPTR and DNS-SD lookups through `hickory-resolver`
//!   (feature `discovery`; without it, lookups fail saying so).
//! - [`retry`]: how long to wait before retrying a failed lookup.

pub mod cli;
pub mod dhcp;
#[cfg(feature = "discovery")]
pub mod dns;
#[cfg(not(feature = "discovery"))]
#[path = "no_dns.rs"]
pub mod dns;
pub mod rediscover;
pub mod retry;
pub mod srv;
pub mod state;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use dots_daemon::transport::Transport;

use crate::peer::PeerTarget;
pub use rediscover::{DiscoveryContext, Rediscovery};
pub use retry::{LookupErrorKind, RetryPolicy};
pub use state::{read_discovered, write_discovered, DhcpEntry, Discovered};

/// Port of the Call Home DOTS client when discovery gives none (DHCP,
/// S-NAPTR "a" records, explicit addresses without a port).
pub const DEFAULT_CALL_HOME_PORT: u16 = dots_daemon::transport::DEFAULT_PORT;

/// S-NAPTR application service tag of DOTS Call Home (RFC 8973 §9.4.2).
pub const SERVICE_TAG: &str = "DOTS-CALL-HOME";
/// S-NAPTR application protocol tag of the signal channel over UDP (DTLS).
pub const PROTO_SIGNAL_UDP: &str = "signal.udp";
/// S-NAPTR application protocol tag of the signal channel over TCP (TLS).
pub const PROTO_SIGNAL_TCP: &str = "signal.tcp";
/// DNS-SD / SRV service of Call Home over UDP.
pub const SRV_UDP: &str = "_dots-call-home._udp";
/// DNS-SD / SRV service of Call Home over TCP.
pub const SRV_TCP: &str = "_dots-call-home._tcp";

/// How a candidate was found, in the RFC 8973 §4 order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    Explicit,
    Dhcpv4,
    Dhcpv6,
    Snaptr,
    DnsSd,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Explicit => "explicit",
            Mechanism::Dhcpv4 => "dhcpv4",
            Mechanism::Dhcpv6 => "dhcpv6",
            Mechanism::Snaptr => "s-naptr",
            Mechanism::DnsSd => "dns-sd",
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The S-NAPTR application protocol tag of a transport.
pub fn protocol_tag(t: Transport) -> &'static str {
    match t {
        Transport::Udp => PROTO_SIGNAL_UDP,
        Transport::Tcp => PROTO_SIGNAL_TCP,
    }
}

/// The SRV / DNS-SD service label pair of a transport.
pub fn srv_service(t: Transport) -> &'static str {
    match t {
        Transport::Udp => SRV_UDP,
        Transport::Tcp => SRV_TCP,
    }
}

/// One place to dial, in order of preference within its list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub mechanism: Mechanism,
    /// `None`: the mechanism does not say (explicit configuration, DHCP);
    /// the agent's transport preference applies.
    pub transport: Option<Transport>,
    /// Host to dial: the address as text, or a name still to resolve
    /// (explicit name, DHCP name without addresses).
    pub host: String,
    /// The address, when known.
    pub address: Option<IpAddr>,
    pub port: u16,
    /// Reference identifier the peer certificate must carry (DNS-ID, or the
    /// address itself when only addresses were given by DHCP).
    pub reference_id: String,
    /// Validity left at discovery time (DHCP lease, smallest DNS TTL of the
    /// chain); `None` for explicit configuration (no expiry).
    pub ttl: Option<Duration>,
    /// When the information expires: discovery time + `ttl`.
    pub valid_until: Option<SystemTime>,
}

impl Candidate {
    /// The dial target of the agent runtime.
    pub fn peer_target(&self) -> PeerTarget {
        PeerTarget {
            host: self.host.clone(),
            port: self.port,
            addrs: self.address.into_iter().collect(),
            name: Some(self.reference_id.clone()),
            endpoints: Vec::new(),
        }
    }

    /// Whether the information has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.valid_until.is_some_and(|t| t <= now)
    }

    /// The JSON object printed by `dots-agent discover --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mechanism": self.mechanism.as_str(),
            "transport": self.transport.map(Transport::as_str),
            "address": self.address.map(|a| a.to_string()),
            "host": self.host,
            "port": self.port,
            "reference_id": self.reference_id,
            "ttl": self.ttl.map(|t| t.as_secs()),
        })
    }
}

/// One dial target for the agent from the preferred candidates: every
/// (address, port, transport) they name, in order, with their reference
/// identifier. A candidate without a transport gets each of `transports`.
/// `None` when no candidate has an address.
pub fn endpoint_target(cands: &[Candidate], transports: &[Transport]) -> Option<PeerTarget> {
    let first = cands.iter().find(|c| c.address.is_some())?;
    let mut endpoints = Vec::new();
    for c in cands
        .iter()
        .filter(|c| c.reference_id == first.reference_id)
    {
        let Some(addr) = c.address else { continue };
        let kinds: Vec<Transport> = match c.transport {
            Some(t) => vec![t],
            None => transports.to_vec(),
        };
        for t in kinds {
            let e = (std::net::SocketAddr::new(addr, c.port), t);
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
    }
    Some(PeerTarget {
        host: first.reference_id.clone(),
        port: first.port,
        addrs: endpoints.iter().map(|(a, _)| a.ip()).collect(),
        name: Some(first.reference_id.clone()),
        endpoints,
    })
}

/// Groups candidates into the agent's dial targets: one [`PeerTarget`] per
/// (host or reference identifier, port), keeping the candidates' order and
/// collecting their addresses. The transport of each candidate is lost here;
/// use [`Candidate::transport`] to pick the agent's transport preference.
pub fn peer_targets(cands: &[Candidate]) -> Vec<PeerTarget> {
    let mut out: Vec<PeerTarget> = Vec::new();
    for c in cands {
        let key_host = if c.address.is_some() {
            c.reference_id.clone()
        } else {
            c.host.clone()
        };
        if let Some(t) = out.iter_mut().find(|t| {
            t.port == c.port
                && t.name.as_deref() == Some(c.reference_id.as_str())
                && (t.host == key_host || !t.addrs.is_empty() && c.address.is_some())
        }) {
            if let Some(a) = c.address {
                if !t.addrs.contains(&a) {
                    t.addrs.push(a);
                }
            }
            continue;
        }
        out.push(PeerTarget {
            host: key_host,
            port: c.port,
            addrs: c.address.into_iter().collect(),
            name: Some(c.reference_id.clone()),
            endpoints: Vec::new(),
        });
    }
    out
}

/// Explicit configuration (RFC 8973 §4, item 1): a DNS name, or addresses
/// plus a reference identifier. Addresses alone are refused: the peer
/// could not be authenticated.
#[derive(Clone, Debug, Default)]
pub struct ExplicitConfig {
    /// DNS name of the Call Home DOTS client (resolved when dialling, and
    /// the reference identifier unless `reference_id` is set).
    pub name: Option<String>,
    /// Addresses to dial instead of resolving a name.
    pub addresses: Vec<IpAddr>,
    /// Reference identifier; required with `addresses`.
    pub reference_id: Option<String>,
    /// Port [default: 4647].
    pub port: Option<u16>,
}

/// Turns explicit configuration into candidates (transport left to the
/// agent's preference, no expiry).
pub fn explicit_candidates(cfg: &ExplicitConfig) -> Result<Vec<Candidate>> {
    let port = cfg.port.unwrap_or(DEFAULT_CALL_HOME_PORT);
    if let Some(r) = &cfg.reference_id {
        if r.trim().is_empty() {
            bail!("explicit configuration: empty reference identifier");
        }
    }
    if !cfg.addresses.is_empty() {
        let Some(rid) = cfg.reference_id.clone().or_else(|| cfg.name.clone()) else {
            bail!(
                "explicit configuration: addresses {:?} without a reference identifier; \
                 RFC 8973 §4 requires a name to authenticate the peer (give a peer name)",
                cfg.addresses
            );
        };
        dhcp::validate_name(&rid)
            .map_err(|e| anyhow::anyhow!("explicit configuration: reference identifier: {e}"))?;
        return Ok(cfg
            .addresses
            .iter()
            .map(|a| Candidate {
                mechanism: Mechanism::Explicit,
                transport: None,
                host: a.to_string(),
                address: Some(*a),
                port,
                reference_id: rid.clone(),
                ttl: None,
                valid_until: None,
            })
            .collect());
    }
    let Some(name) = &cfg.name else {
        return Ok(Vec::new());
    };
    let name = name.trim_end_matches('.');
    if let Ok(ip) = name.parse::<IpAddr>() {
        // An address given as "name": same rule as addresses.
        return explicit_candidates(&ExplicitConfig {
            name: None,
            addresses: vec![ip],
            reference_id: cfg.reference_id.clone(),
            port: cfg.port,
        });
    }
    dhcp::validate_name(name)
        .map_err(|e| anyhow::anyhow!("explicit configuration: peer name {name:?}: {e}"))?;
    Ok(vec![Candidate {
        mechanism: Mechanism::Explicit,
        transport: None,
        host: name.to_string(),
        address: None,
        port,
        reference_id: cfg.reference_id.clone().unwrap_or_else(|| name.to_string()),
        ttl: None,
        valid_until: None,
    }])
}

/// Orders candidates of several mechanisms by the RFC 8973 §4 preference,
/// keeping each mechanism's own order, and drops expired ones and
/// duplicates (same transport, host, address and port).
pub fn order_candidates(mut cands: Vec<Candidate>, now: SystemTime) -> Vec<Candidate> {
    cands.retain(|c| !c.expired(now));
    // Stable sort: the order within a mechanism is kept.
    cands.sort_by_key(|c| match c.mechanism {
        // DHCPv4 and DHCPv6 are one preference level.
        Mechanism::Dhcpv6 => Mechanism::Dhcpv4,
        m => m,
    });
    let mut out: Vec<Candidate> = Vec::with_capacity(cands.len());
    for c in cands {
        if !out.iter().any(|o| {
            o.transport == c.transport
                && o.host == c.host
                && o.address == c.address
                && o.port == c.port
        }) {
            out.push(c);
        }
    }
    out
}

/// The candidates of the most preferred mechanism that gave any: what the
/// agent should dial (RFC 8973 §4: information of a lower-priority mechanism
/// is only used when the higher ones give nothing).
pub fn preferred(cands: &[Candidate]) -> Vec<Candidate> {
    let level = |m: Mechanism| {
        if m == Mechanism::Dhcpv6 {
            Mechanism::Dhcpv4
        } else {
            m
        }
    };
    let Some(best) = cands.iter().map(|c| level(c.mechanism)).min() else {
        return Vec::new();
    };
    cands
        .iter()
        .filter(|c| level(c.mechanism) == best)
        .cloned()
        .collect()
}

/// When discovery must run again because some candidate's information
/// expires: the earliest `valid_until`, or `None` when nothing expires.
pub fn next_refresh(cands: &[Candidate]) -> Option<SystemTime> {
    cands.iter().filter_map(|c| c.valid_until).min()
}

/// `notAfter` of the first certificate in a PEM file: discovery is repeated
/// when the certificate of the peer in use expires (RFC 8973 §4). `None`
/// when the file cannot be read or parsed.
pub fn cert_expiry(path: &Path) -> Option<SystemTime> {
    let pem = std::fs::read(path).ok()?;
    let cert = openssl::x509::X509::from_pem(&pem).ok()?;
    cert_not_after(&cert)
}

/// `notAfter` of a certificate (e.g. the peer's, from the TLS session).
pub fn cert_not_after(cert: &openssl::x509::X509Ref) -> Option<SystemTime> {
    let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
    let d = now.diff(cert.not_after()).ok()?;
    let secs = i64::from(d.days) * 86_400 + i64::from(d.secs);
    let base = SystemTime::now();
    if secs >= 0 {
        base.checked_add(Duration::from_secs(secs as u64))
    } else {
        base.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Inputs of a whole discovery run (`dots-agent discover`, the agent).
#[derive(Clone, Debug, Default)]
pub struct DiscoverOptions {
    pub explicit: ExplicitConfig,
    /// Where `dhcp-hook` wrote `discovered.json`.
    pub state_dir: Option<PathBuf>,
    /// Domain for S-NAPTR and DNS-SD; else the DHCP-given domain.
    pub domain: Option<String>,
    /// DNS server to ask; else the system configuration.
    pub resolver: Option<SocketAddr>,
    /// Seed of the SRV weighted selection (tests); else random.
    pub seed: Option<u64>,
    /// Run every mechanism (`discover` shows all) instead of stopping at the
    /// first that gives candidates (what the agent dials).
    pub all: bool,
    /// Resolve names without addresses (explicit name, DHCP name alone).
    pub resolve_names: bool,
}

/// Result of a discovery run.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Ordered candidates (RFC 8973 §4 preference, then each mechanism's).
    pub candidates: Vec<Candidate>,
    /// Lookups that failed, with their kind for [`RetryPolicy`].
    pub failures: Vec<(Mechanism, dns::LookupFailure)>,
}

/// Runs the mechanisms in the RFC 8973 §4 order.
pub async fn discover(opts: &DiscoverOptions) -> Result<Outcome> {
    let now = SystemTime::now();
    let mut out = Outcome::default();
    out.candidates.extend(explicit_candidates(&opts.explicit)?);
    let mut dhcp_domain = None;
    if opts.all || out.candidates.is_empty() {
        if let Some(dir) = &opts.state_dir {
            if let Some(d) = read_discovered(dir)? {
                out.candidates.extend(d.candidates(now));
                dhcp_domain = d.domain(now);
            }
        }
    }
    let need_dns = opts.resolve_names && out.candidates.iter().any(|c| c.address.is_none());
    let domain = opts.domain.clone().or(dhcp_domain);
    let run_sd = opts.all || out.candidates.is_empty();
    if !(need_dns || run_sd && domain.is_some()) {
        out.candidates = order_candidates(out.candidates, now);
        return Ok(out);
    }
    let mut dns = dns::DnsDiscovery::new(opts.resolver)?;
    if let Some(s) = opts.seed {
        dns = dns.with_seed(s);
    }
    if need_dns {
        out.candidates = dns.resolve_names(std::mem::take(&mut out.candidates)).await;
    }
    if let Some(domain) = domain.filter(|_| run_sd) {
        match dns.snaptr(&domain).await {
            Ok(c) => out.candidates.extend(c),
            Err(e) => out.failures.push((Mechanism::Snaptr, e)),
        }
        if opts.all || out.candidates.is_empty() {
            match dns.dnssd(&domain).await {
                Ok(c) => out.candidates.extend(c),
                Err(e) => out.failures.push((Mechanism::DnsSd, e)),
            }
        }
    }
    out.candidates = order_candidates(out.candidates, now);
    Ok(out)
}

#[cfg(test)]
mod tests;

/// What the agent dials after a discovery run, and until when it holds.
#[derive(Clone, Debug)]
pub struct Found {
    pub target: PeerTarget,
    /// When the information expires (DNS TTL, DHCP lease): discover again then.
    pub valid_until: Option<SystemTime>,
}

/// A discovery run for the agent: the preferred mechanism's candidates as
/// one dial target. On failure the error names every mechanism tried, and
/// `retry_kind` the lookup failure that decides when to try again (RFC 8973
/// §4: a failed lookup waits before retrying, by kind).
pub async fn find_peer(
    opts: &DiscoverOptions,
    transports: &[Transport],
) -> std::result::Result<Found, (String, Option<LookupErrorKind>)> {
    let outcome = discover(opts).await.map_err(|e| (format!("{e:#}"), None))?;
    let preferred = preferred(&outcome.candidates);
    match endpoint_target(&preferred, transports) {
        Some(target) => Ok(Found {
            target,
            valid_until: next_refresh(&preferred),
        }),
        None => {
            let kind = outcome.failures.first().map(|(_, f)| f.kind);
            let failures: Vec<String> = outcome
                .failures
                .iter()
                .map(|(m, f)| format!("{m:?}: {}", f.message))
                .collect();
            Err((
                format!(
                    "discovery found no peer (DHCP results in {}, S-NAPTR/DNS-SD in {}){}",
                    opts.state_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|| "-".into()),
                    opts.domain.as_deref().unwrap_or("no domain"),
                    if failures.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", failures.join("; "))
                    }
                ),
                kind,
            ))
        }
    }
}
