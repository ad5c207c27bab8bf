//! Typed DOTS messages and their validation.
//!
//! * [`MitigationScope`]: mitigation requests and status (RFC 9132 §4.4),
//!   with the Call Home source attributes (RFC 9066 §5.3.1).
//! * [`SignalConfig`]: session configuration (RFC 9132 §4.5).
//! * [`Heartbeat`]: `hb` bodies (RFC 9132 §4.7).
//! * [`RedirectedSignal`]: the Call Home redirect (RFC 9066 §5.2.2).
//! * [`validate`]: the checks an agent applies to a Call Home mitigation
//!   request before acting on it, each failure mapped to a CoAP error.
//! * [`policy`]: the agent's local bounds on what one request may block,
//!   and which part of it is exempt from enforcement.
//! * [`prefixes`]: the strict text form of prefixes, the ranges a request
//!   may not name, and prefix-set arithmetic.
//!
//! Every message converts to and from CBOR bytes ([`DotsMessage::encode`],
//! [`DotsMessage::decode`], applying the comprehension rules) and the JSON
//! form of the RFC figures ([`DotsMessage::to_json`], [`DotsMessage::from_json`]).

mod config;
mod mitigation;
pub mod policy;
pub mod prefixes;
mod session;
pub mod validate;

#[cfg(test)]
mod proptests;

use serde_json::Value as Json;

use crate::cbor::fields::Fields;
use crate::cbor::{self, cbor_to_json, json_to_cbor, CborError, Value};

pub use config::{ConfigSet, ConfigValue, MinMaxCurrent, SignalConfig};
pub use mitigation::{
    Acl, AttackStatus, ConflictCause, ConflictInformation, ConflictScope, ConflictStatus,
    IcmpTypeRange, MitigationScope, MitigationStatus, PortRange, Scope, INDEFINITE_LIFETIME,
};
pub use policy::{Bound, Exemption, OverLimit, Policy};
pub use session::{Heartbeat, RedirectedSignal, MAX_REDIRECT_RECORDS};
pub use validate::{
    prefixes_within, validate_call_home_request, Limits, MitigationUri, ValidatedRequest,
    ValidationError,
};

/// A DOTS message body with its CBOR and JSON forms.
pub trait DotsMessage: Sized {
    /// The message as a CBOR data item.
    fn to_value(&self) -> Value;

    /// Reads the message from a CBOR data item, applying the comprehension rules.
    fn from_value(value: &Value) -> Result<Self, CborError>;

    /// The CBOR bytes of the body (Content-Format 271).
    fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }

    fn decode(bytes: &[u8]) -> Result<Self, CborError> {
        Self::from_value(&cbor::decode(bytes)?)
    }

    /// The JSON form used in the RFC figures.
    fn to_json(&self) -> Result<Json, CborError> {
        cbor_to_json(&self.encode())
    }

    fn from_json(json: &Json) -> Result<Self, CborError> {
        Self::decode(&json_to_cbor(json)?)
    }
}

/// The single top-level container `key` of a body, with its path.
fn top_level(value: &Value, key: u64) -> Result<(&Value, String), CborError> {
    let fields = Fields::new(value, "", &[key])?;
    Ok((fields.require(key)?, fields.path(key)))
}
