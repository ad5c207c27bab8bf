//! The ISP-side service behind every door (HTTP API, control socket, the
//! detectors that use the API): it picks the agent for a mitigation from
//! the customer registry, checks the sources against that agent's prefixes,
//! hands out mids, keeps the book of mitigations, queues requests for
//! offline agents and sends them when they connect, re-sends what an agent
//! lost after a restart, and writes the audit trail.
//!
//! Every request either succeeds or changes nothing: checks come first,
//! then the mid, the book entry and the message to the agent.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use dots_proto::model::{
    validate_call_home_request, DotsMessage, Limits, MitigationScope, MitigationStatus,
    MitigationUri, Scope, ValidationError,
};
use ipnet::IpNet;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tracing::{info, warn};

use crate::{
    audit::{AuditLog, Entry, Principal},
    book::{Book, Counters, Mitigation, MitigationId, State},
    control::{AgentInfo, Reply},
    metrics::Metrics,
    mids::MidAllocator,
    registry::{Customer, CustomerRegistry, RegistryError},
    session::{Command, SessionEvent},
};

/// How long the service waits for an agent's answer before giving up on
/// it (the CoAP layer gives up earlier: RFC 7252 MAX_TRANSMIT_WAIT is 93 s
/// with the default parameters).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(100);

/// How often indefinite mitigations are checked for a refresh.
const REFRESH_CHECK: Duration = Duration::from_secs(15);

/// State shared with the other nodes of a cluster (etcd): without one, the
/// service keeps its state in the state directory alone, as it always did.
pub trait SharedState: Send + Sync {
    /// A mitigation changed on this node: publish it to the others.
    fn mitigation_changed(&self, m: &Mitigation);
    /// An agent's API prefixes were set (`Some`) or removed (`None`) here.
    fn prefixes_changed(&self, agent: &str, prefixes: Option<&[IpNet]>);
    /// A mid for a new request to `agent`, unique and increasing across
    /// every node.
    fn allocate_mid<'a>(
        &'a self,
        agent: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<u32, String>> + Send + 'a>>;
    /// The node that holds the agent's session, when it is another one.
    fn owner_elsewhere(&self, agent: &str) -> Option<String>;
    /// The node that holds the agent's session, this one included.
    fn owner(&self, agent: &str) -> Option<String>;
}

/// The shared state of a cluster node, as [`ServiceOptions`] takes it.
#[derive(Clone)]
pub struct Shared(pub Arc<dyn SharedState>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

/// How long a request made on one node waits for the node that holds the
/// agent to send it and write the answer back.
const REMOTE_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the service.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// The client identifier (cuid) of this client.
    pub cuid: String,
    /// Where the book, the mid counters and the API's customer entries
    /// live; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// The audit trail; `None`: `<state-dir>/audit.jsonl`, or no trail
    /// without a state directory.
    pub audit_log: Option<PathBuf>,
    /// Customer prefixes per agent, from the configuration.
    pub customers: BTreeMap<String, Vec<IpNet>>,
    /// The cluster's shared state; `None`: this node alone. With it, the
    /// book, the mids and the API prefixes live there, not in `state_dir`.
    pub shared: Option<Shared>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("customer registry: {0}")]
    Registry(#[from] crate::registry::LoadError),
    #[error("state: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request was refused, with the HTTP status every door maps it to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// 400: the request itself is wrong; `field` names the culprit.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    /// 403: the agent cannot be asked about these sources.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such agent, customer or mitigation.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with what is there (duplicate label, already
    /// withdrawn, overlapping prefixes).
    #[error("{message}")]
    Conflict {
        message: String,
        id: Option<MitigationId>,
    },
    /// The agent answered with an error code.
    #[error("the agent answered {code}: {diagnostic}")]
    AgentRefused {
        code: String,
        diagnostic: String,
        /// The answer's body (JSON form): a diagnostic, or the
        /// conflict-information of a 4.09 (RFC 9132 §4.4.1).
        body: serde_json::Value,
        id: Option<MitigationId>,
    },
    /// 504: the agent did not answer.
    #[error("{message}")]
    AgentTimeout {
        message: String,
        id: Option<MitigationId>,
    },
    /// 503: the agent must be connected for this (status, config, redirect).
    #[error("{0}")]
    NotConnected(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    fn bad(field: impl Into<String>, message: impl Into<String>) -> ServiceError {
        ServiceError::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::BadRequest { .. } => 400,
            ServiceError::Forbidden(_) => 403,
            ServiceError::NotFound(_) => 404,
            ServiceError::Conflict { .. } => 409,
            ServiceError::AgentRefused { code, .. } if code.starts_with("4.09") => 409,
            ServiceError::AgentRefused { code, .. } if code.starts_with('4') => 422,
            ServiceError::AgentRefused { .. } => 502,
            ServiceError::AgentTimeout { .. } => 504,
            ServiceError::NotConnected(_) => 503,
            ServiceError::Internal(_) => 500,
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            ServiceError::BadRequest { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// The mitigation the error is about, when there is one.
    pub fn id(&self) -> Option<&MitigationId> {
        match self {
            ServiceError::Conflict { id, .. }
            | ServiceError::AgentRefused { id, .. }
            | ServiceError::AgentTimeout { id, .. } => id.as_ref(),
            _ => None,
        }
    }
}

/// A new mitigation as any door hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMitigation {
    /// `None`: the agent whose customer prefixes contain the sources.
    pub agent: Option<String>,
    /// The one scope: sources, targets, ports or ICMP types, lifetime.
    pub scope: Scope,
    /// The requester's name for it, unique among unfinished mitigations.
    pub label: Option<String>,
}

/// What a successful request did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outcome {
    pub mitigation: Mitigation,
    /// True when the agent is offline and the request waits for it.
    pub queued: bool,
    /// The agent's CoAP answer, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coap: Option<String>,
    /// The agent's answer body (JSON form), when it answered.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub answer: Value,
}

/// What the service tells subscribers (the API's event stream).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServiceEvent {
    /// An agent connected or went away.
    Agent { agent: AgentInfo },
    /// A mitigation changed: state, status or counters.
    Mitigation { mitigation: Mitigation },
}

impl ServiceEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            ServiceEvent::Agent { .. } => "agent",
            ServiceEvent::Mitigation { .. } => "mitigation",
        }
    }
}

/// One connected agent.
struct Connected {
    info: AgentInfo,
    commands: mpsc::Sender<Command>,
    notifications: broadcast::Sender<Reply>,
    generation: u64,
}

/// The service. Shared (`Arc`) by the listener, the sessions' event loop,
/// the control socket and the API.
pub struct Service {
    cuid: String,
    registry: Mutex<CustomerRegistry>,
    agents: Mutex<BTreeMap<String, Connected>>,
    book: Mutex<Book>,
    mids: Mutex<MidAllocator>,
    audit: Option<AuditLog>,
    events: broadcast::Sender<ServiceEvent>,
    session_events: mpsc::UnboundedSender<SessionEvent>,
    metrics: Metrics,
    generation: AtomicU64,
    /// Wakes the task that writes the book (off the request path: an
    /// fsync takes milliseconds).
    persist: Arc<Notify>,
    shared: Option<Shared>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is a bug; the data is still the best
    // there is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The field (request name) a validation error is about.
fn field_of(e: &ValidationError) -> Option<&'static str> {
    Some(match e {
        ValidationError::Missing { field }
        | ValidationError::Duplicate { field, .. }
        | ValidationError::SpecialPrefix { field, .. }
        | ValidationError::RangeInverted { field, .. }
        | ValidationError::TooMany { field, .. } => field,
        ValidationError::TriggerMitigationFalse => "trigger-mitigation",
        ValidationError::InvalidLifetime { .. } => "lifetime",
        ValidationError::FamilyMismatch { .. } => "target-prefix",
        ValidationError::IdentifierInBody { name } => name,
        ValidationError::ScopeCount { .. } => "scope",
        ValidationError::OutsideDomain { .. } => "ietf-dots-call-home:source-prefix",
        _ => return None,
    })
}

/// The checks an agent makes (RFC 9132 §4.4.1, RFC 9066 §5.3.1), made
/// before anything is sent: "trigger-mitigation" false, a missing
/// source-prefix or target-prefix, host bits, special-use sources,
/// inverted ranges, mixed families. The agent's own limits still apply.
pub fn check_scope(scope: &Scope, cuid: &str) -> Result<(), ServiceError> {
    let req = MitigationScope {
        scopes: vec![scope.clone()],
    };
    let uri = MitigationUri {
        cdid: None,
        cuid: Some(cuid.to_string()),
        mid: Some("1".into()),
    };
    let limits = Limits {
        max_lifetime: None,
        max_prefixes: 1024,
        max_ranges: 1024,
        max_protocols: 256,
    };
    validate_call_home_request(&req, &uri, &limits).map_err(|e| ServiceError::BadRequest {
        field: field_of(&e).map(str::to_string),
        message: e.to_string(),
    })?;
    Ok(())
}

fn status_name(s: MitigationStatus) -> &'static str {
    match s {
        MitigationStatus::InProgress => "attack-mitigation-in-progress",
        MitigationStatus::SuccessfullyMitigated => "attack-successfully-mitigated",
        MitigationStatus::Stopped => "attack-stopped",
        MitigationStatus::ExceededCapability => "attack-exceeded-capability",
        MitigationStatus::ClientWithdrawn => "dots-client-withdrawn-mitigation",
        MitigationStatus::Terminated => "attack-mitigation-terminated",
        MitigationStatus::Withdrawn => "attack-mitigation-withdrawn",
        MitigationStatus::SignalLoss => "attack-mitigation-signal-loss",
    }
}

fn ended(s: MitigationStatus) -> bool {
    matches!(
        s,
        MitigationStatus::ClientWithdrawn
            | MitigationStatus::Terminated
            | MitigationStatus::Withdrawn
            | MitigationStatus::SignalLoss
    )
}

fn counters_of(scope: &Scope) -> Counters {
    Counters {
        pkts_dropped: scope.pkts_dropped,
        bytes_dropped: scope.bytes_dropped,
        pps_dropped: scope.pps_dropped,
        bps_dropped: scope.bps_dropped,
    }
}

/// The scopes of an answer body in JSON form.
fn answer_scopes(body: &Value) -> Vec<Scope> {
    MitigationScope::from_json(body)
        .map(|m| m.scopes)
        .unwrap_or_default()
}

/// The CoAP answer of a reply: code, and whether it is a success.
fn coap_of(r: &Reply) -> Option<(String, bool)> {
    r.code.as_ref().map(|c| (c.clone(), c.starts_with('2')))
}

fn diagnostic(r: &Reply) -> String {
    r.body["diagnostic"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| r.body.to_string())
}

/// An agent as `agents` shows it: its session (if connected), its
/// customer prefixes, its unfinished mitigations.
fn info(
    id: &str,
    connected: Option<&Connected>,
    customer: Option<&Customer>,
    open: &HashMap<String, usize>,
    shared: Option<&Shared>,
) -> AgentInfo {
    let mut info = connected
        .map(|c| c.info.clone())
        .unwrap_or_else(|| AgentInfo {
            id: id.to_string(),
            state: "offline".into(),
            ..AgentInfo::default()
        });
    if let Some(c) = customer {
        info.prefixes = c.prefixes.clone();
        info.prefixes_from = Some(c.origin);
    }
    info.mitigations = open.get(id).copied().unwrap_or(0);
    info.node = shared.and_then(|s| s.0.owner(id));
    info
}

impl Service {
    /// Starts the service and the task that applies what sessions report.
    pub fn start(opts: ServiceOptions) -> Result<Arc<Service>, StartError> {
        // A cluster node keeps the book and the API prefixes in the shared
        // state only: a local copy would come back stale after a failover.
        let local = if opts.shared.is_some() {
            None
        } else {
            opts.state_dir.clone()
        };
        let registry = CustomerRegistry::new(opts.customers, local.clone())?;
        let book = Book::load(local)?;
        let mids = MidAllocator::load(opts.state_dir.clone())?;
        let audit_path = opts
            .audit_log
            .or_else(|| opts.state_dir.as_ref().map(|d| d.join("audit.jsonl")));
        let audit = match audit_path {
            Some(path) => {
                Some(AuditLog::open(&path).map_err(|source| StartError::Audit { path, source })?)
            }
            None => None,
        };
        let (events, _) = broadcast::channel(4096);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let service = Arc::new(Service {
            cuid: opts.cuid,
            registry: Mutex::new(registry),
            agents: Mutex::default(),
            book: Mutex::new(book),
            mids: Mutex::new(mids),
            audit,
            events,
            session_events: tx,
            metrics: Metrics::default(),
            generation: AtomicU64::new(0),
            persist: Arc::new(Notify::new()),
            shared: opts.shared,
        });
        let restored = lock(&service.book)
            .iter()
            .filter(|m| !m.state.is_final())
            .count();
        if restored > 0 {
            info!(
                restored,
                "restored unfinished mitigations: sent or re-observed when their agents connect"
            );
        }
        service.book_changed();
        let weak = Arc::downgrade(&service);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(s) = weak.upgrade() else { return };
                s.on_session_event(ev);
            }
        });
        // The book's writer: one snapshot per wake-up, written in order, so
        // the file always holds a state the book was in.
        let weak = Arc::downgrade(&service);
        let wake = service.persist.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let Some(s) = weak.upgrade() else { return };
                let job = lock(&s.book).to_save();
                drop(s);
                let Some((path, file)) = job else { continue };
                match tokio::task::spawn_blocking(move || crate::store::write(&path, &file)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "saving the mitigations"),
                    Err(e) => warn!(error = %e, "saving the mitigations"),
                }
            }
        });
        // Refreshes of indefinite mitigations (see `Mitigation::refresh_at`).
        let weak = Arc::downgrade(&service);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                s.refresh_due().await;
            }
        });
        Ok(service)
    }

    /// Refreshes the indefinite mitigations whose granted lifetime is three
    /// quarters gone, on connected agents; returns how many were sent.
    pub async fn refresh_due(self: &Arc<Self>) -> usize {
        let now = unix_now();
        let due: Vec<Mitigation> = {
            let agents = lock(&self.agents);
            lock(&self.book)
                .iter()
                .filter(|m| m.refresh_at().is_some_and(|t| t <= now))
                .filter(|m| agents.contains_key(&m.agent))
                .cloned()
                .collect()
        };
        let by = Principal::service();
        for m in &due {
            let result = self.send_mitigation(&by, m, "refresh").await;
            self.audit_outcome(&by, "refresh", &result, json!({ "id": m.id }));
        }
        due.len()
    }

    /// Asks the writer to save the book.
    fn persist(&self) {
        self.persist.notify_one();
    }

    /// Saves the book now (on the way out).
    pub fn save(&self) {
        if let Err(e) = lock(&self.book).save() {
            warn!(error = %e, "saving the mitigations");
        }
    }

    /// This client's identifier (cuid), from its certificate.
    pub fn cuid(&self) -> &str {
        &self.cuid
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn audit_path(&self) -> Option<&std::path::Path> {
        self.audit.as_ref().map(|a| a.path())
    }

    /// Status changes and counters, for the API's event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.subscribe()
    }

    fn publish(&self, ev: ServiceEvent) {
        let _ = self.events.send(ev);
    }

    /// A mitigation changed here: tell the subscribers and the cluster.
    fn changed(&self, m: Mitigation) {
        if let Some(s) = &self.shared {
            s.0.mitigation_changed(&m);
        }
        self.publish(ServiceEvent::Mitigation { mitigation: m });
    }

    fn audit(&self, entry: Entry) {
        if let Some(a) = &self.audit {
            a.append(&entry);
        }
    }

    /// Audits and counts the outcome of a request.
    #[allow(clippy::too_many_arguments)]
    fn audit_request(
        &self,
        by: &Principal,
        action: &str,
        agent: Option<&str>,
        mid: Option<u32>,
        code: u16,
        coap: Option<String>,
        detail: Value,
    ) {
        self.metrics.request(by.via, action, code);
        let mut e = Entry::new("request");
        e.by = Some(by.clone());
        e.action = Some(action.to_string());
        e.agent = agent.map(str::to_string);
        e.mid = mid;
        e.code = Some(code);
        e.coap = coap;
        e.detail = detail;
        self.audit(e);
    }

    // ---- the cluster ----

    /// A request queued here for an agent that another node holds: that
    /// node sends it and writes the answer back; wait for it, so that the
    /// caller sees the agent's answer whichever node it asked.
    async fn await_owner(
        &self,
        events: Option<broadcast::Receiver<ServiceEvent>>,
        result: Result<Outcome, ServiceError>,
    ) -> Result<Outcome, ServiceError> {
        let (Some(mut events), Ok(o), Some(shared)) = (events, &result, &self.shared) else {
            return result;
        };
        if !o.queued || shared.0.owner_elsewhere(&o.mitigation.agent).is_none() {
            return result;
        }
        let id = o.mitigation.id.clone();
        let waiting = o.mitigation.state;
        let deadline = tokio::time::Instant::now() + REMOTE_ANSWER_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                // The owner's answer: sent (its time and code recorded
                // together), or over.
                Ok(Ok(ServiceEvent::Mitigation { mitigation: m }))
                    if m.id == id
                        && (m.state.is_final()
                            || (waiting == State::Queued
                                && m.state != waiting
                                && m.sent_at.is_some()
                                && m.last_code.is_some())) =>
                {
                    return Ok(Outcome {
                        queued: false,
                        coap: m.last_code.clone(),
                        mitigation: m,
                        answer: Value::Null,
                    });
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                // Not answered in time: it stays queued for the owner.
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return result,
            }
        }
    }

    /// A mitigation as another node wrote it. When this node holds the
    /// agent's session, a request waiting in it is sent now.
    pub fn apply_remote(self: &Arc<Self>, m: Mitigation) {
        let id = m.id.clone();
        let state = m.state;
        if lock(&self.book).get(&id) == Some(&m) {
            return;
        }
        lock(&self.book).insert(m.clone());
        self.book_changed();
        let act = matches!(state, State::Queued | State::WithdrawQueued)
            && lock(&self.agents).contains_key(&m.agent);
        self.publish(ServiceEvent::Mitigation { mitigation: m });
        if act {
            let s = self.clone();
            tokio::spawn(async move { s.flush(vec![id]).await });
        }
    }

    /// A finished mitigation another node swept from the shared state.
    pub fn forget_remote(&self, id: &MitigationId) {
        let removed = lock(&self.book).remove(id);
        if removed.is_some() {
            self.book_changed();
        }
    }

    /// An agent's API prefixes as another node set (`Some`) or removed
    /// (`None`) them.
    pub fn apply_remote_prefixes(&self, agent: &str, prefixes: Option<Vec<IpNet>>) {
        let mut registry = lock(&self.registry);
        let r = match prefixes {
            Some(p) => registry.set(agent, p).map(|_| ()),
            None => registry.remove(agent).map(|_| ()),
        };
        if let Err(e) = r {
            warn!(%agent, error = %e, "prefixes set on another node do not fit here");
        }
    }

    /// Sends the agent a Call Home redirect (RFC 9066 §5.2.2); its answer,
    /// or `None` when it is not connected here.
    pub async fn redirect_agent(
        &self,
        agent: &str,
        target: dots_proto::model::RedirectedSignal,
    ) -> Option<Reply> {
        let reply = self
            .ask(agent, "redirect", |reply| Command::Redirect {
                target,
                reply,
            })
            .await?;
        let mut e = Entry::new("request");
        e.by = Some(Principal::service());
        e.action = Some("drain-redirect".into());
        e.agent = Some(agent.to_string());
        e.coap = reply.code.clone();
        self.audit(e);
        Some(reply)
    }

    /// Whether this node holds a session of `agent`.
    pub fn is_connected(&self, agent: &str) -> bool {
        lock(&self.agents).contains_key(agent)
    }

    /// Ends the agent's session here (this node no longer owns it).
    pub fn close_session(&self, agent: &str) {
        let commands = lock(&self.agents).get(agent).map(|c| c.commands.clone());
        if let Some(c) = commands {
            tokio::spawn(async move {
                let _ = c.send(Command::Close).await;
            });
        }
    }

    // ---- sessions ----

    /// The channel sessions report on.
    pub(crate) fn session_events(&self) -> mpsc::UnboundedSender<SessionEvent> {
        self.session_events.clone()
    }

    /// A new session; returns its generation. Queued requests for the agent
    /// are sent now.
    pub(crate) fn session_started(
        self: &Arc<Self>,
        info: AgentInfo,
        commands: mpsc::Sender<Command>,
        notifications: broadcast::Sender<Reply>,
    ) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let id = info.id.clone();
        let previous = lock(&self.agents).insert(
            id.clone(),
            Connected {
                info: info.clone(),
                commands,
                notifications,
                generation,
            },
        );
        if previous.is_some() {
            info!(agent = %id, "replacing the agent's previous session");
        }
        self.metrics.session_started();
        self.metrics.set_agents_connected(lock(&self.agents).len());
        let mut e = Entry::new("agent");
        e.agent = Some(id.clone());
        e.detail = json!({"state": "connected", "addr": info.addr, "transport": info.transport});
        self.audit(e);
        if let Some(view) = self.agent(&id) {
            self.publish(ServiceEvent::Agent { agent: view });
        }
        // A cluster node may take the agent over from a node that died:
        // the active mitigations are sent again with their mids (the agent
        // answers 2.04 for those it holds), which confirms them and sets
        // this node's observation of them.
        let states: &[State] = if self.shared.is_some() {
            &[
                State::Queued,
                State::Pending,
                State::WithdrawQueued,
                State::Active,
            ]
        } else {
            &[State::Queued, State::Pending, State::WithdrawQueued]
        };
        let queued = lock(&self.book).of_agent(&id, states);
        if !queued.is_empty() {
            let s = self.clone();
            tokio::spawn(async move { s.flush(queued).await });
        }
        generation
    }

    /// The session of `generation` ended.
    pub(crate) fn session_ended(&self, agent: &str, generation: u64) {
        let removed = {
            let mut agents = lock(&self.agents);
            if agents
                .get(agent)
                .is_some_and(|c| c.generation == generation)
            {
                agents.remove(agent);
                true
            } else {
                false
            }
        };
        if removed {
            self.metrics.set_agents_connected(lock(&self.agents).len());
            let mut e = Entry::new("agent");
            e.agent = Some(agent.to_string());
            e.detail = json!({"state": "disconnected"});
            self.audit(e);
            if let Some(view) = self.agent(agent) {
                self.publish(ServiceEvent::Agent { agent: view });
            }
        }
    }

    /// Every connected session's command channel (to close them).
    pub(crate) fn sessions(&self) -> Vec<mpsc::Sender<Command>> {
        lock(&self.agents)
            .values()
            .map(|c| c.commands.clone())
            .collect()
    }

    pub fn connected_count(&self) -> usize {
        lock(&self.agents).len()
    }

    fn on_session_event(self: &Arc<Self>, ev: SessionEvent) {
        match ev {
            SessionEvent::Scopes { agent, scopes } => {
                for scope in scopes {
                    self.apply_scope(&agent, &scope);
                }
            }
            SessionEvent::Heartbeat {
                agent,
                generation,
                interval,
            } => {
                if let Some(c) = lock(&self.agents)
                    .get_mut(&agent)
                    .filter(|c| c.generation == generation)
                {
                    c.info.heartbeat_interval = Some(interval.as_secs());
                }
            }
            SessionEvent::Snapshot {
                agent,
                generation,
                mids,
            } => self.reconcile(&agent, generation, &mids),
        }
    }

    /// The agent's report on one of our mitigations.
    fn apply_scope(&self, agent: &str, scope: &Scope) {
        let Some(mid) = scope.mid else { return };
        let id = MitigationId {
            agent: agent.to_string(),
            mid,
        };
        let now = unix_now();
        let mut audits = Vec::new();
        let changed = {
            let mut book = lock(&self.book);
            let Some(m) = book.get_mut(&id) else {
                return;
            };
            if m.state.is_final() {
                return;
            }
            let before = m.clone();
            let counters = counters_of(scope);
            if counters != Counters::default() {
                m.counters = counters;
            }
            if let Some(status) = scope.status {
                let name = status_name(status).to_string();
                if m.status.as_deref() != Some(&name) {
                    let mut e = Entry::new("status");
                    e.agent = Some(agent.to_string());
                    e.mid = Some(mid);
                    e.detail = json!({"id": id, "from": m.status, "to": name});
                    audits.push(e);
                    m.status = Some(name);
                }
                if ended(status) && m.state != State::WithdrawQueued {
                    m.state = State::Ended;
                    m.reason = Some(format!("the agent reports {}", status_name(status)));
                    let mut e = Entry::new("final");
                    e.agent = Some(agent.to_string());
                    e.mid = Some(mid);
                    e.detail = json!({"id": id, "state": "ended", "counters": m.counters});
                    audits.push(e);
                } else if matches!(m.state, State::Pending | State::Queued) {
                    m.state = State::Active;
                }
            }
            if *m == before {
                None
            } else {
                m.updated_at = now;
                let snapshot = m.clone();
                // Counters change every notification: only state changes
                // are written to disk.
                if m.state != before.state {
                    self.persist();
                }
                Some(snapshot)
            }
        };
        for e in audits {
            self.audit(e);
        }
        if let Some(m) = changed {
            // States and the active mitigations' drop counters (metrics).
            self.book_changed();
            self.changed(m);
        }
    }

    /// What the agent holds at the start of a session, against the book:
    /// an active mitigation it no longer holds (it restarted without its
    /// state, or its lifetime ran out while the link was down) is sent
    /// again with the lifetime left.
    fn reconcile(self: &Arc<Self>, agent: &str, generation: u64, held: &[u32]) {
        let connected_at = match lock(&self.agents).get(agent) {
            Some(c) if c.generation == generation => c.info.connected_at.unwrap_or(0),
            _ => return,
        };
        let missing: Vec<MitigationId> = lock(&self.book)
            .iter()
            .filter(|m| {
                m.agent == agent
                    && m.state == State::Active
                    && !held.contains(&m.mid)
                    && m.sent_at.unwrap_or(0) < connected_at
            })
            .map(|m| m.id.clone())
            .collect();
        if missing.is_empty() {
            return;
        }
        info!(%agent, count = missing.len(), "the agent no longer holds some active mitigations: sending them again");
        let s = self.clone();
        tokio::spawn(async move { s.flush(missing).await });
    }

    /// Sends queued requests (and re-sends lost ones) to a connected agent.
    async fn flush(self: Arc<Self>, ids: Vec<MitigationId>) {
        let by = Principal::service();
        for id in ids {
            let Some(m) = lock(&self.book).get(&id).cloned() else {
                continue;
            };
            match m.state {
                State::WithdrawQueued => {
                    let _ = self.withdraw(&by, &id).await;
                }
                State::Queued | State::Pending | State::Active => {
                    let _ = self.send_mitigation(&by, &m, "send-queued").await;
                }
                _ => {}
            }
        }
    }

    // ---- views ----

    fn open_counts(&self) -> HashMap<String, usize> {
        let mut open: HashMap<String, usize> = HashMap::new();
        for m in lock(&self.book).iter().filter(|m| !m.state.is_final()) {
            *open.entry(m.agent.clone()).or_default() += 1;
        }
        open
    }

    /// Every agent that is connected or has customer prefixes.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let customers: BTreeMap<String, Customer> = lock(&self.registry)
            .all()
            .into_iter()
            .map(|c| (c.agent.clone(), c))
            .collect();
        let open = self.open_counts();
        let agents = lock(&self.agents);
        let mut ids: Vec<&String> = agents.keys().chain(customers.keys()).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                info(
                    id,
                    agents.get(id),
                    customers.get(id),
                    &open,
                    self.shared.as_ref(),
                )
            })
            .collect()
    }

    /// One agent, if connected or known to the registry.
    pub fn agent(&self, id: &str) -> Option<AgentInfo> {
        let customer = lock(&self.registry).get(id);
        let open = self.open_counts();
        let agents = lock(&self.agents);
        let connected = agents.get(id);
        if connected.is_none() && customer.is_none() {
            return None;
        }
        Some(info(
            id,
            connected,
            customer.as_ref(),
            &open,
            self.shared.as_ref(),
        ))
    }

    pub fn mitigation(&self, id: &MitigationId) -> Option<Mitigation> {
        lock(&self.book).get(id).cloned()
    }

    /// Mitigations, optionally of one agent, in one state, with one label.
    pub fn mitigations(
        &self,
        agent: Option<&str>,
        state: Option<State>,
        label: Option<&str>,
    ) -> Vec<Mitigation> {
        lock(&self.book)
            .iter()
            .filter(|m| agent.is_none_or(|a| m.agent == a))
            .filter(|m| state.is_none_or(|s| m.state == s))
            .filter(|m| label.is_none_or(|l| m.label.as_deref() == Some(l)))
            .cloned()
            .collect()
    }

    /// The connected agent named, or the only one connected; with its
    /// command and notification channels (status, config, redirect, watch).
    pub fn connected(
        &self,
        agent: Option<&str>,
    ) -> Result<(String, mpsc::Sender<Command>, broadcast::Sender<Reply>), ServiceError> {
        let agents = lock(&self.agents);
        let c = match agent {
            Some(id) => agents.get(id).ok_or_else(|| {
                if self.agent_known(id) {
                    ServiceError::NotConnected(format!("agent {id} is not connected"))
                } else {
                    ServiceError::NotFound(format!(
                        "no agent {id:?} is connected or registered (see `dots-client agents`)"
                    ))
                }
            })?,
            None => match agents.len() {
                1 => agents
                    .values()
                    .next()
                    .ok_or_else(|| ServiceError::NotConnected("no agent is connected".into()))?,
                0 => return Err(ServiceError::NotConnected("no agent is connected".into())),
                n => {
                    return Err(ServiceError::bad(
                        "agent",
                        format!("{n} agents are connected: name one with --agent"),
                    ))
                }
            },
        };
        Ok((
            c.info.id.clone(),
            c.commands.clone(),
            c.notifications.clone(),
        ))
    }

    fn agent_known(&self, id: &str) -> bool {
        lock(&self.registry).get(id).is_some()
    }

    fn book_changed(&self) {
        let book = lock(&self.book);
        let mut counts: HashMap<State, usize> = HashMap::new();
        let mut dropped = 0u64;
        for m in book.iter() {
            *counts.entry(m.state).or_default() += 1;
            if m.state == State::Active {
                dropped = dropped.saturating_add(m.counters.pkts_dropped.unwrap_or(0));
            }
        }
        drop(book);
        let per_state: Vec<(&str, usize)> = State::ALL
            .iter()
            .map(|s| (s.as_str(), counts.get(s).copied().unwrap_or(0)))
            .collect();
        self.metrics.set_book(&per_state, dropped);
    }

    // ---- requests ----

    /// Sends a command to the agent and waits for its answer.
    async fn ask(
        &self,
        agent: &str,
        kind: &str,
        make: impl FnOnce(oneshot::Sender<Reply>) -> Command,
    ) -> Option<Reply> {
        let commands = lock(&self.agents).get(agent).map(|c| c.commands.clone())?;
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        commands.send(make(tx)).await.ok()?;
        let reply = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Reply::error(format!("agent {agent} disconnected before answering")),
            Err(_) => Reply::error(format!(
                "agent {agent} did not answer within {ANSWER_TIMEOUT:?}"
            )),
        };
        self.metrics
            .agent_answer(kind, started.elapsed().as_secs_f64());
        Some(reply)
    }

    /// Creates a mitigation.
    pub async fn mitigate(
        self: &Arc<Self>,
        by: &Principal,
        req: NewMitigation,
    ) -> Result<Outcome, ServiceError> {
        let detail = json!({
            "label": req.label,
            "request": MitigationScope { scopes: vec![req.scope.clone()] }.to_json().ok(),
        });
        let events = self.shared.as_ref().map(|_| self.subscribe());
        let result = self.mitigate_checked(by, req).await;
        let result = self.await_owner(events, result).await;
        self.audit_outcome(by, "mitigate", &result, detail);
        result
    }

    fn audit_outcome(
        &self,
        by: &Principal,
        action: &str,
        result: &Result<Outcome, ServiceError>,
        mut detail: Value,
    ) {
        match result {
            Ok(o) => {
                let code = if o.queued {
                    202
                } else if action == "mitigate" {
                    201
                } else {
                    200
                };
                detail["id"] = json!(o.mitigation.id);
                detail["state"] = json!(o.mitigation.state);
                if action == "withdraw" {
                    detail["final-counters"] = json!(o.mitigation.counters);
                }
                self.audit_request(
                    by,
                    action,
                    Some(&o.mitigation.agent),
                    Some(o.mitigation.mid),
                    code,
                    o.coap.clone(),
                    detail,
                );
            }
            Err(e) => {
                detail["error"] = json!(e.to_string());
                if let Some(f) = e.field() {
                    detail["field"] = json!(f);
                }
                let coap = match e {
                    ServiceError::AgentRefused { code, .. } => Some(code.clone()),
                    _ => None,
                };
                self.audit_request(
                    by,
                    action,
                    e.id().map(|i| i.agent.as_str()),
                    e.id().map(|i| i.mid),
                    e.status(),
                    coap,
                    detail,
                );
            }
        }
    }

    fn resolve_agent(
        &self,
        agent: Option<&str>,
        sources: &[IpNet],
    ) -> Result<String, ServiceError> {
        let r = lock(&self.registry).resolve(agent, sources);
        r.map_err(|e| match e {
            RegistryError::NoCustomer(_) => ServiceError::NotFound(e.to_string()),
            RegistryError::NoPrefixes(ref a) => {
                if lock(&self.agents).contains_key(a) {
                    ServiceError::Forbidden(e.to_string())
                } else {
                    ServiceError::NotFound(format!(
                        "no agent {a:?} is connected or registered (see GET /v1/agents)"
                    ))
                }
            }
            RegistryError::SourceOutside { .. } | RegistryError::SeveralAgents(_) => {
                ServiceError::bad("source-prefix", e.to_string())
            }
            RegistryError::NoSource => ServiceError::bad("source-prefix", e.to_string()),
            other => ServiceError::bad("agent", other.to_string()),
        })
    }

    async fn mitigate_checked(
        self: &Arc<Self>,
        by: &Principal,
        req: NewMitigation,
    ) -> Result<Outcome, ServiceError> {
        check_scope(&req.scope, &self.cuid)?;
        if let Some(l) = &req.label {
            if l.trim().is_empty() || l.len() > 256 {
                return Err(ServiceError::bad("label", "a label is 1 to 256 characters"));
            }
        }
        let agent = self.resolve_agent(req.agent.as_deref(), &req.scope.source_prefix)?;
        // A cluster's mids come from the shared counter of the agent (a mid
        // lost to a refused request below is only a gap).
        let shared_mid = match &self.shared {
            Some(s) => Some(
                s.0.allocate_mid(&agent)
                    .await
                    .map_err(|e| ServiceError::Internal(format!("allocating a mid: {e}")))?,
            ),
            None => None,
        };
        let now = unix_now();
        // Lock order: agents before book, never the other way round.
        let connected = lock(&self.agents).contains_key(&agent);
        let record = {
            let mut book = lock(&self.book);
            if let Some(l) = &req.label {
                if let Some(open) = book.open_with_label(l) {
                    return Err(ServiceError::Conflict {
                        message: format!(
                            "mitigation {} labelled {l:?} is {} already: withdraw it first",
                            open.id,
                            open.state.as_str()
                        ),
                        id: Some(open.id.clone()),
                    });
                }
            }
            let mid = match shared_mid {
                Some(m) => m,
                None => lock(&self.mids)
                    .allocate(&agent)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            };
            let scope = Scope {
                lifetime: req.scope.lifetime.or(Some(3600)),
                ..req.scope.clone()
            };
            let request = MitigationScope {
                scopes: vec![scope.clone()],
            }
            .to_json()
            .map_err(|e| ServiceError::Internal(e.diagnostic()))?;
            let m = Mitigation {
                id: MitigationId {
                    agent: agent.clone(),
                    mid,
                },
                agent: agent.clone(),
                mid,
                label: req.label.clone(),
                requested_by: by.to_string(),
                request,
                lifetime: scope.lifetime.unwrap_or(3600),
                state: if connected {
                    State::Pending
                } else {
                    State::Queued
                },
                status: None,
                counters: Counters::default(),
                last_code: None,
                reason: None,
                created_at: now,
                updated_at: now,
                sent_at: None,
                granted: None,
            };
            book.insert(m.clone());
            self.persist();
            m
        };
        self.book_changed();
        self.changed(record.clone());
        if record.state == State::Queued {
            info!(id = %record.id, "agent offline: mitigation queued");
            return Ok(Outcome {
                mitigation: record,
                queued: true,
                coap: None,
                answer: Value::Null,
            });
        }
        self.send_mitigation(by, &record, "mitigate").await
    }

    /// Sends (or re-sends) a mitigation of the book and records the answer.
    async fn send_mitigation(
        &self,
        by: &Principal,
        m: &Mitigation,
        action: &str,
    ) -> Result<Outcome, ServiceError> {
        let now = unix_now();
        let lifetime = m.remaining_lifetime(now);
        if lifetime == 0 {
            let ended = self.finish(
                &m.id,
                State::Ended,
                "its lifetime ran out before it could be sent",
                None,
            );
            return Ok(Outcome {
                mitigation: ended.unwrap_or_else(|| m.clone()),
                queued: false,
                coap: None,
                answer: Value::Null,
            });
        }
        let mut scope = answer_scopes(&m.request)
            .into_iter()
            .next()
            .ok_or_else(|| {
                ServiceError::Internal(format!("{}: stored request unreadable", m.id))
            })?;
        scope.lifetime = Some(lifetime);
        let mid = m.mid;
        let reply = self
            .ask(&m.agent, "mitigate", |reply| Command::Mitigate {
                scope: Box::new(scope),
                mid,
                reply,
            })
            .await;
        let Some(reply) = reply else {
            // Went offline meanwhile: stays queued for the next session.
            let queued = self.set_state(&m.id, State::Queued, None, None);
            return Ok(Outcome {
                mitigation: queued.unwrap_or_else(|| m.clone()),
                queued: true,
                coap: None,
                answer: Value::Null,
            });
        };
        let Some((code, success)) = coap_of(&reply) else {
            let message = reply.error.clone().unwrap_or_else(|| "no answer".into());
            self.set_state(&m.id, State::Pending, None, Some(now));
            return Err(ServiceError::AgentTimeout {
                message: format!(
                    "{}: {message}; it stays pending and is sent again when the agent reconnects",
                    m.id
                ),
                id: Some(m.id.clone()),
            });
        };
        if !success {
            let diag = diagnostic(&reply);
            self.finish(&m.id, State::Rejected, &diag, Some(code.clone()));
            info!(id = %m.id, %code, diagnostic = %diag, by = %by, action, "the agent refused the mitigation");
            return Err(ServiceError::AgentRefused {
                code,
                diagnostic: diag,
                body: reply.body.clone(),
                id: Some(m.id.clone()),
            });
        }
        for scope in answer_scopes(&reply.body) {
            if let Some(granted) = scope.lifetime {
                if let Some(r) = lock(&self.book).get_mut(&m.id) {
                    r.granted = Some(granted);
                }
            }
            self.apply_scope(
                &m.agent,
                &Scope {
                    mid: Some(mid),
                    ..scope
                },
            );
        }
        let updated = self.set_state(&m.id, State::Active, Some(code.clone()), Some(now));
        Ok(Outcome {
            mitigation: updated.unwrap_or_else(|| m.clone()),
            queued: false,
            coap: Some(code),
            answer: reply.body,
        })
    }

    /// Moves an unfinished mitigation to `state`; returns it.
    fn set_state(
        &self,
        id: &MitigationId,
        state: State,
        code: Option<String>,
        sent_at: Option<u64>,
    ) -> Option<Mitigation> {
        let m = {
            let mut book = lock(&self.book);
            let m = book.get_mut(id)?;
            if m.state.is_final() {
                return Some(m.clone());
            }
            // A notification may have ended it already; never go back.
            if !(state == State::Active && m.state == State::Ended) {
                m.state = state;
            }
            if code.is_some() {
                m.last_code = code;
            }
            if sent_at.is_some() {
                m.sent_at = sent_at;
            }
            m.updated_at = unix_now();
            let m = m.clone();
            self.persist();
            m
        };
        self.book_changed();
        self.changed(m.clone());
        Some(m)
    }

    /// Ends a mitigation here (withdrawn, ended, rejected) and audits its
    /// final counters.
    fn finish(
        &self,
        id: &MitigationId,
        state: State,
        reason: &str,
        code: Option<String>,
    ) -> Option<Mitigation> {
        let m = {
            let mut book = lock(&self.book);
            let m = book.get_mut(id)?;
            m.state = state;
            m.reason = Some(reason.to_string());
            if code.is_some() {
                m.last_code = code;
            }
            m.updated_at = unix_now();
            let m = m.clone();
            self.persist();
            m
        };
        let mut e = Entry::new("final");
        e.agent = Some(m.agent.clone());
        e.mid = Some(m.mid);
        e.detail = json!({"id": m.id, "state": m.state, "reason": reason, "counters": m.counters});
        self.audit(e);
        self.book_changed();
        self.changed(m.clone());
        Some(m)
    }

    /// Withdraws a mitigation: DELETE to the agent (final counters in its
    /// answer), or dropped from the queue, or queued until the agent
    /// connects.
    pub async fn withdraw(
        self: &Arc<Self>,
        by: &Principal,
        id: &MitigationId,
    ) -> Result<Outcome, ServiceError> {
        let events = self.shared.as_ref().map(|_| self.subscribe());
        let result = self.withdraw_checked(id).await;
        let result = self.await_owner(events, result).await;
        self.audit_outcome(by, "withdraw", &result, json!({"id": id}));
        result
    }

    async fn withdraw_checked(&self, id: &MitigationId) -> Result<Outcome, ServiceError> {
        let m = lock(&self.book)
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("no mitigation {id}")))?;
        let done = |m: Mitigation, queued, coap, answer| Outcome {
            mitigation: m,
            queued,
            coap,
            answer,
        };
        match m.state {
            State::Withdrawn | State::Ended | State::Rejected => Err(ServiceError::Conflict {
                message: format!(
                    "mitigation {id} is {} already ({}): nothing to withdraw",
                    m.state.as_str(),
                    m.reason.as_deref().unwrap_or("no reason recorded")
                ),
                id: Some(id.clone()),
            }),
            State::Queued => {
                let m = self
                    .finish(id, State::Withdrawn, "withdrawn before it was sent", None)
                    .unwrap_or(m);
                Ok(done(m, false, None, Value::Null))
            }
            State::WithdrawQueued | State::Pending | State::Active => {
                let mid = m.mid;
                let Some(reply) = self
                    .ask(&m.agent, "withdraw", |reply| Command::Withdraw {
                        mid,
                        reply,
                    })
                    .await
                else {
                    if m.state == State::WithdrawQueued {
                        return Err(ServiceError::Conflict {
                            message: format!("a withdrawal of {id} is queued already: it is sent when agent {} connects", m.agent),
                            id: Some(id.clone()),
                        });
                    }
                    let m = self
                        .set_state(id, State::WithdrawQueued, None, None)
                        .unwrap_or(m);
                    return Ok(done(m, true, None, Value::Null));
                };
                let Some((code, success)) = coap_of(&reply) else {
                    return Err(ServiceError::AgentTimeout {
                        message: format!(
                            "{id}: {}; nothing changed",
                            reply.error.unwrap_or_default()
                        ),
                        id: Some(id.clone()),
                    });
                };
                if success {
                    for scope in answer_scopes(&reply.body) {
                        let counters = counters_of(&scope);
                        if let Some(m) = lock(&self.book).get_mut(id) {
                            if counters != Counters::default() {
                                m.counters = counters;
                            }
                        }
                    }
                    let m = self
                        .finish(id, State::Withdrawn, "withdrawn", Some(code.clone()))
                        .unwrap_or(m);
                    return Ok(done(m, false, Some(code), reply.body));
                }
                if code.starts_with("4.04") {
                    // The agent no longer has it (its lifetime ran out).
                    let m = self
                        .finish(
                            id,
                            State::Ended,
                            "the agent no longer holds it (4.04)",
                            Some(code.clone()),
                        )
                        .unwrap_or(m);
                    return Ok(done(m, false, Some(code), reply.body));
                }
                Err(ServiceError::AgentRefused {
                    diagnostic: diagnostic(&reply),
                    body: reply.body.clone(),
                    code,
                    id: Some(id.clone()),
                })
            }
        }
    }

    /// Updates (or refreshes) an unfinished mitigation with a new scope.
    pub async fn update(
        self: &Arc<Self>,
        by: &Principal,
        id: &MitigationId,
        scope: Scope,
    ) -> Result<Outcome, ServiceError> {
        let detail = json!({"id": id, "request": MitigationScope { scopes: vec![scope.clone()] }.to_json().ok()});
        let events = self.shared.as_ref().map(|_| self.subscribe());
        let result = self.update_checked(by, id, scope).await;
        let result = self.await_owner(events, result).await;
        self.audit_outcome(by, "update", &result, detail);
        result
    }

    async fn update_checked(
        &self,
        by: &Principal,
        id: &MitigationId,
        scope: Scope,
    ) -> Result<Outcome, ServiceError> {
        check_scope(&scope, &self.cuid)?;
        self.resolve_agent(Some(&id.agent), &scope.source_prefix)?;
        let m = {
            let mut book = lock(&self.book);
            let m = book
                .get_mut(id)
                .ok_or_else(|| ServiceError::NotFound(format!("no mitigation {id}")))?;
            if !matches!(m.state, State::Active | State::Pending | State::Queued) {
                return Err(ServiceError::Conflict {
                    message: format!(
                        "mitigation {id} is {}: it cannot be updated",
                        m.state.as_str()
                    ),
                    id: Some(id.clone()),
                });
            }
            m.request = MitigationScope {
                scopes: vec![scope.clone()],
            }
            .to_json()
            .map_err(|e| ServiceError::Internal(e.diagnostic()))?;
            m.lifetime = scope.lifetime.unwrap_or(3600);
            m.sent_at = None;
            m.created_at = unix_now();
            m.clone()
        };
        if !lock(&self.agents).contains_key(&m.agent) {
            let m = self.set_state(id, State::Queued, None, None).unwrap_or(m);
            return Ok(Outcome {
                mitigation: m,
                queued: true,
                coap: None,
                answer: Value::Null,
            });
        }
        self.send_mitigation(by, &m, "update").await
    }

    /// The mitigation with `mid`: of `agent`, or the only one with it.
    pub fn find(&self, agent: Option<&str>, mid: u32) -> Result<MitigationId, ServiceError> {
        if let Some(a) = agent {
            return Ok(MitigationId {
                agent: a.to_string(),
                mid,
            });
        }
        let book = lock(&self.book);
        let found = book.find_mid(mid);
        match found.as_slice() {
            [m] => Ok(m.id.clone()),
            [] => {
                // Not in the book: the only connected agent's, if any.
                drop(book);
                let (agent, _, _) = self.connected(None)?;
                Ok(MitigationId { agent, mid })
            }
            many => Err(ServiceError::bad(
                "agent",
                format!(
                    "{} agents have a mitigation {mid} ({}): name one with --agent",
                    many.len(),
                    many.iter()
                        .map(|m| m.agent.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    // ---- the registry ----

    /// Sets an agent's customer prefixes (API).
    pub fn set_prefixes(
        &self,
        by: &Principal,
        agent: &str,
        prefixes: Vec<IpNet>,
    ) -> Result<AgentInfo, ServiceError> {
        let r = lock(&self.registry)
            .set(agent, prefixes.clone())
            .map_err(|e| match e {
                crate::registry::SetError::Invalid(RegistryError::Overlap { .. }) => {
                    ServiceError::Conflict {
                        message: e.to_string(),
                        id: None,
                    }
                }
                crate::registry::SetError::Invalid(e) => {
                    ServiceError::bad("prefixes", e.to_string())
                }
                crate::registry::SetError::Store(e) => ServiceError::Internal(e.to_string()),
            });
        let code = r.as_ref().map_or_else(ServiceError::status, |_| 200);
        self.audit_request(
            by,
            "set-prefixes",
            Some(agent),
            None,
            code,
            None,
            json!({"prefixes": prefixes, "error": r.as_ref().err().map(|e| e.to_string())}),
        );
        r?;
        if let Some(s) = &self.shared {
            s.0.prefixes_changed(agent, Some(&prefixes));
        }
        self.agent(agent)
            .ok_or_else(|| ServiceError::Internal("agent vanished".into()))
    }

    /// Drops an agent's API prefixes (the file's apply again).
    pub fn remove_prefixes(&self, by: &Principal, agent: &str) -> Result<(), ServiceError> {
        let r = match lock(&self.registry).remove(agent) {
            Ok(true) => {
                if let Some(s) = &self.shared {
                    s.0.prefixes_changed(agent, None);
                }
                Ok(())
            }
            Ok(false) => Err(ServiceError::NotFound(format!(
                "agent {agent} has no prefixes set through the API"
            ))),
            Err(e) => Err(ServiceError::Conflict {
                message: e.to_string(),
                id: None,
            }),
        };
        let code = r.as_ref().map_or_else(ServiceError::status, |_| 200);
        self.audit_request(
            by,
            "remove-prefixes",
            Some(agent),
            None,
            code,
            None,
            Value::Null,
        );
        r
    }

    /// Replaces the configuration's customer entries (reload).
    pub fn reload_customers(
        &self,
        by: &Principal,
        customers: BTreeMap<String, Vec<IpNet>>,
    ) -> Result<(), ServiceError> {
        let n = customers.len();
        let r = lock(&self.registry)
            .replace_config(customers)
            .map_err(|e| ServiceError::bad("customer", e.to_string()));
        let code = r.as_ref().map_or_else(ServiceError::status, |_| 200);
        self.audit_request(
            by,
            "reload",
            None,
            None,
            code,
            None,
            json!({"customers": n}),
        );
        r
    }

    /// Audits a request refused before it reached the service proper (a
    /// body that does not parse).
    pub fn refuse(&self, by: &Principal, action: &str, agent: Option<&str>, e: &ServiceError) {
        let mut detail = json!({"error": e.to_string()});
        if let Some(f) = e.field() {
            detail["field"] = json!(f);
        }
        self.audit_request(by, action, agent, None, e.status(), None, detail);
    }

    /// Records a request that only reads (lists, the event stream,
    /// metrics): who looked at what, and the answer.
    pub fn audit_read(&self, by: &Principal, what: &str, code: u16) {
        self.audit_request(by, "read", None, None, code, None, json!({ "what": what }));
    }

    /// Records a request that went straight to an agent's session (status,
    /// config, redirect) in the trail.
    pub fn audit_passthrough(
        &self,
        by: &Principal,
        action: &str,
        agent: Option<&str>,
        reply: &Reply,
    ) {
        let code = if reply.ok { 200 } else { 502 };
        self.audit_request(
            by,
            action,
            agent,
            reply.mid,
            code,
            reply.code.clone(),
            Value::Null,
        );
    }
}

#[cfg(test)]
mod tests;
