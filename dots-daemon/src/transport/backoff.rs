//! Exponential reconnect backoff with jitter (sans-IO).

use std::time::Duration;

/// Delays between reconnection attempts: `initial`, then times `factor` per
/// failure up to `max`, each scaled down by a random jitter of up to `jitter`
/// (0.5: somewhere in [d/2, d]). Deterministic when built with a seed.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
    /// Fraction of the delay that is randomised, clamped to [0, 1].
    pub jitter: f64,
    current: Duration,
    state: u64,
}

impl Backoff {
    /// A backoff seeded from the OS random generator.
    pub fn new(initial: Duration, max: Duration, factor: f64) -> Backoff {
        let mut seed = [0u8; 8];
        if openssl::rand::rand_bytes(&mut seed).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            seed = nanos.to_le_bytes();
        }
        Backoff::with_seed(initial, max, factor, u64::from_le_bytes(seed))
    }

    /// A reproducible backoff.
    pub fn with_seed(initial: Duration, max: Duration, factor: f64, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            factor,
            jitter: 0.5,
            current: initial,
            state: seed,
        }
    }

    /// The delay before the next attempt; grows the base delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current.min(self.max);
        let factor = if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        };
        self.current = base.mul_f64(factor).min(self.max);
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // uniform in [0, 1)
        let r = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - jitter * r)
    }

    /// Back to `initial` (after a connection worked).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// splitmix64
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_caps_and_stays_within_jitter() {
        let mut b = Backoff::with_seed(100 * MS, 1000 * MS, 2.0, 42);
        let bases = [100, 200, 400, 800, 1000, 1000, 1000];
        for base in bases {
            let d = b.next_delay();
            assert!(d <= base * MS && d >= base * MS / 2, "{d:?} vs {base}");
        }
        b.reset();
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn deterministic_with_seed_and_no_jitter_is_exact() {
        let mut a = Backoff::with_seed(100 * MS, 10_000 * MS, 1.5, 7);
        let mut b = Backoff::with_seed(100 * MS, 10_000 * MS, 1.5, 7);
        let da: Vec<_> = (0..10).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(da, db);
        let mut c = Backoff::with_seed(100 * MS, 10_000 * MS, 2.0, 7);
        c.jitter = 0.0;
        assert_eq!(c.next_delay(), 100 * MS);
        assert_eq!(c.next_delay(), 200 * MS);
    }
}
