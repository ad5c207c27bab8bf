//! Redirect (RFC 9066 §5.2.2).

use coap_lite::ResponseType;

use super::harness::{
    basic_scope, consent_config, dgram, install_action, key, server_config, stream, Pair,
};
use crate::coap::Endpoint;
use crate::model::RedirectedSignal;
use crate::signal::{Action, ServerConfig};

fn consent_and_redirect<E: Endpoint>(make: fn(u64) -> E) {
    let mut p = Pair::new(make, consent_config(None, false));
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

#[test]
fn consent_and_redirect_datagram() {
    consent_and_redirect(dgram);
}

#[test]
fn consent_and_redirect_stream() {
    consent_and_redirect(stream);
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
