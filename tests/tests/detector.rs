//! A real detector closes the loop, with no human step: a LAN host behind
//! the router's NAT floods the target; FastNetMon on the ISP side sees an
//! outgoing flood from the router's public address and runs the shipped
//! notify script, which asks dots-client's API for a mitigation (attacker,
//! translated port, top target); dots-client picks the agent by its customer
//! prefixes; the agent finds the device behind NAT and drops its flood while
//! the other host's traffic flows. When the attack has stopped (as FastNetMon
//! sees it), the unban withdraws the mitigation and the flood passes again.

use std::{process::Command, sync::atomic::Ordering, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;
use tests::{detector::*, lab::*};

/// Runs the notify script as FastNetMon would, in the ISP namespace.
fn notify(lab: &Lab, args: &[&str], stdin: &str) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.isp.name))
        .arg(lab.dir.path.join("fnm-notify.sh"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn audit(lab: &Lab) -> Vec<Value> {
    std::fs::read_to_string(lab.dir.path.join("client-state/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn fastnetmon_bans_and_unbans_through_the_api() -> Result<()> {
    let mut lab = Lab::new()?;
    masquerade(&lab.cpe)?;
    let flags = api_flags(&lab)?;
    lab.start_client_with(&flags)?;
    lab.start_agent(&[])?;
    let sink = Sink::open(&lab.target)?;
    let stop = flood_and_normal(&lab)?;
    let (flood, normal) = rates(&sink, 1);
    assert!(
        flood > FLOOD_PPS / 2 && normal > NORMAL_PPS / 2,
        "before: {flood} {normal}"
    );
    // Started only now: a detector that bans within the first second would
    // otherwise cut the flood while the line above measures it.
    let fnm = FastNetMon::start(&lab, 500, 6)?;

    // FastNetMon bans; the script asks for the mitigation.
    let m = wait_detector_state(&lab, &fnm, "active", Duration::from_secs(40))?;
    let port = translated_port(&lab.cpe, HOSTA4, 5000, TARGET4)?;
    let scope = &m["request"]["ietf-dots-signal-channel:mitigation-scope"]["scope"][0];
    assert_eq!(m["agent"], "cpe1", "picked by the customer prefix: {m}");
    assert_eq!(m["requested-by"], "api:fastnetmon");
    assert_eq!(
        scope["ietf-dots-call-home:source-prefix"][0],
        "203.0.113.1/32"
    );
    assert_eq!(scope["target-prefix"][0], format!("{TARGET4}/32"));
    // The flood's translated port only: hostb's flow from the same address
    // (port 5000, 50 pkt/s) is in the samples too, and left out.
    assert_eq!(
        scope["ietf-dots-call-home:source-port-range"],
        serde_json::json!([{ "lower-port": port }]),
        "the translated port from FastNetMon's samples: {scope}"
    );
    let mid = m["mid"].as_u64().context("mid")? as u32;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    let (_, view) = lab.agent_cmd(&["mitigations"])?;
    assert!(view.contains("behind NAT: 192.0.2.2"), "{view}");
    let (flood, normal) = rates(&sink, 2);
    assert!(
        flood < FLOOD_PPS / 20 && normal > NORMAL_PPS / 2,
        "during: flood {flood}, normal {normal}"
    );

    // Bad input at the detector's door changes nothing.
    let samples =
        format!("Attack protocol: udp\n203.0.113.1:{port} > {TARGET4}:9 1000 bytes 100 packets\n");
    let (ok, err) = notify(&lab, &["203.0.113.1", "outgoing", "2000", "ban"], &samples)?;
    assert!(!ok && err.contains("HTTP 409"), "duplicate ban: {err}");
    let unknown = "Attack protocol: udp\n198.18.0.1:1 > 198.51.100.10:9 1 bytes 1 packets\n";
    let (ok, err) = notify(&lab, &["198.18.0.1", "outgoing", "2000", "ban"], unknown)?;
    assert!(!ok && err.contains("HTTP 404"), "unknown address: {err}");
    assert!(
        err.contains("no customer prefix contains 198.18.0.1"),
        "{err}"
    );
    let (ok, _) = notify(&lab, &["203.0.113.1", "incoming", "2000", "ban"], &samples)?;
    assert!(ok, "incoming attacks are not ours: ignored");
    assert_eq!(detector_mitigations(&lab)?.len(), 1, "nothing was added");

    // The flood is dropped at the router, FastNetMon sees the attack end and
    // unbans after its ban time: the mitigation is withdrawn and the flood
    // passes again.
    let w = wait_detector_state(&lab, &fnm, "withdrawn", Duration::from_secs(60))?;
    assert_eq!(w["mid"], mid);
    assert!(
        w["counters"]["pkts-dropped"].as_u64().unwrap_or(0) > 0,
        "final counters: {w}"
    );
    let (flood, _) = rates(&sink, 1);
    stop.store(true, Ordering::Relaxed);
    assert!(
        flood > FLOOD_PPS / 4,
        "after the unban the flood passes: {flood}"
    );
    drop(fnm);

    // An unban with nothing left to withdraw is an error, and changes nothing
    // (FastNetMon may have banned again in the last second: that one goes first).
    let mut last = (true, String::new());
    for _ in 0..2 {
        last = notify(&lab, &["203.0.113.1", "outgoing", "0", "unban"], "")?;
        if !last.0 {
            break;
        }
    }
    assert!(
        !last.0
            && last
                .1
                .contains("no unfinished mitigation labelled fastnetmon:203.0.113.1"),
        "{last:?}"
    );

    // The audit trail names FastNetMon, the agent, the codes and the counters.
    let trail = audit(&lab);
    let by_fnm = |action: &str, code: u64| {
        trail.iter().any(|e| {
            e["event"] == "request"
                && e["by"]["name"] == "fastnetmon"
                && e["action"] == action
                && e["code"] == code
                && (code >= 400 || e["agent"] == "cpe1")
        })
    };
    assert!(by_fnm("mitigate", 201), "{trail:#?}");
    assert!(by_fnm("mitigate", 409) && by_fnm("mitigate", 404));
    assert!(by_fnm("withdraw", 200));
    assert!(trail
        .iter()
        .any(|e| e["event"] == "status" && e["detail"]["to"] == "attack-successfully-mitigated"));
    assert!(trail.iter().any(|e| e["event"] == "final"
        && e["mid"] == mid
        && e["detail"]["counters"]["pkts-dropped"]
            .as_u64()
            .unwrap_or(0)
            > 0));
    Ok(())
}
