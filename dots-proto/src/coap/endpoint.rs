//! The API both endpoints offer, so the signal layer is transport-agnostic.

use std::time::Instant;

use coap_lite::Packet;

use super::core::{Event, PingId, RequestId};
use super::error::CoapError;
use super::msg::Token;
use super::params::TransmissionParams;

/// How a request or notification is sent over datagrams; reliable
/// transports ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Retransmitted until acknowledged (CON).
    Confirmable,
    /// Sent once (NON): heartbeats and, by default, notifications.
    NonConfirmable,
}

/// A sans-IO CoAP endpoint talking to one peer.
///
/// Drive it with `handle_input` (bytes from the peer) and `handle_timeout`
/// (at `poll_timeout`), and drain `poll_transmit` after every call.
pub trait Endpoint {
    /// Bytes from the peer: one datagram, or any chunk of the stream.
    fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError>;
    /// The next bytes to send (a datagram, or a piece of the stream).
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    /// When `handle_timeout` must be called next.
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant) -> Vec<Event>;

    /// Sends a request with a fresh token; responses come as events with it.
    /// A GET with Observe 0 stays active after its first response and
    /// delivers [`Event::Notification`]s until cancelled or deregistered.
    fn send_request(
        &mut self,
        now: Instant,
        request: Packet,
        delivery: Delivery,
    ) -> Result<Token, CoapError>;
    /// Forgets a request or observation; later notifications are rejected.
    fn cancel_request(&mut self, now: Instant, token: &Token) -> bool;
    /// Ends an observation by re-sending the GET with Observe 1 on the same
    /// token; the answer arrives as a final [`Event::Response`].
    fn deregister(&mut self, now: Instant, token: &Token) -> Result<(), CoapError>;

    /// Answers a peer request (the token is set here). Returns the observer
    /// token when the answer (2.xx to GET + Observe 0) registered an observer.
    fn respond(
        &mut self,
        now: Instant,
        id: RequestId,
        response: Packet,
    ) -> Result<Option<Token>, CoapError>;
    /// Sends a notification to an observer with the next sequence number; a
    /// non-2.xx notification ends the observation.
    fn notify(
        &mut self,
        now: Instant,
        observer: &Token,
        notification: Packet,
        delivery: Delivery,
    ) -> Result<(), CoapError>;
    fn remove_observer(&mut self, token: &Token) -> bool;
    /// Registered observers, sorted.
    fn observers(&self) -> Vec<Token>;

    /// CoAP ping: empty CON (datagram) or 7.02 (stream).
    fn ping(&mut self, now: Instant) -> Result<PingId, CoapError>;

    /// The last time any bytes came from the peer (Call Home liveness).
    fn last_rx(&self) -> Option<Instant>;
    /// True when any traffic arrived at or after `t`.
    fn received_since(&self, t: Instant) -> bool {
        self.last_rx().is_some_and(|r| r >= t)
    }
    /// Applies newly negotiated parameters to exchanges started from now on.
    fn set_params(&mut self, params: TransmissionParams) -> Result<(), CoapError>;
    /// The connection starts now: timers counted from its start (the
    /// stream's CSM timer) run from here. Calling it again changes nothing.
    fn start(&mut self, _now: Instant) {}
    /// Announces an orderly close to the peer where the transport has a way to
    /// (RFC 8323 Release on streams); datagrams have none.
    fn close(&mut self, _diagnostic: &str) {}
}

/// Lets a session pick its endpoint at run time (`Box<dyn Endpoint + Send>`).
impl<E: Endpoint + ?Sized> Endpoint for Box<E> {
    fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError> {
        (**self).handle_input(now, bytes)
    }
    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (**self).poll_transmit()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        (**self).poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) -> Vec<Event> {
        (**self).handle_timeout(now)
    }
    fn send_request(
        &mut self,
        now: Instant,
        request: Packet,
        delivery: Delivery,
    ) -> Result<Token, CoapError> {
        (**self).send_request(now, request, delivery)
    }
    fn cancel_request(&mut self, now: Instant, token: &Token) -> bool {
        (**self).cancel_request(now, token)
    }
    fn deregister(&mut self, now: Instant, token: &Token) -> Result<(), CoapError> {
        (**self).deregister(now, token)
    }
    fn respond(
        &mut self,
        now: Instant,
        id: RequestId,
        response: Packet,
    ) -> Result<Option<Token>, CoapError> {
        (**self).respond(now, id, response)
    }
    fn notify(
        &mut self,
        now: Instant,
        observer: &Token,
        notification: Packet,
        delivery: Delivery,
    ) -> Result<(), CoapError> {
        (**self).notify(now, observer, notification, delivery)
    }
    fn remove_observer(&mut self, token: &Token) -> bool {
        (**self).remove_observer(token)
    }
    fn observers(&self) -> Vec<Token> {
        (**self).observers()
    }
    fn ping(&mut self, now: Instant) -> Result<PingId, CoapError> {
        (**self).ping(now)
    }
    fn last_rx(&self) -> Option<Instant> {
        (**self).last_rx()
    }
    fn set_params(&mut self, params: TransmissionParams) -> Result<(), CoapError> {
        (**self).set_params(params)
    }
    fn start(&mut self, now: Instant) {
        (**self).start(now)
    }
    fn close(&mut self, diagnostic: &str) {
        (**self).close(diagnostic)
    }
}
