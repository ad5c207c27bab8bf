//! XDP classifier of dots-agent.
//!
//! Each field of a packet (source address, target address, protocol, source
//! port or ICMP type, target port) is looked up once and yields a bitmap of the
//! mitigation slots it matches; the bitmaps are ANDed with the set of active
//! slots. Any bit left means "drop", charged to every matching slot. The cost
//! per packet is a fixed number of lookups, whatever the number of slots,
//! prefixes or ranges. Layouts and names: `dots-common`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Packet fields are read with BPF load instructions of their own width
// (parse.rs); the eBPF crate builds with the pinned nightly only.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod program;

/// Host builds (`cargo check --workspace`) only need this to exist.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
