//! The product end to end: a LAN host floods a target through the router;
//! the ISP side (`dots-client`) asks the agent (`dots-agent run`, XDP on the
//! LAN interfaces) to mitigate; the flood is dropped on the LAN side, other
//! hosts and targets are not, and the counters reported back agree with what
//! was sent.
//!
//! ```text
//! [hosta 192.0.2.2 / 2001:db8:1::2]--lana--+
//!                                          [cpe: dots-agent]--wan--[isp: dots-client]--tgt--[target]
//! [hostb 192.0.2.18 / 2001:db8:1:1::2]-lanb-+
//! ```

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use dots_agent::pki::{self, San};
use serde_json::Value;
use tests::{
    procs::{bin, eventually, run_in, Proc, TempDir},
    unique, veth, BpffsDir, Netns,
};

const TARGET4: &str = "198.51.100.10";
const OTHER_TARGET4: &str = "198.51.100.11";
const TARGET6: &str = "2001:db8:ffff::10";
const OTHER_TARGET6: &str = "2001:db8:ffff::11";
const HOSTA4: &str = "192.0.2.2";
const HOSTA6: &str = "2001:db8:1::2";

struct Lab {
    // Dropped first: the processes stop before their namespaces and files go.
    client: Option<Proc>,
    agent: Option<Proc>,
    hosta: Netns,
    hostb: Netns,
    cpe: Netns,
    isp: Netns,
    target: Netns,
    dir: TempDir,
    bpffs: BpffsDir,
    pki: pki::LabPki,
    lans: (String, String),
}

fn ip(ns: &Netns, args: &str) -> Result<()> {
    ns.ip(&args.split_whitespace().collect::<Vec<_>>())?;
    Ok(())
}

impl Lab {
    fn new() -> Result<Lab> {
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
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }

    fn start_client(&mut self) -> Result<()> {
        let args: Vec<String> = [
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = Proc::spawn(
            &self.isp,
            "dots-client",
            &bin("dots-client")?,
            &args,
            self.dir.path.join("client.log"),
        )?;
        p.wait_log("control socket ready", Duration::from_secs(10))?;
        self.client = Some(p);
        Ok(())
    }

    /// Starts the agent in the cpe namespace with XDP on both LAN interfaces.
    fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let (_, cert, key) = &self.pki.agents[0];
        let mut args: Vec<String> = [
            "run",
            "--peer",
            "203.0.113.2:4647",
            "--ca",
            &self.pki.ca.display().to_string(),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--domain",
            "192.0.2.0/24",
            "--domain",
            "2001:db8:1::/48",
            "--lan",
            &self.lans.0,
            "--lan",
            &self.lans.1,
            "--bpffs",
            &self.bpffs.path.display().to_string(),
            "--control",
            &self.path("agent.sock"),
            "--state-dir",
            &self.path("agent-state"),
            "--notify-interval",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::spawn(
            &self.cpe,
            "dots-agent",
            &bin("dots-agent")?,
            &args,
            self.dir.path.join("agent.log"),
        )?;
        self.agent = Some(p);
        eventually(Duration::from_secs(20), || {
            let (_, r) = self.client(&["agents"]).ok()?;
            r.first()?.get("body")?.as_array()?.first().cloned()
        })
        .with_context(|| format!("the agent did not connect; log:\n{}", self.agent_log()))?;
        Ok(())
    }

    fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default()
    }

    /// A `dots-client` command; returns success and the raw reply lines.
    fn client(&self, args: &[&str]) -> Result<(bool, Vec<Value>)> {
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
    fn agent_cmd(&self, args: &[&str]) -> Result<(bool, String)> {
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

    fn mitigate(&self, source: &str, target: &str, extra: &[&str]) -> Result<(String, u32, Value)> {
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
    fn scope(&self, mid: u32) -> Result<Value> {
        let (_, r) = self.client(&["status", "--mid", &mid.to_string()])?;
        Ok(
            r.first().context("no reply")?["body"]["ietf-dots-signal-channel:mitigation-scope"]
                ["scope"][0]
                .clone(),
        )
    }

    /// Waits until the mitigation reports `status`.
    fn wait_status(&self, mid: u32, status: &str) -> Result<Value> {
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
struct Sink {
    sockets: Vec<UdpSocket>,
    tally: std::cell::RefCell<std::collections::HashMap<String, usize>>,
}

impl Sink {
    fn open(target: &Netns) -> Result<Sink> {
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

    /// Datagrams tagged `tag` received so far, read until nothing new has
    /// arrived for 300 ms (at most 3 s).
    fn count(&self, tag: &str) -> usize {
        let start = std::time::Instant::now();
        let mut last_change = std::time::Instant::now();
        let mut buf = [0u8; 2048];
        let mut tally = self.tally.borrow_mut();
        while last_change.elapsed() < Duration::from_millis(300)
            && start.elapsed() < Duration::from_secs(3)
        {
            let mut got = false;
            for s in &self.sockets {
                while let Ok((len, _)) = s.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]);
                    let t = text
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    *tally.entry(t).or_default() += 1;
                    got = true;
                }
            }
            if got {
                last_change = std::time::Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tally.get(tag).copied().unwrap_or(0)
    }
}

/// Sends `count` UDP datagrams tagged `tag` from `ns` to `dst` port 9,
/// paced so that no queue in the lab overflows.
fn send(ns: &Netns, dst: &str, count: usize, tag: &str) -> Result<()> {
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

fn scope_counter(scope: &Value, key: &str) -> u64 {
    scope[key]
        .as_u64()
        .or_else(|| scope[key].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn flood_is_dropped_and_counted(v6: bool) -> Result<()> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    lab.start_agent(&[])?;
    let sink = Sink::open(&lab.target)?;
    let (hosta, target, other) = if v6 {
        (HOSTA6, TARGET6, OTHER_TARGET6)
    } else {
        (HOSTA4, TARGET4, OTHER_TARGET4)
    };
    let hostb_target = target;
    // Resolve neighbours along the paths first (the first packets of a
    // burst wait for ARP/ND and some are dropped), then measure.
    for (ns, dst) in [
        (&lab.hosta, target),
        (&lab.hostb, target),
        (&lab.hosta, other),
    ] {
        send(ns, dst, 3, "warmup")?;
    }
    let _ = sink.count("warmup");
    // Before: everything arrives.
    send(&lab.hosta, target, 100, "before")?;
    assert_eq!(sink.count("before"), 100, "baseline traffic must flow");

    let len = if v6 { "/128" } else { "/32" };
    let (code, mid, _) = lab.mitigate(
        &format!("{hosta}{len}"),
        &format!("{target}{len}"),
        &["--protocol", "17"],
    )?;
    assert_eq!(code, "2.01 Created");
    lab.wait_status(mid, "attack-successfully-mitigated")?;

    // The attacker's flood to the target is dropped; the other host and the
    // other target are not affected.
    send(&lab.hosta, target, 500, "flood")?;
    send(&lab.hostb, hostb_target, 100, "benign")?;
    send(&lab.hosta, other, 100, "other")?;
    assert_eq!(sink.count("flood"), 0, "the flood must be dropped");
    assert_eq!(sink.count("benign"), 100, "another LAN host is unaffected");
    assert_eq!(sink.count("other"), 100, "another target is unaffected");

    // The counters reported to the ISP side agree with what was sent (the
    // agent reads them every second; allow two periods).
    std::thread::sleep(Duration::from_millis(2500));
    let scope = lab.scope(mid)?;
    let pkts = scope_counter(&scope, "pkts-dropped");
    assert_eq!(pkts, 500, "pkts-dropped reported: {scope}");
    assert!(
        scope_counter(&scope, "bytes-dropped") >= 500 * 40,
        "{scope}"
    );

    // The operator sees it too.
    let (ok, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(
        ok && out.contains("active") && out.contains("500 packets"),
        "{out}"
    );

    // Withdrawal: final counters, and the traffic flows again at once.
    let (ok, r) = lab.client(&["withdraw", "--mid", &mid.to_string()])?;
    assert!(ok, "{r:?}");
    assert_eq!(r[0]["code"], "2.02 Deleted");
    send(&lab.hosta, target, 100, "after")?;
    assert_eq!(sink.count("after"), 100, "withdrawal restores the traffic");
    Ok(())
}

#[test]
fn ipv4_flood_is_dropped_and_counted() -> Result<()> {
    flood_is_dropped_and_counted(false)
}

#[test]
fn ipv6_flood_is_dropped_and_counted() -> Result<()> {
    flood_is_dropped_and_counted(true)
}

/// A lab with both daemons up and neighbours resolved.
fn ready_lab(agent_extra: &[&str]) -> Result<(Lab, Sink)> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    lab.start_agent(agent_extra)?;
    let sink = Sink::open(&lab.target)?;
    for (ns, dst) in [(&lab.hosta, TARGET4), (&lab.hostb, TARGET4)] {
        send(ns, dst, 3, "warmup")?;
    }
    let _ = sink.count("warmup");
    Ok((lab, sink))
}

/// Sends 50 datagrams from host A to the target and returns how many arrived.
fn probe(lab: &Lab, sink: &Sink, tag: &str) -> Result<usize> {
    send(&lab.hosta, TARGET4, 50, tag)?;
    Ok(sink.count(tag))
}

#[test]
fn consent_approved_then_rejected() -> Result<()> {
    let (lab, sink) = ready_lab(&["--consent", "require"])?;
    let (code, mid, body) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &[])?;
    assert_eq!(code, "2.01 Created");
    assert_eq!(
        body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["status"],
        "attack-mitigation-in-progress"
    );
    let (ok, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(ok && out.contains("pending-consent"), "{out}");
    assert_eq!(
        probe(&lab, &sink, "pending")?,
        50,
        "nothing is enforced before consent"
    );
    // The cuid is the client's; read it from the agent's list.
    let list = lab.agent_cmd(&["mitigations", "--json"])?.1;
    let list: Value = serde_json::from_str(&list)?;
    let cuid = list[0]["cuid"].as_str().context("cuid")?.to_string();
    let (ok, out) = lab.agent_cmd(&["approve", &format!("{cuid}/{mid}")])?;
    assert!(ok, "{out}");
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(probe(&lab, &sink, "approved")?, 0, "enforced once approved");

    // A second request, rejected: the peer hears conflict-cause 4 and
    // nothing more is installed.
    let (_, mid2, _) = lab.mitigate("192.0.2.18/32", "198.51.100.10/32", &[])?;
    let (ok, out) = lab.agent_cmd(&["reject", &format!("{cuid}/{mid2}")])?;
    assert!(ok, "{out}");
    lab.client.as_ref().context("client")?.wait_log(
        "request-rejected-legitimate-traffic",
        Duration::from_secs(10),
    )?;
    send(&lab.hostb, TARGET4, 50, "rejected")?;
    assert_eq!(
        sink.count("rejected"),
        50,
        "a rejected request drops nothing"
    );
    let (ok, out) = lab.agent_cmd(&["approve", &format!("{cuid}/{mid2}")])?;
    assert!(!ok, "deciding twice must fail: {out}");
    Ok(())
}

#[test]
fn lifetime_expiry_restores_traffic() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &["--lifetime", "3"])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(probe(&lab, &sink, "during")?, 0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        probe(&lab, &sink, "expired")?,
        50,
        "expiry removes the drops"
    );
    let (ok, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(ok && out.contains("no mitigation"), "{out}");
    Ok(())
}

#[test]
fn bad_requests_change_nothing() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &[])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    // Outside the domain: 4.00, nothing installed.
    let (code, _, body) = lab.mitigate("10.9.9.9/32", "198.51.100.10/32", &[])?;
    assert_eq!(code, "4.00 Bad Request");
    assert!(
        body["diagnostic"]
            .as_str()
            .unwrap_or_default()
            .contains("outside"),
        "{body}"
    );
    // trigger-mitigation false: refused by the Call Home rules.
    let bad = lab.dir.path.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"ietf-dots-signal-channel:mitigation-scope":{"scope":[{"target-prefix":["198.51.100.10/32"],"ietf-dots-call-home:source-prefix":["192.0.2.18/32"],"lifetime":60,"trigger-mitigation":false}]}}"#,
    )?;
    let (ok, r) = lab.client(&["mitigate", "--json", &bad.display().to_string()])?;
    assert!(!ok);
    assert_eq!(r[0]["code"], "4.00 Bad Request", "{r:?}");
    let list: Value = serde_json::from_str(&lab.agent_cmd(&["mitigations", "--json"])?.1)?;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "only the first mitigation exists: {list}"
    );
    assert_eq!(
        probe(&lab, &sink, "still")?,
        0,
        "the earlier mitigation stays in force"
    );
    send(&lab.hostb, TARGET4, 50, "hostb")?;
    assert_eq!(
        sink.count("hostb"),
        50,
        "the refused ones installed nothing"
    );
    assert!(
        lab.agent_log().contains("request refused"),
        "refusals are logged"
    );
    Ok(())
}

#[test]
fn restart_keeps_enforcing_and_restores_state() -> Result<()> {
    let (mut lab, sink) = ready_lab(&[])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &["--lifetime", "600"])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(probe(&lab, &sink, "before")?, 0);
    // Stop the agent: the pinned XDP link keeps dropping.
    if let Some(mut a) = lab.agent.take() {
        a.stop();
    }
    assert_eq!(
        probe(&lab, &sink, "down")?,
        0,
        "no gap while the agent is down"
    );
    std::thread::sleep(Duration::from_secs(2));
    lab.start_agent(&[])?;
    lab.agent
        .as_ref()
        .context("agent")?
        .wait_log("restored", Duration::from_secs(10))?;
    assert_eq!(
        probe(&lab, &sink, "after")?,
        0,
        "still dropped after the restart"
    );
    let scope = lab.wait_status(mid, "attack-successfully-mitigated")?;
    let left = scope["lifetime"].as_i64().unwrap_or(0);
    assert!(
        left > 0 && left < 600,
        "remaining lifetime carried over: {scope}"
    );
    // Counters of before, during and after the restart add up (3 x 50).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(scope_counter(&lab.scope(mid)?, "pkts-dropped"), 150);
    Ok(())
}

/// Masquerade on the router's WAN side, as a CPE does.
fn masquerade(lab: &Lab) -> Result<()> {
    let rules = lab.dir.path.join("nat.nft");
    std::fs::write(
        &rules,
        "table ip dotsnat {\n chain post {\n  type nat hook postrouting priority 100;\n  oifname \"wan\" masquerade\n }\n}\n",
    )?;
    lab.cpe.exec(&["nft", "-f", &rules.display().to_string()])?;
    Ok(())
}

/// Sends `count` datagrams from a fixed source port (one conntrack flow).
fn send_from(ns: &Netns, sport: u16, dst: &str, count: usize, tag: &str) -> Result<()> {
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

/// The translated (post-NAT) source port of `src`'s flow from `sport`, read
/// with the conntrack CLI: the reply tuple's destination port.
fn translated_port(lab: &Lab, src: &str, sport: u16) -> Result<u16> {
    let out = lab.cpe.exec(&[
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--orig-src",
        src,
        "--orig-port-src",
        &sport.to_string(),
    ])?;
    let line = out.lines().next().context("no conntrack entry")?;
    let dport = line
        .split_whitespace()
        .filter(|w| w.starts_with("dport="))
        .nth(1)
        .context("no reply tuple")?;
    Ok(dport.trim_start_matches("dport=").parse()?)
}

#[test]
fn nated_attacker_is_found_and_blocked() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    masquerade(&lab)?;
    // Both hosts use source port 5000: masquerade must rename one of them.
    send_from(&lab.hosta, 5000, TARGET4, 10, "a1")?;
    send_from(&lab.hostb, 5000, TARGET4, 10, "b1")?;
    assert_eq!((sink.count("a1"), sink.count("b1")), (10, 10));
    let port = translated_port(&lab, HOSTA4, 5000)?;
    // The ISP sees only the router's external address and that port.
    let (code, mid, _) = lab.mitigate(
        "203.0.113.1/32",
        "198.51.100.10/32",
        &["--source-port", &port.to_string(), "--protocol", "17"],
    )?;
    assert_eq!(code, "2.01 Created");
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    send_from(&lab.hosta, 5000, TARGET4, 50, "a2")?;
    send_from(&lab.hostb, 5000, TARGET4, 50, "b2")?;
    assert_eq!(sink.count("a2"), 0, "the attacker's flow is dropped");
    assert_eq!(
        sink.count("b2"),
        50,
        "the other host behind the same address is not"
    );
    // A new connection of the attacker (another source port) is dropped too.
    send_from(&lab.hosta, 6000, TARGET4, 50, "a3")?;
    assert_eq!(sink.count("a3"), 0, "new flows of the device are dropped");
    // The operator sees the device; the ISP never does.
    let (_, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(out.contains("behind NAT: 192.0.2.2"), "{out}");
    let scope = lab.scope(mid)?;
    assert!(
        !scope.to_string().contains("192.0.2.2"),
        "internal addresses are not sent to the peer: {scope}"
    );
    Ok(())
}

#[test]
fn nat_request_waits_for_a_matching_flow() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    masquerade(&lab)?;
    // No flow to the other target yet: accepted, pending resolution.
    let (code, mid, body) =
        lab.mitigate("203.0.113.1/32", "198.51.100.11/32", &["--protocol", "17"])?;
    assert_eq!(code, "2.01 Created");
    assert_eq!(
        body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["status"],
        "attack-mitigation-in-progress"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        lab.scope(mid)?["status"],
        "attack-mitigation-in-progress",
        "nothing to block yet"
    );
    // The attacker starts: its first packets create the conntrack entry, the
    // event resolves the device within a second, and the rest is dropped.
    send_from(&lab.hosta, 7000, OTHER_TARGET4, 5, "first")?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    send_from(&lab.hosta, 7001, OTHER_TARGET4, 50, "later")?;
    assert_eq!(
        sink.count("later"),
        0,
        "enforced once a matching flow appeared"
    );
    send_from(&lab.hostb, 7000, OTHER_TARGET4, 20, "hostb")?;
    assert_eq!(
        sink.count("hostb"),
        20,
        "only the device that talked to the target"
    );
    Ok(())
}
