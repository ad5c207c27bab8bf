//! `dots-client cbor`: DOTS messages between their JSON form (the RFC
//! figures) and the CBOR wire form, raw or as hexadecimal text.

use anyhow::{Context, Result};
use serde_json::Value;

use dots_proto::cbor;

/// The CBOR wire form of a DOTS message in its JSON form.
pub fn encode(json: &Value) -> Result<Vec<u8>> {
    cbor::json_to_cbor(json).map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))
}

/// The JSON form of a DOTS message in CBOR.
pub fn decode(bytes: &[u8]) -> Result<Value> {
    cbor::cbor_to_json(bytes).map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))
}

/// Lower-case hexadecimal, two digits a byte.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hexadecimal text; whitespace is ignored.
pub fn from_hex(text: &[u8]) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        anyhow::bail!("hex input has an odd number of digits ({})", digits.len());
    }
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let s = std::str::from_utf8(pair).unwrap_or("??");
            u8::from_str_radix(s, 16).with_context(|| format!("invalid hex {s:?} at byte {i}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(to_hex(&[0x00, 0xa1, 0xff]), "00a1ff");
        assert_eq!(from_hex(b"00 a1\nFF").unwrap(), [0x00, 0xa1, 0xff]);
        assert_eq!(from_hex(b"").unwrap(), Vec::<u8>::new());
        let e = from_hex(b"abc").unwrap_err();
        assert_eq!(e.to_string(), "hex input has an odd number of digits (3)");
        let e = from_hex(b"00zz").unwrap_err();
        assert_eq!(e.to_string(), "invalid hex \"zz\" at byte 1");
    }

    #[test]
    fn cbor_round_trips() {
        let json: Value = serde_json::from_str(
            r#"{"ietf-dots-signal-channel:heartbeat":{"peer-hb-status":true}}"#,
        )
        .unwrap();
        let bytes = encode(&json).unwrap();
        assert_eq!(decode(&bytes).unwrap(), json);
        assert_eq!(from_hex(to_hex(&bytes).as_bytes()).unwrap(), bytes);
        assert!(encode(&serde_json::json!({"no-such-thing": 1})).is_err());
    }
}
