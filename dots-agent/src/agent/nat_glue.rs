//! NAT correlation in the running agent (RFC 9066 §5.3.2): mitigations whose
//! source prefixes cover the router's own (external) addresses are enforced
//! on the internal devices conntrack shows behind them, found at install time
//! and followed through new-flow events while the mitigation lasts.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use dots_proto::signal::MitigationKey;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::enforcer::{SlotKey, SlotTable};
use crate::{
    enforce::SlotSpec,
    nat::{self, Conntrack, CtEvent, EventSocket, NatAction, NatTracker},
};

/// What installing a scope means under NAT.
pub enum NatInstall {
    /// No source covers a router address: install the scope as it is.
    Direct,
    /// Devices were found: install this slot.
    Resolved(SlotSpec),
    /// Nothing yet: keep the request at status 1 until a flow appears.
    Pending,
}

/// Tells a peer task that its pending mitigation now has a slot.
pub struct NatResolved(pub MitigationKey);

pub struct NatService {
    tracker: Mutex<NatTracker<SlotKey>>,
    conntrack: Mutex<Option<Conntrack>>,
    /// Peer task channels, by peer index.
    peers: Vec<mpsc::UnboundedSender<NatResolved>>,
}

impl NatService {
    /// Opens conntrack and subscribes to new flows (before any dump, so no
    /// flow falls between them). Returns the receivers for the peer tasks.
    pub fn start(
        action: NatAction,
        peers: usize,
        table: Arc<Mutex<SlotTable>>,
    ) -> (Arc<NatService>, Vec<mpsc::UnboundedReceiver<NatResolved>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..peers).map(|_| mpsc::unbounded_channel()).unzip();
        let router = nat::router_addresses();
        info!(
            ?router,
            ?action,
            "NAT correlation: the router's own addresses"
        );
        let conntrack = match Conntrack::open() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "conntrack unavailable: requests naming the router's addresses cannot be resolved");
                None
            }
        };
        let service = Arc::new(NatService {
            tracker: Mutex::new(NatTracker::new(router, action)),
            conntrack: Mutex::new(conntrack),
            peers: txs,
        });
        match EventSocket::open().and_then(|s| {
            s.spawn(Duration::from_millis(200))
                .map_err(nat::NatError::Events)
        }) {
            Ok(events) => {
                tokio::spawn(follow(service.clone(), events, table));
            }
            Err(e) => {
                warn!(error = %e, "no conntrack events: new flows of a NATed attacker are not followed")
            }
        }
        (service, rxs)
    }

    /// Starts following `key` if its scope names the router's addresses.
    pub fn install(&self, key: &SlotKey, spec: &SlotSpec) -> NatInstall {
        let Ok(mut tracker) = self.tracker.lock() else {
            return NatInstall::Direct;
        };
        if !tracker.covers(spec) {
            tracker.untrack(key);
            return NatInstall::Direct;
        }
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
        refresh_macs(&mut tracker);
        match tracker.slot_spec(key) {
            Some(s) => {
                log_devices(&tracker, key);
                NatInstall::Resolved(s)
            }
            None => NatInstall::Pending,
        }
    }

    pub fn remove(&self, key: &SlotKey) {
        if let Ok(mut t) = self.tracker.lock() {
            t.untrack(key);
        }
    }

    /// The internal devices found for `key`, for the operator only (never
    /// sent to the peer, RFC 9066 §9).
    pub fn devices(&self, key: &SlotKey) -> Vec<String> {
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
        info!(cuid = %key.cuid, mid = key.mid, ?devices, "internal devices behind NAT");
    }
}

/// New flows: grow the device sets and re-install what changed.
async fn follow(
    service: Arc<NatService>,
    mut events: mpsc::UnboundedReceiver<Result<CtEvent, nat::NatError>>,
    table: Arc<Mutex<SlotTable>>,
) {
    while let Some(ev) = events.recv().await {
        let entries = match ev {
            Ok(CtEvent::New(e)) => vec![e],
            Ok(CtEvent::Resync) => {
                warn!("conntrack events were lost; reading the table again");
                match service
                    .conntrack
                    .lock()
                    .ok()
                    .as_deref_mut()
                    .and_then(Option::as_mut)
                    .map(|ct| ct.dump())
                {
                    Some(Ok(v)) => v,
                    _ => Vec::new(),
                }
            }
            Err(e) => {
                warn!(error = %e, "conntrack events stopped");
                return;
            }
        };
        let mut changed: BTreeMap<SlotKey, SlotSpec> = BTreeMap::new();
        if let Ok(mut tracker) = service.tracker.lock() {
            let keys: Vec<SlotKey> = entries.iter().flat_map(|e| tracker.observe(e)).collect();
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
            let installed = table.lock().map(|mut t| t.install(&k, spec));
            match installed {
                Ok(Ok(slot)) => {
                    info!(cuid = %k.cuid, mid = k.mid, slot, "NATed device enforced");
                    if let Some(tx) = service.peers.get(k.peer) {
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
