//! Uri-Path of the DOTS signal channel: `/.well-known/dots/<resource>/...`
//! (RFC 9132 §4.2, RFC 9066 §5.2.2) parsed into a typed resource.

use coap_lite::{Packet, RequestType, ResponseType};

use super::error::ErrorResponse;
use super::msg;

/// The fixed prefix of every DOTS signal channel URI.
const PREFIX: [&str; 2] = [".well-known", "dots"];

/// A DOTS signal channel resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DotsResource {
    /// `mitigate[/cdid=..]/cuid=..[/mid=..]`
    Mitigate {
        cdid: Option<String>,
        cuid: String,
        mid: Option<u32>,
    },
    /// `config[/sid=..]`
    Config { sid: Option<u32> },
    /// `hb`
    Heartbeat,
    /// `redirect[/cdid=..]/cuid=..[/mid=..]` (RFC 9066 §5.2.2)
    Redirect {
        cdid: Option<String>,
        cuid: String,
        mid: Option<u32>,
    },
}

/// Why a Uri-Path does not name a DOTS resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("path does not start with /.well-known/dots")]
    WrongPrefix,
    #[error("no resource after /.well-known/dots")]
    MissingResource,
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    #[error("unexpected segment {0:?}")]
    UnexpectedSegment(String),
    #[error("duplicate {0} segment")]
    DuplicateSegment(&'static str),
    #[error("segment {0:?} is out of order: the order is cdid=, cuid=, mid=")]
    OutOfOrder(String),
    #[error("{0} is longer than {MAX_IDENTIFIER} bytes")]
    LongValue(&'static str),
    #[error("{0} holds a character other than printable ASCII (0x21-0x7e)")]
    BadCharacter(&'static str),
    #[error("missing cuid segment")]
    MissingCuid,
    #[error("empty {0} value")]
    EmptyValue(&'static str),
    #[error("invalid mid {0:?}")]
    BadMid(String),
    #[error("invalid sid {0:?}")]
    BadSid(String),
}

impl UriError {
    /// 4.04 when the path names nothing we serve, 4.00 when it is malformed.
    pub fn code(&self) -> ResponseType {
        match self {
            UriError::WrongPrefix | UriError::MissingResource | UriError::UnknownResource(_) => {
                ResponseType::NotFound
            }
            _ => ResponseType::BadRequest,
        }
    }
}

impl From<UriError> for ErrorResponse {
    fn from(e: UriError) -> Self {
        ErrorResponse::new(e.code(), e.to_string())
    }
}

/// Longest `cdid` or `cuid` accepted. RFC 9132 §4.4.1 suggests 22
/// characters (a 16-byte hash in base64url); gateways may use longer ones.
pub const MAX_IDENTIFIER: usize = 128;

/// The `key=value` segments after the resource name.
#[derive(Default)]
struct Params {
    cdid: Option<String>,
    cuid: Option<String>,
    mid: Option<u32>,
    sid: Option<u32>,
}

impl Params {
    /// Parses the segments; `allowed` lists the keys this resource accepts,
    /// in the order they must come in.
    fn parse<'a>(
        segments: impl Iterator<Item = &'a str>,
        allowed: &[&str],
    ) -> Result<Params, UriError> {
        let mut p = Params::default();
        let mut last: Option<usize> = None;
        for seg in segments {
            let (key, value) = seg
                .split_once('=')
                .filter(|(k, _)| allowed.contains(k))
                .ok_or_else(|| UriError::UnexpectedSegment(seg.to_string()))?;
            let rank = allowed.iter().position(|k| *k == key);
            if rank < last {
                return Err(UriError::OutOfOrder(seg.to_string()));
            }
            last = rank;
            match key {
                "cdid" => set_once(&mut p.cdid, "cdid", text(value, "cdid")?)?,
                "cuid" => set_once(&mut p.cuid, "cuid", text(value, "cuid")?)?,
                "mid" => set_once(
                    &mut p.mid,
                    "mid",
                    number(value).ok_or_else(|| UriError::BadMid(value.into()))?,
                )?,
                _ => set_once(
                    &mut p.sid,
                    "sid",
                    number(value).ok_or_else(|| UriError::BadSid(value.into()))?,
                )?,
            }
        }
        Ok(p)
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), UriError> {
    if slot.is_some() {
        return Err(UriError::DuplicateSegment(name));
    }
    *slot = Some(value);
    Ok(())
}

/// An identifier: not empty, at most [`MAX_IDENTIFIER`] bytes of
/// printable ASCII, so it is safe to log and to use as a key.
fn text(value: &str, name: &'static str) -> Result<String, UriError> {
    if value.is_empty() {
        return Err(UriError::EmptyValue(name));
    }
    if value.len() > MAX_IDENTIFIER {
        return Err(UriError::LongValue(name));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UriError::BadCharacter(name));
    }
    Ok(value.to_string())
}

/// A plain decimal number: no sign, no spaces (u32::from_str accepts '+').
fn number(value: &str) -> Option<u32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

impl DotsResource {
    /// Parses Uri-Path segments (as returned by [`msg::uri_path`]).
    pub fn parse<S: AsRef<str>>(segments: &[S]) -> Result<DotsResource, UriError> {
        let mut it = segments.iter().map(|s| s.as_ref());
        for expected in PREFIX {
            if it.next() != Some(expected) {
                return Err(UriError::WrongPrefix);
            }
        }
        let resource = it.next().ok_or(UriError::MissingResource)?;
        match resource {
            "mitigate" | "redirect" => {
                let p = Params::parse(it, &["cdid", "cuid", "mid"])?;
                let cuid = p.cuid.ok_or(UriError::MissingCuid)?;
                Ok(if resource == "mitigate" {
                    DotsResource::Mitigate {
                        cdid: p.cdid,
                        cuid,
                        mid: p.mid,
                    }
                } else {
                    DotsResource::Redirect {
                        cdid: p.cdid,
                        cuid,
                        mid: p.mid,
                    }
                })
            }
            "config" => Ok(DotsResource::Config {
                sid: Params::parse(it, &["sid"])?.sid,
            }),
            "hb" => match it.next() {
                None => Ok(DotsResource::Heartbeat),
                Some(extra) => Err(UriError::UnexpectedSegment(extra.to_string())),
            },
            other => Err(UriError::UnknownResource(other.to_string())),
        }
    }

    /// Parses the Uri-Path of a request; the error is ready to send.
    pub fn from_request(request: &Packet) -> Result<DotsResource, ErrorResponse> {
        Ok(DotsResource::parse(&msg::uri_path(request)?)?)
    }

    /// The Uri-Path segments naming this resource.
    pub fn segments(&self) -> Vec<String> {
        let mut out: Vec<String> = PREFIX.iter().map(|s| s.to_string()).collect();
        let mut ids = |name: &str, cdid: &Option<String>, cuid: &str, mid: &Option<u32>| {
            out.push(name.to_string());
            if let Some(cdid) = cdid {
                out.push(format!("cdid={cdid}"));
            }
            out.push(format!("cuid={cuid}"));
            if let Some(mid) = mid {
                out.push(format!("mid={mid}"));
            }
        };
        match self {
            DotsResource::Mitigate { cdid, cuid, mid } => ids("mitigate", cdid, cuid, mid),
            DotsResource::Redirect { cdid, cuid, mid } => ids("redirect", cdid, cuid, mid),
            DotsResource::Config { sid } => {
                out.push("config".into());
                if let Some(sid) = sid {
                    out.push(format!("sid={sid}"));
                }
            }
            DotsResource::Heartbeat => out.push("hb".into()),
        }
        out
    }

    /// A request for this resource.
    pub fn request(&self, method: RequestType) -> Packet {
        msg::request(method, &self.segments())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<DotsResource, UriError> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        DotsResource::parse(&segs)
    }

    fn mitigate(cdid: Option<&str>, cuid: &str, mid: Option<u32>) -> DotsResource {
        DotsResource::Mitigate {
            cdid: cdid.map(Into::into),
            cuid: cuid.into(),
            mid,
        }
    }

    #[test]
    fn table() {
        use UriError::*;
        let cases: Vec<(&str, Result<DotsResource, UriError>)> = vec![
            (
                "/.well-known/dots/mitigate/cuid=dz6pHjaADkaFTbjreJGBpw/mid=56",
                Ok(mitigate(None, "dz6pHjaADkaFTbjreJGBpw", Some(56))),
            ),
            (
                "/.well-known/dots/mitigate/cuid=abc",
                Ok(mitigate(None, "abc", None)),
            ),
            (
                "/.well-known/dots/mitigate/cdid=gw/cuid=abc/mid=4294967295",
                Ok(mitigate(Some("gw"), "abc", Some(u32::MAX))),
            ),
            (
                "/.well-known/dots/mitigate/mid=1/cuid=abc",
                Err(OutOfOrder("cuid=abc".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=abc/cdid=gw",
                Err(OutOfOrder("cdid=gw".into())),
            ),
            (
                "/.well-known/dots/redirect/mid=1/cuid=abc",
                Err(OutOfOrder("cuid=abc".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a b",
                Err(BadCharacter("cuid")),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a\u{7f}",
                Err(BadCharacter("cuid")),
            ),
            (
                "/.well-known/dots/mitigate/cuid=\u{e9}t\u{e9}",
                Err(BadCharacter("cuid")),
            ),
            (
                "/.well-known/dots/config",
                Ok(DotsResource::Config { sid: None }),
            ),
            (
                "/.well-known/dots/config/sid=123",
                Ok(DotsResource::Config { sid: Some(123) }),
            ),
            ("/.well-known/dots/hb", Ok(DotsResource::Heartbeat)),
            (
                "/.well-known/dots/redirect/cuid=abc/mid=123",
                Ok(DotsResource::Redirect {
                    cdid: None,
                    cuid: "abc".into(),
                    mid: Some(123),
                }),
            ),
            ("/.well-known/dots/mitigate/mid=5", Err(MissingCuid)),
            ("/.well-known/dots/mitigate", Err(MissingCuid)),
            (
                "/.well-known/dots/mitigate/cuid=a/cuid=b",
                Err(DuplicateSegment("cuid")),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=1/mid=2",
                Err(DuplicateSegment("mid")),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=x",
                Err(BadMid("x".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=-1",
                Err(BadMid("-1".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=+1",
                Err(BadMid("+1".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=4294967296",
                Err(BadMid("4294967296".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/mid=",
                Err(BadMid("".into())),
            ),
            ("/.well-known/dots/mitigate/cuid=", Err(EmptyValue("cuid"))),
            (
                "/.well-known/dots/mitigate/cuid=a/sid=1",
                Err(UnexpectedSegment("sid=1".into())),
            ),
            (
                "/.well-known/dots/mitigate/cuid=a/extra",
                Err(UnexpectedSegment("extra".into())),
            ),
            (
                "/.well-known/dots/config/sid=abc",
                Err(BadSid("abc".into())),
            ),
            (
                "/.well-known/dots/config/cuid=a",
                Err(UnexpectedSegment("cuid=a".into())),
            ),
            ("/.well-known/dots/hb/x", Err(UnexpectedSegment("x".into()))),
            (
                "/.well-known/dots/telemetry",
                Err(UnknownResource("telemetry".into())),
            ),
            ("/.well-known/dots", Err(MissingResource)),
            ("/dots/mitigate/cuid=a", Err(WrongPrefix)),
            ("/.well-known/core", Err(WrongPrefix)),
        ];
        for (path, expected) in cases {
            assert_eq!(parse(path), expected, "{path}");
        }
    }

    #[test]
    fn identifier_length() {
        let long = "a".repeat(MAX_IDENTIFIER + 1);
        assert_eq!(
            parse(&format!("/.well-known/dots/mitigate/cuid={long}")),
            Err(UriError::LongValue("cuid"))
        );
        let ok = "a".repeat(MAX_IDENTIFIER);
        assert!(parse(&format!("/.well-known/dots/mitigate/cdid={ok}/cuid={ok}")).is_ok());
    }

    #[test]
    fn error_codes() {
        assert_eq!(UriError::WrongPrefix.code(), ResponseType::NotFound);
        assert_eq!(
            UriError::UnknownResource("x".into()).code(),
            ResponseType::NotFound
        );
        assert_eq!(UriError::MissingCuid.code(), ResponseType::BadRequest);
        assert_eq!(
            UriError::BadMid("x".into()).code(),
            ResponseType::BadRequest
        );
    }

    #[test]
    fn build_roundtrip() {
        let resources = [
            mitigate(Some("gw"), "abc", Some(7)),
            mitigate(None, "abc", None),
            DotsResource::Config { sid: Some(3) },
            DotsResource::Config { sid: None },
            DotsResource::Heartbeat,
            DotsResource::Redirect {
                cdid: None,
                cuid: "c".into(),
                mid: Some(123),
            },
        ];
        for r in resources {
            let req = r.request(RequestType::Get);
            assert_eq!(DotsResource::from_request(&req), Ok(r.clone()));
        }
        assert_eq!(
            mitigate(None, "dz6p", Some(56)).segments(),
            [".well-known", "dots", "mitigate", "cuid=dz6p", "mid=56"]
        );
    }

    #[test]
    fn request_errors_map_to_responses() {
        let req = msg::request(RequestType::Get, &["x".into()]);
        let err = DotsResource::from_request(&req).unwrap_err();
        assert_eq!(err.code, ResponseType::NotFound);
        let mut req = msg::request(RequestType::Get, &[]);
        req.add_option(coap_lite::CoapOption::UriPath, vec![0xff]);
        assert_eq!(
            DotsResource::from_request(&req).unwrap_err().code,
            ResponseType::BadRequest
        );
    }
}
