//! Sans-IO matching of conntrack entries against a mitigation scope that
//! names the router's external (post-NAT) address: which internal devices
//! (and which of their pre-NAT source ports) are behind it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{
    conntrack::{CtEntry, DumpFilter},
    neigh::Mac,
};
use crate::enforce::{Range, SlotSpec};

/// What to block once a device is found (`nat-action` in the configuration).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum NatAction {
    /// All of the device's traffic to the target (with the request's
    /// protocol and target ports).
    #[default]
    Device,
    /// Only the device's flows: its internal (pre-NAT) source ports.
    Flow,
}

/// The NAT side of a mitigation scope: the source prefixes that cover a
/// router-external address, and the rest of the scope to match flows with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatScope {
    /// Source prefixes of the request that cover an address of the router.
    pub external: Vec<IpNet>,
    /// Translated (post-NAT) source ports; empty: any.
    pub source_ports: Vec<Range<u16>>,
    pub targets: Vec<IpNet>,
    /// Empty: any.
    pub protocols: Vec<u8>,
    /// Empty: any.
    pub target_ports: Vec<Range<u16>>,
}

impl NatScope {
    /// The NAT part of `spec` given the router's own addresses, or `None`
    /// when no source prefix covers one of them (the scope then applies
    /// directly, as for IPv6 without NAT).
    pub fn from_spec(spec: &SlotSpec, router: &[IpAddr]) -> Option<NatScope> {
        let (external, _) = split_sources(spec, router);
        if external.is_empty() {
            return None;
        }
        Some(NatScope {
            external,
            source_ports: spec.source_ports.clone(),
            targets: spec.targets.clone(),
            protocols: spec.protocols.clone(),
            target_ports: spec.target_ports.clone(),
        })
    }
}

impl NatScope {
    /// The narrowest kernel-side dump filter for this scope, when it names
    /// exactly one router address (and, to narrow further, one target host
    /// and one protocol). `None`: dump everything and match here.
    pub fn dump_filter(&self, router: &[IpAddr]) -> Option<DumpFilter> {
        let mut covered = router
            .iter()
            .filter(|a| self.external.iter().any(|p| p.contains(*a)));
        let reply_dst = *covered.next()?;
        if covered.next().is_some() {
            return None;
        }
        let orig_dst = match self.targets.as_slice() {
            [t] if t.prefix_len() == t.max_prefix_len() => Some(t.addr()),
            _ => None,
        };
        let protocol = match self.protocols.as_slice() {
            [p] => Some(*p),
            _ => None,
        };
        Some(DumpFilter {
            reply_dst,
            orig_dst,
            protocol,
        })
    }
}

/// Splits the source prefixes of `spec` into those covering a router
/// address (resolved through conntrack) and the others (enforced as given).
pub fn split_sources(spec: &SlotSpec, router: &[IpAddr]) -> (Vec<IpNet>, Vec<IpNet>) {
    spec.sources
        .iter()
        .partition(|p| router.iter().any(|a| p.contains(a)))
}

/// One matching flow: the internal device and the pre-NAT source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hit {
    pub device: IpAddr,
    pub protocol: u8,
    pub port: Option<u16>,
}

fn in_ranges(ranges: &[Range<u16>], v: Option<u16>) -> bool {
    ranges.is_empty() || v.is_some_and(|v| ranges.iter().any(|r| r.contains(v)))
}

/// Whether conntrack entry `e` is a translated flow of the scope: the reply
/// goes to an external address inside the scope's source prefixes (and to a
/// translated port in its source-port-range), the original destination is
/// in the target prefixes (with the protocol and target ports when given).
/// Entries that were not source-NATed (the router's own flows) never match.
pub fn match_entry(scope: &NatScope, e: &CtEntry) -> Option<Hit> {
    let (o, r) = (&e.original, &e.reply);
    if r.dst == o.src || !scope.external.iter().any(|p| p.contains(&r.dst)) {
        return None;
    }
    if !in_ranges(&scope.source_ports, r.dst_port) {
        return None;
    }
    if !scope.targets.iter().any(|p| p.contains(&o.dst)) {
        return None;
    }
    if !scope.protocols.is_empty() && !scope.protocols.contains(&o.protocol) {
        return None;
    }
    if !in_ranges(&scope.target_ports, o.dst_port) {
        return None;
    }
    Some(Hit {
        device: o.src,
        protocol: o.protocol,
        port: o.src_port,
    })
}

/// An internal device found behind the external address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Device {
    pub addr: IpAddr,
    /// From the neighbour table, when known.
    pub mac: Option<Mac>,
    /// Internal (pre-NAT) source ports of the matching flows.
    pub ports: BTreeSet<u16>,
    pub protocols: BTreeSet<u8>,
}

/// The devices of one mitigation. Sticky: a device stays until the
/// mitigation goes, even when its conntrack entries expire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceSet {
    devices: BTreeMap<IpAddr, Device>,
}

impl DeviceSet {
    /// Adds one hit; true when the set changed (new device, or a new port
    /// or protocol of a known one).
    pub fn add(&mut self, hit: Hit) -> bool {
        let d = self.devices.entry(hit.device).or_insert_with(|| Device {
            addr: hit.device,
            mac: None,
            ports: BTreeSet::new(),
            protocols: BTreeSet::new(),
        });
        let mut changed = d.protocols.insert(hit.protocol);
        if let Some(p) = hit.port {
            changed |= d.ports.insert(p);
        }
        changed
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.devices.keys().copied()
    }

    /// Fills in MAC addresses known to `lookup`; true when one changed.
    pub fn set_macs(&mut self, lookup: impl Fn(&IpAddr) -> Option<Mac>) -> bool {
        let mut changed = false;
        for (ip, d) in &mut self.devices {
            if let Some(m) = lookup(ip) {
                changed |= d.mac != Some(m);
                d.mac = Some(m);
            }
        }
        changed
    }
}

/// Merges sorted single ports into ranges.
fn port_ranges(ports: impl IntoIterator<Item = u16>) -> Vec<Range<u16>> {
    let mut out: Vec<Range<u16>> = Vec::new();
    let mut sorted: Vec<u16> = ports.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    for p in sorted {
        match out.last_mut() {
            Some(r) if r.upper.checked_add(1) == Some(p) => r.upper = p,
            _ => out.push(Range::single(p)),
        }
    }
    out
}

/// The slot the data plane enforces for a NAT-covered request: the request's
/// other source prefixes stay, the external ones become the internal
/// devices' host prefixes. `Device`: the request's protocols, targets and
/// target ports, any source port. `Flow`: also only the devices' internal
/// source ports (the union over the devices). `None` while no device is
/// known and nothing else is left to enforce: the request is pending.
pub fn enforced_spec(
    base: &SlotSpec,
    router: &[IpAddr],
    devices: &DeviceSet,
    action: NatAction,
) -> Option<SlotSpec> {
    let (external, direct) = split_sources(base, router);
    if external.is_empty() {
        return Some(base.clone());
    }
    let mut sources = direct;
    sources.extend(devices.addrs().map(IpNet::from));
    sources.sort();
    sources.dedup();
    if devices.is_empty() {
        return None;
    }
    let source_ports = match action {
        NatAction::Device => Vec::new(),
        NatAction::Flow => port_ranges(devices.iter().flat_map(|d| d.ports.iter().copied())),
    };
    Some(SlotSpec {
        sources,
        source_ports,
        ..base.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::conntrack::Tuple;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A masqueraded UDP flow `src:sport -> dst:dport`, translated to
    /// `ext:xport`.
    fn flow(src: &str, sport: u16, dst: &str, dport: u16, ext: &str, xport: u16) -> CtEntry {
        CtEntry {
            original: Tuple {
                src: ip(src),
                dst: ip(dst),
                protocol: 17,
                src_port: Some(sport),
                dst_port: Some(dport),
            },
            reply: Tuple {
                src: ip(dst),
                dst: ip(ext),
                protocol: 17,
                src_port: Some(dport),
                dst_port: Some(xport),
            },
        }
    }

    fn spec(src: &str, ports: &[(u16, u16)]) -> SlotSpec {
        SlotSpec {
            sources: vec![src.parse().unwrap()],
            source_ports: ports.iter().map(|&(a, b)| Range::new(a, b)).collect(),
            targets: vec!["198.51.100.10/32".parse().unwrap()],
            ..SlotSpec::default()
        }
    }

    const ROUTER: [&str; 2] = ["203.0.113.1", "192.0.2.1"];

    fn router() -> Vec<IpAddr> {
        ROUTER.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn matches_by_external_address_and_translated_port() {
        let s = NatScope::from_spec(&spec("203.0.113.1/32", &[(40000, 40001)]), &router()).unwrap();
        let attacker = flow("192.0.2.2", 5000, "198.51.100.10", 53, "203.0.113.1", 40000);
        let other = flow(
            "192.0.2.18",
            5000,
            "198.51.100.10",
            53,
            "203.0.113.1",
            40002,
        );
        let other_target = flow("192.0.2.2", 5001, "198.51.100.11", 53, "203.0.113.1", 40001);
        assert_eq!(
            match_entry(&s, &attacker),
            Some(Hit {
                device: ip("192.0.2.2"),
                protocol: 17,
                port: Some(5000)
            })
        );
        assert_eq!(match_entry(&s, &other), None);
        assert_eq!(match_entry(&s, &other_target), None);
    }

    #[test]
    fn protocol_target_ports_and_non_nat_entries() {
        let mut sp = spec("203.0.113.0/30", &[]);
        sp.protocols = vec![6];
        let s = NatScope::from_spec(&sp, &router()).unwrap();
        let udp = flow("192.0.2.2", 5000, "198.51.100.10", 53, "203.0.113.1", 5000);
        assert_eq!(match_entry(&s, &udp), None, "protocol");
        sp.protocols = vec![17];
        sp.target_ports = vec![Range::new(80, 443)];
        let s = NatScope::from_spec(&sp, &router()).unwrap();
        assert_eq!(match_entry(&s, &udp), None, "target port");
        sp.target_ports = vec![Range::single(53)];
        let s = NatScope::from_spec(&sp, &router()).unwrap();
        assert!(match_entry(&s, &udp).is_some());
        // The router's own flow from its external address: not a device.
        let own = flow(
            "203.0.113.1",
            5000,
            "198.51.100.10",
            53,
            "203.0.113.1",
            5000,
        );
        assert_eq!(match_entry(&s, &own), None);
    }

    #[test]
    fn scopes_without_router_addresses_are_direct() {
        let sp = spec("2001:db8:1::/64", &[]);
        assert_eq!(NatScope::from_spec(&sp, &router()), None);
        assert_eq!(
            enforced_spec(&sp, &router(), &DeviceSet::default(), NatAction::Device),
            Some(sp)
        );
    }

    #[test]
    fn enforced_spec_device_and_flow() {
        let mut sp = spec("203.0.113.1/32", &[(40000, 40010)]);
        sp.sources.push("2001:db8:1::/64".parse().unwrap());
        let r = router();
        let mut set = DeviceSet::default();
        assert_eq!(
            enforced_spec(&sp, &r, &set, NatAction::Device),
            None,
            "pending"
        );
        assert!(set.add(Hit {
            device: ip("192.0.2.2"),
            protocol: 17,
            port: Some(5000)
        }));
        assert!(set.add(Hit {
            device: ip("192.0.2.2"),
            protocol: 17,
            port: Some(5001)
        }));
        assert!(!set.add(Hit {
            device: ip("192.0.2.2"),
            protocol: 17,
            port: Some(5001)
        }));
        let dev = enforced_spec(&sp, &r, &set, NatAction::Device).unwrap();
        assert_eq!(
            dev.sources,
            vec![
                "192.0.2.2/32".parse::<IpNet>().unwrap(),
                "2001:db8:1::/64".parse().unwrap()
            ]
        );
        assert!(dev.source_ports.is_empty());
        assert_eq!(dev.targets, sp.targets);
        let fl = enforced_spec(&sp, &r, &set, NatAction::Flow).unwrap();
        assert_eq!(fl.source_ports, vec![Range::new(5000, 5001)]);
    }
}
