//! The ISP cluster: several `dots-client` nodes share the registry, the
//! book of mitigations and the mid counters through etcd, and own agents
//! through leases (see "ISP cluster" in docs/architecture.md).
//!
//! Keys, under `/dots/<cluster>/`:
//! - `nodes/<node>`: the node is up, with its load and where agents reach
//!   it (bound to its lease).
//! - `owners/<agent>`: the node holding the agent's session, bound to that
//!   node's lease, created only when absent: one owner per agent.
//! - `registry/<agent>`: the agent's API prefixes (JSON list).
//! - `mitigations/<agent>/<mid>`: one mitigation and the node that wrote it
//!   last; every write compares the revision it read (compare-and-swap).
//! - `mids/<agent>`: the agent's next mid, advanced by compare-and-swap.
//!
//! A node acts for an agent (sends it requests, writes its status) only
//! while its lease is certainly alive: when keep-alives fail for the lease's
//! time to live, less a margin, it closes the sessions of its agents before
//! etcd can expire the lease and give them to another node.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, Weak,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::{
    book::{Mitigation, MitigationId, State},
    service::{Service, SharedState},
};

/// Default `cluster.name`.
pub const DEFAULT_CLUSTER_NAME: &str = "default";
/// Default `cluster.lease-ttl` (seconds).
pub const DEFAULT_LEASE_TTL: u64 = 10;
/// How long finished mitigations stay in etcd (for `GET` on any node).
const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);
/// How often a node sweeps the finished mitigations older than that.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Settings of a cluster node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// etcd endpoints, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The cluster's name: the nodes of one cluster share it.
    pub cluster: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Seconds a node keeps its agents after its last keep-alive.
    pub lease_ttl: u64,
    /// What redirects to this node name (`alt-ch-client`); `None`: no
    /// agent can be redirected here.
    pub advertise: Option<String>,
    /// Where agents reach it (`alt-ch-client-record`).
    pub advertise_addresses: Vec<std::net::IpAddr>,
}

/// A node as its key shows it to the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name in redirects (`alt-ch-client`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Where agents reach it (`alt-ch-client-record`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Agents it holds.
    pub agents: usize,
    /// It takes no new agents (`dots-client drain`).
    #[serde(default)]
    pub draining: bool,
    /// The client identifier it speaks as (cuid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuid: Option<String>,
}

/// What `dots-client drain` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Agents redirected, per node.
    pub redirected: BTreeMap<String, usize>,
    /// Agents that refused or did not answer, with the reason.
    pub failed: BTreeMap<String, String>,
    /// The node now takes no new agents.
    pub draining: bool,
}

/// Why the node could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd ({endpoints}): {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "node {0:?} is up already in this cluster (its key exists): give this node another name"
    )]
    NameTaken(String),
    #[error("node {node:?} of this cluster speaks as client {theirs}, this node as {ours}: every node needs the same client certificate key (agents key mitigations by it)")]
    OtherIdentity {
        node: String,
        theirs: String,
        ours: String,
    },
}

/// A mitigation as stored: with the node that wrote it, so that a node
/// skips its own writes when they come back through the watch.
#[derive(Serialize, Deserialize)]
struct Stored {
    node: String,
    mitigation: Mitigation,
}

/// What the writer task writes.
enum Write {
    /// The mitigation as the book holds it when written: changes reach the
    /// writer from several tasks, and a snapshot taken by one could arrive
    /// after a newer one taken by another.
    Mitigation(MitigationId),
    Prefixes(String, Option<Vec<IpNet>>),
}

/// A cluster node.
pub struct Cluster {
    opts: ClusterOptions,
    client: Client,
    /// `/dots/<cluster>/`.
    prefix: String,
    /// The current lease; 0: none.
    lease: AtomicI64,
    /// Until when this node may act for its agents: the lease is alive at
    /// least until then.
    valid_until: Mutex<Option<Instant>>,
    /// The lease lapsed here (the node let its agents go): a new one is
    /// needed before acting again.
    lapsed: AtomicBool,
    /// The node is stopping: no new lease.
    leaving: AtomicBool,
    /// Every node up, as the watch reports them.
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    /// Takes no new agents.
    draining: AtomicBool,
    /// The agent count last written to the node's key.
    published: Mutex<Option<NodeInfo>>,
    /// Every agent's owner, as the watch reports it.
    /// (node, revision of its key).
    owners: Mutex<HashMap<String, (String, i64)>>,
    /// Agents whose owner key this node created.
    /// With the revision of the claim: an older event about the key (the
    /// previous owner's removal, seen late) does not end the session.
    owned: Mutex<HashMap<String, i64>>,
    /// Agents whose claim is on its way to etcd.
    claiming: Mutex<HashSet<String>>,
    /// Mod revision of each mitigation key, as last read or written.
    revisions: Mutex<HashMap<String, i64>>,
    /// Wakes the claims waiting for an agent's owner to go.
    owners_freed: Notify,
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
    service: OnceLock<Weak<Service>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An agent identity as one key segment: `%` and `/` escaped.
pub fn escape(agent: &str) -> String {
    agent.replace('%', "%25").replace('/', "%2F")
}

fn unescape(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

/// The time to live, less the margin a node stops acting before its lease
/// could expire (clocks of etcd and the node run at the same rate; the
/// margin covers the keep-alive's trip).
fn acting_span(ttl: u64) -> Duration {
    let ttl = Duration::from_secs(ttl);
    ttl - (ttl / 4).min(Duration::from_secs(2))
}

/// One key of the cluster, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Node(String),
    Owner(String),
    Registry(String),
    Mitigation(String),
    Other,
}

/// The mitigation of a key below `mitigations/`: `<agent>/<mid>`.
fn mitigation_id(rest: &str) -> Option<MitigationId> {
    let (agent, mid) = rest.strip_prefix("mitigations/")?.rsplit_once('/')?;
    Some(MitigationId {
        agent: unescape(agent),
        mid: mid.parse().ok()?,
    })
}

fn parse_key(prefix: &str, key: &[u8]) -> Key {
    let Some(rest) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
    else {
        return Key::Other;
    };
    if let Some(n) = rest.strip_prefix("nodes/") {
        Key::Node(n.to_string())
    } else if let Some(a) = rest.strip_prefix("owners/") {
        Key::Owner(unescape(a))
    } else if let Some(a) = rest.strip_prefix("registry/") {
        Key::Registry(unescape(a))
    } else if rest.starts_with("mitigations/") {
        Key::Mitigation(rest.to_string())
    } else {
        Key::Other
    }
}

impl Cluster {
    /// Connects to etcd (the node takes no lease yet: see [`start`](Self::start)).
    pub async fn connect(opts: ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // etcd's fsync can stall for a second or two on a busy disk.
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&opts.endpoints, Some(options))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: opts.endpoints.join(","),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            prefix: format!("/dots/{}/", opts.cluster),
            opts,
            client,
            lease: AtomicI64::new(0),
            valid_until: Mutex::new(None),
            lapsed: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            owners: Mutex::default(),
            nodes: Mutex::default(),
            draining: AtomicBool::new(false),
            published: Mutex::new(None),
            owned: Mutex::default(),
            claiming: Mutex::default(),
            revisions: Mutex::default(),
            owners_freed: Notify::new(),
            writes: tx,
            writes_rx: Mutex::new(Some(rx)),
            service: OnceLock::new(),
        }))
    }

    fn etcd(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Etcd {
            endpoints: self.opts.endpoints.join(","),
            source,
        }
    }

    fn node_key(&self) -> String {
        format!("{}nodes/{}", self.prefix, self.opts.node)
    }

    fn owner_key(&self, agent: &str) -> String {
        format!("{}owners/{}", self.prefix, escape(agent))
    }

    fn mitigation_key(&self, agent: &str, mid: u32) -> String {
        format!("{}mitigations/{}/{:010}", self.prefix, escape(agent), mid)
    }

    fn registry_key(&self, agent: &str) -> String {
        format!("{}registry/{}", self.prefix, escape(agent))
    }

    fn mids_key(&self, agent: &str) -> String {
        format!("{}mids/{}", self.prefix, escape(agent))
    }

    /// Whether the lease is certainly alive now: the node may act.
    pub fn acting(&self) -> bool {
        !self.lapsed.load(Ordering::SeqCst)
            && lock(&self.valid_until).is_some_and(|t| Instant::now() < t)
    }

    /// Whether the node takes agents: in touch with etcd, not draining.
    pub fn accepting(&self) -> bool {
        self.acting() && !self.draining.load(Ordering::SeqCst)
    }

    /// Moves this node's agents to the least loaded other nodes with the
    /// Call Home redirect (RFC 9066 §5.2.2): all of them, and then the node
    /// takes no new agents (maintenance), or at most `max` (shedding load).
    /// `ttl`: how long the agents hold the redirect.
    pub async fn drain(&self, max: Option<usize>, ttl: u32) -> Result<DrainReport, String> {
        type Target = (usize, String, String, Vec<std::net::IpAddr>);
        let mut targets: Vec<Target> = lock(&self.nodes)
            .iter()
            .filter(|(n, i)| **n != self.opts.node && !i.draining)
            .filter_map(|(n, i)| {
                Some((
                    i.agents,
                    n.clone(),
                    i.advertise.clone()?,
                    i.addresses.clone(),
                ))
            })
            .collect();
        if targets.is_empty() {
            return Err(
                "no other node takes agents (up, not draining, with an advertised name)".into(),
            );
        }
        let service = self.service().ok_or("the service is gone")?;
        let mut report = DrainReport::default();
        if max.is_none() {
            self.draining.store(true, Ordering::SeqCst);
            report.draining = true;
            self.publish().await;
        }
        let mut agents: Vec<String> = lock(&self.owned).keys().cloned().collect();
        agents.sort();
        agents.truncate(max.unwrap_or(usize::MAX));
        for agent in agents {
            targets.sort();
            let Some((load, node, advertise, addresses)) = targets.first_mut() else {
                break;
            };
            let target = dots_proto::model::RedirectedSignal {
                alt_ch_client: advertise.clone(),
                alt_ch_client_record: addresses.clone(),
                ttl: Some(ttl),
            };
            match service.redirect_agent(&agent, target).await {
                Some(r) if r.ok && r.code.as_deref().is_some_and(|c| c.starts_with('2')) => {
                    *load += 1;
                    *report.redirected.entry(node.clone()).or_default() += 1;
                }
                Some(r) => {
                    let why = r.code.or(r.error).unwrap_or_else(|| "no answer".into());
                    report.failed.insert(agent, why);
                }
                None => {
                    report.failed.insert(agent, "not connected here".into());
                }
            }
        }
        info!(
            redirected = report.redirected.values().sum::<usize>(),
            failed = report.failed.len(),
            draining = report.draining,
            "drained"
        );
        Ok(report)
    }

    /// Takes the node's lease, loads the shared state into `service`, and
    /// starts the tasks that keep the lease, follow the state and write it.
    pub async fn start(self: &Arc<Self>, service: &Arc<Service>) -> Result<(), ClusterError> {
        let _ = self.service.set(Arc::downgrade(service));
        // A node restarted right after it died finds its own key, bound to
        // the old lease: wait that lease out.
        let deadline = Instant::now() + Duration::from_secs(self.opts.lease_ttl + 2);
        loop {
            match self.take_lease().await {
                Err(ClusterError::NameTaken(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => break r?,
            }
        }
        let revision = self.load().await?;
        let ours = service.cuid().to_string();
        let other = lock(&self.nodes).iter().find_map(|(n, i)| {
            let theirs = i.cuid.as_ref()?;
            (*theirs != ours).then(|| (n.clone(), theirs.clone()))
        });
        if let Some((node, theirs)) = other {
            self.leave().await;
            return Err(ClusterError::OtherIdentity { node, theirs, ours });
        }
        // The tasks hold the node for as long as the process runs.
        tokio::spawn(keep_lease(self.clone()));
        tokio::spawn(guard(self.clone()));
        tokio::spawn(follow(self.clone(), revision));
        tokio::spawn(sweep(self.clone()));
        if let Some(rx) = lock(&self.writes_rx).take() {
            tokio::spawn(writer(self.clone(), rx));
        }
        info!(node = %self.opts.node, cluster = %self.opts.cluster, lease_ttl = self.opts.lease_ttl, "joined the cluster");
        Ok(())
    }

    /// What the node's key says now.
    fn info(&self) -> NodeInfo {
        NodeInfo {
            advertise: self.opts.advertise.clone(),
            addresses: self.opts.advertise_addresses.clone(),
            agents: lock(&self.owned).len(),
            draining: self.draining.load(Ordering::SeqCst),
            cuid: self.service().map(|s| s.cuid().to_string()),
        }
    }

    /// Rewrites the node's key when its agent count or state changed.
    async fn publish(&self) {
        let info = self.info();
        if lock(&self.published).as_ref() == Some(&info) || !self.acting() {
            return;
        }
        let lease = self.lease.load(Ordering::SeqCst);
        let mut c = self.client.clone();
        let put = c
            .put(
                self.node_key(),
                serde_json::to_vec(&info).unwrap_or_default(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await;
        if put.is_ok() {
            *lock(&self.published) = Some(info);
        }
    }

    /// A new lease and the node's key bound to it.
    async fn take_lease(&self) -> Result<(), ClusterError> {
        let mut c = self.client.clone();
        let sent = Instant::now();
        let ttl = i64::try_from(self.opts.lease_ttl).unwrap_or(i64::MAX);
        let lease = c.lease_grant(ttl, None).await.map_err(|e| self.etcd(e))?;
        let key = self.node_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                serde_json::to_vec(&self.info()).unwrap_or_default(),
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let r = c.txn(txn).await.map_err(|e| self.etcd(e))?;
        if !r.succeeded() {
            let _ = c.lease_revoke(lease.id()).await;
            return Err(ClusterError::NameTaken(self.opts.node.clone()));
        }
        self.lease.store(lease.id(), Ordering::SeqCst);
        *lock(&self.valid_until) = Some(sent + acting_span(self.opts.lease_ttl));
        *lock(&self.published) = Some(self.info());
        Ok(())
    }

    /// Reads the whole shared state into the service; returns the revision
    /// read, to watch from.
    async fn load(&self) -> Result<i64, ClusterError> {
        let mut c = self.client.clone();
        let r = c
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.etcd(e))?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let mut owners = HashMap::new();
        let mut nodes = BTreeMap::new();
        for kv in r.kvs() {
            match parse_key(&self.prefix, kv.key()) {
                Key::Owner(agent) => {
                    let node = String::from_utf8_lossy(kv.value()).into_owned();
                    owners.insert(agent, (node, kv.mod_revision()));
                }
                Key::Node(n) => {
                    nodes.insert(n, serde_json::from_slice(kv.value()).unwrap_or_default());
                }
                _ => {}
            }
        }
        *lock(&self.nodes) = nodes;
        let lost: Vec<String> = lock(&self.owned)
            .iter()
            .filter(|(a, claimed)| {
                **claimed <= revision && owners.get(*a).map(|o| &o.0) != Some(&self.opts.node)
            })
            .map(|(a, _)| a.clone())
            .collect();
        *lock(&self.owners) = owners;
        for agent in lost {
            lock(&self.owned).remove(&agent);
            if let Some(s) = self.service() {
                warn!(%agent, "no longer the agent's owner: closing its session");
                s.close_session(&agent);
            }
        }
        for kv in r.kvs() {
            self.apply(kv, false);
        }
        Ok(revision)
    }

    fn service(&self) -> Option<Arc<Service>> {
        self.service.get().and_then(Weak::upgrade)
    }

    /// A key another node (or etcd) changed; `deleted`: it is gone.
    fn apply(&self, kv: &KeyValue, deleted: bool) {
        let Some(service) = self.service() else {
            return;
        };
        match parse_key(&self.prefix, kv.key()) {
            Key::Node(n) => {
                if deleted {
                    lock(&self.nodes).remove(&n);
                } else {
                    let info = serde_json::from_slice(kv.value()).unwrap_or_default();
                    lock(&self.nodes).insert(n, info);
                }
            }
            Key::Owner(agent) => {
                let owner = (!deleted).then(|| String::from_utf8_lossy(kv.value()).into_owned());
                let revision = kv.mod_revision();
                match &owner {
                    Some(o) => {
                        lock(&self.owners).insert(agent.clone(), (o.clone(), revision));
                    }
                    None => {
                        lock(&self.owners).remove(&agent);
                        self.owners_freed.notify_waiters();
                    }
                }
                // Lost it (lease revoked, key removed by hand): stop
                // speaking for the agent at once.
                let lost = owner.as_deref() != Some(self.opts.node.as_str()) && {
                    let mut owned = lock(&self.owned);
                    match owned.get(&agent) {
                        Some(claimed) if revision > *claimed => owned.remove(&agent).is_some(),
                        _ => false,
                    }
                };
                if lost {
                    warn!(%agent, owner = ?owner, "no longer the agent's owner: closing its session");
                    service.close_session(&agent);
                }
            }
            Key::Registry(agent) => {
                let prefixes = if deleted {
                    None
                } else {
                    match serde_json::from_slice::<Vec<IpNet>>(kv.value()) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            warn!(%agent, error = %e, "unreadable prefixes in etcd: ignored");
                            return;
                        }
                    }
                };
                service.apply_remote_prefixes(&agent, prefixes);
            }
            Key::Mitigation(key) => {
                let full = format!("{}{key}", self.prefix);
                if deleted {
                    lock(&self.revisions).remove(&full);
                    if let Some(id) = mitigation_id(&key) {
                        service.forget_remote(&id);
                    }
                    return;
                }
                // Never back: this node's own write may be newer than an
                // event still on its way.
                let mut revisions = lock(&self.revisions);
                let known = revisions.entry(full).or_insert(0);
                *known = (*known).max(kv.mod_revision());
                drop(revisions);
                match serde_json::from_slice::<Stored>(kv.value()) {
                    Ok(s) if s.node == self.opts.node => {}
                    Ok(s) => {
                        debug!(id = %s.mitigation.id, from = %s.node, state = ?s.mitigation.state, revision = kv.mod_revision(), "mitigation written by another node");
                        service.apply_remote(s.mitigation)
                    }
                    Err(e) => {
                        warn!(key = %key, error = %e, "unreadable mitigation in etcd: ignored")
                    }
                }
            }
            Key::Other => {}
        }
    }

    /// Claims the agent for this node before its session starts: true when
    /// the node owns it now. While another node holds it (a node that died
    /// holds it until its lease expires), waits up to the lease's time to
    /// live for it to be freed; false then, or when etcd is out of reach
    /// (the session is refused and the agent dials again).
    pub async fn claim(&self, agent: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(self.opts.lease_ttl + 2);
        loop {
            // Registered before the attempt: a release in between wakes it.
            let freed = self.owners_freed.notified();
            match self.try_claim(agent).await {
                Some(won) if won => return true,
                Some(_) if Instant::now() < deadline => {}
                _ => {
                    let owner = lock(&self.owners).get(agent).map(|o| o.0.clone());
                    info!(%agent, owner = ?owner, "another node holds the agent: refusing this session");
                    return false;
                }
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            let _ = tokio::time::timeout(wait, freed).await;
        }
    }

    /// One attempt: `Some(won)`, or `None` when etcd cannot tell.
    async fn try_claim(&self, agent: &str) -> Option<bool> {
        if !self.acting() {
            warn!(%agent, "not in touch with etcd: refusing the agent");
            return None;
        }
        if self.draining.load(Ordering::SeqCst) {
            info!(%agent, "draining: refusing the agent");
            return None;
        }
        let lease = self.lease.load(Ordering::SeqCst);
        let key = self.owner_key(agent);
        let put = TxnOp::put(
            key.clone(),
            self.opts.node.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        // Absent, or ours already (the agent redialled this node): bind it
        // to our current lease.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        self.opts.node.clone(),
                    )])
                    .and_then([put])
                    .or_else([TxnOp::get(key, None)]),
            )]);
        let mut c = self.client.clone();
        lock(&self.claiming).insert(agent.to_string());
        let answer = match c.txn(txn).await {
            Ok(r) => {
                let nested_ok = r.op_responses().into_iter().any(|op| match op {
                    TxnOpResponse::Txn(t) => t.succeeded(),
                    TxnOpResponse::Put(_) => true,
                    _ => false,
                });
                if r.succeeded() || nested_ok {
                    let revision = r.header().map_or(0, |h| h.revision());
                    lock(&self.owned).insert(agent.to_string(), revision);
                    Some(true)
                } else {
                    Some(false)
                }
            }
            Err(e) => {
                // The key may have been written all the same: the orphan
                // sweep removes it.
                warn!(%agent, error = %e, "claiming the agent in etcd: refusing its session");
                None
            }
        };
        lock(&self.claiming).remove(agent);
        answer
    }

    /// Removes the owner keys that name this node for agents it holds no
    /// session of (a claim whose answer was lost, a session closed while
    /// etcd was out of reach), unless rewritten since they were seen.
    async fn release_orphans(&self) {
        let orphans: Vec<(String, i64)> = {
            let owners = lock(&self.owners);
            let owned = lock(&self.owned);
            let claiming = lock(&self.claiming);
            owners
                .iter()
                .filter(|(a, (n, _))| {
                    *n == self.opts.node && !owned.contains_key(*a) && !claiming.contains(*a)
                })
                .map(|(a, (_, r))| (a.clone(), *r))
                .collect()
        };
        let mut c = self.client.clone();
        for (agent, revision) in orphans {
            let key = self.owner_key(&agent);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::delete(key, None)]);
            if c.txn(txn).await.is_ok_and(|r| r.succeeded()) {
                info!(%agent, "released an owner key this node held no session for");
            }
        }
    }

    /// The agent's session here ended: free it for the other nodes.
    pub async fn release(&self, agent: &str) {
        if lock(&self.owned).remove(agent).is_none() {
            return;
        }
        let key = self.owner_key(agent);
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.opts.node.clone(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        if let Err(e) = c.txn(txn).await {
            // The lease frees it when it expires.
            debug!(%agent, error = %e, "releasing the agent");
        }
    }

    /// Leaves the cluster (the node stops): revoking the lease frees its
    /// agents for the other nodes at once.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        *lock(&self.valid_until) = None;
        let lease = self.lease.swap(0, Ordering::SeqCst);
        let mut c = self.client.clone();
        if let Err(e) = c.lease_revoke(lease).await {
            warn!(error = %e, "revoking the node's lease: its agents wait for it to expire");
        }
    }

    /// Stops acting for every agent: closes their sessions here.
    fn let_go(&self, why: &str) {
        let owned: Vec<String> = lock(&self.owned).drain().map(|(a, _)| a).collect();
        if owned.is_empty() {
            return;
        }
        warn!(
            agents = owned.len(),
            "{why}: closing the sessions of this node's agents"
        );
        if let Some(s) = self.service() {
            for a in &owned {
                s.close_session(a);
            }
        }
    }

    /// Writes one mitigation: compare-and-swap on the revision last seen.
    /// Returns false when etcd could not be reached (try again later).
    async fn write_mitigation(&self, mut m: Mitigation) -> bool {
        let key = self.mitigation_key(&m.agent, m.mid);
        let mut c = self.client.clone();
        for _ in 0..8 {
            let known = lock(&self.revisions).get(&key).copied().unwrap_or(0);
            let value = match serde_json::to_vec(&Stored {
                node: self.opts.node.clone(),
                mitigation: m.clone(),
            }) {
                Ok(v) => v,
                Err(_) => return true,
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, known)])
                .and_then([TxnOp::put(key.clone(), value, None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let r = match c.txn(txn).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(key = %key, error = %e, "writing a mitigation");
                    return false;
                }
            };
            if r.succeeded() {
                debug!(id = %m.id, state = ?m.state, known, "mitigation written");
                if let Some(h) = r.header() {
                    lock(&self.revisions).insert(key.clone(), h.revision());
                }
                return true;
            }
            // Another node wrote it since: the watch brings its version.
            let current = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            let Some(current) = current else {
                lock(&self.revisions).insert(key.clone(), 0);
                continue;
            };
            lock(&self.revisions).insert(key.clone(), current.mod_revision());
            let Ok(theirs) = serde_json::from_slice::<Stored>(current.value()) else {
                continue;
            };
            // This node's own earlier write (its answer lost on the way):
            // the newer version here replaces it.
            if theirs.node == self.opts.node {
                continue;
            }
            // A request made here (send, update, withdraw) still stands on
            // top of theirs unless theirs is over; a status written here
            // yields to theirs, which the owner acts on.
            let request = matches!(m.state, State::Queued | State::WithdrawQueued);
            if !request || theirs.mitigation.state.is_final() {
                return true;
            }
            let mut merged = theirs.mitigation;
            merged.state = m.state;
            if m.state == State::Queued {
                merged.request = m.request.clone();
                merged.lifetime = m.lifetime;
                merged.created_at = m.created_at;
                merged.sent_at = m.sent_at;
            }
            merged.updated_at = m.updated_at;
            m = merged;
        }
        warn!(key = %key, "a mitigation kept changing under this node's writes: gave up");
        true
    }

    async fn write_prefixes(&self, agent: &str, prefixes: Option<&[IpNet]>) -> bool {
        let key = self.registry_key(agent);
        let mut c = self.client.clone();
        let r = match prefixes {
            Some(p) => {
                let Ok(v) = serde_json::to_vec(p) else {
                    return true;
                };
                c.put(key, v, None).await.map(|_| ())
            }
            None => c.delete(key, None).await.map(|_| ()),
        };
        r.is_ok()
    }
}

impl SharedState for Cluster {
    fn mitigation_changed(&self, m: &Mitigation) {
        let _ = self.writes.send(Write::Mitigation(m.id.clone()));
    }

    fn prefixes_changed(&self, agent: &str, prefixes: Option<&[IpNet]>) {
        let _ = self.writes.send(Write::Prefixes(
            agent.to_string(),
            prefixes.map(<[_]>::to_vec),
        ));
    }

    fn allocate_mid<'a>(
        &'a self,
        agent: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<u32, String>> + Send + 'a>> {
        Box::pin(async move {
            let key = self.mids_key(agent);
            let mut c = self.client.clone();
            for _ in 0..32 {
                let r = c.get(key.clone(), None).await.map_err(|e| e.to_string())?;
                let (next, revision) = match r.kvs().first() {
                    Some(kv) => (
                        std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse::<u32>().ok())
                            .ok_or_else(|| format!("{key}: not a mid counter"))?,
                        kv.mod_revision(),
                    ),
                    None => (crate::mids::clock_start(), 0),
                };
                let after = next
                    .checked_add(1)
                    .ok_or_else(|| format!("every mid (u32) of agent {agent} has been used"))?;
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::put(key.clone(), after.to_string(), None)]);
                if c.txn(txn).await.map_err(|e| e.to_string())?.succeeded() {
                    return Ok(next);
                }
            }
            Err(format!(
                "{key}: too many nodes advancing the counter at once"
            ))
        })
    }

    fn owner(&self, agent: &str) -> Option<String> {
        lock(&self.owners).get(agent).map(|o| o.0.clone())
    }

    fn owner_elsewhere(&self, agent: &str) -> Option<String> {
        lock(&self.owners)
            .get(agent)
            .filter(|o| o.0 != self.opts.node)
            .map(|o| o.0.clone())
    }
}

/// Keeps the lease alive; once it lapsed here, takes a new one (never the
/// old one again: its owner keys name agents whose sessions were closed).
async fn keep_lease(c: Arc<Cluster>) {
    let pause = Duration::from_millis(c.opts.lease_ttl.max(1) * 1000 / 4);
    let retry = pause.min(Duration::from_millis(500));
    while !c.leaving.load(Ordering::SeqCst) {
        if c.lapsed.load(Ordering::SeqCst) {
            c.renew().await;
            if c.lapsed.load(Ordering::SeqCst) {
                tokio::time::sleep(retry).await;
                continue;
            }
        }
        let lease = c.lease.load(Ordering::SeqCst);
        let mut client = c.client.clone();
        match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                if c.lapsed.load(Ordering::SeqCst) || c.leaving.load(Ordering::SeqCst) {
                    break;
                }
                let sent = Instant::now();
                let answer = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(pause, answer).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        *lock(&c.valid_until) = Some(sent + acting_span(c.opts.lease_ttl));
                    }
                    Ok(Ok(Some(_))) => {
                        // TTL 0: etcd expired the lease already.
                        *lock(&c.valid_until) = None;
                        break;
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        debug!(error = %e, "lease keep-alive failed");
                        break;
                    }
                    Err(_) => {
                        debug!("lease keep-alive unanswered");
                        break;
                    }
                }
                tokio::time::sleep(pause.saturating_sub(sent.elapsed())).await;
            },
            Err(e) => debug!(error = %e, "lease keep-alive stream"),
        }
        tokio::time::sleep(retry).await;
    }
}

impl Cluster {
    /// After the lease lapsed here: drop it (its owner keys with it, so
    /// the agents whose sessions this node closed are free) and take a new
    /// one.
    async fn renew(&self) {
        let old = self.lease.load(Ordering::SeqCst);
        let mut client = self.client.clone();
        // Fails when etcd expired it already; when etcd is out of reach,
        // so does the grant below, and this is tried again.
        if let Err(e) = client.lease_revoke(old).await {
            debug!(error = %e, "revoking the lapsed lease");
        }
        match self.take_lease().await {
            Ok(()) => {
                self.lapsed.store(false, Ordering::SeqCst);
                info!(node = %self.opts.node, "back in the cluster with a new lease");
            }
            Err(e) => debug!(error = %e, "taking a new lease"),
        }
    }
}

/// Closes the sessions of this node's agents as soon as the lease may have
/// lapsed, keep-alive answers or not.
async fn guard(c: Arc<Cluster>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks = 0u32;
    while !c.leaving.load(Ordering::SeqCst) {
        tick.tick().await;
        if !c.lapsed.load(Ordering::SeqCst) && !c.acting() {
            c.lapsed.store(true, Ordering::SeqCst);
            c.let_go("out of touch with etcd for the lease's time to live");
        }
        // The load the others see, once a second at most.
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(5) && c.acting() {
            c.publish().await;
            c.release_orphans().await;
        }
    }
}

/// Follows the shared state: a watch from `revision` on; after a break
/// (etcd restarted, unreachable), the whole state again, then a new watch.
async fn follow(c: Arc<Cluster>, mut revision: i64) {
    loop {
        let mut client = c.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        match client.watch(c.prefix.clone(), Some(opts)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(r)) if r.canceled() => break,
                    Ok(Some(r)) => {
                        for ev in r.events() {
                            if let Some(kv) = ev.kv() {
                                revision = revision.max(kv.mod_revision());
                                c.apply(kv, ev.event_type() == EventType::Delete);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, "watch broke");
                        break;
                    }
                }
            },
            Err(e) => debug!(error = %e, "watching the cluster's keys"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match c.load().await {
            Ok(r) => {
                info!(revision = r, "re-read the cluster's state");
                revision = r;
            }
            Err(e) => debug!(error = %e, "re-reading the cluster's state"),
        }
    }
}

/// Deletes the mitigations finished more than [`KEEP_FINISHED`] ago, so
/// that etcd holds the open ones and a day of history; every node sweeps
/// (a delete compares the revision read: a record changed meanwhile stays).
async fn sweep(c: Arc<Cluster>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if c.acting() {
            let swept = c.sweep_once(SystemTime::now()).await;
            if swept > 0 {
                info!(swept, "removed finished mitigations from etcd");
            }
        }
    }
}

impl Cluster {
    /// One sweep at `now`; returns how many records went.
    async fn sweep_once(&self, now: SystemTime) -> usize {
        let cutoff = now
            .checked_sub(KEEP_FINISHED)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let mut client = self.client.clone();
        let prefix = format!("{}mitigations/", self.prefix);
        let Ok(r) = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
        else {
            return 0;
        };
        let mut swept = 0;
        for kv in r.kvs() {
            let Ok(s) = serde_json::from_slice::<Stored>(kv.value()) else {
                continue;
            };
            if !s.mitigation.state.is_final() || s.mitigation.updated_at >= cutoff {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    kv.key().to_vec(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(kv.key().to_vec(), None)]);
            if client.txn(txn).await.is_ok_and(|t| t.succeeded()) {
                swept += 1;
            }
        }
        swept
    }
}

/// Writes what changed here, in order per key; what etcd refused for being
/// unreachable waits and goes again (newer versions of a key replace it).
async fn writer(c: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let key_of = |w: &Write| match w {
        Write::Mitigation(id) => c.mitigation_key(&id.agent, id.mid),
        Write::Prefixes(a, _) => c.registry_key(a),
    };
    let mut pending: BTreeMap<String, Write> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(w) => {
                    pending.insert(key_of(&w), w);
                }
                None => return,
            }
        }
        while let Ok(w) = rx.try_recv() {
            pending.insert(key_of(&w), w);
        }
        let batch = std::mem::take(&mut pending);
        let mut failed = false;
        for (key, w) in batch {
            if !failed {
                failed = !match &w {
                    Write::Mitigation(id) => match c.service().and_then(|s| s.mitigation(id)) {
                        Some(m) => c.write_mitigation(m).await,
                        None => true,
                    },
                    Write::Prefixes(a, p) => c.write_prefixes(a, p.as_deref()).await,
                };
                if !failed {
                    continue;
                }
            }
            pending.entry(key).or_insert(w);
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_agent_identities() {
        assert_eq!(escape("cpe1.example"), "cpe1.example");
        assert_eq!(escape("a/b%c"), "a%2Fb%25c");
        assert_eq!(unescape(&escape("a/b%2Fc")), "a/b%2Fc");
        let p = "/dots/x/";
        assert_eq!(
            parse_key(p, b"/dots/x/owners/a%2Fb"),
            Key::Owner("a/b".into())
        );
        assert_eq!(
            parse_key(p, b"/dots/x/registry/cpe1"),
            Key::Registry("cpe1".into())
        );
        assert_eq!(
            parse_key(p, b"/dots/x/mitigations/cpe1/0000000007"),
            Key::Mitigation("mitigations/cpe1/0000000007".into())
        );
        assert_eq!(parse_key(p, b"/dots/y/owners/a"), Key::Other);
        assert_eq!(parse_key(p, b"/dots/x/nodes/n1"), Key::Node("n1".into()));
        assert_eq!(parse_key(p, b"/dots/x/mids/n1"), Key::Other);
    }

    #[test]
    fn mitigation_keys_name_their_mitigation() {
        assert_eq!(
            mitigation_id("mitigations/a%2Fb/0000000042"),
            Some(MitigationId {
                agent: "a/b".into(),
                mid: 42
            })
        );
        assert_eq!(mitigation_id("mitigations/cpe1/x"), None);
        assert_eq!(mitigation_id("registry/cpe1"), None);
    }

    #[test]
    fn a_node_stops_acting_before_its_lease_can_expire() {
        assert_eq!(acting_span(10), Duration::from_millis(8000));
        assert_eq!(acting_span(2), Duration::from_millis(1500));
        assert_eq!(acting_span(60), Duration::from_secs(58));
    }
}
