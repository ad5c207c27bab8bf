//! `cargo xtask package [--target TRIPLE]`: release Debian packages of
//! dots-agent and dots-client, built with cargo-deb from
//! `[package.metadata.deb]` in each crate's Cargo.toml, then checked with
//! lintian.
//!
//! The binaries are built with the `dist` profile of the workspace's
//! Cargo.toml (release, plus LTO, one codegen unit, size optimisation,
//! stripped, abort on panic: a home router's flash is small), into
//! `<target dir>/[TRIPLE/]dist/`; cargo-deb takes the `target/release/`
//! paths of the metadata from there (`--profile`).
//!
//! cargo-deb packs files that must exist first: this task builds the
//! binaries, then generates what the packages ship besides them (man pages,
//! bash/zsh/fish completions) by running the binaries' own `man` and
//! `completions` subcommands, into `<target dir>/[TRIPLE/]dist/package-assets/`,
//! where the Cargo.toml metadata expects them. A cross build cannot run its
//! binaries, so the host's build of the same sources generates them.
//!
//! Cross builds use Debian's cross compiler (`gcc-aarch64-linux-gnu`, which
//! setup installs) as linker and C compiler, and OpenSSL built from source
//! (the crates' `vendored-openssl` feature): no OpenSSL of the target
//! architecture is needed on the machine. The Rust standard library of the
//! target is added to the toolchain that builds (`rustup target add`) the
//! first time, here and not in setup, so a machine that never cross-builds
//! never downloads it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    cargo, run,
    setup::{self, output},
    step, workspace_root,
};

/// The packages: each is a workspace crate with one binary of the same name.
const PACKAGES: &[&str] = &["dots-agent", "dots-client"];

/// Shells whose completions the packages ship, with the file name and the
/// directory Debian's bash-completion, zsh and fish read them from (the
/// Cargo.toml metadata repeats the directories).
const SHELLS: &[(&str, &str)] = &[("bash", "{}"), ("zsh", "_{}"), ("fish", "{}.fish")];

/// Cross targets this task knows how to build for, with the prefix of
/// Debian's cross tools for it.
const CROSS: &[(&str, &str)] = &[("aarch64-unknown-linux-gnu", "aarch64-linux-gnu")];

/// The Cargo profile of the packaged binaries (and their directory under
/// the target directory).
pub(crate) const PROFILE: &str = "dist";

/// Builds both packages; returns their paths.
pub(crate) fn run_package(target: Option<&str>) -> Result<Vec<PathBuf>> {
    let start = Instant::now();
    setup::run()?;
    let cross = target.map(cross_tools).transpose()?;
    if let Some(triple) = target {
        rust_target(triple)?;
    }
    let meta = Metadata::read()?;
    for pkg in PACKAGES {
        meta.check_changelog(pkg)?;
    }

    // The host's binaries also generate the man pages of a cross build.
    step(&format!("building {PROFILE} binaries (host)"));
    release_build(None)?;
    if let (Some(triple), Some(prefix)) = (target, cross) {
        step(&format!("building {PROFILE} binaries ({triple})"));
        release_build(Some((triple, prefix)))?;
    }

    let host_release = meta.target_dir.join(PROFILE);
    let release = match target {
        Some(t) => meta.target_dir.join(t).join(PROFILE),
        None => host_release.clone(),
    };
    let mut debs = Vec::new();
    for pkg in PACKAGES {
        step(&format!("{pkg}: man pages and completions"));
        generate_assets(
            &host_release.join(pkg),
            &release.join("package-assets").join(pkg),
        )?;
        step(&format!("{pkg}: cargo-deb"));
        let deb = cargo_deb(pkg, target)?;
        lintian(&deb)?;
        debs.push(deb);
    }
    for deb in &debs {
        let size = fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
        step(&format!(
            "{} ({:.1} MiB)",
            deb.display(),
            size as f64 / (1024.0 * 1024.0)
        ));
    }
    step(&format!("packages built in {:.0?}", start.elapsed()));
    Ok(debs)
}

/// The prefix of Debian's cross tools for `triple`, checked to be installed.
pub(crate) fn cross_tools(triple: &str) -> Result<&'static str> {
    let Some(&(_, prefix)) = CROSS.iter().find(|(t, _)| *t == triple) else {
        let known: Vec<&str> = CROSS.iter().map(|(t, _)| *t).collect();
        bail!(
            "no cross build set up for {triple}; known targets: {}",
            known.join(", ")
        );
    };
    let gcc = format!("/usr/bin/{prefix}-gcc");
    if !Path::new(&gcc).exists() {
        bail!("{gcc} not found: `cargo xtask setup` installs gcc-{prefix}");
    }
    Ok(prefix)
}

/// Adds the target's standard library to the toolchain this workspace builds
/// with (the one `cargo` resolves to here, normally the user's stable), if
/// it is missing.
pub(crate) fn rust_target(triple: &str) -> Result<()> {
    let sysroot = output(cargo_rustc().args(["--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib/rustlib").join(triple);
    if lib.is_dir() {
        step(&format!("Rust target {triple}: present"));
        return Ok(());
    }
    let toolchain = output(
        Command::new("rustup")
            .args(["show", "active-toolchain"])
            .current_dir(workspace_root()),
    )?;
    let toolchain = toolchain
        .split_whitespace()
        .next()
        .context("rustup show active-toolchain printed nothing")?
        .to_owned();
    step(&format!(
        "Rust target {triple}: adding to {toolchain} (rustup target add)"
    ));
    run(Command::new("rustup").args(["target", "add", "--toolchain", &toolchain, triple]))
}

/// `rustc` as cargo runs it in this workspace.
fn cargo_rustc() -> Command {
    let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build --profile dist` of the packaged binaries, for the host
/// or, with `cross` = (triple, tool prefix), for another target.
pub(crate) fn release_build(cross: Option<(&str, &str)>) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--profile", PROFILE, "--bins"]);
    for pkg in PACKAGES {
        cmd.args(["-p", pkg]);
    }
    if let Some((triple, prefix)) = cross {
        let features: Vec<String> = PACKAGES
            .iter()
            .map(|p| format!("{p}/vendored-openssl"))
            .collect();
        cmd.args(["--features", &features.join(",")]);
        cross_env(&mut cmd, triple, prefix);
    }
    run(&mut cmd)
}

/// `--target triple` and Debian's cross tools (`prefix`-gcc, -ar) as
/// linker and C compiler for a cargo build.
///
/// gcc links with the toolchain's own lld (`rust-lld`, shipped with
/// rustc) when it is there: Debian 12's cross ld (binutils 2.40) ignores
/// `-z pack-relative-relocs` for arm64, and the unpacked relative
/// relocations of a position-independent binary cost about 0.75 MB of the
/// arm64 agent (measured: 8.62 MB with ld, 7.84 MB with lld).
pub(crate) fn cross_env(cmd: &mut Command, triple: &str, prefix: &str) {
    cmd.args(["--target", triple]);
    let var = triple.replace('-', "_");
    let upper = var.to_uppercase();
    cmd.env(
        format!("CARGO_TARGET_{upper}_LINKER"),
        format!("{prefix}-gcc"),
    )
    .env(format!("CC_{var}"), format!("{prefix}-gcc"))
    .env(format!("AR_{var}"), format!("{prefix}-ar"));
    match rust_lld_dir() {
        Some(dir) => {
            cmd.env(
                format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
                format!("-Clink-arg=-fuse-ld=lld -Clink-arg=-B{}", dir.display()),
            );
        }
        None => {
            step("no rust-lld in the toolchain: linking with the cross ld (larger arm64 binary)")
        }
    }
}

/// The directory of the toolchain's `ld.lld` wrapper around rust-lld
/// (`<sysroot>/lib/rustlib/<host>/bin/gcc-ld`), for `gcc -fuse-ld=lld -B`.
fn rust_lld_dir() -> Option<PathBuf> {
    let out = cargo_rustc().args(["--print", "sysroot"]).output().ok()?;
    let host = cargo_rustc()
        .args(["--print", "host-tuple"])
        .output()
        .ok()?;
    if !out.status.success() || !host.status.success() {
        return None;
    }
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let host = String::from_utf8(host.stdout).ok()?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin/gcc-ld");
    dir.join("ld.lld").is_file().then_some(dir)
}

/// Runs `bin man` and `bin completions SHELL` into `out` (emptied first, so
/// pages of removed subcommands do not linger).
fn generate_assets(bin: &Path, out: &Path) -> Result<()> {
    let name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .context("binary without a name")?;
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("emptying {}", out.display()))?;
    }
    let man = out.join("man");
    output(Command::new(bin).arg("man").arg(&man))?;
    // Debian ships man pages compressed (gzip -9n: reproducible, no name or
    // time stamp); cargo-deb compresses only files it did not find under
    // target/.
    let pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    if pages.is_empty() {
        bail!("{name} man wrote no page into {}", man.display());
    }
    run(Command::new("gzip").arg("-9nf").args(&pages))?;
    for (shell, file) in SHELLS {
        let dir = out.join("completions").join(shell);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = output(Command::new(bin).args(["completions", shell]))?;
        if text.trim().is_empty() {
            bail!("{name} completions {shell} printed nothing");
        }
        let path = dir.join(file.replace("{}", name));
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs cargo-deb on the binaries built above; returns the package's path.
fn cargo_deb(pkg: &str, target: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new(setup::cargo_deb_bin()?);
    cmd.current_dir(workspace_root())
        .args(["-p", pkg, "--no-build", "--strip", "--no-dbgsym"])
        .args(["--profile", PROFILE]);
    if let Some(triple) = target {
        cmd.args(["--target", triple]);
    }
    let out = output(&mut cmd)?;
    let deb = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb printed no package path: {out}"))?;
    Ok(workspace_root().join(deb))
}

/// lintian on `deb`: prints what it says, fails on errors (and when
/// lintian itself fails).
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("could not start lintian (`cargo xtask setup` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        eprintln!("    lintian: {line}");
    }
    let errors = text.lines().filter(|l| l.starts_with("E: ")).count();
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    if errors > 0 {
        bail!("lintian: {errors} error(s) in {name}");
    }
    if !out.status.success() {
        bail!(
            "lintian {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    step(&format!("lintian {name}: no errors"));
    Ok(())
}

/// What `cargo metadata` tells about the workspace.
struct Metadata {
    target_dir: PathBuf,
    version: String,
}

impl Metadata {
    fn read() -> Result<Metadata> {
        let text = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("cargo metadata")?;
        let target_dir = v["target_directory"]
            .as_str()
            .context("cargo metadata: no target_directory")?;
        let version = v["packages"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == PACKAGES[0]))
            .and_then(|p| p["version"].as_str())
            .context("cargo metadata: no version of dots-agent")?;
        Ok(Metadata {
            target_dir: target_dir.into(),
            version: version.to_owned(),
        })
    }

    /// The newest entry of the package's Debian changelog must name the
    /// version cargo-deb gives the package (`VERSION-1`), or the package
    /// would say one version in its control file and another in its
    /// changelog.
    fn check_changelog(&self, pkg: &str) -> Result<()> {
        let path = workspace_root()
            .join("packaging/debian")
            .join(pkg)
            .join("changelog");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let first = text.lines().next().unwrap_or_default();
        let want = format!("{pkg} ({}-1) ", self.version);
        if !first.starts_with(&want) {
            bail!(
                "{}: the first entry must start with `{want}`, found `{first}`: add an entry for this version",
                path.display()
            );
        }
        Ok(())
    }
}
