//! The contract between the XDP program (`dots-ebpf`) and user space.
//!
//! Every map's key and value is defined here once, as `#[repr(C)]` plain data,
//! together with the pinned map names and the capacity limits. The classifier
//! follows the bit-vector design (as in bpf-iptables): every field lookup returns
//! a [`SlotMask`] of mitigation slots, the masks are ANDed, and any bit left is a
//! drop charged to that slot.
#![no_std]

/// Number of concurrent mitigation slots. One bit per slot in a [`SlotMask`].
pub const MAX_SLOTS: usize = 256;
/// 64-bit words in a [`SlotMask`].
pub const MASK_WORDS: usize = MAX_SLOTS / 64;
/// Capacity of each source-prefix map (per address family: the hash of all
/// source prefixes, and the trie of the shorter ones).
pub const MAX_SOURCE_PREFIXES: u32 = 131_072;
/// Distinct source prefix lengths the program probes one by one in the
/// source hash ([`SourceLengths`]); with more, shorter prefixes take the trie.
pub const MAX_PROBED_LENGTHS: usize = 4;
/// Capacity of each target-prefix map (per address family).
pub const MAX_TARGET_PREFIXES: u32 = 16_384;
/// Capacity of the exempt (never-block) prefix map, per address family.
pub const MAX_EXEMPT_PREFIXES: u32 = 4_096;
/// `BPF_F_MMAPABLE`: the value arrays (protocol, ports, ICMP types) are
/// written by user space through a shared mapping, not one syscall per
/// value.
pub const MMAPABLE: u32 = 1024;

/// Pinned map and program names. The pin path is `<bpffs dir>/<name>`.
pub mod names {
    pub const PROGRAM: &str = "dots_xdp";
    pub const PASS_PROGRAM: &str = "dots_xdp_pass";
    pub const POLICY: &str = "DOTS_POLICY";
    pub const SRC4: &str = "DOTS_SRC4";
    pub const SRC6: &str = "DOTS_SRC6";
    pub const SRC4_LPM: &str = "DOTS_SRC4_LPM";
    pub const SRC6_LPM: &str = "DOTS_SRC6_LPM";
    pub const DST4_LPM: &str = "DOTS_DST4_LPM";
    pub const DST6_LPM: &str = "DOTS_DST6_LPM";
    pub const PROTO: &str = "DOTS_PROTO";
    pub const SPORT: &str = "DOTS_SPORT";
    pub const DPORT: &str = "DOTS_DPORT";
    pub const ICMP_TYPE: &str = "DOTS_ICMP_TYPE";
    pub const EXEMPT4: &str = "DOTS_EXEMPT4";
    pub const EXEMPT6: &str = "DOTS_EXEMPT6";
    pub const SLOTS: &str = "DOTS_SLOTS";
    pub const BUCKETS: &str = "DOTS_BUCKETS";
    pub const COUNTERS: &str = "DOTS_COUNTERS";
    pub const STATS: &str = "DOTS_STATS";
    /// All maps, in the order user space opens them.
    pub const ALL_MAPS: [&str; 17] = [
        POLICY, SRC4, SRC6, SRC4_LPM, SRC6_LPM, DST4_LPM, DST6_LPM, PROTO, SPORT, DPORT, ICMP_TYPE,
        EXEMPT4, EXEMPT6, SLOTS, BUCKETS, COUNTERS, STATS,
    ];
}

/// A set of mitigation slots, one bit each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotMask {
    pub bits: [u64; MASK_WORDS],
}

impl SlotMask {
    pub const EMPTY: SlotMask = SlotMask {
        bits: [0; MASK_WORDS],
    };

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        (self.bits[0] | self.bits[1] | self.bits[2] | self.bits[3]) == 0
    }

    #[inline(always)]
    pub fn and(&self, other: &SlotMask) -> SlotMask {
        SlotMask {
            bits: [
                self.bits[0] & other.bits[0],
                self.bits[1] & other.bits[1],
                self.bits[2] & other.bits[2],
                self.bits[3] & other.bits[3],
            ],
        }
    }

    #[inline(always)]
    pub fn or(&self, other: &SlotMask) -> SlotMask {
        SlotMask {
            bits: [
                self.bits[0] | other.bits[0],
                self.bits[1] | other.bits[1],
                self.bits[2] | other.bits[2],
                self.bits[3] | other.bits[3],
            ],
        }
    }

    /// True when every slot of `self` is also in `other`.
    #[inline(always)]
    pub fn is_subset_of(&self, other: &SlotMask) -> bool {
        (self.bits[0] & !other.bits[0])
            | (self.bits[1] & !other.bits[1])
            | (self.bits[2] & !other.bits[2])
            | (self.bits[3] & !other.bits[3])
            == 0
    }

    /// Set `slot`'s bit. Slots at or past [`MAX_SLOTS`] are ignored.
    #[inline(always)]
    pub fn set(&mut self, slot: usize) {
        if slot < MAX_SLOTS {
            self.bits[slot / 64] |= 1u64 << (slot % 64);
        }
    }

    #[inline(always)]
    pub fn clear(&mut self, slot: usize) {
        if slot < MAX_SLOTS {
            self.bits[slot / 64] &= !(1u64 << (slot % 64));
        }
    }

    #[inline(always)]
    pub fn contains(&self, slot: usize) -> bool {
        slot < MAX_SLOTS && self.bits[slot / 64] & (1u64 << (slot % 64)) != 0
    }

    /// A mask with only `slot` set.
    pub fn single(slot: usize) -> SlotMask {
        let mut m = SlotMask::EMPTY;
        m.set(slot);
        m
    }
}

/// The single element of the `DOTS_POLICY` array: which slots are live, and the
/// slots that do not constrain a field (they match every value of it).
///
/// A slot becomes visible to packets only when its bit is set in `active`,
/// which user space does last, after every other map holds the slot's entries:
/// that is what makes installing a slot atomic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Slots currently enforced.
    pub active: SlotMask,
    /// Slots without target-protocol constraint.
    pub any_proto: SlotMask,
    /// Slots with neither source-port nor ICMP-type constraint.
    pub any_l4: SlotMask,
    /// Slots without target-port constraint.
    pub any_dport: SlotMask,
    /// `flags::*`: which optional lookups have anything to find, so the
    /// program skips lookups that cannot change the verdict.
    pub flags: u64,
    /// How to find the source entry of an IPv4 packet.
    pub src4: SourceLengths,
    /// How to find the source entry of an IPv6 packet.
    pub src6: SourceLengths,
}

/// The source prefix lengths present in one family, longest first: the
/// program probes the source hash once per length (address masked to it)
/// and stops at the first hit, which holds the slots of every covering
/// prefix too. When more than [`MAX_PROBED_LENGTHS`] lengths are present,
/// `trie` is set: `lengths` then holds at most the host length (probed in
/// the hash), and the shorter prefixes take one lookup in the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceLengths {
    pub lengths: [u8; MAX_PROBED_LENGTHS],
    /// Entries of `lengths` in use.
    pub count: u8,
    /// 1: look the shorter prefixes up in the trie.
    pub trie: u8,
    pub pad: [u8; 2],
}

/// Bits of [`Policy::flags`].
pub mod flags {
    /// `DOTS_EXEMPT4` holds a prefix that a slot's sources or targets
    /// overlap: only then can an exempt prefix spare a matching packet, so
    /// only then does the program look.
    pub const EXEMPT4: u64 = 1 << 2;
    pub const EXEMPT6: u64 = 1 << 3;
    /// The bits owned by the exempt list (the rest follow the slots).
    pub const EXEMPT: u64 = EXEMPT4 | EXEMPT6;
}

/// Hash key of an IPv4 source prefix: the address masked to `prefix_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Source4Key {
    pub addr: [u8; 4],
    pub prefix_len: u32,
}

/// Hash key of an IPv6 source prefix: the address masked to `prefix_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Source6Key {
    pub addr: [u8; 16],
    pub prefix_len: u32,
}

/// Value of a source prefix (hash and trie): the slots it matches, folded
/// with those of every covering prefix, and, when all those slots name the
/// same single target prefix of the family, that prefix, so the program
/// checks the target with a mask instead of a lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceEntry {
    pub slots: SlotMask,
    /// `entry::TARGET_HINT`.
    pub flags: u64,
    /// The target prefix and its netmask, as address words ([`addr_words`]).
    pub target: [u64; 2],
    pub target_mask: [u64; 2],
}

/// Bits of [`SourceEntry::flags`].
pub mod entry {
    /// `target` / `target_mask` decide the target match for every slot of
    /// the entry: no target lookup.
    pub const TARGET_HINT: u64 = 1;
}

/// An address as the two words the program compares ([`SourceEntry`]):
/// the bytes in network order, IPv4 in the first four bytes, zero-padded.
#[inline(always)]
pub fn addr_words(addr: &[u8]) -> [u64; 2] {
    let mut b = [0u8; 16];
    let n = if addr.len() < 16 { addr.len() } else { 16 };
    let mut i = 0;
    while i < n {
        b[i] = addr[i];
        i += 1;
    }
    [
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    ]
}

// Trie keys are padded to a multiple of 8 bytes: the kernel stores the value
// right after the key data in a trie node, and `SlotMask` needs 8-byte
// alignment. Prefix lengths never reach into the padding, which stays zero.

/// LPM trie (and hash) key for IPv4 addresses (`prefix_len` counts bits of `addr`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv4Key {
    pub addr: [u8; 4],
    pub pad: [u8; 4],
}

impl Ipv4Key {
    #[inline(always)]
    pub fn new(addr: [u8; 4]) -> Self {
        Ipv4Key { addr, pad: [0; 4] }
    }
}

/// LPM trie key data for IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv6Key {
    pub addr: [u8; 16],
}

/// One element of the `DOTS_SLOTS` array (index = slot): what a slot does
/// with the packets it matches, and until when. Written by user space only;
/// the program reads it on the hit path.
///
/// The expiry is what makes a block end even when the agent is gone: the
/// program itself ignores a slot from `expires_ns` on, whoever is (or is
/// not) left to clean up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// `CLOCK_BOOTTIME` in nanoseconds (the program's
    /// `bpf_ktime_get_boot_ns`) from which the slot matches nothing (up to
    /// [`CLOCK_SLACK_NS`] earlier). 0, as in a slot never configured:
    /// already expired.
    pub expires_ns: u64,
    /// `action::*`.
    pub action: u64,
    /// `action::RATE_LIMIT`: nanoseconds of budget one packet costs
    /// (10^9 / packets per second); 0: no packet-rate limit.
    pub ns_per_packet: u64,
    /// `action::RATE_LIMIT`: picoseconds of budget one byte costs
    /// (8 x 10^12 / bits per second); 0: no bit-rate limit.
    pub ps_per_byte: u64,
    /// `action::RATE_LIMIT`: how far a bucket may run ahead of the clock,
    /// in nanoseconds: the burst allowed above the rate.
    pub burst_ns: u64,
}

/// How much earlier than `expires_ns` a slot may end: the program reads the
/// boot clock at most once per scheduler tick per CPU and counts a reading
/// this much ahead, so that a slot ends early rather than late. Longer than
/// a tick at any HZ (100 or more).
pub const CLOCK_SLACK_NS: u64 = 10_000_000;

/// Values of [`SlotConfig::action`].
pub mod action {
    /// Drop every matching packet.
    pub const DROP: u64 = 0;
    /// Drop nothing; count what would have been dropped (monitor mode).
    pub const MONITOR: u64 = 1;
    /// Drop what exceeds the slot's rate limit, pass the rest.
    pub const RATE_LIMIT: u64 = 2;
}

/// One element of the `DOTS_BUCKETS` array (index = slot): the rate limit's
/// state, shared by all CPUs and written by the program only, with atomic
/// compare-and-swap. Generic cell rate algorithm: each bucket is the
/// "theoretical arrival time" in `CLOCK_BOOTTIME` nanoseconds; a packet
/// conforms when moving it forward by the packet's cost keeps it within
/// `burst_ns` of the clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub packets_tat: u64,
    pub bytes_tat: u64,
}

/// Per-slot, per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// Packets and bytes dropped.
    pub packets: u64,
    pub bytes: u64,
    /// Packets and bytes that matched the slot but passed: what a monitor
    /// slot would have dropped, or what stayed within a rate limit.
    pub passed_packets: u64,
    pub passed_bytes: u64,
}

/// Indices of the per-CPU `DOTS_STATS` array: how the program classified
/// packets, each packet counted once. Packets that match no slot are not
/// counted (interface counters have them), so the common path pays for no
/// counter.
pub mod stats {
    /// Packets passed because they could not be parsed (unknown ethertype, truncated...).
    pub const UNPARSED: u32 = 0;
    /// Packets that matched a slot but were spared because of an exempt prefix.
    pub const EXEMPT: u32 = 1;
    /// Packets dropped.
    pub const DROPPED: u32 = 2;
    /// Packets passed that a monitor slot would have dropped.
    pub const MONITORED: u32 = 3;
    /// Packets passed by a rate-limited slot (within its limit).
    pub const CONFORMING: u32 = 4;
    pub const COUNT: u32 = 5;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for each impl below): the type is #[repr(C)] plain data with
    // no padding and no pointers, so any bytes the kernel holds are a value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SlotMask {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Policy {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Ipv4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Ipv6Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SlotCounters {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SlotConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Source4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Source6Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SourceEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Bucket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits() {
        let mut m = SlotMask::EMPTY;
        assert!(m.is_empty());
        m.set(0);
        m.set(255);
        m.set(256); // out of range: ignored
        assert!(m.contains(0) && m.contains(255) && !m.contains(1) && !m.contains(256));
        assert_eq!(m.and(&SlotMask::single(255)), SlotMask::single(255));
        m.clear(0);
        assert_eq!(m, SlotMask::single(255));
        assert!(m.is_subset_of(&m) && SlotMask::EMPTY.is_subset_of(&m));
        assert!(!SlotMask::single(1).is_subset_of(&m));
        assert_eq!(
            SlotMask::single(3).or(&SlotMask::single(70)).bits,
            [8, 64, 0, 0]
        );
    }

    #[test]
    fn address_words_keep_network_order() {
        let w = addr_words(&[192, 0, 2, 1]);
        assert_eq!(w[0].to_ne_bytes(), [192, 0, 2, 1, 0, 0, 0, 0]);
        assert_eq!(w[1], 0);
        let v6: [u8; 16] = core::array::from_fn(|i| i as u8);
        let w = addr_words(&v6);
        assert_eq!(w[1].to_ne_bytes(), [8, 9, 10, 11, 12, 13, 14, 15]);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<SlotMask>(), 32);
        assert_eq!(core::mem::size_of::<Policy>(), 152);
        assert_eq!(core::mem::size_of::<SourceLengths>(), 8);
        assert_eq!(core::mem::size_of::<Source4Key>(), 8);
        assert_eq!(core::mem::size_of::<Source6Key>(), 20);
        assert_eq!(core::mem::size_of::<SourceEntry>(), 72);
        assert_eq!(core::mem::size_of::<SlotCounters>(), 32);
        assert_eq!(core::mem::size_of::<SlotConfig>(), 40);
        assert_eq!(core::mem::size_of::<Bucket>(), 16);
        assert_eq!(core::mem::size_of::<Ipv4Key>(), 8);
    }
}
