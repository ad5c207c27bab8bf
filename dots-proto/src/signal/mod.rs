//! DOTS signal channel state machines, one per role (RFC 9132 with the
//! Call Home rules of RFC 9066), sans-IO like the layers below.
//!
//! * [`SignalServer`]: the agent, Call Home DOTS server and CoAP server.
//!   It answers the peer, keeps mitigations per (cuid, mid), and emits
//!   [`Action`]s (install, remove, query counters, ask consent, redirect,
//!   session lost, rejected requests) whose results come back through its
//!   methods. Its mitigations persist as [`MitigationRecord`]s.
//! * [`SignalClient`]: `dots-client`, Call Home DOTS client and CoAP
//!   client: requests, mids, answers and notifications as [`ClientEvent`]s.
//!
//! Both are generic over [`crate::coap::Endpoint`], so they run over the
//! datagram (DTLS) and the stream (TLS) endpoint alike. Time is always an
//! argument and randomness lives in the endpoint's seed.

mod action;
mod client;
mod error;
mod heartbeat;
mod mitigation;
mod server;
mod session;
mod shared;

#[cfg(test)]
mod tests;

pub use action::{Action, Counters, MitigationKey, SessionEnd};
pub use client::{Body, ClientConfig, ClientEvent, RequestKind, SignalClient};
pub use error::SignalError;
pub use mitigation::{overlaps, Mitigation, Mitigations, Phase};
pub use server::{
    ConsentMode, EnforcementMode, MitigationRecord, PendingConsent, ServerConfig, SignalServer,
};
pub use session::{ParamRange, PutOutcome, SessionConfig, SessionParams, SessionPolicy};
pub use shared::{ExemptSet, MitigationBudget};
