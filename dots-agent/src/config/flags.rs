//! The flags of `dots-agent run`, and how they override `agent.toml`.
//!
//! Every flag is optional: without `--config` the flags are the whole
//! configuration (applied to [`AgentConfig::default`]); with it, a flag given
//! replaces the file's value. Repeatable flags replace the file's list, except
//! `--never-block`, which adds to it.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;

use dots_daemon::{
    config::{prefix_arg, ConfigError},
    logging::LogFormat,
};

use super::{AgentConfig, ConsentMode, PeerConfig, TransportPref};
use crate::{enforce::AttachMode, nat::NatAction};

/// Flags of `dots-agent run`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct RunFlags {
    /// TOML configuration (see examples/agent.toml). The flags below
    /// override it; without it they are the whole configuration.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Call Home DOTS client to dial, HOST[:PORT] (port 4647 by default).
    /// Repeatable: one session per peer.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Transport: udp (DTLS), tcp (TLS), or both (raced, DTLS first).
    #[arg(long, value_enum)]
    pub transport: Option<TransportPref>,
    /// CA bundle that the peer's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Reference identifier the peers' certificates must carry (DNS name or
    /// IP address); defaults to the host given in --peer.
    #[arg(long, value_name = "NAME")]
    pub peer_name: Option<String>,
    /// The local domain: source prefixes of requests must fall inside
    /// (repeatable; the router's own addresses are added).
    #[arg(long = "domain", value_name = "PREFIX", value_parser = prefix_arg)]
    pub domain: Vec<IpNet>,
    /// Monitor mode: validate, answer and log requests and drop nothing
    /// (status stays 1 "attack-mitigation-in-progress"). With --lan the
    /// classifier counts what each mitigation would drop (`dots-agent
    /// mitigations`, the log); without, nothing is installed.
    #[arg(long)]
    pub no_enforce: bool,
    /// LAN interface to enforce on (repeatable).
    #[arg(long = "lan", value_name = "IFACE")]
    pub lans: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum)]
    pub mode: Option<AttachMode>,
    /// auto: enforce valid requests at once; require: wait for the operator.
    #[arg(long, value_enum)]
    pub consent: Option<ConsentMode>,
    /// Prefix never to drop, whatever a request says (repeatable).
    #[arg(long = "never-block", value_name = "PREFIX", value_parser = prefix_arg)]
    pub never_block: Vec<IpNet>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/dots-agent].
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Seconds an indefinite mitigation stays in force in the kernel without
    /// the agent renewing it: it ends within this long after the agent dies
    /// [default: 600].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    pub indefinite_cap: Option<u64>,
    /// What mitigations do: drop every matching packet, or drop only what
    /// exceeds --rate-limit-pps / --rate-limit-bps [default: drop].
    #[arg(long, value_enum)]
    pub action: Option<super::LocalAction>,
    /// With --action rate-limit: packets per second let through per mitigation.
    #[arg(long, value_name = "PPS")]
    pub rate_limit_pps: Option<u64>,
    /// With --action rate-limit: bits per second let through per mitigation.
    #[arg(long, value_name = "BPS")]
    pub rate_limit_bps: Option<u64>,
    /// Control socket for `dots-agent status`, `mitigations`, `approve`,
    /// `reject` [default: /run/dots-agent/control.sock].
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Where the active mitigations are kept across restarts
    /// [default: /var/lib/dots-agent].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (sessions, heartbeats, mitigations by state,
    /// drops per mitigation) on ADDR:PORT at /metrics [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Behind NAT: block the internal device's traffic to the target
    /// (device) or only its matching flows (flow) [default: device].
    #[arg(long, value_enum)]
    pub nat_action: Option<NatAction>,
    #[command(flatten)]
    pub discovery: DiscoveryFlags,
    /// Seconds between counter updates (and Observe notifications) of active
    /// mitigations [default: 30].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub notify_interval: Option<u64>,
}

/// How `dots-agent run` looks for its peer when neither `--peer` nor the
/// file names one (RFC 8973). Not part of `agent.toml`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryFlags {
    /// Without a peer (from --peer or the file): find it with RFC 8973
    /// discovery, DHCP results of `dots-agent dhcp-hook` in the state
    /// directory first, then S-NAPTR and DNS-SD in this domain.
    #[arg(
        id = "discovery_domain",
        long = "discovery-domain",
        value_name = "DOMAIN"
    )]
    pub domain: Option<String>,
    /// DNS server for discovery, ADDR:PORT [default: the system's].
    #[arg(long, value_name = "ADDR:PORT")]
    pub resolver: Option<SocketAddr>,
}

impl RunFlags {
    /// The configuration `dots-agent run` uses: `--config` (or the
    /// defaults) with the flags applied, and the global `--log-format`.
    pub fn load(&self, log_format: Option<LogFormat>) -> Result<AgentConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
        self.apply(&mut c);
        if let Some(f) = log_format {
            c.log_format = f;
        }
        Ok(c)
    }

    /// Overrides `c` with the flags given.
    pub fn apply(&self, c: &mut AgentConfig) {
        if !self.peers.is_empty() {
            c.peers = self
                .peers
                .iter()
                .map(|p| PeerConfig {
                    address: p.clone(),
                    peer_name: self.peer_name.clone(),
                    ..Default::default()
                })
                .collect();
        } else if let Some(name) = &self.peer_name {
            for p in &mut c.peers {
                p.peer_name = Some(name.clone());
            }
        }
        if let Some(t) = self.transport {
            c.transport = t;
            // The flag is for every peer.
            for p in &mut c.peers {
                p.transport = None;
            }
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
        if !self.domain.is_empty() {
            c.domain.prefixes = self.domain.clone();
        }
        if self.no_enforce {
            c.enforce = false;
        }
        if !self.lans.is_empty() {
            c.xdp.interfaces = self.lans.clone();
        }
        if let Some(m) = self.mode {
            c.xdp.mode = m;
        }
        if let Some(consent) = self.consent {
            c.consent = consent;
            if consent == ConsentMode::Auto {
                // Nothing waits for consent: a timeout would not validate.
                c.consent_timeout = None;
                c.consent_timeout_action = None;
            }
        }
        c.never_block.extend(self.never_block.iter().copied());
        if let Some(b) = &self.bpffs {
            c.xdp.bpffs = b.clone();
        }
        if let Some(cap) = self.indefinite_cap {
            c.xdp.indefinite_cap = cap;
        }
        if let Some(a) = self.action {
            c.xdp.action = a;
        }
        if self.rate_limit_pps.is_some() {
            c.xdp.rate_limit_pps = self.rate_limit_pps;
        }
        if self.rate_limit_bps.is_some() {
            c.xdp.rate_limit_bps = self.rate_limit_bps;
        }
        if let Some(s) = &self.control {
            c.control_socket = s.clone();
        }
        if let Some(s) = &self.state_dir {
            c.state_dir = s.clone();
        }
        if self.metrics.is_some() {
            c.metrics = self.metrics;
        }
        if let Some(a) = self.nat_action {
            c.nat_action = a;
        }
        if let Some(n) = self.notify_interval {
            c.notify_interval = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::config::ConsentTimeoutAction;

    #[derive(Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        run: RunFlags,
    }

    fn flags(args: &[&str]) -> RunFlags {
        Wrapper::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .run
    }

    const FILE: &str = "/etc/dots-agent/agent.toml";

    /// A file with something in every key a flag overrides.
    fn file() -> AgentConfig {
        AgentConfig::from_str(
            r#"
transport = "udp"
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"
enforce = true
consent = "require"
consent-timeout = 60
consent-timeout-action = "approve"
never-block = ["203.0.113.0/24"]
notify-interval = 10
state-dir = "/var/lib/x"
control-socket = "/run/x.sock"
log-format = "human"
nat-action = "flow"
metrics = "127.0.0.1:9100"
[[peers]]
address = "isp.example"
transport = "tcp"
[[peers]]
address = "backup.example:4000"
peer-name = "backup"
[domain]
prefixes = ["192.0.2.0/24"]
[xdp]
interfaces = ["eth1", "eth2"]
mode = "native"
bpffs = "/sys/fs/bpf/x"
"#,
            FILE,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn applied(args: &[&str]) -> AgentConfig {
        let mut c = file();
        flags(args).apply(&mut c);
        c
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn no_flag_changes_nothing() {
        assert_eq!(flags(&[]), RunFlags::default());
        assert_eq!(applied(&[]), file());
        let mut c = AgentConfig::default();
        RunFlags::default().apply(&mut c);
        assert_eq!(c, AgentConfig::default());
    }

    #[test]
    fn peers_replace_the_files_peers() {
        let c = applied(&["--peer", "a.example", "--peer", "[2001:db8::1]:4647"]);
        assert_eq!(
            c.peers,
            [
                PeerConfig::new("a.example"),
                PeerConfig::new("[2001:db8::1]:4647")
            ]
        );
        let c = applied(&["--peer", "a.example", "--peer-name", "isp"]);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].peer_name.as_deref(), Some("isp"));
    }

    #[test]
    fn peer_name_applies_to_the_files_peers() {
        let c = applied(&["--peer-name", "isp.example"]);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].address, "isp.example");
        for p in &c.peers {
            assert_eq!(p.peer_name.as_deref(), Some("isp.example"));
        }
        // Everything else about the file's peers stays.
        assert_eq!(c.peers[0].transport, Some(TransportPref::Tcp));
    }

    #[test]
    fn transport_clears_per_peer_transport() {
        assert_eq!(file().peers[0].transport, Some(TransportPref::Tcp));
        for (arg, want) in [
            ("udp", TransportPref::Udp),
            ("tcp", TransportPref::Tcp),
            ("both", TransportPref::Both),
        ] {
            let c = applied(&["--transport", arg]);
            assert_eq!(c.transport, want);
            assert!(c.peers.iter().all(|p| p.transport.is_none()), "{c:?}");
        }
        assert!(Wrapper::try_parse_from(["run", "--transport", "sctp"]).is_err());
    }

    #[test]
    fn credentials_override_one_by_one() {
        let c = applied(&["--cert", "/other/agent.pem"]);
        assert_eq!(c.cert, Some(PathBuf::from("/other/agent.pem")));
        assert_eq!(c.ca, file().ca);
        assert_eq!(c.key, file().key);
        let c = applied(&["--ca", "ca2.pem", "--key", "k2"]);
        assert_eq!(c.ca, Some(PathBuf::from("ca2.pem")));
        assert_eq!(c.key, Some(PathBuf::from("k2")));
        assert_eq!(c.cert, file().cert);
    }

    #[test]
    fn lists_replace_except_never_block() {
        let c = applied(&["--domain", "198.51.100.0/24", "--domain", "2001:db8::/32"]);
        assert_eq!(
            c.domain.prefixes,
            [net("198.51.100.0/24"), net("2001:db8::/32")]
        );
        // The domain's other keys are not flags.
        assert_eq!(
            c.domain.interface_addresses,
            file().domain.interface_addresses
        );
        let c = applied(&["--lan", "br0"]);
        assert_eq!(c.xdp.interfaces, ["br0"]);
        let c = applied(&["--never-block", "192.0.2.1/32"]);
        assert_eq!(c.never_block, [net("203.0.113.0/24"), net("192.0.2.1/32")]);
    }

    #[test]
    fn consent_auto_clears_the_timeout() {
        let c = applied(&["--consent", "auto"]);
        assert_eq!(c.consent, ConsentMode::Auto);
        assert_eq!(c.consent_timeout, None);
        assert_eq!(c.consent_timeout_action, None);
        let c = applied(&["--consent", "require"]);
        assert_eq!(c.consent, ConsentMode::Require);
        assert_eq!(c.consent_timeout, Some(60));
        assert_eq!(
            c.consent_timeout_action,
            Some(ConsentTimeoutAction::Approve)
        );
        // With the timeout cleared, `--consent auto` over such a file validates.
        let mut c = applied(&["--consent", "auto"]);
        if cfg!(not(feature = "metrics")) {
            // The file's endpoint is refused by a build without one.
            c.metrics = None;
        }
        c.validate().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn scalars_override() {
        let c = applied(&[
            "--no-enforce",
            "--mode",
            "generic",
            "--bpffs",
            "/sys/fs/bpf/y",
            "--control",
            "/run/y.sock",
            "--state-dir",
            "/var/lib/y",
            "--metrics",
            "[::1]:9200",
            "--nat-action",
            "device",
            "--notify-interval",
            "5",
        ]);
        assert!(!c.enforce);
        assert_eq!(c.xdp.mode, AttachMode::Generic);
        assert_eq!(c.xdp.bpffs, Path::new("/sys/fs/bpf/y"));
        assert_eq!(c.control_socket, Path::new("/run/y.sock"));
        assert_eq!(c.state_dir, Path::new("/var/lib/y"));
        assert_eq!(c.metrics, Some("[::1]:9200".parse().unwrap()));
        assert_eq!(c.nat_action, NatAction::Device);
        assert_eq!(c.notify_interval, 5);
        // Everything the flags do not name is the file's.
        assert_eq!(c.peers, file().peers);
        assert_eq!(c.consent, file().consent);
        assert_eq!(c.xdp.interfaces, file().xdp.interfaces);
        assert!(Wrapper::try_parse_from(["run", "--notify-interval", "0"]).is_err());
    }

    #[test]
    fn discovery_flags_are_not_configuration() {
        let f = flags(&[
            "--discovery-domain",
            "example.net",
            "--resolver",
            "192.0.2.53:53",
        ]);
        assert_eq!(f.discovery.domain.as_deref(), Some("example.net"));
        assert_eq!(f.discovery.resolver, Some("192.0.2.53:53".parse().unwrap()));
        let mut c = file();
        f.apply(&mut c);
        assert_eq!(c, file());
    }

    #[test]
    fn load_without_a_file_starts_from_the_defaults() {
        let c = flags(&["--peer", "isp.example"])
            .load(Some(LogFormat::Json))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c,
            AgentConfig {
                peers: vec![PeerConfig::new("isp.example")],
                log_format: LogFormat::Json,
                ..AgentConfig::default()
            }
        );
        let c = RunFlags::default().load(None).unwrap();
        assert_eq!(c.log_format, LogFormat::Human);
        let e = flags(&["--config", "/nonexistent/agent.toml"])
            .load(None)
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
