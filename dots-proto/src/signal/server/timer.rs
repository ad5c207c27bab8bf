//! The server's deadlines, one slot per purpose, so that `poll_timeout` is
//! the earliest slot (and the endpoint's own) and `handle_timeout` fires
//! each expired slot in a fixed order.

use std::time::Instant;

/// What a deadline is for. [`Timer::VALUES`] is the firing order of one
/// `handle_timeout` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// The earliest lifetime of a mitigation ends: it is removed, observers
    /// get status 6.
    LifetimeEnd,
    /// A request has waited `consent_timeout` for the operator.
    ConsentTimeout,
    /// A DELETE has waited `counters_wait` for the final counters: it is
    /// answered with the last ones known.
    DeleteAnswer,
    /// Periodic notifications held for the counters queried at the last
    /// period start go out with whatever counters came.
    CountersDue,
    /// A new notify period starts: counters are queried and quiet
    /// mitigations notified.
    NotifyPeriod,
    /// The peer has been silent for the whole missing-hb-allowed span: the
    /// session is lost.
    PeerSilence,
    /// Our next heartbeat is due.
    Heartbeat,
}

impl Timer {
    pub(super) const VALUES: [Timer; 7] = [
        Timer::LifetimeEnd,
        Timer::ConsentTimeout,
        Timer::DeleteAnswer,
        Timer::CountersDue,
        Timer::NotifyPeriod,
        Timer::PeerSilence,
        Timer::Heartbeat,
    ];
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TimerTable {
    data: [Option<Instant>; Timer::VALUES.len()],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.data[timer as usize] = Some(at);
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// The earliest deadline set.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// Whether `timer` is set and due at `now`.
    pub(super) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn table_slots_are_independent() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::Heartbeat, t0 + s(30));
        table.set(Timer::PeerSilence, t0 + s(450));
        table.set(Timer::LifetimeEnd, t0 + s(30));
        assert_eq!(table.next_timeout(), Some(t0 + s(30)));
        assert_eq!(table.get(Timer::PeerSilence), Some(t0 + s(450)));
        assert!(!table.is_expired(Timer::Heartbeat, t0 + s(29)));
        assert!(table.is_expired(Timer::Heartbeat, t0 + s(30)));
        assert!(!table.is_expired(Timer::CountersDue, t0 + s(1000)), "unset");
        table.stop(Timer::Heartbeat);
        table.stop(Timer::LifetimeEnd);
        assert_eq!(table.get(Timer::Heartbeat), None);
        assert_eq!(table.next_timeout(), Some(t0 + s(450)));
    }
}
