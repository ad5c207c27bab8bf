//! Enforcement: validated scopes -> classifier maps -> XDP drops.
//!
//! * [`spec`]: one slot as the data plane sees it, and its checks.
//! * [`plan`]: the exact map contents for a set of slots (pure).
//! * [`dataplane`]: loading, pinning and attaching the XDP program, and the
//!   idempotent apply step that makes the maps match a desired set of slots.
//! * [`counters`]: drop totals and rates.
//! * [`clock`]: the boot-time clock slot expiries are written in.
//! * [`sys`]: bpf(2) commands aya does not wrap (link detach, test run).

pub mod clock;
pub mod counters;
pub mod dataplane;
mod error;
mod maps;
pub mod plan;
mod prefix;
pub mod spec;
pub mod sys;

pub use counters::{RateMeter, Rates};
pub use dataplane::{ApplyReport, AttachMode, Attachment, Dataplane, DataplaneOptions, SlotChange};
pub use dots_common::SlotCounters;
pub use error::EnforceError;
pub use spec::{Range, Slot, SlotAction, SlotId, SlotLimits, SlotSpec};

/// Where maps and links are pinned unless configured otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/dots-agent";
