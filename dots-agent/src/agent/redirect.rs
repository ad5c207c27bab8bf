//! How long a redirect (RFC 9066 §5.2.2) holds. The alternate Call Home
//! DOTS client is used until its `ttl` runs out (RFC 9132 §4.6 processing)
//! or, with or without a `ttl`, until it has been unreachable for the
//! configured `redirect-fallback`: a dead alternate is abandoned and the
//! agent dials its configured peers again.

use std::time::{Duration, Instant};

/// A redirect in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redirected {
    /// End of the `ttl`, if one was given.
    until: Option<Instant>,
    /// Since when no session with the alternate is up (from the redirect
    /// itself until the first session, and again after each loss).
    unreachable_since: Option<Instant>,
    fallback: Duration,
}

impl Redirected {
    pub(crate) fn new(now: Instant, ttl: Option<u32>, fallback: Duration) -> Self {
        Self {
            until: ttl.map(|t| now + Duration::from_secs(u64::from(t))),
            unreachable_since: Some(now),
            fallback,
        }
    }

    /// A session with the alternate is up.
    pub(crate) fn reached(&mut self) {
        self.unreachable_since = None;
    }

    /// The session with the alternate ended.
    pub(crate) fn lost(&mut self, now: Instant) {
        self.unreachable_since.get_or_insert(now);
    }

    /// Why the redirect no longer holds at `now`, if it does not.
    pub(crate) fn over(&self, now: Instant) -> Option<String> {
        if self.until.is_some_and(|t| now >= t) {
            return Some("the redirect's ttl expired".into());
        }
        match self.unreachable_since {
            Some(since) if now.saturating_duration_since(since) >= self.fallback => Some(format!(
                "the alternate peer was unreachable for {} s (redirect-fallback)",
                self.fallback.as_secs()
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_dead_alternate_without_ttl_is_abandoned() {
        let t0 = Instant::now();
        let r = Redirected::new(t0, None, S(300));
        assert_eq!(r.over(t0 + S(299)), None);
        assert_eq!(
            r.over(t0 + S(300)).as_deref(),
            Some("the alternate peer was unreachable for 300 s (redirect-fallback)")
        );
    }

    #[test]
    fn a_live_alternate_holds_until_its_ttl() {
        let t0 = Instant::now();
        let mut r = Redirected::new(t0, Some(3600), S(300));
        r.reached();
        assert_eq!(r.over(t0 + S(3599)), None, "reachable: no fallback");
        assert_eq!(
            r.over(t0 + S(3600)).as_deref(),
            Some("the redirect's ttl expired")
        );
        let mut forever = Redirected::new(t0, None, S(300));
        forever.reached();
        assert_eq!(forever.over(t0 + S(1_000_000)), None);
    }

    #[test]
    fn unreachable_time_counts_from_the_last_loss() {
        let t0 = Instant::now();
        let mut r = Redirected::new(t0, None, S(300));
        r.reached();
        r.lost(t0 + S(1000));
        r.lost(t0 + S(1100)); // still unreachable since 1000
        assert_eq!(r.over(t0 + S(1299)), None);
        assert!(r.over(t0 + S(1300)).is_some());
        r.reached();
        assert_eq!(r.over(t0 + S(5000)), None);
    }
}
