//! The idempotent apply step: make the maps hold exactly a desired set of
//! slots, writing only what differs, and never let a packet see a
//! half-installed slot.
//!
//! Two ways to the same maps. Normally the maps are known to hold what the
//! model holds, and a change writes only the entries it changes
//! ([`Model::take_changes`]): the cost follows the change, not the number
//! of slots or prefixes installed. After opening (a restart) or an error,
//! the maps are read back and compared entry by entry with the model's full
//! content instead; afterwards they are in sync again.

use std::collections::{BTreeMap, HashMap};

use dots_common::{flags, names, Bucket, Policy, SlotMask, MAX_EXEMPT_PREFIXES};
use ipnet::IpNet;

use super::Dataplane;
use crate::enforce::{
    maps::{Codec, Lpm, PrefixMap},
    plan::{
        diff, lengths_union, policy_touched, slot_config, slots_in, xor, ArrayId, Changes,
        Contents, Model, Prefix, SlotValue, TableId,
    },
    spec::{Slot, SlotId},
    EnforceError,
};

/// A change to the slots the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotChange {
    /// Slots that stop enforcing.
    pub remove: Vec<SlotId>,
    /// Slots that start enforcing (an id already held is replaced).
    pub add: Vec<(SlotId, Slot)>,
    /// New expiries of slots that go on enforcing.
    pub renew: Vec<(SlotId, u64)>,
}

impl SlotChange {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty() && self.renew.is_empty()
    }
}

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
        let result = if self.in_sync {
            self.apply_changes(desired)
        } else {
            self.reconcile(desired)
        };
        if result.is_err() {
            // What the maps hold is not known any more: read them back next time.
            self.in_sync = false;
        }
        result
    }

    /// The normal path: the slots that differ from the model, as a change.
    fn apply_changes(
        &mut self,
        desired: &BTreeMap<SlotId, Slot>,
    ) -> Result<ApplyReport, EnforceError> {
        let mut change = SlotChange::default();
        for (&id, held) in self.model.slots() {
            match desired.get(&id) {
                Some(want) if want.spec == held.spec => {
                    if want.expires_ns != held.expires_ns {
                        change.renew.push((id, want.expires_ns));
                    }
                }
                _ => change.remove.push(id),
            }
        }
        for (&id, want) in desired {
            if self
                .model
                .slot(id)
                .is_none_or(|held| held.spec != want.spec)
            {
                change.add.push((id, want.clone()));
            }
        }
        self.apply_change(&change)
    }

    /// Whether the maps are known to hold what the model holds, so that
    /// [`Dataplane::apply_change`] can be used.
    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// Applies `change` to the slots the maps hold, writing only the entries
    /// it changes: its cost follows the change, not the slots or prefixes
    /// installed. Same guarantees as [`Dataplane::apply`]; the maps must be
    /// in sync ([`Dataplane::in_sync`]), else use `apply` with the whole set.
    pub fn apply_change(&mut self, change: &SlotChange) -> Result<ApplyReport, EnforceError> {
        if !self.in_sync {
            return Err(EnforceError::Load(
                "the maps are not in sync with the slot table: apply the whole table".into(),
            ));
        }
        for (id, slot) in &change.add {
            slot.spec.check(*id, &self.limits)?;
        }
        let result = self.write_change(change);
        if result.is_err() {
            self.in_sync = false;
        }
        result
    }

    fn write_change(&mut self, change: &SlotChange) -> Result<ApplyReport, EnforceError> {
        if change.is_empty() {
            return Ok(ApplyReport::default());
        }
        // A slot that is replaced (same id, new spec) goes first.
        let mut removed: Vec<(SlotId, Slot)> = Vec::new();
        let readded: Vec<SlotId> = change
            .add
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.model.slot(*id).is_some())
            .collect();
        for id in change.remove.iter().chain(&readded) {
            if let Some(slot) = self.model.remove(*id) {
                removed.push((*id, slot));
            }
        }
        let added: Vec<SlotId> = change.add.iter().map(|(id, _)| *id).collect();
        for (id, slot) in &change.add {
            self.model.add(*id, slot);
        }
        let renewed: Vec<(SlotId, u64)> = change
            .renew
            .iter()
            .filter(|(id, _)| self.model.slot(*id).is_some() && !added.contains(id))
            .copied()
            .collect();
        for (id, expires) in &renewed {
            self.model.set_expiry(*id, *expires);
        }
        if let Err(e) = self.check_capacity() {
            // Put the model back as it was: nothing is written.
            for id in &added {
                self.model.remove(*id);
            }
            for (id, slot) in &removed {
                self.model.add(*id, slot);
            }
            self.model.take_changes();
            return Err(e);
        }
        let after = self.model.policy();
        let changes = self.model.take_changes();
        let mut report = ApplyReport::default();

        // 1. Slots that go or change stop matching first.
        let mut leaving = SlotMask::EMPTY;
        for (id, _) in &removed {
            leaving.set(usize::from(*id));
        }
        let active_before = self.written.active;
        let keep = active_before.and(&not(&leaving));
        // Entries of both the old and the new state may be in the maps
        // meanwhile: probe the lengths of both, check exemptions of both.
        let transition = Policy {
            active: keep,
            flags: self.exempt_flags(self.written.flags | after.flags),
            src4: lengths_union(&self.written.src4, &after.src4, 32),
            src6: lengths_union(&self.written.src6, &after.src6, 128),
            ..after
        };
        self.write_policy(&transition)?;

        // 2. The entries.
        report.writes += self.write_changes(&changes)?;

        // 3. Configurations: new slots (counters and buckets from zero),
        // and new expiries of slots that go on.
        for id in &added {
            self.counters.reset(u32::from(*id))?;
            self.buckets.set(*id, Bucket::default())?;
        }
        for id in added.iter().chain(renewed.iter().map(|(id, _)| id)) {
            if let Some(slot) = self.model.slot(*id) {
                self.configs.set(*id, slot_config(slot))?;
                report.writes += 1;
            }
        }

        // 4. Every slot of `desired` matches.
        let last = Policy {
            active: self.model.slot_mask(),
            flags: self.exempt_flags(after.flags),
            ..after
        };
        self.write_policy(&last)?;
        report.activated = added;
        report.deactivated = removed.into_iter().map(|(id, _)| id).collect();
        report.activated.sort();
        Ok(report)
    }

    /// Writes the entries `changes` names, with the model's values.
    fn write_changes(&mut self, changes: &Changes) -> Result<usize, EnforceError> {
        let mut writes = 0;
        for (table, p) in &changes.entries {
            let present = self.model.table(*table).contains(p);
            writes += 1;
            match table {
                TableId::Src4 | TableId::Src6 => {
                    let short = p.len < self.model.table(*table).width();
                    let (hash, trie): (&mut dyn PrefixMap<_>, &mut dyn PrefixMap<_>) =
                        if *table == TableId::Src4 {
                            (&mut self.src4, &mut self.src4_lpm)
                        } else {
                            (&mut self.src6, &mut self.src6_lpm)
                        };
                    if present {
                        let e = self.model.source_entry(*table, p);
                        hash.upsert(*p, e)?;
                        if short {
                            trie.upsert(*p, e)?;
                        }
                    } else {
                        hash.delete(*p)?;
                        if short {
                            trie.delete(*p)?;
                        }
                    }
                }
                TableId::Dst4 | TableId::Dst6 => {
                    let map: &mut dyn PrefixMap<SlotMask> = if *table == TableId::Dst4 {
                        &mut self.dst4
                    } else {
                        &mut self.dst6
                    };
                    if present {
                        map.upsert(*p, self.model.mask_entry(*table, p))?;
                    } else {
                        map.delete(*p)?;
                    }
                }
            }
        }
        for &(a, lo, hi) in &changes.arrays {
            let values = self.model.array(a);
            let Some(values) = values.get(lo..=hi) else {
                continue;
            };
            self.arrays[a as usize].write(lo, values)?;
            writes += values.len();
        }
        Ok(writes)
    }

    fn check_capacity(&self) -> Result<(), EnforceError> {
        let src = |t: TableId| {
            let table = self.model.table(t);
            (
                table.len(),
                table.len() - table.count_of_length(table.width()),
            )
        };
        let (src4, src4_short) = src(TableId::Src4);
        let (src6, src6_short) = src(TableId::Src6);
        let n = |t: TableId| self.model.table(t).len();
        let tables: [(&'static str, usize, u32); 6] = [
            (self.src4.name(), src4, self.src4.capacity()),
            (self.src6.name(), src6, self.src6.capacity()),
            (self.src4_lpm.name(), src4_short, self.src4_lpm.capacity()),
            (self.src6_lpm.name(), src6_short, self.src6_lpm.capacity()),
            (self.dst4.name(), n(TableId::Dst4), self.dst4.capacity()),
            (self.dst6.name(), n(TableId::Dst6), self.dst6.capacity()),
        ];
        for (map, needed, capacity) in tables {
            if needed > capacity as usize {
                return Err(EnforceError::MapFull {
                    map,
                    needed,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// The exempt bits of `slot_flags`, kept only where the exempt tries
    /// hold something.
    fn exempt_flags(&self, slot_flags: u64) -> u64 {
        slot_flags & flags::EXEMPT & self.exempt_present
    }

    fn write_policy(&mut self, p: &Policy) -> Result<(), EnforceError> {
        if *p != self.written {
            self.policy
                .set(0, p, 0)
                .map_err(EnforceError::map(names::POLICY))?;
            self.written = *p;
        }
        Ok(())
    }

    /// The slow path: read what the maps hold and write the differences
    /// from the full content of `desired`.
    fn reconcile(&mut self, desired: &BTreeMap<SlotId, Slot>) -> Result<ApplyReport, EnforceError> {
        let exempt = self.model.exempt().to_vec();
        let previous = std::mem::replace(&mut self.model, Model::build(desired, &exempt));
        if let Err(e) = self.check_capacity() {
            self.model = previous;
            return Err(e);
        }
        let want = self.model.contents();
        let have = self.read_contents()?;
        self.written = have.policy;
        let report = self.write(&want, &have)?;
        self.in_sync = true;
        Ok(report)
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
        let mut arrays: [Vec<SlotMask>; 4] = Default::default();
        for a in ArrayId::ALL {
            arrays[a as usize] = self.arrays[a as usize].read()?;
        }
        Ok(Contents {
            slots: policy.active,
            policy,
            configs,
            src4: self.src4.read()?,
            src6: self.src6.read()?,
            src4_lpm: self.src4_lpm.read()?,
            src6_lpm: self.src6_lpm.read()?,
            dst4: self.dst4.read()?,
            dst6: self.dst6.read()?,
            arrays,
        })
    }

    /// Writes the differences between two full contents.
    fn write(&mut self, want: &Contents, have: &Contents) -> Result<ApplyReport, EnforceError> {
        let src = [
            diff(&want.src4, &have.src4),
            diff(&want.src6, &have.src6),
            diff(&want.src4_lpm, &have.src4_lpm),
            diff(&want.src6_lpm, &have.src6_lpm),
        ];
        let masks = [diff(&want.dst4, &have.dst4), diff(&want.dst6, &have.dst6)];
        // Indices of the value arrays that differ, and the slots they concern.
        let mut array_writes: Vec<(usize, usize, SlotMask)> = Vec::new();
        let mut touched = policy_touched(&want.policy, &have.policy);
        for (a, (w, h)) in want.arrays.iter().zip(&have.arrays).enumerate() {
            for (i, (wv, hv)) in w.iter().zip(h).enumerate() {
                if wv != hv {
                    touched = touched.or(&xor(wv, hv));
                    array_writes.push((a, i, *wv));
                }
            }
        }
        let touched = src
            .iter()
            .map(|d| d.touched)
            .chain(masks.iter().map(|d| d.touched))
            .fold(touched, |acc, t| acc.or(&t));

        let active_now = have.policy.active;
        let changed = touched.and(&active_now);
        // Still active during the writes: active before, wanted after, untouched.
        let keep = active_now.and(&want.slots).and(&not(&changed));
        let mut report = ApplyReport::default();
        let transition = Policy {
            active: keep,
            flags: self.exempt_flags(want.policy.flags | have.policy.flags),
            src4: lengths_union(&want.policy.src4, &have.policy.src4, 32),
            src6: lengths_union(&want.policy.src6, &have.policy.src6, 128),
            ..want.policy
        };
        self.write_policy(&transition)?;
        let src_maps: [&mut dyn PrefixMap<_>; 4] = [
            &mut self.src4,
            &mut self.src6,
            &mut self.src4_lpm,
            &mut self.src6_lpm,
        ];
        for (map, d) in src_maps.into_iter().zip(&src) {
            report.writes += write_diff(map, d)?;
        }
        let mask_maps: [&mut dyn PrefixMap<SlotMask>; 2] = [&mut self.dst4, &mut self.dst6];
        for (map, d) in mask_maps.into_iter().zip(&masks) {
            report.writes += write_diff(map, d)?;
        }
        for (a, array) in self.arrays.iter_mut().enumerate() {
            let writes: Vec<(usize, SlotMask)> = array_writes
                .iter()
                .filter(|w| w.0 == a)
                .map(|w| (w.1, w.2))
                .collect();
            array.write_each(&writes)?;
        }
        report.writes += array_writes.len();

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
        let last = Policy {
            active: want.slots,
            flags: self.exempt_flags(want.policy.flags),
            ..want.policy
        };
        self.write_policy(&last)?;
        report.activated = slots_of(&activating);
        report.deactivated = slots_of(&active_now.and(&not(&keep)));
        Ok(report)
    }

    /// Slots currently enforced, as the kernel sees them.
    pub fn active_slots(&self) -> Result<Vec<SlotId>, EnforceError> {
        let p = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        Ok(slots_of(&p.active))
    }

    /// Sets the prefixes that are never dropped, whatever a slot says. The
    /// program looks them up only when a slot's sources or targets overlap
    /// one of them: otherwise no packet a slot matches can be exempt.
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
        self.exempt_present = 0;
        if !v4.is_empty() {
            self.exempt_present |= flags::EXEMPT4;
        }
        if !v6.is_empty() {
            self.exempt_present |= flags::EXEMPT6;
        }
        self.model.set_exempt(prefixes);
        if self.in_sync {
            let p = Policy {
                flags: (self.written.flags & !flags::EXEMPT)
                    | self.exempt_flags(self.model.policy().flags),
                ..self.written
            };
            self.write_policy(&p)?;
        }
        Ok(())
    }
}

fn write_diff<V: SlotValue>(
    map: &mut dyn PrefixMap<V>,
    d: &crate::enforce::plan::Diff<Prefix, V>,
) -> Result<usize, EnforceError> {
    for (p, v) in &d.upserts {
        map.upsert(*p, *v)?;
    }
    for p in &d.deletes {
        map.delete(*p)?;
    }
    Ok(d.upserts.len() + d.deletes.len())
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
    slots_in(m).map(|s| s as SlotId).collect()
}
