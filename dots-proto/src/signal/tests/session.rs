//! The session itself: its configuration, heartbeats and liveness
//! (RFC 9066 §5.2.1), retransmission and deduplication.

use std::time::Duration;

use coap_lite::ResponseType;

use super::harness::{basic_scope, dgram, install_action, key, scope, server_config, stream, Pair};
use crate::coap::Endpoint;
use crate::model::{ConfigSet, MinMaxCurrent, SignalConfig};
use crate::signal::{Action, Body, ClientEvent, SessionEnd};

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
    assert!(!p.take_actions().iter().any(is_lost));

    // Nothing at all: lost once the whole span passed, reported once.
    let (mid, ..) = p.create(basic_scope());
    p.take_actions();
    p.loss.all = true;
    let silent_from = p.elapsed();
    p.advance(Duration::from_secs(449));
    assert!(!p.take_actions().iter().any(is_lost));
    p.advance(Duration::from_secs(1000));
    let lost: Vec<_> = p.take_actions().into_iter().filter(is_lost).collect();
    assert_eq!(
        lost,
        [Action::SessionLost {
            reason: SessionEnd::Silence {
                after: Duration::from_secs(450)
            }
        }]
    );
    assert_eq!(
        SessionEnd::Silence {
            after: Duration::from_secs(450)
        }
        .to_string(),
        "no traffic from the peer for 450 s"
    );
    assert!(p.elapsed() - silent_from >= Duration::from_secs(450));

    // A new connection carries on; mitigations survive it.
    p.reconnect();
    let get = p.client.get(p.now, Some(mid)).expect("get");
    p.pump();
    assert_eq!(p.response(get).0, ResponseType::Content);
    p.advance(Duration::from_secs(1000));
    assert!(!p.take_actions().iter().any(is_lost));
    assert!(p.server.mitigations().get(&key(mid)).is_some());
}

fn is_lost(a: &Action) -> bool {
    matches!(a, Action::SessionLost { .. })
}

#[test]
fn heartbeat_loss_and_recovery_datagram() {
    heartbeat_loss_and_recovery(dgram);
}

#[test]
fn heartbeat_loss_and_recovery_stream() {
    heartbeat_loss_and_recovery(stream);
}

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
