//! CoAP over a reliable byte stream (TCP/TLS, RFC 8323): no message types,
//! ids or retransmission; CSM first, Ping/Pong, Release/Abort, and the
//! peer's Max-Message-Size respected. Exchanges use the shared core.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, Packet};

use super::core::{CloseReason, Core, Event, Matched, PingId, RequestId};
use super::endpoint::{Delivery, Endpoint};
use super::error::CoapError;
use super::framing::{self, FrameError, Signal, StreamDecoder, DEFAULT_MAX_MESSAGE_SIZE};
use super::msg::{self, Token};
use super::params::TransmissionParams;

/// Settings of a [`StreamEndpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Largest frame we accept; advertised in our CSM.
    pub max_message_size: usize,
    /// Advertise Block-Wise-Transfer support in our CSM.
    pub block_wise: bool,
    /// Only MAX_TRANSMIT_WAIT is used: how long to wait for a response or Pong.
    pub params: TransmissionParams,
    /// How long the peer's CSM may take, counted from [`Endpoint::start`]:
    /// a peer that never sends it is aborted rather than left holding the
    /// connection (RFC 8323 §5.3: the CSM comes first, and nothing else is
    /// processed before it).
    pub csm_timeout: Duration,
}

/// [`StreamConfig::csm_timeout`] by default: a CSM follows the handshake
/// at once, so ten seconds cover any round trip the handshake survived.
pub const DEFAULT_CSM_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            block_wise: false,
            params: TransmissionParams::default(),
            csm_timeout: DEFAULT_CSM_TIMEOUT,
        }
    }
}

/// A CoAP endpoint over a reliable stream, talking to one peer.
pub struct StreamEndpoint {
    core: Core<()>,
    config: StreamConfig,
    decoder: StreamDecoder,
    /// The peer's Max-Message-Size (1152 until its CSM says otherwise).
    peer_max_message_size: usize,
    peer_block_wise: bool,
    peer_csm_seen: bool,
    /// When the peer's CSM is due; set by [`Endpoint::start`].
    csm_deadline: Option<Instant>,
    pings: HashMap<Token, (PingId, Instant)>,
    transmit: Vec<Vec<u8>>,
    closed: bool,
}

impl StreamEndpoint {
    /// Creates the endpoint and queues our CSM, which must be the first
    /// message on the connection (RFC 8323 §5.3).
    pub fn new(config: StreamConfig, seed: u64) -> Result<Self, CoapError> {
        config.params.validate()?;
        let mut ep = StreamEndpoint {
            core: Core::new(seed),
            decoder: StreamDecoder::new(config.max_message_size),
            peer_max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            peer_block_wise: false,
            peer_csm_seen: false,
            csm_deadline: None,
            pings: HashMap::new(),
            transmit: Vec::new(),
            closed: false,
            config,
        };
        let csm = Signal::Csm {
            max_message_size: Some(u32::try_from(ep.config.max_message_size).unwrap_or(u32::MAX)),
            block_wise: ep.config.block_wise,
        };
        ep.send(&csm.to_packet(Token::EMPTY))?;
        Ok(ep)
    }

    pub fn peer_max_message_size(&self) -> usize {
        self.peer_max_message_size
    }

    pub fn peer_block_wise(&self) -> bool {
        self.peer_block_wise
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Handles any chunk of the received byte stream.
    pub fn handle_data(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError> {
        if self.closed {
            return Err(CoapError::Closed);
        }
        self.core.last_rx = Some(now);
        let mut events = Vec::new();
        match self.decoder.feed(bytes) {
            Ok(messages) => {
                for m in messages {
                    if self.closed {
                        break;
                    }
                    self.on_message(now, m, &mut events);
                }
            }
            Err(e) => self.protocol_error(&e, &mut events),
        }
        Ok(events)
    }

    /// Closes gracefully: sends 7.04 Release.
    pub fn release(&mut self, diagnostic: &str) -> Result<(), CoapError> {
        let release = Signal::Release {
            alternative_address: None,
            hold_off: None,
            diagnostic: diagnostic.into(),
        };
        self.send_signal_and_close(release)
    }

    /// Closes abruptly: sends 7.05 Abort.
    pub fn abort(&mut self, diagnostic: &str) -> Result<(), CoapError> {
        self.send_signal_and_close(Signal::Abort {
            bad_csm_option: None,
            diagnostic: diagnostic.into(),
        })
    }

    fn send_signal_and_close(&mut self, signal: Signal) -> Result<(), CoapError> {
        if self.closed {
            return Err(CoapError::Closed);
        }
        let result = self.send(&signal.to_packet(Token::EMPTY));
        self.closed = true;
        result
    }

    fn protocol_error(&mut self, e: &FrameError, events: &mut Vec<Event>) {
        let bad_csm_option = match e {
            FrameError::BadCsmOption(n) => Some(*n),
            _ => None,
        };
        // Best effort: the Abort may not fit the peer's limit; close anyway.
        let _ = self.send(
            &Signal::Abort {
                bad_csm_option,
                diagnostic: e.to_string(),
            }
            .to_packet(Token::EMPTY),
        );
        self.closed = true;
        events.push(Event::Closed(CloseReason::ProtocolError(e.to_string())));
    }

    fn on_message(&mut self, now: Instant, packet: Packet, events: &mut Vec<Event>) {
        let is_signal = framing::is_signal(&packet);
        let is_csm = is_signal && u8::from(packet.header.code) == framing::CODE_CSM;
        if !self.peer_csm_seen && !is_csm {
            let e = FrameError::CsmNotFirst;
            return self.protocol_error(&e, events);
        }
        let Some(token) = Token::from_slice(packet.get_token()) else {
            return; // the decoder already refuses TKL > 8
        };
        if is_signal {
            return self.on_signal(now, &packet, token, events);
        }
        match packet.header.code {
            MessageClass::Request(_) => {
                if let Some(option) = msg::unrecognized_critical_option(&packet) {
                    let mut r = msg::bad_option_response(option);
                    r.set_token(token.as_slice().to_vec());
                    let _ = self.send(&r);
                    return;
                }
                self.core.accept_request(packet, token, (), events);
            }
            MessageClass::Response(_) => {
                if let Matched::Deliver(ev) = self.core.accept_response(now, packet) {
                    events.push(ev);
                }
            }
            // Empty messages are keep-alives (RFC 8323 §3.4); others are ignored.
            _ => {}
        }
    }

    fn on_signal(&mut self, _now: Instant, packet: &Packet, token: Token, events: &mut Vec<Event>) {
        match Signal::from_packet(packet) {
            Ok(Signal::Csm {
                max_message_size,
                block_wise,
            }) => {
                self.peer_csm_seen = true;
                if let Some(size) = max_message_size {
                    self.peer_max_message_size = usize::try_from(size).unwrap_or(usize::MAX);
                }
                self.peer_block_wise = block_wise;
                events.push(Event::PeerSettings {
                    max_message_size: self.peer_max_message_size,
                    block_wise,
                });
            }
            Ok(Signal::Ping { .. }) => {
                // Pong echoes the token (RFC 8323 §5.4).
                let _ = self.send(&Signal::Pong { custody: false }.to_packet(token));
            }
            Ok(Signal::Pong { .. }) => {
                if let Some((ping, _)) = self.pings.remove(&token) {
                    events.push(Event::Pong { ping });
                }
            }
            Ok(Signal::Release {
                alternative_address,
                hold_off,
                diagnostic,
            }) => {
                self.closed = true;
                events.push(Event::Closed(CloseReason::Released {
                    alternative_address,
                    hold_off,
                    diagnostic,
                }));
            }
            Ok(Signal::Abort { diagnostic, .. }) => {
                self.closed = true;
                events.push(Event::Closed(CloseReason::Aborted { diagnostic }));
            }
            // Unknown signalling codes are ignored.
            Err(FrameError::UnknownSignal(_)) => {}
            Err(e) => self.protocol_error(&e, events),
        }
    }

    /// Frames and queues a message, enforcing the peer's Max-Message-Size.
    fn send(&mut self, packet: &Packet) -> Result<(), CoapError> {
        let bytes = checked_frame(packet, self.peer_max_message_size)?;
        self.transmit.push(bytes);
        Ok(())
    }

    fn check_open(&self) -> Result<(), CoapError> {
        if self.closed {
            Err(CoapError::Closed)
        } else {
            Ok(())
        }
    }

    fn response_deadline(&self, now: Instant) -> Instant {
        now + self.config.params.max_transmit_wait()
    }
}

impl Endpoint for StreamEndpoint {
    fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError> {
        self.handle_data(now, bytes)
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        // Everything queued goes out as one write, in order.
        if self.transmit.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.transmit).concat())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let pings = self.pings.values().map(|(_, d)| *d).min();
        let csm = self
            .csm_deadline
            .filter(|_| !self.peer_csm_seen && !self.closed);
        [pings, self.core.next_deadline(), csm]
            .into_iter()
            .flatten()
            .min()
    }

    fn handle_timeout(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.peer_csm_seen && !self.closed && self.csm_deadline.is_some_and(|d| d <= now) {
            let e = FrameError::NoCsm(self.config.csm_timeout);
            self.protocol_error(&e, &mut events);
            return events;
        }
        let mut expired: Vec<(Token, PingId)> = self
            .pings
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(t, (p, _))| (*t, *p))
            .collect();
        expired.sort_by_key(|(_, p)| *p);
        for (token, ping) in expired {
            self.pings.remove(&token);
            events.push(Event::PingTimedOut { ping });
        }
        self.core.expire(now, &mut events);
        events
    }

    fn send_request(
        &mut self,
        now: Instant,
        mut request: Packet,
        _delivery: Delivery,
    ) -> Result<Token, CoapError> {
        self.check_open()?;
        let deadline = Some(self.response_deadline(now));
        let token = self.core.start_request(&mut request, deadline);
        if let Err(e) = self.send(&request) {
            self.core.cancel(&token);
            return Err(e);
        }
        Ok(token)
    }

    fn cancel_request(&mut self, _now: Instant, token: &Token) -> bool {
        self.core.cancel(token)
    }

    fn deregister(&mut self, now: Instant, token: &Token) -> Result<(), CoapError> {
        self.check_open()?;
        let deadline = Some(self.response_deadline(now));
        let request = self
            .core
            .deregistration(token, deadline)
            .ok_or(CoapError::UnknownRequest)?;
        self.send(&request)
    }

    fn respond(
        &mut self,
        _now: Instant,
        id: RequestId,
        response: Packet,
    ) -> Result<Option<Token>, CoapError> {
        self.check_open()?;
        let limit = self.peer_max_message_size;
        let mut out = None;
        let registered = self.core.respond_with(id, response, |_, p| {
            out = Some(checked_frame(p, limit)?);
            Ok(())
        })?;
        self.transmit.extend(out);
        Ok(registered)
    }

    fn notify(
        &mut self,
        _now: Instant,
        observer: &Token,
        notification: Packet,
        _delivery: Delivery,
    ) -> Result<(), CoapError> {
        self.check_open()?;
        let limit = self.peer_max_message_size;
        let mut out = None;
        self.core.notify_with(observer, notification, |p| {
            out = Some(checked_frame(p, limit)?);
            Ok(())
        })?;
        self.transmit.extend(out);
        Ok(())
    }

    fn remove_observer(&mut self, token: &Token) -> bool {
        self.core.remove_observer(token)
    }

    fn observers(&self) -> Vec<Token> {
        self.core.observers()
    }

    fn ping(&mut self, now: Instant) -> Result<PingId, CoapError> {
        self.check_open()?;
        let ping = PingId(self.core.next_id());
        let token = Token::from_u64(self.core.rng.next_u64());
        self.send(&Signal::Ping { custody: false }.to_packet(token))?;
        self.pings
            .insert(token, (ping, self.response_deadline(now)));
        Ok(ping)
    }

    fn last_rx(&self) -> Option<Instant> {
        self.core.last_rx
    }

    fn set_params(&mut self, params: TransmissionParams) -> Result<(), CoapError> {
        params.validate()?;
        self.config.params = params;
        Ok(())
    }

    fn start(&mut self, now: Instant) {
        if self.csm_deadline.is_none() {
            self.csm_deadline = Some(now + self.config.csm_timeout);
        }
    }

    fn close(&mut self, diagnostic: &str) {
        // Best effort: a stream already closed has nothing to release.
        let _ = self.release(diagnostic);
    }
}

fn checked_frame(packet: &Packet, limit: usize) -> Result<Vec<u8>, CoapError> {
    let bytes = framing::encode(packet)?;
    if bytes.len() > limit {
        return Err(CoapError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}
