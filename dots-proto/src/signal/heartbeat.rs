//! Heartbeats and liveness, shared by both roles (RFC 9132 §4.7 with the
//! Call Home changes of RFC 9066 §5.2.1): each side sends a Non-confirmable
//! `PUT hb` every heartbeat-interval and answers the peer's with 2.04.
//! Only the server role declares the session lost, and only after a whole
//! missing-hb-allowed span without *any* traffic: while anything arrives
//! the session stays up, heartbeats or not.

use std::time::{Duration, Instant};

use coap_lite::{Packet, RequestType, ResponseType};

use crate::coap::{msg, DotsResource, ErrorResponse};
use crate::model::{DotsMessage, Heartbeat};

/// Heartbeat timers of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeats {
    /// Start of the connection: silence is counted from here until the
    /// first byte arrives.
    since: Instant,
    next_send: Instant,
    last_peer_hb: Option<Instant>,
}

impl Heartbeats {
    /// The first heartbeat goes out one interval after the connection starts.
    pub(crate) fn new(now: Instant, interval: Duration) -> Self {
        Self {
            since: now,
            next_send: now + interval,
            last_peer_hb: None,
        }
    }

    pub(crate) fn next_send(&self) -> Instant {
        self.next_send
    }

    /// Reschedules after a send, or after the interval changed.
    pub(crate) fn schedule(&mut self, now: Instant, interval: Duration) {
        self.next_send = now + interval;
    }

    pub(crate) fn peer_heartbeat(&mut self, now: Instant) {
        self.last_peer_hb = Some(now);
    }

    /// `peer-hb-status` of our next heartbeat: a peer heartbeat arrived
    /// within the last two intervals (one interval is too tight when both
    /// sides tick at the same rate with different phases).
    pub(crate) fn peer_hb_status(&self, now: Instant, interval: Duration) -> bool {
        self.last_peer_hb
            .is_some_and(|t| now.saturating_duration_since(t) <= interval * 2)
    }

    /// When the session counts as lost unless traffic arrives before.
    pub(crate) fn loss_deadline(&self, last_rx: Option<Instant>, silence: Duration) -> Instant {
        last_rx.map_or(self.since, |rx| rx.max(self.since)) + silence
    }
}

/// Our heartbeat request.
pub(crate) fn request(peer_hb_status: bool) -> Packet {
    let mut p = DotsResource::Heartbeat.request(RequestType::Put);
    msg::set_content_format(&mut p, msg::CONTENT_FORMAT_DOTS_CBOR);
    p.payload = Heartbeat { peer_hb_status }.encode();
    p
}

/// Reads a peer's heartbeat PUT; the answer is 2.04 (Changed).
pub(crate) fn accept(request: &Packet) -> Result<(Heartbeat, Packet), ErrorResponse> {
    if msg::method(request) != Some(RequestType::Put) {
        return Err(ErrorResponse::new(
            ResponseType::MethodNotAllowed,
            "hb accepts only PUT",
        ));
    }
    msg::require_dots_cbor(request)?;
    let hb = Heartbeat::decode(&request.payload)
        .map_err(|e| ErrorResponse::new(ResponseType::BadRequest, e.to_string()))?;
    Ok((hb, msg::response(ResponseType::Changed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_from_the_last_traffic_or_the_start() {
        let t0 = Instant::now();
        let s = Duration::from_secs(90);
        let hb = Heartbeats::new(t0, Duration::from_secs(30));
        assert_eq!(hb.next_send(), t0 + Duration::from_secs(30));
        assert_eq!(hb.loss_deadline(None, s), t0 + s);
        let rx = t0 + Duration::from_secs(40);
        assert_eq!(hb.loss_deadline(Some(rx), s), rx + s);
    }

    #[test]
    fn heartbeat_round_trip_and_status_window() {
        let t0 = Instant::now();
        let i = Duration::from_secs(30);
        let mut hb = Heartbeats::new(t0, i);
        assert!(!hb.peer_hb_status(t0, i));
        let (body, answer) = accept(&request(true)).expect("valid");
        assert!(body.peer_hb_status);
        assert!(msg::is_success(&answer));
        hb.peer_heartbeat(t0);
        assert!(hb.peer_hb_status(t0 + i * 2, i));
        assert!(!hb.peer_hb_status(t0 + i * 2 + Duration::from_secs(1), i));
        let mut get = request(true);
        get.header.code = coap_lite::MessageClass::Request(RequestType::Get);
        assert_eq!(
            accept(&get).expect_err("GET").code,
            ResponseType::MethodNotAllowed
        );
    }
}
