//! The project's binaries as real processes inside a test's network
//! namespace, with their logs captured and their lifetime tied to the test.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_daemon::{
    pki::{self, San},
    transport::Credentials,
};

use crate::Netns;

/// Where [`bin`] finds the daemons instead, when set.
pub const BIN_DIR_ENV: &str = "DOTS_BIN_DIR";

/// A binary of this workspace, built next to the test executable
/// (`cargo xtask test` builds them first), or in [`BIN_DIR_ENV`].
pub fn bin(name: &str) -> Result<PathBuf> {
    // A bench may run other builds than its own (`cargo xtask bench
    // footprint`: the packaged ones).
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        if !path.exists() {
            bail!(
                "{} not built ({BIN_DIR_ENV} names its directory)",
                path.display()
            );
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a binary of this crate (the
    // demo) from target/<profile>/: look next to it, then one level up.
    let here = exe.parent().context("executable has no parent directory")?;
    let path = [here.join(name), here.parent().unwrap_or(here).join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    if !path.exists() {
        bail!(
            "{} not built: run `cargo build --workspace` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A lab PKI in `dir` whose client certificate names 127.0.0.1, and that
/// client's credentials: for a Call Home listener on loopback that an agent
/// (certificate `agents[0]`) dials.
pub fn loopback_pki(dir: &Path) -> Result<(pki::LabPki, Credentials)> {
    let lab = pki::create_lab_pki(
        &dir.join("pki"),
        &[San::parse("127.0.0.1")],
        &["cpe1".into()],
        1,
    )?;
    let creds = Credentials {
        ca: lab.ca.clone(),
        cert: lab.client_cert.clone(),
        key: lab.client_key.clone(),
    };
    Ok((lab, creds))
}

/// `dots-agent run --no-enforce` dialling the loopback listener on `port`
/// over `transport` ("udp" or "tcp") with the agent certificate of `lab`,
/// its domain 192.0.2.0/24; its control socket (`agent.sock`), state
/// directory (`agent-state`) and log (`agent.log`) in `dir`, so that tests
/// running at the same time do not meet. Killed when dropped.
pub fn loopback_agent(
    lab: &pki::LabPki,
    port: u16,
    transport: &str,
    dir: &Path,
) -> Result<tokio::process::Command> {
    let (_, cert, key) = lab.agents.first().context("no agent certificate")?;
    let mut c = tokio::process::Command::new(bin("dots-agent")?);
    c.args(["run", "--peer", &format!("127.0.0.1:{port}")])
        .args(["--transport", transport, "--no-enforce"])
        .args(["--domain", "192.0.2.0/24"])
        .arg("--ca")
        .arg(&lab.ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--control")
        .arg(dir.join("agent.sock"))
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::from(fs::File::create(
            dir.join("agent.log"),
        )?))
        .kill_on_drop(true);
    Ok(c)
}

/// A private temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(crate::unique(&format!("dots-{tag}-")));
        fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A child process in a namespace; killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Starts `bin args...` in `ns` (through nsenter, so /sys and bpffs stay
    /// the host's), logging stdout and stderr to `log`.
    pub fn spawn(
        ns: &Netns,
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Proc> {
        Proc::spawn_with_env(ns, name, bin, args, log, &[])
    }

    /// [`Proc::spawn`] with more environment variables.
    pub fn spawn_with_env(
        ns: &Netns,
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(String, String)],
    ) -> Result<Proc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name)).arg(bin);
        Proc::start(cmd, name, args, log, env)
    }

    /// [`Proc::spawn_with_env`] in this process's own network namespace
    /// (the benchmarks' daemons on loopback addresses).
    pub fn spawn_here(
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(String, String)],
    ) -> Result<Proc> {
        Proc::start(Command::new(bin), name, args, log, env)
    }

    /// Runs `cmd args...`, logging stdout and stderr to `log`.
    fn start(
        mut cmd: Command,
        name: &str,
        args: &[String],
        log: PathBuf,
        env: &[(String, String)],
    ) -> Result<Proc> {
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("DOTS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            log,
            name: name.to_string(),
        })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{}: {needle:?} not logged within {timeout:?}; log:\n{}",
            self.name,
            self.log_text()
        )
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id (the binary's: nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// Runs a command in `ns` to completion.
pub fn run_in(ns: &Netns, bin: &Path, args: &[String]) -> Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// An HTTPS call with curl from `ns` to `url`, trusting `ca`, giving up
/// after `max_time` seconds; `extra` are more curl arguments (credentials).
/// The status and the body as JSON (a JSON string when it is not JSON).
pub fn curl_json(
    ns: &Netns,
    ca: &Path,
    max_time: u32,
    method: &str,
    url: &str,
    body: Option<&str>,
    extra: &[&str],
) -> Result<(u16, serde_json::Value)> {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        max_time.to_string(),
        "--cacert".into(),
        ca.display().to_string(),
        "-X".into(),
        method.into(),
        "-w".into(),
        "\n%{http_code}".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if let Some(b) = body {
        args.extend([
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            b.into(),
        ]);
    }
    args.push(url.to_string());
    let out = run_in(ns, Path::new("/usr/bin/curl"), &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    let code: u16 = code
        .trim()
        .parse()
        .with_context(|| format!("curl: {text}"))?;
    let value =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string()));
    Ok((code, value))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
