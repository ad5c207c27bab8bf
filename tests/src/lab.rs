//! The namespace lab of the end-to-end tests and the demo:
//!
//! ```text
//! [hosta 192.0.2.2 / 2001:db8:1::2]--lana--+
//!                                          [cpe: dots-agent]--wan--[isp: dots-client]--ispu--[target]
//! [hostb 192.0.2.18 / 2001:db8:1:1::2]-lanb-+
//! ```
//!
//! Everything is torn down on drop: processes first, then namespaces, pins
//! and files.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_daemon::pki::{self, San};
use serde_json::Value;

use crate::{
    procs::{bin, eventually, run_in, Proc, TempDir},
    unique, veth, BpffsDir, Netns,
};

pub const TARGET4: &str = "198.51.100.10";
pub const OTHER_TARGET4: &str = "198.51.100.11";
pub const TARGET6: &str = "2001:db8:ffff::10";
pub const OTHER_TARGET6: &str = "2001:db8:ffff::11";
pub const HOSTA4: &str = "192.0.2.2";
pub const HOSTA6: &str = "2001:db8:1::2";

pub struct Lab {
    // Dropped first: the processes stop before their namespaces and files go.
    pub client: Option<Proc>,
    pub agent: Option<Proc>,
    pub hosta: Netns,
    pub hostb: Netns,
    pub cpe: Netns,
    pub isp: Netns,
    pub target: Netns,
    pub dir: TempDir,
    pub bpffs: BpffsDir,
    pub pki: pki::LabPki,
    pub lans: (String, String),
    /// More environment for the agent (e.g. NOTIFY_SOCKET).
    pub agent_env: Vec<(String, String)>,
    /// The `--customer` entry of the lab's client (its agent's prefixes).
    pub customer: String,
    /// More environment for the client.
    pub client_env: Vec<(String, String)>,
}

pub fn ip(ns: &Netns, args: &str) -> Result<()> {
    ns.ip(&args.split_whitespace().collect::<Vec<_>>())?;
    Ok(())
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let (hosta, hostb, cpe, isp, target) = (
            Netns::new("ha")?,
            Netns::new("hb")?,
            Netns::new("cpe")?,
            Netns::new("isp")?,
            Netns::new("tgt")?,
        );
        // No duplicate address detection: addresses (link-local included)
        // are usable at once instead of after a second or two.
        for ns in [&hosta, &hostb, &cpe, &isp, &target] {
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"])?;
        }
        let (la, lb) = (unique("la"), unique("lb"));
        veth(&hosta, "eth0", &cpe, &la)?;
        veth(&hostb, "eth0", &cpe, &lb)?;
        veth(&cpe, "wan", &isp, "ispd")?;
        veth(&isp, "ispu", &target, "eth0")?;
        ip(&hosta, "addr add 192.0.2.2/28 dev eth0")?;
        ip(&hosta, "addr add 2001:db8:1::2/64 dev eth0 nodad")?;
        ip(&hosta, "route add default via 192.0.2.1")?;
        ip(&hosta, "-6 route add default via 2001:db8:1::1")?;
        ip(&hostb, "addr add 192.0.2.18/28 dev eth0")?;
        ip(&hostb, "addr add 2001:db8:1:1::2/64 dev eth0 nodad")?;
        ip(&hostb, "route add default via 192.0.2.17")?;
        ip(&hostb, "-6 route add default via 2001:db8:1:1::1")?;
        ip(&cpe, &format!("addr add 192.0.2.1/28 dev {la}"))?;
        ip(&cpe, &format!("addr add 2001:db8:1::1/64 dev {la} nodad"))?;
        ip(&cpe, &format!("addr add 192.0.2.17/28 dev {lb}"))?;
        ip(&cpe, &format!("addr add 2001:db8:1:1::1/64 dev {lb} nodad"))?;
        ip(&cpe, "addr add 203.0.113.1/30 dev wan")?;
        ip(&cpe, "addr add 2001:db8:100::1/64 dev wan nodad")?;
        ip(&cpe, "route add default via 203.0.113.2")?;
        ip(&cpe, "-6 route add default via 2001:db8:100::2")?;
        ip(&isp, "addr add 203.0.113.2/30 dev ispd")?;
        ip(&isp, "addr add 2001:db8:100::2/64 dev ispd nodad")?;
        ip(&isp, "addr add 198.51.100.1/24 dev ispu")?;
        ip(&isp, "addr add 2001:db8:ffff::1/64 dev ispu nodad")?;
        ip(&isp, "route add 192.0.2.0/24 via 203.0.113.1")?;
        ip(&isp, "-6 route add 2001:db8:1::/48 via 2001:db8:100::1")?;
        ip(&target, "addr add 198.51.100.10/24 dev eth0")?;
        ip(&target, "addr add 198.51.100.11/24 dev eth0")?;
        ip(&target, "addr add 2001:db8:ffff::10/64 dev eth0 nodad")?;
        ip(&target, "addr add 2001:db8:ffff::11/64 dev eth0 nodad")?;
        ip(&target, "route add default via 198.51.100.1")?;
        ip(&target, "-6 route add default via 2001:db8:ffff::1")?;
        for ns in [&cpe, &isp] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        let dir = TempDir::new("e2e")?;
        let pki = pki::create_lab_pki(
            &dir.path.join("pki"),
            &[San::parse("203.0.113.2")],
            &["cpe1".into()],
            1,
        )?;
        let lans = (la, lb);
        Ok(Lab {
            client: None,
            agent: None,
            hosta,
            hostb,
            cpe,
            isp,
            target,
            dir,
            bpffs: BpffsDir::new()?,
            pki,
            lans,
            agent_env: Vec::new(),
            // The router's WAN network (its address may change: the
            // address-following tests renumber it) and the LAN prefixes;
            // 10.9.9.0/24 lies outside the agent's domain, so that the
            // agent's own check is exercised too.
            // The router's WAN network (its address may change: the
            // address-following tests renumber it) and the LAN prefixes;
            // 10.9.9.0/24 lies outside the agent's domain, so that the
            // agent's own check is exercised too.
            customer: "cpe1=203.0.113.0/24,192.0.2.0/24,2001:db8:1::/48,10.9.9.0/24".into(),
            client_env: Vec::new(),
        })
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }

    pub fn start_client(&mut self) -> Result<()> {
        self.start_client_with(&[])
    }

    /// Starts `dots-client listen` in the isp namespace with `extra` flags.
    pub fn start_client_with(&mut self, extra: &[String]) -> Result<()> {
        let mut args: Vec<String> = [
            "listen",
            "--udp",
            "203.0.113.2:4647",
            "--tcp",
            "203.0.113.2:4647",
            "--ca",
            &self.pki.ca.display().to_string(),
            "--cert",
            &self.pki.client_cert.display().to_string(),
            "--key",
            &self.pki.client_key.display().to_string(),
            "--control",
            &self.path("client.sock"),
            "--state-dir",
            &self.path("client-state"),
            "--customer",
            &self.customer,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let p = Proc::spawn_with_env(
            &self.isp,
            "dots-client",
            &bin("dots-client")?,
            &args,
            self.dir.path.join("client.log"),
            &self.client_env,
        )?;
        p.wait_log("control socket ready", Duration::from_secs(10))?;
        self.client = Some(p);
        Ok(())
    }

    /// Starts the agent in the cpe namespace with XDP on both LAN interfaces.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let mut args = self.agent_args(true);
        // The caller's notify interval replaces the lab's one-second one.
        if extra.contains(&"--notify-interval") {
            if let Some(j) = args.iter().position(|a| a == "--notify-interval") {
                args.drain(j..j + 2);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.start_agent_with(args)
    }

    /// The arguments of `dots-agent run` in this lab: certificates, LAN
    /// interfaces, bpffs, control socket, state directory, a one-second
    /// notify interval; the peer and the domain too with `peer_and_domain`
    /// (without, they come from a `--config` file).
    pub fn agent_args(&self, peer_and_domain: bool) -> Vec<String> {
        let (_, cert, key) = &self.pki.agents[0];
        let mut args: Vec<String> = vec!["run".into()];
        if peer_and_domain {
            args.extend(
                [
                    "--peer",
                    "203.0.113.2:4647",
                    "--domain",
                    "192.0.2.0/24",
                    "--domain",
                    "2001:db8:1::/48",
                ]
                .map(String::from),
            );
        }
        args.extend([
            "--ca".into(),
            self.pki.ca.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--lan".into(),
            self.lans.0.clone(),
            "--lan".into(),
            self.lans.1.clone(),
            "--bpffs".into(),
            self.bpffs.path.display().to_string(),
            "--control".into(),
            self.path("agent.sock"),
            "--state-dir".into(),
            self.path("agent-state"),
            "--notify-interval".into(),
            "1".into(),
        ]);
        args
    }

    /// Starts `dots-agent` with exactly `args` and waits until it connected.
    pub fn start_agent_with(&mut self, args: Vec<String>) -> Result<()> {
        let p = Proc::spawn_with_env(
            &self.cpe,
            "dots-agent",
            &bin("dots-agent")?,
            &args,
            self.dir.path.join("agent.log"),
            &self.agent_env,
        )?;
        self.agent = Some(p);
        eventually(Duration::from_secs(20), || {
            let (_, r) = self.client(&["agents"]).ok()?;
            r.first()?
                .get("body")?
                .as_array()?
                .iter()
                .find(|a| a["state"] == "connected")
                .cloned()
        })
        .with_context(|| format!("the agent did not connect; log:\n{}", self.agent_log()))?;
        Ok(())
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default()
    }

    /// A `dots-client` command; returns success and the raw reply lines.
    pub fn client(&self, args: &[&str]) -> Result<(bool, Vec<Value>)> {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend([
            "--control".to_string(),
            self.path("client.sock"),
            "--raw".to_string(),
        ]);
        let out = run_in(&self.isp, &bin("dots-client")?, &full)?;
        let replies = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok((out.status.success(), replies))
    }

    /// A `dots-agent` control command (status, mitigations, approve, reject).
    pub fn agent_cmd(&self, args: &[&str]) -> Result<(bool, String)> {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(["--control".to_string(), self.path("agent.sock")]);
        let out = run_in(&self.cpe, &bin("dots-agent")?, &full)?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    pub fn mitigate(
        &self,
        source: &str,
        target: &str,
        extra: &[&str],
    ) -> Result<(String, u32, Value)> {
        let mut args = vec!["mitigate", "--source", source, "--target", target];
        args.extend_from_slice(extra);
        let (ok, r) = self.client(&args)?;
        let first = r.first().context("no reply")?.clone();
        if !ok && first["code"].is_null() {
            bail!("mitigate failed: {first}");
        }
        Ok((
            first["code"].as_str().unwrap_or_default().to_string(),
            first["mid"].as_u64().unwrap_or(0) as u32,
            first["body"].clone(),
        ))
    }

    /// The scope the agent reports for `mid` (`dots-client status`).
    pub fn scope(&self, mid: u32) -> Result<Value> {
        let (_, r) = self.client(&["status", "--mid", &mid.to_string()])?;
        Ok(
            r.first().context("no reply")?["body"]["ietf-dots-signal-channel:mitigation-scope"]
                ["scope"][0]
                .clone(),
        )
    }

    /// Waits until the mitigation reports `status`.
    pub fn wait_status(&self, mid: u32, status: &str) -> Result<Value> {
        eventually(Duration::from_secs(15), || {
            self.scope(mid).ok().filter(|s| s["status"] == status)
        })
        .with_context(|| {
            format!(
                "mid {mid} never reached {status}; agent log:\n{}",
                self.agent_log()
            )
        })
    }
}

/// Receives UDP on port 9 in the target namespace and counts datagrams by
/// their tag (the first word of the payload).
pub struct Sink {
    pub sockets: Vec<UdpSocket>,
    pub tally: std::cell::RefCell<std::collections::HashMap<String, usize>>,
}

impl Sink {
    pub fn open(target: &Netns) -> Result<Sink> {
        let sockets = target.enter(|| -> Result<Vec<UdpSocket>> {
            let mut v = Vec::new();
            for (domain, addr) in [
                (socket2::Domain::IPV4, "0.0.0.0:9"),
                (socket2::Domain::IPV6, "[::]:9"),
            ] {
                let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
                if domain == socket2::Domain::IPV6 {
                    s.set_only_v6(true)?;
                }
                // Room for every datagram a test sends before it counts.
                s.set_recv_buffer_size(8 << 20)?;
                s.bind(&addr.parse::<SocketAddr>()?.into())?;
                s.set_nonblocking(true)?;
                v.push(UdpSocket::from(s));
            }
            Ok(v)
        })??;
        Ok(Sink {
            sockets,
            tally: Default::default(),
        })
    }

    /// Reads what is queued now, without waiting, into the tally; returns
    /// how many datagrams that was.
    fn drain(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut tally = self.tally.borrow_mut();
        let mut n = 0;
        for s in &self.sockets {
            while let Ok((len, _)) = s.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]);
                let t = text
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                *tally.entry(t).or_default() += 1;
                n += 1;
            }
        }
        n
    }

    fn tallied(&self, tag: &str) -> usize {
        self.tally.borrow().get(tag).copied().unwrap_or(0)
    }

    /// Datagrams tagged `tag` received so far, reading what is queued now
    /// without waiting (call it often under sustained traffic: socket
    /// buffers are small).
    pub fn total(&self, tag: &str) -> usize {
        self.drain();
        self.tallied(tag)
    }

    /// Datagrams tagged `tag` received so far, read until nothing new has
    /// arrived for 300 ms (at most 3 s).
    pub fn count(&self, tag: &str) -> usize {
        let start = std::time::Instant::now();
        let mut last_change = std::time::Instant::now();
        while last_change.elapsed() < Duration::from_millis(300)
            && start.elapsed() < Duration::from_secs(3)
        {
            if self.drain() > 0 {
                last_change = std::time::Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.tallied(tag)
    }
}

/// Sends `count` UDP datagrams tagged `tag` from `ns` to `dst` port 9,
/// paced so that no queue in the lab overflows.
pub fn send(ns: &Netns, dst: &str, count: usize, tag: &str) -> Result<()> {
    let dst: SocketAddr = if dst.contains(':') {
        format!("[{dst}]:9")
    } else {
        format!("{dst}:9")
    }
    .parse()?;
    let tag = tag.to_string();
    ns.enter(move || -> Result<()> {
        let sock = UdpSocket::bind(if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
        for i in 0..count {
            sock.send_to(format!("{tag} {i:06}").as_bytes(), dst)?;
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })?
}

/// Whether a mitigate reply is the refusal of a source outside the agent's
/// domain (RFC 9066 §5.3.1): 4.00 with a diagnostic saying so.
pub fn refused_as_outside(code: &str, body: &Value) -> bool {
    code == "4.00 Bad Request"
        && body["diagnostic"]
            .as_str()
            .unwrap_or_default()
            .contains("outside")
}

/// Sends datagrams tagged `tag` from `ns` to `dst` port 9 at about `pps`
/// for `duration`; returns how many were sent.
pub fn flood(ns: &Netns, dst: &str, duration: Duration, pps: u64, tag: &str) -> Result<usize> {
    let dst: SocketAddr = format!("{dst}:9").parse()?;
    let tag = tag.to_string();
    ns.enter(move || -> Result<usize> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let start = std::time::Instant::now();
        let mut sent = 0usize;
        while start.elapsed() < duration {
            // Catch up with the schedule, then wait a little.
            let due = (start.elapsed().as_secs_f64() * pps as f64) as usize;
            while sent < due {
                sock.send_to(format!("{tag} {sent:07}").as_bytes(), dst)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(sent)
    })?
}

pub fn scope_counter(scope: &Value, key: &str) -> u64 {
    scope[key]
        .as_u64()
        .or_else(|| scope[key].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// nftables masquerade on the router's `wan` interface, as a CPE does.
pub fn masquerade(cpe: &Netns) -> Result<()> {
    let rules = "table ip nat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan\" masquerade\n }\n}\n";
    let path = std::env::temp_dir().join(format!("{}.nft", unique("dots-nat-")));
    std::fs::write(&path, rules)?;
    let r = cpe.exec(&["nft", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

/// Sends `count` datagrams from a fixed source port (one conntrack flow).
pub fn send_from(ns: &Netns, sport: u16, dst: &str, count: usize, tag: &str) -> Result<()> {
    let dst: SocketAddr = format!("{dst}:9").parse()?;
    let tag = tag.to_string();
    ns.enter(move || -> Result<()> {
        let sock = UdpSocket::bind(("0.0.0.0", sport))?;
        for i in 0..count {
            sock.send_to(format!("{tag} {i:06}").as_bytes(), dst)?;
        }
        Ok(())
    })?
}

/// The translated (post-NAT) source port of `src:sport`'s UDP flow to `dst`,
/// read with the `conntrack` tool (independent of our parser): the reply
/// tuple's destination port.
pub fn translated_port(cpe: &Netns, src: &str, sport: u16, dst: &str) -> Result<u16> {
    let sport = sport.to_string();
    let args = [
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--orig-src",
        src,
        "--orig-port-src",
        &sport,
        "--orig-dst",
        dst,
    ];
    let out = cpe.exec(&args)?;
    // "udp 17 29 src=192.0.2.2 dst=198.51.100.10 sport=5000 dport=9 [UNREPLIED]
    //  src=198.51.100.10 dst=203.0.113.1 sport=9 dport=40000 ..."
    let line = out.lines().next().context("no conntrack entry")?;
    let dport = line
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("dport="))
        .nth(1)
        .context("no reply dport")?;
    Ok(dport.parse()?)
}

/// The flood's and the normal traffic's packets per second in the NAT
/// scenarios (demo, detector test).
pub const FLOOD_PPS: u64 = 2000;
pub const NORMAL_PPS: u64 = 50;

/// hostb's normal traffic, then hosta's flood, both to the target from
/// source port 5000 (so that NAT has to rename one of them), until the
/// returned flag is set.
pub fn flood_and_normal(lab: &Lab) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    traffic(&lab.hostb, 5000, NORMAL_PPS, "normal", stop.clone())?;
    std::thread::sleep(Duration::from_millis(200));
    traffic(&lab.hosta, 5000, FLOOD_PPS, "flood", stop.clone())?;
    Ok(stop)
}

/// Sends UDP to the target at `pps` from a fixed source port until stopped.
pub fn traffic(
    ns: &Netns,
    sport: u16,
    pps: u64,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let sock = ns.enter(move || UdpSocket::bind(("0.0.0.0", sport)))??;
    std::thread::spawn(move || {
        let gap = Duration::from_micros(1_000_000 / pps);
        let mut next = Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send_to(format!("{tag} {i}").as_bytes(), (TARGET4, 9));
            i += 1;
            next += gap;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    });
    Ok(())
}

/// Packets per second of each traffic class at the target over `secs`.
pub fn rates(sink: &Sink, secs: u64) -> (u64, u64) {
    let before = (sink.total("flood"), sink.total("normal"));
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        sink.total("flood"); // keep the socket buffers drained
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = (sink.total("flood"), sink.total("normal"));
    (
        (after.0 - before.0) as u64 / secs,
        (after.1 - before.1) as u64 / secs,
    )
}
