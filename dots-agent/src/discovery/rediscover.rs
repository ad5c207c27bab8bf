//! Re-discovery of a discovered peer while the agent runs (RFC 8973 §4).

use std::time::Duration;

use dots_daemon::transport::Transport;
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

/// The router's own addresses, in a stable order for comparison.
fn local_addrs() -> Vec<ipnet::IpNet> {
    let mut v = crate::netif::local_interface_prefixes();
    v.sort();
    v
}

/// Re-discovery of a discovered peer (RFC 8973 §4): when the DNS TTL or DHCP
/// lease runs out, when the peer's certificate expires, when `dhcp-hook`
/// writes new results, or when the router's addresses change (a new network;
/// read with getifaddrs at each check rather than a netlink subscription).
/// A failed lookup waits before the next try, by kind.
pub struct Rediscovery {
    d: DiscoveryContext,
    addrs: Vec<ipnet::IpNet>,
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

    pub fn new(d: DiscoveryContext) -> Rediscovery {
        let mut r = Rediscovery {
            d,
            addrs: local_addrs(),
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
            || local_addrs() != self.addrs
    }

    pub async fn run(&mut self, current: &PeerTarget) -> Option<PeerTarget> {
        self.dhcp_mtime = self.dhcp_file_mtime();
        let addrs = local_addrs();
        if addrs != self.addrs {
            info!(now = ?addrs, "the router's addresses changed: discovering the peer again");
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
