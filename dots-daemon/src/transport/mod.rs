//! The (D)TLS transport of the signal channel Call Home (RFC 9066 §5.1).
//!
//! Call Home reverses the (D)TLS roles: the agent (Call Home DOTS *server*)
//! is the (D)TLS **client** and dials out ([`Dialer`], [`dial`]); the ISP-side
//! `dots-client` (Call Home DOTS *client*) is the (D)TLS **server** and listens
//! ([`Listener`]). Mutual certificate authentication is mandatory on both
//! sides (RFC 9066 §8): the dialer checks the listener's certificate against a
//! reference identifier ([`PeerIdentity`], DNS-ID or IP in subjectAltName),
//! the listener requires a client certificate from its CA and, optionally, an
//! identity from an allow-list.
//!
//! This layer carries opaque bytes: one decrypted datagram per DTLS record
//! over UDP, a byte stream over TCP (RFC 8323 framing is the caller's job).
//! Every [`Connection`] method that waits is cancel-safe except `send` on TLS,
//! so a session can sit in one `tokio::select!` loop with its timers.

mod backoff;
mod dial;
mod dtls;
mod failure;
mod listen;
mod tls;
mod tls_stream;

use std::{fmt, io, net::SocketAddr, path::PathBuf, time::Duration};

use openssl::{
    error::ErrorStack,
    ssl::{SslRef, SslSession},
};
use thiserror::Error;

pub use backoff::Backoff;
pub use dial::{dial, DialOptions, Dialer};
pub use dtls::{DatagramLoss, DtlsConnection};
pub use failure::{FailurePolicy, FailureTracker};
pub use listen::{ListenOptions, Listener, ListenerStats};
pub use tls::{
    cert_identity, cert_names, Credentials, PeerIdentity, SessionCache, TICKET_KEYS_LEN,
};
pub use tls_stream::TlsConnection;

/// Default port of the signal channel Call Home (the early draft's 4647).
pub const DEFAULT_PORT: u16 = 4647;

/// The largest plaintext a DTLS record can carry.
pub const MAX_DTLS_PLAINTEXT: usize = 16384;

/// UDP with DTLS, or TCP with TLS. Written `udp` / `tcp` in files, JSON
/// and discovery output; displayed `DTLS/UDP` / `TLS/TCP` in logs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The short name: `udp` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "DTLS/UDP",
            Transport::Tcp => "TLS/TCP",
        })
    }
}

/// Why a transport operation failed.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("loading {what} from {path}: {source}")]
    Credentials {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: ErrorStack,
    },
    #[error("OpenSSL: {0}")]
    Ssl(#[from] ErrorStack),
    #[error("{action} {addr}: {source}")]
    Io {
        action: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{transport} handshake with {peer} failed: {reason}")]
    Handshake {
        transport: Transport,
        peer: SocketAddr,
        reason: String,
        authentication: bool,
    },
    #[error("{transport} handshake with {peer} timed out after {after:?}")]
    HandshakeTimeout {
        transport: Transport,
        peer: SocketAddr,
        after: Duration,
    },
    #[error("{peer}: certificate identity {identity:?} is not in the allow-list")]
    NotAllowed {
        peer: SocketAddr,
        identity: Option<String>,
    },
    #[error("no candidate address to dial")]
    NoCandidates,
    #[error("every candidate is temporarily banned after repeated failures")]
    AllBanned,
    #[error("all {} attempts failed: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<TransportError>),
    #[error("the listener has stopped")]
    ListenerClosed,
}

impl TransportError {
    /// True when the peer took part in a (D)TLS exchange that failed on
    /// protocol or authentication grounds (bad certificate, alert, garbage),
    /// as opposed to timeouts, resets and unreachable addresses. Only these
    /// count towards a ban (RFC 9066 §8: "unsuccessful authentication
    /// attempts"), so that cancelled Happy Eyeballs attempts do not.
    pub fn is_authentication_failure(&self) -> bool {
        matches!(
            self,
            TransportError::Handshake {
                authentication: true,
                ..
            } | TransportError::NotAllowed { .. }
        )
    }
}

/// What [`Connection::recv`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// One decrypted DTLS datagram (one CoAP message).
    Datagram(Vec<u8>),
    /// Some bytes of the TLS stream (any slice of the RFC 8323 frames).
    Stream(Vec<u8>),
    /// The peer closed the connection (close_notify or end of stream).
    Closed,
}

/// An authenticated (D)TLS connection, either side.
pub enum Connection {
    Dtls(DtlsConnection),
    Tls(TlsConnection),
}

impl Connection {
    /// The next datagram or chunk of stream bytes. Cancel-safe.
    pub async fn recv(&mut self) -> io::Result<Incoming> {
        match self {
            Connection::Dtls(c) => loop {
                match c.try_recv() {
                    Ok(Some(d)) => return Ok(Incoming::Datagram(d)),
                    Ok(None) => c.readable().await?,
                    // close_notify (or the listener stopped); other errors
                    // (fatal alerts, ICMP unreachable) are passed on once.
                    Err(e) if c.is_closed() && e.kind() == io::ErrorKind::ConnectionAborted => {
                        return Ok(Incoming::Closed)
                    }
                    Err(e) => return Err(e),
                }
            },
            Connection::Tls(c) => Ok(match c.recv().await? {
                Some(b) => Incoming::Stream(b),
                None => Incoming::Closed,
            }),
        }
    }

    /// Sends one datagram (DTLS) or writes and flushes bytes (TLS). Not
    /// cancel-safe on TLS: a cancelled send may have written part of `data`.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Connection::Dtls(c) => c.send(data),
            Connection::Tls(c) => c.send(data).await,
        }
    }

    /// Sends close_notify (and shuts the TCP write side down).
    pub async fn close(&mut self) {
        match self {
            Connection::Dtls(c) => c.close(),
            Connection::Tls(c) => c.close().await,
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            Connection::Dtls(_) => Transport::Udp,
            Connection::Tls(_) => Transport::Tcp,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        match self {
            Connection::Dtls(c) => c.peer_addr(),
            Connection::Tls(c) => c.peer_addr(),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Connection::Dtls(c) => c.local_addr(),
            Connection::Tls(c) => c.local_addr(),
        }
    }

    /// The peer's certificate identity: its first DNS subjectAltName, else its
    /// first IP subjectAltName, else its subject CN.
    pub fn peer_identity(&self) -> Option<String> {
        match self {
            Connection::Dtls(c) => c.peer_identity(),
            Connection::Tls(c) => c.peer_identity(),
        }
    }

    /// The OpenSSL state of either transport.
    pub fn ssl(&self) -> &SslRef {
        match self {
            Connection::Dtls(c) => c.ssl(),
            Connection::Tls(c) => c.ssl(),
        }
    }

    /// Whether the handshake resumed an earlier session.
    pub fn session_reused(&self) -> bool {
        self.ssl().session_reused()
    }

    /// The negotiated protocol version, e.g. "TLSv1.3" or "DTLSv1.2".
    pub fn protocol_version(&self) -> &'static str {
        self.ssl().version_str()
    }

    /// The peer's certificate (its expiry triggers a new discovery).
    pub fn peer_certificate(&self) -> Option<openssl::x509::X509> {
        self.ssl().peer_certificate()
    }

    /// The current session, for callers that keep their own cache.
    pub fn session(&self) -> Option<SslSession> {
        self.ssl().session().map(|s| s.to_owned())
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("transport", &self.transport())
            .field("peer", &self.peer_addr())
            .field("identity", &self.peer_identity())
            .finish()
    }
}
