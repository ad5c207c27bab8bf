//! The observers of the current connection (RFC 7641): which token
//! watches which mitigations.

use std::collections::BTreeMap;
use std::time::Instant;

use coap_lite::ResponseType;

use super::answer::scopes_response;
use crate::coap::{CoapError, Delivery, Endpoint, Token};
use crate::model::Scope;
use crate::signal::action::MitigationKey;

/// What an observer watches: one mitigation or all of a cuid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ObserveTarget {
    pub(super) cuid: String,
    pub(super) mid: Option<u32>,
}

impl ObserveTarget {
    fn matches(&self, key: &MitigationKey) -> bool {
        self.cuid == key.cuid && self.mid.is_none_or(|m| m == key.mid)
    }
}

/// Observers by token; they belong to one connection.
#[derive(Debug, Default)]
pub(super) struct Observers {
    by_token: BTreeMap<Token, ObserveTarget>,
}

impl Observers {
    pub(super) fn insert(&mut self, token: Token, target: ObserveTarget) {
        self.by_token.insert(token, target);
    }

    pub(super) fn remove(&mut self, token: &Token) {
        self.by_token.remove(token);
    }

    pub(super) fn clear(&mut self) {
        self.by_token.clear();
    }

    /// Sends `scope` to every observer of `key`, in token order. An
    /// observer the endpoint no longer knows is forgotten.
    pub(super) fn notify<E: Endpoint>(
        &mut self,
        ep: &mut E,
        now: Instant,
        key: &MitigationKey,
        scope: &Scope,
        delivery: Delivery,
    ) {
        let watchers: Vec<Token> = self
            .by_token
            .iter()
            .filter(|(_, t)| t.matches(key))
            .map(|(token, _)| *token)
            .collect();
        for token in watchers {
            let packet = scopes_response(ResponseType::Content, vec![scope.clone()]);
            if ep.notify(now, &token, packet, delivery) == Err(CoapError::UnknownObserver) {
                self.by_token.remove(&token);
            }
        }
    }
}
