//! CoAP layer of the DOTS signal channel, without I/O.
//!
//! * [`DatagramEndpoint`]: RFC 7252 over UDP/DTLS (message ids, dedup, CON
//!   retransmission, RST, ping) with RFC 7641 Observe.
//! * [`StreamEndpoint`]: RFC 8323 over TCP/TLS (framing, CSM, Ping/Pong,
//!   Release/Abort) with the same request/response/observe API.
//! * [`framing`]: RFC 8323 frames and signalling messages.
//! * [`DotsResource`]: the `/.well-known/dots/...` Uri-Path.
//! * [`msg`]: building and inspecting messages (Content-Format 271, Observe,
//!   If-Match, diagnostic payloads).
//!
//! Time comes in as `Instant`s and randomness as a caller-provided seed, so
//! every behaviour is reproducible in tests.

mod error;
pub mod framing;
pub mod msg;
mod params;
mod uri;

pub use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
pub use error::{CoapError, ErrorResponse};
pub use msg::{Token, CONTENT_FORMAT_DOTS_CBOR};
pub use params::TransmissionParams;
pub use uri::{DotsResource, UriError, MAX_IDENTIFIER};

mod core;
mod datagram;
mod endpoint;
mod stream;

pub use self::core::{CloseReason, Event, ObserverRemoval, PingId, RequestId};
pub use datagram::{DatagramConfig, DatagramEndpoint};
pub use endpoint::{Delivery, Endpoint};
pub use stream::{StreamConfig, StreamEndpoint, DEFAULT_CSM_TIMEOUT};

#[cfg(test)]
mod tests;
