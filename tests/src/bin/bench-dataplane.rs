//! `bench-dataplane`: the per-packet cost of the XDP classifier, measured with
//! `BPF_PROG_TEST_RUN`, against an empty XDP program and against `xdp-filter`
//! from xdp-tools. Run it through `cargo xtask bench dataplane`.
//!
//! Every measurement interleaves the program under test with the empty
//! program (`dots_xdp_pass`, from the same object) on the same packet, `runs`
//! times with `repeat` repetitions each, and keeps the median of each.
//!
//! Arguments: `--json FILE --doc FILE [--repeat N] [--runs N] [--quick]
//! [--head-to-head]` (the last: only the rounds against xdp-filter at its
//! largest rule set, and no doc is written).
//! The doc's text between the `<!-- bench:begin -->` and `<!-- bench:end -->`
//! markers is replaced; the rest (method, analysis) is kept.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use dots_agent::enforce::{
    clock, sys, Dataplane, DataplaneOptions, Range, Slot, SlotChange, SlotId, SlotLimits, SlotSpec,
};
use ipnet::IpNet;
use serde_json::{json, Value};
use tests::bench::{write_json, write_section, BenchArgs};
use tests::packet::{Frame, L4};
use tests::{sh, BpffsDir, Netns};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// Nanoseconds per packet at 10GbE line rate (14.88 Mpps) on one core.
const LINE_RATE_NS: u32 = 67;
/// Where xdp-filter pins its maps and programs (fixed by xdp-tools).
const XDP_FILTER_DIR: &str = "/sys/fs/bpf/xdp-filter";
/// `xdp-filter`'s address maps are compiled with this many entries.
const XDP_FILTER_CAPACITY: usize = 10_000;
/// Rules added with one `xdp-filter ip` command each; the rest are written
/// straight into its pinned maps.
const XDP_FILTER_BY_COMMAND: usize = 1_000;

struct Args {
    json: PathBuf,
    doc: PathBuf,
    repeat: u32,
    runs: usize,
    quick: bool,
    /// Only the head-to-head rounds against xdp-filter (a quick check).
    head_to_head: bool,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse(
        "dataplane",
        &["--repeat", "--runs"],
        &["--quick", "--head-to-head"],
    )?;
    let a = Args {
        repeat: b.value("--repeat", 1_000_000)?,
        runs: b.value("--runs", 9)?,
        quick: b.flag("--quick"),
        head_to_head: b.flag("--head-to-head"),
        json: b.json,
        doc: b.doc,
    };
    ensure!(
        a.runs >= 1 && a.repeat >= 1,
        "--runs and --repeat must be at least 1"
    );
    Ok(a)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// What the benchmark slots constrain: every field (source and target
/// prefixes, protocol, source and target ports), or only the addresses, which
/// is what xdp-filter's exact-address deny rules do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Full,
    Addresses,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Addresses => "addresses",
        }
    }
}

/// Host prefixes (/32, /128) or the shorter row set (/24, /48).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    Short,
}

impl Kind {
    fn len(self, f: Family) -> u8 {
        match (self, f) {
            (Kind::Host, Family::V4) => 32,
            (Kind::Host, Family::V6) => 128,
            (Kind::Short, Family::V4) => 24,
            (Kind::Short, Family::V6) => 48,
        }
    }
}

/// The `i`-th source prefix of a family and kind. Host addresses come from
/// 10.0.0.0/8 and 2001:db8:1::/64; /24s from 16.0.0.0 up, /48s from 2400::/12.
fn prefix(f: Family, kind: Kind, i: usize) -> IpNet {
    let i = i as u32;
    let len = kind.len(f);
    let addr: IpAddr = match (f, kind) {
        (Family::V4, Kind::Host) => Ipv4Addr::from(0x0a00_0000 + i).into(),
        (Family::V4, Kind::Short) => Ipv4Addr::from(0x1000_0000 + (i << 8)).into(),
        (Family::V6, Kind::Host) => {
            Ipv6Addr::from((0x2001_0db8_0001u128 << 80) | u128::from(i)).into()
        }
        (Family::V6, Kind::Short) => {
            Ipv6Addr::from((0x2400u128 << 112) | (u128::from(i) << 80)).into()
        }
    };
    IpNet::new(addr, len).expect("prefix length is valid")
}

/// A source inside the `i`-th prefix (host 7 of a shorter prefix).
fn source_in(f: Family, kind: Kind, i: usize) -> IpAddr {
    let p = prefix(f, kind, i);
    match (p.network(), kind) {
        (a, Kind::Host) => a,
        (IpAddr::V4(a), Kind::Short) => Ipv4Addr::from(u32::from(a) + 7).into(),
        (IpAddr::V6(a), Kind::Short) => Ipv6Addr::from(u128::from(a) + 7).into(),
    }
}

/// A source outside every prefix the benchmark installs.
fn miss_source(f: Family) -> IpAddr {
    match f {
        Family::V4 => Ipv4Addr::new(192, 0, 2, 1).into(),
        Family::V6 => "2001:db8:dead::1"
            .parse::<Ipv6Addr>()
            .expect("literal")
            .into(),
    }
}

const TARGET_PORT: u16 = 53;
const SOURCE_PORT: u16 = 40_000;

/// A UDP frame from `src` to the slots' target, source port 40000, target port 53.
fn packet(src: IpAddr) -> Vec<u8> {
    let dst: IpAddr = match src {
        IpAddr::V4(_) => Ipv4Addr::new(198, 51, 100, 10).into(),
        IpAddr::V6(_) => "2001:db8:ffff::10"
            .parse::<Ipv6Addr>()
            .expect("literal")
            .into(),
    };
    Frame::new(
        src,
        dst,
        L4::Udp {
            sport: SOURCE_PORT,
            dport: TARGET_PORT,
        },
    )
    .build()
}

/// `slots` slots sharing `prefixes` source prefixes of each family round-robin.
/// Every slot constrains every field (target prefix, protocol, source and
/// target port), so a hit walks every lookup of the classifier.
fn slot_specs(slots: usize, prefixes: usize, kind: Kind, scope: Scope) -> BTreeMap<SlotId, Slot> {
    // An hour ahead, as a mitigation's lifetime: the program checks it on
    // every hit.
    let expires = clock::boot_ns_after(std::time::Duration::from_secs(3600));
    let mut out: BTreeMap<SlotId, SlotSpec> = BTreeMap::new();
    for s in 0..slots {
        let mut sources = Vec::new();
        for f in FAMILIES {
            sources.extend((s..prefixes).step_by(slots).map(|i| prefix(f, kind, i)));
        }
        out.insert(
            s as SlotId,
            SlotSpec {
                sources,
                targets: vec![
                    "198.51.100.0/24".parse().expect("literal"),
                    "2001:db8:ffff::/48".parse().expect("literal"),
                ],
                protocols: vec![17],
                source_ports: vec![Range::new(1024, 65535)],
                target_ports: vec![Range::single(TARGET_PORT)],
                icmp_types: Vec::new(),
                action: Default::default(),
            },
        );
        if scope == Scope::Addresses {
            if let Some(spec) = out.get_mut(&(s as SlotId)) {
                spec.protocols.clear();
                spec.source_ports.clear();
                spec.target_ports.clear();
            }
        }
    }
    out.into_iter()
        .map(|(id, spec)| (id, Slot::new(spec, expires)))
        .collect()
}

/// One row of results.
struct Row {
    program: &'static str,
    /// `Scope::name` of the slots; xdp-filter rows are "addresses".
    scope: &'static str,
    family: Family,
    path: &'static str,
    slots: usize,
    prefixes: usize,
    prefix_len: u8,
    ns: u32,
    baseline: u32,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "program": self.program,
            "scope": self.scope,
            "family": self.family.name(),
            "path": self.path,
            "slots": self.slots,
            "prefixes": self.prefixes,
            "prefix_len": self.prefix_len,
            "ns_per_packet": self.ns,
            "baseline_ns": self.baseline,
        })
    }

    fn delta(&self) -> i64 {
        i64::from(self.ns) - i64::from(self.baseline)
    }
}

struct Bench {
    repeat: u32,
    runs: usize,
}

impl Bench {
    /// Medians of `prog` and of the empty program `base` on `packet`, run in
    /// alternation. Fails when `prog` does not return `expect`.
    fn measure(
        &self,
        prog: BorrowedFd<'_>,
        base: BorrowedFd<'_>,
        packet: &[u8],
        expect: u32,
    ) -> Result<(u32, u32)> {
        // Warm up caches, branch predictors and the CPU clock.
        let warm =
            sys::test_run(prog, packet, (self.repeat / 10).max(1)).context("BPF_PROG_TEST_RUN")?;
        ensure!(
            warm.action == expect,
            "program returned action {} instead of {expect} ({})",
            warm.action,
            if expect == XDP_DROP {
                "hit should drop"
            } else {
                "miss should pass"
            }
        );
        let (mut p, mut b) = (Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let rb =
                sys::test_run(base, packet, self.repeat).context("BPF_PROG_TEST_RUN (baseline)")?;
            ensure!(
                rb.action == XDP_PASS,
                "the empty program returned {}",
                rb.action
            );
            let rp = sys::test_run(prog, packet, self.repeat).context("BPF_PROG_TEST_RUN")?;
            ensure!(
                rp.action == expect,
                "program returned action {} instead of {expect}",
                rp.action
            );
            b.push(rb.duration_ns);
            p.push(rp.duration_ns);
        }
        Ok((median(p), median(b)))
    }
}

impl Bench {
    /// Two programs and the empty one, run in turn in each round, so a slow
    /// phase of the machine hits all three alike. Medians of each.
    fn measure_pair(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        base: BorrowedFd<'_>,
        packet: &[u8],
        expect: u32,
    ) -> Result<(u32, u32, u32)> {
        let (mut ra, mut rb, mut r0) = (Vec::new(), Vec::new(), Vec::new());
        for fd in [a, b] {
            let warm = sys::test_run(fd, packet, (self.repeat / 10).max(1))?;
            ensure!(
                warm.action == expect,
                "program returned {} instead of {expect}",
                warm.action
            );
        }
        for _ in 0..self.runs {
            r0.push(sys::test_run(base, packet, self.repeat)?.duration_ns);
            for (fd, out) in [(a, &mut ra), (b, &mut rb)] {
                let r = sys::test_run(fd, packet, self.repeat)?;
                ensure!(
                    r.action == expect,
                    "program returned {} instead of {expect}",
                    r.action
                );
                out.push(r.duration_ns);
            }
        }
        Ok((median(ra), median(rb), median(r0)))
    }
}

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        ((u64::from(v[n / 2 - 1]) + u64::from(v[n / 2])) / 2) as u32
    }
}

fn progress(what: &str) {
    eprintln!("bench-dataplane: {what}");
}

/// Control path: the time to put one more mitigation (one host source) in
/// and take it out again, with what `dp` holds installed. Median over 21
/// rounds, in milliseconds.
fn control_change(dp: &mut Dataplane) -> Result<(f64, f64)> {
    let spec = SlotSpec {
        sources: vec!["192.0.2.77/32".parse()?],
        targets: vec!["198.51.100.0/24".parse()?],
        ..SlotSpec::default()
    };
    let slot = Slot::new(
        spec,
        clock::boot_ns_after(std::time::Duration::from_secs(3600)),
    );
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        let t = Instant::now();
        dp.apply_change(&SlotChange {
            add: vec![(CONTROL_SLOT, slot.clone())],
            ..SlotChange::default()
        })?;
        add.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        dp.apply_change(&SlotChange {
            remove: vec![CONTROL_SLOT],
            ..SlotChange::default()
        })?;
        remove.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok((med(add), med(remove)))
}

/// A slot the benchmark's configurations of 64 slots leave free.
const CONTROL_SLOT: SlotId = 200;

/// One control-path measurement: prefixes installed, add and remove ms.
struct Control {
    prefixes: usize,
    add_ms: f64,
    remove_ms: f64,
}

/// The dots-ebpf rows.
fn bench_dots(
    bench: &Bench,
    quick: bool,
    rows: &mut Vec<Row>,
    control: &mut Vec<Control>,
) -> Result<()> {
    let bpffs = BpffsDir::new()?;
    let mut dp = Dataplane::open(&DataplaneOptions {
        bpffs: bpffs.path.clone(),
        // One slot may hold every prefix of both families.
        limits: SlotLimits {
            max_sources: 4 * dots_common::MAX_SOURCE_PREFIXES as usize,
            ..Default::default()
        },
    })
    .context("loading the classifier")?;
    let prog = dp.program_fd()?;
    let base = dp.pass_program_fd()?;
    let big = if quick { 10_000 } else { 100_000 };
    let mut configs = vec![(0, 0)];
    for slots in [1, 64, 256] {
        for prefixes in [1, 1_000, big] {
            // Every slot needs a source of its own.
            if prefixes >= slots {
                configs.push((slots, prefixes));
            }
        }
    }
    let sets = [
        (Kind::Host, Scope::Full),
        (Kind::Host, Scope::Addresses),
        (Kind::Short, Scope::Full),
    ];
    for (kind, scope) in sets {
        for &(slots, prefixes) in &configs {
            if (kind, scope) != (Kind::Host, Scope::Full) && slots == 0 {
                continue; // nothing installed: the same as the first rows
            }
            let lens = format!("/{} and /{}", kind.len(Family::V4), kind.len(Family::V6));
            progress(&format!(
                "dots-ebpf: installing {slots} slots ({} scope), {prefixes} {lens} prefixes per family",
                scope.name()
            ));
            let t = Instant::now();
            // Each configuration is applied over the previous one: the apply
            // step writes only the differences.
            let report = dp
                .apply(&slot_specs(slots, prefixes, kind, scope))
                .context("applying slots")?;
            progress(&format!(
                "  applied in {:.1}s ({} map writes); measuring",
                t.elapsed().as_secs_f64(),
                report.writes
            ));
            if (kind, scope) == (Kind::Host, Scope::Full) && (slots == 0 || slots == 64) {
                let (add_ms, remove_ms) = control_change(&mut dp)?;
                progress(&format!(
                    "  one more mitigation: in {add_ms:.3} ms, out {remove_ms:.3} ms"
                ));
                control.push(Control {
                    prefixes: 2 * prefixes,
                    add_ms,
                    remove_ms,
                });
            }
            for f in FAMILIES {
                let mut paths = vec![("miss", miss_source(f), XDP_PASS)];
                if slots > 0 {
                    paths.insert(0, ("hit", source_in(f, kind, prefixes / 2), XDP_DROP));
                }
                for (path, src, expect) in paths {
                    let (ns, baseline) = bench
                        .measure(prog.as_fd(), base.as_fd(), &packet(src), expect)
                        .with_context(|| {
                            format!(
                                "dots-ebpf {} {path}, {slots} slots, {prefixes} prefixes",
                                f.name()
                            )
                        })?;
                    progress(&format!(
                        "  {} {path}: {ns} ns/packet (empty program {baseline} ns)",
                        f.name()
                    ));
                    rows.push(Row {
                        program: "dots-ebpf",
                        scope: scope.name(),
                        family: f,
                        path,
                        slots,
                        prefixes,
                        prefix_len: kind.len(f),
                        ns,
                        baseline,
                    });
                }
            }
        }
    }
    dp.apply(&BTreeMap::new())?;
    drop(prog);
    drop(base);
    drop(dp);
    drop(bpffs);
    Ok(())
}

/// xdp-filter loaded on a veth in a namespace of our own; unloaded, and the
/// namespace deleted, on drop.
struct XdpFilter {
    ns: Netns,
    iface: &'static str,
    /// libxdp's state directory did not exist before: remove it if left empty.
    libxdp_dir_is_ours: bool,
}

/// libxdp's own directory in bpffs (dispatcher state).
const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl XdpFilter {
    fn load() -> Result<XdpFilter> {
        if Path::new(XDP_FILTER_DIR).exists() {
            bail!("{XDP_FILTER_DIR} exists: xdp-filter is loaded somewhere already; unload it (xdp-filter unload --all) first");
        }
        let libxdp_dir_is_ours = !Path::new(LIBXDP_DIR).exists();
        let ns = Netns::new("xf")?;
        let xf = XdpFilter {
            ns,
            iface: "xf0",
            libxdp_dir_is_ours,
        };
        xf.ns
            .ip(&["link", "add", "xf0", "type", "veth", "peer", "name", "xf1"])?;
        xf.ns.ip(&["link", "set", "xf0", "up"])?;
        xf.ns.ip(&["link", "set", "xf1", "up"])?;
        // Only the IPv4 and IPv6 features: no port or Ethernet parsing. Policy
        // allow: unmatched packets pass, deny rules drop.
        xf.run(&[
            "xdp-filter",
            "load",
            "--policy",
            "allow",
            "--features",
            "ipv4,ipv6",
            "xf0",
        ])?;
        Ok(xf)
    }

    /// Runs a command in the namespace's network stack only: `ip netns exec`
    /// would also give it a fresh /sys without our bpffs.
    fn run(&self, args: &[&str]) -> Result<String> {
        let net = format!("--net=/run/netns/{}", self.ns.name);
        let mut full = vec!["nsenter", net.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// xdp-filter's own program (not a libxdp dispatcher), as pinned by xdp-filter.
    fn program(&self) -> Result<(OwnedFd, String)> {
        let dir = Path::new(XDP_FILTER_DIR).join("programs").join(self.iface);
        let entry = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .with_context(|| format!("no program pinned in {}", dir.display()))??;
        let pin = entry.path();
        let fd = sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let info: Value = serde_json::from_str(&sh(&[
            "bpftool",
            "-j",
            "prog",
            "show",
            "pinned",
            &pin.to_string_lossy(),
        ])?)?;
        let id = info["id"].as_u64().unwrap_or(0);
        let name = info["name"].as_str().unwrap_or("?").to_string();
        // What is attached to the interface: the program itself, or a dispatcher.
        let net: Value =
            serde_json::from_str(&self.run(&["bpftool", "-j", "net", "show", "dev", self.iface])?)?;
        let attached = net[0]["xdp"][0]["id"].as_u64().unwrap_or(0);
        let how = if attached == id {
            format!("program `{name}` (id {id}), attached directly to the veth (libxdp loaded no dispatcher)")
        } else {
            format!("program `{name}` (id {id}); the veth runs libxdp's dispatcher (id {attached}), which is not measured")
        };
        Ok((fd, how))
    }

    /// Adds deny rules for sources `from..to` of both families with one
    /// `xdp-filter ip` command each.
    fn add_by_command(&self, from: usize, to: usize) -> Result<()> {
        for i in from..to {
            for f in FAMILIES {
                let addr = prefix(f, Kind::Host, i).addr().to_string();
                self.run(&["xdp-filter", "ip", &addr, "--mode", "src"])?;
            }
        }
        Ok(())
    }

    /// Adds the same rules as `xdp-filter ip ADDR --mode src` does, straight
    /// into its pinned per-CPU hash maps: value 1 (its "source" flag) per CPU.
    fn add_direct(&self, from: usize, to: usize) -> Result<()> {
        let cpus = possible_cpus()?;
        let value = vec![1u64; cpus];
        for f in FAMILIES {
            let name = match f {
                Family::V4 => "filter_ipv4",
                Family::V6 => "filter_ipv6",
            };
            let pin = Path::new(XDP_FILTER_DIR).join(name);
            let map = sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
            for i in from..to {
                let key: Vec<u8> = match prefix(f, Kind::Host, i).addr() {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                map_update(map.as_fd(), &key, &value)
                    .with_context(|| format!("writing a rule into {}", pin.display()))?;
            }
        }
        Ok(())
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["xdp-filter", "unload", self.iface]) {
            eprintln!("bench-dataplane: unloading xdp-filter: {e:#}");
        }
        if self.libxdp_dir_is_ours {
            // Fails, harmlessly, when libxdp still keeps something there.
            let _ = fs::remove_dir(LIBXDP_DIR);
        }
        // The namespace (and the veth) go when `ns` drops, right after this.
    }
}

/// `BPF_MAP_UPDATE_ELEM` (command 2) with `BPF_ANY`.
fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u64]) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the map-element member of `union bpf_attr`; key and
    // value point to buffers of the map's key size and per-CPU value size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            2 as libc::c_long,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Number of possible CPUs (the per-CPU value count), from "0-1" style lists.
fn possible_cpus() -> Result<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        n = n.max(hi.parse::<usize>()? + 1);
        let _: usize = lo.parse()?;
    }
    Ok(n)
}

/// Notes gathered while measuring xdp-filter, for the doc.
#[derive(Default)]
struct XdpFilterNotes {
    program: String,
    command_rules: usize,
    command_secs: f64,
    direct_rules: usize,
    direct_secs: f64,
}

/// The xdp-filter rows. `base` is the empty dots program.
fn bench_xdp_filter(
    bench: &Bench,
    args: &Args,
    base: BorrowedFd<'_>,
    dp: &mut Dataplane,
    rows: &mut Vec<Row>,
) -> Result<XdpFilterNotes> {
    progress("xdp-filter: loading on a veth in a private network namespace");
    let xf = XdpFilter::load()?;
    let (prog, how) = xf.program()?;
    let mut notes = XdpFilterNotes {
        program: how,
        ..Default::default()
    };
    progress(&format!("  measuring {}", notes.program));
    let counts: &[usize] = if args.head_to_head {
        &[XDP_FILTER_CAPACITY]
    } else if args.quick {
        &[0, 1, 100, XDP_FILTER_CAPACITY]
    } else {
        &[0, 1, 1_000, XDP_FILTER_CAPACITY]
    };
    let mut have = 0;
    for &n in counts {
        if n > have {
            let by_command = n.min(XDP_FILTER_BY_COMMAND);
            if by_command > have {
                progress(&format!("  adding rules {have}..{by_command} per family with `xdp-filter ip` (one command each)"));
                let t = Instant::now();
                xf.add_by_command(have, by_command)?;
                notes.command_secs += t.elapsed().as_secs_f64();
                notes.command_rules += 2 * (by_command - have);
                have = by_command;
            }
            if n > have {
                progress(&format!(
                    "  writing rules {have}..{n} per family straight into xdp-filter's maps"
                ));
                let t = Instant::now();
                xf.add_direct(have, n)?;
                notes.direct_secs += t.elapsed().as_secs_f64();
                notes.direct_rules += 2 * (n - have);
                have = n;
            }
        }
        if n == XDP_FILTER_CAPACITY {
            head_to_head(bench, &prog, base, dp, n, rows)?;
            continue;
        }
        for f in FAMILIES {
            let mut paths = vec![("miss", miss_source(f), XDP_PASS)];
            if n > 0 {
                paths.insert(0, ("hit", source_in(f, Kind::Host, n / 2), XDP_DROP));
            }
            for (path, src, expect) in paths {
                let (ns, baseline) = bench
                    .measure(prog.as_fd(), base, &packet(src), expect)
                    .with_context(|| format!("xdp-filter {} {path}, {n} rules", f.name()))?;
                progress(&format!(
                    "  {n} rules, {} {path}: {ns} ns/packet (empty program {baseline} ns)",
                    f.name()
                ));
                rows.push(Row {
                    program: "xdp-filter",
                    scope: "addresses",
                    family: f,
                    path,
                    slots: 0,
                    prefixes: n,
                    prefix_len: Kind::Host.len(f),
                    ns,
                    baseline,
                });
            }
        }
    }
    drop(prog);
    drop(xf);
    Ok(notes)
}

/// xdp-filter with `n` exact source rules per family against dots-ebpf with
/// 256 address-only slots holding the same `n` host prefixes per family,
/// measured round by round together with the empty program.
fn head_to_head(
    bench: &Bench,
    xf: &OwnedFd,
    base: BorrowedFd<'_>,
    dp: &mut Dataplane,
    n: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    progress(&format!(
        "  head to head at {n} rules: dots-ebpf with 256 address-only slots"
    ));
    dp.apply(&slot_specs(256, n, Kind::Host, Scope::Addresses))?;
    let ours = dp.program_fd()?;
    for f in FAMILIES {
        for (path, src, expect) in [
            ("hit", source_in(f, Kind::Host, n / 2), XDP_DROP),
            ("miss", miss_source(f), XDP_PASS),
        ] {
            let (d, x, baseline) = bench
                .measure_pair(ours.as_fd(), xf.as_fd(), base, &packet(src), expect)
                .with_context(|| format!("head to head, {} {path}", f.name()))?;
            progress(&format!(
                "  {n} rules, {} {path}: dots-ebpf {d} ns, xdp-filter {x} ns (empty {baseline} ns)",
                f.name()
            ));
            for (program, slots, ns) in [("dots-ebpf", 256, d), ("xdp-filter", 0, x)] {
                rows.push(Row {
                    program,
                    scope: "addresses",
                    family: f,
                    path,
                    slots,
                    prefixes: n,
                    prefix_len: Kind::Host.len(f),
                    ns,
                    baseline,
                });
            }
        }
    }
    dp.apply(&BTreeMap::new())?;
    Ok(())
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = tests::bench::kernel_release();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let xdp_tools = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "xdp-tools"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("- CPU: {model}, {cores} cores available\n- Kernel: {kernel}\n- xdp-tools (xdp-filter): {xdp_tools}\n")
}

#[allow(clippy::too_many_arguments)]
fn find<'a>(
    rows: &'a [Row],
    program: &str,
    scope: &str,
    f: Family,
    path: &str,
    slots: usize,
    prefixes: usize,
    len: u8,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.program == program
            && r.scope == scope
            && r.family == f
            && r.path == path
            && r.slots == slots
            && r.prefixes == prefixes
            && r.prefix_len == len
    })
}

fn table(out: &mut String, rows: &[Row], program: &str, lens: (u8, u8)) {
    out.push_str(
        "| family | path | scope | slots | prefixes | prefix | ns/packet | empty program | above empty |\n",
    );
    out.push_str("|---|---|---|---:|---:|---|---:|---:|---:|\n");
    for r in rows
        .iter()
        .filter(|r| r.program == program && (r.prefix_len == lens.0 || r.prefix_len == lens.1))
    {
        let slots = if program == "xdp-filter" {
            "-".to_string()
        } else {
            r.slots.to_string()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | /{} | {} | {} | {} |\n",
            r.family.name(),
            r.path,
            r.scope,
            slots,
            r.prefixes,
            r.prefix_len,
            r.ns,
            r.baseline,
            r.delta()
        ));
    }
}

fn verdicts(rows: &[Row], big: usize) -> String {
    let mut out = String::new();
    for f in FAMILIES {
        let host = Kind::Host.len(f);
        let get = |path| find(rows, "dots-ebpf", "full", f, path, 256, big, host);
        let (Some(hit), Some(miss)) = (get("hit"), get("miss")) else {
            out.push_str(&format!(
                "- {}: no row at 256 slots and {big} prefixes\n",
                f.name()
            ));
            continue;
        };
        let ok = |b: bool| if b { "met" } else { "**not met**" };
        out.push_str(&format!(
            "- {} miss, 256 slots, {big} prefixes: {} ns above the empty program (target at most 100): {}\n",
            f.name(),
            miss.delta(),
            ok(miss.delta() <= 100)
        ));
        out.push_str(&format!(
            "- {} hit, 256 slots, {big} prefixes: {} ns above the empty program (target at most 200): {}\n",
            f.name(),
            hit.delta(),
            ok(hit.delta() <= 200)
        ));
        // xdp-filter cannot hold `big` rules: compare with its largest row.
        let largest = rows
            .iter()
            .filter(|r| r.program == "xdp-filter" && r.family == f)
            .map(|r| r.prefixes)
            .max();
        if let Some(n) = largest {
            // Same semantics and the same number of rules, measured round by
            // round together (head to head).
            let same = |path| find(rows, "dots-ebpf", "addresses", f, path, 256, n, host);
            let (Some(ahit), Some(amiss)) = (same("hit"), same("miss")) else {
                continue;
            };
            for (path, ours) in [("hit", ahit), ("miss", amiss)] {
                if let Some(xf) = find(rows, "xdp-filter", "addresses", f, path, 0, n, host) {
                    let same = if n == big {
                        String::new()
                    } else {
                        format!(" (its maximum: {n} rules; it cannot hold {big})")
                    };
                    out.push_str(&format!(
                        "- {} {path}, head to head at {n} rules{same} (256 address-only slots): dots-ebpf {} vs xdp-filter {} ns/packet: {}\n",
                        f.name(),
                        ours.ns,
                        xf.ns,
                        ok(ours.ns <= xf.ns)
                    ));
                }
            }
        }
    }
    // 10GbE line rate, 14.88 Mpps, leaves 67 ns per packet on one core:
    // the whole row, the test-run loop and the program call included.
    let ours: Vec<&Row> = rows.iter().filter(|r| r.program == "dots-ebpf").collect();
    if let Some(worst) = ours.iter().max_by_key(|r| r.ns) {
        let over = ours.iter().filter(|r| r.ns > LINE_RATE_NS).count();
        out.push_str(&format!(
            "- every dots-ebpf row within {LINE_RATE_NS} ns per packet in total (10GbE line rate on one core): {} ({} of {} rows above; the slowest: {} {} {} scope, {} slots, {} /{} prefixes, {} ns, {} ns above the empty program of {} ns)\n",
            if over == 0 { "met" } else { "**not met**" },
            over,
            ours.len(),
            worst.family.name(),
            worst.path,
            worst.scope,
            worst.slots,
            worst.prefixes,
            worst.prefix_len,
            worst.ns,
            worst.delta(),
            worst.baseline,
        ));
    }
    out
}

fn render(
    args: &Args,
    rows: &[Row],
    control: &[Control],
    notes: Option<&XdpFilterNotes>,
    big: usize,
) -> String {
    let mut out = String::new();
    out.push_str("### Machine\n\n");
    out.push_str(&machine());
    out.push_str(&format!(
        "- Measurement: BPF_PROG_TEST_RUN, {} repetitions per run, median of {} runs, each run alternated with the empty program\n\n",
        args.repeat, args.runs
    ));
    out.push_str("### Targets (256 slots, host prefixes)\n\n");
    out.push_str(&verdicts(rows, big));
    out.push_str("\n### Control path\n\n");
    out.push_str(
        "One more mitigation (one host source) put in and taken out with `Dataplane::apply_change`, \
         median of 21 rounds, with the slots of the rows below installed:\n\n",
    );
    out.push_str("| source prefixes installed | in (ms) | out (ms) |\n|---:|---:|---:|\n");
    for c in control {
        out.push_str(&format!(
            "| {} | {:.3} | {:.3} |\n",
            c.prefixes, c.add_ms, c.remove_ms
        ));
    }
    out.push_str("\n### dots-ebpf, host prefixes (/32, /128)\n\n");
    table(&mut out, rows, "dots-ebpf", (32, 128));
    out.push_str("\n### dots-ebpf, shorter prefixes (/24, /48)\n\n");
    table(&mut out, rows, "dots-ebpf", (24, 48));
    out.push_str("\n### xdp-filter, exact source addresses\n\n");
    if let Some(n) = notes {
        out.push_str(&format!("Measured: {}.\n\n", n.program));
        table(&mut out, rows, "xdp-filter", (32, 128));
        if n.command_rules > 0 {
            out.push_str(&format!(
                "\nAdding {} rules with one `xdp-filter ip` command each took {:.1} s ({:.1} ms per rule).",
                n.command_rules,
                n.command_secs,
                1000.0 * n.command_secs / n.command_rules as f64
            ));
        }
        if n.direct_rules > 0 {
            out.push_str(&format!(
                " The other {} rules were written straight into its pinned maps in {:.2} s.",
                n.direct_rules, n.direct_secs
            ));
        }
        out.push_str(&format!(
            " At that rate, {big} rules of each family would take about {:.0} s one command at a time.",
            2.0 * big as f64 * n.command_secs / n.command_rules.max(1) as f64
        ));
        if big > XDP_FILTER_CAPACITY {
            out.push_str(&format!(
                " But xdp-filter's address maps (per-CPU hashes) hold at most {XDP_FILTER_CAPACITY} entries each, \
                 so it has no row at {big} rules: its largest row, {XDP_FILTER_CAPACITY}, is the anchor."
            ));
        }
        out.push('\n');
    } else {
        out.push_str("Not measured in this run.\n");
    }
    out
}

fn main() -> Result<()> {
    let args = args()?;
    let bench = Bench {
        repeat: args.repeat,
        runs: args.runs,
    };
    let started = Instant::now();
    let big = if args.quick { 10_000 } else { 100_000 };
    let mut rows = Vec::new();
    let mut control = Vec::new();
    if !args.head_to_head {
        bench_dots(&bench, args.quick, &mut rows, &mut control)?;
    }

    // The baseline for xdp-filter is the same empty program, loaded again.
    let bpffs = BpffsDir::new()?;
    let mut dp = Dataplane::open(&DataplaneOptions {
        bpffs: bpffs.path.clone(),
        ..Default::default()
    })?;
    let base = dp.pass_program_fd()?;
    let notes = bench_xdp_filter(&bench, &args, base.as_fd(), &mut dp, &mut rows)?;
    drop(base);
    drop(dp);
    drop(bpffs);

    let json = json!({
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "control": control.iter().map(|c| json!({
            "prefixes_installed": c.prefixes,
            "add_ms": c.add_ms,
            "remove_ms": c.remove_ms,
        })).collect::<Vec<_>>(),
    });
    write_json(&args.json, &json)?;
    if !args.head_to_head {
        write_section(
            &args.doc,
            "bench",
            "cargo xtask bench dataplane",
            &render(&args, &rows, &control, Some(&notes), big),
            "# Benchmarks\n\n## Data plane",
        )?;
    }
    progress(&format!(
        "done in {:.0}s: {} and {}",
        started.elapsed().as_secs_f64(),
        args.json.display(),
        args.doc.display()
    ));
    Ok(())
}
