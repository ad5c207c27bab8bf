//! DHCP options of RFC 8973 §5, sans IO.
//!
//! - DHCPv6: `OPTION_V6_DOTS_RI` (141), a name in DNS wire format
//!   (RFC 8415 §10, no compression); `OPTION_V6_DOTS_ADDRESS` (142), IPv6
//!   addresses, length a multiple of 16.
//! - DHCPv4: `OPTION_V4_DOTS_RI` (147), same name encoding;
//!   `OPTION_V4_DOTS_ADDRESS` (148), IPv4 addresses, length 4*N (N >= 1),
//!   concatenated per RFC 3396 when longer than 255 octets.
//!
//! Client rules: only the first instance of an option is used (except the
//! RFC 3396 concatenation of option 148); only the first name of the RI
//! option; multicast and loopback addresses are silently discarded; when
//! valid addresses are present the name is only the reference identifier
//! (never resolved); a name alone is resolved and is the reference
//! identifier; addresses alone are their own identifiers.
//!
//! Also here: the parsing of option values as DHCP clients hand them to hook
//! scripts (hex in various spellings, or text).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use thiserror::Error;

use super::{Candidate, Mechanism};

pub const OPTION_V6_DOTS_RI: u16 = 141;
pub const OPTION_V6_DOTS_ADDRESS: u16 = 142;
pub const OPTION_V4_DOTS_RI: u8 = 147;
pub const OPTION_V4_DOTS_ADDRESS: u8 = 148;

/// Why an option value is unusable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DhcpError {
    #[error("empty option")]
    Empty,
    #[error("address option length {len} is not a multiple of {unit}")]
    BadAddressLength { len: usize, unit: usize },
    #[error("name truncated at offset {0}")]
    Truncated(usize),
    #[error("compression pointer at offset {0} (not allowed in DHCP names)")]
    Compression(usize),
    #[error("label type 0x{0:02x} not supported")]
    BadLabelType(u8),
    #[error("name longer than 255 octets")]
    NameTooLong,
    #[error("name is the root only")]
    RootOnly,
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("options truncated at offset {0}")]
    OptionsTruncated(usize),
    #[error("bad value {0:?}")]
    BadValue(String),
}

/// Decodes the first name of a DNS wire-format name list (RFC 8415 §10,
/// RFC 1035 §3.1 without compression) and validates it as a host name.
/// Whatever follows the first root label is ignored (RFC 8973 §5.1.3,
/// §5.2.3: only the first name is used).
pub fn decode_first_name(data: &[u8]) -> Result<String, DhcpError> {
    if data.is_empty() {
        return Err(DhcpError::Empty);
    }
    let mut labels: Vec<String> = Vec::new();
    let mut i = 0usize;
    let mut wire_len = 0usize;
    loop {
        let Some(&len) = data.get(i) else {
            return Err(DhcpError::Truncated(i));
        };
        wire_len += 1 + len as usize;
        if wire_len > 255 {
            return Err(DhcpError::NameTooLong);
        }
        match len & 0xC0 {
            0x00 => {}
            0xC0 => return Err(DhcpError::Compression(i)),
            _ => return Err(DhcpError::BadLabelType(len)),
        }
        if len == 0 {
            break;
        }
        let start = i + 1;
        let end = start + len as usize;
        let Some(label) = data.get(start..end) else {
            return Err(DhcpError::Truncated(data.len()));
        };
        let label =
            std::str::from_utf8(label).map_err(|_| DhcpError::InvalidName(format!("{label:?}")))?;
        labels.push(label.to_string());
        i = end;
    }
    if labels.is_empty() {
        return Err(DhcpError::RootOnly);
    }
    let name = labels.join(".");
    validate_name(&name)?;
    Ok(name)
}

/// Encodes a name in DNS wire format (for tests and for writing options).
pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.trim_end_matches('.').split('.') {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// A host name usable as a DNS-ID reference identifier: labels of 1 to 63
/// letters, digits, hyphens (not at either end) or underscores, 253
/// characters at most, not all-numeric in the last label.
pub fn validate_name(name: &str) -> Result<(), DhcpError> {
    let n = name.strip_suffix('.').unwrap_or(name);
    let bad = |why: &str| Err(DhcpError::InvalidName(format!("{name:?}: {why}")));
    if n.is_empty() {
        return bad("empty");
    }
    if n.len() > 253 {
        return bad("longer than 253 characters");
    }
    for l in n.split('.') {
        if l.is_empty() || l.len() > 63 {
            return bad("empty label or label longer than 63");
        }
        if !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("characters other than letters, digits, '-' and '_'");
        }
        if l.starts_with('-') || l.ends_with('-') {
            return bad("label starts or ends with '-'");
        }
    }
    if n.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("all-numeric top label (an address?)");
    }
    Ok(())
}

/// Whether an address must be silently discarded (RFC 8973 §5.1.3, §5.2.3:
/// multicast and host loopback, RFC 6890), also through an IPv4-mapped
/// IPv6 address. Unspecified addresses cannot be dialled and go too.
fn discard(a: IpAddr) -> bool {
    a.is_multicast() || a.is_loopback() || a.is_unspecified()
}

/// Decodes `OPTION_V4_DOTS_ADDRESS` (148), already concatenated (RFC 3396).
/// A length that is zero or not a multiple of 4 makes the whole option
/// invalid; multicast, loopback and unspecified addresses are dropped.
pub fn decode_v4_addresses(data: &[u8]) -> Result<Vec<Ipv4Addr>, DhcpError> {
    if data.is_empty() {
        return Err(DhcpError::Empty);
    }
    if !data.len().is_multiple_of(4) {
        return Err(DhcpError::BadAddressLength {
            len: data.len(),
            unit: 4,
        });
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .filter(|a| !discard(IpAddr::V4(*a)))
        .collect())
}

/// Decodes `OPTION_V6_DOTS_ADDRESS` (142). A length that is zero or not a
/// multiple of 16 makes the option invalid; multicast, loopback and
/// unspecified addresses are dropped; IPv4-mapped addresses (RFC 8973
/// §5.1.2) are returned as IPv4 addresses.
pub fn decode_v6_addresses(data: &[u8]) -> Result<Vec<IpAddr>, DhcpError> {
    if data.is_empty() {
        return Err(DhcpError::Empty);
    }
    if !data.len().is_multiple_of(16) {
        return Err(DhcpError::BadAddressLength {
            len: data.len(),
            unit: 16,
        });
    }
    Ok(data
        .chunks_exact(16)
        .map(|c| {
            let a = Ipv6Addr::from(<[u8; 16]>::try_from(c).expect("16 bytes"));
            match a.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(a),
            }
        })
        .filter(|a| !discard(*a))
        .collect())
}

/// Walks a DHCPv4 options field (RFC 2132: code, length, value; 0 is pad,
/// 255 is end) into (code, value) pairs in wire order.
pub fn parse_v4_options(buf: &[u8]) -> Result<Vec<(u8, &[u8])>, DhcpError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let code = buf[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = buf.get(i + 1) else {
            return Err(DhcpError::OptionsTruncated(i));
        };
        let Some(v) = buf.get(i + 2..i + 2 + len as usize) else {
            return Err(DhcpError::OptionsTruncated(i));
        };
        out.push((code, v));
        i += 2 + len as usize;
    }
    Ok(out)
}

/// Walks DHCPv6 options (RFC 8415 §21.1: 16-bit code, 16-bit length, value).
pub fn parse_v6_options(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, DhcpError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let Some(h) = buf.get(i..i + 4) else {
            return Err(DhcpError::OptionsTruncated(i));
        };
        let code = u16::from_be_bytes([h[0], h[1]]);
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let Some(v) = buf.get(i + 4..i + 4 + len) else {
            return Err(DhcpError::OptionsTruncated(i));
        };
        out.push((code, v));
        i += 4 + len;
    }
    Ok(out)
}

/// What DHCP said about the peer, after the client rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DhcpDots {
    /// The first name of the RI option, when valid.
    pub reference_id: Option<String>,
    /// The valid addresses, in order of preference.
    pub addresses: Vec<IpAddr>,
    /// Why an option present was ignored (for logging).
    pub problems: Vec<String>,
}

impl DhcpDots {
    /// Applies the RFC 8973 §5 client rules to the raw option values: the
    /// RI value (first instance) and the address value (first instance for
    /// DHCPv6; RFC 3396 concatenation of every instance for DHCPv4, done by
    /// the caller or by [`DhcpDots::from_v4_options`]).
    fn from_values(
        ri: Option<&[u8]>,
        addrs: Result<Vec<IpAddr>, DhcpError>,
        has_addr: bool,
    ) -> Self {
        let mut d = DhcpDots::default();
        if let Some(ri) = ri {
            match decode_first_name(ri) {
                Ok(n) => d.reference_id = Some(n),
                Err(e) => d.problems.push(format!("reference identifier option: {e}")),
            }
        }
        if has_addr {
            match addrs {
                Ok(a) => d.addresses = a,
                Err(e) => d.problems.push(format!("address option: {e}")),
            }
        }
        d
    }

    /// DHCPv4 option values (147, 148) as a hook script receives them.
    pub fn from_v4(ri: Option<&[u8]>, addrs: Option<&[u8]>) -> Self {
        let a = addrs
            .map(|a| decode_v4_addresses(a).map(|v| v.into_iter().map(IpAddr::V4).collect()))
            .unwrap_or(Ok(Vec::new()));
        Self::from_values(ri, a, addrs.is_some())
    }

    /// DHCPv6 option values (141, 142).
    pub fn from_v6(ri: Option<&[u8]>, addrs: Option<&[u8]>) -> Self {
        let a = addrs.map(decode_v6_addresses).unwrap_or(Ok(Vec::new()));
        Self::from_values(ri, a, addrs.is_some())
    }

    /// From a DHCPv4 options field: first instance of 147; every instance of
    /// 148 concatenated in order (RFC 3396).
    pub fn from_v4_options(buf: &[u8]) -> Result<Self, DhcpError> {
        let opts = parse_v4_options(buf)?;
        let ri = opts
            .iter()
            .find(|(c, _)| *c == OPTION_V4_DOTS_RI)
            .map(|(_, v)| *v);
        let parts: Vec<&[u8]> = opts
            .iter()
            .filter(|(c, _)| *c == OPTION_V4_DOTS_ADDRESS)
            .map(|(_, v)| *v)
            .collect();
        let addrs = (!parts.is_empty()).then(|| parts.concat());
        Ok(Self::from_v4(ri, addrs.as_deref()))
    }

    /// From DHCPv6 options: first instance of 141 and of 142.
    pub fn from_v6_options(buf: &[u8]) -> Result<Self, DhcpError> {
        let opts = parse_v6_options(buf)?;
        let first = |code| opts.iter().find(|(c, _)| *c == code).map(|(_, v)| *v);
        Ok(Self::from_v6(
            first(OPTION_V6_DOTS_RI),
            first(OPTION_V6_DOTS_ADDRESS),
        ))
    }

    /// Candidates, transport left to the agent: one per valid address (the
    /// name, else the address, is the reference identifier); else one for
    /// the name, to resolve; else none.
    pub fn candidates(
        &self,
        mechanism: Mechanism,
        port: u16,
        lease: Option<Duration>,
        obtained: SystemTime,
    ) -> Vec<Candidate> {
        let valid_until = lease.and_then(|l| obtained.checked_add(l));
        if !self.addresses.is_empty() {
            return self
                .addresses
                .iter()
                .map(|a| Candidate {
                    mechanism,
                    transport: None,
                    host: a.to_string(),
                    address: Some(*a),
                    port,
                    reference_id: self.reference_id.clone().unwrap_or_else(|| a.to_string()),
                    ttl: lease,
                    valid_until,
                })
                .collect();
        }
        match &self.reference_id {
            Some(n) => vec![Candidate {
                mechanism,
                transport: None,
                host: n.clone(),
                address: None,
                port,
                reference_id: n.clone(),
                ttl: lease,
                valid_until,
            }],
            None => Vec::new(),
        }
    }
}

/// Decodes an option value as DHCP clients hand them to hook scripts:
/// plain hex (`0464...`, udhcpc, odhcp6c, systemd-networkd lease files),
/// hex with separators (`04:64:6f`, `4:64:6f` as dhclient prints unknown
/// options, or spaces), optionally prefixed `0x`. `None` if it is not hex.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() {
        return None;
    }
    if s.contains([':', ' ', '-']) {
        let parts: Vec<&str> = s.split([':', ' ', '-']).filter(|p| !p.is_empty()).collect();
        if parts
            .iter()
            .all(|p| (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return parts
                .iter()
                .map(|p| u8::from_str_radix(p, 16).ok())
                .collect();
        }
        return None;
    }
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// An RI option value from a hook: hex of the wire format, or the name as
/// text (dhclient with `option dots-ri code 147 = domain-list;` or a
/// quoted string).
pub fn hook_ri(s: &str) -> Result<Vec<u8>, DhcpError> {
    if let Some(b) = parse_hex(s) {
        if decode_first_name(&b).is_ok() {
            return Ok(b);
        }
    }
    let t = s.trim().trim_matches(['"', '\'']);
    // Text form: the first name of a space/comma separated list.
    let first = t.split([' ', ',']).find(|p| !p.is_empty()).unwrap_or("");
    validate_name(first).map_err(|_| DhcpError::BadValue(s.to_string()))?;
    Ok(encode_name(first))
}

/// An address option value from a hook: hex of the wire format, or
/// addresses as text separated by spaces or commas (dhclient `array of
/// ip-address`).
pub fn hook_addresses(s: &str, v6: bool) -> Result<Vec<u8>, DhcpError> {
    let t = s.trim();
    let words: Vec<&str> = t.split([' ', ',']).filter(|p| !p.is_empty()).collect();
    let as_ips: Option<Vec<IpAddr>> = words.iter().map(|w| w.parse().ok()).collect();
    if let Some(ips) = as_ips.filter(|v| !v.is_empty()) {
        let mut out = Vec::new();
        for ip in ips {
            match (ip, v6) {
                (IpAddr::V4(a), false) => out.extend_from_slice(&a.octets()),
                (IpAddr::V6(a), true) => out.extend_from_slice(&a.octets()),
                (IpAddr::V4(a), true) => out.extend_from_slice(&a.to_ipv6_mapped().octets()),
                (IpAddr::V6(_), false) => return Err(DhcpError::BadValue(s.to_string())),
            }
        }
        return Ok(out);
    }
    parse_hex(t).ok_or_else(|| DhcpError::BadValue(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8973 Figure 4: "dots.example.com", option length 18.
    const FIG4: [u8; 18] = [
        0x04, b'd', b'o', b't', b's', 0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c',
        b'o', b'm', 0x00,
    ];

    #[test]
    fn figure4_name() {
        assert_eq!(FIG4.len(), 18);
        assert_eq!(decode_first_name(&FIG4).unwrap(), "dots.example.com");
        assert_eq!(encode_name("dots.example.com"), FIG4);
    }

    #[test]
    fn only_first_name() {
        let mut two = FIG4.to_vec();
        two.extend_from_slice(&encode_name("other.example.net"));
        assert_eq!(decode_first_name(&two).unwrap(), "dots.example.com");
        // Garbage after the first name is ignored too.
        let mut junk = FIG4.to_vec();
        junk.extend_from_slice(&[0xC0, 0x00, 0x09]);
        assert_eq!(decode_first_name(&junk).unwrap(), "dots.example.com");
    }

    #[test]
    fn malformed_names() {
        assert_eq!(decode_first_name(&[]), Err(DhcpError::Empty));
        assert_eq!(decode_first_name(&[0]), Err(DhcpError::RootOnly));
        // No root label.
        assert!(matches!(
            decode_first_name(&FIG4[..17]),
            Err(DhcpError::Truncated(_))
        ));
        // Label longer than what remains.
        assert!(matches!(
            decode_first_name(&[0x05, b'd', b'o']),
            Err(DhcpError::Truncated(_))
        ));
        // Compression pointer to offset 0 after "dots".
        assert_eq!(
            decode_first_name(&[0x04, b'd', b'o', b't', b's', 0xC0, 0x00]),
            Err(DhcpError::Compression(5))
        );
        assert_eq!(
            decode_first_name(&[0x40, 0]),
            Err(DhcpError::BadLabelType(0x40))
        );
        assert!(matches!(
            decode_first_name(&[0x03, b'a', b' ', b'b', 0]),
            Err(DhcpError::InvalidName(_))
        ));
        // 5 labels of 63 = 320 octets > 255.
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend(std::iter::repeat_n(b'a', 63));
        }
        long.push(0);
        assert_eq!(decode_first_name(&long), Err(DhcpError::NameTooLong));
    }

    #[test]
    fn v4_addresses() {
        // Figure 7: code 148, length 4*N.
        let opt = [192, 0, 2, 1, 127, 0, 0, 1, 224, 0, 0, 1, 198, 51, 100, 7];
        assert_eq!(
            decode_v4_addresses(&opt).unwrap(),
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 7)]
        );
        assert_eq!(
            decode_v4_addresses(&opt[..6]),
            Err(DhcpError::BadAddressLength { len: 6, unit: 4 })
        );
        assert_eq!(decode_v4_addresses(&[]), Err(DhcpError::Empty));
    }

    #[test]
    fn v6_addresses() {
        let a: Ipv6Addr = "2001:db8:122:300::2".parse().unwrap();
        let mut opt = a.octets().to_vec();
        opt.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        opt.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        opt.extend_from_slice(&Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped().octets());
        opt.extend_from_slice(&Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets());
        assert_eq!(
            decode_v6_addresses(&opt).unwrap(),
            vec![IpAddr::V6(a), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))]
        );
        assert_eq!(
            decode_v6_addresses(&opt[..20]),
            Err(DhcpError::BadAddressLength { len: 20, unit: 16 })
        );
    }

    #[test]
    fn hex_forms() {
        assert_eq!(parse_hex("0464").unwrap(), vec![4, 0x64]);
        assert_eq!(parse_hex("04:64").unwrap(), vec![4, 0x64]);
        assert_eq!(parse_hex("4:64:6f").unwrap(), vec![4, 0x64, 0x6f]);
        assert_eq!(parse_hex("0x0464").unwrap(), vec![4, 0x64]);
        assert!(parse_hex("dots.example").is_none());
        assert!(parse_hex("046").is_none());
        assert_eq!(hook_ri("dots.example.com").unwrap(), FIG4);
        assert_eq!(hook_ri("\"dots.example.com\"").unwrap(), FIG4);
        assert_eq!(
            hook_ri("04646f7473076578616d706c6503636f6d00").unwrap(),
            FIG4
        );
        assert_eq!(
            hook_addresses("192.0.2.1 198.51.100.2", false).unwrap(),
            vec![192, 0, 2, 1, 198, 51, 100, 2]
        );
        assert_eq!(
            hook_addresses("c0000201", false).unwrap(),
            vec![192, 0, 2, 1]
        );
        assert!(hook_addresses("2001:db8::1", false).is_err());
        assert_eq!(hook_addresses("2001:db8::1", true).unwrap().len(), 16);
    }
}
