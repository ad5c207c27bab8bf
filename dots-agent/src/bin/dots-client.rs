//! `dots-client`: the ISP side of DOTS signal channel Call Home (RFC 9066).

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use dots_agent::{
    client::{self, control, control::Reply, control::Request},
    config::ClientConfig,
    logging::{self, LogFormat},
    pki::{self, San},
};
use dots_proto::cbor;
use dots_proto::model::{DotsMessage, IcmpTypeRange, MitigationScope, PortRange, Scope};

/// Call Home DOTS client: the ISP-side peer that agents dial, and tools
/// around the DOTS signal channel's wire format.
///
/// Start the listener with `dots-client listen`; the other commands act on
/// connected agents through its control socket. Each prints the CoAP response
/// code and the decoded body (JSON form of the RFC figures).
#[derive(Parser)]
#[command(version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept agents over DTLS (UDP) and TLS (TCP), authenticated by
    /// certificate, and keep one signal session per agent.
    ///
    /// Example:
    ///   dots-client listen --ca ca.pem --cert client.pem --key client.key
    Listen(ListenArgs),
    /// List connected agents.
    Agents(Common),
    /// Ask an agent to mitigate: drop traffic from SOURCE (inside the agent's
    /// network) to TARGET.
    ///
    /// Example:
    ///   dots-client mitigate --agent cpe1 --source 192.0.2.10/32 \
    ///     --source-port 1024-65535 --target 198.51.100.7/32 --protocol 17
    Mitigate(MitigateArgs),
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
        records: Vec<std::net::IpAddr>,
        /// How long the redirect holds, in seconds.
        #[arg(long)]
        ttl: Option<u32>,
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
    /// Create a test PKI: a CA, a certificate for this ISP-side client and one
    /// per agent. For labs and trials; production uses its own CA.
    ///
    /// Example:
    ///   dots-client pki --out pki --client-name isp.example --agent cpe1 --agent cpe2
    Pki {
        /// Directory to write ca.pem, client.pem/.key and agent-NAME.pem/.key to.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Name (DNS) or IP address agents will use as the reference
        /// identifier of this client (repeatable; the first is also the CN).
        #[arg(
            long = "client-name",
            value_name = "NAME|IP",
            default_value = "dots-client"
        )]
        client_names: Vec<String>,
        /// Agent certificate to issue (repeatable): its DNS name and identity.
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Agent to act on (its certificate identity, see `dots-client agents`);
    /// may be omitted when one agent is connected.
    #[arg(long)]
    agent: Option<String>,
    /// Control socket of `dots-client listen`.
    #[arg(long, default_value = control::DEFAULT_CONTROL_SOCKET)]
    control: PathBuf,
    /// Print the raw JSON reply lines of the control socket.
    #[arg(long)]
    raw: bool,
}

#[derive(clap::Args)]
struct ListenArgs {
    /// TOML configuration (see examples/client.toml); the flags below
    /// override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address for DTLS, or "none" [default: [::]:4647].
    #[arg(long)]
    udp: Option<String>,
    /// TCP address for TLS, or "none" [default: [::]:4647].
    #[arg(long)]
    tcp: Option<String>,
    /// CA bundle agents' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Agent identity allowed in (repeatable); default: any from the CA.
    #[arg(long = "allow", value_name = "NAME")]
    allow: Vec<String>,
    /// Control socket path [default: /run/dots-client.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory for state that outlives the process (session-ticket keys,
    /// so agents resume their sessions after a restart) [default:
    /// /var/lib/dots-client].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log format on stderr (filter with RUST_LOG) [default: human].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(clap::Args)]
struct MitigateArgs {
    #[command(flatten)]
    common: Common,
    /// Attack source prefix inside the agent's network (repeatable).
    #[arg(
        long = "source",
        value_name = "PREFIX",
        required_unless_present = "json_file"
    )]
    sources: Vec<ipnet::IpNet>,
    /// Source port or range LO-HI (repeatable).
    #[arg(long = "source-port", value_name = "LO[-HI]")]
    source_ports: Vec<String>,
    /// Source ICMP type or range LO-HI (repeatable).
    #[arg(long = "icmp-type", value_name = "LO[-HI]")]
    icmp_types: Vec<String>,
    /// Attack target prefix (repeatable).
    #[arg(
        long = "target",
        value_name = "PREFIX",
        required_unless_present = "json_file"
    )]
    targets: Vec<ipnet::IpNet>,
    /// Target port or range LO-HI (repeatable).
    #[arg(long = "target-port", value_name = "LO[-HI]")]
    target_ports: Vec<String>,
    /// Target protocol number (repeatable), e.g. 6 TCP, 17 UDP.
    #[arg(long = "protocol", value_name = "N")]
    protocols: Vec<u8>,
    /// Lifetime in seconds (-1: until withdrawn).
    #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
    lifetime: i64,
    /// Update this existing mitigation instead of creating a new one.
    #[arg(long)]
    mid: Option<u32>,
    /// Read the request body (JSON form, as in RFC 9066 Figure 10) from FILE
    /// instead of the flags above.
    #[arg(long = "json", value_name = "FILE", conflicts_with_all = ["sources", "targets"])]
    json_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CborCommand {
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

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("dots-client: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cbor(CborCommand::Encode { hex }) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let json: serde_json::Value =
                serde_json::from_str(&text).context("stdin is not JSON")?;
            let bytes =
                cbor::json_to_cbor(&json).map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))?;
            let mut out = std::io::stdout().lock();
            if hex {
                writeln!(out, "{}", to_hex(&bytes))?;
            } else {
                out.write_all(&bytes)?;
            }
            Ok(())
        }
        Command::Cbor(CborCommand::Decode { hex }) => {
            let mut raw = Vec::new();
            std::io::stdin()
                .read_to_end(&mut raw)
                .context("reading stdin")?;
            let bytes = if hex { from_hex(&raw)? } else { raw };
            let json =
                cbor::cbor_to_json(&bytes).map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Pki {
            out,
            client_names,
            agents,
            days,
        } => pki_command(&out, &client_names, &agents, days),
        Command::Listen(a) => listen(a),
        Command::Completions { shell } => {
            dots_agent::cli_docs::completions::<Cli>(shell, "dots-client");
            Ok(())
        }
        Command::Man { dir } => dots_agent::cli_docs::man_pages::<Cli>(&dir),
        Command::Agents(c) => ask(&c, Request::Agents),
        Command::Mitigate(a) => {
            let scope = mitigation_body(&a)?;
            let req = Request::Mitigate {
                agent: a.common.agent.clone(),
                scope,
                mid: a.mid,
            };
            ask(&a.common, req)
        }
        Command::Withdraw { common, mid } => ask(
            &common,
            Request::Withdraw {
                agent: common.agent.clone(),
                mid,
            },
        ),
        Command::Status { common, mid } => ask(
            &common,
            Request::Status {
                agent: common.agent.clone(),
                mid,
            },
        ),
        Command::Config(c) => ask(
            &c,
            Request::Config {
                agent: c.agent.clone(),
            },
        ),
        Command::Watch(c) => ask(
            &c,
            Request::Watch {
                agent: c.agent.clone(),
            },
        ),
        Command::Redirect {
            common,
            alt,
            records,
            ttl,
        } => {
            let body = dots_proto::model::RedirectedSignal {
                alt_ch_client: alt,
                alt_ch_client_record: records,
                ttl,
            };
            let redirect = body
                .to_json()
                .map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))?;
            ask(
                &common,
                Request::Redirect {
                    agent: common.agent.clone(),
                    redirect,
                },
            )
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn listen(a: ListenArgs) -> Result<()> {
    let mut c = match &a.config {
        Some(path) => ClientConfig::load(path)?,
        None => ClientConfig::default(),
    };
    if let Some(v) = &a.udp {
        c.udp = v.clone();
    }
    if let Some(v) = &a.tcp {
        c.tcp = v.clone();
    }
    for (flag, field) in [
        (&a.ca, &mut c.ca),
        (&a.cert, &mut c.cert),
        (&a.key, &mut c.key),
    ] {
        if flag.is_some() {
            field.clone_from(flag);
        }
    }
    if !a.allow.is_empty() {
        c.allow = a.allow.clone();
    }
    if let Some(v) = &a.control {
        c.control_socket = v.clone();
    }
    if let Some(v) = &a.state_dir {
        c.state_dir = v.clone();
    }
    if let Some(f) = a.log_format {
        c.log_format = f;
    }
    logging::init(c.log_format());
    c.check_files()?;
    let opts = c.to_options()?;
    runtime()?.block_on(client::listen(opts))
}

/// Sends one control request and prints the replies.
fn ask(c: &Common, req: Request) -> Result<()> {
    let json = c.raw;
    let mut failed = None;
    runtime()?.block_on(control::call(&c.control, &req, |r: Reply| {
        print_reply(&r, json);
        if !r.ok {
            failed = r.error.clone();
        } else if let Some(code) = r
            .code
            .as_deref()
            .filter(|c| c.starts_with('4') || c.starts_with('5'))
        {
            // An error answer from the agent: its diagnostic was printed above.
            failed = Some(format!("the agent answered {code}"));
        }
        true
    }))?;
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

fn print_reply(r: &Reply, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    if !r.ok {
        return; // the error is printed once, by main
    }
    let mut head = Vec::new();
    if let Some(code) = &r.code {
        head.push(code.clone());
    }
    if let Some(agent) = &r.agent {
        head.push(format!("agent {agent}"));
    }
    if let Some(mid) = r.mid {
        head.push(format!("mid {mid}"));
    }
    if !head.is_empty() {
        println!("{}", head.join("  "));
    }
    if !r.body.is_null() {
        println!(
            "{}",
            serde_json::to_string_pretty(&r.body).unwrap_or_default()
        );
    }
}

/// `LO` or `LO-HI` of a port or type range, naming the flag when malformed.
fn parse_range<T: std::str::FromStr + PartialOrd + Copy>(
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

/// The JSON form of the mitigation request the flags describe.
fn mitigation_body(a: &MitigateArgs) -> Result<serde_json::Value> {
    if let Some(path) = &a.json_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        // Validate locally so a typo is reported with its path.
        MitigationScope::from_json(&json)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.diagnostic()))?;
        return Ok(json);
    }
    let ports = |v: &[String], flag: &str| -> Result<Vec<PortRange>> {
        v.iter()
            .map(|s| parse_range::<u16>(s, flag).map(|(lower, upper)| PortRange { lower, upper }))
            .collect()
    };
    let scope = Scope {
        source_prefix: a.sources.clone(),
        source_port_range: ports(&a.source_ports, "source-port")?,
        source_icmp_type_range: a
            .icmp_types
            .iter()
            .map(|s| {
                parse_range::<u8>(s, "icmp-type")
                    .map(|(lower, upper)| IcmpTypeRange { lower, upper })
            })
            .collect::<Result<_>>()?,
        target_prefix: a.targets.clone(),
        target_port_range: ports(&a.target_ports, "target-port")?,
        target_protocol: a.protocols.clone(),
        lifetime: Some(a.lifetime),
        ..Scope::default()
    };
    MitigationScope {
        scopes: vec![scope],
    }
    .to_json()
    .map_err(|e| anyhow::anyhow!("{}", e.diagnostic()))
}

fn pki_command(
    out: &std::path::Path,
    client_names: &[String],
    agents: &[String],
    days: u32,
) -> Result<()> {
    let sans: Vec<San> = client_names.iter().map(|n| San::parse(n)).collect();
    let lab = pki::create_lab_pki(out, &sans, agents, days)?;
    println!("CA:      {}", lab.ca.display());
    println!(
        "client:  {} {}",
        lab.client_cert.display(),
        lab.client_key.display()
    );
    for (name, cert, key) in &lab.agents {
        println!("agent {name}: {} {}", cert.display(), key.display());
    }
    Ok(())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &[u8]) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        anyhow::bail!("hex input has an odd number of digits ({})", digits.len());
    }
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let s = std::str::from_utf8(pair).unwrap_or("??");
            u8::from_str_radix(s, 16).with_context(|| format!("invalid hex {s:?} at byte {i}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
