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
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd: Vec::new(),
            name: DEFAULT_CLUSTER_NAME.into(),
            node: None,
            lease_ttl: DEFAULT_LEASE_TTL,
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
    let host_ok = !host.is_empty()
        && !host.contains('/')
        && (host.parse::<std::net::Ipv4Addr>().is_ok()
            || (host.starts_with('[')
                && host.ends_with(']')
                && host[1..host.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok())
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-')));
    if !host_ok {
        return Err(bad(
            "the host is not an IPv4 address, [IPv6] address or name",
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{rest}")),
        _ => Err(bad("the port must be 1 to 65535")),
    }
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
        Ok(Some(ClusterOptions {
            endpoints,
            cluster: self.name.clone(),
            node,
            lease_ttl: self.lease_ttl,
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
        for t in [0, 1, 3601] {
            let c = ClusterConfig {
                lease_ttl: t,
                ..base.clone()
            };
            assert_eq!(key(c).as_deref(), Some("cluster.lease-ttl"), "{t}");
        }
    }
}
