//! Message helpers on top of `coap_lite::Packet`: tokens, options used by
//! DOTS (Uri-Path, Content-Format, Observe, If-Match) and response builders.

use coap_lite::{
    option_value::OptionValueU16, CoapOption, MessageClass, Packet, RequestType, ResponseType,
};

// Error responses are built next to `ErrorResponse`; the builder is
// offered here too, with the other message builders.
pub use super::error::diagnostic_response;
use super::error::{CoapError, ErrorResponse};

/// Content-Format `application/dots+cbor` (RFC 9132 §10.4).
pub const CONTENT_FORMAT_DOTS_CBOR: u16 = 271;

/// A CoAP token (0 to 8 bytes), `Copy` so it can key maps cheaply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token {
    len: u8,
    bytes: [u8; 8],
}

impl Token {
    /// The zero-length token.
    pub const EMPTY: Token = Token {
        len: 0,
        bytes: [0; 8],
    };

    /// The token in `bytes`, or `None` when longer than 8 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Token> {
        if bytes.len() > 8 {
            return None;
        }
        let mut t = Token {
            len: bytes.len() as u8,
            bytes: [0; 8],
        };
        t.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(t)
    }

    /// An 8-byte token from a random value.
    pub fn from_u64(v: u64) -> Token {
        Token {
            len: 8,
            bytes: v.to_be_bytes(),
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The token of a packet (coap-lite already refuses longer tokens).
    pub fn of(packet: &Packet) -> Result<Token, CoapError> {
        Token::from_slice(packet.get_token()).ok_or(CoapError::BadToken(packet.get_token().len()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A new request with the Uri-Path segments of `path`.
pub fn request(method: RequestType, path: &[String]) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(method);
    for segment in path {
        p.add_option(CoapOption::UriPath, segment.clone().into_bytes());
    }
    p
}

/// A response with only a code.
pub fn response(code: ResponseType) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p
}

/// A response carrying a DOTS CBOR body (Content-Format 271).
pub fn cbor_response(code: ResponseType, cbor: Vec<u8>) -> Packet {
    let mut p = response(code);
    set_content_format(&mut p, CONTENT_FORMAT_DOTS_CBOR);
    p.payload = cbor;
    p
}

/// The request method, `None` for responses, empty and reserved codes.
pub fn method(packet: &Packet) -> Option<RequestType> {
    match packet.header.code {
        MessageClass::Request(m) => Some(m),
        _ => None,
    }
}

/// True for 2.xx responses.
pub fn is_success(packet: &Packet) -> bool {
    matches!(packet.header.code, MessageClass::Response(r) if !r.is_error())
}

/// The raw Content-Format number (coap-lite maps only known formats).
pub fn content_format(packet: &Packet) -> Option<u16> {
    packet
        .get_first_option_as::<OptionValueU16>(CoapOption::ContentFormat)
        .and_then(|v| v.ok())
        .map(|v| v.0)
}

pub fn set_content_format(packet: &mut Packet, format: u16) {
    packet.clear_option(CoapOption::ContentFormat);
    packet.add_option_as(CoapOption::ContentFormat, OptionValueU16(format));
}

/// Checks that a request carrying a body declares `application/dots+cbor`;
/// otherwise the 4.15 answer to send (RFC 7252 §5.10.3).
pub fn require_dots_cbor(request: &Packet) -> Result<(), ErrorResponse> {
    if request.payload.is_empty() {
        return Ok(());
    }
    match content_format(request) {
        Some(CONTENT_FORMAT_DOTS_CBOR) => Ok(()),
        Some(other) => Err(ErrorResponse::new(
            ResponseType::UnsupportedContentFormat,
            format!("Content-Format {other} not supported, expected 271 (application/dots+cbor)"),
        )),
        None => Err(ErrorResponse::new(
            ResponseType::UnsupportedContentFormat,
            "missing Content-Format, expected 271 (application/dots+cbor)",
        )),
    }
}

/// The Observe value, `None` if absent or longer than 3 bytes (RFC 7641 §2).
pub fn observe(packet: &Packet) -> Option<u32> {
    packet
        .get_first_option(CoapOption::Observe)
        .and_then(|v| decode_uint(v, 3))
}

/// A CoAP uint option value of at most `max_len` bytes (RFC 7252 §3.2).
pub(crate) fn decode_uint(bytes: &[u8], max_len: usize) -> Option<u32> {
    (bytes.len() <= max_len.min(4))
        .then(|| bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// The longest option value the option header can express (RFC 7252 §3.1).
const MAX_OPTION_LEN: usize = 65535 + 269;

/// Rejects packets coap-lite would encode wrongly (it truncates silently).
pub(crate) fn check_encodable(packet: &Packet) -> Result<(), CoapError> {
    if packet.get_token().len() > 8 {
        return Err(CoapError::BadToken(packet.get_token().len()));
    }
    match packet
        .options()
        .flat_map(|(_, v)| v.iter())
        .find(|v| v.len() > MAX_OPTION_LEN)
    {
        Some(v) => Err(CoapError::Encode(format!(
            "option value of {} bytes",
            v.len()
        ))),
        None => Ok(()),
    }
}

/// Sets the Observe option (24-bit sequence number or 0/1 in requests).
pub fn set_observe(packet: &mut Packet, value: u32) {
    packet.set_observe_value(value & 0x00FF_FFFF);
}

/// Removes every value of an option (coap-lite's `clear_option` keeps the key
/// with an empty list, which encodes nothing and reads as absent).
pub fn remove_option(packet: &mut Packet, option: CoapOption) {
    packet.clear_option(option);
}

/// True when the request has an If-Match option with an empty value: DOTS
/// uses it to mark an efficacy update (RFC 9132 §4.4.3).
pub fn has_empty_if_match(packet: &Packet) -> bool {
    packet
        .get_option(CoapOption::IfMatch)
        .is_some_and(|values| values.iter().any(|v| v.is_empty()))
}

/// Evaluates a request's conditions (RFC 7252 §5.10.8) against the target
/// resource, which `exists` or not; DOTS resources carry no ETag:
/// * If-Match with an empty value holds when the resource exists; an
///   If-Match value (an ETag) never matches, as none was ever issued;
/// * If-None-Match holds when the resource does not exist.
///
/// A condition that does not hold is answered 4.12 (Precondition Failed)
/// and the method is not performed.
pub fn check_preconditions(request: &Packet, exists: bool) -> Result<(), ErrorResponse> {
    let failed = |why: &str| {
        Err(ErrorResponse::new(
            ResponseType::PreconditionFailed,
            why.to_string(),
        ))
    };
    // coap-lite keeps a cleared option as an empty list: that is absent.
    let present = |o| request.get_option(o).filter(|values| !values.is_empty());
    if let Some(values) = present(CoapOption::IfMatch) {
        let any_current = values.iter().any(|v| v.is_empty());
        if !(any_current && exists) {
            return failed(if any_current {
                "If-Match: the resource does not exist"
            } else {
                "If-Match: no ETag matches (this server issues none)"
            });
        }
    }
    if present(CoapOption::IfNoneMatch).is_some() && exists {
        return failed("If-None-Match: the resource exists");
    }
    Ok(())
}

/// Checks the Accept option (RFC 7252 §5.10.4) against the one
/// Content-Format DOTS answers in, 271; any other is 4.06 (Not Acceptable).
pub fn check_accept(request: &Packet) -> Result<(), ErrorResponse> {
    let Some(values) = request
        .get_option(CoapOption::Accept)
        .filter(|values| !values.is_empty())
    else {
        return Ok(());
    };
    match values.front().map(|v| decode_uint(v, 2)) {
        Some(Some(f)) if f == u32::from(CONTENT_FORMAT_DOTS_CBOR) => Ok(()),
        Some(Some(f)) => Err(ErrorResponse::new(
            ResponseType::NotAcceptable,
            format!("Accept {f}: only 271 (application/dots+cbor) is served"),
        )),
        _ => Err(ErrorResponse::new(
            ResponseType::BadRequest,
            "Accept is longer than 2 bytes",
        )),
    }
}

/// The Uri-Path segments as text.
pub fn uri_path(packet: &Packet) -> Result<Vec<String>, ErrorResponse> {
    packet
        .get_option(CoapOption::UriPath)
        .into_iter()
        .flatten()
        .map(|seg| {
            String::from_utf8(seg.clone())
                .map_err(|_| ErrorResponse::new(ResponseType::BadRequest, "Uri-Path is not UTF-8"))
        })
        .collect()
}

/// Options this layer (or DOTS above it) acts on. An unrecognized critical
/// option (odd number) in a request must get 4.02 (RFC 7252 §5.4.1).
const RECOGNIZED: [u16; 9] = [
    1,  // If-Match
    3,  // Uri-Host
    5,  // If-None-Match
    6,  // Observe
    7,  // Uri-Port
    11, // Uri-Path
    12, // Content-Format
    15, // Uri-Query
    17, // Accept
];

/// The first unrecognized critical option of a request, if any.
pub fn unrecognized_critical_option(packet: &Packet) -> Option<u16> {
    packet
        .options()
        .filter(|(_, values)| !values.is_empty())
        .map(|(n, _)| *n)
        .find(|n| n % 2 == 1 && !RECOGNIZED.contains(n))
}

/// The 4.02 answer for an unrecognized critical option.
pub fn bad_option_response(option: u16) -> Packet {
    diagnostic_response(
        ResponseType::BadOption,
        &format!("unrecognized critical option {option}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip_and_limits() {
        let t = Token::from_slice(&[1, 2, 3]).unwrap();
        assert_eq!(t.as_slice(), &[1, 2, 3]);
        assert_eq!(format!("{t:?}"), "Token(010203)");
        assert!(Token::from_slice(&[0; 9]).is_none());
        assert_eq!(Token::from_slice(&[]).unwrap().as_slice(), &[] as &[u8]);
    }

    #[test]
    fn content_format_check() {
        let mut req = request(RequestType::Put, &[]);
        assert!(require_dots_cbor(&req).is_ok(), "no body, no check");
        req.payload = vec![0xa0];
        let err = require_dots_cbor(&req).unwrap_err();
        assert_eq!(err.code, ResponseType::UnsupportedContentFormat);
        set_content_format(&mut req, 50);
        assert!(require_dots_cbor(&req)
            .unwrap_err()
            .diagnostic
            .contains("50"));
        set_content_format(&mut req, CONTENT_FORMAT_DOTS_CBOR);
        assert!(require_dots_cbor(&req).is_ok());
        assert_eq!(content_format(&req), Some(271));
    }

    #[test]
    fn observe_and_if_match() {
        let mut p = response(ResponseType::Content);
        assert_eq!(observe(&p), None);
        set_observe(&mut p, 0x0123_4567);
        assert_eq!(observe(&p), Some(0x23_4567));
        set_observe(&mut p, 0);
        assert_eq!(observe(&p), Some(0));
        remove_option(&mut p, CoapOption::Observe);
        assert_eq!(observe(&p), None);

        let mut put = request(RequestType::Put, &[]);
        assert!(!has_empty_if_match(&put));
        put.add_option(CoapOption::IfMatch, vec![1]);
        assert!(!has_empty_if_match(&put));
        put.add_option(CoapOption::IfMatch, vec![]);
        assert!(has_empty_if_match(&put));
    }

    #[test]
    fn preconditions_and_accept() {
        let put = || request(RequestType::Put, &[]);
        let code = |r: Result<(), ErrorResponse>| r.err().map(|e| e.code);
        assert_eq!(check_preconditions(&put(), true), Ok(()));
        assert_eq!(check_preconditions(&put(), false), Ok(()));
        let mut empty = put();
        empty.add_option(CoapOption::IfMatch, vec![]);
        assert_eq!(check_preconditions(&empty, true), Ok(()));
        assert_eq!(
            code(check_preconditions(&empty, false)),
            Some(ResponseType::PreconditionFailed)
        );
        let mut etag = put();
        etag.add_option(CoapOption::IfMatch, vec![0xde, 0xad]);
        assert_eq!(
            code(check_preconditions(&etag, true)),
            Some(ResponseType::PreconditionFailed)
        );
        let mut none = put();
        none.add_option(CoapOption::IfNoneMatch, vec![]);
        assert_eq!(check_preconditions(&none, false), Ok(()));
        assert_eq!(
            code(check_preconditions(&none, true)),
            Some(ResponseType::PreconditionFailed)
        );

        let mut get = request(RequestType::Get, &[]);
        assert_eq!(check_accept(&get), Ok(()));
        get.add_option(CoapOption::Accept, vec![0x01, 0x0f]);
        assert_eq!(check_accept(&get), Ok(()), "271");
        let mut json = request(RequestType::Get, &[]);
        json.add_option(CoapOption::Accept, vec![50]);
        let err = check_accept(&json).expect_err("json");
        assert_eq!(err.code, ResponseType::NotAcceptable);
        assert_eq!(
            err.diagnostic,
            "Accept 50: only 271 (application/dots+cbor) is served"
        );
        let mut long = request(RequestType::Get, &[]);
        long.add_option(CoapOption::Accept, vec![0, 0, 1, 15]);
        assert_eq!(code(check_accept(&long)), Some(ResponseType::BadRequest));
    }

    #[test]
    fn critical_options() {
        let mut p = request(RequestType::Get, &["a".into()]);
        assert_eq!(unrecognized_critical_option(&p), None);
        p.add_option(CoapOption::Unknown(2050), vec![]);
        assert_eq!(unrecognized_critical_option(&p), None, "even = elective");
        p.add_option(CoapOption::Block1, vec![0]);
        assert_eq!(unrecognized_critical_option(&p), Some(27));
        let r = bad_option_response(27);
        assert_eq!(
            r.header.code,
            MessageClass::Response(ResponseType::BadOption)
        );
        assert_eq!(content_format(&r), None);
    }

    #[test]
    fn diagnostic_has_no_content_format() {
        let e = ErrorResponse::new(ResponseType::NotFound, "no such mitigation");
        let p = e.to_packet();
        assert_eq!(p.payload, b"no such mitigation");
        assert_eq!(content_format(&p), None);
        let c = cbor_response(ResponseType::Content, vec![0xa0]);
        assert_eq!(content_format(&c), Some(271));
    }
}
