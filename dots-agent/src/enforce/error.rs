use std::{io, path::PathBuf};

use thiserror::Error;

use super::SlotId;

/// Why enforcement could not be set up or changed. Each variant names the
/// cause an operator can act on.
#[derive(Debug, Error)]
pub enum EnforceError {
    #[error("permission denied while {action}: run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    NotPermitted { action: String },
    #[error(
        "{path} is not on a BPF filesystem (bpffs): mount it with `mount -t bpf bpf /sys/fs/bpf`"
    )]
    BpffsNotMounted { path: PathBuf },
    #[error("no such network interface: {name}")]
    NoSuchInterface { name: String },
    #[error("slot {slot} rejected: {reason}")]
    InvalidSlot { slot: SlotId, reason: String },
    #[error("map {map} is full: {needed} entries needed, capacity {capacity}")]
    MapFull {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("could not attach XDP to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("loading the XDP program failed: {0}")]
    Load(String),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl EnforceError {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforceError {
        move |source| {
            if is_eperm_map(&source) {
                EnforceError::NotPermitted {
                    action: format!("using map {map}"),
                }
            } else {
                EnforceError::Map { map, source }
            }
        }
    }
}

fn is_eperm_map(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::SyscallError(s) => {
            matches!(
                s.io_error.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EACCES)
            )
        }
        _ => false,
    }
}
