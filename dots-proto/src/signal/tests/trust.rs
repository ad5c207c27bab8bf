//! The trust boundary: conditional requests, Accept, Uri-Path order,
//! exempt traffic, the local policy's bounds, the per-peer and agent-wide
//! limits, redirect syntax, the heartbeat cap, the CSM timer and why a
//! session ended. Every refusal leaves the mitigations as they were.

use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use super::harness::{
    basic_scope, dgram, install_action, key, scope, server_config, stream, Pair, CUID,
};
use crate::coap::{framing, msg, DatagramEndpoint, Delivery, DotsResource, Endpoint, Event};
use crate::model::{
    ConfigSet, ConflictCause, ConflictStatus, DotsMessage, MinMaxCurrent, MitigationScope,
    MitigationStatus, OverLimit, Policy, RedirectedSignal, Scope, SignalConfig,
};
use crate::signal::{
    Action, ExemptSet, MitigationBudget, ParamRange, ServerConfig, SessionEnd, SessionPolicy,
    SignalServer,
};

/// A bare CoAP peer for requests the client role would not build.
struct RawPeer {
    ep: DatagramEndpoint,
}

impl RawPeer {
    fn new(seed: u64) -> Self {
        Self { ep: dgram(seed) }
    }

    fn exchange(
        &mut self,
        server: &mut SignalServer<DatagramEndpoint>,
        now: Instant,
        request: Packet,
    ) -> Packet {
        let token = self
            .ep
            .send_request(now, request, Delivery::Confirmable)
            .expect("send");
        while let Some(bytes) = self.ep.poll_transmit() {
            server.handle_input(now, &bytes).expect("CoAP");
        }
        let mut events = Vec::new();
        while let Some(bytes) = server.poll_transmit() {
            events.extend(self.ep.handle_input(now, &bytes).expect("CoAP"));
        }
        while self.ep.poll_transmit().is_some() {}
        match events.as_slice() {
            [Event::Response { token: t, response }] if *t == token => response.clone(),
            other => panic!("expected one response, got {other:?}"),
        }
    }

    /// PUT of `scope` on cuid/mid, as a client would send it.
    fn put(
        &mut self,
        server: &mut SignalServer<DatagramEndpoint>,
        now: Instant,
        cuid: &str,
        mid: u32,
        scope: Scope,
    ) -> Packet {
        self.exchange(server, now, put_request(cuid, mid, &scope))
    }
}

fn put_request(cuid: &str, mid: u32, scope: &Scope) -> Packet {
    let mut p = DotsResource::Mitigate {
        cdid: None,
        cuid: cuid.into(),
        mid: Some(mid),
    }
    .request(RequestType::Put);
    p.payload = MitigationScope {
        scopes: vec![scope.clone()],
    }
    .encode();
    msg::set_content_format(&mut p, msg::CONTENT_FORMAT_DOTS_CBOR);
    p
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(c) => c,
        other => panic!("not a response: {other:?}"),
    }
}

fn diagnostic(p: &Packet) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// The single scope of a CBOR answer.
fn answer_scope(p: &Packet) -> Scope {
    assert_eq!(msg::content_format(p), Some(271), "{p:?}");
    let mut m = MitigationScope::decode(&p.payload).expect("CBOR body");
    assert_eq!(m.scopes.len(), 1);
    m.scopes.remove(0)
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("prefix")
}

#[test]
fn conditional_requests_get_4_12_and_change_nothing() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(basic_scope());
    p.take_actions();
    let before = p.server.mitigations().clone();
    let mut raw = RawPeer::new(40);
    let other = scope("198.51.100.0/24", "192.0.2.99/32", 60);

    // If-None-Match on an existing mid: the mitigation is not overwritten.
    let mut none_match = put_request(CUID, mid, &other);
    none_match.add_option(CoapOption::IfNoneMatch, vec![]);
    let a = raw.exchange(&mut p.server, p.now, none_match);
    assert_eq!(code(&a), ResponseType::PreconditionFailed);
    assert_eq!(diagnostic(&a), "If-None-Match: the resource exists");
    // If-Match with an ETag: none was issued, so none matches.
    let mut etag = put_request(CUID, mid, &other);
    etag.add_option(CoapOption::IfMatch, vec![0x12, 0x34]);
    let a = raw.exchange(&mut p.server, p.now, etag);
    assert_eq!(code(&a), ResponseType::PreconditionFailed);
    // On DELETE and GET too.
    let mut del = DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(mid),
    }
    .request(RequestType::Delete);
    del.add_option(CoapOption::IfMatch, vec![9]);
    assert_eq!(
        code(&raw.exchange(&mut p.server, p.now, del)),
        ResponseType::PreconditionFailed
    );
    assert_eq!(p.server.mitigations(), &before);
    p.pump();
    assert!(p.take_actions().is_empty());
    assert_eq!(
        std::mem::take(&mut p.rejections).len(),
        3,
        "each one logged"
    );

    // If-None-Match on a new mid creates it.
    let mut create = put_request(CUID, mid + 1, &other);
    create.add_option(CoapOption::IfNoneMatch, vec![]);
    assert_eq!(
        code(&raw.exchange(&mut p.server, p.now, create)),
        ResponseType::Created
    );
}

#[test]
fn accept_other_than_dots_cbor_is_4_06() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(basic_scope());
    let mut raw = RawPeer::new(41);
    let mut get = DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(mid),
    }
    .request(RequestType::Get);
    get.add_option(CoapOption::Accept, vec![50]); // application/json
    let a = raw.exchange(&mut p.server, p.now, get.clone());
    assert_eq!(code(&a), ResponseType::NotAcceptable);
    assert_eq!(
        diagnostic(&a),
        "Accept 50: only 271 (application/dots+cbor) is served"
    );
    get.clear_option(CoapOption::Accept);
    get.add_option(CoapOption::Accept, vec![0x01, 0x0f]); // 271
    assert_eq!(
        code(&raw.exchange(&mut p.server, p.now, get)),
        ResponseType::Content
    );
}

#[test]
fn uri_path_out_of_order_is_4_00() {
    let mut p = Pair::new(dgram, server_config());
    let mut raw = RawPeer::new(42);
    let mut put = put_request(CUID, 1, &basic_scope());
    put.clear_option(CoapOption::UriPath);
    for seg in [
        ".well-known",
        "dots",
        "mitigate",
        "mid=1",
        &format!("cuid={CUID}"),
    ] {
        put.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    let a = raw.exchange(&mut p.server, p.now, put);
    assert_eq!(code(&a), ResponseType::BadRequest);
    assert!(
        diagnostic(&a).contains("out of order"),
        "{}",
        diagnostic(&a)
    );
    assert!(p.server.mitigations().is_empty());
}

#[test]
fn scope_entirely_exempt_is_4_09_with_conflict_cause_4() {
    let exempt = ExemptSet::new(&[net("192.0.2.0/28")]);
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            exempt: exempt.clone(),
            ..server_config()
        },
    );
    let mut raw = RawPeer::new(43);
    // A source under never-block.
    let a = raw.put(
        &mut p.server,
        p.now,
        CUID,
        1,
        scope("203.0.113.0/24", "192.0.2.1/32", 60),
    );
    assert_eq!(code(&a), ResponseType::Conflict);
    let s = answer_scope(&a);
    let conflict = s.conflict_information.expect("conflict-information");
    assert_eq!(
        conflict.conflict_cause,
        Some(ConflictCause::RejectedLegitimateTraffic)
    );
    assert_eq!(
        conflict.conflict_scope.map(|c| c.source_prefix),
        Some(vec![net("192.0.2.1/32")])
    );
    // A target that is a peer's own address, learnt at run time.
    exempt.add_addrs(&["198.51.100.53".parse().expect("addr")]);
    let a = raw.put(
        &mut p.server,
        p.now,
        CUID,
        2,
        scope("198.51.100.53/32", "192.0.2.99/32", 60),
    );
    assert_eq!(code(&a), ResponseType::Conflict);
    assert!(p.server.mitigations().is_empty());
    p.pump();
    assert!(p.take_actions().is_empty(), "nothing installed");
    assert_eq!(p.rejections.len(), 2);
}

#[test]
fn partly_exempt_scope_is_enforced_and_reported() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            exempt: ExemptSet::new(&[net("192.0.2.0/28")]),
            ..server_config()
        },
    );
    let (mid, code, s) = p.create(scope("203.0.113.0/24", "192.0.2.0/24", 60));
    assert_eq!(code, ResponseType::Created);
    let conflict = s.conflict_information.expect("reported in the answer");
    assert_eq!(conflict.conflict_status, Some(ConflictStatus::Active));
    assert_eq!(
        conflict.conflict_cause,
        Some(ConflictCause::RejectedLegitimateTraffic)
    );
    assert_eq!(
        conflict.conflict_scope.expect("scope").source_prefix,
        [net("192.0.2.0/28")]
    );
    let actions = p.take_actions();
    assert_eq!(install_action(&actions), [key(mid)], "the rest is enforced");
    assert!(actions.iter().any(
        |a| matches!(a, Action::PartlyExempt { key: k, exempt } if *k == key(mid) && exempt.sources == [net("192.0.2.0/28")])
    ));
    // Status 2 comes with the same report.
    p.observe(Some(mid));
    p.server.installed(p.now, &key(mid)).expect("known");
    p.pump();
    let notes = p.notifications();
    let last = notes.last().expect("notified");
    assert_eq!(last.status, Some(MitigationStatus::SuccessfullyMitigated));
    assert!(last.conflict_information.is_some());
}

#[test]
fn policy_bound_is_4_22_naming_the_key() {
    let mut p = Pair::new(dgram, server_config());
    p.enforce(basic_scope());
    p.take_actions();
    let before = p.server.mitigations().clone();
    let cases = [
        (
            scope("203.0.113.0/24", "2001:db8:123::/48", 60),
            "(local policy max-sources-v6)",
        ),
        (
            scope("198.51.0.0/15", "192.0.2.20/32", 60),
            "(local policy max-targets-v4)",
        ),
    ];
    for (s, key_text) in cases {
        let s = Scope {
            target_prefix: if s.source_prefix[0].addr().is_ipv6() {
                vec![net("2001:db8:c000::/64")]
            } else {
                s.target_prefix
            },
            ..s
        };
        let (_, token) = p.client.request_mitigation(p.now, s).expect("send");
        let (code, diag) = p.rejected(token);
        assert_eq!(code, ResponseType::UnprocessableEntity, "{diag}");
        assert!(diag.ends_with(key_text), "{diag}");
        assert_eq!(p.server.mitigations(), &before);
        assert!(p.take_actions().is_empty());
    }
}

#[test]
fn policy_bound_with_consent_waits_for_the_operator() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            policy: Policy {
                max_sources_v4: 16,
                over_limit: OverLimit::Consent,
                ..Policy::default()
            },
            ..server_config()
        },
    );
    let (mid, code, s) = p.create(scope("203.0.113.0/24", "192.0.2.0/27", 60));
    assert_eq!(
        (code, s.status),
        (ResponseType::Created, Some(MitigationStatus::InProgress))
    );
    let reason = "source-prefix covers 32 IPv4 addresses, more than the 16 this agent allows (local policy max-sources-v4)";
    assert_eq!(
        p.take_actions(),
        [Action::AskConsent {
            key: key(mid),
            request: p
                .server
                .mitigations()
                .get(&key(mid))
                .expect("held")
                .request
                .clone(),
            reason: Some(reason.into()),
        }]
    );
    assert_eq!(p.server.pending(p.now)[0].reason.as_deref(), Some(reason));
    // Within the bound: enforced at once (consent mode is auto).
    let (m2, ..) = p.create(scope("203.0.113.0/24", "192.0.2.64/28", 60));
    assert_eq!(install_action(&p.take_actions()), [key(m2)]);
    // The operator approves the wide one.
    p.server.consent(p.now, &key(mid), true).expect("known");
    assert_eq!(install_action(&p.take_or_poll()), [key(mid)]);
}

#[test]
fn lifetime_past_the_cap_is_shortened_or_a_bound() {
    // Default: shortened (RFC 9132 lets the server grant less).
    let mut p = Pair::new(dgram, server_config());
    let (_, code, s) = p.create(scope("203.0.113.0/24", "192.0.2.1/32", -1));
    assert_eq!((code, s.lifetime), (ResponseType::Created, Some(86_400)));
    // A bound: refused, naming it...
    let strict = Policy {
        shorten_lifetime: false,
        ..Policy::default()
    };
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            policy: strict,
            ..server_config()
        },
    );
    let (_, token) = p
        .client
        .request_mitigation(p.now, scope("203.0.113.0/24", "192.0.2.1/32", 90_000))
        .expect("send");
    let (code, diag) = p.rejected(token);
    assert_eq!(code, ResponseType::UnprocessableEntity);
    assert_eq!(
        diag,
        "a lifetime of 90000 s is asked, more than the 86400 s this agent grants (local policy max-lifetime)"
    );
    // ... or, with consent, granted in full once approved.
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            policy: Policy {
                over_limit: OverLimit::Consent,
                ..strict
            },
            ..server_config()
        },
    );
    let (mid, code, s) = p.create(scope("203.0.113.0/24", "192.0.2.1/32", 90_000));
    assert_eq!((code, s.lifetime), (ResponseType::Created, Some(90_000)));
    p.server.consent(p.now, &key(mid), true).expect("known");
    assert_eq!(install_action(&p.take_or_poll()), [key(mid)]);
}

#[test]
fn per_peer_limit_counts_every_cuid() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            max_mitigations_per_peer: 3,
            ..server_config()
        },
    );
    let mut raw = RawPeer::new(44);
    for i in 0..3u8 {
        let s = scope("203.0.113.0/24", &format!("192.0.2.{i}/32"), 60);
        let a = raw.put(&mut p.server, p.now, &format!("cuid-{i}"), 1, s);
        assert_eq!(code(&a), ResponseType::Created);
    }
    let before = p.server.mitigations().clone();
    let a = raw.put(
        &mut p.server,
        p.now,
        "cuid-new",
        1,
        scope("203.0.113.0/24", "192.0.2.9/32", 60),
    );
    assert_eq!(code(&a), ResponseType::UnprocessableEntity);
    assert_eq!(
        diagnostic(&a),
        "this peer already holds 3 mitigations, the limit is 3 (max-mitigations-per-peer)"
    );
    assert_eq!(p.server.mitigations(), &before);
    // Updating one it holds is fine.
    let a = raw.put(
        &mut p.server,
        p.now,
        "cuid-0",
        1,
        scope("203.0.113.0/24", "192.0.2.0/32", 90),
    );
    assert_eq!(code(&a), ResponseType::Changed);
}

#[test]
fn agent_wide_limit_refuses_the_request_needing_slot_257() {
    let budget = MitigationBudget::new(Some(256));
    let config = ServerConfig {
        budget: budget.clone(),
        max_mitigations_per_peer: 256,
        max_mitigations_per_cuid: 256,
        // DELETE answers at once (no data plane here to report counters).
        counters_wait: Duration::ZERO,
        ..server_config()
    };
    let t0 = Instant::now();
    let mut a = SignalServer::new(t0, dgram(1), config.clone()).expect("server a");
    let mut b = SignalServer::new(t0, dgram(2), config).expect("server b");
    let (mut peer_a, mut peer_b) = (RawPeer::new(45), RawPeer::new(46));
    let source = |i: u32| format!("2001:db8:123::{i:x}/128");
    let target = "2001:db8:c000::1/128";
    for i in 0..200u32 {
        let r = peer_a.put(&mut a, t0, CUID, i + 1, scope(target, &source(i), 600));
        assert_eq!(code(&r), ResponseType::Created, "{}", diagnostic(&r));
    }
    for i in 200..256u32 {
        let r = peer_b.put(&mut b, t0, CUID, i + 1, scope(target, &source(i), 600));
        assert_eq!(code(&r), ResponseType::Created, "{}", diagnostic(&r));
    }
    assert_eq!(budget.held(), 256);
    // The one that would need slot 257, from either peer.
    let before = b.mitigations().clone();
    let r = peer_b.put(&mut b, t0, CUID, 1000, scope(target, &source(999), 600));
    assert_eq!(code(&r), ResponseType::UnprocessableEntity);
    assert_eq!(
        diagnostic(&r),
        "the agent holds 256 mitigations for all its peers, the limit is 256 (max-mitigations; the data plane has one slot per mitigation)"
    );
    assert_eq!(b.mitigations(), &before);
    let r = peer_a.put(&mut a, t0, CUID, 1000, scope(target, &source(999), 600));
    assert_eq!(code(&r), ResponseType::UnprocessableEntity);
    // One withdrawn on A makes room for B.
    let del = DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(1),
    }
    .request(RequestType::Delete);
    assert_eq!(
        code(&peer_a.exchange(&mut a, t0, del)),
        ResponseType::Deleted
    );
    assert_eq!(budget.held(), 255);
    let r = peer_b.put(&mut b, t0, CUID, 1000, scope(target, &source(999), 600));
    assert_eq!(code(&r), ResponseType::Created);
    // A server that goes away returns its share.
    drop(a);
    assert_eq!(budget.held(), 57);
}

#[test]
fn redirect_syntax_is_checked_before_2_01() {
    let mut p = Pair::new(dgram, server_config());
    for (alt, records) in [
        ("192.0.2.1", vec![]),
        ("alt example", vec![]),
        ("alt.example", vec!["0.0.0.0".parse().expect("addr")]),
    ] {
        let target = RedirectedSignal {
            alt_ch_client: alt.into(),
            alt_ch_client_record: records,
            ttl: None,
        };
        let token = p.client.redirect(p.now, &target).expect("redirect");
        let (code, diag) = p.rejected(token);
        assert_eq!(code, ResponseType::BadRequest, "{diag}");
        assert!(p.take_actions().is_empty(), "no redirect, no close");
    }
}

#[test]
fn heartbeat_interval_cap_refuses_what_the_peer_may_not_impose() {
    let capped = SessionPolicy {
        heartbeat_interval: ParamRange {
            min: 15,
            max: 30,
            default: 30,
        },
        ..SessionPolicy::default()
    };
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            session: capped,
            ..server_config()
        },
    );
    let before = p.server.session().clone();
    let put = |hb| SignalConfig {
        sid: None,
        mitigating_config: Some(ConfigSet {
            heartbeat_interval: MinMaxCurrent::current(hb),
            ..ConfigSet::default()
        }),
        idle_config: None,
    };
    let t = p.client.put_config(p.now, 7, &put(240)).expect("put");
    let (code, diag) = p.rejected(t);
    assert_eq!(code, ResponseType::UnprocessableEntity);
    assert_eq!(diag, "heartbeat-interval 240 is outside 15..=30");
    assert_eq!(p.server.session(), &before);
    let t = p.client.put_config(p.now, 7, &put(20)).expect("put");
    p.pump();
    assert_eq!(p.response(t).0, ResponseType::Created);
}

#[test]
fn a_stream_peer_without_csm_is_aborted_after_the_csm_timer() {
    let t0 = Instant::now();
    let mut server = SignalServer::new(t0, stream(1), server_config()).expect("server");
    while server.poll_transmit().is_some() {}
    // The peer connected and never says anything.
    let deadline = server.poll_timeout().expect("a timer runs");
    assert_eq!(deadline, t0 + Duration::from_secs(10));
    server.handle_timeout(deadline - Duration::from_millis(1));
    assert!(server.poll_action().is_none());
    server.handle_timeout(deadline);
    let abort = server.poll_transmit().expect("an Abort is sent");
    let frame = framing::decode(&abort, 1152).expect("one frame");
    match framing::Signal::from_packet(&frame) {
        Ok(framing::Signal::Abort { diagnostic, .. }) => {
            assert_eq!(diagnostic, "no CSM from the peer within 10s")
        }
        other => panic!("not an Abort: {other:?}"),
    }
    let reason = SessionEnd::Aborted {
        diagnostic: "no CSM from the peer within 10s".into(),
    };
    assert_eq!(
        reason.to_string(),
        "aborted the connection, the peer broke the protocol: no CSM from the peer within 10s"
    );
    assert_eq!(server.poll_action(), Some(Action::SessionLost { reason }));
}

#[test]
fn session_end_names_the_peer_abort() {
    let mut p = Pair::new(stream, server_config());
    p.client.endpoint_mut().abort("maintenance").expect("open");
    p.pump();
    assert_eq!(
        p.take_actions(),
        [Action::SessionLost {
            reason: SessionEnd::PeerAborted {
                diagnostic: "maintenance".into()
            }
        }]
    );
}
