//! DTLS over UDP: openssl's `SslStream` over a datagram I/O type (one read =
//! one datagram, WouldBlock when none), driven by tokio, with the DTLS
//! retransmission timer driven explicitly (DTLSv1_get_timeout /
//! DTLSv1_handle_timeout).
//!
//! Client side: a connected UDP socket. Server side: one socket shared by all
//! peers; the listener's demultiplexer feeds each peer's datagrams through a
//! channel, and new peers go through the stateless cookie exchange
//! (DTLSv1_listen) first.

mod cookie;
mod datagram;
mod ffi;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use openssl::ssl::{ErrorCode, Ssl, SslRef, SslStream};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, OwnedSemaphorePermit},
};

pub(super) use cookie::{listen, peer_index, ListenOutcome};
use datagram::DatagramIo;
pub use datagram::DatagramLoss;
use ffi::{dtls_handle_timeout, dtls_timeout};

use super::{tls, Transport, TransportError, MAX_DTLS_PLAINTEXT};

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

enum Wake {
    Io(io::Result<()>),
    Timer,
}

/// What a server-side connection holds on the listener: its demux entry
/// (removed on drop) and its connection slot.
pub(crate) struct PeerSlot {
    pub(crate) peers: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>,
    pub(crate) addr: SocketAddr,
    pub(crate) tx: mpsc::Sender<Vec<u8>>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut peers) = self.peers.lock() {
            if peers
                .get(&self.addr)
                .is_some_and(|tx| tx.same_channel(&self.tx))
            {
                peers.remove(&self.addr);
            }
        }
    }
}

/// A DTLS connection to one peer.
pub struct DtlsConnection {
    stream: SslStream<DatagramIo>,
    peer: SocketAddr,
    identity: Option<String>,
    closed: bool,
    max_message: usize,
    slot: Option<PeerSlot>,
}

/// How a DTLS connection is set up.
#[derive(Clone, Debug)]
pub(crate) struct DtlsParams {
    /// Link MTU; the DTLS datagram size is this minus IP and UDP headers.
    pub mtu: usize,
    pub max_message: usize,
    pub loss: Option<DatagramLoss>,
}

fn set_mtu(ssl: &mut SslRef, mtu: usize, peer: &SocketAddr) -> Result<(), TransportError> {
    let overhead = if peer.is_ipv4() { 28 } else { 48 };
    let payload = mtu.saturating_sub(overhead).clamp(256, 65507) as u32;
    ssl.set_mtu(payload)?;
    Ok(())
}

impl DtlsConnection {
    fn new(stream: SslStream<DatagramIo>, peer: SocketAddr, max_message: usize) -> Self {
        DtlsConnection {
            stream,
            peer,
            identity: None,
            closed: false,
            max_message: max_message.clamp(1, MAX_DTLS_PLAINTEXT),
            slot: None,
        }
    }

    /// Client side: handshakes over `sock` (connected to `peer`).
    pub(crate) async fn connect(
        sock: UdpSocket,
        peer: SocketAddr,
        mut ssl: Ssl,
        params: &DtlsParams,
    ) -> Result<DtlsConnection, TransportError> {
        ssl.set_connect_state();
        set_mtu(&mut ssl, params.mtu, &peer)?;
        let io = DatagramIo::connected(Arc::new(sock), peer, params.loss.clone());
        let stream = SslStream::new(ssl, io)?;
        let mut c = DtlsConnection::new(stream, peer, params.max_message);
        c.handshake().await?;
        Ok(c)
    }

    /// Drives the handshake to its end: reads, retransmission timers.
    /// Not cancel-safe in the sense that a cancelled handshake cannot be
    /// resumed (wrap it in a timeout and drop the connection).
    pub async fn handshake(&mut self) -> Result<(), TransportError> {
        loop {
            match self.stream.do_handshake() {
                Ok(()) => {
                    self.identity = tls::peer_identity_of(self.stream.ssl());
                    return Ok(());
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    if self.stream.get_ref().input_closed() {
                        return Err(self.handshake_error("listener stopped".into(), false));
                    }
                    match self.wait().await {
                        Wake::Io(Ok(())) => {}
                        Wake::Io(Err(e)) => return Err(self.handshake_error(e.to_string(), false)),
                        Wake::Timer => {
                            tracing::trace!(peer = %self.peer, "DTLS handshake timer expired: retransmitting");
                            if let Err(e) = dtls_handle_timeout(self.stream.ssl()) {
                                return Err(self.handshake_error(e.to_string(), false));
                            }
                        }
                    }
                }
                Err(e) => {
                    let (reason, auth) = tls::handshake_failure(self.stream.ssl(), &e);
                    return Err(self.handshake_error(reason, auth));
                }
            }
        }
    }

    fn handshake_error(&self, reason: String, authentication: bool) -> TransportError {
        TransportError::Handshake {
            transport: Transport::Udp,
            peer: self.peer,
            reason,
            authentication,
        }
    }

    async fn wait(&mut self) -> Wake {
        let timeout = dtls_timeout(self.stream.ssl());
        tokio::select! {
            r = self.stream.get_mut().wait() => Wake::Io(r),
            _ = sleep_opt(timeout) => Wake::Timer,
        }
    }

    /// Waits until [`try_recv`](Self::try_recv) may have something, running
    /// the retransmission timer meanwhile. Cancel-safe. May return without
    /// data (then `try_recv` yields `None`).
    pub async fn readable(&mut self) -> io::Result<()> {
        if self.closed || self.stream.get_ref().input_closed() {
            return Ok(());
        }
        match self.wait().await {
            Wake::Io(r) => r,
            Wake::Timer => dtls_handle_timeout(self.stream.ssl()),
        }
    }

    /// One decrypted datagram, or `None` when nothing is pending. Call it
    /// until `None` before waiting with [`readable`](Self::readable). After
    /// the peer's close_notify: an error of kind `ConnectionAborted`, and
    /// [`is_closed`](Self::is_closed) is true. Records over `max_message` are
    /// dropped.
    pub fn try_recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        // On the stack, not one per connection: 16 kB times 10,000 agents.
        let mut buf = [0u8; MAX_DTLS_PLAINTEXT];
        loop {
            if self.closed {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "DTLS connection closed",
                ));
            }
            match self.stream.ssl_read(&mut buf) {
                Ok(n) if n > self.max_message => {
                    tracing::warn!(peer = %self.peer, len = n, max = self.max_message, "dropping oversized datagram");
                }
                Ok(n) => return Ok(Some(buf[..n].to_vec())),
                Err(e) => match e.code() {
                    ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => {
                        if self.stream.get_ref().input_closed() {
                            self.closed = true;
                            continue;
                        }
                        return Ok(None);
                    }
                    ErrorCode::ZERO_RETURN => {
                        tracing::debug!(peer = %self.peer, "DTLS close_notify received");
                        self.closed = true;
                    }
                    _ => {
                        self.closed = true;
                        return Err(e.into_io_error().unwrap_or_else(io::Error::other));
                    }
                },
            }
        }
    }

    /// Sends one datagram (one DTLS record).
    pub fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "DTLS connection closed",
            ));
        }
        if datagram.len() > self.max_message {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes exceeds the limit of {}",
                    datagram.len(),
                    self.max_message
                ),
            ));
        }
        match self.stream.ssl_write(datagram) {
            Ok(_) => Ok(()),
            Err(e) if e.code() == ErrorCode::WANT_WRITE || e.code() == ErrorCode::WANT_READ => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e.into_io_error().unwrap_or_else(io::Error::other)),
        }
    }

    /// Sends close_notify (also after receiving the peer's); later calls
    /// fail. Without our close_notify, OpenSSL frees the connection as if it
    /// failed and marks its session not resumable.
    pub fn close(&mut self) {
        let sent = self
            .stream
            .get_shutdown()
            .contains(openssl::ssl::ShutdownState::SENT);
        if !sent {
            if let Err(e) = self.stream.shutdown() {
                tracing::debug!(peer = %self.peer, error = %e, "DTLS shutdown");
            }
        }
        self.closed = true;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.get_ref().local_addr()
    }

    pub fn peer_identity(&self) -> Option<String> {
        self.identity.clone()
    }

    pub fn ssl(&self) -> &SslRef {
        self.stream.ssl()
    }

    pub(crate) fn set_slot(&mut self, slot: PeerSlot) {
        self.slot = Some(slot);
    }
}
