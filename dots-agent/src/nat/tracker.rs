//! Sans-IO bookkeeping of the NAT-covered mitigations: which devices each
//! one has found so far, fed by a dump at install and by conntrack events
//! afterwards.

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    conntrack::CtEntry,
    neigh::Mac,
    resolve::{enforced_spec, match_entry, DeviceSet, Hit, NatAction, NatScope},
};
use crate::enforce::SlotSpec;

#[derive(Debug)]
struct Tracked {
    base: SlotSpec,
    scope: NatScope,
    devices: DeviceSet,
}

/// A slot of the 256-entry cache of recent hits in [`NatTracker::track_entries`].
fn hit_slot(hit: &Hit) -> usize {
    let a = match hit.device {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let b = v6.octets();
            (0..4).fold(0, |h, i| {
                h ^ u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            })
        }
    };
    let h = a ^ (u32::from(hit.port.unwrap_or(0)) << 8) ^ u32::from(hit.protocol);
    (h.wrapping_mul(0x9E37_79B1) >> 24) as usize
}

/// The NAT-covered mitigations, keyed by whatever names a mitigation in the
/// caller (slot id, (cuid, mid), ...).
#[derive(Debug)]
pub struct NatTracker<K> {
    router: Vec<IpAddr>,
    action: NatAction,
    tracked: BTreeMap<K, Tracked>,
}

impl<K: Ord + Clone> NatTracker<K> {
    /// `router`: the router's own addresses (e.g. from
    /// [`crate::netif::local_interface_prefixes`]); a request whose source
    /// prefix covers one of them is resolved through conntrack.
    pub fn new(router: Vec<IpAddr>, action: NatAction) -> Self {
        NatTracker {
            router,
            action,
            tracked: BTreeMap::new(),
        }
    }

    pub fn router_addresses(&self) -> &[IpAddr] {
        &self.router
    }

    /// The router's addresses changed (PPPoE reconnect, DHCP renumbering):
    /// requests from now on are resolved against `router`; mitigations
    /// already followed keep the scope they were tracked with.
    pub fn set_router_addresses(&mut self, router: Vec<IpAddr>) {
        self.router = router;
    }

    /// Whether `spec` needs NAT resolution.
    pub fn covers(&self, spec: &SlotSpec) -> bool {
        NatScope::from_spec(spec, &self.router).is_some()
    }

    /// Starts following mitigation `key` with the validated scope `spec` and
    /// a fresh `snapshot` of the conntrack table. Returns false (and tracks
    /// nothing) when no source prefix covers a router address. Re-tracking
    /// a key with the same scope keeps its devices.
    pub fn track<'a>(
        &mut self,
        key: K,
        spec: &SlotSpec,
        snapshot: impl IntoIterator<Item = &'a CtEntry>,
    ) -> bool {
        self.track_entries(key, spec, snapshot.into_iter().copied())
    }

    /// [`track`](Self::track) with entries by value, e.g. from
    /// [`CtMirror::entries`](super::CtMirror::entries).
    pub fn track_entries(
        &mut self,
        key: K,
        spec: &SlotSpec,
        snapshot: impl IntoIterator<Item = CtEntry>,
    ) -> bool {
        let Some(scope) = NatScope::from_spec(spec, &self.router) else {
            self.tracked.remove(&key);
            return false;
        };
        let mut devices = match self.tracked.remove(&key) {
            Some(t) if t.scope == scope => t.devices,
            _ => DeviceSet::default(),
        };
        // Many entries give the same hit (one device, many flows): a small
        // direct-mapped cache of recent hits skips the repeats, which adding
        // to the set would ignore anyway, at a fraction of the cost.
        let mut recent = [None; 256];
        for e in snapshot {
            if let Some(hit) = match_entry(&scope, &e) {
                let slot = &mut recent[hit_slot(&hit)];
                if *slot != Some(hit) {
                    *slot = Some(hit);
                    devices.add(hit);
                }
            }
        }
        self.tracked.insert(
            key,
            Tracked {
                base: spec.clone(),
                scope,
                devices,
            },
        );
        true
    }

    /// Stops following `key` (withdrawal, expiry): its devices are forgotten.
    pub fn untrack(&mut self, key: &K) {
        self.tracked.remove(key);
    }

    /// Whether anything is followed: the event subscription is only needed
    /// then.
    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    /// Feeds one conntrack entry (a new-flow event, or each entry of a
    /// resync dump); returns the keys whose device set changed, whose slots
    /// must be re-installed.
    pub fn observe(&mut self, e: &CtEntry) -> Vec<K> {
        let mut changed = Vec::new();
        for (k, t) in &mut self.tracked {
            if let Some(hit) = match_entry(&t.scope, e) {
                if t.devices.add(hit) {
                    changed.push(k.clone());
                }
            }
        }
        changed
    }

    pub fn devices(&self, key: &K) -> Option<&DeviceSet> {
        self.tracked.get(key).map(|t| &t.devices)
    }

    /// The slot to enforce for `key`: `None` when unknown or pending (no
    /// device found yet).
    pub fn slot_spec(&self, key: &K) -> Option<SlotSpec> {
        let t = self.tracked.get(key)?;
        enforced_spec(&t.base, &self.router, &t.devices, self.action)
    }

    /// Fills in MAC addresses from a neighbour table snapshot.
    pub fn set_macs(&mut self, neigh: &std::collections::HashMap<IpAddr, Mac>) {
        for t in self.tracked.values_mut() {
            t.devices.set_macs(|ip| neigh.get(ip).copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        enforce::Range,
        nat::conntrack::{CtEntry, Tuple},
    };

    fn e(src: &str, sport: u16, xport: u16) -> CtEntry {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        CtEntry {
            original: Tuple {
                src: ip(src),
                dst: ip("198.51.100.10"),
                protocol: 17,
                src_port: Some(sport),
                dst_port: Some(9),
            },
            reply: Tuple {
                src: ip("198.51.100.10"),
                dst: ip("203.0.113.1"),
                protocol: 17,
                src_port: Some(9),
                dst_port: Some(xport),
            },
        }
    }

    #[test]
    fn repeated_hits_are_all_counted() {
        let mut t = NatTracker::new(vec!["203.0.113.1".parse().unwrap()], NatAction::Flow);
        let spec = SlotSpec {
            sources: vec!["203.0.113.1/32".parse().unwrap()],
            targets: vec!["198.51.100.0/24".parse().unwrap()],
            ..SlotSpec::default()
        };
        // 600 devices (more than the 256 cache slots), each with ports
        // 1000 and 1001, in an interleaved order, three times over.
        let entries: Vec<CtEntry> = (0..3)
            .flat_map(|_| (0..2u16).flat_map(|p| (0..600u32).map(move |i| (i, p))))
            .map(|(i, p)| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
                e(&ip, 1000 + p, 20000 + p)
            })
            .collect();
        assert!(t.track_entries(1u32, &spec, entries.iter().copied()));
        let set = t.devices(&1).unwrap();
        assert_eq!(set.len(), 600);
        assert!(set
            .iter()
            .all(|d| d.ports.iter().copied().eq([1000, 1001]) && d.protocols.len() == 1));
    }

    #[test]
    fn pending_then_resolved_and_sticky() {
        let mut t = NatTracker::new(vec!["203.0.113.1".parse().unwrap()], NatAction::Device);
        let spec = SlotSpec {
            sources: vec!["203.0.113.1/32".parse().unwrap()],
            source_ports: vec![Range::new(40000, 40009)],
            targets: vec!["198.51.100.0/24".parse().unwrap()],
            ..SlotSpec::default()
        };
        assert!(t.track(1u32, &spec, &[e("192.0.2.18", 1000, 1000)]));
        assert_eq!(t.slot_spec(&1), None, "pending");
        assert!(t.observe(&e("192.0.2.18", 1001, 1001)).is_empty());
        assert_eq!(t.observe(&e("192.0.2.2", 1002, 40003)), vec![1]);
        let s = t.slot_spec(&1).unwrap();
        assert_eq!(s.sources, vec!["192.0.2.2/32".parse().unwrap()]);
        // Same device, new port: no change in device mode's slot, but the
        // set records it (flow mode would need it).
        assert_eq!(t.observe(&e("192.0.2.2", 1003, 40004)), vec![1]);
        // A re-install with the same scope (e.g. after a restart of the
        // session) keeps what was found, although the table is empty now.
        assert!(t.track(1, &spec, &[]));
        assert_eq!(t.devices(&1).unwrap().len(), 1);
        t.untrack(&1);
        assert!(t.is_empty());
        assert_eq!(t.slot_spec(&1), None);
    }
}
