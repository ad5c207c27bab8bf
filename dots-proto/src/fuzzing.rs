//! The decode path a peer can reach, as one function: what the `cargo fuzz`
//! target feeds arbitrary bytes to, and what the seed-corpus test replays.
//!
//! It must never panic, whatever the bytes. It decodes them as a CoAP datagram
//! and as an RFC 8323 frame, parses the URI and the CBOR body into every typed
//! message, and feeds them to a server-role state machine on each transport.

use std::time::Instant;

use crate::{
    cbor,
    coap::{
        framing, DatagramConfig, DatagramEndpoint, DotsResource, Packet, StreamConfig,
        StreamEndpoint,
    },
    model::{DotsMessage, Heartbeat, MitigationScope, RedirectedSignal, SignalConfig},
    signal::{ServerConfig, SignalServer},
};

/// Runs every decoder a peer's bytes can reach. Returns how many of them
/// accepted the input (only useful to see that a corpus reaches deep).
pub fn decode_everything(now: Instant, data: &[u8]) -> usize {
    let mut accepted = 0;
    if let Ok(packet) = Packet::from_bytes(data) {
        accepted += 1 + decode_packet(&packet);
    }
    if let Ok(packet) = framing::decode(data, framing::DEFAULT_MAX_MESSAGE_SIZE) {
        accepted += 1 + decode_packet(&packet);
    }
    accepted += decode_body(data);
    let config = ServerConfig {
        domain: vec![
            "192.0.2.0/24".parse().expect("literal"),
            "2001:db8::/32".parse().expect("literal"),
        ],
        ..ServerConfig::default()
    };
    if let Ok(ep) = DatagramEndpoint::new(DatagramConfig::default(), 1) {
        if let Ok(mut server) = SignalServer::new(now, ep, config.clone()) {
            accepted += usize::from(server.handle_input(now, data).is_ok());
            while server.poll_transmit().is_some() || server.poll_action().is_some() {}
        }
    }
    if let Ok(ep) = StreamEndpoint::new(StreamConfig::default(), 1) {
        if let Ok(mut server) = SignalServer::new(now, ep, config) {
            // A peer's stream starts with its CSM; feed the input after ours.
            accepted += usize::from(server.handle_input(now, data).is_ok());
            while server.poll_transmit().is_some() || server.poll_action().is_some() {}
        }
    }
    accepted
}

fn decode_packet(packet: &Packet) -> usize {
    usize::from(DotsResource::from_request(packet).is_ok()) + decode_body(&packet.payload)
}

fn decode_body(body: &[u8]) -> usize {
    usize::from(cbor::cbor_to_json(body).is_ok())
        + usize::from(MitigationScope::decode(body).is_ok())
        + usize::from(SignalConfig::decode(body).is_ok())
        + usize::from(Heartbeat::decode(body).is_ok())
        + usize::from(RedirectedSignal::decode(body).is_ok())
}
