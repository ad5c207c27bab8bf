//! `cargo xtask setup`: idempotent installation of the build and test
//! requirements on a Debian machine. Each step checks before it acts, so a
//! second run only checks.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{run as run_cmd, step};

/// Debian packages the tests, demo and benchmarks use.
const PACKAGES: &[&str] = &[
    "bpftool",
    "xdp-tools",
    "iproute2",
    "nftables",
    "conntrack",
    "socat",
    "dnsmasq-base",
    "busybox",
    "libcoap3-bin",
    "hping3",
    "openssl",
    "libssl-dev",
    "pkg-config",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()?;
    step("setup complete");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("nightly rust-src: installing");
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn bpf_linker() -> Result<()> {
    let bin = home().join(".cargo/bin/bpf-linker");
    if bin.exists() {
        if let Ok(v) = output(Command::new(&bin).arg("--version")) {
            if v.contains(BPF_LINKER_VERSION) {
                step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
                return Ok(());
            }
        }
    }
    let prefix = llvm_prefix()?;
    step(&format!(
        "bpf-linker: building against the nightly toolchain's LLVM (LLVM_PREFIX={}); this takes a few minutes",
        prefix.display()
    ));
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// A directory whose lib/ links to the nightly toolchain's libLLVM, both as
/// `libLLVM.so` and under the file's own name, which is what bpf-linker's
/// build expects to find.
fn llvm_prefix() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.22.1-rust-"))
        .with_context(|| format!("no libLLVM.so.22.1-rust-* in {}", lib.display()))?;
    let prefix = home().join(".cache/dots-agent/llvm");
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = dir.join(name);
        let target = lib.join(&llvm);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(prefix)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        step("Debian packages: present");
        return Ok(());
    }
    step(&format!(
        "Debian packages: installing {}",
        missing.join(" ")
    ));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        step("bpffs at /sys/fs/bpf: mounted");
        return Ok(());
    }
    step("bpffs at /sys/fs/bpf: mounting");
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
