//! The product end to end: a LAN host floods a target through the router;
//! the ISP side (`dots-client`) asks the agent (`dots-agent run`, XDP on the
//! LAN interfaces) to mitigate; the flood is dropped on the LAN side, other
//! hosts and targets are not, and the counters reported back agree with what
//! was sent. The lab: `tests::lab`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use tests::lab::*;

fn flood_is_dropped_and_counted(v6: bool) -> Result<()> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    lab.start_agent(&["--metrics", "127.0.0.1:9464"])?;
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

    // So does Prometheus.
    let metrics = lab.cpe.enter(|| -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    assert!(
        metrics.contains("dots_agent_session_up{peer=\"203.0.113.2:4647\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(",mid=\"{mid}\"}} 500"))
            && metrics
                .contains("dots_agent_dropped_packets_total{peer=\"203.0.113.2:4647\",cuid=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "dots_agent_mitigation_requests_total{peer=\"203.0.113.2:4647\",code=\"2.01\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("dots_agent_slots_used 1"), "{metrics}");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dots_agent_dataplane_packets_total{result=\"dropped\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 500, "{metrics}");
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

/// Sleeps until `at` (at once when it is past).
fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

#[test]
fn killed_agent_blocks_no_longer_than_the_lifetime() -> Result<()> {
    let (mut lab, sink) = ready_lab(&[])?;
    let asked = Instant::now();
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &["--lifetime", "5"])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(probe(&lab, &sink, "during")?, 0);
    // SIGKILL: nothing removes the slot, the pinned program keeps running.
    lab.agent.take().context("agent")?.kill();
    assert_eq!(
        probe(&lab, &sink, "killed")?,
        0,
        "still dropped while the lifetime runs"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "the lab was too slow to tell"
    );
    sleep_until(asked + Duration::from_millis(5300));
    assert_eq!(
        probe(&lab, &sink, "ended")?,
        50,
        "the kernel ends the block with its lifetime"
    );
    Ok(())
}

#[test]
fn indefinite_mitigation_lasts_while_the_agent_lives_and_ends_within_the_cap() -> Result<()> {
    let dir = tests::procs::TempDir::new("cap")?;
    let config = dir.path.join("agent.toml");
    std::fs::write(&config, "[policy]\nmax-lifetime = -1\n")?;
    let config = config.display().to_string();
    let (mut lab, sink) = ready_lab(&["--config", &config, "--indefinite-cap", "3"])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &["--lifetime=-1"])?;
    let scope = lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(scope["lifetime"], -1, "granted indefinite: {scope}");
    // Longer than the cap: the running agent renews it.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        probe(&lab, &sink, "alive")?,
        0,
        "renewed while the agent runs"
    );
    lab.agent.take().context("agent")?.kill();
    let killed = Instant::now();
    assert_eq!(probe(&lab, &sink, "killed")?, 0);
    sleep_until(killed + Duration::from_millis(3300));
    assert_eq!(
        probe(&lab, &sink, "capped")?,
        50,
        "an indefinite block ends within the cap once the agent is gone"
    );
    Ok(())
}

#[test]
fn monitor_mode_counts_what_it_would_drop() -> Result<()> {
    let (lab, sink) = ready_lab(&["--no-enforce"])?;
    let (code, mid, body) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &[])?;
    assert_eq!(code, "2.01 Created");
    assert_eq!(
        body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["status"],
        "attack-mitigation-in-progress"
    );
    // Nothing changes for the peer once the slot is in place: wait until
    // the operator sees it counting.
    let counting = tests::procs::eventually(Duration::from_secs(10), || {
        let (_, out) = lab.agent_cmd(&["mitigations"]).ok()?;
        out.contains("monitor: would have dropped").then_some(())
    });
    assert!(counting.is_some(), "{}", lab.agent_cmd(&["mitigations"])?.1);
    assert_eq!(
        probe(&lab, &sink, "watched")?,
        50,
        "monitor mode drops nothing"
    );
    // The operator sees what it would have dropped, and so does the log.
    let shown = tests::procs::eventually(Duration::from_secs(5), || {
        let (_, out) = lab.agent_cmd(&["mitigations"]).ok()?;
        out.contains("would have dropped 50 packets").then_some(out)
    });
    assert!(shown.is_some(), "{}", lab.agent_cmd(&["mitigations"])?.1);
    lab.agent
        .as_ref()
        .context("agent")?
        .wait_log("would have dropped", Duration::from_secs(5))?;
    // The peer still hears status 1 and no drop counters.
    let scope = lab.scope(mid)?;
    assert_eq!(scope["status"], "attack-mitigation-in-progress", "{scope}");
    assert!(scope.get("pkts-dropped").is_none(), "{scope}");
    // Withdrawn: its slot goes.
    let (ok, r) = lab.client(&["withdraw", "--mid", &mid.to_string()])?;
    assert!(ok, "{r:?}");
    let status = || -> Result<String> {
        let bpffs = lab.bpffs.path.display().to_string();
        let out = tests::procs::run_in(
            &lab.cpe,
            &tests::procs::bin("dots-agent")?,
            &["dataplane".into(), "status".into(), "--bpffs".into(), bpffs],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let gone = tests::procs::eventually(Duration::from_secs(5), || {
        status().ok().filter(|s| s.contains("slots:      0"))
    });
    assert!(gone.is_some(), "{}", status()?);
    Ok(())
}

#[test]
fn rate_limit_holds_the_target_within_ten_percent_of_the_limit() -> Result<()> {
    let (lab, sink) = ready_lab(&["--action", "rate-limit", "--rate-limit-pps", "1000"])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &[])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    // About 4,000 packets per second for 3 seconds, 4 times the limit.
    let started = Instant::now();
    let sent = flood(&lab.hosta, TARGET4, Duration::from_secs(3), 4_000, "flood")?;
    let secs = started.elapsed().as_secs_f64();
    let got = sink.count("flood");
    let rate = got as f64 / secs;
    assert!(
        sent as f64 / secs > 2_000.0,
        "the flood must exceed the limit: {sent} in {secs:.2} s"
    );
    assert!(
        (900.0..=1_100.0).contains(&rate),
        "{got} of {sent} datagrams in {secs:.2} s: {rate:.0}/s at the target, limit 1000/s"
    );
    // What went over the limit is reported as dropped.
    std::thread::sleep(Duration::from_millis(1500));
    let dropped = scope_counter(&lab.scope(mid)?, "pkts-dropped");
    assert_eq!(dropped as usize, sent - got, "drops counted: {dropped}");
    Ok(())
}

#[test]
fn bad_requests_change_nothing() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &[])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    // Outside the domain: 4.00, nothing installed.
    let (code, _, body) = lab.mitigate("10.9.9.9/32", "198.51.100.10/32", &[])?;
    assert!(refused_as_outside(&code, &body), "{code} {body}");
    // trigger-mitigation false: the client never sends it (RFC 9066 §5.3.1).
    let bad = lab.dir.path.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"ietf-dots-signal-channel:mitigation-scope":{"scope":[{"target-prefix":["198.51.100.10/32"],"ietf-dots-call-home:source-prefix":["192.0.2.18/32"],"lifetime":60,"trigger-mitigation":false}]}}"#,
    )?;
    let (ok, r) = lab.client(&["mitigate", "--json", &bad.display().to_string()])?;
    assert!(!ok);
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("trigger-mitigation false"),
        "{r:?}"
    );
    // A source outside every customer prefix: refused by the client.
    let (ok, r) = lab.client(&[
        "mitigate",
        "--source",
        "198.18.0.1/32",
        "--target",
        "198.51.100.10/32",
    ])?;
    assert!(!ok);
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no customer prefix contains 198.18.0.1/32"),
        "{r:?}"
    );
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
    let mut log = String::new();
    if let Some(mut a) = lab.agent.take() {
        a.stop();
        log = a.log_text();
    }
    assert_eq!(
        probe(&lab, &sink, "down")?,
        0,
        "no gap while the agent is down; its log:\n{log}"
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

#[test]
fn nated_attacker_is_found_and_blocked() -> Result<()> {
    let (lab, sink) = ready_lab(&[])?;
    masquerade(&lab.cpe)?;
    // Both hosts use source port 5000: masquerade must rename one of them.
    send_from(&lab.hosta, 5000, TARGET4, 10, "a1")?;
    send_from(&lab.hostb, 5000, TARGET4, 10, "b1")?;
    assert_eq!((sink.count("a1"), sink.count("b1")), (10, 10));
    let port = translated_port(&lab.cpe, HOSTA4, 5000, TARGET4)?;
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
    masquerade(&lab.cpe)?;
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
    // Only the device that talked to the target is blocked. (Had hostb then
    // sent to that target too, its new flow would match the request and be
    // blocked as well: a request naming the router's address covers every
    // device behind it that sends such traffic.)
    let (_, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(
        out.contains("behind NAT: 192.0.2.2") && !out.contains("192.0.2.18"),
        "{out}"
    );
    send_from(&lab.hostb, 7000, TARGET4, 20, "hostb")?;
    assert_eq!(sink.count("hostb"), 20, "the other device is not blocked");
    Ok(())
}
