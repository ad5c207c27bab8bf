//! A corpus of hostile inputs, beside the fuzz target: what an attacker or
//! a careless peer sends, each with the answer the RFCs give. Every case
//! runs against an agent-side server that already holds two enforced
//! mitigations, and must
//! * get its 4.xx (or, when the framing is broken, an Abort and the end of
//!   the session; bytes that are not CoAP at all get nothing),
//! * leave the mitigations exactly as they were (no install, no removal),
//! * leave the agent-wide count as it was,
//! * and leave the server serving: a valid request right after is answered.
//!
//! `cargo test -p dots-proto --test adversarial -- --ignored` writes the
//! inputs as seeds of the fuzz target (`fuzz/corpus/decode/bad-hostile-*`).

use std::{fs, path::PathBuf, time::Instant};

use dots_proto::{
    cbor,
    coap::{
        framing, msg, CoapOption, DatagramConfig, DatagramEndpoint, Delivery, DotsResource,
        Endpoint, Event, MessageClass, Packet, RequestType, ResponseType, StreamConfig,
        StreamEndpoint, Token, CONTENT_FORMAT_DOTS_CBOR,
    },
    model::{DotsMessage, MitigationScope, RedirectedSignal, Scope},
    signal::{Action, ExemptSet, MitigationBudget, MitigationKey, ServerConfig, SignalServer},
};

const CUID: &str = "dz6pHjaADkaFTbjreJGBpw";

fn config() -> ServerConfig {
    ServerConfig {
        domain: vec![
            "192.0.2.0/24".parse().expect("prefix"),
            "2001:db8:123::/48".parse().expect("prefix"),
        ],
        exempt: ExemptSet::new(&["192.0.2.250/32".parse().expect("prefix")]),
        max_mitigations_per_peer: 3,
        budget: MitigationBudget::new(Some(256)),
        counters_wait: std::time::Duration::ZERO,
        ..ServerConfig::default()
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("prefix")
}

fn scope(target: &str, source: &str) -> Scope {
    Scope {
        target_prefix: vec![net(target)],
        source_prefix: vec![net(source)],
        lifetime: Some(3600),
        ..Scope::default()
    }
}

/// The two mitigations every case starts with.
fn existing() -> [(u32, Scope); 2] {
    [
        (10, scope("203.0.113.0/24", "192.0.2.10/32")),
        (11, scope("198.51.100.0/24", "192.0.2.11/32")),
    ]
}

fn uri(cuid: &str, mid: Option<u32>) -> DotsResource {
    DotsResource::Mitigate {
        cdid: None,
        cuid: cuid.into(),
        mid,
    }
}

fn put_body(mid: u32, body: Vec<u8>) -> Packet {
    let mut p = uri(CUID, Some(mid)).request(RequestType::Put);
    p.payload = body;
    msg::set_content_format(&mut p, CONTENT_FORMAT_DOTS_CBOR);
    p
}

fn put_scope(mid: u32, s: Scope) -> Packet {
    put_body(mid, MitigationScope { scopes: vec![s] }.encode())
}

/// A PUT whose body is `json` converted to CBOR (so that values the typed
/// model cannot hold can be written).
fn put_json(mid: u32, json: serde_json::Value) -> Packet {
    put_body(mid, cbor::json_to_cbor(&json).expect("convertible"))
}

/// `{1: {2: [ {items} ]}}` with raw CBOR for the scope's entries.
fn raw_scope(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![0xa1, 0x01, 0xa1, 0x02, 0x81];
    v.push(0xa0 + u8::try_from(entries.len()).expect("few entries"));
    for (k, value) in entries {
        v.extend(cbor_uint(*k));
        v.extend(value);
    }
    v
}

fn cbor_uint(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(&n, &mut out).expect("encode");
    out
}

fn cbor_of<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encode");
    out
}

/// The valid parts of a scope, as raw CBOR entries.
fn valid_entries() -> Vec<(u64, Vec<u8>)> {
    vec![
        (6, cbor_of(&vec!["203.0.113.9/32"])),
        (14, cbor_uint(600)),
        (0x8000, cbor_of(&vec!["192.0.2.20/32"])),
    ]
}

fn with_entry(key: u64, value: Vec<u8>) -> Vec<u8> {
    let mut e: Vec<(u64, Vec<u8>)> = valid_entries()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .collect();
    e.push((key, value));
    raw_scope(&e)
}

fn option(mut p: Packet, option: CoapOption, value: Vec<u8>) -> Packet {
    p.add_option(option, value);
    p
}

fn with_path(mut p: Packet, segments: &[&[u8]]) -> Packet {
    p.clear_option(CoapOption::UriPath);
    for s in segments {
        p.add_option(CoapOption::UriPath, s.to_vec());
    }
    p
}

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// This response code.
    Code(ResponseType),
    /// Not CoAP: no answer, nothing changes.
    Ignored,
    /// Broken framing: 7.05 Abort sent, the session ends.
    Abort,
}

struct Case {
    name: &'static str,
    input: Input,
    expect: Expect,
}

enum Input {
    /// A request, sent over both transports.
    Request(Packet),
    /// Bytes in a datagram.
    Datagram(Vec<u8>),
    /// Bytes on a stream, in these writes; `csm` first when true.
    Stream { csm: bool, writes: Vec<Vec<u8>> },
    /// A stream connection over which the peer never sends anything.
    Idle,
}

fn req(name: &'static str, p: Packet, code: ResponseType) -> Case {
    Case {
        name,
        input: Input::Request(p),
        expect: Expect::Code(code),
    }
}

fn cases() -> Vec<Case> {
    use ResponseType::*;
    let figure10 = MitigationScope {
        scopes: vec![scope("203.0.113.9/32", "192.0.2.20/32")],
    }
    .encode();
    let mut truncated = figure10.clone();
    truncated.pop();
    let mut trailing = figure10.clone();
    trailing.extend([0x00, 0xff]);
    let deep_arrays = vec![0x81; 60_000];
    let mut deep_in_scope = raw_scope(&[(6, vec![0x81; 5_000])]);
    deep_in_scope.extend([0x00]);
    // `{1: {2: [{6: <head claiming 2^64-1 items or bytes>`, then nothing.
    let huge = |head: u8| {
        let mut v = vec![0xa1, 0x01, 0xa1, 0x02, 0x81, 0xa1, 0x06, head];
        v.extend([0xff; 8]);
        v
    };
    let mut json_body = uri(CUID, Some(99)).request(RequestType::Put);
    json_body.payload = br#"{"ietf-dots-signal-channel:mitigation-scope":{}}"#.to_vec();
    msg::set_content_format(&mut json_body, 50);
    let mut no_format = put_scope(99, scope("203.0.113.9/32", "192.0.2.20/32"));
    no_format.clear_option(CoapOption::ContentFormat);
    let mut generic_cbor = put_scope(99, scope("203.0.113.9/32", "192.0.2.20/32"));
    msg::set_content_format(&mut generic_cbor, 60);
    let good = || scope("203.0.113.9/32", "192.0.2.20/32");
    let s = |f: &dyn Fn(&mut Scope)| {
        let mut x = good();
        f(&mut x);
        x
    };
    let get10 = uri(CUID, Some(10)).request(RequestType::Get);
    let mut cases = vec![
        // CBOR itself.
        req("cbor-truncated", put_body(99, truncated), BadRequest),
        req("cbor-trailing-bytes", put_body(99, trailing), BadRequest),
        req("cbor-deep-arrays", put_body(99, deep_arrays), BadRequest),
        req(
            "cbor-deep-in-scope",
            put_body(99, deep_in_scope),
            BadRequest,
        ),
        req("cbor-huge-array", put_body(99, huge(0x9b)), BadRequest),
        req("cbor-huge-text", put_body(99, huge(0x7b)), BadRequest),
        req("cbor-huge-bytes", put_body(99, huge(0x5b)), BadRequest),
        req("cbor-huge-map", put_body(99, huge(0xbb)), BadRequest),
        req(
            "cbor-unterminated-indefinite",
            put_body(99, vec![0xa1, 0x01, 0xbf, 0x02, 0x9f, 0x01, 0x02]),
            BadRequest,
        ),
        req(
            "cbor-tag-nest",
            put_body(99, vec![0xc4; 10_000]),
            BadRequest,
        ),
        req("cbor-empty-body", put_body(99, Vec::new()), BadRequest),
        req(
            "cbor-not-a-map",
            put_body(99, cbor_of(&"mitigate")),
            BadRequest,
        ),
        // Content formats.
        req("format-json", json_body, UnsupportedContentFormat),
        req("format-missing", no_format, UnsupportedContentFormat),
        req(
            "format-generic-cbor",
            generic_cbor,
            UnsupportedContentFormat,
        ),
        // Wrong types.
        req(
            "type-lifetime-text",
            put_body(99, with_entry(14, cbor_of(&"3600"))),
            BadRequest,
        ),
        req(
            "type-target-prefix-int",
            put_body(99, with_entry(6, cbor_uint(7))),
            BadRequest,
        ),
        req(
            "type-source-prefix-map",
            put_body(99, with_entry(0x8000, vec![0xa0])),
            BadRequest,
        ),
        req(
            "type-scope-not-array",
            put_body(99, vec![0xa1, 0x01, 0xa1, 0x02, 0xa0]),
            BadRequest,
        ),
        req(
            "type-text-key",
            put_body(
                99,
                cbor_of(&std::collections::BTreeMap::from([("lifetime", 1)])),
            ),
            BadRequest,
        ),
        req(
            "type-negative-key",
            put_body(99, vec![0xa1, 0x20, 0x01]),
            BadRequest,
        ),
        req(
            "type-heartbeat-body-on-mitigate",
            put_body(99, vec![0xa1, 0x18, 0x31, 0xa1, 0x18, 0x33, 0xf5]),
            BadRequest,
        ),
        // Out of range.
        req(
            "range-lifetime-2^40",
            put_body(99, with_entry(14, cbor_uint(1 << 40))),
            BadRequest,
        ),
        req(
            "range-lifetime-minus-2",
            put_body(99, with_entry(14, cbor_of(&-2i64))),
            BadRequest,
        ),
        req(
            "range-lower-port-70000",
            put_body(
                99,
                with_entry(
                    7,
                    cbor_of(&vec![std::collections::BTreeMap::from([(8u64, 70_000u64)])]),
                ),
            ),
            BadRequest,
        ),
        req(
            "range-protocol-256",
            put_body(99, with_entry(10, cbor_of(&vec![256u64]))),
            BadRequest,
        ),
        req(
            "range-icmp-type-300",
            put_body(
                99,
                with_entry(
                    0x8002,
                    cbor_of(&vec![std::collections::BTreeMap::from([(
                        0x8003u64, 300u64,
                    )])]),
                ),
            ),
            BadRequest,
        ),
        req(
            "range-status-9",
            put_body(99, with_entry(16, cbor_uint(9))),
            BadRequest,
        ),
        req(
            "unknown-required-key",
            put_body(99, with_entry(60, cbor_uint(1))),
            BadRequest,
        ),
        req(
            "duplicate-map-key",
            put_body(99, {
                let mut v = raw_scope(&valid_entries());
                // A fourth entry repeating `lifetime`.
                v[5] += 1;
                v.extend(cbor_uint(14));
                v.extend(cbor_uint(60));
                v
            }),
            BadRequest,
        ),
        // Oversized lists and identifiers.
        req(
            "oversized-source-list",
            put_scope(
                99,
                s(&|x| {
                    x.source_prefix = (0..40u8)
                        .map(|i| net(&format!("192.0.2.{}/32", 100 + i)))
                        .collect()
                }),
            ),
            UnprocessableEntity,
        ),
        req(
            "oversized-cuid",
            put_scope(99, good()).clone_with_path(&"c".repeat(200), Some(99)),
            BadRequest,
        ),
        req(
            "oversized-target-list-width",
            put_scope(99, s(&|x| x.target_prefix = vec![net("192.0.0.0/3")])),
            UnprocessableEntity,
        ),
        // Request semantics.
        req(
            "source-leading-zeros",
            put_json(
                99,
                serde_json::json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [{
                "target-prefix": ["203.0.113.9/32"],
                "ietf-dots-call-home:source-prefix": ["192.0.2.010/32"],
                "lifetime": 60}]}}),
            ),
            BadRequest,
        ),
        req(
            "target-everything",
            put_scope(99, s(&|x| x.target_prefix = vec![net("0.0.0.0/0")])),
            BadRequest,
        ),
        req(
            "target-loopback",
            put_scope(99, s(&|x| x.target_prefix = vec![net("127.0.0.1/32")])),
            BadRequest,
        ),
        req(
            "source-ipv4-mapped-loopback",
            put_scope(
                99,
                s(&|x| {
                    x.source_prefix = vec![net("::ffff:127.0.0.1/128")];
                    x.target_prefix = vec![net("2001:db8:c000::1/128")]
                }),
            ),
            BadRequest,
        ),
        req(
            "empty-target-array",
            put_body(99, with_entry(6, vec![0x80])),
            BadRequest,
        ),
        req(
            "duplicate-prefix",
            put_scope(
                99,
                s(&|x| x.target_prefix = vec![net("203.0.113.9/32"), net("203.0.113.9/32")]),
            ),
            BadRequest,
        ),
        req(
            "alias-name",
            put_scope(99, s(&|x| x.alias_name = vec!["web".into()])),
            BadRequest,
        ),
        req(
            "icmp-types-with-tcp",
            put_scope(
                99,
                s(&|x| {
                    x.target_protocol = vec![6];
                    x.source_icmp_type_range = vec![dots_proto::model::IcmpTypeRange {
                        lower: 8,
                        upper: None,
                    }]
                }),
            ),
            BadRequest,
        ),
        req(
            "trigger-mitigation-false",
            put_scope(99, s(&|x| x.trigger_mitigation = Some(false))),
            BadRequest,
        ),
        req(
            "mid-in-body",
            put_scope(99, s(&|x| x.mid = Some(99))),
            BadRequest,
        ),
        req(
            "two-scopes",
            put_body(
                99,
                MitigationScope {
                    scopes: vec![good(), good()],
                }
                .encode(),
            ),
            BadRequest,
        ),
        req(
            "source-outside-domain",
            put_scope(99, s(&|x| x.source_prefix = vec![net("198.51.100.1/32")])),
            BadRequest,
        ),
        req(
            "source-never-block",
            put_scope(99, s(&|x| x.source_prefix = vec![net("192.0.2.250/32")])),
            Conflict,
        ),
        req(
            "lower-mid-overlapping-newer",
            put_scope(5, scope("203.0.113.0/24", "192.0.2.10/32")),
            Conflict,
        ),
        req(
            "efficacy-update-changing-scope",
            option(
                put_scope(
                    10,
                    Scope {
                        attack_status: Some(dots_proto::model::AttackStatus::UnderAttack),
                        ..scope("203.0.113.0/25", "192.0.2.10/32")
                    },
                ),
                CoapOption::IfMatch,
                vec![],
            ),
            BadRequest,
        ),
        // Conditional requests.
        req(
            "if-none-match-existing",
            option(put_scope(10, good()), CoapOption::IfNoneMatch, vec![]),
            PreconditionFailed,
        ),
        req(
            "if-match-wrong-etag",
            option(put_scope(10, good()), CoapOption::IfMatch, vec![0xab, 0xcd]),
            PreconditionFailed,
        ),
        req(
            "if-match-unknown-mid",
            option(put_scope(99, good()), CoapOption::IfMatch, vec![]),
            PreconditionFailed,
        ),
        // Hostile Uri-Paths.
        req(
            "path-mid-before-cuid",
            with_path(
                get10.clone(),
                &[
                    b".well-known",
                    b"dots",
                    b"mitigate",
                    b"mid=10",
                    format!("cuid={CUID}").as_bytes(),
                ],
            ),
            BadRequest,
        ),
        req(
            "path-no-well-known",
            with_path(get10.clone(), &[b"dots", b"mitigate"]),
            NotFound,
        ),
        req(
            "path-unknown-resource",
            with_path(get10.clone(), &[b".well-known", b"dots", b"telemetry"]),
            NotFound,
        ),
        req(
            "path-extra-segment",
            with_path(
                get10.clone(),
                &[
                    b".well-known",
                    b"dots",
                    b"mitigate",
                    format!("cuid={CUID}").as_bytes(),
                    b"mid=10",
                    b"x",
                ],
            ),
            BadRequest,
        ),
        req(
            "path-empty-cuid",
            with_path(
                get10.clone(),
                &[b".well-known", b"dots", b"mitigate", b"cuid="],
            ),
            BadRequest,
        ),
        req(
            "path-signed-mid",
            with_path(
                get10.clone(),
                &[
                    b".well-known",
                    b"dots",
                    b"mitigate",
                    format!("cuid={CUID}").as_bytes(),
                    b"mid=+10",
                ],
            ),
            BadRequest,
        ),
        req(
            "path-not-utf8",
            with_path(
                get10.clone(),
                &[b".well-known", b"dots", b"mitigate", b"cuid=\xff\xfe"],
            ),
            BadRequest,
        ),
        req(
            "path-control-character",
            with_path(
                get10.clone(),
                &[b".well-known", b"dots", b"mitigate", b"cuid=a\x1b[31m"],
            ),
            BadRequest,
        ),
        req(
            "path-many-segments",
            with_path(get10.clone(), &[b"x".as_slice(); 300]),
            NotFound,
        ),
        // Options and methods.
        req(
            "unknown-critical-option",
            option(get10.clone(), CoapOption::Unknown(2055), vec![1]),
            BadOption,
        ),
        req(
            "block1-not-supported",
            option(put_scope(99, good()), CoapOption::Block1, vec![0x0e]),
            BadOption,
        ),
        req(
            "accept-json",
            option(get10.clone(), CoapOption::Accept, vec![50]),
            NotAcceptable,
        ),
        req(
            "post-on-mitigate",
            uri(CUID, Some(10)).request(RequestType::Post),
            MethodNotAllowed,
        ),
        req(
            "fetch-on-mitigate",
            uri(CUID, Some(10)).request(RequestType::Fetch),
            MethodNotAllowed,
        ),
        req(
            "post-on-config",
            DotsResource::Config { sid: None }.request(RequestType::Post),
            MethodNotAllowed,
        ),
        req(
            "get-on-hb",
            DotsResource::Heartbeat.request(RequestType::Get),
            MethodNotAllowed,
        ),
        req(
            "delete-on-redirect",
            DotsResource::Redirect {
                cdid: None,
                cuid: CUID.into(),
                mid: Some(1),
            }
            .request(RequestType::Delete),
            MethodNotAllowed,
        ),
        req("redirect-to-an-address", redirect("192.0.2.1"), BadRequest),
        req("redirect-bad-name", redirect("a b.example"), BadRequest),
    ];
    // Framing and datagrams that are not CoAP.
    cases.extend([
        Case {
            name: "datagram-garbage",
            input: Input::Datagram(vec![0xff, 0xff, 0x00]),
            expect: Expect::Ignored,
        },
        Case {
            name: "datagram-version-2",
            input: Input::Datagram(vec![0x82, 0x01, 0x12, 0x34, 0xd0, 0x75]),
            expect: Expect::Ignored,
        },
        Case {
            name: "datagram-token-length-9",
            input: Input::Datagram(vec![0x49, 0x01, 0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            expect: Expect::Ignored,
        },
        Case {
            name: "datagram-empty",
            input: Input::Datagram(Vec::new()),
            expect: Expect::Ignored,
        },
        Case {
            name: "stream-idle-without-csm",
            input: Input::Idle,
            expect: Expect::Abort,
        },
        Case {
            name: "stream-garbage-instead-of-csm",
            input: Input::Stream {
                csm: false,
                writes: vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()],
            },
            expect: Expect::Abort,
        },
        Case {
            name: "stream-request-before-csm",
            input: Input::Stream {
                csm: false,
                writes: vec![framing::encode(&get10).expect("frame")],
            },
            expect: Expect::Abort,
        },
        Case {
            name: "stream-length-claiming-gigabytes",
            input: Input::Stream {
                csm: true,
                writes: vec![vec![0xf0, 0xff, 0xff, 0xff, 0xf0, 0x01]],
            },
            expect: Expect::Abort,
        },
        Case {
            name: "stream-reserved-token-length",
            input: Input::Stream {
                csm: true,
                writes: vec![vec![0x0f, 0x01]],
            },
            expect: Expect::Abort,
        },
        Case {
            name: "stream-csm-with-unknown-critical-option",
            input: Input::Stream {
                csm: false,
                writes: vec![{
                    let mut csm = framing::Signal::Csm {
                        max_message_size: Some(1152),
                        block_wise: false,
                    }
                    .to_packet(Token::EMPTY);
                    csm.add_option(CoapOption::Unknown(9), vec![]);
                    framing::encode(&csm).expect("frame")
                }],
            },
            expect: Expect::Abort,
        },
    ]);
    cases
}

fn redirect(alt: &str) -> Packet {
    let mut p = DotsResource::Redirect {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(1),
    }
    .request(RequestType::Put);
    p.payload = RedirectedSignal {
        alt_ch_client: alt.into(),
        alt_ch_client_record: Vec::new(),
        ttl: None,
    }
    .encode();
    msg::set_content_format(&mut p, CONTENT_FORMAT_DOTS_CBOR);
    p
}

trait ClonePath {
    fn clone_with_path(&self, cuid: &str, mid: Option<u32>) -> Packet;
}

impl ClonePath for Packet {
    /// The same request on `mitigate/cuid=../mid=..`.
    fn clone_with_path(&self, cuid: &str, mid: Option<u32>) -> Packet {
        let mut p = self.clone();
        p.clear_option(CoapOption::UriPath);
        for s in uri(cuid, mid).segments() {
            p.add_option(CoapOption::UriPath, s.into_bytes());
        }
        p
    }
}

/// A server and a peer talking to it over one transport.
trait Rig {
    type Ep: Endpoint;
    fn exchange(&mut self, request: Packet) -> Option<Packet>;
    fn server(&mut self) -> &mut SignalServer<Self::Ep>;
    fn now(&self) -> Instant;
}

/// Creates the [`existing`] mitigations and has the data plane confirm them.
fn enforce_existing<R: Rig>(rig: &mut R) {
    for (mid, s) in existing() {
        let a = rig.exchange(put_scope(mid, s)).expect("answered");
        assert_eq!(code(&a), ResponseType::Created);
        let now = rig.now();
        rig.server()
            .installed(now, &MitigationKey::new(CUID, mid))
            .expect("known");
    }
    while rig.server().poll_action().is_some() {}
}

/// Whether the frames in `bytes` (what a server sent) hold a 7.05 Abort.
fn has_abort(bytes: &[u8]) -> bool {
    framing::StreamDecoder::new(1 << 20)
        .feed(bytes)
        .unwrap_or_default()
        .iter()
        .any(|f| {
            matches!(
                framing::Signal::from_packet(f),
                Ok(framing::Signal::Abort { .. })
            )
        })
}

/// A server with the [`existing`] mitigations enforced, over datagrams.
struct DatagramRig {
    now: Instant,
    server: SignalServer<DatagramEndpoint>,
    peer: DatagramEndpoint,
    budget: MitigationBudget,
}

impl DatagramRig {
    fn new() -> Self {
        let now = Instant::now();
        let config = config();
        let budget = config.budget.clone();
        let ep = DatagramEndpoint::new(DatagramConfig::default(), 1).expect("endpoint");
        let server = SignalServer::new(now, ep, config).expect("server");
        // The peer sends datagrams up to the largest UDP payload.
        let peer_config = DatagramConfig {
            max_message_size: 65_507,
            ..DatagramConfig::default()
        };
        let peer = DatagramEndpoint::new(peer_config, 2).expect("endpoint");
        let mut rig = Self {
            now,
            server,
            peer,
            budget,
        };
        enforce_existing(&mut rig);
        rig
    }

    fn deliver(&mut self, bytes: &[u8]) -> Vec<Event> {
        let _ = self.server.handle_input(self.now, bytes);
        let mut events = Vec::new();
        while let Some(out) = self.server.poll_transmit() {
            if let Ok(ev) = self.peer.handle_input(self.now, &out) {
                events.extend(ev);
            }
        }
        while self.peer.poll_transmit().is_some() {}
        events
    }
}

impl Rig for DatagramRig {
    type Ep = DatagramEndpoint;

    fn exchange(&mut self, request: Packet) -> Option<Packet> {
        self.peer
            .send_request(self.now, request, Delivery::Confirmable)
            .expect("send");
        let mut events = Vec::new();
        while let Some(bytes) = self.peer.poll_transmit() {
            events.extend(self.deliver(&bytes));
        }
        first_response(events)
    }

    fn server(&mut self) -> &mut SignalServer<DatagramEndpoint> {
        &mut self.server
    }

    fn now(&self) -> Instant {
        self.now
    }
}

fn first_response(events: Vec<Event>) -> Option<Packet> {
    events.into_iter().find_map(|e| match e {
        Event::Response { response, .. } => Some(response),
        _ => None,
    })
}

/// The same over a stream, after both CSMs.
struct StreamRig {
    now: Instant,
    server: SignalServer<StreamEndpoint>,
    peer: StreamEndpoint,
}

impl StreamRig {
    fn new(send_csm: bool) -> Self {
        let now = Instant::now();
        let ep = StreamEndpoint::new(StreamConfig::default(), 1).expect("endpoint");
        let server = SignalServer::new(now, ep, config()).expect("server");
        let peer = StreamEndpoint::new(StreamConfig::default(), 2).expect("endpoint");
        let mut rig = Self { now, server, peer };
        if send_csm {
            rig.pump();
            enforce_existing(&mut rig);
        }
        rig
    }

    /// Moves bytes both ways; the events the peer saw.
    fn pump(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let mut moved = false;
            while let Some(b) = self.peer.poll_transmit() {
                moved = true;
                let _ = self.server.handle_input(self.now, &b);
            }
            while let Some(b) = self.server.poll_transmit() {
                moved = true;
                if let Ok(ev) = self.peer.handle_input(self.now, &b) {
                    events.extend(ev);
                }
            }
            if !moved {
                return events;
            }
        }
    }

    /// Raw bytes, one write at a time; whether the server aborted (in
    /// what it sent since the last call).
    fn write(&mut self, writes: &[Vec<u8>]) -> bool {
        let mut out = Vec::new();
        for w in writes {
            let _ = self.server.handle_input(self.now, w);
            while let Some(b) = self.server.poll_transmit() {
                out.extend(b);
            }
        }
        while let Some(b) = self.server.poll_transmit() {
            out.extend(b);
        }
        has_abort(&out)
    }
}

impl Rig for StreamRig {
    type Ep = StreamEndpoint;

    fn exchange(&mut self, request: Packet) -> Option<Packet> {
        self.peer
            .send_request(self.now, request, Delivery::Confirmable)
            .expect("send");
        first_response(self.pump())
    }

    fn server(&mut self) -> &mut SignalServer<StreamEndpoint> {
        &mut self.server
    }

    fn now(&self) -> Instant {
        self.now
    }
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(c) => c,
        other => panic!("not a response: {other:?}"),
    }
}

fn no_data_plane_change(actions: &[Action]) -> bool {
    !actions
        .iter()
        .any(|a| matches!(a, Action::Install { .. } | Action::Remove { .. }))
}

#[test]
fn every_hostile_input_is_refused_and_changes_nothing() {
    let mut failures = Vec::new();
    for case in cases() {
        match &case.input {
            Input::Request(p) => {
                check_datagram(&case, p.clone(), &mut failures);
                check_stream(&case, p.clone(), &mut failures);
            }
            Input::Datagram(bytes) => {
                let mut rig = DatagramRig::new();
                let before = rig.server.mitigations().clone();
                let events = rig.deliver(bytes);
                let answered = events.iter().any(|e| matches!(e, Event::Response { .. }));
                let actions: Vec<_> = std::iter::from_fn(|| rig.server.poll_action()).collect();
                if answered
                    || rig.server.mitigations() != &before
                    || !no_data_plane_change(&actions)
                {
                    failures.push(format!("{}: not ignored", case.name));
                }
                still_serves(&case, &mut rig, &mut failures);
            }
            Input::Stream { .. } | Input::Idle => {
                let (csm, writes) = match &case.input {
                    Input::Stream { csm, writes } => (*csm, writes.clone()),
                    _ => (false, Vec::new()),
                };
                let mut rig = StreamRig::new(csm);
                let before = rig.server.mitigations().clone();
                let mut aborted = rig.write(&writes);
                if matches!(case.input, Input::Idle) {
                    // The CSM timer: 10 s after the connection started.
                    let due = rig.server.poll_timeout().expect("CSM timer");
                    rig.server.handle_timeout(due);
                    aborted = rig.write(&[]);
                }
                let actions: Vec<_> = std::iter::from_fn(|| rig.server.poll_action()).collect();
                let lost = actions
                    .iter()
                    .any(|a| matches!(a, Action::SessionLost { .. }));
                if case.expect != Expect::Abort || !aborted || !lost {
                    failures.push(format!(
                        "{}: expected an Abort and the session's end, aborted={aborted} actions={actions:?}",
                        case.name
                    ));
                }
                if rig.server.mitigations() != &before || !no_data_plane_change(&actions) {
                    failures.push(format!("{}: state changed", case.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_datagram(case: &Case, p: Packet, failures: &mut Vec<String>) {
    let mut rig = DatagramRig::new();
    let before = rig.server.mitigations().clone();
    let held = rig.budget.held();
    let answer = rig.exchange(p);
    let actions: Vec<_> = std::iter::from_fn(|| rig.server.poll_action()).collect();
    let got = answer.as_ref().map(code);
    if got.map(Expect::Code) != Some(case.expect) {
        failures.push(format!(
            "{} (datagram): expected {:?}, got {got:?} {:?}",
            case.name,
            case.expect,
            answer.map(|a| String::from_utf8_lossy(&a.payload).into_owned())
        ));
    }
    if rig.server.mitigations() != &before || rig.budget.held() != held {
        failures.push(format!("{} (datagram): state changed", case.name));
    }
    if !no_data_plane_change(&actions) {
        failures.push(format!(
            "{} (datagram): data plane touched: {actions:?}",
            case.name
        ));
    }
    still_serves(case, &mut rig, failures);
}

/// The request over a stream, one byte per write. A frame larger than the
/// Max-Message-Size the agent advertised (1152) breaks the framing
/// (RFC 8323 §5.3.1): Abort instead of the 4.xx.
fn check_stream(case: &Case, p: Packet, failures: &mut Vec<String>) {
    let mut rig = StreamRig::new(true);
    let before = rig.server.mitigations().clone();
    let frame = match framing::encode(&p) {
        Ok(f) => f,
        Err(e) => {
            failures.push(format!("{} (stream): cannot frame: {e}", case.name));
            return;
        }
    };
    let expect = if frame.len() > framing::DEFAULT_MAX_MESSAGE_SIZE {
        Expect::Abort
    } else {
        case.expect
    };
    let mut out = Vec::new();
    for b in frame {
        let _ = rig.server.handle_input(rig.now, &[b]);
        while let Some(o) = rig.server.poll_transmit() {
            out.extend(o);
        }
    }
    let frames = framing::StreamDecoder::new(1 << 20)
        .feed(&out)
        .unwrap_or_default();
    let aborted = has_abort(&out);
    let got = frames.iter().find_map(|f| match f.header.code {
        MessageClass::Response(c) => Some(Expect::Code(c)),
        _ => None,
    });
    let got = if aborted { Some(Expect::Abort) } else { got };
    if got != Some(expect) {
        failures.push(format!(
            "{} (stream): expected {expect:?}, got {got:?}",
            case.name
        ));
    }
    let actions: Vec<_> = std::iter::from_fn(|| rig.server.poll_action()).collect();
    if rig.server.mitigations() != &before || !no_data_plane_change(&actions) {
        failures.push(format!("{} (stream): state changed", case.name));
    }
    if !aborted {
        let get = rig.exchange(uri(CUID, Some(10)).request(RequestType::Get));
        if get.as_ref().map(code) != Some(ResponseType::Content) {
            failures.push(format!("{} (stream): stopped serving: {get:?}", case.name));
        }
    }
}

fn still_serves(case: &Case, rig: &mut DatagramRig, failures: &mut Vec<String>) {
    let get = rig.exchange(uri(CUID, Some(10)).request(RequestType::Get));
    if get.as_ref().map(code) != Some(ResponseType::Content) {
        failures.push(format!("{}: stopped serving: {get:?}", case.name));
    }
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode")
}

/// A peer minting cuids at will still hits its limit, with a precise answer.
#[test]
fn a_peer_minting_cuids_hits_the_per_peer_limit() {
    let mut rig = DatagramRig::new();
    let third =
        put_scope(1, scope("203.0.113.9/32", "192.0.2.20/32")).clone_with_path("c2", Some(1));
    assert_eq!(
        rig.exchange(third).as_ref().map(code),
        Some(ResponseType::Created)
    );
    let before = rig.server.mitigations().clone();
    let fourth =
        put_scope(1, scope("203.0.113.9/32", "192.0.2.21/32")).clone_with_path("c3", Some(1));
    let a = rig.exchange(fourth).expect("answered");
    assert_eq!(code(&a), ResponseType::UnprocessableEntity);
    assert_eq!(
        String::from_utf8_lossy(&a.payload),
        "this peer already holds 3 mitigations, the limit is 3 (max-mitigations-per-peer)"
    );
    assert_eq!(rig.server.mitigations(), &before);
    assert_eq!(rig.budget.held(), 3);
}

/// libFuzzer's default `-max_len`: longer seeds would be cut anyway.
const MAX_SEED: usize = 4096;

#[test]
#[ignore = "writes the hostile inputs as fuzz seeds"]
fn write_hostile_seeds() {
    let dir = corpus_dir();
    fs::create_dir_all(&dir).expect("dir");
    let write = |file: String, bytes: Vec<u8>| {
        if bytes.len() <= MAX_SEED {
            fs::write(dir.join(file), bytes).expect("write");
        }
    };
    for case in cases() {
        let name = format!("bad-hostile-{}", case.name);
        match case.input {
            Input::Request(mut p) => {
                p.header
                    .set_type(dots_proto::coap::MessageType::Confirmable);
                p.header.message_id = 0x4242;
                p.set_token(vec![0xbe, 0xef]);
                if let Ok(b) = p.to_bytes() {
                    write(format!("{name}.udp"), b);
                }
                if let Ok(b) = framing::encode(&p) {
                    write(format!("{name}.tcp"), b);
                }
            }
            Input::Datagram(b) => write(format!("{name}.udp"), b),
            Input::Stream { writes, .. } => write(format!("{name}.tcp"), writes.concat()),
            Input::Idle => {}
        }
    }
}
