//! The command line of `dots-agent`: clap types only. The flags of `run`
//! are [`RunFlags`], in the configuration module that applies them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use dots_agent::{
    config::RunFlags,
    discovery::cli::{DhcpHookArgs, DiscoverArgs},
    enforce::{AttachMode, DEFAULT_BPFFS_DIR},
    paths::DEFAULT_CONTROL_SOCKET,
};
use dots_daemon::logging::LogFormat;

/// DOTS signal channel Call Home agent for Linux routers.
///
/// The agent dials its ISP's Call Home DOTS client, validates the mitigation
/// requests it receives, and drops the named attack traffic leaving the local
/// network in an XDP program on the LAN interfaces.
///
/// Start with `dots-agent run --help`.
#[derive(Parser)]
#[command(
    name = "dots-agent",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Log format on stderr, human or json [default: human, or the
    /// configuration's]. Filter with RUST_LOG (e.g. RUST_LOG=debug).
    #[arg(long, value_enum, global = true)]
    pub(crate) log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the agent: dial the Call Home DOTS client(s), answer mitigation
    /// requests, and enforce them in XDP on the LAN interfaces.
    ///
    /// Example (monitor mode, no XDP):
    ///   dots-agent run --peer isp.example:4647 --ca ca.pem --cert agent.pem \
    ///     --key agent.key --domain 192.0.2.0/24 --no-enforce
    ///
    /// Example (enforcing on eth1):
    ///   dots-agent run --peer 198.51.100.1 --peer-name isp.example --ca ca.pem \
    ///     --cert agent.pem --key agent.key --domain 192.0.2.0/24 --lan eth1
    Run(Box<RunFlags>),
    /// Validate a configuration file without running: syntax, every key and
    /// value, the certificate files in depth (PEM, the key matches the
    /// certificate, not expired, chains to the CA; a warning when one
    /// expires within 30 days) and, when enforcing, that the LAN interfaces
    /// exist and the bpffs is mounted. Exits 78 when something is wrong.
    CheckConfig {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the running agent: peers and session state, heartbeat health,
    /// attached interfaces and XDP mode, monitor mode.
    Status(ControlArgs),
    /// List mitigations: cuid, mid, scope, status, lifetime left, packets and
    /// bytes dropped, current rates.
    Mitigations(ControlArgs),
    /// Approve a mitigation waiting for consent (`--consent require`).
    Approve(ConsentArgs),
    /// Reject a mitigation waiting for consent: the peer is told
    /// conflict-cause 4 (request-rejected-legitimate-traffic).
    Reject(ConsentArgs),
    /// Inspect or manage the XDP data plane directly.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    ///
    /// Example: dots-agent completions bash > /etc/bash_completion.d/dots-agent
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for this command and its subcommands into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Remove everything the agent put in the kernel: detach XDP from every
    /// interface and unpin all maps. Enforcement stops at once.
    ///
    /// Exits non-zero, removing nothing, when the directory holds no pins
    /// of dots-agent or also holds other files.
    ///
    /// Example: dots-agent detach --config /etc/dots-agent/agent.toml
    Detach {
        /// bpffs directory of the pins [default: the configuration's
        /// xdp.bpffs, else /sys/fs/bpf/dots-agent].
        #[arg(long)]
        bpffs: Option<PathBuf>,
        /// Read xdp.bpffs from this configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Discover the Call Home DOTS client (RFC 8973): explicit
    /// configuration, DHCP (as recorded by dhcp-hook), S-NAPTR, DNS-SD; print
    /// the ordered candidates.
    ///
    /// Example: dots-agent discover --domain example.net --resolver 192.0.2.53:53 --json
    Discover(Box<DiscoverArgs>),
    /// Record the Call Home DOTS client a DHCP server announced (options
    /// 147/148, 141/142) in <state-dir>/discovered.json; run from a DHCP
    /// client's hook script.
    ///
    /// Example (udhcpc script): dots-agent dhcp-hook --env --family v4
    DhcpHook(Box<DhcpHookArgs>),
}

#[derive(clap::Args)]
pub(crate) struct ControlArgs {
    /// The running agent's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub(crate) control: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args)]
pub(crate) struct ConsentArgs {
    /// The mitigation, as CUID/MID (see `dots-agent mitigations`). A CUID
    /// may start with '-' (it is base64url), so hyphens are taken as a value.
    #[arg(value_name = "CUID/MID", allow_hyphen_values = true)]
    pub(crate) which: String,
    /// Upstream peer index, when the same CUID/MID exists under several.
    #[arg(long)]
    pub(crate) peer: Option<usize>,
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub(crate) control: PathBuf,
}

impl ConsentArgs {
    /// The CUID and MID of `which`.
    pub(crate) fn mitigation(&self) -> Result<(String, u32)> {
        self.which
            .rsplit_once('/')
            .and_then(|(c, m)| Some((c.to_string(), m.parse::<u32>().ok()?)))
            .with_context(|| {
                format!(
                    "{:?}: expected CUID/MID, e.g. dz6pHjaADkaFTbjreJGBpw/56",
                    self.which
                )
            })
    }
}

#[derive(Subcommand)]
pub(crate) enum DataplaneCommand {
    /// Load the classifier (or adopt the pinned one) and attach it to LAN
    /// interfaces. The pinned link keeps it in place after this command exits.
    ///
    /// Example: dots-agent dataplane attach --lan eth1 --lan eth2
    Attach {
        /// LAN-side interface to attach to (repeatable).
        #[arg(long = "lan", required = true, value_name = "IFACE")]
        lans: Vec<String>,
        /// native: driver mode; generic: skb mode; auto: native, else generic.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        mode: AttachMode,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Show attached interfaces, active slots and packet statistics.
    Status {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach from one interface, leaving the maps in place.
    DetachInterface {
        #[arg(long = "lan", value_name = "IFACE")]
        lan: String,
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn names_itself_in_version_and_man_pages() {
        dots_daemon::cli_docs::check_identity::<Cli>(
            "dots-agent",
            env!("CARGO_PKG_VERSION"),
            "run",
        )
        .unwrap();
    }

    #[test]
    fn run_takes_the_config_flags() {
        let cli = Cli::try_parse_from([
            "dots-agent",
            "run",
            "--peer",
            "isp.example",
            "--transport",
            "tcp",
            "--consent",
            "require",
            "--log-format",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        let Command::Run(flags) = cli.command else {
            panic!("not run")
        };
        assert_eq!(flags.peers, ["isp.example"]);
        assert_eq!(
            flags.transport,
            Some(dots_agent::config::TransportPref::Tcp)
        );
        assert_eq!(
            flags.consent,
            Some(dots_proto::signal::ConsentMode::Require)
        );
    }

    #[test]
    fn consent_names_cuid_and_mid() {
        let parse = |which: &str| {
            let cli = Cli::try_parse_from(["dots-agent", "approve", which]).unwrap();
            let Command::Approve(a) = cli.command else {
                panic!("not approve")
            };
            a.mitigation()
        };
        assert_eq!(
            parse("dz6pHjaADkaFTbjreJGBpw/56").unwrap(),
            ("dz6pHjaADkaFTbjreJGBpw".to_string(), 56)
        );
        assert_eq!(parse("a/b/7").unwrap(), ("a/b".to_string(), 7));
        assert_eq!(
            parse("-e09k2l4aoWV4rnhaOF-6Q/12").unwrap(),
            ("-e09k2l4aoWV4rnhaOF-6Q".to_string(), 12)
        );
        let e = parse("56").unwrap_err();
        assert!(
            e.to_string().starts_with("\"56\": expected CUID/MID"),
            "{e}"
        );
        assert!(parse("x/y").is_err());
    }
}
