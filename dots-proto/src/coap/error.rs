//! Error types of the CoAP layer, and the error responses built from them.

use coap_lite::{MessageClass, Packet, ResponseType};

/// Errors returned by the endpoints and message helpers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoapError {
    /// The peer sent bytes that are not a CoAP message.
    #[error("malformed CoAP message: {0}")]
    Malformed(String),
    /// Transmission parameters out of range (see [`super::TransmissionParams::validate`]).
    #[error("invalid transmission parameters: {0}")]
    InvalidParams(&'static str),
    /// `respond` was called with an id that is not (or no longer) pending.
    #[error("no pending request with this id")]
    UnknownRequest,
    /// `notify` was called for a token that has no registered observer.
    #[error("no observer registered with this token")]
    UnknownObserver,
    /// The message is bigger than what the peer (or the transport) accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The message cannot be encoded (e.g. an option value too long).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A token must have 0 to 8 bytes.
    #[error("invalid token length {0}")]
    BadToken(usize),
    /// The stream endpoint was released or aborted.
    #[error("connection closed")]
    Closed,
}

/// An error that the caller turns into a CoAP error response: a code and a
/// diagnostic payload (RFC 7252 §5.5.2), or a DOTS CBOR body where the
/// protocol gives the error one (RFC 9132 §4.4.1: 4.09 carries
/// `conflict-information`); the diagnostic then only goes to the log.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorResponse {
    pub code: ResponseType,
    pub diagnostic: String,
    /// CBOR body (Content-Format 271) sent instead of the diagnostic.
    pub body: Option<Vec<u8>>,
}

impl ErrorResponse {
    pub fn new(code: ResponseType, diagnostic: impl Into<String>) -> Self {
        ErrorResponse {
            code,
            diagnostic: diagnostic.into(),
            body: None,
        }
    }

    /// An error answered with a DOTS CBOR body.
    pub fn with_body(code: ResponseType, diagnostic: impl Into<String>, cbor: Vec<u8>) -> Self {
        ErrorResponse {
            body: Some(cbor),
            ..Self::new(code, diagnostic)
        }
    }

    /// The response message (without token: the endpoint sets it).
    pub fn to_packet(&self) -> Packet {
        match &self.body {
            Some(cbor) => super::msg::cbor_response(self.code, cbor.clone()),
            None => diagnostic_response(self.code, &self.diagnostic),
        }
    }
}

/// An error response with a diagnostic payload: no Content-Format, the
/// payload is UTF-8 text for humans (RFC 7252 §5.5.2).
pub fn diagnostic_response(code: ResponseType, diagnostic: &str) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p.payload = diagnostic.as_bytes().to_vec();
    p
}

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            MessageClass::Response(self.code),
            self.diagnostic
        )
    }
}

impl std::error::Error for ErrorResponse {}
