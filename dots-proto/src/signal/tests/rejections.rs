//! Refused requests: the error answer, untouched state, and the
//! [`Action::Rejected`] for the shell's log.

use coap_lite::{RequestType, ResponseType};

use super::harness::{basic_scope, dgram, raw_exchange, scope, server_config, Pair, CUID};
use crate::coap::{msg, DotsResource};
use crate::model::{ConfigSet, MinMaxCurrent, Scope, SignalConfig};
use crate::signal::{Action, Body, ServerConfig};

#[test]
fn rejected_requests_leave_earlier_mitigations_in_force() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            max_mitigations_per_cuid: 1,
            ..server_config()
        },
    );
    p.enforce(basic_scope());
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
    let path = DotsResource::Mitigate {
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
    let no_mid = DotsResource::Mitigate {
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
    let mut wrong_format = DotsResource::Mitigate {
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

    // Not about a mitigation: no ids. GET of an unknown mid: 4.04 is
    // reported too. (DELETE of an unknown mid is 2.02: withdrawn already.)
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
    p.pump();
    assert_eq!(p.response(del), (ResponseType::Deleted, Body::Empty));
    let get = p.client.get(p.now, Some(42)).expect("get");
    assert_eq!(p.rejected(get).0, ResponseType::NotFound);
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

#[test]
fn a_new_domain_applies_to_the_next_requests_only() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(basic_scope());
    p.take_actions();
    // 203.0.113.0/24 is outside: refused.
    let outside = scope("198.51.100.1/32", "203.0.113.7/32", 60);
    let (_, token) = p
        .client
        .request_mitigation(p.now, outside.clone())
        .expect("send");
    assert_eq!(p.rejected(token).0, ResponseType::BadRequest);
    // The router got that address: the same request is accepted.
    let mut wider = p.server.config().clone();
    wider.domain.push("203.0.113.7/32".parse().expect("prefix"));
    p.server.set_config(p.now, wider).expect("valid");
    let (_, code, _) = p.create(outside);
    assert_eq!(code, ResponseType::Created);
    // The domain shrinks: the earlier mitigations stay, new ones are refused.
    let mut narrow = p.server.config().clone();
    narrow.domain.clear();
    p.server.set_config(p.now, narrow).expect("valid");
    assert!(p.server.mitigations().iter().any(|(k, _)| k.mid == mid));
    let (_, token) = p
        .client
        .request_mitigation(p.now, scope("198.51.100.2/32", "192.0.2.9/32", 60))
        .expect("send");
    assert_eq!(p.rejected(token).0, ResponseType::BadRequest);
    // Invalid settings change nothing.
    let bad = ServerConfig {
        notify_period: std::time::Duration::ZERO,
        ..p.server.config().clone()
    };
    assert!(p.server.set_config(p.now, bad).is_err());
    assert!(p.server.config().domain.is_empty());
}
