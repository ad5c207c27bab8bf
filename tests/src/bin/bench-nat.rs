//! `cargo xtask bench nat`: time from a mitigation request naming the
//! router's external address to the resolved set of internal devices, with
//! the router's conntrack table holding 100,000 real NATed flows.
//!
//! Lab: one LAN namespace with 100 addresses (10.0.0.0/16) sends UDP to
//! 1,000 ports of a target through a router namespace that masquerades to
//! 203.0.113.1; the 100,000 flows are real conntrack entries created by the
//! kernel. Then:
//! - `mirror` (what the agent does): load a [`CtMirror`] of the table once
//!   (subscribe to events, dump; timed separately as `mirror_load_ms`),
//!   then, several times, match the mirror in memory
//!   ([`NatTracker::track_entries`]);
//! - `full` / `filtered` (the former per-request path, for comparison):
//!   several times, open a ctnetlink socket, dump the table (whole, or
//!   kernel-filtered), match it ([`NatTracker::track`]);
//!
//! each against two scopes:
//! - `ports`: the external address, the translated source ports of one
//!   attacker's 1,000 flows (as the ISP saw them) and the target: 1 device;
//! - `address`: the external address and the target only: all 100 devices.
//!
//! Writes `--json FILE` (`entries`, `resolve_ms`: mirror, ports scope,
//! all-to-target table; `mirror_load_ms`, ...) and replaces the `## NAT`
//! section of `--doc FILE`.
//!
//! Arguments: `--json FILE --doc FILE [--flows N] [--runs N]`.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_agent::{
    enforce::{Range, SlotSpec},
    nat::{self, Conntrack, CtMirror, EventSocket, NatAction, NatTracker},
};
use serde_json::json;
use tests::{
    bench::{write_json, write_section, BenchArgs},
    sh, unique, veth, Netns,
};

const HOSTS: u32 = 100;
const TARGET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const BASE_PORT: u16 = 10_000;
const SRC_PORT: u16 = 7_000;

struct Args {
    json: PathBuf,
    doc: PathBuf,
    flows: u32,
    runs: usize,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse("nat", &["--flows", "--runs"], &[])?;
    let a = Args {
        flows: b.value("--flows", 100_000)?,
        runs: b.value("--runs", 9)?,
        json: b.json,
        doc: b.doc,
    };
    if !a.flows.is_multiple_of(HOSTS) || a.flows / HOSTS > 50_000 {
        bail!(
            "--flows must be a multiple of {HOSTS}, at most {}",
            HOSTS * 50_000
        );
    }
    Ok(a)
}

fn host_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1 + (i / 200) as u8, 1 + (i % 200) as u8)
}

struct Lab {
    host: Netns,
    cpe: Netns,
    _target: Netns,
}

fn lab() -> Result<Lab> {
    let (host, cpe, target) = (Netns::new("bh")?, Netns::new("bcpe")?, Netns::new("btgt")?);
    let lan = unique("bl");
    veth(&host, "eth0", &cpe, &lan)?;
    veth(&cpe, "wan", &target, "eth0")?;
    let mut batch = String::new();
    for i in 0..HOSTS {
        writeln!(batch, "addr add {}/16 dev eth0", host_addr(i))?;
    }
    writeln!(batch, "route add default via 10.0.0.1")?;
    let file = std::env::temp_dir().join(format!("{}.ip", unique("dots-bench-nat-")));
    std::fs::write(&file, batch)?;
    let r = host.ip(&["-batch", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    r?;
    cpe.ip(&["addr", "add", "10.0.0.1/16", "dev", &lan])?;
    cpe.ip(&["addr", "add", "203.0.113.1/24", "dev", "wan"])?;
    cpe.ip(&["route", "add", "default", "via", "203.0.113.2"])?;
    target.ip(&["addr", "add", "203.0.113.2/24", "dev", "eth0"])?;
    target.ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])?;
    cpe.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // Unreplied UDP entries live 30 s by default: keep them for the run.
    cpe.exec(&[
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_udp_timeout=600",
    ])?;
    // The target drops quietly (no ICMP errors back through the router).
    let rules = "table ip nat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan\" masquerade\n }\n}\n";
    let file = std::env::temp_dir().join(format!("{}.nft", unique("dots-bench-nat-")));
    std::fs::write(&file, rules)?;
    let r = cpe.exec(&["nft", "-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    r?;
    let drop =
        "table inet f {\n chain in {\n  type filter hook input priority 0; policy drop;\n }\n}\n";
    let file = std::env::temp_dir().join(format!("{}.nft", unique("dots-bench-nat-")));
    std::fs::write(&file, drop)?;
    let r = target.exec(&["nft", "-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    r?;
    Ok(Lab {
        host,
        cpe,
        _target: target,
    })
}

/// Sends one datagram per flow: host `i` from port SRC_PORT to
/// TARGET:BASE_PORT+p. Paced, since a veth peer's backlog holds 1,000
/// packets; sending again is harmless (same flows).
fn send_flows(host: &Netns, per_host: u32, spread: bool) -> Result<()> {
    host.enter(|| -> Result<()> {
        for i in 0..HOSTS {
            let s = UdpSocket::bind((host_addr(i), SRC_PORT))?;
            for p in 0..per_host {
                // Spread: over 100 destinations, 1 % of the flows to TARGET.
                let dst = if spread {
                    Ipv4Addr::new(198, 51, 100, 10 + (p % 100) as u8)
                } else {
                    TARGET
                };
                s.send_to(b"x", (dst, BASE_PORT + p as u16))?;
                if p % 250 == 249 {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
        }
        Ok(())
    })?
}

fn count(cpe: &Netns) -> Result<u64> {
    // `conntrack -C` prints the count of the current namespace's table.
    Ok(cpe.exec(&["conntrack", "-C"])?.trim().parse()?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = args()?;
    let per_host = a.flows / HOSTS;
    let max: u64 = sh(&["sysctl", "-n", "net.netfilter.nf_conntrack_max"])?
        .trim()
        .parse()?;
    if max < u64::from(a.flows) + 1000 {
        bail!(
            "net.netfilter.nf_conntrack_max is {max}: raise it above {} first",
            a.flows
        );
    }
    let lab = lab()?;
    let router = lab.cpe.enter(nat::router_addresses)?;
    let mut tables = Vec::new();
    let mut entries = 0;
    let mut fill_s = 0.0;
    for spread in [false, true] {
        lab.cpe.exec(&["conntrack", "-F"])?;
        eprintln!(
            "creating {} NATed flows ({HOSTS} hosts x {per_host} ports, {})",
            a.flows,
            if spread {
                "100 destinations"
            } else {
                "all to the target"
            }
        );
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..5 {
            send_flows(&lab.host, per_host, spread)?;
            n = count(&lab.cpe)?;
            if n >= u64::from(a.flows) {
                break;
            }
            eprintln!("  {n} entries so far, sending again");
        }
        if n < u64::from(a.flows) {
            bail!("only {n} conntrack entries after 5 rounds");
        }
        entries = n;
        fill_s = t.elapsed().as_secs_f64();
        eprintln!("{n} entries in {fill_s:.1} s");
        let (load, rows) = measure(&lab, &router, a.runs)?;
        tables.push(json!({
            "table": if spread { "spread" } else { "all-to-target" },
            "entries": n,
            "mirror": load,
            "rows": rows,
        }));
    }
    // Headline: the worst case (every entry goes to the target through the
    // external address), with the path the agent takes (the mirror).
    let headline = tables[0]["rows"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|x| x["scope"] == "ports" && x["method"] == "mirror")
        })
        .map(|x| x["resolve_ms"].clone())
        .unwrap_or(serde_json::Value::Null);
    let mirror_load_ms = tables[0]["mirror"]["load_ms"].clone();
    let kernel = sh(&["uname", "-r"])?.trim().to_string();
    let out = json!({
        "entries": entries,
        "resolve_ms": headline,
        "mirror_load_ms": mirror_load_ms,
        "runs": a.runs,
        "kernel": kernel,
        "fill_s": fill_s,
        "tables": tables,
    });
    write_json(&a.json, &out)?;
    write_doc(&a, &out)?;
    eprintln!("wrote {} and {}", a.json.display(), a.doc.display());
    Ok(())
}

/// Times the mirror's initial load, and request -> device set for two scopes
/// and three methods on the current table.
fn measure(
    lab: &Lab,
    router: &[IpAddr],
    runs: usize,
) -> Result<(serde_json::Value, Vec<serde_json::Value>)> {
    let attacker = host_addr(HOSTS / 2);
    // The translated ports of the attacker's flows to the target, as the
    // ISP would see them: from one dump before timing.
    let snapshot = lab
        .cpe
        .enter(|| Conntrack::open().and_then(|mut c| c.dump()))??;
    let mut xports: Vec<u16> = snapshot
        .iter()
        .filter(|e| {
            e.original.src == IpAddr::V4(attacker)
                && e.original.dst == IpAddr::V4(TARGET)
                && e.reply.dst == IpAddr::V4(EXTERNAL)
        })
        .filter_map(|e| e.reply.dst_port)
        .collect();
    drop(snapshot);
    xports.sort_unstable();
    xports.dedup();
    if xports.is_empty() {
        bail!("no NATed flow of {attacker} in the table");
    }
    let mut ranges: Vec<Range<u16>> = Vec::new();
    for p in xports {
        match ranges.last_mut() {
            Some(r) if r.upper + 1 == p => r.upper = p,
            _ => ranges.push(Range::single(p)),
        }
    }
    ranges.truncate(256);
    let base = SlotSpec {
        sources: vec![format!("{EXTERNAL}/32").parse()?],
        targets: vec![format!("{TARGET}/32").parse()?],
        protocols: vec![17],
        ..SlotSpec::default()
    };
    let by_ports = SlotSpec {
        source_ports: ranges,
        ..base.clone()
    };
    // The mirror: subscribe, then load (the agent's start), `runs` times;
    // the last one is kept for the requests.
    let (mut loads, mut mirror) = (Vec::new(), None);
    for _ in 0..runs {
        let (t, m) = lab.cpe.enter(|| -> Result<_> {
            let _events = EventSocket::open()?;
            let start = Instant::now();
            let mut ct = Conntrack::open()?;
            let m = CtMirror::load(&mut ct)?;
            Ok((start.elapsed(), m))
        })??;
        loads.push(t.as_secs_f64() * 1e3);
        mirror = Some(m);
    }
    let mirror = mirror.context("no mirror")?;
    let load_max = loads.iter().cloned().fold(0.0, f64::max);
    let load = json!({
        "entries": mirror.len(),
        "load_ms": median(&mut loads),
        "load_ms_max": load_max,
        "heap_mb": mirror.heap_bytes() as f64 / (1 << 20) as f64,
    });
    eprintln!("mirror load: {load}");
    let mut results = Vec::new();
    for (name, spec) in [("ports", &by_ports), ("address", &base)] {
        let mut total = Vec::new();
        let mut devices = 0;
        for _ in 0..runs {
            let start = Instant::now();
            let mut tracker = NatTracker::new(router.to_vec(), NatAction::Device);
            tracker.track_entries(0u32, spec, mirror.entries());
            devices = tracker.devices(&0).map(|d| d.len()).unwrap_or(0);
            total.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let max_ms = total.iter().cloned().fold(0.0, f64::max);
        let want = if name == "ports" { 1 } else { HOSTS as usize };
        if devices != want {
            bail!("mirror/{name}: {devices} devices found, expected {want}");
        }
        let med = median(&mut total);
        let r = json!({
            "scope": name,
            "method": "mirror",
            "entries_dumped": 0,
            "entries_matched": mirror.len(),
            "devices": devices,
            "resolve_ms": med,
            "resolve_ms_max": max_ms,
            "dump_ms": 0.0,
            "match_ms": med,
        });
        eprintln!("{r}");
        results.push(r);
    }
    drop(mirror);
    for method in ["full", "filtered"] {
        for (name, spec) in [("ports", &by_ports), ("address", &base)] {
            let (mut total, mut dumps, mut matches) = (Vec::new(), Vec::new(), Vec::new());
            let (mut devices, mut seen) = (0, 0);
            for _ in 0..runs {
                let (t_total, t_dump, n, d) = lab.cpe.enter(|| -> Result<_> {
                    let start = Instant::now();
                    let mut ct = Conntrack::open()?;
                    let table = if method == "full" {
                        ct.dump()?
                    } else {
                        nat::snapshot_for(&mut ct, spec, router)?
                    };
                    let dumped = start.elapsed();
                    let mut tracker = NatTracker::new(router.to_vec(), NatAction::Device);
                    tracker.track(0u32, spec, &table);
                    let devs = tracker.devices(&0).map(|d| d.len()).unwrap_or(0);
                    Ok((start.elapsed(), dumped, table.len(), devs))
                })??;
                total.push(t_total.as_secs_f64() * 1e3);
                dumps.push(t_dump.as_secs_f64() * 1e3);
                matches.push((t_total - t_dump).as_secs_f64() * 1e3);
                seen = n;
                devices = d;
            }
            let max_ms = total.iter().cloned().fold(0.0, f64::max);
            let want = if name == "ports" { 1 } else { HOSTS as usize };
            if devices != want {
                bail!("{method}/{name}: {devices} devices found, expected {want}");
            }
            let r = json!({
                "scope": name,
                "method": method,
                "entries_dumped": seen,
                "entries_matched": seen,
                "devices": devices,
                "resolve_ms": median(&mut total),
                "resolve_ms_max": max_ms,
                "dump_ms": median(&mut dumps),
                "match_ms": median(&mut matches),
            });
            eprintln!("{r}");
            results.push(r);
        }
    }
    Ok((load, results))
}

fn write_doc(a: &Args, out: &serde_json::Value) -> Result<()> {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    writeln!(
        s,
        "Time from a request naming the router's external address to the resolved device set. *mirror* (what the agent does): match every entry of the in-memory mirror of the conntrack table's source-NATed entries (`CtMirror`, loaded once at start by a dump, kept current by NEW/DESTROY events; `NatTracker::track_entries`). For comparison, the former per-request path: open a ctnetlink socket, dump the conntrack table (*full*, or *filtered* in the kernel with `CTA_FILTER` on reply address 203.0.113.1, original destination and protocol), match every entry returned (`NatTracker::track`). Each table holds {} real entries: UDP flows of {HOSTS} LAN addresses from one port each to 1,000 destination ports, masqueraded by nftables to 203.0.113.1; *all to target*: every flow goes to the target; *spread*: over 100 destinations, 1 % to the target. Kernel {}, median of {} runs; *ports*: scope = external address + one attacker's translated ports + target + UDP (1 device); *address*: external address + target + UDP (all {HOSTS} devices).\n",
        out["entries"], out["kernel"].as_str().unwrap_or("?"), a.runs
    )?;
    writeln!(s, "| table | method | scope | entries read | devices | resolve (ms) | max (ms) | dump (ms) | match (ms) |")?;
    writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|")?;
    let table_name = |t: &serde_json::Value| {
        if t["table"] == "spread" {
            "spread"
        } else {
            "all to target"
        }
    };
    for t in out["tables"].as_array().into_iter().flatten() {
        let table = table_name(t);
        for r in t["rows"].as_array().into_iter().flatten() {
            let method = match r["method"].as_str().unwrap_or("?") {
                "mirror" => "**mirror**",
                "full" => "full dump",
                "filtered" => "filtered dump",
                m => m,
            };
            writeln!(
                s,
                "| {table} | {method} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r["scope"].as_str().unwrap_or("?"),
                r["entries_matched"],
                r["devices"],
                f(&r["resolve_ms"]),
                f(&r["resolve_ms_max"]),
                f(&r["dump_ms"]),
                f(&r["match_ms"])
            )?;
        }
    }
    writeln!(s)?;
    writeln!(
        s,
        "Initial load of the mirror (once, at the agent's start and after lost events: subscribe, dump, keep the source-NATed entries), median of {} runs:\n",
        a.runs
    )?;
    writeln!(
        s,
        "| table | entries kept | load (ms) | max (ms) | heap (MiB) |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|")?;
    for t in out["tables"].as_array().into_iter().flatten() {
        let m = &t["mirror"];
        writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            table_name(t),
            m["entries"],
            f(&m["load_ms"]),
            f(&m["load_ms_max"]),
            f(&m["heap_mb"])
        )?;
    }
    writeln!(s)?;
    write_section(&a.doc, "nat", "cargo xtask bench nat", &s, "## NAT")
}
