//! What both DOTS Call Home daemons share: `dots-agent` on the customer's
//! router and `dots-client` at the ISP.
//!
//! - [`transport`]: the Call Home (D)TLS layer. The agent dials (TLS/DTLS
//!   client role reversed per RFC 9066 §3.1) and the ISP side listens; both
//!   authenticate with certificates.
//! - [`local_socket`]: the JSON-lines Unix control sockets of both daemons.
//! - [`config`]: TOML loading with errors that name the file, key and value.
//! - [`logging`], [`cli_docs`]: log output, man pages and completions.
//! - [`cert_check`]: deep checks of the certificate files (expiry, key
//!   match, chain to the CA) for `check-config` and start-up.
//! - [`pki`]: certificate issuing for labs and tests (`dots-client pki`).
//! - [`shutdown`]: how both daemons learn to stop; [`exit`]: their exit
//!   statuses (78 for configuration errors).
//! - [`notify`]: the systemd notification protocol (READY, STATUS,
//!   WATCHDOG, RELOADING).
//! - `metrics`: the Prometheus registry and its HTTP endpoint (feature
//!   `metrics`).
//!
//! Nothing here needs the eBPF toolchain: the ISP side builds with stable
//! Rust alone.

pub mod cert_check;
pub mod cli_docs;
pub mod config;
pub mod exit;
pub mod local_socket;
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod shutdown;
pub mod transport;
