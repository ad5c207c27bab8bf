//! Session configuration (RFC 9132 §4.5): `signal-config` with one set of
//! parameters for mitigation time and one for idle time.

use super::{top_level, DotsMessage};
use crate::cbor::fields::{as_decimal, as_uint_in, decimal_value, Fields, MapBuilder};
use crate::cbor::keys::key::*;
use crate::cbor::{CborError, Decimal, Value};

/// A value a configuration parameter can take, with the keys its
/// max/min/current leaves use (`*-value` or `*-value-decimal`).
pub trait ConfigValue: Copy + Default {
    /// Keys of max, min and current value, in that order.
    const KEYS: [u64; 3];
    fn to_value(self) -> Value;
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError>;
}

impl ConfigValue for u16 {
    const KEYS: [u64; 3] = [MAX_VALUE, MIN_VALUE, CURRENT_VALUE];
    fn to_value(self) -> Value {
        self.into()
    }
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        as_uint_in(v, path)
    }
}

impl ConfigValue for u64 {
    const KEYS: [u64; 3] = [MAX_VALUE, MIN_VALUE, CURRENT_VALUE];
    fn to_value(self) -> Value {
        self.into()
    }
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        as_uint_in(v, path)
    }
}

impl ConfigValue for Decimal {
    const KEYS: [u64; 3] = [MAX_VALUE_DECIMAL, MIN_VALUE_DECIMAL, CURRENT_VALUE_DECIMAL];
    fn to_value(self) -> Value {
        decimal_value(self)
    }
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        as_decimal(v, path)
    }
}

/// One parameter: the range a server accepts and the value in force. A
/// client's PUT carries only `current`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinMaxCurrent<T> {
    pub max: Option<T>,
    pub min: Option<T>,
    pub current: Option<T>,
}

impl<T: ConfigValue> MinMaxCurrent<T> {
    /// Only a current value, as in a client's request.
    pub fn current(value: T) -> Self {
        Self {
            max: None,
            min: None,
            current: Some(value),
        }
    }

    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        let [max, min, current] = T::KEYS;
        let f = Fields::new(v, path, &T::KEYS)?;
        Ok(Self {
            max: f.opt(max, T::from_value)?,
            min: f.opt(min, T::from_value)?,
            current: f.opt(current, T::from_value)?,
        })
    }

    fn to_value(self) -> Option<Value> {
        let [max, min, current] = T::KEYS;
        MapBuilder::default()
            .opt(max, self.max.map(T::to_value))
            .opt(min, self.min.map(T::to_value))
            .opt(current, self.current.map(T::to_value))
            .build_nonempty()
    }
}

/// The parameters of `mitigating-config` or `idle-config`. An empty
/// [`MinMaxCurrent`] is left out of the encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigSet {
    pub heartbeat_interval: MinMaxCurrent<u16>,
    pub missing_hb_allowed: MinMaxCurrent<u16>,
    pub max_retransmit: MinMaxCurrent<u16>,
    pub ack_timeout: MinMaxCurrent<Decimal>,
    pub ack_random_factor: MinMaxCurrent<Decimal>,
    /// Bytes per second for Non-confirmable traffic without response.
    pub probing_rate: MinMaxCurrent<u64>,
}

const CONFIG_SET_KEYS: &[u64] = &[
    HEARTBEAT_INTERVAL,
    MISSING_HB_ALLOWED,
    MAX_RETRANSMIT,
    ACK_TIMEOUT,
    ACK_RANDOM_FACTOR,
    PROBING_RATE,
];

/// One parameter container of a config set; absent reads as empty.
fn param<T: ConfigValue>(f: &Fields<'_>, key: u64) -> Result<MinMaxCurrent<T>, CborError> {
    Ok(f.opt(key, MinMaxCurrent::from_value)?.unwrap_or_default())
}

impl ConfigSet {
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        let f = Fields::new(v, path, CONFIG_SET_KEYS)?;
        Ok(Self {
            heartbeat_interval: param(&f, HEARTBEAT_INTERVAL)?,
            missing_hb_allowed: param(&f, MISSING_HB_ALLOWED)?,
            max_retransmit: param(&f, MAX_RETRANSMIT)?,
            ack_timeout: param(&f, ACK_TIMEOUT)?,
            ack_random_factor: param(&f, ACK_RANDOM_FACTOR)?,
            probing_rate: param(&f, PROBING_RATE)?,
        })
    }

    fn to_value(self) -> Value {
        MapBuilder::default()
            .opt(HEARTBEAT_INTERVAL, self.heartbeat_interval.to_value())
            .opt(MISSING_HB_ALLOWED, self.missing_hb_allowed.to_value())
            .opt(MAX_RETRANSMIT, self.max_retransmit.to_value())
            .opt(ACK_TIMEOUT, self.ack_timeout.to_value())
            .opt(ACK_RANDOM_FACTOR, self.ack_random_factor.to_value())
            .opt(PROBING_RATE, self.probing_rate.to_value())
            .build()
    }
}

/// The `ietf-dots-signal-channel:signal-config` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignalConfig {
    /// In a PUT it is in the Uri-Path (`sid=`); GET responses may carry it.
    pub sid: Option<u32>,
    pub mitigating_config: Option<ConfigSet>,
    pub idle_config: Option<ConfigSet>,
}

impl DotsMessage for SignalConfig {
    fn to_value(&self) -> Value {
        let inner = MapBuilder::default()
            .uint(SID, self.sid)
            .opt(
                MITIGATING_CONFIG,
                self.mitigating_config.map(ConfigSet::to_value),
            )
            .opt(IDLE_CONFIG, self.idle_config.map(ConfigSet::to_value))
            .build();
        MapBuilder::default().put(SIGNAL_CONFIG, inner).build()
    }

    fn from_value(value: &Value) -> Result<Self, CborError> {
        let (inner, path) = top_level(value, SIGNAL_CONFIG)?;
        let f = Fields::new(inner, &path, &[SID, MITIGATING_CONFIG, IDLE_CONFIG])?;
        Ok(Self {
            sid: f.uint(SID)?,
            mitigating_config: f.opt(MITIGATING_CONFIG, ConfigSet::from_value)?,
            idle_config: f.opt(IDLE_CONFIG, ConfigSet::from_value)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(h: i64) -> Decimal {
        Decimal::from_hundredths(h)
    }

    #[test]
    fn server_answer_round_trips_through_cbor_and_json() {
        let set = ConfigSet {
            heartbeat_interval: MinMaxCurrent {
                max: Some(240),
                min: Some(15),
                current: Some(30),
            },
            missing_hb_allowed: MinMaxCurrent {
                max: Some(15),
                min: Some(3),
                current: Some(15),
            },
            max_retransmit: MinMaxCurrent {
                max: Some(15),
                min: Some(2),
                current: Some(3),
            },
            ack_timeout: MinMaxCurrent {
                max: Some(d(3000)),
                min: Some(d(100)),
                current: Some(d(200)),
            },
            ack_random_factor: MinMaxCurrent {
                max: Some(d(400)),
                min: Some(d(110)),
                current: Some(d(150)),
            },
            probing_rate: MinMaxCurrent::current(5),
        };
        let config = SignalConfig {
            sid: None,
            mitigating_config: Some(set),
            idle_config: Some(set),
        };
        assert_eq!(SignalConfig::decode(&config.encode()), Ok(config));
        let json = config.to_json().expect("json");
        assert_eq!(
            json["ietf-dots-signal-channel:signal-config"]["idle-config"]["ack-timeout"],
            json!({"max-value-decimal": "30.00", "min-value-decimal": "1.00", "current-value-decimal": "2.00"})
        );
        assert_eq!(SignalConfig::from_json(&json), Ok(config));
    }

    #[test]
    fn decimal_is_a_tag_4_fraction_on_the_wire() {
        let config = SignalConfig {
            sid: Some(123),
            mitigating_config: Some(ConfigSet {
                ack_timeout: MinMaxCurrent::current(d(200)),
                ..ConfigSet::default()
            }),
            idle_config: None,
        };
        // {30: {31: 123, 32: {39: {43: 4([-2, 200])}}}}
        assert_eq!(
            hex::encode(config.encode()),
            "a1181ea2181f187b1820a11827a1182bc4822118c8"
        );
        // A peer may write 2.0 as 4([-1, 20]).
        let other = hex::decode("a1181ea2181f187b1820a11827a1182bc482201814").expect("hex");
        assert_eq!(SignalConfig::decode(&other), Ok(config));
    }

    #[test]
    fn integer_leaf_under_a_decimal_parameter_is_rejected() {
        // {30: {32: {39: {36: 2}}}}: current-value where current-value-decimal belongs.
        let bytes = hex::decode("a1181ea11820a11827a1182402").expect("hex");
        assert_eq!(
            SignalConfig::decode(&bytes).expect_err("rejects").to_string(),
            "/ietf-dots-signal-channel:signal-config/mitigating-config/ack-timeout: \"current-value\" is not allowed here"
        );
    }
}
