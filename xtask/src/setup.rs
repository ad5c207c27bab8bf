//! `cargo xtask setup`: idempotent installation of the build and test
//! requirements on a Debian machine. Each step checks before it acts, so a
//! second run only checks.
//!
//! The eBPF toolchain and the build tools are pinned in `ebpf-toolchain.toml`
//! (see `toolchain.rs`). The user's own toolchains are never touched: the
//! nightly is installed under its dated name, bpf-linker and cargo-deb under
//! the project cache (`~/.cache/dots-agent/`), not into `~/.cargo/bin`.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    run as run_cmd, step,
    toolchain::{Pins, PIN_FILE},
    workspace_root,
};

/// Debian packages the tests, demo, benchmarks and packaging use.
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
    "netsniff-ng",
    "tshark",
    "lintian",
    "qemu-user-static",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "etcd-server",
    "protobuf-compiler",
    "fastnetmon",
    "curl",
    "jq",
    "man-db",
];

pub(crate) fn run() -> Result<()> {
    let start = Instant::now();
    let pins = pins()?;
    timed(|| ebpf_toolchain(&pins))?;
    timed(|| bpf_linker(&pins))?;
    timed(|| cargo_deb(&pins))?;
    timed(debian_packages)?;
    bpffs()?;
    step(&format!("setup complete in {:.0?}", start.elapsed()));
    Ok(())
}

/// Runs one step and, when it did more than check, says how long it took.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    f()?;
    let took = start.elapsed();
    if took > Duration::from_secs(2) {
        step(&format!("  done in {took:.0?}"));
    }
    Ok(())
}

/// The pinned versions and the cache paths (see `ebpf-toolchain.toml`).
pub(crate) fn pins() -> Result<Pins> {
    Pins::read(&workspace_root().join(PIN_FILE)).map_err(anyhow::Error::msg)
}

/// Our cargo-deb, as `cargo xtask setup` installs it.
pub(crate) fn cargo_deb_bin() -> Result<PathBuf> {
    Ok(pins()?.cargo_deb_bin())
}

/// Runs `cmd` and returns its stdout; fails with its stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pinned nightly with rust-src, installed under its dated name, so the
/// user's `nightly`, `stable` and default toolchains stay as they are.
fn ebpf_toolchain(pins: &Pins) -> Result<()> {
    let tc = pins.toolchain.as_str();
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let installed = list.lines().any(|l| {
        let name = l.split_whitespace().next().unwrap_or_default();
        name == tc
            || name
                .strip_prefix(tc)
                .is_some_and(|rest| rest.starts_with('-'))
    });
    if !installed {
        step(&format!(
            "toolchain {tc}: installing (minimal, with rust-src)"
        ));
        return run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            tc,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        tc,
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!("toolchain {tc} with rust-src: present"));
        return Ok(());
    }
    step(&format!("toolchain {tc}: adding rust-src"));
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", tc]))
}

/// bpf-linker, built against the pinned toolchain's libLLVM and installed
/// under the project cache (never ~/.cargo/bin): dots-agent/build.rs finds it
/// there.
fn bpf_linker(pins: &Pins) -> Result<()> {
    let version = pins.bpf_linker.as_str();
    let (prefix, major) = llvm_prefix(pins)?;
    let bin = pins.bpf_linker_bin();
    // `--version` also proves that it still loads the toolchain's libLLVM.
    if bin.exists() {
        if let Ok(v) = output(Command::new(&bin).arg("--version")) {
            if v.split_whitespace().any(|w| w == version) {
                step(&format!(
                    "bpf-linker {version}: present ({})",
                    bin.display()
                ));
                return Ok(());
            }
        }
    }
    step(&format!(
        "bpf-linker {version}: building with {} against its LLVM {major} (LLVM_PREFIX={}) into {}; about a minute on two cores",
        pins.toolchain,
        prefix.display(),
        pins.bpf_linker_root().display()
    ));
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &pins.toolchain, "cargo", "install", "bpf-linker"])
        .args(["--version", version, "--locked"])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(pins.bpf_linker_root())
        .env("LLVM_PREFIX", &prefix);
    if bin.exists() {
        // Only ever over our own copy, which failed the check above.
        cmd.arg("--force");
    }
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    run_cmd(&mut cmd)
}

/// A directory whose lib/ links to the pinned toolchain's libLLVM, both as
/// `libLLVM.so` and under the file's own name, which is what bpf-linker's
/// build expects to find. Returns it with LLVM's major version, taken from
/// the file name (`libLLVM.so.<major>.<minor>-rust-*`).
fn llvm_prefix(pins: &Pins) -> Result<(PathBuf, u32)> {
    let sysroot = output(Command::new("rustup").args([
        "run",
        &pins.toolchain,
        "rustc",
        "--print",
        "sysroot",
    ]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let (llvm, major) = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find_map(|name| {
            let (ver, _) = name.strip_prefix("libLLVM.so.")?.split_once("-rust-")?;
            let major = ver.split('.').next()?.parse::<u32>().ok()?;
            Some((name, major))
        })
        .with_context(|| format!("no libLLVM.so.<major>.<minor>-rust-* in {}", lib.display()))?;
    let prefix = pins.llvm_prefix();
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = lib.join(&llvm);
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = dir.join(name);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok((prefix, major))
}

/// cargo-deb, pinned, installed under the project cache (never
/// ~/.cargo/bin); see [`cargo_deb_bin`].
fn cargo_deb(pins: &Pins) -> Result<()> {
    let version = pins.cargo_deb.as_str();
    let bin = pins.cargo_deb_bin();
    if bin.exists() {
        if let Ok(v) = output(Command::new(&bin).arg("--version")) {
            if v.split_whitespace().any(|w| w == version) {
                step(&format!("cargo-deb {version}: present ({})", bin.display()));
                return Ok(());
            }
        }
    }
    step(&format!(
        "cargo-deb {version}: building into {}; about a minute on two cores",
        pins.cargo_deb_root().display()
    ));
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "cargo-deb", "--version", version, "--locked"])
        .arg("--root")
        .arg(pins.cargo_deb_root());
    if bin.exists() {
        cmd.arg("--force");
    }
    run_cmd(&mut cmd)
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
