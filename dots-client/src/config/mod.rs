//! `client.toml`: the settings of `dots-client listen`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::Deserialize;

use dots_daemon::{
    config::{
        check_path_set, check_prefixes, check_readable, check_socket_path, de_prefixes, parse,
        parse_prefix, quoted, read, resolve, resolve_opt, ConfigError, COMMAND_LINE,
    },
    logging::LogFormat,
    transport::Credentials,
};

use crate::{
    api::ApiOptions,
    control::DEFAULT_CONTROL_SOCKET,
    listener::{ClientOptions, Customers},
    registry::CustomerRegistry,
};

mod cluster;
mod flags;
#[cfg(test)]
mod tests;

pub use cluster::ClusterConfig;
pub use flags::ListenFlags;

/// Default `state-dir` of `dots-client listen`.
pub const DEFAULT_CLIENT_STATE_DIR: &str = "/var/lib/dots-client";
/// Default `udp` and `tcp` listening address.
pub const DEFAULT_LISTEN_ADDR: &str = "[::]:4647";
/// Default `max-agents`.
pub const DEFAULT_MAX_AGENTS: usize = 10_000;
/// Default `max-handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// One `[[customer]]`: the prefixes the ISP assigned to the customer whose
/// router has this agent identity.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CustomerEntry {
    /// The agent's certificate identity (as `dots-client agents` shows it).
    pub agent: String,
    /// Its WAN addresses and delegated prefixes.
    #[serde(deserialize_with = "de_prefixes")]
    pub prefixes: Vec<IpNet>,
}

impl FromStr for CustomerEntry {
    type Err = String;

    /// `AGENT=PREFIX[,PREFIX...]`, as `--customer` takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (agent, list) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected AGENT=PREFIX[,PREFIX...]"))?;
        let prefixes = list
            .split(',')
            .map(|p| parse_prefix(p).ok_or_else(|| format!("{p:?} is not an address or prefix")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CustomerEntry {
            agent: agent.trim().to_string(),
            prefixes,
        })
    }
}

/// `[api]`: the HTTPS JSON API.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to serve HTTPS on, or "none".
    pub listen: String,
    /// Server certificate and key; default: the client's `cert` and `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Bearer tokens, `NAME TOKEN` per line.
    pub tokens_file: Option<PathBuf>,
    /// CA of the client certificates accepted as credentials.
    pub client_ca: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "none".into(),
            cert: None,
            key: None,
            tokens_file: None,
            client_ca: None,
        }
    }
}

/// The whole `client.toml`. Fields are public so that command-line flags can
/// override them before [`ClientConfig::to_options`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClientConfig {
    /// UDP address for DTLS, or `"none"`.
    pub udp: String,
    /// TCP address for TLS, or `"none"`.
    pub tcp: String,
    /// CA bundle agents' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// This client's certificate, PEM.
    pub cert: Option<PathBuf>,
    /// This client's private key, PEM.
    pub key: Option<PathBuf>,
    /// Agent identities let in; empty: any certificate from the CA.
    pub allow: Vec<String>,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Directory for session-ticket keys (agents resume after a restart).
    pub state_dir: PathBuf,
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// Customer prefixes per agent identity (`[[customer]]`).
    pub customer: Vec<CustomerEntry>,
    /// The HTTP API (`[api]`).
    pub api: ApiConfig,
    /// The audit trail; default `<state-dir>/audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// Agents connected at once, at most.
    pub max_agents: usize,
    /// (D)TLS handshakes in progress at once, at most.
    pub max_handshakes: usize,
    /// The etcd cluster shared with other nodes (`[cluster]`).
    pub cluster: ClusterConfig,
    /// The file this came from; not a key.
    #[serde(skip)]
    pub origin: PathBuf,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            udp: DEFAULT_LISTEN_ADDR.into(),
            tcp: DEFAULT_LISTEN_ADDR.into(),
            ca: None,
            cert: None,
            key: None,
            allow: Vec::new(),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            state_dir: PathBuf::from(DEFAULT_CLIENT_STATE_DIR),
            log_format: LogFormat::Human,
            customer: Vec::new(),
            api: ApiConfig::default(),
            audit_log: None,
            max_agents: DEFAULT_MAX_AGENTS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            cluster: ClusterConfig::default(),
            origin: PathBuf::from(COMMAND_LINE),
        }
    }
}

impl ClientConfig {
    /// Reads and parses `path`; then call [`validate`](Self::validate).
    pub fn load(path: impl AsRef<Path>) -> Result<ClientConfig, ConfigError> {
        let path = path.as_ref();
        Self::from_str(&read(path)?, path)
    }

    /// Parses `text`; `origin` names it in errors and is the base of
    /// relative paths.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: impl AsRef<Path>) -> Result<ClientConfig, ConfigError> {
        let origin = origin.as_ref();
        let mut c: ClientConfig = parse(text, origin)?;
        c.origin = origin.to_path_buf();
        resolve_opt(&mut c.ca, origin);
        resolve_opt(&mut c.cert, origin);
        resolve_opt(&mut c.key, origin);
        resolve(&mut c.control_socket, origin);
        resolve(&mut c.state_dir, origin);
        resolve_opt(&mut c.audit_log, origin);
        resolve_opt(&mut c.api.cert, origin);
        resolve_opt(&mut c.api.key, origin);
        resolve_opt(&mut c.api.tokens_file, origin);
        resolve_opt(&mut c.api.client_ca, origin);
        Ok(c)
    }

    fn address(&self, key: &str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
        if s == "none" {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| ConfigError::Value {
            file: self.origin.clone(),
            key: key.into(),
            value: quoted(s),
            message: "expected an address like \"[::]:4647\" or \"0.0.0.0:4647\", or \"none\""
                .into(),
        })
    }

    fn credentials(&self) -> Result<Credentials, ConfigError> {
        let need = |name: &str, p: &Option<PathBuf>, what: &str| match p {
            Some(p) => {
                check_path_set(&self.origin, name, p)?;
                Ok(p.clone())
            }
            None => Err(ConfigError::Missing {
                file: self.origin.clone(),
                key: name.into(),
                message: what.into(),
            }),
        };
        Ok(Credentials {
            ca: need(
                "ca",
                &self.ca,
                "the CA bundle agents' certificates must chain to",
            )?,
            cert: need("cert", &self.cert, "this client's certificate (PEM)")?,
            key: need("key", &self.key, "this client's private key (PEM)")?,
        })
    }

    /// Semantic checks that need nothing but the configuration itself (not
    /// the certificate files: see [`check_files`](Self::check_files)).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let udp = self.address("udp", &self.udp)?;
        let tcp = self.address("tcp", &self.tcp)?;
        if udp.is_none() && tcp.is_none() {
            return Err(ConfigError::Value {
                file: self.origin.clone(),
                key: "tcp".into(),
                value: "\"none\"".into(),
                message: "udp and tcp are both \"none\": nothing to listen on".into(),
            });
        }
        self.credentials()?;
        for (i, a) in self.allow.iter().enumerate() {
            if a.trim().is_empty() {
                return Err(ConfigError::Value {
                    file: self.origin.clone(),
                    key: format!("allow[{i}]"),
                    value: quoted(a),
                    message: "an agent identity cannot be empty".into(),
                });
            }
        }
        check_socket_path(&self.origin, "control-socket", &self.control_socket)?;
        check_path_set(&self.origin, "state-dir", &self.state_dir)?;
        if let Some(p) = &self.audit_log {
            check_path_set(&self.origin, "audit-log", p)?;
        }
        for (key, n) in [
            ("max-agents", self.max_agents),
            ("max-handshakes", self.max_handshakes),
        ] {
            if n == 0 {
                return Err(self.value(key, "0", "must be at least 1".into()));
            }
        }
        self.customers()?;
        self.api_options()?;
        self.cluster.options(&self.origin)?;
        Ok(())
    }

    fn value(&self, key: &str, value: &str, message: String) -> ConfigError {
        ConfigError::Value {
            file: self.origin.clone(),
            key: key.into(),
            value: value.into(),
            message,
        }
    }

    /// The `[[customer]]` entries, checked: one entry per agent, prefixes
    /// without host bits, no prefix inside another agent's.
    pub fn customers(&self) -> Result<Customers, ConfigError> {
        let mut map: Customers = BTreeMap::new();
        for (i, c) in self.customer.iter().enumerate() {
            if c.agent.trim().is_empty() {
                return Err(self.value(
                    &format!("customer[{i}].agent"),
                    &quoted(&c.agent),
                    "an agent identity cannot be empty".into(),
                ));
            }
            if c.prefixes.is_empty() {
                return Err(self.value(
                    &format!("customer[{i}].prefixes"),
                    "[]",
                    "list the customer's WAN addresses and delegated prefixes".into(),
                ));
            }
            check_prefixes(
                &self.origin,
                &format!("customer[{i}].prefixes"),
                &c.prefixes,
            )?;
            if map.insert(c.agent.clone(), c.prefixes.clone()).is_some() {
                return Err(self.value(
                    &format!("customer[{i}].agent"),
                    &quoted(&c.agent),
                    "listed twice: put all its prefixes in one entry".into(),
                ));
            }
        }
        CustomerRegistry::new(map.clone(), None)
            .map_err(|e| self.value("customer", "[...]", e.to_string()))?;
        Ok(map)
    }

    /// The `[api]` settings, or `None` when `listen = "none"`.
    pub fn api_options(&self) -> Result<Option<ApiOptions>, ConfigError> {
        let Some(listen) = self.address("api.listen", &self.api.listen)? else {
            return Ok(None);
        };
        if self.api.tokens_file.is_none() && self.api.client_ca.is_none() {
            return Err(ConfigError::Missing {
                file: self.origin.clone(),
                key: "api.tokens-file".into(),
                message: "every API call needs a credential: set tokens-file, client-ca or both"
                    .into(),
            });
        }
        let creds = self.credentials()?;
        Ok(Some(ApiOptions {
            listen,
            cert: self.api.cert.clone().unwrap_or(creds.cert),
            key: self.api.key.clone().unwrap_or(creds.key),
            tokens: self.api.tokens_file.clone(),
            client_ca: self.api.client_ca.clone(),
        }))
    }

    /// Checks the ca, cert and key files exist and are readable.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let c = self.credentials()?;
        check_readable(&self.origin, "ca", &c.ca)?;
        check_readable(&self.origin, "cert", &c.cert)?;
        check_readable(&self.origin, "key", &c.key)?;
        if let Some(api) = self.api_options()? {
            check_readable(&self.origin, "api.cert", &api.cert)?;
            check_readable(&self.origin, "api.key", &api.key)?;
            if let Some(t) = &api.tokens {
                check_readable(&self.origin, "api.tokens-file", t)?;
            }
            if let Some(ca) = &api.client_ca {
                check_readable(&self.origin, "api.client-ca", ca)?;
            }
        }
        Ok(())
    }

    /// `dots-client check-config` and start-up: [`validate`](Self::validate),
    /// then the certificate files in depth (readable, PEM, the key is the
    /// certificate's, valid now, chains to `ca`). Returns the warnings
    /// (certificates expiring within 30 days).
    pub fn check(&self) -> Result<Vec<String>, ConfigError> {
        self.validate()?;
        dots_daemon::cert_check::check_credentials(
            &self.origin,
            dots_daemon::cert_check::CredentialKeys::TOP,
            &self.credentials()?,
            std::time::SystemTime::now(),
        )
    }

    /// Validates, then maps into the listener's options.
    pub fn to_options(&self) -> Result<ClientOptions, ConfigError> {
        self.validate()?;
        Ok(ClientOptions {
            udp: self.address("udp", &self.udp)?,
            tcp: self.address("tcp", &self.tcp)?,
            credentials: self.credentials()?,
            allow: if self.allow.is_empty() {
                None
            } else {
                Some(self.allow.clone())
            },
            control: self.control_socket.clone(),
            state_dir: Some(self.state_dir.clone()),
            customers: self.customers()?,
            api: self.api_options()?,
            audit_log: self.audit_log.clone(),
            max_agents: self.max_agents,
            max_handshakes: self.max_handshakes,
            reload: None,
            cluster: self.cluster.options(&self.origin)?,
        })
    }

    /// `log-format`.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}
