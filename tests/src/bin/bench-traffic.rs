//! `bench-traffic`: the classifier under real frames. trafgen (netsniff-ng)
//! sends frames from one namespace into a veth whose other end, in a second
//! namespace, runs the XDP program in native mode; the kernel's own BPF
//! statistics (`run_time_ns` / `run_cnt`, turned on with `BPF_ENABLE_STATS`
//! for the bench's duration only) give the program's cost per frame, to set
//! beside the BPF_PROG_TEST_RUN figures of `bench-dataplane`. The empty XDP
//! program and xdp-filter (xdp-tools) are measured the same way, as the
//! anchors. Run it through `cargo xtask bench traffic`.
//!
//! Arguments: `--json FILE --doc FILE [--frames N]`. The doc's text between
//! `<!-- traffic:begin -->` and `<!-- traffic:end -->` is replaced.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use dots_agent::enforce::{
    clock, sys, AttachMode, Dataplane, DataplaneOptions, Range, Slot, SlotId, SlotSpec,
};
use serde_json::{json, Value};
use tests::{
    bench::{write_json, write_section, BenchArgs},
    packet::{Frame, L4},
    procs::TempDir,
    veth, BpffsDir, Netns,
};

/// Host prefixes installed, as in bench-dataplane's head-to-head rows.
const PREFIXES: usize = 10_000;

struct Args {
    json: PathBuf,
    doc: PathBuf,
    frames: u64,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse("traffic", &["--frames"], &[])?;
    let a = Args {
        frames: b.value("--frames", 2_000_000)?,
        json: b.json,
        doc: b.doc,
    };
    ensure!(a.frames >= 1000, "--frames: at least 1000");
    Ok(a)
}

fn progress(what: &str) {
    eprintln!("bench-traffic: {what}");
}

/// The `i`-th installed source: 10.0.0.0 + i.
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i as u32)
}

/// 256 slots sharing the installed sources round-robin, each naming the
/// target /24; `full`: also protocol UDP, source ports 1024-65535, target
/// port 53 (every lookup of the classifier).
fn slots(full: bool) -> BTreeMap<SlotId, Slot> {
    let expires = clock::boot_ns_after(std::time::Duration::from_secs(3600));
    (0..256usize)
        .map(|s| {
            let mut spec = SlotSpec {
                sources: (s..PREFIXES)
                    .step_by(256)
                    .map(|i| IpAddr::V4(source(i)).into())
                    .collect(),
                targets: vec!["198.51.100.0/24".parse().expect("literal")],
                ..SlotSpec::default()
            };
            if full {
                spec.protocols = vec![17];
                spec.source_ports = vec![Range::new(1024, 65535)];
                spec.target_ports = vec![Range::single(53)];
            }
            (s as SlotId, Slot::new(spec, expires))
        })
        .collect()
}

/// The frames of one row, as a trafgen packet: the bytes of one UDP frame,
/// with the last two bytes of the source address random per frame when
/// `spread` (65,536 sources of which the first 10,000 are installed).
fn trafgen_packet(src: Ipv4Addr, spread: bool) -> String {
    let frame = Frame::new(
        IpAddr::V4(src),
        "198.51.100.10".parse().expect("literal"),
        L4::Udp {
            sport: 40_000,
            dport: 53,
        },
    )
    .build();
    let mut parts: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
    if spread {
        // Ethernet 14 + IPv4 source at 12: bytes 28 and 29.
        parts[28] = "drnd()".into();
        parts[29] = "drnd()".into();
    }
    format!("{{ {} }}\n", parts.join(", "))
}

struct Lab {
    gen: Netns,
    dut: Netns,
    dir: TempDir,
}

impl Lab {
    fn new() -> Result<Lab> {
        let gen = Netns::new("tg")?;
        let dut = Netns::new("dut")?;
        veth(&gen, "g0", &dut, "d0")?;
        Ok(Lab {
            gen,
            dut,
            dir: TempDir::new("traffic")?,
        })
    }

    /// Sends `frames` frames of `packet` from one CPU; returns the seconds it took.
    fn send(&self, packet: &str, frames: u64) -> Result<f64> {
        let conf = self.dir.path.join("packet.cfg");
        fs::write(&conf, packet)?;
        // trafgen now and then gives up flushing its ring with EAGAIN on a
        // busy machine: try again.
        let mut last = String::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.gen.name))
                .args(["trafgen", "--dev", "g0", "--conf"])
                .arg(&conf)
                .args(["--cpus", "1", "--num", &frames.to_string(), "-C"])
                .output()
                .context("starting trafgen")?;
            if out.status.success() {
                return Ok(t.elapsed().as_secs_f64());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            progress(&format!("trafgen failed, trying again: {}", last.trim()));
        }
        bail!("trafgen failed: {last}")
    }

    fn bpftool(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.dut.name))
            .arg("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .context("starting bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    /// `run_time_ns` and `run_cnt` of program `id`.
    fn run_stats(&self, id: u32) -> Result<(u64, u64)> {
        let v = self.bpftool(&["prog", "show", "id", &id.to_string()])?;
        Ok((
            v["run_time_ns"].as_u64().unwrap_or(0),
            v["run_cnt"].as_u64().unwrap_or(0),
        ))
    }

    /// Sends the frames and reads the program's statistics around it.
    fn measure(&self, id: u32, packet: &str, frames: u64) -> Result<Value> {
        let (t0, n0) = self.run_stats(id)?;
        let secs = self.send(packet, frames)?;
        let (t1, n1) = self.run_stats(id)?;
        let runs = n1.saturating_sub(n0);
        ensure!(runs > 0, "the program did not run (run_cnt unchanged)");
        Ok(json!({
            "runs": runs,
            "ns_per_frame": (t1 - t0) as f64 / runs as f64,
            "frames_per_second": runs as f64 / secs,
        }))
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let started = Instant::now();
    let lab = Lab::new()?;
    let bpffs = BpffsDir::new()?;
    let mut dp = Dataplane::open(&DataplaneOptions {
        bpffs: bpffs.path.clone(),
        ..Default::default()
    })?;
    // Held open for the whole run; closed (stats off again) on exit.
    let _stats = sys::enable_stats().context("BPF_ENABLE_STATS")?;
    let dots_id = sys::prog_id(dp.program_fd()?.as_fd())?;
    let pass = dp.pass_program_fd()?;
    let pass_id = sys::prog_id(pass.as_fd())?;
    lab.dut.enter(|| dp.attach("d0", AttachMode::Native))??;
    let hit = source(PREFIXES / 2);
    let miss: Ipv4Addr = "192.0.2.1".parse()?;
    let mut rows = Vec::new();
    for (scope, full) in [("addresses", false), ("full", true)] {
        progress(&format!(
            "256 slots, {PREFIXES} host prefixes, {scope} scope"
        ));
        dp.apply(&slots(full))?;
        for (path, src, spread) in [
            ("hit", hit, false),
            ("miss", miss, false),
            ("mixed sources", source(0), true),
        ] {
            let r = lab.measure(dots_id, &trafgen_packet(src, spread), a.frames)?;
            progress(&format!("  {path}: {r}"));
            rows.push(json!({"program": "dots-ebpf", "scope": scope, "path": path, "result": r}));
        }
    }
    dp.detach("d0")?;
    progress("the empty program");
    lab.bpftool(&[
        "net",
        "attach",
        "xdpdrv",
        "id",
        &pass_id.to_string(),
        "dev",
        "d0",
    ])?;
    let r = lab.measure(pass_id, &trafgen_packet(miss, false), a.frames)?;
    progress(&format!("  {r}"));
    rows.push(json!({"program": "empty", "scope": "-", "path": "pass", "result": r}));
    lab.bpftool(&["net", "detach", "xdpdrv", "dev", "d0"])?;
    rows.extend(xdp_filter(&lab, hit, miss, a.frames)?);
    let out = json!({
        "kernel": tests::bench::kernel_release(),
        "frames_per_row": a.frames,
        "rows": rows,
    });
    write_json(&a.json, &out)?;
    write_doc(&a, &out)?;
    drop(pass);
    drop(dp);
    drop(bpffs);
    progress(&format!(
        "done in {:.0} s: {} and {}",
        started.elapsed().as_secs_f64(),
        a.json.display(),
        a.doc.display()
    ));
    Ok(())
}

/// Rules xdp-filter gets (one `xdp-filter ip` command each), the hit
/// source among them.
const XDP_FILTER_RULES: usize = 1_000;

/// xdp-filter (xdp-tools) on the same veth, the anchor of the data-plane
/// rows: hit and miss, with its own program's statistics.
fn xdp_filter(lab: &Lab, hit: Ipv4Addr, miss: Ipv4Addr, frames: u64) -> Result<Vec<Value>> {
    let pins = std::path::Path::new("/sys/fs/bpf/xdp-filter");
    if pins.exists() {
        progress("xdp-filter is loaded elsewhere (/sys/fs/bpf/xdp-filter exists): not measured");
        return Ok(Vec::new());
    }
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.dut.name))
            .args(args)
            .output()
            .with_context(|| format!("starting {args:?}"))?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    progress(&format!("xdp-filter with {XDP_FILTER_RULES} source rules"));
    run(&[
        "xdp-filter",
        "load",
        "--policy",
        "allow",
        "--features",
        "ipv4",
        "d0",
    ])?;
    let result = (|| -> Result<Vec<Value>> {
        let hit_index = (u32::from(hit) - 0x0a00_0000) as usize;
        for i in (0..XDP_FILTER_RULES).chain([hit_index]) {
            run(&["xdp-filter", "ip", &source(i).to_string(), "--mode", "src"])?;
        }
        let dir = pins.join("programs").join("d0");
        let pin = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .context("no xdp-filter program pinned")??
            .path();
        let id = lab.bpftool(&["prog", "show", "pinned", &pin.to_string_lossy()])?["id"]
            .as_u64()
            .context("program id")? as u32;
        let mut rows = Vec::new();
        for (path, src) in [("hit", hit), ("miss", miss)] {
            let r = lab.measure(id, &trafgen_packet(src, false), frames)?;
            progress(&format!("  {path}: {r}"));
            rows.push(
                json!({"program": "xdp-filter", "scope": "addresses", "path": path, "result": r}),
            );
        }
        Ok(rows)
    })();
    if let Err(e) = run(&["xdp-filter", "unload", "d0"]) {
        progress(&format!("unloading xdp-filter: {e:#}"));
    }
    result
}

fn write_doc(a: &Args, out: &Value) -> Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    writeln!(
        s,
        "Kernel {}, {} frames per row from trafgen on one CPU into a veth, XDP in native mode on the other end; 256 slots holding {PREFIXES} IPv4 host prefixes (the head-to-head configuration of the data-plane rows). Cost: the kernel's `run_time_ns / run_cnt` over the row.\n",
        out["kernel"].as_str().unwrap_or("?"),
        a.frames
    )?;
    writeln!(
        s,
        "| program | scope | frames | ns/frame (bpf_stats) | frames/s |"
    )?;
    writeln!(s, "|---|---|---|---:|---:|")?;
    for r in out["rows"].as_array().into_iter().flatten() {
        writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.0} |",
            r["program"].as_str().unwrap_or("?"),
            r["scope"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
            f(&r["result"]["ns_per_frame"]),
            f(&r["result"]["frames_per_second"])
        )?;
    }
    write_section(
        &a.doc,
        "traffic",
        "cargo xtask bench traffic",
        &s,
        "## Real traffic\n\nWritten by `cargo xtask bench traffic`.",
    )
}
