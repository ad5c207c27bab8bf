//! Endpoint tests: two endpoints wired through in-memory queues, a fake
//! clock (`Instant` offsets) and fixed seeds.

use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageType, Packet, RequestType, ResponseType};

use super::*;

fn get(path: &str) -> Packet {
    msg::request(RequestType::Get, &[path.to_string()])
}

fn observe_get(path: &str) -> Packet {
    let mut p = get(path);
    msg::set_observe(&mut p, 0);
    p
}

fn content(body: &[u8]) -> Packet {
    msg::cbor_response(ResponseType::Content, body.to_vec())
}

fn drain(ep: &mut impl Endpoint) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| ep.poll_transmit()).collect()
}

/// Delivers everything `from` has queued to `to`; returns `to`'s events.
fn deliver(now: Instant, from: &mut impl Endpoint, to: &mut impl Endpoint) -> Vec<Event> {
    drain(from)
        .iter()
        .flat_map(|b| to.handle_input(now, b).unwrap_or_default())
        .collect()
}

fn only_request(events: Vec<Event>) -> (RequestId, Packet) {
    match events.as_slice() {
        [Event::Request { id, request }] => (*id, request.clone()),
        other => panic!("expected one request, got {other:?}"),
    }
}

fn dgram(seed: u64) -> DatagramEndpoint {
    DatagramEndpoint::new(DatagramConfig::default(), seed).unwrap()
}

mod datagram {
    use super::*;

    #[test]
    fn piggybacked_response_matched_by_token() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = a
            .send_request(now, get("config"), Delivery::Confirmable)
            .unwrap();
        assert!(a.poll_timeout().is_some(), "retransmission armed");
        let (id, req) = only_request(deliver(now, &mut a, &mut b));
        assert_eq!(msg::uri_path(&req).unwrap(), ["config"]);
        assert_eq!(b.respond(now, id, content(b"x")).unwrap(), None);
        let wire = drain(&mut b);
        let ack = Packet::from_bytes(&wire[0]).unwrap();
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, req.header.message_id);
        let events: Vec<Event> = wire
            .iter()
            .flat_map(|w| a.handle_datagram(now, w).unwrap())
            .collect();
        assert!(
            matches!(&events[..], [Event::Response { token: t, response }] if *t == token && response.payload == b"x")
        );
        assert_eq!(a.poll_timeout(), None, "exchange complete");
        assert!(b.respond(now, id, content(b"x")).is_err(), "answered once");
    }

    #[test]
    fn retransmission_schedule_and_give_up() {
        for seed in 0..20 {
            let start = Instant::now();
            let mut a = dgram(seed);
            let token = a
                .send_request(start, get("hb"), Delivery::Confirmable)
                .unwrap();
            let mut sends = vec![start];
            let first = drain(&mut a);
            assert_eq!(first.len(), 1);
            let mut events = Vec::new();
            while let Some(t) = a.poll_timeout() {
                events.extend(a.handle_timeout(t));
                let out = drain(&mut a);
                if !out.is_empty() {
                    assert_eq!(out, first, "same bytes retransmitted");
                    sends.push(t);
                }
            }
            assert_eq!(sends.len(), 4, "1 + MAX_RETRANSMIT (3) transmissions");
            let gaps: Vec<Duration> = sends.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps[0] >= Duration::from_secs(2) && gaps[0] <= Duration::from_secs(3),
                "{gaps:?}"
            );
            assert_eq!(gaps[1], gaps[0] * 2);
            assert_eq!(gaps[2], gaps[0] * 4);
            assert_eq!(events, [Event::RequestTimedOut { token }]);
        }
    }

    #[test]
    fn runtime_params_apply_to_new_exchanges() {
        let now = Instant::now();
        let mut a = dgram(3);
        let params = TransmissionParams {
            ack_timeout: Duration::from_secs(5),
            ack_random_factor: 1.0,
            max_retransmit: 1,
        };
        a.set_params(params).unwrap();
        a.send_request(now, get("hb"), Delivery::Confirmable)
            .unwrap();
        assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(5)));
        a.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(15)));
        assert!(matches!(
            a.handle_timeout(now + Duration::from_secs(15))[..],
            [Event::RequestTimedOut { .. }]
        ));
        assert!(a
            .set_params(TransmissionParams {
                ack_random_factor: 0.5,
                ..params
            })
            .is_err());
    }

    #[test]
    fn duplicate_con_replays_response_without_new_event() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        a.send_request(now, get("config"), Delivery::Confirmable)
            .unwrap();
        let req = drain(&mut a).remove(0);
        let (id, _) = only_request(b.handle_datagram(now, &req).unwrap());
        // A duplicate before we answered is dropped silently.
        assert_eq!(b.handle_datagram(now, &req).unwrap(), []);
        assert!(drain(&mut b).is_empty());
        b.respond(now, id, content(b"c")).unwrap();
        let ack = drain(&mut b);
        // The ACK is lost; the retransmitted CON gets the very same ACK back.
        let later = now + Duration::from_secs(3);
        assert_eq!(b.handle_datagram(later, &req).unwrap(), []);
        assert_eq!(drain(&mut b), ack);
        assert_eq!(b.dedup_len(), 1);
        // After EXCHANGE_LIFETIME the message id is forgotten.
        let much_later =
            now + TransmissionParams::default().exchange_lifetime() + Duration::from_secs(1);
        assert_eq!(b.handle_datagram(much_later, &req).unwrap().len(), 1);
    }

    #[test]
    fn dedup_cache_is_bounded() {
        let now = Instant::now();
        let cfg = DatagramConfig {
            dedup_capacity: 16,
            ..Default::default()
        };
        let mut b = DatagramEndpoint::new(cfg, 2).unwrap();
        let mut a = dgram(1);
        for _ in 0..100 {
            a.send_request(now, get("hb"), Delivery::NonConfirmable)
                .unwrap();
        }
        assert_eq!(deliver(now, &mut a, &mut b).len(), 100);
        assert!(b.dedup_len() <= 16);
    }

    #[test]
    fn rst_cancels_request() {
        let now = Instant::now();
        let mut a = dgram(1);
        let token = a
            .send_request(now, get("x"), Delivery::Confirmable)
            .unwrap();
        let req = Packet::from_bytes(&drain(&mut a)[0]).unwrap();
        let mut rst = Packet::new();
        rst.header.set_type(MessageType::Reset);
        rst.header.code = MessageClass::Empty;
        rst.header.message_id = req.header.message_id;
        let events = a.handle_datagram(now, &rst.to_bytes().unwrap()).unwrap();
        assert_eq!(events, [Event::RequestReset { token }]);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn ping_answered_by_rst() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let ping = a.ping(now).unwrap();
        let wire = drain(&mut a);
        assert_eq!(wire[0].len(), 4, "empty CON");
        assert_eq!(b.handle_datagram(now, &wire[0]).unwrap(), []);
        let rst = drain(&mut b);
        assert_eq!(rst[0][0] >> 4 & 3, 3, "RST");
        assert_eq!(rst[0][2..], wire[0][2..], "same message id");
        assert_eq!(
            a.handle_datagram(now, &rst[0]).unwrap(),
            [Event::Pong { ping }]
        );
        assert!(b.received_since(now) && !b.received_since(now + Duration::from_millis(1)));

        let ping = a.ping(now).unwrap();
        let mut events = Vec::new();
        while let Some(t) = a.poll_timeout() {
            events.extend(a.handle_timeout(t));
        }
        assert_eq!(events, [Event::PingTimedOut { ping }]);
    }

    #[test]
    fn nstart_serialises_confirmables() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let t1 = a
            .send_request(now, get("1"), Delivery::Confirmable)
            .unwrap();
        let t2 = a
            .send_request(now, get("2"), Delivery::Confirmable)
            .unwrap();
        assert_eq!(drain(&mut a).len(), 1, "second CON waits (NSTART 1)");
        a.cancel_request(now, &t1);
        let (id, req) = only_request(deliver(now, &mut a, &mut b));
        assert_eq!(msg::uri_path(&req).unwrap(), ["2"]);
        b.respond(now, id, content(b"")).unwrap();
        assert!(
            matches!(&deliver(now, &mut b, &mut a)[..], [Event::Response { token, .. }] if *token == t2)
        );
    }

    #[test]
    fn separate_response_after_empty_ack() {
        let now = Instant::now();
        let mut a = dgram(1);
        let token = a
            .send_request(now, get("x"), Delivery::Confirmable)
            .unwrap();
        let req = Packet::from_bytes(&drain(&mut a)[0]).unwrap();
        let ack = {
            let mut p = Packet::new();
            p.header.set_type(MessageType::Acknowledgement);
            p.header.code = MessageClass::Empty;
            p.header.message_id = req.header.message_id;
            p.to_bytes().unwrap()
        };
        assert_eq!(a.handle_datagram(now, &ack).unwrap(), []);
        let lifetime = TransmissionParams::default().exchange_lifetime();
        assert_eq!(
            a.poll_timeout(),
            Some(now + lifetime),
            "waits for the separate response"
        );
        let mut resp = content(b"late");
        resp.header.set_type(MessageType::Confirmable);
        resp.header.message_id = 0x7777;
        resp.set_token(req.get_token().to_vec());
        let events = a.handle_datagram(now, &resp.to_bytes().unwrap()).unwrap();
        assert!(matches!(&events[..], [Event::Response { token: t, .. }] if *t == token));
        assert_eq!(drain(&mut a), [vec![0x60, 0, 0x77, 0x77]], "empty ACK");
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn non_request_and_non_response() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = a
            .send_request(
                now,
                msg::request(RequestType::Put, &["hb".into()]),
                Delivery::NonConfirmable,
            )
            .unwrap();
        let (id, req) = only_request(deliver(now, &mut a, &mut b));
        assert_eq!(req.header.get_type(), MessageType::NonConfirmable);
        b.respond(now, id, msg::response(ResponseType::Changed))
            .unwrap();
        let wire = drain(&mut b);
        assert_eq!(
            Packet::from_bytes(&wire[0]).unwrap().header.get_type(),
            MessageType::NonConfirmable
        );
        let events: Vec<Event> = wire
            .iter()
            .flat_map(|w| a.handle_datagram(now, w).unwrap())
            .collect();
        assert!(matches!(&events[..], [Event::Response { token: t, .. }] if *t == token));

        // Unanswered NON: times out after MAX_TRANSMIT_WAIT, never retransmitted.
        let token = a
            .send_request(now, get("hb"), Delivery::NonConfirmable)
            .unwrap();
        drain(&mut a);
        let deadline = a.poll_timeout().unwrap();
        assert_eq!(
            deadline,
            now + TransmissionParams::default().max_transmit_wait()
        );
        assert_eq!(
            a.handle_timeout(deadline),
            [Event::RequestTimedOut { token }]
        );
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn malformed_con_gets_rst() {
        let now = Instant::now();
        let mut b = dgram(2);
        // CON, TKL 9: invalid.
        assert!(b.handle_datagram(now, &[0x49, 0x01, 0x12, 0x34]).is_err());
        assert_eq!(drain(&mut b), [vec![0x70, 0, 0x12, 0x34]]);
        assert_eq!(b.last_rx(), Some(now), "still counts as traffic");
        // NON with the same defect: ignored.
        assert!(b.handle_datagram(now, &[0x59, 0x01, 0x12, 0x35]).is_err());
        assert!(drain(&mut b).is_empty());
        // Too short, version 2: ignored.
        assert!(b.handle_datagram(now, &[0x40]).is_err());
        assert_eq!(b.handle_datagram(now, &[0x80, 0x01, 0, 1]).unwrap(), []);
        assert!(drain(&mut b).is_empty());
    }

    #[test]
    fn unrecognized_critical_option_gets_4_02() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let mut req = get("x");
        req.add_option(CoapOption::Unknown(2049), vec![1]);
        let token = a.send_request(now, req, Delivery::Confirmable).unwrap();
        assert_eq!(deliver(now, &mut a, &mut b), []);
        let events = deliver(now, &mut b, &mut a);
        assert!(
            matches!(&events[..], [Event::Response { token: t, response }]
            if *t == token && response.header.code == MessageClass::Response(ResponseType::BadOption))
        );
    }

    /// Registers `a` as observer of `b`; returns (token at a, observer at b).
    fn register(now: Instant, a: &mut DatagramEndpoint, b: &mut DatagramEndpoint) -> Token {
        let token = a
            .send_request(now, observe_get("mitigate"), Delivery::Confirmable)
            .unwrap();
        let (id, req) = only_request(deliver(now, a, b));
        assert_eq!(msg::observe(&req), Some(0));
        assert_eq!(b.respond(now, id, content(b"0")).unwrap(), Some(token));
        let events = deliver(now, b, a);
        assert!(
            matches!(&events[..], [Event::Response { token: t, response }] if *t == token && msg::observe(response) == Some(0))
        );
        assert_eq!(b.observers(), [token]);
        token
    }

    #[test]
    fn observe_register_notify_and_rst_drop() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = register(now, &mut a, &mut b);
        assert_eq!(
            a.poll_timeout(),
            None,
            "an established observation has no deadline"
        );
        for (i, body) in [b"1", b"2"].iter().enumerate() {
            b.notify(now, &token, content(*body), Delivery::NonConfirmable)
                .unwrap();
            let events = deliver(now, &mut b, &mut a);
            assert!(
                matches!(&events[..], [Event::Notification { token: t, response }]
                if *t == token && response.payload == *body && msg::observe(response) == Some(i as u32 + 1))
            );
        }
        assert!(drain(&mut a).is_empty(), "NON notifications need no ACK");
        // The client loses interest: the next notification is rejected with RST.
        assert!(a.cancel_request(now, &token));
        b.notify(now, &token, content(b"3"), Delivery::NonConfirmable)
            .unwrap();
        assert_eq!(deliver(now, &mut b, &mut a), []);
        let events = deliver(now, &mut a, &mut b);
        assert_eq!(
            events,
            [Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Reset
            }]
        );
        assert!(b.observers().is_empty());
        assert_eq!(
            b.notify(now, &token, content(b"4"), Delivery::NonConfirmable),
            Err(CoapError::UnknownObserver)
        );
    }

    #[test]
    fn observe_con_notification_acked_or_timed_out() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = register(now, &mut a, &mut b);
        b.notify(now, &token, content(b"c"), Delivery::Confirmable)
            .unwrap();
        assert_eq!(deliver(now, &mut b, &mut a).len(), 1);
        assert_eq!(deliver(now, &mut a, &mut b), [], "ACK consumed");
        assert_eq!(b.poll_timeout(), None);
        // Lost notifications: the observer is dropped after MAX_RETRANSMIT.
        b.notify(now, &token, content(b"d"), Delivery::Confirmable)
            .unwrap();
        let mut events = Vec::new();
        while let Some(t) = b.poll_timeout() {
            events.extend(b.handle_timeout(t));
        }
        assert_eq!(
            events,
            [Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Timeout
            }]
        );
    }

    #[test]
    fn observe_deregistration_with_observe_1() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = register(now, &mut a, &mut b);
        a.deregister(now, &token).unwrap();
        let events = deliver(now, &mut a, &mut b);
        assert_eq!(
            events[0],
            Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Deregistered
            }
        );
        let Event::Request { id, request } = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(msg::observe(request), Some(1));
        assert_eq!(request.get_token(), token.as_slice());
        assert_eq!(b.respond(now, *id, content(b"final")).unwrap(), None);
        let events = deliver(now, &mut b, &mut a);
        assert!(
            matches!(&events[..], [Event::Response { response, .. }] if msg::observe(response).is_none())
        );
        assert_eq!(a.poll_timeout(), None);
        assert!(!a.cancel_request(now, &token), "nothing left");
    }

    #[test]
    fn get_without_observe_on_same_token_deregisters() {
        let now = Instant::now();
        let mut b = dgram(2);
        let mut req = observe_get("m");
        req.set_token(vec![9, 9]);
        req.header.message_id = 1;
        let (id, _) = only_request(b.handle_datagram(now, &req.to_bytes().unwrap()).unwrap());
        b.respond(now, id, content(b"")).unwrap();
        let mut plain = get("m");
        plain.set_token(vec![9, 9]);
        plain.header.message_id = 2;
        let events = b.handle_datagram(now, &plain.to_bytes().unwrap()).unwrap();
        let token = Token::from_slice(&[9, 9]).unwrap();
        assert_eq!(
            events[0],
            Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Deregistered
            }
        );
        // An error answer to a registration does not register.
        req.header.message_id = 3;
        let (id, _) = only_request(b.handle_datagram(now, &req.to_bytes().unwrap()).unwrap());
        assert_eq!(
            b.respond(now, id, msg::response(ResponseType::NotFound))
                .unwrap(),
            None
        );
        assert!(b.observers().is_empty());
    }

    #[test]
    fn reordered_notifications_are_dropped() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = register(now, &mut a, &mut b);
        b.notify(now, &token, content(b"1"), Delivery::NonConfirmable)
            .unwrap();
        b.notify(now, &token, content(b"2"), Delivery::NonConfirmable)
            .unwrap();
        let wire = drain(&mut b);
        // Newer first, then the older one, then a duplicate.
        let e2 = a.handle_datagram(now, &wire[1]).unwrap();
        assert!(
            matches!(&e2[..], [Event::Notification { response, .. }] if response.payload == b"2")
        );
        assert_eq!(a.handle_datagram(now, &wire[0]).unwrap(), [], "stale");
        assert_eq!(a.handle_datagram(now, &wire[1]).unwrap(), [], "duplicate");
        assert!(drain(&mut a).is_empty(), "stale NON is not rejected");
        assert!(!b.observers().is_empty());
    }

    #[test]
    fn error_notification_ends_observation() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        let token = register(now, &mut a, &mut b);
        b.notify(
            now,
            &token,
            msg::diagnostic_response(ResponseType::NotFound, "gone"),
            Delivery::NonConfirmable,
        )
        .unwrap();
        assert!(b.observers().is_empty());
        let events = deliver(now, &mut b, &mut a);
        assert!(
            matches!(&events[..], [Event::Response { response, .. }] if msg::observe(response).is_none())
        );
        assert!(!a.cancel_request(now, &token), "client side ended too");
    }

    #[test]
    fn too_large_response_can_be_retried() {
        let now = Instant::now();
        let (mut a, mut b) = (dgram(1), dgram(2));
        a.send_request(now, get("x"), Delivery::Confirmable)
            .unwrap();
        let (id, _) = only_request(deliver(now, &mut a, &mut b));
        let big = content(&[0; 2000]);
        assert!(matches!(
            b.respond(now, id, big),
            Err(CoapError::TooLarge { .. })
        ));
        assert!(b.respond(now, id, content(b"ok")).is_ok());
    }
}

mod stream {
    use super::*;

    fn pair() -> (StreamEndpoint, StreamEndpoint) {
        let now = Instant::now();
        let mut a = StreamEndpoint::new(StreamConfig::default(), 1).unwrap();
        let mut b = StreamEndpoint::new(StreamConfig::default(), 2).unwrap();
        let ea = deliver(now, &mut b, &mut a);
        let eb = deliver(now, &mut a, &mut b);
        let settings = Event::PeerSettings {
            max_message_size: 1152,
            block_wise: false,
        };
        assert_eq!((ea, eb), (vec![settings.clone()], vec![settings]));
        (a, b)
    }

    #[test]
    fn csm_is_the_first_message() {
        let mut a = StreamEndpoint::new(
            StreamConfig {
                max_message_size: 4096,
                block_wise: true,
                ..Default::default()
            },
            1,
        )
        .unwrap();
        // Len 4, TKL 0, 7.01, Max-Message-Size 4096 (0x1000), Block-Wise-Transfer.
        assert_eq!(
            a.poll_transmit().unwrap(),
            [0x40, 0xE1, 0x22, 0x10, 0x00, 0x20]
        );
    }

    #[test]
    fn request_response_byte_by_byte() {
        let now = Instant::now();
        let (mut a, mut b) = pair();
        let token = a
            .send_request(now, get("hb"), Delivery::NonConfirmable)
            .unwrap();
        let bytes = a.poll_transmit().unwrap();
        let events: Vec<Event> = bytes
            .iter()
            .flat_map(|x| b.handle_data(now, &[*x]).unwrap())
            .collect();
        let (id, _) = only_request(events);
        b.respond(now, id, content(b"r")).unwrap();
        let events = deliver(now, &mut b, &mut a);
        assert!(matches!(&events[..], [Event::Response { token: t, .. }] if *t == token));
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn request_times_out() {
        let now = Instant::now();
        let (mut a, _b) = pair();
        let token = a
            .send_request(now, get("hb"), Delivery::Confirmable)
            .unwrap();
        let deadline = a.poll_timeout().unwrap();
        assert_eq!(
            a.handle_timeout(deadline),
            [Event::RequestTimedOut { token }]
        );
    }

    #[test]
    fn ping_pong_echoes_token() {
        let now = Instant::now();
        let (mut a, mut b) = pair();
        let ping = a.ping(now).unwrap();
        let wire = a.poll_transmit().unwrap();
        assert_eq!(&wire[..2], &[0x08, 0xE2], "Len 0, TKL 8, 7.02");
        assert_eq!(b.handle_data(now, &wire).unwrap(), []);
        let pong = b.poll_transmit().unwrap();
        assert_eq!(pong[1], 0xE3);
        assert_eq!(pong[2..], wire[2..], "same token");
        assert_eq!(a.handle_data(now, &pong).unwrap(), [Event::Pong { ping }]);
        let ping = a.ping(now).unwrap();
        let deadline = a.poll_timeout().unwrap();
        assert_eq!(a.handle_timeout(deadline), [Event::PingTimedOut { ping }]);
    }

    #[test]
    fn missing_csm_aborts() {
        let now = Instant::now();
        let mut b = StreamEndpoint::new(StreamConfig::default(), 2).unwrap();
        b.poll_transmit();
        let events = b
            .handle_data(now, &framing::encode(&get("hb")).unwrap())
            .unwrap();
        assert!(matches!(
            &events[..],
            [Event::Closed(CloseReason::ProtocolError(_))]
        ));
        let abort = framing::decode(&b.poll_transmit().unwrap(), 1152).unwrap();
        assert!(matches!(
            framing::Signal::from_packet(&abort),
            Ok(framing::Signal::Abort { .. })
        ));
        assert_eq!(b.handle_data(now, &[0]), Err(CoapError::Closed));
        assert_eq!(
            b.send_request(now, get("x"), Delivery::Confirmable),
            Err(CoapError::Closed)
        );
    }

    #[test]
    fn oversize_frame_aborts() {
        let now = Instant::now();
        let (_, mut b) = pair();
        // Header announcing 2000 bytes of options/payload (Len 14).
        let events = b.handle_data(now, &[0xE0, 0x06, 0x17]).unwrap();
        assert!(matches!(
            &events[..],
            [Event::Closed(CloseReason::ProtocolError(_))]
        ));
        assert!(b.is_closed());
    }

    #[test]
    fn peer_max_message_size_is_respected() {
        let now = Instant::now();
        let mut a = StreamEndpoint::new(StreamConfig::default(), 1).unwrap();
        let mut b = StreamEndpoint::new(
            StreamConfig {
                max_message_size: 100,
                ..Default::default()
            },
            2,
        )
        .unwrap();
        deliver(now, &mut b, &mut a);
        deliver(now, &mut a, &mut b);
        assert_eq!(a.peer_max_message_size(), 100);
        let mut big = msg::request(RequestType::Put, &["hb".into()]);
        big.payload = vec![0; 200];
        assert!(matches!(
            a.send_request(now, big, Delivery::Confirmable),
            Err(CoapError::TooLarge { limit: 100, .. })
        ));
        assert!(a
            .send_request(now, get("hb"), Delivery::Confirmable)
            .is_ok());
    }

    #[test]
    fn observe_over_stream() {
        let now = Instant::now();
        let (mut a, mut b) = pair();
        let token = a
            .send_request(now, observe_get("mitigate"), Delivery::Confirmable)
            .unwrap();
        let (id, _) = only_request(deliver(now, &mut a, &mut b));
        assert_eq!(b.respond(now, id, content(b"0")).unwrap(), Some(token));
        assert_eq!(deliver(now, &mut b, &mut a).len(), 1);
        b.notify(now, &token, content(b"1"), Delivery::NonConfirmable)
            .unwrap();
        let events = deliver(now, &mut b, &mut a);
        assert!(
            matches!(&events[..], [Event::Notification { response, .. }] if msg::observe(response) == Some(1))
        );
        a.deregister(now, &token).unwrap();
        let events = deliver(now, &mut a, &mut b);
        assert_eq!(
            events[0],
            Event::ObserverRemoved {
                token,
                reason: ObserverRemoval::Deregistered
            }
        );
    }

    #[test]
    fn release_and_abort_close() {
        let now = Instant::now();
        let (mut a, mut b) = pair();
        a.release("maintenance").unwrap();
        let events = deliver(now, &mut a, &mut b);
        assert!(
            matches!(&events[..], [Event::Closed(CloseReason::Released { diagnostic, .. })] if diagnostic == "maintenance")
        );
        let (mut a, mut b) = pair();
        a.abort("bye").unwrap();
        let events = deliver(now, &mut a, &mut b);
        assert_eq!(
            events,
            [Event::Closed(CloseReason::Aborted {
                diagnostic: "bye".into()
            })]
        );
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Peer bytes never panic an endpoint, whatever state it is in.
        #[test]
        fn arbitrary_input_never_panics(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..16),
        ) {
            let now = Instant::now();
            let mut d = dgram(5);
            let token = d.send_request(now, observe_get("m"), Delivery::Confirmable).unwrap();
            let mut s = StreamEndpoint::new(StreamConfig::default(), 5).unwrap();
            // Give the stream endpoint a valid CSM first so later bytes reach the request path.
            let csm = framing::Signal::Csm { max_message_size: None, block_wise: false }.to_packet(Token::EMPTY);
            s.handle_data(now, &framing::encode(&csm).unwrap()).unwrap();
            for (i, bytes) in datagrams.iter().enumerate() {
                let t = now + Duration::from_millis(i as u64 * 700);
                let _ = d.handle_datagram(t, bytes);
                let _ = d.handle_timeout(t);
                let _ = s.handle_data(t, bytes);
                let _ = s.handle_timeout(t);
            }
            let _ = d.cancel_request(now, &token);
            drain(&mut d);
            drain(&mut s);
        }
    }
}
