//! `dots-agent`: the router side of DOTS signal channel Call Home (RFC 9066).
//!
//! Parses the command line ([`args`]), runs the library for it, and prints
//! the result ([`show`]).

mod args;
mod show;

use std::{future::Future, path::PathBuf};

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command, ConsentArgs, ControlArgs, DataplaneCommand};
use dots_agent::{
    agent::{self, control, view::DataplaneStatus},
    config::{AgentConfig, RunFlags},
    discovery,
    enforce::{Dataplane, DataplaneOptions},
};
use dots_daemon::logging::{self, LogFormat};

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
        Command::Run(flags) => run(&flags, cli.log_format),
        Command::CheckConfig { config } => {
            let opts = AgentConfig::check_file(&config)?;
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
        Command::Detach { bpffs } => {
            let removed = Dataplane::teardown(&bpffs)?;
            tracing::info!(bpffs = %bpffs.display(), removed, "data plane removed");
            Ok(())
        }
        Command::Dataplane(cmd) => dataplane(cmd),
        Command::Discover(a) => discovery::cli::run_discover(&a),
        Command::DhcpHook(a) => discovery::cli::run_dhcp_hook(&a),
    }
}

/// `dots-agent run`.
fn run(flags: &RunFlags, log_format: Option<LogFormat>) -> Result<()> {
    let config = flags.load(log_format)?;
    logging::init(config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let opts = agent::startup::options(config, &flags.discovery).await?;
        agent::run(opts).await
    })
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
