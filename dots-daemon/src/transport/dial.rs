//! The agent side: dialing the Call Home DOTS client with Happy Eyeballs
//! across address families and transports (RFC 9132 §4.3, RFC 8305),
//! session resumption and a drop-list for peers that keep failing.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use openssl::ssl::SslContext;
use tokio::{
    net::{TcpStream, UdpSocket},
    task::JoinSet,
    time::Instant,
};

use super::{
    dtls::{DtlsConnection, DtlsParams},
    tls::{self, Credentials, PeerIdentity, Role, SessionCache},
    tls_stream::TlsConnection,
    Backoff, Connection, DatagramLoss, FailurePolicy, FailureTracker, Transport, TransportError,
};

/// Dialer settings.
#[derive(Clone, Debug)]
pub struct DialOptions {
    /// Head start of IPv6 over IPv4 (RFC 8305 "Connection Attempt Delay").
    pub family_delay: Duration,
    /// Head start of DTLS over TLS for the same family.
    pub transport_delay: Duration,
    /// Delay between further addresses of the same family and transport.
    pub attempt_delay: Duration,
    /// Limit for TCP connect plus (D)TLS handshake of one attempt.
    pub handshake_timeout: Duration,
    /// Link MTU for DTLS (datagrams are this minus IP/UDP headers).
    pub mtu: usize,
    /// Largest datagram (DTLS) or read chunk (TLS).
    pub max_message: usize,
    /// Peers (addresses) that fail authentication this often are skipped.
    pub failures: FailurePolicy,
    /// Fault injection for tests (DTLS only).
    pub loss: Option<DatagramLoss>,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            family_delay: Duration::from_millis(250),
            transport_delay: Duration::from_millis(250),
            attempt_delay: Duration::from_millis(250),
            handshake_timeout: Duration::from_secs(15),
            mtu: 1400,
            max_message: super::MAX_DTLS_PLAINTEXT,
            failures: FailurePolicy {
                threshold: 5,
                window: Duration::from_secs(600),
                ban: Duration::from_secs(300),
            },
            loss: None,
        }
    }
}

struct Shared {
    dtls: SslContext,
    tls: SslContext,
    sessions: SessionCache,
    opts: DialOptions,
}

/// Dials Call Home DOTS clients; keeps sessions for resumption and a record
/// of failing peers across dials.
pub struct Dialer {
    shared: Arc<Shared>,
    failures: FailureTracker<SocketAddr>,
}

impl Dialer {
    pub fn new(creds: &Credentials, opts: DialOptions) -> Result<Dialer, TransportError> {
        let sessions = SessionCache::default();
        let mut dtls = tls::context_builder(creds, Transport::Udp, Role::Client, None)?;
        sessions.install(&mut dtls)?;
        let mut tls = tls::context_builder(creds, Transport::Tcp, Role::Client, None)?;
        sessions.install(&mut tls)?;
        let failures = FailureTracker::new(opts.failures);
        Ok(Dialer {
            shared: Arc::new(Shared {
                dtls: dtls.build(),
                tls: tls.build(),
                sessions,
                opts,
            }),
            failures,
        })
    }

    /// The sessions kept for resumption.
    pub fn sessions(&self) -> &SessionCache {
        &self.shared.sessions
    }

    /// Whether `addr` is on the drop-list now.
    pub fn is_banned(&self, addr: &SocketAddr) -> bool {
        self.failures.is_banned(std::time::Instant::now(), addr)
    }

    /// Races (D)TLS handshakes to the candidates, IPv6 and DTLS first, and
    /// returns the first authenticated connection; the other attempts are
    /// cancelled. Candidates on the drop-list are skipped.
    pub async fn dial(
        &mut self,
        candidates: &[(SocketAddr, Transport)],
        peer: &PeerIdentity,
    ) -> Result<Connection, TransportError> {
        if candidates.is_empty() {
            return Err(TransportError::NoCandidates);
        }
        let now = std::time::Instant::now();
        let usable: Vec<_> = candidates
            .iter()
            .copied()
            .filter(|(a, _)| !self.failures.is_banned(now, a))
            .collect();
        if usable.is_empty() {
            return Err(TransportError::AllBanned);
        }
        let mut pending: VecDeque<_> = schedule(&usable, &self.shared.opts).into();
        let start = Instant::now();
        let mut pulled_forward = Duration::ZERO;
        let mut running = JoinSet::new();
        let mut errors = Vec::new();
        loop {
            let next = pending
                .front()
                .map(|(at, _, _)| start + at.saturating_sub(pulled_forward));
            tokio::select! {
                _ = tokio::time::sleep_until(next.unwrap_or(start)), if next.is_some() => {
                    if let Some((_, addr, transport)) = pending.pop_front() {
                        tracing::debug!(%addr, %transport, "dialing");
                        let shared = self.shared.clone();
                        let peer = peer.clone();
                        running.spawn(async move { (addr, attempt(shared, addr, transport, peer).await) });
                    }
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok((addr, Ok(conn))) => {
                            self.failures.record_success(std::time::Instant::now(), &addr);
                            tracing::info!(
                                %addr, transport = %conn.transport(), identity = ?conn.peer_identity(),
                                resumed = conn.session_reused(), "connected"
                            );
                            return Ok(conn); // dropping `running` cancels the others
                        }
                        Ok((addr, Err(e))) => {
                            tracing::warn!(%addr, error = %e, "connection attempt failed");
                            if e.is_authentication_failure()
                                && self.failures.record_failure(std::time::Instant::now(), addr)
                            {
                                tracing::warn!(%addr, "peer keeps failing authentication: skipping it for a while");
                            }
                            errors.push(e);
                            // RFC 8305 §5: a failure starts the next attempt now.
                            if let Some((at, _, _)) = pending.front() {
                                pulled_forward = pulled_forward.max(at.saturating_sub(start.elapsed()));
                            }
                        }
                        Err(join) => errors.push(TransportError::Handshake {
                            transport: Transport::Tcp,
                            peer: peer_placeholder(),
                            reason: format!("attempt task failed: {join}"),
                            authentication: false,
                        }),
                    }
                }
                else => return Err(TransportError::AllFailed(errors)),
            }
        }
    }

    /// Dials until a connection works, sleeping per `backoff` between
    /// rounds (reset on success). Ends only with a connection or when no
    /// candidate is usable at all. Cancel-safe (drop it to stop).
    pub async fn reconnect(
        &mut self,
        candidates: &[(SocketAddr, Transport)],
        peer: &PeerIdentity,
        backoff: &mut Backoff,
    ) -> Result<Connection, TransportError> {
        loop {
            match self.dial(candidates, peer).await {
                Ok(c) => {
                    backoff.reset();
                    return Ok(c);
                }
                Err(TransportError::NoCandidates) => return Err(TransportError::NoCandidates),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "reconnecting after a delay");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn peer_placeholder() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

/// One-shot dial without keeping sessions or failure records.
pub async fn dial(
    candidates: &[(SocketAddr, Transport)],
    creds: &Credentials,
    peer: &PeerIdentity,
    opts: DialOptions,
) -> Result<Connection, TransportError> {
    Dialer::new(creds, opts)?.dial(candidates, peer).await
}

/// Start offsets of the attempts: IPv6 before IPv4 by `family_delay`, UDP
/// before TCP by `transport_delay` (each only when both kinds are present),
/// further addresses of one kind `attempt_delay` apart. Sorted by offset,
/// then IPv6 before IPv4 and UDP before TCP, else in candidate order.
pub(crate) fn schedule(
    candidates: &[(SocketAddr, Transport)],
    opts: &DialOptions,
) -> Vec<(Duration, SocketAddr, Transport)> {
    let has_v6 = candidates.iter().any(|(a, _)| a.is_ipv6());
    let has_v4 = candidates.iter().any(|(a, _)| a.is_ipv4());
    let has_udp = candidates.iter().any(|(_, t)| *t == Transport::Udp);
    let has_tcp = candidates.iter().any(|(_, t)| *t == Transport::Tcp);
    let mut seen = std::collections::HashMap::new();
    let mut out: Vec<_> = candidates
        .iter()
        .map(|&(addr, t)| {
            let mut at = Duration::ZERO;
            if addr.is_ipv4() && has_v6 && has_v4 {
                at += opts.family_delay;
            }
            if t == Transport::Tcp && has_udp && has_tcp {
                at += opts.transport_delay;
            }
            let n = seen.entry((addr.is_ipv4(), t)).or_insert(0u32);
            at += opts.attempt_delay * *n;
            *n += 1;
            (at, addr, t)
        })
        .collect();
    out.sort_by_key(|(at, a, t)| (*at, a.is_ipv4(), *t));
    out
}

async fn attempt(
    shared: Arc<Shared>,
    addr: SocketAddr,
    transport: Transport,
    peer: PeerIdentity,
) -> Result<Connection, TransportError> {
    let opts = &shared.opts;
    let timeout = opts.handshake_timeout;
    let key = SessionCache::key(transport, &peer);
    let fut = async {
        match transport {
            Transport::Udp => {
                let ssl = tls::client_ssl(&shared.dtls, &peer, &shared.sessions, key)?;
                let local: SocketAddr = if addr.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let io = |action| {
                    move |source| TransportError::Io {
                        action,
                        addr,
                        source,
                    }
                };
                let sock = UdpSocket::bind(local)
                    .await
                    .map_err(io("binding a UDP socket for"))?;
                sock.connect(addr).await.map_err(io("connecting UDP to"))?;
                let params = DtlsParams {
                    mtu: opts.mtu,
                    max_message: opts.max_message,
                    loss: opts.loss.clone(),
                };
                DtlsConnection::connect(sock, addr, ssl, &params)
                    .await
                    .map(Connection::Dtls)
            }
            Transport::Tcp => {
                let ssl = tls::client_ssl(&shared.tls, &peer, &shared.sessions, key)?;
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|source| TransportError::Io {
                        action: "connecting TCP to",
                        addr,
                        source,
                    })?;
                TlsConnection::connect(tcp, addr, ssl, opts.max_message)
                    .await
                    .map(Connection::Tls)
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::HandshakeTimeout {
            transport,
            peer: addr,
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_prefers_ipv6_and_udp() {
        let v4: SocketAddr = "192.0.2.1:4647".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4647".parse().unwrap();
        let o = DialOptions::default();
        let s = schedule(
            &[
                (v4, Transport::Tcp),
                (v4, Transport::Udp),
                (v6, Transport::Tcp),
                (v6, Transport::Udp),
            ],
            &o,
        );
        let order: Vec<_> = s
            .iter()
            .map(|(at, a, t)| (at.as_millis(), a.is_ipv6(), *t))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, true, Transport::Udp),
                (250, true, Transport::Tcp),
                (250, false, Transport::Udp),
                (500, false, Transport::Tcp)
            ]
        );
        // only one kind: no artificial delay
        let s = schedule(&[(v4, Transport::Tcp)], &o);
        assert_eq!(s[0].0, Duration::ZERO);
        let s = schedule(&[(v4, Transport::Udp), (v4, Transport::Udp)], &o);
        assert_eq!((s[0].0.as_millis(), s[1].0.as_millis()), (0, 250));
    }
}
