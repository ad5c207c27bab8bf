//! Builds the XDP program (`dots-ebpf`) with the pinned nightly toolchain and
//! our bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Both are pinned in `ebpf-toolchain.toml` and installed by
//! `cargo xtask setup`, which puts bpf-linker under the project cache; the
//! paths come from the same module xtask uses, so no PATH setting is needed.
use std::{env, path::Path, process::Command};

use anyhow::{anyhow, bail, Context as _};
use aya_build::{Package, Toolchain};

#[path = "../xtask/src/toolchain.rs"]
mod toolchain;

const SETUP: &str = "run `cargo xtask setup`, which installs it";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata {
        packages,
        workspace_root,
        ..
    } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "dots-ebpf")
        .ok_or_else(|| anyhow!("dots-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("dots-ebpf manifest has no parent directory"))?;

    let pin_file = workspace_root.join(toolchain::PIN_FILE);
    println!("cargo:rerun-if-changed={pin_file}");
    for var in toolchain::CACHE_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let pins = toolchain::Pins::read(pin_file.as_std_path()).map_err(anyhow::Error::msg)?;

    // AYA_BUILD_SKIP=1 builds without the XDP object (aya-build says so);
    // then nothing below is needed.
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip {
        check_toolchain(&pins.toolchain)?;
        let linker = pins.bpf_linker_bin();
        if !linker.is_file() {
            bail!(
                "bpf-linker {} for {} not found at {}: {SETUP}",
                pins.bpf_linker,
                pins.toolchain,
                linker.display()
            );
        }
        println!("cargo:rerun-if-changed={}", linker.display());
        // aya-build runs `rustup run <toolchain> cargo build` for the eBPF
        // crate, which inherits this environment: name our linker for the BPF
        // targets, and put it first on PATH for anything that looks it up there
        // (dots-ebpf/build.rs does, to rebuild when it changes). This build
        // script is single-threaded at this point.
        for target in ["BPFEL", "BPFEB"] {
            env::set_var(
                format!("CARGO_TARGET_{target}_UNKNOWN_NONE_LINKER"),
                &linker,
            );
        }
        let path = env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(pins.bpf_linker_bin_dir()).chain(env::split_paths(&path));
        env::set_var("PATH", env::join_paths(paths).context("joining PATH")?);
    }

    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&pins.toolchain),
    )
}

/// Fails with a message naming `cargo xtask setup` when the pinned toolchain
/// or its rust-src component is missing. (`rustup run` does not install.)
fn check_toolchain(toolchain: &str) -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .with_context(|| format!("running rustup (the eBPF build needs it): {SETUP}"))?;
    if !out.status.success() {
        bail!(
            "the eBPF toolchain {toolchain} is not installed ({}): {SETUP}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sysroot = String::from_utf8_lossy(&out.stdout);
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        bail!("the eBPF toolchain {toolchain} has no rust-src component: {SETUP}");
    }
    Ok(())
}
