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

struct Pair<E> {
    t0: Instant,
    now: Instant,
    server: SignalServer<E>,
    client: SignalClient<E>,
    actions: Vec<Action>,
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
            self.actions
                .extend(std::iter::from_fn(|| self.server.poll_action()));
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

    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    let (code, last) = p.response_scope(del);
    assert_eq!(code, ResponseType::Deleted);
    assert_eq!(
        (last.mid, last.pkts_dropped, last.bps_dropped),
        (Some(1), Some(10), Some(300))
    );
    assert_eq!(p.take_actions(), [Action::Remove { key: key(1) }]);
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
