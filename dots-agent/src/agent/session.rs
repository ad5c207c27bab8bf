//! One upstream peer: dial, run the signal channel, redial.
//!
//! The signal state machine (`dots_proto::signal::SignalServer`) survives
//! reconnections, so mitigations stay in force while the agent redials
//! (RFC 9066 §5.2.1: the agent dials again when the session is lost).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dots_proto::{
    coap::{DatagramConfig, DatagramEndpoint, Endpoint, StreamConfig, StreamEndpoint},
    model::RedirectedSignal,
    signal::{Action, ServerConfig, SignalServer},
};
use tracing::{debug, info, warn};

use super::{enforcer::slot_spec, enforcer::SlotKey, enforcer::SlotTable, PeerTarget};
use crate::transport::{Backoff, Connection, Dialer, Incoming, Transport, TransportError};

pub type Server = SignalServer<Box<dyn Endpoint + Send>>;

/// How a session ended.
enum Ended {
    /// No traffic from the peer for missing-hb-allowed intervals.
    Lost,
    /// The peer closed the connection, or it failed.
    Closed(String),
    /// The peer redirected us (RFC 9066 §5.2.2).
    Redirect(RedirectedSignal),
}

/// Everything one peer task needs.
pub struct PeerTask {
    pub index: usize,
    pub target: PeerTarget,
    pub transports: Vec<Transport>,
    pub dialer: Dialer,
    pub server_config: ServerConfig,
    pub enforcer: Option<Arc<Mutex<SlotTable>>>,
    pub seed: u64,
}

impl PeerTask {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2.0);
        let home = self.target.clone();
        // A redirect holds until its ttl runs out, then the configured peer applies again.
        let mut redirected_until: Option<Instant> = None;
        let mut server: Option<Server> = None;
        loop {
            if redirected_until.is_some_and(|t| Instant::now() >= t) {
                info!(peer = %home, "redirect ttl expired, returning to the configured peer");
                self.target = home.clone();
                redirected_until = None;
            }
            let conn = match self.connect().await {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(peer = %self.target, error = %e, retry_in = ?delay, "dial failed");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            backoff.reset();
            info!(
                peer = %self.target,
                addr = %conn.peer_addr(),
                transport = %conn.transport(),
                version = conn.protocol_version(),
                resumed = conn.session_reused(),
                identity = conn.peer_identity().as_deref().unwrap_or("?"),
                "signal channel up"
            );
            let now = Instant::now();
            self.seed = self.seed.wrapping_add(1);
            let ep = match endpoint(conn.transport(), self.seed) {
                Ok(ep) => ep,
                Err(e) => {
                    warn!(error = %e, "could not create the CoAP endpoint");
                    return;
                }
            };
            let s = match server.take() {
                Some(mut s) => match s.reconnect(now, ep) {
                    Ok(_) => s,
                    Err(e) => {
                        warn!(error = %e, "reconnect refused by the signal layer");
                        return;
                    }
                },
                None => match SignalServer::new(now, ep, self.server_config.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "invalid signal configuration");
                        return;
                    }
                },
            };
            let mut s = s;
            let ended = drive(&mut s, conn, self.index, self.enforcer.as_ref()).await;
            server = Some(s);
            match ended {
                Ended::Lost => {
                    warn!(peer = %self.target, "session lost: no traffic from the peer; redialling")
                }
                Ended::Closed(why) => {
                    warn!(peer = %self.target, reason = %why, "session closed; redialling")
                }
                Ended::Redirect(r) => {
                    info!(alt = %r.alt_ch_client, records = ?r.alt_ch_client_record, ttl = ?r.ttl, "redirected");
                    self.target = PeerTarget {
                        host: r.alt_ch_client.clone(),
                        port: self.target.port,
                        addrs: r.alt_ch_client_record.clone(),
                        name: Some(r.alt_ch_client.clone()),
                    };
                    redirected_until = r
                        .ttl
                        .map(|t| Instant::now() + Duration::from_secs(u64::from(t)));
                    continue; // dial the new peer at once
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn connect(&mut self) -> Result<Connection, TransportError> {
        let addrs = self.target.resolve().await;
        let candidates: Vec<(SocketAddr, Transport)> = addrs
            .iter()
            .flat_map(|a| self.transports.iter().map(move |t| (*a, *t)))
            .collect();
        let identity = self.target.identity();
        if let Some(e) = &self.enforcer {
            let ips: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
            if let Ok(mut t) = e.lock() {
                if let Err(err) = t.add_exempt(&ips) {
                    warn!(error = %err, "could not exempt the peer's addresses");
                }
            }
        }
        self.dialer.dial(&candidates, &identity).await
    }
}

fn endpoint(
    transport: Transport,
    seed: u64,
) -> Result<Box<dyn Endpoint + Send>, dots_proto::coap::CoapError> {
    Ok(match transport {
        Transport::Udp => Box::new(DatagramEndpoint::new(DatagramConfig::default(), seed)?),
        Transport::Tcp => Box::new(StreamEndpoint::new(StreamConfig::default(), seed)?),
    })
}

async fn flush(server: &mut Server, conn: &mut Connection) -> std::io::Result<()> {
    while let Some(bytes) = server.poll_transmit() {
        conn.send(&bytes).await?;
    }
    Ok(())
}

/// Runs one connection until it ends.
async fn drive(
    server: &mut Server,
    mut conn: Connection,
    peer: usize,
    enforcer: Option<&Arc<Mutex<SlotTable>>>,
) -> Ended {
    let end = run_connection(server, &mut conn, peer, enforcer).await;
    // Always say goodbye (close_notify): OpenSSL marks the session of a
    // connection dropped without it as not resumable, and the next dial
    // should resume.
    conn.close().await;
    end
}

async fn run_connection(
    server: &mut Server,
    conn: &mut Connection,
    peer: usize,
    enforcer: Option<&Arc<Mutex<SlotTable>>>,
) -> Ended {
    loop {
        if let Err(e) = flush(server, conn).await {
            return Ended::Closed(format!("send failed: {e}"));
        }
        while let Some(action) = server.poll_action() {
            if let Some(end) = perform(server, action, peer, enforcer) {
                let _ = flush(server, conn).await;
                return end;
            }
        }
        if let Err(e) = flush(server, conn).await {
            return Ended::Closed(format!("send failed: {e}"));
        }
        let deadline = server
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = conn.recv() => match got {
                Ok(Incoming::Datagram(bytes)) | Ok(Incoming::Stream(bytes)) => {
                    if let Err(e) = server.handle_input(Instant::now(), &bytes) {
                        debug!(error = %e, "input dropped");
                    }
                }
                Ok(Incoming::Closed) => return Ended::Closed("peer closed the connection".into()),
                Err(e) => return Ended::Closed(format!("receive failed: {e}")),
            },
            _ = tokio::time::sleep_until(deadline.into()) => server.handle_timeout(Instant::now()),
        }
    }
}

/// Carries out one action of the signal layer; returns how the session ends
/// when the action ends it.
fn perform(
    server: &mut Server,
    action: Action,
    peer: usize,
    enforcer: Option<&Arc<Mutex<SlotTable>>>,
) -> Option<Ended> {
    let now = Instant::now();
    let key_of = |cuid: &str, mid: u32| SlotKey {
        peer,
        cuid: cuid.to_string(),
        mid,
    };
    match action {
        Action::Install { key, request } => {
            let spec = slot_spec(&request);
            let result = match enforcer {
                Some(e) => e
                    .lock()
                    .map_err(|_| "slot table poisoned".to_string())
                    .and_then(|mut t| {
                        t.install(&key_of(&key.cuid, key.mid), spec)
                            .map_err(|e| e.to_string())
                    }),
                None => Err("no data plane".to_string()),
            };
            match result {
                Ok(slot) => {
                    info!(cuid = %key.cuid, mid = key.mid, slot, sources = ?request.scope.source_prefix,
                          targets = ?request.scope.target_prefix, lifetime = request.lifetime, "mitigation enforced");
                    let _ = server.installed(now, &key);
                }
                Err(reason) => {
                    warn!(cuid = %key.cuid, mid = key.mid, %reason, "mitigation could not be installed");
                    let _ = server.install_failed(now, &key);
                }
            }
        }
        Action::Remove { key } => {
            if let Some(e) = enforcer {
                if let Ok(mut t) = e.lock() {
                    match t.remove(&key_of(&key.cuid, key.mid)) {
                        Ok(Some(c)) => {
                            info!(cuid = %key.cuid, mid = key.mid, packets = c.packets, bytes = c.bytes, "mitigation removed")
                        }
                        Ok(None) => {}
                        Err(err) => {
                            warn!(cuid = %key.cuid, mid = key.mid, error = %err, "removing the mitigation failed")
                        }
                    }
                }
            }
        }
        Action::QueryCounters { keys } => {
            if let Some(e) = enforcer {
                for key in keys {
                    let c = e
                        .lock()
                        .ok()
                        .and_then(|mut t| t.counters(&key_of(&key.cuid, key.mid), now));
                    if let Some(c) = c {
                        let _ = server.counters(now, &key, c);
                    }
                }
            }
        }
        Action::AskConsent { key, request } => {
            // The consent workflow (approve / reject through the control
            // socket) lands with the agent's control interface; until then a
            // request waiting for consent stays pending and visible in logs.
            info!(cuid = %key.cuid, mid = key.mid, sources = ?request.scope.source_prefix, "mitigation awaits operator consent");
        }
        Action::Monitored { key, request } => {
            info!(cuid = %key.cuid, mid = key.mid, sources = ?request.scope.source_prefix,
                  targets = ?request.scope.target_prefix, lifetime = request.lifetime,
                  "monitor mode: mitigation validated and answered, nothing installed");
        }
        Action::Redirect { target } => return Some(Ended::Redirect(target)),
        Action::SessionLost => return Some(Ended::Lost),
        Action::Close => {
            server.endpoint_mut().close("closing");
            return Some(Ended::Closed("closed by the signal layer".into()));
        }
    }
    None
}
