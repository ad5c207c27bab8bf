//! Errors of the CBOR and JSON codecs. Each names where it happened as a
//! JSON-pointer-like path of data node names, e.g.
//! `/ietf-dots-signal-channel:mitigation-scope/scope/0/lifetime`.

/// A DOTS body that cannot be decoded, encoded or converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    #[error("malformed CBOR: {0}")]
    Syntax(String),
    #[error("{0} trailing byte(s) after the CBOR data item")]
    Trailing(usize),
    #[error("{path}: unknown comprehension-required key {key}")]
    UnknownKey { path: String, key: u64 },
    #[error("{path}: unknown data node \"{name}\"")]
    UnknownName { path: String, name: String },
    #[error("{path}: \"{name}\" is not allowed here")]
    Unexpected { path: String, name: String },
    #[error("{path}: map key must be an unsigned integer, found {found}")]
    BadKey { path: String, found: String },
    #[error("{path}: key appears more than once")]
    Duplicate { path: String },
    #[error("{path}: expected {expected}, found {found}")]
    Type {
        path: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: {reason}")]
    Value { path: String, reason: String },
    #[error("{path}: missing mandatory \"{name}\"")]
    Missing { path: String, name: &'static str },
}

impl CborError {
    /// Every codec error means the body is malformed: 4.00 (Bad Request),
    /// RFC 9132 §4.4.1 ("contains invalid or unknown parameters").
    pub fn coap_code(&self) -> (u8, u8) {
        (4, 0)
    }

    /// Text for the diagnostic payload of the error response.
    pub fn diagnostic(&self) -> String {
        self.to_string()
    }
}

/// Appends one segment to a path, escaping as RFC 6901 does.
pub(crate) fn join(path: &str, segment: &str) -> String {
    format!("{path}/{}", segment.replace('~', "~0").replace('/', "~1"))
}
