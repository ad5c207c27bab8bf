//! `cargo xtask`: the project's own commands.
//!
//! * `setup`: install, idempotently, everything builds and tests need.
//! * `build`: build everything, including the XDP object.
//! * `test`: setup, build, then unit and integration tests.
//! * `demo`: the whole story in a lab of network namespaces.
//! * `bench dataplane|nat|sessions|reaction|traffic|footprint`: the XDP
//!   classifier's per-packet cost, NAT resolution time, agents one
//!   dots-client holds, reaction time, cost under real frames, and the
//!   packaged agent's size, memory and CPU.
//! * `package [--target TRIPLE]`: Debian packages of both daemons.

mod bench;
mod package;
mod setup;
mod toolchain;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks of dots-agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need: the pinned eBPF toolchain, bpf-linker and cargo-deb
    /// (see ebpf-toolchain.toml), Debian packages, bpffs.
    Setup,
    /// Build the workspace and the XDP object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run setup, build everything, then all unit and integration tests.
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The two-minute lab: a LAN host behind a NAT router floods a target,
    /// the ISP asks the router's dots-agent to mitigate, the flood is dropped
    /// in XDP, then withdrawn. Exits non-zero if any effect is missing.
    Demo {
        /// No human step: FastNetMon on the ISP side detects the flood and
        /// its notify script asks dots-client's API; its unban withdraws.
        #[arg(long)]
        detector: bool,
    },
    /// Run a benchmark and write its results under docs/ and target/bench/.
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
    },
    /// Build release Debian packages of dots-agent and dots-client (binary,
    /// systemd unit, man pages, completions, example configuration, docs)
    /// into target/debian/ (NAME_VERSION-1_ARCH.deb), and
    /// check them with lintian.
    Package {
        /// Cross-build for this target; only aarch64-unknown-linux-gnu is set
        /// up (Debian's gcc-aarch64-linux-gnu, OpenSSL built from source).
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => build(release),
        Cmd::Test { args } => {
            setup::run()?;
            build(false)?;
            step("running unit and integration tests");
            let mut cmd = cargo();
            // Network-namespace tests share the kernel: one test thread keeps
            // them from fighting over interfaces and CPU on a small machine.
            cmd.args([
                "test",
                "--workspace",
                "--exclude",
                "dots-ebpf",
                // The namespace tests: root, bpffs and the tools setup installed.
                "--features",
                "tests/lab",
                "--",
                "--test-threads=1",
            ]);
            cmd.args(&args);
            run_tests(&mut cmd)
        }
        Cmd::Demo { detector } => {
            setup::run()?;
            build(false)?;
            step("running the demo (network namespaces; about a minute)");
            let mut cmd = cargo();
            cmd.args(["run", "--quiet", "-p", "tests", "--bin", "demo"]);
            if detector {
                cmd.args(["--", "--detector"]);
            }
            run(&mut cmd)
        }
        Cmd::Bench { which } => {
            setup::run()?;
            bench::run(which)
        }
        Cmd::Package { target } => package::run_package(target.as_deref()).map(|_| ()),
    }
}

fn build(release: bool) -> Result<()> {
    step("building the workspace and the XDP object");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--workspace",
        "--exclude",
        "dots-ebpf",
        "--all-targets",
        "--features",
        "tests/lab",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Runs `cargo test`, echoing its output, and closes with one summary line
/// over all test binaries ("N passed, N failed"), so a reader (or CI) sees the
/// total rather than the last binary's count.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split([';', '.']) {
                    let mut words = part.split_whitespace();
                    if let (Some(n), Some(kind)) = (words.next(), words.next()) {
                        let n: u64 = n.parse().unwrap_or(0);
                        match kind {
                            "passed" => passed += n,
                            "failed" => failed += n,
                            "ignored" => ignored += n,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    // Our bpf-linker lives in the project cache (see ebpf-toolchain.toml).
    // dots-agent/build.rs finds it there by itself; putting it first on PATH
    // too keeps anything else that looks for `bpf-linker` on the same one.
    if let Ok(pins) = setup::pins() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![pins.bpf_linker_bin_dir()];
        paths.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    cmd
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into())
}

pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
