//! Why enforcement failed, and the mapping from aya and system errors to
//! causes an operator can act on (permissions, missing interface, verifier
//! rejection).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::ProgramError;
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

pub(crate) fn io_error(action: &'static str, path: &Path, source: io::Error) -> EnforceError {
    if matches!(
        source.raw_os_error(),
        Some(libc::EPERM) | Some(libc::EACCES)
    ) {
        return EnforceError::NotPermitted {
            action: format!("{action} {}", path.display()),
        };
    }
    EnforceError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // EPERM only: the verifier answers EACCES for programs it rejects.
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

pub(crate) fn load_error(e: aya::EbpfError) -> EnforceError {
    if is_eperm(&e) {
        return EnforceError::NotPermitted {
            action: "loading the XDP object".into(),
        };
    }
    EnforceError::Load(format!("{e}: {}", chain(&e)))
}

pub(crate) fn load_error_program(e: ProgramError, name: &str) -> EnforceError {
    if is_eperm(&e) {
        return EnforceError::NotPermitted {
            action: format!("loading program {name}"),
        };
    }
    let verifier_log = match &e {
        ProgramError::LoadError { verifier_log, .. } => format!("\nverifier log:\n{verifier_log}"),
        _ => String::new(),
    };
    EnforceError::Load(format!("program {name}: {}{verifier_log}", chain(&e)))
}

pub(crate) fn attach_failure(
    iface: &str,
    mode: &'static str,
    source: ProgramError,
) -> EnforceError {
    if matches!(source, ProgramError::UnknownInterface { .. }) {
        return EnforceError::NoSuchInterface {
            name: iface.to_string(),
        };
    }
    if is_eperm(&source) {
        return EnforceError::NotPermitted {
            action: format!("attaching XDP to {iface}"),
        };
    }
    EnforceError::Attach {
        iface: iface.to_string(),
        mode,
        source,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(err) = cur {
        parts.push(err.to_string());
        cur = err.source();
    }
    parts.join(": ")
}
