//! `cargo xtask demo`: the whole story in a lab of network namespaces, in
//! under two minutes.
//!
//! Two LAN hosts sit behind a router doing NAT (nftables masquerade) that
//! runs `dots-agent` with XDP on its LAN side; an ISP namespace runs
//! `dots-client`; a target sits behind the ISP. One LAN host floods the
//! target while the other keeps normal traffic going. The ISP only sees the
//! router's address and the flood's translated source port; it asks for a
//! mitigation, the agent finds the device behind NAT and drops its flood,
//! counters flow back, then the ISP withdraws and the traffic returns.
//!
//! With `--detector`, no human types the mitigation: FastNetMon on the ISP
//! side detects the outgoing flood and its notify script asks dots-client's
//! HTTPS API for the mitigation (the agent is picked by its customer
//! prefixes); FastNetMon's unban withdraws it.
//!
//! Exits non-zero if any expected effect is not observed. Everything is torn
//! down on every exit path (the lab cleans up on drop, also on Ctrl-C).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::{detector::*, lab::*};

fn say(start: Instant, what: &str) {
    println!("[{:5.1}s] {what}", start.elapsed().as_secs_f64());
}

fn field(scope: &Value, key: &str) -> String {
    match &scope[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn main() {
    // The lab's Drop tears everything down; run() returning is enough, also
    // on errors. Ctrl-C: the handler lets run() notice and return.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc_handler(move || flag.store(true, Ordering::Relaxed));
    let detector = std::env::args().any(|a| a == "--detector");
    let result = if detector {
        run_detector(&interrupted)
    } else {
        run(&interrupted)
    };
    match result {
        Ok(()) => println!("\ndemo: every expected effect was observed"),
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

/// SIGINT/SIGTERM set a flag instead of killing the process, so the lab is
/// dropped (namespaces deleted, XDP detached) on the way out.
fn ctrlc_handler(f: impl Fn() + Send + 'static) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            dots_daemon::shutdown::signal().await;
            f();
        })
    });
    Ok(())
}

fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn run(interrupted: &AtomicBool) -> Result<()> {
    let start = Instant::now();
    say(
        start,
        "building the lab: hosta + hostb behind a NAT router (cpe), ISP, target",
    );
    let mut lab = Lab::new()?;
    masquerade(&lab.cpe)?;
    lab.start_client()?;
    say(
        start,
        "ISP: dots-client listening on 203.0.113.2:4647 (DTLS and TLS)",
    );
    lab.start_agent(&[])?;
    say(
        start,
        "router: dots-agent dialled the ISP (Call Home), XDP attached on both LAN interfaces",
    );
    check(interrupted)?;

    let (sink, stop) = start_flood(&lab, start, true)?;
    check(interrupted)?;

    let port = translated_port(&lab.cpe, HOSTA4, 5000, TARGET4)?;
    say(
        start,
        &format!("ISP sees the flood from the router's address 203.0.113.1, source port {port}"),
    );
    let (code, mid, body) = lab.mitigate(
        "203.0.113.1/32",
        &format!("{TARGET4}/32"),
        &[
            "--source-port",
            &port.to_string(),
            "--protocol",
            "17",
            "--lifetime",
            "300",
        ],
    )?;
    let status = field(
        &body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0],
        "status",
    );
    say(
        start,
        &format!("ISP -> agent: PUT mitigate mid={mid}: {code}, status {status}"),
    );
    if code != "2.01 Created" {
        bail!("the mitigation request was answered {code}");
    }
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    show_device(&lab, start)?;
    check(interrupted)?;
    expect_dropped(&sink, start)?;
    // The notifications the ISP side receives carry the counters.
    std::thread::sleep(Duration::from_secs(1));
    let scope = lab.scope(mid)?;
    say(
        start,
        &format!(
            "ISP <- agent: status {}, pkts-dropped {}, pps-dropped {}, bps-dropped {}",
            field(&scope, "status"),
            field(&scope, "pkts-dropped"),
            field(&scope, "pps-dropped"),
            field(&scope, "bps-dropped")
        ),
    );
    let pps: u64 = field(&scope, "pps-dropped").parse().unwrap_or(0);
    if pps < FLOOD_PPS / 2 {
        bail!("the reported drop rate ({pps} pkt/s) does not match the flood");
    }
    let client_log = lab
        .client
        .as_ref()
        .map(|c| c.log_text())
        .unwrap_or_default();
    let notes = client_log
        .lines()
        .filter(|l| l.contains("notification"))
        .count();
    say(
        start,
        &format!("ISP: {notes} Observe notifications received so far"),
    );
    check(interrupted)?;

    let (ok, r) = lab.client(&["withdraw", "--mid", &mid.to_string()])?;
    let fin = &r.first().context("no reply")?["body"]["ietf-dots-signal-channel:mitigation-scope"]
        ["scope"][0];
    say(
        start,
        &format!(
            "ISP -> agent: DELETE mid={mid}: {}, final pkts-dropped {}",
            r[0]["code"].as_str().unwrap_or("?"),
            field(fin, "pkts-dropped")
        ),
    );
    if !ok {
        bail!("withdrawal failed: {r:?}");
    }
    let (flood, normal) = rates(&sink, 2);
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s (traffic restored)"),
    );
    stop.store(true, Ordering::Relaxed);
    if flood < FLOOD_PPS / 2 {
        bail!("the flood did not come back after withdrawal ({flood} pkt/s)");
    }
    say(start, "tearing the lab down");
    Ok(())
}

/// The detector scenario: FastNetMon -> notify script -> API -> agent.
fn run_detector(interrupted: &AtomicBool) -> Result<()> {
    let start = Instant::now();
    say(
        start,
        "building the lab: hosta + hostb behind a NAT router (cpe), ISP, target",
    );
    let mut lab = Lab::new()?;
    masquerade(&lab.cpe)?;
    let flags = api_flags(&lab)?;
    lab.start_client_with(&flags)?;
    say(
        start,
        &format!("ISP: dots-client listening for agents, HTTPS API on {API_ADDR}; customer cpe1 = 203.0.113.1, 192.0.2.0/24"),
    );
    lab.start_agent(&[])?;
    say(start, "router: dots-agent dialled the ISP (Call Home)");
    let fnm = FastNetMon::start(&lab, 500, 6)?;
    say(
        start,
        "ISP: FastNetMon mirrors the link to the router (AF_PACKET), bans above 500 pkt/s outgoing",
    );
    check(interrupted)?;
    let (sink, stop) = start_flood(&lab, start, false)?;
    let m = wait_detector_state(&lab, &fnm, "active", Duration::from_secs(40))?;
    for line in fnm.notify_log().lines() {
        say(start, &format!("FastNetMon notify: {}", after_stamp(line)));
    }
    say(
        start,
        &format!(
            "dots-client: mitigation {} for agent {} (picked by its customer prefixes), requested by {}",
            field(&m, "id"),
            field(&m, "agent"),
            field(&m, "requested-by")
        ),
    );
    let mid = m["mid"].as_u64().context("mid")? as u32;
    lab.wait_status(mid, "attack-successfully-mitigated")?;
    show_device(&lab, start)?;
    check(interrupted)?;
    expect_dropped(&sink, start)?;
    say(
        start,
        "FastNetMon sees the attack end at the ISP; it unbans after its ban time (6 s)",
    );
    let seen = fnm.notify_log().lines().count();
    let w = wait_detector_state(&lab, &fnm, "withdrawn", Duration::from_secs(60))?;
    for line in fnm.notify_log().lines().skip(seen) {
        say(start, &format!("FastNetMon notify: {}", after_stamp(line)));
    }
    say(
        start,
        &format!(
            "dots-client: {} withdrawn, final pkts-dropped {}",
            field(&w, "id"),
            field(&w["counters"], "pkts-dropped")
        ),
    );
    let (flood, normal) = rates(&sink, 1);
    stop.store(true, Ordering::Relaxed);
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s (traffic restored)"),
    );
    if flood < FLOOD_PPS / 4 {
        bail!("the flood did not come back after the unban ({flood} pkt/s)");
    }
    say(start, "tearing the lab down");
    Ok(())
}

/// Starts the flood and the normal traffic and shows what reaches the
/// target; with `require`, fails unless both do (a detector may already
/// have acted within the seconds measured).
fn start_flood(lab: &Lab, start: Instant, require: bool) -> Result<(Sink, Arc<AtomicBool>)> {
    let sink = Sink::open(&lab.target)?;
    let stop = flood_and_normal(lab)?;
    say(start, &format!("hosta (192.0.2.2) floods the target at {FLOOD_PPS} pkt/s; hostb (192.0.2.18) sends {NORMAL_PPS} pkt/s"));
    let (flood, normal) = rates(&sink, if require { 3 } else { 2 });
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s"),
    );
    if require && (flood < FLOOD_PPS / 2 || normal < NORMAL_PPS / 2) {
        stop.store(true, Ordering::Relaxed);
        bail!("traffic did not reach the target before the mitigation (flood {flood}, normal {normal})");
    }
    Ok((sink, stop))
}

/// Prints what the agent found behind NAT; fails unless it is hosta.
fn show_device(lab: &Lab, start: Instant) -> Result<()> {
    let (_, view) = lab.agent_cmd(&["mitigations"])?;
    for line in view
        .lines()
        .filter(|l| l.contains("behind NAT") || l.contains("from "))
    {
        say(start, &format!("agent: {}", line.trim()));
    }
    if !view.contains("behind NAT: 192.0.2.2") {
        bail!("the agent did not report the device behind NAT:\n{view}");
    }
    Ok(())
}

/// Measures the target for 3 s: the flood must be gone, the normal
/// traffic still there.
fn expect_dropped(sink: &Sink, start: Instant) -> Result<()> {
    let (flood, normal) = rates(sink, 3);
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s"),
    );
    if flood > FLOOD_PPS / 20 || normal < NORMAL_PPS / 2 {
        bail!("expected the flood dropped and normal traffic flowing (flood {flood}, normal {normal})");
    }
    Ok(())
}

/// The notify log's line without its time stamp.
fn after_stamp(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(_, rest)| rest)
}
