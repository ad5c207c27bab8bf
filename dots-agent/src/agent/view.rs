//! What the operator sees of the running agent: per-peer session state and
//! the mitigations, shared between the peer tasks (which update it) and the
//! control socket (which reads it).
//!
//! The view types are also the bodies of the control socket's replies: the
//! agent serializes them and `dots-agent status` / `mitigations` read them
//! back, so both ends agree on field names and on the state names.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use anyhow::Context;
use dots_proto::signal::{Mitigation, MitigationKey, Phase};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::enforce::{dataplane::DataplaneStats, Attachment, Dataplane, DataplaneOptions, SlotId};

/// Where an upstream peer's session stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// Dialling, or waiting to dial again.
    #[default]
    Dialling,
    /// The signal channel is up.
    Connected,
    /// Sent to another Call Home DOTS client (RFC 9066 §5.2.2).
    Redirected,
}

impl PeerState {
    /// The name `dots-agent status` and the JSON replies use.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Dialling => "dialling",
            PeerState::Connected => "connected",
            PeerState::Redirected => "redirected",
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a mitigation stands on the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MitigationState {
    /// Waiting for the operator (`consent = "require"`).
    PendingConsent,
    /// Being written to the data plane.
    Installing,
    /// Installed and dropping.
    Active,
    /// Monitor mode: accepted, nothing installed.
    Monitoring,
}

impl MitigationState {
    /// Every state, in the order the metrics list them.
    pub const ALL: [MitigationState; 4] = [
        MitigationState::PendingConsent,
        MitigationState::Installing,
        MitigationState::Active,
        MitigationState::Monitoring,
    ];

    /// The name `dots-agent mitigations`, the metrics and the JSON replies use.
    pub fn as_str(self) -> &'static str {
        match self {
            MitigationState::PendingConsent => "pending-consent",
            MitigationState::Installing => "installing",
            MitigationState::Active => "active",
            MitigationState::Monitoring => "monitoring",
        }
    }
}

impl std::fmt::Display for MitigationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Phase> for MitigationState {
    fn from(p: Phase) -> Self {
        match p {
            Phase::AwaitingConsent => MitigationState::PendingConsent,
            Phase::Installing => MitigationState::Installing,
            Phase::Active => MitigationState::Active,
            Phase::Monitoring => MitigationState::Monitoring,
        }
    }
}

/// One upstream peer's session, as `dots-agent status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub state: PeerState,
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
    /// The peer as configured (or first discovered), whatever `peer` is
    /// now (a redirect changes it): the metrics' `peer` label.
    #[serde(skip)]
    pub configured: String,
    /// When the peer's certificate of the current session expires, in
    /// seconds since the Unix epoch.
    #[serde(skip)]
    pub cert_not_after: Option<i64>,
}

/// One mitigation, as `dots-agent mitigations` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MitigationView {
    pub peer: usize,
    pub cuid: String,
    pub mid: u32,
    pub state: MitigationState,
    /// DOTS status code (1 in progress, 2 successfully mitigated).
    pub status: u8,
    /// Prefixes, not their text: a router may hold 256 mitigations of many
    /// prefixes each, and a string per prefix costs about three times the
    /// prefix. Written as text in JSON all the same.
    pub sources: Vec<IpNet>,
    pub source_ports: Vec<String>,
    pub icmp_types: Vec<String>,
    pub targets: Vec<IpNet>,
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
    /// Sources and targets of the scope that are exempt (never-block, a
    /// peer's address) and so not dropped; the peer is told too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt: Vec<IpNet>,
    /// The local policy bound this request goes past (why it waits for
    /// consent with `over-limit = "consent"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_limit: Option<String>,
    /// What the classifier slot does: "drop", "monitor", "rate-limit ..."
    /// (empty while no slot holds the mitigation).
    #[serde(default)]
    pub action: String,
    /// Packets and bytes the slot matched but let through: what a monitor
    /// slot would have dropped, or what stayed within a rate limit.
    #[serde(default)]
    pub passed_packets: u64,
    #[serde(default)]
    pub passed_bytes: u64,
    /// Packets per second of those, over the last reading.
    #[serde(default)]
    pub passed_pps: u64,
    /// What the view was made from, so that it is made again only when that
    /// changes; not part of the reply.
    #[serde(skip)]
    pub made_from: ViewMark,
}

/// The parts of a mitigation a [`MitigationView`] shows, besides its
/// remaining lifetime (updated in place): a new scope always comes with a
/// new phase start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewMark {
    phase: Option<Phase>,
    since: Option<Instant>,
    counters: Option<dots_proto::signal::Counters>,
}

impl ViewMark {
    fn of(m: &Mitigation) -> ViewMark {
        ViewMark {
            phase: Some(m.phase),
            since: Some(m.phase_since()),
            counters: m.counters,
        }
    }
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
            state: m.phase.into(),
            status: m.status().code() as u8,
            sources: s.source_prefix.clone(),
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
            targets: s.target_prefix.clone(),
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
            exempt: m
                .exempt
                .iter()
                .flat_map(|e| e.sources.iter().chain(&e.targets))
                .copied()
                .collect(),
            over_limit: m.over_limit.as_ref().map(ToString::to_string),
            action: String::new(),
            passed_packets: 0,
            passed_bytes: 0,
            passed_pps: 0,
            made_from: ViewMark::of(m),
        }
    }
}

/// One interface the classifier runs on, as `dots-agent status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub iface: String,
    /// "native", "generic", or "pinned" for a link adopted from an earlier run.
    pub mode: String,
    pub pin: PathBuf,
}

impl From<&Attachment> for InterfaceView {
    fn from(a: &Attachment) -> Self {
        InterfaceView {
            iface: a.iface.clone(),
            mode: a.mode.to_string(),
            pin: a.pin.clone(),
        }
    }
}

/// The body of the control socket's `status` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// Monitor mode: nothing is installed.
    pub monitor: bool,
    pub bpffs: PathBuf,
    pub interfaces: Vec<InterfaceView>,
    /// With `silent_for` computed when the reply was made.
    pub peers: Vec<PeerStatus>,
    /// How many mitigations the agent holds (see `mitigations`).
    pub mitigations: usize,
}

/// Everything the control socket reports: the runtime's shared state.
#[derive(Debug, Default)]
pub struct AgentView {
    pub monitor: bool,
    pub bpffs: PathBuf,
    pub interfaces: Vec<Attachment>,
    /// By peer index; indices are not reused when a reload removes a peer.
    pub peers: BTreeMap<usize, PeerStatus>,
    pub mitigations: BTreeMap<(usize, String, u32), MitigationView>,
    /// Mitigation requests (PUT) answered, by peer index and response code.
    pub requests: BTreeMap<(usize, String), u64>,
}

impl AgentView {
    /// Replaces peer `peer`'s mitigations with the server's current table.
    /// Views are made again only for mitigations that changed (the others
    /// get their remaining lifetime), so a step costs little whatever the
    /// number or size of the mitigations.
    pub fn set_mitigations<'a>(
        &mut self,
        peer: usize,
        now: Instant,
        table: impl Iterator<Item = (&'a MitigationKey, &'a Mitigation)>,
    ) {
        let mut present = std::collections::HashSet::new();
        for (k, m) in table {
            let key = (peer, k.cuid.clone(), k.mid);
            match self.mitigations.get_mut(&key) {
                Some(v) if v.made_from == ViewMark::of(m) => v.lifetime_left = m.remaining(now),
                _ => {
                    self.mitigations
                        .insert(key.clone(), MitigationView::new(peer, k, m, now));
                }
            }
            present.insert(key);
        }
        self.mitigations
            .retain(|k, _| k.0 != peer || present.contains(k));
    }

    /// The `status` reply at `now`.
    pub fn status(&self, now: Instant) -> StatusView {
        StatusView {
            monitor: self.monitor,
            bpffs: self.bpffs.clone(),
            interfaces: self.interfaces.iter().map(InterfaceView::from).collect(),
            peers: self
                .peers_at(now)
                .into_iter()
                .map(|p| PeerStatus {
                    last_rx: None,
                    configured: String::new(),
                    cert_not_after: None,
                    ..p
                })
                .collect(),
            mitigations: self.mitigations.len(),
        }
    }

    /// The `mitigations` reply: every mitigation, by peer, cuid and mid.
    pub fn mitigation_list(&self) -> Vec<MitigationView> {
        self.mitigations.values().cloned().collect()
    }

    /// Peers with `silent_for` computed at `now`.
    pub fn peers_at(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .values()
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

/// `dots-agent dataplane status`: the pinned data plane, read directly from
/// bpffs (no running agent needed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataplaneStatus {
    pub bpffs: PathBuf,
    /// Interfaces with a pinned link.
    pub interfaces: Vec<String>,
    /// The active slots with their drop totals.
    pub slots: Vec<SlotStatus>,
    pub stats: DataplaneStats,
}

/// One active classifier slot and what it dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: SlotId,
    pub packets: u64,
    pub bytes: u64,
    /// Matched but let through (monitor or rate-limit slots).
    #[serde(default)]
    pub passed_packets: u64,
    #[serde(default)]
    pub passed_bytes: u64,
}

impl DataplaneStatus {
    /// Opens the data plane pinned under `bpffs` and reads its state.
    pub fn read(bpffs: &Path) -> anyhow::Result<DataplaneStatus> {
        let interfaces = Dataplane::attachments(bpffs);
        let dp = Dataplane::open(&DataplaneOptions {
            bpffs: bpffs.to_path_buf(),
            ..Default::default()
        })
        .context("opening the XDP data plane")?;
        let stats = dp.stats()?;
        let slots = dp
            .active_slots()?
            .into_iter()
            .map(|slot| {
                let c = dp.counters(slot)?;
                Ok(SlotStatus {
                    slot,
                    packets: c.packets,
                    bytes: c.bytes,
                    passed_packets: c.passed_packets,
                    passed_bytes: c.passed_bytes,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(DataplaneStatus {
            bpffs: bpffs.to_path_buf(),
            interfaces,
            slots,
            stats,
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_as_their_names() {
        for s in MitigationState::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(
            serde_json::to_string(&MitigationState::PendingConsent).unwrap(),
            "\"pending-consent\""
        );
        for s in [
            PeerState::Dialling,
            PeerState::Connected,
            PeerState::Redirected,
        ] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
            let back: PeerState = serde_json::from_value(s.as_str().into()).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn status_reply_keeps_its_keys_and_reads_back() {
        let now = Instant::now();
        let view = AgentView {
            monitor: true,
            bpffs: "/sys/fs/bpf/dots-agent".into(),
            interfaces: vec![Attachment {
                iface: "eth1".into(),
                mode: "native",
                pin: "/sys/fs/bpf/dots-agent/link_eth1".into(),
            }],
            peers: [(
                0,
                PeerStatus {
                    peer: "isp.example:4647".into(),
                    state: PeerState::Connected,
                    transport: Some("tls".into()),
                    last_rx: Some(now),
                    configured: "isp.example:4647".into(),
                    cert_not_after: Some(1),
                    ..Default::default()
                },
            )]
            .into(),
            mitigations: BTreeMap::new(),
            requests: BTreeMap::new(),
        };
        let status = view.status(now);
        let json = serde_json::to_value(&status).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["bpffs", "interfaces", "mitigations", "monitor", "peers"]
        );
        assert_eq!(json["interfaces"][0]["mode"], "native");
        assert_eq!(json["peers"][0]["state"], "connected");
        assert_eq!(json["peers"][0]["silent_for"], 0);
        assert!(json["peers"][0].get("last_rx").is_none());
        let peer_keys: Vec<&str> = json["peers"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            peer_keys,
            [
                "addr",
                "connected_at",
                "last_error",
                "peer",
                "resumed",
                "sessions",
                "silent_for",
                "state",
                "transport"
            ]
        );
        let back: StatusView = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
