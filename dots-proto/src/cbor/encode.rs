//! A small deterministic CBOR encoder: shortest argument encoding, definite
//! lengths, map entries in the order given. Unlike a `Write`-based
//! serialiser it cannot fail, so encoding a message returns plain bytes.

use ciborium::value::Value;

/// Encodes one data item.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, value);
    out
}

fn head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend([m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(arg.to_be_bytes());
        }
    }
}

fn write(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Integer(i) => {
            let n = i128::from(*i);
            // ciborium integers lie in [-2^64, 2^64 - 1], so both arms fit a u64.
            if n >= 0 {
                head(out, 0, n as u64);
            } else {
                head(out, 1, (-1 - n) as u64);
            }
        }
        Value::Bytes(b) => {
            head(out, 2, b.len() as u64);
            out.extend(b);
        }
        Value::Text(t) => {
            head(out, 3, t.len() as u64);
            out.extend(t.as_bytes());
        }
        Value::Array(items) => {
            head(out, 4, items.len() as u64);
            items.iter().for_each(|v| write(out, v));
        }
        Value::Map(entries) => {
            head(out, 5, entries.len() as u64);
            for (k, v) in entries {
                write(out, k);
                write(out, v);
            }
        }
        Value::Tag(tag, inner) => {
            head(out, 6, *tag);
            write(out, inner);
        }
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Null => out.push(0xf6),
        Value::Float(f) => {
            out.push(0xfb);
            out.extend(f.to_bits().to_be_bytes());
        }
        // `Value` is non-exhaustive; this crate never builds other variants.
        _ => out.push(0xf7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(v: &Value) -> String {
        hex::encode(encode(v))
    }

    #[test]
    fn rfc8949_appendix_a_vectors() {
        assert_eq!(hex(&Value::from(0u64)), "00");
        assert_eq!(hex(&Value::from(23u64)), "17");
        assert_eq!(hex(&Value::from(24u64)), "1818");
        assert_eq!(hex(&Value::from(1000u64)), "1903e8");
        assert_eq!(hex(&Value::from(1_000_000u64)), "1a000f4240");
        assert_eq!(hex(&Value::from(u64::MAX)), "1bffffffffffffffff");
        assert_eq!(hex(&Value::from(-1i64)), "20");
        assert_eq!(hex(&Value::from(-1000i64)), "3903e7");
        assert_eq!(hex(&Value::Text("IETF".into())), "6449455446");
        assert_eq!(hex(&Value::Bool(true)), "f5");
        assert_eq!(
            hex(&Value::Tag(
                4,
                Box::new(Value::Array(vec![(-2i64).into(), 27315u64.into()]))
            )),
            "c48221196ab3"
        );
    }

    #[test]
    fn round_trips_through_ciborium() {
        let v = Value::Map(vec![(
            Value::from(1u64),
            Value::Array(vec![
                Value::Text("x".into()),
                Value::from(-5i64),
                Value::Null,
            ]),
        )]);
        let back: Value = ciborium::de::from_reader(&encode(&v)[..]).expect("decodes");
        assert_eq!(back, v);
    }
}
