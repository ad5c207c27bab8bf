//! How long to wait before retrying a failed discovery lookup, sans IO.
//!
//! RFC 8973 §6: "before retrying a lookup that has failed, a DOTS client
//! MUST wait a time period that is appropriate for the encountered error
//! (e.g., NXDOMAIN, timeout, etc.)". This policy:
//!
//! - NXDOMAIN / no data (no DOTS records): the answer is authoritative and
//!   cacheable (RFC 2308): wait the negative TTL (SOA minimum) when known,
//!   else `negative_default`, clamped to [`min_negative`, `max_negative`].
//! - SERVFAIL, REFUSED and other error codes: the server is unwell; RFC
//!   2308 §7.1 allows caching a server failure for at most 5 minutes.
//!   Exponential backoff from `transient_initial`, capped at
//!   `transient_max` (5 min).
//! - Timeout / network errors: same backoff (the resolver may be
//!   unreachable for a while: a link coming up).
//!
//! A success resets the backoff.

use std::time::Duration;

/// The kind of a lookup failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupErrorKind {
    /// The name does not exist; `negative_ttl` from the SOA, if any.
    NxDomain { negative_ttl: Option<u32> },
    /// The name exists but has no record of the type (or no DOTS record).
    NoData { negative_ttl: Option<u32> },
    /// SERVFAIL, REFUSED or another error response code.
    ServerFailure,
    /// No answer in time.
    Timeout,
    /// Socket-level failure (unreachable, refused).
    Network,
}

/// A failed lookup: what kind (for [`RetryPolicy`]) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupFailure {
    pub kind: LookupErrorKind,
    pub message: String,
}

impl std::fmt::Display for LookupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LookupFailure {}

/// Retry delays per error kind, with exponential backoff for transient
/// errors.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub negative_default: Duration,
    pub min_negative: Duration,
    pub max_negative: Duration,
    pub transient_initial: Duration,
    pub transient_max: Duration,
    failures: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            negative_default: Duration::from_secs(15 * 60),
            min_negative: Duration::from_secs(60),
            max_negative: Duration::from_secs(3 * 3600),
            transient_initial: Duration::from_secs(5),
            transient_max: Duration::from_secs(300),
            failures: 0,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt after a failure of `kind`.
    pub fn on_failure(&mut self, kind: LookupErrorKind) -> Duration {
        match kind {
            LookupErrorKind::NxDomain { negative_ttl }
            | LookupErrorKind::NoData { negative_ttl } => {
                // An authoritative negative answer does not say anything about
                // server health: the transient backoff restarts.
                self.failures = 0;
                negative_ttl
                    .map(|t| Duration::from_secs(u64::from(t)))
                    .unwrap_or(self.negative_default)
                    .clamp(self.min_negative, self.max_negative)
            }
            LookupErrorKind::ServerFailure
            | LookupErrorKind::Timeout
            | LookupErrorKind::Network => {
                let shift = self.failures.min(16);
                self.failures = self.failures.saturating_add(1);
                self.transient_initial
                    .saturating_mul(1u32 << shift)
                    .min(self.transient_max)
            }
        }
    }

    /// A lookup succeeded: the next failure starts the backoff again.
    pub fn on_success(&mut self) {
        self.failures = 0;
    }

    /// Consecutive transient failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_answers_use_the_soa_ttl_clamped() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.on_failure(LookupErrorKind::NxDomain {
                negative_ttl: Some(600)
            }),
            Duration::from_secs(600)
        );
        assert_eq!(
            p.on_failure(LookupErrorKind::NxDomain {
                negative_ttl: Some(1)
            }),
            Duration::from_secs(60)
        );
        assert_eq!(
            p.on_failure(LookupErrorKind::NoData {
                negative_ttl: Some(86_400 * 7)
            }),
            Duration::from_secs(3 * 3600)
        );
        assert_eq!(
            p.on_failure(LookupErrorKind::NoData { negative_ttl: None }),
            Duration::from_secs(900)
        );
    }

    #[test]
    fn transient_failures_back_off_to_five_minutes() {
        let mut p = RetryPolicy::default();
        let got: Vec<u64> = (0..8)
            .map(|i| {
                let k = if i % 2 == 0 {
                    LookupErrorKind::Timeout
                } else {
                    LookupErrorKind::ServerFailure
                };
                p.on_failure(k).as_secs()
            })
            .collect();
        assert_eq!(got, vec![5, 10, 20, 40, 80, 160, 300, 300]);
        p.on_success();
        assert_eq!(p.on_failure(LookupErrorKind::Network).as_secs(), 5);
        // An NXDOMAIN restarts the transient backoff too.
        p.on_failure(LookupErrorKind::Timeout);
        p.on_failure(LookupErrorKind::NxDomain { negative_ttl: None });
        assert_eq!(p.failures(), 0);
    }
}
