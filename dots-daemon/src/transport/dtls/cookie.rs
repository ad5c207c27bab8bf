//! The listener's stateless cookie exchange (RFC 6347 §4.2.1) for a new
//! peer's first datagram: no state is kept until the peer proves its
//! address.

use std::{net::SocketAddr, sync::Arc};

use openssl::ssl::{Ssl, SslContext, SslStream};
use tokio::{net::UdpSocket, sync::mpsc};

use super::{datagram::DatagramIo, ffi, set_mtu, DtlsConnection, DtlsParams};
use crate::transport::TransportError;

/// The index of the peer address in server-side DTLS `Ssl`s (for cookies).
pub(in crate::transport) fn peer_index(
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
pub(in crate::transport) enum ListenOutcome {
    /// A ClientHello with a valid cookie: the peer's address is verified.
    Verified(Box<DtlsConnection>),
    /// HelloVerifyRequest sent, or not a ClientHello: nothing kept.
    Stateless,
}

/// Runs DTLSv1_listen on `first` from `peer` (which has no state here yet).
pub(in crate::transport) fn listen(
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
    let verified = ffi::dtls_listen(stream.ssl())?;
    if verified {
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
