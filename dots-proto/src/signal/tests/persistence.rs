//! Snapshot and restore of the mitigations, and the revision that tells
//! when a snapshot is worth writing.

use coap_lite::ResponseType;

use std::time::{Duration, Instant};

use super::harness::{
    basic_scope, consent_config, dgram, install_action, key, scope, server_config, Pair,
};
use crate::model::{AttackStatus, PortRange, Scope};
use crate::signal::{
    Action, ConsentMode, Counters, EnforcementMode, MitigationRecord, Phase, ServerConfig,
    SignalError, SignalServer,
};

/// A snapshot of a server with mid 1 active (600 s, counters,
/// attack-status) and mid 2 installing (100 s), taken 40 s later; and when.
fn persisted() -> (Vec<MitigationRecord>, Instant) {
    let config = ServerConfig {
        consent: ConsentMode::Auto,
        ..server_config()
    };
    let mut p = Pair::new(dgram, config);
    p.server.set_wall_clock(p.now, 1_700_000_000);
    let rich = Scope {
        target_port_range: vec![PortRange {
            lower: 80,
            upper: Some(443),
        }],
        target_protocol: vec![6, 17],
        target_fqdn: vec!["www.example".into()],
        ..scope("203.0.113.0/24", "192.0.2.0/28", 600)
    };
    p.enforce(rich.clone());
    let c = Counters {
        pkts: 7,
        bytes: 700,
        pps: 1,
        bps: 80,
    };
    p.server.counters(p.now, &key(1), c).expect("known");
    let update = Scope {
        attack_status: Some(AttackStatus::UnderAttack),
        ..rich
    };
    let t = p.client.efficacy_update(p.now, 1, update).expect("put");
    p.pump();
    assert_eq!(p.response(t).0, ResponseType::Changed);
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
    let mut consent = Pair::new(dgram, consent_config(Some(Duration::from_secs(120)), false));
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
        consent_config(Some(Duration::from_secs(120)), false),
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
    assert_eq!(
        m1.request.scope.target_fqdn,
        vec!["www.example".to_string()]
    );
    // mitigation-start survives: the time the data plane first confirmed it.
    assert_eq!(m1.started, Some(1_700_000_000));
    assert_eq!(m1.to_scope(later).mitigation_start, Some(1_700_000_000));
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
