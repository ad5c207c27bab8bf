//! A Call Home DOTS client to dial, however it was found: configured,
//! discovered (RFC 8973) or named by a redirect (RFC 9066 §5.2.2).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use anyhow::{bail, Context, Result};
use dots_daemon::transport::{PeerIdentity, Transport, DEFAULT_PORT};
use tracing::warn;

/// Where a Call Home DOTS client is: a name or address, a port, optionally
/// known addresses (from a redirect), and the reference identifier its
/// certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTarget {
    pub host: String,
    pub port: u16,
    /// Addresses to dial instead of resolving `host`.
    pub addrs: Vec<IpAddr>,
    /// Reference identifier; `host` when absent.
    pub name: Option<String>,
    /// Endpoints with their own transport and port (from RFC 8973 discovery:
    /// S-NAPTR may give UDP and TCP different ports); when set, they are
    /// dialled instead of `addrs` x the configured transports.
    pub endpoints: Vec<(SocketAddr, Transport)>,
}

impl fmt::Display for PeerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl PeerTarget {
    /// Parses `HOST[:PORT]` or `[V6]:PORT`; the port defaults to 4647.
    pub fn parse(s: &str) -> Result<PeerTarget> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(PeerTarget {
                host: sa.ip().to_string(),
                port: sa.port(),
                addrs: vec![sa.ip()],
                name: None,
                endpoints: Vec::new(),
            });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(PeerTarget {
                host: ip.to_string(),
                port: DEFAULT_PORT,
                addrs: vec![ip],
                name: None,
                endpoints: Vec::new(),
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .with_context(|| format!("peer {s:?}: bad port {p:?}"))?,
            ),
            None => (s, DEFAULT_PORT),
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            bail!("peer {s:?}: expected HOST:PORT");
        }
        Ok(PeerTarget {
            host: host.to_string(),
            port,
            addrs: Vec::new(),
            name: None,
            endpoints: Vec::new(),
        })
    }

    /// The addresses to dial: the known ones, else a DNS lookup.
    pub async fn resolve(&self) -> Vec<SocketAddr> {
        if !self.addrs.is_empty() {
            return self
                .addrs
                .iter()
                .map(|a| SocketAddr::new(*a, self.port))
                .collect();
        }
        match tokio::net::lookup_host((self.host.as_str(), self.port)).await {
            Ok(it) => it.collect(),
            Err(e) => {
                warn!(peer = %self, error = %e, "could not resolve");
                Vec::new()
            }
        }
    }

    /// What the peer's certificate must name.
    pub fn identity(&self) -> PeerIdentity {
        PeerIdentity::parse(self.name.as_deref().unwrap_or(&self.host))
    }
}
