//! The XDP classifier on a real kernel: frames sent from a "lan" namespace
//! through a veth pair into a "cpe" namespace where the program is attached.
//! A frame "passes" when a packet socket on the cpe side receives it.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::Result;
use dots_agent::enforce::{
    clock, AttachMode, Dataplane, DataplaneOptions, EnforceError, Range, Slot, SlotAction, SlotId,
    SlotSpec,
};
use tests::packet::{ExtHeader, Frame, L4};
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
        Ok(Lab {
            dp,
            tx,
            rx,
            next_id: 0,
            _cpe: cpe,
            _lan: lan,
            bpffs,
        })
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
        let got = self
            .rx
            .drain(Duration::from_millis(150), Duration::from_secs(3));
        Ok(markers
            .iter()
            .map(|m| {
                got.iter()
                    .any(|g| g.windows(m.len()).any(|w| w == m.as_slice()))
            })
            .collect())
    }

    fn pass_one(&mut self, f: Frame) -> Result<bool> {
        Ok(self.passes(&[f])?[0])
    }

    fn apply(&mut self, slots: &[(SlotId, SlotSpec)]) -> Result<()> {
        self.dp.apply(&unbounded(slots.iter().cloned()))?;
        Ok(())
    }
}

/// Slots that never expire on their own (expiry has its own test).
fn unbounded(slots: impl IntoIterator<Item = (SlotId, SlotSpec)>) -> BTreeMap<SlotId, Slot> {
    slots
        .into_iter()
        .map(|(id, spec)| (id, Slot::without_expiry(spec)))
        .collect()
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
    assert!(
        lab.pass_one(udp("10.1.0.5", t, 1000, 80))?,
        "passes before any slot"
    );
    lab.apply(&[(7, spec(&["10.1.0.0/24"], &["198.51.100.0/24"]))])?;
    let frames = [
        udp("10.1.0.0", t, 1000, 80),              // first address: dropped
        udp("10.1.0.255", t, 1000, 80),            // last address: dropped
        udp("10.0.255.255", t, 1000, 80),          // just below: passes
        udp("10.1.1.0", t, 1000, 80),              // just above: passes
        udp("10.1.0.9", "198.51.101.1", 1000, 80), // other target: passes
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, true, true, true]);
    let c = lab.dp.counters(7)?;
    assert_eq!(c.packets, 2);
    assert_eq!(c.bytes, 2 * wire_len(&frames[0]));
    Ok(())
}

#[test]
fn ipv6_prefix_bounds() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "2001:db8:ffff::10";
    lab.apply(&[(3, spec(&["2001:db8:1::/48"], &["2001:db8:ffff::/48"]))])?;
    let frames = [
        udp("2001:db8:1::", t, 1, 2),
        udp("2001:db8:1:ffff:ffff:ffff:ffff:ffff", t, 1, 2),
        udp("2001:db8:0:ffff:ffff:ffff:ffff:ffff", t, 1, 2),
        udp("2001:db8:2::", t, 1, 2),
        udp("2001:db8:1::5", "2001:db8:fffe::1", 1, 2),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, true, true, true]);
    assert_eq!(lab.dp.counters(3)?.packets, 2);
    Ok(())
}

#[test]
fn exact_host_sources_and_covering_prefixes() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    // Slot 1 names a host inside slot 0's prefix: the host is charged to both.
    lab.apply(&[
        (0, spec(&["10.9.0.0/16"], &["198.51.100.0/24"])),
        (
            1,
            spec(
                &["10.9.8.7/32", "2001:db8::7/128"],
                &["198.51.100.1/32", "2001:db8:ffff::/48"],
            ),
        ),
    ])?;
    let frames = [
        udp("10.9.8.7", t, 1, 2),
        udp("10.9.8.8", t, 1, 2),
        udp("2001:db8::7", "2001:db8:ffff::1", 1, 2),
        udp("2001:db8::8", "2001:db8:ffff::1", 1, 2),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, false, true]);
    assert_eq!(lab.dp.counters(0)?.packets, 2);
    assert_eq!(lab.dp.counters(1)?.packets, 2);
    Ok(())
}

#[test]
fn source_port_ranges_at_both_bounds() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    let mut s = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    s.source_ports = vec![Range::new(1000, 1999), Range::single(53)];
    lab.apply(&[(5, s)])?;
    let tcp = |sport| Frame::new(ip("10.0.0.1"), ip(t), L4::Tcp { sport, dport: 443 });
    let sctp = |sport| Frame::new(ip("10.0.0.1"), ip(t), L4::Sctp { sport, dport: 443 });
    let dccp = |sport| Frame::new(ip("10.0.0.1"), ip(t), L4::Dccp { sport, dport: 443 });
    let frames = [
        udp("10.0.0.1", t, 999, 80),
        udp("10.0.0.1", t, 1000, 80),
        udp("10.0.0.1", t, 1999, 80),
        udp("10.0.0.1", t, 2000, 80),
        udp("10.0.0.1", t, 53, 80),
        tcp(1500),
        tcp(2500),
        sctp(1000),
        dccp(1999),
        // ICMP has no ports: a slot constraining ports never matches it.
        Frame::new(
            ip("10.0.0.1"),
            ip(t),
            L4::Icmp {
                icmp_type: 8,
                code: 0,
            },
        ),
    ];
    assert_eq!(
        lab.passes(&frames)?,
        vec![true, false, false, true, false, false, true, false, false, true]
    );
    assert_eq!(lab.dp.counters(5)?.packets, 6);
    Ok(())
}

#[test]
fn target_ports_and_protocols() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    let mut s = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    s.protocols = vec![17];
    s.target_ports = vec![Range::new(53, 53), Range::new(123, 124)];
    lab.apply(&[(9, s)])?;
    let frames = [
        udp("10.0.0.1", t, 5555, 53),
        udp("10.0.0.1", t, 5555, 52),
        udp("10.0.0.1", t, 5555, 124),
        udp("10.0.0.1", t, 5555, 125),
        Frame::new(
            ip("10.0.0.1"),
            ip(t),
            L4::Tcp {
                sport: 5555,
                dport: 53,
            },
        ),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, true, false, true, true]);
    // A protocol-only slot: GRE (47) from the source is dropped, UDP passes.
    let mut gre = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    gre.protocols = vec![47];
    lab.apply(&[(9, gre)])?;
    let frames = [
        Frame::new(ip("10.0.0.1"), ip(t), L4::Other(47)),
        udp("10.0.0.1", t, 1, 53),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, true]);
    Ok(())
}

#[test]
fn icmp_and_icmpv6_type_ranges() -> Result<()> {
    let mut lab = Lab::new()?;
    let mut s = spec(
        &["10.0.0.0/8", "2001:db8:1::/48"],
        &["198.51.100.0/24", "2001:db8:ffff::/48"],
    );
    s.icmp_types = vec![Range::new(8, 8), Range::new(128, 129)];
    lab.apply(&[(2, s)])?;
    let icmp = |src: &str, dst: &str, icmp_type| {
        Frame::new(ip(src), ip(dst), L4::Icmp { icmp_type, code: 0 })
    };
    let frames = [
        icmp("10.0.0.1", "198.51.100.1", 8), // echo request: dropped
        icmp("10.0.0.1", "198.51.100.1", 0), // echo reply: passes
        icmp("10.0.0.1", "198.51.100.1", 9), // just above: passes
        icmp("2001:db8:1::1", "2001:db8:ffff::1", 128), // ICMPv6 echo request: dropped
        icmp("2001:db8:1::1", "2001:db8:ffff::1", 129), // upper bound: dropped
        icmp("2001:db8:1::1", "2001:db8:ffff::1", 127), // below: passes
        icmp("2001:db8:1::1", "2001:db8:ffff::1", 130), // above: passes
        udp("10.0.0.1", "198.51.100.1", 8, 8), // not ICMP: passes
    ];
    assert_eq!(
        lab.passes(&frames)?,
        vec![false, true, true, false, false, true, true, true]
    );
    assert_eq!(lab.dp.counters(2)?.packets, 3);
    Ok(())
}

#[test]
fn vlan_tagged_frames() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.apply(&[(
        1,
        spec(
            &["10.0.0.0/8", "2001:db8:1::/48"],
            &["198.51.100.0/24", "2001:db8:ffff::/48"],
        ),
    )])?;
    let tagged = |src: &str, dst: &str, vlans: Vec<u16>| {
        let mut f = udp(src, dst, 1, 2);
        f.vlans = vlans;
        f
    };
    let frames = [
        tagged("10.0.0.1", "198.51.100.1", vec![100]),
        tagged("10.0.0.1", "198.51.100.1", vec![100, 200]),
        tagged("2001:db8:1::1", "2001:db8:ffff::1", vec![300]),
        tagged("2001:db8:1::1", "2001:db8:ffff::1", vec![10, 20]),
        tagged("10.1.0.1", "203.0.113.1", vec![100]),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, false, false, true]);
    assert_eq!(lab.dp.counters(1)?.packets, 4);
    Ok(())
}

#[test]
fn ipv4_options_and_fragments() -> Result<()> {
    let mut lab = Lab::new()?;
    let mut s = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    s.source_ports = vec![Range::single(7)];
    let ports_any = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    lab.apply(&[(4, s)])?;
    let mut with_opts = udp("10.0.0.1", "198.51.100.1", 7, 9);
    with_opts.ipv4_options = 12;
    let mut frag = udp("10.0.0.1", "198.51.100.1", 7, 9);
    frag.ipv4_fragment_offset = 100;
    // Options are skipped to find the port; a non-first fragment has no port,
    // so a port-constrained slot cannot match it.
    assert_eq!(lab.passes(&[with_opts, frag.clone()])?, vec![false, true]);
    lab.apply(&[(4, ports_any)])?;
    assert_eq!(
        lab.passes(&[frag])?,
        vec![false],
        "address-only slot matches a fragment"
    );
    Ok(())
}

#[test]
fn ipv6_extension_headers_and_fragments() -> Result<()> {
    let mut lab = Lab::new()?;
    let mut s = spec(&["2001:db8:1::/48"], &["2001:db8:ffff::/48"]);
    s.source_ports = vec![Range::single(7)];
    lab.apply(&[(6, s)])?;
    let with = |ext: Vec<ExtHeader>| {
        let mut f = udp("2001:db8:1::1", "2001:db8:ffff::1", 7, 9);
        f.ipv6_ext = ext;
        f
    };
    let frames = [
        with(vec![ExtHeader::HopByHop]),
        with(vec![
            ExtHeader::HopByHop,
            ExtHeader::Routing,
            ExtHeader::DestinationOptions,
        ]),
        with(vec![ExtHeader::Fragment {
            offset: 0,
            more: true,
        }]),
        with(vec![ExtHeader::Fragment {
            offset: 10,
            more: false,
        }]),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, false, true]);
    let mut proto_only = spec(&["2001:db8:1::/48"], &["2001:db8:ffff::/48"]);
    proto_only.protocols = vec![17];
    lab.apply(&[(6, proto_only)])?;
    let frag = with(vec![ExtHeader::Fragment {
        offset: 10,
        more: false,
    }]);
    assert_eq!(
        lab.passes(&[frag])?,
        vec![false],
        "non-first fragment matches on addresses and protocol"
    );
    Ok(())
}

#[test]
fn removal_restores_traffic_and_reuse_starts_at_zero() -> Result<()> {
    let mut lab = Lab::new()?;
    let f = udp("10.0.0.1", "198.51.100.1", 1, 2);
    lab.apply(&[(11, spec(&["10.0.0.0/8"], &["198.51.100.0/24"]))])?;
    assert_eq!(lab.passes(&[f.clone(), f.clone()])?, vec![false, false]);
    assert_eq!(lab.dp.counters(11)?.packets, 2);
    lab.apply(&[])?;
    assert!(lab.pass_one(f.clone())?, "removal stops drops at once");
    assert!(lab.dp.active_slots()?.is_empty());
    // Reusing slot 11 for another scope starts its counters at zero.
    let report = lab.dp.apply(&unbounded([(
        11,
        spec(&["10.0.0.0/8"], &["198.51.100.0/24"]),
    )]))?;
    assert_eq!(report.activated, vec![11]);
    assert_eq!(lab.dp.counters(11)?.packets, 0);
    assert!(!lab.pass_one(f)?);
    assert_eq!(lab.dp.counters(11)?.packets, 1);
    // Applying the same state again writes nothing.
    let again = lab.dp.apply(&unbounded([(
        11,
        spec(&["10.0.0.0/8"], &["198.51.100.0/24"]),
    )]))?;
    assert_eq!((again.writes, again.activated.len()), (0, 0));
    Ok(())
}

#[test]
fn exempt_prefixes_are_never_dropped() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.apply(&[(
        0,
        spec(
            &["10.0.0.0/8", "2001:db8:1::/48"],
            &["198.51.100.0/24", "2001:db8:ffff::/48"],
        ),
    )])?;
    lab.dp.set_exempt(&[
        "198.51.100.77/32".parse()?,
        "10.5.0.0/16".parse()?,
        "2001:db8:ffff::77/128".parse()?,
    ])?;
    let frames = [
        udp("10.0.0.1", "198.51.100.77", 1, 2), // exempt target
        udp("10.5.0.1", "198.51.100.1", 1, 2),  // exempt source
        udp("10.0.0.1", "198.51.100.1", 1, 2),  // not exempt
        udp("2001:db8:1::1", "2001:db8:ffff::77", 1, 2),
        udp("2001:db8:1::1", "2001:db8:ffff::78", 1, 2),
    ];
    assert_eq!(lab.passes(&frames)?, vec![true, true, false, true, false]);
    assert_eq!(lab.dp.stats()?.exempt, 3);
    lab.dp.set_exempt(&[])?;
    assert!(!lab.pass_one(udp("10.0.0.1", "198.51.100.77", 1, 2))?);
    Ok(())
}

#[test]
fn overlapping_slots_are_each_charged() -> Result<()> {
    let mut lab = Lab::new()?;
    let mut web = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    web.target_ports = vec![Range::new(80, 80)];
    let all = spec(&["10.1.0.0/16"], &["198.51.100.0/25"]);
    lab.apply(&[(20, web), (200, all)])?;
    let frames = [
        udp("10.1.0.1", "198.51.100.1", 1, 80),   // both slots
        udp("10.1.0.1", "198.51.100.1", 1, 81),   // slot 200 only
        udp("10.2.0.1", "198.51.100.1", 1, 80),   // slot 20 only
        udp("10.2.0.1", "198.51.100.200", 1, 81), // neither
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, false, true]);
    assert_eq!(lab.dp.counters(20)?.packets, 2);
    assert_eq!(lab.dp.counters(200)?.packets, 2);
    assert_eq!(lab.dp.stats()?.dropped, 3, "each packet is dropped once");
    Ok(())
}

#[test]
fn pinned_link_outlives_the_process_and_teardown_removes_it() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.apply(&[(1, spec(&["10.0.0.0/8"], &["198.51.100.0/24"]))])?;
    // A second loader adopts the pinned maps: the first one's slots are there.
    let dir = lab.bpffs.path.clone();
    let adopted = Dataplane::open(&DataplaneOptions {
        bpffs: dir.clone(),
        ..Default::default()
    })?;
    assert_eq!(adopted.active_slots()?, vec![1]);
    // Replace the loader the lab holds: the old one's fds close ("process exit").
    lab.dp = adopted;
    assert!(
        !lab.pass_one(udp("10.0.0.1", "198.51.100.1", 1, 2))?,
        "drops continue"
    );
    assert_eq!(Dataplane::attachments(&dir), vec!["c0".to_string()]);
    let removed = Dataplane::teardown(&dir)?;
    assert!(removed >= 16, "maps and link unpinned, got {removed}");
    assert!(!dir.exists());
    // The loader still holds map fds, but the link is gone: traffic flows.
    assert!(lab.pass_one(udp("10.0.0.1", "198.51.100.1", 1, 2))?);
    Ok(())
}

#[test]
fn errors_name_their_cause_and_write_nothing() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.apply(&[(1, spec(&["10.0.0.0/8"], &["198.51.100.0/24"]))])?;
    let before = lab.dp.active_slots()?;
    // A reversed range in a second slot: the whole apply is refused.
    let mut bad = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    bad.source_ports = vec![Range::new(10, 5)];
    let err = lab
        .dp
        .apply(&unbounded([
            (1, spec(&["10.0.0.0/8"], &["198.51.100.0/24"])),
            (2, bad),
        ]))
        .unwrap_err();
    assert!(
        matches!(err, EnforceError::InvalidSlot { slot: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("10-5"), "{err}");
    let err = lab
        .dp
        .apply(&unbounded([(
            300,
            spec(&["10.0.0.0/8"], &["198.51.100.0/24"]),
        )]))
        .unwrap_err();
    assert!(err.to_string().contains("below 256"), "{err}");
    assert_eq!(lab.dp.active_slots()?, before);
    assert!(
        !lab.pass_one(udp("10.0.0.1", "198.51.100.1", 1, 2))?,
        "earlier slot still enforced"
    );
    // No such interface.
    let err = lab.dp.attach("no-such-if0", AttachMode::Auto).unwrap_err();
    assert!(matches!(err, EnforceError::NoSuchInterface { .. }), "{err}");
    assert!(err.to_string().contains("no-such-if0"));
    // A directory that is not on bpffs.
    let err = Dataplane::open(&DataplaneOptions {
        bpffs: "/tmp/not-bpffs/dots".into(),
        ..Default::default()
    })
    .err()
    .expect("must fail");
    assert!(matches!(err, EnforceError::BpffsNotMounted { .. }), "{err}");
    assert!(err.to_string().contains("mount -t bpf"));
    Ok(())
}

#[test]
fn attaches_in_native_mode_on_veth_and_generic_on_request() -> Result<()> {
    let bpffs = BpffsDir::new()?;
    let a = Netns::new("a")?;
    let b = Netns::new("b")?;
    veth(&a, "x0", &b, "y0")?;
    let mut dp = Dataplane::open(&DataplaneOptions {
        bpffs: bpffs.path.clone(),
        ..Default::default()
    })?;
    let native = a.enter(|| dp.attach("x0", AttachMode::Auto))??;
    assert_eq!(native.mode, "native");
    let generic = b.enter(|| dp.attach("y0", AttachMode::Generic))??;
    assert_eq!(generic.mode, "generic");
    assert!(
        a.ip(&["link", "show", "x0"])?.contains("xdp"),
        "ip link shows the program"
    );
    assert!(b.ip(&["link", "show", "y0"])?.contains("xdpgeneric"));
    // Attaching again adopts the pinned link.
    assert_eq!(
        a.enter(|| dp.attach("x0", AttachMode::Auto))??.mode,
        "pinned"
    );
    assert!(dp.detach("x0")?);
    assert!(!a.ip(&["link", "show", "x0"])?.contains("xdp"), "detached");
    Ok(())
}

#[test]
fn changing_an_active_slot_keeps_it_enforcing() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    lab.apply(&[(0, spec(&["10.0.0.1/32"], &["198.51.100.0/24"]))])?;
    assert!(!lab.pass_one(udp("10.0.0.1", t, 1, 2))?);
    // Same slot, more sources (host and shorter prefix): still active, both drop.
    lab.apply(&[(
        0,
        spec(
            &["10.0.0.1/32", "10.0.0.2/32", "10.9.0.0/16"],
            &["198.51.100.0/24"],
        ),
    )])?;
    assert_eq!(lab.dp.active_slots()?, vec![0]);
    let frames = [
        udp("10.0.0.1", t, 1, 2),
        udp("10.0.0.2", t, 1, 2),
        udp("10.9.1.1", t, 1, 2),
        udp("10.0.0.3", t, 1, 2),
    ];
    assert_eq!(lab.passes(&frames)?, vec![false, false, false, true]);
    // Exempt flags survive slot changes, and slot flags survive exempt changes.
    lab.dp.set_exempt(&["10.9.1.1/32".parse()?])?;
    lab.apply(&[(0, spec(&["10.9.0.0/16"], &["198.51.100.0/24"]))])?;
    let frames = [
        udp("10.9.1.1", t, 1, 2),
        udp("10.9.1.2", t, 1, 2),
        udp("10.0.0.1", t, 1, 2),
    ];
    assert_eq!(lab.passes(&frames)?, vec![true, false, true]);
    Ok(())
}

#[test]
fn exempt_list_survives_later_slot_changes() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    lab.dp.set_exempt(&["10.0.0.9/32".parse()?])?;
    for extra in ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"] {
        lab.apply(&[(0, spec(&["10.0.0.0/24", extra], &["198.51.100.0/24"]))])?;
        let frames = [udp("10.0.0.9", t, 1, 2), udp("10.0.0.8", t, 1, 2)];
        assert_eq!(
            lab.passes(&frames)?,
            vec![true, false],
            "after adding {extra}"
        );
    }
    Ok(())
}

/// The XDP program's log records, as a `log` logger receives them.
#[derive(Clone, Default)]
struct KernelLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl KernelLog {
    fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if let Ok(mut l) = self.0.lock() {
            l.push(format!("{} {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

#[test]
fn slots_end_at_their_expiry_without_user_space() -> Result<()> {
    let mut lab = Lab::new()?;
    let f = udp("10.0.0.1", "198.51.100.1", 1, 2);
    let scope = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    let soon = |ms| clock::boot_ns_after(Duration::from_millis(ms));
    let log = KernelLog::default();
    let mut reader = lab.dp.kernel_log(log.clone())?;
    lab.dp
        .apply(&BTreeMap::from([(4, Slot::new(scope.clone(), soon(700)))]))?;
    assert!(!lab.pass_one(f.clone())?, "enforced before its expiry");
    // Renewal moves the expiry in place: the slot is never switched off.
    let renewed = lab
        .dp
        .apply(&BTreeMap::from([(4, Slot::new(scope.clone(), soon(1500)))]))?;
    assert_eq!(
        (
            renewed.writes,
            renewed.activated.len(),
            renewed.deactivated.len()
        ),
        (1, 0, 0)
    );
    std::thread::sleep(Duration::from_millis(900));
    assert!(!lab.pass_one(f.clone())?, "the renewed expiry holds");
    std::thread::sleep(Duration::from_millis(800));
    // Nobody removed the slot: the program itself stops matching it.
    assert_eq!(lab.dp.active_slots()?, vec![4]);
    assert!(lab.pass_one(f.clone())?, "traffic passes after the expiry");
    assert!(lab.pass_one(f.clone())?);
    // The program says so in its own log (aya-log), once per expiry.
    reader.flush();
    let lines = log.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("slot 4 matched traffic after its expiry"),
        "{lines:?}"
    );
    let c = lab.dp.counters(4)?;
    assert_eq!(
        (c.packets, c.passed_packets),
        (2, 0),
        "expired hits are not charged"
    );
    // A slot given a past expiry never enforces.
    lab.dp
        .apply(&BTreeMap::from([(5, Slot::new(scope, clock::boot_ns()))]))?;
    assert!(lab.pass_one(f)?);
    Ok(())
}

#[test]
fn many_source_lengths_take_the_trie_and_a_restart_writes_nothing() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    // Six lengths: more than the program probes one by one.
    let sources = [
        "10.0.0.0/12",
        "10.16.0.0/14",
        "10.20.0.0/16",
        "10.21.0.0/20",
        "10.21.16.0/24",
        "10.21.17.9/32",
    ];
    let slots = [
        (1, spec(&sources, &["198.51.100.0/24"])),
        (2, spec(&["10.21.17.0/24"], &["198.51.100.1/32"])),
    ];
    lab.apply(&slots)?;
    let frames = [
        udp("10.15.255.255", t, 1, 2), // /12
        udp("10.17.0.1", t, 1, 2),     // /14
        udp("10.20.9.9", t, 1, 2),     // /16
        udp("10.21.15.1", t, 1, 2),    // /20
        udp("10.21.16.200", t, 1, 2),  // /24
        udp("10.21.17.9", t, 1, 2),    // /32 (and slot 2's /24)
        udp("10.21.17.10", t, 1, 2),   // slot 2 only
        udp("10.22.0.1", t, 1, 2),     // none
    ];
    assert_eq!(
        lab.passes(&frames)?,
        vec![false, false, false, false, false, false, false, true]
    );
    assert_eq!(lab.dp.counters(1)?.packets, 6);
    assert_eq!(lab.dp.counters(2)?.packets, 2);
    // A second loader (a restarted agent) reads the maps back: same slots,
    // nothing to write.
    let mut adopted = Dataplane::open(&DataplaneOptions {
        bpffs: lab.bpffs.path.clone(),
        ..Default::default()
    })?;
    let report = adopted.apply(&unbounded(slots.iter().cloned()))?;
    assert_eq!((report.writes, report.activated.len()), (0, 0));
    // Back to few lengths: the hash alone again.
    adopted.apply(&unbounded([(
        2,
        spec(&["10.21.17.0/24"], &["198.51.100.1/32"]),
    )]))?;
    assert_eq!(
        lab.passes(&frames[5..])?,
        vec![false, false, true],
        "slot 2 still enforced, slot 1 gone"
    );
    Ok(())
}

#[test]
fn monitor_slots_count_what_they_would_drop_and_drop_nothing() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    let mut watch = spec(&["10.0.0.0/8"], &["198.51.100.0/24"]);
    watch.action = SlotAction::Monitor;
    let block = spec(&["10.1.0.0/16"], &["198.51.100.0/24"]);
    lab.apply(&[(1, watch), (2, block)])?;
    let frames = [
        udp("10.0.0.1", t, 1, 2), // monitor only: passes
        udp("10.0.0.2", t, 1, 2), // monitor only: passes
        udp("10.1.0.1", t, 1, 2), // both: dropped by slot 2, counted by slot 1
    ];
    assert_eq!(lab.passes(&frames)?, vec![true, true, false]);
    let watched = lab.dp.counters(1)?;
    assert_eq!(
        (watched.packets, watched.passed_packets),
        (0, 3),
        "a monitor slot drops nothing and counts every match"
    );
    assert_eq!(watched.passed_bytes, 3 * wire_len(&frames[0]));
    assert_eq!(lab.dp.counters(2)?.packets, 1);
    let stats = lab.dp.stats()?;
    assert_eq!((stats.monitored, stats.dropped), (2, 1));
    Ok(())
}

#[test]
fn rate_limited_slots_pass_what_fits_the_limit_and_drop_the_rest() -> Result<()> {
    let mut lab = Lab::new()?;
    let t = "198.51.100.1";
    // 2 packets per second (one per 500 ms, 50 ms of burst): of a quick
    // burst, the first passes and the rest are over the limit.
    let mut pps = spec(&["10.1.0.0/16"], &["198.51.100.0/24"]);
    pps.action = SlotAction::RateLimit { pps: 2, bps: 0 };
    // 8,000 bits per second: a ~70-byte frame costs 70 ms, more than the
    // 50 ms burst, so again one frame passes.
    let mut bps = spec(&["10.2.0.0/16"], &["198.51.100.0/24"]);
    bps.action = SlotAction::RateLimit { pps: 0, bps: 8_000 };
    lab.apply(&[(1, pps), (2, bps)])?;
    let burst = |net: &str| -> Vec<Frame> { (0..10).map(|_| udp(net, t, 1, 2)).collect() };
    let passed = lab.passes(&burst("10.1.0.1"))?;
    assert_eq!(passed.iter().filter(|p| **p).count(), 1, "{passed:?}");
    assert!(passed[0], "the first packet fits the bucket");
    let passed = lab.passes(&burst("10.2.0.1"))?;
    assert_eq!(passed.iter().filter(|p| **p).count(), 1, "{passed:?}");
    let c = lab.dp.counters(1)?;
    assert_eq!(
        (c.passed_packets, c.packets),
        (1, 9),
        "over the limit is dropped and counted"
    );
    assert_eq!(lab.dp.stats()?.conforming, 2);
    // The bucket refills with time.
    std::thread::sleep(Duration::from_millis(600));
    assert!(lab.pass_one(udp("10.1.0.1", t, 1, 2))?);
    Ok(())
}

#[test]
fn pins_of_another_layout_are_refused_with_the_way_out() -> Result<()> {
    let bpffs = BpffsDir::new()?;
    std::fs::create_dir_all(&bpffs.path)?;
    // DOTS_STATS as an earlier version pinned it: three counters, not five.
    let pin = bpffs.path.join("DOTS_STATS");
    tests::sh(&[
        "bpftool",
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "3",
        "name",
        "DOTS_STATS",
    ])?;
    let err = Dataplane::open(&DataplaneOptions {
        bpffs: bpffs.path.clone(),
        ..Default::default()
    })
    .err()
    .expect("an old pin must be refused");
    let text = err.to_string();
    assert!(
        text.contains("DOTS_STATS") && text.contains("3 entries"),
        "{text}"
    );
    assert!(text.contains("dots-agent detach"), "{text}");
    Ok(())
}
