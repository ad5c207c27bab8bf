//! From validated mitigations to classifier slots.
//!
//! Every mitigation (peer, cuid, mid) holds one slot. The table below is the
//! desired state; each change re-applies the whole table to the data plane,
//! whose apply step is idempotent and writes only differences (desired
//! state, then reconcile: see docs/architecture.md). An update takes a fresh slot and frees the old one in the
//! same apply, carrying the counters over, so totals never go backwards.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use dots_common::MAX_SLOTS;
use dots_proto::{model::ValidatedRequest, signal::Counters};
use ipnet::IpNet;

use crate::enforce::{Dataplane, EnforceError, Range, RateMeter, SlotCounters, SlotId, SlotSpec};

/// Which mitigation a slot serves. `peer` keeps equal cuids of different
/// upstream peers apart.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SlotKey {
    pub peer: usize,
    pub cuid: String,
    pub mid: u32,
}

/// One line of the slot table in the state file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotRecord {
    pub key: SlotKey,
    pub slot: SlotId,
    pub spec: SlotSpec,
    pub carried_packets: u64,
    pub carried_bytes: u64,
}

struct Entry {
    slot: SlotId,
    spec: SlotSpec,
    /// Counters of earlier slots of the same mitigation (after updates).
    carried: SlotCounters,
    meter: RateMeter,
}

/// The slot table and the data plane it drives.
pub struct SlotTable {
    dp: Dataplane,
    entries: BTreeMap<SlotKey, Entry>,
    /// Where the search for a free slot starts: slots are handed out round
    /// robin, so a freed slot is reused as late as possible.
    next: usize,
    exempt: BTreeSet<IpNet>,
}

/// The classifier's view of a validated request.
pub fn slot_spec(req: &ValidatedRequest) -> SlotSpec {
    let s = &req.scope;
    SlotSpec {
        sources: s.source_prefix.clone(),
        source_ports: s
            .source_port_range
            .iter()
            .map(|r| Range::new(r.lower, r.upper.unwrap_or(r.lower)))
            .collect(),
        icmp_types: s
            .source_icmp_type_range
            .iter()
            .map(|r| Range::new(r.lower, r.upper.unwrap_or(r.lower)))
            .collect(),
        targets: s.target_prefix.clone(),
        protocols: s.target_protocol.clone(),
        target_ports: s
            .target_port_range
            .iter()
            .map(|r| Range::new(r.lower, r.upper.unwrap_or(r.lower)))
            .collect(),
    }
}

impl SlotTable {
    pub fn new(dp: Dataplane) -> SlotTable {
        SlotTable {
            dp,
            entries: BTreeMap::new(),
            next: 0,
            exempt: BTreeSet::new(),
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    fn desired(&self) -> BTreeMap<SlotId, SlotSpec> {
        self.entries
            .values()
            .map(|e| (e.slot, e.spec.clone()))
            .collect()
    }

    fn free_slot(&mut self) -> Option<SlotId> {
        let used: Vec<SlotId> = self.entries.values().map(|e| e.slot).collect();
        for i in 0..MAX_SLOTS {
            let candidate = ((self.next + i) % MAX_SLOTS) as SlotId;
            if !used.contains(&candidate) {
                self.next = usize::from(candidate) + 1;
                return Some(candidate);
            }
        }
        None
    }

    /// Installs or updates the mitigation `key`. On error nothing changes.
    pub fn install(&mut self, key: &SlotKey, spec: SlotSpec) -> Result<SlotId, EnforceError> {
        if self.entries.get(key).is_some_and(|e| e.spec == spec) {
            return Ok(self.entries[key].slot);
        }
        let slot = self.free_slot().ok_or(EnforceError::InvalidSlot {
            slot: MAX_SLOTS as SlotId,
            reason: format!("all {MAX_SLOTS} slots are in use"),
        })?;
        let old = self.entries.remove(key);
        let carried = match &old {
            Some(e) => add(e.carried, self.dp.counters(e.slot).unwrap_or_default()),
            None => SlotCounters::default(),
        };
        let meter = old.as_ref().map(|e| e.meter.clone()).unwrap_or_default();
        self.entries.insert(
            key.clone(),
            Entry {
                slot,
                spec,
                carried,
                meter,
            },
        );
        if let Err(e) = self.dp.apply(&self.desired()) {
            self.entries.remove(key);
            if let Some(old) = old {
                self.entries.insert(key.clone(), old);
            }
            return Err(e);
        }
        Ok(slot)
    }

    /// Removes the mitigation `key` and returns its final counters.
    pub fn remove(&mut self, key: &SlotKey) -> Result<Option<SlotCounters>, EnforceError> {
        let Some(e) = self.entries.remove(key) else {
            return Ok(None);
        };
        let last = add(e.carried, self.dp.counters(e.slot).unwrap_or_default());
        if let Err(err) = self.dp.apply(&self.desired()) {
            self.entries.insert(key.clone(), e);
            return Err(err);
        }
        Ok(Some(last))
    }

    /// Totals and rates of `key`.
    pub fn counters(&mut self, key: &SlotKey, now: Instant) -> Option<Counters> {
        let e = self.entries.get_mut(key)?;
        let total = add(e.carried, self.dp.counters(e.slot).ok()?);
        let rates = e.meter.sample(now, total);
        Some(Counters {
            pkts: total.packets,
            bytes: total.bytes,
            pps: rates.pps,
            bps: rates.bps,
        })
    }

    /// The table, for the state file: a restarted agent re-adopts the same
    /// slots, so the pinned maps need no change and drops never stop.
    pub fn export(&self) -> Vec<SlotRecord> {
        self.entries
            .iter()
            .map(|(k, e)| SlotRecord {
                key: k.clone(),
                slot: e.slot,
                spec: e.spec.clone(),
                carried_packets: e.carried.packets,
                carried_bytes: e.carried.bytes,
            })
            .collect()
    }

    /// Re-adopts a table written by [`SlotTable::export`] and applies it.
    /// Against the maps a previous run pinned this writes nothing; invalid
    /// records (slot out of range, duplicate slot) are skipped and reported.
    pub fn import(&mut self, records: Vec<SlotRecord>) -> Result<Vec<String>, EnforceError> {
        let mut skipped = Vec::new();
        for r in records {
            let taken = self.entries.values().any(|e| e.slot == r.slot);
            if usize::from(r.slot) >= MAX_SLOTS || taken {
                skipped.push(format!("{:?}: slot {} unusable", r.key, r.slot));
                continue;
            }
            let carried = SlotCounters {
                packets: r.carried_packets,
                bytes: r.carried_bytes,
            };
            self.entries.insert(
                r.key,
                Entry {
                    slot: r.slot,
                    spec: r.spec,
                    carried,
                    meter: RateMeter::default(),
                },
            );
        }
        self.next = self
            .entries
            .values()
            .map(|e| usize::from(e.slot) + 1)
            .max()
            .unwrap_or(0);
        self.dp.apply(&self.desired())?;
        Ok(skipped)
    }

    /// Drops the entries of `peer` whose keys are not in `keep` (mitigations
    /// that expired while the agent was down).
    pub fn retain_peer(&mut self, peer: usize, keep: &[SlotKey]) -> Result<(), EnforceError> {
        let before = self.entries.len();
        self.entries
            .retain(|k, _| k.peer != peer || keep.contains(k));
        if self.entries.len() != before {
            self.dp.apply(&self.desired())?;
        }
        Ok(())
    }

    /// The slot of `key`, if installed.
    pub fn slot_of(&self, key: &SlotKey) -> Option<SlotId> {
        self.entries.get(key).map(|e| e.slot)
    }

    /// Never drop traffic from or to these prefixes (operator's list).
    pub fn set_never_block(&mut self, prefixes: &[IpNet]) -> Result<(), EnforceError> {
        self.exempt.extend(prefixes.iter().copied());
        self.dp
            .set_exempt(&self.exempt.iter().copied().collect::<Vec<_>>())
    }

    /// Adds the addresses of a peer the agent dials: the agent never cuts
    /// its own signal channel.
    pub fn add_exempt(&mut self, addrs: &[IpAddr]) -> Result<(), EnforceError> {
        let before = self.exempt.len();
        self.exempt.extend(addrs.iter().map(|a| IpNet::from(*a)));
        if self.exempt.len() == before {
            return Ok(());
        }
        self.dp
            .set_exempt(&self.exempt.iter().copied().collect::<Vec<_>>())
    }
}

fn add(a: SlotCounters, b: SlotCounters) -> SlotCounters {
    SlotCounters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}
