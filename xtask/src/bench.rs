//! `cargo xtask bench dataplane | nat | sessions | reaction | traffic | footprint | cluster`. Each runs a measuring
//! program of the `tests` crate (`bench-<name>`), built in release mode,
//! which writes `target/bench/<name>.json` and its part of
//! `docs/benchmarks.md`.

use anyhow::Result;

use crate::{cargo, package, step, workspace_root};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Which {
    /// XDP classifier per-packet cost (BPF_PROG_TEST_RUN) vs an empty program and xdp-filter.
    Dataplane,
    /// NAT correlation: request to resolved devices with 100,000 conntrack entries.
    Nat,
    /// One dots-client against 1,000 and 10,000 simulated agents (DTLS and TLS).
    Sessions,
    /// Reaction time end to end: PUT leaving dots-client to the first packet
    /// dropped, DELETE to the first packet passing, and PUT to 2.01.
    Reaction,
    /// The classifier under real frames (trafgen into a veth): its cost per
    /// frame from the kernel's BPF statistics.
    Traffic,
    /// The packaged agent (amd64 and arm64): stripped size, memory idle and
    /// loaded (256 mitigations, 100,000 prefixes, 16,384 NAT entries), idle CPU.
    Footprint,
    /// Three dots-client nodes sharing etcd, 1,000 agents: failover and API through a non-owner.
    Cluster,
}

pub(crate) fn run(which: Which) -> Result<()> {
    match which {
        Which::Dataplane => dataplane(),
        Which::Nat => nat(),
        Which::Sessions => sessions(),
        Which::Reaction => {
            // The lab runs the daemons next to the measuring program: the
            // release builds, as deployed.
            step("building dots-agent and dots-client (release)");
            let mut cmd = cargo();
            cmd.args([
                "build",
                "--release",
                "-p",
                "dots-agent",
                "-p",
                "dots-client",
                "--bins",
            ]);
            crate::run(&mut cmd)?;
            run_bench(
                "bench-reaction",
                "reaction.json",
                "benchmarking reaction time (lab, 2 x 50 requests, 255 other mitigations; a few minutes)",
            )
        }
        Which::Traffic => run_bench(
            "bench-traffic",
            "traffic.json",
            "benchmarking the classifier under trafgen frames (bpf_stats; a minute or two)",
        ),
        Which::Footprint => footprint(),
        Which::Cluster => cluster(),
    }
}

/// `cargo xtask bench footprint`: builds the packages' binaries (profile
/// `dist`) for amd64 and arm64 (cross), each also without the default
/// features (the small-router build, kept aside under
/// `target/bench/footprint/`), then measures them; writes
/// `target/bench/footprint.json` and the "## Footprint" section of
/// docs/benchmarks.md. The packaged amd64 build is the one run in the lab.
fn footprint() -> Result<()> {
    const ARM64: &str = "aarch64-unknown-linux-gnu";
    let root = workspace_root();
    let aside = root.join("target/bench/footprint");
    std::fs::create_dir_all(&aside)?;
    let mut extra = Vec::new();
    match package::cross_tools(ARM64) {
        Ok(prefix) => {
            package::rust_target(ARM64)?;
            let built = root.join("target").join(ARM64).join(package::PROFILE);
            step("building the small-router agent (arm64, no default features)");
            small_build(Some((ARM64, prefix)))?;
            let cpe = aside.join("dots-agent-arm64-small");
            std::fs::copy(built.join("dots-agent"), &cpe)?;
            step("building the packaged binaries (arm64)");
            package::release_build(Some((ARM64, prefix)))?;
            let full = aside.join("dots-agent-arm64");
            std::fs::copy(built.join("dots-agent"), &full)?;
            extra.extend([
                "--arm64-agent".to_string(),
                full.display().to_string(),
                "--arm64-small".to_string(),
                cpe.display().to_string(),
            ]);
        }
        Err(e) => step(&format!("no arm64 build: {e:#}")),
    }
    let bins = root.join("target").join(package::PROFILE);
    step("building the small-router agent (amd64, no default features)");
    small_build(None)?;
    let cpe = aside.join("dots-agent-amd64-small");
    std::fs::copy(bins.join("dots-agent"), &cpe)?;
    extra.extend(["--amd64-small".to_string(), cpe.display().to_string()]);
    // Last, so that target/dist holds the packaged binaries the lab runs.
    step("building the packaged binaries (amd64)");
    package::release_build(None)?;
    run_bench_with(
        "bench-footprint",
        "footprint.json",
        "measuring the packaged agent (lab, 2 runs of a few minutes, arm64 under qemu)",
        &extra,
        &[("DOTS_BIN_DIR", bins.display().to_string())],
    )
}

/// The agent of profile `dist` without its default features (no DNS
/// discovery, no metrics endpoint), for the host or `(triple, tool prefix)`.
fn small_build(cross: Option<(&str, &str)>) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--profile", package::PROFILE, "-p", "dots-agent"]);
    cmd.args(["--bin", "dots-agent", "--no-default-features"]);
    if let Some((triple, prefix)) = cross {
        package::cross_env(&mut cmd, triple, prefix);
        cmd.args(["--features", "vendored-openssl"]);
    }
    crate::run(&mut cmd)
}

fn dataplane() -> Result<()> {
    run_bench(
        "bench-dataplane",
        "dataplane.json",
        "benchmarking the data plane (BPF_PROG_TEST_RUN; a few minutes)",
    )
}

/// `cargo xtask bench nat`: fills a lab router's conntrack table with
/// 100,000 NATed flows and times request -> resolved devices; writes
/// `target/bench/nat.json` and the "## NAT" section of docs/benchmarks.md.
fn nat() -> Result<()> {
    run_bench(
        "bench-nat",
        "nat.json",
        "benchmarking NAT correlation (100,000 conntrack entries; about a minute)",
    )
}

/// `cargo xtask bench sessions`: simulated agents (real handshakes and
/// heartbeats) against one release `dots-client`; writes
/// `target/bench/sessions.json` and the "## Sessions" section of
/// docs/benchmarks.md.
fn sessions() -> Result<()> {
    release_client()?;
    run_bench(
        "bench-sessions",
        "sessions.json",
        "benchmarking sessions (1,000 and 10,000 agents, DTLS and TLS; about 15 minutes)",
    )
}

/// `cargo xtask bench cluster`: three release `dots-client` nodes sharing
/// one etcd, 1,000 simulated agents; kills the busiest node and times the
/// failover; writes `target/bench/cluster.json` and the "## Cluster"
/// section of docs/benchmarks.md.
fn cluster() -> Result<()> {
    release_client()?;
    run_bench(
        "bench-cluster",
        "cluster.json",
        "benchmarking the cluster (3 nodes, etcd, 1,000 agents; a few minutes)",
    )
}

/// Builds the release dots-client that the sessions and cluster benches run.
fn release_client() -> Result<()> {
    step("building the release dots-client the benchmark runs");
    let mut build = cargo();
    build.args(["build", "--release", "-p", "dots-client"]);
    crate::run(&mut build)
}

/// Runs a measuring program of the tests crate in release mode; it writes
/// `target/bench/<json>` and its section of docs/benchmarks.md.
fn run_bench(bin: &str, json: &str, what: &str) -> Result<()> {
    run_bench_with(bin, json, what, &[], &[])
}

/// [`run_bench`] with more arguments and environment variables.
fn run_bench_with(
    bin: &str,
    json: &str,
    what: &str,
    args: &[String],
    env: &[(&str, String)],
) -> Result<()> {
    let root = workspace_root();
    let json = root.join("target/bench").join(json);
    let doc = root.join("docs/benchmarks.md");
    step(what);
    let mut cmd = cargo();
    cmd.args(["run", "--release", "-p", "tests", "--bin", bin, "--"]);
    cmd.arg("--json").arg(&json).arg("--doc").arg(&doc);
    cmd.args(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // Extra arguments for the measuring program, e.g. "--runs 11".
    if let Ok(extra) = std::env::var("DOTS_BENCH_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    crate::run(&mut cmd)?;
    step(&format!("wrote {} and {}", json.display(), doc.display()));
    Ok(())
}
