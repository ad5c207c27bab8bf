//! Request bodies of the API and their checks. Every error names the
//! field, as a JSON path (`source-port[1]`), so that a detector's author
//! sees at once what to fix.

use ipnet::IpNet;
use serde::Deserialize;

use dots_proto::model::{IcmpTypeRange, PortRange, Scope};

use crate::service::{NewMitigation, ServiceError};

/// Lifetime of a mitigation when the body names none, in seconds.
pub const DEFAULT_LIFETIME: i64 = 3600;

/// A port or ICMP type: a number, or text `LO` / `LO-HI`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RangeSpec {
    Number(u64),
    Text(String),
}

/// `POST /v1/mitigations`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MitigationBody {
    /// The agent to ask; default: the one whose customer prefixes contain
    /// the attacker.
    pub agent: Option<String>,
    /// The attacking address or prefix, as the ISP sees it (for a NATed
    /// customer: the router's public address).
    pub attacker: Option<String>,
    /// More attacking addresses or prefixes (all of the same agent).
    #[serde(default)]
    pub source_prefix: Vec<String>,
    /// Source ports (translated ports behind NAT), `52727` or `"1024-65535"`.
    #[serde(default)]
    pub source_port: Vec<RangeSpec>,
    /// Source ICMP types, `8` or `"0-255"`.
    #[serde(default)]
    pub source_icmp_type: Vec<RangeSpec>,
    /// Attacked addresses or prefixes (at least one).
    #[serde(default)]
    pub target: Vec<String>,
    #[serde(default)]
    pub target_port: Vec<RangeSpec>,
    /// IP protocol numbers, e.g. 17 (UDP).
    #[serde(default)]
    pub protocol: Vec<u8>,
    /// Seconds, or -1 for until withdrawn (default 3600).
    pub lifetime: Option<i64>,
    /// The requester's name for it, unique among unfinished mitigations
    /// (a detector's ban id).
    pub label: Option<String>,
}

/// `PUT /v1/agents/{agent}/prefixes`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrefixesBody {
    pub prefixes: Vec<String>,
}

fn bad(field: String, message: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest {
        field: Some(field),
        message: message.into(),
    }
}

/// An address (a host prefix) or a prefix without host bits.
pub fn prefix(s: &str, field: String) -> Result<IpNet, ServiceError> {
    let p = dots_daemon::config::parse_prefix(s).ok_or_else(|| {
        bad(
            field.clone(),
            format!("{field}: {s:?} is not an address or prefix (like \"192.0.2.1\" or \"2001:db8::/48\")"),
        )
    })?;
    if p.trunc() != p {
        return Err(bad(
            field.clone(),
            format!(
                "{field}: {s:?} has host bits set: write \"{}\" (or the address alone)",
                p.trunc()
            ),
        ));
    }
    Ok(p)
}

fn prefixes(list: &[String], name: &str) -> Result<Vec<IpNet>, ServiceError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| prefix(s, format!("{name}[{i}]")))
        .collect()
}

fn range(spec: &RangeSpec, field: String, max: u64) -> Result<(u64, Option<u64>), ServiceError> {
    let out_of = |v: u64| bad(field.clone(), format!("{field}: {v} is above {max}"));
    let (lo, hi) = match spec {
        RangeSpec::Number(n) => (*n, None),
        RangeSpec::Text(s) => {
            let parse = |t: &str| {
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(field.clone(), format!("{field}: {s:?} is not LO or LO-HI")))
            };
            match s.split_once('-') {
                Some((lo, hi)) => (parse(lo)?, Some(parse(hi)?)),
                None => (parse(s)?, None),
            }
        }
    };
    if lo > max {
        return Err(out_of(lo));
    }
    if let Some(h) = hi {
        if h > max {
            return Err(out_of(h));
        }
        if h < lo {
            return Err(bad(
                field.clone(),
                format!("{field}: upper bound {h} is below lower bound {lo}"),
            ));
        }
    }
    Ok((lo, hi))
}

fn ports(list: &[RangeSpec], name: &str) -> Result<Vec<PortRange>, ServiceError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let (lo, hi) = range(s, format!("{name}[{i}]"), u64::from(u16::MAX))?;
            Ok(PortRange {
                lower: lo as u16,
                upper: hi.map(|h| h as u16),
            })
        })
        .collect()
}

impl MitigationBody {
    /// The checked request. Protocol-level checks (families, special-use
    /// sources, trigger-mitigation) follow in the service.
    pub fn into_request(self) -> Result<NewMitigation, ServiceError> {
        let mut sources = Vec::new();
        if let Some(a) = &self.attacker {
            sources.push(prefix(a, "attacker".into())?);
        }
        sources.extend(prefixes(&self.source_prefix, "source-prefix")?);
        if sources.is_empty() {
            return Err(bad(
                "attacker".into(),
                "attacker: missing: name the attacking address (or source-prefix)",
            ));
        }
        let targets = prefixes(&self.target, "target")?;
        if targets.is_empty() {
            return Err(bad(
                "target".into(),
                "target: missing: name at least one attacked address or prefix (RFC 9066 §5.3.1 requires target-prefix)",
            ));
        }
        let icmp = self
            .source_icmp_type
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (lo, hi) = range(s, format!("source-icmp-type[{i}]"), 255)?;
                Ok(IcmpTypeRange {
                    lower: lo as u8,
                    upper: hi.map(|h| h as u8),
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let lifetime = self.lifetime.unwrap_or(DEFAULT_LIFETIME);
        if lifetime == 0 || lifetime < -1 {
            return Err(bad(
                "lifetime".into(),
                format!("lifetime: {lifetime}: positive seconds, or -1 for until withdrawn"),
            ));
        }
        if let Some(a) = &self.agent {
            if a.trim().is_empty() {
                return Err(bad(
                    "agent".into(),
                    "agent: empty: leave it out to pick by the attacker",
                ));
            }
        }
        Ok(NewMitigation {
            agent: self.agent,
            scope: Scope {
                source_prefix: sources,
                source_port_range: ports(&self.source_port, "source-port")?,
                source_icmp_type_range: icmp,
                target_prefix: targets,
                target_port_range: ports(&self.target_port, "target-port")?,
                target_protocol: self.protocol,
                lifetime: Some(lifetime),
                ..Scope::default()
            },
            label: self.label,
        })
    }
}

impl PrefixesBody {
    pub fn into_prefixes(self) -> Result<Vec<IpNet>, ServiceError> {
        prefixes(&self.prefixes, "prefixes")
    }
}

/// Parses a JSON body, naming the field of a type error.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ServiceError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." {
            None
        } else {
            Some(path.clone())
        };
        let message = match &field {
            Some(f) => format!("{f}: {inner}"),
            None => format!("body: {inner}"),
        };
        ServiceError::BadRequest { field, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<NewMitigation, ServiceError> {
        parse::<MitigationBody>(json.as_bytes())?.into_request()
    }

    fn field(json: &str) -> String {
        req(json).unwrap_err().field().unwrap_or("-").to_string()
    }

    #[test]
    fn a_detectors_request() {
        let r = req(
            r#"{"attacker": "203.0.113.5", "source-port": [52727, "1024-2048"],
                       "target": ["198.51.100.10"], "protocol": [17], "label": "fnm:203.0.113.5"}"#,
        )
        .unwrap();
        assert_eq!(r.agent, None);
        assert_eq!(
            r.scope.source_prefix,
            ["203.0.113.5/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            r.scope.source_port_range,
            [
                PortRange {
                    lower: 52727,
                    upper: None
                },
                PortRange {
                    lower: 1024,
                    upper: Some(2048)
                }
            ]
        );
        assert_eq!(
            r.scope.target_prefix,
            ["198.51.100.10/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(r.scope.lifetime, Some(DEFAULT_LIFETIME));
        assert_eq!(r.label.as_deref(), Some("fnm:203.0.113.5"));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(r#"{"target": ["198.51.100.10"]}"#), "attacker");
        assert_eq!(field(r#"{"attacker": "203.0.113.5"}"#), "target");
        assert_eq!(
            field(r#"{"attacker": "203.0.113.5/24", "target": ["x"]}"#),
            "attacker"
        );
        assert_eq!(
            field(r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1", "nope"]}"#),
            "target[1]"
        );
        assert_eq!(
            field(
                r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "source-port": [1, "9-3"]}"#
            ),
            "source-port[1]"
        );
        assert_eq!(
            field(
                r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "target-port": [70000]}"#
            ),
            "target-port[0]"
        );
        assert_eq!(
            field(
                r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "source-icmp-type": ["300"]}"#
            ),
            "source-icmp-type[0]"
        );
        assert_eq!(
            field(
                r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "protocol": [17, 300]}"#
            ),
            "protocol[1]"
        );
        assert_eq!(
            field(r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "lifetime": 0}"#),
            "lifetime"
        );
        assert_eq!(
            field(r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "lifetime": "soon"}"#),
            "lifetime"
        );
        let e = req(r#"{"attacker": "203.0.113.5", "target": ["198.51.100.1"], "trigger": 1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `trigger`"), "{e}");
        let e = req("[").unwrap_err();
        assert!(e.to_string().starts_with("body: "), "{e}");
        assert_eq!(e.field(), None);
    }
}
