//! NAT correlation (RFC 9066 §5.3.2): a request whose source prefix covers
//! the router's external (post-NAT) address is mapped back to the internal
//! devices through the kernel's conntrack table.
//!
//! - [`conntrack`]: ctnetlink dump and new/destroy events (netlink, by
//!   hand).
//! - [`mirror`]: the source-NATed entries in memory, loaded by a dump and
//!   kept current by events: what requests resolve against.
//! - [`neigh`]: MAC addresses from the neighbour table (rtnetlink).
//! - [`resolve`]: sans-IO matching of entries against a scope, device sets,
//!   and the slot to enforce (`nat-action` device or flow).
//! - [`tracker`]: sans-IO per-mitigation state, sticky devices, updates.
//!
//! Internal devices are for the operator only (view, logs): they are never
//! sent to the peer (RFC 9066 §9). See docs/nat.md.

pub mod conntrack;
pub mod mirror;
pub mod neigh;
pub mod resolve;
pub mod tracker;

use std::net::IpAddr;

pub use conntrack::{Conntrack, CtEntry, CtEvent, DumpFilter, EventSocket, Tuple};
pub use mirror::CtMirror;
pub use neigh::{neighbours, Mac};
pub use resolve::{enforced_spec, match_entry, Device, DeviceSet, Hit, NatAction, NatScope};
pub use tracker::NatTracker;

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("opening a netlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("dumping the conntrack table: {0}")]
    Dump(#[source] std::io::Error),
    #[error("receiving conntrack events: {0}")]
    Events(#[source] std::io::Error),
    #[error("dumping the neighbour table: {0}")]
    Neighbours(#[source] std::io::Error),
}

/// The router's own addresses in the current network namespace: the
/// candidates for an external (post-NAT) address in a request.
pub fn router_addresses() -> Vec<IpAddr> {
    crate::netif::local_interface_prefixes()
        .into_iter()
        .map(|p| p.addr())
        .collect()
}

/// The conntrack entries to resolve `spec` with, without a mirror (the
/// agent uses a [`CtMirror`] when events are available): a kernel-filtered dump
/// when the scope allows one (one router address; see
/// [`NatScope::dump_filter`]), else, or when the kernel refuses the filter
/// (before Linux 5.8), the whole table.
pub fn snapshot_for(
    ct: &mut Conntrack,
    spec: &crate::enforce::SlotSpec,
    router: &[IpAddr],
) -> Result<Vec<CtEntry>, NatError> {
    let filter = NatScope::from_spec(spec, router).and_then(|s| s.dump_filter(router));
    if let Some(f) = filter {
        match ct.dump_filtered(&f) {
            Ok(v) => return Ok(v),
            Err(NatError::Dump(e))
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
            Err(e) => return Err(e),
        }
    }
    ct.dump()
}
