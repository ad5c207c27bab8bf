//! The idempotent apply step: make the maps hold exactly a desired set of
//! slots, writing only what differs, and never let a packet see a
//! half-installed slot.

use std::collections::{BTreeMap, HashMap};

use dots_common::{flags, names, Bucket, Policy, SlotMask, MAX_EXEMPT_PREFIXES};
use ipnet::IpNet;

use super::Dataplane;
use crate::enforce::{
    maps::{Codec, Lpm, PrefixMap},
    plan::{diff, policy_touched, Contents, Prefix, Table},
    spec::{Slot, SlotId},
    EnforceError,
};

/// What an apply step changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Slots that start enforcing (their counters start at zero).
    pub activated: Vec<SlotId>,
    /// Slots that stopped enforcing.
    pub deactivated: Vec<SlotId>,
    /// Map entries written or deleted.
    pub writes: usize,
}

impl Dataplane {
    /// Makes the classifier enforce exactly `desired`, writing only what
    /// differs. Idempotent. A slot is switched on only once all its entries
    /// and its configuration are in place, and switched off before any of its
    /// entries change, so no packet ever sees a half-installed slot. A new
    /// expiry of an enforcing slot is written in place, without switching it
    /// off. Invalid slots or a lack of map capacity are reported before
    /// anything is written.
    pub fn apply(&mut self, desired: &BTreeMap<SlotId, Slot>) -> Result<ApplyReport, EnforceError> {
        for (slot, s) in desired {
            s.spec.check(*slot, &self.limits)?;
        }
        let want = Contents::build(desired);
        self.check_capacity(&want)?;
        let have = match self.mirror.take() {
            Some(m) => m,
            None => self.read_contents()?,
        };
        let (report, policy) = self.write(&want, &have)?;
        self.mirror = Some(Contents { policy, ..want });
        Ok(report)
    }

    fn check_capacity(&self, want: &Contents) -> Result<(), EnforceError> {
        let tables: [(&dyn PrefixMap<SlotMask>, &Table); 9] = [
            (&self.src4_exact, &want.src4_exact),
            (&self.src6_exact, &want.src6_exact),
            (&self.src4_lpm, &want.src4_lpm),
            (&self.src6_lpm, &want.src6_lpm),
            (&self.dst4, &want.dst4),
            (&self.dst6, &want.dst6),
            (&self.sport, &want.sport),
            (&self.dport, &want.dport),
            (&self.icmp_type, &want.icmp_type),
        ];
        for (map, table) in tables {
            if table.len() > map.capacity() as usize {
                return Err(EnforceError::MapFull {
                    map: map.name(),
                    needed: table.len(),
                    capacity: map.capacity(),
                });
            }
        }
        Ok(())
    }

    fn read_contents(&self) -> Result<Contents, EnforceError> {
        let policy = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        let mut configs = BTreeMap::new();
        for slot in slots_of(&policy.active) {
            configs.insert(slot, self.configs.get(slot)?);
        }
        Ok(Contents {
            slots: policy.active,
            policy,
            configs,
            src4_exact: self.src4_exact.read()?,
            src6_exact: self.src6_exact.read()?,
            src4_lpm: self.src4_lpm.read()?,
            src6_lpm: self.src6_lpm.read()?,
            dst4: self.dst4.read()?,
            dst6: self.dst6.read()?,
            proto: self.proto.read()?,
            sport: self.sport.read()?,
            dport: self.dport.read()?,
            icmp_type: self.icmp_type.read()?,
        })
    }

    /// Writes the differences; returns the report and the final policy.
    fn write(
        &mut self,
        want: &Contents,
        have: &Contents,
    ) -> Result<(ApplyReport, Policy), EnforceError> {
        let diffs = [
            diff(&want.src4_exact, &have.src4_exact),
            diff(&want.src6_exact, &have.src6_exact),
            diff(&want.src4_lpm, &have.src4_lpm),
            diff(&want.src6_lpm, &have.src6_lpm),
            diff(&want.dst4, &have.dst4),
            diff(&want.dst6, &have.dst6),
            diff(&want.sport, &have.sport),
            diff(&want.dport, &have.dport),
            diff(&want.icmp_type, &have.icmp_type),
        ];
        let proto_want: HashMap<u8, SlotMask> = want.proto.iter().map(|(k, v)| (*k, *v)).collect();
        let proto_have: HashMap<u8, SlotMask> = have.proto.iter().map(|(k, v)| (*k, *v)).collect();
        let proto_diff = diff(&proto_want, &proto_have);
        let touched = diffs
            .iter()
            .fold(proto_diff.touched, |acc, d| acc.or(&d.touched))
            .or(&policy_touched(&want.policy, &have.policy));

        let active_now = have.policy.active;
        let changed = touched.and(&active_now);
        // Still active during the writes: active before, wanted after, untouched.
        let keep = active_now.and(&want.slots).and(&not(&changed));
        let mut report = ApplyReport::default();
        // Flags of the exempt list are not the slots' business: keep them.
        let flags = (want.policy.flags & !flags::EXEMPT) | (have.policy.flags & flags::EXEMPT);
        let mut step = Policy {
            active: keep,
            flags,
            ..want.policy
        };
        let mut written = have.policy;
        if step != written {
            self.set_policy(&step)?;
            written = step;
        }
        let maps: [&mut dyn PrefixMap<SlotMask>; 9] = [
            &mut self.src4_exact,
            &mut self.src6_exact,
            &mut self.src4_lpm,
            &mut self.src6_lpm,
            &mut self.dst4,
            &mut self.dst6,
            &mut self.sport,
            &mut self.dport,
            &mut self.icmp_type,
        ];
        for (map, d) in maps.into_iter().zip(&diffs) {
            for (p, m) in &d.upserts {
                map.upsert(*p, *m)?;
            }
            for p in &d.deletes {
                map.delete(*p)?;
            }
            report.writes += d.upserts.len() + d.deletes.len();
        }
        for (p, m) in &proto_diff.upserts {
            self.proto.set(*p, *m)?;
        }
        for p in &proto_diff.deletes {
            self.proto.set(*p, SlotMask::EMPTY)?;
        }
        report.writes += proto_diff.upserts.len() + proto_diff.deletes.len();

        let activating = want.slots.and(&not(&keep));
        for slot in slots_of(&activating) {
            self.counters.reset(u32::from(slot))?;
            self.buckets.set(slot, Bucket::default())?;
        }
        // Configurations of slots about to start, and new expiries of slots
        // that go on enforcing.
        for (&slot, config) in &want.configs {
            if activating.contains(usize::from(slot)) || have.configs.get(&slot) != Some(config) {
                self.configs.set(slot, *config)?;
                report.writes += 1;
            }
        }
        step.active = want.slots;
        if step != written {
            self.set_policy(&step)?;
        }
        report.activated = slots_of(&activating);
        report.deactivated = slots_of(&active_now.and(&not(&keep)));
        Ok((report, step))
    }

    fn set_policy(&mut self, p: &Policy) -> Result<(), EnforceError> {
        self.policy
            .set(0, p, 0)
            .map_err(EnforceError::map(names::POLICY))
    }

    /// Slots currently enforced, as the kernel sees them.
    pub fn active_slots(&self) -> Result<Vec<SlotId>, EnforceError> {
        let p = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        Ok(slots_of(&p.active))
    }

    /// Sets the prefixes that are never dropped, whatever a slot says.
    pub fn set_exempt(&mut self, prefixes: &[IpNet]) -> Result<(), EnforceError> {
        if prefixes.len() > MAX_EXEMPT_PREFIXES as usize {
            return Err(EnforceError::MapFull {
                map: names::EXEMPT4,
                needed: prefixes.len(),
                capacity: MAX_EXEMPT_PREFIXES,
            });
        }
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) =
            prefixes.iter().partition(|p| matches!(p, IpNet::V4(_)));
        // Entries first, then the flags that make the program look at them.
        sync_exempt(&mut self.exempt4, &v4)?;
        sync_exempt(&mut self.exempt6, &v6)?;
        let mut policy = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        let mut exempt = 0;
        if !v4.is_empty() {
            exempt |= flags::EXEMPT4;
        }
        if !v6.is_empty() {
            exempt |= flags::EXEMPT6;
        }
        if policy.flags & flags::EXEMPT != exempt {
            policy.flags = (policy.flags & !flags::EXEMPT) | exempt;
            self.set_policy(&policy)?;
            if let Some(m) = &mut self.mirror {
                m.policy.flags = policy.flags;
            }
        }
        Ok(())
    }
}

fn sync_exempt<C: Codec>(map: &mut Lpm<C, u8>, prefixes: &[&IpNet]) -> Result<(), EnforceError> {
    let want: HashMap<Prefix, u8> = prefixes
        .iter()
        .map(|p| {
            let bits = match p.network() {
                std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
                std::net::IpAddr::V6(a) => u128::from(a),
            };
            (
                Prefix {
                    bits,
                    len: p.prefix_len(),
                },
                1u8,
            )
        })
        .collect();
    let have = map.read()?;
    for (p, v) in &want {
        if have.get(p) != Some(v) {
            map.upsert(*p, *v)?;
        }
    }
    for p in have.keys().filter(|p| !want.contains_key(p)) {
        map.delete(*p)?;
    }
    Ok(())
}

fn not(m: &SlotMask) -> SlotMask {
    SlotMask {
        bits: m.bits.map(|w| !w),
    }
}

fn slots_of(m: &SlotMask) -> Vec<SlotId> {
    (0..dots_common::MAX_SLOTS)
        .filter(|s| m.contains(*s))
        .map(|s| s as SlotId)
        .collect()
}
