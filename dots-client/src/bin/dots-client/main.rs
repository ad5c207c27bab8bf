//! `dots-client`: the ISP side of DOTS signal channel Call Home (RFC 9066).
//!
//! Parses the command line ([`args`]), runs the library for it, and prints
//! the result ([`show`]).

mod args;
mod show;

use std::io::{Read, Write};

use anyhow::{Context, Result};

use args::{CborCommand, Cli, Command, Common, PkiArgs, PkiCommand};
use dots_client::{
    config::{ClientConfig, ListenFlags},
    control::{self, Reply, Request},
    listener, request, wire,
};
use dots_daemon::{
    exit::{self, ConfigProblem},
    logging,
    pki::{agent_stem, PkiDir, PkiError, San, CLIENT_STEM},
};

fn main() {
    if let Err(e) = run(exit::parse_args::<Cli>()) {
        exit::fail("dots-client", &e);
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
        Command::Pki(p) => pki(p),
        Command::CheckConfig { config } => {
            logging::init(Default::default());
            let c = ClientConfig::load(&config)?;
            for w in c.check()? {
                tracing::warn!("{w}");
            }
            let o = c.to_options()?;
            show::check_config(&config, &o);
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
        Command::Drain { common, max, ttl } => ask(&common, Request::Drain { max, ttl }),
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

/// `dots-client pki` and `pki add-agent`: issue from the CA in the
/// directory (made on first use), never overwriting without --force.
fn pki(p: PkiArgs) -> Result<()> {
    let exists = |e: PkiError| match e {
        PkiError::Exists { path } => anyhow::Error::new(ConfigProblem(format!(
            "{} exists: nothing written (--force replaces certificate files; \
             `pki add-agent NAME` issues one more agent)",
            path.display()
        ))),
        e @ (PkiError::NoCa { .. } | PkiError::CaExpired { .. } | PkiError::Validity(_)) => {
            anyhow::Error::new(ConfigProblem(e.to_string()))
        }
        e => e.into(),
    };
    match p.command {
        Some(PkiCommand::AddAgent { name, out, issue }) => {
            let dir = PkiDir::open(&out).map_err(exists)?;
            let (cert, key) = dir
                .issue_agent(&name, issue.days, issue.force)
                .map_err(exists)?;
            println!("agent {name}: {} {}", cert.display(), key.display());
            Ok(())
        }
        None => {
            let out = p.out.context("--out is required")?;
            let sans: Vec<San> = p.client_names.iter().map(|n| San::parse(n)).collect();
            let (dir, created) = PkiDir::open_or_create(&out, p.issue.days).map_err(exists)?;
            let mut stems = vec![CLIENT_STEM.to_string()];
            stems.extend(p.agents.iter().map(|a| agent_stem(a)));
            dir.check_free(&stems, p.issue.force).map_err(exists)?;
            println!(
                "CA:      {} ({})",
                dir.ca_path().display(),
                if created { "new" } else { "reused" }
            );
            let (cert, key) = dir.issue_client(&sans, p.issue.days, p.issue.force)?;
            println!("client:  {} {}", cert.display(), key.display());
            for a in &p.agents {
                let (cert, key) = dir.issue_agent(a, p.issue.days, p.issue.force)?;
                println!("agent {a}: {} {}", cert.display(), key.display());
            }
            Ok(())
        }
    }
}

/// `dots-client listen`.
fn listen(flags: &ListenFlags) -> Result<()> {
    let c = flags.load()?;
    logging::init(c.log_format());
    for w in c.check()? {
        tracing::warn!("{w}");
    }
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
