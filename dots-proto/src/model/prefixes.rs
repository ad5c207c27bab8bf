//! IP prefixes as a DOTS request carries them: the strict text form of
//! RFC 6991, the address ranges no request may name, and the set
//! arithmetic that validation and the local policy need (is a prefix
//! covered by a union of prefixes, how many addresses a list covers, which
//! part of a list lies inside another).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Parses an `inet:ip-prefix` (RFC 6991 §4) exactly as its patterns allow:
/// an address, `/`, a length. IPv4 octets and IPv4 lengths have no leading
/// zeros (`192.0.2.010/32` is refused: other tools read `010` as octal);
/// an IPv6 length is one or two digits, or 100 to 128. Host bits may be
/// set: that is a valid, non-canonical value (see [`canonical`]).
pub fn parse_prefix(text: &str) -> Option<IpNet> {
    let (addr, len) = text.split_once('/')?;
    // The std parsers refuse leading zeros in IPv4 octets, zone indexes,
    // spaces and signs.
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            let len = v4_length(len)?;
            Ipv4Net::new(a, len).ok().map(IpNet::V4)
        }
        IpAddr::V6(a) => {
            let len = v6_length(len)?;
            Ipv6Net::new(a, len).ok().map(IpNet::V6)
        }
    }
}

/// `[0-9] | [1-2][0-9] | 3[0-2]`
fn v4_length(s: &str) -> Option<u8> {
    let ok = match s.as_bytes() {
        [d] => d.is_ascii_digit(),
        [a, b] => matches!(a, b'1'..=b'3') && b.is_ascii_digit(),
        _ => false,
    };
    ok.then(|| s.parse().ok()).flatten().filter(|l| *l <= 32)
}

/// `[0-9] | [0-9]{2} | 1[0-1][0-9] | 12[0-8]`
fn v6_length(s: &str) -> Option<u8> {
    let ok = match s.as_bytes() {
        [d] | [_, d] => s.bytes().all(|b| b.is_ascii_digit()) && d.is_ascii_digit(),
        [b'1', b, c] => matches!(b, b'0'..=b'2') && c.is_ascii_digit(),
        _ => false,
    };
    ok.then(|| s.parse().ok()).flatten().filter(|l| *l <= 128)
}

/// The canonical form of a prefix (RFC 6991 §4): host bits cleared, so
/// `192.0.2.1/24` is `192.0.2.0/24`.
pub fn canonical(p: &IpNet) -> IpNet {
    p.trunc()
}

/// An address range a mitigation request may not name, or only on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Unspecified,
    Loopback,
    Multicast,
    Broadcast,
    LinkLocal,
    /// `::ffff:0:0/96` (RFC 4291 §2.5.5.2): IPv4 addresses written as
    /// IPv6. Packets never carry them, and IPv4 rules would not see them.
    Ipv4Mapped,
}

impl Special {
    pub const ALL: [Special; 6] = [
        Special::Unspecified,
        Special::Loopback,
        Special::Multicast,
        Special::Broadcast,
        Special::LinkLocal,
        Special::Ipv4Mapped,
    ];

    fn name(self) -> &'static str {
        match self {
            Special::Unspecified => "unspecified",
            Special::Loopback => "loopback",
            Special::Multicast => "multicast",
            Special::Broadcast => "broadcast",
            Special::LinkLocal => "link-local",
            Special::Ipv4Mapped => "IPv4-mapped",
        }
    }
}

/// The special ranges of each family. Single addresses are host prefixes.
fn special_ranges(v6: bool) -> &'static [(Special, &'static str)] {
    if v6 {
        &[
            (Special::Unspecified, "::/128"),
            (Special::Loopback, "::1/128"),
            (Special::Ipv4Mapped, "::ffff:0:0/96"),
            (Special::LinkLocal, "fe80::/10"),
            (Special::Multicast, "ff00::/8"),
        ]
    } else {
        &[
            (Special::Unspecified, "0.0.0.0/32"),
            (Special::Loopback, "127.0.0.0/8"),
            (Special::LinkLocal, "169.254.0.0/16"),
            (Special::Multicast, "224.0.0.0/4"),
            (Special::Broadcast, "255.255.255.255/32"),
        ]
    }
}

/// How a (canonical) prefix touches the first special range it meets
/// among `kinds`, described for a diagnostic: "is loopback", "covers the
/// multicast range 224.0.0.0/4", "contains the broadcast address
/// 255.255.255.255".
pub fn special_use(p: &IpNet, kinds: &[Special]) -> Option<(Special, String)> {
    let v6 = matches!(p, IpNet::V6(_));
    special_ranges(v6)
        .iter()
        .filter(|(kind, _)| kinds.contains(kind))
        .find_map(|(kind, range)| {
            let range: IpNet = range.parse().ok()?;
            let single = range.prefix_len() == range.max_prefix_len();
            let what = if range.contains(p) {
                if single {
                    format!("is the {} address", kind.name())
                } else {
                    format!("is {}", kind.name())
                }
            } else if p.contains(&range) {
                if single {
                    format!("contains the {} address {}", kind.name(), range.addr())
                } else {
                    format!("covers the {} range {range}", kind.name())
                }
            } else {
                return None;
            };
            Some((*kind, what))
        })
}

/// One address family's prefixes as sorted, merged, inclusive ranges of
/// integers (IPv4 in the low 32 bits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

fn bounds(p: &IpNet) -> (u128, u128) {
    match p {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

impl Ranges {
    fn of<'a>(prefixes: impl Iterator<Item = &'a IpNet>) -> Self {
        let mut v: Vec<(u128, u128)> = prefixes.map(bounds).collect();
        v.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ranges(merged)
    }

    fn covers(&self, (lo, hi): (u128, u128)) -> bool {
        // Merged ranges never touch, so one of them must hold it all.
        self.0.iter().any(|(a, b)| *a <= lo && hi <= *b)
    }

    /// Number of integers covered, with each unit `2^shift` of them
    /// counted once (any overlap with a unit counts the whole unit).
    fn count(&self, shift: u32) -> u128 {
        let mut total: u128 = 0;
        let mut last_unit: Option<u128> = None;
        for (lo, hi) in &self.0 {
            let (first, end) = (lo >> shift, hi >> shift);
            let first = match last_unit {
                Some(u) if u >= first => u + 1,
                _ => first,
            };
            if first <= end {
                total = total.saturating_add(end - first + 1);
            }
            last_unit = Some(end.max(last_unit.unwrap_or(0)));
        }
        total
    }
}

/// A union of prefixes of both families, for coverage and size questions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Ranges,
    v6: Ranges,
}

impl PrefixSet {
    pub fn new(prefixes: &[IpNet]) -> Self {
        Self {
            v4: Ranges::of(prefixes.iter().filter(|p| matches!(p, IpNet::V4(_)))),
            v6: Ranges::of(prefixes.iter().filter(|p| matches!(p, IpNet::V6(_)))),
        }
    }

    fn family(&self, p: &IpNet) -> &Ranges {
        match p {
            IpNet::V4(_) => &self.v4,
            IpNet::V6(_) => &self.v6,
        }
    }

    /// Whether every address of `p` lies inside the union, even when no
    /// single prefix of it holds all of `p`.
    pub fn covers(&self, p: &IpNet) -> bool {
        self.family(p).covers(bounds(p))
    }

    /// IPv4 addresses covered.
    pub fn v4_addresses(&self) -> u128 {
        self.v4.count(0)
    }

    /// IPv6 /64 networks touched: the unit of an IPv6 LAN, inside which a
    /// device may use any address (temporary addresses, RFC 8981).
    pub fn v6_networks(&self) -> u128 {
        self.v6.count(64)
    }

    pub fn is_empty(&self) -> bool {
        self.v4.0.is_empty() && self.v6.0.is_empty()
    }
}

/// The parts of `prefixes` that lie inside `within`: each prefix inside
/// one of `within` as it is, and each of `within` inside one of
/// `prefixes`; sorted, without repeats.
pub fn inside(prefixes: &[IpNet], within: &[IpNet]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for p in prefixes {
        for w in within {
            if w.contains(p) {
                out.push(*p);
            } else if p.contains(w) {
                out.push(*w);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `::ffff:a.b.c.d` as the IPv4 address it stands for, for messages.
pub fn mapped_v4(p: &IpNet) -> Option<Ipv4Addr> {
    match p.addr() {
        IpAddr::V6(a) => a.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

/// The unspecified address of `p`'s family, for messages.
pub fn unspecified_of(p: &IpNet) -> IpAddr {
    match p {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn strict_text_form() {
        for ok in [
            "192.0.2.10/32",
            "192.0.2.1/24",
            "0.0.0.0/0",
            "10.0.0.0/8",
            "2001:db8::/32",
            "2001:db8::1/128",
            "::ffff:192.0.2.1/128",
            "2001:db8::/05",
            "2001:db8::/99",
            "2001:db8::/120",
        ] {
            assert!(parse_prefix(ok).is_some(), "{ok}");
        }
        for bad in [
            "192.0.2.010/32",
            "192.0.2.10/032",
            "192.0.2.10/33",
            "192.0.2.10",
            "192.0.2.10/",
            "/24",
            "192.0.2.10/+8",
            "192.0.2.10/ 8",
            " 192.0.2.10/32",
            "192.0.2.10/32 ",
            "0x7f.0.0.1/32",
            "1.2.3/24",
            "2001:db8::/129",
            "2001:db8::/0128",
            "2001:db8::/130",
            "fe80::1%eth0/128",
            "::ffff:192.0.2.010/128",
            "2001:db8::/",
        ] {
            assert_eq!(parse_prefix(bad), None, "{bad}");
        }
        assert_eq!(
            parse_prefix("192.0.2.1/24").map(|p| canonical(&p)),
            Some(net("192.0.2.0/24"))
        );
    }

    #[test]
    fn union_coverage() {
        let set = PrefixSet::new(&[net("192.0.2.0/25"), net("192.0.2.128/25")]);
        assert!(
            set.covers(&net("192.0.2.0/24")),
            "the two halves make the /24"
        );
        assert!(set.covers(&net("192.0.2.100/30")));
        assert!(!set.covers(&net("192.0.0.0/22")));
        assert!(!set.covers(&net("2001:db8::/64")), "other family");
        let gap = PrefixSet::new(&[net("192.0.2.0/26"), net("192.0.2.128/25")]);
        assert!(
            !gap.covers(&net("192.0.2.0/24")),
            "192.0.2.64/26 is missing"
        );
        let v6 = PrefixSet::new(&[net("2001:db8::/33"), net("2001:db8:8000::/33")]);
        assert!(v6.covers(&net("2001:db8::/32")));
        assert!(PrefixSet::new(&[]).is_empty());
    }

    #[test]
    fn counting() {
        let s = PrefixSet::new(&[
            net("192.0.2.0/24"),
            net("192.0.2.10/32"),
            net("198.51.100.0/31"),
        ]);
        assert_eq!(s.v4_addresses(), 258, "overlaps count once");
        assert_eq!(PrefixSet::new(&[net("0.0.0.0/0")]).v4_addresses(), 1 << 32);
        let v6 = PrefixSet::new(&[
            net("2001:db8::1/128"),
            net("2001:db8::2/128"),
            net("2001:db8:0:1::/64"),
            net("2001:db8:1::/56"),
        ]);
        assert_eq!(v6.v6_networks(), 2 + 256, "two /64s, then a /56");
        assert_eq!(PrefixSet::new(&[net("::/0")]).v6_networks(), 1 << 64);
    }

    #[test]
    fn special_ranges_are_named() {
        let said = |p: &str| special_use(&net(p), &Special::ALL).map(|(_, s)| s);
        assert_eq!(said("127.0.0.1/32").as_deref(), Some("is loopback"));
        assert_eq!(
            said("0.0.0.0/0").as_deref(),
            Some("contains the unspecified address 0.0.0.0")
        );
        assert_eq!(
            said("240.0.0.0/4").as_deref(),
            Some("contains the broadcast address 255.255.255.255")
        );
        assert_eq!(
            said("224.0.0.0/3").as_deref(),
            Some("covers the multicast range 224.0.0.0/4")
        );
        assert_eq!(said("169.254.3.0/24").as_deref(), Some("is link-local"));
        assert_eq!(
            said("::ffff:127.0.0.1/128").as_deref(),
            Some("is IPv4-mapped")
        );
        assert_eq!(said("::1/128").as_deref(), Some("is the loopback address"));
        assert_eq!(said("ff02::1/128").as_deref(), Some("is multicast"));
        assert_eq!(said("192.0.2.0/24"), None);
        assert_eq!(said("2001:db8::/32"), None);
        // Only the kinds asked about.
        assert_eq!(
            special_use(&net("169.254.3.0/24"), &[Special::Loopback]),
            None
        );
    }

    #[test]
    fn parts_inside() {
        let got = inside(
            &[net("192.0.2.0/24"), net("198.51.100.7/32")],
            &[
                net("192.0.2.1/32"),
                net("198.51.100.0/24"),
                net("10.0.0.0/8"),
            ],
        );
        assert_eq!(got, [net("192.0.2.1/32"), net("198.51.100.7/32")]);
    }
}
