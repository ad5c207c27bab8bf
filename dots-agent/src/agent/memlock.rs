//! RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to the locked-memory
//! limit (later ones to the memory cgroup), and the default of 64 KiB or
//! 8 MiB is far below the classifier's maps. Raised to infinity, or as high
//! as the hard limit allows, when it is low; a no-op where it does not
//! matter.

use tracing::{debug, warn};

/// What the classifier's maps need at least, with room (a few hundred MiB
/// at the largest configured limits would be charged on old kernels).
const ENOUGH: u64 = 512 << 20;

pub(super) fn raise() {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) } != 0 {
        return;
    }
    if cur.rlim_cur == libc::RLIM_INFINITY || cur.rlim_cur >= ENOUGH {
        return;
    }
    for want in [libc::RLIM_INFINITY, cur.rlim_max] {
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(cur.rlim_max),
        };
        // SAFETY: setrlimit reads one rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } == 0 {
            debug!(
                from = cur.rlim_cur,
                to = if want == libc::RLIM_INFINITY {
                    "infinity".to_string()
                } else {
                    want.to_string()
                },
                "RLIMIT_MEMLOCK raised (BPF maps are charged to it before Linux 5.11)"
            );
            return;
        }
    }
    if kernel_charges_memlock() {
        warn!(limit = cur.rlim_cur, "RLIMIT_MEMLOCK is low and could not be raised: loading the BPF maps may fail (LimitMEMLOCK=infinity in the unit)");
    }
}

/// Whether the running kernel charges BPF maps to RLIMIT_MEMLOCK (< 5.11).
fn kernel_charges_memlock() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| release_before_5_11(&r))
        .unwrap_or(true)
}

fn release_before_5_11(release: &str) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) < (5, 11))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(release_before_5_11("5.10.0-28-amd64"), Some(true));
        assert_eq!(release_before_5_11("5.11.0"), Some(false));
        assert_eq!(release_before_5_11("6.18.1"), Some(false));
        assert_eq!(release_before_5_11("4.19.0-openwrt"), Some(true));
        assert_eq!(release_before_5_11("x"), None);
    }

    #[test]
    fn raising_leaves_the_limit_high() {
        raise();
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit we own.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) };
        assert_eq!(rc, 0);
        assert!(
            cur.rlim_cur == libc::RLIM_INFINITY
                || cur.rlim_cur >= ENOUGH
                || cur.rlim_cur == cur.rlim_max
        );
    }
}
