//! Mitigation requests and their status (RFC 9132 §4.4), with the Call Home
//! attack source attributes (RFC 9066 §5.3.1).

use ipnet::IpNet;

use super::prefixes::parse_prefix;
use super::{top_level, DotsMessage};
use crate::cbor::fields::{as_int, as_text, as_uint, as_uint_in, Fields, MapBuilder};
use crate::cbor::keys::key::*;
use crate::cbor::{CborError, Value};

/// `lifetime` value asking for a mitigation without end (RFC 9132 §4.4.1).
pub const INDEFINITE_LIFETIME: i64 = -1;

/// Defines a registry-backed code enum with its numeric conversions.
macro_rules! codes {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $code:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant = $code,)+
        }

        impl $name {
            pub const fn code(self) -> u64 {
                self as u64
            }

            pub fn from_code(code: u64) -> Option<Self> {
                match code {
                    $($code => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// `status` of a mitigation (RFC 9132 §4.4.2).
    MitigationStatus {
        InProgress = 1,
        SuccessfullyMitigated = 2,
        Stopped = 3,
        ExceededCapability = 4,
        ClientWithdrawn = 5,
        Terminated = 6,
        Withdrawn = 7,
        SignalLoss = 8,
    }
}

codes! {
    /// `conflict-status` (RFC 9132 §4.4.1).
    ConflictStatus {
        InactiveOtherActive = 1,
        Active = 2,
        AllInactive = 3,
    }
}

codes! {
    /// `conflict-cause` (RFC 9132 §4.4.1; 4 from RFC 9066 §7.2).
    ConflictCause {
        OverlappingTargets = 1,
        ConflictWithAcceptlist = 2,
        CuidCollision = 3,
        RejectedLegitimateTraffic = 4,
    }
}

codes! {
    /// `attack-status` of an efficacy update (RFC 9132 §4.4.3).
    AttackStatus {
        UnderAttack = 1,
        SuccessfullyMitigated = 2,
    }
}

/// A port range; `upper: None` is the single port `lower`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lower: u16,
    pub upper: Option<u16>,
}

/// An ICMP or ICMPv6 type range (which one follows the target's family);
/// `upper: None` is the single type `lower`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpTypeRange {
    pub lower: u8,
    pub upper: Option<u8>,
}

/// One entry of `acl-list` in a conflict scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub name: String,
    pub acl_type: Option<String>,
}

/// What a conflicting mitigation covers (RFC 9132 §4.4.1, `conflict-scope`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictScope {
    pub target_prefix: Vec<IpNet>,
    /// The sources in conflict. RFC 9066 adds `source-prefix` to `scope`
    /// only; this agent also puts it here (a comprehension-optional key,
    /// ignored by peers that do not know it) to say which sources of a
    /// request are exempt from enforcement.
    pub source_prefix: Vec<IpNet>,
    pub target_port_range: Vec<PortRange>,
    pub target_protocol: Vec<u8>,
    pub target_fqdn: Vec<String>,
    pub target_uri: Vec<String>,
    pub alias_name: Vec<String>,
    pub acl_list: Vec<Acl>,
    pub mid: Option<u32>,
}

/// `conflict-information` of a status message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictInformation {
    pub conflict_status: Option<ConflictStatus>,
    pub conflict_cause: Option<ConflictCause>,
    pub retry_timer: Option<u32>,
    pub conflict_scope: Option<ConflictScope>,
}

/// One `scope` entry: the request attributes, and in responses the status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// In requests these three live in the Uri-Path; responses carry them.
    pub cdid: Option<String>,
    pub cuid: Option<String>,
    pub mid: Option<u32>,
    pub target_prefix: Vec<IpNet>,
    pub target_port_range: Vec<PortRange>,
    pub target_protocol: Vec<u8>,
    pub target_fqdn: Vec<String>,
    pub target_uri: Vec<String>,
    pub alias_name: Vec<String>,
    /// Seconds; [`INDEFINITE_LIFETIME`] (-1) for no end.
    pub lifetime: Option<i64>,
    /// Absent means `true` (RFC 9132 §4.4.1).
    pub trigger_mitigation: Option<bool>,
    pub source_prefix: Vec<IpNet>,
    pub source_port_range: Vec<PortRange>,
    pub source_icmp_type_range: Vec<IcmpTypeRange>,
    pub status: Option<MitigationStatus>,
    /// Seconds since the Unix epoch.
    pub mitigation_start: Option<u64>,
    pub bytes_dropped: Option<u64>,
    pub bps_dropped: Option<u64>,
    pub pkts_dropped: Option<u64>,
    pub pps_dropped: Option<u64>,
    pub attack_status: Option<AttackStatus>,
    pub conflict_information: Option<ConflictInformation>,
}

/// The `ietf-dots-signal-channel:mitigation-scope` body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MitigationScope {
    pub scopes: Vec<Scope>,
}

fn code_of<T>(
    fields: &Fields<'_>,
    key: u64,
    from_code: fn(u64) -> Option<T>,
) -> Result<Option<T>, CborError> {
    fields.opt(key, |v, path| {
        let code = as_uint(v, path)?;
        from_code(code).ok_or_else(|| CborError::Value {
            path: path.to_owned(),
            reason: format!("{code} is not a known value"),
        })
    })
}

fn port_range(v: &Value, path: &str) -> Result<PortRange, CborError> {
    let f = Fields::new(v, path, &[LOWER_PORT, UPPER_PORT])?;
    Ok(PortRange {
        lower: as_uint_in(f.require(LOWER_PORT)?, &f.path(LOWER_PORT))?,
        upper: f.uint(UPPER_PORT)?,
    })
}

fn port_range_value(r: &PortRange) -> Value {
    MapBuilder::default()
        .uint(LOWER_PORT, Some(r.lower))
        .uint(UPPER_PORT, r.upper)
        .build()
}

fn icmp_type_range(v: &Value, path: &str) -> Result<IcmpTypeRange, CborError> {
    let f = Fields::new(v, path, &[LOWER_TYPE, UPPER_TYPE])?;
    Ok(IcmpTypeRange {
        lower: as_uint_in(f.require(LOWER_TYPE)?, &f.path(LOWER_TYPE))?,
        upper: f.uint(UPPER_TYPE)?,
    })
}

fn icmp_type_range_value(r: &IcmpTypeRange) -> Value {
    MapBuilder::default()
        .uint(LOWER_TYPE, Some(r.lower))
        .uint(UPPER_TYPE, r.upper)
        .build()
}

fn acl(v: &Value, path: &str) -> Result<Acl, CborError> {
    let f = Fields::new(v, path, &[ACL_NAME, ACL_TYPE])?;
    Ok(Acl {
        name: crate::cbor::fields::as_text(f.require(ACL_NAME)?, &f.path(ACL_NAME))?.to_owned(),
        acl_type: f.text(ACL_TYPE)?,
    })
}

fn uint_list(items: &[u8]) -> Vec<Value> {
    items.iter().map(|p| Value::from(*p)).collect()
}

fn lifetime(v: &Value, path: &str) -> Result<i64, CborError> {
    // YANG: union of uint32 and int32.
    let n = as_int(v, path)?;
    if (i64::from(i32::MIN)..=i64::from(u32::MAX)).contains(&n) {
        Ok(n)
    } else {
        Err(CborError::Value {
            path: path.to_owned(),
            reason: format!("{n} is out of range"),
        })
    }
}

/// An `inet:ip-prefix` in the strict text form of RFC 6991 (no leading
/// zeros; see [`parse_prefix`]); host bits are kept as sent.
fn prefix(v: &Value, path: &str) -> Result<IpNet, CborError> {
    let t = as_text(v, path)?;
    parse_prefix(t).ok_or_else(|| CborError::Value {
        path: path.to_owned(),
        reason: format!("\"{t}\" is not an IP prefix (RFC 6991: ADDRESS/LENGTH, no leading zeros)"),
    })
}

impl ConflictScope {
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        let f = Fields::new(
            v,
            path,
            &[
                TARGET_PREFIX,
                TARGET_PORT_RANGE,
                TARGET_PROTOCOL,
                TARGET_FQDN,
                TARGET_URI,
                ALIAS_NAME,
                ACL_LIST,
                MID,
                SOURCE_PREFIX,
            ],
        )?;
        Ok(Self {
            target_prefix: f.list(TARGET_PREFIX, prefix)?,
            source_prefix: f.list(SOURCE_PREFIX, prefix)?,
            target_port_range: f.list(TARGET_PORT_RANGE, port_range)?,
            target_protocol: f.list(TARGET_PROTOCOL, as_uint_in)?,
            target_fqdn: f.text_list(TARGET_FQDN)?,
            target_uri: f.text_list(TARGET_URI)?,
            alias_name: f.text_list(ALIAS_NAME)?,
            acl_list: f.list(ACL_LIST, acl)?,
            mid: f.uint(MID)?,
        })
    }

    fn to_value(&self) -> Value {
        let acls = self
            .acl_list
            .iter()
            .map(|a| {
                MapBuilder::default()
                    .text(ACL_NAME, Some(&a.name))
                    .text(ACL_TYPE, a.acl_type.as_deref())
                    .build()
            })
            .collect();
        MapBuilder::default()
            .display_list(TARGET_PREFIX, &self.target_prefix)
            .list(
                TARGET_PORT_RANGE,
                self.target_port_range
                    .iter()
                    .map(port_range_value)
                    .collect(),
            )
            .list(TARGET_PROTOCOL, uint_list(&self.target_protocol))
            .display_list(TARGET_FQDN, &self.target_fqdn)
            .display_list(TARGET_URI, &self.target_uri)
            .display_list(ALIAS_NAME, &self.alias_name)
            .list(ACL_LIST, acls)
            .uint(MID, self.mid)
            .display_list(SOURCE_PREFIX, &self.source_prefix)
            .build()
    }
}

impl ConflictInformation {
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        let f = Fields::new(
            v,
            path,
            &[CONFLICT_STATUS, CONFLICT_CAUSE, RETRY_TIMER, CONFLICT_SCOPE],
        )?;
        Ok(Self {
            conflict_status: code_of(&f, CONFLICT_STATUS, ConflictStatus::from_code)?,
            conflict_cause: code_of(&f, CONFLICT_CAUSE, ConflictCause::from_code)?,
            retry_timer: f.uint(RETRY_TIMER)?,
            conflict_scope: f.opt(CONFLICT_SCOPE, ConflictScope::from_value)?,
        })
    }

    fn to_value(&self) -> Value {
        MapBuilder::default()
            .uint(
                CONFLICT_STATUS,
                self.conflict_status.map(ConflictStatus::code),
            )
            .uint(CONFLICT_CAUSE, self.conflict_cause.map(ConflictCause::code))
            .uint(RETRY_TIMER, self.retry_timer)
            .opt(
                CONFLICT_SCOPE,
                self.conflict_scope.as_ref().map(ConflictScope::to_value),
            )
            .build()
    }
}

const SCOPE_KEYS: &[u64] = &[
    CDID,
    CUID,
    MID,
    TARGET_PREFIX,
    TARGET_PORT_RANGE,
    TARGET_PROTOCOL,
    TARGET_FQDN,
    TARGET_URI,
    ALIAS_NAME,
    LIFETIME,
    MITIGATION_START,
    STATUS,
    CONFLICT_INFORMATION,
    BYTES_DROPPED,
    BPS_DROPPED,
    PKTS_DROPPED,
    PPS_DROPPED,
    ATTACK_STATUS,
    TRIGGER_MITIGATION,
    SOURCE_PREFIX,
    SOURCE_PORT_RANGE,
    SOURCE_ICMP_TYPE_RANGE,
];

impl Scope {
    fn from_value(v: &Value, path: &str) -> Result<Self, CborError> {
        let f = Fields::new(v, path, SCOPE_KEYS)?;
        Ok(Self {
            cdid: f.text(CDID)?,
            cuid: f.text(CUID)?,
            mid: f.uint(MID)?,
            target_prefix: f.list(TARGET_PREFIX, prefix)?,
            target_port_range: f.list(TARGET_PORT_RANGE, port_range)?,
            target_protocol: f.list(TARGET_PROTOCOL, as_uint_in)?,
            target_fqdn: f.text_list(TARGET_FQDN)?,
            target_uri: f.text_list(TARGET_URI)?,
            alias_name: f.text_list(ALIAS_NAME)?,
            lifetime: f.opt(LIFETIME, lifetime)?,
            trigger_mitigation: f.bool(TRIGGER_MITIGATION)?,
            source_prefix: f.list(SOURCE_PREFIX, prefix)?,
            source_port_range: f.list(SOURCE_PORT_RANGE, port_range)?,
            source_icmp_type_range: f.list(SOURCE_ICMP_TYPE_RANGE, icmp_type_range)?,
            status: code_of(&f, STATUS, MitigationStatus::from_code)?,
            mitigation_start: f.uint(MITIGATION_START)?,
            bytes_dropped: f.uint(BYTES_DROPPED)?,
            bps_dropped: f.uint(BPS_DROPPED)?,
            pkts_dropped: f.uint(PKTS_DROPPED)?,
            pps_dropped: f.uint(PPS_DROPPED)?,
            attack_status: code_of(&f, ATTACK_STATUS, AttackStatus::from_code)?,
            conflict_information: f.opt(CONFLICT_INFORMATION, ConflictInformation::from_value)?,
        })
    }

    fn to_value(&self) -> Value {
        MapBuilder::default()
            .text(CDID, self.cdid.as_deref())
            .text(CUID, self.cuid.as_deref())
            .uint(MID, self.mid)
            .display_list(TARGET_PREFIX, &self.target_prefix)
            .list(
                TARGET_PORT_RANGE,
                self.target_port_range
                    .iter()
                    .map(port_range_value)
                    .collect(),
            )
            .list(TARGET_PROTOCOL, uint_list(&self.target_protocol))
            .display_list(TARGET_FQDN, &self.target_fqdn)
            .display_list(TARGET_URI, &self.target_uri)
            .display_list(ALIAS_NAME, &self.alias_name)
            .opt(LIFETIME, self.lifetime.map(Value::from))
            .uint(MITIGATION_START, self.mitigation_start)
            .uint(STATUS, self.status.map(MitigationStatus::code))
            .opt(
                CONFLICT_INFORMATION,
                self.conflict_information
                    .as_ref()
                    .map(ConflictInformation::to_value),
            )
            .uint(BYTES_DROPPED, self.bytes_dropped)
            .uint(BPS_DROPPED, self.bps_dropped)
            .uint(PKTS_DROPPED, self.pkts_dropped)
            .uint(PPS_DROPPED, self.pps_dropped)
            .uint(ATTACK_STATUS, self.attack_status.map(AttackStatus::code))
            .opt(TRIGGER_MITIGATION, self.trigger_mitigation.map(Value::Bool))
            .display_list(SOURCE_PREFIX, &self.source_prefix)
            .list(
                SOURCE_PORT_RANGE,
                self.source_port_range
                    .iter()
                    .map(port_range_value)
                    .collect(),
            )
            .list(
                SOURCE_ICMP_TYPE_RANGE,
                self.source_icmp_type_range
                    .iter()
                    .map(icmp_type_range_value)
                    .collect(),
            )
            .build()
    }
}

impl DotsMessage for MitigationScope {
    fn to_value(&self) -> Value {
        let inner = MapBuilder::default()
            .list(SCOPE, self.scopes.iter().map(Scope::to_value).collect())
            .build();
        MapBuilder::default().put(MITIGATION_SCOPE, inner).build()
    }

    fn from_value(value: &Value) -> Result<Self, CborError> {
        let (inner, path) = top_level(value, MITIGATION_SCOPE)?;
        let f = Fields::new(inner, &path, &[SCOPE])?;
        Ok(Self {
            scopes: f.list(SCOPE, Scope::from_value)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    /// RFC 9066 Figure 10 as a typed request.
    fn figure_10() -> MitigationScope {
        MitigationScope {
            scopes: vec![Scope {
                target_prefix: vec![net("2001:db8:c000::/128")],
                source_prefix: vec![net("2001:db8:123::1/128")],
                lifetime: Some(3600),
                ..Scope::default()
            }],
        }
    }

    #[test]
    fn figure_10_from_hand_checked_cbor() {
        // {1: {2: [{6: ["2001:db8:c000::/128"], 14: 3600, 32768: ["2001:db8:123::1/128"]}]}}
        let bytes = hex::decode(concat!(
            "a101a10281a3", // {1: {2: [{ (3 entries)
            "0681",
            "73323030313a6462383a633030303a3a2f313238", // 6: ["2001:db8:c000::/128"]
            "0e190e10",                                 // 14: 3600
            "19800081",
            "73323030313a6462383a3132333a3a312f313238", // 32768: ["2001:db8:123::1/128"]
        ))
        .expect("hex");
        assert_eq!(MitigationScope::decode(&bytes), Ok(figure_10()));
        assert_eq!(figure_10().encode(), bytes);
    }

    #[test]
    fn figure_10_json_round_trip() {
        let figure = json!({
            "ietf-dots-signal-channel:mitigation-scope": {
                "scope": [{
                    "target-prefix": ["2001:db8:c000::/128"],
                    "ietf-dots-call-home:source-prefix": ["2001:db8:123::1/128"],
                    "lifetime": 3600
                }]
            }
        });
        assert_eq!(MitigationScope::from_json(&figure), Ok(figure_10()));
        assert_eq!(figure_10().to_json(), Ok(figure));
    }

    #[test]
    fn status_response_round_trip() {
        let response = MitigationScope {
            scopes: vec![Scope {
                cuid: Some("dz6pHjaADkaFTbjreJGBpw".into()),
                mid: Some(56),
                target_prefix: vec![net("203.0.113.0/24")],
                source_prefix: vec![net("192.0.2.10/32")],
                source_port_range: vec![PortRange {
                    lower: 1024,
                    upper: Some(2048),
                }],
                source_icmp_type_range: vec![IcmpTypeRange {
                    lower: 8,
                    upper: None,
                }],
                lifetime: Some(INDEFINITE_LIFETIME),
                status: Some(MitigationStatus::SuccessfullyMitigated),
                mitigation_start: Some(1_507_818_434),
                bytes_dropped: Some(134_334_555),
                pkts_dropped: Some(333_334_444),
                conflict_information: Some(ConflictInformation {
                    conflict_status: Some(ConflictStatus::InactiveOtherActive),
                    conflict_cause: Some(ConflictCause::RejectedLegitimateTraffic),
                    retry_timer: Some(30),
                    conflict_scope: Some(ConflictScope {
                        mid: Some(12),
                        acl_list: vec![Acl {
                            name: "a".into(),
                            acl_type: None,
                        }],
                        ..ConflictScope::default()
                    }),
                }),
                ..Scope::default()
            }],
        };
        assert_eq!(
            MitigationScope::decode(&response.encode()),
            Ok(response.clone())
        );
        let json = response.to_json().expect("json");
        let scope = &json["ietf-dots-signal-channel:mitigation-scope"]["scope"][0];
        assert_eq!(scope["status"], "attack-successfully-mitigated");
        assert_eq!(scope["lifetime"], -1);
        assert_eq!(MitigationScope::from_json(&json), Ok(response));
    }

    #[test]
    fn unknown_optional_key_is_ignored() {
        // {1: {2: [{14: 3600, 32799: 7}]}}: 32799 is an unknown optional key.
        let bytes = hex::decode("a101a10281a20e190e1019801f07").expect("hex");
        let decoded = MitigationScope::decode(&bytes).expect("decodes");
        assert_eq!(decoded.scopes[0].lifetime, Some(3600));
    }

    #[test]
    fn unknown_required_key_is_rejected_by_number() {
        // {1: {2: [{14: 3600, 60: 7}]}}
        let err = MitigationScope::decode(&hex::decode("a101a10281a20e190e10183c07").expect("hex"))
            .expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0: unknown comprehension-required key 60"
        );
    }

    #[test]
    fn known_key_out_of_place_is_rejected() {
        // {1: {2: [{31: 1}]}}: `sid` inside a scope.
        let err = MitigationScope::decode(&hex::decode("a101a10281a1181f01").expect("hex"))
            .expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0: \"sid\" is not allowed here"
        );
    }

    #[test]
    fn bad_values_name_their_path() {
        let bad = json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [
            {"ietf-dots-call-home:source-prefix": ["192.0.2.300/32"], "lifetime": 60}
        ]}});
        assert_eq!(
            MitigationScope::from_json(&bad).expect_err("rejects").to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0/ietf-dots-call-home:source-prefix/0: \"192.0.2.300/32\" is not an IP prefix (RFC 6991: ADDRESS/LENGTH, no leading zeros)"
        );
        let bad = json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [
            {"ietf-dots-call-home:source-icmp-type-range": [{"upper-type": 3}]}
        ]}});
        assert_eq!(
            MitigationScope::from_json(&bad).expect_err("rejects").to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0/ietf-dots-call-home:source-icmp-type-range/0: missing mandatory \"lower-type\""
        );
        // status 9 is not registered.
        let err = MitigationScope::decode(&hex::decode("a101a10281a11009").expect("hex"))
            .expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "/ietf-dots-signal-channel:mitigation-scope/scope/0/status: 9 is not a known value"
        );
    }
}
