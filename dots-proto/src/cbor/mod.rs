//! CBOR encoding of DOTS bodies (RFC 9132 §6, RFC 9066 §6.2).
//!
//! * [`keys`]: the key map, YANG/JSON name <-> CBOR key, with each node's type.
//! * [`json_to_cbor`] / [`cbor_to_json`]: conversion between the JSON form of
//!   the RFC figures and the wire form, checked against the key map.
//! * [`Decimal`]: decimal64 values, carried as CBOR decimal fractions (tag 4).
//! * [`decode`] / [`encode`]: one CBOR data item <-> bytes.
//!
//! Comprehension rules (RFC 9132 §9): keys with the 0x8000 bit set are
//! comprehension-optional and ignored when not understood; any other unknown
//! key makes the body invalid, and the error names it.

mod decimal;
mod encode;
mod error;
pub(crate) mod fields;
mod json;
pub mod keys;

pub use ciborium::value::Value;
pub use decimal::{Decimal, ParseDecimalError};
pub use encode::encode;
pub use error::CborError;
pub use json::{cbor_to_json, json_to_cbor};

/// Decodes exactly one CBOR data item; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Value, CborError> {
    let mut rest = bytes;
    let value: Value =
        ciborium::de::from_reader(&mut rest).map_err(|e| CborError::Syntax(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CborError::Trailing(rest.len()));
    }
    Ok(value)
}
