//! Packet parsing: Ethernet (0-2 VLAN tags), IPv4 with options, IPv6 with
//! extension headers, then ports or ICMP type. Anything unparsable is `None`
//! and the caller passes the packet.

use aya_ebpf::programs::XdpContext;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_DCCP: u8 = 33;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (and passing the packet).
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Furthest L4 offset we follow; keeps offsets bounded for the verifier.
const MAX_L4_OFFSET: usize = 512;

/// What the L4 header told us.
#[derive(Clone, Copy)]
pub enum L4 {
    /// TCP, UDP, SCTP or DCCP: source and destination port.
    Ports(u16, u16),
    /// ICMP or ICMPv6 (matching the IP version): the type.
    Icmp(u8),
    /// Another protocol, or a non-first fragment (no L4 header to read).
    None,
}

pub struct Addrs4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub struct Addrs6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

pub enum Ip {
    V4(Addrs4),
    V6(Addrs6),
}

pub struct Packet {
    pub ip: Ip,
    pub proto: u8,
    pub l4: L4,
}

#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    bytes::<2>(ctx, off).map(u16::from_be_bytes)
}

// Headers are read whole, in one bounds check each: single-byte reads at
// variable offsets tempt LLVM into `ptr >= end` checks the verifier cannot use.

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Option<Packet> {
    let mut ethertype = be16_at(ctx, 12)?;
    let mut off = ETH_HLEN;
    // Up to two tags: 802.1Q, or 802.1ad outer + 802.1Q inner (QinQ).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16_at(ctx, off + 2)?;
        off += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => None,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Option<Packet> {
    let h = bytes::<20>(ctx, off)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let proto = h[9];
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    // A non-zero fragment offset means no L4 header in this packet.
    let l4 = if frag & 0x1fff != 0 {
        L4::None
    } else {
        parse_l4(ctx, off + ihl, proto, IPPROTO_ICMP)?
    };
    Some(Packet {
        ip: Ip::V4(Addrs4 { src, dst }),
        proto,
        l4,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Option<Packet> {
    let h = bytes::<40>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut next = h[6];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut off = off + 40;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !matches!(
            next,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT
        ) {
            break;
        }
        // Every extension header is at least 8 bytes long.
        let e = bytes::<8>(ctx, off)?;
        let len = match next {
            IPV6_AH => (e[1] as usize + 2) * 4,
            IPV6_FRAGMENT => {
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    first_fragment = false;
                }
                8
            }
            _ => (e[1] as usize + 1) * 8,
        };
        next = e[0];
        off += len;
        if off > MAX_L4_OFFSET {
            return None;
        }
    }
    let l4 = match next {
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => return None,
        _ if !first_fragment => L4::None,
        _ => parse_l4(ctx, off, next, IPPROTO_ICMPV6)?,
    };
    Some(Packet {
        ip: Ip::V6(Addrs6 { src, dst }),
        proto: next,
        l4,
    })
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, off: usize, proto: u8, icmp_proto: u8) -> Option<L4> {
    if off > MAX_L4_OFFSET {
        return None;
    }
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_DCCP => {
            let p = bytes::<4>(ctx, off)?;
            Some(L4::Ports(
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ))
        }
        p if p == icmp_proto => Some(L4::Icmp(bytes::<4>(ctx, off)?[0])),
        _ => Some(L4::None),
    }
}
