//! One peer's datagrams as openssl's `Read + Write`: one read is one
//! datagram, WouldBlock when none. On the client side the UDP socket is
//! connected to the peer; on the server side the listener's demultiplexer
//! routes the peer's datagrams here through a channel.

use std::{
    io::{self, Read, Write},
    net::SocketAddr,
    sync::Arc,
};

use tokio::{io::Interest, net::UdpSocket, sync::mpsc};

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
pub(super) struct DatagramIo {
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
    pub(super) fn connected(
        sock: Arc<UdpSocket>,
        peer: SocketAddr,
        loss: Option<DatagramLoss>,
    ) -> Self {
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

    pub(super) fn demuxed(
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
    pub(super) async fn wait(&mut self) -> io::Result<()> {
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

    pub(super) fn input_closed(&self) -> bool {
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

impl DatagramIo {
    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
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
