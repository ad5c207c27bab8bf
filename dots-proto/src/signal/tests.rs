//! Conversations between a server-role and a client-role instance wired
//! through in-memory queues, on a fake clock (offsets from one `Instant`)
//! with fixed seeds.

use std::time::{Duration, Instant};

use coap_lite::{Packet, RequestType, ResponseType};

use super::*;
use crate::coap::{
    msg, DatagramConfig, DatagramEndpoint, Delivery, Endpoint, StreamConfig, StreamEndpoint, Token,
};
use crate::model::{
    AttackStatus, ConfigSet, ConflictCause, MinMaxCurrent, MitigationStatus, RedirectedSignal,
    Scope, SignalConfig,
};

const CUID: &str = "dz6pHjaADkaFTbjreJGBpw";

fn dgram(seed: u64) -> DatagramEndpoint {
    DatagramEndpoint::new(DatagramConfig::default(), seed).expect("endpoint")
}

fn stream(seed: u64) -> StreamEndpoint {
    StreamEndpoint::new(StreamConfig::default(), seed).expect("endpoint")
}

fn scope(target: &str, source: &str, lifetime: i64) -> Scope {
    Scope {
        target_prefix: vec![target.parse().expect("prefix")],
        source_prefix: vec![source.parse().expect("prefix")],
        lifetime: Some(lifetime),
        ..Scope::default()
    }
}

fn basic_scope() -> Scope {
    scope("203.0.113.0/24", "192.0.2.10/32", 3600)
}

fn server_config() -> ServerConfig {
    ServerConfig {
        domain: vec![
            "192.0.2.0/24".parse().expect("prefix"),
            "2001:db8:123::/48".parse().expect("prefix"),
        ],
        ..ServerConfig::default()
    }
}

fn key(mid: u32) -> MitigationKey {
    MitigationKey::new(CUID, mid)
}

fn is_heartbeat(bytes: &[u8]) -> bool {
    Packet::from_bytes(bytes).is_ok_and(|p| {
        msg::uri_path(&p).is_ok_and(|path| path.last().map(String::as_str) == Some("hb"))
    })
}

/// Which datagrams the queue loses.
#[derive(Default)]
struct Loss {
    to_server: usize,
    to_client: usize,
    all: bool,
    client_heartbeats: bool,
}

/// Answers a counters query for one key.
type DataPlane = Box<dyn FnMut(&MitigationKey) -> Counters>;

struct Pair<E> {
    t0: Instant,
    now: Instant,
    server: SignalServer<E>,
    client: SignalClient<E>,
    actions: Vec<Action>,
    /// [`Action::Rejected`], kept apart so other checks stay short.
    rejections: Vec<Action>,
    /// A fake data plane answering [`Action::QueryCounters`] at once.
    data_plane: Option<DataPlane>,
    events: Vec<ClientEvent>,
    loss: Loss,
    make: fn(u64) -> E,
}

impl<E: Endpoint> Pair<E> {
    fn new(make: fn(u64) -> E, config: ServerConfig) -> Self {
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

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Moves bytes both ways until both sides are quiet.
    fn pump(&mut self) {
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
    fn advance(&mut self, d: Duration) {
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

    fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// The answer to `token`, removed from the event list.
    fn response(&mut self, token: Token) -> (ResponseType, Body) {
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

    /// The single scope of the answer to `token`.
    fn response_scope(&mut self, token: Token) -> (ResponseType, Scope) {
        match self.response(token) {
            (code, Body::Mitigation(m)) if m.scopes.len() == 1 => {
                (code, m.scopes.into_iter().next().expect("one scope"))
            }
            other => panic!("expected one scope, got {other:?}"),
        }
    }

    /// Notification scopes received so far (removed from the list).
    fn notifications(&mut self) -> Vec<Scope> {
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

    fn create(&mut self, scope: Scope) -> (u32, ResponseType, Scope) {
        let (mid, token) = self
            .client
            .request_mitigation(self.now, scope)
            .expect("request");
        self.pump();
        let (code, scope) = self.response_scope(token);
        (mid, code, scope)
    }

    /// A rejected request: its code and diagnostic.
    fn rejected(&mut self, token: Token) -> (ResponseType, String) {
        self.pump();
        match self.response(token) {
            (code, Body::Diagnostic(d)) => (code, d),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn reconnect(&mut self) {
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
fn raw_exchange(
    server: &mut SignalServer<DatagramEndpoint>,
    now: Instant,
    request: Packet,
    seed: u64,
) -> ResponseType {
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
        [crate::coap::Event::Response { token: t, response }] if *t == token => {
            match response.header.code {
                coap_lite::MessageClass::Response(code) => code,
                other => panic!("not a response: {other:?}"),
            }
        }
        other => panic!("expected one response, got {other:?}"),
    }
}

fn install_action(actions: &[Action]) -> Vec<MitigationKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Install { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

// ---- the basic conversation, over both transports ----

fn basic_conversation<E: Endpoint>(make: fn(u64) -> E) {
    let mut p = Pair::new(make, server_config());
    let (mid, code, s) = p.create(basic_scope());
    assert_eq!((mid, code), (1, ResponseType::Created));
    assert_eq!(s.status, Some(MitigationStatus::InProgress));
    assert_eq!(s.mid, Some(1));
    assert_eq!(install_action(&p.take_actions()), [key(1)]);

    let observe = p.client.observe(p.now, None).expect("observe");
    p.pump();
    let (code, _) = p.response(observe);
    assert_eq!(code, ResponseType::Content);

    // Status 2 only once the data plane says so.
    p.server.installed(p.now, &key(1)).expect("known");
    p.pump();
    let notes = p.notifications();
    assert_eq!(notes.len(), 1);
    assert_eq!(
        notes[0].status,
        Some(MitigationStatus::SuccessfullyMitigated)
    );

    let counters = Counters {
        pkts: 10,
        bytes: 1500,
        pps: 2,
        bps: 300,
    };
    p.server.counters(p.now, &key(1), counters).expect("known");
    p.server.counters(p.now, &key(1), counters).expect("known");
    p.pump();
    let notes = p.notifications();
    assert_eq!(notes.len(), 1, "unchanged counters are not re-sent");
    assert_eq!(
        (notes[0].pkts_dropped, notes[0].bytes_dropped),
        (Some(10), Some(1500))
    );

    // DELETE: the drops go first, the answer carries the final counters
    // the shell read while removing them.
    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    assert_eq!(p.take_actions(), [Action::Remove { key: key(1) }]);
    assert!(
        !p.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Response { token, .. } if *token == del)),
        "answered only once the data plane removed it"
    );
    let last_counters = Counters {
        pkts: 12,
        bytes: 1800,
        pps: 1,
        bps: 150,
    };
    assert!(p.server.removed(p.now, &key(1), last_counters));
    assert!(!p.server.removed(p.now, &key(1), last_counters), "once");
    p.pump();
    let (code, last) = p.response_scope(del);
    assert_eq!(code, ResponseType::Deleted);
    assert_eq!(
        (
            last.mid,
            last.pkts_dropped,
            last.bytes_dropped,
            last.bps_dropped
        ),
        (Some(1), Some(12), Some(1800), Some(150))
    );
    let notes = p.notifications();
    assert_eq!(notes[0].status, Some(MitigationStatus::Terminated));
    assert!(p.server.mitigations().is_empty());
    let get = p.client.get(p.now, Some(1)).expect("get");
    assert_eq!(p.rejected(get).0, ResponseType::NotFound);
}

#[test]
fn basic_conversation_datagram() {
    basic_conversation(dgram);
}

#[test]
fn basic_conversation_stream() {
    basic_conversation(stream);
}

fn consent_and_redirect<E: Endpoint>(make: fn(u64) -> E) {
    let mut p = Pair::new(
        make,
        ServerConfig {
            consent: ConsentMode::Require,
            ..server_config()
        },
    );
    p.create(basic_scope());
    let actions = p.take_actions();
    assert!(matches!(&actions[..], [Action::AskConsent { key: k, .. }] if *k == key(1)));
    p.server.consent(p.now, &key(1), true).expect("known");
    assert_eq!(install_action(&p.take_or_poll()), [key(1)]);
    let target = RedirectedSignal {
        alt_ch_client: "alt.example".into(),
        alt_ch_client_record: Vec::new(),
        ttl: Some(600),
    };
    let token = p.client.redirect(p.now, &target).expect("redirect");
    p.pump();
    assert_eq!(p.response(token).0, ResponseType::Created);
    assert_eq!(
        p.take_actions(),
        [Action::Redirect { target }, Action::Close]
    );
}

impl<E: Endpoint> Pair<E> {
    /// Actions queued by a direct call (no traffic involved).
    fn take_or_poll(&mut self) -> Vec<Action> {
        self.pump();
        self.take_actions()
    }
}

#[test]
fn consent_and_redirect_datagram() {
    consent_and_redirect(dgram);
}

#[test]
fn consent_and_redirect_stream() {
    consent_and_redirect(stream);
}

// ---- mitigation lifecycle ----

#[test]
fn efficacy_update_records_attack_status() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(basic_scope());
    let update = Scope {
        attack_status: Some(AttackStatus::UnderAttack),
        ..basic_scope()
    };
    let token = p.client.efficacy_update(p.now, mid, update).expect("put");
    p.pump();
    assert_eq!(p.response(token).0, ResponseType::Changed);
    let m = p.server.mitigations().get(&key(mid)).expect("present");
    assert_eq!(m.attack_status, Some(AttackStatus::UnderAttack));
    // Unknown mid: 4.04; no attack-status: 4.00.
    let update = Scope {
        attack_status: Some(AttackStatus::SuccessfullyMitigated),
        ..basic_scope()
    };
    let token = p.client.efficacy_update(p.now, 99, update).expect("put");
    assert_eq!(p.rejected(token).0, ResponseType::NotFound);
    let token = p
        .client
        .efficacy_update(p.now, mid, basic_scope())
        .expect("put");
    let (code, diag) = p.rejected(token);
    assert_eq!(code, ResponseType::BadRequest, "{diag}");
    assert_eq!(
        p.server
            .mitigations()
            .get(&key(mid))
            .and_then(|m| m.attack_status),
        Some(AttackStatus::UnderAttack)
    );
}

#[test]
fn refresh_keeps_install_and_update_reinstalls() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(scope("203.0.113.0/24", "192.0.2.10/32", 60));
    p.server.installed(p.now, &key(mid)).expect("known");
    p.take_actions();
    p.advance(Duration::from_secs(50));
    let token = p
        .client
        .update_mitigation(p.now, mid, scope("203.0.113.0/24", "192.0.2.10/32", 60))
        .expect("put");
    p.pump();
    let (code, s) = p.response_scope(token);
    assert_eq!(code, ResponseType::Changed);
    assert_eq!(s.status, Some(MitigationStatus::SuccessfullyMitigated));
    assert_eq!(s.lifetime, Some(60));
    assert!(install_action(&p.take_actions()).is_empty(), "refresh only");
    p.advance(Duration::from_secs(50));
    assert!(p.server.mitigations().get(&key(mid)).is_some(), "refreshed");

    let token = p
        .client
        .update_mitigation(p.now, mid, scope("203.0.113.0/24", "192.0.2.11/32", 60))
        .expect("put");
    p.pump();
    let (code, s) = p.response_scope(token);
    assert_eq!(code, ResponseType::Changed);
    assert_eq!(s.status, Some(MitigationStatus::InProgress));
    assert_eq!(install_action(&p.take_actions()), [key(mid)]);
}

#[test]
fn newer_overlapping_mid_replaces_older() {
    let mut p = Pair::new(dgram, server_config());
    let (m1, ..) = p.create(scope("203.0.113.0/24", "192.0.2.0/28", 600));
    p.take_actions();
    let (m2, code, _) = p.create(scope("203.0.113.7/32", "192.0.2.1/32", 600));
    assert_eq!(code, ResponseType::Created);
    assert_eq!(
        p.take_actions(),
        [
            Action::Remove { key: key(m1) },
            Action::Install {
                key: key(m2),
                request: p
                    .server
                    .mitigations()
                    .get(&key(m2))
                    .expect("present")
                    .request
                    .clone()
            }
        ]
    );
    assert!(p.server.mitigations().get(&key(m1)).is_none());
    // A different source is no overlap: both stay.
    let (m3, ..) = p.create(scope("203.0.113.7/32", "192.0.2.99/32", 600));
    assert_eq!(p.server.mitigations().len(), 2);
    p.take_actions();
    // A lower mid overlapping a newer one is a conflict; nothing changes.
    let before = p.server.mitigations().clone();
    let put = p
        .client
        .update_mitigation(p.now, m1, scope("203.0.113.7/32", "192.0.2.1/32", 600))
        .expect("put");
    assert_eq!(p.rejected(put).0, ResponseType::Conflict);
    assert_eq!(p.server.mitigations(), &before);
    assert!(p.take_actions().is_empty());
    assert!(m3 > m2);
}

#[test]
fn lifetime_expiry_removes_and_notifies() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(scope("203.0.113.0/24", "192.0.2.10/32", 100));
    p.server.installed(p.now, &key(mid)).expect("known");
    let observe = p.client.observe(p.now, Some(mid)).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    p.advance(Duration::from_secs(99));
    // Periodic work while active: counters queried, observers notified.
    let queries = p
        .take_actions()
        .into_iter()
        .filter(|a| matches!(a, Action::QueryCounters { keys } if keys == &[key(mid)]))
        .count();
    assert_eq!(queries, 3, "every 30 s");
    assert!(p.notifications().len() >= 3);
    p.advance(Duration::from_secs(2));
    assert!(p.server.mitigations().is_empty());
    assert_eq!(p.take_actions(), [Action::Remove { key: key(mid) }]);
    let notes = p.notifications();
    assert_eq!(
        notes.last().and_then(|s| s.status),
        Some(MitigationStatus::Terminated)
    );
    assert!(
        p.server.installed(p.now, &key(mid)).is_err(),
        "late results name an unknown mitigation"
    );
}

#[test]
fn consent_rejected_ends_with_conflict_cause_4() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            consent: ConsentMode::Require,
            ..server_config()
        },
    );
    let (mid, code, s) = p.create(basic_scope());
    assert_eq!(
        (code, s.status),
        (ResponseType::Created, Some(MitigationStatus::InProgress))
    );
    let observe = p.client.observe(p.now, None).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    p.server.consent(p.now, &key(mid), false).expect("known");
    p.pump();
    let notes = p.notifications();
    assert_eq!(notes.len(), 1);
    let conflict = notes[0].conflict_information.as_ref().expect("conflict");
    assert_eq!(
        conflict.conflict_cause,
        Some(ConflictCause::RejectedLegitimateTraffic)
    );
    assert_eq!(notes[0].status, Some(MitigationStatus::Withdrawn));
    assert!(p.server.mitigations().is_empty());
    assert!(p.take_actions().is_empty(), "nothing was installed");
}

#[test]
fn consent_approved_installs_then_reports_status_2() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            consent: ConsentMode::Require,
            ..server_config()
        },
    );
    let (mid, ..) = p.create(basic_scope());
    let observe = p.client.observe(p.now, Some(mid)).expect("observe");
    p.pump();
    p.response(observe);
    p.server.consent(p.now, &key(mid), true).expect("known");
    p.server.installed(p.now, &key(mid)).expect("known");
    p.pump();
    let notes = p.notifications();
    assert_eq!(
        notes.last().and_then(|s| s.status),
        Some(MitigationStatus::SuccessfullyMitigated)
    );
}

#[test]
fn install_failure_terminates_with_status_6() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(basic_scope());
    let observe = p.client.observe(p.now, None).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    p.server.install_failed(p.now, &key(mid)).expect("known");
    p.pump();
    assert_eq!(
        p.notifications().last().and_then(|s| s.status),
        Some(MitigationStatus::Terminated)
    );
    assert!(p.server.mitigations().is_empty());
    assert_eq!(p.take_actions(), [Action::Remove { key: key(mid) }]);
}

#[test]
fn monitor_mode_installs_nothing() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            mode: EnforcementMode::Monitor,
            ..server_config()
        },
    );
    let (mid, code, s) = p.create(basic_scope());
    assert_eq!(
        (code, s.status),
        (ResponseType::Created, Some(MitigationStatus::InProgress))
    );
    let actions = p.take_actions();
    assert!(matches!(&actions[..], [Action::Monitored { key: k, .. }] if *k == key(mid)));
    p.server.installed(p.now, &key(mid)).expect("known");
    let get = p.client.get(p.now, Some(mid)).expect("get");
    p.pump();
    assert_eq!(
        p.response_scope(get).1.status,
        Some(MitigationStatus::InProgress)
    );
    p.advance(Duration::from_secs(60));
    assert!(
        !p.take_actions()
            .iter()
            .any(|a| matches!(a, Action::QueryCounters { .. })),
        "nothing enforced, nothing to count"
    );
    let del = p.client.withdraw(p.now, mid).expect("delete");
    p.pump();
    assert_eq!(p.response(del).0, ResponseType::Deleted);
    assert!(p.take_actions().is_empty(), "nothing to remove");
}

// ---- rejections leave existing state untouched ----

#[test]
fn rejected_requests_leave_earlier_mitigations_in_force() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            max_mitigations_per_cuid: 1,
            ..server_config()
        },
    );
    let (mid, ..) = p.create(basic_scope());
    p.server.installed(p.now, &key(mid)).expect("known");
    p.take_actions();
    let before = p.server.mitigations().clone();

    let outside = scope("203.0.113.0/24", "198.51.100.1/32", 60);
    let trigger_false = Scope {
        trigger_mitigation: Some(false),
        ..basic_scope()
    };
    let no_lifetime = Scope {
        lifetime: None,
        ..basic_scope()
    };
    let too_many_prefixes = Scope {
        source_prefix: (0..40)
            .map(|i| format!("192.0.2.{i}/32").parse().expect("prefix"))
            .collect(),
        ..basic_scope()
    };
    let second = scope("198.51.100.0/24", "192.0.2.20/32", 60);
    let cases = [
        (
            outside,
            ResponseType::BadRequest,
            "outside this agent's domain",
        ),
        (
            trigger_false,
            ResponseType::BadRequest,
            "trigger-mitigation",
        ),
        (no_lifetime, ResponseType::BadRequest, "lifetime"),
        (
            too_many_prefixes,
            ResponseType::UnprocessableEntity,
            "limit",
        ),
        (second, ResponseType::UnprocessableEntity, "limit is 1"),
    ];
    for (scope, expected, text) in cases {
        let (_, token) = p.client.request_mitigation(p.now, scope).expect("send");
        let (code, diag) = p.rejected(token);
        assert_eq!(code, expected, "{diag}");
        assert!(diag.contains(text), "{diag}");
        assert_eq!(p.server.mitigations(), &before);
        assert!(p.take_actions().is_empty());
    }

    // Raw malformed bodies: wrong Content-Format, not CBOR, DELETE without mid.
    let path = crate::coap::DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(77),
    };
    let mut wrong_format = path.request(RequestType::Put);
    wrong_format.payload = vec![0xa0];
    msg::set_content_format(&mut wrong_format, 50);
    let mut garbage = path.request(RequestType::Put);
    msg::set_content_format(&mut garbage, msg::CONTENT_FORMAT_DOTS_CBOR);
    garbage.payload = vec![0xff, 0x00];
    let no_mid = crate::coap::DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: None,
    }
    .request(RequestType::Delete);
    for (seed, (request, expected)) in [
        (wrong_format, ResponseType::UnsupportedContentFormat),
        (garbage, ResponseType::BadRequest),
        (no_mid, ResponseType::BadRequest),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 + seed as u64;
        assert_eq!(raw_exchange(&mut p.server, p.now, request, seed), expected);
        assert_eq!(p.server.mitigations(), &before);
        assert!(p.take_or_poll().is_empty());
    }
    // Garbage bytes are not CoAP at all.
    assert!(p.server.handle_input(p.now, &[0xff, 0xff]).is_err());
    assert_eq!(p.server.mitigations(), &before);
}

// ---- session configuration ----

#[test]
fn session_configuration_get_put_delete() {
    let mut p = Pair::new(dgram, server_config());
    let get = p.client.get_config(p.now).expect("get");
    p.pump();
    let (code, body) = p.response(get);
    assert_eq!(code, ResponseType::Content);
    let Body::Config(config) = body else {
        panic!("config expected, got {body:?}");
    };
    let idle = config.idle_config.expect("idle");
    assert_eq!(
        idle.heartbeat_interval,
        MinMaxCurrent {
            max: Some(240),
            min: Some(15),
            current: Some(30)
        }
    );
    let put = |hb: u16| SignalConfig {
        sid: None,
        mitigating_config: None,
        idle_config: Some(ConfigSet {
            heartbeat_interval: MinMaxCurrent::current(hb),
            ..ConfigSet::default()
        }),
    };
    let t = p.client.put_config(p.now, 5, &put(60)).expect("put");
    p.pump();
    assert_eq!(p.response(t).0, ResponseType::Created);
    let t = p.client.put_config(p.now, 5, &put(600)).expect("put");
    let (code, diag) = p.rejected(t);
    assert_eq!(code, ResponseType::UnprocessableEntity);
    assert!(diag.contains("heartbeat-interval 600"), "{diag}");
    assert_eq!(p.server.session().active(false).heartbeat_interval, 60);
    let t = p.client.delete_config(p.now, 5).expect("delete");
    p.pump();
    assert_eq!(p.response(t).0, ResponseType::Deleted);
    assert_eq!(p.server.session().active(false).heartbeat_interval, 30);
}

// ---- heartbeats and liveness (RFC 9066 §5.2.1) ----

fn heartbeat_loss_and_recovery<E: Endpoint>(make: fn(u64) -> E) {
    let mut p = Pair::new(make, server_config());
    p.advance(Duration::from_secs(65));
    let peer_hbs = p
        .events
        .iter()
        .filter(|e| matches!(e, ClientEvent::PeerHeartbeat { .. }))
        .count();
    assert_eq!(peer_hbs, 2, "the agent sends one every 30 s");
    p.events.clear();

    // Client heartbeats lost, but other traffic arrives: the session stays
    // well past 15 missed heartbeats (450 s).
    p.loss.client_heartbeats = true;
    for _ in 0..10 {
        let _ = p.client.get_config(p.now).expect("get");
        p.advance(Duration::from_secs(100));
    }
    assert!(!p.take_actions().contains(&Action::SessionLost));

    // Nothing at all: lost once the whole span passed, reported once.
    let (mid, ..) = p.create(basic_scope());
    p.take_actions();
    p.loss.all = true;
    let silent_from = p.elapsed();
    p.advance(Duration::from_secs(449));
    assert!(!p.take_actions().contains(&Action::SessionLost));
    p.advance(Duration::from_secs(1000));
    let lost: Vec<_> = p
        .take_actions()
        .into_iter()
        .filter(|a| *a == Action::SessionLost)
        .collect();
    assert_eq!(lost.len(), 1);
    assert!(p.elapsed() - silent_from >= Duration::from_secs(450));

    // A new connection carries on; mitigations survive it.
    p.reconnect();
    let get = p.client.get(p.now, Some(mid)).expect("get");
    p.pump();
    assert_eq!(p.response(get).0, ResponseType::Content);
    p.advance(Duration::from_secs(1000));
    assert!(!p.take_actions().contains(&Action::SessionLost));
    assert!(p.server.mitigations().get(&key(mid)).is_some());
}

#[test]
fn heartbeat_loss_and_recovery_datagram() {
    heartbeat_loss_and_recovery(dgram);
}

#[test]
fn heartbeat_loss_and_recovery_stream() {
    heartbeat_loss_and_recovery(stream);
}

// ---- retransmission and deduplication ----

#[test]
fn lost_datagrams_are_retransmitted_and_deduplicated() {
    let mut p = Pair::new(dgram, server_config());
    // The request is lost: the client retransmits it.
    p.loss.to_server = 1;
    let (_, token) = p
        .client
        .request_mitigation(p.now, basic_scope())
        .expect("send");
    p.pump();
    assert!(p.take_actions().is_empty());
    p.advance(Duration::from_secs(4));
    assert_eq!(p.response(token).0, ResponseType::Created);
    assert_eq!(install_action(&p.take_actions()), [key(1)]);

    // The answer is lost: the retransmitted request gets the cached answer
    // and is not processed twice.
    p.loss.to_client = 1;
    let token = p
        .client
        .update_mitigation(p.now, 1, scope("203.0.113.0/24", "192.0.2.11/32", 60))
        .expect("send");
    p.pump();
    assert_eq!(install_action(&p.take_actions()), [key(1)]);
    p.advance(Duration::from_secs(4));
    assert_eq!(p.response(token).0, ResponseType::Changed);
    assert!(p.take_actions().is_empty(), "duplicate not processed");
}

#[test]
fn redirect_refused_when_disabled() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            allow_redirect: false,
            ..server_config()
        },
    );
    let target = RedirectedSignal {
        alt_ch_client: "alt.example".into(),
        alt_ch_client_record: Vec::new(),
        ttl: None,
    };
    let token = p.client.redirect(p.now, &target).expect("redirect");
    assert_eq!(p.rejected(token).0, ResponseType::BadRequest);
    assert!(p.take_actions().is_empty());
}

// ---- rejections reported to the shell ----

#[test]
fn refused_requests_are_reported_as_actions() {
    let mut p = Pair::new(dgram, server_config());
    let outside = scope("203.0.113.0/24", "198.51.100.1/32", 60);
    let (mid, token) = p.client.request_mitigation(p.now, outside).expect("send");
    let (code, diag) = p.rejected(token);
    assert_eq!(code, ResponseType::BadRequest);
    assert_eq!(
        std::mem::take(&mut p.rejections),
        [Action::Rejected {
            cuid: Some(CUID.into()),
            mid: Some(mid),
            code: "4.00".into(),
            diagnostic: diag,
        }]
    );
    assert!(p.take_actions().is_empty());

    // Wrong Content-Format: 4.15 with the ids of the Uri-Path.
    let mut wrong_format = crate::coap::DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(77),
    }
    .request(RequestType::Put);
    wrong_format.payload = vec![0xa0];
    msg::set_content_format(&mut wrong_format, 50);
    let code = raw_exchange(&mut p.server, p.now, wrong_format, 300);
    assert_eq!(code, ResponseType::UnsupportedContentFormat);
    p.pump();
    match std::mem::take(&mut p.rejections).as_slice() {
        [Action::Rejected {
            cuid, mid, code, ..
        }] => {
            assert_eq!(
                (cuid.as_deref(), *mid, code.as_str()),
                (Some(CUID), Some(77), "4.15")
            );
        }
        other => panic!("one rejection expected, got {other:?}"),
    }

    // Not about a mitigation: no ids. Unknown mid: 4.04 is reported too.
    let t = p
        .client
        .put_config(
            p.now,
            5,
            &SignalConfig {
                sid: None,
                mitigating_config: None,
                idle_config: Some(ConfigSet {
                    heartbeat_interval: MinMaxCurrent::current(600),
                    ..ConfigSet::default()
                }),
            },
        )
        .expect("put");
    assert_eq!(p.rejected(t).0, ResponseType::UnprocessableEntity);
    let del = p.client.withdraw(p.now, 42).expect("delete");
    assert_eq!(p.rejected(del).0, ResponseType::NotFound);
    match std::mem::take(&mut p.rejections).as_slice() {
        [Action::Rejected {
            cuid: None,
            mid: None,
            code: c1,
            ..
        }, Action::Rejected {
            cuid: Some(_),
            mid: Some(42),
            code: c2,
            ..
        }] => {
            assert_eq!((c1.as_str(), c2.as_str()), ("4.22", "4.04"));
        }
        other => panic!("two rejections expected, got {other:?}"),
    }
}

// ---- DELETE and final counters ----

#[test]
fn delete_falls_back_to_last_counters_when_the_shell_is_silent() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(basic_scope());
    p.server.installed(p.now, &key(mid)).expect("known");
    let reported = Counters {
        pkts: 5,
        bytes: 500,
        pps: 1,
        bps: 100,
    };
    p.server
        .counters(p.now, &key(mid), reported)
        .expect("known");
    p.take_actions();
    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    assert_eq!(p.take_actions(), [Action::Remove { key: key(mid) }]);
    assert!(p.server.poll_timeout() <= Some(p.now + Duration::from_secs(1)));
    p.advance(Duration::from_millis(999));
    assert!(!p
        .events
        .iter()
        .any(|e| matches!(e, ClientEvent::Response { token, .. } if *token == del)));
    p.advance(Duration::from_millis(1));
    let (code, last) = p.response_scope(del);
    assert_eq!(code, ResponseType::Deleted);
    assert_eq!(
        (last.pkts_dropped, last.bytes_dropped),
        (Some(5), Some(500))
    );
    // A late report changes nothing.
    assert!(!p.server.removed(p.now, &key(mid), Counters::default()));
    p.advance(Duration::from_secs(5));
    assert!(p
        .events
        .iter()
        .all(|e| !matches!(e, ClientEvent::Response { .. })));
}

#[test]
fn delete_answers_at_once_without_counters_wait_or_enforcement() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            counters_wait: Duration::ZERO,
            ..server_config()
        },
    );
    let (mid, ..) = p.create(basic_scope());
    p.server.installed(p.now, &key(mid)).expect("known");
    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    assert_eq!(p.response_scope(del).0, ResponseType::Deleted);

    // Pending consent: nothing on the data plane, nothing to wait for.
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            consent: ConsentMode::Require,
            ..server_config()
        },
    );
    let (mid, ..) = p.create(basic_scope());
    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    assert_eq!(p.response_scope(del).0, ResponseType::Deleted);
    assert!(!p
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Remove { .. })));
}

#[test]
fn delete_answer_waiting_is_dropped_on_reconnect() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(basic_scope());
    p.server.installed(p.now, &key(mid)).expect("known");
    let _ = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    p.reconnect();
    assert!(!p.server.removed(p.now, &key(mid), Counters::default()));
    p.advance(Duration::from_secs(2));
    assert!(p.server.mitigations().is_empty());
}

// ---- periodic counters and notifications ----

#[test]
fn one_second_notify_period_sends_fresh_counters_every_second() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            notify_period: Duration::from_secs(1),
            ..server_config()
        },
    );
    let (mid, ..) = p.create(scope("203.0.113.0/24", "192.0.2.10/32", 3600));
    p.server.installed(p.now, &key(mid)).expect("known");
    let observe = p.client.observe(p.now, Some(mid)).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    let mut pkts = 0;
    p.data_plane = Some(Box::new(move |_| {
        pkts += 100;
        Counters {
            pkts,
            bytes: pkts * 60,
            pps: 100,
            bps: 48_000,
        }
    }));
    p.advance(Duration::from_millis(10_500));
    let queries = p
        .take_actions()
        .into_iter()
        .filter(|a| matches!(a, Action::QueryCounters { keys } if keys == &[key(mid)]))
        .count();
    assert_eq!(queries, 10);
    let notes = p.notifications();
    let seen: Vec<_> = notes.iter().map(|s| s.pkts_dropped).collect();
    let expected: Vec<_> = (1..=10).map(|i| Some(i * 100)).collect();
    assert_eq!(seen, expected, "one fresh notification per second");
    assert!(notes.iter().all(|s| s.pps_dropped == Some(100)
        && s.bps_dropped == Some(48_000)
        && s.status == Some(MitigationStatus::SuccessfullyMitigated)));

    // Unchanged counters are still notified once a period.
    p.data_plane = Some(Box::new(|_| Counters {
        pkts: 1000,
        bytes: 60_000,
        pps: 0,
        bps: 0,
    }));
    p.advance(Duration::from_secs(5));
    assert_eq!(p.notifications().len(), 5);

    // A data plane that does not answer: the stale notification still
    // goes out every period, half a period late at most.
    p.data_plane = None;
    p.advance(Duration::from_secs(5));
    let notes = p.notifications();
    assert_eq!(notes.len(), 5);
    assert!(notes.iter().all(|s| s.pkts_dropped == Some(1000)));
}

// ---- consent ----

fn consent_pair(timeout: Option<Duration>, approves: bool) -> Pair<DatagramEndpoint> {
    Pair::new(
        dgram,
        ServerConfig {
            consent: ConsentMode::Require,
            consent_timeout: timeout,
            consent_timeout_approves: approves,
            ..server_config()
        },
    )
}

#[test]
fn pending_lists_requests_awaiting_consent() {
    let mut p = consent_pair(Some(Duration::from_secs(300)), false);
    let (m1, ..) = p.create(basic_scope());
    p.advance(Duration::from_secs(10));
    let (m2, ..) = p.create(scope("198.51.100.0/24", "192.0.2.20/32", 600));
    p.advance(Duration::from_secs(5));
    let pending = p.server.pending(p.now);
    let view: Vec<_> = pending
        .iter()
        .map(|q| {
            (
                q.key.clone(),
                q.age.as_secs(),
                q.decided_in.map(|d| d.as_secs()),
            )
        })
        .collect();
    assert_eq!(
        view,
        [(key(m1), 15, Some(285)), (key(m2), 5, Some(295))],
        "oldest first"
    );
    assert_eq!(pending[1].request.lifetime, 600);
    p.server.consent(p.now, &key(m1), true).expect("known");
    assert_eq!(p.server.pending(p.now).len(), 1);
}

#[test]
fn consent_timeout_approves() {
    let mut p = consent_pair(Some(Duration::from_secs(60)), true);
    let (mid, ..) = p.create(basic_scope());
    let observe = p.client.observe(p.now, Some(mid)).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    assert!(p.server.poll_timeout() <= Some(p.now + Duration::from_secs(60)));
    p.advance(Duration::from_secs(59));
    assert!(p.take_actions().is_empty());
    p.advance(Duration::from_secs(1));
    let actions = p.take_actions();
    assert!(
        matches!(
            &actions[..],
            [Action::ConsentTimedOut { key: k, approved: true }, Action::Install { key: i, .. }]
                if *k == key(mid) && *i == key(mid)
        ),
        "{actions:?}"
    );
    assert!(p.server.pending(p.now).is_empty());
    p.server.installed(p.now, &key(mid)).expect("known");
    p.pump();
    assert_eq!(
        p.notifications().last().and_then(|s| s.status),
        Some(MitigationStatus::SuccessfullyMitigated)
    );
}

#[test]
fn consent_timeout_rejects_with_conflict_cause_4() {
    let mut p = consent_pair(Some(Duration::from_secs(60)), false);
    let (mid, ..) = p.create(basic_scope());
    let observe = p.client.observe(p.now, None).expect("observe");
    p.pump();
    p.response(observe);
    p.take_actions();
    p.advance(Duration::from_secs(61));
    assert_eq!(
        p.take_actions(),
        [Action::ConsentTimedOut {
            key: key(mid),
            approved: false
        }]
    );
    let notes = p.notifications();
    let last = notes.last().expect("notified");
    assert_eq!(last.status, Some(MitigationStatus::Withdrawn));
    assert_eq!(
        last.conflict_information
            .as_ref()
            .and_then(|c| c.conflict_cause),
        Some(ConflictCause::RejectedLegitimateTraffic)
    );
    assert!(p.server.mitigations().is_empty());
}

#[test]
fn consent_timeout_restarts_with_an_updated_request() {
    let mut p = consent_pair(Some(Duration::from_secs(60)), false);
    let (mid, ..) = p.create(basic_scope());
    p.advance(Duration::from_secs(50));
    let t = p
        .client
        .update_mitigation(p.now, mid, scope("203.0.113.0/24", "192.0.2.11/32", 3600))
        .expect("put");
    p.pump();
    assert_eq!(p.response(t).0, ResponseType::Changed);
    p.advance(Duration::from_secs(50));
    assert_eq!(p.server.pending(p.now).len(), 1, "a new request waits anew");
    p.advance(Duration::from_secs(10));
    assert!(p.server.pending(p.now).is_empty());
}

#[test]
fn zero_consent_timeout_is_a_config_error() {
    let config = ServerConfig {
        consent_timeout: Some(Duration::ZERO),
        ..server_config()
    };
    assert!(SignalServer::new(Instant::now(), dgram(1), config).is_err());
}

// ---- persistence ----

/// A snapshot of a server with mid 1 active (600 s, counters,
/// attack-status) and mid 2 installing (100 s), taken 40 s later; and when.
fn persisted() -> (Vec<MitigationRecord>, Instant) {
    let config = ServerConfig {
        consent: ConsentMode::Auto,
        ..server_config()
    };
    let mut p = Pair::new(dgram, config);
    let rich = Scope {
        target_port_range: vec![crate::model::PortRange {
            lower: 80,
            upper: Some(443),
        }],
        target_protocol: vec![6, 17],
        alias_name: vec!["web".into()],
        ..scope("203.0.113.0/24", "192.0.2.0/28", 600)
    };
    p.create(rich);
    p.server.installed(p.now, &key(1)).expect("known");
    let c = Counters {
        pkts: 7,
        bytes: 700,
        pps: 1,
        bps: 80,
    };
    p.server.counters(p.now, &key(1), c).expect("known");
    let update = Scope {
        attack_status: Some(AttackStatus::UnderAttack),
        ..basic_scope()
    };
    let t = p.client.efficacy_update(p.now, 1, update).expect("put");
    p.pump();
    p.response(t);
    p.create(scope("198.51.100.0/24", "192.0.2.20/32", 100));
    p.advance(Duration::from_secs(40));
    let records = p.server.snapshot(p.now);
    (records, p.now)
}

#[test]
fn snapshot_restore_round_trip() {
    let (records, taken) = persisted();
    assert_eq!(records.len(), 2);
    // Pending consent needs another server; build its record by hand from one.
    let mut consent = Pair::new(
        dgram,
        ServerConfig {
            consent: ConsentMode::Require,
            consent_timeout: Some(Duration::from_secs(120)),
            ..server_config()
        },
    );
    consent.create(scope("198.51.100.0/24", "192.0.2.30/32", 300));
    consent.advance(Duration::from_secs(40));
    let mut pending = consent.server.snapshot(consent.now);
    assert_eq!(pending.len(), 1);
    pending[0].mid = 3;
    assert_eq!(pending[0].phase, Phase::AwaitingConsent);
    assert_eq!(pending[0].phase_age, 40);

    let all: Vec<MitigationRecord> = records.into_iter().chain(pending).collect();
    let json = serde_json::to_string_pretty(&all).expect("json");
    assert!(json.contains("\"phase\": \"active\""), "{json}");
    assert!(
        json.contains("ietf-dots-signal-channel:mitigation-scope"),
        "{json}"
    );
    let back: Vec<MitigationRecord> = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, all);

    // A fresh server after a restart (no downtime applied here).
    let later = taken + Duration::from_secs(1);
    let mut server = SignalServer::new(
        later,
        dgram(5),
        ServerConfig {
            consent: ConsentMode::Require,
            consent_timeout: Some(Duration::from_secs(120)),
            ..server_config()
        },
    )
    .expect("server");
    let keys = server.restore(later, back).expect("restore");
    assert_eq!(keys, [key(1), key(2), key(3)]);
    let actions: Vec<Action> = std::iter::from_fn(|| server.poll_action()).collect();
    let installs: Vec<_> = install_action(&actions);
    assert_eq!(
        installs,
        [key(1), key(2)],
        "enforced ones are installed again"
    );
    assert!(matches!(&actions[2], Action::AskConsent { key: k, .. } if *k == key(3)));

    let m1 = server.mitigations().get(&key(1)).expect("restored");
    assert_eq!(
        m1.phase,
        Phase::Installing,
        "status 2 again from the data plane"
    );
    assert_eq!(m1.remaining(later), 560);
    assert_eq!(m1.counters.map(|c| c.pkts), Some(7));
    assert_eq!(m1.attack_status, Some(AttackStatus::UnderAttack));
    assert_eq!(m1.request.scope.target_protocol, vec![6, 17]);
    assert_eq!(m1.request.scope.alias_name, vec!["web".to_string()]);
    assert_eq!(
        server
            .mitigations()
            .get(&key(2))
            .expect("restored")
            .remaining(later),
        60
    );
    // The restored request is the one enforced before, lifetime aside.
    if let (Action::Install { request: a, .. }, Some(m)) =
        (&actions[0], server.mitigations().get(&key(1)))
    {
        assert_eq!(a, &m.request);
    }
    server.installed(later, &key(1)).expect("known");
    assert_eq!(
        server.mitigations().get(&key(1)).map(|m| m.phase),
        Some(Phase::Active)
    );

    // The pending one kept its age: 40 s waited, 80 s to go.
    let pending = server.pending(later);
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, key(3));
    assert_eq!(pending[0].age.as_secs(), 40);
    assert_eq!(pending[0].decided_in.map(|d| d.as_secs()), Some(80));

    // Restoring twice changes nothing: present keys win.
    let again = server.snapshot(later);
    assert!(server.restore(later, again).expect("restore").is_empty());
}

#[test]
fn restore_drops_expired_and_invalid_records() {
    let (records, taken) = persisted();
    let mut server = SignalServer::new(taken, dgram(5), server_config()).expect("server");
    // Down for 100 s: mid 2 (60 s left at snapshot) is over.
    let mut aged = records.clone();
    aged.iter_mut()
        .for_each(|r| r.elapse(Duration::from_secs(100)));
    assert!(aged[1].expired() && !aged[0].expired());
    let restart = taken + Duration::from_secs(100);
    let keys = server.restore(restart, aged).expect("restore");
    assert_eq!(keys, [key(1)]);
    assert_eq!(
        server
            .mitigations()
            .get(&key(1))
            .map(|m| m.remaining(restart)),
        Some(460)
    );

    // Today's domain no longer holds mid 1's sources: refused, reported.
    let narrow = ServerConfig {
        domain: vec![
            "198.51.100.0/24".parse().expect("prefix"),
            "192.0.2.16/28".parse().expect("prefix"),
        ],
        ..server_config()
    };
    let mut server = SignalServer::new(taken, dgram(6), narrow).expect("server");
    let keys = server.restore(taken, records.clone()).expect("restore");
    assert_eq!(keys, [key(2)]);
    let rejected: Vec<_> = std::iter::from_fn(|| server.poll_action())
        .filter(|a| matches!(a, Action::Rejected { mid: Some(1), diagnostic, .. } if diagnostic.contains("outside")))
        .collect();
    assert_eq!(rejected.len(), 1);

    // Monitor mode never installs restored entries.
    let monitor = ServerConfig {
        mode: EnforcementMode::Monitor,
        ..server_config()
    };
    let mut server = SignalServer::new(taken, dgram(7), monitor).expect("server");
    server.restore(taken, records.clone()).expect("restore");
    assert!(std::iter::from_fn(|| server.poll_action()).next().is_none());
    assert!(server
        .mitigations()
        .iter()
        .all(|(_, m)| m.phase == Phase::Monitoring));

    // An unreadable record fails the whole restore, nothing changes.
    let mut broken = records;
    broken[1].request = serde_json::json!({"nonsense": true});
    let mut server = SignalServer::new(taken, dgram(8), server_config()).expect("server");
    assert!(matches!(
        server.restore(taken, broken),
        Err(SignalError::Restore { mid: 2, .. })
    ));
    assert!(server.mitigations().is_empty());
}

#[test]
fn revision_tracks_changes() {
    let mut p = Pair::new(dgram, server_config());
    let r0 = p.server.mitigations().revision();
    let (mid, ..) = p.create(basic_scope());
    let r1 = p.server.mitigations().revision();
    assert!(r1 > r0);
    let get = p.client.get(p.now, Some(mid)).expect("get");
    p.pump();
    p.response(get);
    assert_eq!(
        p.server.mitigations().revision(),
        r1,
        "reads change nothing"
    );
}
