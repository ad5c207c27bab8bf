//! The pinned eBPF toolchain and where the project keeps its own build tools.
//!
//! The versions live in one file, `ebpf-toolchain.toml` at the repository
//! root; this module reads it and turns it into paths. It is compiled twice:
//! as a module of xtask (`cargo xtask setup` installs the tools there) and,
//! through `#[path]`, as a module of `dots-agent/build.rs` (which builds the
//! XDP program with them), so the set-up and the build cannot disagree on
//! where bpf-linker is. It therefore uses the standard library only, and each
//! of the two users needs only part of it.
#![allow(dead_code)]

use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// The pin file, relative to the workspace root.
pub(crate) const PIN_FILE: &str = "ebpf-toolchain.toml";

/// Environment variables that decide the cache directory (a build script
/// reruns when they change).
pub(crate) const CACHE_ENV: &[&str] = &["XDG_CACHE_HOME", "HOME"];

/// The contents of the pin file, and the cache directory the tools go in.
pub(crate) struct Pins {
    /// rustup toolchain of the eBPF build, e.g. `nightly-2026-05-20`.
    pub(crate) toolchain: String,
    /// bpf-linker version.
    pub(crate) bpf_linker: String,
    /// cargo-deb version.
    pub(crate) cargo_deb: String,
    /// `$XDG_CACHE_HOME/dots-agent`, or `$HOME/.cache/dots-agent`.
    pub(crate) cache: PathBuf,
}

impl Pins {
    /// Reads the pin file. Its format is flat `key = "value"` lines, a
    /// subset of TOML; `#` starts a comment.
    pub(crate) fn read(pin_file: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(pin_file)
            .map_err(|e| format!("reading {}: {e}", pin_file.display()))?;
        let (mut toolchain, mut bpf_linker, mut cargo_deb) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || format!("{}:{}: expected key = \"value\"", pin_file.display(), n + 1);
            let (key, value) = line.split_once('=').ok_or_else(bad)?;
            let value = value.trim().strip_prefix('"').ok_or_else(bad)?;
            let value = &value[..value.find('"').ok_or_else(bad)?];
            // Values become parts of file names.
            if value.is_empty() || value.contains(['/', '\\']) || value.starts_with('.') {
                return Err(bad());
            }
            let slot = match key.trim() {
                "toolchain" => &mut toolchain,
                "bpf-linker" => &mut bpf_linker,
                "cargo-deb" => &mut cargo_deb,
                other => {
                    return Err(format!(
                        "{}:{}: unknown key {other}",
                        pin_file.display(),
                        n + 1
                    ))
                }
            };
            *slot = Some(value.to_owned());
        }
        let need = |v: Option<String>, key: &str| {
            v.ok_or_else(|| format!("{}: no {key} = \"...\"", pin_file.display()))
        };
        Ok(Self {
            toolchain: need(toolchain, "toolchain")?,
            bpf_linker: need(bpf_linker, "bpf-linker")?,
            cargo_deb: need(cargo_deb, "cargo-deb")?,
            cache: cache_dir()?,
        })
    }

    /// `cargo install --root` of bpf-linker: one per version and toolchain,
    /// since the binary links that toolchain's libLLVM.
    pub(crate) fn bpf_linker_root(&self) -> PathBuf {
        self.cache
            .join(format!("bpf-linker-{}-{}", self.bpf_linker, self.toolchain))
    }

    /// The directory holding our bpf-linker.
    pub(crate) fn bpf_linker_bin_dir(&self) -> PathBuf {
        self.bpf_linker_root().join("bin")
    }

    /// Our bpf-linker.
    pub(crate) fn bpf_linker_bin(&self) -> PathBuf {
        self.bpf_linker_bin_dir().join("bpf-linker")
    }

    /// The `LLVM_PREFIX` bpf-linker is built with: its `lib/` links to the
    /// toolchain's libLLVM, and bpf-linker's rpath points there.
    pub(crate) fn llvm_prefix(&self) -> PathBuf {
        self.cache.join(format!("llvm-{}", self.toolchain))
    }

    /// `cargo install --root` of cargo-deb.
    pub(crate) fn cargo_deb_root(&self) -> PathBuf {
        self.cache.join(format!("cargo-deb-{}", self.cargo_deb))
    }

    /// Our cargo-deb.
    pub(crate) fn cargo_deb_bin(&self) -> PathBuf {
        self.cargo_deb_root().join("bin/cargo-deb")
    }
}

/// `$XDG_CACHE_HOME/dots-agent` when that is an absolute path (as the XDG
/// spec asks), else `$HOME/.cache/dots-agent`.
pub(crate) fn cache_dir() -> Result<PathBuf, String> {
    let base = match env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        Some(xdg) if xdg.is_absolute() => xdg,
        _ => env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
            .ok_or("neither XDG_CACHE_HOME nor HOME is set")?,
    };
    Ok(base.join("dots-agent"))
}
