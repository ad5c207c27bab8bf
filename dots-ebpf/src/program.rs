//! Maps and the XDP entry points.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    helpers::generated::bpf_ktime_get_boot_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use dots_common::{
    action, flags, stats, Bucket, IcmpTypeKey, Ipv4Key, Ipv6Key, Policy, PortKey, SlotConfig,
    SlotCounters, SlotMask, MAX_EXEMPT_PREFIXES as EXEMPT, MAX_RANGE_PREFIXES as RANGES, MAX_SLOTS,
    MAX_SOURCE_PREFIXES as SOURCES, MAX_TARGET_PREFIXES as TARGETS,
};

use crate::parse::{parse, Ip, Packet, L4};

// The static names are the pinned map names (dots_common::names).
#[btf_map]
static DOTS_POLICY: Array<Policy, 1> = Array::new();
#[btf_map]
static DOTS_SRC4_EXACT: HashMap<Ipv4Key, SlotMask, { SOURCES as usize }> = HashMap::new();
#[btf_map]
static DOTS_SRC6_EXACT: HashMap<Ipv6Key, SlotMask, { SOURCES as usize }> = HashMap::new();
#[btf_map]
static DOTS_SRC4_LPM: LpmTrie<Ipv4Key, SlotMask, { SOURCES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_SRC6_LPM: LpmTrie<Ipv6Key, SlotMask, { SOURCES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_DST4_LPM: LpmTrie<Ipv4Key, SlotMask, { TARGETS as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_DST6_LPM: LpmTrie<Ipv6Key, SlotMask, { TARGETS as usize }> = LpmTrie::new();
/// Indexed by IP protocol number: slots that name that protocol.
#[btf_map]
static DOTS_PROTO: Array<SlotMask, 256> = Array::new();
#[btf_map]
static DOTS_SPORT: LpmTrie<PortKey, SlotMask, { RANGES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_DPORT: LpmTrie<PortKey, SlotMask, { RANGES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_ICMP_TYPE: LpmTrie<IcmpTypeKey, SlotMask, { RANGES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_EXEMPT4: LpmTrie<Ipv4Key, u8, { EXEMPT as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_EXEMPT6: LpmTrie<Ipv6Key, u8, { EXEMPT as usize }> = LpmTrie::new();
/// What each slot does, and until when (written by user space).
#[btf_map]
static DOTS_SLOTS: Array<SlotConfig, MAX_SLOTS> = Array::new();
/// Rate-limit state of each slot (written by this program).
#[btf_map]
static DOTS_BUCKETS: Array<Bucket, MAX_SLOTS> = Array::new();
#[btf_map]
static DOTS_COUNTERS: PerCpuArray<SlotCounters, MAX_SLOTS> = PerCpuArray::new();
#[btf_map]
static DOTS_STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();

#[xdp]
pub fn dots_xdp(ctx: XdpContext) -> u32 {
    let Some(packet) = parse(&ctx) else {
        count_stat(stats::UNPARSED);
        return xdp_action::XDP_PASS;
    };
    let Some(policy) = DOTS_POLICY.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let matched = classify(&packet, policy);
    if matched.is_empty() {
        return xdp_action::XDP_PASS;
    }
    // Checked only on the hit path, so misses pay nothing for it.
    if is_exempt(&packet.ip, policy.flags) {
        count_stat(stats::EXEMPT);
        return xdp_action::XDP_PASS;
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    enforce(&matched, bytes)
}

/// The empty program the benchmarks subtract as a baseline.
#[xdp]
pub fn dots_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The slots that match `packet` on every field they constrain. A field's
/// lookup is skipped when every slot still in the running leaves that field
/// unconstrained, so a packet pays only for what some candidate slot asks.
#[inline(always)]
fn classify(packet: &Packet, policy: &Policy) -> SlotMask {
    let src = match &packet.ip {
        Ip::V4(a) => source4(a.src, policy.flags & flags::SRC4_LPM != 0),
        Ip::V6(a) => source6(a.src, policy.flags & flags::SRC6_LPM != 0),
    };
    let mut m = src.and(&policy.active);
    if m.is_empty() {
        return m;
    }
    m = m.and(&match &packet.ip {
        Ip::V4(a) => target4(a.dst),
        Ip::V6(a) => target6(a.dst),
    });
    if m.is_empty() {
        return m;
    }
    if !m.is_subset_of(&policy.any_proto) {
        let proto = DOTS_PROTO
            .get(packet.proto as u32)
            .copied()
            .unwrap_or_default();
        m = m.and(&policy.any_proto.or(&proto));
        if m.is_empty() {
            return m;
        }
    }
    // Port constraints only match port-carrying packets and ICMP-type
    // constraints only ICMP packets; slots constraining neither match any L4.
    if !m.is_subset_of(&policy.any_l4) {
        let l4 = match packet.l4 {
            L4::Ports(sport, _) => lookup(&DOTS_SPORT, PortKey::new(sport), 16),
            L4::Icmp(t) => lookup(&DOTS_ICMP_TYPE, IcmpTypeKey::new(t), 8),
            L4::None => SlotMask::EMPTY,
        };
        m = m.and(&policy.any_l4.or(&l4));
    }
    if !m.is_subset_of(&policy.any_dport) {
        let dport = match packet.l4 {
            L4::Ports(_, dport) => lookup(&DOTS_DPORT, PortKey::new(dport), 16),
            _ => SlotMask::EMPTY,
        };
        m = m.and(&policy.any_dport.or(&dport));
    }
    m
}

#[inline(always)]
fn lookup<K, const N: usize>(map: &LpmTrie<K, SlotMask, N>, data: K, bits: u32) -> SlotMask {
    map.get(&Key::new(bits, data)).copied().unwrap_or_default()
}

/// Exact host addresses take the hash fast path; shorter prefixes the trie.
/// User space folds covering prefixes into each entry, so one hit is enough.
#[inline(always)]
fn source4(addr: [u8; 4], lpm: bool) -> SlotMask {
    let key = Ipv4Key::new(addr);
    // SAFETY: the value is copied out at once; user space only replaces values whole.
    if let Some(m) = unsafe { DOTS_SRC4_EXACT.get(&key) } {
        return *m;
    }
    if !lpm {
        return SlotMask::EMPTY;
    }
    lookup(&DOTS_SRC4_LPM, key, 32)
}

#[inline(always)]
fn source6(addr: [u8; 16], lpm: bool) -> SlotMask {
    let key = Ipv6Key { addr };
    // SAFETY: as in `source4`.
    if let Some(m) = unsafe { DOTS_SRC6_EXACT.get(&key) } {
        return *m;
    }
    if !lpm {
        return SlotMask::EMPTY;
    }
    lookup(&DOTS_SRC6_LPM, key, 128)
}

#[inline(always)]
fn target4(addr: [u8; 4]) -> SlotMask {
    lookup(&DOTS_DST4_LPM, Ipv4Key::new(addr), 32)
}

#[inline(always)]
fn target6(addr: [u8; 16]) -> SlotMask {
    lookup(&DOTS_DST6_LPM, Ipv6Key { addr }, 128)
}

#[inline(always)]
fn is_exempt(ip: &Ip, policy_flags: u64) -> bool {
    match ip {
        Ip::V4(_) if policy_flags & flags::EXEMPT4 == 0 => false,
        Ip::V6(_) if policy_flags & flags::EXEMPT6 == 0 => false,
        Ip::V4(a) => {
            DOTS_EXEMPT4
                .get(&Key::new(32, Ipv4Key::new(a.src)))
                .is_some()
                || DOTS_EXEMPT4
                    .get(&Key::new(32, Ipv4Key::new(a.dst)))
                    .is_some()
        }
        Ip::V6(a) => {
            DOTS_EXEMPT6
                .get(&Key::new(128, Ipv6Key { addr: a.src }))
                .is_some()
                || DOTS_EXEMPT6
                    .get(&Key::new(128, Ipv6Key { addr: a.dst }))
                    .is_some()
        }
    }
}

/// Applies the live slots among `matched` to one packet of `bytes`: each
/// is charged (as dropped, or as passed for a monitor slot), and the packet
/// is dropped when any of them drops it. Slots past their expiry are
/// skipped: a block ends on time even when no agent is left to remove it.
#[inline(always)]
fn enforce(matched: &SlotMask, bytes: u64) -> u32 {
    // SAFETY: a helper without arguments, allowed in XDP programs.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut dropped = false;
    let mut passed = false;
    for word in 0..matched.bits.len() {
        let mut bits = matched.bits[word];
        for _ in 0..64 {
            if bits == 0 {
                break;
            }
            let slot = word as u32 * 64 + bits.trailing_zeros();
            bits &= bits - 1;
            let Some(config) = DOTS_SLOTS.get(slot) else {
                continue;
            };
            if now >= config.expires_ns {
                continue;
            }
            let drop = config.action == action::DROP;
            if let Some(c) = DOTS_COUNTERS.get_ptr_mut(slot) {
                // SAFETY: per-CPU value of this CPU; XDP runs with preemption off.
                unsafe {
                    if drop {
                        (*c).packets += 1;
                        (*c).bytes += bytes;
                    } else {
                        (*c).passed_packets += 1;
                        (*c).passed_bytes += bytes;
                    }
                }
            }
            dropped |= drop;
            passed |= !drop;
        }
    }
    if dropped {
        count_stat(stats::DROPPED);
        xdp_action::XDP_DROP
    } else {
        if passed {
            count_stat(stats::MONITORED);
        }
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn count_stat(index: u32) {
    if let Some(c) = DOTS_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
