//! The client role (`dots-client`, the ISP side): builds requests, hands
//! out increasing mids for its cuid, decodes answers and notifications
//! into [`ClientEvent`]s, and keeps heartbeats going. On Call Home the
//! client never declares the session lost (RFC 9066 §5.2.1: it keeps using
//! the channel even when the agent's uplink is saturated).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use super::error::SignalError;
use super::heartbeat::{self, Heartbeats};
use crate::coap::{msg, Delivery, DotsResource, Endpoint, Event, Token};
use crate::model::{DotsMessage, MitigationScope, RedirectedSignal, Scope, SignalConfig};

/// Settings of a [`SignalClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub cuid: String,
    /// The first mid handed out; later ones increase (RFC 9132 §4.4.1).
    pub first_mid: u32,
    pub heartbeat_interval: Duration,
    /// How mitigation and configuration requests are sent over datagrams.
    pub delivery: Delivery,
}

impl ClientConfig {
    pub fn new(cuid: impl Into<String>) -> Self {
        Self {
            cuid: cuid.into(),
            first_mid: 1,
            heartbeat_interval: Duration::from_secs(30),
            delivery: Delivery::Confirmable,
        }
    }
}

/// Which request an answer belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Create, refresh or update.
    Mitigate {
        mid: u32,
    },
    Efficacy {
        mid: u32,
    },
    Get {
        mid: Option<u32>,
        observe: bool,
    },
    Withdraw {
        mid: u32,
    },
    GetConfig,
    PutConfig {
        sid: u32,
    },
    DeleteConfig {
        sid: u32,
    },
    Redirect,
    Heartbeat,
}

/// A decoded answer body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Empty,
    Mitigation(MitigationScope),
    Config(Box<SignalConfig>),
    /// Diagnostic payload of an error answer.
    Diagnostic(String),
    /// A success body that does not decode as expected.
    Invalid(String),
}

/// What the client reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Response {
        token: Token,
        request: RequestKind,
        code: ResponseType,
        body: Body,
    },
    /// A notification of an observation started with [`SignalClient::observe`].
    Notification {
        token: Token,
        request: RequestKind,
        code: ResponseType,
        body: Body,
    },
    TimedOut {
        token: Token,
        request: RequestKind,
    },
    /// The agent's heartbeat (its `peer-hb-status` says whether it hears ours).
    PeerHeartbeat {
        peer_hb_status: bool,
    },
    /// The stream was released or aborted.
    Closed,
}

fn response_code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        _ => ResponseType::UnKnown,
    }
}

fn decode_body(kind: &RequestKind, p: &Packet) -> Body {
    let cbor = msg::content_format(p) == Some(msg::CONTENT_FORMAT_DOTS_CBOR);
    if !msg::is_success(p) {
        // A 4.09 carries conflict-information (RFC 9132 §4.4.1).
        if cbor {
            if let Ok(m) = MitigationScope::decode(&p.payload) {
                return Body::Mitigation(m);
            }
        }
        return Body::Diagnostic(String::from_utf8_lossy(&p.payload).into_owned());
    }
    if p.payload.is_empty() {
        return Body::Empty;
    }
    let invalid = |e: crate::cbor::CborError| Body::Invalid(e.to_string());
    match kind {
        RequestKind::GetConfig
        | RequestKind::PutConfig { .. }
        | RequestKind::DeleteConfig { .. } => {
            SignalConfig::decode(&p.payload).map_or_else(invalid, |c| Body::Config(Box::new(c)))
        }
        _ => MitigationScope::decode(&p.payload).map_or_else(invalid, Body::Mitigation),
    }
}

fn with_body(mut p: Packet, cbor: Vec<u8>) -> Packet {
    msg::set_content_format(&mut p, msg::CONTENT_FORMAT_DOTS_CBOR);
    p.payload = cbor;
    p
}

/// The Call Home DOTS client state machine over one connection.
pub struct SignalClient<E> {
    ep: E,
    cuid: String,
    /// `None` once u32::MAX was handed out.
    next_mid: Option<u32>,
    delivery: Delivery,
    interval: Duration,
    pending: HashMap<Token, RequestKind>,
    hb: Heartbeats,
    events: VecDeque<ClientEvent>,
}

impl<E: Endpoint> SignalClient<E> {
    pub fn new(now: Instant, mut ep: E, config: ClientConfig) -> Result<Self, SignalError> {
        if config.cuid.is_empty() || config.heartbeat_interval.is_zero() {
            return Err(SignalError::Config(
                "cuid and heartbeat_interval must not be empty".into(),
            ));
        }
        ep.start(now);
        Ok(Self {
            hb: Heartbeats::new(now, config.heartbeat_interval),
            ep,
            cuid: config.cuid,
            next_mid: Some(config.first_mid),
            delivery: config.delivery,
            interval: config.heartbeat_interval,
            pending: HashMap::new(),
            events: VecDeque::new(),
        })
    }

    pub fn cuid(&self) -> &str {
        &self.cuid
    }

    /// Follows the heartbeat interval the agent advertises.
    pub fn set_heartbeat_interval(&mut self, now: Instant, interval: Duration) {
        if !interval.is_zero() {
            self.interval = interval;
            self.hb.schedule(now, interval);
        }
    }

    pub fn endpoint_mut(&mut self) -> &mut E {
        &mut self.ep
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.ep.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let hb = Some(self.hb.next_send());
        self.ep.poll_timeout().map_or(hb, |t| hb.min(Some(t)))
    }

    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), SignalError> {
        let events = self.ep.handle_input(now, bytes)?;
        self.handle_events(now, events);
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let events = self.ep.handle_timeout(now);
        self.handle_events(now, events);
        if now >= self.hb.next_send() {
            let request = heartbeat::request(self.hb.peer_hb_status(now, self.interval));
            if let Ok(token) = self.ep.send_request(now, request, Delivery::NonConfirmable) {
                self.pending.insert(token, RequestKind::Heartbeat);
            }
            self.hb.schedule(now, self.interval);
        }
    }

    // ---- requests ----

    fn mitigate_uri(&self, mid: Option<u32>) -> DotsResource {
        DotsResource::Mitigate {
            cdid: None,
            cuid: self.cuid.clone(),
            mid,
        }
    }

    fn send(
        &mut self,
        now: Instant,
        request: Packet,
        kind: RequestKind,
        delivery: Delivery,
    ) -> Result<Token, SignalError> {
        let token = self.ep.send_request(now, request, delivery)?;
        self.pending.insert(token, kind);
        Ok(token)
    }

    fn put_scope(
        &mut self,
        now: Instant,
        mid: u32,
        scope: Scope,
        kind: RequestKind,
    ) -> Result<Token, SignalError> {
        let mut request = self.mitigate_uri(Some(mid)).request(RequestType::Put);
        if matches!(kind, RequestKind::Efficacy { .. }) {
            request.add_option(CoapOption::IfMatch, Vec::new());
        }
        let body = MitigationScope {
            scopes: vec![scope],
        };
        let request = with_body(request, body.encode());
        self.send(now, request, kind, self.delivery)
    }

    /// A new mitigation with the next mid; returns the mid and the token.
    pub fn request_mitigation(
        &mut self,
        now: Instant,
        scope: Scope,
    ) -> Result<(u32, Token), SignalError> {
        let mid = self.next_mid.ok_or(SignalError::MidsExhausted)?;
        let token = self.put_scope(now, mid, scope, RequestKind::Mitigate { mid })?;
        self.next_mid = mid.checked_add(1);
        Ok((mid, token))
    }

    /// Refreshes (same scope) or updates an existing mitigation.
    pub fn update_mitigation(
        &mut self,
        now: Instant,
        mid: u32,
        scope: Scope,
    ) -> Result<Token, SignalError> {
        self.put_scope(now, mid, scope, RequestKind::Mitigate { mid })
    }

    /// Efficacy update: `scope` should carry `attack_status`.
    pub fn efficacy_update(
        &mut self,
        now: Instant,
        mid: u32,
        scope: Scope,
    ) -> Result<Token, SignalError> {
        self.put_scope(now, mid, scope, RequestKind::Efficacy { mid })
    }

    fn get_request(
        &mut self,
        now: Instant,
        mid: Option<u32>,
        observe: bool,
    ) -> Result<Token, SignalError> {
        let mut request = self.mitigate_uri(mid).request(RequestType::Get);
        if observe {
            msg::set_observe(&mut request, 0);
        }
        self.send(
            now,
            request,
            RequestKind::Get { mid, observe },
            self.delivery,
        )
    }

    /// GET one mitigation, or all of this cuid.
    pub fn get(&mut self, now: Instant, mid: Option<u32>) -> Result<Token, SignalError> {
        self.get_request(now, mid, false)
    }

    /// GET with Observe 0: the first answer, then notifications.
    pub fn observe(&mut self, now: Instant, mid: Option<u32>) -> Result<Token, SignalError> {
        self.get_request(now, mid, true)
    }

    /// Ends an observation (GET with Observe 1 on the same token).
    pub fn stop_observing(&mut self, now: Instant, token: &Token) -> Result<(), SignalError> {
        self.ep.deregister(now, token)?;
        Ok(())
    }

    pub fn withdraw(&mut self, now: Instant, mid: u32) -> Result<Token, SignalError> {
        let request = self.mitigate_uri(Some(mid)).request(RequestType::Delete);
        self.send(now, request, RequestKind::Withdraw { mid }, self.delivery)
    }

    pub fn get_config(&mut self, now: Instant) -> Result<Token, SignalError> {
        let request = DotsResource::Config { sid: None }.request(RequestType::Get);
        self.send(now, request, RequestKind::GetConfig, self.delivery)
    }

    pub fn put_config(
        &mut self,
        now: Instant,
        sid: u32,
        config: &SignalConfig,
    ) -> Result<Token, SignalError> {
        let request = DotsResource::Config { sid: Some(sid) }.request(RequestType::Put);
        let request = with_body(request, config.encode());
        self.send(now, request, RequestKind::PutConfig { sid }, self.delivery)
    }

    pub fn delete_config(&mut self, now: Instant, sid: u32) -> Result<Token, SignalError> {
        let request = DotsResource::Config { sid: Some(sid) }.request(RequestType::Delete);
        self.send(
            now,
            request,
            RequestKind::DeleteConfig { sid },
            self.delivery,
        )
    }

    /// Sends the agent to another Call Home client (RFC 9066 §5.2.2):
    /// always Non-confirmable.
    pub fn redirect(
        &mut self,
        now: Instant,
        target: &RedirectedSignal,
    ) -> Result<Token, SignalError> {
        let resource = DotsResource::Redirect {
            cdid: None,
            cuid: self.cuid.clone(),
            mid: None,
        };
        let request = with_body(resource.request(RequestType::Put), target.encode());
        self.send(
            now,
            request,
            RequestKind::Redirect,
            Delivery::NonConfirmable,
        )
    }

    // ---- events ----

    fn handle_events(&mut self, now: Instant, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Request { id, request } => self.on_request(now, id, &request),
                Event::Response { token, response } => self.on_response(token, &response, false),
                Event::Notification { token, response } => self.on_response(token, &response, true),
                Event::RequestTimedOut { token } | Event::RequestReset { token } => {
                    match self.pending.remove(&token) {
                        Some(RequestKind::Heartbeat) | None => {}
                        Some(request) => self
                            .events
                            .push_back(ClientEvent::TimedOut { token, request }),
                    }
                }
                Event::Closed(_) => self.events.push_back(ClientEvent::Closed),
                _ => {}
            }
        }
    }

    fn on_response(&mut self, token: Token, response: &Packet, notification: bool) {
        // An observation stays pending while its answers carry Observe.
        let ongoing = msg::is_success(response) && msg::observe(response).is_some();
        let kind = if ongoing {
            self.pending.get(&token).cloned()
        } else {
            self.pending.remove(&token)
        };
        let Some(request) = kind else {
            return;
        };
        if request == RequestKind::Heartbeat {
            return;
        }
        let code = response_code(response);
        let body = decode_body(&request, response);
        self.events.push_back(if notification {
            ClientEvent::Notification {
                token,
                request,
                code,
                body,
            }
        } else {
            ClientEvent::Response {
                token,
                request,
                code,
                body,
            }
        });
    }

    /// The agent only sends heartbeats; anything else is refused.
    fn on_request(&mut self, now: Instant, id: crate::coap::RequestId, request: &Packet) {
        let answer = match DotsResource::from_request(request) {
            Ok(DotsResource::Heartbeat) => heartbeat::accept(request).map(|(hb, answer)| {
                self.hb.peer_heartbeat(now);
                self.events.push_back(ClientEvent::PeerHeartbeat {
                    peer_hb_status: hb.peer_hb_status,
                });
                answer
            }),
            Ok(_) => Err(crate::coap::ErrorResponse::new(
                ResponseType::NotFound,
                "a Call Home DOTS client serves only hb",
            )),
            Err(e) => Err(e),
        };
        // Nothing to do if the answer cannot be sent: the peer retries.
        let _ = self
            .ep
            .respond(now, id, answer.unwrap_or_else(|e| e.to_packet()));
    }
}
