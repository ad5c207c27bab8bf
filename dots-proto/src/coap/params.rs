//! CoAP transmission parameters (RFC 7252 §4.8) and the derived times.
//!
//! DOTS negotiates `ack-timeout`, `ack-random-factor` and `max-retransmit`
//! per session (RFC 9132 §4.5), so they are runtime values, not constants.

use std::time::Duration;

use super::error::CoapError;

/// MAX_LATENCY of RFC 7252 §4.8.2: the assumed worst one-way delay.
const MAX_LATENCY: Duration = Duration::from_secs(100);

/// Upper bound used when a derived time would not fit a `Duration`.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

/// The negotiable retransmission parameters of a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransmissionParams {
    /// ACK_TIMEOUT: initial retransmission timeout of a Confirmable message.
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR: the initial timeout is drawn from
    /// `[ack_timeout, ack_timeout * ack_random_factor]`.
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT: retransmissions before giving up.
    pub max_retransmit: u32,
}

impl Default for TransmissionParams {
    /// The DOTS defaults (RFC 9132 §4.5): 2.00 s, 1.50, 3.
    fn default() -> Self {
        TransmissionParams {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 3,
        }
    }
}

impl TransmissionParams {
    /// Rejects values that would make the timers meaningless. Ranges are the
    /// CoAP ones, wider than what DOTS accepts (the signal layer enforces those).
    pub fn validate(&self) -> Result<(), CoapError> {
        if self.ack_timeout.is_zero() {
            return Err(CoapError::InvalidParams("ack-timeout must be positive"));
        }
        if !self.ack_random_factor.is_finite() || self.ack_random_factor < 1.0 {
            return Err(CoapError::InvalidParams("ack-random-factor must be >= 1.0"));
        }
        if self.ack_random_factor > 16.0 {
            return Err(CoapError::InvalidParams("ack-random-factor too large"));
        }
        if self.max_retransmit > 20 {
            return Err(CoapError::InvalidParams("max-retransmit must be <= 20"));
        }
        Ok(())
    }

    /// The initial timeout of a CON for a random `u64` (uniform jitter in
    /// `[ack_timeout, ack_timeout * ack_random_factor]`).
    pub fn initial_timeout(&self, random: u64) -> Duration {
        // 53 random bits give a uniform fraction in [0, 1).
        let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 + (self.ack_random_factor - 1.0) * fraction;
        secs(self.ack_timeout.as_secs_f64() * factor)
    }

    /// MAX_TRANSMIT_SPAN: first transmission to last retransmission.
    pub fn max_transmit_span(&self) -> Duration {
        secs(
            self.ack_timeout.as_secs_f64()
                * (pow2(self.max_retransmit) - 1.0)
                * self.ack_random_factor,
        )
    }

    /// MAX_TRANSMIT_WAIT: first transmission to giving up.
    pub fn max_transmit_wait(&self) -> Duration {
        secs(
            self.ack_timeout.as_secs_f64()
                * (pow2(self.max_retransmit.saturating_add(1)) - 1.0)
                * self.ack_random_factor,
        )
    }

    /// EXCHANGE_LIFETIME: how long a message id stays in use (dedup cache).
    pub fn exchange_lifetime(&self) -> Duration {
        // PROCESSING_DELAY is ACK_TIMEOUT (RFC 7252 §4.8.2).
        self.max_transmit_span()
            .saturating_add(MAX_LATENCY * 2)
            .saturating_add(self.ack_timeout)
    }

    /// NON_LIFETIME: how long a Non-confirmable message id stays in use.
    pub fn non_lifetime(&self) -> Duration {
        self.max_transmit_span().saturating_add(MAX_LATENCY)
    }
}

fn pow2(n: u32) -> f64 {
    2f64.powi(n.min(62) as i32)
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).map_or(FAR_FUTURE, |d| d.min(FAR_FUTURE))
}

/// A small deterministic generator (SplitMix64) seeded by the caller: the
/// library never reads a randomness source itself, so tests are repeatable.
/// Tokens and message ids only need to be unpredictable to off-path parties,
/// and the channel is (D)TLS-protected anyway.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_times_match_rfc7252_defaults() {
        // RFC 7252 defaults use MAX_RETRANSMIT 4.
        let p = TransmissionParams {
            max_retransmit: 4,
            ..Default::default()
        };
        assert_eq!(p.max_transmit_span(), Duration::from_secs(45));
        assert_eq!(p.max_transmit_wait(), Duration::from_secs(93));
        assert_eq!(p.exchange_lifetime(), Duration::from_secs(247));
        assert_eq!(p.non_lifetime(), Duration::from_secs(145));
        // DOTS defaults (MAX_RETRANSMIT 3).
        let p = TransmissionParams::default();
        assert_eq!(p.max_transmit_wait(), Duration::from_secs(45));
        assert_eq!(p.exchange_lifetime(), Duration::from_secs(223));
    }

    #[test]
    fn initial_timeout_is_bounded_by_random_factor() {
        let p = TransmissionParams::default();
        assert_eq!(p.initial_timeout(0), Duration::from_secs(2));
        let max = p.initial_timeout(u64::MAX);
        assert!(max <= Duration::from_secs(3) && max > Duration::from_millis(2999));
        let mut rng = SplitMix64::new(7);
        for _ in 0..1000 {
            let t = p.initial_timeout(rng.next_u64());
            assert!(t >= Duration::from_secs(2) && t <= Duration::from_secs(3));
        }
    }

    #[test]
    fn validation() {
        assert!(TransmissionParams::default().validate().is_ok());
        let bad = [
            TransmissionParams {
                ack_timeout: Duration::ZERO,
                ..Default::default()
            },
            TransmissionParams {
                ack_random_factor: 0.5,
                ..Default::default()
            },
            TransmissionParams {
                ack_random_factor: f64::NAN,
                ..Default::default()
            },
            TransmissionParams {
                max_retransmit: 100,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }
}
