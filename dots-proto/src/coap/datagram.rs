//! RFC 7252 over datagrams (UDP/DTLS): message ids, deduplication, CON
//! retransmission, piggybacked ACKs, RST and CoAP ping, on top of the
//! shared exchange core.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, MessageType, Packet};

use super::core::{Core, Event, Matched, ObserverRemoval, PingId, RequestId};
use super::endpoint::{Delivery, Endpoint};
use super::error::CoapError;
use super::msg::{self, Token};
use super::params::TransmissionParams;

/// Settings of a [`DatagramEndpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct DatagramConfig {
    pub params: TransmissionParams,
    /// Largest datagram we send (RFC 7252 §4.6 suggests 1152 bytes).
    pub max_message_size: usize,
    /// Bound of the duplicate-detection cache (entries).
    pub dedup_capacity: usize,
    /// NSTART: Confirmable messages in flight at once (RFC 7252 §4.7).
    pub nstart: usize,
}

impl Default for DatagramConfig {
    fn default() -> Self {
        DatagramConfig {
            params: TransmissionParams::default(),
            max_message_size: 1152,
            dedup_capacity: 1024,
            nstart: 1,
        }
    }
}

/// What a Confirmable message of ours belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ConKind {
    Request(Token),
    Notification(Token),
    Ping(PingId),
}

struct InFlight {
    bytes: Vec<u8>,
    kind: ConKind,
    retransmits: u32,
    timeout: Duration,
    next: Instant,
}

/// State of a peer message id in the dedup cache.
enum Seen {
    /// Handed to the owner, not answered yet: duplicates are dropped.
    Processing,
    /// Answered: a duplicate CON gets the same bytes again.
    Answered(Option<Vec<u8>>),
}

/// Message-id keyed entries that expire, bounded in size (oldest evicted).
struct Recent<V> {
    map: HashMap<u16, (V, Instant)>,
    order: VecDeque<(u16, Instant)>,
    capacity: usize,
}

impl<V> Recent<V> {
    fn new(capacity: usize) -> Self {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get_mut(&mut self, now: Instant, key: u16) -> Option<&mut V> {
        self.map
            .get_mut(&key)
            .filter(|(_, exp)| *exp > now)
            .map(|(v, _)| v)
    }

    fn insert(&mut self, now: Instant, key: u16, value: V, expiry: Instant) {
        self.prune(now);
        while self.map.len() >= self.capacity || self.order.len() >= 2 * self.capacity {
            if !self.pop_oldest() {
                break;
            }
        }
        self.map.insert(key, (value, expiry));
        self.order.push_back((key, expiry));
    }

    fn remove(&mut self, now: Instant, key: u16) -> Option<V> {
        match self.map.remove(&key) {
            Some((v, exp)) if exp > now => Some(v),
            _ => None,
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some((key, exp)) = self.order.pop_front() else {
            return false;
        };
        if self.map.get(&key).is_some_and(|(_, e)| *e == exp) {
            self.map.remove(&key);
        }
        true
    }

    fn prune(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(_, exp)| *exp <= now) {
            self.pop_oldest();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

struct IncomingMeta {
    mid: u16,
    confirmable: bool,
}

/// A CoAP endpoint over a datagram transport, talking to one peer.
pub struct DatagramEndpoint {
    core: Core<IncomingMeta>,
    config: DatagramConfig,
    next_mid: u16,
    /// Peer message ids seen recently (EXCHANGE_LIFETIME / NON_LIFETIME).
    dedup: Recent<Seen>,
    in_flight: HashMap<u16, InFlight>,
    /// CONs waiting for an NSTART slot.
    queued: VecDeque<(u16, Vec<u8>, ConKind)>,
    /// Our recent NON messages, so an RST finds its request or observer.
    sent_non: Recent<ConKind>,
    transmit: VecDeque<Vec<u8>>,
}

fn type_bits(t: MessageType) -> u8 {
    match t {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    }
}

/// An empty message (ACK, RST or ping).
fn empty(t: MessageType, mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    vec![0x40 | type_bits(t) << 4, 0, hi, lo]
}

fn encode(
    mut packet: Packet,
    t: MessageType,
    mid: u16,
    limit: usize,
) -> Result<Vec<u8>, CoapError> {
    msg::check_encodable(&packet)?;
    packet.header.set_version(1);
    packet.header.set_type(t);
    packet.header.message_id = mid;
    let bytes = packet
        .to_bytes_unlimited()
        .map_err(|e| CoapError::Encode(e.to_string()))?;
    if bytes.len() > limit {
        return Err(CoapError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

impl DatagramEndpoint {
    /// `seed` feeds token and message-id generation and retransmission jitter.
    pub fn new(config: DatagramConfig, seed: u64) -> Result<Self, CoapError> {
        config.params.validate()?;
        if config.nstart == 0 || config.dedup_capacity == 0 {
            return Err(CoapError::InvalidParams(
                "nstart and dedup_capacity must be positive",
            ));
        }
        let mut core = Core::new(seed);
        let next_mid = core.rng.next_u64() as u16;
        Ok(DatagramEndpoint {
            core,
            dedup: Recent::new(config.dedup_capacity),
            sent_non: Recent::new(config.dedup_capacity),
            config,
            next_mid,
            in_flight: HashMap::new(),
            queued: VecDeque::new(),
            transmit: VecDeque::new(),
        })
    }

    pub fn config(&self) -> &DatagramConfig {
        &self.config
    }

    /// Number of peer message ids in the dedup cache.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError> {
        self.core.last_rx = Some(now);
        let mut events = Vec::new();
        let packet = match Packet::from_bytes(bytes) {
            Ok(p) => p,
            Err(e) => {
                // RFC 7252 §4.2: reject a malformed CON with RST, ignore the rest.
                if bytes.len() >= 4 && bytes[0] >> 6 == 1 && (bytes[0] >> 4) & 3 == 0 {
                    self.transmit.push_back(empty(
                        MessageType::Reset,
                        u16::from_be_bytes([bytes[2], bytes[3]]),
                    ));
                }
                return Err(CoapError::Malformed(e.to_string()));
            }
        };
        if packet.header.get_version() != 1 {
            return Ok(events); // RFC 7252 §3: silently ignored
        }
        let mid = packet.header.message_id;
        let ty = packet.header.get_type();
        match (packet.header.code, ty) {
            (MessageClass::Empty, MessageType::Confirmable) => {
                // CoAP ping (RFC 7252 §4.3).
                self.transmit.push_back(empty(MessageType::Reset, mid));
            }
            (MessageClass::Empty, MessageType::Acknowledgement) => {
                self.on_ack(now, mid, None, &mut events)
            }
            (MessageClass::Empty | MessageClass::Response(_), MessageType::Reset) => {
                self.on_reset(now, mid, &mut events)
            }
            (MessageClass::Response(_), MessageType::Acknowledgement) => {
                self.on_ack(now, mid, Some(packet), &mut events)
            }
            (MessageClass::Response(_), MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_response(now, packet, &mut events)
            }
            (MessageClass::Request(_), MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_request(now, packet, &mut events)?
            }
            (MessageClass::Reserved(_), MessageType::Confirmable) => {
                self.transmit.push_back(empty(MessageType::Reset, mid));
            }
            _ => {} // e.g. a request in an ACK: format error, ignored
        }
        Ok(events)
    }

    /// Returns true when the message is new; replays the answer otherwise.
    fn first_time(&mut self, now: Instant, mid: u16, confirmable: bool) -> bool {
        if let Some(seen) = self.dedup.get_mut(now, mid) {
            if let Seen::Answered(Some(bytes)) = seen {
                self.transmit.push_back(bytes.clone());
            }
            return false;
        }
        let params = &self.config.params;
        let lifetime = if confirmable {
            params.exchange_lifetime()
        } else {
            params.non_lifetime()
        };
        self.dedup
            .insert(now, mid, Seen::Processing, now + lifetime);
        true
    }

    /// Records and sends our answer to a peer message.
    fn answer(&mut self, now: Instant, mid: u16, bytes: Option<Vec<u8>>, replay: bool) {
        if let Some(seen) = self.dedup.get_mut(now, mid) {
            *seen = Seen::Answered(bytes.clone().filter(|_| replay));
        }
        self.transmit.extend(bytes);
    }

    fn on_request(
        &mut self,
        now: Instant,
        packet: Packet,
        events: &mut Vec<Event>,
    ) -> Result<(), CoapError> {
        let mid = packet.header.message_id;
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        if !self.first_time(now, mid, confirmable) {
            return Ok(());
        }
        let token = Token::of(&packet)?;
        if let Some(option) = msg::unrecognized_critical_option(&packet) {
            // 4.02 for a CON; a NON is rejected (RFC 7252 §5.4.1).
            let reply = if confirmable {
                let mut r = msg::bad_option_response(option);
                r.set_token(token.as_slice().to_vec());
                encode(
                    r,
                    MessageType::Acknowledgement,
                    mid,
                    self.config.max_message_size,
                )
                .ok()
            } else {
                Some(empty(MessageType::Reset, mid))
            };
            self.answer(now, mid, reply, confirmable);
            return Ok(());
        }
        self.core
            .accept_request(packet, token, IncomingMeta { mid, confirmable }, events);
        Ok(())
    }

    /// A separate response or a notification (CON or NON).
    fn on_response(&mut self, now: Instant, packet: Packet, events: &mut Vec<Event>) {
        let mid = packet.header.message_id;
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        if !self.first_time(now, mid, confirmable) {
            return;
        }
        let matched = if msg::unrecognized_critical_option(&packet).is_some() {
            Matched::Unknown
        } else {
            self.core.accept_response(now, packet)
        };
        let reply = match matched {
            Matched::Deliver(ev) => {
                events.push(ev);
                confirmable.then(|| empty(MessageType::Acknowledgement, mid))
            }
            Matched::Stale => confirmable.then(|| empty(MessageType::Acknowledgement, mid)),
            // Nobody wants it: RST, which also cancels an observation (RFC 7641 §3.6).
            Matched::Unknown => Some(empty(MessageType::Reset, mid)),
        };
        self.answer(now, mid, reply, true);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        mid: u16,
        response: Option<Packet>,
        events: &mut Vec<Event>,
    ) {
        if let Some(f) = self.in_flight.get(&mid) {
            let piggybacked_token = response
                .as_ref()
                .and_then(|r| Token::from_slice(r.get_token()));
            match (f.kind, piggybacked_token) {
                // A piggybacked response must carry the request's token (§5.3.2).
                (ConKind::Request(t), Some(r)) if t != r => return,
                (_, Some(_)) if !matches!(f.kind, ConKind::Request(_)) => return,
                _ => {}
            }
            let kind = f.kind;
            self.in_flight.remove(&mid);
            match kind {
                ConKind::Request(token) if response.is_none() => {
                    // Separate response to come; bound the wait.
                    self.core
                        .set_deadline(&token, Some(now + self.config.params.exchange_lifetime()));
                }
                ConKind::Ping(ping) => events.push(Event::Pong { ping }),
                _ => {}
            }
            self.pump(now);
        }
        if let Some(response) = response {
            if let Matched::Deliver(ev) = self.core.accept_response(now, response) {
                events.push(ev);
            }
        }
    }

    fn on_reset(&mut self, now: Instant, mid: u16, events: &mut Vec<Event>) {
        let kind = match self.in_flight.remove(&mid) {
            Some(f) => {
                self.pump(now);
                Some(f.kind)
            }
            None => self.sent_non.remove(now, mid),
        };
        match kind {
            Some(ConKind::Request(token)) if self.core.cancel(&token) => {
                events.push(Event::RequestReset { token });
            }
            Some(ConKind::Notification(token)) => {
                self.drop_observer(token, ObserverRemoval::Reset, events)
            }
            // An RST is the expected answer to a ping.
            Some(ConKind::Ping(ping)) => events.push(Event::Pong { ping }),
            Some(ConKind::Request(_)) | None => {}
        }
    }

    fn drop_observer(&mut self, token: Token, reason: ObserverRemoval, events: &mut Vec<Event>) {
        if self.core.remove_observer(&token) {
            self.queued
                .retain(|(_, _, k)| *k != ConKind::Notification(token));
            events.push(Event::ObserverRemoved { token, reason });
        }
    }

    fn alloc_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn send_con(&mut self, now: Instant, mid: u16, bytes: Vec<u8>, kind: ConKind) {
        self.queued.push_back((mid, bytes, kind));
        self.pump(now);
    }

    fn send_non(&mut self, now: Instant, mid: u16, bytes: Vec<u8>, kind: ConKind) {
        let expiry = now + self.config.params.exchange_lifetime();
        self.sent_non.insert(now, mid, kind, expiry);
        self.transmit.push_back(bytes);
    }

    /// Starts queued CONs while NSTART allows.
    fn pump(&mut self, now: Instant) {
        while self.in_flight.len() < self.config.nstart {
            let Some((mid, bytes, kind)) = self.queued.pop_front() else {
                break;
            };
            let timeout = self.config.params.initial_timeout(self.core.rng.next_u64());
            self.transmit.push_back(bytes.clone());
            self.in_flight.insert(
                mid,
                InFlight {
                    bytes,
                    kind,
                    retransmits: 0,
                    timeout,
                    next: now + timeout,
                },
            );
        }
    }

    fn give_up(&mut self, kind: ConKind, events: &mut Vec<Event>) {
        match kind {
            ConKind::Request(token) => {
                if self.core.cancel(&token) {
                    events.push(Event::RequestTimedOut { token });
                }
            }
            ConKind::Notification(token) => {
                self.drop_observer(token, ObserverRemoval::Timeout, events)
            }
            ConKind::Ping(ping) => events.push(Event::PingTimedOut { ping }),
        }
    }

    fn forget_con(&mut self, kind: ConKind) {
        self.in_flight.retain(|_, f| f.kind != kind);
        self.queued.retain(|(_, _, k)| *k != kind);
    }
}

impl Endpoint for DatagramEndpoint {
    fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<Event>, CoapError> {
        self.handle_datagram(now, bytes)
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let retransmit = self.in_flight.values().map(|f| f.next).min();
        match (retransmit, self.core.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let mut due: Vec<u16> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.next <= now)
            .map(|(m, _)| *m)
            .collect();
        due.sort_by_key(|m| self.in_flight.get(m).map(|f| f.next));
        for mid in due {
            let max = self.config.params.max_retransmit;
            let Some(f) = self.in_flight.get_mut(&mid) else {
                continue;
            };
            if f.retransmits < max {
                // Exponential back-off (RFC 7252 §4.2).
                f.retransmits += 1;
                f.timeout = f.timeout.saturating_mul(2);
                f.next = now + f.timeout;
                self.transmit.push_back(f.bytes.clone());
            } else if let Some(f) = self.in_flight.remove(&mid) {
                self.give_up(f.kind, &mut events);
            }
        }
        self.pump(now);
        self.core.expire(now, &mut events);
        self.dedup.prune(now);
        self.sent_non.prune(now);
        events
    }

    fn send_request(
        &mut self,
        now: Instant,
        mut request: Packet,
        delivery: Delivery,
    ) -> Result<Token, CoapError> {
        let mid = self.alloc_mid();
        let (ty, deadline) = match delivery {
            Delivery::Confirmable => (MessageType::Confirmable, None),
            Delivery::NonConfirmable => (
                MessageType::NonConfirmable,
                Some(now + self.config.params.max_transmit_wait()),
            ),
        };
        let token = self.core.start_request(&mut request, deadline);
        let bytes = match encode(request, ty, mid, self.config.max_message_size) {
            Ok(b) => b,
            Err(e) => {
                self.core.cancel(&token);
                return Err(e);
            }
        };
        match delivery {
            Delivery::Confirmable => self.send_con(now, mid, bytes, ConKind::Request(token)),
            Delivery::NonConfirmable => self.send_non(now, mid, bytes, ConKind::Request(token)),
        }
        Ok(token)
    }

    fn cancel_request(&mut self, now: Instant, token: &Token) -> bool {
        self.forget_con(ConKind::Request(*token));
        self.pump(now);
        self.core.cancel(token)
    }

    fn deregister(&mut self, now: Instant, token: &Token) -> Result<(), CoapError> {
        let request = self
            .core
            .deregistration(token, None)
            .ok_or(CoapError::UnknownRequest)?;
        self.forget_con(ConKind::Request(*token));
        let mid = self.alloc_mid();
        let bytes = encode(
            request,
            MessageType::Confirmable,
            mid,
            self.config.max_message_size,
        )?;
        self.send_con(now, mid, bytes, ConKind::Request(*token));
        Ok(())
    }

    fn respond(
        &mut self,
        now: Instant,
        id: RequestId,
        response: Packet,
    ) -> Result<Option<Token>, CoapError> {
        let non_mid = self.next_mid.wrapping_add(1);
        let limit = self.config.max_message_size;
        let mut out = None;
        let registered = self.core.respond_with(id, response, |meta, p| {
            // Piggybacked in the ACK of a CON; a NON request gets a NON.
            let (ty, mid) = match meta.confirmable {
                true => (MessageType::Acknowledgement, meta.mid),
                false => (MessageType::NonConfirmable, non_mid),
            };
            out = Some((
                encode(p.clone(), ty, mid, limit)?,
                meta.mid,
                meta.confirmable,
            ));
            Ok(())
        })?;
        if let Some((bytes, peer_mid, confirmable)) = out {
            if !confirmable {
                self.alloc_mid();
            }
            self.answer(now, peer_mid, Some(bytes), confirmable);
        }
        Ok(registered)
    }

    fn notify(
        &mut self,
        now: Instant,
        observer: &Token,
        notification: Packet,
        delivery: Delivery,
    ) -> Result<(), CoapError> {
        let mid = self.next_mid.wrapping_add(1);
        let ty = match delivery {
            Delivery::Confirmable => MessageType::Confirmable,
            Delivery::NonConfirmable => MessageType::NonConfirmable,
        };
        let limit = self.config.max_message_size;
        let mut bytes = None;
        self.core.notify_with(observer, notification, |p| {
            bytes = Some(encode(p.clone(), ty, mid, limit)?);
            Ok(())
        })?;
        self.alloc_mid();
        if let Some(bytes) = bytes {
            let kind = ConKind::Notification(*observer);
            match delivery {
                Delivery::Confirmable => self.send_con(now, mid, bytes, kind),
                Delivery::NonConfirmable => self.send_non(now, mid, bytes, kind),
            }
        }
        Ok(())
    }

    fn remove_observer(&mut self, token: &Token) -> bool {
        self.queued
            .retain(|(_, _, k)| *k != ConKind::Notification(*token));
        self.core.remove_observer(token)
    }

    fn observers(&self) -> Vec<Token> {
        self.core.observers()
    }

    fn ping(&mut self, now: Instant) -> Result<PingId, CoapError> {
        let ping = PingId(self.core.next_id());
        let mid = self.alloc_mid();
        self.send_con(
            now,
            mid,
            empty(MessageType::Confirmable, mid),
            ConKind::Ping(ping),
        );
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
}
