//! Temporary drop-list after repeated authentication failures (RFC 9066 §8:
//! "temporarily adding the source address to a drop-list after a set number
//! of unsuccessful authentication attempts"). Sans-IO: the caller passes the
//! time. Generic over the key: the listener keys by source IP, the dialer by
//! peer address.

use std::{collections::HashMap, hash::Hash, time::Duration, time::Instant};

/// When to ban and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Failures within `window` that trigger a ban; 0 disables banning.
    pub threshold: u32,
    /// The window counted from the first failure.
    pub window: Duration,
    /// How long a banned key stays banned.
    pub ban: Duration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            threshold: 5,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

/// Counts failures per key and bans keys that fail too often.
#[derive(Debug)]
pub struct FailureTracker<K> {
    policy: FailurePolicy,
    entries: HashMap<K, Entry>,
    max_entries: usize,
}

impl<K: Hash + Eq + Clone> FailureTracker<K> {
    /// Keeps at most 65536 keys (older non-banned entries are pruned first).
    pub fn new(policy: FailurePolicy) -> Self {
        Self::with_capacity(policy, 65536)
    }

    pub fn with_capacity(policy: FailurePolicy, max_entries: usize) -> Self {
        FailureTracker {
            policy,
            entries: HashMap::new(),
            max_entries: max_entries.max(1),
        }
    }

    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// Records one failure; returns true if `key` is (now) banned.
    pub fn record_failure(&mut self, now: Instant, key: K) -> bool {
        if self.policy.threshold == 0 {
            return false;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
            self.prune(now);
            if self.entries.len() >= self.max_entries {
                // Still full of bans: forget the one that ends first.
                if let Some(k) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.banned_until)
                    .map(|(k, _)| k.clone())
                {
                    self.entries.remove(&k);
                }
            }
        }
        let policy = self.policy;
        let e = self.entries.entry(key).or_insert(Entry {
            window_start: now,
            failures: 0,
            banned_until: None,
        });
        if e.banned_until.is_some_and(|t| now < t) {
            return true;
        }
        if e.banned_until.is_some()
            || now.saturating_duration_since(e.window_start) >= policy.window
        {
            *e = Entry {
                window_start: now,
                failures: 0,
                banned_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= policy.threshold {
            e.banned_until = Some(now + policy.ban);
            e.failures = 0;
            return true;
        }
        false
    }

    /// A success clears the record of `key` (not an active ban).
    pub fn record_success(&mut self, now: Instant, key: &K) {
        if !self.is_banned(now, key) {
            self.entries.remove(key);
        }
    }

    pub fn is_banned(&self, now: Instant, key: &K) -> bool {
        self.entries
            .get(key)
            .and_then(|e| e.banned_until)
            .is_some_and(|t| now < t)
    }

    /// When the ban of `key` ends, if banned.
    pub fn banned_until(&self, now: Instant, key: &K) -> Option<Instant> {
        self.entries
            .get(key)
            .and_then(|e| e.banned_until)
            .filter(|t| now < *t)
    }

    /// Drops expired windows and bans.
    pub fn prune(&mut self, now: Instant) {
        let window = self.policy.window;
        self.entries.retain(|_, e| match e.banned_until {
            Some(t) => now < t,
            None => now.saturating_duration_since(e.window_start) < window,
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> FailurePolicy {
        FailurePolicy {
            threshold: 3,
            window: 10 * S,
            ban: 60 * S,
        }
    }

    #[test]
    fn bans_after_threshold_within_window_and_expires() {
        let t0 = Instant::now();
        let mut t = FailureTracker::new(policy());
        assert!(!t.record_failure(t0, "a"));
        assert!(!t.record_failure(t0 + S, "a"));
        assert!(!t.is_banned(t0 + S, &"a"));
        assert!(t.record_failure(t0 + 2 * S, "a"));
        assert!(t.is_banned(t0 + 3 * S, &"a"));
        assert!(!t.is_banned(t0 + 3 * S, &"b"));
        assert!(t.is_banned(t0 + 61 * S, &"a"));
        assert!(!t.is_banned(t0 + 62 * S, &"a"));
        // after the ban, counting starts afresh
        assert!(!t.record_failure(t0 + 63 * S, "a"));
        t.prune(t0 + 200 * S);
        assert!(t.is_empty());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t0 = Instant::now();
        let mut t = FailureTracker::new(policy());
        assert!(!t.record_failure(t0, 1));
        assert!(!t.record_failure(t0 + S, 1));
        assert!(!t.record_failure(t0 + 11 * S, 1));
        assert!(!t.record_failure(t0 + 12 * S, 1));
        assert!(t.record_failure(t0 + 13 * S, 1));
    }

    #[test]
    fn success_clears_and_zero_threshold_disables() {
        let t0 = Instant::now();
        let mut t = FailureTracker::new(policy());
        t.record_failure(t0, 1);
        t.record_failure(t0, 1);
        t.record_success(t0, &1);
        assert!(!t.record_failure(t0, 1));
        let mut off = FailureTracker::new(FailurePolicy {
            threshold: 0,
            ..policy()
        });
        for _ in 0..10 {
            assert!(!off.record_failure(t0, 1));
        }
    }

    #[test]
    fn capacity_is_bounded() {
        let t0 = Instant::now();
        let mut t = FailureTracker::with_capacity(
            FailurePolicy {
                threshold: 1,
                ..policy()
            },
            4,
        );
        for k in 0..100 {
            t.record_failure(t0, k);
            assert!(t.len() <= 4);
        }
        assert!(t.is_banned(t0, &99));
    }
}
