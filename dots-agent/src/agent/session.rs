//! One upstream peer: dial, run the signal channel, redial.
//!
//! The signal state machine (`dots_proto::signal::SignalServer`) lives as
//! long as the task, not the connection: mitigations stay in force, expire
//! and can be approved while the agent is redialling (RFC 9066 §5.2.1: the
//! agent dials again when the session is lost).

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dots_proto::{
    coap::{DatagramConfig, DatagramEndpoint, Endpoint, StreamConfig, StreamEndpoint},
    model::{RedirectedSignal, ValidatedRequest},
    signal::{Action, ExemptSet, MitigationKey, MitigationRecord, Phase, SessionEnd, SignalServer},
};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    control::ConsentCommand,
    enforcer::{slot_spec, Lifetime, SlotKey, SlotTable},
    live::Live,
    nat_glue::{NatInstall, NatResolved, NatService},
    redirect::Redirected,
    state::{log_restored, StateStore},
    view::{unix_now, AgentView, PeerState},
};
use crate::{
    discovery::{DiscoveryContext, Rediscovery},
    enforce::{SlotAction, SlotId},
    peer::PeerTarget,
};
use dots_daemon::{
    logging::list,
    transport::{Backoff, Connection, DialOptions, Dialer, Incoming, Transport, TransportError},
};

pub(crate) type Server = SignalServer<Box<dyn Endpoint + Send>>;

/// How a session ended.
enum Ended {
    /// The signal layer ended the session: silence, or a Release or
    /// Abort either way.
    Lost(SessionEnd),
    /// The peer closed the connection, or it failed.
    Closed(String),
    /// The peer redirected us (RFC 9066 §5.2.2).
    Redirect(RedirectedSignal),
    /// Discovery now names another peer (RFC 8973 §4).
    Retarget(PeerTarget),
    /// A reload removed this peer.
    Stopped,
}

/// Everything one peer task needs.
pub(crate) struct PeerTask {
    pub(crate) index: usize,
    pub(crate) target: PeerTarget,
    /// Settings a reload or an address change alters (see [`super::live`]).
    pub(crate) live: watch::Receiver<Arc<Live>>,
    /// Fired when a reload removes this peer.
    pub(crate) stop: oneshot::Receiver<()>,
    /// The router's addresses, for re-discovery.
    pub(crate) addresses: watch::Receiver<Vec<IpNet>>,
    pub(crate) enforcer: Option<Arc<Mutex<SlotTable>>>,
    pub(crate) view: Arc<Mutex<AgentView>>,
    pub(crate) consent: mpsc::Receiver<ConsentCommand>,
    /// Mitigations of this peer from the state directory.
    pub(crate) restore: Vec<MitigationRecord>,
    /// What this peer's mitigations do (the local policy).
    pub(crate) action: SlotAction,
    pub(crate) store: Arc<StateStore>,
    pub(crate) nat: Option<Arc<NatService>>,
    pub(crate) nat_rx: Option<mpsc::UnboundedReceiver<NatResolved>>,
    /// Set when the peer came from discovery: it is looked up again.
    pub(crate) discovery: Option<DiscoveryContext>,
    pub(crate) seed: u64,
    /// How long a redirect's alternate may stay unreachable.
    pub(crate) redirect_fallback: Duration,
}

/// The parts of a peer task that serve the signal layer whatever the
/// connection state: data plane, operator view, consent decisions.
struct Shell {
    peer: usize,
    /// What this peer's mitigations do (the local policy).
    action: SlotAction,
    enforcer: Option<Arc<Mutex<SlotTable>>>,
    view: Arc<Mutex<AgentView>>,
    consent: mpsc::Receiver<ConsentCommand>,
    store: Arc<StateStore>,
    /// The configured peer, as the state file names it.
    name: String,
    /// `Mitigations::revision` last seen by `step`: the state files, the
    /// slots' expiries and `known` are brought up to date when it moves.
    saved: Option<u64>,
    nat: Option<Arc<NatService>>,
    nat_rx: Option<mpsc::UnboundedReceiver<NatResolved>>,
    rediscovery: Option<Rediscovery>,
    /// The peer being dialled or talked to.
    current: Option<PeerTarget>,
    /// When a discovered peer's validity is checked next.
    next_check: Instant,
    live: watch::Receiver<Arc<Live>>,
    stop: oneshot::Receiver<()>,
    stopped: bool,
    /// The mitigations the signal server held at the last step, and
    /// whether each awaited consent: to tell a new request (2.01) from an
    /// update (2.04), and an install that follows consent (no request) in
    /// the request counts.
    known: BTreeMap<MitigationKey, bool>,
    /// Off while the actions of restored mitigations are performed.
    counting: bool,
}

/// A reload removed the peer while the task waited.
struct Stopped;

impl PeerTask {
    pub(crate) async fn run(self) {
        let PeerTask {
            index,
            mut target,
            live,
            stop,
            addresses,
            enforcer,
            view,
            consent,
            restore,
            action,
            store,
            nat,
            nat_rx,
            discovery,
            mut seed,
            redirect_fallback,
        } = self;
        let name = target.to_string();
        let mut shell = Shell {
            peer: index,
            action,
            enforcer,
            view,
            consent,
            store,
            name,
            saved: None,
            nat,
            nat_rx,
            rediscovery: discovery.map(|d| Rediscovery::new(d, addresses)),
            current: None,
            next_check: Instant::now(),
            live,
            stop,
            stopped: false,
            known: Default::default(),
            counting: true,
        };
        let now = Instant::now();
        let first = shell.live.borrow_and_update().clone();
        // Agent-wide: a reload keeps the same set, so this handle stays good.
        let exempt_set = first.server.exempt.clone();
        // Until the first connection the endpoint talks to nobody: what it
        // would send is dropped.
        let mut server = match endpoint(Transport::Udp, seed)
            .map_err(|e| e.to_string())
            .and_then(|ep| {
                SignalServer::new(now, ep, first.server.clone()).map_err(|e| e.to_string())
            }) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "invalid signal configuration");
                return;
            }
        };
        let mut dialer = match Dialer::new(&first.credentials, DialOptions::default()) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot use the certificate files");
                return;
            }
        };
        let mut generation = first.generation;
        server.set_wall_clock(now, unix_now());
        shell.restore(&mut server, restore);
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2.0);
        let home = target.clone();
        // A redirect holds until its ttl runs out or its target stays
        // unreachable too long; then the configured peer applies again.
        let mut redirected: Option<Redirected> = None;
        loop {
            if let Some(why) = redirected.as_ref().and_then(|r| r.over(Instant::now())) {
                info!(peer = %home, reason = %why, "returning to the configured peer");
                target = home.clone();
                redirected = None;
            }
            if let Some(t) = shell.rediscover_if_due(&target).await {
                target = t;
            }
            shell.current = Some(target.clone());
            shell.set_state(&target, PeerState::Dialling, None);
            let enforcer = shell.enforcer.clone();
            // A reload may have brought new credentials or transports.
            let live = shell.live.borrow().clone();
            if live.generation != generation {
                match Dialer::new(&live.credentials, DialOptions::default()) {
                    Ok(d) => dialer = d,
                    Err(e) => {
                        warn!(error = %e, "new certificate files unusable; dialling with the previous ones")
                    }
                }
                generation = live.generation;
            }
            let dialled = shell
                .idle(
                    &mut server,
                    connect(
                        &mut dialer,
                        &target,
                        &live.transports,
                        enforcer.as_ref(),
                        &exempt_set,
                    ),
                )
                .await;
            let conn = match dialled {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let delay = backoff.next_delay();
                    warn!(peer = %target, error = %e, retry_in = ?delay, "dial failed");
                    shell.set_state(&target, PeerState::Dialling, Some(e.to_string()));
                    if shell
                        .idle(&mut server, tokio::time::sleep(delay))
                        .await
                        .is_err()
                    {
                        return shell.retire(&server);
                    }
                    continue;
                }
                Err(Stopped) => return shell.retire(&server),
            };
            backoff.reset();
            if let Some(r) = &mut redirected {
                r.reached();
            }
            server.set_wall_clock(Instant::now(), unix_now());
            info!(
                peer = %target,
                addr = %conn.peer_addr(),
                transport = %conn.transport(),
                version = conn.protocol_version(),
                resumed = conn.session_reused(),
                identity = conn.peer_identity().as_deref().unwrap_or("?"),
                "signal channel up"
            );
            shell.connected(&target, &conn);
            if let Some(r) = &mut shell.rediscovery {
                r.set_cert_until(
                    conn.peer_certificate()
                        .and_then(|c| crate::discovery::cert_not_after(&c)),
                );
            }
            seed = seed.wrapping_add(1);
            let ep = match endpoint(conn.transport(), seed) {
                Ok(ep) => ep,
                Err(e) => {
                    warn!(error = %e, "could not create the CoAP endpoint");
                    return;
                }
            };
            if let Err(e) = server.reconnect(Instant::now(), ep) {
                warn!(error = %e, "reconnect refused by the signal layer");
                return;
            }
            let ended = shell.drive(&mut server, conn).await;
            if let Some(r) = &mut redirected {
                r.lost(Instant::now());
            }
            match ended {
                Ended::Lost(why) => {
                    warn!(peer = %target, reason = %why, "session lost; redialling")
                }
                Ended::Closed(why) => {
                    warn!(peer = %target, reason = %why, "session closed; redialling")
                }
                Ended::Retarget(t) => {
                    target = t;
                    continue; // discovery found another peer: dial it now
                }
                Ended::Stopped => return shell.retire(&server),
                Ended::Redirect(r) => {
                    info!(alt = %r.alt_ch_client, records = %list(&r.alt_ch_client_record), ttl = ?r.ttl, "redirected");
                    target = PeerTarget {
                        host: r.alt_ch_client.clone(),
                        port: target.port,
                        addrs: r.alt_ch_client_record.clone(),
                        name: Some(r.alt_ch_client.clone()),
                        endpoints: Vec::new(),
                    };
                    redirected = Some(Redirected::new(Instant::now(), r.ttl, redirect_fallback));
                    continue; // dial the new peer at once
                }
            }
            let delay = backoff.next_delay();
            if shell
                .idle(&mut server, tokio::time::sleep(delay))
                .await
                .is_err()
            {
                return shell.retire(&server);
            }
        }
    }
}

async fn connect(
    dialer: &mut Dialer,
    target: &PeerTarget,
    transports: &[Transport],
    enforcer: Option<&Arc<Mutex<SlotTable>>>,
    exempt_set: &ExemptSet,
) -> Result<Connection, TransportError> {
    // Discovered endpoints carry their own transport and port.
    if !target.endpoints.is_empty() {
        let candidates: Vec<(SocketAddr, Transport)> = target
            .endpoints
            .iter()
            .filter(|(_, t)| transports.contains(t))
            .copied()
            .collect();
        exempt(
            enforcer,
            exempt_set,
            &candidates.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        );
        return dialer.dial(&candidates, &target.identity()).await;
    }
    let addrs = target.resolve().await;
    let candidates: Vec<(SocketAddr, Transport)> = addrs
        .iter()
        .flat_map(|a| transports.iter().map(move |t| (*a, *t)))
        .collect();
    exempt(enforcer, exempt_set, &addrs);
    dialer.dial(&candidates, &target.identity()).await
}

/// The agent never cuts its own lifeline: the peer's addresses are exempt,
/// in the data plane and for judging requests (RFC 9066 §5.3.1).
fn exempt(enforcer: Option<&Arc<Mutex<SlotTable>>>, exempt_set: &ExemptSet, addrs: &[SocketAddr]) {
    let ips: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
    exempt_set.add_addrs(&ips);
    if let Some(e) = enforcer {
        if let Ok(mut t) = e.lock() {
            if let Err(err) = t.add_exempt(&ips) {
                warn!(error = %err, "could not exempt the peer's addresses");
            }
        }
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

fn deadline(server: &Server) -> Instant {
    server
        .poll_timeout()
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
}

impl Shell {
    /// Awaits `fut` (a dial, a backoff) while keeping the signal layer's
    /// timers, the operator's decisions and live settings going. Nothing
    /// can be sent. [`Stopped`] when a reload removed the peer meanwhile.
    async fn idle<F: Future>(&mut self, server: &mut Server, fut: F) -> Result<F::Output, Stopped> {
        tokio::pin!(fut);
        loop {
            let _ = self.step(server);
            while server.poll_transmit().is_some() {}
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = tokio::time::sleep_until(deadline(server).into()) => server.handle_timeout(Instant::now()),
                Some(cmd) = self.consent.recv() => self.decide(server, cmd),
                Some(NatResolved(key)) = next_nat(&mut self.nat_rx) => { let _ = server.installed(Instant::now(), &key); }
                Ok(()) = self.live.changed() => self.apply_live(server),
                // Only a sent stop means "removed by a reload". A dropped
                // sender means the runtime is shutting down: the peer's
                // mitigations and slots must stay for the next start.
                stop = &mut self.stop, if !self.stopped => {
                    self.stopped = true;
                    if stop.is_ok() {
                        return Err(Stopped);
                    }
                }
            }
        }
    }

    /// Applies the newest live settings to the signal server (a reload, an
    /// address change): requests from now on are checked against them.
    fn apply_live(&mut self, server: &mut Server) {
        let live = self.live.borrow_and_update().clone();
        if *server.config() == live.server {
            return;
        }
        match server.set_config(Instant::now(), live.server.clone()) {
            Ok(()) => {
                debug!(peer = %self.name, domain = %list(&live.server.domain), "new settings applied")
            }
            Err(e) => {
                warn!(peer = %self.name, error = %e, "new settings refused by the signal layer; keeping the previous ones")
            }
        }
    }

    /// A reload removed this peer: its slots are freed (nothing else would
    /// ever expire them), its state forgotten and its view entries dropped.
    fn retire(&mut self, server: &Server) {
        info!(peer = %self.name, mitigations = server.mitigations().iter().count(), "peer removed by a reload: its mitigations end");
        let keys: Vec<SlotKey> = server
            .mitigations()
            .iter()
            .map(|(k, _)| self.slot_key(k))
            .collect();
        if let Some(n) = &self.nat {
            for k in &keys {
                n.remove(k);
            }
            n.remove_peer(self.peer);
        }
        if let Some(e) = &self.enforcer {
            if let Ok(mut t) = e.lock() {
                if let Err(err) = t.retain_peer(self.peer, &[]) {
                    warn!(error = %err, "could not free the removed peer's slots");
                }
            }
        }
        self.store.forget_peer(self.peer);
        if let Ok(mut v) = self.view.lock() {
            v.mitigations.retain(|(p, _, _), _| *p != self.peer);
            v.peers.remove(&self.peer);
        }
    }

    /// Runs one connection until it ends, then closes it.
    async fn drive(&mut self, server: &mut Server, mut conn: Connection) -> Ended {
        let end = self.run_connection(server, &mut conn).await;
        // Always say goodbye (close_notify): OpenSSL marks the session of a
        // connection dropped without it as not resumable, and the next dial
        // should resume.
        conn.close().await;
        end
    }

    async fn run_connection(&mut self, server: &mut Server, conn: &mut Connection) -> Ended {
        loop {
            // Answers go out before the work they announce (RFC 9132
            // §4.4.1: 2.01 first, status 2 once the data plane confirms).
            if let Err(e) = flush(server, conn).await {
                return Ended::Closed(format!("send failed: {e}"));
            }
            let end = self.step(server);
            if let Err(e) = flush(server, conn).await {
                return Ended::Closed(format!("send failed: {e}"));
            }
            if let Some(end) = end {
                return end;
            }
            // Checked here, not only in a timer branch, so that busy traffic
            // cannot keep postponing it.
            if self.rediscovery.is_some() && Instant::now() >= self.next_check {
                self.next_check = Instant::now() + Rediscovery::CHECK_EVERY;
                let current = self.current.clone();
                if let Some(t) = match &current {
                    Some(c) => self.rediscover_if_due(c).await,
                    None => None,
                } {
                    return Ended::Retarget(t);
                }
            }
            tokio::select! {
                got = conn.recv() => match got {
                    Ok(Incoming::Datagram(bytes)) | Ok(Incoming::Stream(bytes)) => {
                        if self.live.has_changed().unwrap_or(false) {
                            self.apply_live(server);
                        }
                        let now = Instant::now();
                        if let Err(e) = server.handle_input(now, &bytes) {
                            debug!(error = %e, "input dropped");
                        }
                        self.heard(now);
                    }
                    Ok(Incoming::Closed) => return Ended::Closed("peer closed the connection".into()),
                    Err(e) => return Ended::Closed(format!("receive failed: {e}")),
                },
                _ = tokio::time::sleep_until(deadline(server).into()) => server.handle_timeout(Instant::now()),
                Some(cmd) = self.consent.recv() => self.decide(server, cmd),
                Some(NatResolved(key)) = next_nat(&mut self.nat_rx) => { let _ = server.installed(Instant::now(), &key); }
                _ = tokio::time::sleep_until(self.next_check.into()), if self.rediscovery.is_some() => {}
                Ok(()) = self.live.changed() => self.apply_live(server),
                stop = &mut self.stop, if !self.stopped => {
                    self.stopped = true;
                    if stop.is_ok() {
                        return Ended::Stopped;
                    }
                }
            }
        }
    }

    /// Discovers the peer again when its information expired, the peer's
    /// certificate expired or DHCP wrote something new; returns the new
    /// target when it differs from `current`.
    async fn rediscover_if_due(&mut self, current: &PeerTarget) -> Option<PeerTarget> {
        let r = self.rediscovery.as_mut()?;
        if !r.due(std::time::SystemTime::now()) {
            return None;
        }
        r.run(current).await
    }

    /// Performs the pending actions and refreshes the operator's view;
    /// returns how the session ends when an action ends it.
    fn step(&mut self, server: &mut Server) -> Option<Ended> {
        let mut end = None;
        while let Some(action) = server.poll_action() {
            self.count_request(&action);
            // The first ending wins: a redirect is followed by a close.
            if let Some(e) = self.perform(server, action) {
                end = end.or(Some(e));
            }
        }
        let now = Instant::now();
        if let Ok(mut v) = self.view.lock() {
            v.set_mitigations(self.peer, now, server.mitigations().iter());
            if let Some(n) = &self.nat {
                for ((peer, cuid, mid), m) in v
                    .mitigations
                    .iter_mut()
                    .filter(|((p, _, _), _)| *p == self.peer)
                {
                    m.devices = n.devices(&SlotKey {
                        peer: *peer,
                        cuid: cuid.clone(),
                        mid: *mid,
                    });
                }
            }
        }
        let revision = server.mitigations().revision();
        // The revision grows with every change of the mitigations: what
        // is derived from them is made again only then.
        if self.saved != Some(revision) {
            self.saved = Some(revision);
            self.known = server
                .mitigations()
                .iter()
                .map(|(k, m)| (k.clone(), m.phase == Phase::AwaitingConsent))
                .collect();
            self.sync_slots(server);
            self.store.sync(self.peer, &self.name, now, server);
        }
        end
    }

    /// Counts a mitigation request by the code it was answered with: a
    /// refusal's own, 2.01 for a new mitigation, 2.04 for an update.
    fn count_request(&self, action: &Action) {
        if !self.counting {
            return;
        }
        let code = match action {
            Action::Rejected { code, .. } => code.clone(),
            Action::Install { key, .. }
            | Action::AskConsent { key, .. }
            | Action::Monitored { key, .. } => match self.known.get(key) {
                None => "2.01".to_string(),
                // Consent decided: the request was counted when it came.
                Some(true) => return,
                Some(false) => "2.04".to_string(),
            },
            _ => return,
        };
        if let Ok(mut v) = self.view.lock() {
            *v.requests.entry((self.peer, code)).or_default() += 1;
        }
    }

    /// Renewed lifetimes move the expiries the XDP program enforces, and
    /// slots whose mitigation is gone without a `Remove` (monitor mode) go.
    fn sync_slots(&self, server: &Server) {
        let Some(e) = &self.enforcer else {
            return;
        };
        let Ok(mut t) = e.lock() else {
            return;
        };
        for k in t.keys_of(self.peer) {
            let key = MitigationKey::new(k.cuid.clone(), k.mid);
            if server.mitigations().get(&key).is_none() {
                if let Err(err) = t.remove(&k) {
                    warn!(cuid = %k.cuid, mid = k.mid, error = %err, "could not remove the slot of an ended mitigation");
                }
            }
        }
        let counted =
            |m: &dots_proto::signal::Mitigation| m.enforced() || m.phase == Phase::Monitoring;
        for (key, m) in server.mitigations().iter().filter(|(_, m)| counted(m)) {
            let lifetime = Lifetime::from_expiry(m.expires);
            if let Err(err) = t.set_lifetime(&self.slot_key(key), lifetime) {
                warn!(cuid = %key.cuid, mid = key.mid, error = %err, "could not move the expiry in the data plane");
            }
        }
    }

    /// Brings back the mitigations of the previous run; slots of ones that
    /// did not come back (expired meanwhile) are freed.
    fn restore(&mut self, server: &mut Server, records: Vec<MitigationRecord>) {
        let offered = records.len();
        let keys = match server.restore(Instant::now(), records) {
            Ok(keys) => keys,
            Err(e) => {
                warn!(error = %e, "the saved mitigations could not be restored");
                Vec::new()
            }
        };
        log_restored(&self.name, keys.len(), offered);
        // Re-installing restored mitigations answers no request.
        self.counting = false;
        let _ = self.step(server);
        self.counting = true;
        if let Some(e) = &self.enforcer {
            let keep: Vec<SlotKey> = keys.iter().map(|k| self.slot_key(k)).collect();
            if let Ok(mut t) = e.lock() {
                if let Err(err) = t.retain_peer(self.peer, &keep) {
                    warn!(error = %err, "could not free the slots of expired mitigations");
                }
            }
        }
    }

    fn decide(&mut self, server: &mut Server, cmd: ConsentCommand) {
        let key = MitigationKey::new(cmd.cuid.clone(), cmd.mid);
        let result = server
            .consent(Instant::now(), &key, cmd.approve)
            .map_err(|e| e.to_string());
        match &result {
            Ok(()) => {
                info!(cuid = %cmd.cuid, mid = cmd.mid, approved = cmd.approve, "operator decided")
            }
            Err(e) => {
                warn!(cuid = %cmd.cuid, mid = cmd.mid, error = %e, "consent decision refused")
            }
        }
        let _ = cmd.reply.send(result);
    }

    fn set_state(&self, target: &PeerTarget, state: PeerState, error: Option<String>) {
        if let Ok(mut v) = self.view.lock() {
            if let Some(p) = v.peers.get_mut(&self.peer) {
                p.peer = target.to_string();
                p.state = state;
                if error.is_some() {
                    p.last_error = error;
                }
                if state != PeerState::Connected {
                    p.transport = None;
                    p.addr = None;
                    p.connected_at = None;
                }
            }
        }
    }

    fn connected(&self, target: &PeerTarget, conn: &Connection) {
        if let Ok(mut v) = self.view.lock() {
            if let Some(p) = v.peers.get_mut(&self.peer) {
                p.peer = target.to_string();
                p.state = PeerState::Connected;
                p.transport = Some(conn.transport().to_string());
                p.addr = Some(conn.peer_addr());
                p.resumed = conn.session_reused();
                p.connected_at = Some(unix_now());
                p.last_rx = Some(Instant::now());
                p.sessions += 1;
                p.last_error = None;
                p.cert_not_after = conn
                    .peer_certificate()
                    .and_then(|c| crate::discovery::cert_not_after(&c))
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64);
            }
        }
    }

    fn heard(&self, now: Instant) {
        if let Ok(mut v) = self.view.lock() {
            if let Some(p) = v.peers.get_mut(&self.peer) {
                p.last_rx = Some(now);
            }
        }
    }

    fn slot_key(&self, key: &MitigationKey) -> SlotKey {
        SlotKey {
            peer: self.peer,
            cuid: key.cuid.clone(),
            mid: key.mid,
        }
    }

    /// Puts `request`'s slot in the data plane, doing `action`; `None` while
    /// behind NAT no device is known yet (the NAT service installs it).
    fn install_slot(
        &mut self,
        server: &Server,
        key: &MitigationKey,
        request: &ValidatedRequest,
        action: SlotAction,
    ) -> Result<Option<SlotId>, String> {
        let spec = slot_spec(request, action);
        let lifetime = server
            .mitigations()
            .get(key)
            .map(|m| Lifetime::from_expiry(m.expires));
        // Behind NAT the slot names the internal devices, or waits for one.
        let spec = match self
            .nat
            .as_ref()
            .map(|n| n.install(&self.slot_key(key), &spec))
        {
            None | Some(NatInstall::Direct) => spec,
            Some(NatInstall::Resolved(s)) => s,
            Some(NatInstall::Pending) => {
                info!(cuid = %key.cuid, mid = key.mid, sources = %list(&request.scope.source_prefix),
                      "the router's own address: waiting for a matching flow in conntrack");
                return Ok(None);
            }
        };
        match &self.enforcer {
            Some(e) => e
                .lock()
                .map_err(|_| "slot table poisoned".to_string())
                .and_then(|mut t| {
                    t.install(&self.slot_key(key), spec, lifetime)
                        .map(Some)
                        .map_err(|e| e.to_string())
                }),
            None => Err("no data plane".to_string()),
        }
    }

    /// Carries out one action of the signal layer; returns how the session
    /// ends when the action ends it.
    fn perform(&mut self, server: &mut Server, action: Action) -> Option<Ended> {
        let now = Instant::now();
        match action {
            Action::Install { key, request } => {
                let action = self.action;
                match self.install_slot(server, &key, &request, action) {
                    Ok(Some(slot)) => {
                        info!(cuid = %key.cuid, mid = key.mid, slot, sources = %list(&request.scope.source_prefix),
                              targets = %list(&request.scope.target_prefix), lifetime = request.lifetime, "mitigation enforced");
                        let _ = server.installed(now, &key);
                    }
                    Ok(None) => {}
                    Err(reason) => {
                        warn!(cuid = %key.cuid, mid = key.mid, %reason, "mitigation could not be installed");
                        let _ = server.install_failed(now, &key);
                    }
                }
            }
            Action::Remove { key } => {
                if let Some(n) = &self.nat {
                    n.remove(&self.slot_key(&key));
                }
                if let Some(e) = &self.enforcer {
                    if let Ok(mut t) = e.lock() {
                        let slot = self.slot_key(&key);
                        // Rates as last measured; totals as removed.
                        let rates = t.counters(&slot, now).unwrap_or_default();
                        match t.remove(&slot) {
                            Ok(Some(c)) => {
                                info!(cuid = %key.cuid, mid = key.mid, packets = c.packets, bytes = c.bytes, "mitigation removed");
                                // A waiting DELETE is answered with these final counters.
                                let last = dots_proto::signal::Counters {
                                    pkts: c.packets,
                                    bytes: c.bytes,
                                    ..rates
                                };
                                server.removed(now, &key, last);
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
                if let Some(e) = &self.enforcer {
                    for key in keys {
                        let c = e
                            .lock()
                            .ok()
                            .and_then(|mut t| t.counters(&self.slot_key(&key), now));
                        if let Some(c) = c {
                            let _ = server.counters(now, &key, c);
                        }
                    }
                }
            }
            Action::AskConsent {
                key,
                request,
                reason,
            } => {
                info!(cuid = %key.cuid, mid = key.mid, sources = %list(&request.scope.source_prefix),
                      targets = %list(&request.scope.target_prefix), over_limit = reason.as_deref().unwrap_or("-"),
                      "mitigation awaits operator consent: dots-agent approve|reject {}/{}", key.cuid, key.mid);
            }
            Action::PartlyExempt { key, exempt } => {
                warn!(cuid = %key.cuid, mid = key.mid, exempt_sources = %list(&exempt.sources), exempt_targets = %list(&exempt.targets),
                      "part of the mitigation is exempt (never-block or a peer's address) and is not dropped; the peer is told (conflict-cause 4)");
            }
            Action::ConsentTimedOut { key, approved } => {
                info!(cuid = %key.cuid, mid = key.mid, approved, "consent timeout decided the pending mitigation");
            }
            Action::Rejected {
                cuid,
                mid,
                code,
                diagnostic,
            } => {
                warn!(cuid = cuid.as_deref().unwrap_or("-"), mid = ?mid, %code, %diagnostic, "request refused");
            }
            Action::Monitored { key, request } => {
                // Monitor mode: the slot counts what it would drop and drops
                // nothing; the peer still hears status 1.
                let counted = match &self.enforcer {
                    Some(_) => self.install_slot(server, &key, &request, SlotAction::Monitor),
                    None => Err("no data plane (no --lan interface)".to_string()),
                };
                match counted {
                    Ok(slot) => {
                        info!(cuid = %key.cuid, mid = key.mid, slot, sources = %list(&request.scope.source_prefix),
                              targets = %list(&request.scope.target_prefix), lifetime = request.lifetime,
                              "monitor mode: mitigation validated and answered; counting what it would drop, dropping nothing");
                    }
                    Err(reason) => {
                        info!(cuid = %key.cuid, mid = key.mid, sources = %list(&request.scope.source_prefix),
                              targets = %list(&request.scope.target_prefix), lifetime = request.lifetime, %reason,
                              "monitor mode: mitigation validated and answered; nothing installed, nothing counted");
                    }
                }
            }
            Action::Redirect { target } => return Some(Ended::Redirect(target)),
            Action::SessionLost { reason } => return Some(Ended::Lost(reason)),
            Action::Close => {
                server.endpoint_mut().close("closing");
                return Some(Ended::Closed("closed by the signal layer".into()));
            }
        }
        None
    }
}

async fn flush(server: &mut Server, conn: &mut Connection) -> std::io::Result<()> {
    while let Some(bytes) = server.poll_transmit() {
        conn.send(&bytes).await?;
    }
    Ok(())
}

/// The next NAT resolution for this peer, or never when NAT is off.
async fn next_nat(rx: &mut Option<mpsc::UnboundedReceiver<NatResolved>>) -> Option<NatResolved> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}
