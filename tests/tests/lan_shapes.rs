//! The classifier on the LAN shapes of real CPEs, with the kernel's own
//! bridge and routing: a Linux bridge of ports (`br-lan` style), and hosts
//! on an 802.1Q VLAN. Hosts send UDP to a target behind the router; a slot
//! naming one host must drop its traffic and nobody else's.
//!
//! ```text
//! [ha 192.0.2.2]--p0--+
//! [hb 192.0.2.3]--p1--br0 192.0.2.1 [cpe] wan 203.0.113.1 -- [tgt 198.51.100.10]
//! [hv, VLAN 10]---p2--+
//! ```
//!
//! The test kernel has no 802.1Q support (no 8021q module, no bridge VLAN
//! filtering), so it cannot route a VLAN: the tagged host is tested at
//! layer 2, with tagged frames it sends into a bridge port, which the
//! program drops or lets the bridge carry on (flooded to the other ports,
//! where a packet socket sees them).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use dots_agent::enforce::{AttachMode, Dataplane, DataplaneOptions, Slot, SlotSpec};
use tests::{
    lab::{ip, send, Sink},
    packet::{Frame, L4},
    veth, BpffsDir, Netns, PacketSocket,
};

const TARGET: &str = "198.51.100.10";

struct Lan {
    dp: Dataplane,
    ha: Netns,
    hb: Netns,
    hv: Netns,
    cpe: Netns,
    sink: Sink,
    // Dropped last.
    _tgt: Netns,
    _bpffs: BpffsDir,
}

impl Lan {
    fn new() -> Result<Lan> {
        let (ha, hb, hv, cpe, tgt) = (
            Netns::new("ha")?,
            Netns::new("hb")?,
            Netns::new("hv")?,
            Netns::new("cpe")?,
            Netns::new("tgt")?,
        );
        veth(&ha, "eth0", &cpe, "p0")?;
        veth(&hb, "eth0", &cpe, "p1")?;
        veth(&hv, "h0", &cpe, "p2")?;
        veth(&cpe, "wan", &tgt, "t0")?;
        // The bridge of two ports.
        ip(&cpe, "link add br0 type bridge")?;
        ip(&cpe, "link set p0 master br0")?;
        ip(&cpe, "link set p1 master br0")?;
        ip(&cpe, "link set p2 master br0")?;
        ip(&cpe, "link set br0 up")?;
        ip(&cpe, "addr add 192.0.2.1/28 dev br0")?;
        ip(&ha, "addr add 192.0.2.2/28 dev eth0")?;
        ip(&hb, "addr add 192.0.2.3/28 dev eth0")?;
        for h in [&ha, &hb] {
            ip(h, "route add default via 192.0.2.1")?;
        }
        // The way out.
        ip(&cpe, "addr add 203.0.113.1/30 dev wan")?;
        ip(&cpe, "route add 198.51.100.0/24 via 203.0.113.2")?;
        ip(&tgt, "addr add 203.0.113.2/30 dev t0")?;
        ip(&tgt, &format!("addr add {TARGET}/24 dev t0"))?;
        ip(&tgt, "route add 192.0.2.0/24 via 203.0.113.1")?;
        cpe.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let bpffs = BpffsDir::new()?;
        let mut dp = Dataplane::open(&DataplaneOptions {
            bpffs: bpffs.path.clone(),
            ..Default::default()
        })?;
        let one_host = SlotSpec {
            sources: vec!["192.0.2.2/32".parse()?, "192.0.2.34/32".parse()?],
            targets: vec![format!("{TARGET}/32").parse()?],
            ..SlotSpec::default()
        };
        dp.apply(&BTreeMap::from([(0, Slot::without_expiry(one_host))]))?;
        let sink = Sink::open(&tgt)?;
        let lan = Lan {
            dp,
            ha,
            hb,
            hv,
            cpe,
            sink,
            _tgt: tgt,
            _bpffs: bpffs,
        };
        // Neighbours resolved before anything is attached.
        for (ns, tag) in [(&lan.ha, "wa"), (&lan.hb, "wb")] {
            send(ns, TARGET, 3, tag)?;
        }
        assert_eq!(lan.sink.count("wb"), 3, "the lab routes the bridge");
        Ok(lan)
    }

    /// Datagrams arriving at the target of 50 sent from `ns`.
    fn through(&self, ns: &Netns, tag: &str) -> Result<usize> {
        send(ns, TARGET, 50, tag)?;
        Ok(self.sink.count(tag))
    }
}

#[test]
fn bridge_member_ports_in_native_mode() -> Result<()> {
    let mut lan = Lan::new()?;
    for port in ["p0", "p1"] {
        let a = lan
            .cpe
            .enter(|| lan.dp.attach(port, AttachMode::Native))??;
        assert_eq!(a.mode, "native");
    }
    assert_eq!(lan.through(&lan.ha, "a1")?, 0, "the named host is dropped");
    assert_eq!(
        lan.through(&lan.hb, "b1")?,
        50,
        "its neighbour on the bridge is not"
    );
    assert_eq!(lan.dp.counters(0)?.packets, 50);
    Ok(())
}

#[test]
fn bridge_device_in_generic_mode() -> Result<()> {
    let mut lan = Lan::new()?;
    // A bridge has no driver-mode XDP: auto falls back to generic mode,
    // which sees what the bridge hands to the router's own stack (routed
    // traffic), not frames bridged between two ports.
    let a = lan.cpe.enter(|| lan.dp.attach("br0", AttachMode::Auto))??;
    assert_eq!(a.mode, "generic");
    assert_eq!(lan.through(&lan.ha, "a2")?, 0);
    assert_eq!(lan.through(&lan.hb, "b2")?, 50);
    Ok(())
}

#[test]
fn vlan_tagged_hosts_on_a_bridge_port() -> Result<()> {
    let mut lan = Lan::new()?;
    let a = lan
        .cpe
        .enter(|| lan.dp.attach("p2", AttachMode::Native))??;
    assert_eq!(a.mode, "native");
    let tx = lan.hv.enter(|| PacketSocket::open("h0"))??;
    let rx = lan.hb.enter(|| PacketSocket::open("eth0"))??;
    let frame = |src: &str, vlans: Vec<u16>, marker: &str| {
        let mut f = Frame::new(
            src.parse().expect("address"),
            TARGET.parse().expect("address"),
            L4::Udp {
                sport: 4000,
                dport: 9,
            },
        );
        // Unknown destination: the bridge floods it to every other port.
        f.dst_mac = [0x02, 0xee, 0, 0, 0, 0x99];
        f.vlans = vlans;
        f.payload = marker.as_bytes().to_vec();
        f.build()
    };
    let sent = [
        ("192.0.2.34", vec![10], "DOTS-VLAN-A"), // the named host, tagged: dropped
        ("192.0.2.35", vec![10], "DOTS-VLAN-B"), // another host, tagged: bridged on
        ("192.0.2.34", vec![100, 10], "DOTS-VLAN-C"), // the named host, QinQ: dropped
        ("192.0.2.36", vec![100, 10], "DOTS-VLAN-D"), // another, QinQ: bridged on
    ];
    for (src, vlans, marker) in &sent {
        tx.send(&frame(src, vlans.clone(), marker))?;
    }
    let got = rx.drain(Duration::from_millis(300), Duration::from_secs(3));
    let seen = |marker: &str| {
        got.iter()
            .any(|g| g.windows(marker.len()).any(|w| w == marker.as_bytes()))
    };
    let passed: Vec<bool> = sent.iter().map(|(_, _, m)| seen(m)).collect();
    assert_eq!(passed, vec![false, true, false, true]);
    assert_eq!(lan.dp.counters(0)?.packets, 2);
    Ok(())
}
