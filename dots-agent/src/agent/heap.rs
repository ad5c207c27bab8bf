//! The allocator's share of a router's memory (glibc only; elsewhere these
//! do nothing).
//!
//! * Large blocks (the data plane's port tables, 2 MiB each, copied on a
//!   full resynchronisation; the kernel's BTF read at load) come straight
//!   from mmap and go back to the kernel when freed. By default glibc
//!   raises this threshold to the size of the last large block freed and
//!   keeps every later one on its heap: measured, 12 MiB more resident
//!   after the first mitigations, never returned.
//! * Freed small blocks stay on the heap; glibc gives back only the heap's
//!   top. The data plane's load, the NAT mirror's first dump or a burst of
//!   requests leaves free pages between live blocks: measured on the idle
//!   agent after its start, 1.7 MiB of its 3.6 MiB anonymous memory.
//!   [`return_freed`] hands such pages back, when there are enough of them
//!   to matter.

use std::time::Duration;

/// How often the free space on the heap is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Free space on the heap, grown by this much since the last trim, is given
/// back.
const WORTH_TRIMMING: usize = 256 << 10;

/// Sends large allocations to mmap, always (see the module's docs). Call
/// before the first large allocation.
pub fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter, under malloc's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Every [`LOOK_EVERY`], gives the heap's free pages back to the kernel when
/// the free space grew by [`WORTH_TRIMMING`] since the last time. Runs until
/// the runtime stops.
pub(super) async fn return_freed() {
    // The first look trims what the start left (the data plane's load).
    let mut after_last = 0;
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let free = free_bytes();
        if free >= after_last + WORTH_TRIMMING {
            trim();
            after_last = free_bytes();
            tracing::trace!(free_before = free, free_after = after_last, "heap trimmed");
        } else {
            // Allocations took some of it back: compare with what is left.
            after_last = after_last.min(free);
        }
    }
}

/// Bytes free on the heaps (every arena), held by the process.
fn free_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads malloc's statistics, under its locks.
        unsafe { libc::mallinfo2() }.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Gives the whole free pages of every arena back to the kernel.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim works under malloc's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_blocks_are_counted_and_trimmed() {
        // Many small blocks (below the mmap threshold), every other one
        // freed: free space the heap's top cannot give back.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 1000]).collect();
        let before = free_bytes();
        for b in blocks.iter_mut().step_by(2) {
            *b = Vec::new();
        }
        let freed = free_bytes();
        assert!(freed >= before + 1_000_000, "free {before} -> {freed}");
        trim();
        // Trimming returns pages but keeps the chunks free on the heap.
        assert!(free_bytes() >= before);
        drop(blocks);
    }
}
