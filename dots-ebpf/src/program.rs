//! Maps and the XDP entry points.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_boot_ns},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use dots_common::{
    action, addr_words, entry, flags, stats, Bucket, Ipv4Key, Ipv6Key, Policy, SlotConfig,
    SlotCounters, SlotMask, Source4Key, Source6Key, SourceEntry, SourceLengths, CLOCK_SLACK_NS,
    MAX_EXEMPT_PREFIXES as EXEMPT, MAX_PROBED_LENGTHS, MAX_SLOTS, MAX_SOURCE_PREFIXES as SOURCES,
    MAX_TARGET_PREFIXES as TARGETS, MMAPABLE,
};

use core::arch::asm;

use crate::parse::{parse, Ip, Packet, L4};

/// `BPF_F_NO_PREALLOC`: the source hashes take memory as they fill, not
/// their full capacity up front.
const NO_PREALLOC: usize = 1;

// The static names are the pinned map names (dots_common::names).
#[btf_map]
static DOTS_POLICY: Array<Policy, 1> = Array::new();
/// Every source prefix, keyed by (address masked to its length, length).
#[btf_map]
static DOTS_SRC4: HashMap<Source4Key, SourceEntry, { SOURCES as usize }, NO_PREALLOC> =
    HashMap::new();
#[btf_map]
static DOTS_SRC6: HashMap<Source6Key, SourceEntry, { SOURCES as usize }, NO_PREALLOC> =
    HashMap::new();
/// The shorter source prefixes again, for when too many lengths are present
/// to probe them one by one (`SourceLengths::trie`).
#[btf_map]
static DOTS_SRC4_LPM: LpmTrie<Ipv4Key, SourceEntry, { SOURCES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_SRC6_LPM: LpmTrie<Ipv6Key, SourceEntry, { SOURCES as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_DST4_LPM: LpmTrie<Ipv4Key, SlotMask, { TARGETS as usize }> = LpmTrie::new();
#[btf_map]
static DOTS_DST6_LPM: LpmTrie<Ipv6Key, SlotMask, { TARGETS as usize }> = LpmTrie::new();
// Value arrays, indexed by the field's value: the slots that name it. An
// array lookup is a bounds check and an address computation, inlined by the
// verifier; user space writes them through a shared mapping.
/// Indexed by IP protocol number.
#[btf_map]
static DOTS_PROTO: Array<SlotMask, 256, { MMAPABLE as usize }> = Array::new();
/// Indexed by source port.
#[btf_map]
static DOTS_SPORT: Array<SlotMask, 65536, { MMAPABLE as usize }> = Array::new();
/// Indexed by target port.
#[btf_map]
static DOTS_DPORT: Array<SlotMask, 65536, { MMAPABLE as usize }> = Array::new();
/// Indexed by ICMP or ICMPv6 type.
#[btf_map]
static DOTS_ICMP_TYPE: Array<SlotMask, 256, { MMAPABLE as usize }> = Array::new();
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

/// The expiry at which each slot's end was last reported (aya-log), so
/// a slot's end is logged once, not for every packet that arrives after
/// it. Per program, not pinned: a restarted agent reports again.
#[btf_map]
static DOTS_EXPIRY_SEEN: Array<u64, MAX_SLOTS> = Array::new();

/// The boot clock as last read on this CPU, and the jiffies it was read at.
#[repr(C)]
struct ClockCache {
    jiffies: u64,
    boot_ns: u64,
}

/// Per-CPU scratch of `now`, not shared with user space (not pinned).
#[btf_map]
static DOTS_CLOCK: PerCpuArray<ClockCache, 1> = PerCpuArray::new();

#[xdp]
pub fn dots_xdp(ctx: XdpContext) -> u32 {
    let Some(packet) = parse(&ctx) else {
        count_stat(stats::UNPARSED);
        return xdp_action::XDP_PASS;
    };
    let Some(policy) = DOTS_POLICY.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let Some(matched) = classify(&packet, policy) else {
        return xdp_action::XDP_PASS;
    };
    // Checked only on the hit path, and only when an exempt prefix overlaps
    // some slot, so misses pay nothing for it.
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

/// The slots that match `packet` on every field they constrain (`None`:
/// none). A field's lookup is skipped when every slot still in the running
/// leaves that field unconstrained, so a packet pays only for what some
/// candidate slot asks. Misses end in `None` rather than an empty mask:
/// returning a zeroed 32-byte mask made LLVM call `memset` on the miss path.
#[inline(always)]
fn classify(packet: &Packet, policy: &Policy) -> Option<SlotMask> {
    let source = match &packet.ip {
        Ip::V4(a) => source4(a.src, &policy.src4),
        Ip::V6(a) => source6(a.src, &policy.src6),
    };
    let source = source?;
    let mut m = source.slots.and(&policy.active);
    if m.is_empty() {
        return None;
    }
    if source.flags & entry::TARGET_HINT != 0 {
        // Every slot of the entry names this one target prefix.
        let dst = match &packet.ip {
            Ip::V4(a) => addr_words(&a.dst.to_ne_bytes()),
            Ip::V6(a) => a.dst,
        };
        if dst[0] & source.target_mask[0] != source.target[0]
            || dst[1] & source.target_mask[1] != source.target[1]
        {
            return None;
        }
    } else {
        m = m.and(&match &packet.ip {
            Ip::V4(a) => lookup(&DOTS_DST4_LPM, v4_key(a.dst), 32),
            Ip::V6(a) => lookup(&DOTS_DST6_LPM, v6_key(a.dst), 128),
        });
        if m.is_empty() {
            return None;
        }
    }
    if !m.is_subset_of(&policy.any_proto) {
        let proto = value(&DOTS_PROTO, u32::from(packet.proto));
        m = m.and(&policy.any_proto.or(&proto));
        if m.is_empty() {
            return None;
        }
    }
    // Port constraints only match port-carrying packets and ICMP-type
    // constraints only ICMP packets; slots constraining neither match any L4.
    if !m.is_subset_of(&policy.any_l4) {
        let l4 = match packet.l4 {
            L4::Ports(sport, _) => value(&DOTS_SPORT, u32::from(sport)),
            L4::Icmp(t) => value(&DOTS_ICMP_TYPE, u32::from(t)),
            L4::None => SlotMask::EMPTY,
        };
        m = m.and(&policy.any_l4.or(&l4));
    }
    if !m.is_subset_of(&policy.any_dport) {
        let dport = match packet.l4 {
            L4::Ports(_, dport) => value(&DOTS_DPORT, u32::from(dport)),
            _ => SlotMask::EMPTY,
        };
        m = m.and(&policy.any_dport.or(&dport));
    }
    (!m.is_empty()).then_some(m)
}

#[inline(always)]
fn value<const N: usize, const F: usize>(array: &Array<SlotMask, N, F>, index: u32) -> SlotMask {
    array.get(index).copied().unwrap_or_default()
}

#[inline(always)]
fn lookup<K, const N: usize>(map: &LpmTrie<K, SlotMask, N>, data: K, bits: u32) -> SlotMask {
    map.get(&Key::new(bits, data)).copied().unwrap_or_default()
}

/// Trie key data of an address as loaded (see `parse::Addrs4`).
#[inline(always)]
fn v4_key(raw: u32) -> Ipv4Key {
    Ipv4Key::new(raw.to_ne_bytes())
}

#[inline(always)]
fn v6_key(raw: [u64; 2]) -> Ipv6Key {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&raw[0].to_ne_bytes());
    addr[8..].copy_from_slice(&raw[1].to_ne_bytes());
    Ipv6Key { addr }
}

/// The source entry of an IPv4 address: the hash probed at each length
/// present, longest first (user space folds covering prefixes into each
/// entry, so the first hit is the answer), then the trie when asked.
#[inline(always)]
fn source4(raw: u32, lengths: &SourceLengths) -> Option<&'static SourceEntry> {
    let a = u32::from_be(raw);
    for i in 0..MAX_PROBED_LENGTHS {
        if i >= lengths.count as usize {
            break;
        }
        let len = (lengths.lengths[i] as u32).min(32);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let key = Source4Key {
            addr: (a & mask).to_be_bytes(),
            prefix_len: len,
        };
        // SAFETY: the value is only read; user space replaces values whole.
        if let Some(e) = unsafe { DOTS_SRC4.get(&key) } {
            return Some(e);
        }
    }
    if lengths.trie == 0 {
        return None;
    }
    DOTS_SRC4_LPM.get(&Key::new(32, v4_key(raw)))
}

#[inline(always)]
fn source6(raw: [u64; 2], lengths: &SourceLengths) -> Option<&'static SourceEntry> {
    let (hi, lo) = (u64::from_be(raw[0]), u64::from_be(raw[1]));
    for i in 0..MAX_PROBED_LENGTHS {
        if i >= lengths.count as usize {
            break;
        }
        let len = (lengths.lengths[i] as u32).min(128);
        let (mask_hi, mask_lo) = match len {
            0 => (0, 0),
            1..=63 => (u64::MAX << (64 - len), 0),
            64 => (u64::MAX, 0),
            _ => (u64::MAX, u64::MAX << (128 - len)),
        };
        let mut masked = [0u8; 16];
        masked[..8].copy_from_slice(&(hi & mask_hi).to_be_bytes());
        masked[8..].copy_from_slice(&(lo & mask_lo).to_be_bytes());
        let key = Source6Key {
            addr: masked,
            prefix_len: len,
        };
        // SAFETY: as in `source4`.
        if let Some(e) = unsafe { DOTS_SRC6.get(&key) } {
            return Some(e);
        }
    }
    if lengths.trie == 0 {
        return None;
    }
    DOTS_SRC6_LPM.get(&Key::new(128, v6_key(raw)))
}

#[inline(always)]
fn is_exempt(ip: &Ip, policy_flags: u64) -> bool {
    match ip {
        Ip::V4(_) if policy_flags & flags::EXEMPT4 == 0 => false,
        Ip::V6(_) if policy_flags & flags::EXEMPT6 == 0 => false,
        Ip::V4(a) => {
            DOTS_EXEMPT4.get(&Key::new(32, v4_key(a.src))).is_some()
                || DOTS_EXEMPT4.get(&Key::new(32, v4_key(a.dst))).is_some()
        }
        Ip::V6(a) => {
            DOTS_EXEMPT6.get(&Key::new(128, v6_key(a.src))).is_some()
                || DOTS_EXEMPT6.get(&Key::new(128, v6_key(a.dst))).is_some()
        }
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds, read at most once per tick per CPU.
///
/// `bpf_ktime_get_boot_ns` costs tens of nanoseconds in a virtual machine
/// (it reads the clock source); `bpf_jiffies64` is inlined by the verifier
/// into one load. So the boot clock is read again only when jiffies moved
/// since the last reading on this CPU; in between, the cached reading is at
/// most one tick old. The caller adds [`CLOCK_SLACK_NS`] (longer than a
/// tick at any HZ) so that a stale reading ends a slot early, never late.
#[inline(always)]
fn boot_ns() -> u64 {
    // SAFETY: helpers without arguments, allowed in XDP programs.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = DOTS_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_boot_ns() };
    };
    // SAFETY: this CPU's value; XDP runs with preemption off.
    unsafe {
        if (*cache).jiffies != jiffies || (*cache).boot_ns == 0 {
            (*cache).jiffies = jiffies;
            (*cache).boot_ns = bpf_ktime_get_boot_ns();
        }
        (*cache).boot_ns
    }
}

/// Applies the live slots among `matched` to one packet of `bytes`: each
/// is charged (as dropped, or as passed for a monitor slot or a rate-limited
/// one within its limit), and the packet is dropped when any of them drops
/// it. Slots past their expiry are
/// skipped: a block ends on time even when no agent is left to remove it.
#[inline(always)]
fn enforce(matched: &SlotMask, bytes: u64) -> u32 {
    let clock = boot_ns();
    let now = clock.saturating_add(CLOCK_SLACK_NS);
    let mut dropped = false;
    let mut monitored = false;
    let mut conforming = false;
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
                if config.expires_ns != 0 {
                    dots_report_expiry(slot, config.expires_ns);
                }
                continue;
            }
            let drop = match config.action {
                action::DROP => true,
                action::RATE_LIMIT => {
                    let over = over_limit(slot, config, clock, bytes);
                    conforming |= !over;
                    over
                }
                _ => {
                    monitored = true;
                    false
                }
            };
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
        }
    }
    if dropped {
        count_stat(stats::DROPPED);
        xdp_action::XDP_DROP
    } else {
        if monitored {
            count_stat(stats::MONITORED);
        } else if conforming {
            count_stat(stats::CONFORMING);
        }
        xdp_action::XDP_PASS
    }
}

/// Logs, once per expiry, that a slot matched traffic after its expiry:
/// the kernel ended a block nobody in user space removed (the agent is
/// gone, or behind). Reached only on that cold path. A global function:
/// the verifier checks it once on its own instead of at every slot of the
/// caller's loop, which would take the program past its instruction limit.
#[inline(never)]
#[no_mangle]
pub fn dots_report_expiry(slot: u32, expires_ns: u64) -> u32 {
    let Some(seen) = DOTS_EXPIRY_SEEN.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: a valid map value pointer (checked above).
    let old = unsafe { *seen };
    if old == expires_ns {
        return 0;
    }
    // SAFETY: as above. The exchange makes one CPU the reporter when
    // several see the same expired slot at once.
    if unsafe { cmpxchg(seen, old, expires_ns) } == old {
        // aya-log writes to its ring buffer and reads nothing from the
        // context it is given.
        info!(
            &(),
            "slot {} matched traffic after its expiry (boot clock {} ns): the kernel ended it",
            slot,
            expires_ns
        );
    }
    0
}

/// Whether a packet of `bytes` exceeds slot `slot`'s rate limit at `now`;
/// when it does not, it is charged to the slot's buckets.
#[inline(always)]
fn over_limit(slot: u32, config: &SlotConfig, now: u64, bytes: u64) -> bool {
    let Some(bucket) = DOTS_BUCKETS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: field addresses inside a map value that outlives the program
    // run; no reference is made.
    let (packets, octets) =
        unsafe { (&raw mut (*bucket).packets_tat, &raw mut (*bucket).bytes_tat) };
    if config.ns_per_packet != 0 && !conform(packets, config.ns_per_packet, now, config.burst_ns) {
        return true;
    }
    // At most 2^20 bytes x 8 x 10^12 ps per byte (1 bit/s): no overflow.
    let cost = bytes.min(1 << 20).wrapping_mul(config.ps_per_byte) / 1000;
    config.ps_per_byte != 0 && !conform(octets, cost, now, config.burst_ns)
}

/// `BPF_CMPXCHG`: stores `new` at `p` if it holds `old`; returns what it held.
/// (The BPF target has no compare-and-swap in `core::sync::atomic`.)
///
/// # Safety
/// `p` must point to a live, 8-byte aligned u64 in a map value.
#[inline(always)]
unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let prev: u64;
    // SAFETY: an atomic read-modify-write of the u64 the caller vouches for.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") old => prev,
            options(nostack),
        );
    }
    prev
}

/// Generic cell rate algorithm on one bucket shared by all CPUs: the
/// packet conforms when the bucket's theoretical arrival time, moved up to
/// `now` if behind, is at most `burst` ahead of it; it then moves by `cost`.
/// A compare-and-swap makes the move exact when CPUs race; after a few lost
/// races the packet passes (the limit errs on letting through).
#[inline(always)]
fn conform(tat: *mut u64, cost: u64, now: u64, burst: u64) -> bool {
    for _ in 0..4 {
        // SAFETY: `tat` is a bucket of a map value (see `over_limit`); an
        // aligned 8-byte load is atomic.
        let old = unsafe { core::ptr::read_volatile(tat) };
        let base = if old > now { old } else { now };
        if base - now > burst {
            return false;
        }
        // SAFETY: as above.
        if unsafe { cmpxchg(tat, old, base + cost) } == old {
            return true;
        }
    }
    true
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
