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

use std::{collections::HashMap, net::IpAddr};

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

/// The source-NATed conntrack entries, keyed by original tuple.
#[derive(Debug, Default)]
pub struct CtMirror {
    entries: HashMap<Tuple, ReplyEnd>,
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
        let mut fresh: HashMap<Tuple, ReplyEnd> = HashMap::with_capacity(self.entries.len());
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
        self.entries.is_empty()
    }

    /// Approximate heap use in bytes (the hash table's slots and control
    /// bytes).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * (std::mem::size_of::<(Tuple, ReplyEnd)>() + 1)
    }

    /// Whether the original tuple of `e` is in the mirror.
    pub fn contains(&self, e: &CtEntry) -> bool {
        self.entries.contains_key(&e.original)
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
            original: *o,
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
}
