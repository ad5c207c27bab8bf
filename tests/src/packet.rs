//! A small builder of Ethernet frames, for data-plane tests and benchmarks:
//! VLAN tags, IPv4 with options, IPv6 with extension headers, and the L4
//! headers the classifier reads. L4 checksums are left at zero: the
//! classifier never looks at them.

use std::net::IpAddr;

/// The L4 part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    Dccp {
        sport: u16,
        dport: u16,
    },
    /// ICMP for IPv4 sources, ICMPv6 for IPv6 ones.
    Icmp {
        icmp_type: u8,
        code: u8,
    },
    /// Any other protocol number, with no header of its own.
    Other(u8),
}

impl L4 {
    pub fn protocol(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Dccp { .. } => 33,
            L4::Icmp { .. } if v6 => 58,
            L4::Icmp { .. } => 1,
            L4::Other(p) => *p,
        }
    }

    fn header(&self) -> Vec<u8> {
        match *self {
            L4::Tcp { sport, dport } => {
                let mut h = vec![0u8; 20];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4; // data offset
                h[13] = 0x02; // SYN
                h
            }
            L4::Udp { sport, dport } | L4::Sctp { sport, dport } => {
                let mut h = vec![
                    0u8;
                    if matches!(self, L4::Udp { .. }) {
                        8
                    } else {
                        12
                    }
                ];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h
            }
            L4::Dccp { sport, dport } => {
                let mut h = vec![0u8; 16];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h
            }
            L4::Icmp { icmp_type, code } => vec![icmp_type, code, 0, 0, 0, 0, 0, 0],
            L4::Other(_) => Vec::new(),
        }
    }
}

/// IPv6 extension headers placed before the L4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    HopByHop,
    Routing,
    DestinationOptions,
    /// Fragment header; `offset` in 8-byte units. A non-zero offset means the
    /// L4 header is not in this packet, so none is written.
    Fragment {
        offset: u16,
        more: bool,
    },
}

/// Description of one frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// VLAN IDs, outermost first (802.1ad outer tag when there are two).
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 options length in bytes (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv4 fragment offset in 8-byte units (non-first fragment when > 0).
    pub ipv4_fragment_offset: u16,
    pub ipv6_ext: Vec<ExtHeader>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Frame {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0, 1],
            dst_mac: [0x02, 0, 0, 0, 0, 2],
            vlans: Vec::new(),
            src,
            dst,
            l4,
            ipv4_options: 0,
            ipv4_fragment_offset: 0,
            ipv6_ext: Vec::new(),
            payload: b"dots-agent test payload".to_vec(),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.payload.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        let v6 = self.src.is_ipv6();
        out.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(&mut out, s.octets(), d.octets()),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(&mut out, s.octets(), d.octets()),
            // Mixed families cannot form a packet: use the source's family for both.
            (IpAddr::V4(s), IpAddr::V6(_)) => self.ipv4(&mut out, s.octets(), [0; 4]),
            (IpAddr::V6(s), IpAddr::V4(_)) => self.ipv6(&mut out, s.octets(), [0; 16]),
        }
        out
    }

    fn l4_and_payload(&self, v6: bool, fragment: bool) -> Vec<u8> {
        let mut body = if fragment {
            Vec::new()
        } else {
            self.l4.header()
        };
        let _ = v6;
        body.extend_from_slice(&self.payload);
        body
    }

    fn ipv4(&self, out: &mut Vec<u8>, src: [u8; 4], dst: [u8; 4]) {
        let opts = self.ipv4_options.min(40) / 4 * 4;
        let fragment = self.ipv4_fragment_offset > 0;
        let body = self.l4_and_payload(false, fragment);
        let ihl = 20 + opts;
        let total = (ihl + body.len()) as u16;
        let mut h = vec![0u8; ihl];
        h[0] = 0x40 | (ihl / 4) as u8;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&(self.ipv4_fragment_offset & 0x1fff).to_be_bytes());
        h[8] = 64;
        h[9] = self.l4.protocol(false);
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        for b in &mut h[20..] {
            *b = 1; // NOP options
        }
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&body);
    }

    fn ipv6(&self, out: &mut Vec<u8>, src: [u8; 16], dst: [u8; 16]) {
        let fragment = self
            .ipv6_ext
            .iter()
            .any(|e| matches!(e, ExtHeader::Fragment { offset, .. } if *offset > 0));
        let mut ext = Vec::new();
        let codes: Vec<u8> = self
            .ipv6_ext
            .iter()
            .map(|e| match e {
                ExtHeader::HopByHop => 0,
                ExtHeader::Routing => 43,
                ExtHeader::DestinationOptions => 60,
                ExtHeader::Fragment { .. } => 44,
            })
            .collect();
        let upper = self.l4.protocol(true);
        for (i, e) in self.ipv6_ext.iter().enumerate() {
            let next = codes.get(i + 1).copied().unwrap_or(upper);
            match e {
                ExtHeader::Fragment { offset, more } => {
                    let off = (offset << 3) | u16::from(*more);
                    ext.extend_from_slice(&[next, 0]);
                    ext.extend_from_slice(&off.to_be_bytes());
                    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                }
                ExtHeader::Routing => {
                    // Type 0 segments-left 0 routing header, 8 bytes.
                    ext.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
                }
                _ => {
                    // 8 bytes: next, len 0, a PadN option of 4 bytes.
                    ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
        }
        let body = self.l4_and_payload(true, fragment);
        let first_next = codes.first().copied().unwrap_or(upper);
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&((ext.len() + body.len()) as u16).to_be_bytes());
        out.push(first_next);
        out.push(64);
        out.extend_from_slice(&src);
        out.extend_from_slice(&dst);
        out.extend_from_slice(&ext);
        out.extend_from_slice(&body);
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_udp_layout() {
        let f = Frame::new(
            "192.0.2.1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
            L4::Udp {
                sport: 1234,
                dport: 53,
            },
        );
        let b = f.build();
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(b[23], 17);
        assert_eq!(&b[26..30], &[192, 0, 2, 1]);
        assert_eq!(&b[34..36], &1234u16.to_be_bytes());
        assert_eq!(checksum(&b[14..34]), 0, "header checksum verifies");
    }

    #[test]
    fn vlan_and_ipv6_ext() {
        let mut f = Frame::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            L4::Icmp {
                icmp_type: 128,
                code: 0,
            },
        );
        f.vlans = vec![100, 200];
        f.ipv6_ext = vec![
            ExtHeader::HopByHop,
            ExtHeader::Fragment {
                offset: 0,
                more: true,
            },
        ];
        let b = f.build();
        assert_eq!(&b[12..14], &[0x88, 0xa8]);
        assert_eq!(&b[16..18], &[0x81, 0x00]);
        assert_eq!(&b[20..22], &[0x86, 0xdd]);
        let ip = 22;
        assert_eq!(b[ip + 6], 0); // hop-by-hop first
        assert_eq!(b[ip + 40], 44); // then fragment
        assert_eq!(b[ip + 48], 58); // then ICMPv6
        assert_eq!(b[ip + 56], 128); // echo request type
    }
}
