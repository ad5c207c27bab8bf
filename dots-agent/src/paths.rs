//! Where the agent keeps things by default. One place, so the CLI, the
//! configuration and the systemd unit agree.

/// State that outlives the process: active mitigations, slot table,
/// discovery results.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/dots-agent";
/// The control socket of `dots-agent run`, used by `status`, `mitigations`,
/// `approve` and `reject`. Inside `/run/dots-agent/`, the unit's
/// `RuntimeDirectory=`, the one place under /run the hardened service may
/// write.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dots-agent/control.sock";
