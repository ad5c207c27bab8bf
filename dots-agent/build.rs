//! Builds the XDP program (`dots-ebpf`) with the pinned nightly toolchain and
//! our bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Both are pinned in `ebpf-toolchain.toml` and installed by
//! `cargo xtask setup`, which puts bpf-linker under the project cache; the
//! paths come from the same module xtask uses, so no PATH setting is needed.
use std::{env, path::Path, process::Command};

use anyhow::{anyhow, bail, Context as _};
use aya_build::{Package, Toolchain};
use object::build::elf::SectionData;

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

    // Relative relocations packed (DT_RELR, glibc 2.36 and binutils 2.38 or
    // newer): the position-independent binary keeps its address
    // randomisation, and its relocation table shrinks from about 180 kB to
    // a few kB, which counts on a router's flash.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

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
    )?;
    if !skip {
        let out_dir = env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        strip_debug_info(&Path::new(&out_dir).join(ebpf.name.as_str()))?;
    }
    Ok(())
}

/// Removes the DWARF sections (`.debug_*` and their relocations) from the
/// XDP object the agent embeds. bpf-linker needs DWARF to write the BTF
/// (`.BTF`, `.BTF.ext`), which the loader and the verifier use; nothing
/// reads the DWARF itself, and it is about five sixths of the object
/// (372 kB of which 63 kB remain), all of it in the agent's binary.
fn strip_debug_info(path: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut elf = object::build::elf::Builder::read(&*data)
        .with_context(|| format!("parsing {} as ELF", path.display()))?;
    for section in elf.sections.iter_mut() {
        let name = String::from_utf8_lossy(&section.name);
        if name.starts_with(".debug") || name.starts_with(".rel.debug") {
            section.delete = true;
        }
    }
    elf.delete_orphans();
    // LLVM writes section names into the symbol string table (`.strtab`);
    // the writer needs a table of their own.
    let has_section_names = elf
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString));
    if !has_section_names {
        let names = elf.sections.add();
        names.name = b".shstrtab".as_slice().into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = SectionData::SectionString;
    }
    let mut stripped = Vec::new();
    elf.write(&mut stripped)
        .with_context(|| format!("writing {} without DWARF", path.display()))?;
    std::fs::write(path, stripped).with_context(|| format!("writing {}", path.display()))
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
