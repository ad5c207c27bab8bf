//! dots-agent: a DOTS signal channel Call Home agent (RFC 9066) for Linux
//! routers, and the ISP-side `dots-client`.
//!
//! The protocol core lives in the sans-IO crate `dots-proto`; this crate holds
//! what touches the system: the XDP data plane ([`enforce`]) and, as they land,
//! transport, NAT correlation, discovery and the control socket.
pub mod agent;
pub mod client;
pub mod enforce;
pub mod logging;
pub mod packet;
pub mod pki;
pub mod transport;
