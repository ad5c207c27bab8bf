//! Consent (RFC 9066 §5.3.1): the operator's answer, the pending list and
//! the consent timeout.

use std::time::{Duration, Instant};

use coap_lite::ResponseType;

use super::harness::{basic_scope, consent_config, dgram, key, scope, server_config, Pair};
use crate::model::{ConflictCause, MitigationStatus};
use crate::signal::{Action, ServerConfig, SignalServer};

#[test]
fn consent_rejected_ends_with_conflict_cause_4() {
    let mut p = Pair::new(dgram, consent_config(None, false));
    let (mid, code, s) = p.create(basic_scope());
    assert_eq!(
        (code, s.status),
        (ResponseType::Created, Some(MitigationStatus::InProgress))
    );
    p.observe(None);
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
    let mut p = Pair::new(dgram, consent_config(None, false));
    let (mid, ..) = p.create(basic_scope());
    p.observe(Some(mid));
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
fn pending_lists_requests_awaiting_consent() {
    let mut p = Pair::new(dgram, consent_config(Some(Duration::from_secs(300)), false));
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
    let mut p = Pair::new(dgram, consent_config(Some(Duration::from_secs(60)), true));
    let (mid, ..) = p.create(basic_scope());
    p.observe(Some(mid));
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
    let mut p = Pair::new(dgram, consent_config(Some(Duration::from_secs(60)), false));
    let (mid, ..) = p.create(basic_scope());
    p.observe(None);
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
    let mut p = Pair::new(dgram, consent_config(Some(Duration::from_secs(60)), false));
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
