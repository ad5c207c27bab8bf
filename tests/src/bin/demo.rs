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
//! Exits non-zero if any expected effect is not observed. Everything is torn
//! down on every exit path (the lab cleans up on drop, also on Ctrl-C).

use std::{
    net::UdpSocket,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::lab::*;

const FLOOD_PPS: u64 = 2000;
const NORMAL_PPS: u64 = 50;

fn say(start: Instant, what: &str) {
    println!("[{:5.1}s] {what}", start.elapsed().as_secs_f64());
}

/// Sends UDP to the target at `pps` from a fixed source port until stopped.
fn traffic(
    ns: &tests::Netns,
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
fn rates(sink: &Sink, secs: u64) -> (u64, u64) {
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
    match run(&interrupted) {
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

    let sink = Sink::open(&lab.target)?;
    let stop = Arc::new(AtomicBool::new(false));
    // Both use source port 5000, so NAT has to rename one of them.
    traffic(&lab.hostb, 5000, NORMAL_PPS, "normal", stop.clone())?;
    std::thread::sleep(Duration::from_millis(200));
    traffic(&lab.hosta, 5000, FLOOD_PPS, "flood", stop.clone())?;
    say(start, &format!("hosta (192.0.2.2) floods the target at {FLOOD_PPS} pkt/s; hostb (192.0.2.18) sends {NORMAL_PPS} pkt/s"));
    let (flood, normal) = rates(&sink, 3);
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s"),
    );
    if flood < FLOOD_PPS / 2 || normal < NORMAL_PPS / 2 {
        bail!("traffic did not reach the target before the mitigation (flood {flood}, normal {normal})");
    }
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
    check(interrupted)?;

    let (flood, normal) = rates(&sink, 3);
    say(
        start,
        &format!("target receives: flood {flood} pkt/s, normal {normal} pkt/s"),
    );
    if flood > FLOOD_PPS / 20 || normal < NORMAL_PPS / 2 {
        bail!("expected the flood dropped and normal traffic flowing (flood {flood}, normal {normal})");
    }
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
