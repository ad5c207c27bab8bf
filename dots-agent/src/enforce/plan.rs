//! From the desired slots to the content of every classifier map.
//!
//! Pure computation, no kernel. [`Model`] holds the slots and, per map, the
//! prefixes each slot names; adding or removing a slot records exactly the
//! entries whose kernel value changes ([`Model::take_changes`]), so the
//! apply step writes O(change), not O(table). [`Model::contents`] is the
//! whole content, to reconcile against what the kernel holds after a
//! restart or an error, and [`diff`] compares two contents.
//!
//! What makes one lookup per field enough in the XDP program:
//!
//! * every stored prefix carries the slots of all stored prefixes that cover
//!   it ("folding", [`PrefixTable::folded`]): the longest match is the answer;
//! * protocols, ports and ICMP types are arrays indexed by the value
//!   ([`ArrayId`]): a range sets its slot's bit in every value it spans,
//!   written through a shared mapping, not one syscall per value;
//! * a source entry whose slots all name the same single target prefix of
//!   the family carries that prefix ([`SourceEntry::target`]): the program
//!   then checks the target with a mask instead of a lookup (the common
//!   "these hosts, that victim" request);
//! * the source lengths present are listed in the policy, so the program
//!   probes the source hash once per length present ([`SourceLengths`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::IpAddr,
};

use dots_common::{
    action, addr_words, entry, flags, Policy, SlotConfig, SlotMask, SourceEntry, SourceLengths,
    MAX_PROBED_LENGTHS,
};
use ipnet::IpNet;

pub use super::prefix::{Prefix, PrefixTable};
use super::spec::{Range, Slot, SlotAction, SlotId};

/// The prefix maps of the classifier, as the model names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableId {
    /// Source prefixes: the hash (all lengths) and the trie (shorter ones).
    Src4,
    Src6,
    /// Target prefixes (tries).
    Dst4,
    Dst6,
}

impl TableId {
    pub const ALL: [TableId; 4] = [TableId::Src4, TableId::Src6, TableId::Dst4, TableId::Dst6];

    fn width(self) -> u8 {
        match self {
            TableId::Src4 | TableId::Dst4 => 32,
            TableId::Src6 | TableId::Dst6 => 128,
        }
    }
}

/// The value arrays of the classifier (index = the field's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArrayId {
    Proto,
    Sport,
    Dport,
    Icmp,
}

impl ArrayId {
    pub const ALL: [ArrayId; 4] = [
        ArrayId::Proto,
        ArrayId::Sport,
        ArrayId::Dport,
        ArrayId::Icmp,
    ];

    /// Entries: every value of the field.
    pub fn entries(self) -> usize {
        match self {
            ArrayId::Proto | ArrayId::Icmp => 256,
            ArrayId::Sport | ArrayId::Dport => 65536,
        }
    }
}

/// What the model knows of one slot beyond its spec.
#[derive(Clone, Debug)]
struct SlotInfo {
    slot: Slot,
    /// The slot's only IPv4 / IPv6 target prefix, when it has exactly one.
    single_target: [Option<Prefix>; 2],
    /// Whether its sources or targets overlap the exempt list, per family.
    touches_exempt: [bool; 2],
}

/// Entries of one prefix map, with their kernel values.
pub type Table<V = SlotMask> = HashMap<Prefix, V>;

/// The content of one value array, every index.
pub type Values = Vec<SlotMask>;

/// The complete content of the classifier maps for a set of slots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contents {
    /// All slots of this content (what `policy.active` becomes).
    pub slots: SlotMask,
    /// `active` is left empty here: the apply step decides when to set it.
    pub policy: Policy,
    /// Every source prefix (the hash).
    pub src4: Table<SourceEntry>,
    pub src6: Table<SourceEntry>,
    /// The shorter source prefixes again (the trie).
    pub src4_lpm: Table<SourceEntry>,
    pub src6_lpm: Table<SourceEntry>,
    pub dst4: Table,
    pub dst6: Table,
    /// The value arrays, in [`ArrayId::ALL`] order.
    pub arrays: [Values; 4],
    /// `DOTS_SLOTS` entries of the slots of this content.
    pub configs: BTreeMap<SlotId, SlotConfig>,
}

/// How far a rate-limited slot's bucket may run ahead of the clock: a
/// burst of this long at the full rate passes.
pub const RATE_BURST: std::time::Duration = std::time::Duration::from_millis(50);

/// The `DOTS_SLOTS` entry of `slot`.
pub fn slot_config(slot: &Slot) -> SlotConfig {
    let (action, ns_per_packet, ps_per_byte, burst_ns) = match slot.spec.action {
        SlotAction::Drop => (action::DROP, 0, 0, 0),
        SlotAction::Monitor => (action::MONITOR, 0, 0, 0),
        SlotAction::RateLimit { pps, bps } => (
            action::RATE_LIMIT,
            // 0 stays 0: that kind of rate is not limited.
            1_000_000_000u64.checked_div(pps).map_or(0, |n| n.max(1)),
            8_000_000_000_000u64
                .checked_div(bps)
                .map_or(0, |n| n.max(1)),
            RATE_BURST.as_nanos() as u64,
        ),
    };
    SlotConfig {
        expires_ns: slot.expires_ns,
        action,
        ns_per_packet,
        ps_per_byte,
        burst_ns,
    }
}

/// Entries whose kernel value changed since the last [`Model::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    pub entries: BTreeSet<(TableId, Prefix)>,
    /// Index ranges (inclusive) of value arrays.
    pub arrays: Vec<(ArrayId, usize, usize)>,
}

/// The slots, and per map the prefixes they name.
#[derive(Clone, Debug)]
pub struct Model {
    slots: BTreeMap<SlotId, SlotInfo>,
    tables: [PrefixTable; 4],
    arrays: [Values; 4],
    any_proto: SlotMask,
    any_l4: SlotMask,
    any_dport: SlotMask,
    exempt: Vec<IpNet>,
    changed: BTreeSet<(TableId, Prefix)>,
    changed_arrays: Vec<(ArrayId, usize, usize)>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            slots: BTreeMap::new(),
            tables: TableId::ALL.map(|t| PrefixTable::new(t.width())),
            // Allocated by the first slot with values in them: the port
            // arrays are 2 MiB each, and most mitigations name no port.
            arrays: Default::default(),
            any_proto: SlotMask::EMPTY,
            any_l4: SlotMask::EMPTY,
            any_dport: SlotMask::EMPTY,
            exempt: Vec::new(),
            changed: BTreeSet::new(),
            changed_arrays: Vec::new(),
        }
    }
}

fn ip_prefix(net: &IpNet) -> (usize, Prefix) {
    match net.network() {
        IpAddr::V4(a) => (
            0,
            Prefix {
                bits: u128::from(u32::from(a)),
                len: net.prefix_len(),
            },
        ),
        IpAddr::V6(a) => (
            1,
            Prefix {
                bits: u128::from(a),
                len: net.prefix_len(),
            },
        ),
    }
}

/// Whether two prefixes of one family share an address.
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// The value ranges of a slot, per array.
fn slot_ranges(slot: &Slot) -> Vec<(ArrayId, usize, usize)> {
    let spec = &slot.spec;
    let mut out: Vec<(ArrayId, usize, usize)> = spec
        .protocols
        .iter()
        .map(|&p| (ArrayId::Proto, usize::from(p), usize::from(p)))
        .collect();
    let ranges = |a, rs: &[Range<u16>]| -> Vec<(ArrayId, usize, usize)> {
        rs.iter()
            .map(|r| (a, usize::from(r.lower), usize::from(r.upper)))
            .collect()
    };
    out.extend(ranges(ArrayId::Sport, &spec.source_ports));
    out.extend(ranges(ArrayId::Dport, &spec.target_ports));
    out.extend(
        spec.icmp_types
            .iter()
            .map(|r| (ArrayId::Icmp, usize::from(r.lower), usize::from(r.upper))),
    );
    out
}

/// The prefixes of a slot, per map.
fn slot_prefixes(slot: &Slot) -> Vec<(TableId, Prefix)> {
    let spec = &slot.spec;
    let mut has = [false; 2];
    let mut out = Vec::new();
    for net in &spec.targets {
        let (family, p) = ip_prefix(net);
        has[family] = true;
        out.push(([TableId::Dst4, TableId::Dst6][family], p));
    }
    // A source only matters for packets of its family, and those also need
    // a target of that family: sources without one are left out.
    for net in &spec.sources {
        let (family, p) = ip_prefix(net);
        if has[family] {
            out.push(([TableId::Src4, TableId::Src6][family], p));
        }
    }
    out
}

impl Model {
    /// A model holding `slots`, with `exempt` as the never-dropped prefixes.
    pub fn build(slots: &BTreeMap<SlotId, Slot>, exempt: &[IpNet]) -> Model {
        let mut m = Model {
            exempt: exempt.to_vec(),
            ..Model::default()
        };
        for (&id, slot) in slots {
            m.add(id, slot);
        }
        m.changed.clear();
        m.changed_arrays.clear();
        m
    }

    /// The slots held.
    pub fn slots(&self) -> impl Iterator<Item = (&SlotId, &Slot)> {
        self.slots.iter().map(|(id, i)| (id, &i.slot))
    }

    pub fn slot(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(&id).map(|i| &i.slot)
    }

    pub fn slot_mask(&self) -> SlotMask {
        let mut m = SlotMask::EMPTY;
        for id in self.slots.keys() {
            m.set(usize::from(*id));
        }
        m
    }

    pub fn table(&self, t: TableId) -> &PrefixTable {
        &self.tables[t as usize]
    }

    /// Adds slot `id` (which must not be held).
    pub fn add(&mut self, id: SlotId, slot: &Slot) {
        let s = usize::from(id);
        let prefixes = slot_prefixes(slot);
        let mut targets: [Vec<Prefix>; 2] = Default::default();
        for (t, p) in &prefixes {
            match t {
                TableId::Dst4 => targets[0].push(*p),
                TableId::Dst6 => targets[1].push(*p),
                _ => {}
            }
        }
        let single = |v: &Vec<Prefix>| {
            let distinct: BTreeSet<&Prefix> = v.iter().collect();
            (distinct.len() == 1).then(|| v[0])
        };
        let info = SlotInfo {
            slot: slot.clone(),
            single_target: [single(&targets[0]), single(&targets[1])],
            touches_exempt: self.touches_exempt(slot),
        };
        self.slots.insert(id, info);
        for (t, p) in prefixes {
            let changed = &mut self.changed;
            self.tables[t as usize].add(p, s, &mut |q| {
                changed.insert((t, q));
            });
        }
        for (a, lo, hi) in slot_ranges(slot) {
            let values = &mut self.arrays[a as usize];
            if values.is_empty() {
                values.resize(a.entries(), SlotMask::EMPTY);
            }
            for v in &mut values[lo..=hi] {
                v.set(s);
            }
            self.changed_arrays.push((a, lo, hi));
        }
        let spec = &slot.spec;
        if spec.protocols.is_empty() {
            self.any_proto.set(s);
        }
        if spec.source_ports.is_empty() && spec.icmp_types.is_empty() {
            self.any_l4.set(s);
        }
        if spec.target_ports.is_empty() {
            self.any_dport.set(s);
        }
    }

    /// Removes slot `id`; returns what it held.
    pub fn remove(&mut self, id: SlotId) -> Option<Slot> {
        let info = self.slots.remove(&id)?;
        let s = usize::from(id);
        for (t, p) in slot_prefixes(&info.slot) {
            let changed = &mut self.changed;
            self.tables[t as usize].remove(p, s, &mut |q| {
                changed.insert((t, q));
            });
        }
        for (a, lo, hi) in slot_ranges(&info.slot) {
            // Allocated when the slot was added.
            for v in self.arrays[a as usize].iter_mut().take(hi + 1).skip(lo) {
                v.clear(s);
            }
            self.changed_arrays.push((a, lo, hi));
        }
        self.any_proto.clear(s);
        self.any_l4.clear(s);
        self.any_dport.clear(s);
        Some(info.slot)
    }

    /// Replaces the expiry of a held slot (no map entry changes).
    pub fn set_expiry(&mut self, id: SlotId, expires_ns: u64) {
        if let Some(i) = self.slots.get_mut(&id) {
            i.slot.expires_ns = expires_ns;
        }
    }

    /// The entries changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        Changes {
            entries: std::mem::take(&mut self.changed),
            arrays: std::mem::take(&mut self.changed_arrays),
        }
    }

    /// The never-dropped prefixes.
    pub fn exempt(&self) -> &[IpNet] {
        &self.exempt
    }

    /// New never-dropped prefixes: which slots they concern is computed again.
    pub fn set_exempt(&mut self, exempt: &[IpNet]) {
        self.exempt = exempt.to_vec();
        let ids: Vec<SlotId> = self.slots.keys().copied().collect();
        for id in ids {
            let touches = self.touches_exempt(&self.slots[&id].slot);
            if let Some(i) = self.slots.get_mut(&id) {
                i.touches_exempt = touches;
            }
        }
    }

    fn touches_exempt(&self, slot: &Slot) -> [bool; 2] {
        let mut out = [false; 2];
        for e in &self.exempt {
            let family = usize::from(matches!(e, IpNet::V6(_)));
            if out[family] {
                continue;
            }
            out[family] = slot
                .spec
                .sources
                .iter()
                .chain(&slot.spec.targets)
                .any(|p| overlap(p, e));
        }
        out
    }

    /// The policy for these slots (`active` left empty).
    pub fn policy(&self) -> Policy {
        let mut flags = 0;
        for info in self.slots.values() {
            if info.touches_exempt[0] {
                flags |= flags::EXEMPT4;
            }
            if info.touches_exempt[1] {
                flags |= flags::EXEMPT6;
            }
        }
        Policy {
            active: SlotMask::EMPTY,
            any_proto: self.any_proto,
            any_l4: self.any_l4,
            any_dport: self.any_dport,
            flags,
            src4: source_lengths(self.table(TableId::Src4)),
            src6: source_lengths(self.table(TableId::Src6)),
        }
    }

    /// The kernel value of source prefix `p` of `table` (`Src4` or `Src6`).
    pub fn source_entry(&self, table: TableId, p: &Prefix) -> SourceEntry {
        let slots = self.table(table).folded(p);
        let family = usize::from(table == TableId::Src6);
        let mut target: Option<Prefix> = None;
        let mut hint = true;
        for s in slots_in(&slots) {
            let t = self
                .slots
                .get(&(s as SlotId))
                .and_then(|i| i.single_target[family]);
            match (t, target) {
                (None, _) => hint = false,
                (Some(t), None) => target = Some(t),
                (Some(t), Some(u)) if t != u => hint = false,
                _ => {}
            }
            if !hint {
                break;
            }
        }
        let mut e = SourceEntry {
            slots,
            ..SourceEntry::default()
        };
        if let (true, Some(t)) = (hint, target) {
            let width = if family == 0 { 32 } else { 128 };
            let bytes = |v: u128| -> Vec<u8> {
                if family == 0 {
                    (v as u32).to_be_bytes().to_vec()
                } else {
                    v.to_be_bytes().to_vec()
                }
            };
            e.flags = entry::TARGET_HINT;
            e.target = addr_words(&bytes(t.bits));
            e.target_mask = addr_words(&bytes(super::prefix::netmask(t.len, width)));
        }
        e
    }

    /// The kernel value of prefix `p` of a slot-mask table.
    pub fn mask_entry(&self, table: TableId, p: &Prefix) -> SlotMask {
        self.table(table).folded(p)
    }

    /// The value array `a`; empty while no slot ever had values in it
    /// (every value [`SlotMask::EMPTY`]).
    pub fn array(&self, a: ArrayId) -> &[SlotMask] {
        &self.arrays[a as usize]
    }

    /// Everything the maps hold for these slots.
    pub fn contents(&self) -> Contents {
        let mut c = Contents {
            slots: self.slot_mask(),
            policy: self.policy(),
            ..Contents::default()
        };
        for (table, hash, trie) in [
            (TableId::Src4, &mut c.src4, &mut c.src4_lpm),
            (TableId::Src6, &mut c.src6, &mut c.src6_lpm),
        ] {
            let t = self.table(table);
            for p in t.prefixes() {
                let e = self.source_entry(table, &p);
                if p.len < t.width() {
                    trie.insert(p, e);
                }
                hash.insert(p, e);
            }
        }
        for (table, out) in [(TableId::Dst4, &mut c.dst4), (TableId::Dst6, &mut c.dst6)] {
            for p in self.table(table).prefixes() {
                out.insert(p, self.mask_entry(table, &p));
            }
        }
        c.arrays = ArrayId::ALL.map(|a| match &self.arrays[a as usize] {
            v if v.is_empty() => vec![SlotMask::EMPTY; a.entries()],
            v => v.clone(),
        });
        c.configs = self
            .slots
            .iter()
            .map(|(id, i)| (*id, slot_config(&i.slot)))
            .collect();
        c
    }
}

/// The slots of a mask, in order.
pub fn slots_in(m: &SlotMask) -> impl Iterator<Item = usize> + '_ {
    m.bits.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(w * 64 + b)
        })
    })
}

/// The probe list of one source table (see [`SourceLengths`]).
pub fn source_lengths(t: &PrefixTable) -> SourceLengths {
    lengths_of(&t.lengths(), t.width())
}

/// The probe list for `lengths` (longest first) in a `width`-bit space.
pub fn lengths_of(lengths: &[u8], width: u8) -> SourceLengths {
    let mut out = SourceLengths::default();
    let probed: Vec<u8> = if lengths.len() > MAX_PROBED_LENGTHS {
        out.trie = 1;
        lengths.iter().copied().filter(|&l| l == width).collect()
    } else {
        lengths.to_vec()
    };
    for (i, l) in probed.iter().enumerate() {
        out.lengths[i] = *l;
    }
    out.count = probed.len() as u8;
    out
}

/// A kernel value that names slots.
pub trait SlotValue: Copy + PartialEq {
    fn slots(&self) -> SlotMask;
}

impl SlotValue for SlotMask {
    fn slots(&self) -> SlotMask {
        *self
    }
}

impl SlotValue for SourceEntry {
    fn slots(&self) -> SlotMask {
        self.slots
    }
}

/// What changes between two versions of one table.
#[derive(Debug, PartialEq)]
pub struct Diff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
    /// Slots whose matches change in some entry.
    pub touched: SlotMask,
}

impl<K, V> Diff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

pub fn xor(a: &SlotMask, b: &SlotMask) -> SlotMask {
    let mut out = *a;
    for (o, b) in out.bits.iter_mut().zip(b.bits) {
        *o ^= b;
    }
    out
}

/// Entries to write to turn `actual` into `desired`. Entries whose value
/// names no slot count as absent. A value that changes beyond its slots (a
/// target hint) touches the slots of both versions.
pub fn diff<K: Copy + Eq + Hash + Ord, V: SlotValue>(
    desired: &HashMap<K, V>,
    actual: &HashMap<K, V>,
) -> Diff<K, V> {
    let mut d = Diff {
        upserts: Vec::new(),
        deletes: Vec::new(),
        touched: SlotMask::EMPTY,
    };
    for (k, want) in desired.iter().filter(|(_, v)| !v.slots().is_empty()) {
        match actual.get(k) {
            Some(have) if have == want => {}
            Some(have) if have.slots() != want.slots() => {
                d.touched = d.touched.or(&xor(&have.slots(), &want.slots()));
                d.upserts.push((*k, *want));
            }
            Some(have) => {
                d.touched = d.touched.or(&have.slots()).or(&want.slots());
                d.upserts.push((*k, *want));
            }
            None => {
                d.touched = d.touched.or(&want.slots());
                d.upserts.push((*k, *want));
            }
        }
    }
    for (k, have) in actual {
        if desired.get(k).is_none_or(|v| v.slots().is_empty()) {
            d.touched = d.touched.or(&have.slots());
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

/// The probe lists to use while entries of both `a` and `b` may be in the
/// maps: every length of either (the trie when that is too many).
pub fn lengths_union(a: &SourceLengths, b: &SourceLengths, width: u8) -> SourceLengths {
    let mut all: BTreeSet<u8> = BTreeSet::new();
    for l in [a, b] {
        all.extend(&l.lengths[..usize::from(l.count)]);
    }
    let mut u = lengths_of(&all.into_iter().rev().collect::<Vec<_>>(), width);
    if a.trie != 0 || b.trie != 0 {
        // A trie in use stays in use; the host length, if any, is probed first.
        u = lengths_of(
            &u.lengths[..usize::from(u.count)]
                .iter()
                .copied()
                .filter(|&l| l == width)
                .collect::<Vec<_>>(),
            width,
        );
        u.trie = 1;
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::SlotSpec;

    fn pfx(bits: u128, len: u8) -> Prefix {
        Prefix { bits, len }
    }

    fn spec(sources: &[&str], targets: &[&str]) -> Slot {
        Slot::without_expiry(SlotSpec {
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            targets: targets.iter().map(|s| s.parse().unwrap()).collect(),
            ..Default::default()
        })
    }

    fn build(slots: &[(SlotId, Slot)]) -> Contents {
        Model::build(&slots.iter().cloned().collect(), &[]).contents()
    }

    #[test]
    fn covering_prefixes_fold_into_longer_ones() {
        let c = build(&[
            (0, spec(&["10.0.0.0/8"], &["198.51.100.0/24"])),
            (
                1,
                spec(&["10.1.0.0/16", "10.1.2.3/32"], &["198.51.100.0/24"]),
            ),
            (2, spec(&["2001:db8::/32"], &["2001:db8:ffff::/48"])),
        ]);
        let both = SlotMask::single(0).or(&SlotMask::single(1));
        assert_eq!(c.src4_lpm[&pfx(0x0a00_0000, 8)].slots, SlotMask::single(0));
        assert_eq!(c.src4_lpm[&pfx(0x0a01_0000, 16)].slots, both);
        assert_eq!(c.src4[&pfx(0x0a01_0203, 32)].slots, both);
        assert_eq!(c.src4.len(), 3, "the hash holds every length");
        assert_eq!(c.src4_lpm.len(), 2, "the trie only the shorter ones");
        assert_eq!(c.dst4[&pfx(0xc633_6400, 24)], both);
        assert_eq!(c.src6_lpm.len(), 1);
        assert_eq!(
            (c.policy.src4.count, c.policy.src4.lengths),
            (3, [32, 16, 8, 0])
        );
        assert_eq!(c.policy.any_proto.bits[0], 0b111);
        assert_eq!(c.slots.bits[0], 0b111);
    }

    #[test]
    fn one_common_target_becomes_a_hint() {
        let c = build(&[
            (0, spec(&["10.0.0.1/32"], &["198.51.100.0/24"])),
            (
                1,
                spec(&["10.0.0.1/32", "10.0.0.2/32"], &["198.51.100.7/32"]),
            ),
            (
                2,
                spec(&["10.0.0.3/32"], &["198.51.100.0/24", "2001:db8::/32"]),
            ),
        ]);
        // Two slots with different targets: no hint, the program looks up.
        assert_eq!(c.src4[&pfx(0x0a00_0001, 32)].flags, 0);
        let e = c.src4[&pfx(0x0a00_0002, 32)];
        assert_eq!(e.flags, entry::TARGET_HINT);
        assert_eq!(e.target, addr_words(&[198, 51, 100, 7]));
        assert_eq!(e.target_mask, addr_words(&[255, 255, 255, 255]));
        // One IPv4 target (the IPv6 one does not count for IPv4 packets).
        let e = c.src4[&pfx(0x0a00_0003, 32)];
        assert_eq!(e.target_mask, addr_words(&[255, 255, 255, 0]));
    }

    #[test]
    fn sources_without_a_target_of_their_family_are_left_out() {
        let c = build(&[(
            0,
            spec(&["10.0.0.1/32", "2001:db8::1/128"], &["198.51.100.0/24"]),
        )]);
        assert_eq!(c.src4.len(), 1);
        assert!(c.src6.is_empty());
    }

    #[test]
    fn many_lengths_take_the_trie() {
        let sources: Vec<String> = (20..=25).map(|l| format!("10.0.0.0/{l}")).collect();
        let mut s: Vec<&str> = sources.iter().map(String::as_str).collect();
        s.push("10.0.0.1/32");
        let c = build(&[(0, spec(&s, &["198.51.100.0/24"]))]);
        assert_eq!(c.policy.src4.trie, 1);
        assert_eq!((c.policy.src4.count, c.policy.src4.lengths[0]), (1, 32));
    }

    #[test]
    fn constraints_split_any_masks() {
        let mut s = spec(&["10.0.0.0/8"], &["192.0.2.1/32"]);
        let spec_s = std::sync::Arc::make_mut(&mut s.spec);
        spec_s.protocols = vec![17];
        spec_s.source_ports = vec![Range::new(1000, 1001)];
        spec_s.target_ports = vec![Range::single(53)];
        let mut t = spec(&["10.0.0.0/8"], &["192.0.2.1/32"]);
        std::sync::Arc::make_mut(&mut t.spec).icmp_types = vec![Range::new(0, 255)];
        let c = build(&[(3, s), (4, t)]);
        assert_eq!(c.policy.any_proto, SlotMask::single(4));
        assert_eq!(c.policy.any_l4, SlotMask::EMPTY);
        assert_eq!(c.policy.any_dport, SlotMask::single(4));
        let [proto, sport, dport, icmp] = &c.arrays;
        assert_eq!(proto[17], SlotMask::single(3));
        assert_eq!(proto[6], SlotMask::EMPTY);
        assert_eq!(
            (sport[999], sport[1000], sport[1001], sport[1002]),
            (
                SlotMask::EMPTY,
                SlotMask::single(3),
                SlotMask::single(3),
                SlotMask::EMPTY
            )
        );
        assert!(icmp.iter().all(|m| *m == SlotMask::single(4)));
        assert_eq!(dport[53], SlotMask::single(3));
        assert_eq!(dport.iter().filter(|m| !m.is_empty()).count(), 1);
    }

    #[test]
    fn incremental_changes_match_a_rebuild() {
        let a = spec(&["10.0.0.0/8", "10.1.2.3/32"], &["198.51.100.0/24"]);
        let b = spec(&["10.1.0.0/16"], &["198.51.100.7/32"]);
        let mut m = Model::build(&BTreeMap::from([(0, a.clone())]), &[]);
        m.add(1, &b);
        let changes = m.take_changes();
        // The /16, and the host below it: not the /8 above.
        assert_eq!(
            changes.entries.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
            vec![
                pfx(0x0a01_0000, 16),
                pfx(0x0a01_0203, 32),
                pfx(0xc633_6407, 32)
            ]
        );
        assert_eq!(
            m.contents(),
            build(&[(0, a.clone()), (1, b.clone())]),
            "same as built at once"
        );
        m.remove(0);
        assert_eq!(m.contents(), build(&[(1, b)]));
    }

    #[test]
    fn exempt_overlap_sets_the_flags() {
        let slots = BTreeMap::from([(0, spec(&["10.0.0.0/8"], &["198.51.100.0/24"]))]);
        let far: IpNet = "192.0.2.1/32".parse().unwrap();
        let near: IpNet = "198.51.100.53/32".parse().unwrap();
        assert_eq!(Model::build(&slots, &[far]).policy().flags, 0);
        let mut m = Model::build(&slots, &[far, near]);
        assert_eq!(m.policy().flags, flags::EXEMPT4);
        m.set_exempt(&[far]);
        assert_eq!(m.policy().flags, 0);
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

    #[test]
    fn length_unions_cover_both() {
        let a = lengths_of(&[32, 24], 32);
        let b = lengths_of(&[32, 16], 32);
        let u = lengths_union(&a, &b, 32);
        assert_eq!((u.count, u.lengths, u.trie), (3, [32, 24, 16, 0], 0));
        let many = lengths_of(&[32, 30, 28, 26, 24], 32);
        let u = lengths_union(&a, &many, 32);
        assert_eq!((u.count, u.lengths[0], u.trie), (1, 32, 1));
    }
}
