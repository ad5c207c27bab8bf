//! `bench-footprint`: what the agent costs a home router, for the packaged
//! builds. Run it through `cargo xtask bench footprint`, which builds them
//! and points [`tests::procs::BIN_DIR_ENV`] at them.
//!
//! * Size: the packaged `dots-agent` stripped (amd64, and arm64 when
//!   `--arm64-agent` names the cross build), and the shared libraries it
//!   needs at run time; the same for the small-router builds (without the
//!   default features) that `--amd64-small` and `--arm64-small` name.
//! * Memory (VmRSS, VmHWM, anonymous and file-backed from /proc) of the agent in the namespace lab
//!   (`tests::lab`), enforcing on two LAN interfaces: idle with a session;
//!   with `--mitigations` (256) active mitigations holding `--prefixes`
//!   (15,360) source prefixes: 60 per request, about what a signal-channel
//!   message holds (at most 1152 bytes, RFC 7252 §4.6, over TLS too: the
//!   client refuses more), so 100,000 cannot be installed through the
//!   protocol; with `--flows` (16,384, a common
//!   nf_conntrack_max of CPEs) NATed conntrack entries in its mirror; and
//!   with both.
//! * CPU: user plus system time of the idle agent over `--cpu-secs` (60) of
//!   a quiet session (heartbeats only).
//! * The NAT mirror's heap for 16,384 and 100,000 entries, counted by this
//!   program's allocator, IPv4 (packed) and IPv6 (unpacked).
//! * arm64 under qemu-user: the agent in monitor mode (no XDP: BPF system
//!   calls are not emulated) dials the lab's client; the emulator's RSS and
//!   CPU are reported as such (they include qemu's own).
//!
//! Arguments: `--json FILE --doc FILE [--cpu-secs N] [--mitigations N]
//! [--prefixes N] [--flows N] [--arm64-agent PATH] [--amd64-small PATH]
//! [--arm64-small PATH]`. The doc's text between
//! `<!-- footprint:begin -->` and `<!-- footprint:end -->` is replaced.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt::Write as _,
    fs,
    net::{IpAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use dots_agent::nat::{CtEntry, CtMirror, Tuple};
use serde_json::{json, Value};
use tests::{
    bench::{write_json, write_section, BenchArgs},
    lab::{masquerade, Lab, OTHER_TARGET4, TARGET4},
    procs::{bin, eventually, Proc},
};

/// Counts the bytes this program holds on the heap: the NAT mirror's use.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Where the arm64 C library is (Debian's libc6-dev-arm64-cross).
const ARM64_SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// Time given to the agent after each step before its memory is read.
const SETTLE: Duration = Duration::from_secs(5);

struct Args {
    json: PathBuf,
    doc: PathBuf,
    cpu_secs: u64,
    mitigations: usize,
    prefixes: usize,
    flows: usize,
    arm64_agent: Option<PathBuf>,
    amd64_small: Option<PathBuf>,
    arm64_small: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse(
        "footprint",
        &[
            "--cpu-secs",
            "--mitigations",
            "--prefixes",
            "--flows",
            "--arm64-agent",
            "--amd64-small",
            "--arm64-small",
        ],
        &[],
    )?;
    let path = |o: &str| -> Result<Option<PathBuf>> {
        let v: String = b.value(o, String::new())?;
        Ok((!v.is_empty()).then(|| v.into()))
    };
    let a = Args {
        cpu_secs: b.value("--cpu-secs", 60)?,
        mitigations: b.value("--mitigations", 256)?,
        prefixes: b.value("--prefixes", 256 * 60)?,
        flows: b.value("--flows", 16_384)?,
        arm64_agent: path("--arm64-agent")?,
        amd64_small: path("--amd64-small")?,
        arm64_small: path("--arm64-small")?,
        json: b.json,
        doc: b.doc,
    };
    ensure!(
        (1..=256).contains(&a.mitigations),
        "--mitigations: 1 to 256 (the data plane's slots)"
    );
    ensure!(a.cpu_secs >= 1, "--cpu-secs must be at least 1");
    ensure!(
        a.flows <= 60_000,
        "--flows: at most 60,000 (one source port each)"
    );
    Ok(a)
}

fn progress(what: &str) {
    eprintln!("bench-footprint: {what}");
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, RssAnon, ...).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn memory(pid: u32) -> Result<Value> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(json!({
        "rss_mib": mib(status_kib(pid, "VmRSS")?),
        "hwm_mib": mib(status_kib(pid, "VmHWM")?),
        "anon_mib": mib(status_kib(pid, "RssAnon")?),
        "file_mib": mib(status_kib(pid, "RssFile")?),
        "shmem_mib": mib(status_kib(pid, "RssShmem")?),
        "bpf_maps_mib": mib(bpf_map_kib(pid)?),
        "bpf_maps_kernel_mib": bpf_memlock_bytes(pid)? as f64 / (1024.0 * 1024.0),
    }))
}

/// Kernel memory of the BPF maps the process holds open (`memlock` of
/// /proc/PID/fdinfo, each map once): the data plane's cost outside the
/// process's resident set, mapped or not.
fn bpf_memlock_bytes(pid: u32) -> Result<u64> {
    let mut maps = std::collections::BTreeMap::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        let is_map =
            fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))?;
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    Ok(maps.values().sum())
}

/// Resident KiB of the BPF maps the process has mmapped (the data plane's
/// value arrays): kernel memory the maps hold anyway, counted in VmRSS
/// because the agent maps them.
fn bpf_map_kib(pid: u32) -> Result<u64> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut in_map = false;
    let mut kib = 0;
    for l in smaps.lines() {
        if l.split_whitespace()
            .next()
            .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
        {
            in_map = l.ends_with("anon_inode:bpf-map");
        } else if in_map {
            if let Some(v) = l.strip_prefix("Rss:") {
                kib += v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(kib)
}

/// User plus system CPU time of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// CPU used by `pid` over `secs`: milliseconds per minute and % of a core.
fn idle_cpu(pid: u32, secs: u64) -> Result<Value> {
    let before = cpu_ms(pid)?;
    let t = Instant::now();
    thread::sleep(Duration::from_secs(secs));
    let used = cpu_ms(pid)? - before;
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "seconds": secs,
        "cpu_ms_per_minute": used * 60_000.0 / wall,
        "core_percent": used * 100.0 / wall,
    }))
}

/// The stripped size of `path` (a stripped copy, by `strip`), and the
/// shared libraries it needs.
fn size(path: &Path, strip: &str, readelf: &str) -> Result<Value> {
    let copy = std::env::temp_dir().join(tests::unique("dots-footprint-"));
    let out = Command::new(strip)
        .arg("-o")
        .arg(&copy)
        .arg(path)
        .output()
        .with_context(|| format!("running {strip}"))?;
    ensure!(
        out.status.success(),
        "{strip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stripped = fs::metadata(&copy)?.len();
    let _ = fs::remove_file(&copy);
    let dynamic = Command::new(readelf).arg("-d").arg(path).output()?;
    let needed: Vec<String> = String::from_utf8_lossy(&dynamic.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect();
    Ok(json!({
        "path": path.display().to_string(),
        "file_bytes": fs::metadata(path)?.len(),
        "stripped_bytes": stripped,
        "stripped_mib": stripped as f64 / (1 << 20) as f64,
        "needed": needed,
    }))
}

/// The lab's configuration file: room for the mitigations and prefixes.
fn write_config(lab: &Lab, per_request: usize) -> Result<String> {
    let config = lab.dir.path.join("footprint.toml");
    fs::write(
        &config,
        format!(
            "[limits]\nmax-mitigations-per-cuid = 256\nmax-prefixes = {}\n\n[policy]\nmax-mitigations = 256\nmax-mitigations-per-peer = 256\nmax-sources-v4 = 1024\n",
            per_request.max(32)
        ),
    )?;
    Ok(config.display().to_string())
}

/// Source prefixes per request to install `total` over `n` mitigations.
fn per_request(total: usize, n: usize) -> usize {
    total.div_ceil(n)
}

/// Installs `n` mitigations holding `total` host sources from 10.0.0.0/8
/// (made a customer prefix of the lab's client) in all, to another target
/// than the lab's.
fn install(lab: &Lab, n: usize, total: usize) -> Result<usize> {
    let per = per_request(total, n);
    let mut installed = 0;
    let t = Instant::now();
    for m in 0..n {
        let count = per.min(total - installed);
        let mut args: Vec<String> = vec![
            "mitigate".into(),
            "--target".into(),
            format!("{OTHER_TARGET4}/32"),
            "--lifetime".into(),
            "3600".into(),
        ];
        for k in 0..count.max(1) {
            let host = installed + k;
            args.push("--source".into());
            args.push(format!(
                "10.{}.{}.{}/32",
                host >> 16 & 0xff,
                host >> 8 & 0xff,
                host & 0xff
            ));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, r) = lab.client(&refs)?;
        let code = r.first().and_then(|v| v["code"].as_str()).unwrap_or("");
        ensure!(
            ok && code == "2.01 Created",
            "installing mitigation {m} ({count} prefixes) failed: {r:?}"
        );
        installed += count;
        if m % 32 == 31 {
            progress(&format!("  {} of {n} installed", m + 1));
        }
    }
    progress(&format!(
        "  {n} mitigations, {installed} prefixes in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(installed)
}

/// Starts the lab's client and an enforcing agent (TLS, notifications
/// every 30 s: a quiet session).
fn start(lab: &mut Lab, per: usize) -> Result<u32> {
    let config = write_config(lab, per)?;
    lab.customer = format!("{},10.0.0.0/8", lab.customer.replace(",10.9.9.0/24", ""));
    lab.start_client()?;
    lab.start_agent(&[
        "--config",
        &config,
        "--transport",
        "tcp",
        "--domain",
        "10.0.0.0/8",
        "--notify-interval",
        "30",
    ])?;
    Ok(lab.agent.as_ref().context("agent")?.pid())
}

/// Run 1: idle, CPU, then the mitigations.
fn run_mitigations(a: &Args) -> Result<Value> {
    let mut lab = Lab::new()?;
    let pid = start(&mut lab, per_request(a.prefixes, a.mitigations))?;
    thread::sleep(SETTLE);
    let idle = memory(pid)?;
    progress(&format!("idle: {idle}; CPU over {} s", a.cpu_secs));
    let cpu = idle_cpu(pid, a.cpu_secs)?;
    progress(&format!("idle CPU: {cpu}"));
    progress(&format!(
        "installing {} mitigations, {} prefixes",
        a.mitigations, a.prefixes
    ));
    let prefixes = install(&lab, a.mitigations, a.prefixes)?;
    thread::sleep(SETTLE);
    let loaded = memory(pid)?;
    progress(&format!("mitigations: {loaded}"));
    Ok(json!({
        "idle": idle,
        "idle_cpu": cpu,
        "mitigations": {"count": a.mitigations, "prefixes": prefixes, "memory": loaded},
    }))
}

/// Creates `n` NATed UDP flows from host A to the target (one source port
/// each), kept by conntrack for ten minutes.
fn nat_flows(lab: &Lab, n: usize) -> Result<()> {
    masquerade(&lab.cpe)?;
    lab.cpe.exec(&[
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_udp_timeout=600",
    ])?;
    lab.hosta.enter(|| -> Result<()> {
        for i in 0..n {
            let s = UdpSocket::bind(("0.0.0.0", 2000 + i as u16))?;
            s.send_to(b"footprint", (TARGET4, 9))?;
        }
        Ok(())
    })??;
    Ok(())
}

/// Run 2: the NAT mirror, then the mitigations too.
fn run_nat(a: &Args) -> Result<Value> {
    let mut lab = Lab::new()?;
    progress(&format!("creating {} NATed flows", a.flows));
    nat_flows(&lab, a.flows)?;
    let pid = start(&mut lab, per_request(a.prefixes, a.mitigations))?;
    let agent = lab.agent.as_ref().context("agent")?;
    agent.wait_log("conntrack mirror loaded", Duration::from_secs(20))?;
    let mirrored = mirrored_entries(&agent.log_text())?;
    ensure!(
        mirrored >= a.flows,
        "the mirror holds {mirrored} entries, fewer than the {} flows",
        a.flows
    );
    thread::sleep(SETTLE);
    let nat = memory(pid)?;
    progress(&format!("{mirrored} entries mirrored: {nat}"));
    let prefixes = install(&lab, a.mitigations, a.prefixes)?;
    thread::sleep(SETTLE);
    let both = memory(pid)?;
    progress(&format!("mitigations and NAT: {both}"));
    Ok(json!({
        "nat": {"entries": mirrored, "memory": nat},
        "loaded": {"mitigations": a.mitigations, "prefixes": prefixes, "entries": mirrored, "memory": both},
    }))
}

/// `entries=N` of the agent's "conntrack mirror loaded" line.
fn mirrored_entries(log: &str) -> Result<usize> {
    log.lines()
        .find(|l| l.contains("conntrack mirror loaded"))
        .and_then(|l| {
            l.split("entries=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .context("no entries=N in the agent's mirror line")
}

/// The arm64 build under qemu-user, monitor mode, dialling the lab's client.
fn run_arm64(a: &Args, agent: &Path) -> Result<Value> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    let mut args: Vec<String> = vec!["-L".into(), ARM64_SYSROOT.into()];
    args.push(agent.display().to_string());
    let mut lab_args = lab.agent_args(true);
    // No XDP: drop the LAN interfaces, run in monitor mode.
    while let Some(i) = lab_args.iter().position(|x| x == "--lan") {
        lab_args.drain(i..i + 2);
    }
    if let Some(i) = lab_args.iter().position(|x| x == "--notify-interval") {
        lab_args.drain(i..i + 2);
    }
    lab_args.extend(
        [
            "--no-enforce",
            "--transport",
            "tcp",
            "--notify-interval",
            "30",
        ]
        .map(String::from),
    );
    args.extend(lab_args);
    let qemu = which("qemu-aarch64-static")?;
    let p = Proc::spawn(
        &lab.cpe,
        "dots-agent (arm64, qemu)",
        &qemu,
        &args,
        lab.dir.path.join("agent-arm64.log"),
    )?;
    let connected = eventually(Duration::from_secs(60), || {
        let (_, r) = lab.client(&["agents"]).ok()?;
        r.first()?
            .get("body")?
            .as_array()?
            .iter()
            .find(|x| x["state"] == "connected")
            .cloned()
    });
    if connected.is_none() {
        bail!(
            "the arm64 agent did not connect under qemu; log:\n{}",
            p.log_text()
        );
    }
    thread::sleep(SETTLE);
    let idle = memory(p.pid())?;
    progress(&format!("arm64 under qemu, idle: {idle}"));
    let cpu = idle_cpu(p.pid(), a.cpu_secs)?;
    progress(&format!("arm64 under qemu, idle CPU: {cpu}"));
    Ok(json!({"qemu_idle": idle, "qemu_idle_cpu": cpu}))
}

fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found on PATH"))
}

/// Heap held by a mirror of `n` entries built from NEW events.
fn mirror_heap(n: usize, v6: bool) -> Value {
    let entries: Vec<CtEntry> = (0..n).map(|i| flow(i, v6)).collect();
    let before = HELD.load(Ordering::Relaxed);
    let mut m = CtMirror::new();
    for e in &entries {
        m.insert(e);
    }
    let held = HELD.load(Ordering::Relaxed) - before;
    assert_eq!(m.len(), n);
    json!({
        "entries": n,
        "heap_bytes": held,
        "heap_mib": held as f64 / (1 << 20) as f64,
        "bytes_per_entry": held as f64 / n as f64,
    })
}

/// A NATed UDP flow, distinct for each `i`.
fn flow(i: usize, v6: bool) -> CtEntry {
    let (dev, target, external): (IpAddr, IpAddr, IpAddr) = if v6 {
        (
            format!("2001:db8:1::{:x}", 2 + i / 50_000).parse().unwrap(),
            "2001:db8:ffff::10".parse().unwrap(),
            "2001:db8:100::1".parse().unwrap(),
        )
    } else {
        (
            format!("192.0.2.{}", 2 + i / 50_000).parse().unwrap(),
            TARGET4.parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        )
    };
    let sport = 10_000 + (i % 50_000) as u16;
    CtEntry {
        original: Tuple {
            src: dev,
            dst: target,
            protocol: 17,
            src_port: Some(sport),
            dst_port: Some(53),
        },
        reply: Tuple {
            src: target,
            dst: external,
            protocol: 17,
            src_port: Some(53),
            dst_port: Some(sport),
        },
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let started = Instant::now();
    let agent = bin("dots-agent")?;
    progress(&format!("agent: {}", agent.display()));
    let mut sizes = json!({"amd64": size(&agent, "strip", "readelf")?});
    for (key, path, strip) in [
        ("arm64", &a.arm64_agent, "aarch64-linux-gnu-strip"),
        ("amd64_small", &a.amd64_small, "strip"),
        ("arm64_small", &a.arm64_small, "aarch64-linux-gnu-strip"),
    ] {
        if let Some(p) = path {
            sizes[key] = size(p, strip, "readelf")?;
        }
    }
    progress(&format!("sizes: {sizes}"));
    let heap = json!({
        "ipv4": [mirror_heap(16_384, false), mirror_heap(100_000, false)],
        "ipv6": [mirror_heap(16_384, true), mirror_heap(100_000, true)],
    });
    progress(&format!("NAT mirror heap: {heap}"));
    let mitigations = run_mitigations(&a)?;
    let nat = run_nat(&a)?;
    let arm64 = match &a.arm64_agent {
        Some(p) => run_arm64(&a, p)?,
        None => Value::Null,
    };
    let out = json!({
        "kernel": tests::bench::kernel_release(),
        "sizes": sizes,
        "nat_mirror_heap": heap,
        "amd64": {
            "idle": mitigations["idle"],
            "idle_cpu": mitigations["idle_cpu"],
            "mitigations": mitigations["mitigations"],
            "nat": nat["nat"],
            "loaded": nat["loaded"],
        },
        "arm64_qemu": arm64,
    });
    write_json(&a.json, &out)?;
    write_doc(&a, &out)?;
    progress(&format!(
        "done in {:.0} s: {} and {}",
        started.elapsed().as_secs_f64(),
        a.json.display(),
        a.doc.display()
    ));
    Ok(())
}

fn write_doc(a: &Args, out: &Value) -> Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    writeln!(
        s,
        "Kernel {}, the binaries of `cargo xtask package` (profile `dist`).\n",
        out["kernel"].as_str().unwrap_or("?")
    )?;
    writeln!(
        s,
        "| dots-agent | features | stripped (MB) | stripped (MiB) | stripped (bytes) | shared libraries |"
    )?;
    writeln!(s, "|---|---|---:|---:|---:|---|")?;
    for (key, arch, features) in [
        ("amd64", "amd64", "default (all)"),
        ("amd64_small", "amd64", "none (`--no-default-features`)"),
        ("arm64", "arm64", "default (all), OpenSSL static"),
        ("arm64_small", "arm64", "none, OpenSSL static"),
    ] {
        let x = &out["sizes"][key];
        if x.is_null() {
            continue;
        }
        let libs: Vec<&str> = x["needed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        writeln!(
            s,
            "| {arch} | {features} | {:.2} | {:.2} | {} | {} |",
            f(&x["stripped_bytes"]) / 1e6,
            f(&x["stripped_mib"]),
            x["stripped_bytes"],
            libs.join(", ")
        )?;
    }
    let am = &out["amd64"];
    writeln!(
        s,
        "\nThe agent (amd64) in the lab, enforcing on two LAN interfaces, one TLS session, notifications every 30 s:\n"
    )?;
    writeln!(s, "| state | VmRSS (MiB) | anonymous: the agent's own (MiB) | files: binary, libraries (MiB) | BPF maps mapped (MiB) | VmHWM (MiB) | BPF maps, kernel memory (MiB) |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|")?;
    let mut row = |what: String, m: &Value| {
        writeln!(
            s,
            "| {what} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            f(&m["rss_mib"]),
            f(&m["anon_mib"]),
            f(&m["rss_mib"]) - f(&m["anon_mib"]) - f(&m["bpf_maps_mib"]),
            f(&m["bpf_maps_mib"]),
            f(&m["hwm_mib"]),
            f(&m["bpf_maps_kernel_mib"]),
        )
    };
    row("idle".into(), &am["idle"])?;
    row(
        format!(
            "{} mitigations, {} source prefixes",
            am["mitigations"]["count"], am["mitigations"]["prefixes"]
        ),
        &am["mitigations"]["memory"],
    )?;
    row(
        format!("{} NATed conntrack entries mirrored", am["nat"]["entries"]),
        &am["nat"]["memory"],
    )?;
    row(
        format!(
            "both ({} mitigations, {} prefixes, {} entries)",
            am["loaded"]["mitigations"], am["loaded"]["prefixes"], am["loaded"]["entries"]
        ),
        &am["loaded"]["memory"],
    )?;
    writeln!(
        s,
        "\nIdle CPU over {} s (heartbeats only): {:.1} ms per minute, {:.3} % of a core.",
        a.cpu_secs,
        f(&am["idle_cpu"]["cpu_ms_per_minute"]),
        f(&am["idle_cpu"]["core_percent"])
    )?;
    writeln!(
        s,
        "\nNAT mirror heap (counted by the allocator):\n\n| entries | IPv4 (MiB) | IPv4 bytes per entry | IPv6 (MiB) | IPv6 bytes per entry |\n|---:|---:|---:|---:|---:|"
    )?;
    let heap = &out["nat_mirror_heap"];
    for i in 0..2 {
        let (v4, v6) = (&heap["ipv4"][i], &heap["ipv6"][i]);
        writeln!(
            s,
            "| {} | {:.2} | {:.0} | {:.2} | {:.0} |",
            v4["entries"],
            f(&v4["heap_mib"]),
            f(&v4["bytes_per_entry"]),
            f(&v6["heap_mib"]),
            f(&v6["bytes_per_entry"])
        )?;
    }
    let q = &out["arm64_qemu"];
    if !q.is_null() {
        writeln!(
            s,
            "\narm64 under qemu-user (monitor mode: XDP needs BPF system calls qemu-user does not emulate): it connects and runs; the process measured is the emulator, so these include qemu's own memory and translation: VmRSS {:.1} MiB, CPU {:.1} ms per minute. Not a measure of an arm64 router.",
            f(&q["qemu_idle"]["rss_mib"]),
            f(&q["qemu_idle_cpu"]["cpu_ms_per_minute"])
        )?;
    }
    write_section(
        &a.doc,
        "footprint",
        "cargo xtask bench footprint",
        &s,
        "## Footprint\n\nWritten by `cargo xtask bench footprint`: size, memory and CPU of the packaged agent against a home router's budget (at most 4 MB stripped, 16 MB RSS loaded, 0.1 % of a core idle).",
    )
}
