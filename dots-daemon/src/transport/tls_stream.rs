//! TLS over TCP with tokio-openssl.

use std::{io, net::SocketAddr, pin::Pin};

use openssl::ssl::{Ssl, SslRef};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_openssl::SslStream;

use super::{tls, Transport, TransportError};

/// A TLS connection to one peer.
pub struct TlsConnection {
    stream: SslStream<TcpStream>,
    peer: SocketAddr,
    identity: Option<String>,
    buf: Vec<u8>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum Side {
    Connect,
    Accept,
}

impl TlsConnection {
    async fn handshake(
        tcp: TcpStream,
        peer: SocketAddr,
        ssl: Ssl,
        max_chunk: usize,
        side: Side,
    ) -> Result<TlsConnection, TransportError> {
        let _ = tcp.set_nodelay(true);
        let mut stream = SslStream::new(ssl, tcp)?;
        let r = match side {
            Side::Connect => Pin::new(&mut stream).connect().await,
            Side::Accept => Pin::new(&mut stream).accept().await,
        };
        if let Err(e) = r {
            let (reason, authentication) = tls::handshake_failure(stream.ssl(), &e);
            return Err(TransportError::Handshake {
                transport: Transport::Tcp,
                peer,
                reason,
                authentication,
            });
        }
        let identity = tls::peer_identity_of(stream.ssl());
        Ok(TlsConnection {
            stream,
            peer,
            identity,
            buf: vec![0; max_chunk.max(1)],
            _slot: None,
        })
    }

    /// Client side: handshakes over an established TCP connection.
    pub(crate) async fn connect(
        tcp: TcpStream,
        peer: SocketAddr,
        ssl: Ssl,
        max_chunk: usize,
    ) -> Result<TlsConnection, TransportError> {
        Self::handshake(tcp, peer, ssl, max_chunk, Side::Connect).await
    }

    /// Server side.
    pub(crate) async fn accept(
        tcp: TcpStream,
        peer: SocketAddr,
        ssl: Ssl,
        max_chunk: usize,
    ) -> Result<TlsConnection, TransportError> {
        Self::handshake(tcp, peer, ssl, max_chunk, Side::Accept).await
    }

    pub(crate) fn set_slot(&mut self, permit: tokio::sync::OwnedSemaphorePermit) {
        self._slot = Some(permit);
    }

    /// The next bytes of the stream (at most the configured chunk size), or
    /// `None` at the end of the stream. Cancel-safe.
    pub async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        let n = self.stream.read(&mut self.buf).await?;
        Ok((n > 0).then(|| self.buf[..n].to_vec()))
    }

    /// Writes and flushes `data`. Not cancel-safe.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await?;
        self.stream.flush().await
    }

    /// Sends close_notify and shuts the write side down.
    pub async fn close(&mut self) {
        if let Err(e) = self.stream.shutdown().await {
            tracing::debug!(peer = %self.peer, error = %e, "TLS shutdown");
        }
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
}
