//! Transport-independent exchange logic shared by both endpoints: tokens,
//! our pending requests and observations (client side), peer requests
//! awaiting an answer and registered observers (server side).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, Packet, RequestType};

use super::error::CoapError;
use super::msg::{self, Token};
use super::params::SplitMix64;

/// Identifies a peer request until [`super::Endpoint::respond`] answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

/// Identifies one of our pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PingId(pub(crate) u64);

/// Why a registered observer (peer watching one of our resources) is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverRemoval {
    /// GET with Observe 1, or without Observe, on the same token.
    Deregistered,
    /// The peer answered a notification with RST.
    Reset,
    /// A Confirmable notification was never acknowledged.
    Timeout,
}

/// Why a stream connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent 7.04 Release.
    Released {
        alternative_address: Option<String>,
        hold_off: Option<u32>,
        diagnostic: String,
    },
    /// The peer sent 7.05 Abort.
    Aborted { diagnostic: String },
    /// We aborted because the peer broke the protocol.
    ProtocolError(String),
}

/// What an endpoint reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A peer request; answer with `respond(id, ..)`. A GET with Observe 0
    /// becomes an observer when the answer is 2.xx.
    Request {
        id: RequestId,
        request: Packet,
    },
    /// The (first) response to our request.
    Response {
        token: Token,
        response: Packet,
    },
    /// A fresh notification for one of our observations (RFC 7641 §3.4);
    /// stale or duplicate ones are dropped.
    Notification {
        token: Token,
        response: Packet,
    },
    /// No response in time: CON given up, or response deadline passed.
    RequestTimedOut {
        token: Token,
    },
    /// The peer rejected our request with RST.
    RequestReset {
        token: Token,
    },
    /// A peer observer is gone (not reported when our own call removed it).
    ObserverRemoved {
        token: Token,
        reason: ObserverRemoval,
    },
    /// The peer answered our ping.
    Pong {
        ping: PingId,
    },
    PingTimedOut {
        ping: PingId,
    },
    /// Stream only: the peer's CSM.
    PeerSettings {
        max_message_size: usize,
        block_wise: bool,
    },
    /// Stream only: the connection is over; drop the transport.
    Closed(CloseReason),
}

/// RFC 7641 §3.4 reordering detection for one observation.
#[derive(Debug, Clone, Default)]
struct Freshness {
    last: Option<(u32, Instant)>,
}

/// Notifications more than this much later are fresh whatever their number.
const OBSERVE_FRESH_AFTER: Duration = Duration::from_secs(128);

impl Freshness {
    fn is_fresh(&self, v2: u32, t2: Instant) -> bool {
        const HALF: u32 = 1 << 23;
        match self.last {
            None => true,
            Some((v1, t1)) => {
                (v1 < v2 && v2 - v1 < HALF)
                    || (v1 > v2 && v1 - v2 > HALF)
                    || t2 > t1 + OBSERVE_FRESH_AFTER
            }
        }
    }
}

struct Pending {
    /// Kept to send the Observe 1 deregistration with the same options.
    request: Packet,
    /// Some for a GET with Observe 0.
    observe: Option<Freshness>,
    deadline: Option<Instant>,
}

struct Incoming<M> {
    token: Token,
    /// GET with Observe 0: a 2.xx answer registers an observer.
    registers: bool,
    meta: M,
}

/// Result of matching a response to our requests.
pub(crate) enum Matched {
    Deliver(Event),
    /// A reordered or duplicate notification: acknowledge, do not deliver.
    Stale,
    /// No exchange with this token: reject (RST) where the transport can.
    Unknown,
}

pub(crate) struct Core<M> {
    pub(crate) rng: SplitMix64,
    next_id: u64,
    pending: HashMap<Token, Pending>,
    /// Registered observers and the next sequence number (24 bits).
    observers: HashMap<Token, u32>,
    incoming: HashMap<RequestId, Incoming<M>>,
    pub(crate) last_rx: Option<Instant>,
}

impl<M> Core<M> {
    pub(crate) fn new(seed: u64) -> Self {
        Core {
            rng: SplitMix64::new(seed),
            next_id: 0,
            pending: HashMap::new(),
            observers: HashMap::new(),
            incoming: HashMap::new(),
            last_rx: None,
        }
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Gives `request` a fresh token and remembers it.
    pub(crate) fn start_request(
        &mut self,
        request: &mut Packet,
        deadline: Option<Instant>,
    ) -> Token {
        let token = loop {
            let t = Token::from_u64(self.rng.next_u64());
            if !self.pending.contains_key(&t) {
                break t;
            }
        };
        request.set_token(token.as_slice().to_vec());
        let observe = (msg::method(request) == Some(RequestType::Get)
            && msg::observe(request) == Some(0))
        .then(Freshness::default);
        self.pending.insert(
            token,
            Pending {
                request: request.clone(),
                observe,
                deadline,
            },
        );
        token
    }

    pub(crate) fn set_deadline(&mut self, token: &Token, deadline: Option<Instant>) {
        if let Some(p) = self.pending.get_mut(token) {
            p.deadline = deadline;
        }
    }

    pub(crate) fn cancel(&mut self, token: &Token) -> bool {
        self.pending.remove(token).is_some()
    }

    /// Turns an observation into a plain request re-sending the original
    /// GET with Observe 1 and the same token (RFC 7641 §3.6).
    pub(crate) fn deregistration(
        &mut self,
        token: &Token,
        deadline: Option<Instant>,
    ) -> Option<Packet> {
        let p = self
            .pending
            .get_mut(token)
            .filter(|p| p.observe.is_some())?;
        p.observe = None;
        p.deadline = deadline;
        let mut request = p.request.clone();
        msg::set_observe(&mut request, 1);
        Some(request)
    }

    /// Records a peer request; handles Observe (de)registration.
    pub(crate) fn accept_request(
        &mut self,
        request: Packet,
        token: Token,
        meta: M,
        events: &mut Vec<Event>,
    ) {
        let registers =
            msg::method(&request) == Some(RequestType::Get) && msg::observe(&request) == Some(0);
        // Any other GET on an observer's token ends that registration (RFC 7641 §3.6, §4.1).
        if msg::method(&request) == Some(RequestType::Get)
            && !registers
            && self.observers.remove(&token).is_some()
        {
            events.push(Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Deregistered,
            });
        }
        let id = RequestId(self.next_id());
        self.incoming.insert(
            id,
            Incoming {
                token,
                registers,
                meta,
            },
        );
        events.push(Event::Request { id, request });
    }

    /// Answers a peer request. `send` encodes and queues; nothing changes if
    /// it fails, so the caller may retry with a smaller response.
    /// Returns the observer token when the answer registered one.
    pub(crate) fn respond_with(
        &mut self,
        id: RequestId,
        mut response: Packet,
        send: impl FnOnce(&M, &Packet) -> Result<(), CoapError>,
    ) -> Result<Option<Token>, CoapError> {
        let inc = self.incoming.get(&id).ok_or(CoapError::UnknownRequest)?;
        let token = inc.token;
        response.set_token(token.as_slice().to_vec());
        let registers = inc.registers && msg::is_success(&response);
        let seq = self.observers.get(&token).copied().unwrap_or(0);
        if registers {
            msg::set_observe(&mut response, seq);
        } else {
            msg::remove_option(&mut response, CoapOption::Observe);
        }
        send(&inc.meta, &response)?;
        let inc_registers = inc.registers;
        self.incoming.remove(&id);
        if registers {
            self.observers.insert(token, (seq + 1) & 0x00FF_FFFF);
            Ok(Some(token))
        } else {
            if inc_registers {
                // A failed re-registration ends the old one too.
                self.observers.remove(&token);
            }
            Ok(None)
        }
    }

    /// Sends a notification; a non-2.xx one ends the observation (RFC 7641 §4.2).
    pub(crate) fn notify_with(
        &mut self,
        token: &Token,
        mut notification: Packet,
        send: impl FnOnce(&Packet) -> Result<(), CoapError>,
    ) -> Result<(), CoapError> {
        let seq = *self
            .observers
            .get(token)
            .ok_or(CoapError::UnknownObserver)?;
        notification.set_token(token.as_slice().to_vec());
        let last = !msg::is_success(&notification);
        if last {
            msg::remove_option(&mut notification, CoapOption::Observe);
        } else {
            msg::set_observe(&mut notification, seq);
        }
        send(&notification)?;
        if last {
            self.observers.remove(token);
        } else {
            self.observers.insert(*token, (seq + 1) & 0x00FF_FFFF);
        }
        Ok(())
    }

    pub(crate) fn remove_observer(&mut self, token: &Token) -> bool {
        self.observers.remove(token).is_some()
    }

    pub(crate) fn observers(&self) -> Vec<Token> {
        let mut v: Vec<Token> = self.observers.keys().copied().collect();
        v.sort();
        v
    }

    /// Matches a response (piggybacked, separate or notification) by token.
    pub(crate) fn accept_response(&mut self, now: Instant, response: Packet) -> Matched {
        let Some(token) = Token::from_slice(response.get_token()) else {
            return Matched::Unknown;
        };
        let Some(p) = self.pending.get_mut(&token) else {
            return Matched::Unknown;
        };
        let seq = msg::observe(&response).filter(|_| msg::is_success(&response));
        match (&mut p.observe, seq) {
            (Some(fresh), Some(seq)) => {
                if !fresh.is_fresh(seq, now) {
                    return Matched::Stale;
                }
                let first = fresh.last.is_none();
                fresh.last = Some((seq, now));
                p.deadline = None;
                Matched::Deliver(if first {
                    Event::Response { token, response }
                } else {
                    Event::Notification { token, response }
                })
            }
            // A final response (also one ending an observation).
            _ => {
                self.pending.remove(&token);
                Matched::Deliver(Event::Response { token, response })
            }
        }
    }

    /// Drops requests whose response deadline passed.
    pub(crate) fn expire(&mut self, now: Instant, events: &mut Vec<Event>) {
        let mut expired: Vec<Token> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        expired.sort();
        for token in expired {
            self.pending.remove(&token);
            events.push(Event::RequestTimedOut { token });
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_rfc7641_section_3_4() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        assert!(f.is_fresh(5, t0));
        f.last = Some((5, t0));
        assert!(f.is_fresh(6, t0));
        assert!(!f.is_fresh(5, t0), "duplicate");
        assert!(!f.is_fresh(4, t0), "older");
        assert!(!f.is_fresh(5 + (1 << 23), t0), "too far ahead means older");
        assert!(
            f.is_fresh(4, t0 + Duration::from_secs(129)),
            "128 s later always fresh"
        );
        // 24-bit wrap: 0xFFFFFF -> 0 is newer.
        f.last = Some((0x00FF_FFFF, t0));
        assert!(f.is_fresh(0, t0));
        assert!(f.is_fresh(3, t0));
        assert!(!f.is_fresh(0x00FF_FFF0, t0));
    }
}
