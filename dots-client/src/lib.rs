//! dots-client: the Call Home DOTS client (RFC 9066), the ISP-side peer
//! that agents on customer routers dial, run as a service.
//!
//! - [`listener`]: accepts agents over DTLS and TLS, one signal session per
//!   agent; serves the control socket; reloads on SIGHUP.
//! - [`service`]: what every door (API, control socket) calls: agent
//!   choice, source checks, mids, the book of mitigations, queueing for
//!   offline agents, the audit trail.
//! - [`registry`]: customer prefixes per agent identity.
//! - [`book`], [`mids`], [`audit`], [`store`]: the state kept on disk.
//! - [`cluster`]: several nodes sharing that state through etcd, agents
//!   owned by lease (behind [`service::SharedState`]).
//! - [`api`]: the HTTPS JSON API (axum over hyper and OpenSSL).
//! - [`metrics`]: Prometheus metrics.
//! - [`control`]: the control socket's requests and replies, shared by the
//!   listener and the CLI commands.
//! - [`config`]: `client.toml` and the flags that override it.
//! - [`request`]: the mitigation and redirect bodies the CLI commands send.
//! - [`wire`]: DOTS messages between JSON and CBOR (`dots-client cbor`).

pub mod api;
pub mod audit;
pub mod book;
pub mod cluster;
pub mod config;
pub mod control;
pub mod listener;
pub mod metrics;
pub mod mids;
pub mod registry;
pub mod request;
pub mod service;
mod session;
pub mod store;
pub mod wire;
