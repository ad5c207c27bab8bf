//! Address prefixes and the incremental table that keeps, per prefix, the
//! slots that name it.
//!
//! An LPM lookup (or a probe per prefix length) returns one entry, so every
//! entry the kernel holds carries the slots of all stored prefixes that
//! cover it ("folding"). [`PrefixTable`] keeps each prefix's own slots and
//! computes the folded value on demand; a change marks exactly the entries
//! whose folded value may change (the prefix and those it covers), so the
//! apply step writes O(changed) entries, not the table.

use std::collections::BTreeMap;

use dots_common::SlotMask;

/// A prefix of a `width`-bit key space, right-aligned in `bits`. Ordered by
/// `bits` first, so the prefixes inside one are a contiguous range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub bits: u128,
    pub len: u8,
}

impl Prefix {
    /// The prefix of length `len` that contains `bits`, in a `width`-bit space.
    pub fn truncate(bits: u128, len: u8, width: u8) -> Prefix {
        Prefix {
            bits: bits & netmask(len, width),
            len,
        }
    }

    /// The last value inside the prefix.
    fn last(&self, width: u8) -> u128 {
        self.bits | (ones(width) & !netmask(self.len, width))
    }
}

/// All `width` low bits set.
fn ones(width: u8) -> u128 {
    if width >= 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    }
}

/// The mask of a `len`-bit prefix in a `width`-bit space, right-aligned.
pub(super) fn netmask(len: u8, width: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ones(width) & (u128::MAX << (width - len.min(width)))
    }
}

/// A [`Prefix`] as the table's key: the same order, in 24 bytes instead of
/// 32 (a `u128` is aligned to 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    hi: u64,
    lo: u64,
    len: u8,
}

impl From<Prefix> for Key {
    fn from(p: Prefix) -> Key {
        Key {
            hi: (p.bits >> 64) as u64,
            lo: p.bits as u64,
            len: p.len,
        }
    }
}

impl From<Key> for Prefix {
    fn from(k: Key) -> Prefix {
        Prefix {
            bits: (u128::from(k.hi) << 64) | u128::from(k.lo),
            len: k.len,
        }
    }
}

/// The slots naming one prefix. Nearly always one: that case is held in the
/// entry itself, not as a 256-bit mask (measured, 15,360 prefixes of 256
/// mitigations took 1.8 MiB with a mask each).
#[derive(Clone, Debug, PartialEq, Eq)]
enum OwnSlots {
    One(u16),
    Many(Box<SlotMask>),
}

impl OwnSlots {
    fn add(&mut self, slot: usize) {
        match self {
            OwnSlots::One(s) if usize::from(*s) == slot => {}
            OwnSlots::One(s) => {
                let mut m = SlotMask::EMPTY;
                m.set(usize::from(*s));
                m.set(slot);
                *self = OwnSlots::Many(Box::new(m));
            }
            OwnSlots::Many(m) => m.set(slot),
        }
    }

    /// Takes `slot` off; whether any slot is left.
    fn remove(&mut self, slot: usize) -> bool {
        match self {
            OwnSlots::One(s) => usize::from(*s) != slot,
            OwnSlots::Many(m) => {
                m.clear(slot);
                !m.is_empty()
            }
        }
    }

    /// `acc` with these slots added.
    fn added_to(&self, mut acc: SlotMask) -> SlotMask {
        match self {
            OwnSlots::One(s) => {
                acc.set(usize::from(*s));
                acc
            }
            OwnSlots::Many(m) => acc.or(m),
        }
    }
}

/// Prefixes of one key space and the slots naming each ("own" slots).
#[derive(Clone, Debug)]
pub struct PrefixTable {
    width: u8,
    own: BTreeMap<Key, OwnSlots>,
    /// Entries per prefix length.
    lengths: BTreeMap<u8, usize>,
}

impl PrefixTable {
    pub fn new(width: u8) -> PrefixTable {
        PrefixTable {
            width,
            own: BTreeMap::new(),
            lengths: BTreeMap::new(),
        }
    }

    pub fn width(&self) -> u8 {
        self.width
    }

    pub fn len(&self) -> usize {
        self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.own.is_empty()
    }

    pub fn contains(&self, p: &Prefix) -> bool {
        self.own.contains_key(&Key::from(*p))
    }

    /// Entries of length `len`.
    pub fn count_of_length(&self, len: u8) -> usize {
        self.lengths.get(&len).copied().unwrap_or(0)
    }

    /// The prefix lengths present, longest first.
    pub fn lengths(&self) -> Vec<u8> {
        self.lengths.keys().rev().copied().collect()
    }

    /// Every stored prefix.
    pub fn prefixes(&self) -> impl Iterator<Item = Prefix> + '_ {
        self.own.keys().map(|k| Prefix::from(*k))
    }

    /// Adds `slot` to prefix `p`; `dirty` hears every entry whose folded
    /// value may have changed.
    pub fn add(&mut self, p: Prefix, slot: usize, dirty: &mut impl FnMut(Prefix)) {
        match self.own.get_mut(&Key::from(p)) {
            Some(own) => own.add(slot),
            None => {
                // Slots are below MAX_SLOTS (256), which a u16 holds.
                let own = u16::try_from(slot).map_or_else(
                    |_| {
                        let mut m = SlotMask::EMPTY;
                        m.set(slot);
                        OwnSlots::Many(Box::new(m))
                    },
                    OwnSlots::One,
                );
                self.own.insert(Key::from(p), own);
                *self.lengths.entry(p.len).or_default() += 1;
            }
        }
        self.mark_covered(p, dirty);
    }

    /// Takes `slot` off prefix `p` (the entry goes when no slot is left).
    pub fn remove(&mut self, p: Prefix, slot: usize, dirty: &mut impl FnMut(Prefix)) {
        let Some(own) = self.own.get_mut(&Key::from(p)) else {
            return;
        };
        if !own.remove(slot) {
            self.own.remove(&Key::from(p));
            if let Some(n) = self.lengths.get_mut(&p.len) {
                *n -= 1;
                if *n == 0 {
                    self.lengths.remove(&p.len);
                }
            }
        }
        self.mark_covered(p, dirty);
    }

    /// `p` and every stored prefix inside it.
    fn mark_covered(&self, p: Prefix, dirty: &mut impl FnMut(Prefix)) {
        dirty(p);
        let from = Prefix {
            bits: p.bits,
            len: 0,
        };
        let to = Prefix {
            bits: p.last(self.width),
            len: u8::MAX,
        };
        let range = Key::from(from)..=Key::from(to);
        for q in self.own.range(range).map(|(q, _)| Prefix::from(*q)) {
            if q.len > p.len {
                dirty(q);
            }
        }
    }

    /// The slots of `p` and of every stored prefix covering it: the value
    /// the kernel entry of `p` holds.
    pub fn folded(&self, p: &Prefix) -> SlotMask {
        self.lengths
            .keys()
            .take_while(|&&l| l <= p.len)
            .filter_map(|&l| {
                let covering = Prefix::truncate(p.bits, l, self.width);
                self.own.get(&Key::from(covering))
            })
            .fold(SlotMask::EMPTY, |acc, own| own.added_to(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pfx(bits: u128, len: u8) -> Prefix {
        Prefix { bits, len }
    }

    #[test]
    fn truncate_masks_host_bits() {
        assert_eq!(Prefix::truncate(0xc000_0201, 24, 32), pfx(0xc000_0200, 24));
        assert_eq!(Prefix::truncate(0xc000_0201, 0, 32), pfx(0, 0));
        assert_eq!(Prefix::truncate(0xc000_0201, 32, 32), pfx(0xc000_0201, 32));
        assert_eq!(Prefix::truncate(u128::MAX, 1, 128), pfx(1 << 127, 1));
        assert_eq!(pfx(0x0a00_0000, 8).last(32), 0x0aff_ffff);
        assert_eq!(pfx(0, 0).last(128), u128::MAX);
    }

    #[test]
    fn keys_keep_the_order_of_prefixes() {
        let mut ps = vec![
            pfx(u128::MAX, 128),
            pfx(1 << 64, 64),
            pfx((1 << 64) - 1, 128),
            pfx(0x0a00_0000, 8),
            pfx(0x0a00_0000, 24),
            pfx(0, 0),
        ];
        let mut keys: Vec<Key> = ps.iter().map(|p| Key::from(*p)).collect();
        ps.sort();
        keys.sort();
        assert_eq!(keys.into_iter().map(Prefix::from).collect::<Vec<_>>(), ps);
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }

    #[test]
    fn own_slots_grow_and_shrink() {
        let mut own = OwnSlots::One(3);
        own.add(3);
        assert_eq!(own, OwnSlots::One(3));
        assert_eq!(own.added_to(SlotMask::EMPTY), SlotMask::single(3));
        assert!(own.remove(4), "another slot leaves it");
        own.add(200);
        assert_eq!(
            own.added_to(SlotMask::single(7)),
            SlotMask::single(7)
                .or(&SlotMask::single(3))
                .or(&SlotMask::single(200))
        );
        assert!(own.remove(3));
        assert!(!own.remove(200), "no slot left");
        assert!(!OwnSlots::One(5).remove(5));
    }

    #[test]
    fn folding_and_dirty_entries() {
        let mut t = PrefixTable::new(32);
        let mut dirty = Vec::new();
        let host = pfx(0x0a01_0203, 32);
        t.add(host, 1, &mut |p| dirty.push(p));
        assert_eq!(dirty, vec![host]);
        dirty.clear();
        // A covering /8 changes the folded value of the host below it.
        let eight = pfx(0x0a00_0000, 8);
        t.add(eight, 0, &mut |p| dirty.push(p));
        dirty.sort();
        assert_eq!(dirty, vec![eight, host]);
        assert_eq!(
            t.folded(&host),
            SlotMask::single(0).or(&SlotMask::single(1))
        );
        assert_eq!(t.folded(&eight), SlotMask::single(0));
        // Unrelated prefixes are not touched.
        dirty.clear();
        t.add(pfx(0x0b00_0000, 8), 2, &mut |p| dirty.push(p));
        assert_eq!(dirty, vec![pfx(0x0b00_0000, 8)]);
        assert_eq!(t.lengths(), vec![32, 8]);
        // Removing the /8 of slot 0 leaves the host with slot 1 only.
        dirty.clear();
        t.remove(eight, 0, &mut |p| dirty.push(p));
        dirty.sort();
        assert_eq!(dirty, vec![eight, host]);
        assert!(!t.contains(&eight));
        assert_eq!(t.folded(&host), SlotMask::single(1));
        assert_eq!(t.len(), 2);
        t.remove(host, 1, &mut |_| {});
        assert_eq!(t.lengths(), vec![8]);
    }
}
