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

/// Prefixes of one key space and the slots naming each ("own" slots).
#[derive(Clone, Debug)]
pub struct PrefixTable {
    width: u8,
    own: BTreeMap<Prefix, SlotMask>,
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
        self.own.contains_key(p)
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
    pub fn prefixes(&self) -> impl Iterator<Item = &Prefix> {
        self.own.keys()
    }

    /// Adds `slot` to prefix `p`; `dirty` hears every entry whose folded
    /// value may have changed.
    pub fn add(&mut self, p: Prefix, slot: usize, dirty: &mut impl FnMut(Prefix)) {
        let entry = self.own.entry(p).or_insert_with(|| {
            *self.lengths.entry(p.len).or_default() += 1;
            SlotMask::EMPTY
        });
        entry.set(slot);
        self.mark_covered(p, dirty);
    }

    /// Takes `slot` off prefix `p` (the entry goes when no slot is left).
    pub fn remove(&mut self, p: Prefix, slot: usize, dirty: &mut impl FnMut(Prefix)) {
        let Some(mask) = self.own.get_mut(&p) else {
            return;
        };
        mask.clear(slot);
        if mask.is_empty() {
            self.own.remove(&p);
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
        for q in self.own.range(from..=to).map(|(q, _)| *q) {
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
            .filter_map(|&l| self.own.get(&Prefix::truncate(p.bits, l, self.width)))
            .fold(SlotMask::EMPTY, |acc, m| acc.or(m))
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
