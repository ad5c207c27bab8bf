//! The daemons as services. The agent changes its settings while it runs,
//! without dropping sessions or drops: SIGHUP with an edited configuration
//! file (new domain prefix, a peer removed and another added, a bad file
//! kept out), and the router's addresses changing under it (rtnetlink
//! events reach validation and NAT correlation, RFC 9066 §5.3.1 and
//! §5.3.2). Both tell systemd when they are ready, how they are, and that
//! they live (sd_notify). The lab: `tests::lab`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tests::lab::*;

/// The lab's sink, with neighbours resolved.
fn sink(lab: &Lab) -> Result<Sink> {
    let sink = Sink::open(&lab.target)?;
    for ns in [&lab.hosta, &lab.hostb] {
        send(ns, TARGET4, 3, "warmup")?;
    }
    let _ = sink.count("warmup");
    Ok(sink)
}

fn probe(lab: &Lab, sink: &Sink, tag: &str) -> Result<usize> {
    send(&lab.hosta, TARGET4, 50, tag)?;
    Ok(sink.count(tag))
}

/// An agent.toml with the lab's peer, `extra_peer` (nothing listens there:
/// it keeps dialling) and the domain prefixes; interface addresses off, so
/// the domain is exactly the file's.
fn config(extra_peer: &str, prefixes: &[&str]) -> String {
    let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "[[peers]]\naddress = \"203.0.113.2:4647\"\n\n[[peers]]\naddress = {extra_peer:?}\n\n\
         [domain]\nprefixes = [{}]\ninterface-addresses = false\n",
        prefixes.join(", ")
    )
}

/// Sends SIGHUP and waits for the `n`-th log line containing `needle`.
fn hangup(lab: &Lab, needle: &str, n: usize) -> Result<()> {
    let agent = lab.agent.as_ref().context("agent")?;
    agent.signal(libc::SIGHUP);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if agent.log_text().matches(needle).count() >= n {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{needle:?} not logged {n} times; log:\n{}", lab.agent_log())
}

fn peers(lab: &Lab) -> Result<Vec<String>> {
    let (ok, out) = lab.agent_cmd(&["status", "--json"])?;
    anyhow::ensure!(ok, "{out}");
    let v: Value = serde_json::from_str(&out)?;
    Ok(v["peers"]
        .as_array()
        .context("peers")?
        .iter()
        .filter_map(|p| p["peer"].as_str().map(String::from))
        .collect())
}

#[test]
fn sighup_reloads_without_dropping_sessions_or_drops() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    let file = lab.dir.path.join("agent.toml");
    std::fs::write(&file, config("203.0.113.2:4700", &["192.0.2.0/24"]))?;
    let mut args = lab.agent_args(false);
    args.extend(["--config".into(), file.display().to_string()]);
    lab.start_agent_with(args)?;
    let sink = sink(&lab)?;
    let (_, mid, _) = lab.mitigate("192.0.2.2/32", "198.51.100.10/32", &["--lifetime", "600"])?;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert_eq!(probe(&lab, &sink, "before")?, 0);
    // 203.0.113.128/25 is not in the domain yet.
    let (code, _, _) = lab.mitigate("203.0.113.200/32", "198.51.100.11/32", &[])?;
    assert_eq!(code, "4.00 Bad Request");

    // A new domain prefix, peer 4700 removed, peer 4701 added.
    std::fs::write(
        &file,
        config("203.0.113.2:4701", &["192.0.2.0/24", "203.0.113.128/25"]),
    )?;
    hangup(&lab, "configuration reloaded", 1)?;
    let (code, _, _) = lab.mitigate("203.0.113.200/32", "198.51.100.11/32", &[])?;
    assert_eq!(code, "2.01 Created", "the new prefix applies at once");
    let now = peers(&lab)?;
    assert!(
        now.contains(&"203.0.113.2:4701".to_string())
            && !now.contains(&"203.0.113.2:4700".to_string()),
        "{now:?}"
    );
    let log = lab.agent_log();
    assert!(log.contains("peer removed by a reload"), "{log}");
    // The session stayed up (one session, never redialled) and the drops
    // went on.
    assert_eq!(log.matches("signal channel up").count(), 1, "{log}");
    assert_eq!(
        probe(&lab, &sink, "after")?,
        0,
        "the mitigation still drops"
    );
    lab.wait_status(mid, "attack-successfully-mitigated")?;

    // A bad file: logged, the running configuration stays.
    std::fs::write(&file, "[[peers]\n")?;
    hangup(
        &lab,
        "the configuration is not valid; keeping the running one",
        1,
    )?;
    assert!(
        lab.agent.as_mut().context("agent")?.running(),
        "SIGHUP must not stop the agent"
    );
    assert_eq!(
        probe(&lab, &sink, "bad")?,
        0,
        "drops go on after a bad reload"
    );
    let (code, _, _) = lab.mitigate("203.0.113.201/32", "198.51.100.11/32", &[])?;
    assert_eq!(code, "2.01 Created", "the last good configuration holds");
    Ok(())
}

/// nftables source NAT of the LAN to `addr` on `wan`.
fn snat(lab: &Lab, addr: &str) -> Result<()> {
    let rules = format!(
        "table ip nat {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan\" snat to {addr}\n }}\n}}\n"
    );
    let path = lab.dir.path.join("snat.nft");
    std::fs::write(&path, rules)?;
    lab.cpe.exec(&["nft", "-f", &path.display().to_string()])?;
    Ok(())
}

/// Waits until the local domain the agent logged last does (or does not)
/// hold `prefix`.
fn domain_holds(lab: &Lab, prefix: &str, holds: bool) -> Result<()> {
    let agent = lab.agent.as_ref().context("agent")?;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let log = agent.log_text();
        let last = log.lines().rfind(|l| l.contains("local domain"));
        if last.is_some_and(|l| l.contains(prefix) == holds) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "the domain never {} {prefix}; log:\n{}",
        if holds { "held" } else { "lost" },
        lab.agent_log()
    )
}

#[test]
fn router_address_changes_reach_validation_and_nat() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.start_client()?;
    lab.start_agent(&[])?;
    let sink = sink(&lab)?;
    // Not the router's address (yet): outside the domain.
    let (code, _, body) =
        lab.mitigate("203.0.113.6/32", "198.51.100.10/32", &["--protocol", "17"])?;
    assert_eq!(code, "4.00 Bad Request", "{body}");

    // The ISP side gives the router another address (renumbering), and the
    // LAN is translated to it.
    ip(&lab.cpe, "addr add 203.0.113.6/32 dev wan")?;
    domain_holds(&lab, "203.0.113.6/32", true)?;
    snat(&lab, "203.0.113.6")?;
    send_from(&lab.hosta, 5000, TARGET4, 10, "a1")?;
    assert_eq!(sink.count("a1"), 10);
    let (code, mid, _) =
        lab.mitigate("203.0.113.6/32", "198.51.100.10/32", &["--protocol", "17"])?;
    assert_eq!(code, "2.01 Created");
    // Resolved through conntrack to the device behind the new address.
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    send_from(&lab.hosta, 5000, TARGET4, 50, "a2")?;
    assert_eq!(
        sink.count("a2"),
        0,
        "the device behind the new address is blocked"
    );
    let (_, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(out.contains("behind NAT: 192.0.2.2"), "{out}");

    // The address goes away: a request naming it is refused again.
    ip(&lab.cpe, "addr del 203.0.113.6/32 dev wan")?;
    domain_holds(&lab, "203.0.113.6/32", false)?;
    let (code, _, body) =
        lab.mitigate("203.0.113.6/32", "198.51.100.11/32", &["--protocol", "17"])?;
    assert!(refused_as_outside(&code, &body), "{code} {body}");
    Ok(())
}

#[test]
fn systemd_hears_ready_status_watchdog_and_reload() -> Result<()> {
    use std::os::unix::net::UnixDatagram;
    let mut lab = Lab::new()?;
    lab.start_client()?;
    let path = lab.dir.path.join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    lab.agent_env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "2000000".into()),
    ];
    lab.start_agent(&[])?;
    let mut seen = Vec::new();
    let mut next = || -> Result<String> {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf)?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(m.clone());
        Ok(m)
    };
    // READY first (control socket up, XDP attached), then the status
    // follows the session, and the watchdog is fed.
    let first = next()?;
    assert!(first.starts_with("READY=1\nSTATUS="), "{first}");
    let (mut up, mut watchdog) = (false, false);
    for _ in 0..20 {
        let m = next()?;
        up |= m.contains("STATUS=1/1 sessions up");
        watchdog |= m == "WATCHDOG=1";
        if up && watchdog {
            break;
        }
    }
    assert!(up && watchdog, "{seen:?}");
    lab.agent.as_ref().context("agent")?.signal(libc::SIGHUP);
    let mut reloading = false;
    for _ in 0..20 {
        let m = next()?;
        reloading |= m.starts_with("RELOADING=1\nMONOTONIC_USEC=");
        if reloading && m.starts_with("READY=1") {
            return Ok(());
        }
    }
    anyhow::bail!("no RELOADING then READY: {seen:?}")
}

#[test]
fn the_client_tells_systemd_it_is_ready_and_survives_sighup() -> Result<()> {
    use std::os::unix::net::UnixDatagram;
    let mut lab = Lab::new()?;
    let path = lab.dir.path.join("client-notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    lab.client_env = vec![("NOTIFY_SOCKET".into(), path.display().to_string())];
    lab.start_client()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(first, "READY=1\nSTATUS=0 agent(s) connected");
    lab.start_agent(&[])?;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|m: &String| m == "STATUS=1 agent(s) connected")
    {
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("no status with the agent: {seen:?}"))?;
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let client = lab.client.as_mut().context("client")?;
    client.signal(libc::SIGHUP);
    // The listener re-reads what it can change live (the customer
    // registry from its flags here) and keeps its sessions.
    client.wait_log("reloaded 1 customer entries", Duration::from_secs(10))?;
    assert!(client.running(), "SIGHUP must not stop the listener");
    let (ok, r) = lab.client(&["agents"])?;
    assert!(
        ok && r[0]["body"].as_array().is_some_and(|a| a.len() == 1),
        "{r:?}"
    );
    Ok(())
}
