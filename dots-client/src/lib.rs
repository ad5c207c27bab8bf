//! dots-client: the Call Home DOTS client (RFC 9066), the ISP-side peer
//! that agents on customer routers dial.
//!
//! - [`listener`]: accepts agents over DTLS and TLS and keeps one signal
//!   session per agent; serves the control socket.
//! - [`control`]: the control socket's requests and replies, shared by the
//!   listener and the CLI commands.
//! - [`config`]: `client.toml` and the flags that override it.
//! - [`request`]: the mitigation and redirect bodies the CLI commands send.
//! - [`wire`]: DOTS messages between JSON and CBOR (`dots-client cbor`).

pub mod config;
pub mod control;
pub mod listener;
pub mod request;
mod session;
pub mod wire;
