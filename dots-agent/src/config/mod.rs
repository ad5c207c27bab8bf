//! `agent.toml`: the settings of `dots-agent run`.
//!
//! Three steps, so that each can be run on its own:
//! * [`AgentConfig::load`] / [`AgentConfig::from_str`]: syntax, unknown keys,
//!   types and enum values;
//! * [`AgentConfig::validate`]: semantic checks that need nothing but the
//!   file (peers parse, prefixes are prefixes, intervals are in range, ...);
//! * [`AgentConfig::check_files`]: the certificate and key files exist and
//!   are readable. `validate` does not call it, so a configuration can be
//!   checked on another machine;
//! * [`AgentConfig::check`]: `validate`, then what makes sessions fail on
//!   this machine: the certificates in depth (PEM, key match, expiry, chain
//!   to the CA), and when enforcing the LAN interfaces and the bpffs mount.
//!   `dots-agent check-config` and `run` use it.
//!
//! The full key reference is `docs/configuration.md`; `examples/agent.toml`
//! shows every key with its default.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use dots_proto::{
    model::Limits,
    signal::{ConsentMode, EnforcementMode, ServerConfig},
};
use ipnet::IpNet;
use serde::Deserialize;

use dots_daemon::{
    config::{
        check_path_set, check_prefixes, check_readable, check_socket_path, de_prefixes, parse,
        path_value, quoted, read, resolve, resolve_opt, ConfigError, COMMAND_LINE,
    },
    logging::LogFormat,
    transport::{Credentials, Transport},
};

use crate::{
    agent::AgentOptions,
    enforce::{AttachMode, SlotAction, DEFAULT_BPFFS_DIR},
    netif::{interface_prefixes, InterfaceFilter},
    paths::{DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_DIR},
    peer::PeerTarget,
};

mod check;
mod flags;
mod policy;
#[cfg(test)]
mod tests;

pub use flags::{DiscoveryFlags, RunFlags};
pub use policy::{PolicyConfig, DEFAULT_MAX_HEARTBEAT_INTERVAL, DEFAULT_REDIRECT_FALLBACK};

/// Default `notify-interval`, in seconds.
pub const DEFAULT_NOTIFY_INTERVAL_SECS: u64 = 30;

/// Why a build without the `metrics` feature refuses `metrics`.
pub const WITHOUT_METRICS: &str =
    "this build has no metrics endpoint (built without feature `metrics`)";

/// Why a build without the `discovery` feature refuses DNS-based discovery.
pub const WITHOUT_DISCOVERY: &str =
    "this build has no S-NAPTR/DNS-SD discovery nor DNS lookups of discovered names (built without feature `discovery`)";

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The whole `agent.toml`. Fields are public so that command-line flags can
/// override them before [`AgentConfig::validate`] and
/// [`AgentConfig::to_options`]; `AgentConfig::default()` is the configuration
/// of an empty file (which does not validate: it has no peer).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Call Home DOTS clients to dial, one session each (`[[peers]]`).
    pub peers: Vec<PeerConfig>,
    /// Transport preference of peers that do not set their own.
    pub transport: TransportPref,
    /// CA bundle peers' certificates must chain to (default for all peers).
    pub ca: Option<PathBuf>,
    /// This agent's certificate, PEM (default for all peers).
    pub cert: Option<PathBuf>,
    /// This agent's private key, PEM (default for all peers).
    pub key: Option<PathBuf>,
    /// The local domain (`[domain]`).
    pub domain: DomainConfig,
    /// Where and how the XDP classifier runs (`[xdp]`).
    pub xdp: XdpConfig,
    /// `false`: monitor mode, validate, answer and log requests, drop nothing;
    /// with XDP interfaces, count what each mitigation would drop.
    pub enforce: bool,
    /// `auto` or `require` (an operator approves each mitigation).
    pub consent: ConsentMode,
    /// Seconds a mitigation waits for consent before `consent-timeout-action`.
    pub consent_timeout: Option<u64>,
    /// What happens when `consent-timeout` expires; `reject` when absent.
    pub consent_timeout_action: Option<ConsentTimeoutAction>,
    /// Prefixes never dropped, whatever a request says. The peers' addresses
    /// are exempt too, added at run time.
    #[serde(deserialize_with = "de_prefixes")]
    pub never_block: Vec<IpNet>,
    /// Bounds on the size of a request (`[limits]`).
    pub limits: LimitsConfig,
    /// What a request, a peer and all peers may block (`[policy]`).
    pub policy: PolicyConfig,
    /// Seconds between counter queries / notifications of unchanged mitigations.
    pub notify_interval: u64,
    /// Directory for state that outlives the process.
    pub state_dir: PathBuf,
    /// Control socket of the running agent.
    pub control_socket: PathBuf,
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// Behind NAT, block the internal device's traffic to the target
    /// (`device`) or only its matching flows (`flow`).
    pub nat_action: crate::nat::NatAction,
    /// Prometheus text endpoint, "ADDR:PORT"; none by default.
    pub metrics: Option<std::net::SocketAddr>,
    /// The file this came from, for error messages ([`COMMAND_LINE`] when
    /// built in code); not a key.
    #[serde(skip)]
    pub origin: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            transport: TransportPref::Both,
            ca: None,
            cert: None,
            key: None,
            domain: DomainConfig::default(),
            xdp: XdpConfig::default(),
            enforce: true,
            consent: ConsentMode::Auto,
            consent_timeout: None,
            consent_timeout_action: None,
            never_block: Vec::new(),
            limits: LimitsConfig::default(),
            policy: PolicyConfig::default(),
            notify_interval: DEFAULT_NOTIFY_INTERVAL_SECS,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            log_format: LogFormat::Human,
            nat_action: crate::nat::NatAction::Device,
            metrics: None,
            origin: PathBuf::from(COMMAND_LINE),
        }
    }
}

/// One `[[peers]]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerConfig {
    /// `HOST[:PORT]` or `[V6]:PORT`; the port defaults to 4647.
    pub address: String,
    /// Reference identifier the peer's certificate must carry (DNS name or
    /// IP address); the host of `address` when absent.
    #[serde(default)]
    pub peer_name: Option<String>,
    /// Overrides the top-level `transport`.
    #[serde(default)]
    pub transport: Option<TransportPref>,
    /// Override the top-level `ca`, `cert`, `key` for this peer.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Override `xdp.action`, `xdp.rate-limit-pps`, `xdp.rate-limit-bps`
    /// for the mitigations this peer asks for.
    #[serde(default)]
    pub action: Option<LocalAction>,
    #[serde(default)]
    pub rate_limit_pps: Option<u64>,
    #[serde(default)]
    pub rate_limit_bps: Option<u64>,
}

impl PeerConfig {
    /// A peer with only its address set.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Self::default()
        }
    }
}

/// What the classifier does with the traffic of a mitigation: the local
/// policy (RFC 9066 lets the Call Home DOTS server choose how it mitigates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LocalAction {
    /// Drop every matching packet.
    #[default]
    Drop,
    /// Drop what exceeds the rate limit (packets and/or bits per second).
    RateLimit,
}

/// Which transports to dial: `transport` in the file, `--transport` on the
/// command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportPref {
    /// DTLS over UDP only.
    Udp,
    /// TLS over TCP only.
    Tcp,
    /// Both, raced (Happy Eyeballs), DTLS first.
    #[default]
    Both,
}

impl TransportPref {
    /// In preference order.
    pub fn transports(self) -> Vec<Transport> {
        match self {
            TransportPref::Udp => vec![Transport::Udp],
            TransportPref::Tcp => vec![Transport::Tcp],
            TransportPref::Both => vec![Transport::Udp, Transport::Tcp],
        }
    }

    fn name(self) -> &'static str {
        match self {
            TransportPref::Udp => "udp",
            TransportPref::Tcp => "tcp",
            TransportPref::Both => "both",
        }
    }
}

/// `[domain]`: the networks whose traffic this agent may be asked to drop.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DomainConfig {
    /// Prefixes of the local domain (LAN networks, the public prefix).
    #[serde(deserialize_with = "de_prefixes")]
    pub prefixes: Vec<IpNet>,
    /// Add the addresses of the router's own interfaces, detected at start,
    /// as host prefixes.
    pub interface_addresses: bool,
    /// With `interface-addresses`: include loopback addresses (127/8, ::1).
    pub include_loopback: bool,
    /// With `interface-addresses`: include link-local addresses
    /// (169.254/16, fe80::/10).
    pub include_link_local: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            prefixes: Vec::new(),
            interface_addresses: true,
            include_loopback: false,
            include_link_local: false,
        }
    }
}

/// `[xdp]`: where the classifier runs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct XdpConfig {
    /// LAN interfaces to attach the classifier to.
    pub interfaces: Vec<String>,
    /// `auto` (native, else generic), `native` or `generic`.
    pub mode: AttachMode,
    /// bpffs directory for the pinned maps and links.
    pub bpffs: PathBuf,
    /// Seconds an indefinite mitigation stays in force in the kernel without
    /// the agent renewing it: it lasts while the agent runs, and ends within
    /// this long after the agent dies.
    pub indefinite_cap: u64,
    /// What mitigations do: `drop` or `rate-limit` (peers may override).
    pub action: LocalAction,
    /// With `action = "rate-limit"`: packets per second let through per
    /// mitigation.
    pub rate_limit_pps: Option<u64>,
    /// With `action = "rate-limit"`: bits per second let through per
    /// mitigation.
    pub rate_limit_bps: Option<u64>,
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            mode: AttachMode::Auto,
            bpffs: PathBuf::from(DEFAULT_BPFFS_DIR),
            indefinite_cap: crate::agent::enforcer::DEFAULT_INDEFINITE_CAP.as_secs(),
            action: LocalAction::Drop,
            rate_limit_pps: None,
            rate_limit_bps: None,
        }
    }
}

/// `consent-timeout-action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentTimeoutAction {
    /// Enforce the request as if the operator had approved it.
    Approve,
    /// Refuse the request.
    #[default]
    Reject,
}

/// `consent-timeout` and `consent-timeout-action` together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsentTimeout {
    pub after: Duration,
    pub action: ConsentTimeoutAction,
}

/// `[limits]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most active mitigations one DOTS client (cuid) may hold.
    pub max_mitigations_per_cuid: usize,
    /// Most entries in a scope's `source-prefix`, and separately in
    /// `target-prefix`.
    pub max_prefixes: usize,
    /// Most entries in each port or ICMP type range list of a scope.
    pub max_ranges: usize,
    /// Most entries in a scope's `target-protocol`.
    pub max_protocols: usize,
    /// Moved to `[policy]`; still read, so that the error can say so.
    pub max_lifetime: Option<i64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_mitigations_per_cuid: ServerConfig::default().max_mitigations_per_cuid,
            max_prefixes: l.max_prefixes,
            max_ranges: l.max_ranges,
            max_protocols: l.max_protocols,
            max_lifetime: None,
        }
    }
}

impl LimitsConfig {
    /// As `dots-proto` takes them, with `max_lifetime` from
    /// `policy.max-lifetime`; assumes [`AgentConfig::validate`] passed.
    pub fn to_limits(&self, policy: &PolicyConfig) -> Limits {
        Limits {
            max_lifetime: policy.max_lifetime(),
            max_prefixes: self.max_prefixes,
            max_ranges: self.max_ranges,
            max_protocols: self.max_protocols,
        }
    }
}

/// A peer with the top-level defaults applied: what one session needs.
#[derive(Clone, Debug)]
pub struct ResolvedPeer {
    pub target: PeerTarget,
    pub transports: Vec<Transport>,
    pub credentials: Credentials,
}

impl AgentConfig {
    /// Reads and parses `path` (syntax, keys, types); then call
    /// [`validate`](Self::validate).
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, ConfigError> {
        let path = path.as_ref();
        Self::from_str(&read(path)?, path)
    }

    /// Parses `text`; `origin` names it in errors and is the base of
    /// relative paths.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: impl AsRef<Path>) -> Result<AgentConfig, ConfigError> {
        let origin = origin.as_ref();
        let mut c: AgentConfig = parse(text, origin)?;
        c.origin = origin.to_path_buf();
        resolve_opt(&mut c.ca, origin);
        resolve_opt(&mut c.cert, origin);
        resolve_opt(&mut c.key, origin);
        for p in &mut c.peers {
            resolve_opt(&mut p.ca, origin);
            resolve_opt(&mut p.cert, origin);
            resolve_opt(&mut p.key, origin);
        }
        resolve(&mut c.state_dir, origin);
        resolve(&mut c.control_socket, origin);
        resolve(&mut c.xdp.bpffs, origin);
        Ok(c)
    }

    fn value_error(
        &self,
        key: impl Into<String>,
        value: String,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Value {
            file: self.origin.clone(),
            key: key.into(),
            value,
            message: message.into(),
        }
    }

    fn missing(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Missing {
            file: self.origin.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Semantic checks that need nothing but the configuration itself. Does
    /// not look at the certificate files (see [`check_files`](Self::check_files))
    /// nor at the interfaces: that the domain is non-empty once interface
    /// addresses are added is checked at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.peers.is_empty() {
            return Err(self.missing(
                "peers",
                "no peer to dial: add a [[peers]] table with address = \"HOST[:PORT]\"",
            ));
        }
        let mut seen: Vec<(String, u16)> = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let target = self.peer_target(i, p)?;
            let id = (target.host.to_ascii_lowercase(), target.port);
            if let Some(j) = seen.iter().position(|s| *s == id) {
                return Err(self.value_error(
                    format!("peers[{i}].address"),
                    quoted(&p.address),
                    format!("the same peer as peers[{j}]"),
                ));
            }
            seen.push(id);
            self.peer_credentials(i, p)?;
        }
        check_prefixes(&self.origin, "domain.prefixes", &self.domain.prefixes)?;
        if self.domain.prefixes.is_empty() && !self.domain.interface_addresses {
            return Err(self.missing(
                "domain.prefixes",
                "the local domain is empty (and interface-addresses = false): every request would be refused",
            ));
        }
        check_prefixes(&self.origin, "never-block", &self.never_block)?;
        for (i, name) in self.xdp.interfaces.iter().enumerate() {
            let key = format!("xdp.interfaces[{i}]");
            if let Some(why) = ifname_problem(name) {
                return Err(self.value_error(key, quoted(name), why));
            }
            if let Some(j) = self.xdp.interfaces[..i].iter().position(|n| n == name) {
                return Err(self.value_error(
                    key,
                    quoted(name),
                    format!("listed twice (also xdp.interfaces[{j}])"),
                ));
            }
        }
        check_path_set(&self.origin, "xdp.bpffs", &self.xdp.bpffs)?;
        self.slot_action(
            "xdp.",
            self.xdp.action,
            self.xdp.rate_limit_pps,
            self.xdp.rate_limit_bps,
        )?;
        for i in 0..self.peers.len() {
            self.peer_action(i)?;
        }
        if !(1..=u64::from(u32::MAX)).contains(&self.xdp.indefinite_cap) {
            return Err(self.value_error(
                "xdp.indefinite-cap",
                self.xdp.indefinite_cap.to_string(),
                format!(
                    "must be 1 to {} seconds (an indefinite mitigation is never forever in the kernel)",
                    u32::MAX
                ),
            ));
        }
        #[cfg(not(feature = "metrics"))]
        if let Some(addr) = self.metrics {
            return Err(self.value_error("metrics", quoted(addr), WITHOUT_METRICS));
        }
        check_path_set(&self.origin, "state-dir", &self.state_dir)?;
        check_socket_path(&self.origin, "control-socket", &self.control_socket)?;
        if self.notify_interval < 1 {
            return Err(self.value_error(
                "notify-interval",
                self.notify_interval.to_string(),
                "must be at least 1 (seconds)",
            ));
        }
        match (self.consent_timeout, self.consent_timeout_action) {
            (Some(0), _) => return Err(self.value_error(
                "consent-timeout",
                "0".into(),
                "must be at least 1 (seconds); leave it out to wait for the operator indefinitely",
            )),
            (Some(t), _) if self.consent == ConsentMode::Auto => {
                return Err(self.value_error(
                    "consent-timeout",
                    t.to_string(),
                    "only applies with consent = \"require\" (consent is \"auto\")",
                ))
            }
            (None, Some(a)) => {
                return Err(self.value_error(
                    "consent-timeout-action",
                    quoted(match a {
                        ConsentTimeoutAction::Approve => "approve",
                        ConsentTimeoutAction::Reject => "reject",
                    }),
                    "needs consent-timeout",
                ))
            }
            _ => {}
        }
        let l = &self.limits;
        for (key, v) in [
            (
                "limits.max-mitigations-per-cuid",
                l.max_mitigations_per_cuid,
            ),
            ("limits.max-prefixes", l.max_prefixes),
            ("limits.max-ranges", l.max_ranges),
            ("limits.max-protocols", l.max_protocols),
        ] {
            if v < 1 {
                return Err(self.value_error(key, v.to_string(), "must be at least 1"));
            }
        }
        if let Some(v) = l.max_lifetime {
            return Err(self.value_error(
                "limits.max-lifetime",
                v.to_string(),
                "moved: write it as max-lifetime in the [policy] section",
            ));
        }
        self.policy.validate(&self.origin)?;
        if l.max_mitigations_per_cuid > self.policy.max_mitigations_per_peer {
            return Err(self.value_error(
                "limits.max-mitigations-per-cuid",
                l.max_mitigations_per_cuid.to_string(),
                format!(
                    "more than policy.max-mitigations-per-peer ({}), which holds all of a peer's cuids",
                    self.policy.max_mitigations_per_peer
                ),
            ));
        }
        Ok(())
    }

    /// `dots-agent check-config`: everything `run` checks of a file before
    /// it starts (syntax, keys, values, [`check`](Self::check)); the
    /// options it would start with and the warnings. Discovery is not run.
    pub fn check_file(path: impl AsRef<Path>) -> Result<(AgentOptions, Vec<String>), ConfigError> {
        let config = Self::load(path)?;
        let warnings = config.check()?;
        Ok((config.to_options()?, warnings))
    }

    /// Checks that every certificate, key and CA file a peer uses exists and
    /// is readable. Separate from [`validate`](Self::validate) so that a
    /// configuration can be checked where the files are not.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut checked: Vec<PathBuf> = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            for (key, path) in self.peer_credential_sources(i, p)? {
                if !checked.contains(&path) {
                    check_readable(&self.origin, &key, &path)?;
                    checked.push(path);
                }
            }
        }
        Ok(())
    }

    /// The slot action of `action` with these rates; errors name `prefix`
    /// + the key.
    fn slot_action(
        &self,
        prefix: &str,
        action: LocalAction,
        pps: Option<u64>,
        bps: Option<u64>,
    ) -> Result<SlotAction, ConfigError> {
        match action {
            LocalAction::Drop => {
                for (key, v) in [("rate-limit-pps", pps), ("rate-limit-bps", bps)] {
                    if let Some(v) = v {
                        return Err(self.value_error(
                            format!("{prefix}{key}"),
                            v.to_string(),
                            format!("only applies with {prefix}action = \"rate-limit\" (the action is \"drop\")"),
                        ));
                    }
                }
                Ok(SlotAction::Drop)
            }
            LocalAction::RateLimit => {
                for (key, v) in [("rate-limit-pps", pps), ("rate-limit-bps", bps)] {
                    if v == Some(0) {
                        return Err(self.value_error(
                            format!("{prefix}{key}"),
                            "0".into(),
                            "must be at least 1 (leave it out for no limit of this kind)",
                        ));
                    }
                }
                if pps.is_none() && bps.is_none() {
                    return Err(self.missing(
                        format!("{prefix}rate-limit-pps"),
                        format!("{prefix}action = \"rate-limit\" needs rate-limit-pps, rate-limit-bps or both"),
                    ));
                }
                Ok(SlotAction::RateLimit {
                    pps: pps.unwrap_or(0),
                    bps: bps.unwrap_or(0),
                })
            }
        }
    }

    /// What peer `i`'s mitigations do: its own settings over `[xdp]`'s.
    pub fn peer_action(&self, i: usize) -> Result<SlotAction, ConfigError> {
        let Some(p) = self.peers.get(i) else {
            return self.slot_action(
                "xdp.",
                self.xdp.action,
                self.xdp.rate_limit_pps,
                self.xdp.rate_limit_bps,
            );
        };
        let own = p.action.is_some() || p.rate_limit_pps.is_some() || p.rate_limit_bps.is_some();
        if !own {
            return self.slot_action(
                "xdp.",
                self.xdp.action,
                self.xdp.rate_limit_pps,
                self.xdp.rate_limit_bps,
            );
        }
        let action = p.action.unwrap_or(self.xdp.action);
        // A peer that drops has no use for the agent's rates; one that
        // rate-limits takes those it does not set itself.
        let (pps, bps) = match action {
            LocalAction::Drop => (p.rate_limit_pps, p.rate_limit_bps),
            LocalAction::RateLimit => (
                p.rate_limit_pps.or(self.xdp.rate_limit_pps),
                p.rate_limit_bps.or(self.xdp.rate_limit_bps),
            ),
        };
        self.slot_action(&format!("peers[{i}]."), action, pps, bps)
    }

    fn peer_target(&self, i: usize, p: &PeerConfig) -> Result<PeerTarget, ConfigError> {
        let key = format!("peers[{i}].address");
        let mut t = PeerTarget::parse(p.address.trim()).map_err(|_| {
            self.value_error(
                key.clone(),
                quoted(&p.address),
                "expected HOST[:PORT] or [IPV6]:PORT, with a port from 1 to 65535",
            )
        })?;
        if t.port == 0 {
            return Err(self.value_error(key, quoted(&p.address), "port 0 cannot be dialled"));
        }
        if let Some(name) = &p.peer_name {
            if name.is_empty() || name.contains(char::is_whitespace) || name.contains('/') {
                return Err(self.value_error(
                    format!("peers[{i}].peer-name"),
                    quoted(name),
                    "expected a DNS name or an IP address",
                ));
            }
            t.name = Some(name.clone());
        }
        Ok(t)
    }

    /// (key path, file) of the ca, cert and key peer `i` uses.
    fn peer_credential_sources(
        &self,
        i: usize,
        p: &PeerConfig,
    ) -> Result<[(String, PathBuf); 3], ConfigError> {
        let pick = |name: &str, own: &Option<PathBuf>, global: &Option<PathBuf>| {
            let (key, path) = match (own, global) {
                (Some(path), _) => (format!("peers[{i}].{name}"), path),
                (None, Some(path)) => (name.to_string(), path),
                (None, None) => {
                    return Err(self.missing(
                        format!("peers[{i}].{name}"),
                        format!("set {name} at the top level (for all peers) or in this peer"),
                    ))
                }
            };
            check_path_set(&self.origin, &key, path)?;
            Ok((key, path.clone()))
        };
        Ok([
            pick("ca", &p.ca, &self.ca)?,
            pick("cert", &p.cert, &self.cert)?,
            pick("key", &p.key, &self.key)?,
        ])
    }

    fn peer_credentials(&self, i: usize, p: &PeerConfig) -> Result<Credentials, ConfigError> {
        let [(_, ca), (_, cert), (_, key)] = self.peer_credential_sources(i, p)?;
        Ok(Credentials { ca, cert, key })
    }

    /// Every peer with the top-level defaults applied, for a runtime that
    /// takes transport and credentials per peer.
    pub fn resolved_peers(&self) -> Result<Vec<ResolvedPeer>, ConfigError> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(ResolvedPeer {
                    target: self.peer_target(i, p)?,
                    transports: p.transport.unwrap_or(self.transport).transports(),
                    credentials: self.peer_credentials(i, p)?,
                })
            })
            .collect()
    }

    /// Validates, then maps into the runtime's options. `domain` holds the
    /// configured prefixes only: the runtime adds the router's addresses,
    /// as they change, when `interface_addresses` is set. `never_block` holds the configured prefixes only: the
    /// peers' addresses are added by the runtime once resolved.
    ///
    /// `AgentOptions` has one transport list and one set of credentials for
    /// all peers: a configuration whose peers differ in those is refused
    /// here, naming the first differing key.
    pub fn to_options(&self) -> Result<AgentOptions, ConfigError> {
        self.validate()?;
        let peers = self.resolved_peers()?;
        let first = &peers[0];
        for (i, (p, cfg)) in peers.iter().zip(&self.peers).enumerate().skip(1) {
            if p.transports != first.transports {
                return Err(self.value_error(
                    format!("peers[{i}].transport"),
                    quoted(cfg.transport.unwrap_or(self.transport).name()),
                    "differs from peers[0]: this version dials all peers with the same transports",
                ));
            }
            for (name, a, b) in [
                ("ca", &p.credentials.ca, &first.credentials.ca),
                ("cert", &p.credentials.cert, &first.credentials.cert),
                ("key", &p.credentials.key, &first.credentials.key),
            ] {
                if a != b {
                    return Err(self.value_error(
                        format!("peers[{i}].{name}"),
                        path_value(a),
                        "differs from peers[0]: this version uses one ca, cert and key for all peers",
                    ));
                }
            }
        }
        Ok(AgentOptions {
            transports: first.transports.clone(),
            credentials: first.credentials.clone(),
            peers: peers.into_iter().map(|p| p.target).collect(),
            domain: self.domain.prefixes.clone(),
            interface_addresses: self.domain.interface_addresses.then_some(InterfaceFilter {
                loopback: self.domain.include_loopback,
                link_local: self.domain.include_link_local,
            }),
            monitor: !self.enforce,
            lans: self.xdp.interfaces.clone(),
            attach_mode: self.xdp.mode,
            bpffs: self.xdp.bpffs.clone(),
            indefinite_cap: Duration::from_secs(self.xdp.indefinite_cap),
            actions: (0..self.peers.len())
                .map(|i| self.peer_action(i))
                .collect::<Result<_, _>>()?,
            consent: self.consent,
            never_block: self.never_block.clone(),
            limits: self.limits.to_limits(&self.policy),
            policy: self.policy,
            control: self.control_socket.clone(),
            state_dir: self.state_dir.clone(),
            notify_interval: self.notify_interval(),
            consent_timeout: self.consent_timeout().map(|t| t.after),
            consent_timeout_approves: self
                .consent_timeout()
                .is_some_and(|t| t.action == ConsentTimeoutAction::Approve),
            max_mitigations_per_cuid: self.limits.max_mitigations_per_cuid,
            nat_action: self.nat_action,
            metrics: self.metrics,
            discovery: None,
        })
    }

    /// The router's own addresses to add to the domain, as `[domain]` asks
    /// (empty when `interface-addresses = false`). Reads the interfaces now.
    pub fn interface_prefixes(&self) -> Vec<IpNet> {
        if !self.domain.interface_addresses {
            return Vec::new();
        }
        interface_prefixes(InterfaceFilter {
            loopback: self.domain.include_loopback,
            link_local: self.domain.include_link_local,
        })
    }

    /// `notify-interval`.
    pub fn notify_interval(&self) -> Duration {
        Duration::from_secs(self.notify_interval)
    }

    /// `consent-timeout` with its action (`reject` by default); `None`:
    /// wait for the operator indefinitely.
    pub fn consent_timeout(&self) -> Option<ConsentTimeout> {
        self.consent_timeout.map(|s| ConsentTimeout {
            after: Duration::from_secs(s),
            action: self.consent_timeout_action.unwrap_or_default(),
        })
    }

    /// `state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `control-socket`.
    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// `log-format`.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// `limits.max-mitigations-per-cuid`.
    pub fn max_mitigations_per_cuid(&self) -> usize {
        self.limits.max_mitigations_per_cuid
    }

    /// The signal server settings this configuration implies, with `domain`
    /// as the local domain (configured prefixes plus interface addresses).
    /// The agent-wide handles (budget, exempt set) are fresh here: the
    /// runtime makes one of each and shares them between its peers.
    pub fn server_config(&self, domain: Vec<IpNet>) -> ServerConfig {
        let mut c = ServerConfig {
            limits: self.limits.to_limits(&self.policy),
            domain,
            consent: self.consent,
            mode: if self.enforce {
                EnforcementMode::Enforce
            } else {
                EnforcementMode::Monitor
            },
            max_mitigations_per_cuid: self.limits.max_mitigations_per_cuid,
            notify_period: self.notify_interval(),
            consent_timeout: self.consent_timeout().map(|t| t.after),
            consent_timeout_approves: self
                .consent_timeout()
                .is_some_and(|t| t.action == ConsentTimeoutAction::Approve),
            ..ServerConfig::default()
        };
        self.policy.apply(&mut c);
        c
    }
}

/// Why `name` cannot be a Linux interface name (`dev_valid_name`).
fn ifname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an interface name cannot be empty".into());
    }
    if name.len() > MAX_IFNAME {
        return Some(format!(
            "an interface name is at most {MAX_IFNAME} bytes, this one has {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some("not an interface name".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Some(format!("an interface name cannot contain {c:?}"));
    }
    None
}
