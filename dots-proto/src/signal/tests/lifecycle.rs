//! A mitigation from request to end: creation, status 2 from the data
//! plane, counters and periodic notifications, refresh, supersession,
//! expiry, install failure, monitor mode.

use std::time::Duration;

use coap_lite::ResponseType;

use super::harness::{basic_scope, dgram, install_action, key, scope, server_config, stream, Pair};
use crate::coap::Endpoint;
use crate::model::{
    AttackStatus, ConflictCause, ConflictInformation, ConflictScope, ConflictStatus,
    MitigationStatus, Scope,
};
use crate::signal::{Action, Counters, EnforcementMode, ServerConfig};

fn basic_conversation<E: Endpoint>(make: fn(u64) -> E) {
    let mut p = Pair::new(make, server_config());
    let (mid, code, s) = p.create(basic_scope());
    assert_eq!((mid, code), (1, ResponseType::Created));
    assert_eq!(s.status, Some(MitigationStatus::InProgress));
    assert_eq!(s.mid, Some(1));
    assert_eq!(install_action(&p.take_actions()), [key(1)]);

    assert_eq!(p.observe(None), ResponseType::Content);

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
        !p.answered(del),
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
    // RFC 7252 §5.10.8.1: If-Match (empty) on a resource that does not
    // exist is 4.12.
    let token = p.client.efficacy_update(p.now, 99, update).expect("put");
    assert_eq!(p.rejected(token).0, ResponseType::PreconditionFailed);
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
    // An efficacy update that changes the scope is refused (4.00), not
    // answered 2.04 for a change that is not made (RFC 9132 §4.4.3).
    let before = p.server.mitigations().clone();
    let wider = Scope {
        attack_status: Some(AttackStatus::SuccessfullyMitigated),
        ..scope("203.0.113.0/24", "192.0.2.0/28", 3600)
    };
    let token = p.client.efficacy_update(p.now, mid, wider).expect("put");
    let (code, diag) = p.rejected(token);
    assert_eq!(code, ResponseType::BadRequest);
    assert!(diag.contains("unchanged"), "{diag}");
    assert_eq!(p.server.mitigations(), &before);
    // The same parameters in another order and form are the same request.
    let same = Scope {
        target_prefix: vec!["203.0.113.77/24".parse().expect("prefix")],
        lifetime: Some(10),
        attack_status: Some(AttackStatus::SuccessfullyMitigated),
        ..basic_scope()
    };
    let token = p.client.efficacy_update(p.now, mid, same).expect("put");
    p.pump();
    assert_eq!(p.response(token).0, ResponseType::Changed);
}

#[test]
fn refresh_keeps_install_and_update_reinstalls() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(scope("203.0.113.0/24", "192.0.2.10/32", 60));
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
    // The answer carries conflict-information in CBOR (RFC 9132 §4.4.1).
    let before = p.server.mitigations().clone();
    let put = p
        .client
        .update_mitigation(p.now, m1, scope("203.0.113.7/32", "192.0.2.1/32", 600))
        .expect("put");
    p.pump();
    let (code, answer) = p.response_scope(put);
    assert_eq!(code, ResponseType::Conflict);
    assert_eq!(answer.mid, Some(m1));
    assert_eq!(
        answer.conflict_information,
        Some(ConflictInformation {
            conflict_status: Some(ConflictStatus::InactiveOtherActive),
            conflict_cause: Some(ConflictCause::OverlappingTargets),
            retry_timer: None,
            conflict_scope: Some(ConflictScope {
                target_prefix: vec!["203.0.113.7/32".parse().expect("prefix")],
                mid: Some(m2),
                ..ConflictScope::default()
            }),
        })
    );
    assert_eq!(p.server.mitigations(), &before);
    assert!(p.take_actions().is_empty());
    assert_eq!(std::mem::take(&mut p.rejections).len(), 1, "logged");
    assert!(m3 > m2);
}

#[test]
fn lifetime_expiry_removes_and_notifies() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(scope("203.0.113.0/24", "192.0.2.10/32", 100));
    p.observe(Some(mid));
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
fn install_failure_terminates_with_status_6() {
    let mut p = Pair::new(dgram, server_config());
    let (mid, ..) = p.create(basic_scope());
    p.observe(None);
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

#[test]
fn one_second_notify_period_sends_fresh_counters_every_second() {
    let mut p = Pair::new(
        dgram,
        ServerConfig {
            notify_period: Duration::from_secs(1),
            ..server_config()
        },
    );
    let mid = p.enforce(scope("203.0.113.0/24", "192.0.2.10/32", 3600));
    p.observe(Some(mid));
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
