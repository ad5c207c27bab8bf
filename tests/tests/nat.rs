//! NAT correlation against the real kernel: two LAN hosts behind an
//! nftables masquerade talk to a target; the conntrack dump and event
//! stream (ctnetlink) let the matcher find the internal device behind the
//! router's external address and translated ports.
//!
//! ```text
//! [hosta 192.0.2.2]--+
//!                    [cpe: masquerade on wan 203.0.113.1]--wan--[target 203.0.113.2, 198.51.100.10]
//! [hostb 192.0.2.18]-+
//! ```

use std::{
    net::{IpAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_agent::{
    enforce::{Range, SlotSpec},
    nat::{
        self, Conntrack, CtEntry, CtEvent, CtMirror, EventSocket, NatAction, NatScope, NatTracker,
    },
};
use tests::{
    lab::{ip, masquerade, translated_port},
    unique, veth, Netns,
};

const TARGET: &str = "198.51.100.10";
const EXTERNAL: &str = "203.0.113.1";
const HOSTA: &str = "192.0.2.2";
const HOSTB: &str = "192.0.2.18";

struct Lab {
    hosta: Netns,
    hostb: Netns,
    cpe: Netns,
    _target: Netns,
}

impl Lab {
    /// The namespaces (and with them the nftables ruleset and conntrack
    /// table of the cpe) go on drop, also when a test fails.
    fn new() -> Result<Lab> {
        let (hosta, hostb, cpe, target) = (
            Netns::new("nha")?,
            Netns::new("nhb")?,
            Netns::new("ncpe")?,
            Netns::new("ntgt")?,
        );
        let (la, lb) = (unique("la"), unique("lb"));
        veth(&hosta, "eth0", &cpe, &la)?;
        veth(&hostb, "eth0", &cpe, &lb)?;
        veth(&cpe, "wan", &target, "eth0")?;
        ip(&hosta, "addr add 192.0.2.2/28 dev eth0")?;
        ip(&hosta, "route add default via 192.0.2.1")?;
        ip(&hostb, "addr add 192.0.2.18/28 dev eth0")?;
        ip(&hostb, "route add default via 192.0.2.17")?;
        ip(&cpe, &format!("addr add 192.0.2.1/28 dev {la}"))?;
        ip(&cpe, &format!("addr add 192.0.2.17/28 dev {lb}"))?;
        ip(&cpe, "addr add 203.0.113.1/24 dev wan")?;
        ip(&cpe, "route add default via 203.0.113.2")?;
        ip(&target, "addr add 203.0.113.2/24 dev eth0")?;
        ip(&target, "addr add 198.51.100.10/24 dev eth0")?;
        cpe.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        masquerade(&cpe)?;
        Ok(Lab {
            hosta,
            hostb,
            cpe,
            _target: target,
        })
    }
}

/// Sends one UDP datagram from `host` (bound to `src_port`) to `TARGET:dport`.
fn send(host: &Netns, src: &str, src_port: u16, dport: u16) -> Result<()> {
    host.enter(|| -> Result<()> {
        let s = UdpSocket::bind((src.parse::<IpAddr>()?, src_port))?;
        s.send_to(b"hello", (TARGET.parse::<IpAddr>()?, dport))?;
        Ok(())
    })?
}

fn dump(ns: &Netns) -> Result<Vec<CtEntry>> {
    Ok(ns.enter(|| Conntrack::open().and_then(|mut c| c.dump()))??)
}

fn scope_spec(ports: &[u16]) -> SlotSpec {
    SlotSpec {
        sources: vec![format!("{EXTERNAL}/32").parse().unwrap()],
        source_ports: ports.iter().map(|&p| Range::single(p)).collect(),
        targets: vec![format!("{TARGET}/32").parse().unwrap()],
        ..SlotSpec::default()
    }
}

fn router(ns: &Netns) -> Result<Vec<IpAddr>> {
    ns.enter(nat::router_addresses)
}

#[test]
fn dump_finds_nated_flows_and_matcher_picks_the_attacker() -> Result<()> {
    let lab = Lab::new()?;
    // Both hosts use source port 5000: masquerade keeps it for the first
    // and translates the second.
    send(&lab.hosta, HOSTA, 5000, 9)?;
    send(&lab.hostb, HOSTB, 5000, 9)?;
    send(&lab.hostb, HOSTB, 5001, 9)?;
    let entries = dump(&lab.cpe)?;
    let ours: Vec<_> = entries
        .iter()
        .filter(|e| e.original.dst.to_string() == TARGET)
        .collect();
    assert_eq!(ours.len(), 3, "{entries:#?}");
    for e in &ours {
        assert_eq!(e.reply.dst.to_string(), EXTERNAL);
        assert_eq!(e.original.protocol, 17);
    }
    // The attacker is hostb; the ISP sees its translated ports.
    let xb0 = translated_port(&lab.cpe, HOSTB, 5000, TARGET)?;
    let xb1 = translated_port(&lab.cpe, HOSTB, 5001, TARGET)?;
    let xa = translated_port(&lab.cpe, HOSTA, 5000, TARGET)?;
    assert_ne!(xb0, xa, "masquerade must have translated one of the 5000s");
    let router = router(&lab.cpe)?;
    assert!(router.contains(&EXTERNAL.parse()?));
    let scope = NatScope::from_spec(&scope_spec(&[xb0, xb1]), &router).context("NAT scope")?;
    let hits: Vec<_> = entries
        .iter()
        .filter_map(|e| nat::match_entry(&scope, e))
        .collect();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits.iter().all(|h| h.device.to_string() == HOSTB));
    let mut ports: Vec<_> = hits.iter().filter_map(|h| h.port).collect();
    ports.sort();
    assert_eq!(ports, vec![5000, 5001], "internal (pre-NAT) ports");

    // The kernel-side filter (reply to the external address, original
    // destination the target, UDP) returns the same matches from less.
    let filtered = lab.cpe.enter(|| -> Result<Vec<CtEntry>> {
        let mut ct = Conntrack::open()?;
        Ok(nat::snapshot_for(
            &mut ct,
            &scope_spec(&[xb0, xb1]),
            &router,
        )?)
    })??;
    assert_eq!(filtered.len(), 3, "{filtered:#?}");
    let mut other_dst = scope_spec(&[]);
    other_dst.targets = vec!["198.51.100.99/32".parse()?];
    let none = lab.cpe.enter(|| -> Result<Vec<CtEntry>> {
        Ok(nat::snapshot_for(
            &mut Conntrack::open()?,
            &other_dst,
            &router,
        )?)
    })??;
    assert!(none.is_empty(), "{none:#?}");

    // By address alone (no ports) both hosts are behind the address.
    let all = NatScope::from_spec(&scope_spec(&[]), &router).unwrap();
    let mut devs: Vec<_> = entries
        .iter()
        .filter_map(|e| nat::match_entry(&all, e))
        .map(|h| h.device.to_string())
        .collect();
    devs.sort();
    devs.dedup();
    assert_eq!(devs, vec![HOSTB.to_string(), HOSTA.to_string()]);

    // Device mode blocks hostb to the target on any port; flow mode only
    // its internal ports. MACs come from the cpe's neighbour table.
    let mut tracker = NatTracker::new(router.clone(), NatAction::Flow);
    assert!(tracker.track(1, &scope_spec(&[xb0, xb1]), &entries));
    let spec = tracker.slot_spec(&1).context("resolved")?;
    assert_eq!(spec.sources, vec![format!("{HOSTB}/32").parse()?]);
    assert_eq!(spec.source_ports, vec![Range::new(5000, 5001)]);
    let neigh = lab.cpe.enter(nat::neighbours)??;
    tracker.set_macs(&neigh);
    let dev = tracker.devices(&1).unwrap().iter().next().unwrap().clone();
    let link = lab.hostb.ip(&["-j", "link", "show", "eth0"])?;
    let link: serde_json::Value = serde_json::from_str(&link)?;
    let want = link[0]["address"].as_str().context("no MAC")?;
    assert_eq!(dev.mac.map(|m| m.to_string()).as_deref(), Some(want));
    Ok(())
}

#[test]
fn events_report_a_new_flow_within_a_second() -> Result<()> {
    let lab = Lab::new()?;
    let events = lab.cpe.enter(EventSocket::open)??;
    let mut rx = events.spawn(Duration::from_millis(100))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let router = router(&lab.cpe)?;
    let mut tracker = NatTracker::new(router, NatAction::Device);
    // Requested before any matching flow exists: pending.
    assert!(tracker.track("m", &scope_spec(&[]), &dump(&lab.cpe)?));
    assert_eq!(tracker.slot_spec(&"m"), None);

    let sent = Instant::now();
    send(&lab.hosta, HOSTA, 6000, 9)?;
    let resolved = rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Some(Ok(CtEvent::New(e)))) => {
                    if !tracker.observe(&e).is_empty() {
                        return Ok(sent.elapsed());
                    }
                }
                Ok(Some(Ok(CtEvent::Destroy(_)))) => {}
                Ok(Some(Ok(CtEvent::Resync))) => bail!("events overran"),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => bail!("event thread ended"),
                Err(_) => bail!("no matching event within 1 s"),
            }
        }
    })?;
    assert!(resolved < Duration::from_secs(1), "{resolved:?}");
    let spec = tracker.slot_spec(&"m").context("resolved")?;
    assert_eq!(spec.sources, vec![format!("{HOSTA}/32").parse()?]);
    assert!(spec.source_ports.is_empty(), "device mode");

    // A second device appearing later joins the set; the first stays even
    // after its conntrack entries are flushed.
    lab.cpe.exec(&["conntrack", "-F"])?;
    send(&lab.hostb, HOSTB, 6001, 9)?;
    rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Some(Ok(CtEvent::New(e)))) if !tracker.observe(&e).is_empty() => return Ok(()),
                Ok(Some(Ok(_))) => {}
                _ => bail!("hostb's flow not seen within 1 s"),
            }
        }
    })?;
    let spec = tracker.slot_spec(&"m").unwrap();
    assert_eq!(
        spec.sources,
        vec![
            format!("{HOSTA}/32").parse()?,
            format!("{HOSTB}/32").parse()?
        ]
    );
    drop(rx);
    Ok(())
}

/// Applies events to `mirror` until `done` holds (true), or `within` passes
/// (false).
fn apply_until(
    rt: &tokio::runtime::Runtime,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<CtEvent, nat::NatError>>,
    mirror: &mut CtMirror,
    within: Duration,
    done: impl Fn(&CtMirror) -> bool,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + within;
    rt.block_on(async {
        while !done(mirror) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Ok(CtEvent::Resync))) => bail!("events overran"),
                Ok(Some(Ok(ev))) => {
                    mirror.apply(&ev);
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => bail!("event thread ended"),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    })
}

#[test]
fn mirror_follows_new_and_destroyed_flows() -> Result<()> {
    let lab = Lab::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let router = router(&lab.cpe)?;
    let from = |m: &CtMirror, host: &str| m.entries().any(|e| e.original.src.to_string() == host);
    let devices = |m: &CtMirror| -> Vec<String> {
        let mut t = NatTracker::new(router.clone(), NatAction::Device);
        t.track_entries(0, &scope_spec(&[]), m.entries());
        t.devices(&0)
            .map(|d| d.addrs().map(|a| a.to_string()).collect())
            .unwrap_or_default()
    };
    // A flow from before the agent starts.
    send(&lab.hosta, HOSTA, 5000, 9)?;
    // Subscribe, then load: the agent's order.
    let (events, mut ct) = lab
        .cpe
        .enter(|| -> Result<_> { Ok((EventSocket::open()?, Conntrack::open()?)) })??;
    let mut mirror = CtMirror::load(&mut ct)?;
    let mut rx = events.spawn(Duration::from_millis(100))?;
    assert!(from(&mirror, HOSTA), "pre-start flow loaded");
    assert_eq!(devices(&mirror), vec![HOSTA.to_string()]);

    // A flow after the start arrives by event.
    send(&lab.hostb, HOSTB, 6000, 9)?;
    assert!(
        apply_until(&rt, &mut rx, &mut mirror, Duration::from_secs(1), |m| from(
            m, HOSTB
        ))?,
        "hostb's new flow not in the mirror within 1 s"
    );
    assert_eq!(devices(&mirror), vec![HOSTA.to_string(), HOSTB.to_string()]);

    // Destroyed: the DESTROY event removes it.
    lab.cpe.exec(&["conntrack", "-D", "--orig-src", HOSTB])?;
    assert!(
        apply_until(
            &rt,
            &mut rx,
            &mut mirror,
            Duration::from_secs(1),
            |m| !from(m, HOSTB)
        )?,
        "hostb's destroyed flow still in the mirror after 1 s"
    );
    assert_eq!(devices(&mirror), vec![HOSTA.to_string()]);

    // The pre-start flow may have no DESTROY event (nf_conntrack_events=2
    // attaches the event extension only when someone listens at creation):
    // the mirror says so, and a reload (what the agent does periodically)
    // forgets it.
    lab.cpe.exec(&["conntrack", "-D", "--orig-src", HOSTA])?;
    if !apply_until(&rt, &mut rx, &mut mirror, Duration::from_millis(500), |m| {
        !from(m, HOSTA)
    })? {
        eprintln!("no DESTROY event for the pre-start flow: reloading");
        assert!(mirror.needs_reconcile());
        lab.cpe.enter(|| mirror.reload(&mut ct))??;
    }
    assert!(!from(&mirror, HOSTA), "pre-start flow forgotten");
    assert!(devices(&mirror).is_empty());
    assert!(!mirror.needs_reconcile());
    drop(rx);
    Ok(())
}
