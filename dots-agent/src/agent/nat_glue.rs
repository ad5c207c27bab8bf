//! NAT correlation in the running agent (RFC 9066 §5.3.2): mitigations whose
//! source prefixes cover the router's own (external) addresses are enforced
//! on the internal devices conntrack shows behind them, found at install time
//! and followed through new-flow events while the mitigation lasts.
//!
//! Requests resolve against a [`CtMirror`]: the source-NATed conntrack
//! entries in memory, loaded by one dump at start and kept current by NEW
//! and DESTROY events (re-dumped on lost events, and every
//! [`RECONCILE`] while entries older than the subscription remain, whose
//! DESTROY events may never come). Without events the agent falls back to
//! a dump per request.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use dots_daemon::logging::list;

use dots_proto::signal::MitigationKey;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::enforcer::{SlotKey, SlotTable};
use crate::{
    enforce::SlotSpec,
    nat::{self, Conntrack, CtEvent, CtMirror, EventSocket, NatAction, NatTracker},
};

/// How often the mirror is re-read while it holds entries seen only in a
/// dump (created before the subscription: no DESTROY event for them with
/// the default `nf_conntrack_events=2`).
const RECONCILE: Duration = Duration::from_secs(60);

/// What installing a scope means under NAT.
pub(crate) enum NatInstall {
    /// No source covers a router address: install the scope as it is.
    Direct,
    /// Devices were found: install this slot.
    Resolved(SlotSpec),
    /// Nothing yet: keep the request at status 1 until a flow appears.
    Pending,
}

/// Tells a peer task that its pending mitigation now has a slot.
pub(crate) struct NatResolved(pub(crate) MitigationKey);

pub(crate) struct NatService {
    /// Lock order: `tracker`, then `mirror`, then `conntrack`.
    tracker: Mutex<NatTracker<SlotKey>>,
    /// `None` without events (or when the first dump failed): dump per
    /// request instead.
    mirror: Mutex<Option<CtMirror>>,
    conntrack: Mutex<Option<Conntrack>>,
    /// Peer task channels, by peer index.
    peers: Mutex<BTreeMap<usize, mpsc::UnboundedSender<NatResolved>>>,
}

impl NatService {
    /// Opens conntrack, subscribes to new and destroyed flows, then loads
    /// the mirror with a dump (in that order, so no flow falls between:
    /// events queued during the dump are applied after it). `router`: the
    /// router's own addresses; see [`NatService::set_router_addresses`].
    pub(crate) fn start(
        action: NatAction,
        router: Vec<IpAddr>,
        table: Arc<Mutex<SlotTable>>,
    ) -> Arc<NatService> {
        info!(
            router = %list(&router),
            ?action,
            "NAT correlation: the router's own addresses"
        );
        let mut conntrack = match Conntrack::open() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "conntrack unavailable: requests naming the router's addresses cannot be resolved");
                None
            }
        };
        let events = match EventSocket::open() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no conntrack events: new flows of a NATed attacker are not followed");
                None
            }
        };
        // The subscription is open: load the mirror now.
        let mirror = match (&events, conntrack.as_mut()) {
            (Some(_), Some(ct)) => {
                let t = std::time::Instant::now();
                match CtMirror::load(ct) {
                    Ok(m) => {
                        info!(
                            entries = m.len(),
                            ms = t.elapsed().as_millis() as u64,
                            "conntrack mirror loaded (source-NATed entries)"
                        );
                        Some(m)
                    }
                    Err(e) => {
                        warn!(error = %e, "conntrack dump failed: dumping per request instead");
                        None
                    }
                }
            }
            _ => None,
        };
        let service = Arc::new(NatService {
            tracker: Mutex::new(NatTracker::new(router, action)),
            mirror: Mutex::new(mirror),
            conntrack: Mutex::new(conntrack),
            peers: Mutex::default(),
        });
        if let Some(s) = events {
            match s.spawn(Duration::from_millis(200)) {
                Ok(events) => {
                    tokio::spawn(follow(service.clone(), events, table));
                }
                Err(e) => {
                    warn!(error = %e, "no conntrack events: new flows of a NATed attacker are not followed");
                    if let Ok(mut m) = service.mirror.lock() {
                        *m = None;
                    }
                }
            }
        }
        service
    }

    /// The channel on which peer task `index` hears that a pending
    /// mitigation now has a slot.
    pub(crate) fn add_peer(&self, index: usize) -> mpsc::UnboundedReceiver<NatResolved> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut p) = self.peers.lock() {
            p.insert(index, tx);
        }
        rx
    }

    /// Peer `index` is gone (removed by a reload).
    pub(crate) fn remove_peer(&self, index: usize) {
        if let Ok(mut p) = self.peers.lock() {
            p.remove(&index);
        }
    }

    /// The router's addresses changed: requests from now on that name one
    /// of `router` are resolved through conntrack; an address it no longer
    /// has is not the router's any more.
    pub(crate) fn set_router_addresses(&self, router: Vec<IpAddr>) {
        if let Ok(mut t) = self.tracker.lock() {
            if t.router_addresses() != router.as_slice() {
                info!(router = %list(&router), "NAT correlation: the router's addresses changed");
                t.set_router_addresses(router);
            }
        }
    }

    /// Starts following `key` if its scope names the router's addresses.
    pub(crate) fn install(&self, key: &SlotKey, spec: &SlotSpec) -> NatInstall {
        let Ok(mut tracker) = self.tracker.lock() else {
            return NatInstall::Direct;
        };
        if !tracker.covers(spec) {
            tracker.untrack(key);
            return NatInstall::Direct;
        }
        let mirrored = match self.mirror.lock().ok().as_deref().and_then(Option::as_ref) {
            Some(m) => {
                tracker.track_entries(key.clone(), spec, m.entries());
                true
            }
            None => false,
        };
        if !mirrored {
            let snapshot = match self
                .conntrack
                .lock()
                .ok()
                .as_deref_mut()
                .and_then(Option::as_mut)
            {
                Some(ct) => {
                    nat::snapshot_for(ct, spec, tracker.router_addresses()).unwrap_or_else(|e| {
                        warn!(error = %e, "conntrack dump failed");
                        Vec::new()
                    })
                }
                None => Vec::new(),
            };
            tracker.track(key.clone(), spec, &snapshot);
        }
        refresh_macs(&mut tracker);
        match tracker.slot_spec(key) {
            Some(s) => {
                log_devices(&tracker, key);
                NatInstall::Resolved(s)
            }
            None => NatInstall::Pending,
        }
    }

    pub(crate) fn remove(&self, key: &SlotKey) {
        if let Ok(mut t) = self.tracker.lock() {
            t.untrack(key);
        }
    }

    /// The internal devices found for `key`, for the operator only (never
    /// sent to the peer, RFC 9066 §9).
    pub(crate) fn devices(&self, key: &SlotKey) -> Vec<String> {
        let Ok(t) = self.tracker.lock() else {
            return Vec::new();
        };
        t.devices(key)
            .map(|set| {
                set.iter()
                    .map(|d| match &d.mac {
                        Some(m) => format!("{} ({m})", d.addr),
                        None => d.addr.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn refresh_macs(tracker: &mut NatTracker<SlotKey>) {
    if let Ok(n) = nat::neighbours() {
        tracker.set_macs(&n);
    }
}

fn log_devices(tracker: &NatTracker<SlotKey>, key: &SlotKey) {
    if let Some(set) = tracker.devices(key) {
        let devices: Vec<String> = set.iter().map(|d| d.addr.to_string()).collect();
        info!(cuid = %key.cuid, mid = key.mid, devices = %list(&devices), "internal devices behind NAT");
    }
}

/// Re-reads the table into the mirror (or, without a mirror, just dumps
/// it) and feeds every entry to the tracker; returns the keys that changed.
fn resync(service: &NatService, tracker: &mut NatTracker<SlotKey>) -> Vec<SlotKey> {
    let Ok(mut mirror) = service.mirror.lock() else {
        return Vec::new();
    };
    let Ok(mut ct) = service.conntrack.lock() else {
        return Vec::new();
    };
    let Some(ct) = ct.as_mut() else {
        return Vec::new();
    };
    match mirror.as_mut() {
        Some(m) => {
            if let Err(e) = m.reload(ct) {
                warn!(error = %e, "conntrack dump failed");
                return Vec::new();
            }
            if tracker.is_empty() {
                return Vec::new();
            }
            m.entries().flat_map(|e| tracker.observe(&e)).collect()
        }
        None => match ct.dump() {
            Ok(v) => v.iter().flat_map(|e| tracker.observe(e)).collect(),
            Err(e) => {
                warn!(error = %e, "conntrack dump failed");
                Vec::new()
            }
        },
    }
}

/// Conntrack events: keep the mirror current, grow the device sets with new
/// flows and re-install what changed.
async fn follow(
    service: Arc<NatService>,
    mut events: mpsc::UnboundedReceiver<Result<CtEvent, nat::NatError>>,
    table: Arc<Mutex<SlotTable>>,
) {
    let mut reconcile = tokio::time::interval(RECONCILE);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.tick().await;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => match ev {
                Some(Ok(CtEvent::Resync)) => {
                    warn!("conntrack events were lost; reading the table again");
                    Ok(CtEvent::Resync)
                }
                Some(ev) => ev,
                None => return,
            },
            _ = reconcile.tick() => {
                let stale = service
                    .mirror
                    .lock()
                    .ok()
                    .and_then(|m| m.as_ref().map(CtMirror::needs_reconcile))
                    .unwrap_or(false);
                if !stale {
                    continue;
                }
                debug!("re-reading the conntrack table: entries older than the subscription remain");
                Ok(CtEvent::Resync)
            }
        };
        let mut new = None;
        match ev {
            Ok(ev @ CtEvent::New(e)) => {
                if let Ok(Some(m)) = service.mirror.lock().as_deref_mut() {
                    m.apply(&ev);
                }
                new = Some(e);
            }
            Ok(ev @ CtEvent::Destroy(_)) => {
                if let Ok(Some(m)) = service.mirror.lock().as_deref_mut() {
                    m.apply(&ev);
                }
                continue;
            }
            Ok(CtEvent::Resync) => {}
            Err(e) => {
                warn!(error = %e, "conntrack events stopped");
                if let Ok(mut m) = service.mirror.lock() {
                    // Stale from now on: dump per request instead.
                    *m = None;
                }
                return;
            }
        }
        let mut changed: BTreeMap<SlotKey, SlotSpec> = BTreeMap::new();
        if let Ok(mut tracker) = service.tracker.lock() {
            let keys: Vec<SlotKey> = match new {
                Some(e) => tracker.observe(&e),
                None => resync(&service, &mut tracker),
            };
            if !keys.is_empty() {
                refresh_macs(&mut tracker);
            }
            for k in keys {
                if let Some(s) = tracker.slot_spec(&k) {
                    log_devices(&tracker, &k);
                    changed.insert(k, s);
                }
            }
        }
        for (k, spec) in changed {
            let installed = table.lock().map(|mut t| t.install(&k, spec, None));
            match installed {
                Ok(Ok(slot)) => {
                    info!(cuid = %k.cuid, mid = k.mid, slot, "NATed device enforced");
                    if let Some(tx) = service
                        .peers
                        .lock()
                        .ok()
                        .and_then(|p| p.get(&k.peer).cloned())
                    {
                        let _ = tx.send(NatResolved(MitigationKey::new(k.cuid.clone(), k.mid)));
                    }
                }
                Ok(Err(e)) => {
                    warn!(cuid = %k.cuid, mid = k.mid, error = %e, "could not enforce the NATed device")
                }
                Err(_) => return,
            }
        }
    }
}
