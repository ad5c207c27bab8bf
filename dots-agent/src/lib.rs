//! dots-agent: the router side of DOTS signal channel Call Home (RFC 9066).
//!
//! The agent dials its ISP's Call Home DOTS client, validates each mitigation
//! request against its local domain and policy, finds the devices behind NAT
//! that a request names, and drops their traffic in XDP.
//!
//! - [`agent`]: the runtime: one session per upstream peer, the signal
//!   server of `dots-proto` driven over the transport of `dots-daemon`, the
//!   control socket, metrics, persistence.
//! - [`config`]: `agent.toml` and the flags that override it.
//! - [`discovery`]: finding the Call Home DOTS client (RFC 8973).
//! - [`enforce`]: the XDP data plane (loads and drives `dots-ebpf`).
//! - [`nat`]: conntrack correlation behind NAT (RFC 9066 §5.3.2).
//! - [`netif`]: the router's own interface addresses, followed as they
//!   change (rtnetlink address events).
//! - [`paths`]: default paths, in one place.
//! - [`peer`]: a Call Home DOTS client to dial, however it was found.
//!
//! This is the only crate whose build needs the eBPF toolchain (its
//! `build.rs` compiles `dots-ebpf`).

pub mod agent;
pub mod config;
pub mod discovery;
pub mod enforce;
pub mod nat;
pub mod netif;
mod netlink;
pub mod paths;
pub mod peer;
