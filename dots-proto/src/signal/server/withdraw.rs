//! Withdrawal (DELETE) answers that wait for the data plane's final
//! counters: the shell reports them through
//! [`super::SignalServer::removed`], or `counters_wait` runs out and the
//! last counters known are sent instead.

use std::time::Instant;

use coap_lite::{Packet, ResponseType};

use super::answer::scopes_response;
use crate::coap::RequestId;
use crate::model::Scope;
use crate::signal::action::{Counters, MitigationKey};
use crate::signal::mitigation::with_counters;

/// A DELETE answer waiting for the final counters.
#[derive(Debug, Clone)]
pub(super) struct PendingDelete {
    pub(super) id: RequestId,
    pub(super) key: MitigationKey,
    /// Used when the shell does not report final counters in time.
    pub(super) last: Option<Counters>,
    deadline: Instant,
}

/// The waiting answers of the current connection, oldest first.
#[derive(Debug, Default)]
pub(super) struct Withdrawals {
    waiting: Vec<PendingDelete>,
}

impl Withdrawals {
    pub(super) fn wait(
        &mut self,
        id: RequestId,
        key: MitigationKey,
        last: Option<Counters>,
        deadline: Instant,
    ) {
        self.waiting.push(PendingDelete {
            id,
            key,
            last,
            deadline,
        });
    }

    /// Takes out the answer waiting for `key`'s final counters, if any.
    pub(super) fn take(&mut self, key: &MitigationKey) -> Option<PendingDelete> {
        let pos = self.waiting.iter().position(|d| d.key == *key)?;
        Some(self.waiting.remove(pos))
    }

    /// Takes out the answers whose wait is over at `now`, oldest first.
    pub(super) fn take_late(&mut self, now: Instant) -> Vec<PendingDelete> {
        let (late, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|d| d.deadline <= now);
        self.waiting = waiting;
        late
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|d| d.deadline).min()
    }

    /// Forgets every waiting answer (their connection is gone).
    pub(super) fn clear(&mut self) {
        self.waiting.clear();
    }
}

/// 2.02 to a DELETE, with the final counters when known.
pub(super) fn deleted_response(mid: u32, counters: Option<Counters>) -> Packet {
    let last = Scope {
        mid: Some(mid),
        ..Scope::default()
    };
    scopes_response(ResponseType::Deleted, vec![with_counters(last, counters)])
}
