//! The DOTS signal channel protocol core, without I/O.
//!
//! Nothing here opens a socket, spawns a task or reads a clock: callers pass
//! bytes in together with the current time and get bytes, actions and the next
//! deadline out. That keeps every protocol rule testable in microseconds.
//!
//! * [`cbor`]: YANG names <-> CBOR keys, the comprehension rules, JSON <-> CBOR.
//! * [`model`]: typed DOTS messages and their validation (RFC 9132, RFC 9066).
//! * [`coap`]: CoAP message layer (RFC 7252, RFC 7641, RFC 8323 framing).
//! * [`signal`]: the signal channel state machines of both roles.
//! * [`fuzzing`]: the whole decode path in one call, for `cargo fuzz`.

// This crate parses whatever a peer sends; none of it needs `unsafe`.
#![forbid(unsafe_code)]

pub mod cbor;
pub mod coap;
pub mod fuzzing;
pub mod model;
pub mod signal;
