//! `client.toml`: the settings of `dots-client listen`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use dots_daemon::{
    config::{
        check_path_set, check_readable, check_socket_path, parse, quoted, read, resolve,
        resolve_opt, ConfigError, COMMAND_LINE,
    },
    logging::LogFormat,
    transport::Credentials,
};

use crate::{control::DEFAULT_CONTROL_SOCKET, listener::ClientOptions};

mod flags;
#[cfg(test)]
mod tests;

pub use flags::ListenFlags;

/// Default `state-dir` of `dots-client listen`.
pub const DEFAULT_CLIENT_STATE_DIR: &str = "/var/lib/dots-client";
/// Default `udp` and `tcp` listening address.
pub const DEFAULT_LISTEN_ADDR: &str = "[::]:4647";

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
        Ok(())
    }

    /// Checks the ca, cert and key files exist and are readable.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let c = self.credentials()?;
        check_readable(&self.origin, "ca", &c.ca)?;
        check_readable(&self.origin, "cert", &c.cert)?;
        check_readable(&self.origin, "key", &c.key)
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
        })
    }

    /// `log-format`.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}
