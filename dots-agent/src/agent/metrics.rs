//! The agent's Prometheus metrics (`--metrics ADDR`, off by default),
//! read at each scrape from the operator's view, the slot table and the
//! pinned data-plane maps, and encoded by `prometheus-client` (see
//! `dots_daemon::metrics`).
//!
//! Labels mean one thing each: `peer` is the peer as configured
//! (`HOST:PORT`), `cuid` and `mid` name a mitigation, `state` a mitigation
//! state, `code` a CoAP response code, `version` the build. The names and
//! labels are listed in the README's Observability section.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Instant,
};

use dots_daemon::metrics::{counter, gauge, Collector, DescriptorEncoder, Labels, Registry};
use tokio::sync::watch;

use super::{
    live::Live,
    view::{AgentView, MitigationState, PeerState},
    SlotTable,
};

/// A registry with the build info and the agent's collector.
pub(crate) fn registry(
    view: Arc<Mutex<AgentView>>,
    enforcer: Option<Arc<Mutex<SlotTable>>>,
    live: watch::Receiver<Arc<Live>>,
) -> Registry {
    let mut r = Registry::default();
    dots_daemon::metrics::build_info(&mut r, "dots_agent", env!("CARGO_PKG_VERSION"));
    r.register_collector(Box::new(AgentCollector {
        view,
        enforcer,
        live,
    }));
    r
}

struct AgentCollector {
    view: Arc<Mutex<AgentView>>,
    enforcer: Option<Arc<Mutex<SlotTable>>>,
    live: watch::Receiver<Arc<Live>>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentCollector")
    }
}

fn peer(name: &str) -> Labels {
    vec![("peer", name.to_string())]
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        if let Ok(v) = self.view.lock() {
            encode_view(&mut enc, &v, Instant::now())?;
        }
        // Our own certificate, as the next dial will present it.
        let cert = self.live.borrow().credentials.cert.clone();
        let own = std::fs::read(&cert)
            .ok()
            .and_then(|pem| openssl::x509::X509::from_pem(&pem).ok())
            .and_then(|c| unix_not_after(&c));
        gauge(
            &mut enc,
            "dots_agent_certificate_not_after_seconds",
            "When this agent's certificate expires, in seconds since the Unix epoch.",
            own.map(|t| (vec![("file", cert.display().to_string())], t)),
        )?;
        let Some(table) = &self.enforcer else {
            return Ok(());
        };
        let Ok(t) = table.lock() else { return Ok(()) };
        gauge(
            &mut enc,
            "dots_agent_slots_used",
            "Classifier slots in use.",
            [(Vec::new(), t.keys().len() as i64)],
        )?;
        gauge(
            &mut enc,
            "dots_agent_slots_max",
            "Classifier slots available in all.",
            [(Vec::new(), dots_common::MAX_SLOTS as i64)],
        )?;
        if let Ok(s) = t.dataplane().stats() {
            // TODO(dataplane): a `seen` total needs a counter in the XDP
            // program; exported here once dots-common has one.
            counter(
                &mut enc,
                "dots_agent_dataplane_packets",
                "Packets the XDP classifier handled, by result: unparsed (passed, not parsable), exempt (would match but exempt), dropped.",
                [
                    (vec![("result", "unparsed".to_string())], s.unparsed),
                    (vec![("result", "exempt".to_string())], s.exempt),
                    (vec![("result", "dropped".to_string())], s.dropped),
                ],
            )?;
        }
        Ok(())
    }
}

/// The metrics that come from the operator's view.
fn encode_view(enc: &mut DescriptorEncoder, v: &AgentView, now: Instant) -> fmt::Result {
    let peers = v.peers_at(now);
    let name = |index: usize| {
        v.peers
            .get(&index)
            .map(|p| p.configured.clone())
            .unwrap_or_else(|| index.to_string())
    };
    gauge(
        enc,
        "dots_agent_session_up",
        "Whether the signal channel to the peer is up.",
        peers.iter().map(|p| {
            (
                peer(&p.configured),
                i64::from(p.state == PeerState::Connected),
            )
        }),
    )?;
    counter(
        enc,
        "dots_agent_sessions",
        "Sessions established with the peer since start.",
        peers.iter().map(|p| (peer(&p.configured), p.sessions)),
    )?;
    gauge(
        enc,
        "dots_agent_peer_silence_seconds",
        "Seconds since anything (heartbeat or other) arrived from the peer.",
        peers
            .iter()
            .filter_map(|p| Some((peer(&p.configured), p.silent_for? as i64))),
    )?;
    gauge(
        enc,
        "dots_agent_peer_certificate_not_after_seconds",
        "When the peer's certificate of the current session expires, in seconds since the Unix epoch.",
        peers
            .iter()
            .filter_map(|p| Some((peer(&p.configured), p.cert_not_after?))),
    )?;
    gauge(
        enc,
        "dots_agent_mitigations",
        "Mitigations by state.",
        MitigationState::ALL.iter().map(|s| {
            let n = v.mitigations.values().filter(|m| m.state == *s).count();
            (vec![("state", s.to_string())], n as i64)
        }),
    )?;
    counter(
        enc,
        "dots_agent_mitigation_requests",
        "Mitigation requests (PUT) answered, by peer and response code.",
        v.requests
            .iter()
            .map(|((p, code), n)| (vec![("peer", name(*p)), ("code", code.clone())], *n)),
    )?;
    let mitigation = |m: &super::view::MitigationView| {
        vec![
            ("peer", name(m.peer)),
            ("cuid", m.cuid.clone()),
            ("mid", m.mid.to_string()),
        ]
    };
    counter(
        enc,
        "dots_agent_dropped_packets",
        "Packets dropped for the mitigation.",
        v.mitigations.values().map(|m| (mitigation(m), m.packets)),
    )?;
    counter(
        enc,
        "dots_agent_dropped_bytes",
        "Bytes dropped for the mitigation.",
        v.mitigations.values().map(|m| (mitigation(m), m.bytes)),
    )
}

/// A certificate's not-after in seconds since the Unix epoch.
fn unix_not_after(c: &openssl::x509::X509Ref) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(c.not_after()).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::view::{MitigationView, PeerStatus};

    #[test]
    fn renders_sessions_mitigations_and_requests() {
        let mut view = AgentView {
            peers: [(
                3,
                PeerStatus {
                    peer: "alt.example:4647".into(),
                    configured: "isp.example:4647".into(),
                    state: PeerState::Connected,
                    sessions: 2,
                    cert_not_after: Some(1_900_000_000),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        view.requests.insert((3, "4.00".into()), 2);
        view.mitigations.insert(
            (3, "c".into(), 7),
            MitigationView {
                peer: 3,
                cuid: "c".into(),
                mid: 7,
                state: MitigationState::Active,
                status: 2,
                sources: Vec::new(),
                source_ports: Vec::new(),
                icmp_types: Vec::new(),
                targets: Vec::new(),
                protocols: Vec::new(),
                target_ports: Vec::new(),
                lifetime_left: -1,
                packets: 500,
                bytes: 21000,
                pps: 0,
                bps: 0,
                devices: Vec::new(),
                exempt: Vec::new(),
                over_limit: None,
                action: "drop".into(),
                passed_packets: 0,
                passed_bytes: 0,
                passed_pps: 0,
                made_from: Default::default(),
            },
        );
        let opts = crate::config::AgentConfig::from_str(
                "ca = \"/nonexistent/c\"\ncert = \"/nonexistent/c\"\nkey = \"/nonexistent/k\"\n[[peers]]\naddress = \"isp.example\"\n[domain]\nprefixes = [\"192.0.2.0/24\"]\n",
                "/x/agent.toml",
            )
            .unwrap()
            .to_options()
            .unwrap();
        let (_, live) = watch::channel(Arc::new(opts.live(
            &[],
            0,
            &crate::agent::live::Shared::new(&opts),
        )));
        let r = registry(Arc::new(Mutex::new(view)), None, live);
        let text = dots_daemon::metrics::render(&r);
        for want in [
            "dots_agent_session_up{peer=\"isp.example:4647\"} 1",
            "dots_agent_sessions_total{peer=\"isp.example:4647\"} 2",
            "dots_agent_peer_certificate_not_after_seconds{peer=\"isp.example:4647\"} 1900000000",
            "dots_agent_mitigations{state=\"active\"} 1",
            "dots_agent_mitigation_requests_total{peer=\"isp.example:4647\",code=\"4.00\"} 2",
            "dots_agent_dropped_packets_total{peer=\"isp.example:4647\",cuid=\"c\",mid=\"7\"} 500",
            "dots_agent_build_info{version=\"",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
    }
}
