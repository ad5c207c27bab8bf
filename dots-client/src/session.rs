//! One agent's signal session on the ISP side: a `SignalClient` over the
//! agent's connection, driven by commands from the service.
//!
//! On start it fetches the agent's session configuration and follows the
//! heartbeat interval the agent sets (RFC 9066 §5.2.1: the Call Home DOTS
//! server adjusts it to the NAT and firewall binding timers on its path):
//! `idle-config` while none of our mitigations is active there,
//! `mitigating-config` while one is. It observes all of this client's
//! mitigations and reports what the agent says about them (status,
//! counters) to the service as [`SessionEvent`]s.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use dots_proto::{
    coap::{
        DatagramConfig, DatagramEndpoint, Endpoint, MessageClass, ResponseType, StreamConfig,
        StreamEndpoint, Token,
    },
    model::{DotsMessage, MitigationStatus, RedirectedSignal, Scope, SignalConfig},
    signal::{Body, ClientConfig, ClientEvent, RequestKind, SignalClient},
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::control::Reply;
use dots_daemon::transport::{Connection, Incoming, Transport};

type Client = SignalClient<Box<dyn Endpoint + Send>>;

/// A request for one agent, with where to send the answer.
pub enum Command {
    /// PUT with this mid: a new mitigation (the service allocates mids) or
    /// an update/refresh of one.
    Mitigate {
        scope: Box<Scope>,
        mid: u32,
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

/// What a session tells the service, besides answers to its commands.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    /// Mitigations as the agent reports them (answers and notifications).
    Scopes { agent: String, scopes: Vec<Scope> },
    /// The first answer to the observation of all our mitigations: the
    /// mids the agent holds for us at the start of this session.
    Snapshot {
        agent: String,
        generation: u64,
        mids: Vec<u32>,
    },
    /// The heartbeat interval now followed.
    Heartbeat {
        agent: String,
        generation: u64,
        interval: Duration,
    },
}

/// Who the session talks to and where it reports.
pub(crate) struct SessionContext {
    pub(crate) agent: String,
    pub(crate) generation: u64,
    pub(crate) cuid: String,
    pub(crate) commands: mpsc::Receiver<Command>,
    /// Every answer and notification, for `dots-client watch`.
    pub(crate) notify: broadcast::Sender<Reply>,
    pub(crate) events: mpsc::UnboundedSender<SessionEvent>,
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

/// Heartbeat intervals the agent set (RFC 9132 §4.5): one while no
/// mitigation is active, one while one is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Intervals {
    idle: Option<Duration>,
    mitigating: Option<Duration>,
}

impl Intervals {
    fn of(c: &SignalConfig) -> Intervals {
        let get = |set: &Option<dots_proto::model::ConfigSet>| {
            set.as_ref()
                .and_then(|s| s.heartbeat_interval.current)
                .filter(|v| *v > 0)
                .map(|v| Duration::from_secs(v.into()))
        };
        Intervals {
            idle: get(&c.idle_config),
            mitigating: get(&c.mitigating_config),
        }
    }

    fn pick(self, mitigating: bool) -> Option<Duration> {
        if mitigating {
            self.mitigating.or(self.idle)
        } else {
            self.idle.or(self.mitigating)
        }
    }
}

/// A status that means the agent is still mitigating.
fn is_active(status: Option<MitigationStatus>) -> bool {
    matches!(
        status,
        Some(
            MitigationStatus::InProgress
                | MitigationStatus::SuccessfullyMitigated
                | MitigationStatus::Stopped
                | MitigationStatus::ExceededCapability
        )
    )
}

/// Attempts at fetching the session configuration before keeping the
/// default heartbeat interval.
const CONFIG_ATTEMPTS: u32 = 3;

/// The state of one session besides the protocol machine.
struct Session {
    ctx: SessionContext,
    client: Client,
    /// The observation of all our mitigations.
    observe_all: Option<Token>,
    snapshot_sent: bool,
    config_token: Option<Token>,
    config_attempts: u32,
    intervals: Intervals,
    interval: Option<Duration>,
    /// Mids the agent reports active.
    active: HashSet<u32>,
    pending: HashMap<Token, (oneshot::Sender<Reply>, Option<u32>)>,
}

/// Runs the session until the agent goes away.
pub(crate) async fn run(mut conn: Connection, ctx: SessionContext) {
    let now = Instant::now();
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let agent = ctx.agent.clone();
    // Mids come from the service (persisted per agent), never from the
    // signal client's own counter.
    let config = ClientConfig::new(ctx.cuid.clone());
    let Some(ep) = endpoint(conn.transport(), secs ^ u64::from(std::process::id())) else {
        warn!(%agent, "could not create the CoAP endpoint");
        return;
    };
    let client: Client = match SignalClient::new(now, ep, config) {
        Ok(c) => c,
        Err(e) => {
            warn!(%agent, error = %e, "signal client refused its configuration");
            return;
        }
    };
    let mut s = Session {
        ctx,
        client,
        observe_all: None,
        snapshot_sent: false,
        config_token: None,
        config_attempts: 0,
        intervals: Intervals::default(),
        interval: None,
        active: HashSet::new(),
        pending: HashMap::new(),
    };
    // RFC 9066 §5.2.1: retrieve the session configuration first.
    s.fetch_config(now);
    // Watch every mitigation of ours: the first answer says what the agent
    // holds; it answers 4.04 while there is none (RFC 9132 §4.4.2), which
    // registers nothing, so the observation is set up again after each
    // creation.
    s.observe_all = start_observing(&mut s.client, &agent, now);
    loop {
        while let Some(ev) = s.client.poll_event() {
            tracing::trace!(%agent, event = ?ev, "signal event");
            if s.on_event(ev) {
                return;
            }
        }
        // After the events: handling them may have queued requests.
        while let Some(bytes) = s.client.poll_transmit() {
            if let Err(e) = conn.send(&bytes).await {
                warn!(%agent, error = %e, "send failed");
                return;
            }
        }
        let deadline = s
            .client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = conn.recv() => match got {
                Ok(Incoming::Datagram(b)) | Ok(Incoming::Stream(b)) => {
                    if let Err(e) = s.client.handle_input(Instant::now(), &b) {
                        debug!(%agent, error = %e, "input dropped");
                    }
                }
                Ok(Incoming::Closed) => { info!(%agent, "connection closed"); return; }
                Err(e) => { warn!(%agent, error = %e, "receive failed"); return; }
            },
            _ = tokio::time::sleep_until(deadline.into()) => s.client.handle_timeout(Instant::now()),
            cmd = s.ctx.commands.recv() => {
                let Some(cmd) = cmd else { return };
                if matches!(cmd, Command::Close) {
                    s.client.endpoint_mut().close("the client is shutting down");
                    while let Some(bytes) = s.client.poll_transmit() {
                        let _ = conn.send(&bytes).await;
                    }
                    conn.close().await;
                    return;
                }
                issue(&mut s.client, cmd, &mut s.pending);
            }
        }
    }
}

impl Session {
    fn fetch_config(&mut self, now: Instant) {
        self.config_attempts += 1;
        match self.client.get_config(now) {
            Ok(t) => self.config_token = Some(t),
            Err(e) => {
                warn!(agent = %self.ctx.agent, error = %e, "could not ask for the session configuration")
            }
        }
    }

    /// Follows the interval the agent set for the current state.
    fn follow_heartbeat(&mut self) {
        let Some(want) = self.intervals.pick(!self.active.is_empty()) else {
            return;
        };
        if self.interval == Some(want) {
            return;
        }
        self.interval = Some(want);
        self.client.set_heartbeat_interval(Instant::now(), want);
        info!(agent = %self.ctx.agent, interval = ?want, mitigating = !self.active.is_empty(), "following the agent's heartbeat interval");
        let _ = self.ctx.events.send(SessionEvent::Heartbeat {
            agent: self.ctx.agent.clone(),
            generation: self.ctx.generation,
            interval: want,
        });
    }

    fn on_config(&mut self, config: &SignalConfig) {
        self.intervals = Intervals::of(config);
        self.follow_heartbeat();
    }

    fn on_scopes(&mut self, scopes: &[Scope]) {
        for scope in scopes {
            if let Some(mid) = scope.mid {
                if is_active(scope.status) {
                    self.active.insert(mid);
                } else if scope.status.is_some() {
                    self.active.remove(&mid);
                }
            }
        }
        self.follow_heartbeat();
        let _ = self.ctx.events.send(SessionEvent::Scopes {
            agent: self.ctx.agent.clone(),
            scopes: scopes.to_vec(),
        });
    }

    /// Handles one event; true when the session is over.
    fn on_event(&mut self, ev: ClientEvent) -> bool {
        let agent = self.ctx.agent.clone();
        match ev {
            ClientEvent::Response {
                token,
                code,
                body,
                request,
            } => {
                let success = is_success(code);
                if self.config_token == Some(token) {
                    self.config_token = None;
                    if !success {
                        warn!(%agent, code = %code_text(code), "the agent refused to give its session configuration: keeping the default heartbeat interval");
                    }
                }
                if let Body::Config(c) = &body {
                    self.on_config(c);
                }
                if self.observe_all == Some(token) {
                    if !success {
                        self.observe_all = None;
                    }
                    if !self.snapshot_sent && (success || code == ResponseType::NotFound) {
                        self.snapshot_sent = true;
                        let mids = match &body {
                            Body::Mitigation(m) => m.scopes.iter().filter_map(|s| s.mid).collect(),
                            _ => Vec::new(),
                        };
                        let _ = self.ctx.events.send(SessionEvent::Snapshot {
                            agent: agent.clone(),
                            generation: self.ctx.generation,
                            mids,
                        });
                    }
                }
                if let RequestKind::Withdraw { mid } = request {
                    if success {
                        self.active.remove(&mid);
                        self.follow_heartbeat();
                    }
                } else if let Body::Mitigation(m) = &body {
                    self.on_scopes(&m.scopes);
                }
                if success
                    && matches!(request, RequestKind::Mitigate { .. })
                    && self.observe_all.is_none()
                {
                    self.observe_all = start_observing(&mut self.client, &agent, Instant::now());
                }
                let reply = Reply {
                    ok: true,
                    code: Some(code_text(code)),
                    body: body_json(&body),
                    ..Reply::default()
                };
                match self.pending.remove(&token) {
                    Some((tx, mid)) => {
                        let _ = tx.send(Reply { mid, ..reply });
                    }
                    None => {
                        debug!(%agent, ?request, code = %code_text(code), "unsolicited response");
                        let _ = self.ctx.notify.send(reply);
                    }
                }
            }
            ClientEvent::Notification {
                token, code, body, ..
            } => {
                if self.observe_all == Some(token) && !is_success(code) {
                    self.observe_all = None; // an error notification ends the observation
                }
                if let Body::Mitigation(m) = &body {
                    self.on_scopes(&m.scopes);
                }
                let reply = Reply {
                    ok: true,
                    code: Some(code_text(code)),
                    body: body_json(&body),
                    ..Reply::default()
                };
                info!(%agent, code = %code_text(code), body = %reply.body, "notification");
                let _ = self.ctx.notify.send(reply);
            }
            ClientEvent::TimedOut { token, request } => {
                warn!(%agent, ?request, "request timed out");
                if self.observe_all == Some(token) {
                    self.observe_all = None;
                }
                if self.config_token == Some(token) {
                    self.config_token = None;
                    if self.config_attempts < CONFIG_ATTEMPTS {
                        self.fetch_config(Instant::now());
                    }
                }
                if let Some((tx, _)) = self.pending.remove(&token) {
                    let _ = tx.send(Reply::error("the agent did not answer in time"));
                }
            }
            ClientEvent::PeerHeartbeat { peer_hb_status } => {
                debug!(%agent, peer_hb_status, "heartbeat from the agent");
            }
            ClientEvent::Closed => {
                info!(%agent, "the agent closed the session");
                return true;
            }
        }
        false
    }
}

fn issue(
    client: &mut Client,
    cmd: Command,
    pending: &mut HashMap<Token, (oneshot::Sender<Reply>, Option<u32>)>,
) {
    let now = Instant::now();
    let (result, reply, mid) = match cmd {
        Command::Mitigate { scope, mid, reply } => {
            (client.update_mitigation(now, mid, *scope), reply, Some(mid))
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

#[cfg(test)]
mod tests {
    use dots_proto::model::{ConfigSet, MinMaxCurrent};

    use super::*;

    #[test]
    fn heartbeat_interval_follows_idle_or_mitigating() {
        let set = |hb: u16| ConfigSet {
            heartbeat_interval: MinMaxCurrent::current(hb),
            ..ConfigSet::default()
        };
        let c = SignalConfig {
            sid: None,
            mitigating_config: Some(set(15)),
            idle_config: Some(set(90)),
        };
        let i = Intervals::of(&c);
        assert_eq!(i.pick(false), Some(Duration::from_secs(90)));
        assert_eq!(i.pick(true), Some(Duration::from_secs(15)));
        let only_idle = Intervals::of(&SignalConfig {
            mitigating_config: None,
            ..c
        });
        assert_eq!(only_idle.pick(true), Some(Duration::from_secs(90)));
        let zero = Intervals::of(&SignalConfig {
            idle_config: Some(set(0)),
            mitigating_config: None,
            ..c
        });
        assert_eq!(zero.pick(false), None, "0 is no interval");
        assert!(is_active(Some(MitigationStatus::SuccessfullyMitigated)));
        assert!(!is_active(Some(MitigationStatus::Withdrawn)));
        assert!(!is_active(None));
    }
}
