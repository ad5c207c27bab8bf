//! The `dots-client` side: accepting agents over DTLS/UDP and TLS/TCP.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use openssl::ssl::{Ssl, SslContext};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};

use super::{
    dtls::{self, DtlsConnection, DtlsParams, ListenOutcome, PeerSlot},
    tls::{self, CookieKey, Credentials, Role},
    tls_stream::TlsConnection,
    Connection, FailurePolicy, FailureTracker, Transport, TransportError,
};

/// Listener settings.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// Certificate identities (SAN DNS names or IPs) allowed in; `None`: any
    /// certificate from the CA.
    pub allow: Option<Vec<String>>,
    /// Established connections at most (new agents are refused beyond).
    pub max_connections: usize,
    /// Handshakes in progress at most.
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    /// Link MTU for DTLS.
    pub mtu: usize,
    /// Largest datagram (DTLS) or read chunk (TLS) accepted.
    pub max_message: usize,
    /// Datagrams queued per DTLS peer before new ones are dropped.
    pub peer_queue: usize,
    /// Drop-list for source addresses failing authentication.
    pub failures: FailurePolicy,
    /// Session-ticket keys (name, HMAC and AES keys), so agents can resume
    /// their (D)TLS sessions across restarts of this listener; `None`: a
    /// random key per process (resumption works until the listener restarts).
    pub ticket_keys: Option<[u8; tls::TICKET_KEYS_LEN]>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            allow: None,
            max_connections: 1024,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(15),
            mtu: 1400,
            max_message: super::MAX_DTLS_PLAINTEXT,
            peer_queue: 64,
            failures: FailurePolicy::default(),
            ticket_keys: None,
        }
    }
}

/// Counters of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    pub accepted: u64,
    pub handshake_failures: u64,
    /// Datagrams and TCP connections ignored because the source is banned.
    pub banned_drops: u64,
    /// Datagrams from unknown sources that were not a ClientHello with a
    /// valid cookie (answered statelessly or dropped).
    pub stateless_drops: u64,
    /// Refused because of `max_connections` / `max_handshakes`.
    pub limit_drops: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    handshake_failures: AtomicU64,
    banned_drops: AtomicU64,
    stateless_drops: AtomicU64,
    limit_drops: AtomicU64,
}

struct Shared {
    opts: ListenOptions,
    failures: Mutex<FailureTracker<IpAddr>>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    counters: Counters,
    accepted: mpsc::Sender<Connection>,
}

impl Shared {
    fn banned(&self, ip: IpAddr) -> bool {
        self.failures
            .lock()
            .map(|f| f.is_banned(Instant::now(), &ip))
            .unwrap_or(false)
    }

    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims a handshake and a connection slot, or refuses.
    fn slots(&self, peer: SocketAddr) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let hs = self.handshakes.clone().try_acquire_owned().ok();
        let conn = self.connections.clone().try_acquire_owned().ok();
        match (hs, conn) {
            (Some(h), Some(c)) => Some((h, c)),
            _ => {
                self.count(&self.counters.limit_drops);
                tracing::warn!(%peer, "refusing: connection or handshake limit reached");
                None
            }
        }
    }

    fn handshake_failed(&self, peer: SocketAddr, e: &TransportError) {
        self.count(&self.counters.handshake_failures);
        tracing::warn!(%peer, error = %e, "handshake failed");
        if e.is_authentication_failure() {
            let banned = self
                .failures
                .lock()
                .map(|mut f| f.record_failure(Instant::now(), peer.ip()))
                .unwrap_or(false);
            if banned {
                tracing::warn!(ip = %peer.ip(), "too many failed handshakes: ignoring this address for a while");
            }
        }
    }

    /// Post-handshake checks, then hands the connection to `accept`.
    async fn deliver(&self, conn: Connection) {
        let peer = conn.peer_addr();
        let allowed = tls::check_allowed(conn.ssl(), self.opts.allow.as_deref());
        if !allowed {
            let e = TransportError::NotAllowed {
                peer,
                identity: conn.peer_identity(),
            };
            self.handshake_failed(peer, &e);
            let mut conn = conn;
            conn.close().await;
            return;
        }
        if let Ok(mut f) = self.failures.lock() {
            f.record_success(Instant::now(), &peer.ip());
        }
        self.count(&self.counters.accepted);
        tracing::info!(
            %peer, transport = %conn.transport(), identity = ?conn.peer_identity(),
            resumed = conn.session_reused(), version = conn.protocol_version(), "agent connected"
        );
        if self.accepted.send(conn).await.is_err() {
            tracing::debug!(%peer, "listener gone: dropping connection");
        }
    }
}

/// Accepts authenticated agents on UDP (DTLS) and TCP (TLS).
pub struct Listener {
    rx: mpsc::Receiver<Connection>,
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn server_contexts(
    creds: &Credentials,
    opts: &ListenOptions,
    udp: bool,
    tcp: bool,
) -> Result<(Option<SslContext>, Option<SslContext>), TransportError> {
    let dtls = if udp {
        let mut b = tls::context_builder(creds, Transport::Udp, Role::Server, opts.allow.clone())?;
        b.set_options(openssl::ssl::SslOptions::COOKIE_EXCHANGE);
        let key = Arc::new(CookieKey::random()?);
        let index = dtls::peer_index()?;
        let k = key.clone();
        b.set_cookie_generate_cb(move |ssl, out| {
            let peer = ssl
                .ex_data(index)
                .ok_or_else(openssl::error::ErrorStack::get)?;
            let c = k.cookie(peer)?;
            let n = c.len().min(out.len());
            out[..n].copy_from_slice(&c[..n]);
            Ok(n)
        });
        b.set_cookie_verify_cb(move |ssl, cookie| {
            ssl.ex_data(index)
                .is_some_and(|peer| key.verify(peer, cookie))
        });
        if let Some(keys) = &opts.ticket_keys {
            tls::set_ticket_keys(&mut b, keys)?;
        }
        Some(b.build())
    } else {
        None
    };
    let tls = if tcp {
        let mut b = tls::context_builder(creds, Transport::Tcp, Role::Server, opts.allow.clone())?;
        if let Some(keys) = &opts.ticket_keys {
            tls::set_ticket_keys(&mut b, keys)?;
        }
        Some(b.build())
    } else {
        None
    };
    Ok((dtls, tls))
}

impl Listener {
    /// Binds the given addresses (at least one) and starts accepting.
    pub async fn bind(
        udp_addr: Option<SocketAddr>,
        tcp_addr: Option<SocketAddr>,
        creds: &Credentials,
        opts: ListenOptions,
    ) -> Result<Listener, TransportError> {
        if udp_addr.is_none() && tcp_addr.is_none() {
            return Err(TransportError::NoCandidates);
        }
        let (dtls_ctx, tls_ctx) =
            server_contexts(creds, &opts, udp_addr.is_some(), tcp_addr.is_some())?;
        let (tx, rx) = mpsc::channel(opts.max_handshakes.max(1));
        let shared = Arc::new(Shared {
            failures: Mutex::new(FailureTracker::new(opts.failures)),
            connections: Arc::new(Semaphore::new(opts.max_connections)),
            handshakes: Arc::new(Semaphore::new(opts.max_handshakes)),
            counters: Counters::default(),
            accepted: tx,
            opts,
        });
        let mut tasks = Vec::new();
        let mut udp = None;
        let mut tcp = None;
        if let (Some(addr), Some(ctx)) = (udp_addr, dtls_ctx) {
            let sock = UdpSocket::bind(addr)
                .await
                .map_err(|source| TransportError::Io {
                    action: "binding UDP",
                    addr,
                    source,
                })?;
            udp = sock.local_addr().ok();
            tracing::info!(addr = ?udp, "listening for DTLS");
            tasks.push(tokio::spawn(udp_loop(Arc::new(sock), ctx, shared.clone())));
        }
        if let (Some(addr), Some(ctx)) = (tcp_addr, tls_ctx) {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| TransportError::Io {
                    action: "binding TCP",
                    addr,
                    source,
                })?;
            tcp = l.local_addr().ok();
            tracing::info!(addr = ?tcp, "listening for TLS");
            tasks.push(tokio::spawn(tcp_loop(l, ctx, shared.clone())));
        }
        Ok(Listener {
            rx,
            udp,
            tcp,
            shared,
            tasks,
        })
    }

    /// The next authenticated connection. Cancel-safe.
    pub async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.rx.recv().await.ok_or(TransportError::ListenerClosed)
    }

    pub fn local_udp_addr(&self) -> Option<SocketAddr> {
        self.udp
    }

    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    pub fn stats(&self) -> ListenerStats {
        let c = &self.shared.counters;
        ListenerStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            handshake_failures: c.handshake_failures.load(Ordering::Relaxed),
            banned_drops: c.banned_drops.load(Ordering::Relaxed),
            stateless_drops: c.stateless_drops.load(Ordering::Relaxed),
            limit_drops: c.limit_drops.load(Ordering::Relaxed),
        }
    }

    /// Whether `ip` is on the drop-list now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        self.shared.banned(ip)
    }
}

type PeerMap = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// Smallest DTLS record header (13) plus a handshake header (12).
const MIN_CLIENT_HELLO: usize = 25;
const DTLS_CONTENT_HANDSHAKE: u8 = 22;

async fn udp_loop(sock: Arc<UdpSocket>, ctx: SslContext, shared: Arc<Shared>) {
    let peers: PeerMap = Arc::default();
    let params = DtlsParams {
        mtu: shared.opts.mtu,
        max_message: shared.opts.max_message,
        loss: None,
    };
    // Records carry at most 16 KiB plus overhead; anything bigger is not DTLS.
    let max_datagram = super::MAX_DTLS_PLAINTEXT + 2048;
    let mut buf = vec![0u8; 65536];
    let mut last_prune = Instant::now();
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if last_prune.elapsed() > Duration::from_secs(10) {
            last_prune = Instant::now();
            if let Ok(mut f) = shared.failures.lock() {
                f.prune(last_prune);
            }
        }
        if n > max_datagram {
            continue;
        }
        let existing = peers.lock().ok().and_then(|p| p.get(&src).cloned());
        if let Some(tx) = existing {
            // Full queue: drop, as the network could.
            let _ = tx.try_send(buf[..n].to_vec());
            continue;
        }
        if shared.banned(src.ip()) {
            shared.count(&shared.counters.banned_drops);
            continue;
        }
        if n < MIN_CLIENT_HELLO || buf[0] != DTLS_CONTENT_HANDSHAKE {
            shared.count(&shared.counters.stateless_drops);
            continue;
        }
        let (tx, rx) = mpsc::channel(shared.opts.peer_queue.max(1));
        // No state is kept unless the ClientHello carries a valid cookie, so a
        // spoofed source gets one HelloVerifyRequest (smaller than its
        // ClientHello) and allocates nothing.
        let conn = match dtls::listen(&ctx, sock.clone(), src, buf[..n].to_vec(), rx, &params) {
            Ok(ListenOutcome::Verified(c)) => c,
            Ok(ListenOutcome::Stateless) => {
                shared.count(&shared.counters.stateless_drops);
                continue;
            }
            Err(e) => {
                tracing::debug!(peer = %src, error = %e, "DTLS listen error");
                continue;
            }
        };
        let Some((hs_permit, conn_permit)) = shared.slots(src) else {
            continue;
        };
        if let Ok(mut p) = peers.lock() {
            p.insert(src, tx.clone());
        }
        let slot = PeerSlot {
            peers: peers.clone(),
            addr: src,
            tx,
            _permit: conn_permit,
        };
        tokio::spawn(dtls_handshake(conn, slot, hs_permit, shared.clone()));
    }
}

async fn dtls_handshake(
    mut conn: Box<DtlsConnection>,
    slot: PeerSlot,
    _hs_permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let peer = slot.addr;
    conn.set_slot(slot);
    let timeout = shared.opts.handshake_timeout;
    let r = match tokio::time::timeout(timeout, conn.handshake()).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::HandshakeTimeout {
            transport: Transport::Udp,
            peer,
            after: timeout,
        }),
    };
    drop(_hs_permit);
    match r {
        Ok(()) => shared.deliver(Connection::Dtls(*conn)).await,
        Err(e) => shared.handshake_failed(peer, &e),
    }
}

async fn tcp_loop(listener: TcpListener, ctx: SslContext, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "TCP accept error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.banned(peer.ip()) {
            shared.count(&shared.counters.banned_drops);
            drop(tcp);
            continue;
        }
        let Some((hs, conn)) = shared.slots(peer) else {
            continue;
        };
        let ssl = match Ssl::new(&ctx) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "creating SSL");
                continue;
            }
        };
        tokio::spawn(tls_handshake(tcp, peer, ssl, hs, conn, shared.clone()));
    }
}

async fn tls_handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    ssl: Ssl,
    hs: OwnedSemaphorePermit,
    conn_permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let timeout = shared.opts.handshake_timeout;
    let r = match tokio::time::timeout(
        timeout,
        TlsConnection::accept(tcp, peer, ssl, shared.opts.max_message),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(TransportError::HandshakeTimeout {
            transport: Transport::Tcp,
            peer,
            after: timeout,
        }),
    };
    drop(hs);
    match r {
        Ok(mut c) => {
            c.set_slot(conn_permit);
            shared.deliver(Connection::Tls(c)).await
        }
        Err(e) => shared.handshake_failed(peer, &e),
    }
}
