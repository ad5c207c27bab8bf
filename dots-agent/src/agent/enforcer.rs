//! From validated mitigations to classifier slots.
//!
//! Every mitigation (peer, cuid, mid) holds one slot. The table below is the
//! desired state; each change is handed to the data plane as a change of a
//! few slots ([`SlotChange`]), which writes only the map entries it changes,
//! so its cost does not grow with the mitigations installed. After a data
//! plane error, the next change re-applies the whole table (read back and
//! reconciled: see docs/architecture.md). An update takes a fresh slot and
//! frees the old one in the same change, carrying the counters over, so
//! totals never go backwards.
//!
//! Every slot carries its expiry into the kernel, where the XDP program
//! ignores it from then on: a block ends with its lifetime even if the agent
//! is killed. A renewed lifetime moves the expiry. An indefinite lifetime is
//! held in the kernel for `indefinite_cap` at a time and moved forward by
//! [`SlotTable::refresh_indefinite`] while the agent runs, so it lasts as
//! long as the agent and ends within the cap after the agent dies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use dots_common::MAX_SLOTS;
use dots_proto::{model::ValidatedRequest, signal::Counters};
use ipnet::IpNet;

use crate::enforce::{
    clock, counters::sum, Dataplane, EnforceError, Range, RateMeter, Slot, SlotAction, SlotChange,
    SlotCounters, SlotId, SlotSpec,
};

/// Default of `[xdp] indefinite-cap`: how long an indefinite mitigation
/// stays in force in the kernel without the agent renewing it.
pub const DEFAULT_INDEFINITE_CAP: Duration = Duration::from_secs(600);

/// How long a mitigation lasts, as the signal layer granted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Ends at this instant (renewals move it).
    Until(Instant),
    /// Lifetime -1: held for the cap at a time while the agent runs.
    Indefinite,
}

impl Lifetime {
    /// From the signal layer's expiry (`None` is indefinite).
    pub fn from_expiry(expires: Option<Instant>) -> Lifetime {
        expires.map_or(Lifetime::Indefinite, Lifetime::Until)
    }
}

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
    pub spec: Arc<SlotSpec>,
    pub carried_packets: u64,
    pub carried_bytes: u64,
}

struct Entry {
    slot: SlotId,
    /// Shared with the data plane's model and the state file's record.
    spec: Arc<SlotSpec>,
    /// `None` for a slot re-adopted from the previous run whose mitigation
    /// is not restored yet: it keeps the expiry the kernel holds.
    lifetime: Option<Lifetime>,
    /// The expiry written to the kernel (`CLOCK_BOOTTIME` ns).
    expires_ns: u64,
    /// Counters of earlier slots of the same mitigation (after updates).
    carried: SlotCounters,
    meter: RateMeter,
    /// Grows when the persisted part (slot, spec, carried) changes.
    version: u64,
}

/// The slot table and the data plane it drives.
pub struct SlotTable {
    dp: Dataplane,
    entries: BTreeMap<SlotKey, Entry>,
    /// Where the search for a free slot starts: slots are handed out round
    /// robin, so a freed slot is reused as late as possible.
    next: usize,
    exempt: BTreeSet<IpNet>,
    indefinite_cap: Duration,
    /// Source of [`Entry::version`].
    versions: u64,
}

/// The classifier's view of a validated request, doing `action` with what
/// it matches (the local policy, or monitor mode).
pub fn slot_spec(req: &ValidatedRequest, action: SlotAction) -> SlotSpec {
    let s = &req.scope;
    SlotSpec {
        action,
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
    /// A table driving `dp`; indefinite lifetimes are held in the kernel for
    /// `indefinite_cap` at a time.
    pub fn new(dp: Dataplane, indefinite_cap: Duration) -> SlotTable {
        SlotTable {
            dp,
            entries: BTreeMap::new(),
            next: 0,
            exempt: BTreeSet::new(),
            indefinite_cap,
            versions: 0,
        }
    }

    /// Hands `change` to the data plane; the whole table instead when the
    /// maps are not known to be in sync (after an error).
    fn commit(&mut self, change: SlotChange) -> Result<(), EnforceError> {
        if self.dp.in_sync() {
            self.dp.apply_change(&change)?;
        } else {
            self.dp.apply(&self.desired())?;
        }
        Ok(())
    }

    fn next_version(&mut self) -> u64 {
        self.versions += 1;
        self.versions
    }

    /// The kernel expiry for `lifetime`, counted from now.
    fn expiry_ns(&self, lifetime: Lifetime) -> u64 {
        match lifetime {
            Lifetime::Until(t) => clock::boot_ns_at(t),
            Lifetime::Indefinite => clock::boot_ns_after(self.indefinite_cap),
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    fn desired(&self) -> BTreeMap<SlotId, Slot> {
        self.entries
            .values()
            .map(|e| (e.slot, Slot::new(e.spec.clone(), e.expires_ns)))
            .collect()
    }

    fn free_slot(&mut self) -> Option<SlotId> {
        let mut used = dots_common::SlotMask::EMPTY;
        for e in self.entries.values() {
            used.set(usize::from(e.slot));
        }
        for i in 0..MAX_SLOTS {
            let candidate = ((self.next + i) % MAX_SLOTS) as SlotId;
            if !used.contains(usize::from(candidate)) {
                self.next = usize::from(candidate) + 1;
                return Some(candidate);
            }
        }
        None
    }

    /// Installs or updates the mitigation `key`, in force for `lifetime`
    /// (`None`: the lifetime it has, or the indefinite cap until
    /// [`SlotTable::set_lifetime`] says). The same scope again only moves the
    /// expiry. On error nothing changes.
    pub fn install(
        &mut self,
        key: &SlotKey,
        spec: SlotSpec,
        lifetime: Option<Lifetime>,
    ) -> Result<SlotId, EnforceError> {
        let spec = Arc::new(spec);
        let known = self.entries.get(key).and_then(|e| e.lifetime);
        let lifetime = lifetime.or(known).unwrap_or(Lifetime::Indefinite);
        if let Some(slot) = self
            .entries
            .get(key)
            .filter(|e| e.spec == spec)
            .map(|e| e.slot)
        {
            self.set_lifetime(key, lifetime)?;
            return Ok(slot);
        }
        let slot = self.free_slot().ok_or(EnforceError::InvalidSlot {
            slot: MAX_SLOTS as SlotId,
            reason: format!("all {MAX_SLOTS} slots are in use"),
        })?;
        let old = self.entries.remove(key);
        let carried = match &old {
            Some(e) => sum(&e.carried, &self.dp.counters(e.slot).unwrap_or_default()),
            None => SlotCounters::default(),
        };
        let meter = old.as_ref().map(|e| e.meter.clone()).unwrap_or_default();
        let expires_ns = self.expiry_ns(lifetime);
        let change = SlotChange {
            remove: old.iter().map(|e| e.slot).collect(),
            add: vec![(slot, Slot::new(spec.clone(), expires_ns))],
            renew: Vec::new(),
        };
        let version = self.next_version();
        self.entries.insert(
            key.clone(),
            Entry {
                slot,
                spec,
                lifetime: Some(lifetime),
                expires_ns,
                carried,
                meter,
                version,
            },
        );
        if let Err(e) = self.commit(change) {
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
        let last = sum(&e.carried, &self.dp.counters(e.slot).unwrap_or_default());
        let change = SlotChange {
            remove: vec![e.slot],
            ..SlotChange::default()
        };
        if let Err(err) = self.commit(change) {
            self.entries.insert(key.clone(), e);
            return Err(err);
        }
        Ok(Some(last))
    }

    /// Totals and rates of `key`.
    pub fn counters(&mut self, key: &SlotKey, now: Instant) -> Option<Counters> {
        let e = self.entries.get_mut(key)?;
        let total = sum(&e.carried, &self.dp.counters(e.slot).ok()?);
        let rates = e.meter.sample(now, total);
        Some(Counters {
            pkts: total.packets,
            bytes: total.bytes,
            pps: rates.pps,
            bps: rates.bps,
        })
    }

    /// Every counter of `key` (dropped, and matched but passed), with the
    /// slot's action.
    pub fn slot_counters(&self, key: &SlotKey) -> Option<(SlotAction, SlotCounters)> {
        let e = self.entries.get(key)?;
        let c = sum(&e.carried, &self.dp.counters(e.slot).ok()?);
        Some((e.spec.action, c))
    }

    /// The mitigations of `peer` holding a slot.
    pub fn keys_of(&self, peer: usize) -> Vec<SlotKey> {
        self.entries
            .keys()
            .filter(|k| k.peer == peer)
            .cloned()
            .collect()
    }

    /// Every mitigation holding a slot.
    pub fn keys(&self) -> Vec<SlotKey> {
        self.entries.keys().cloned().collect()
    }

    /// The record of `key` for the state directory: a restarted agent
    /// re-adopts the same slots, so the pinned maps need no change and drops
    /// never stop.
    pub fn record(&self, key: &SlotKey) -> Option<SlotRecord> {
        self.entries.get(key).map(|e| SlotRecord {
            key: key.clone(),
            slot: e.slot,
            spec: e.spec.clone(),
            carried_packets: e.carried.packets,
            carried_bytes: e.carried.bytes,
        })
    }

    /// Grows whenever `key`'s [`SlotTable::record`] changes (0: no entry).
    pub fn record_version(&self, key: &SlotKey) -> u64 {
        self.entries.get(key).map_or(0, |e| e.version)
    }

    /// Re-adopts the records of an earlier run ([`SlotTable::record`]) and
    /// applies the whole table.
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
                ..Default::default()
            };
            // Until the mitigation is restored, the slot ends when the
            // kernel says (0, never enforcing, after a reboot).
            let expires_ns = self.dp.expiry(r.slot)?;
            let version = self.next_version();
            self.entries.insert(
                r.key,
                Entry {
                    slot: r.slot,
                    spec: r.spec,
                    lifetime: None,
                    expires_ns,
                    carried,
                    meter: RateMeter::default(),
                    version,
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
        let gone: Vec<SlotKey> = self
            .entries
            .keys()
            .filter(|k| k.peer == peer && !keep.contains(k))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let remove = gone
            .iter()
            .filter_map(|k| self.entries.remove(k))
            .map(|e| e.slot)
            .collect();
        self.commit(SlotChange {
            remove,
            ..SlotChange::default()
        })
    }

    /// Moves the expiry of `key` to match `lifetime` (a renewal); writes
    /// only when it changed.
    pub fn set_lifetime(&mut self, key: &SlotKey, lifetime: Lifetime) -> Result<(), EnforceError> {
        let expires_ns = self.expiry_ns(lifetime);
        let Some(e) = self.entries.get_mut(key) else {
            return Ok(());
        };
        if e.lifetime == Some(lifetime) {
            return Ok(());
        }
        let before = (e.lifetime, e.expires_ns);
        e.lifetime = Some(lifetime);
        e.expires_ns = expires_ns;
        let change = SlotChange {
            renew: vec![(e.slot, expires_ns)],
            ..SlotChange::default()
        };
        if let Err(err) = self.commit(change) {
            if let Some(e) = self.entries.get_mut(key) {
                (e.lifetime, e.expires_ns) = before;
            }
            return Err(err);
        }
        Ok(())
    }

    /// Holds every indefinite mitigation in the kernel for another
    /// `indefinite_cap`, once half of it has passed. Call it at least every
    /// quarter of the cap ([`SlotTable::refresh_every`]).
    pub fn refresh_indefinite(&mut self) -> Result<usize, EnforceError> {
        let now = clock::boot_ns();
        let half = u64::try_from(self.indefinite_cap.as_nanos() / 2).unwrap_or(u64::MAX);
        let renewed = clock::boot_ns_after(self.indefinite_cap);
        let mut change = SlotChange::default();
        for e in self.entries.values_mut() {
            if e.lifetime == Some(Lifetime::Indefinite) && e.expires_ns < now.saturating_add(half) {
                e.expires_ns = renewed;
                change.renew.push((e.slot, renewed));
            }
        }
        let n = change.renew.len();
        if n > 0 {
            self.commit(change)?;
        }
        Ok(n)
    }

    /// How often [`SlotTable::refresh_indefinite`] must run.
    pub fn refresh_every(&self) -> Duration {
        (self.indefinite_cap / 4).max(Duration::from_millis(100))
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

/// Runs [`SlotTable::refresh_indefinite`] as often as the cap needs, for as
/// long as the agent runs.
pub async fn keep_indefinite(table: std::sync::Arc<std::sync::Mutex<SlotTable>>) {
    loop {
        let every = match table.lock() {
            Ok(mut t) => {
                if let Err(e) = t.refresh_indefinite() {
                    tracing::warn!(error = %e, "could not renew indefinite mitigations in the data plane");
                }
                t.refresh_every()
            }
            Err(_) => return,
        };
        tokio::time::sleep(every).await;
    }
}
