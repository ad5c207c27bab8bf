//! Packet parsing: Ethernet (0-2 VLAN tags), IPv4 with options, IPv6 with
//! extension headers, then ports or ICMP type. Anything unparsable is `None`
//! and the caller passes the packet.
//!
//! Each header is bounds-checked once, then its fields are read with one
//! BPF load of their own width ([`load`]). Packet fields are not aligned
//! (an IPv4 address sits at offset 26 of the frame), and LLVM splits every
//! read it cannot prove aligned into single bytes: parsing an IPv6 header
//! took 40 byte loads and as many stack spills. Letting LLVM assume
//! misaligned access is fine everywhere is worse: it then merges stack
//! stores into misaligned ones, which the verifier refuses. So the loads
//! are written as instructions. The kernel allows misaligned packet loads
//! where the CPU does (x86-64, arm64); elsewhere the verifier refuses the
//! program at load time rather than it running wrong.

use core::arch::asm;

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

/// Addresses as loaded: the bytes in network order, read as native words
/// (`u32::from_ne_bytes` of the four bytes).
pub struct Addrs4 {
    pub src: u32,
    pub dst: u32,
}

/// Addresses as loaded: each as two native words of its bytes in network
/// order (what `dots_common::addr_words` computes).
pub struct Addrs6 {
    pub src: [u64; 2],
    pub dst: [u64; 2],
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

/// The address of a header of `len` bytes at `off`, when the frame holds it.
#[inline(always)]
fn header(ctx: &XdpContext, off: usize, len: usize) -> Option<usize> {
    let p = ctx.data() + off;
    if p + len > ctx.data_end() {
        return None;
    }
    Some(p)
}

/// Width of a packet load.
trait Load: Sized {
    /// # Safety
    /// `p .. p + size_of::<Self>()` must be readable packet data.
    unsafe fn load(p: usize) -> Self;
}

macro_rules! loads {
    ($($t:ty => $insn:literal),*) => {$(
        impl Load for $t {
            #[inline(always)]
            unsafe fn load(p: usize) -> $t {
                let v: u64;
                // SAFETY: a plain load of bytes the caller vouches for.
                unsafe {
                    asm!($insn, out(reg) v, in(reg) p, options(pure, readonly, nostack, preserves_flags));
                }
                v as $t
            }
        }
    )*};
}

loads!(
    u8 => "{0} = *(u8 *)({1} + 0)",
    u16 => "{0} = *(u16 *)({1} + 0)",
    u32 => "{0} = *(u32 *)({1} + 0)",
    u64 => "{0} = *(u64 *)({1} + 0)"
);

/// The `T` at `p`, in memory order (a native-endian reading of the bytes).
///
/// # Safety
/// `p .. p + size_of::<T>()` must lie inside a range [`header`] returned.
#[inline(always)]
#[allow(private_bounds)]
unsafe fn read<T: Load>(p: usize) -> T {
    // SAFETY: the caller's contract is the load's.
    unsafe { T::load(p) }
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = header(ctx, off, 2)?;
    // SAFETY: two bytes checked just above.
    Some(u16::from_be(unsafe { read::<u16>(p) }))
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Option<Packet> {
    let mut ethertype = be16(ctx, 12)?;
    let mut off = ETH_HLEN;
    // Up to two tags: 802.1Q, or 802.1ad outer + 802.1Q inner (QinQ).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(ctx, off + 2)?;
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
    let h = header(ctx, off, 20)?;
    // SAFETY (all reads below): inside the 20 bytes checked above.
    let (vihl, frag, proto, src, dst) = unsafe {
        (
            read::<u8>(h),
            u16::from_be(read::<u16>(h + 6)),
            read::<u8>(h + 9),
            read::<u32>(h + 12),
            read::<u32>(h + 16),
        )
    };
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
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
    let h = header(ctx, off, 40)?;
    // SAFETY (all reads below): inside the 40 bytes checked above.
    let (version, mut next, src, dst) = unsafe {
        (
            read::<u8>(h),
            read::<u8>(h + 6),
            [read::<u64>(h + 8), read::<u64>(h + 16)],
            [read::<u64>(h + 24), read::<u64>(h + 32)],
        )
    };
    if version >> 4 != 6 {
        return None;
    }
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
        let e = header(ctx, off, 8)?;
        // SAFETY: inside the 8 bytes checked above.
        let (following, hdr_len, frag) =
            unsafe { (read::<u8>(e), read::<u8>(e + 1), read::<u16>(e + 2)) };
        let len = match next {
            IPV6_AH => (hdr_len as usize + 2) * 4,
            IPV6_FRAGMENT => {
                if u16::from_be(frag) & 0xfff8 != 0 {
                    first_fragment = false;
                }
                8
            }
            _ => (hdr_len as usize + 1) * 8,
        };
        next = following;
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
            let p = header(ctx, off, 4)?;
            // SAFETY: inside the 4 bytes checked above.
            let (sport, dport) = unsafe { (read::<u16>(p), read::<u16>(p + 2)) };
            Some(L4::Ports(u16::from_be(sport), u16::from_be(dport)))
        }
        p if p == icmp_proto => {
            let h = header(ctx, off, 4)?;
            // SAFETY: inside the 4 bytes checked above.
            Some(L4::Icmp(unsafe { read::<u8>(h) }))
        }
        _ => Some(L4::None),
    }
}
