//! `dots-agent`: the router side of DOTS signal channel Call Home (RFC 9066).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dots_agent::config::{AgentConfig, ConsentPolicy, PeerConfig, TransportPref};
use dots_agent::{
    agent::{self, control},
    enforce::{AttachMode, Dataplane, DataplaneOptions, DEFAULT_BPFFS_DIR},
    logging::{self, LogFormat},
};

/// DOTS signal channel Call Home agent for Linux routers.
///
/// The agent dials its ISP's Call Home DOTS client, validates the mitigation
/// requests it receives, and drops the named attack traffic leaving the local
/// network in an XDP program on the LAN interfaces.
///
/// Start with `dots-agent run --help`.
#[derive(Parser)]
#[command(version, about, long_about, propagate_version = true)]
struct Cli {
    /// Log format on stderr, human or json [default: human, or the
    /// configuration's]. Filter with RUST_LOG (e.g. RUST_LOG=debug).
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    Run(Box<RunArgs>),
    /// Validate a configuration file without running: syntax, every key and
    /// value, and that the certificate files exist.
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
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Discover the Call Home DOTS client (RFC 8973): explicit
    /// configuration, DHCP (as recorded by dhcp-hook), S-NAPTR, DNS-SD; print
    /// the ordered candidates.
    ///
    /// Example: dots-agent discover --domain example.net --resolver 192.0.2.53:53 --json
    Discover(Box<dots_agent::discovery::cli::DiscoverArgs>),
    /// Record the Call Home DOTS client a DHCP server announced (options
    /// 147/148, 141/142) in <state-dir>/discovered.json; run from a DHCP
    /// client's hook script.
    ///
    /// Example (udhcpc script): dots-agent dhcp-hook --env --family v4
    DhcpHook(Box<dots_agent::discovery::cli::DhcpHookArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration (see examples/agent.toml). The flags below
    /// override it; without it they are the whole configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Call Home DOTS client to dial, HOST[:PORT] (port 4647 by default).
    /// Repeatable: one session per peer.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// Transport: udp (DTLS), tcp (TLS), or both (raced, DTLS first).
    #[arg(long, value_enum)]
    transport: Option<TransportChoice>,
    /// CA bundle that the peer's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Reference identifier the peers' certificates must carry (DNS name or
    /// IP address); defaults to the host given in --peer.
    #[arg(long, value_name = "NAME")]
    peer_name: Option<String>,
    /// The local domain: source prefixes of requests must fall inside
    /// (repeatable; the router's own addresses are added).
    #[arg(long = "domain", value_name = "PREFIX")]
    domain: Vec<ipnet::IpNet>,
    /// Monitor mode: validate, answer and log requests, install nothing
    /// (status stays 1 "attack-mitigation-in-progress").
    #[arg(long)]
    no_enforce: bool,
    /// LAN interface to enforce on (repeatable).
    #[arg(long = "lan", value_name = "IFACE")]
    lans: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum)]
    mode: Option<AttachMode>,
    /// auto: enforce valid requests at once; require: wait for the operator.
    #[arg(long, value_enum)]
    consent: Option<Consent>,
    /// Prefix never to drop, whatever a request says (repeatable).
    #[arg(long = "never-block", value_name = "PREFIX")]
    never_block: Vec<ipnet::IpNet>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/dots-agent].
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Control socket for `dots-agent status`, `mitigations`, `approve`,
    /// `reject` [default: /run/dots-agent.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Where the active mitigations are kept across restarts
    /// [default: /var/lib/dots-agent].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (sessions, heartbeats, mitigations by state,
    /// drops per mitigation) on ADDR:PORT at /metrics [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Behind NAT: block the internal device's traffic to the target
    /// (device) or only its matching flows (flow) [default: device].
    #[arg(long, value_enum)]
    nat_action: Option<dots_agent::nat::NatAction>,
    /// Without a peer (from --peer or the file): find it with RFC 8973
    /// discovery, DHCP results of `dots-agent dhcp-hook` in the state
    /// directory first, then S-NAPTR and DNS-SD in this domain.
    #[arg(long, value_name = "DOMAIN")]
    discovery_domain: Option<String>,
    /// DNS server for discovery, ADDR:PORT [default: the system's].
    #[arg(long, value_name = "ADDR:PORT")]
    resolver: Option<std::net::SocketAddr>,
    /// Seconds between counter updates (and Observe notifications) of active
    /// mitigations [default: 30].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    notify_interval: Option<u64>,
}

impl RunArgs {
    /// The configuration file (or the defaults) with the flags applied.
    fn config(&self, log_format: Option<LogFormat>) -> Result<AgentConfig> {
        let mut c = match &self.config {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
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
            c.transport = match t {
                TransportChoice::Udp => TransportPref::Udp,
                TransportChoice::Tcp => TransportPref::Tcp,
                TransportChoice::Both => TransportPref::Both,
            };
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
            c.consent = match consent {
                Consent::Auto => ConsentPolicy::Auto,
                Consent::Require => ConsentPolicy::Require,
            };
            if consent == Consent::Auto {
                c.consent_timeout = None;
                c.consent_timeout_action = None;
            }
        }
        c.never_block.extend(self.never_block.iter().copied());
        if let Some(b) = &self.bpffs {
            c.xdp.bpffs = b.clone();
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
        if let Some(f) = log_format {
            c.log_format = f;
        }
        Ok(c)
    }
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The running agent's control socket.
    #[arg(long, default_value = control::DEFAULT_CONTROL_SOCKET)]
    control: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ConsentArgs {
    /// The mitigation, as CUID/MID (see `dots-agent mitigations`).
    #[arg(value_name = "CUID/MID")]
    which: String,
    /// Upstream peer index, when the same CUID/MID exists under several.
    #[arg(long)]
    peer: Option<usize>,
    #[arg(long, default_value = control::DEFAULT_CONTROL_SOCKET)]
    control: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TransportChoice {
    Udp,
    Tcp,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Consent {
    Auto,
    Require,
}

#[derive(Subcommand)]
enum DataplaneCommand {
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

fn main() {
    if let Err(e) = real_main() {
        eprintln!("dots-agent: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        logging::init(cli.log_format.unwrap_or_default());
    }
    match cli.command {
        Command::Run(args) => run(*args, cli.log_format),
        Command::CheckConfig { config } => check_config(&config),
        Command::Completions { shell } => {
            dots_agent::cli_docs::completions::<Cli>(shell, "dots-agent");
            Ok(())
        }
        Command::Man { dir } => dots_agent::cli_docs::man_pages::<Cli>(&dir),
        Command::Status(a) => show(&a, control::Request::Status),
        Command::Mitigations(a) => show(&a, control::Request::Mitigations),
        Command::Approve(a) => consent(&a, true),
        Command::Reject(a) => consent(&a, false),
        Command::Detach { bpffs } => {
            let removed = Dataplane::teardown(&bpffs)?;
            tracing::info!(bpffs = %bpffs.display(), removed, "data plane removed");
            Ok(())
        }
        Command::Dataplane(cmd) => dataplane(cmd),
        Command::Discover(a) => dots_agent::discovery::cli::run_discover(&a),
        Command::DhcpHook(a) => dots_agent::discovery::cli::run_dhcp_hook(&a),
    }
}

fn run(a: RunArgs, log_format: Option<LogFormat>) -> Result<()> {
    let mut config = a.config(log_format)?;
    logging::init(config.log_format);
    // RFC 8973 §4: explicit configuration first; discovery only without it.
    let discovered = if config.peers.is_empty() {
        Some(discover_peer(&config, &a)?)
    } else {
        None
    };
    if let Some((t, _)) = &discovered {
        tracing::info!(peer = %t, endpoints = ?t.endpoints, "peer found by discovery");
        config.peers = vec![PeerConfig {
            address: t.endpoints[0].0.to_string(),
            peer_name: t.name.clone(),
            ..Default::default()
        }];
    }
    config.check_files()?;
    let mut opts = config.to_options()?;
    if let Some((t, d)) = discovered {
        opts.peers = vec![t];
        opts.discovery = Some(d);
    }
    // The router's own addresses belong to its domain (RFC 9066 §5.3.1).
    for p in config.interface_prefixes() {
        if !opts.domain.iter().any(|d| d.contains(&p)) {
            opts.domain.push(p);
        }
    }
    tracing::info!(domain = ?opts.domain, "local domain");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(agent::run(opts))
}

/// The Call Home DOTS client found by RFC 8973 discovery.
fn discover_peer(
    config: &AgentConfig,
    a: &RunArgs,
) -> Result<(dots_agent::agent::PeerTarget, dots_agent::agent::Discovery)> {
    use dots_agent::{discovery, transport::Transport};
    let opts = discovery::DiscoverOptions {
        state_dir: Some(config.state_dir.clone()),
        domain: a.discovery_domain.clone(),
        resolver: a.resolver,
        resolve_names: true,
        ..Default::default()
    };
    let transports = match config.transport {
        TransportPref::Udp => vec![Transport::Udp],
        TransportPref::Tcp => vec![Transport::Tcp],
        TransportPref::Both => vec![Transport::Udp, Transport::Tcp],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(discovery::find_peer(&opts, &transports)) {
        Ok(found) => Ok((
            found.target,
            dots_agent::agent::Discovery {
                opts,
                transports,
                valid_until: found.valid_until,
            },
        )),
        Err((msg, _)) => anyhow::bail!(
            "no peer configured (--peer or [[peers]]) and {msg}{}",
            if a.discovery_domain.is_none() {
                " (give --discovery-domain for S-NAPTR/DNS-SD)"
            } else {
                ""
            }
        ),
    }
}

/// `check-config`: everything `run` checks before it starts.
fn check_config(path: &std::path::Path) -> Result<()> {
    let config = AgentConfig::load(path)?;
    config.validate()?;
    config.check_files()?;
    let opts = config.to_options()?;
    println!(
        "{}: valid ({} peer(s), {} domain prefix(es), {} LAN interface(s), {})",
        path.display(),
        opts.peers.len(),
        opts.domain.len(),
        opts.lans.len(),
        if opts.monitor {
            "monitor mode"
        } else {
            "enforcing"
        }
    );
    Ok(())
}

fn ask(socket: &std::path::Path, req: &control::Request) -> Result<control::Reply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(control::call(socket, req))?;
    if !reply.ok {
        anyhow::bail!(
            "{}",
            reply.error.unwrap_or_else(|| "the agent refused".into())
        );
    }
    Ok(reply)
}

fn show(a: &ControlArgs, req: control::Request) -> Result<()> {
    let is_status = matches!(req, control::Request::Status);
    let reply = ask(&a.control, &req)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
    } else if is_status {
        print_status(&reply.body);
    } else {
        print_mitigations(&reply.body);
    }
    Ok(())
}

fn print_status(b: &serde_json::Value) {
    let mode = if b["monitor"].as_bool().unwrap_or(false) {
        "monitor (nothing is installed)"
    } else {
        "enforcing"
    };
    println!("mode:        {mode}");
    println!("bpffs:       {}", b["bpffs"].as_str().unwrap_or("-"));
    let ifaces: Vec<String> = b["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{} ({})",
                        i["iface"].as_str().unwrap_or("?"),
                        i["mode"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "interfaces:  {}",
        if ifaces.is_empty() {
            "(none)".into()
        } else {
            ifaces.join(", ")
        }
    );
    println!("mitigations: {}", b["mitigations"]);
    for (i, p) in b["peers"].as_array().into_iter().flatten().enumerate() {
        let silent = p["silent_for"]
            .as_u64()
            .map(|s| format!(", last heard {s}s ago"))
            .unwrap_or_default();
        let transport = p["transport"]
            .as_str()
            .map(|t| format!(" over {t}"))
            .unwrap_or_default();
        let resumed = if p["resumed"].as_bool().unwrap_or(false) {
            " (resumed)"
        } else {
            ""
        };
        println!(
            "peer {i}:      {} {}{transport}{resumed}{silent}",
            p["peer"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?")
        );
        if let Some(e) = p["last_error"].as_str() {
            println!("             last error: {e}");
        }
    }
}

fn print_mitigations(b: &serde_json::Value) {
    let list = b.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no mitigation");
        return;
    }
    for m in list {
        let join = |k: &str| {
            m[k].as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.to_string().trim_matches('"').to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let lifetime = match m["lifetime_left"].as_i64() {
            Some(-1) => "indefinite".to_string(),
            Some(s) => format!("{s}s left"),
            None => "-".into(),
        };
        println!(
            "{}/{}  peer {}  {} (status {})  {lifetime}",
            m["cuid"].as_str().unwrap_or("?"),
            m["mid"],
            m["peer"],
            m["state"].as_str().unwrap_or("?"),
            m["status"]
        );
        let mut scope = format!("  from {}", join("sources"));
        for (k, label) in [("source_ports", " sport "), ("icmp_types", " icmp ")] {
            if !join(k).is_empty() {
                scope += &format!("{label}{}", join(k));
            }
        }
        scope += &format!(" to {}", join("targets"));
        for (k, label) in [("protocols", " proto "), ("target_ports", " dport ")] {
            if !join(k).is_empty() {
                scope += &format!("{label}{}", join(k));
            }
        }
        println!("{scope}");
        if let Some(d) = m["devices"].as_array().filter(|d| !d.is_empty()) {
            let d: Vec<&str> = d.iter().filter_map(|v| v.as_str()).collect();
            println!("  behind NAT: {}", d.join(", "));
        }
        println!(
            "  dropped {} packets, {} bytes; now {} pps, {} bps",
            m["packets"], m["bytes"], m["pps"], m["bps"]
        );
    }
}

fn consent(a: &ConsentArgs, approve: bool) -> Result<()> {
    let (cuid, mid) = a
        .which
        .rsplit_once('/')
        .and_then(|(c, m)| Some((c.to_string(), m.parse::<u32>().ok()?)))
        .with_context(|| {
            format!(
                "{:?}: expected CUID/MID, e.g. dz6pHjaADkaFTbjreJGBpw/56",
                a.which
            )
        })?;
    ask(
        &a.control,
        &control::Request::Consent {
            cuid: cuid.clone(),
            mid,
            approve,
            peer: a.peer,
        },
    )?;
    println!(
        "{cuid}/{mid} {}",
        if approve { "approved" } else { "rejected" }
    );
    Ok(())
}

fn open(bpffs: PathBuf) -> Result<Dataplane> {
    Dataplane::open(&DataplaneOptions {
        bpffs,
        ..Default::default()
    })
    .context("opening the XDP data plane")
}

fn dataplane(cmd: DataplaneCommand) -> Result<()> {
    match cmd {
        DataplaneCommand::Attach { lans, mode, bpffs } => {
            let mut dp = open(bpffs)?;
            for lan in &lans {
                let a = dp.attach(lan, mode)?;
                tracing::info!(iface = %a.iface, mode = a.mode, pin = %a.pin.display(), "XDP attached");
            }
            Ok(())
        }
        DataplaneCommand::DetachInterface { lan, bpffs } => {
            let mut dp = open(bpffs)?;
            if dp.detach(&lan)? {
                tracing::info!(iface = %lan, "XDP detached");
            } else {
                tracing::warn!(iface = %lan, "not attached");
            }
            Ok(())
        }
        DataplaneCommand::Status { bpffs, json } => {
            let interfaces = Dataplane::attachments(&bpffs);
            let dp = open(bpffs.clone())?;
            let slots = dp.active_slots()?;
            let stats = dp.stats()?;
            let mut per_slot = Vec::new();
            for s in &slots {
                let c = dp.counters(*s)?;
                per_slot
                    .push(serde_json::json!({"slot": s, "packets": c.packets, "bytes": c.bytes}));
            }
            if json {
                let out = serde_json::json!({
                    "bpffs": bpffs, "interfaces": interfaces, "slots": per_slot, "stats": stats,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("bpffs:      {}", bpffs.display());
                println!(
                    "interfaces: {}",
                    if interfaces.is_empty() {
                        "(none)".into()
                    } else {
                        interfaces.join(", ")
                    }
                );
                println!(
                    "packets:    dropped {} exempt {} unparsed {}",
                    stats.dropped, stats.exempt, stats.unparsed
                );
                println!("slots:      {}", slots.len());
                for v in per_slot {
                    println!(
                        "  slot {:>3}: {} packets, {} bytes dropped",
                        v["slot"], v["packets"], v["bytes"]
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
