//! Small session messages: heartbeats (RFC 9132 §4.7) and the Call Home
//! redirect (RFC 9066 §5.2.2).

use std::net::IpAddr;

use super::{top_level, DotsMessage};
use crate::cbor::fields::{as_bool, as_text, Fields, MapBuilder};
use crate::cbor::keys::key::*;
use crate::cbor::{CborError, Value};

/// The `ietf-dots-signal-channel:heartbeat` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Whether the sender has received heartbeats from its peer lately.
    pub peer_hb_status: bool,
}

impl DotsMessage for Heartbeat {
    fn to_value(&self) -> Value {
        let inner = MapBuilder::default().put(PEER_HB_STATUS, Value::Bool(self.peer_hb_status));
        MapBuilder::default().put(HEARTBEAT, inner.build()).build()
    }

    fn from_value(value: &Value) -> Result<Self, CborError> {
        let (inner, path) = top_level(value, HEARTBEAT)?;
        let f = Fields::new(inner, &path, &[PEER_HB_STATUS])?;
        Ok(Self {
            peer_hb_status: as_bool(f.require(PEER_HB_STATUS)?, &f.path(PEER_HB_STATUS))?,
        })
    }
}

/// The `ietf-dots-signal-channel:redirected-signal` body as Call Home uses
/// it: the base channel's `alt-server` attributes are not accepted here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectedSignal {
    /// FQDN of the alternate Call Home DOTS client, also its reference
    /// identifier for authentication. Mandatory.
    pub alt_ch_client: String,
    /// Its addresses; when empty the agent resolves `alt_ch_client`.
    pub alt_ch_client_record: Vec<IpAddr>,
    /// Seconds the alternate client may be cached.
    pub ttl: Option<u32>,
}

/// Most addresses a redirect may list: enough for a dual-stack service,
/// few enough that a hostile list cannot keep the agent dialling.
pub const MAX_REDIRECT_RECORDS: usize = 16;

impl RedirectedSignal {
    /// Checks what the agent will act on before it answers 2.01 (RFC 9066
    /// §5.2.2: it answers 4.00 when it cannot go): `alt-ch-client` is a
    /// DNS host name (the reference identifier the new peer's certificate
    /// must carry, RFC 9066 §5.2.2, in the preferred name syntax of RFC
    /// 1034 §3.5 as relaxed by RFC 1123 §2.1), and `alt-ch-client-record`
    /// holds at most [`MAX_REDIRECT_RECORDS`] addresses one can dial
    /// (no unspecified, multicast or broadcast address, none twice).
    pub fn check(&self) -> Result<(), String> {
        check_host_name(&self.alt_ch_client)
            .map_err(|why| format!("alt-ch-client \"{}\" {why}", self.alt_ch_client))?;
        let records = &self.alt_ch_client_record;
        if records.len() > MAX_REDIRECT_RECORDS {
            return Err(format!(
                "alt-ch-client-record has {} addresses, more than the limit of {MAX_REDIRECT_RECORDS}",
                records.len()
            ));
        }
        for (i, a) in records.iter().enumerate() {
            let why = if a.is_unspecified() {
                Some("is unspecified")
            } else if a.is_multicast() {
                Some("is multicast")
            } else if *a == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
                Some("is the broadcast address")
            } else if records[..i].contains(a) {
                Some("is listed twice")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("alt-ch-client-record {a} {why}"));
            }
        }
        Ok(())
    }
}

/// A DNS host name: dot-separated labels of letters, digits and hyphens,
/// 1 to 63 bytes each, not starting or ending with a hyphen, 253 bytes in
/// all (one trailing dot allowed); the last label not all digits, so an
/// IPv4 literal is not taken for a name.
fn check_host_name(name: &str) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 253 {
        return Err("is longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has a label that is empty or longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("is not a host name (letters, digits, hyphens and dots only)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label starting or ending with a hyphen");
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("is an address, not a host name");
    }
    Ok(())
}

impl DotsMessage for RedirectedSignal {
    fn to_value(&self) -> Value {
        let inner = MapBuilder::default()
            .text(ALT_CH_CLIENT, Some(&self.alt_ch_client))
            .display_list(ALT_CH_CLIENT_RECORD, &self.alt_ch_client_record)
            .uint(TTL, self.ttl);
        MapBuilder::default()
            .put(REDIRECTED_SIGNAL, inner.build())
            .build()
    }

    fn from_value(value: &Value) -> Result<Self, CborError> {
        let (inner, path) = top_level(value, REDIRECTED_SIGNAL)?;
        let f = Fields::new(inner, &path, &[ALT_CH_CLIENT, ALT_CH_CLIENT_RECORD, TTL])?;
        Ok(Self {
            alt_ch_client: as_text(f.require(ALT_CH_CLIENT)?, &f.path(ALT_CH_CLIENT))?.to_owned(),
            alt_ch_client_record: f.parsed_list(ALT_CH_CLIENT_RECORD, "an IP address")?,
            ttl: f.uint(TTL)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn heartbeat_wire_form() {
        // {49: {51: true}}
        let hb = Heartbeat {
            peer_hb_status: true,
        };
        assert_eq!(hex::encode(hb.encode()), "a11831a11833f5");
        assert_eq!(
            Heartbeat::decode(&hex::decode("a11831a11833f4").expect("hex")),
            Ok(Heartbeat {
                peer_hb_status: false
            })
        );
        assert_eq!(
            Heartbeat::decode(&hex::decode("a11831a0").expect("hex"))
                .expect_err("rejects")
                .to_string(),
            "/ietf-dots-signal-channel:heartbeat: missing mandatory \"peer-hb-status\""
        );
    }

    /// RFC 9066 Figure 9.
    #[test]
    fn figure_9_redirect() {
        let figure = json!({
            "ietf-dots-signal-channel:redirected-signal": {
                "ietf-dots-call-home:alt-ch-client": "alt-call-home-client.example",
                "ietf-dots-call-home:alt-ch-client-record": ["2001:db8:6401::1", "2001:db8:6401::2"],
                "ietf-dots-call-home:ttl": 600
            }
        });
        let expected = RedirectedSignal {
            alt_ch_client: "alt-call-home-client.example".into(),
            alt_ch_client_record: vec![
                "2001:db8:6401::1".parse().expect("addr"),
                "2001:db8:6401::2".parse().expect("addr"),
            ],
            ttl: Some(600),
        };
        assert_eq!(RedirectedSignal::from_json(&figure), Ok(expected.clone()));
        assert_eq!(expected.to_json(), Ok(figure));
        assert_eq!(RedirectedSignal::decode(&expected.encode()), Ok(expected));
    }

    #[test]
    fn redirect_syntax_is_checked() {
        let ok = |name: &str, records: &[&str]| RedirectedSignal {
            alt_ch_client: name.into(),
            alt_ch_client_record: records.iter().map(|r| r.parse().expect("addr")).collect(),
            ttl: None,
        };
        for good in [
            ok("alt-call-home-client.example", &["2001:db8:6401::1"]),
            ok("alt.example.", &["127.0.0.2"]),
            ok("localhost", &[]),
            ok("a1.b-2.example", &["192.0.2.1", "2001:db8::1"]),
        ] {
            assert_eq!(good.check(), Ok(()), "{good:?}");
        }
        let cases = [
            (ok("", &[]), "alt-ch-client \"\" is empty"),
            (
                ok("alt example", &[]),
                "alt-ch-client \"alt example\" is not a host name (letters, digits, hyphens and dots only)",
            ),
            (
                ok("alt..example", &[]),
                "alt-ch-client \"alt..example\" has a label that is empty or longer than 63 bytes",
            ),
            (
                ok("-alt.example", &[]),
                "alt-ch-client \"-alt.example\" has a label starting or ending with a hyphen",
            ),
            (
                ok("192.0.2.1", &[]),
                "alt-ch-client \"192.0.2.1\" is an address, not a host name",
            ),
            (
                ok("alt.example", &["0.0.0.0"]),
                "alt-ch-client-record 0.0.0.0 is unspecified",
            ),
            (
                ok("alt.example", &["ff02::1"]),
                "alt-ch-client-record ff02::1 is multicast",
            ),
            (
                ok("alt.example", &["255.255.255.255"]),
                "alt-ch-client-record 255.255.255.255 is the broadcast address",
            ),
            (
                ok("alt.example", &["192.0.2.1", "192.0.2.1"]),
                "alt-ch-client-record 192.0.2.1 is listed twice",
            ),
        ];
        for (r, expected) in cases {
            assert_eq!(r.check(), Err(expected.to_string()));
        }
        let long = ok(&format!("{}.example", "a".repeat(64)), &[]);
        assert!(long.check().is_err());
        let many: Vec<String> = (1..=17).map(|i| format!("192.0.2.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            ok("alt.example", &many).check(),
            Err("alt-ch-client-record has 17 addresses, more than the limit of 16".into())
        );
    }

    #[test]
    fn redirect_needs_alt_ch_client_and_refuses_alt_server() {
        let no_name =
            json!({"ietf-dots-signal-channel:redirected-signal": {"ietf-dots-call-home:ttl": 5}});
        assert_eq!(
            RedirectedSignal::from_json(&no_name).expect_err("rejects").to_string(),
            "/ietf-dots-signal-channel:redirected-signal: missing mandatory \"ietf-dots-call-home:alt-ch-client\""
        );
        let base = json!({"ietf-dots-signal-channel:redirected-signal": {
            "alt-server": "x.example",
            "ietf-dots-call-home:alt-ch-client": "y.example"
        }});
        assert_eq!(
            RedirectedSignal::from_json(&base)
                .expect_err("rejects")
                .to_string(),
            "/ietf-dots-signal-channel:redirected-signal: \"alt-server\" is not allowed here"
        );
    }
}
