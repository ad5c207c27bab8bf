//! DELETE and its final counters.

use std::time::Duration;

use coap_lite::ResponseType;

use super::harness::{basic_scope, consent_config, dgram, key, server_config, Pair};
use crate::signal::{Action, ClientEvent, Counters, ServerConfig};

#[test]
fn delete_falls_back_to_last_counters_when_the_shell_is_silent() {
    let mut p = Pair::new(dgram, server_config());
    let mid = p.enforce(basic_scope());
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
    assert!(!p.answered(del));
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
    let mid = p.enforce(basic_scope());
    let del = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    assert_eq!(p.response_scope(del).0, ResponseType::Deleted);

    // Pending consent: nothing on the data plane, nothing to wait for.
    let mut p = Pair::new(dgram, consent_config(None, false));
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
    let mid = p.enforce(basic_scope());
    let _ = p.client.withdraw(p.now, mid).expect("withdraw");
    p.pump();
    p.reconnect();
    assert!(!p.server.removed(p.now, &key(mid), Counters::default()));
    p.advance(Duration::from_secs(2));
    assert!(p.server.mitigations().is_empty());
}
