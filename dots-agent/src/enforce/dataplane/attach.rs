//! Attaching the classifier to interfaces: one pinned bpf_link per
//! interface, so drops go on after the process exits, and a detach that
//! takes effect at once.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::programs::{links::FdLink, Xdp, XdpMode};
use dots_common::names;

use super::{xdp_program, Dataplane};
use crate::enforce::{
    error::{attach_failure, io_error},
    sys::{self, if_index},
    EnforceError,
};

/// Pins of links are named `link_<iface>` in the bpffs directory.
const LINK_PREFIX: &str = "link_";

/// How to attach to an interface.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode if the driver refuses.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// One interface the classifier runs on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub iface: String,
    /// "native", "generic", or "pinned" for a link adopted from an earlier run.
    pub mode: &'static str,
    pub pin: PathBuf,
}

impl Dataplane {
    /// Attaches the classifier to `iface` and pins the link. A link pinned by
    /// an earlier run is adopted as it is.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attachment, EnforceError> {
        let pin = self.dir.join(format!("{LINK_PREFIX}{iface}"));
        if pin.exists() {
            return Ok(Attachment {
                iface: iface.to_string(),
                mode: "pinned",
                pin,
            });
        }
        if_index(iface)?;
        let modes: &[(XdpMode, &'static str)] = match mode {
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let program: &mut Xdp = xdp_program(&mut self.ebpf, names::PROGRAM)?;
        let mut last = None;
        for &(xdp_mode, mode_name) in modes {
            match program.attach(iface, xdp_mode) {
                Ok(id) => {
                    let attach_error = |source| EnforceError::Attach {
                        iface: iface.to_string(),
                        mode: mode_name,
                        source,
                    };
                    let link = program.take_link(id).map_err(attach_error)?;
                    let link = FdLink::try_from(link).map_err(|e| {
                        EnforceError::Load(format!("XDP link of {iface} is not a bpf_link: {e}"))
                    })?;
                    link.pin(&pin).map_err(|e| {
                        EnforceError::Load(format!("pinning {}: {e}", pin.display()))
                    })?;
                    return Ok(Attachment {
                        iface: iface.to_string(),
                        mode: mode_name,
                        pin,
                    });
                }
                Err(source) => last = Some((mode_name, source)),
            }
        }
        let (mode_name, source) = last.expect("at least one mode is tried");
        Err(attach_failure(iface, mode_name, source))
    }

    /// Detaches from `iface` (removing its pinned link). Not attached is fine.
    pub fn detach(&mut self, iface: &str) -> Result<bool, EnforceError> {
        detach_pin(&self.dir.join(format!("{LINK_PREFIX}{iface}")))
    }

    /// Interfaces with a pinned link under `dir`.
    pub fn attachments(dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix(LINK_PREFIX)
                    .map(String::from)
            })
            .collect();
        out.sort();
        out
    }

    /// Detaches every interface and unpins every map under `dir`: enforcement
    /// stops and the kernel frees the classifier. Returns the pins removed.
    pub fn teardown(dir: &Path) -> Result<usize, EnforceError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("reading", dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("reading", dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(LINK_PREFIX) {
                detach_pin(&path)?;
            } else {
                fs::remove_file(&path).map_err(|e| io_error("unpinning", &path, e))?;
            }
            removed += 1;
        }
        fs::remove_dir(dir).map_err(|e| io_error("removing", dir, e))?;
        Ok(removed)
    }
}

/// Detaches the link pinned at `pin` synchronously, then unpins it.
fn detach_pin(pin: &Path) -> Result<bool, EnforceError> {
    match sys::obj_get(pin) {
        Ok(fd) => sys::link_detach(fd.as_fd()).map_err(|e| io_error("detaching", pin, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("opening", pin, e)),
    }
    match fs::remove_file(pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("unpinning", pin, e)),
    }
}
