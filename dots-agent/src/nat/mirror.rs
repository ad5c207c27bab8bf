//! An in-memory mirror of the conntrack table's source-NATed entries:
//! loaded once with a dump, kept current by NEW and DESTROY events, so a
//! request resolves by scanning memory (a few ms for 100,000 entries)
//! instead of dumping the table (about 1 µs per entry in the kernel).
//!
//! Only what matching needs is kept: the original tuple (the key: addresses,
//! protocol, ports) and the reply destination address and port (the
//! translated source). Entries that were not source-NATed are skipped.
//!
//! Usage: open the [`EventSocket`](super::EventSocket) first, then
//! [`CtMirror::load`], then apply the events in order (those that arrived
//! during the dump too): upserts and removals are keyed by the original
//! tuple, so replaying an event the dump already reflected is harmless.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{
    conntrack::{Conntrack, CtEntry, CtEvent, Tuple},
    NatError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReplyEnd {
    dst: IpAddr,
    dst_port: Option<u16>,
    /// Seen only in a dump, never in a NEW event: possibly created before
    /// the subscription, so its DESTROY event may never come (see
    /// [`CtEvent::Destroy`]). [`CtMirror::needs_reconcile`] tells when such
    /// entries remain.
    unconfirmed: bool,
}

/// An all-IPv4 entry's original tuple, packed: 16 bytes instead of the
/// 44 of a [`Tuple`] (whose addresses are `IpAddr`s of 17 bytes). On a CPE
/// nearly every NATed entry is IPv4, so this is most of the mirror's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key4 {
    src: u32,
    dst: u32,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    /// [`SRC_PORT`] and [`DST_PORT`]: which ports the tuple has.
    ports: u8,
}

/// An all-IPv4 entry's [`ReplyEnd`], packed into 8 bytes.
#[derive(Clone, Copy, Debug)]
struct Reply4 {
    dst: u32,
    dst_port: u16,
    /// [`DST_PORT`] and [`UNCONFIRMED`].
    flags: u8,
}

const SRC_PORT: u8 = 1;
const DST_PORT: u8 = 2;
const UNCONFIRMED: u8 = 4;

fn port_bits(port: Option<u16>, bit: u8) -> (u16, u8) {
    port.map_or((0, 0), |p| (p, bit))
}

fn port_of(port: u16, flags: u8, bit: u8) -> Option<u16> {
    (flags & bit != 0).then_some(port)
}

impl Key4 {
    /// `None` unless both addresses are IPv4.
    fn of(t: &Tuple) -> Option<Key4> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (t.src, t.dst) else {
            return None;
        };
        let (src_port, s) = port_bits(t.src_port, SRC_PORT);
        let (dst_port, d) = port_bits(t.dst_port, DST_PORT);
        Some(Key4 {
            src: src.into(),
            dst: dst.into(),
            src_port,
            dst_port,
            protocol: t.protocol,
            ports: s | d,
        })
    }

    fn tuple(&self) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::from(self.src)),
            dst: IpAddr::V4(Ipv4Addr::from(self.dst)),
            protocol: self.protocol,
            src_port: port_of(self.src_port, self.ports, SRC_PORT),
            dst_port: port_of(self.dst_port, self.ports, DST_PORT),
        }
    }
}

impl Reply4 {
    /// `None` unless the address is IPv4.
    fn of(r: &ReplyEnd) -> Option<Reply4> {
        let IpAddr::V4(dst) = r.dst else {
            return None;
        };
        let (dst_port, p) = port_bits(r.dst_port, DST_PORT);
        Some(Reply4 {
            dst: dst.into(),
            dst_port,
            flags: p | if r.unconfirmed { UNCONFIRMED } else { 0 },
        })
    }

    fn end(&self) -> ReplyEnd {
        ReplyEnd {
            dst: IpAddr::V4(Ipv4Addr::from(self.dst)),
            dst_port: port_of(self.dst_port, self.flags, DST_PORT),
            unconfirmed: self.flags & UNCONFIRMED != 0,
        }
    }
}

/// The entries: all-IPv4 ones packed, the others (IPv6) as they are.
#[derive(Debug, Default)]
struct Store {
    v4: HashMap<Key4, Reply4>,
    other: HashMap<Tuple, ReplyEnd>,
}

impl Store {
    fn with_capacity(v4: usize, other: usize) -> Store {
        Store {
            v4: HashMap::with_capacity(v4),
            other: HashMap::with_capacity(other),
        }
    }

    fn get(&self, t: &Tuple) -> Option<ReplyEnd> {
        match Key4::of(t).and_then(|k| self.v4.get(&k)) {
            Some(r) => Some(r.end()),
            None => self.other.get(t).copied(),
        }
    }

    fn insert(&mut self, t: Tuple, r: ReplyEnd) -> Option<ReplyEnd> {
        if let (Some(k), Some(p)) = (Key4::of(&t), Reply4::of(&r)) {
            return self.v4.insert(k, p).map(|o| o.end());
        }
        self.other.insert(t, r)
    }

    fn remove(&mut self, t: &Tuple) -> Option<ReplyEnd> {
        match Key4::of(t).and_then(|k| self.v4.remove(&k)) {
            Some(r) => Some(r.end()),
            None => self.other.remove(t),
        }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.other.len()
    }

    fn heap_bytes(&self) -> usize {
        // hashbrown: one slot and one control byte per bucket.
        self.v4.capacity() * (std::mem::size_of::<(Key4, Reply4)>() + 1)
            + self.other.capacity() * (std::mem::size_of::<(Tuple, ReplyEnd)>() + 1)
    }

    fn iter(&self) -> impl Iterator<Item = (Tuple, ReplyEnd)> + '_ {
        self.v4
            .iter()
            .map(|(k, r)| (k.tuple(), r.end()))
            .chain(self.other.iter().map(|(t, r)| (*t, *r)))
    }
}

/// The source-NATed conntrack entries, keyed by original tuple.
#[derive(Debug, Default)]
pub struct CtMirror {
    entries: Store,
    unconfirmed: usize,
}

impl CtMirror {
    pub fn new() -> CtMirror {
        CtMirror::default()
    }

    /// Dumps the table into a new mirror.
    pub fn load(ct: &mut Conntrack) -> Result<CtMirror, NatError> {
        let mut m = CtMirror::new();
        m.reload(ct)?;
        Ok(m)
    }

    /// Replaces the contents with a fresh dump (after lost events, or to
    /// drop entries whose DESTROY event never comes). Entries already known
    /// from a NEW event stay confirmed. On error the mirror is unchanged.
    pub fn reload(&mut self, ct: &mut Conntrack) -> Result<(), NatError> {
        let mut fresh = Store::with_capacity(self.entries.v4.len(), self.entries.other.len());
        let mut unconfirmed = 0;
        ct.dump_each(|e| {
            if !e.is_source_nat() {
                return;
            }
            let known = self
                .entries
                .get(&e.original)
                .is_some_and(|r| !r.unconfirmed && r.dst == e.reply.dst);
            unconfirmed += usize::from(!known);
            fresh.insert(
                e.original,
                ReplyEnd {
                    dst: e.reply.dst,
                    dst_port: e.reply.dst_port,
                    unconfirmed: !known,
                },
            );
        })?;
        self.entries = fresh;
        self.unconfirmed = unconfirmed;
        Ok(())
    }

    /// Records a new entry (from a NEW event); false when it is not
    /// source-NATed (not kept).
    pub fn insert(&mut self, e: &CtEntry) -> bool {
        if !e.is_source_nat() {
            return false;
        }
        let old = self.entries.insert(
            e.original,
            ReplyEnd {
                dst: e.reply.dst,
                dst_port: e.reply.dst_port,
                unconfirmed: false,
            },
        );
        if old.is_some_and(|o| o.unconfirmed) {
            self.unconfirmed -= 1;
        }
        true
    }

    /// Forgets an entry (from a DESTROY event); true when it was known.
    pub fn remove(&mut self, e: &CtEntry) -> bool {
        match self.entries.remove(&e.original) {
            Some(o) => {
                if o.unconfirmed {
                    self.unconfirmed -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// Applies one event: `New` upserts, `Destroy` removes. `Resync` is not
    /// handled here (the caller reloads with [`CtMirror::reload`]); returns
    /// false for it.
    pub fn apply(&mut self, ev: &CtEvent) -> bool {
        match ev {
            CtEvent::New(e) => self.insert(e),
            CtEvent::Destroy(e) => self.remove(e),
            CtEvent::Resync => false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// Approximate heap use in bytes (the hash tables' slots and control
    /// bytes).
    pub fn heap_bytes(&self) -> usize {
        self.entries.heap_bytes()
    }

    /// Whether the original tuple of `e` is in the mirror.
    pub fn contains(&self, e: &CtEntry) -> bool {
        self.entries.get(&e.original).is_some()
    }

    /// Whether entries seen only in a dump remain: their DESTROY events may
    /// never come, so the caller should [`reload`](CtMirror::reload) now and
    /// then until none is left.
    pub fn needs_reconcile(&self) -> bool {
        self.unconfirmed > 0
    }

    /// The entries, rebuilt as [`CtEntry`]s for the matcher. The reply
    /// tuple's source address and port are not stored: they are given as
    /// the original destination's (exact unless destination-NATed too;
    /// matching does not use them).
    pub fn entries(&self) -> impl Iterator<Item = CtEntry> + '_ {
        self.entries.iter().map(|(o, r)| CtEntry {
            original: o,
            reply: Tuple {
                src: o.dst,
                dst: r.dst,
                protocol: o.protocol,
                src_port: o.dst_port,
                dst_port: r.dst_port,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, sport: u16, ext: &str, xport: u16) -> CtEntry {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        CtEntry {
            original: Tuple {
                src: ip(src),
                dst: ip("198.51.100.10"),
                protocol: 17,
                src_port: Some(sport),
                dst_port: Some(53),
            },
            reply: Tuple {
                src: ip("198.51.100.10"),
                dst: ip(ext),
                protocol: 17,
                src_port: Some(53),
                dst_port: Some(xport),
            },
        }
    }

    #[test]
    fn upserts_removes_and_skips_non_nat() {
        let mut m = CtMirror::new();
        let a = flow("192.0.2.2", 5000, "203.0.113.1", 40000);
        assert!(m.apply(&CtEvent::New(a)));
        assert!(m.apply(&CtEvent::New(a)), "idempotent");
        assert_eq!(m.len(), 1);
        assert_eq!(m.entries().collect::<Vec<_>>(), vec![a]);
        // The router's own flow: not source-NATed, not kept.
        let own = flow("203.0.113.1", 5000, "203.0.113.1", 5000);
        assert!(!m.apply(&CtEvent::New(own)));
        assert_eq!(m.len(), 1);
        assert!(m.apply(&CtEvent::Destroy(a)));
        assert!(!m.apply(&CtEvent::Destroy(a)), "already gone");
        assert!(m.is_empty());
        assert!(!m.apply(&CtEvent::Resync));
        assert!(!m.needs_reconcile());
    }

    #[test]
    fn packed_entries_round_trip() {
        let mut m = CtMirror::new();
        let a = flow("192.0.2.2", 5000, "203.0.113.1", 40000);
        // ICMP: no ports.
        let mut icmp = flow("192.0.2.3", 0, "203.0.113.1", 0);
        for t in [&mut icmp.original, &mut icmp.reply] {
            t.protocol = 1;
            t.src_port = None;
            t.dst_port = None;
        }
        icmp.reply.dst = "203.0.113.2".parse().unwrap();
        let mut v6 = flow("192.0.2.4", 5000, "203.0.113.1", 40001);
        v6.original.src = "2001:db8:1::2".parse().unwrap();
        v6.original.dst = "2001:db8:ffff::10".parse().unwrap();
        v6.reply.src = v6.original.dst;
        v6.reply.dst = "2001:db8:2::1".parse().unwrap();
        for e in [a, icmp, v6] {
            assert!(m.insert(&e));
            assert!(m.contains(&e));
        }
        let mut got: Vec<CtEntry> = m.entries().collect();
        got.sort();
        let mut want = vec![a, icmp, v6];
        want.sort();
        assert_eq!(got, want);
        assert_eq!((m.entries.v4.len(), m.entries.other.len()), (2, 1));
        assert!(m.remove(&icmp));
        assert!(!m.contains(&icmp));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn unconfirmed_flag_survives_packing() {
        let r = ReplyEnd {
            dst: "203.0.113.1".parse().unwrap(),
            dst_port: Some(1),
            unconfirmed: true,
        };
        assert_eq!(Reply4::of(&r).unwrap().end(), r);
        let r = ReplyEnd {
            dst_port: None,
            unconfirmed: false,
            ..r
        };
        assert_eq!(Reply4::of(&r).unwrap().end(), r);
    }

    #[test]
    fn packed_slot_is_small() {
        // A third of the (Tuple, ReplyEnd) slot: what the memory budget of
        // a CPE's 16,384 conntrack entries rests on.
        assert_eq!(std::mem::size_of::<(Key4, Reply4)>(), 24);
        assert!(std::mem::size_of::<(Tuple, ReplyEnd)>() >= 60);
    }
}
