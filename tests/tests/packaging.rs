//! The Debian packages as an administrator gets them. `cargo xtask package`
//! builds them (incrementally: when `.ci/run` or a developer already ran it,
//! only cargo-deb and lintian run again, so the packages tested are always
//! those of the current sources); the test unpacks them with `dpkg-deb` and
//! checks what a first installation relies on: the files are where Debian
//! and the unit expect them, the packaged binaries run, the packaged example
//! configuration checks out once certificates are in place (and not while
//! one is missing), the man pages render, the units pass `systemd-analyze
//! verify` and stay within their `systemd-analyze security` bounds.
//!
//! The arm64 test cross-builds both packages and runs the packaged binaries
//! under qemu-user-static (Debian's qemu-user-static, libc from
//! libc6-dev-arm64-cross).
//!
//! dpkg installs, removes and purges the amd64 packages in a throw-away
//! overlay of this system. Not covered: starting the units (there is no
//! systemd in the test sandbox).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use dots_daemon::pki::{self, San};
use tests::{procs::TempDir, Netns};

/// The workspace version, which the packages carry (`VERSION-1`).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Bounds of `systemd-analyze security --offline=yes` (lower is better).
/// The agent needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and netlink.
const AGENT_EXPOSURE_MAX: f64 = 4.5;
const CLIENT_EXPOSURE_MAX: f64 = 2.5;

const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// One package: its name, the stem of its files under /etc/NAME/
/// (`STEM.toml`, `STEM.pem`, `STEM.key`) and its systemd-analyze security
/// bound.
struct Spec {
    name: &'static str,
    stem: &'static str,
    exposure_max: f64,
}

impl Spec {
    fn config(&self) -> String {
        format!("{}.toml", self.stem)
    }
}

const AGENT: Spec = Spec {
    name: "dots-agent",
    stem: "agent",
    exposure_max: AGENT_EXPOSURE_MAX,
};
const CLIENT: Spec = Spec {
    name: "dots-client",
    stem: "client",
    exposure_max: CLIENT_EXPOSURE_MAX,
};

/// The workspace's target directory: this test runs from
/// `<target>/debug/deps/`.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .context("test executable is not under <target>/<profile>/deps")
}

/// Runs `cargo xtask package [--target T]` and returns the paths of both
/// packages for `arch`. Through cargo, so xtask itself is rebuilt when it
/// changed; the `dist` build uses its own directory, so this does not wait
/// for the `cargo test` running this test.
fn build_packages(target: Option<&str>, arch: &str) -> Result<[PathBuf; 2]> {
    let start = Instant::now();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["xtask", "package"]);
    if let Some(t) = target {
        cmd.args(["--target", t]);
    }
    let out = cmd.output().context("running xtask package")?;
    if !out.status.success() {
        bail!(
            "xtask package {target:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask package ({}) took {:.0?}",
        target.unwrap_or("host"),
        start.elapsed()
    );
    // cargo-deb writes the packages of every architecture there.
    let dir = target_dir()?.join("debian");
    let deb = |name: &str| dir.join(format!("{name}_{VERSION}-1_{arch}.deb"));
    let debs = [deb(AGENT.name), deb(CLIENT.name)];
    for d in &debs {
        ensure!(d.is_file(), "xtask package made no {}", d.display());
    }
    Ok(debs)
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("could not start {cmd:?}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd`, failing with its output unless it exits 0; returns stdout.
fn ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    Ok(text(&out.stdout))
}

/// A package unpacked with `dpkg-deb`: files under `root`, control files
/// under `control`.
struct Unpacked {
    dir: TempDir,
    spec: &'static Spec,
}

impl Unpacked {
    fn new(deb: &Path, spec: &'static Spec) -> Result<Unpacked> {
        let dir = TempDir::new(&format!("pkg-{}", spec.stem))?;
        let u = Unpacked { dir, spec };
        ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(u.root()))?;
        ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(u.control()))?;
        Ok(u)
    }

    fn root(&self) -> PathBuf {
        self.dir.path.join("root")
    }

    fn control(&self) -> PathBuf {
        self.dir.path.join("DEBIAN")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel.replace("{}", self.spec.name))
    }

    fn binary(&self) -> PathBuf {
        self.path("usr/bin/{}")
    }

    fn etc(&self) -> PathBuf {
        self.path("etc/{}")
    }

    /// The control file's `field`.
    fn field(&self, field: &str) -> Result<String> {
        let control = fs::read_to_string(self.control().join("control"))?;
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}: ")))
            .map(str::to_owned)
            .with_context(|| format!("{}: no {field} in control:\n{control}", self.spec.name))
    }

    /// What every package must hold, where Debian and the unit look for it.
    fn check_layout(&self, arch: &str) -> Result<()> {
        let name = self.spec.name;
        ensure!(self.field("Package")? == name);
        ensure!(self.field("Version")? == format!("{VERSION}-1"));
        ensure!(self.field("Architecture")? == arch);
        let depends = self.field("Depends")?;
        ensure!(
            depends.contains("libc6") && depends.contains("adduser"),
            "{name}: Depends: {depends}"
        );
        // Packed relative relocations need glibc 2.36, which
        // dpkg-shlibdeps does not infer from the binary.
        let versions = Command::new("readelf")
            .arg("-V")
            .arg(self.root().join(format!("usr/bin/{name}")))
            .output()?;
        if String::from_utf8_lossy(&versions.stdout).contains("GLIBC_ABI_DT_RELR") {
            ensure!(
                depends.contains("libc6 (>= 2.36)"),
                "{name} packs its relocations (DT_RELR) but Depends: {depends}"
            );
        }
        for rel in [
            "usr/bin/{}",
            "lib/systemd/system/{}.service",
            "usr/share/man/man1/{}.1.gz",
            "usr/share/bash-completion/completions/{}",
            "usr/share/zsh/vendor-completions/_{}",
            "usr/share/fish/vendor_completions.d/{}.fish",
            "usr/share/doc/{}/README.md",
            "usr/share/doc/{}/configuration.md",
            "usr/share/doc/{}/copyright",
            "usr/share/doc/{}/changelog.Debian.gz",
        ] {
            ensure!(self.path(rel).is_file(), "{name}: no {rel}");
        }
        ensure!(self.etc().join(self.spec.config()).is_file());
        // The example is a conffile: dpkg keeps the administrator's edits.
        let conffiles = fs::read_to_string(self.control().join("conffiles"))?;
        let conf = format!("/etc/{name}/{}", self.spec.config());
        ensure!(
            conffiles.lines().any(|l| l == conf),
            "{name}: {conf} not in conffiles:\n{conffiles}"
        );
        for script in ["postinst", "prerm", "postrm"] {
            let path = self.control().join(script);
            ok(Command::new("sh").arg("-n").arg(&path))?;
        }
        // bash can load the completion script.
        ok(Command::new("bash")
            .arg("-n")
            .arg(self.path("usr/share/bash-completion/completions/{}")))?;
        Ok(())
    }

    /// Puts a certificate, its key and the CA where the packaged example
    /// expects them (under /etc/NAME/, here inside the unpacked tree) and
    /// returns a copy of the example pointing into the unpacked tree.
    fn example_with_certificates(&self, leaf: &str) -> Result<PathBuf> {
        let etc = self.etc();
        let ca = pki::new_ca("packaging test CA", 365)?;
        ca.write(&etc, "ca")?;
        pki::issue(&ca, leaf, &[San::parse(leaf)], 365)?.write(&etc, self.spec.stem)?;
        let example = fs::read_to_string(etc.join(self.spec.config()))?;
        let installed = format!("/etc/{}/", self.spec.name);
        ensure!(
            example.contains(&installed),
            "the packaged example names no file under {installed}"
        );
        let here = format!("{}/", etc.display());
        let path = self.dir.path.join(self.spec.config());
        fs::write(&path, example.replace(&installed, &here))?;
        Ok(path)
    }

    /// `man -l` renders the main page and names the command.
    fn check_man(&self) -> Result<()> {
        let page = self.path("usr/share/man/man1/{}.1.gz");
        let out = run(Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"))?;
        let shown = text(&out.stdout);
        ensure!(
            out.status.success() && shown.contains("SYNOPSIS") && shown.contains(self.spec.name),
            "man -l {}: {}\n{shown}{}",
            page.display(),
            out.status,
            text(&out.stderr)
        );
        Ok(())
    }

    /// `systemd-analyze verify` on the unit, with ExecStart pointed at the
    /// unpacked binary and the unpacked man pages on MANPATH (verify checks
    /// both). Any warning fails.
    fn check_unit_verifies(&self) -> Result<()> {
        let unit = fs::read_to_string(self.path("lib/systemd/system/{}.service"))?;
        let installed = format!("/usr/bin/{}", self.spec.name);
        ensure!(unit.contains(&format!("ExecStart={installed} ")));
        let dir = self.dir.path.join("units");
        fs::create_dir_all(&dir)?;
        let copy = dir.join(format!("{}.service", self.spec.name));
        fs::write(
            &copy,
            unit.replace(
                &format!("ExecStart={installed}"),
                &format!("ExecStart={}", self.binary().display()),
            ),
        )?;
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .env("MANPATH", self.root().join("usr/share/man")))?;
        let warnings = text(&out.stderr);
        ensure!(
            out.status.success() && warnings.trim().is_empty(),
            "systemd-analyze verify {}: {}\n{warnings}",
            self.spec.name,
            out.status
        );
        Ok(())
    }

    /// `systemd-analyze security --offline=yes`: the overall exposure.
    fn exposure(&self) -> Result<f64> {
        let unit = self.path("lib/systemd/system/{}.service");
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit))?;
        let report = text(&out.stdout);
        let needle = format!("Overall exposure level for {}.service: ", self.spec.name);
        let score = report
            .lines()
            .find_map(|l| Some(l.split_once(&needle)?.1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("no score in:\n{report}{}", text(&out.stderr)))?;
        ensure!(
            score <= self.spec.exposure_max,
            "{}: exposure {score} above {}:\n{report}",
            self.spec.name,
            self.spec.exposure_max
        );
        eprintln!(
            "{}.service: exposure {score} (at most {})",
            self.spec.name, self.spec.exposure_max
        );
        Ok(score)
    }
}

/// Runs the packaged binary, directly or under qemu for another
/// architecture, in `ns` when given (through nsenter, like the daemons in
/// the other tests).
struct Runner<'a> {
    qemu: bool,
    ns: Option<&'a Netns>,
}

impl Runner<'_> {
    fn command(&self, binary: &Path) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = self.ns {
            argv.push("nsenter".into());
            argv.push(format!("--net=/run/netns/{}", ns.name));
        }
        if self.qemu {
            argv.extend(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"].map(String::from));
        }
        argv.push(binary.display().to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env("NO_COLOR", "1");
        cmd
    }

    fn version(&self, u: &Unpacked) -> Result<()> {
        let out = ok(self.command(&u.binary()).arg("--version"))?;
        ensure!(
            out.trim() == format!("{} {VERSION}", u.spec.name),
            "{} --version: {out}",
            u.spec.name
        );
        Ok(())
    }

    /// `check-config` accepts the packaged example once its certificates
    /// exist, and names the file when one is missing.
    fn check_config(&self, u: &Unpacked, leaf: &str) -> Result<()> {
        let config = u.example_with_certificates(leaf)?;
        let out = ok(self.command(&u.binary()).arg("check-config").arg(&config))?;
        ensure!(out.contains("valid"), "check-config: {out}");
        let key = u.etc().join(format!("{}.key", u.spec.stem));
        fs::remove_file(&key)?;
        let out = run(self.command(&u.binary()).arg("check-config").arg(&config))?;
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        ensure!(
            !out.status.success() && said.contains(&key.display().to_string()),
            "check-config with {} missing: {}\n{said}",
            key.display(),
            out.status
        );
        Ok(())
    }

    /// Whether the binary has a `check-config` subcommand (dots-client gets
    /// one in the same release as these packages).
    fn has_check_config(&self, u: &Unpacked) -> Result<bool> {
        let help = ok(self.command(&u.binary()).arg("--help"))?;
        Ok(help
            .lines()
            .any(|l| l.trim_start().starts_with("check-config")))
    }
}

/// The machine field of the ELF header at the start of `bytes`.
fn elf_machine(bytes: &[u8]) -> Option<u16> {
    (bytes.len() > 20 && bytes.starts_with(b"\x7fELF"))
        .then(|| u16::from_le_bytes([bytes[18], bytes[19]]))
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_BPF: u16 = 247;

/// The agent binary is built for `machine` and carries the XDP program: an
/// embedded little-endian ELF object for the BPF machine.
fn check_agent_binary(agent: &Path, machine: u16) -> Result<()> {
    let bytes = fs::read(agent)?;
    ensure!(
        elf_machine(&bytes) == Some(machine),
        "{}: ELF machine {:?}, expected {machine}",
        agent.display(),
        elf_machine(&bytes)
    );
    let embedded = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"\x7fELF")
        .any(|(i, _)| i > 0 && elf_machine(&bytes[i..]) == Some(EM_BPF));
    ensure!(embedded, "{}: no BPF object embedded", agent.display());
    Ok(())
}

/// A namespace with an interface named like the LAN in the packaged
/// example, so `check-config` sees the machine the example describes.
fn router_namespace() -> Result<Netns> {
    let ns = Netns::new("pkg")?;
    ns.ip(&[
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth1-peer",
    ])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    Ok(ns)
}

#[test]
fn amd64_packages_hold_what_an_installation_needs() -> Result<()> {
    let [agent_deb, client_deb] = build_packages(None, "amd64")?;
    let agent = Unpacked::new(&agent_deb, &AGENT)?;
    let client = Unpacked::new(&client_deb, &CLIENT)?;
    let ns = router_namespace()?;
    let runner = Runner {
        qemu: false,
        ns: Some(&ns),
    };

    agent.check_layout("amd64")?;
    ensure!(agent.path("usr/lib/tmpfiles.d/{}.conf").is_file());
    client.check_layout("amd64")?;
    check_agent_binary(&agent.binary(), EM_X86_64)?;

    for u in [&agent, &client] {
        runner.version(u)?;
        u.check_man()?;
        u.check_unit_verifies()?;
        u.exposure()?;
    }
    runner.check_config(&agent, "cpe1.example")?;
    if runner.has_check_config(&client)? {
        runner.check_config(&client, "dots.isp.example")?;
    } else {
        eprintln!("dots-client has no check-config subcommand in this build: not run");
    }
    Ok(())
}

/// dpkg installs, removes and purges both packages in a throw-away overlay
/// of this system (tests/scripts/dpkg-lifecycle.sh): users, directories and
/// owners made, units enabled; removal takes the agent's XDP program out of
/// the kernel and keeps the edited conffile; purge leaves nothing.
#[test]
fn amd64_packages_install_remove_and_purge() -> Result<()> {
    let [agent_deb, client_deb] = build_packages(None, "amd64")?;
    let work = TempDir::new("pkg-dpkg")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dpkg-lifecycle.sh");
    let out = run(Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "sh"])
        .arg(&script)
        .arg(&work.path)
        .arg(&agent_deb)
        .arg(&client_deb))?;
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(
        out.status.success() && said.contains("== lifecycle ok"),
        "{}: {}\n{said}",
        script.display(),
        out.status
    );
    Ok(())
}

#[test]
fn arm64_packages_run_under_qemu() -> Result<()> {
    let [agent_deb, client_deb] = build_packages(Some(AARCH64), "arm64")?;
    let agent = Unpacked::new(&agent_deb, &AGENT)?;
    let client = Unpacked::new(&client_deb, &CLIENT)?;
    agent.check_layout("arm64")?;
    client.check_layout("arm64")?;
    check_agent_binary(&agent.binary(), EM_AARCH64)?;

    let ns = router_namespace()?;
    let runner = Runner {
        qemu: true,
        ns: Some(&ns),
    };
    runner.version(&agent)?;
    runner.version(&client)?;
    runner.check_config(&agent, "cpe1.example")?;
    Ok(())
}
