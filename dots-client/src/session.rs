//! One agent's signal session on the ISP side: a `SignalClient` over the
//! agent's connection, driven by commands from the control socket.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use dots_proto::{
    coap::{
        DatagramConfig, DatagramEndpoint, Endpoint, MessageClass, ResponseType, StreamConfig,
        StreamEndpoint, Token,
    },
    model::{DotsMessage, MitigationScope, RedirectedSignal},
    signal::{Body, ClientConfig, ClientEvent, RequestKind, SignalClient},
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::control::{Reply, Request};
use dots_daemon::transport::{Connection, Incoming, Transport};

type Client = SignalClient<Box<dyn Endpoint + Send>>;

/// A control request for one agent, with where to send the answer.
pub enum Command {
    Mitigate {
        body: MitigationScope,
        mid: Option<u32>,
        reply: oneshot::Sender<Reply>,
    },
    Withdraw {
        mid: u32,
        reply: oneshot::Sender<Reply>,
    },
    Status {
        mid: Option<u32>,
        reply: oneshot::Sender<Reply>,
    },
    Config {
        reply: oneshot::Sender<Reply>,
    },
    Redirect {
        target: RedirectedSignal,
        reply: oneshot::Sender<Reply>,
    },
    /// End the session properly: the listener is stopping.
    Close,
}

impl Command {
    /// Parses the JSON bodies of a control request; errors name what is wrong.
    pub fn from_request(req: Request, reply: oneshot::Sender<Reply>) -> Result<Command, String> {
        Ok(match req {
            Request::Mitigate { scope, mid, .. } => {
                let body = MitigationScope::from_json(&scope)
                    .map_err(|e| format!("invalid mitigation request: {}", e.diagnostic()))?;
                if body.scopes.len() != 1 {
                    return Err(format!(
                        "a mitigation request carries exactly one scope, got {}",
                        body.scopes.len()
                    ));
                }
                Command::Mitigate { body, mid, reply }
            }
            Request::Withdraw { mid, .. } => Command::Withdraw { mid, reply },
            Request::Status { mid, .. } => Command::Status { mid, reply },
            Request::Config { .. } => Command::Config { reply },
            Request::Redirect { redirect, .. } => {
                let target = RedirectedSignal::from_json(&redirect)
                    .map_err(|e| format!("invalid redirect: {}", e.diagnostic()))?;
                Command::Redirect { target, reply }
            }
            Request::Agents | Request::Watch { .. } => return Err("not an agent command".into()),
        })
    }
}

/// "2.01 Created" style text of a response code (RFC 7252 §12.1.2 names).
pub(crate) fn code_text(code: ResponseType) -> String {
    let raw = u8::from(MessageClass::Response(code));
    let name = match (raw >> 5, raw & 0x1f) {
        (2, 1) => "Created",
        (2, 2) => "Deleted",
        (2, 3) => "Valid",
        (2, 4) => "Changed",
        (2, 5) => "Content",
        (4, 0) => "Bad Request",
        (4, 1) => "Unauthorized",
        (4, 2) => "Bad Option",
        (4, 3) => "Forbidden",
        (4, 4) => "Not Found",
        (4, 5) => "Method Not Allowed",
        (4, 6) => "Not Acceptable",
        (4, 8) => "Request Entity Incomplete",
        (4, 9) => "Conflict",
        (4, 12) => "Precondition Failed",
        (4, 13) => "Request Entity Too Large",
        (4, 15) => "Unsupported Content-Format",
        (4, 22) => "Unprocessable Entity",
        (5, 0) => "Internal Server Error",
        (5, 3) => "Service Unavailable",
        _ => "",
    };
    format!("{}.{:02} {name}", raw >> 5, raw & 0x1f)
        .trim_end()
        .to_string()
}

fn body_json(body: &Body) -> serde_json::Value {
    match body {
        Body::Empty => serde_json::Value::Null,
        Body::Mitigation(m) => m
            .to_json()
            .unwrap_or_else(|e| serde_json::json!({"undecodable": e.to_string()})),
        Body::Config(c) => c
            .to_json()
            .unwrap_or_else(|e| serde_json::json!({"undecodable": e.to_string()})),
        Body::Diagnostic(d) => serde_json::json!({"diagnostic": d}),
        Body::Invalid(e) => serde_json::json!({"invalid-body": e}),
    }
}

fn endpoint(transport: Transport, seed: u64) -> Option<Box<dyn Endpoint + Send>> {
    let ep: Box<dyn Endpoint + Send> = match transport {
        Transport::Udp => Box::new(DatagramEndpoint::new(DatagramConfig::default(), seed).ok()?),
        Transport::Tcp => Box::new(StreamEndpoint::new(StreamConfig::default(), seed).ok()?),
    };
    Some(ep)
}

/// Runs the session until the agent goes away.
pub(crate) async fn run(
    mut conn: Connection,
    agent: &str,
    cuid: &str,
    mut commands: mpsc::Receiver<Command>,
    notify: broadcast::Sender<Reply>,
) {
    let now = Instant::now();
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    // mids must keep increasing across restarts of this process (RFC 9132
    // §4.4.1): start from the clock.
    let config = ClientConfig {
        first_mid: (secs % u64::from(u32::MAX / 2)) as u32,
        ..ClientConfig::new(cuid)
    };
    let Some(ep) = endpoint(conn.transport(), secs ^ u64::from(std::process::id())) else {
        warn!(agent, "could not create the CoAP endpoint");
        return;
    };
    let mut client: Client = match SignalClient::new(now, ep, config) {
        Ok(c) => c,
        Err(e) => {
            warn!(agent, error = %e, "signal client refused its configuration");
            return;
        }
    };
    // Watch every mitigation of ours, for `dots-client watch`. The agent
    // answers 4.04 while there is none (RFC 9132 §4.4.2), which registers
    // nothing: the observation is set up again after each creation.
    let mut observe_all = start_observing(&mut client, agent, now);
    let mut pending: HashMap<Token, (oneshot::Sender<Reply>, Option<u32>)> = HashMap::new();
    loop {
        while let Some(ev) = client.poll_event() {
            tracing::trace!(agent, event = ?ev, "signal event");
            match ev {
                ClientEvent::Response {
                    token,
                    code,
                    body,
                    request,
                } => {
                    let success = is_success(code);
                    if observe_all == Some(token) && !success {
                        observe_all = None;
                    }
                    if success
                        && matches!(request, RequestKind::Mitigate { .. })
                        && observe_all.is_none()
                    {
                        observe_all = start_observing(&mut client, agent, Instant::now());
                    }
                    let reply = Reply {
                        ok: true,
                        code: Some(code_text(code)),
                        body: body_json(&body),
                        ..Reply::default()
                    };
                    match pending.remove(&token) {
                        Some((tx, mid)) => {
                            let _ = tx.send(Reply { mid, ..reply });
                        }
                        None => {
                            debug!(agent, ?request, code = %code_text(code), "unsolicited response");
                            let _ = notify.send(reply);
                        }
                    }
                }
                ClientEvent::Notification {
                    token, code, body, ..
                } => {
                    if observe_all == Some(token) && !is_success(code) {
                        observe_all = None; // an error notification ends the observation
                    }
                    let reply = Reply {
                        ok: true,
                        code: Some(code_text(code)),
                        body: body_json(&body),
                        ..Reply::default()
                    };
                    info!(agent, code = %code_text(code), body = %reply.body, "notification");
                    let _ = notify.send(reply);
                }
                ClientEvent::TimedOut { token, request } => {
                    warn!(agent, ?request, "request timed out");
                    if observe_all == Some(token) {
                        observe_all = None;
                    }
                    if let Some((tx, _)) = pending.remove(&token) {
                        let _ = tx.send(Reply::error("the agent did not answer in time"));
                    }
                }
                ClientEvent::PeerHeartbeat { peer_hb_status } => {
                    debug!(agent, peer_hb_status, "heartbeat from the agent");
                }
                ClientEvent::Closed => {
                    info!(agent, "the agent closed the session");
                    return;
                }
            }
        }
        // After the events: handling them may have queued requests.
        while let Some(bytes) = client.poll_transmit() {
            if let Err(e) = conn.send(&bytes).await {
                warn!(agent, error = %e, "send failed");
                return;
            }
        }
        let deadline = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = conn.recv() => match got {
                Ok(Incoming::Datagram(b)) | Ok(Incoming::Stream(b)) => {
                    if let Err(e) = client.handle_input(Instant::now(), &b) {
                        debug!(agent, error = %e, "input dropped");
                    }
                }
                Ok(Incoming::Closed) => { info!(agent, "connection closed"); return; }
                Err(e) => { warn!(agent, error = %e, "receive failed"); return; }
            },
            _ = tokio::time::sleep_until(deadline.into()) => client.handle_timeout(Instant::now()),
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                if matches!(cmd, Command::Close) {
                    client.endpoint_mut().close("the client is shutting down");
                    while let Some(bytes) = client.poll_transmit() {
                        let _ = conn.send(&bytes).await;
                    }
                    conn.close().await;
                    return;
                }
                issue(&mut client, cmd, &mut pending);
            }
        }
    }
}

fn issue(
    client: &mut Client,
    cmd: Command,
    pending: &mut HashMap<Token, (oneshot::Sender<Reply>, Option<u32>)>,
) {
    let now = Instant::now();
    let (result, reply, mid) = match cmd {
        Command::Mitigate { body, mid, reply } => {
            let scope = body.scopes.into_iter().next().unwrap_or_default();
            match mid {
                Some(m) => (client.update_mitigation(now, m, scope), reply, Some(m)),
                None => match client.request_mitigation(now, scope) {
                    Ok((m, t)) => (Ok(t), reply, Some(m)),
                    Err(e) => (Err(e), reply, None),
                },
            }
        }
        Command::Withdraw { mid, reply } => (client.withdraw(now, mid), reply, Some(mid)),
        Command::Status { mid, reply } => (client.get(now, mid), reply, mid),
        Command::Config { reply } => (client.get_config(now), reply, None),
        Command::Redirect { target, reply } => (client.redirect(now, &target), reply, None),
        Command::Close => return,
    };
    match result {
        Ok(token) => {
            pending.insert(token, (reply, mid));
        }
        Err(e) => {
            let _ = reply.send(Reply::error(e));
        }
    }
}

fn is_success(code: ResponseType) -> bool {
    u8::from(MessageClass::Response(code)) >> 5 == 2
}

fn start_observing(client: &mut Client, agent: &str, now: Instant) -> Option<Token> {
    match client.observe(now, None) {
        Ok(t) => {
            debug!(agent, token = ?t, "observing all mitigations");
            Some(t)
        }
        Err(e) => {
            warn!(agent, error = %e, "could not observe mitigations");
            None
        }
    }
}
