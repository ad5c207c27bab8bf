//! From the desired slots to the exact content of every classifier map.
//!
//! Pure computation, no kernel: `Contents::build` is what the maps must hold,
//! and `diff` says which entries to write and which slots those writes touch.
//! Two things make one lookup per field enough in the XDP program:
//!
//! * an LPM trie returns only the longest match, so every stored prefix carries
//!   the slots of all stored prefixes that cover it ("folding");
//! * port and ICMP-type ranges become the few prefixes that tile them
//!   (at most 30 for ports, 14 for types), never one entry per value.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::IpAddr,
};

use dots_common::{action, flags, Policy, SlotConfig, SlotMask};
use ipnet::IpNet;

use super::spec::{Range, Slot, SlotId};

/// A prefix of a `width`-bit key space, right-aligned in `bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub bits: u128,
    pub len: u8,
}

impl Prefix {
    /// The prefix of length `len` that contains `bits`, in a `width`-bit space.
    pub fn truncate(bits: u128, len: u8, width: u8) -> Prefix {
        let keep = if len == 0 {
            0
        } else {
            (u128::MAX >> (128 - u32::from(width))) & (u128::MAX << (width - len))
        };
        Prefix {
            bits: bits & keep,
            len,
        }
    }
}

/// Entries of one LPM table: prefix -> slots.
pub type Table = HashMap<Prefix, SlotMask>;

/// The prefixes (length, start) that exactly tile `[lower, upper]` in a
/// `width`-bit space.
pub fn range_to_prefixes(lower: u32, upper: u32, width: u8) -> Vec<Prefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u64::from(lower), u64::from(upper));
    while lo <= hi {
        // Largest aligned block starting at `lo` that stays inside the range.
        let mut size_log = if lo == 0 {
            u32::from(width)
        } else {
            lo.trailing_zeros().min(u32::from(width))
        };
        while lo + (1u64 << size_log) - 1 > hi {
            size_log -= 1;
        }
        out.push(Prefix {
            bits: u128::from(lo),
            len: width - size_log as u8,
        });
        lo += 1u64 << size_log;
    }
    out
}

/// Every entry ORed with the slots of all entries that cover it.
fn fold(own: &Table, width: u8) -> Table {
    let lengths: BTreeSet<u8> = own.keys().map(|p| p.len).collect();
    own.iter()
        .map(|(p, mask)| {
            let folded = lengths
                .iter()
                .take_while(|&&l| l < p.len)
                .filter_map(|&l| own.get(&Prefix::truncate(p.bits, l, width)))
                .fold(*mask, |acc, m| acc.or(m));
            (*p, folded)
        })
        .collect()
}

fn add(table: &mut Table, prefix: Prefix, slot: SlotId) {
    table.entry(prefix).or_default().set(usize::from(slot));
}

fn ip_prefix(net: &IpNet) -> (bool, Prefix) {
    match net.network() {
        IpAddr::V4(a) => (
            true,
            Prefix {
                bits: u128::from(u32::from(a)),
                len: net.prefix_len(),
            },
        ),
        IpAddr::V6(a) => (
            false,
            Prefix {
                bits: u128::from(a),
                len: net.prefix_len(),
            },
        ),
    }
}

/// The complete content of the classifier maps for a set of slots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contents {
    /// All slots of this content (what `policy.active` becomes).
    pub slots: SlotMask,
    /// `active` is left empty here: the apply step decides when to set it.
    pub policy: Policy,
    /// Host addresses (/32), folded: the hash fast path.
    pub src4_exact: Table,
    pub src6_exact: Table,
    /// Shorter source prefixes, folded.
    pub src4_lpm: Table,
    pub src6_lpm: Table,
    pub dst4: Table,
    pub dst6: Table,
    /// Protocol number -> slots naming it; entries absent are empty.
    pub proto: BTreeMap<u8, SlotMask>,
    pub sport: Table,
    pub dport: Table,
    pub icmp_type: Table,
    /// `DOTS_SLOTS` entries of the slots of this content.
    pub configs: BTreeMap<SlotId, SlotConfig>,
}

/// The `DOTS_SLOTS` entry of `slot`.
pub fn slot_config(slot: &Slot) -> SlotConfig {
    SlotConfig {
        expires_ns: slot.expires_ns,
        action: action::DROP,
        ..SlotConfig::default()
    }
}

impl Contents {
    pub fn build(slots: &BTreeMap<SlotId, Slot>) -> Contents {
        let mut c = Contents::default();
        let (mut src4, mut src6, mut dst4, mut dst6) =
            (Table::new(), Table::new(), Table::new(), Table::new());
        let (mut sport, mut dport, mut icmp) = (Table::new(), Table::new(), Table::new());
        for (&slot, full) in slots {
            let spec = &full.spec;
            let s = usize::from(slot);
            c.slots.set(s);
            c.configs.insert(slot, slot_config(full));
            for net in &spec.sources {
                match ip_prefix(net) {
                    (true, p) => add(&mut src4, p, slot),
                    (false, p) => add(&mut src6, p, slot),
                }
            }
            for net in &spec.targets {
                match ip_prefix(net) {
                    (true, p) => add(&mut dst4, p, slot),
                    (false, p) => add(&mut dst6, p, slot),
                }
            }
            if spec.protocols.is_empty() {
                c.policy.any_proto.set(s);
            }
            for &p in &spec.protocols {
                c.proto.entry(p).or_default().set(s);
            }
            if spec.source_ports.is_empty() && spec.icmp_types.is_empty() {
                c.policy.any_l4.set(s);
            }
            if spec.target_ports.is_empty() {
                c.policy.any_dport.set(s);
            }
            add_ranges(&mut sport, &spec.source_ports, 16, slot);
            add_ranges(&mut dport, &spec.target_ports, 16, slot);
            let icmp_ranges: Vec<Range<u16>> = spec
                .icmp_types
                .iter()
                .map(|r| Range::new(u16::from(r.lower), u16::from(r.upper)))
                .collect();
            add_ranges(&mut icmp, &icmp_ranges, 8, slot);
        }
        (c.src4_exact, c.src4_lpm) = split_hosts(fold(&src4, 32), 32);
        (c.src6_exact, c.src6_lpm) = split_hosts(fold(&src6, 128), 128);
        // Tell the program which source tries are worth a lookup.
        if !c.src4_lpm.is_empty() {
            c.policy.flags |= flags::SRC4_LPM;
        }
        if !c.src6_lpm.is_empty() {
            c.policy.flags |= flags::SRC6_LPM;
        }
        c.dst4 = fold(&dst4, 32);
        c.dst6 = fold(&dst6, 128);
        c.sport = fold(&sport, 16);
        c.dport = fold(&dport, 16);
        c.icmp_type = fold(&icmp, 8);
        c
    }
}

fn add_ranges(table: &mut Table, ranges: &[Range<u16>], width: u8, slot: SlotId) {
    for r in ranges {
        for p in range_to_prefixes(u32::from(r.lower), u32::from(r.upper), width) {
            add(table, p, slot);
        }
    }
}

/// Host entries go to the exact-match hash, the rest stay in the trie.
fn split_hosts(table: Table, width: u8) -> (Table, Table) {
    table.into_iter().partition(|(p, _)| p.len == width)
}

/// What changes between two versions of one table.
#[derive(Debug, PartialEq)]
pub struct Diff<K> {
    pub upserts: Vec<(K, SlotMask)>,
    pub deletes: Vec<K>,
    /// Slots whose bits change in some entry.
    pub touched: SlotMask,
}

impl<K> Diff<K> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

fn xor(a: &SlotMask, b: &SlotMask) -> SlotMask {
    let mut out = *a;
    for (o, b) in out.bits.iter_mut().zip(b.bits) {
        *o ^= b;
    }
    out
}

/// Entries to write to turn `actual` into `desired`. Entries whose mask is
/// empty count as absent.
pub fn diff<K: Copy + Eq + Hash + Ord>(
    desired: &HashMap<K, SlotMask>,
    actual: &HashMap<K, SlotMask>,
) -> Diff<K> {
    let mut d = Diff {
        upserts: Vec::new(),
        deletes: Vec::new(),
        touched: SlotMask::EMPTY,
    };
    for (k, want) in desired.iter().filter(|(_, m)| !m.is_empty()) {
        let have = actual.get(k).copied().unwrap_or_default();
        if have != *want {
            d.touched = d.touched.or(&xor(&have, want));
            d.upserts.push((*k, *want));
        }
    }
    for (k, have) in actual {
        if desired.get(k).is_none_or(|m| m.is_empty()) {
            d.touched = d.touched.or(have);
            d.deletes.push(*k);
        }
    }
    // Deterministic order keeps logs and tests stable.
    d.upserts.sort_by_key(|(k, _)| *k);
    d.deletes.sort();
    d
}

/// Slots whose "any value" bits differ between two policies.
pub fn policy_touched(desired: &Policy, actual: &Policy) -> SlotMask {
    xor(&desired.any_proto, &actual.any_proto)
        .or(&xor(&desired.any_l4, &actual.any_l4))
        .or(&xor(&desired.any_dport, &actual.any_dport))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::SlotSpec;

    fn pfx(bits: u128, len: u8) -> Prefix {
        Prefix { bits, len }
    }

    /// Brute-force check: the prefixes cover exactly the range, without overlap.
    fn covers_exactly(lower: u32, upper: u32, width: u8) {
        let ps = range_to_prefixes(lower, upper, width);
        let mut hits = vec![0u8; 1 << width];
        for p in &ps {
            let size = 1u32 << (width - p.len);
            assert_eq!(p.bits as u32 % size, 0, "unaligned {p:?}");
            for v in p.bits as u32..p.bits as u32 + size {
                hits[v as usize] += 1;
            }
        }
        for (v, h) in hits.iter().enumerate() {
            let inside = (lower..=upper).contains(&(v as u32));
            assert_eq!(*h, u8::from(inside), "value {v} in {lower}-{upper}");
        }
        assert!(ps.len() <= 2 * width as usize - 2 || width <= 1);
    }

    #[test]
    fn ranges_tile_exactly() {
        for (lo, hi) in [
            (0, 65535),
            (1, 65534),
            (53, 53),
            (1024, 65535),
            (0, 0),
            (65535, 65535),
            (80, 443),
        ] {
            covers_exactly(lo, hi, 16);
        }
        for (lo, hi) in [(0, 255), (8, 8), (3, 200), (255, 255)] {
            covers_exactly(lo, hi, 8);
        }
        assert_eq!(range_to_prefixes(0, 65535, 16), vec![pfx(0, 0)]);
        assert_eq!(range_to_prefixes(1, 65534, 16).len(), 30);
    }

    #[test]
    fn truncate_masks_host_bits() {
        assert_eq!(Prefix::truncate(0xc000_0201, 24, 32), pfx(0xc000_0200, 24));
        assert_eq!(Prefix::truncate(0xc000_0201, 0, 32), pfx(0, 0));
        assert_eq!(Prefix::truncate(0xc000_0201, 32, 32), pfx(0xc000_0201, 32));
        assert_eq!(Prefix::truncate(u128::MAX, 1, 128), pfx(1 << 127, 1));
    }

    fn spec(sources: &[&str], targets: &[&str]) -> Slot {
        Slot::without_expiry(SlotSpec {
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            targets: targets.iter().map(|s| s.parse().unwrap()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn covering_prefixes_fold_into_longer_ones() {
        let mut slots = BTreeMap::new();
        slots.insert(0, spec(&["10.0.0.0/8"], &["198.51.100.0/24"]));
        slots.insert(
            1,
            spec(&["10.1.0.0/16", "10.1.2.3/32"], &["198.51.100.0/24"]),
        );
        slots.insert(2, spec(&["2001:db8::/32"], &["2001:db8:ffff::/48"]));
        let c = Contents::build(&slots);
        let both = SlotMask::single(0).or(&SlotMask::single(1));
        assert_eq!(c.src4_lpm[&pfx(0x0a00_0000, 8)], SlotMask::single(0));
        assert_eq!(c.src4_lpm[&pfx(0x0a01_0000, 16)], both);
        assert_eq!(c.src4_exact[&pfx(0x0a01_0203, 32)], both);
        assert_eq!(c.src4_exact.len(), 1);
        assert_eq!(c.dst4[&pfx(0xc633_6400, 24)], both);
        assert_eq!(c.src6_lpm.len(), 1);
        assert_eq!(c.policy.flags, flags::SRC4_LPM | flags::SRC6_LPM);
        assert_eq!(c.policy.any_proto.bits[0], 0b111);
        assert_eq!(c.slots.bits[0], 0b111);
    }

    #[test]
    fn constraints_split_any_masks() {
        let mut s = spec(&["10.0.0.0/8"], &["192.0.2.1/32"]);
        s.spec.protocols = vec![17];
        s.spec.source_ports = vec![Range::new(1000, 1001)];
        s.spec.target_ports = vec![Range::single(53)];
        let mut t = spec(&["10.0.0.0/8"], &["192.0.2.1/32"]);
        t.spec.icmp_types = vec![Range::new(0, 255)];
        let c = Contents::build(&BTreeMap::from([(3, s), (4, t)]));
        assert_eq!(c.policy.any_proto, SlotMask::single(4));
        assert_eq!(c.policy.any_l4, SlotMask::EMPTY);
        assert_eq!(c.policy.any_dport, SlotMask::single(4));
        assert_eq!(c.proto[&17], SlotMask::single(3));
        assert_eq!(c.sport.len(), 1); // 1000-1001 is one /15
        assert_eq!(c.icmp_type[&pfx(0, 0)], SlotMask::single(4));
        assert_eq!(c.dport[&pfx(53, 16)], SlotMask::single(3));
    }

    #[test]
    fn diff_reports_touched_slots() {
        let a = HashMap::from([(1u8, SlotMask::single(0)), (2, SlotMask::single(1))]);
        let b = HashMap::from([
            (1u8, SlotMask::single(0).or(&SlotMask::single(5))),
            (3, SlotMask::single(7)),
        ]);
        let d = diff(&b, &a);
        assert_eq!(d.deletes, vec![2]);
        assert_eq!(d.upserts.len(), 2);
        let mut touched = SlotMask::EMPTY;
        for s in [1, 5, 7] {
            touched.set(s);
        }
        assert_eq!(d.touched, touched);
        assert!(diff(&a, &a).is_empty());
    }
}
