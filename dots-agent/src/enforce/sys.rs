//! The system calls aya 0.14 does not wrap: a few bpf(2) commands, the
//! interface index and the bpffs check.

use super::EnforceError;
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`, and
    // any pointers in it reference live memory for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens a pinned BPF object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a bpf_link at once. Unpinning alone releases the link later, from
/// a work queue, which leaves a short window of enforcement after "detach".
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The XDP action returned (1 = XDP_DROP, 2 = XDP_PASS).
    pub action: u32,
    /// Mean time per run, in nanoseconds, as measured by the kernel.
    pub duration_ns: u32,
}

/// Runs an XDP program on `packet` `repeat` times in the kernel, without an
/// interface: the data-plane benchmark's measurement.
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> io::Result<TestRun> {
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: u32,
    }
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRun {
        action: attr.retval,
        duration_ns: attr.duration,
    })
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;

/// Turns on the kernel's run-time statistics of BPF programs (`run_time_ns`,
/// `run_cnt`) for as long as the returned fd is open: like
/// `kernel.bpf_stats_enabled = 1`, but undone when the holder exits.
pub fn enable_stats() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct EnableStats {
        stats_type: u32,
    }
    // BPF_STATS_RUN_TIME.
    let mut attr = EnableStats { stats_type: 0 };
    let fd = bpf(BPF_ENABLE_STATS, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's id of the BPF program `prog`.
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    /// The first fields of `struct bpf_prog_info`: the kernel fills no more
    /// than `info_len` bytes.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfo {
        prog_type: u32,
        id: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = ProgInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.id)
}

/// Key size, value size and entries of the map pinned at `pin`.
pub fn pinned_map_layout(pin: &Path) -> io::Result<(u32, u32, u32)> {
    /// The first fields of `struct bpf_map_info`.
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = obj_get(pin)?;
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.key_size, info.value_size, info.max_entries))
}

/// statfs(2) f_type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub(crate) fn if_index(iface: &str) -> Result<u32, EnforceError> {
    let no_such = || EnforceError::NoSuchInterface {
        name: iface.to_string(),
    };
    let c = CString::new(iface).map_err(|_| no_such())?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(no_such()),
        i => Ok(i),
    }
}

/// bpffs must hold `dir` or, when it does not exist yet, its nearest ancestor.
pub(crate) fn check_bpffs(dir: &Path) -> Result<(), EnforceError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = CString::new(existing.as_os_str().as_encoded_bytes()).map_err(|_| {
        EnforceError::BpffsNotMounted {
            path: dir.to_path_buf(),
        }
    })?;
    // SAFETY: statfs fills the zeroed struct; `c` outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(super::error::io_error(
            "inspecting",
            existing,
            std::io::Error::last_os_error(),
        ));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(EnforceError::BpffsNotMounted {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}
