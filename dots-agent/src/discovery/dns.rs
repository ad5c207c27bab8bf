//! S-NAPTR (RFC 3958, RFC 8973 §6) and DNS-SD (RFC 6763, RFC 8973 §7)
//! discovery through `hickory-resolver`.
//!
//! S-NAPTR: NAPTR records of the domain whose service field is
//! `DOTS-CALL-HOME:<protocol tags>` are taken in (order, preference) order;
//! an empty flag means "look up NAPTR again at the replacement" (keeping
//! only the protocol tags of the path), `s` means SRV at the replacement,
//! `a` means A/AAAA at the replacement with the default port. SRV targets
//! are ordered per RFC 2782 ([`super::srv`]) and resolved AAAA then A.
//!
//! DNS-SD: PTR `_dots-call-home._udp.<domain>` (then `._tcp`) lists the
//! instances; their SRV records are ordered together per RFC 2782; TXT is
//! not needed (RFC 8973 defines no keys).
//!
//! The reference identifier of S-NAPTR and DNS-SD candidates is the domain
//! used for the lookup (RFC 8973 §8.2: DNS-ID built from the S-NAPTR
//! domain). Each candidate's TTL is the smallest TTL along its chain.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use dots_daemon::transport::Transport;
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{runtime::TokioRuntimeProvider, DnsError, NetError, NoRecords},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, RecordType},
    },
    Resolver, TokioResolver,
};
use tracing::debug;

use super::{
    retry::LookupErrorKind,
    srv::{self, SrvEntry, SrvRng},
    Candidate, Mechanism, DEFAULT_CALL_HOME_PORT, SERVICE_TAG,
};

/// Depth limit of non-terminal NAPTR chains (loops in the zone).
const MAX_NAPTR_DEPTH: usize = 8;

pub use super::retry::LookupFailure;

/// Maps a resolver error to the retry policy's error kinds.
pub fn classify(e: &NetError) -> LookupErrorKind {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code,
            negative_ttl,
            ..
        })) => {
            if *response_code == ResponseCode::NXDomain {
                LookupErrorKind::NxDomain {
                    negative_ttl: *negative_ttl,
                }
            } else {
                LookupErrorKind::NoData {
                    negative_ttl: *negative_ttl,
                }
            }
        }
        NetError::Dns(_) => LookupErrorKind::ServerFailure,
        NetError::Timeout => LookupErrorKind::Timeout,
        NetError::Io(_) | NetError::NoConnections | NetError::Busy => LookupErrorKind::Network,
        _ => LookupErrorKind::ServerFailure,
    }
}

fn failure(what: &str, e: &NetError) -> LookupFailure {
    LookupFailure {
        kind: classify(e),
        message: format!("{what}: {e}"),
    }
}

/// Splits an S-NAPTR service field `APP:proto1:proto2` into the
/// application service tag and the protocol tags.
pub fn parse_services(s: &str) -> (String, Vec<String>) {
    let mut it = s.split(':');
    let app = it.next().unwrap_or("").to_string();
    (app, it.map(str::to_string).collect())
}

/// Transports named by S-NAPTR protocol tags (case-insensitive).
fn transports_of(tags: &[String]) -> Vec<Transport> {
    [Transport::Udp, Transport::Tcp]
        .into_iter()
        .filter(|t| {
            tags.iter()
                .any(|g| g.eq_ignore_ascii_case(super::protocol_tag(*t)))
        })
        .collect()
}

fn fqdn(name: &str) -> Result<Name, LookupFailure> {
    let n = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&n).map_err(|e| LookupFailure {
        kind: LookupErrorKind::NxDomain { negative_ttl: None },
        message: format!("bad domain name {name:?}: {e}"),
    })
}

fn display(name: &Name) -> String {
    let s = name.to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_string()
}

/// A DNS-based discoverer: one resolver, one RNG for SRV weights.
pub struct DnsDiscovery {
    resolver: TokioResolver,
    rng: SrvRng,
}

/// An SRV target on the way to addresses.
struct Target {
    transport: Transport,
    host: Name,
    port: u16,
    ttl: u32,
}

impl DnsDiscovery {
    /// Uses the DNS server at `server` (UDP, TCP on truncation), or the
    /// system configuration (`/etc/resolv.conf`) when `None`.
    pub fn new(server: Option<SocketAddr>) -> Result<Self> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        let resolver = match server {
            Some(sa) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                let mut ns = NameServerConfig::udp(sa.ip());
                ns.connections = vec![udp, tcp];
                let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
                Resolver::builder_with_config(config, TokioRuntimeProvider::default())
                    .with_options(opts)
                    .build()?
            }
            None => {
                let mut b = TokioResolver::builder_tokio()?;
                *b.options_mut() = opts;
                b.build()?
            }
        };
        Ok(DnsDiscovery {
            resolver,
            rng: SrvRng::from_entropy(),
        })
    }

    /// Replaces the RNG of SRV weighted selection (tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = SrvRng::seeded(seed);
        self
    }

    async fn lookup(&self, name: &Name, rtype: RecordType) -> Result<Vec<(RData, u32)>, NetError> {
        let l = self.resolver.lookup(name.clone(), rtype).await?;
        Ok(l.answers()
            .iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| (r.data.clone(), r.ttl))
            .collect())
    }

    /// AAAA then A records of `host`, with their TTLs.
    async fn addresses(&self, host: &Name) -> Vec<(IpAddr, u32)> {
        let mut out = Vec::new();
        for rt in [RecordType::AAAA, RecordType::A] {
            match self.lookup(host, rt).await {
                Ok(rs) => {
                    for (d, ttl) in rs {
                        match d {
                            RData::AAAA(a) => out.push((IpAddr::V6(a.0), ttl)),
                            RData::A(a) => out.push((IpAddr::V4(a.0), ttl)),
                            _ => {}
                        }
                    }
                }
                Err(e) => debug!(host = %host, ?rt, error = %e, "address lookup"),
            }
        }
        out
    }

    /// SRV records of `name`, ordered per RFC 2782. A target of "." means
    /// "no service here" (RFC 2782) and is dropped.
    async fn srv_targets(
        &mut self,
        names: &[Name],
        transport: Transport,
        ttl: u32,
    ) -> Result<Vec<Target>, NetError> {
        let mut entries = Vec::new();
        let mut last_err = None;
        for name in names {
            match self.lookup(name, RecordType::SRV).await {
                Ok(rs) => {
                    for (d, t) in rs {
                        if let RData::SRV(s) = d {
                            if s.target.is_root() {
                                continue;
                            }
                            entries.push(SrvEntry {
                                priority: s.priority,
                                weight: s.weight,
                                item: Target {
                                    transport,
                                    host: s.target.clone(),
                                    port: s.port,
                                    ttl: ttl.min(t),
                                },
                            });
                        }
                    }
                }
                Err(e) => last_err = Some(e),
            }
        }
        if entries.is_empty() {
            if let Some(e) = last_err {
                return Err(e);
            }
        }
        Ok(srv::order(entries, &mut self.rng))
    }

    async fn targets_to_candidates(
        &self,
        targets: Vec<Target>,
        mechanism: Mechanism,
        reference_id: &str,
        now: SystemTime,
        out: &mut Vec<Candidate>,
    ) {
        for t in targets {
            for (addr, attl) in self.addresses(&t.host).await {
                let ttl = Duration::from_secs(u64::from(t.ttl.min(attl)));
                push_unique(
                    out,
                    Candidate {
                        mechanism,
                        transport: Some(t.transport),
                        host: addr.to_string(),
                        address: Some(addr),
                        port: t.port,
                        reference_id: reference_id.to_string(),
                        ttl: Some(ttl),
                        valid_until: now.checked_add(ttl),
                    },
                );
            }
        }
    }

    /// S-NAPTR resolution of `domain` for `DOTS-CALL-HOME`. Fails when no
    /// DOTS-specific NAPTR record can be retrieved (RFC 8973 §6) or when none
    /// leads to an address.
    pub async fn snaptr(&mut self, domain: &str) -> Result<Vec<Candidate>, LookupFailure> {
        let name = fqdn(domain)?;
        let reference_id = display(&name);
        let now = SystemTime::now();
        let mut targets = Vec::new();
        self.naptr_walk(
            name,
            vec![Transport::Udp, Transport::Tcp],
            u32::MAX,
            0,
            &mut targets,
        )
        .await?;
        let mut out = Vec::new();
        self.targets_to_candidates(targets, Mechanism::Snaptr, &reference_id, now, &mut out)
            .await;
        if out.is_empty() {
            return Err(LookupFailure {
                kind: LookupErrorKind::NoData { negative_ttl: None },
                message: format!("S-NAPTR {domain}: {SERVICE_TAG} records lead to no address"),
            });
        }
        Ok(out)
    }

    fn naptr_walk<'a>(
        &'a mut self,
        name: Name,
        allowed: Vec<Transport>,
        ttl: u32,
        depth: usize,
        out: &'a mut Vec<Target>,
    ) -> Pin<Box<dyn Future<Output = Result<(), LookupFailure>> + Send + 'a>> {
        Box::pin(async move {
            let what = format!("NAPTR {}", display(&name));
            let rs = self
                .lookup(&name, RecordType::NAPTR)
                .await
                .map_err(|e| failure(&what, &e))?;
            let mut recs: Vec<_> = rs
                .into_iter()
                .filter_map(|(d, t)| match d {
                    RData::NAPTR(n) => {
                        let services = String::from_utf8_lossy(&n.services).into_owned();
                        let (app, tags) = parse_services(&services);
                        if !app.eq_ignore_ascii_case(SERVICE_TAG) {
                            return None;
                        }
                        let ts: Vec<Transport> = transports_of(&tags)
                            .into_iter()
                            .filter(|t| allowed.contains(t))
                            .collect();
                        (!ts.is_empty()).then_some((n, ts, t))
                    }
                    _ => None,
                })
                .collect();
            if recs.is_empty() {
                return Err(LookupFailure {
                    kind: LookupErrorKind::NoData { negative_ttl: None },
                    message: format!("{what}: no {SERVICE_TAG} record"),
                });
            }
            recs.sort_by_key(|(n, _, _)| (n.order, n.preference));
            for (n, ts, t) in recs {
                let ttl = ttl.min(t);
                let flags = String::from_utf8_lossy(&n.flags).to_ascii_lowercase();
                let repl = n.replacement.clone();
                match flags.as_str() {
                    "" if depth < MAX_NAPTR_DEPTH => {
                        if let Err(e) = self.naptr_walk(repl, ts, ttl, depth + 1, out).await {
                            debug!(error = %e, "S-NAPTR non-terminal record skipped");
                        }
                    }
                    "s" => {
                        for tr in ts {
                            match self.srv_targets(std::slice::from_ref(&repl), tr, ttl).await {
                                Ok(v) => out.extend(v),
                                Err(e) => debug!(name = %repl, error = %e, "SRV lookup"),
                            }
                        }
                    }
                    "a" => {
                        for tr in ts {
                            out.push(Target {
                                transport: tr,
                                host: repl.clone(),
                                port: DEFAULT_CALL_HOME_PORT,
                                ttl,
                            });
                        }
                    }
                    f => debug!(flags = f, name = %display(&name), "S-NAPTR record skipped"),
                }
            }
            Ok(())
        })
    }

    /// DNS-SD browsing of `domain`: UDP instances first, then TCP.
    pub async fn dnssd(&mut self, domain: &str) -> Result<Vec<Candidate>, LookupFailure> {
        let name = fqdn(domain)?;
        let reference_id = display(&name);
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut first_err = None;
        for tr in [Transport::Udp, Transport::Tcp] {
            let svc = fqdn(&format!("{}.{}", super::srv_service(tr), reference_id))?;
            let ptrs = match self.lookup(&svc, RecordType::PTR).await {
                Ok(p) => p,
                Err(e) => {
                    first_err.get_or_insert_with(|| failure(&format!("PTR {svc}"), &e));
                    continue;
                }
            };
            let mut instances: Vec<(Name, u32)> = ptrs
                .into_iter()
                .filter_map(|(d, t)| match d {
                    RData::PTR(p) => Some((p.0, t)),
                    _ => None,
                })
                .collect();
            instances.sort();
            instances.dedup();
            let ttl = instances.iter().map(|i| i.1).min().unwrap_or(u32::MAX);
            let names: Vec<Name> = instances.into_iter().map(|i| i.0).collect();
            match self.srv_targets(&names, tr, ttl).await {
                Ok(targets) => {
                    self.targets_to_candidates(
                        targets,
                        Mechanism::DnsSd,
                        &reference_id,
                        now,
                        &mut out,
                    )
                    .await
                }
                Err(e) => {
                    first_err.get_or_insert_with(|| failure(&format!("SRV of {svc}"), &e));
                }
            }
        }
        if out.is_empty() {
            return Err(first_err.unwrap_or(LookupFailure {
                kind: LookupErrorKind::NoData { negative_ttl: None },
                message: format!("DNS-SD {domain}: no instance with an address"),
            }));
        }
        Ok(out)
    }

    /// Resolves candidates that carry a name but no address (explicit name,
    /// DHCP name alone) into one candidate per address (AAAA then A); the
    /// others pass through. Unresolvable names are kept as they are.
    pub async fn resolve_names(&self, cands: Vec<Candidate>) -> Vec<Candidate> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for c in cands {
            if c.address.is_some() {
                out.push(c);
                continue;
            }
            let Ok(name) = fqdn(&c.host) else {
                out.push(c);
                continue;
            };
            let addrs = self.addresses(&name).await;
            if addrs.is_empty() {
                out.push(c);
                continue;
            }
            for (a, ttl) in addrs {
                let dns_ttl = Duration::from_secs(u64::from(ttl));
                let ttl = Some(c.ttl.map_or(dns_ttl, |t| t.min(dns_ttl)));
                out.push(Candidate {
                    host: a.to_string(),
                    address: Some(a),
                    ttl,
                    valid_until: ttl.and_then(|t| now.checked_add(t)),
                    ..c.clone()
                });
            }
        }
        out
    }
}

fn push_unique(out: &mut Vec<Candidate>, c: Candidate) {
    if !out
        .iter()
        .any(|o| o.transport == c.transport && o.address == c.address && o.port == c.port)
    {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_field() {
        let (a, t) = parse_services("DOTS-CALL-HOME:signal.udp:signal.tcp");
        assert_eq!(a, "DOTS-CALL-HOME");
        assert_eq!(transports_of(&t), vec![Transport::Udp, Transport::Tcp]);
        let (a, t) = parse_services("dots-call-home:SIGNAL.TCP");
        assert!(a.eq_ignore_ascii_case(SERVICE_TAG));
        assert_eq!(transports_of(&t), vec![Transport::Tcp]);
        let (_, t) = parse_services("DOTS:data.tcp");
        assert!(transports_of(&t).is_empty());
    }

    #[test]
    fn error_kinds() {
        assert_eq!(classify(&NetError::Timeout), LookupErrorKind::Timeout);
        assert_eq!(
            classify(&NetError::Dns(DnsError::ResponseCode(
                ResponseCode::ServFail
            ))),
            LookupErrorKind::ServerFailure
        );
    }
}
