//! `[cluster]`: the etcd cluster several `dots-client` nodes share. Absent
//! (no endpoints), the node runs alone with its state directory.

use std::path::Path;

use serde::Deserialize;

use dots_daemon::config::{quoted, ConfigError};

use crate::cluster::{ClusterOptions, DEFAULT_CLUSTER_NAME, DEFAULT_LEASE_TTL};

/// `[cluster]` in `client.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://HOST:PORT` or `HOST:PORT`); empty: no cluster.
    pub etcd: Vec<String>,
    /// The cluster's name, shared by its nodes (keys live under
    /// `/dots/<name>/`).
    pub name: String,
    /// This node's name, unique in the cluster; default: the host name.
    pub node: Option<String>,
    /// Seconds a node keeps its agents without reaching etcd.
    pub lease_ttl: u64,
    /// The host name redirects to this node give agents (`alt-ch-client`,
    /// in this node's certificate); none: agents cannot be redirected here.
    pub advertise: Option<String>,
    /// Addresses agents dial to reach this node (`alt-ch-client-record`);
    /// default: the address the node listens on, when it is a specific one.
    pub advertise_addresses: Vec<std::net::IpAddr>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd: Vec::new(),
            name: DEFAULT_CLUSTER_NAME.into(),
            node: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            advertise: None,
            advertise_addresses: Vec::new(),
        }
    }
}

/// A name that is one etcd key segment: letters, digits, `.`, `_`, `-`.
fn check_name(file: &Path, key: &str, name: &str) -> Result<(), ConfigError> {
    let message = if name.is_empty() {
        Some("cannot be empty")
    } else if name.len() > 64 {
        Some("64 characters at most")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("letters, digits, '.', '_' and '-' only (it is part of etcd keys)")
    } else {
        None
    };
    match message {
        Some(m) => Err(ConfigError::Value {
            file: file.to_path_buf(),
            key: key.into(),
            value: quoted(name),
            message: m.into(),
        }),
        None => Ok(()),
    }
}

/// An endpoint as etcd-client takes it: `http://HOST:PORT`.
fn endpoint(file: &Path, key: &str, e: &str) -> Result<String, ConfigError> {
    let bad = |message: &str| ConfigError::Value {
        file: file.to_path_buf(),
        key: key.into(),
        value: quoted(e),
        message: message.into(),
    };
    if e.starts_with("https://") {
        return Err(bad(
            "TLS to etcd is not supported yet: use http:// on a trusted network",
        ));
    }
    let rest = e.strip_prefix("http://").unwrap_or(e);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT or http://HOST:PORT, e.g. \"127.0.0.1:2379\""))?;
    let bracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    if !(bracketed || host_ok(host)) {
        return Err(bad(
            "the host is not an IPv4 address, [IPv6] address or name",
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{rest}")),
        _ => Err(bad("the port must be 1 to 65535")),
    }
}

/// An IPv4 address or a host name (letters, digits, `.`, `-`).
fn host_ok(host: &str) -> bool {
    !host.is_empty()
        && (host.parse::<std::net::Ipv4Addr>().is_ok()
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-')))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl ClusterConfig {
    /// The node's settings, checked; `None` without endpoints.
    pub fn options(&self, file: &Path) -> Result<Option<ClusterOptions>, ConfigError> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let endpoints = self
            .etcd
            .iter()
            .enumerate()
            .map(|(i, e)| endpoint(file, &format!("cluster.etcd[{i}]"), e))
            .collect::<Result<Vec<_>, _>>()?;
        check_name(file, "cluster.name", &self.name)?;
        let node = self.node.clone().unwrap_or_else(host_name);
        check_name(file, "cluster.node", &node)?;
        if !(2..=3600).contains(&self.lease_ttl) {
            return Err(ConfigError::Value {
                file: file.to_path_buf(),
                key: "cluster.lease-ttl".into(),
                value: self.lease_ttl.to_string(),
                message: "seconds, 2 to 3600: how long a dead node's agents wait for another"
                    .into(),
            });
        }
        if let Some(a) = &self.advertise {
            // alt-ch-client is a host name (RFC 9066 §5.2.2), never an
            // address literal.
            let last_numeric = a
                .trim_end_matches('.')
                .rsplit('.')
                .next()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
            if !host_ok(a) || last_numeric || a.len() > 253 {
                return Err(ConfigError::Value {
                    file: file.to_path_buf(),
                    key: "cluster.advertise".into(),
                    value: quoted(a),
                    message: "a host name (not an address): the name agents verify in this node's certificate".into(),
                });
            }
        }
        for (i, a) in self.advertise_addresses.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(ConfigError::Value {
                    file: file.to_path_buf(),
                    key: format!("cluster.advertise-addresses[{i}]"),
                    value: quoted(a),
                    message: "an address agents can dial (not unspecified, multicast or loopback)"
                        .into(),
                });
            }
        }
        Ok(Some(ClusterOptions {
            endpoints,
            cluster: self.name.clone(),
            node,
            lease_ttl: self.lease_ttl,
            advertise: self.advertise.clone(),
            advertise_addresses: self.advertise_addresses.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(c: &ClusterConfig) -> Result<Option<ClusterOptions>, ConfigError> {
        c.options(Path::new("/etc/dots-client/client.toml"))
    }

    #[test]
    fn no_endpoints_no_cluster() {
        assert_eq!(opts(&ClusterConfig::default()).unwrap(), None);
    }

    #[test]
    fn endpoints_and_names() {
        let c = ClusterConfig {
            etcd: vec![
                "127.0.0.1:2379".into(),
                "http://[2001:db8::1]:2379".into(),
                "http://etcd-1.example:2379".into(),
            ],
            node: Some("isp-a".into()),
            ..ClusterConfig::default()
        };
        let o = opts(&c).unwrap().unwrap();
        assert_eq!(
            o.endpoints,
            [
                "http://127.0.0.1:2379",
                "http://[2001:db8::1]:2379",
                "http://etcd-1.example:2379"
            ]
        );
        assert_eq!(o.node, "isp-a");
        assert_eq!(o.cluster, "default");
        assert_eq!(o.lease_ttl, 10);
        assert_eq!(o.advertise, None);
        let c = ClusterConfig {
            advertise: Some("n1.isp.example".into()),
            advertise_addresses: vec!["192.0.2.1".parse().unwrap()],
            ..c
        };
        let o = opts(&c).unwrap().unwrap();
        assert_eq!(o.advertise.as_deref(), Some("n1.isp.example"));
        assert_eq!(
            o.advertise_addresses,
            ["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let c = ClusterConfig {
            advertise_addresses: vec!["0.0.0.0".parse().unwrap()],
            ..c
        };
        assert_eq!(
            opts(&c).unwrap_err().key(),
            Some("cluster.advertise-addresses[0]")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = ClusterConfig {
            etcd: vec!["127.0.0.1:2379".into()],
            node: Some("n1".into()),
            ..ClusterConfig::default()
        };
        let key = |c: ClusterConfig| opts(&c).unwrap_err().key().map(str::to_string);
        for (bad, k) in [
            ("127.0.0.1", "cluster.etcd[1]"),
            ("127.0.0.1:0", "cluster.etcd[1]"),
            ("127.0.0.1:99999", "cluster.etcd[1]"),
            ("https://127.0.0.1:2379", "cluster.etcd[1]"),
            ("a b:2379", "cluster.etcd[1]"),
        ] {
            let mut c = base.clone();
            c.etcd.push(bad.into());
            assert_eq!(key(c).as_deref(), Some(k), "{bad}");
        }
        for n in ["", "a/b", "x y", &"n".repeat(65)] {
            let c = ClusterConfig {
                node: Some(n.into()),
                ..base.clone()
            };
            assert_eq!(key(c).as_deref(), Some("cluster.node"), "{n:?}");
            let c = ClusterConfig {
                name: n.into(),
                ..base.clone()
            };
            assert_eq!(key(c).as_deref(), Some("cluster.name"), "{n:?}");
        }
        for a in ["", "a b", "x/y", "[::1]", "2001:db8::1", "192.0.2.1"] {
            let c = ClusterConfig {
                advertise: Some(a.into()),
                ..base.clone()
            };
            assert_eq!(key(c).as_deref(), Some("cluster.advertise"), "{a:?}");
        }
        for t in [0, 1, 3601] {
            let c = ClusterConfig {
                lease_ttl: t,
                ..base.clone()
            };
            assert_eq!(key(c).as_deref(), Some("cluster.lease-ttl"), "{t}");
        }
    }
}
