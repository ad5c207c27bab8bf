//! What the operator sees of the running agent: per-peer session state and
//! the mitigations, shared between the peer tasks (which update it) and the
//! control socket (which reads it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Instant, SystemTime},
};

use dots_proto::signal::{Mitigation, MitigationKey, Phase};
use serde::Serialize;

use crate::enforce::Attachment;

/// One upstream peer's session, as `dots-agent status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStatus {
    pub peer: String,
    /// "dialling", "connected" or "redirected".
    pub state: String,
    pub transport: Option<String>,
    pub addr: Option<SocketAddr>,
    pub resumed: bool,
    /// Seconds since the Unix epoch when the session came up.
    pub connected_at: Option<u64>,
    /// Seconds since anything arrived from the peer (heartbeat health).
    pub silent_for: Option<u64>,
    /// Sessions established since start.
    pub sessions: u64,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub last_rx: Option<Instant>,
}

/// One mitigation, as `dots-agent mitigations` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MitigationView {
    pub peer: usize,
    pub cuid: String,
    pub mid: u32,
    /// "pending-consent", "installing", "active", "monitoring".
    pub state: String,
    /// DOTS status code (1 in progress, 2 successfully mitigated).
    pub status: u8,
    pub sources: Vec<String>,
    pub source_ports: Vec<String>,
    pub icmp_types: Vec<String>,
    pub targets: Vec<String>,
    pub protocols: Vec<u8>,
    pub target_ports: Vec<String>,
    /// Seconds left, -1 for indefinite.
    pub lifetime_left: i64,
    pub packets: u64,
    pub bytes: u64,
    pub pps: u64,
    pub bps: u64,
    /// Internal devices found behind NAT (address and MAC): for the operator
    /// only, never sent to the peer (RFC 9066 §9).
    pub devices: Vec<String>,
}

fn range<T: std::fmt::Display + PartialEq + Copy>(lower: T, upper: Option<T>) -> String {
    match upper {
        Some(u) if u != lower => format!("{lower}-{u}"),
        _ => lower.to_string(),
    }
}

impl MitigationView {
    pub fn new(peer: usize, key: &MitigationKey, m: &Mitigation, now: Instant) -> MitigationView {
        let s = &m.request.scope;
        let c = m.counters.unwrap_or_default();
        MitigationView {
            peer,
            cuid: key.cuid.clone(),
            mid: key.mid,
            state: match m.phase {
                Phase::AwaitingConsent => "pending-consent",
                Phase::Installing => "installing",
                Phase::Active => "active",
                Phase::Monitoring => "monitoring",
            }
            .into(),
            status: m.status().code() as u8,
            sources: s.source_prefix.iter().map(ToString::to_string).collect(),
            source_ports: s
                .source_port_range
                .iter()
                .map(|r| range(r.lower, r.upper))
                .collect(),
            icmp_types: s
                .source_icmp_type_range
                .iter()
                .map(|r| range(r.lower, r.upper))
                .collect(),
            targets: s.target_prefix.iter().map(ToString::to_string).collect(),
            protocols: s.target_protocol.clone(),
            target_ports: s
                .target_port_range
                .iter()
                .map(|r| range(r.lower, r.upper))
                .collect(),
            lifetime_left: m.remaining(now),
            packets: c.pkts,
            bytes: c.bytes,
            pps: c.pps,
            bps: c.bps,
            devices: Vec::new(),
        }
    }
}

/// Everything the control socket reports.
#[derive(Debug, Default, Serialize)]
pub struct AgentView {
    pub monitor: bool,
    pub bpffs: PathBuf,
    pub interfaces: Vec<Attachment>,
    pub peers: Vec<PeerStatus>,
    #[serde(skip)]
    pub mitigations: BTreeMap<(usize, String, u32), MitigationView>,
}

impl AgentView {
    /// Replaces peer `peer`'s mitigations with the server's current table.
    pub fn set_mitigations<'a>(
        &mut self,
        peer: usize,
        now: Instant,
        table: impl Iterator<Item = (&'a MitigationKey, &'a Mitigation)>,
    ) {
        self.mitigations.retain(|(p, _, _), _| *p != peer);
        for (k, m) in table {
            self.mitigations.insert(
                (peer, k.cuid.clone(), k.mid),
                MitigationView::new(peer, k, m, now),
            );
        }
    }

    /// Peers with `silent_for` computed at `now`.
    pub fn peers_at(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .cloned()
            .map(|mut p| {
                p.silent_for = p
                    .last_rx
                    .map(|t| now.saturating_duration_since(t).as_secs());
                p
            })
            .collect()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
