//! Typed access to one CBOR map of a DOTS body, applying the comprehension
//! rules of RFC 9132 §9 once, at the map boundary: unknown
//! comprehension-optional keys are skipped, unknown comprehension-required
//! keys and known keys out of place are rejected.

use ciborium::value::Value;

use super::error::join;
use super::keys::{self, is_comprehension_optional};
use super::{CborError, Decimal};

/// Short name of a value's CBOR type, for error messages.
pub(crate) fn kind(v: &Value) -> String {
    match v {
        Value::Integer(i) => format!("integer {}", i128::from(*i)),
        Value::Bytes(_) => "byte string".into(),
        Value::Float(f) => format!("float {f}"),
        Value::Text(t) => format!("text \"{t}\""),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Null => "null".into(),
        Value::Tag(t, _) => format!("tag {t}"),
        Value::Array(_) => "array".into(),
        Value::Map(_) => "map".into(),
        _ => "unsupported item".into(),
    }
}

fn type_error(path: &str, expected: &'static str, v: &Value) -> CborError {
    CborError::Type {
        path: path.to_owned(),
        expected,
        found: kind(v),
    }
}

pub(crate) fn as_uint(v: &Value, path: &str) -> Result<u64, CborError> {
    match v {
        Value::Integer(i) => {
            u64::try_from(*i).map_err(|_| type_error(path, "an unsigned integer", v))
        }
        _ => Err(type_error(path, "an unsigned integer", v)),
    }
}

/// An unsigned integer narrowed to `T`, with the range named on failure.
pub(crate) fn as_uint_in<T: TryFrom<u64>>(v: &Value, path: &str) -> Result<T, CborError> {
    let n = as_uint(v, path)?;
    T::try_from(n).map_err(|_| CborError::Value {
        path: path.to_owned(),
        reason: format!("{n} is out of range"),
    })
}

pub(crate) fn as_int(v: &Value, path: &str) -> Result<i64, CborError> {
    match v {
        Value::Integer(i) => i64::try_from(*i).map_err(|_| CborError::Value {
            path: path.to_owned(),
            reason: format!("{} is out of range", i128::from(*i)),
        }),
        _ => Err(type_error(path, "an integer", v)),
    }
}

pub(crate) fn as_text<'a>(v: &'a Value, path: &str) -> Result<&'a str, CborError> {
    match v {
        Value::Text(t) => Ok(t),
        _ => Err(type_error(path, "a text string", v)),
    }
}

pub(crate) fn as_bool(v: &Value, path: &str) -> Result<bool, CborError> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => Err(type_error(path, "a boolean", v)),
    }
}

pub(crate) fn as_array<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], CborError> {
    match v {
        Value::Array(items) => Ok(items),
        _ => Err(type_error(path, "an array", v)),
    }
}

/// A decimal fraction `4([exponent, mantissa])` (RFC 8949 §3.4.4).
pub(crate) fn as_decimal(v: &Value, path: &str) -> Result<Decimal, CborError> {
    const EXPECTED: &str = "a decimal fraction 4([exponent, mantissa])";
    let Value::Tag(4, inner) = v else {
        return Err(type_error(path, EXPECTED, v));
    };
    let parts = match inner.as_ref() {
        Value::Array(parts) => parts.as_slice(),
        other => return Err(type_error(path, EXPECTED, other)),
    };
    let [Value::Integer(e), Value::Integer(m)] = parts else {
        return Err(type_error(path, EXPECTED, inner));
    };
    let (e, m) = (i128::from(*e), i128::from(*m));
    i64::try_from(e)
        .ok()
        .and_then(|e| Decimal::from_fraction(m, e))
        .ok_or_else(|| CborError::Value {
            path: path.to_owned(),
            reason: format!("{m}e{e} is not exact in hundredths or out of range"),
        })
}

/// Encodes a decimal as `4([-2, hundredths])`.
pub(crate) fn decimal_value(d: Decimal) -> Value {
    Value::Tag(
        4,
        Box::new(Value::Array(vec![(-2i64).into(), d.hundredths().into()])),
    )
}

/// The map's key and value, checked against the comprehension rules.
pub(crate) fn map_entries<'a>(
    v: &'a Value,
    path: &str,
    allowed: &[u64],
) -> Result<Vec<(u64, &'a Value)>, CborError> {
    let Value::Map(pairs) = v else {
        return Err(type_error(path, "a map", v));
    };
    let mut out: Vec<(u64, &Value)> = Vec::with_capacity(pairs.len());
    for (k, value) in pairs {
        let key = match k {
            Value::Integer(i) => u64::try_from(*i).ok(),
            _ => None,
        }
        .ok_or_else(|| CborError::BadKey {
            path: path.to_owned(),
            found: kind(k),
        })?;
        if out.iter().any(|(seen, _)| *seen == key) {
            return Err(CborError::Duplicate {
                path: join(path, &keys::describe(key)),
            });
        }
        if allowed.contains(&key) {
            out.push((key, value));
        } else if is_comprehension_optional(key) {
            // Unknown or out-of-place optional key: ignored by rule.
        } else if let Some(name) = keys::name_of(key) {
            return Err(CborError::Unexpected {
                path: path.to_owned(),
                name: name.to_owned(),
            });
        } else {
            return Err(CborError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        }
    }
    Ok(out)
}

/// The checked entries of one map with typed getters for its children.
pub(crate) struct Fields<'a> {
    path: String,
    entries: Vec<(u64, &'a Value)>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(v: &'a Value, path: &str, allowed: &[u64]) -> Result<Self, CborError> {
        Ok(Self {
            path: path.to_owned(),
            entries: map_entries(v, path, allowed)?,
        })
    }

    pub(crate) fn path(&self, key: u64) -> String {
        join(&self.path, &keys::describe(key))
    }

    pub(crate) fn get(&self, key: u64) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    pub(crate) fn require(&self, key: u64) -> Result<&'a Value, CborError> {
        self.get(key).ok_or_else(|| CborError::Missing {
            path: self.path.clone(),
            name: keys::name_of(key).unwrap_or("?"),
        })
    }

    /// Applies `f` to the child at `key`, if present, with its path.
    pub(crate) fn opt<T>(
        &self,
        key: u64,
        f: impl FnOnce(&'a Value, &str) -> Result<T, CborError>,
    ) -> Result<Option<T>, CborError> {
        self.get(key).map(|v| f(v, &self.path(key))).transpose()
    }

    pub(crate) fn uint<T: TryFrom<u64>>(&self, key: u64) -> Result<Option<T>, CborError> {
        self.opt(key, as_uint_in)
    }

    pub(crate) fn text(&self, key: u64) -> Result<Option<String>, CborError> {
        self.opt(key, |v, p| as_text(v, p).map(str::to_owned))
    }

    pub(crate) fn bool(&self, key: u64) -> Result<Option<bool>, CborError> {
        self.opt(key, as_bool)
    }

    /// An array child (absent = empty), each item converted by `f`. An
    /// empty array is refused: a leaf-list or list without entries has no
    /// instance, and its encoding leaves it out (RFC 7951 §5.3-5.4, RFC
    /// 9254 §4.3-4.4); reading `[]` as "absent" would turn a client's "none
    /// of these" into "any".
    pub(crate) fn list<T>(
        &self,
        key: u64,
        f: impl Fn(&'a Value, &str) -> Result<T, CborError>,
    ) -> Result<Vec<T>, CborError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let path = self.path(key);
        let items = as_array(v, &path)?;
        if items.is_empty() {
            return Err(CborError::Value {
                path,
                reason: "empty array: leave the node out instead".into(),
            });
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| f(item, &join(&path, &i.to_string())))
            .collect()
    }

    pub(crate) fn text_list(&self, key: u64) -> Result<Vec<String>, CborError> {
        self.list(key, |v, p| as_text(v, p).map(str::to_owned))
    }

    /// A leaf-list of text parsed into `T` (prefixes, addresses).
    pub(crate) fn parsed_list<T: std::str::FromStr>(
        &self,
        key: u64,
        what: &str,
    ) -> Result<Vec<T>, CborError> {
        self.list(key, |v, p| {
            let t = as_text(v, p)?;
            t.parse().map_err(|_| CborError::Value {
                path: p.to_owned(),
                reason: format!("\"{t}\" is not {what}"),
            })
        })
    }
}

/// Builds a CBOR map, leaving out absent and empty children.
#[derive(Default)]
pub(crate) struct MapBuilder(Vec<(u64, Value)>);

impl MapBuilder {
    pub(crate) fn put(mut self, key: u64, v: Value) -> Self {
        self.0.push((key, v));
        self
    }

    pub(crate) fn opt(self, key: u64, v: Option<Value>) -> Self {
        match v {
            Some(v) => self.put(key, v),
            None => self,
        }
    }

    pub(crate) fn uint(self, key: u64, v: Option<impl Into<u64>>) -> Self {
        self.opt(key, v.map(|n| Value::from(n.into())))
    }

    pub(crate) fn text(self, key: u64, v: Option<&str>) -> Self {
        self.opt(key, v.map(|t| Value::Text(t.to_owned())))
    }

    pub(crate) fn list(self, key: u64, items: Vec<Value>) -> Self {
        if items.is_empty() {
            self
        } else {
            self.put(key, Value::Array(items))
        }
    }

    /// A leaf-list written with `Display` (prefixes, addresses, names).
    pub(crate) fn display_list<T: std::fmt::Display>(self, key: u64, items: &[T]) -> Self {
        self.list(
            key,
            items.iter().map(|i| Value::Text(i.to_string())).collect(),
        )
    }

    /// `None` when nothing was put, so empty containers are left out.
    pub(crate) fn build_nonempty(self) -> Option<Value> {
        (!self.0.is_empty()).then(|| self.build())
    }

    pub(crate) fn build(mut self) -> Value {
        self.0.sort_by_key(|(k, _)| *k);
        Value::Map(self.0.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}
