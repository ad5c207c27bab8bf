//! Checks a Call Home DOTS server (the agent) applies to a mitigation
//! request before acting on it: RFC 9132 §4.4.1 base rules and RFC 9066
//! §5.3.1 Call Home rules. Each failure names the field and the value, and
//! maps to the CoAP error the agent answers with.
//!
//! CoAP codes: every rule violation is 4.00 (Bad Request): RFC 9132 §4.4.1
//! answers missing, invalid or unknown parameters with 4.00, RFC 9066 §5.3.1
//! calls broadcast/loopback/multicast sources "invalid values", demands 4.00
//! for `trigger-mitigation: false`, and hands out-of-domain sources to the
//! §4.4.1 handling of invalid requests. Only [`ValidationError::TooMany`]
//! is 4.22 (Unprocessable Entity): the request is valid, but larger than
//! this agent is configured to enforce. (The local policy's bounds on what
//! a request may block are in [`super::policy`].)
//!
//! Choices where the RFCs leave room (docs/request-handling.md lists them
//! with their sections):
//! * a prefix with host bits set (`192.0.2.1/24`) is a valid, non-canonical
//!   `inet:ip-prefix` (RFC 6991 §4): it is normalised (`192.0.2.0/24`) and
//!   the granted scope carries the canonical form. Leading zeros
//!   (`192.0.2.010/32`) are refused when the body is decoded
//!   ([`super::prefixes::parse_prefix`]);
//! * a source prefix holding the unspecified address (`0.0.0.0/n`, `::/n`,
//!   so also `0.0.0.0/0`) is rejected: no attack comes from there, and
//!   "everything" is never a source an agent should block on request;
//! * a prefix is "broadcast/loopback/multicast" when it lies inside those
//!   ranges or covers them (`240.0.0.0/4` covers 255.255.255.255);
//! * targets must be routable (RFC 9066 §5.3.1 takes "any routable IP
//!   prefix" as a target): unspecified, loopback, multicast, broadcast and
//!   link-local targets are refused, as RFC 9132 §4.4.1 (not at hand here;
//!   go-dots refuses the same) refuses them;
//! * IPv4-mapped IPv6 prefixes (`::ffff:0:0/96`) are refused on both sides:
//!   no packet carries them, and written that way an IPv4 address would
//!   slip past the IPv4 checks (`::ffff:127.0.0.1`);
//! * a repeated entry (a leaf-list value, or a list key such as
//!   `lower-port`) is refused: YANG keeps them unique (RFC 7950 §7.7.6,
//!   §7.8.2); prefixes are compared in canonical form;
//! * `alias-name` is refused: aliases are made over the DOTS data channel
//!   (RFC 8783), which this agent does not run, and RFC 9066 §5.3.1 itself
//!   expects no aliases on Call Home;
//! * a scope no packet can match is refused rather than installed as a
//!   block that never drops: ICMP type ranges together with port ranges,
//!   ICMP type ranges with a `target-protocol` list that holds no ICMP of
//!   the targets' family, port ranges with a list that holds no protocol
//!   with ports (TCP, UDP, SCTP, DCCP);
//! * a lifetime longer than [`Limits::max_lifetime`], or indefinite, is
//!   granted as that maximum (RFC 9132 lets the server shorten it), unless
//!   the local policy makes it a bound (see [`super::policy::Policy`]).

use std::net::IpAddr;

use ipnet::IpNet;

use super::prefixes::{canonical, special_use, PrefixSet, Special};
use super::{MitigationScope, PortRange, Scope, INDEFINITE_LIFETIME};

/// Configurable bounds on what the agent accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest lifetime granted, in seconds; `None` grants what is asked,
    /// indefinite included.
    pub max_lifetime: Option<u32>,
    /// Most entries in `source-prefix`, and separately in `target-prefix`.
    pub max_prefixes: usize,
    /// Most entries in each port or ICMP type range list.
    pub max_ranges: usize,
    /// Most entries in `target-protocol`.
    pub max_protocols: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_lifetime: Some(86_400),
            max_prefixes: 32,
            max_ranges: 32,
            max_protocols: 16,
        }
    }
}

/// The identifiers of a `mitigate` request's Uri-Path (RFC 9132 §4.4.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MitigationUri {
    pub cdid: Option<String>,
    pub cuid: Option<String>,
    /// As received; [`validate_call_home_request`] checks it is a uint32.
    pub mid: Option<String>,
}

impl MitigationUri {
    /// Reads the segments after `mitigate`, e.g. `["cuid=dz6p...", "mid=56"]`,
    /// in the order RFC 9132 §4.4.1 gives them: `cdid`, `cuid`, `mid`.
    pub fn from_segments<S: AsRef<str>>(segments: &[S]) -> Result<Self, ValidationError> {
        let mut uri = Self::default();
        let mut last = 0;
        for segment in segments {
            let segment = segment.as_ref();
            let bad = || ValidationError::UriSegment {
                segment: segment.to_owned(),
            };
            let (name, value) = segment.split_once('=').ok_or_else(bad)?;
            let (rank, slot) = match name {
                "cdid" => (1, &mut uri.cdid),
                "cuid" => (2, &mut uri.cuid),
                "mid" => (3, &mut uri.mid),
                _ => return Err(bad()),
            };
            if rank <= last {
                return Err(bad());
            }
            last = rank;
            *slot = Some(value.to_owned());
        }
        Ok(uri)
    }
}

/// A request that passed every check, with what the agent grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedRequest {
    pub cdid: Option<String>,
    pub cuid: String,
    pub mid: u32,
    /// The single scope, its prefixes in canonical form and its `lifetime`
    /// replaced by the granted one.
    pub scope: Scope,
    /// Granted lifetime in seconds, or [`INDEFINITE_LIFETIME`].
    pub lifetime: i64,
}

/// Why a Call Home mitigation request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("missing \"{name}\" in the Uri-Path")]
    MissingUri { name: &'static str },
    #[error("unexpected, repeated or misplaced Uri-Path segment \"{segment}\" (the order is cdid=, cuid=, mid=)")]
    UriSegment { segment: String },
    #[error("cuid is empty")]
    EmptyCuid,
    #[error("mid \"{value}\" is not an unsigned 32-bit integer")]
    InvalidMid { value: String },
    #[error("\"{name}\" belongs in the Uri-Path, not in the request body")]
    IdentifierInBody { name: &'static str },
    #[error("a mitigation request carries exactly one scope, found {count}")]
    ScopeCount { count: usize },
    #[error("missing mandatory \"{field}\"")]
    Missing { field: &'static str },
    #[error("trigger-mitigation false is not allowed in a Call Home request")]
    TriggerMitigationFalse,
    #[error("lifetime {value} is invalid: it must be positive seconds or -1 (indefinite)")]
    InvalidLifetime { value: i64 },
    #[error("{field} \"{prefix}\" {what}")]
    SpecialPrefix {
        field: &'static str,
        prefix: IpNet,
        what: String,
    },
    #[error("{field} lists {value} more than once")]
    Duplicate { field: &'static str, value: String },
    #[error("alias-name is not supported: this agent keeps no aliases (there is no DOTS data channel); name the targets in target-prefix")]
    AliasName,
    #[error("{field} range {lower}-{upper} is inverted ({lower_name} > {upper_name})")]
    RangeInverted {
        field: &'static str,
        lower_name: &'static str,
        upper_name: &'static str,
        lower: u16,
        upper: u16,
    },
    #[error("source-prefix is only {source_family} and target-prefix only {target_family}: no traffic can match")]
    FamilyMismatch {
        source_family: &'static str,
        target_family: &'static str,
    },
    #[error("{why}: no packet can match this scope")]
    NoMatch { why: &'static str },
    #[error("{field} has {count} entries, more than the limit of {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("source-prefix \"{prefix}\" is outside this agent's domain")]
    OutsideDomain { prefix: IpNet },
}

impl ValidationError {
    /// The CoAP response code `(class, detail)`: see the module documentation.
    pub fn coap_code(&self) -> (u8, u8) {
        match self {
            Self::TooMany { .. } => (4, 22),
            _ => (4, 0),
        }
    }

    /// Text for the diagnostic payload of the error response.
    pub fn diagnostic(&self) -> String {
        self.to_string()
    }
}

/// Checks that every prefix lies inside the union of `domain`, naming the
/// first one that does not (RFC 9066 §5.3.1 domain check on
/// `source-prefix`). A prefix covered only by several domain prefixes
/// together (`192.0.2.0/24` by `192.0.2.0/25` and `192.0.2.128/25`) is
/// inside.
pub fn prefixes_within(prefixes: &[IpNet], domain: &[IpNet]) -> Result<(), ValidationError> {
    let domain = PrefixSet::new(domain);
    match prefixes.iter().find(|p| !domain.covers(p)) {
        Some(prefix) => Err(ValidationError::OutsideDomain { prefix: *prefix }),
        None => Ok(()),
    }
}

/// Validates a Call Home mitigation PUT and computes the granted lifetime.
/// The domain check needs the agent's prefixes: call [`prefixes_within`]
/// on the result's `scope.source_prefix`.
pub fn validate_call_home_request(
    req: &MitigationScope,
    uri: &MitigationUri,
    limits: &Limits,
) -> Result<ValidatedRequest, ValidationError> {
    let cuid = uri
        .cuid
        .clone()
        .ok_or(ValidationError::MissingUri { name: "cuid" })?;
    if cuid.is_empty() {
        return Err(ValidationError::EmptyCuid);
    }
    let mid_text = uri
        .mid
        .as_deref()
        .ok_or(ValidationError::MissingUri { name: "mid" })?;
    // Digits only: `u32::from_str` would also take "+5".
    let mid = Some(mid_text)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u32>().ok())
        .ok_or_else(|| ValidationError::InvalidMid {
            value: mid_text.to_owned(),
        })?;

    let [scope] = req.scopes.as_slice() else {
        return Err(ValidationError::ScopeCount {
            count: req.scopes.len(),
        });
    };
    for (name, present) in [
        ("cdid", scope.cdid.is_some()),
        ("cuid", scope.cuid.is_some()),
        ("mid", scope.mid.is_some()),
    ] {
        if present {
            return Err(ValidationError::IdentifierInBody { name });
        }
    }
    if scope.trigger_mitigation == Some(false) {
        return Err(ValidationError::TriggerMitigationFalse);
    }
    let requested = scope
        .lifetime
        .ok_or(ValidationError::Missing { field: "lifetime" })?;
    if requested != INDEFINITE_LIFETIME && requested <= 0 {
        return Err(ValidationError::InvalidLifetime { value: requested });
    }
    if scope.source_prefix.is_empty() {
        return Err(ValidationError::Missing {
            field: "source-prefix",
        });
    }
    if scope.target_prefix.is_empty() {
        return Err(ValidationError::Missing {
            field: "target-prefix",
        });
    }
    check_limits(scope, limits)?;
    if !scope.alias_name.is_empty() {
        return Err(ValidationError::AliasName);
    }
    let scope = Scope {
        source_prefix: scope.source_prefix.iter().map(canonical).collect(),
        target_prefix: scope.target_prefix.iter().map(canonical).collect(),
        ..scope.clone()
    };
    check_unique(&scope)?;

    check_prefixes(SOURCE_PREFIX, &scope.source_prefix, SOURCE_SPECIALS)?;
    check_prefixes("target-prefix", &scope.target_prefix, TARGET_SPECIALS)?;
    check_port_ranges("target-port-range", &scope.target_port_range)?;
    check_port_ranges(
        "ietf-dots-call-home:source-port-range",
        &scope.source_port_range,
    )?;
    for r in &scope.source_icmp_type_range {
        if let Some(upper) = r.upper.filter(|u| *u < r.lower) {
            return Err(ValidationError::RangeInverted {
                field: "ietf-dots-call-home:source-icmp-type-range",
                lower_name: "lower-type",
                upper_name: "upper-type",
                lower: r.lower.into(),
                upper: upper.into(),
            });
        }
    }
    check_families(&scope.source_prefix, &scope.target_prefix)?;
    check_matchable(&scope)?;

    let lifetime = grant_lifetime(requested, limits.max_lifetime);
    Ok(ValidatedRequest {
        cdid: uri.cdid.clone(),
        cuid,
        mid,
        scope: Scope {
            lifetime: Some(lifetime),
            ..scope
        },
        lifetime,
    })
}

const SOURCE_PREFIX: &str = "source-prefix";

/// RFC 9066 §5.3.1: broadcast, loopback and multicast sources are invalid;
/// link-local sources are allowed.
const SOURCE_SPECIALS: &[Special] = &[
    Special::Unspecified,
    Special::Loopback,
    Special::Multicast,
    Special::Broadcast,
    Special::Ipv4Mapped,
];

/// Targets must be routable (see the module documentation): none of them.
const TARGET_SPECIALS: &[Special] = &Special::ALL;

fn check_prefixes(
    field: &'static str,
    prefixes: &[IpNet],
    kinds: &[Special],
) -> Result<(), ValidationError> {
    for prefix in prefixes {
        let Some((kind, what)) = special_use(prefix, kinds) else {
            continue;
        };
        let mapped = match prefix.addr() {
            IpAddr::V6(a) if prefix.prefix_len() >= 96 => a.to_ipv4_mapped(),
            _ => None,
        };
        let what = match (kind, mapped) {
            (Special::Ipv4Mapped, Some(v4)) => format!(
                "{what}: write it as the IPv4 prefix {v4}/{}",
                prefix.prefix_len() - 96
            ),
            (Special::Ipv4Mapped, None) => what,
            _ if field == SOURCE_PREFIX => what,
            _ => format!("{what}: not a routable target"),
        };
        return Err(ValidationError::SpecialPrefix {
            field,
            prefix: *prefix,
            what,
        });
    }
    Ok(())
}

/// The first value listed twice in `items`, shown with `show`.
fn repeated<T: PartialEq>(items: &[T], show: impl Fn(&T) -> String) -> Option<String> {
    items
        .iter()
        .enumerate()
        .find(|(i, x)| items[..*i].contains(x))
        .map(|(_, x)| show(x))
}

/// Leaf-list values and list keys are unique (RFC 7950 §7.7.6, §7.8.2).
fn check_unique(scope: &Scope) -> Result<(), ValidationError> {
    fn quoted<T: std::fmt::Display>(v: &T) -> String {
        format!("\"{v}\"")
    }
    let port_keys = |r: &[PortRange]| r.iter().map(|r| r.lower).collect::<Vec<_>>();
    let type_keys: Vec<u8> = scope
        .source_icmp_type_range
        .iter()
        .map(|r| r.lower)
        .collect();
    let lower_port = |l: &u16| format!("lower-port {l}");
    let checks = [
        (
            "ietf-dots-call-home:source-prefix",
            repeated(&scope.source_prefix, quoted),
        ),
        ("target-prefix", repeated(&scope.target_prefix, quoted)),
        (
            "target-protocol",
            repeated(&scope.target_protocol, u8::to_string),
        ),
        ("target-fqdn", repeated(&scope.target_fqdn, quoted)),
        ("target-uri", repeated(&scope.target_uri, quoted)),
        (
            "target-port-range",
            repeated(&port_keys(&scope.target_port_range), lower_port),
        ),
        (
            "ietf-dots-call-home:source-port-range",
            repeated(&port_keys(&scope.source_port_range), lower_port),
        ),
        (
            "ietf-dots-call-home:source-icmp-type-range",
            repeated(&type_keys, |l| format!("lower-type {l}")),
        ),
    ];
    match checks.into_iter().find_map(|(f, v)| v.map(|v| (f, v))) {
        Some((field, value)) => Err(ValidationError::Duplicate { field, value }),
        None => Ok(()),
    }
}

/// IANA protocol numbers the checks below need.
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const PORT_PROTOCOLS: [u8; 4] = [6, 17, 33, 132]; // TCP, UDP, DCCP, SCTP

/// Refuses scopes whose constraints exclude each other (see the module
/// documentation): the data plane matches port ranges only on protocols
/// with ports and ICMP type ranges only on the ICMP of the packet's family.
fn check_matchable(scope: &Scope) -> Result<(), ValidationError> {
    let icmp = !scope.source_icmp_type_range.is_empty();
    let ports = !scope.source_port_range.is_empty() || !scope.target_port_range.is_empty();
    let protocols = &scope.target_protocol;
    if icmp && ports {
        return Err(ValidationError::NoMatch {
            why:
                "source-icmp-type-range needs ICMP packets and port ranges need packets with ports",
        });
    }
    if icmp && !protocols.is_empty() {
        let v4 = scope
            .target_prefix
            .iter()
            .any(|p| matches!(p, IpNet::V4(_)));
        let v6 = scope
            .target_prefix
            .iter()
            .any(|p| matches!(p, IpNet::V6(_)));
        let fits = (v4 && protocols.contains(&ICMP)) || (v6 && protocols.contains(&ICMPV6));
        if !fits {
            return Err(ValidationError::NoMatch {
                why: "source-icmp-type-range is given but target-protocol holds no ICMP of the targets' family (1 for IPv4, 58 for IPv6)",
            });
        }
    }
    if ports && !protocols.is_empty() && !protocols.iter().any(|p| PORT_PROTOCOLS.contains(p)) {
        return Err(ValidationError::NoMatch {
            why: "port ranges are given but target-protocol holds no protocol with ports (6 TCP, 17 UDP, 33 DCCP, 132 SCTP)",
        });
    }
    Ok(())
}

fn grant_lifetime(requested: i64, max: Option<u32>) -> i64 {
    match max.map(i64::from) {
        Some(max) if requested == INDEFINITE_LIFETIME || requested > max => max,
        _ => requested,
    }
}

fn check_limits(scope: &Scope, limits: &Limits) -> Result<(), ValidationError> {
    let lists = [
        (
            "ietf-dots-call-home:source-prefix",
            scope.source_prefix.len(),
            limits.max_prefixes,
        ),
        (
            "target-prefix",
            scope.target_prefix.len(),
            limits.max_prefixes,
        ),
        (
            "target-port-range",
            scope.target_port_range.len(),
            limits.max_ranges,
        ),
        (
            "ietf-dots-call-home:source-port-range",
            scope.source_port_range.len(),
            limits.max_ranges,
        ),
        (
            "ietf-dots-call-home:source-icmp-type-range",
            scope.source_icmp_type_range.len(),
            limits.max_ranges,
        ),
        (
            "target-protocol",
            scope.target_protocol.len(),
            limits.max_protocols,
        ),
    ];
    match lists.into_iter().find(|(_, count, max)| count > max) {
        Some((field, count, max)) => Err(ValidationError::TooMany { field, count, max }),
        None => Ok(()),
    }
}

fn check_port_ranges(field: &'static str, ranges: &[PortRange]) -> Result<(), ValidationError> {
    match ranges
        .iter()
        .find_map(|r| r.upper.filter(|u| *u < r.lower).map(|u| (r.lower, u)))
    {
        Some((lower, upper)) => Err(ValidationError::RangeInverted {
            field,
            lower_name: "lower-port",
            upper_name: "upper-port",
            lower,
            upper,
        }),
        None => Ok(()),
    }
}

fn family(p: &IpNet) -> &'static str {
    match p.addr() {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// Traffic from a source to a target needs one address family on both.
fn check_families(sources: &[IpNet], targets: &[IpNet]) -> Result<(), ValidationError> {
    let meet = sources
        .iter()
        .any(|s| targets.iter().any(|t| family(s) == family(t)));
    match (meet, sources.first(), targets.first()) {
        (false, Some(s), Some(t)) => Err(ValidationError::FamilyMismatch {
            source_family: family(s),
            target_family: family(t),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IcmpTypeRange;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn uri() -> MitigationUri {
        MitigationUri::from_segments(&["cuid=dz6pHjaADkaFTbjreJGBpw", "mid=56"]).expect("uri")
    }

    /// A valid request (RFC 9066 Figure 10) for each test to break one way.
    fn scope() -> Scope {
        Scope {
            target_prefix: vec![net("2001:db8:c000::/128")],
            source_prefix: vec![net("2001:db8:123::1/128")],
            lifetime: Some(3600),
            ..Scope::default()
        }
    }

    fn check(scope: Scope) -> Result<ValidatedRequest, ValidationError> {
        validate_call_home_request(
            &MitigationScope {
                scopes: vec![scope],
            },
            &uri(),
            &Limits::default(),
        )
    }

    fn message(scope: Scope) -> String {
        check(scope).expect_err("must be rejected").to_string()
    }

    #[test]
    fn figure_10_is_accepted() {
        let ok = check(scope()).expect("valid");
        assert_eq!(
            (ok.cuid.as_str(), ok.mid, ok.lifetime),
            ("dz6pHjaADkaFTbjreJGBpw", 56, 3600)
        );
        assert_eq!(ok.scope, scope());
    }

    #[test]
    fn uri_rules() {
        let req = MitigationScope {
            scopes: vec![scope()],
        };
        let limits = Limits::default();
        let no_mid = MitigationUri::from_segments(&["cuid=abc"]).expect("uri");
        let err = validate_call_home_request(&req, &no_mid, &limits).expect_err("rejects");
        assert_eq!(err.to_string(), "missing \"mid\" in the Uri-Path");
        let no_cuid = MitigationUri::from_segments(&["mid=1"]).expect("uri");
        let err = validate_call_home_request(&req, &no_cuid, &limits).expect_err("rejects");
        assert_eq!(err.to_string(), "missing \"cuid\" in the Uri-Path");
        let empty = MitigationUri::from_segments(&["cuid=", "mid=1"]).expect("uri");
        assert_eq!(
            validate_call_home_request(&req, &empty, &limits),
            Err(ValidationError::EmptyCuid)
        );
        for bad in ["abc", "", "-1", "+5", "4294967296"] {
            let uri = MitigationUri {
                mid: Some(bad.into()),
                ..uri()
            };
            let err = validate_call_home_request(&req, &uri, &limits).expect_err("rejects");
            assert_eq!(
                err.to_string(),
                format!("mid \"{bad}\" is not an unsigned 32-bit integer")
            );
            assert_eq!(err.coap_code(), (4, 0));
        }
        let err = MitigationUri::from_segments(&["cuid=a", "cuid=b"]).expect_err("repeated");
        assert_eq!(
            err.to_string(),
            "unexpected, repeated or misplaced Uri-Path segment \"cuid=b\" (the order is cdid=, cuid=, mid=)"
        );
        assert!(MitigationUri::from_segments(&["sid=1"]).is_err());
        assert!(
            MitigationUri::from_segments(&["mid=1", "cuid=a"]).is_err(),
            "mid before cuid"
        );
        let with_cdid =
            MitigationUri::from_segments(&["cdid=gw", "cuid=a", "mid=4294967295"]).expect("uri");
        let ok = validate_call_home_request(&req, &with_cdid, &limits).expect("valid");
        assert_eq!((ok.cdid.as_deref(), ok.mid), (Some("gw"), u32::MAX));
    }

    #[test]
    fn exactly_one_scope() {
        let uri = uri();
        for count in [0, 2] {
            let req = MitigationScope {
                scopes: vec![scope(); count],
            };
            let err =
                validate_call_home_request(&req, &uri, &Limits::default()).expect_err("rejects");
            assert_eq!(
                err.to_string(),
                format!("a mitigation request carries exactly one scope, found {count}")
            );
        }
    }

    #[test]
    fn identifiers_must_not_be_in_the_body() {
        let s = Scope {
            mid: Some(56),
            ..scope()
        };
        assert_eq!(
            message(s),
            "\"mid\" belongs in the Uri-Path, not in the request body"
        );
        let s = Scope {
            cuid: Some("x".into()),
            ..scope()
        };
        assert_eq!(
            message(s),
            "\"cuid\" belongs in the Uri-Path, not in the request body"
        );
        let s = Scope {
            cdid: Some("x".into()),
            ..scope()
        };
        assert_eq!(
            message(s),
            "\"cdid\" belongs in the Uri-Path, not in the request body"
        );
    }

    #[test]
    fn mandatory_attributes() {
        assert_eq!(
            message(Scope {
                source_prefix: vec![],
                ..scope()
            }),
            "missing mandatory \"source-prefix\""
        );
        assert_eq!(
            message(Scope {
                target_prefix: vec![],
                ..scope()
            }),
            "missing mandatory \"target-prefix\""
        );
        assert_eq!(
            message(Scope {
                lifetime: None,
                ..scope()
            }),
            "missing mandatory \"lifetime\""
        );
    }

    #[test]
    fn trigger_mitigation_false_is_bad_request() {
        let err = check(Scope {
            trigger_mitigation: Some(false),
            ..scope()
        })
        .expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "trigger-mitigation false is not allowed in a Call Home request"
        );
        assert_eq!(err.coap_code(), (4, 0));
        assert!(check(Scope {
            trigger_mitigation: Some(true),
            ..scope()
        })
        .is_ok());
    }

    #[test]
    fn lifetime_rules_and_cap() {
        for bad in [0, -2, i64::from(i32::MIN)] {
            assert_eq!(
                message(Scope {
                    lifetime: Some(bad),
                    ..scope()
                }),
                format!(
                    "lifetime {bad} is invalid: it must be positive seconds or -1 (indefinite)"
                )
            );
        }
        let capped = check(Scope {
            lifetime: Some(1_000_000),
            ..scope()
        })
        .expect("valid");
        assert_eq!(
            (capped.lifetime, capped.scope.lifetime),
            (86_400, Some(86_400))
        );
        let indefinite = check(Scope {
            lifetime: Some(-1),
            ..scope()
        })
        .expect("valid");
        assert_eq!(indefinite.lifetime, 86_400);
        let limits = Limits {
            max_lifetime: None,
            ..Limits::default()
        };
        let req = MitigationScope {
            scopes: vec![Scope {
                lifetime: Some(-1),
                ..scope()
            }],
        };
        let ok = validate_call_home_request(&req, &uri(), &limits).expect("valid");
        assert_eq!(ok.lifetime, INDEFINITE_LIFETIME);
    }

    fn source(prefix: &str, target: &str) -> String {
        message(Scope {
            source_prefix: vec![net(prefix)],
            target_prefix: vec![net(target)],
            ..scope()
        })
    }

    #[test]
    fn special_source_prefixes_are_invalid() {
        let t4 = "203.0.113.0/24";
        let t6 = "2001:db8::/32";
        assert_eq!(
            source("224.0.0.0/4", t4),
            "source-prefix \"224.0.0.0/4\" is multicast"
        );
        assert_eq!(
            source("239.1.2.3/32", t4),
            "source-prefix \"239.1.2.3/32\" is multicast"
        );
        assert_eq!(
            source("64.0.0.0/2", t4),
            "source-prefix \"64.0.0.0/2\" covers the loopback range 127.0.0.0/8"
        );
        assert_eq!(
            source("127.0.0.1/32", t4),
            "source-prefix \"127.0.0.1/32\" is loopback"
        );
        assert_eq!(
            source("255.255.255.255/32", t4),
            "source-prefix \"255.255.255.255/32\" is the broadcast address"
        );
        assert_eq!(
            source("240.0.0.0/4", t4),
            "source-prefix \"240.0.0.0/4\" contains the broadcast address 255.255.255.255"
        );
        assert_eq!(
            source("0.0.0.0/0", t4),
            "source-prefix \"0.0.0.0/0\" contains the unspecified address 0.0.0.0"
        );
        assert_eq!(
            source("::1/128", t6),
            "source-prefix \"::1/128\" is the loopback address"
        );
        assert_eq!(
            source("ff02::1/128", t6),
            "source-prefix \"ff02::1/128\" is multicast"
        );
        assert_eq!(
            source("f000::/4", t6),
            "source-prefix \"f000::/4\" covers the multicast range ff00::/8"
        );
        assert_eq!(
            source("::/0", t6),
            "source-prefix \"::/0\" contains the unspecified address ::"
        );
        let err = check(Scope {
            source_prefix: vec![net("224.0.0.0/4")],
            ..scope()
        })
        .expect_err("x");
        assert_eq!(err.coap_code(), (4, 0));
    }

    #[test]
    fn link_local_sources_are_allowed() {
        for (s, t) in [
            ("169.254.1.0/24", "203.0.113.0/24"),
            ("fe80::/10", "2001:db8::/32"),
        ] {
            let scope = Scope {
                source_prefix: vec![net(s)],
                target_prefix: vec![net(t)],
                ..scope()
            };
            assert!(check(scope).is_ok(), "{s}");
        }
    }

    #[test]
    fn non_canonical_prefixes_are_normalised() {
        // RFC 6991 §4: host bits set is a valid, non-canonical ip-prefix.
        let ok = check(Scope {
            source_prefix: vec![net("2001:db8:123::1/64")],
            target_prefix: vec![net("2001:db8:c000::9/48")],
            ..scope()
        })
        .expect("valid");
        assert_eq!(ok.scope.source_prefix, [net("2001:db8:123::/64")]);
        assert_eq!(ok.scope.target_prefix, [net("2001:db8:c000::/48")]);
        // Normalised first, then compared: these are one prefix twice.
        assert_eq!(
            source_list(&["192.0.2.1/24", "192.0.2.0/24"], "203.0.113.0/24"),
            "ietf-dots-call-home:source-prefix lists \"192.0.2.0/24\" more than once"
        );
    }

    fn source_list(prefixes: &[&str], target: &str) -> String {
        message(Scope {
            source_prefix: prefixes.iter().map(|p| net(p)).collect(),
            target_prefix: vec![net(target)],
            ..scope()
        })
    }

    #[test]
    fn targets_must_be_routable() {
        let s6 = "2001:db8:123::1/128";
        let target = |t: &str, s: &str| {
            let err = check(Scope {
                source_prefix: vec![net(s)],
                target_prefix: vec![net(t)],
                ..scope()
            })
            .expect_err("rejects");
            assert_eq!(err.coap_code(), (4, 0));
            err.to_string()
        };
        let s4 = "192.0.2.10/32";
        for (t, s, expected) in [
            ("0.0.0.0/0", s4, "target-prefix \"0.0.0.0/0\" contains the unspecified address 0.0.0.0: not a routable target"),
            ("::/0", s6, "target-prefix \"::/0\" contains the unspecified address ::: not a routable target"),
            ("127.0.0.0/8", s4, "target-prefix \"127.0.0.0/8\" is loopback: not a routable target"),
            ("::1/128", s6, "target-prefix \"::1/128\" is the loopback address: not a routable target"),
            ("224.0.0.1/32", s4, "target-prefix \"224.0.0.1/32\" is multicast: not a routable target"),
            ("ff02::1/128", s6, "target-prefix \"ff02::1/128\" is multicast: not a routable target"),
            ("255.255.255.255/32", s4, "target-prefix \"255.255.255.255/32\" is the broadcast address: not a routable target"),
            ("169.254.1.1/32", s4, "target-prefix \"169.254.1.1/32\" is link-local: not a routable target"),
            ("fe80::1/128", s6, "target-prefix \"fe80::1/128\" is link-local: not a routable target"),
            ("::ffff:203.0.113.7/128", s6, "target-prefix \"::ffff:203.0.113.7/128\" is IPv4-mapped: write it as the IPv4 prefix 203.0.113.7/32"),
        ] {
            assert_eq!(target(t, s), expected);
        }
    }

    #[test]
    fn ipv4_mapped_sources_are_refused() {
        // Written as IPv6, a loopback or broadcast source would slip past
        // the IPv4 checks.
        for (s, v4) in [
            ("::ffff:127.0.0.1/128", "127.0.0.1/32"),
            ("::ffff:255.255.255.255/128", "255.255.255.255/32"),
            ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ] {
            assert_eq!(
                source(s, "2001:db8::/32"),
                format!("source-prefix \"{s}\" is IPv4-mapped: write it as the IPv4 prefix {v4}")
            );
        }
        assert_eq!(
            source("::fffe:0:0/95", "2001:db8::/32"),
            "source-prefix \"::fffe:0:0/95\" covers the IPv4-mapped range ::ffff:0.0.0.0/96"
        );
    }

    #[test]
    fn repeated_entries_are_refused() {
        let port = |lower, upper| PortRange { lower, upper };
        let cases = [
            (
                Scope {
                    target_prefix: vec![net("2001:db8:c000::/48"), net("2001:db8:c000::1/48")],
                    ..scope()
                },
                "target-prefix lists \"2001:db8:c000::/48\" more than once",
            ),
            (
                Scope {
                    target_protocol: vec![6, 17, 6],
                    ..scope()
                },
                "target-protocol lists 6 more than once",
            ),
            (
                Scope {
                    target_port_range: vec![port(80, None), port(80, Some(90))],
                    ..scope()
                },
                "target-port-range lists lower-port 80 more than once",
            ),
            (
                Scope {
                    source_port_range: vec![port(1000, Some(2000)), port(1000, Some(2000))],
                    ..scope()
                },
                "ietf-dots-call-home:source-port-range lists lower-port 1000 more than once",
            ),
            (
                Scope {
                    source_icmp_type_range: vec![
                        IcmpTypeRange {
                            lower: 128,
                            upper: None,
                        },
                        IcmpTypeRange {
                            lower: 128,
                            upper: Some(129),
                        },
                    ],
                    ..scope()
                },
                "ietf-dots-call-home:source-icmp-type-range lists lower-type 128 more than once",
            ),
            (
                Scope {
                    target_fqdn: vec!["a.example".into(), "a.example".into()],
                    ..scope()
                },
                "target-fqdn lists \"a.example\" more than once",
            ),
        ];
        for (scope, expected) in cases {
            assert_eq!(message(scope), expected);
        }
        // Overlapping but distinct entries are fine.
        assert!(check(Scope {
            source_port_range: vec![port(1000, Some(2000)), port(1500, Some(2500))],
            ..scope()
        })
        .is_ok());
    }

    #[test]
    fn alias_name_is_refused() {
        let err = check(Scope {
            alias_name: vec!["web-servers".into()],
            ..scope()
        })
        .expect_err("no data channel");
        assert_eq!(err, ValidationError::AliasName);
        assert_eq!(err.coap_code(), (4, 0));
    }

    #[test]
    fn contradictory_scopes_are_refused() {
        let icmp = vec![IcmpTypeRange {
            lower: 128,
            upper: Some(129),
        }];
        let ports = vec![PortRange {
            lower: 53,
            upper: None,
        }];
        let cases = [
            (
                Scope {
                    source_icmp_type_range: icmp.clone(),
                    target_protocol: vec![6],
                    ..scope()
                },
                "source-icmp-type-range is given but target-protocol holds no ICMP of the targets' family (1 for IPv4, 58 for IPv6): no packet can match this scope",
            ),
            (
                // ICMP (1) is IPv4's; the targets are IPv6.
                Scope {
                    source_icmp_type_range: icmp.clone(),
                    target_protocol: vec![1],
                    ..scope()
                },
                "source-icmp-type-range is given but target-protocol holds no ICMP of the targets' family (1 for IPv4, 58 for IPv6): no packet can match this scope",
            ),
            (
                Scope {
                    source_icmp_type_range: icmp.clone(),
                    source_port_range: ports.clone(),
                    ..scope()
                },
                "source-icmp-type-range needs ICMP packets and port ranges need packets with ports: no packet can match this scope",
            ),
            (
                Scope {
                    target_port_range: ports.clone(),
                    target_protocol: vec![58],
                    ..scope()
                },
                "port ranges are given but target-protocol holds no protocol with ports (6 TCP, 17 UDP, 33 DCCP, 132 SCTP): no packet can match this scope",
            ),
        ];
        for (scope, expected) in cases {
            assert_eq!(message(scope), expected);
        }
        for ok in [
            Scope {
                source_icmp_type_range: icmp.clone(),
                target_protocol: vec![58],
                ..scope()
            },
            Scope {
                source_icmp_type_range: icmp,
                ..scope()
            },
            Scope {
                target_port_range: ports.clone(),
                target_protocol: vec![6, 58],
                ..scope()
            },
        ] {
            assert!(check(ok.clone()).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn inverted_ranges_are_rejected() {
        let s = Scope {
            source_port_range: vec![PortRange {
                lower: 2000,
                upper: Some(1000),
            }],
            ..scope()
        };
        assert_eq!(
            message(s),
            "ietf-dots-call-home:source-port-range range 2000-1000 is inverted (lower-port > upper-port)"
        );
        let s = Scope {
            target_port_range: vec![PortRange {
                lower: 443,
                upper: Some(80),
            }],
            ..scope()
        };
        assert_eq!(
            message(s),
            "target-port-range range 443-80 is inverted (lower-port > upper-port)"
        );
        let s = Scope {
            source_icmp_type_range: vec![IcmpTypeRange {
                lower: 8,
                upper: Some(0),
            }],
            ..scope()
        };
        assert_eq!(
            message(s),
            "ietf-dots-call-home:source-icmp-type-range range 8-0 is inverted (lower-type > upper-type)"
        );
        let ok = Scope {
            source_port_range: vec![
                PortRange {
                    lower: 0,
                    upper: Some(65535),
                },
                PortRange {
                    lower: 53,
                    upper: None,
                },
            ],
            ..scope()
        };
        assert!(check(ok).is_ok());
        let ok = Scope {
            source_icmp_type_range: vec![IcmpTypeRange {
                lower: 128,
                upper: Some(129),
            }],
            ..scope()
        };
        assert!(check(ok).is_ok());
    }

    #[test]
    fn families_must_meet() {
        assert_eq!(
            source("192.0.2.0/24", "2001:db8::/32"),
            "source-prefix is only IPv4 and target-prefix only IPv6: no traffic can match"
        );
        let mixed = Scope {
            source_prefix: vec![net("192.0.2.0/24"), net("2001:db8:1::/48")],
            target_prefix: vec![net("2001:db8::/32")],
            ..scope()
        };
        assert!(check(mixed).is_ok());
    }

    #[test]
    fn limits_are_4_22() {
        let many: Vec<IpNet> = (0..33u8)
            .map(|i| net(&format!("2001:db8:123:{i}::/64")))
            .collect();
        let err = check(Scope {
            source_prefix: many,
            ..scope()
        })
        .expect_err("rejects");
        assert_eq!(
            err.to_string(),
            "ietf-dots-call-home:source-prefix has 33 entries, more than the limit of 32"
        );
        assert_eq!(err.coap_code(), (4, 22));
        assert_eq!(err.diagnostic(), err.to_string());
        let protocols = Scope {
            target_protocol: (0..17).collect(),
            ..scope()
        };
        assert_eq!(
            message(protocols),
            "target-protocol has 17 entries, more than the limit of 16"
        );
    }

    #[test]
    fn domain_check_names_the_first_outsider() {
        let domain = [net("192.0.2.0/24"), net("2001:db8:123::/48")];
        assert_eq!(
            prefixes_within(
                &[net("192.0.2.128/25"), net("2001:db8:123::1/128")],
                &domain
            ),
            Ok(())
        );
        let err = prefixes_within(
            &[
                net("192.0.2.0/24"),
                net("198.51.100.0/24"),
                net("10.0.0.0/8"),
            ],
            &domain,
        )
        .expect_err("outside");
        assert_eq!(
            err.to_string(),
            "source-prefix \"198.51.100.0/24\" is outside this agent's domain"
        );
        assert_eq!(err.coap_code(), (4, 0));
        // A prefix larger than the domain is not inside it.
        assert!(prefixes_within(&[net("192.0.0.0/16")], &domain).is_err());
    }

    #[test]
    fn domain_is_a_union() {
        // Covered only by two domain prefixes together.
        let halves = [net("192.0.2.0/25"), net("192.0.2.128/25")];
        assert_eq!(prefixes_within(&[net("192.0.2.0/24")], &halves), Ok(()));
        let gap = [net("192.0.2.0/25"), net("192.0.2.192/26")];
        assert_eq!(
            prefixes_within(&[net("192.0.2.0/24")], &gap),
            Err(ValidationError::OutsideDomain {
                prefix: net("192.0.2.0/24")
            })
        );
    }
}
