//! Re-discovery of a discovered peer while the agent runs (RFC 8973 §4).

use std::time::Duration;

use dots_daemon::{logging::list, transport::Transport};
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{DiscoverOptions, LookupErrorKind, RetryPolicy};
use crate::peer::PeerTarget;

/// How the agent found its peer, to find it again (RFC 8973 §4: when a
/// validity timer expires, the peer certificate expires, or DHCP says
/// something new).
#[derive(Clone, Debug)]
pub struct DiscoveryContext {
    pub opts: DiscoverOptions,
    pub transports: Vec<Transport>,
    /// When the DNS TTL or DHCP lease of the current answer runs out.
    pub valid_until: Option<std::time::SystemTime>,
}

/// The router's own addresses that say which network it is on (loopback
/// and link-local left out), sorted.
fn local_addrs(all: &watch::Receiver<Vec<IpNet>>) -> Vec<IpNet> {
    crate::netif::filtered(&all.borrow(), crate::netif::InterfaceFilter::default())
}

/// Re-discovery of a discovered peer (RFC 8973 §4): when the DNS TTL or DHCP
/// lease runs out, when the peer's certificate expires, when `dhcp-hook`
/// writes new results, or when the router's addresses change (a new network;
/// followed by rtnetlink events, see [`crate::netif::watch_addresses`]).
/// A failed lookup waits before the next try, by kind.
pub struct Rediscovery {
    d: DiscoveryContext,
    /// Every address of the router, kept current by address events.
    watched: watch::Receiver<Vec<IpNet>>,
    /// The addresses the last discovery ran with.
    addrs: Vec<IpNet>,
    cert_until: Option<std::time::SystemTime>,
    dhcp_mtime: Option<std::time::SystemTime>,
    retry: RetryPolicy,
    not_before: Option<std::time::SystemTime>,
}

impl Rediscovery {
    /// How often a discovered peer's validity is checked while connected.
    pub const CHECK_EVERY: Duration = Duration::from_secs(2);

    /// The peer's certificate expires then: discover again at that time.
    pub fn set_cert_until(&mut self, until: Option<std::time::SystemTime>) {
        self.cert_until = until;
    }

    /// `addresses`: the router's addresses, from
    /// [`crate::netif::watch_addresses`].
    pub fn new(d: DiscoveryContext, addresses: watch::Receiver<Vec<IpNet>>) -> Rediscovery {
        let mut r = Rediscovery {
            d,
            addrs: local_addrs(&addresses),
            watched: addresses,
            cert_until: None,
            dhcp_mtime: None,
            retry: RetryPolicy::default(),
            not_before: None,
        };
        r.dhcp_mtime = r.dhcp_file_mtime();
        r
    }

    fn dhcp_file_mtime(&self) -> Option<std::time::SystemTime> {
        let dir = self.d.opts.state_dir.as_ref()?;
        std::fs::metadata(super::state::discovered_path(dir))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn due(&self, now: std::time::SystemTime) -> bool {
        if self.not_before.is_some_and(|t| now < t) {
            return false;
        }
        self.d.valid_until.is_some_and(|t| t <= now)
            || self.cert_until.is_some_and(|t| t <= now)
            || self.dhcp_file_mtime() != self.dhcp_mtime
            || local_addrs(&self.watched) != self.addrs
    }

    pub async fn run(&mut self, current: &PeerTarget) -> Option<PeerTarget> {
        self.dhcp_mtime = self.dhcp_file_mtime();
        let addrs = local_addrs(&self.watched);
        if addrs != self.addrs {
            info!(now = %list(&addrs), "the router's addresses changed: discovering the peer again");
            self.addrs = addrs;
        }
        match super::find_peer(&self.d.opts, &self.d.transports).await {
            Ok(found) => {
                self.retry.on_success();
                self.not_before = None;
                self.d.valid_until = found.valid_until;
                if found.target.endpoints != current.endpoints {
                    info!(peer = %found.target, endpoints = ?found.target.endpoints, "discovery names another peer");
                    return Some(found.target);
                }
                debug!(peer = %current, "discovery confirms the peer");
                None
            }
            Err((msg, kind)) => {
                let delay = self
                    .retry
                    .on_failure(kind.unwrap_or(LookupErrorKind::Timeout));
                warn!(error = %msg, retry_in = ?delay, "re-discovery failed; keeping the current peer");
                self.not_before = Some(std::time::SystemTime::now() + delay);
                None
            }
        }
    }
}
