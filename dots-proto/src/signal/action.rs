//! What the server role asks its I/O shell to do, and the data-plane
//! results the shell hands back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Exemption, RedirectedSignal, ValidatedRequest};

/// Identifies one mitigation: the client's cuid and its mitigation id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MitigationKey {
    pub cuid: String,
    pub mid: u32,
}

impl MitigationKey {
    pub fn new(cuid: impl Into<String>, mid: u32) -> Self {
        Self {
            cuid: cuid.into(),
            mid,
        }
    }
}

/// Drop counters of one mitigation as measured by the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub pkts: u64,
    pub bytes: u64,
    /// Current rates, computed by the data plane.
    pub pps: u64,
    pub bps: u64,
}

/// Why a session ended, as [`Action::SessionLost`] tells the shell's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// No traffic from the peer for the whole missing-hb-allowed span
    /// (RFC 9066 §5.2.1).
    Silence { after: Duration },
    /// The peer sent 7.04 Release.
    Released { diagnostic: String },
    /// The peer sent 7.05 Abort.
    PeerAborted { diagnostic: String },
    /// We sent 7.05 Abort: the peer broke the protocol (RFC 8323 §5.6).
    Aborted { diagnostic: String },
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Silence { after } => {
                write!(f, "no traffic from the peer for {} s", after.as_secs())
            }
            SessionEnd::Released { diagnostic } => {
                write!(f, "the peer released the connection: \"{diagnostic}\"")
            }
            SessionEnd::PeerAborted { diagnostic } => {
                write!(f, "the peer aborted the connection: \"{diagnostic}\"")
            }
            SessionEnd::Aborted { diagnostic } => {
                write!(
                    f,
                    "aborted the connection, the peer broke the protocol: {diagnostic}"
                )
            }
        }
    }
}

/// A side effect the server role wants performed. The shell reports the
/// outcome through [`super::SignalServer::installed`],
/// [`super::SignalServer::install_failed`], [`super::SignalServer::counters`],
/// [`super::SignalServer::removed`] and [`super::SignalServer::consent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Enforce `request` (creating or replacing the entry under `key`).
    Install {
        key: MitigationKey,
        request: ValidatedRequest,
    },
    /// Stop enforcing `key`. The shell then reports the final counters
    /// through [`super::SignalServer::removed`]: a DELETE is answered with
    /// them (see the `server` module documentation).
    Remove { key: MitigationKey },
    /// Report the counters of these enforced mitigations.
    QueryCounters { keys: Vec<MitigationKey> },
    /// Ask the operator whether `request` may be enforced (RFC 9066 §5.3.1).
    /// `reason` names the local policy bound it goes past when that is why
    /// it waits (`over-limit = consent`).
    AskConsent {
        key: MitigationKey,
        request: ValidatedRequest,
        reason: Option<String>,
    },
    /// Part of `key`'s traffic is exempt from enforcement and will not be
    /// dropped (the peer hears it as conflict-cause 4): for the log.
    PartlyExempt {
        key: MitigationKey,
        exempt: Exemption,
    },
    /// The consent timeout ([`super::ServerConfig::consent_timeout`])
    /// decided a pending request: an approval is followed by
    /// [`Action::Install`], a rejection ended it (conflict-cause 4).
    ConsentTimedOut { key: MitigationKey, approved: bool },
    /// A peer request was refused with an error answer (validation,
    /// domain, limits, Content-Format, unknown mitigation, ...), or a
    /// restored record no longer passes validation: for the log.
    /// `cuid`/`mid` are those of the Uri-Path when it named them; `code`
    /// is the CoAP code as text ("4.00") and `diagnostic` the text sent.
    Rejected {
        cuid: Option<String>,
        mid: Option<u32>,
        code: String,
        diagnostic: String,
    },
    /// Monitor mode: the request was accepted and must only be logged.
    Monitored {
        key: MitigationKey,
        request: ValidatedRequest,
    },
    /// Dial `target` instead of the current peer (RFC 9066 §5.2.2); a
    /// [`Action::Close`] follows.
    Redirect { target: RedirectedSignal },
    /// The session is over, for `reason`: dial again and hand the new
    /// connection to [`super::SignalServer::reconnect`].
    SessionLost { reason: SessionEnd },
    /// Close the current connection (for streams, after sending a Release).
    Close,
}
