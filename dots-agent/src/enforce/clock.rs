//! The clock slot expiries are written in: `CLOCK_BOOTTIME`, which the XDP
//! program reads with `bpf_ktime_get_boot_ns`. It counts time spent
//! suspended, so a lifetime ends after the same wall time either way.

use std::time::{Duration, Instant};

/// `CLOCK_BOOTTIME` now, in nanoseconds.
pub fn boot_ns() -> u64 {
    // SAFETY: timespec is plain data; all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid timespec to fill; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The `CLOCK_BOOTTIME` reading `after` from now.
pub fn boot_ns_after(after: Duration) -> u64 {
    boot_ns().saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
}

/// The `CLOCK_BOOTTIME` reading at `at`, an `Instant` (`CLOCK_MONOTONIC`):
/// the time left until then, added to the boot clock now. A past `at` gives
/// now.
pub fn boot_ns_at(at: Instant) -> u64 {
    boot_ns_after(at.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_with_monotonic_time() {
        let a = boot_ns();
        let later = boot_ns_at(Instant::now() + Duration::from_secs(10));
        assert!(later >= a + 9_999_000_000 && later < a + 11_000_000_000);
        assert!(boot_ns_at(Instant::now() - Duration::from_secs(1)) >= a);
        assert!(boot_ns() >= a);
    }
}
