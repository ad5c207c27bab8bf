//! Optional Prometheus text endpoint (`--metrics ADDR`, off by default):
//! sessions, heartbeat health, mitigations by state, drops per mitigation.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{info, warn};

use super::view::{AgentView, MitigationState, PeerState};

/// The metrics of `view`, in the Prometheus text format (version 0.0.4).
pub fn render(view: &AgentView, now: Instant) -> String {
    let mut out = String::new();
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = writeln!(
        out,
        "# HELP dots_agent_session_up Whether the signal channel to the peer is up."
    );
    let _ = writeln!(out, "# TYPE dots_agent_session_up gauge");
    for p in view.peers_at(now) {
        let up = u8::from(p.state == PeerState::Connected);
        let _ = writeln!(
            out,
            "dots_agent_session_up{{peer=\"{}\"}} {up}",
            esc(&p.peer)
        );
    }
    let _ = writeln!(
        out,
        "# HELP dots_agent_sessions_total Sessions established with the peer since start."
    );
    let _ = writeln!(out, "# TYPE dots_agent_sessions_total counter");
    for p in &view.peers {
        let _ = writeln!(
            out,
            "dots_agent_sessions_total{{peer=\"{}\"}} {}",
            esc(&p.peer),
            p.sessions
        );
    }
    let _ = writeln!(out, "# HELP dots_agent_peer_silence_seconds Seconds since anything (heartbeat or other) arrived from the peer.");
    let _ = writeln!(out, "# TYPE dots_agent_peer_silence_seconds gauge");
    for p in view.peers_at(now) {
        if let Some(s) = p.silent_for {
            let _ = writeln!(
                out,
                "dots_agent_peer_silence_seconds{{peer=\"{}\"}} {s}",
                esc(&p.peer)
            );
        }
    }
    let _ = writeln!(out, "# HELP dots_agent_mitigations Mitigations by state.");
    let _ = writeln!(out, "# TYPE dots_agent_mitigations gauge");
    for state in MitigationState::ALL {
        let n = view
            .mitigations
            .values()
            .filter(|m| m.state == state)
            .count();
        let _ = writeln!(out, "dots_agent_mitigations{{state=\"{state}\"}} {n}");
    }
    for (name, help, value) in [
        (
            "dots_agent_dropped_packets_total",
            "Packets dropped for the mitigation.",
            0usize,
        ),
        (
            "dots_agent_dropped_bytes_total",
            "Bytes dropped for the mitigation.",
            1,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for m in view.mitigations.values() {
            let v = if value == 0 { m.packets } else { m.bytes };
            let _ = writeln!(
                out,
                "{name}{{peer=\"{}\",cuid=\"{}\",mid=\"{}\"}} {v}",
                m.peer,
                esc(&m.cuid),
                m.mid
            );
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, view: Arc<Mutex<AgentView>>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    info!(%addr, "Prometheus metrics at /metrics");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                let body = view
                    .lock()
                    .map(|v| render(&v, Instant::now()))
                    .unwrap_or_default();
                ("200 OK", body)
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::view::{PeerState, PeerStatus};

    #[test]
    fn renders_sessions_and_mitigations() {
        let view = AgentView {
            peers: vec![PeerStatus {
                peer: "isp.example:4647".into(),
                state: PeerState::Connected,
                sessions: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&view, Instant::now());
        assert!(
            text.contains("dots_agent_session_up{peer=\"isp.example:4647\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dots_agent_sessions_total{peer=\"isp.example:4647\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("dots_agent_mitigations{state=\"active\"} 0"),
            "{text}"
        );
    }
}
