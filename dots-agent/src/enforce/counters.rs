//! Drop totals and rates computed from successive counter samples.

use std::time::{Duration, Instant};

use dots_common::SlotCounters;

/// Two counter sets added field by field (CPUs, or earlier slots of one
/// mitigation).
pub fn sum(a: &SlotCounters, b: &SlotCounters) -> SlotCounters {
    SlotCounters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        passed_packets: a.passed_packets + b.passed_packets,
        passed_bytes: a.passed_bytes + b.passed_bytes,
    }
}

/// Packets and bytes per second over the last sampling interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rates {
    pub pps: u64,
    pub bps: u64,
}

/// Turns cumulative counters into rates. A counter that goes backwards (slot
/// reused, counters reset) restarts the meter instead of reporting nonsense.
#[derive(Clone, Debug, Default)]
pub struct RateMeter {
    last: Option<(Instant, SlotCounters)>,
    rates: Rates,
}

impl RateMeter {
    /// Feeds a sample taken at `now`; returns the rates since the previous one.
    pub fn sample(&mut self, now: Instant, c: SlotCounters) -> Rates {
        if let Some((then, prev)) = self.last {
            let dt = now.saturating_duration_since(then);
            if c.packets < prev.packets || c.bytes < prev.bytes {
                self.rates = Rates::default();
            } else if dt >= Duration::from_millis(1) {
                let per_sec = |delta: u64| (delta as f64 / dt.as_secs_f64()).round() as u64;
                self.rates = Rates {
                    pps: per_sec(c.packets - prev.packets),
                    // bps is bits per second (RFC 9132 bps-dropped).
                    bps: per_sec((c.bytes - prev.bytes).saturating_mul(8)),
                };
            } else {
                return self.rates;
            }
        }
        self.last = Some((now, c));
        self.rates
    }

    pub fn rates(&self) -> Rates {
        self.rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_deltas() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        assert_eq!(m.sample(t0, SlotCounters::default()), Rates::default());
        let r = m.sample(
            t0 + Duration::from_secs(2),
            SlotCounters {
                packets: 200,
                bytes: 1000,
                ..Default::default()
            },
        );
        assert_eq!(
            r,
            Rates {
                pps: 100,
                bps: 4000
            }
        );
        // Counters reset: no negative rate.
        let r = m.sample(
            t0 + Duration::from_secs(3),
            SlotCounters {
                packets: 5,
                bytes: 5,
                ..Default::default()
            },
        );
        assert_eq!(r, Rates::default());
    }
}
