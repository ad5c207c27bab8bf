//! The command line of `dots-client`: clap types only. The flags of
//! `listen` are [`ListenFlags`], in the configuration module that applies
//! them.

use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use dots_client::{config::ListenFlags, control::DEFAULT_CONTROL_SOCKET, request::Mitigation};
use dots_daemon::config::prefix_arg;

/// Call Home DOTS client: the ISP-side peer that agents dial, and tools
/// around the DOTS signal channel's wire format.
///
/// Start the listener with `dots-client listen`; the other commands act on
/// connected agents through its control socket. Each prints the CoAP response
/// code and the decoded body (JSON form of the RFC figures).
#[derive(Parser)]
#[command(
    name = "dots-client",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Accept agents over DTLS (UDP) and TLS (TCP), authenticated by
    /// certificate, and keep one signal session per agent.
    ///
    /// Example:
    ///   dots-client listen --ca ca.pem --cert client.pem --key client.key
    Listen(Box<ListenFlags>),
    /// List agents, connected or registered, with their customer prefixes.
    Agents(Common),
    /// Ask an agent to mitigate: drop traffic from SOURCE (inside the agent's
    /// network) to TARGET. Without --agent, the agent whose customer
    /// prefixes contain SOURCE is asked; sources outside that agent's
    /// prefixes are refused (RFC 9066 §5.3.1). An offline agent gets the
    /// request when it connects.
    ///
    /// Example:
    ///   dots-client mitigate --source 203.0.113.1/32 --source-port 52727 \
    ///     --target 198.51.100.7/32 --protocol 17
    Mitigate(MitigateArgs),
    /// List the mitigations this client asked for (its book): state, the
    /// agent's last status and counters.
    Mitigations(Common),
    /// Re-read the configuration's customer prefixes and the API tokens
    /// (as SIGHUP does).
    Reload(Common),
    /// Withdraw a mitigation (the agent answers with its final counters).
    Withdraw {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        mid: u32,
    },
    /// Show one mitigation (--mid) or all of them, with status and counters.
    Status {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        mid: Option<u32>,
    },
    /// Print the agent's Observe notifications as they arrive (Ctrl-C stops).
    Watch(Common),
    /// Show the agent's session configuration (heartbeat, retransmission).
    Config(Common),
    /// Redirect the agent to another Call Home DOTS client (RFC 9066 §5.2.2).
    Redirect {
        #[command(flatten)]
        common: Common,
        /// Name of the alternate client (also its reference identifier).
        #[arg(long = "alt", value_name = "FQDN")]
        alt: String,
        /// Its addresses (repeatable); without them the agent resolves --alt.
        #[arg(long = "record", value_name = "IP")]
        records: Vec<IpAddr>,
        /// How long the redirect holds, in seconds.
        #[arg(long)]
        ttl: Option<u32>,
    },
    /// Move this cluster node's agents to the least loaded other nodes with
    /// the Call Home redirect (RFC 9066 §5.2.2). Without --max: all of them,
    /// and the node takes no new agents until restarted (before
    /// maintenance); with --max N: at most N (shedding load).
    Drain {
        #[command(flatten)]
        common: Common,
        /// Redirect at most this many agents; the node keeps taking agents.
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        /// Seconds the agents hold the redirect before they may come back.
        #[arg(long, default_value_t = 3600)]
        ttl: u32,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    ///
    /// Example: dots-client completions bash > /etc/bash_completion.d/dots-client
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for this command and its subcommands into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Convert DOTS messages between JSON and CBOR.
    #[command(subcommand)]
    Cbor(CborCommand),
    /// Validate a configuration file without running: syntax, every key and
    /// value, and the certificate files in depth (PEM, the key matches the
    /// certificate, not expired, chains to the CA; a warning when one
    /// expires within 30 days). Exits 78 when something is wrong.
    ///
    /// Example: dots-client check-config /etc/dots-client/client.toml
    CheckConfig {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Create or extend a test PKI: a CA, a certificate for this ISP-side
    /// client and one per agent. For labs and trials; production uses its
    /// own CA.
    ///
    /// The CA in --out is made once and reused: running this again, or
    /// `pki add-agent`, issues from the same CA, so certificates already
    /// handed out stay valid. Existing certificate files are not replaced
    /// without --force (remove ca.pem and ca.key to start a new CA).
    ///
    /// Example:
    ///   dots-client pki --out pki --client-name isp.example --agent cpe1 --agent cpe2
    ///   dots-client pki add-agent cpe3 --out pki
    Pki(PkiArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct PkiArgs {
    #[command(subcommand)]
    pub(crate) command: Option<PkiCommand>,
    /// Directory of ca.pem/.key, client.pem/.key and agent-NAME.pem/.key.
    #[arg(long, value_name = "DIR", required = true)]
    pub(crate) out: Option<PathBuf>,
    /// Name (DNS) or IP address agents will use as the reference
    /// identifier of this client (repeatable; the first is also the CN).
    #[arg(
        long = "client-name",
        value_name = "NAME|IP",
        default_value = "dots-client"
    )]
    pub(crate) client_names: Vec<String>,
    /// Agent certificate to issue (repeatable): its DNS name and identity.
    #[arg(long = "agent", value_name = "NAME")]
    pub(crate) agents: Vec<String>,
    #[command(flatten)]
    pub(crate) issue: IssueArgs,
}

/// What every issuing command takes.
#[derive(clap::Args)]
pub(crate) struct IssueArgs {
    /// Validity in days (also of a new CA).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) days: u32,
    /// Replace certificate files that exist (the CA is always kept).
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Subcommand)]
pub(crate) enum PkiCommand {
    /// Issue one more agent certificate from the CA in --out.
    ///
    /// Example: dots-client pki add-agent cpe3 --out pki
    AddAgent {
        /// The agent's DNS name and identity.
        #[arg(value_name = "NAME")]
        name: String,
        /// Directory holding the CA (ca.pem, ca.key).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        issue: IssueArgs,
    },
}

#[derive(clap::Args)]
pub(crate) struct Common {
    /// Agent to act on (its certificate identity, see `dots-client agents`);
    /// may be omitted when one agent is connected.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Control socket of `dots-client listen`.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub(crate) control: PathBuf,
    /// Print the raw JSON reply lines of the control socket.
    #[arg(long)]
    pub(crate) raw: bool,
}

#[derive(clap::Args)]
pub(crate) struct MitigateArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Attack source prefix inside the agent's network (repeatable); a bare
    /// address is one host (/32 or /128).
    #[arg(
        long = "source",
        value_name = "PREFIX",
        value_parser = prefix_arg,
        required_unless_present = "json_file"
    )]
    pub(crate) sources: Vec<ipnet::IpNet>,
    /// Source port or range LO-HI (repeatable).
    #[arg(long = "source-port", value_name = "LO[-HI]")]
    pub(crate) source_ports: Vec<String>,
    /// Source ICMP type or range LO-HI (repeatable).
    #[arg(long = "icmp-type", value_name = "LO[-HI]")]
    pub(crate) icmp_types: Vec<String>,
    /// Attack target prefix (repeatable); a bare address is one host.
    #[arg(
        long = "target",
        value_name = "PREFIX",
        value_parser = prefix_arg,
        required_unless_present = "json_file"
    )]
    pub(crate) targets: Vec<ipnet::IpNet>,
    /// Target port or range LO-HI (repeatable).
    #[arg(long = "target-port", value_name = "LO[-HI]")]
    pub(crate) target_ports: Vec<String>,
    /// Target protocol number (repeatable), e.g. 6 TCP, 17 UDP.
    #[arg(long = "protocol", value_name = "N")]
    pub(crate) protocols: Vec<u8>,
    /// Lifetime in seconds (-1: until withdrawn).
    #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
    pub(crate) lifetime: i64,
    /// Update this existing mitigation instead of creating a new one.
    #[arg(long)]
    pub(crate) mid: Option<u32>,
    /// Your name for the mitigation, unique among unfinished ones (a second
    /// request with the same label is refused).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Read the request body (JSON form, as in RFC 9066 Figure 10) from FILE
    /// instead of the flags above.
    #[arg(long = "json", value_name = "FILE", conflicts_with_all = ["sources", "targets"])]
    pub(crate) json_file: Option<PathBuf>,
}

impl MitigateArgs {
    /// The scope the flags describe (without `--json`).
    pub(crate) fn mitigation(&self) -> Mitigation {
        Mitigation {
            sources: self.sources.clone(),
            source_ports: self.source_ports.clone(),
            icmp_types: self.icmp_types.clone(),
            targets: self.targets.clone(),
            target_ports: self.target_ports.clone(),
            protocols: self.protocols.clone(),
            lifetime: self.lifetime,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum CborCommand {
    /// Read the JSON form on stdin, write the CBOR wire form on stdout.
    ///
    /// Example:
    ///   echo '{"ietf-dots-signal-channel:heartbeat":{"peer-hb-status":true}}' \
    ///     | dots-client cbor encode --hex
    Encode {
        /// Write hexadecimal text instead of raw bytes.
        #[arg(long)]
        hex: bool,
    },
    /// Read the CBOR wire form on stdin, write the JSON form on stdout.
    Decode {
        /// Read hexadecimal text (whitespace ignored) instead of raw bytes.
        #[arg(long)]
        hex: bool,
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
            "dots-client",
            env!("CARGO_PKG_VERSION"),
            "listen",
        )
        .unwrap();
    }

    #[test]
    fn mitigate_flags() {
        let cli = Cli::try_parse_from([
            "dots-client",
            "mitigate",
            "--agent",
            "cpe1",
            "--source",
            "192.0.2.10/32",
            "--source-port",
            "1024-65535",
            "--target",
            "198.51.100.7/32",
            "--protocol",
            "17",
            "--lifetime",
            "-1",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Mitigate(a) = cli.command else {
            panic!("not mitigate")
        };
        assert_eq!(a.common.agent.as_deref(), Some("cpe1"));
        let m = a.mitigation();
        assert_eq!(m.lifetime, -1);
        assert_eq!(m.source_ports, ["1024-65535"]);
        assert_eq!(m.protocols, [17]);
        assert!(
            Cli::try_parse_from(["dots-client", "mitigate", "--source", "192.0.2.1/32"]).is_err()
        );
        assert!(Cli::try_parse_from([
            "dots-client",
            "mitigate",
            "--json",
            "f.json",
            "--source",
            "192.0.2.1/32"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["dots-client", "mitigate", "--json", "f.json"]).is_ok());
    }

    #[test]
    fn bare_addresses_are_host_prefixes() {
        let cli = Cli::try_parse_from([
            "dots-client",
            "mitigate",
            "--source",
            "192.0.2.10",
            "--target",
            "198.51.100.7",
            "--target",
            "2001:db8::7",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Mitigate(a) = cli.command else {
            panic!("not mitigate")
        };
        let m = a.mitigation();
        let s: Vec<String> = m.sources.iter().map(ToString::to_string).collect();
        let t: Vec<String> = m.targets.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["192.0.2.10/32"]);
        assert_eq!(t, ["198.51.100.7/32", "2001:db8::7/128"]);
        let e = Cli::try_parse_from([
            "dots-client",
            "mitigate",
            "--source",
            "192.0.2",
            "--target",
            "198.51.100.7",
        ])
        .err()
        .expect("not an address");
        assert!(e.to_string().contains("is not an IP prefix"), "{e}");
    }

    #[test]
    fn pki_commands() {
        let cli = Cli::try_parse_from(["dots-client", "pki", "--out", "p", "--agent", "cpe1"])
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Pki(p) = cli.command else {
            panic!("not pki")
        };
        assert!(p.command.is_none());
        assert_eq!(p.out.as_deref(), Some(std::path::Path::new("p")));
        assert_eq!((p.issue.days, p.issue.force), (365, false));
        let cli = Cli::try_parse_from([
            "dots-client",
            "pki",
            "add-agent",
            "cpe3",
            "--out",
            "p",
            "--force",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Pki(PkiArgs {
            command: Some(PkiCommand::AddAgent { name, issue, .. }),
            ..
        }) = cli.command
        else {
            panic!("not add-agent")
        };
        assert_eq!(name, "cpe3");
        assert!(issue.force);
        for bad in [
            &["dots-client", "pki", "--out", "p", "--days", "0"][..],
            &["dots-client", "pki", "--agent", "x"][..],
            &["dots-client", "pki", "add-agent", "x"][..],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_takes_the_config_flags() {
        let cli = Cli::try_parse_from([
            "dots-client",
            "listen",
            "--udp",
            "none",
            "--allow",
            "cpe1",
            "--log-format",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Listen(flags) = cli.command else {
            panic!("not listen")
        };
        assert_eq!(flags.udp.as_deref(), Some("none"));
        assert_eq!(flags.allow, ["cpe1"]);
        assert_eq!(
            flags.log_format,
            Some(dots_daemon::logging::LogFormat::Json)
        );
    }
}
