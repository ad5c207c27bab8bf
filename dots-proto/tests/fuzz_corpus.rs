//! Replays the fuzz target's corpus as an ordinary test, so CI runs the
//! decode path on it every time (the fuzzer itself needs nightly and time).
//! The corpus holds the well-formed seeds below, the malformed `bad-*`
//! ones (with `bad-hostile-*` from the adversarial corpus, see
//! `tests/adversarial.rs`), and `found-*`: inputs the fuzzer found that
//! reach new code, merged in after `cargo fuzz cmin`.
//! `cargo test -p dots-proto --test fuzz_corpus -- --ignored` rewrites the
//! seeds from the library's own encoders.

use std::{fs, path::PathBuf, time::Instant};

use dots_proto::{
    cbor,
    coap::{framing, msg, DotsResource, MessageType, RequestType, CONTENT_FORMAT_DOTS_CBOR},
    fuzzing::decode_everything,
};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode")
}

type Seed = (
    &'static str,
    Option<serde_json::Value>,
    RequestType,
    DotsResource,
);

/// Well-formed seeds: file name, JSON body, method, resource.
fn seeds() -> Vec<Seed> {
    let cuid = || "dz6pHjaADkaFTbjreJGBpw".to_string();
    let mitigate = |mid| DotsResource::Mitigate {
        cdid: None,
        cuid: cuid(),
        mid,
    };
    let figure10 = serde_json::json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [{
        "target-prefix": ["2001:db8:c000::/128"],
        "ietf-dots-call-home:source-prefix": ["2001:db8:123::1/128"],
        "lifetime": 3600}]}});
    let ports = serde_json::json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [{
        "target-prefix": ["198.51.100.0/24"], "target-protocol": [17],
        "ietf-dots-call-home:source-prefix": ["192.0.2.1/32"],
        "ietf-dots-call-home:source-port-range": [{"lower-port": 1000, "upper-port": 2000}],
        "ietf-dots-call-home:source-icmp-type-range": [{"lower-type": 8, "upper-type": 8}],
        "lifetime": 600}]}});
    let redirect = serde_json::json!({"ietf-dots-signal-channel:redirected-signal": {
        "ietf-dots-call-home:alt-ch-client": "alt-call-home-client.example",
        "ietf-dots-call-home:alt-ch-client-record": ["2001:db8:6401::1", "2001:db8:6401::2"],
        "ietf-dots-call-home:ttl": 3600}});
    let hb = serde_json::json!({"ietf-dots-signal-channel:heartbeat": {"peer-hb-status": true}});
    vec![
        (
            "put-figure10",
            Some(figure10),
            RequestType::Put,
            mitigate(Some(56)),
        ),
        (
            "put-ports-icmp",
            Some(ports),
            RequestType::Put,
            mitigate(Some(57)),
        ),
        ("get-all", None, RequestType::Get, mitigate(None)),
        ("delete", None, RequestType::Delete, mitigate(Some(56))),
        (
            "get-config",
            None,
            RequestType::Get,
            DotsResource::Config { sid: None },
        ),
        (
            "heartbeat",
            Some(hb),
            RequestType::Put,
            DotsResource::Heartbeat,
        ),
        (
            "redirect",
            Some(redirect),
            RequestType::Put,
            DotsResource::Redirect {
                cdid: None,
                cuid: cuid(),
                mid: Some(56),
            },
        ),
    ]
}

#[test]
#[ignore = "rewrites the seed corpus"]
fn regenerate_seed_corpus() {
    let dir = corpus_dir();
    fs::create_dir_all(&dir).unwrap();
    for (name, body, method, resource) in seeds() {
        let mut p = resource.request(method);
        p.header.set_type(MessageType::Confirmable);
        p.header.message_id = 0x1234;
        p.set_token(vec![0xd0, 0x75]);
        if let Some(json) = body {
            p.payload = cbor::json_to_cbor(&json).unwrap();
            msg::set_content_format(&mut p, CONTENT_FORMAT_DOTS_CBOR);
            fs::write(dir.join(format!("{name}.cbor")), &p.payload).unwrap();
        }
        fs::write(dir.join(format!("{name}.udp")), p.to_bytes().unwrap()).unwrap();
        fs::write(
            dir.join(format!("{name}.tcp")),
            framing::encode(&p).unwrap(),
        )
        .unwrap();
    }
    // Malformed ones: truncated, wrong version, absurd extended length.
    fs::write(dir.join("bad-truncated.udp"), [0x42, 0x03, 0x12]).unwrap();
    fs::write(
        dir.join("bad-version.udp"),
        [0x82, 0x03, 0x12, 0x34, 0xd0, 0x75],
    )
    .unwrap();
    fs::write(
        dir.join("bad-huge-length.tcp"),
        [0xf2, 0xff, 0xff, 0xff, 0xff, 0x03],
    )
    .unwrap();
}

#[test]
fn replay_seed_corpus() {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .expect("fuzz/corpus/decode exists")
        .map(|e| e.expect("readable entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "seed corpus missing: {} files",
        files.len()
    );
    let well_formed: Vec<&str> = seeds().iter().map(|(name, ..)| *name).collect();
    let now = Instant::now();
    for f in &files {
        let data = fs::read(f).unwrap();
        let accepted = decode_everything(now, &data);
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        // Well-formed seeds must get past some decoder: the corpus reaches
        // the deep parts of the path. The rest only must not panic.
        let stem = name.split('.').next().unwrap_or_default();
        if well_formed.contains(&stem) {
            assert!(accepted > 0, "{name} was rejected by every decoder");
        }
    }
}
