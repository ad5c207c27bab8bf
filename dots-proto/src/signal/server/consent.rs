//! The consent queue (RFC 9066 §5.3.1): requests in
//! [`Phase::AwaitingConsent`], aged from when they entered that phase, and
//! decided by the operator or by the consent timeout.

use std::time::{Duration, Instant};

use crate::model::{ConflictCause, ConflictInformation, ValidatedRequest};
use crate::signal::action::MitigationKey;
use crate::signal::mitigation::{Mitigation, Mitigations, Phase};

/// A request awaiting the operator's consent, as
/// [`super::SignalServer::pending`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConsent {
    pub key: MitigationKey,
    pub request: ValidatedRequest,
    /// Time since the request started waiting.
    pub age: Duration,
    /// Time until the consent timeout decides it, if one is configured.
    pub decided_in: Option<Duration>,
    /// The local policy bound it goes past, when that is why it waits.
    pub reason: Option<String>,
}

/// The waiting requests among `mitigations`. The queue has no state of
/// its own: the phase and its start time are kept in the mitigation, so
/// they persist with it.
pub(super) struct ConsentQueue<'a> {
    mitigations: &'a Mitigations,
    timeout: Option<Duration>,
}

impl<'a> ConsentQueue<'a> {
    pub(super) fn new(mitigations: &'a Mitigations, timeout: Option<Duration>) -> Self {
        Self {
            mitigations,
            timeout,
        }
    }

    fn waiting(&self) -> impl Iterator<Item = (&'a MitigationKey, &'a Mitigation)> {
        self.mitigations
            .iter()
            .filter(|(_, m)| m.phase == Phase::AwaitingConsent)
    }

    /// Oldest first, then by key.
    pub(super) fn pending(&self, now: Instant) -> Vec<PendingConsent> {
        let mut v: Vec<PendingConsent> = self
            .waiting()
            .map(|(k, m)| PendingConsent {
                key: k.clone(),
                request: m.request.clone(),
                age: now.saturating_duration_since(m.since),
                decided_in: self
                    .timeout
                    .map(|t| (m.since + t).saturating_duration_since(now)),
                reason: m.over_limit.as_ref().map(ToString::to_string),
            })
            .collect();
        v.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.key.cmp(&b.key)));
        v
    }

    /// When the consent timeout decides the oldest request.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.timeout?;
        self.waiting().map(|(_, m)| m.since + timeout).min()
    }

    /// The requests the consent timeout decides at `now`, in key order.
    pub(super) fn timed_out(&self, now: Instant) -> Vec<MitigationKey> {
        let Some(timeout) = self.timeout else {
            return Vec::new();
        };
        self.mitigations
            .keys_where(|m| m.phase == Phase::AwaitingConsent && m.since + timeout <= now)
    }
}

/// What the notification ending a rejected request carries: conflict-cause
/// 4 (RFC 9066 §5.3.1).
pub(super) fn rejection() -> ConflictInformation {
    ConflictInformation {
        conflict_cause: Some(ConflictCause::RejectedLegitimateTraffic),
        ..ConflictInformation::default()
    }
}
