//! `dots-client`: the ISP side of DOTS signal channel Call Home (RFC 9066).

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dots_agent::pki::{self, San};
use dots_proto::cbor;

/// Call Home DOTS client: the ISP-side peer that agents dial, and tools
/// around the DOTS signal channel's wire format.
///
/// Available now: `cbor`, converting between the JSON form of DOTS messages
/// (the names of the RFC figures) and the CBOR wire form. Listening for agents
/// and requesting mitigations are being built.
#[derive(Parser)]
#[command(version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    }
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
