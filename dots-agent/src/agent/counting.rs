//! What the slots let through: every second, the counters of each slot
//! (dropped, and matched but passed) go into the operator's view, and a
//! monitor slot's "would have dropped" goes into the log every notify
//! interval. Monitor mode shows its effect this way before anything is
//! enforced; a rate-limited slot shows what stayed within its limit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::info;

use super::{
    enforcer::{SlotKey, SlotTable},
    view::AgentView,
};
use crate::enforce::{RateMeter, SlotAction};

/// How often the view gets fresh counters.
const EVERY: Duration = Duration::from_secs(1);

struct Seen {
    meter: RateMeter,
    logged: Instant,
    logged_packets: u64,
}

/// Runs for as long as the agent runs; logs monitor slots every `log_every`.
pub(super) async fn report(
    table: Arc<Mutex<SlotTable>>,
    view: Arc<Mutex<AgentView>>,
    log_every: Duration,
) {
    let mut seen: HashMap<SlotKey, Seen> = HashMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let now = Instant::now();
        let readings: Vec<_> = match table.lock() {
            Ok(t) => t
                .keys()
                .into_iter()
                .filter_map(|k| t.slot_counters(&k).map(|c| (k, c)))
                .collect(),
            Err(_) => return,
        };
        seen.retain(|k, _| readings.iter().any(|(r, _)| r == k));
        let Ok(mut v) = view.lock() else {
            return;
        };
        for (key, (action, c)) in readings {
            let s = seen.entry(key.clone()).or_insert_with(|| Seen {
                meter: RateMeter::default(),
                logged: now,
                logged_packets: 0,
            });
            let passed = dots_common::SlotCounters {
                packets: c.passed_packets,
                bytes: c.passed_bytes,
                ..Default::default()
            };
            let rates = s.meter.sample(now, passed);
            if let Some(m) = v
                .mitigations
                .get_mut(&(key.peer, key.cuid.clone(), key.mid))
            {
                m.action = action.to_string();
                m.passed_packets = c.passed_packets;
                m.passed_bytes = c.passed_bytes;
                m.passed_pps = rates.pps;
            }
            if action == SlotAction::Monitor
                && now.duration_since(s.logged) >= log_every
                && c.passed_packets > s.logged_packets
            {
                info!(cuid = %key.cuid, mid = key.mid,
                      would_drop_packets = c.passed_packets - s.logged_packets,
                      would_drop_total = c.passed_packets, would_drop_bytes_total = c.passed_bytes,
                      pps = rates.pps,
                      "monitor mode: the mitigation would have dropped these packets (none dropped)");
                s.logged = now;
                s.logged_packets = c.passed_packets;
            }
        }
    }
}
