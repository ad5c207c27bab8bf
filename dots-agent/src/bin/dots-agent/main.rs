//! `dots-agent`: the router side of DOTS signal channel Call Home (RFC 9066).
//!
//! Parses the command line ([`args`]), runs the library for it, and prints
//! the result ([`show`]).

mod args;
mod show;

use std::{future::Future, path::PathBuf};

use anyhow::{Context, Result};

use args::{Cli, Command, ConsentArgs, ControlArgs, DataplaneCommand};
use dots_agent::{
    agent::{self, control, view::DataplaneStatus},
    config::{AgentConfig, RunFlags},
    discovery,
    enforce::{Dataplane, DataplaneOptions},
};
use dots_daemon::{
    exit::{self, ConfigProblem},
    logging::{self, LogFormat},
};

fn main() {
    if let Err(e) = real_main(exit::parse_args::<Cli>()) {
        exit::fail("dots-agent", &e);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if !matches!(cli.command, Command::Run(_)) {
        logging::init(cli.log_format.unwrap_or_default());
    }
    match cli.command {
        Command::Run(flags) => run(&flags, cli.log_format),
        Command::CheckConfig { config } => {
            let (opts, warnings) = AgentConfig::check_file(&config)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            show::check_config(&config, &opts);
            Ok(())
        }
        Command::Completions { shell } => {
            dots_daemon::cli_docs::completions::<Cli>(shell, "dots-agent");
            Ok(())
        }
        Command::Man { dir } => dots_daemon::cli_docs::man_pages::<Cli>(&dir),
        Command::Status(a) => status(&a),
        Command::Mitigations(a) => mitigations(&a),
        Command::Approve(a) => consent(&a, true),
        Command::Reject(a) => consent(&a, false),
        Command::Detach { bpffs, config } => detach(bpffs, config),
        Command::Dataplane(cmd) => dataplane(cmd),
        Command::Discover(a) => discovery::cli::run_discover(&a),
        Command::DhcpHook(a) => discovery::cli::run_dhcp_hook(&a),
    }
}

/// `dots-agent run`.
fn run(flags: &RunFlags, log_format: Option<LogFormat>) -> Result<()> {
    let config = flags.load(log_format)?;
    logging::init(config.log_format);
    dots_agent::agent::heap::fixed_mmap_threshold();
    // One thread: the agent's tasks do short work (a request, a heartbeat,
    // a counter read); what blocks (conntrack and address events, state
    // files) has threads of its own. No worker threads to keep, nor their
    // allocator arenas: a router's memory is small.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let opts = agent::startup::options(config, &flags.discovery).await?;
        let reload = agent::startup::reloader(flags.clone());
        agent::run(opts, Some(reload)).await
    })
}

/// `dots-agent detach`: the bpffs directory from `--bpffs`, else from the
/// configuration file, else the default. Refuses a directory without pins
/// of ours, or with files that are not ours (a wrong path must not unpin
/// someone else's maps).
fn detach(bpffs: Option<PathBuf>, config: Option<PathBuf>) -> Result<()> {
    let dir = match (bpffs, config) {
        (Some(b), _) => b,
        (None, Some(c)) => AgentConfig::load(&c)?.xdp.bpffs,
        (None, None) => PathBuf::from(dots_agent::enforce::DEFAULT_BPFFS_DIR),
    };
    let names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let links = Dataplane::attachments(&dir);
    let ours = |n: &str| {
        dots_common::names::ALL_MAPS.contains(&n)
            || links
                .iter()
                .any(|i| n.strip_suffix(i.as_str()) == Some("link_"))
    };
    if !names.iter().any(|n| ours(n)) {
        return Err(ConfigProblem(format!(
            "{}: no pins of dots-agent here (no DOTS_* maps, no link_IFACE): nothing removed; \
             give the agent's --bpffs or --config",
            dir.display()
        ))
        .into());
    }
    let foreign: Vec<&String> = names.iter().filter(|n| !ours(n)).collect();
    if !foreign.is_empty() {
        return Err(ConfigProblem(format!(
            "{}: also holds {}, not dots-agent's: refusing to remove anything there",
            dir.display(),
            logging::list(&foreign)
        ))
        .into());
    }
    let removed = Dataplane::teardown(&dir)?;
    tracing::info!(bpffs = %dir.display(), removed, "data plane removed");
    Ok(())
}

/// Runs one control-socket call to completion.
fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn status(a: &ControlArgs) -> Result<()> {
    let status = block_on(control::status(&a.control))?;
    if a.json {
        show::json(&status)
    } else {
        show::status(&status);
        Ok(())
    }
}

fn mitigations(a: &ControlArgs) -> Result<()> {
    let list = block_on(control::mitigations(&a.control))?;
    if a.json {
        show::json(&list)
    } else {
        show::mitigations(&list);
        Ok(())
    }
}

fn consent(a: &ConsentArgs, approve: bool) -> Result<()> {
    let (cuid, mid) = a.mitigation()?;
    let d = block_on(control::consent(&a.control, &cuid, mid, approve, a.peer))?;
    println!("{cuid}/{mid} {}", d.decided);
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
            let status = DataplaneStatus::read(&bpffs)?;
            if json {
                show::json(&status)
            } else {
                show::dataplane(&status);
                Ok(())
            }
        }
    }
}
