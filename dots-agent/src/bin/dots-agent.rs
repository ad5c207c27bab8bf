//! `dots-agent`: the router side of DOTS signal channel Call Home (RFC 9066).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dots_agent::{
    enforce::{AttachMode, Dataplane, DataplaneOptions, DEFAULT_BPFFS_DIR},
    logging::{self, LogFormat},
};

/// DOTS signal channel Call Home agent for Linux routers.
///
/// The agent dials its ISP's Call Home DOTS client, validates the mitigation
/// requests it receives, and drops the named attack traffic leaving the local
/// network in an XDP program on the LAN interfaces.
///
/// Available now: the data plane commands below. The signal channel (`run`)
/// is being built.
#[derive(Parser)]
#[command(version, about, long_about, propagate_version = true)]
struct Cli {
    /// Log format on stderr. Filter with RUST_LOG (e.g. RUST_LOG=debug).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect or manage the XDP data plane directly.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// Remove everything the agent put in the kernel: detach XDP from every
    /// interface and unpin all maps. Enforcement stops at once.
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Detach { bpffs } => {
            let removed = Dataplane::teardown(&bpffs)?;
            tracing::info!(bpffs = %bpffs.display(), removed, "data plane removed");
            Ok(())
        }
        Command::Dataplane(cmd) => dataplane(cmd),
    }
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
                    "packets:    seen {} dropped {} exempt {} unparsed {}",
                    stats.seen, stats.dropped, stats.exempt, stats.unparsed
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
