//! The agent's runtime: one task per upstream peer, each dialling its Call
//! Home DOTS client and running the signal channel, and a shared slot table
//! that turns mitigations into XDP drops.

pub mod control;
mod counting;
pub mod enforcer;
pub mod metrics;
mod nat_glue;
mod session;
pub mod startup;
pub mod state;
pub mod view;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use dots_proto::{
    model::Limits,
    signal::{ConsentMode, EnforcementMode, ServerConfig},
};
use ipnet::IpNet;
use tracing::{info, warn};

use dots_daemon::transport::{Credentials, DialOptions, Dialer, Transport};

use crate::{
    discovery::DiscoveryContext,
    enforce::{AttachMode, Dataplane, DataplaneOptions},
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
    /// The local domain: source prefixes must fall inside.
    pub domain: Vec<IpNet>,
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

/// Runs the agent until it is stopped (Ctrl-C / SIGTERM).
pub async fn run(opts: AgentOptions) -> Result<()> {
    if opts.peers.is_empty() {
        bail!("no peer to dial: give --peer HOST:PORT (or a config file)");
    }
    if opts.domain.is_empty() {
        bail!("no local domain: give --domain PREFIX so requests can be checked against it");
    }
    let mut saved = state::StateFile::load(&opts.state_dir);
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
        let same_peer = |i: usize| {
            saved.peers.get(&i).map(|p| p.peer.as_str())
                == opts.peers.get(i).map(|t| t.to_string()).as_deref()
        };
        let slots: Vec<_> = saved
            .slots
            .iter()
            .filter(|r| same_peer(r.key.peer))
            .cloned()
            .collect();
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
        peers: opts
            .peers
            .iter()
            .map(|p| view::PeerStatus {
                peer: p.to_string(),
                state: view::PeerState::Dialling,
                ..Default::default()
            })
            .collect(),
        mitigations: Default::default(),
    }));
    let mut consent_senders = Vec::new();
    let mut consent_receivers = Vec::new();
    for _ in &opts.peers {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        consent_senders.push(tx);
        consent_receivers.push(rx);
    }
    let store = Arc::new(state::StateStore::new(&opts.state_dir, enforcer.clone())?);
    if let Some(table) = &enforcer {
        tokio::spawn(counting::report(
            table.clone(),
            view.clone(),
            opts.notify_interval,
        ));
    }
    if let Some(addr) = opts.metrics {
        tokio::spawn(metrics::serve(addr, view.clone()));
    }
    let control = control::bind(&opts.control)?;
    info!(socket = %opts.control.display(), "control socket ready");
    tokio::spawn(control::serve(
        control,
        control::ControlContext {
            view: view.clone(),
            consent: consent_senders,
        },
    ));
    let server_config = ServerConfig {
        limits: opts.limits,
        domain: opts.domain.clone(),
        consent: opts.consent,
        mode: if opts.monitor {
            EnforcementMode::Monitor
        } else {
            EnforcementMode::Enforce
        },
        notify_period: opts.notify_interval,
        consent_timeout: opts.consent_timeout,
        consent_timeout_approves: opts.consent_timeout_approves,
        max_mitigations_per_cuid: opts.max_mitigations_per_cuid,
        ..ServerConfig::default()
    };
    // NAT correlation runs only where something is enforced.
    let (nat, mut nat_rx): (Option<Arc<nat_glue::NatService>>, Vec<_>) = match &enforcer {
        Some(table) => {
            let (s, rx) =
                nat_glue::NatService::start(opts.nat_action, opts.peers.len(), table.clone());
            (Some(s), rx.into_iter().map(Some).collect())
        }
        None => (None, opts.peers.iter().map(|_| None).collect()),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for ((index, target), consent) in opts.peers.iter().enumerate().zip(consent_receivers) {
        let dialer = Dialer::new(&opts.credentials, DialOptions::default())?;
        let task = session::PeerTask {
            index,
            target: target.clone(),
            transports: opts.transports.clone(),
            dialer,
            server_config: server_config.clone(),
            enforcer: enforcer.clone(),
            view: view.clone(),
            consent,
            restore: saved.take_peer(index, &target.to_string()),
            action: opts.actions.get(index).copied().unwrap_or_default(),
            nat: nat.clone(),
            discovery: if index == 0 {
                opts.discovery.clone()
            } else {
                None
            },
            nat_rx: nat_rx.get_mut(index).and_then(Option::take),
            store: store.clone(),
            seed: seed(index),
        };
        info!(peer = %target, transports = ?opts.transports, "dialling");
        tasks.spawn(task.run());
    }
    tokio::select! {
        _ = dots_daemon::shutdown::signal() => if opts.monitor {
            info!("stopping")
        } else {
            info!("stopping; enforcement stays in place (dots-agent detach removes it)")
        },
        _ = tasks.join_next() => warn!("a peer task ended"),
    }
    Ok(())
}

fn seed(index: usize) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((index as u64) << 48) ^ u64::from(std::process::id())
}
