//! `bench-reaction`: how long a mitigation takes to bite, end to end, in the
//! namespace lab (`tests::lab`). Run it through `cargo xtask bench reaction`.
//!
//! A LAN host floods the target with numbered UDP datagrams, each carrying
//! its send time; the target records which arrive. The ISP's `dots-client`
//! asks the agent to mitigate that flood, then withdraws. A packet socket on
//! the ISP's link to the router timestamps the signal channel's frames (DTLS
//! over UDP), so every interval starts when the request leaves the ISP:
//!
//! * PUT -> drop: from the PUT on the wire to the send time of the first
//!   flood datagram that never arrives (and none after it for a while);
//! * DELETE -> pass: from the DELETE on the wire to the send time of the
//!   first flood datagram that arrives again;
//! * PUT -> 2.01 and DELETE -> 2.02: from the request to the answer, both
//!   on the wire.
//!
//! Both with no other mitigation, and with `--others` (255) other active
//! mitigations holding `--per-request` (60) source prefixes each: about as
//! many as one request carries, since a signal-channel message is at most
//! 1152 bytes (RFC 7252 §4.6; RFC 9132 does not fragment requests), so 255
//! mitigations hold about 15,000 prefixes, not 100,000. Also the agent's
//! CPU time per request (from /proc).
//!
//! Arguments: `--json FILE --doc FILE [--requests N] [--others N]
//! [--per-request N] [--gap-us N]`. The doc's text between
//! `<!-- reaction:begin -->` and `<!-- reaction:end -->` is replaced.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    net::UdpSocket,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tests::{
    bench::{write_json, write_section, BenchArgs},
    lab::{Lab, HOSTA4, OTHER_TARGET4, TARGET4},
};

/// The signal channel's port.
const DOTS_PORT: u16 = 4647;
/// UDP port of the flood at the target.
const FLOOD_PORT: u16 = 9999;
/// DTLS records longer than this carry a request or an answer; shorter
/// ones are empty CoAP acknowledgements (13 + 8 + 4 + 16 bytes with
/// AES-GCM).
const MIN_MESSAGE: usize = 48;
/// Consecutive flood datagrams that must be missing for a drop to count.
const RUN: usize = 20;

struct Args {
    json: PathBuf,
    doc: PathBuf,
    requests: usize,
    others: usize,
    per_request: usize,
    gap_us: u64,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse(
        "reaction",
        &["--requests", "--others", "--per-request", "--gap-us"],
        &[],
    )?;
    let a = Args {
        requests: b.value("--requests", 50)?,
        others: b.value("--others", 255)?,
        per_request: b.value("--per-request", 60)?,
        gap_us: b.value("--gap-us", 50)?,
        json: b.json,
        doc: b.doc,
    };
    ensure!(a.requests >= 1, "--requests must be at least 1");
    ensure!(
        a.others <= 255,
        "--others: at most 255 (256 slots, one for the measured request)"
    );
    Ok(a)
}

fn progress(what: &str) {
    eprintln!("bench-reaction: {what}");
}

/// `CLOCK_REALTIME` in nanoseconds: the clock of packet-socket timestamps.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One frame of the signal channel seen on the ISP's link.
#[derive(Clone, Copy, Debug)]
struct Frame {
    ns: u64,
    /// Sent by the ISP (towards the agent).
    from_isp: bool,
    udp_len: usize,
}

/// Frames of the signal channel, timestamped by the kernel, on `iface`.
struct Sniffer {
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sniffer {
    fn start(lab: &Lab, iface: &str) -> Result<Sniffer> {
        let iface = iface.to_string();
        let fd = lab.isp.enter(move || open_packet_socket(&iface))??;
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        let thread = thread::spawn(move || sniff(fd, &f, &s));
        Ok(Sniffer {
            frames,
            stop,
            thread: Some(thread),
        })
    }

    /// The first message-sized frame in direction `from_isp` at or after `after`.
    fn first(&self, from_isp: bool, after: u64) -> Option<Frame> {
        self.frames
            .lock()
            .ok()?
            .iter()
            .copied()
            .find(|f| f.from_isp == from_isp && f.ns >= after && f.udp_len > MIN_MESSAGE)
    }

    fn wait_first(&self, from_isp: bool, after: u64) -> Result<Frame> {
        let start = Instant::now();
        loop {
            if let Some(f) = self.first(from_isp, after) {
                return Ok(f);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "no signal-channel frame {} within 5 s",
                if from_isp {
                    "from the ISP"
                } else {
                    "from the agent"
                }
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_packet_socket(iface: &str) -> Result<OwnedFd> {
    let (fd, _) = tests::packet_socket(iface, 0)?;
    let on: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid option values of the sizes given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

/// Reads frames until `stop`; keeps the IPv4/UDP ones of the signal channel.
fn sniff(fd: OwnedFd, frames: &Mutex<Vec<Frame>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 2048];
    let mut control = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll and msghdr are plain data; zeroes are valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: every buffer in `msg` lives for the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n <= 0 {
            continue;
        }
        let frame = &buf[..n as usize];
        let Some(udp_len) = signal_udp_len(frame) else {
            continue;
        };
        let ns = control_timestamp(&msg).unwrap_or_else(realtime_ns);
        if let Ok(mut f) = frames.lock() {
            f.push(Frame {
                ns,
                from_isp: from.sll_pkttype == libc::PACKET_OUTGOING,
                udp_len,
            });
        }
    }
}

/// The UDP payload length of an IPv4 frame to or from the DOTS port.
fn signal_udp_len(f: &[u8]) -> Option<usize> {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] || f[23] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    let port = |o: usize| u16::from_be_bytes([f[udp + o], f[udp + o + 1]]);
    if f.len() < udp + 8 || (port(0) != DOTS_PORT && port(2) != DOTS_PORT) {
        return None;
    }
    Some(usize::from(port(4)).saturating_sub(8))
}

/// The SO_TIMESTAMPNS control message of `msg`, in nanoseconds.
fn control_timestamp(msg: &libc::msghdr) -> Option<u64> {
    // SAFETY: walks the control buffer the kernel filled, with its macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// The flood: numbered datagrams from host A to the target, each with its
/// send time; which of them arrived.
struct Flood {
    /// Send time of datagram `i`.
    sent: Arc<Mutex<Vec<u64>>>,
    received: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Flood {
    fn start(lab: &Lab, gap: Duration) -> Result<Flood> {
        let tx = lab.hosta.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
        let rx = lab.target.enter(|| -> Result<UdpSocket> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            s.set_recv_buffer_size(16 << 20)?;
            s.bind(
                &format!("0.0.0.0:{FLOOD_PORT}")
                    .parse::<std::net::SocketAddr>()?
                    .into(),
            )?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(UdpSocket::from(s))
        })??;
        let sent = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (sent.clone(), stop.clone());
        let dst = format!("{TARGET4}:{FLOOD_PORT}");
        let sender = thread::spawn(move || {
            let mut seq = 0u64;
            while !st.load(Ordering::Relaxed) {
                let now = realtime_ns();
                let mut payload = [0u8; 16];
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                payload[8..].copy_from_slice(&now.to_be_bytes());
                if let Ok(mut v) = s.lock() {
                    v.push(now);
                }
                let _ = tx.send_to(&payload, &dst);
                seq += 1;
                thread::sleep(gap);
            }
        });
        let (r, st) = (received.clone(), stop.clone());
        let receiver = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    if n >= 8 {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                        if let Ok(mut set) = r.lock() {
                            set.insert(seq);
                        }
                    }
                }
            }
        });
        Ok(Flood {
            sent,
            received,
            stop,
            threads: vec![sender, receiver],
        })
    }

    /// The send times so far and the set of what arrived.
    fn snapshot(&self) -> Result<(Vec<u64>, std::sync::MutexGuard<'_, HashSet<u64>>)> {
        let sent = self
            .sent
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let received = self
            .received
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok((sent, received))
    }

    /// Send time of the first datagram sent at or after `after` that was
    /// dropped, with the next [`RUN`] dropped too: when the block began.
    fn wait_blocked(&self, after: u64) -> Result<u64> {
        let start = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(2));
            // Datagrams younger than this may still be on their way.
            let settled = realtime_ns().saturating_sub(20_000_000);
            let (sent, received) = self.snapshot()?;
            let first = sent.partition_point(|&t| t < after);
            let mut run = 0;
            for (i, &t) in sent.iter().enumerate().skip(first) {
                if t > settled {
                    break;
                }
                if received.contains(&(i as u64)) {
                    run = 0;
                } else {
                    run += 1;
                    if run == RUN {
                        return Ok(sent[i + 1 - RUN]);
                    }
                }
            }
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "the flood was not dropped within 5 s"
            );
        }
    }

    /// Send time of the first datagram sent at or after `after` that arrived.
    fn wait_passing(&self, after: u64) -> Result<u64> {
        let start = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(2));
            let (sent, received) = self.snapshot()?;
            let first = sent.partition_point(|&t| t < after);
            if let Some(i) = (first..sent.len()).find(|i| received.contains(&(*i as u64))) {
                return Ok(sent[i]);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "the flood did not pass again within 5 s"
            );
        }
    }

    /// Median spacing of the datagrams sent so far: the resolution.
    fn median_gap_us(&self) -> f64 {
        let sent = self.sent.lock().map(|v| v.clone()).unwrap_or_default();
        let gaps: Vec<f64> = sent
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 / 1000.0)
            .collect();
        percentile(gaps, 50.0)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0 * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn stats(v: &[f64]) -> Value {
    json!({
        "p50_ms": percentile(v.to_vec(), 50.0),
        "p99_ms": percentile(v.to_vec(), 99.0),
        "max_ms": v.iter().copied().fold(f64::NAN, f64::max),
        "samples": v.len(),
    })
}

/// User plus system CPU time of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// Installs the other mitigations: `n` of them, `per` host sources each
/// (from 10.0.0.0/8), to another target than the flood's.
fn install_others(lab: &Lab, n: usize, per: usize) -> Result<()> {
    for m in 0..n {
        let mut args: Vec<String> = vec![
            "mitigate".into(),
            "--target".into(),
            format!("{OTHER_TARGET4}/32"),
            "--lifetime".into(),
            "3600".into(),
        ];
        for k in 0..per {
            args.push("--source".into());
            args.push(format!("10.{}.{}.{}/32", m % 256, k % 256, 1 + k / 256));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, r) = lab.client(&refs)?;
        ensure!(ok, "installing mitigation {m} failed: {r:?}");
        if m % 32 == 31 {
            progress(&format!("  {} of {n} installed", m + 1));
        }
    }
    Ok(())
}

/// Pairs run before each round and not counted: the first requests of a
/// session warm caches and allocators.
const WARMUP: usize = 3;

/// One round of `requests` PUT/DELETE pairs (after [`WARMUP`] others).
fn measure(lab: &Lab, sniffer: &Sniffer, flood: &Flood, requests: usize) -> Result<Value> {
    measure_pairs(lab, sniffer, flood, WARMUP)?;
    measure_pairs(lab, sniffer, flood, requests)
}

fn measure_pairs(lab: &Lab, sniffer: &Sniffer, flood: &Flood, requests: usize) -> Result<Value> {
    let (mut put_drop, mut del_pass, mut put_201, mut del_202) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let pid = lab.agent.as_ref().context("agent")?.pid();
    let cpu_before = cpu_ms(pid)?;
    for i in 0..requests {
        let t0 = realtime_ns();
        let (code, mid, _) =
            lab.mitigate(&format!("{HOSTA4}/32"), &format!("{TARGET4}/32"), &[])?;
        ensure!(code == "2.01 Created", "request {i}: {code}");
        let put = sniffer.wait_first(true, t0)?;
        let created = sniffer.wait_first(false, put.ns)?;
        let dropped = flood.wait_blocked(put.ns)?;
        let t1 = realtime_ns();
        let (ok, r) = lab.client(&["withdraw", "--mid", &mid.to_string()])?;
        ensure!(ok, "withdraw {mid}: {r:?}");
        let delete = sniffer.wait_first(true, t1)?;
        let deleted = sniffer.wait_first(false, delete.ns)?;
        let passing = flood.wait_passing(delete.ns)?;
        let ms = |a: u64, b: u64| (b as f64 - a as f64) / 1e6;
        put_drop.push(ms(put.ns, dropped));
        put_201.push(ms(put.ns, created.ns));
        del_pass.push(ms(delete.ns, passing));
        del_202.push(ms(delete.ns, deleted.ns));
        thread::sleep(Duration::from_millis(30));
    }
    let cpu = cpu_ms(pid)? - cpu_before;
    Ok(json!({
        "put_to_drop": stats(&put_drop),
        "delete_to_pass": stats(&del_pass),
        "put_to_201": stats(&put_201),
        "delete_to_202": stats(&del_202),
        "agent_cpu_ms_per_pair": cpu / requests as f64,
        "resolution_us": flood.median_gap_us(),
    }))
}

fn main() -> Result<()> {
    let a = args()?;
    let started = Instant::now();
    let mut lab = Lab::new()?;
    let config = lab.dir.path.join("bench.toml");
    // Room for the other mitigations: 256 per client, prefixes per scope.
    fs::write(
        &config,
        format!(
            "[limits]\nmax-mitigations-per-cuid = 256\nmax-prefixes = {}\n\n[policy]\nmax-mitigations = 256\nmax-mitigations-per-peer = 256\n",
            a.per_request.max(32)
        ),
    )?;
    // The other mitigations' sources are in 10.0.0.0/8: a customer prefix.
    lab.customer = format!("{},10.0.0.0/8", lab.customer.replace(",10.9.9.0/24", ""));
    lab.start_client()?;
    let config = config.display().to_string();
    lab.start_agent(&[
        "--config",
        &config,
        "--transport",
        "udp",
        "--domain",
        "10.0.0.0/8",
        "--notify-interval",
        "30",
    ])?;
    let sniffer = Sniffer::start(&lab, "ispd")?;
    let mut rounds = Vec::new();
    let flood = Flood::start(&lab, Duration::from_micros(a.gap_us))?;
    thread::sleep(Duration::from_millis(500));
    progress(&format!("no other mitigation: {} requests", a.requests));
    rounds.push(
        json!({"others": 0, "prefixes": 0, "result": measure(&lab, &sniffer, &flood, a.requests)?}),
    );
    drop(flood);
    if a.others > 0 {
        progress(&format!(
            "installing {} other mitigations with {} source prefixes each",
            a.others, a.per_request
        ));
        let t = Instant::now();
        install_others(&lab, a.others, a.per_request)?;
        progress(&format!(
            "  installed in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        let flood = Flood::start(&lab, Duration::from_micros(a.gap_us))?;
        thread::sleep(Duration::from_millis(500));
        progress(&format!(
            "{} other mitigations: {} requests",
            a.others, a.requests
        ));
        rounds.push(json!({
            "others": a.others,
            "prefixes": a.others * a.per_request,
            "result": measure(&lab, &sniffer, &flood, a.requests)?,
        }));
    }
    let out = json!({
        "kernel": tests::bench::kernel_release(),
        "requests": a.requests,
        "rounds": rounds,
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
        "Kernel {}, {} PUT/DELETE pairs per row, DTLS over UDP, flood datagrams every {} µs asked (median spacing in the table: the resolution).\n",
        out["kernel"].as_str().unwrap_or("?"),
        a.requests,
        a.gap_us
    )?;
    writeln!(s, "| other mitigations | source prefixes | PUT -> drop p50 / p99 (ms) | DELETE -> pass p50 / p99 (ms) | PUT -> 2.01 p50 / p99 (ms) | DELETE -> 2.02 p50 / p99 (ms) | agent CPU per pair (ms) | flood spacing (µs) |")?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in out["rounds"].as_array().into_iter().flatten() {
        let x = &r["result"];
        let pair = |k: &str| format!("{:.2} / {:.2}", f(&x[k]["p50_ms"]), f(&x[k]["p99_ms"]));
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.0} |",
            r["others"],
            r["prefixes"],
            pair("put_to_drop"),
            pair("delete_to_pass"),
            pair("put_to_201"),
            pair("delete_to_202"),
            f(&x["agent_cpu_ms_per_pair"]),
            f(&x["resolution_us"])
        )?;
    }
    write_section(
        &a.doc,
        "reaction",
        "cargo xtask bench reaction",
        &s,
        "## Reaction time\n\nWritten by `cargo xtask bench reaction`.",
    )
}
