//! A server-role and a client-role instance wired through in-memory
//! queues, on a fake clock (offsets from one `Instant`) with fixed seeds,
//! and the conversation steps the tests share.

use std::time::{Duration, Instant};

use coap_lite::{Packet, ResponseType};

use crate::coap::{
    msg, DatagramConfig, DatagramEndpoint, Delivery, Endpoint, Event, StreamConfig, StreamEndpoint,
    Token,
};
use crate::model::Scope;
use crate::signal::{
    Action, Body, ClientConfig, ClientEvent, ConsentMode, Counters, MitigationKey, ServerConfig,
    SignalClient, SignalServer,
};

pub(super) const CUID: &str = "dz6pHjaADkaFTbjreJGBpw";

pub(super) fn dgram(seed: u64) -> DatagramEndpoint {
    DatagramEndpoint::new(DatagramConfig::default(), seed).expect("endpoint")
}

pub(super) fn stream(seed: u64) -> StreamEndpoint {
    StreamEndpoint::new(StreamConfig::default(), seed).expect("endpoint")
}

pub(super) fn scope(target: &str, source: &str, lifetime: i64) -> Scope {
    Scope {
        target_prefix: vec![target.parse().expect("prefix")],
        source_prefix: vec![source.parse().expect("prefix")],
        lifetime: Some(lifetime),
        ..Scope::default()
    }
}

pub(super) fn basic_scope() -> Scope {
    scope("203.0.113.0/24", "192.0.2.10/32", 3600)
}

pub(super) fn server_config() -> ServerConfig {
    ServerConfig {
        domain: vec![
            "192.0.2.0/24".parse().expect("prefix"),
            "2001:db8:123::/48".parse().expect("prefix"),
        ],
        ..ServerConfig::default()
    }
}

/// [`server_config`] with consent required and the given consent timeout.
pub(super) fn consent_config(timeout: Option<Duration>, approves: bool) -> ServerConfig {
    ServerConfig {
        consent: ConsentMode::Require,
        consent_timeout: timeout,
        consent_timeout_approves: approves,
        ..server_config()
    }
}

pub(super) fn key(mid: u32) -> MitigationKey {
    MitigationKey::new(CUID, mid)
}

fn is_heartbeat(bytes: &[u8]) -> bool {
    Packet::from_bytes(bytes).is_ok_and(|p| {
        msg::uri_path(&p).is_ok_and(|path| path.last().map(String::as_str) == Some("hb"))
    })
}

/// Which datagrams the queue loses.
#[derive(Default)]
pub(super) struct Loss {
    pub(super) to_server: usize,
    pub(super) to_client: usize,
    pub(super) all: bool,
    pub(super) client_heartbeats: bool,
}

/// Answers a counters query for one key.
pub(super) type DataPlane = Box<dyn FnMut(&MitigationKey) -> Counters>;

pub(super) struct Pair<E> {
    t0: Instant,
    pub(super) now: Instant,
    pub(super) server: SignalServer<E>,
    pub(super) client: SignalClient<E>,
    actions: Vec<Action>,
    /// [`Action::Rejected`], kept apart so other checks stay short.
    pub(super) rejections: Vec<Action>,
    /// A fake data plane answering [`Action::QueryCounters`] at once.
    pub(super) data_plane: Option<DataPlane>,
    pub(super) events: Vec<ClientEvent>,
    pub(super) loss: Loss,
    make: fn(u64) -> E,
}

impl<E: Endpoint> Pair<E> {
    pub(super) fn new(make: fn(u64) -> E, config: ServerConfig) -> Self {
        let t0 = Instant::now();
        let server = SignalServer::new(t0, make(1), config).expect("server");
        let client = SignalClient::new(t0, make(2), ClientConfig::new(CUID)).expect("client");
        let mut pair = Self {
            t0,
            now: t0,
            server,
            client,
            actions: Vec::new(),
            rejections: Vec::new(),
            data_plane: None,
            events: Vec::new(),
            loss: Loss::default(),
            make,
        };
        pair.pump();
        pair
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Moves bytes both ways until both sides are quiet.
    pub(super) fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(bytes) = self.client.poll_transmit() {
                moved = true;
                let lost = self.loss.all
                    || (self.loss.client_heartbeats && is_heartbeat(&bytes))
                    || self.loss.to_server > 0;
                if self.loss.to_server > 0 {
                    self.loss.to_server -= 1;
                }
                if !lost {
                    let _ = self.server.handle_input(self.now, &bytes);
                }
            }
            while let Some(bytes) = self.server.poll_transmit() {
                moved = true;
                let lost = self.loss.all || self.loss.to_client > 0;
                if self.loss.to_client > 0 {
                    self.loss.to_client -= 1;
                }
                if !lost {
                    let _ = self.client.handle_input(self.now, &bytes);
                }
            }
            while let Some(action) = self.server.poll_action() {
                match (&action, self.data_plane.as_mut()) {
                    (Action::Rejected { .. }, _) => self.rejections.push(action),
                    (Action::QueryCounters { keys }, Some(dp)) => {
                        for k in keys {
                            let _ = self.server.counters(self.now, k, dp(k));
                        }
                        moved = true;
                        self.actions.push(action);
                    }
                    _ => self.actions.push(action),
                }
            }
            self.events
                .extend(std::iter::from_fn(|| self.client.poll_event()));
            if !moved {
                break;
            }
        }
    }

    /// Runs both sides' timers up to `d` from now.
    pub(super) fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = [self.server.poll_timeout(), self.client.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.server.handle_timeout(self.now);
                    self.client.handle_timeout(self.now);
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = end;
        self.pump();
    }

    pub(super) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Actions queued by a direct call (no traffic involved).
    pub(super) fn take_or_poll(&mut self) -> Vec<Action> {
        self.pump();
        self.take_actions()
    }

    /// The answer to `token`, removed from the event list.
    pub(super) fn response(&mut self, token: Token) -> (ResponseType, Body) {
        let pos = self
            .events
            .iter()
            .position(|e| matches!(e, ClientEvent::Response { token: t, .. } if *t == token))
            .unwrap_or_else(|| panic!("no response for {token:?} in {:?}", self.events));
        match self.events.remove(pos) {
            ClientEvent::Response { code, body, .. } => (code, body),
            _ => unreachable!(),
        }
    }

    /// Whether the answer to `token` arrived (it stays in the list).
    pub(super) fn answered(&self, token: Token) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Response { token: t, .. } if *t == token))
    }

    /// The single scope of the answer to `token`.
    pub(super) fn response_scope(&mut self, token: Token) -> (ResponseType, Scope) {
        match self.response(token) {
            (code, Body::Mitigation(m)) if m.scopes.len() == 1 => {
                (code, m.scopes.into_iter().next().expect("one scope"))
            }
            other => panic!("expected one scope, got {other:?}"),
        }
    }

    /// Notification scopes received so far (removed from the list).
    pub(super) fn notifications(&mut self) -> Vec<Scope> {
        let (notes, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.events)
            .into_iter()
            .partition(|e| matches!(e, ClientEvent::Notification { .. }));
        self.events = rest;
        notes
            .into_iter()
            .flat_map(|e| match e {
                ClientEvent::Notification {
                    body: Body::Mitigation(m),
                    ..
                } => m.scopes,
                _ => Vec::new(),
            })
            .collect()
    }

    pub(super) fn create(&mut self, scope: Scope) -> (u32, ResponseType, Scope) {
        let (mid, token) = self
            .client
            .request_mitigation(self.now, scope)
            .expect("request");
        self.pump();
        let (code, scope) = self.response_scope(token);
        (mid, code, scope)
    }

    /// Creates a mitigation and has the data plane confirm it (status 2);
    /// returns its mid.
    pub(super) fn enforce(&mut self, scope: Scope) -> u32 {
        let (mid, ..) = self.create(scope);
        self.server.installed(self.now, &key(mid)).expect("known");
        mid
    }

    /// Observes one mitigation, or all of the cuid; returns the code of
    /// the first answer.
    pub(super) fn observe(&mut self, mid: Option<u32>) -> ResponseType {
        let token = self.client.observe(self.now, mid).expect("observe");
        self.pump();
        self.response(token).0
    }

    /// A rejected request: its code and diagnostic.
    pub(super) fn rejected(&mut self, token: Token) -> (ResponseType, String) {
        self.pump();
        match self.response(token) {
            (code, Body::Diagnostic(d)) => (code, d),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub(super) fn reconnect(&mut self) {
        let ep = (self.make)(11);
        self.server.reconnect(self.now, ep).expect("reconnect");
        self.client =
            SignalClient::new(self.now, (self.make)(12), ClientConfig::new(CUID)).expect("client");
        self.loss = Loss::default();
        self.pump();
    }
}

/// Sends `request` to the server from a bare endpoint (bypassing the
/// client's request builders) and returns the answer's code.
pub(super) fn raw_exchange(
    server: &mut SignalServer<DatagramEndpoint>,
    now: Instant,
    request: Packet,
    seed: u64,
) -> ResponseType {
    let answer = raw_answer(server, now, request, seed);
    match answer.header.code {
        coap_lite::MessageClass::Response(code) => code,
        other => panic!("not a response: {other:?}"),
    }
}

/// [`raw_exchange`], returning the whole answer.
pub(super) fn raw_answer(
    server: &mut SignalServer<DatagramEndpoint>,
    now: Instant,
    request: Packet,
    seed: u64,
) -> Packet {
    // A distinct seed per call: the same message id would be a duplicate.
    let mut raw = dgram(seed);
    let token = raw
        .send_request(now, request, Delivery::Confirmable)
        .expect("send");
    while let Some(bytes) = raw.poll_transmit() {
        server.handle_input(now, &bytes).expect("CoAP");
    }
    let mut events = Vec::new();
    while let Some(bytes) = server.poll_transmit() {
        events.extend(raw.handle_input(now, &bytes).expect("CoAP"));
    }
    match events.as_slice() {
        [Event::Response { token: t, response }] if *t == token => response.clone(),
        other => panic!("expected one response, got {other:?}"),
    }
}

/// The keys of the [`Action::Install`]s among `actions`.
pub(super) fn install_action(actions: &[Action]) -> Vec<MitigationKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Install { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect()
}
