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
