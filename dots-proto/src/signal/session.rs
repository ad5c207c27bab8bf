//! Session configuration (RFC 9132 §4.5): the ranges this agent accepts,
//! the values in force for `mitigating-config` and `idle-config`, and the
//! checks of a peer's PUT.

use std::time::Duration;

use crate::cbor::Decimal;
use crate::coap::{ErrorResponse, ResponseType, TransmissionParams};
use crate::model::{ConfigSet, MinMaxCurrent, SignalConfig};

/// The accepted range and the default of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamRange<T> {
    pub min: T,
    pub max: T,
    pub default: T,
}

impl<T: Copy + PartialOrd + std::fmt::Display> ParamRange<T> {
    const fn new(min: T, max: T, default: T) -> Self {
        Self { min, max, default }
    }

    fn advertise(&self, current: T) -> MinMaxCurrent<T> {
        MinMaxCurrent {
            max: Some(self.max),
            min: Some(self.min),
            current: Some(current),
        }
    }

    /// The requested value when given and acceptable, else `keep`.
    fn accept(&self, name: &str, requested: Option<T>, keep: T) -> Result<T, ErrorResponse> {
        match requested {
            None => Ok(keep),
            Some(v) if v >= self.min && v <= self.max => Ok(v),
            // RFC 9132 §4.5.2: unacceptable values are 4.22.
            Some(v) => Err(ErrorResponse::new(
                ResponseType::UnprocessableEntity,
                format!("{name} {v} is outside {}..={}", self.min, self.max),
            )),
        }
    }
}

/// What the agent accepts for each session parameter; the same ranges
/// apply to `mitigating-config` and `idle-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Seconds.
    pub heartbeat_interval: ParamRange<u16>,
    pub missing_hb_allowed: ParamRange<u16>,
    pub max_retransmit: ParamRange<u16>,
    /// Seconds, two fraction digits.
    pub ack_timeout: ParamRange<Decimal>,
    pub ack_random_factor: ParamRange<Decimal>,
}

impl Default for SessionPolicy {
    /// The common DOTS defaults and a typical acceptable range.
    fn default() -> Self {
        let d = Decimal::from_hundredths;
        Self {
            heartbeat_interval: ParamRange::new(15, 240, 30),
            missing_hb_allowed: ParamRange::new(3, 15, 15),
            max_retransmit: ParamRange::new(2, 15, 3),
            ack_timeout: ParamRange::new(d(100), d(3000), d(200)),
            ack_random_factor: ParamRange::new(d(110), d(400), d(150)),
        }
    }
}

impl SessionPolicy {
    pub fn validate(&self) -> Result<(), String> {
        fn check<T: PartialOrd>(name: &str, r: &ParamRange<T>) -> Result<(), String> {
            if r.min <= r.default && r.default <= r.max {
                Ok(())
            } else {
                Err(format!("{name}: default outside min..=max"))
            }
        }
        check("heartbeat-interval", &self.heartbeat_interval)?;
        check("missing-hb-allowed", &self.missing_hb_allowed)?;
        check("max-retransmit", &self.max_retransmit)?;
        check("ack-timeout", &self.ack_timeout)?;
        check("ack-random-factor", &self.ack_random_factor)?;
        if self.heartbeat_interval.min == 0 || self.ack_timeout.min.hundredths() <= 0 {
            return Err("heartbeat-interval and ack-timeout must be positive".into());
        }
        if self.ack_random_factor.min.hundredths() < 100 {
            return Err("ack-random-factor must be >= 1.00".into());
        }
        Ok(())
    }

    pub fn defaults(&self) -> SessionParams {
        SessionParams {
            heartbeat_interval: self.heartbeat_interval.default,
            missing_hb_allowed: self.missing_hb_allowed.default,
            max_retransmit: self.max_retransmit.default,
            ack_timeout: self.ack_timeout.default,
            ack_random_factor: self.ack_random_factor.default,
        }
    }

    fn advertise(&self, p: &SessionParams) -> ConfigSet {
        ConfigSet {
            heartbeat_interval: self.heartbeat_interval.advertise(p.heartbeat_interval),
            missing_hb_allowed: self.missing_hb_allowed.advertise(p.missing_hb_allowed),
            max_retransmit: self.max_retransmit.advertise(p.max_retransmit),
            ack_timeout: self.ack_timeout.advertise(p.ack_timeout),
            ack_random_factor: self.ack_random_factor.advertise(p.ack_random_factor),
            // Not offered: no probing-rate limiting here.
            probing_rate: MinMaxCurrent::default(),
        }
    }

    /// `keep` updated with the current values of a requested set.
    fn accept(&self, req: &ConfigSet, keep: SessionParams) -> Result<SessionParams, ErrorResponse> {
        Ok(SessionParams {
            heartbeat_interval: self.heartbeat_interval.accept(
                "heartbeat-interval",
                req.heartbeat_interval.current,
                keep.heartbeat_interval,
            )?,
            missing_hb_allowed: self.missing_hb_allowed.accept(
                "missing-hb-allowed",
                req.missing_hb_allowed.current,
                keep.missing_hb_allowed,
            )?,
            max_retransmit: self.max_retransmit.accept(
                "max-retransmit",
                req.max_retransmit.current,
                keep.max_retransmit,
            )?,
            ack_timeout: self.ack_timeout.accept(
                "ack-timeout",
                req.ack_timeout.current,
                keep.ack_timeout,
            )?,
            ack_random_factor: self.ack_random_factor.accept(
                "ack-random-factor",
                req.ack_random_factor.current,
                keep.ack_random_factor,
            )?,
        })
    }
}

/// The values in force for one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    pub heartbeat_interval: u16,
    pub missing_hb_allowed: u16,
    pub max_retransmit: u16,
    pub ack_timeout: Decimal,
    pub ack_random_factor: Decimal,
}

impl SessionParams {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval.into())
    }

    /// How long without any traffic before the session counts as lost.
    pub fn silence_allowed(&self) -> Duration {
        self.heartbeat_interval() * u32::from(self.missing_hb_allowed)
    }

    pub fn transmission(&self) -> TransmissionParams {
        let hundredths = |d: Decimal| u64::try_from(d.hundredths()).unwrap_or(0);
        TransmissionParams {
            ack_timeout: Duration::from_millis(hundredths(self.ack_timeout) * 10),
            ack_random_factor: hundredths(self.ack_random_factor) as f64 / 100.0,
            max_retransmit: self.max_retransmit.into(),
        }
    }
}

/// The negotiated session configuration of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    policy: SessionPolicy,
    sid: Option<u32>,
    mitigating: SessionParams,
    idle: SessionParams,
}

/// Outcome of a successful PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new sid (2.01).
    Created,
    /// The sid in force was updated (2.04).
    Changed,
}

impl SessionConfig {
    pub fn new(policy: SessionPolicy) -> Self {
        Self {
            sid: None,
            mitigating: policy.defaults(),
            idle: policy.defaults(),
            policy,
        }
    }

    /// The set in force: `mitigating-config` while any mitigation exists.
    pub fn active(&self, mitigating: bool) -> SessionParams {
        if mitigating {
            self.mitigating
        } else {
            self.idle
        }
    }

    /// The body of a GET answer: ranges and current values of both sets.
    pub fn to_message(&self) -> SignalConfig {
        SignalConfig {
            sid: self.sid,
            mitigating_config: Some(self.policy.advertise(&self.mitigating)),
            idle_config: Some(self.policy.advertise(&self.idle)),
        }
    }

    /// Applies a PUT to `config/sid=<sid>`; nothing changes on error.
    pub fn put(&mut self, sid: u32, req: &SignalConfig) -> Result<PutOutcome, ErrorResponse> {
        if req.sid.is_some_and(|body| body != sid) {
            return Err(ErrorResponse::new(
                ResponseType::BadRequest,
                "sid in the body differs from the Uri-Path",
            ));
        }
        let accept = |set: &Option<ConfigSet>, keep| match set {
            Some(s) => self.policy.accept(s, keep),
            None => Ok(keep),
        };
        let mitigating = accept(&req.mitigating_config, self.mitigating)?;
        let idle = accept(&req.idle_config, self.idle)?;
        let outcome = if self.sid == Some(sid) {
            PutOutcome::Changed
        } else {
            PutOutcome::Created
        };
        self.sid = Some(sid);
        self.mitigating = mitigating;
        self.idle = idle;
        Ok(outcome)
    }

    /// DELETE `config/sid=..`: back to the defaults.
    pub fn reset(&mut self) {
        *self = Self::new(self.policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_hb(hb: u16) -> SignalConfig {
        SignalConfig {
            sid: None,
            mitigating_config: Some(ConfigSet {
                heartbeat_interval: MinMaxCurrent::current(hb),
                ..ConfigSet::default()
            }),
            idle_config: None,
        }
    }

    #[test]
    fn put_within_range_then_outside_keeps_the_first() {
        let mut c = SessionConfig::new(SessionPolicy::default());
        assert_eq!(c.put(7, &put_hb(60)), Ok(PutOutcome::Created));
        assert_eq!(c.put(7, &put_hb(90)), Ok(PutOutcome::Changed));
        let err = c.put(8, &put_hb(5)).expect_err("outside");
        assert_eq!(err.code, ResponseType::UnprocessableEntity);
        assert_eq!(err.diagnostic, "heartbeat-interval 5 is outside 15..=240");
        assert_eq!(c.active(true).heartbeat_interval, 90);
        assert_eq!(c.active(false).heartbeat_interval, 30);
        assert_eq!(c.to_message().sid, Some(7));
        c.reset();
        assert_eq!(c.active(true).heartbeat_interval, 30);
    }

    #[test]
    fn defaults_give_dots_transmission_params() {
        let p = SessionPolicy::default().defaults();
        assert_eq!(p.transmission(), TransmissionParams::default());
        assert_eq!(p.silence_allowed(), Duration::from_secs(450));
        assert!(SessionPolicy::default().validate().is_ok());
    }
}
