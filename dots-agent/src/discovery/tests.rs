use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn explicit_name() {
    let c = explicit_candidates(&ExplicitConfig {
        name: Some("dots.example.net.".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].host, "dots.example.net");
    assert_eq!(c[0].reference_id, "dots.example.net");
    assert_eq!(c[0].port, 4647);
    assert_eq!(c[0].address, None);
    assert_eq!(c[0].ttl, None);
    let t = c[0].peer_target();
    assert_eq!(t.host, "dots.example.net");
    assert!(t.addrs.is_empty());
}

#[test]
fn explicit_addresses_need_a_reference_identifier() {
    let e = explicit_candidates(&ExplicitConfig {
        addresses: vec![ip("192.0.2.1")],
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("without a reference identifier"),
        "{e}"
    );
    // An address given as the name is addresses alone too.
    assert!(explicit_candidates(&ExplicitConfig {
        name: Some("192.0.2.1".into()),
        ..Default::default()
    })
    .is_err());
    let c = explicit_candidates(&ExplicitConfig {
        addresses: vec![ip("192.0.2.1"), ip("2001:db8::1")],
        reference_id: Some("isp.example".into()),
        port: Some(6000),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.len(), 2);
    assert!(c
        .iter()
        .all(|c| c.reference_id == "isp.example" && c.port == 6000));
    let targets = peer_targets(&c);
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].addrs, vec![ip("192.0.2.1"), ip("2001:db8::1")]);
    assert_eq!(targets[0].name.as_deref(), Some("isp.example"));
    assert!(explicit_candidates(&ExplicitConfig {
        addresses: vec![ip("192.0.2.1")],
        reference_id: Some("not a name".into()),
        ..Default::default()
    })
    .is_err());
}

#[test]
fn dhcp_rules() {
    let now = SystemTime::now();
    let ri = dhcp::encode_name("isp.example");
    // Name and addresses: the name is only the reference identifier.
    let d = dhcp::DhcpDots::from_v4(Some(&ri), Some(&[192, 0, 2, 7, 127, 0, 0, 1]));
    let c = d.candidates(
        Mechanism::Dhcpv4,
        4647,
        Some(Duration::from_secs(3600)),
        now,
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].address, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
    assert_eq!(c[0].host, "192.0.2.7");
    assert_eq!(c[0].reference_id, "isp.example");
    assert_eq!(c[0].ttl, Some(Duration::from_secs(3600)));
    assert_eq!(next_refresh(&c), Some(now + Duration::from_secs(3600)));
    // Name alone: resolved, and the reference identifier.
    let d = dhcp::DhcpDots::from_v6(Some(&ri), None);
    let c = d.candidates(Mechanism::Dhcpv6, 4647, None, now);
    assert_eq!((c[0].host.as_str(), c[0].address), ("isp.example", None));
    // Addresses alone: their own identifiers.
    let d = dhcp::DhcpDots::from_v4(None, Some(&[198, 51, 100, 1]));
    let c = d.candidates(Mechanism::Dhcpv4, 4647, None, now);
    assert_eq!(c[0].reference_id, "198.51.100.1");
    // Invalid address option + valid name: the name is resolved.
    let d = dhcp::DhcpDots::from_v4(Some(&ri), Some(&[1, 2, 3]));
    assert_eq!(d.problems.len(), 1);
    let c = d.candidates(Mechanism::Dhcpv4, 4647, None, now);
    assert_eq!(c[0].host, "isp.example");
    // Only multicast/loopback addresses: same.
    let d = dhcp::DhcpDots::from_v4(Some(&ri), Some(&[224, 0, 0, 1]));
    assert_eq!(
        d.candidates(Mechanism::Dhcpv4, 4647, None, now)[0].host,
        "isp.example"
    );
}

#[test]
fn v4_options_field_concatenation_and_first_instance() {
    // RFC 3396: option 148 split in two instances; option 147 twice (the
    // first one counts); pad and end options around.
    let ri1 = dhcp::encode_name("first.example");
    let ri2 = dhcp::encode_name("second.example");
    let mut buf = vec![0u8, 53, 1, 5];
    buf.push(147);
    buf.push(ri1.len() as u8);
    buf.extend_from_slice(&ri1);
    buf.extend_from_slice(&[148, 6, 192, 0, 2, 1, 192, 0]);
    buf.extend_from_slice(&[147, ri2.len() as u8]);
    buf.extend_from_slice(&ri2);
    buf.extend_from_slice(&[148, 2, 2, 2]);
    buf.push(255);
    buf.extend_from_slice(&[148, 4, 9, 9, 9, 9]); // after "end": ignored
    let d = dhcp::DhcpDots::from_v4_options(&buf).unwrap();
    assert_eq!(d.reference_id.as_deref(), Some("first.example"));
    assert_eq!(d.addresses, vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    // A long option: 70 addresses = 280 octets, in a 255 + 25 split.
    let addrs: Vec<u8> = (0..70u8).flat_map(|i| [10, 0, 0, i + 1]).collect();
    let mut buf = vec![148, 255];
    buf.extend_from_slice(&addrs[..255]);
    buf.extend_from_slice(&[148, 25]);
    buf.extend_from_slice(&addrs[255..]);
    let d = dhcp::DhcpDots::from_v4_options(&buf).unwrap();
    assert_eq!(d.addresses.len(), 70);
    assert_eq!(d.addresses[69], ip("10.0.0.70"));
    // Truncated options field.
    assert!(dhcp::DhcpDots::from_v4_options(&[148, 8, 1, 2, 3]).is_err());
}

#[test]
fn v6_options_first_instance() {
    let mut buf = Vec::new();
    let ri = dhcp::encode_name("dots.example.com");
    buf.extend_from_slice(&141u16.to_be_bytes());
    buf.extend_from_slice(&(ri.len() as u16).to_be_bytes());
    buf.extend_from_slice(&ri);
    for a in ["2001:db8:122:300::2", "2001:db8::99"] {
        buf.extend_from_slice(&142u16.to_be_bytes());
        buf.extend_from_slice(&16u16.to_be_bytes());
        buf.extend_from_slice(&a.parse::<std::net::Ipv6Addr>().unwrap().octets());
    }
    let d = dhcp::DhcpDots::from_v6_options(&buf).unwrap();
    assert_eq!(d.reference_id.as_deref(), Some("dots.example.com"));
    assert_eq!(d.addresses, vec![ip("2001:db8:122:300::2")]);
    assert!(dhcp::DhcpDots::from_v6_options(&buf[..buf.len() - 1]).is_err());
}

#[test]
fn ordering_and_expiry() {
    let now = SystemTime::now();
    let mk = |m, a: &str, ttl: Option<u64>| Candidate {
        mechanism: m,
        transport: Some(Transport::Udp),
        host: a.into(),
        address: Some(ip(a)),
        port: 4647,
        reference_id: "x.example".into(),
        ttl: ttl.map(Duration::from_secs),
        valid_until: ttl.map(|t| now + Duration::from_secs(t)),
    };
    let mut expired = mk(Mechanism::Snaptr, "192.0.2.9", Some(1));
    expired.valid_until = Some(now - Duration::from_secs(1));
    let c = order_candidates(
        vec![
            mk(Mechanism::DnsSd, "192.0.2.4", Some(50)),
            expired,
            mk(Mechanism::Snaptr, "192.0.2.3", Some(100)),
            mk(Mechanism::Dhcpv4, "192.0.2.2", Some(200)),
            mk(Mechanism::Explicit, "192.0.2.1", None),
            mk(Mechanism::Snaptr, "192.0.2.3", Some(100)),
        ],
        now,
    );
    let hosts: Vec<&str> = c.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(hosts, ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]);
    assert_eq!(next_refresh(&c), Some(now + Duration::from_secs(50)));
    assert_eq!(preferred(&c).len(), 1);
    assert_eq!(preferred(&c[1..])[0].mechanism, Mechanism::Dhcpv4);
}

#[test]
fn state_file_roundtrip() {
    let dir = std::env::temp_dir().join(format!("dots-disc-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(read_discovered(&dir).unwrap().is_none());
    let now = SystemTime::now();
    let d = dhcp::DhcpDots::from_v4(
        Some(&dhcp::encode_name("isp.example")),
        Some(&[192, 0, 2, 7]),
    );
    state::update_discovered(&dir, |s| {
        s.dhcpv4 = Some(DhcpEntry::new(
            &d,
            Some("example.net".into()),
            None,
            Some(Duration::from_secs(600)),
            now,
        ))
    })
    .unwrap();
    let got = read_discovered(&dir).unwrap().unwrap();
    let c = got.candidates(now);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].reference_id, "isp.example");
    assert_eq!(got.domain(now).as_deref(), Some("example.net"));
    assert!(got.valid_until().unwrap() <= now + Duration::from_secs(600));
    // Expired: no candidates.
    assert!(got.candidates(now + Duration::from_secs(601)).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cert_expiry_of_a_generated_certificate() {
    use openssl::{asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509::X509};
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut b = X509::builder().unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(10).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build();
    let path = std::env::temp_dir().join(format!("dots-disc-cert-{}.pem", std::process::id()));
    std::fs::write(&path, cert.to_pem().unwrap()).unwrap();
    let exp = cert_expiry(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let left = exp.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(10 * 86_400 - 120)
            && left <= Duration::from_secs(10 * 86_400 + 5)
    );
    assert!(cert_expiry(std::path::Path::new("/nonexistent")).is_none());
}

#[cfg(not(feature = "discovery"))]
#[tokio::test]
async fn dns_discovery_needs_the_feature() {
    let opts = DiscoverOptions {
        domain: Some("example.net".into()),
        ..Default::default()
    };
    let e = discover(&opts).await.expect_err("no DNS in this build");
    assert!(
        e.to_string().contains("built without feature `discovery`"),
        "{e}"
    );
}
