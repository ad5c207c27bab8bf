//! The agent's runtime: one task per upstream peer, each dialling its Call
//! Home DOTS client and running the signal channel, and a shared slot table
//! that turns mitigations into XDP drops.

pub mod control;
mod counting;
pub mod enforcer;
pub mod heap;
mod kernel_log;
mod live;
mod memlock;
#[cfg(feature = "metrics")]
pub mod metrics;
mod nat_glue;
mod redirect;
mod session;
pub mod startup;
pub mod state;
pub mod view;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use dots_daemon::{exit::ConfigProblem, logging::list, notify::Notifier};
use dots_proto::{model::Limits, signal::ConsentMode};
use ipnet::IpNet;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use dots_daemon::transport::{Credentials, Transport};

use crate::{
    discovery::DiscoveryContext,
    enforce::{AttachMode, Dataplane, DataplaneOptions},
    netif::{self, InterfaceFilter},
    peer::PeerTarget,
};
pub use enforcer::{SlotKey, SlotTable};

/// Everything `dots-agent run` needs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub peers: Vec<PeerTarget>,
    /// Transports to try, in preference order (Happy Eyeballs races them).
    pub transports: Vec<Transport>,
    pub credentials: Credentials,
    /// The configured local domain: source prefixes must fall inside.
    pub domain: Vec<IpNet>,
    /// Add the router's own addresses, as they change, to the domain,
    /// filtered so; `None`: the configured prefixes only.
    pub interface_addresses: Option<InterfaceFilter>,
    /// Monitor mode: validate, answer and log, install nothing.
    pub monitor: bool,
    pub lans: Vec<String>,
    pub attach_mode: AttachMode,
    pub bpffs: PathBuf,
    /// How long an indefinite mitigation stays in force in the kernel
    /// without the agent renewing it (`[xdp] indefinite-cap`).
    pub indefinite_cap: std::time::Duration,
    /// What each peer's mitigations do (drop, or rate-limit), by peer index.
    pub actions: Vec<crate::enforce::SlotAction>,
    pub consent: ConsentMode,
    pub never_block: Vec<IpNet>,
    pub limits: Limits,
    /// `[policy]`: what requests, peers and the agent may block.
    pub policy: crate::config::PolicyConfig,
    /// Control socket for `dots-agent status`, `mitigations`, `approve`, `reject`.
    pub control: PathBuf,
    /// Where the active mitigations are written, atomically, to survive a restart.
    pub state_dir: PathBuf,
    /// Pending consent is decided after this long: approved when
    /// `consent_timeout_approves`, else rejected.
    pub consent_timeout: Option<std::time::Duration>,
    pub consent_timeout_approves: bool,
    pub max_mitigations_per_cuid: usize,
    /// What to block behind NAT (RFC 9066 §5.3.2).
    pub nat_action: crate::nat::NatAction,
    /// Prometheus text endpoint; off when `None`.
    pub metrics: Option<SocketAddr>,
    /// Set when the (single) peer came from RFC 8973 discovery: it is looked
    /// up again when its information expires.
    pub discovery: Option<DiscoveryContext>,
    /// How often counters are read and observers notified while a mitigation is active.
    pub notify_interval: std::time::Duration,
}

/// How `dots-agent run` reads its configuration again on SIGHUP: the same
/// file and flags, checked as at start.
/// It is given the options the agent runs with.
pub type Reloader = Box<dyn FnMut(&AgentOptions) -> Result<AgentOptions> + Send>;

/// Runs the agent until it is stopped (Ctrl-C / SIGTERM). SIGHUP calls
/// `reload` and applies what it returns without dropping sessions or
/// drops (see [`Runtime::reload`]); the router's address changes are
/// applied as they happen.
pub async fn run(opts: AgentOptions, reload: Option<Reloader>) -> Result<()> {
    if opts.peers.is_empty() {
        return Err(ConfigProblem(
            "no peer to dial: give --peer HOST:PORT (or a config file)".into(),
        )
        .into());
    }
    // From here on SIGHUP reloads instead of ending the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    memlock::raise();
    let addresses = match netif::watch_addresses() {
        Ok(rx) => rx,
        Err(e) => {
            warn!(error = %e, "cannot follow address changes (rtnetlink); the router's addresses are read once");
            let (tx, rx) = watch::channel(netif::interface_prefixes(netif::InterfaceFilter {
                loopback: true,
                link_local: true,
            }));
            // Keeps the channel open: the runtime reads a closed one as gone.
            std::mem::forget(tx);
            rx
        }
    };
    let router: Vec<IpNet> = addresses.borrow().clone();
    let domain = opts.effective_domain(&router);
    if domain.is_empty() {
        if opts.interface_addresses.is_some() {
            warn!("the local domain is empty for now: every request is refused until the router has an address");
        } else {
            return Err(ConfigProblem(
                "no local domain: give --domain PREFIX so requests can be checked against it"
                    .into(),
            )
            .into());
        }
    }
    info!(domain = %list(&domain), "local domain");
    let mut saved = state::StateFile::load(&opts.state_dir);
    renumber_saved(&mut saved, &opts.peers);
    let mut attached = Vec::new();
    let enforcer = if opts.monitor && opts.lans.is_empty() {
        info!("monitor mode without a LAN interface: requests are validated, answered and logged; nothing is installed or counted");
        None
    } else {
        if opts.monitor {
            info!("monitor mode: the classifier counts what each mitigation would drop, and drops nothing");
        }
        let mut dp = Dataplane::open(&DataplaneOptions {
            bpffs: opts.bpffs.clone(),
            ..Default::default()
        })
        .context("opening the XDP data plane (use --no-enforce without --lan to run without it)")?;
        match dp.kernel_log(log::logger()) {
            Ok(reader) => {
                tokio::spawn(kernel_log::forward(reader));
            }
            Err(e) => warn!(error = %e, "the XDP program's own log is not read"),
        }
        for lan in &opts.lans {
            let a = dp.attach(lan, opts.attach_mode)?;
            info!(iface = %a.iface, mode = a.mode, "XDP attached");
            attached.push(a);
        }
        if opts.lans.is_empty() {
            warn!("no --lan interface: mitigations are installed in the maps but no interface runs the classifier");
        }
        let mut table = SlotTable::new(dp, opts.indefinite_cap);
        table.set_never_block(&opts.never_block)?;
        // Re-adopt the slots of the previous run (for the same peers): the
        // pinned maps already hold them, so this writes nothing.
        let slots = std::mem::take(&mut saved.slots);
        if !slots.is_empty() {
            let n = slots.len();
            for skipped in table.import(slots)? {
                warn!(%skipped, "slot of the previous run not re-adopted");
            }
            info!(slots = n, "classifier slots of the previous run re-adopted");
        }
        let table = Arc::new(Mutex::new(table));
        tokio::spawn(enforcer::keep_indefinite(table.clone()));
        Some(table)
    };
    let interfaces = match &enforcer {
        Some(t) => t
            .lock()
            .map(|t| {
                crate::enforce::Dataplane::attachments(t.dataplane().dir())
                    .into_iter()
                    .map(|iface| crate::enforce::Attachment {
                        pin: t.dataplane().dir().join(format!("link_{iface}")),
                        iface,
                        mode: "pinned",
                    })
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let view = Arc::new(Mutex::new(view::AgentView {
        monitor: opts.monitor,
        bpffs: opts.bpffs.clone(),
        interfaces: attached
            .clone()
            .into_iter()
            .chain(
                interfaces
                    .into_iter()
                    .filter(|a| !attached.iter().any(|b| b.iface == a.iface)),
            )
            .collect(),
        ..Default::default()
    }));
    let store = Arc::new(state::StateStore::new(&opts.state_dir, enforcer.clone())?);
    let consent = Arc::new(Mutex::new(BTreeMap::new()));
    if let Some(table) = &enforcer {
        tokio::spawn(counting::report(
            table.clone(),
            view.clone(),
            opts.notify_interval,
        ));
    }
    tokio::spawn(heap::return_freed());
    let control = control::bind(&opts.control)?;
    info!(socket = %opts.control.display(), "control socket ready");
    tokio::spawn(control::serve(
        control,
        control::ControlContext {
            view: view.clone(),
            consent: consent.clone(),
        },
    ));
    // Shared by every peer's signal server, and kept across reloads.
    let shared = live::Shared::new(&opts);
    // NAT correlation runs only where something is enforced.
    let nat = enforcer.as_ref().map(|table| {
        nat_glue::NatService::start(opts.nat_action, live::nat_router(&router), table.clone())
    });
    let (live_tx, _) = watch::channel(Arc::new(opts.live(&router, 0, &shared)));
    let live_tx = Arc::new(live_tx);
    if let Some(addr) = opts.metrics {
        #[cfg(feature = "metrics")]
        {
            let registry = metrics::registry(view.clone(), enforcer.clone(), live_tx.subscribe());
            tokio::spawn(dots_daemon::metrics::serve(addr, Arc::new(registry)));
        }
        // The configuration check refuses this first; options built in code
        // are refused here.
        #[cfg(not(feature = "metrics"))]
        bail!("metrics = {addr}: {}", crate::config::WITHOUT_METRICS);
    }
    let mut rt = Runtime {
        opts,
        router,
        generation: 0,
        live: live_tx,
        shared,
        addresses: addresses.clone(),
        enforcer,
        view: view.clone(),
        store,
        nat,
        consent,
        peers: BTreeMap::new(),
        tasks: tokio::task::JoinSet::new(),
        retiring: BTreeMap::new(),
        next: 0,
    };
    let discovery = rt.opts.discovery.clone();
    for (index, target) in rt.opts.peers.clone().into_iter().enumerate() {
        let restore = saved.take_peer(index, &target.to_string());
        rt.spawn_peer(
            index,
            target,
            restore,
            if index == 0 { discovery.clone() } else { None },
        );
    }
    let notifier = Arc::new(Notifier::from_env());
    notifier.ready(&status_line(&view));
    dots_daemon::notify::spawn_status(notifier.clone(), {
        let view = view.clone();
        move || status_line(&view)
    });
    dots_daemon::notify::spawn_watchdog(notifier.clone());
    rt.serve(reload, hup, addresses, &notifier).await
}

/// One line for `systemctl status`: sessions up and mitigations.
fn status_line(view: &Mutex<view::AgentView>) -> String {
    let Ok(v) = view.lock() else {
        return "state poisoned".into();
    };
    let up = v
        .peers
        .values()
        .filter(|p| p.state == view::PeerState::Connected)
        .count();
    let active = v
        .mitigations
        .values()
        .filter(|m| m.state == view::MitigationState::Active)
        .count();
    format!(
        "{up}/{} sessions up, {active} active mitigations ({} in all)",
        v.peers.len(),
        v.mitigations.len()
    )
}

/// Gives the saved peers the indices of `peers` (matched by their
/// configured HOST:PORT: a reload may have renumbered them), and drops the
/// slots of peers that are no longer configured.
fn renumber_saved(saved: &mut state::StateFile, peers: &[PeerTarget]) {
    let index_of = |name: &str| peers.iter().position(|t| t.to_string() == name);
    let old = std::mem::take(&mut saved.peers);
    let moved: BTreeMap<usize, usize> = old
        .iter()
        .filter_map(|(i, p)| Some((*i, index_of(&p.peer)?)))
        .collect();
    for (i, p) in old {
        match moved.get(&i) {
            Some(new) => {
                saved.peers.insert(*new, p);
            }
            None if !p.mitigations.is_empty() => {
                warn!(peer = %p.peer, "peer no longer configured; its saved mitigations are not restored")
            }
            None => {}
        }
    }
    saved.slots.retain_mut(|r| match moved.get(&r.key.peer) {
        Some(new) => {
            r.key.peer = *new;
            true
        }
        None => false,
    });
}

/// A running peer task.
struct PeerHandle {
    target: PeerTarget,
    stop: oneshot::Sender<()>,
    task: tokio::task::Id,
}

/// The runtime's moving parts: peer tasks, the live settings, and what a
/// reload or an address change updates.
struct Runtime {
    opts: AgentOptions,
    /// Every address of the router, as last seen.
    router: Vec<IpNet>,
    /// Reloads so far (the credentials generation of [`live::Live`]).
    generation: u64,
    live: Arc<watch::Sender<Arc<live::Live>>>,
    /// Agent-wide exempt set and mitigation budget of the signal servers.
    shared: live::Shared,
    addresses: watch::Receiver<Vec<IpNet>>,
    enforcer: Option<Arc<Mutex<SlotTable>>>,
    view: Arc<Mutex<view::AgentView>>,
    store: Arc<state::StateStore>,
    nat: Option<Arc<nat_glue::NatService>>,
    consent: Arc<Mutex<BTreeMap<usize, tokio::sync::mpsc::Sender<control::ConsentCommand>>>>,
    /// By peer index; a removed peer's index is never reused.
    peers: BTreeMap<usize, PeerHandle>,
    tasks: tokio::task::JoinSet<()>,
    /// Tasks told to stop, by task id: their ending is expected.
    retiring: BTreeMap<tokio::task::Id, usize>,
    /// The next peer index: a removed peer's index is never reused.
    next: usize,
}

impl Runtime {
    /// What the mitigations of a configured peer do (its `[xdp] action`,
    /// or the peer's own override).
    fn action_of(&self, target: &PeerTarget) -> crate::enforce::SlotAction {
        self.opts
            .peers
            .iter()
            .position(|p| p == target)
            .and_then(|i| self.opts.actions.get(i).copied())
            .unwrap_or_default()
    }

    fn spawn_peer(
        &mut self,
        index: usize,
        target: PeerTarget,
        restore: Vec<dots_proto::signal::MitigationRecord>,
        discovery: Option<DiscoveryContext>,
    ) {
        let (consent_tx, consent_rx) = tokio::sync::mpsc::channel(16);
        if let Ok(mut c) = self.consent.lock() {
            c.insert(index, consent_tx);
        }
        if let Ok(mut v) = self.view.lock() {
            v.peers.insert(
                index,
                view::PeerStatus {
                    peer: target.to_string(),
                    configured: target.to_string(),
                    state: view::PeerState::Dialling,
                    ..Default::default()
                },
            );
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = session::PeerTask {
            index,
            target: target.clone(),
            live: self.live.subscribe(),
            stop: stop_rx,
            addresses: self.addresses.clone(),
            enforcer: self.enforcer.clone(),
            view: self.view.clone(),
            consent: consent_rx,
            restore,
            nat: self.nat.clone(),
            discovery,
            nat_rx: self.nat.as_ref().map(|n| n.add_peer(index)),
            store: self.store.clone(),
            action: self.action_of(&target),
            seed: seed(index),
            redirect_fallback: self.opts.policy.redirect_fallback(),
        };
        info!(peer = %target, transports = %list(&self.opts.transports), "dialling");
        let task = self.tasks.spawn(task.run()).id();
        self.peers.insert(
            index,
            PeerHandle {
                target,
                stop: stop_tx,
                task,
            },
        );
        self.next = self.next.max(index + 1);
    }

    async fn serve(
        &mut self,
        mut reload: Option<Reloader>,
        mut hup: tokio::signal::unix::Signal,
        mut addresses: watch::Receiver<Vec<IpNet>>,
        notifier: &Notifier,
    ) -> Result<()> {
        let shutdown = dots_daemon::shutdown::signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    notifier.stopping();
                    if self.opts.monitor {
                        info!("stopping");
                    } else {
                        info!("stopping; enforcement stays in place (dots-agent detach removes it)");
                    }
                    return Ok(());
                }
                Some(()) = hup.recv() => {
                    notifier.reloading();
                    match reload.as_mut() {
                        Some(r) => match r(&self.opts) {
                            Ok(new) => self.reload(new),
                            Err(e) => error!(error = %format!("{e:#}"), "SIGHUP: the configuration is not valid; keeping the running one"),
                        },
                        None => warn!("SIGHUP: nothing to reload from"),
                    }
                    notifier.ready(&status_line(&self.view));
                }
                Ok(()) = addresses.changed() => {
                    let now = addresses.borrow_and_update().clone();
                    self.readdress(now);
                }
                Some(done) = self.tasks.join_next_with_id() => {
                    let id = match &done {
                        Ok(id_and_value) => id_and_value.0,
                        Err(e) => e.id(),
                    };
                    if self.retiring.remove(&id).is_none() {
                        bail!("a peer task ended unexpectedly");
                    }
                }
            }
        }
    }

    /// SIGHUP with a valid configuration: new peers are dialled, removed
    /// ones closed (their mitigations end), the domain, consent mode and
    /// limits apply to the next requests, never-block additions at once
    /// (the exempt set only grows), new credentials and transports to the
    /// next dials. Sessions and drops of the peers
    /// that stay go on. What needs a restart is logged.
    fn reload(&mut self, new: AgentOptions) {
        let mut restart = Vec::new();
        for (what, changed) in [
            ("xdp.interfaces", new.lans != self.opts.lans),
            ("xdp.mode", new.attach_mode != self.opts.attach_mode),
            ("xdp.bpffs", new.bpffs != self.opts.bpffs),
            ("enforce", new.monitor != self.opts.monitor),
            ("control-socket", new.control != self.opts.control),
            ("state-dir", new.state_dir != self.opts.state_dir),
            ("metrics", new.metrics != self.opts.metrics),
            ("nat-action", new.nat_action != self.opts.nat_action),
            ("xdp.action", new.actions != self.opts.actions),
        ] {
            if changed {
                restart.push(what);
            }
        }
        if !restart.is_empty() {
            warn!(keys = %list(&restart), "SIGHUP: these settings changed and apply only after a restart");
        }
        let targets = new.peers.clone();
        let removed: Vec<usize> = self
            .peers
            .iter()
            .filter(|(_, h)| !targets.contains(&h.target))
            .map(|(i, _)| *i)
            .collect();
        for i in removed {
            if let Some(h) = self.peers.remove(&i) {
                info!(peer = %h.target, "SIGHUP: peer removed; closing its session");
                self.retiring.insert(h.task, i);
                let _ = h.stop.send(());
                if let Ok(mut c) = self.consent.lock() {
                    c.remove(&i);
                }
            }
        }
        if let Some(e) = &self.enforcer {
            if new.never_block != self.opts.never_block {
                match e.lock().map(|mut t| t.set_never_block(&new.never_block)) {
                    Ok(Ok(())) => {
                        info!(never_block = %list(&new.never_block), "SIGHUP: never-block additions applied")
                    }
                    Ok(Err(err)) => {
                        warn!(error = %err, "SIGHUP: the never-block list could not be applied")
                    }
                    Err(_) => {}
                }
            }
        }
        let added: Vec<PeerTarget> = targets
            .iter()
            .filter(|t| !self.peers.values().any(|h| h.target == **t))
            .cloned()
            .collect();
        self.shared.update(&new);
        self.opts = new;
        self.generation += 1;
        self.publish();
        for t in added {
            info!(peer = %t, "SIGHUP: new peer");
            self.spawn_peer(self.next, t, Vec::new(), None);
        }
        info!(peers = self.peers.len(), "SIGHUP: configuration reloaded");
    }

    /// The router's addresses changed: the local domain (of every running
    /// signal server) and NAT correlation follow.
    fn readdress(&mut self, router: Vec<IpNet>) {
        if router == self.router {
            return;
        }
        info!(addresses = %list(&netif::filtered(&router, netif::InterfaceFilter::default())), "the router's addresses changed");
        self.router = router;
        if let Some(n) = &self.nat {
            n.set_router_addresses(live::nat_router(&self.router));
        }
        self.publish();
    }

    /// Sends the live settings to the peer tasks when they changed.
    fn publish(&self) {
        let live = self.opts.live(&self.router, self.generation, &self.shared);
        self.live.send_if_modified(|cur| {
            if **cur == live {
                return false;
            }
            if cur.server.domain != live.server.domain {
                info!(domain = %list(&live.server.domain), "local domain");
            }
            *cur = Arc::new(live);
            true
        });
    }
}

fn seed(index: usize) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((index as u64) << 48) ^ u64::from(std::process::id())
}
