//! The bodies the CLI commands send an agent, built from their flags:
//! mitigation requests (`dots-client mitigate`) and redirects (`dots-client
//! redirect`), in the JSON form the control socket carries.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde_json::Value;

use dots_proto::model::{
    DotsMessage, IcmpTypeRange, MitigationScope, PortRange, RedirectedSignal, Scope,
};

/// One mitigation scope as `dots-client mitigate` takes it: ranges are text
/// (`LO` or `LO-HI`), checked by [`Mitigation::body`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mitigation {
    pub sources: Vec<IpNet>,
    pub source_ports: Vec<String>,
    pub icmp_types: Vec<String>,
    pub targets: Vec<IpNet>,
    pub target_ports: Vec<String>,
    pub protocols: Vec<u8>,
    /// Seconds, -1 for indefinite.
    pub lifetime: i64,
}

impl Mitigation {
    /// The JSON form of the request (`ietf-dots-signal-channel:mitigation-scope`
    /// with one scope). A malformed range names its flag.
    pub fn body(&self) -> Result<Value> {
        let ports = |v: &[String], flag: &str| -> Result<Vec<PortRange>> {
            v.iter()
                .map(|s| {
                    parse_range::<u16>(s, flag).map(|(lower, upper)| PortRange { lower, upper })
                })
                .collect()
        };
        let scope = Scope {
            source_prefix: self.sources.clone(),
            source_port_range: ports(&self.source_ports, "source-port")?,
            source_icmp_type_range: self
                .icmp_types
                .iter()
                .map(|s| {
                    parse_range::<u8>(s, "icmp-type")
                        .map(|(lower, upper)| IcmpTypeRange { lower, upper })
                })
                .collect::<Result<_>>()?,
            target_prefix: self.targets.clone(),
            target_port_range: ports(&self.target_ports, "target-port")?,
            target_protocol: self.protocols.clone(),
            lifetime: Some(self.lifetime),
            ..Scope::default()
        };
        MitigationScope {
            scopes: vec![scope],
        }
        .to_json()
        .map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))
    }
}

/// A mitigation request body read from a JSON file (RFC 9066 Figure 10
/// form), checked here so that a mistake is reported with the file's name.
pub fn mitigation_from_file(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    MitigationScope::from_json(&json)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.diagnostic()))?;
    Ok(json)
}

/// The JSON form of a redirect to `alt` (RFC 9066 §5.2.2), at `records`
/// (none: the agent resolves `alt`), holding for `ttl` seconds.
pub fn redirect(alt: String, records: Vec<IpAddr>, ttl: Option<u32>) -> Result<Value> {
    RedirectedSignal {
        alt_ch_client: alt,
        alt_ch_client_record: records,
        ttl,
    }
    .to_json()
    .map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))
}

/// `LO` or `LO-HI` of a port or type range; errors name `--flag`.
pub fn parse_range<T: std::str::FromStr + PartialOrd + Copy>(
    s: &str,
    flag: &str,
) -> Result<(T, Option<T>)> {
    let bad = || anyhow::anyhow!("--{flag} {s:?}: expected LO or LO-HI");
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (
            lo.trim().parse().map_err(|_| bad())?,
            Some(hi.trim().parse().map_err(|_| bad())?),
        ),
        None => (s.trim().parse().map_err(|_| bad())?, None),
    };
    if let Some(h) = hi {
        if h < lo {
            anyhow::bail!("--{flag} {s:?}: upper bound below lower bound");
        }
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range::<u16>("53", "p").unwrap(), (53, None));
        assert_eq!(
            parse_range::<u16>(" 1024 - 65535 ", "p").unwrap(),
            (1024, Some(65535))
        );
        assert_eq!(parse_range::<u8>("3-3", "t").unwrap(), (3, Some(3)));
        let e = parse_range::<u16>("x", "source-port").unwrap_err();
        assert_eq!(e.to_string(), "--source-port \"x\": expected LO or LO-HI");
        let e = parse_range::<u16>("9-1", "target-port").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--target-port \"9-1\": upper bound below lower bound"
        );
        assert!(parse_range::<u8>("300", "icmp-type").is_err());
        assert!(parse_range::<u16>("70000", "source-port").is_err());
    }

    #[test]
    fn mitigation_body_round_trips() {
        let m = Mitigation {
            sources: vec!["192.0.2.10/32".parse().unwrap()],
            source_ports: vec!["1024-65535".into()],
            icmp_types: Vec::new(),
            targets: vec!["198.51.100.7/32".parse().unwrap()],
            target_ports: vec!["53".into()],
            protocols: vec![17],
            lifetime: 3600,
        };
        let body = m.body().unwrap();
        let scope = MitigationScope::from_json(&body).unwrap();
        assert_eq!(scope.scopes.len(), 1);
        let s = &scope.scopes[0];
        assert_eq!(s.source_prefix, m.sources);
        assert_eq!(
            s.source_port_range,
            [PortRange {
                lower: 1024,
                upper: Some(65535)
            }]
        );
        assert_eq!(
            s.target_port_range,
            [PortRange {
                lower: 53,
                upper: None
            }]
        );
        assert_eq!(s.target_protocol, [17]);
        assert_eq!(s.lifetime, Some(3600));

        let bad = Mitigation {
            icmp_types: vec!["8-x".into()],
            ..m
        };
        let e = bad.body().unwrap_err();
        assert!(e.to_string().starts_with("--icmp-type \"8-x\""), "{e}");
    }

    #[test]
    fn mitigation_file_is_checked() {
        let dir = std::env::temp_dir().join(format!("dots-client-req-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        let body = Mitigation {
            sources: vec!["192.0.2.0/24".parse().unwrap()],
            targets: vec!["198.51.100.7/32".parse().unwrap()],
            lifetime: -1,
            ..Mitigation::default()
        }
        .body()
        .unwrap();
        std::fs::write(&good, body.to_string()).unwrap();
        assert_eq!(mitigation_from_file(&good).unwrap(), body);
        let not_json = dir.join("bad.json");
        std::fs::write(&not_json, "{").unwrap();
        let e = mitigation_from_file(&not_json).unwrap_err();
        assert!(e.to_string().ends_with("bad.json is not JSON"), "{e}");
        let wrong = dir.join("wrong.json");
        std::fs::write(&wrong, r#"{"x": 1}"#).unwrap();
        let e = mitigation_from_file(&wrong).unwrap_err();
        assert!(e.to_string().contains("wrong.json: "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn redirect_body() {
        let v = redirect(
            "alt.example".into(),
            vec!["2001:db8::1".parse().unwrap()],
            Some(60),
        )
        .unwrap();
        let back = RedirectedSignal::from_json(&v).unwrap();
        assert_eq!(back.alt_ch_client, "alt.example");
        assert_eq!(back.ttl, Some(60));
    }
}
