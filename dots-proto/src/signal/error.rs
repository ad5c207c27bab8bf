//! Errors of the signal layer.

use crate::coap::CoapError;

/// Errors returned to the owner of a signal state machine (never caused by
/// a peer's request alone: those are answered with CoAP errors instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error(transparent)]
    Coap(#[from] CoapError),
    /// A data-plane result named a mitigation that does not exist (any
    /// more): usually a late answer after withdrawal or expiry.
    #[error("no mitigation cuid={cuid} mid={mid}")]
    UnknownMitigation { cuid: String, mid: u32 },
    /// The configuration itself is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A persisted record could not be read back (see
    /// [`super::SignalServer::restore`]); nothing was restored.
    #[error("cannot restore mitigation cuid={cuid} mid={mid}: {reason}")]
    Restore {
        cuid: String,
        mid: u32,
        reason: String,
    },
    /// All 2^32 mitigation ids of this cuid are used up.
    #[error("mitigation ids exhausted")]
    MidsExhausted,
}
