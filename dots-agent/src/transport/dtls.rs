//! DTLS over UDP: openssl's `SslStream` over a datagram I/O type (one read =
//! one datagram, WouldBlock when none), driven by tokio, with the DTLS
//! retransmission timer driven explicitly (DTLSv1_get_timeout /
//! DTLSv1_handle_timeout).
//!
//! Client side: a connected UDP socket. Server side: one socket shared by all
//! peers; the listener's demultiplexer feeds each peer's datagrams through a
//! channel, and new peers go through the stateless cookie exchange
//! (DTLSv1_listen) first.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::SocketAddr,
    os::raw::{c_int, c_long, c_void},
    ptr,
    sync::{Arc, Mutex},
    time::Duration,
};

use foreign_types::ForeignTypeRef;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslRef, SslStream};
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, OwnedSemaphorePermit},
};

use super::{tls, Transport, TransportError, MAX_DTLS_PLAINTEXT};

const DTLS_CTRL_GET_TIMEOUT: c_int = 73;
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

extern "C" {
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut c_void) -> c_int;
    fn BIO_ADDR_new() -> *mut c_void;
    fn BIO_ADDR_free(a: *mut c_void);
}

/// Deterministic datagram loss for tests: 0-based indices of the datagrams
/// this side sends or receives that are silently dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatagramLoss {
    pub drop_outgoing: Vec<u64>,
    pub drop_incoming: Vec<u64>,
}

enum Source {
    /// Client: the socket is connected to the peer.
    Connected,
    /// Server: datagrams routed here by the listener's demultiplexer.
    Demuxed {
        rx: mpsc::Receiver<Vec<u8>>,
        pending: Option<Vec<u8>>,
        closed: bool,
    },
}

/// One peer's datagrams, as openssl's `Read + Write`.
pub(crate) struct DatagramIo {
    sock: Arc<UdpSocket>,
    peer: SocketAddr,
    source: Source,
    loss: Option<DatagramLoss>,
    sent: u64,
    received: u64,
    /// A send error on the connected socket (ICMP unreachable reported on
    /// send), handed to the next read so that the connection fails even when
    /// openssl ignores the error of a retransmission.
    failed: Option<io::Error>,
}

impl DatagramIo {
    fn connected(sock: Arc<UdpSocket>, peer: SocketAddr, loss: Option<DatagramLoss>) -> Self {
        DatagramIo {
            sock,
            peer,
            source: Source::Connected,
            loss,
            sent: 0,
            received: 0,
            failed: None,
        }
    }

    fn demuxed(
        sock: Arc<UdpSocket>,
        peer: SocketAddr,
        rx: mpsc::Receiver<Vec<u8>>,
        first: Vec<u8>,
    ) -> Self {
        let source = Source::Demuxed {
            rx,
            pending: Some(first),
            closed: false,
        };
        DatagramIo {
            sock,
            peer,
            source,
            loss: None,
            sent: 0,
            received: 0,
            failed: None,
        }
    }

    /// Waits until a datagram may be there. Cancel-safe.
    async fn wait(&mut self) -> io::Result<()> {
        match &mut self.source {
            Source::Connected => self
                .sock
                .ready(Interest::READABLE | Interest::ERROR)
                .await
                .map(|_| ()),
            Source::Demuxed {
                rx,
                pending,
                closed,
            } => {
                if pending.is_some() || *closed {
                    return Ok(());
                }
                match rx.recv().await {
                    Some(d) => *pending = Some(d),
                    None => *closed = true,
                }
                Ok(())
            }
        }
    }

    fn input_closed(&self) -> bool {
        matches!(
            self.source,
            Source::Demuxed {
                closed: true,
                pending: None,
                ..
            }
        )
    }
}

impl Read for DatagramIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        loop {
            let n = match &mut self.source {
                Source::Connected => match self.sock.try_recv(buf) {
                    Ok(n) => n,
                    // An ICMP error (port unreachable: nobody listens) is
                    // pending on the socket: report it instead of waiting.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match self.sock.take_error()? {
                            Some(err) => return Err(err),
                            None => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                },
                Source::Demuxed {
                    rx,
                    pending,
                    closed,
                } => {
                    let d = match pending.take() {
                        Some(d) => d,
                        None => match rx.try_recv() {
                            Ok(d) => d,
                            Err(mpsc::error::TryRecvError::Empty) => {
                                return Err(io::ErrorKind::WouldBlock.into())
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                *closed = true;
                                return Err(io::Error::new(
                                    io::ErrorKind::BrokenPipe,
                                    "listener stopped",
                                ));
                            }
                        },
                    };
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    n
                }
            };
            let i = self.received;
            self.received += 1;
            if self
                .loss
                .as_ref()
                .is_some_and(|l| l.drop_incoming.contains(&i))
            {
                tracing::debug!(peer = %self.peer, index = i, "test loss: dropping incoming datagram");
                continue;
            }
            return Ok(n);
        }
    }
}

impl Write for DatagramIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let i = self.sent;
        self.sent += 1;
        if self
            .loss
            .as_ref()
            .is_some_and(|l| l.drop_outgoing.contains(&i))
        {
            tracing::debug!(peer = %self.peer, index = i, "test loss: dropping outgoing datagram");
            return Ok(buf.len());
        }
        // Straight to the (non-blocking) socket: tokio's try_send would
        // report WouldBlock until the first writable event has been seen.
        let sock = socket2::SockRef::from(&*self.sock);
        let r = match self.source {
            Source::Connected => sock.send(buf),
            Source::Demuxed { .. } => sock.send_to(buf, &self.peer.into()),
        };
        match r {
            Ok(_) => Ok(buf.len()),
            // A full send buffer loses the datagram, as the network could:
            // DTLS retransmits handshake flights, the layer above CoAP messages.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::trace!(peer = %self.peer, "UDP send would block: datagram dropped");
                Ok(buf.len())
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "UDP send failed");
                if matches!(self.source, Source::Connected) {
                    self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// DTLSv1_get_timeout: the time left on the retransmission timer, if running.
fn dtls_timeout(ssl: &SslRef) -> Option<Duration> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: valid SSL pointer; parg points to a timeval as the ctrl expects.
    let r = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            &mut tv as *mut _ as *mut c_void,
        )
    };
    (r == 1).then(|| {
        Duration::new(
            tv.tv_sec.max(0) as u64,
            (tv.tv_usec.clamp(0, 999_999) as u32) * 1000,
        )
    })
}

/// DTLSv1_handle_timeout: retransmits the last flight if the timer expired.
fn dtls_handle_timeout(ssl: &SslRef) -> io::Result<()> {
    // SAFETY: valid SSL pointer; the ctrl takes no argument.
    let r: c_long = unsafe {
        openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, ptr::null_mut())
    };
    tracing::trace!(result = r, "DTLSv1_handle_timeout");
    if r < 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "DTLS retransmission limit reached",
        ));
    }
    Ok(())
}

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
    buf: Vec<u8>,
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
            buf: vec![0; MAX_DTLS_PLAINTEXT],
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
                    let (reason, auth) = describe(self.stream.ssl(), &e);
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
        loop {
            if self.closed {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "DTLS connection closed",
                ));
            }
            match self.stream.ssl_read(&mut self.buf) {
                Ok(n) if n > self.max_message => {
                    tracing::warn!(peer = %self.peer, len = n, max = self.max_message, "dropping oversized datagram");
                }
                Ok(n) => return Ok(Some(self.buf[..n].to_vec())),
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
        self.stream.get_ref().sock.local_addr()
    }

    pub fn peer_identity(&self) -> Option<String> {
        self.identity.clone()
    }

    pub fn session_reused(&self) -> bool {
        self.stream.ssl().session_reused()
    }

    pub fn ssl(&self) -> &SslRef {
        self.stream.ssl()
    }

    pub(crate) fn set_slot(&mut self, slot: PeerSlot) {
        self.slot = Some(slot);
    }
}

/// Why a handshake failed, and whether the failure is the peer's
/// authentication/protocol fault (counted towards a ban).
pub(crate) fn describe(ssl: &SslRef, e: &openssl::ssl::Error) -> (String, bool) {
    if let Some(v) = tls::verify_failure(ssl) {
        return (format!("certificate verification failed: {v}"), true);
    }
    match (e.code(), e.ssl_error(), e.io_error()) {
        (_, Some(stack), _) => {
            // A peer that hung up mid-handshake (e.g. a Happy Eyeballs loser)
            // is not an authentication failure.
            let eof = stack
                .errors()
                .iter()
                .all(|e| e.reason().is_some_and(|r| r.contains("unexpected eof")));
            (stack.to_string(), !eof && !stack.errors().is_empty())
        }
        (_, None, Some(io)) => (io.to_string(), false),
        (ErrorCode::SYSCALL, None, None) => ("connection closed by the peer".into(), false),
        (code, None, None) => (format!("{code:?}"), false),
    }
}

/// The index of the peer address in server-side DTLS `Ssl`s (for cookies).
pub(crate) fn peer_index(
) -> Result<openssl::ex_data::Index<Ssl, SocketAddr>, openssl::error::ErrorStack> {
    static INDEX: std::sync::OnceLock<openssl::ex_data::Index<Ssl, SocketAddr>> =
        std::sync::OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<SocketAddr>()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// The result of offering a new peer's first datagram to the stateless
/// cookie exchange.
pub(crate) enum ListenOutcome {
    /// A ClientHello with a valid cookie: the peer's address is verified.
    Verified(Box<DtlsConnection>),
    /// HelloVerifyRequest sent, or not a ClientHello: nothing kept.
    Stateless,
}

/// Runs DTLSv1_listen on `first` from `peer` (which has no state here yet).
pub(crate) fn listen(
    ctx: &SslContext,
    sock: Arc<UdpSocket>,
    peer: SocketAddr,
    first: Vec<u8>,
    rx: mpsc::Receiver<Vec<u8>>,
    params: &DtlsParams,
) -> Result<ListenOutcome, TransportError> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_ex_data(peer_index()?, peer);
    ssl.set_accept_state();
    set_mtu(&mut ssl, params.mtu, &peer)?;
    let io = DatagramIo::demuxed(sock, peer, rx, first);
    let stream = SslStream::new(ssl, io)?;
    // SAFETY: plain FFI calls on a live SSL whose BIOs are set; the address
    // is allocated and freed here.
    let r = unsafe {
        let addr = BIO_ADDR_new();
        if addr.is_null() {
            return Err(openssl::error::ErrorStack::get().into());
        }
        let r = DTLSv1_listen(stream.ssl().as_ptr(), addr);
        BIO_ADDR_free(addr);
        r
    };
    if r == 1 {
        Ok(ListenOutcome::Verified(Box::new(DtlsConnection::new(
            stream,
            peer,
            params.max_message,
        ))))
    } else {
        // Clear whatever the rejected datagram left on the error queue.
        let _ = openssl::error::ErrorStack::get();
        Ok(ListenOutcome::Stateless)
    }
}
