//! The XDP classifier on a real kernel: frames sent from a "lan" namespace
//! through a veth pair into a "cpe" namespace where the program is attached.
//! A frame "passes" when a packet socket on the cpe side receives it.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::Result;
use dots_agent::{
    enforce::{AttachMode, Dataplane, DataplaneOptions, EnforceError, Range, SlotId, SlotSpec},
    packet::{ExtHeader, Frame, L4},
};
use tests::{veth, BpffsDir, Netns, PacketSocket};

struct Lab {
    dp: Dataplane,
    tx: PacketSocket,
    rx: PacketSocket,
    next_id: u64,
    // Dropped last: namespaces and pins outlive the sockets and maps above.
    _cpe: Netns,
    _lan: Netns,
    bpffs: BpffsDir,
}

impl Lab {
    fn new() -> Result<Lab> {
        let bpffs = BpffsDir::new()?;
        let lan = Netns::new("lan")?;
        let cpe = Netns::new("cpe")?;
        veth(&lan, "l0", &cpe, "c0")?;
        let mut dp = Dataplane::open(&DataplaneOptions {
            bpffs: bpffs.path.clone(),
            ..Default::default()
        })?;
        cpe.enter(|| dp.attach("c0", AttachMode::Auto))??;
        let tx = lan.enter(|| PacketSocket::open("l0"))??;
        let rx = cpe.enter(|| PacketSocket::open("c0"))??;
        Ok(Lab { dp, tx, rx, next_id: 0, _cpe: cpe, _lan: lan, bpffs })
    }

    /// Sends each frame once (tagged with a unique marker) and tells, per
    /// frame, whether it reached the other side.
    fn passes(&mut self, frames: &[Frame]) -> Result<Vec<bool>> {
        let mut markers = Vec::new();
        for f in frames {
            self.next_id += 1;
            let marker = format!("DOTS-MARK-{:08}", self.next_id).into_bytes();
            let mut f = f.clone();
            f.payload = marker.clone();
            self.tx.send(&f.build())?;
            markers.push(marker);
        }
        let got = self.rx.drain(Duration::from_millis(150), Duration::from_secs(3));
        Ok(markers
            .iter()
            .map(|m| got.iter().any(|g| g.windows(m.len()).any(|w| w == m.as_slice())))
            .collect())
    }

    fn pass_one(&mut self, f: Frame) -> Result<bool> {
        Ok(self.passes(&[f])?[0])
    }

    fn apply(&mut self, slots: &[(SlotId, SlotSpec)]) -> Result<()> {
        self.dp.apply(&slots.iter().cloned().collect::<BTreeMap<_, _>>())?;
        Ok(())
    }
}

const MARKER_LEN: usize = "DOTS-MARK-00000000".len();

/// Length of `f` on the wire once its payload is replaced by a marker.
fn wire_len(f: &Frame) -> u64 {
    let mut f = f.clone();
    f.payload = vec![0; MARKER_LEN];
    f.build().len() as u64
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Frame {
    Frame::new(ip(src), ip(dst), L4::Udp { sport, dport })
}

fn spec(sources: &[&str], targets: &[&str]) -> SlotSpec {
    SlotSpec {
        sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
        targets: targets.iter().map(|s| s.parse().unwrap()).collect(),
        ..Default::default()
    }
}

#[test]
fn ipv4_prefix_bounds() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.10";
    assert!(lab.pass_one(udp("10.1.0.5", t, 1000, 80))?, "passes before any slot");
    lab.apply(&[(7, spec(&["10.1.0.0/24"], &["198.51.100.0/24"]))])?;
    let frames = [
        udp("10.1.0.0", t, 1000, 80),   // first address: dropped
        udp("10.1.0.255", t, 1000, 80), // last address: dropped
        udp("10.0.255.255", t, 1000, 80), // just below: passes
        udp("10.1.1.0", t, 1000, 80),   // just above: passes
        udp("10.1.0.9", "198.51.101.1", 1000, 80), // other target: passes
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, true, true, true]);
    let c = lab.dp.counters(7)?;
    assert_eq!(c.packets, 2);
    assert_eq!(c.bytes, 2 * wire_len(&frames[0]));
    Ok(())
}
