//! `dots-client`: the ISP side of DOTS signal channel Call Home (RFC 9066).
//!
//! Parses the command line ([`args`]), runs the library for it, and prints
//! the result ([`show`]).

mod args;
mod show;

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::Parser;

use args::{CborCommand, Cli, Command, Common};
use dots_client::{
    config::ListenFlags,
    control::{self, Reply, Request},
    listener, request, wire,
};
use dots_daemon::{
    logging,
    pki::{self, San},
};

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
            let bytes = wire::encode(&json)?;
            let mut out = std::io::stdout().lock();
            if hex {
                writeln!(out, "{}", wire::to_hex(&bytes))?;
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
            let bytes = if hex { wire::from_hex(&raw)? } else { raw };
            let json = wire::decode(&bytes)?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Pki {
            out,
            client_names,
            agents,
            days,
        } => {
            let sans: Vec<San> = client_names.iter().map(|n| San::parse(n)).collect();
            show::pki(&pki::create_lab_pki(&out, &sans, &agents, days)?);
            Ok(())
        }
        Command::Listen(flags) => listen(&flags),
        Command::Completions { shell } => {
            dots_daemon::cli_docs::completions::<Cli>(shell, "dots-client");
            Ok(())
        }
        Command::Man { dir } => dots_daemon::cli_docs::man_pages::<Cli>(&dir),
        Command::Agents(c) => ask(&c, Request::Agents),
        Command::Mitigate(a) => {
            let scope = match &a.json_file {
                Some(path) => request::mitigation_from_file(path)?,
                None => a.mitigation().body()?,
            };
            let req = Request::Mitigate {
                agent: a.common.agent.clone(),
                scope,
                mid: a.mid,
                label: a.label.clone(),
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
        Command::Mitigations(c) => ask(
            &c,
            Request::Mitigations {
                agent: c.agent.clone(),
            },
        ),
        Command::Reload(c) => ask(&c, Request::Reload),
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
            let redirect = request::redirect(alt, records, ttl)?;
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

/// `dots-client listen`.
fn listen(flags: &ListenFlags) -> Result<()> {
    let c = flags.load()?;
    logging::init(c.log_format());
    c.check_files()?;
    let mut opts = c.to_options()?;
    opts.reload = Some(flags.reloader());
    runtime()?.block_on(listener::listen(opts))
}

/// Sends one control request and prints the replies.
fn ask(c: &Common, req: Request) -> Result<()> {
    let mut failed = None;
    runtime()?.block_on(control::call(&c.control, &req, |r: Reply| {
        show::reply(&r, c.raw);
        if let Some(why) = r.failure() {
            failed = Some(why);
        }
        true
    }))?;
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}
