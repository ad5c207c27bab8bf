//! The flags of `dots-client listen`, and how they override `client.toml`:
//! a flag given replaces the file's value (`--allow` replaces the file's
//! list); without `--config` the flags apply to [`ClientConfig::default`].

use std::{path::PathBuf, sync::Arc};

use dots_daemon::{config::ConfigError, logging::LogFormat};

use super::{ClientConfig, CustomerEntry};
use crate::listener::Reloader;

/// Flags of `dots-client listen`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenFlags {
    /// TOML configuration (see examples/client.toml); the flags below
    /// override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address for DTLS, or "none" [default: [::]:4647].
    #[arg(long)]
    pub udp: Option<String>,
    /// TCP address for TLS, or "none" [default: [::]:4647].
    #[arg(long)]
    pub tcp: Option<String>,
    /// CA bundle agents' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Agent identity allowed in (repeatable); default: any from the CA.
    #[arg(long = "allow", value_name = "NAME")]
    pub allow: Vec<String>,
    /// Control socket path [default: /run/dots-client/control.sock].
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Directory for state that outlives the process (session-ticket keys,
    /// so agents resume their sessions after a restart) [default:
    /// /var/lib/dots-client].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Log format on stderr (filter with RUST_LOG) [default: human].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Customer prefixes of an agent, AGENT=PREFIX[,PREFIX...] (repeatable;
    /// replaces the file's [[customer]] list), e.g.
    /// cpe1=203.0.113.1,2001:db8:1::/48.
    #[arg(long = "customer", value_name = "AGENT=PREFIXES")]
    pub customers: Vec<CustomerEntry>,
    /// Serve the HTTPS API on this address (e.g. 127.0.0.1:8443), or "none".
    #[arg(long = "api", value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Bearer tokens of the API, `NAME TOKEN` per line.
    #[arg(long, value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// Accept API client certificates from this CA as credentials.
    #[arg(long, value_name = "FILE")]
    pub api_client_ca: Option<PathBuf>,
    /// Audit trail (JSON lines) [default: STATE_DIR/audit.jsonl].
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Agents connected at once, at most [default: 10000].
    #[arg(long)]
    pub max_agents: Option<usize>,
    /// etcd endpoint of the cluster this node joins, HOST:PORT (repeatable;
    /// replaces the file's [cluster] etcd list).
    #[arg(long = "etcd", value_name = "ENDPOINT")]
    pub etcd: Vec<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// The cluster's name, shared by its nodes [default: default].
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// Seconds a node keeps its agents without reaching etcd [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub lease_ttl: Option<u64>,
    /// Host name that redirects to this node give agents (in its
    /// certificate).
    #[arg(long, value_name = "FQDN")]
    pub advertise: Option<String>,
    /// Address agents dial to reach this node (repeatable) [default: the
    /// listening address].
    #[arg(long, value_name = "IP")]
    pub advertise_address: Vec<std::net::IpAddr>,
}

impl ListenFlags {
    /// The configuration `dots-client listen` uses: `--config` (or the
    /// defaults) with the flags applied.
    pub fn load(&self) -> Result<ClientConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => ClientConfig::load(path)?,
            None => ClientConfig::default(),
        };
        self.apply(&mut c);
        Ok(c)
    }

    /// Overrides `c` with the flags given.
    pub fn apply(&self, c: &mut ClientConfig) {
        if let Some(v) = &self.udp {
            c.udp = v.clone();
        }
        if let Some(v) = &self.tcp {
            c.tcp = v.clone();
        }
        for (flag, field) in [
            (&self.ca, &mut c.ca),
            (&self.cert, &mut c.cert),
            (&self.key, &mut c.key),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if !self.allow.is_empty() {
            c.allow = self.allow.clone();
        }
        if let Some(v) = &self.control {
            c.control_socket = v.clone();
        }
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(f) = self.log_format {
            c.log_format = f;
        }
        if !self.customers.is_empty() {
            c.customer = self.customers.clone();
        }
        if let Some(v) = &self.api_listen {
            c.api.listen = v.clone();
        }
        if self.api_tokens.is_some() {
            c.api.tokens_file.clone_from(&self.api_tokens);
        }
        if self.api_client_ca.is_some() {
            c.api.client_ca.clone_from(&self.api_client_ca);
        }
        if self.audit_log.is_some() {
            c.audit_log.clone_from(&self.audit_log);
        }
        if let Some(n) = self.max_agents {
            c.max_agents = n;
        }
        if !self.etcd.is_empty() {
            c.cluster.etcd = self.etcd.clone();
        }
        if self.node_name.is_some() {
            c.cluster.node.clone_from(&self.node_name);
        }
        if let Some(n) = &self.cluster_name {
            c.cluster.name = n.clone();
        }
        if let Some(t) = self.lease_ttl {
            c.cluster.lease_ttl = t;
        }
        if self.advertise.is_some() {
            c.cluster.advertise.clone_from(&self.advertise);
        }
        if !self.advertise_address.is_empty() {
            c.cluster.advertise_addresses = self.advertise_address.clone();
        }
    }

    /// How `dots-client listen` re-reads its configuration on SIGHUP or
    /// `dots-client reload`: the file again, with the same flags on top.
    pub fn reloader(&self) -> Reloader {
        let flags = self.clone();
        Reloader(Arc::new(move || {
            let c = flags.load().map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())?;
            c.customers().map_err(|e| e.to_string())
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        listen: ListenFlags,
    }

    fn flags(args: &[&str]) -> ListenFlags {
        Wrapper::try_parse_from(std::iter::once("listen").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .listen
    }

    fn file() -> ClientConfig {
        ClientConfig::from_str(
            r#"
udp = "none"
tcp = "0.0.0.0:4000"
ca = "ca.pem"
cert = "client.pem"
key = "client.key"
allow = ["cpe1", "cpe2"]
control-socket = "/run/x.sock"
state-dir = "st"
log-format = "json"
"#,
            "/etc/dots-client/client.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn applied(args: &[&str]) -> ClientConfig {
        let mut c = file();
        flags(args).apply(&mut c);
        c
    }

    #[test]
    fn no_flag_changes_nothing() {
        assert_eq!(flags(&[]), ListenFlags::default());
        assert_eq!(applied(&[]), file());
        assert_eq!(
            ListenFlags::default().load().unwrap(),
            ClientConfig::default()
        );
    }

    #[test]
    fn addresses_override() {
        let c = applied(&["--udp", "[::]:4647", "--tcp", "none"]);
        assert_eq!(c.udp, "[::]:4647");
        assert_eq!(c.tcp, "none");
        assert_eq!(applied(&["--tcp", "127.0.0.1:1"]).udp, "none");
    }

    #[test]
    fn credentials_override_one_by_one() {
        let c = applied(&["--key", "/k"]);
        assert_eq!(c.key, Some(PathBuf::from("/k")));
        assert_eq!(c.ca, file().ca);
        assert_eq!(c.cert, file().cert);
        assert_eq!(c.ca.as_deref(), Some(Path::new("/etc/dots-client/ca.pem")));
        let c = applied(&["--ca", "a", "--cert", "b"]);
        assert_eq!(c.ca, Some(PathBuf::from("a")));
        assert_eq!(c.cert, Some(PathBuf::from("b")));
        assert_eq!(c.key, file().key);
    }

    #[test]
    fn allow_replaces_the_files_list() {
        assert_eq!(applied(&["--allow", "cpe9"]).allow, ["cpe9"]);
        assert_eq!(applied(&["--allow", "a", "--allow", "b"]).allow, ["a", "b"]);
        assert_eq!(applied(&[]).allow, ["cpe1", "cpe2"]);
    }

    #[test]
    fn paths_and_log_format_override() {
        let c = applied(&[
            "--control",
            "/run/y.sock",
            "--state-dir",
            "/var/lib/y",
            "--log-format",
            "human",
        ]);
        assert_eq!(c.control_socket, Path::new("/run/y.sock"));
        assert_eq!(c.state_dir, Path::new("/var/lib/y"));
        assert_eq!(c.log_format, LogFormat::Human);
        assert_eq!(c.udp, file().udp);
        assert!(Wrapper::try_parse_from(["listen", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn customers_api_and_limits() {
        let c = applied(&[
            "--customer",
            "cpe9=203.0.113.9,2001:db8:9::/48",
            "--api",
            "127.0.0.1:8443",
            "--api-tokens",
            "/etc/t",
            "--max-agents",
            "5",
            "--audit-log",
            "/var/log/a.jsonl",
        ]);
        assert_eq!(
            c.customer,
            [CustomerEntry {
                agent: "cpe9".into(),
                prefixes: vec![
                    "203.0.113.9/32".parse().unwrap(),
                    "2001:db8:9::/48".parse().unwrap()
                ],
            }]
        );
        assert_eq!(c.api.listen, "127.0.0.1:8443");
        assert_eq!(c.api.tokens_file, Some(PathBuf::from("/etc/t")));
        assert_eq!(c.max_agents, 5);
        assert_eq!(c.audit_log, Some(PathBuf::from("/var/log/a.jsonl")));
        for bad in ["cpe9", "cpe9=nope", "cpe9=192.0.2.1,"] {
            let e = Wrapper::try_parse_from(["listen", "--customer", bad]).unwrap_err();
            assert!(e.to_string().contains("--customer"), "{bad}: {e}");
        }
    }

    #[test]
    fn load_applies_flags_to_the_file_or_the_defaults() {
        let c = flags(&["--ca", "ca.pem", "--cert", "c.pem", "--key", "c.key"])
            .load()
            .unwrap();
        assert_eq!(
            c,
            ClientConfig {
                ca: Some("ca.pem".into()),
                cert: Some("c.pem".into()),
                key: Some("c.key".into()),
                ..ClientConfig::default()
            }
        );
        c.validate().unwrap_or_else(|e| panic!("{e}"));
        let e = flags(&["--config", "/nonexistent/client.toml"])
            .load()
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
