//! dots-agent: a DOTS signal channel Call Home agent (RFC 9066) for Linux
//! routers, and the ISP-side `dots-client`.
//!
//! The protocol core lives in the sans-IO crate `dots-proto`; this crate holds
//! what touches the system: the XDP data plane ([`enforce`]) and, as they land,
//! transport, NAT correlation, discovery and the control socket.
pub mod agent;
pub mod cli_docs;
pub mod client;
pub mod config;
pub mod discovery;
pub mod enforce;
pub mod local_socket;
pub mod logging;
pub mod nat;
pub mod packet;
pub mod pki;
pub mod transport;

/// Resolves on Ctrl-C or SIGTERM: how both daemons learn to stop.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
