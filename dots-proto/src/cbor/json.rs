//! JSON <-> CBOR conversion of DOTS bodies, driven by the key map.
//!
//! The JSON side follows the RFC figures and RFC 7951: enumerations as their
//! names, 64-bit counters and decimal64 values as strings. On input the
//! converter also takes numbers for those (and numeric strings for integers),
//! as several implementations write them that way.

use ciborium::value::Value;
use serde_json::{Map, Value as Json};

use super::error::join;
use super::fields::{
    as_array, as_bool, as_decimal, as_int, as_text, as_uint, decimal_value, map_entries,
};
use super::keys::{self, KeyDef, ValueType};
use super::{decode, encode, CborError, Decimal};

/// Converts the JSON form of a DOTS body into its CBOR encoding.
pub fn json_to_cbor(json: &Json) -> Result<Vec<u8>, CborError> {
    Ok(encode(&object_to_cbor(json, "")?))
}

/// Converts a CBOR-encoded DOTS body into its JSON form. Unknown
/// comprehension-optional keys are dropped, unknown comprehension-required
/// keys are an error.
pub fn cbor_to_json(bytes: &[u8]) -> Result<Json, CborError> {
    map_to_json(&decode(bytes)?, "")
}

fn map_to_json(v: &Value, path: &str) -> Result<Json, CborError> {
    let known: Vec<u64> = keys::KEYS.iter().map(|d| d.key).collect();
    let mut out = Map::new();
    for (key, child) in map_entries(v, path, &known)? {
        // `known` lists only table keys, so the lookup cannot miss.
        let Some(def) = keys::by_key(key) else {
            continue;
        };
        let child_path = join(path, def.name);
        out.insert(def.name.to_owned(), leaf_to_json(def, child, &child_path)?);
    }
    Ok(Json::Object(out))
}

fn out_of_range(path: &str, n: impl std::fmt::Display) -> CborError {
    CborError::Value {
        path: path.to_owned(),
        reason: format!("{n} is out of range"),
    }
}

fn leaf_to_json(def: &KeyDef, v: &Value, path: &str) -> Result<Json, CborError> {
    let items = |v| -> Result<Vec<(String, &Value)>, CborError> {
        Ok(as_array(v, path)?
            .iter()
            .enumerate()
            .map(|(i, item)| (join(path, &i.to_string()), item))
            .collect())
    };
    let bounded = |v: &Value, p: &str, max: u64| -> Result<Json, CborError> {
        let n = as_uint(v, p)?;
        if n > max {
            return Err(out_of_range(p, n));
        }
        Ok(Json::from(n))
    };
    Ok(match def.ty {
        ValueType::Container => map_to_json(v, path)?,
        ValueType::List => Json::Array(
            items(v)?
                .into_iter()
                .map(|(p, item)| map_to_json(item, &p))
                .collect::<Result<_, _>>()?,
        ),
        ValueType::Text => Json::from(as_text(v, path)?),
        ValueType::TextList => Json::Array(
            items(v)?
                .into_iter()
                .map(|(p, item)| as_text(item, &p).map(Json::from))
                .collect::<Result<_, _>>()?,
        ),
        ValueType::Uint { max } => bounded(v, path, max)?,
        ValueType::UintList { max } => Json::Array(
            items(v)?
                .into_iter()
                .map(|(p, item)| bounded(item, &p, max))
                .collect::<Result<_, _>>()?,
        ),
        ValueType::Uint64 => Json::from(as_uint(v, path)?.to_string()),
        ValueType::Lifetime => {
            let n = as_int(v, path)?;
            if !(i64::from(i32::MIN)..=i64::from(u32::MAX)).contains(&n) {
                return Err(out_of_range(path, n));
            }
            Json::from(n)
        }
        ValueType::Enum(names) => {
            let code = as_uint(v, path)?;
            match names.iter().find(|(c, _)| *c == code) {
                Some((_, name)) => Json::from(*name),
                // A code registered after this table was written: keep it.
                None => Json::from(code),
            }
        }
        ValueType::Bool => Json::Bool(as_bool(v, path)?),
        ValueType::Decimal => Json::from(as_decimal(v, path)?.to_string()),
    })
}

fn json_type(j: &Json) -> String {
    match j {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("boolean {b}"),
        Json::Number(n) => format!("number {n}"),
        Json::String(s) => format!("string \"{s}\""),
        Json::Array(_) => "array".into(),
        Json::Object(_) => "object".into(),
    }
}

fn json_type_error(path: &str, expected: &'static str, j: &Json) -> CborError {
    CborError::Type {
        path: path.to_owned(),
        expected,
        found: json_type(j),
    }
}

fn object_to_cbor(j: &Json, path: &str) -> Result<Value, CborError> {
    let Json::Object(members) = j else {
        return Err(json_type_error(path, "an object", j));
    };
    let mut entries = Vec::with_capacity(members.len());
    for (name, child) in members {
        let def = keys::by_name(name).ok_or_else(|| CborError::UnknownName {
            path: path.to_owned(),
            name: name.clone(),
        })?;
        entries.push((def.key, leaf_to_cbor(def, child, &join(path, name))?));
    }
    // Deterministic output whatever the JSON member order.
    entries.sort_by_key(|(k, _)| *k);
    Ok(Value::Map(
        entries.into_iter().map(|(k, v)| (k.into(), v)).collect(),
    ))
}

/// An unsigned integer written as a JSON number or a numeric string.
fn json_uint(j: &Json, path: &str, max: u64) -> Result<u64, CborError> {
    let n = match j {
        Json::Number(n) => n.as_u64(),
        Json::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| json_type_error(path, "an unsigned integer", j))?;
    if n > max {
        return Err(out_of_range(path, n));
    }
    Ok(n)
}

fn json_decimal(j: &Json, path: &str) -> Result<Decimal, CborError> {
    let text = match j {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return Err(json_type_error(path, "a decimal string", j)),
    };
    text.parse()
        .map_err(|e: super::decimal::ParseDecimalError| CborError::Value {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

fn json_items<'a>(j: &'a Json, path: &str) -> Result<Vec<(String, &'a Json)>, CborError> {
    let Json::Array(items) = j else {
        return Err(json_type_error(path, "an array", j));
    };
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| (join(path, &i.to_string()), item))
        .collect())
}

fn json_text(j: &Json, path: &str) -> Result<Value, CborError> {
    match j {
        Json::String(s) => Ok(Value::Text(s.clone())),
        _ => Err(json_type_error(path, "a string", j)),
    }
}

fn leaf_to_cbor(def: &KeyDef, j: &Json, path: &str) -> Result<Value, CborError> {
    let array = |f: &dyn Fn(&Json, &str) -> Result<Value, CborError>| {
        json_items(j, path)?
            .into_iter()
            .map(|(p, item)| f(item, &p))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array)
    };
    Ok(match def.ty {
        ValueType::Container => object_to_cbor(j, path)?,
        ValueType::List => array(&|item, p| object_to_cbor(item, p))?,
        ValueType::Text => json_text(j, path)?,
        ValueType::TextList => array(&json_text)?,
        ValueType::Uint { max } => json_uint(j, path, max)?.into(),
        ValueType::UintList { max } => array(&|item, p| json_uint(item, p, max).map(Value::from))?,
        ValueType::Uint64 => json_uint(j, path, u64::MAX)?.into(),
        ValueType::Lifetime => match j.as_i64() {
            Some(n) if (i64::from(i32::MIN)..=i64::from(u32::MAX)).contains(&n) => n.into(),
            Some(n) => return Err(out_of_range(path, n)),
            None => return Err(json_type_error(path, "an integer", j)),
        },
        ValueType::Enum(names) => match j {
            Json::String(s) => match names.iter().find(|(_, n)| n == s) {
                Some((code, _)) => (*code).into(),
                None => {
                    return Err(CborError::Value {
                        path: path.to_owned(),
                        reason: format!("\"{s}\" is not a known {} value", def.name),
                    })
                }
            },
            _ => json_uint(j, path, u64::MAX)?.into(),
        },
        ValueType::Bool => match j {
            Json::Bool(b) => Value::Bool(*b),
            _ => return Err(json_type_error(path, "a boolean", j)),
        },
        ValueType::Decimal => decimal_value(json_decimal(j, path)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 9066 Figure 10: a Call Home mitigation request.
    fn figure_10() -> Json {
        json!({
            "ietf-dots-signal-channel:mitigation-scope": {
                "scope": [{
                    "target-prefix": ["2001:db8:c000::/128"],
                    "ietf-dots-call-home:source-prefix": ["2001:db8:123::1/128"],
                    "lifetime": 3600
                }]
            }
        })
    }

    // {1: {2: [{6: ["2001:db8:c000::/128"], 14: 3600, 32768: ["2001:db8:123::1/128"]}]}}
    const FIGURE_10_HEX: &str = concat!(
        "a1",                                     // map(1)
        "01",                                     //   1: mitigation-scope
        "a1",                                     //   map(1)
        "02",                                     //     2: scope
        "81",                                     //     array(1)
        "a3",                                     //       map(3)
        "06",                                     //         6: target-prefix
        "81",                                     //         array(1)
        "73",                                     //           text(19)
        "323030313a6462383a633030303a3a2f313238", // "2001:db8:c000::/128"
        "0e",                                     //         14: lifetime
        "190e10",                                 //         3600
        "198000",                                 //         32768: source-prefix
        "81",                                     //         array(1)
        "73",                                     //           text(19)
        "323030313a6462383a3132333a3a312f313238", // "2001:db8:123::1/128"
    );

    /// RFC 9066 Figure 9: a Call Home redirect.
    fn figure_9() -> Json {
        json!({
            "ietf-dots-signal-channel:redirected-signal": {
                "ietf-dots-call-home:alt-ch-client": "alt-call-home-client.example",
                "ietf-dots-call-home:alt-ch-client-record": [
                    "2001:db8:6401::1",
                    "2001:db8:6401::2"
                ],
                "ietf-dots-call-home:ttl": 600
            }
        })
    }

    const FIGURE_9_HEX: &str = concat!(
        "a1",                                                       // map(1)
        "182e",                                                     //   46: redirected-signal
        "a3",                                                       //   map(3)
        "198005",                                                   //     32773: alt-ch-client
        "781c",                                                     //     text(28)
        "616c742d63616c6c2d686f6d652d636c69656e742e6578616d706c65", // "alt-call-home-client.example"
        "198006",                           //     32774: alt-ch-client-record
        "82",                               //     array(2)
        "70",                               //       text(16)
        "323030313a6462383a363430313a3a31", // "2001:db8:6401::1"
        "70",                               //       text(16)
        "323030313a6462383a363430313a3a32", // "2001:db8:6401::2"
        "198007",                           //     32775: ttl
        "190258",                           //     600
    );

    #[test]
    fn figure_10_json_to_cbor_matches_hand_encoding() {
        let bytes = json_to_cbor(&figure_10()).expect("converts");
        assert_eq!(hex::encode(&bytes), FIGURE_10_HEX);
    }

    #[test]
    fn figure_10_hand_encoding_decodes_to_the_figure() {
        let bytes = hex::decode(FIGURE_10_HEX).expect("hex");
        assert_eq!(cbor_to_json(&bytes), Ok(figure_10()));
    }

    #[test]
    fn figure_9_both_ways() {
        let bytes = json_to_cbor(&figure_9()).expect("converts");
        assert_eq!(hex::encode(&bytes), FIGURE_9_HEX);
        assert_eq!(cbor_to_json(&bytes), Ok(figure_9()));
    }

    #[test]
    fn source_port_and_icmp_ranges_round_trip() {
        let request = json!({
            "ietf-dots-signal-channel:mitigation-scope": {
                "scope": [{
                    "target-prefix": ["203.0.113.0/24"],
                    "target-protocol": [6, 17],
                    "ietf-dots-call-home:source-prefix": ["192.0.2.10/32"],
                    "ietf-dots-call-home:source-port-range": [
                        {"lower-port": 1024, "upper-port": 65535},
                        {"lower-port": 53}
                    ],
                    "ietf-dots-call-home:source-icmp-type-range": [
                        {"lower-type": 0, "upper-type": 8}
                    ],
                    "lifetime": -1,
                    "trigger-mitigation": true
                }]
            }
        });
        let bytes = json_to_cbor(&request).expect("converts");
        // lower-type / upper-type use keys 32771 / 32772 inside key 32770.
        let hex = hex::encode(&bytes);
        assert!(hex.contains("198002" /* 32770 */), "{hex}");
        assert!(
            hex.contains("a21980030019800408" /* {32771: 0, 32772: 8} */),
            "{hex}"
        );
        assert_eq!(cbor_to_json(&bytes), Ok(request));
    }

    #[test]
    fn rfc7951_forms_for_enums_counters_and_decimals() {
        let status = json!({
            "ietf-dots-signal-channel:mitigation-scope": {
                "scope": [{
                    "mid": 56,
                    "mitigation-start": "1507818434",
                    "status": "attack-successfully-mitigated",
                    "bytes-dropped": "134334555",
                    "conflict-information": {
                        "conflict-cause": "request-rejected-legitimate-traffic"
                    }
                }]
            }
        });
        let bytes = json_to_cbor(&status).expect("converts");
        assert_eq!(cbor_to_json(&bytes), Ok(status));

        let config = json!({
            "ietf-dots-signal-channel:signal-config": {
                "mitigating-config": {
                    "ack-timeout": {"max-value-decimal": "30.00", "current-value-decimal": "2.00"}
                }
            }
        });
        let bytes = json_to_cbor(&config).expect("converts");
        // 39: {41: 4([-2, 3000]), 43: 4([-2, 200])}
        assert!(hex::encode(&bytes).contains("1827a21829c48221190bb8182bc4822118c8"));
        assert_eq!(cbor_to_json(&bytes), Ok(config));
    }

    #[test]
    fn numbers_are_accepted_for_enums_counters_and_decimals() {
        let lenient = json!({
            "ietf-dots-signal-channel:mitigation-scope": {
                "scope": [{"status": 2, "bytes-dropped": 10}]
            },
            "ietf-dots-signal-channel:signal-config": {
                "idle-config": {"ack-random-factor": {"current-value-decimal": 1.5}}
            }
        });
        let back = cbor_to_json(&json_to_cbor(&lenient).expect("converts")).expect("decodes");
        let scope = &back["ietf-dots-signal-channel:mitigation-scope"]["scope"][0];
        assert_eq!(scope["status"], "attack-successfully-mitigated");
        assert_eq!(scope["bytes-dropped"], "10");
        assert_eq!(
            back["ietf-dots-signal-channel:signal-config"]["idle-config"]["ack-random-factor"]
                ["current-value-decimal"],
            "1.50"
        );
    }

    #[test]
    fn json_errors_name_the_path() {
        let mut bad = figure_10();
        bad["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["lifetime"] = json!("soon");
        let err = json_to_cbor(&bad).expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0/lifetime: expected an integer, found string \"soon\""
        );

        let mut bad = figure_10();
        bad["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["source-prefix"] = json!([]);
        let err = json_to_cbor(&bad).expect_err("rejects");
        assert_eq!(
            err,
            CborError::UnknownName {
                path: "/ietf-dots-signal-channel:mitigation-scope/scope/0".into(),
                name: "source-prefix".into()
            }
        );

        let bad = json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [
            {"target-port-range": [{"lower-port": 70000}]}
        ]}});
        let err = json_to_cbor(&bad).expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0/target-port-range/0/lower-port: 70000 is out of range"
        );
    }

    #[test]
    fn unknown_comprehension_optional_key_is_dropped() {
        // {1: {2: [{14: 3600, 32800: "x"}]}}: 32800 (0x8020) is unknown but optional.
        let bytes = hex::decode("a101a10281a20e190e101980206178").expect("hex");
        assert_eq!(
            cbor_to_json(&bytes),
            Ok(
                json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [{"lifetime": 3600}]}})
            )
        );
    }

    #[test]
    fn unknown_comprehension_required_key_is_rejected() {
        // {1: {2: [{14: 3600, 99: 1}]}}: 99 is unknown and required.
        let bytes = hex::decode("a101a10281a20e190e10186301").expect("hex");
        assert_eq!(
            cbor_to_json(&bytes),
            Err(CborError::UnknownKey {
                path: "/ietf-dots-signal-channel:mitigation-scope/scope/0".into(),
                key: 99
            })
        );
    }

    #[test]
    fn malformed_cbor_is_rejected() {
        assert!(matches!(cbor_to_json(&[]), Err(CborError::Syntax(_))));
        assert!(matches!(
            cbor_to_json(&[0xa1, 0x01]),
            Err(CborError::Syntax(_))
        ));
        assert_eq!(cbor_to_json(&[0xa0, 0x00]), Err(CborError::Trailing(1)));
        // {1: {}, 1: {}}
        assert_eq!(
            cbor_to_json(&[0xa2, 0x01, 0xa0, 0x01, 0xa0]),
            Err(CborError::Duplicate {
                path: "/ietf-dots-signal-channel:mitigation-scope".into()
            })
        );
        // {"a": 1}: text keys are not DOTS keys.
        assert!(matches!(
            cbor_to_json(&[0xa1, 0x61, 0x61, 0x01]),
            Err(CborError::BadKey { .. })
        ));
    }
}
