//! The trust boundary with the real agent.
//!
//! * A hostile Call Home peer over real TLS on loopback: garbage instead of
//!   the CSM, a length claiming gigabytes, a connection that never sends
//!   its CSM, hostile requests written one byte at a time. The agent
//!   answers 4.xx or aborts (and logs the real cause), redials at once,
//!   keeps its mitigation unchanged and its memory flat.
//! * never-block in the kernel: a scope entirely under never-block is
//!   refused with 4.09 (conflict-cause 4, RFC 9066 §5.3.1) and nothing is
//!   dropped; a scope partly under it is enforced for the rest, the exempt
//!   host's traffic still flows, and the peer and the operator are told.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_daemon::transport::{Connection, Incoming, ListenOptions, Listener};
use dots_proto::{
    coap::{
        framing, msg, CoapOption, Delivery, DotsResource, Endpoint, Event, MessageClass, Packet,
        RequestType, ResponseType, StreamConfig, StreamEndpoint, Token, CONTENT_FORMAT_DOTS_CBOR,
    },
    model::{DotsMessage, MitigationScope, Scope},
};
use serde_json::Value;
use tests::{
    lab::*,
    procs::{bin, loopback_agent, loopback_pki, TempDir},
};

const CUID: &str = "hostile-peer";
const WAIT: Duration = Duration::from_secs(20);

fn put(mid: u32, source: &str, target: &str) -> Packet {
    let mut p = DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(mid),
    }
    .request(RequestType::Put);
    p.payload = MitigationScope {
        scopes: vec![Scope {
            source_prefix: vec![source.parse().expect("prefix")],
            target_prefix: vec![target.parse().expect("prefix")],
            lifetime: Some(3600),
            ..Scope::default()
        }],
    }
    .encode();
    msg::set_content_format(&mut p, CONTENT_FORMAT_DOTS_CBOR);
    p
}

fn get(mid: u32) -> Packet {
    DotsResource::Mitigate {
        cdid: None,
        cuid: CUID.into(),
        mid: Some(mid),
    }
    .request(RequestType::Get)
}

fn csm() -> Vec<u8> {
    framing::encode(
        &framing::Signal::Csm {
            max_message_size: Some(1152),
            block_wise: false,
        }
        .to_packet(Token::EMPTY),
    )
    .expect("frame")
}

/// A peer speaking CoAP over the agent's TLS connection, with requests
/// written to the socket `chunk` bytes at a time.
struct Peer {
    conn: Connection,
    ep: StreamEndpoint,
}

impl Peer {
    fn new(conn: Connection) -> Result<Peer> {
        Ok(Peer {
            conn,
            ep: StreamEndpoint::new(StreamConfig::default(), 7)?,
        })
    }

    async fn request(&mut self, p: Packet, chunk: usize) -> Result<(ResponseType, Vec<u8>)> {
        let now = Instant::now();
        let token = self.ep.send_request(now, p, Delivery::Confirmable)?;
        while let Some(bytes) = self.ep.poll_transmit() {
            for c in bytes.chunks(chunk) {
                self.conn.send(c).await?;
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = tokio::time::timeout_at(deadline, self.conn.recv())
                .await
                .context("no answer")??;
            let Incoming::Stream(bytes) = got else {
                bail!("connection closed while waiting for an answer");
            };
            for e in self.ep.handle_input(Instant::now(), &bytes)? {
                if let Event::Response { token: t, response } = e {
                    if t == token {
                        let MessageClass::Response(code) = response.header.code else {
                            bail!("not a response");
                        };
                        return Ok((code, response.payload));
                    }
                }
            }
            while let Some(out) = self.ep.poll_transmit() {
                self.conn.send(&out).await?;
            }
        }
    }
}

/// The agent's next connection.
async fn accept(l: &mut Listener) -> Result<Connection> {
    Ok(tokio::time::timeout(WAIT, l.accept())
        .await
        .context("the agent did not dial")??)
}

/// Reads until the agent closes the connection; the Abort diagnostic it
/// sent, and how long it took.
async fn abort_and_close(conn: &mut Connection) -> Result<(String, Duration)> {
    let start = Instant::now();
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, conn.recv())
            .await
            .context("not closed")?
        {
            Ok(Incoming::Stream(b)) => bytes.extend(b),
            Ok(Incoming::Closed) | Err(_) => break,
            Ok(Incoming::Datagram(_)) => bail!("a datagram on TLS"),
        }
    }
    let frames = framing::StreamDecoder::new(1 << 20)
        .feed(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let abort = frames
        .iter()
        .find_map(|f| match framing::Signal::from_packet(f) {
            Ok(framing::Signal::Abort { diagnostic, .. }) => Some(diagnostic),
            _ => None,
        });
    Ok((abort.context("no Abort before the close")?, start.elapsed()))
}

fn vm_rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn mitigations(control: &Path) -> Result<Vec<Value>> {
    let out = std::process::Command::new(bin("dots-agent")?)
        .arg("mitigations")
        .arg("--json")
        .arg("--control")
        .arg(control)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["body"].as_array().cloned());
    list.context("no list")
}

/// What identifies a mitigation and its state (the lifetime left moves).
fn fingerprint(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|m| {
            format!(
                "{} {} {} {} {}",
                m["cuid"], m["mid"], m["state"], m["sources"], m["targets"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tls_peer_is_aborted_and_the_agent_redials() -> Result<()> {
    let dir = TempDir::new("trust")?;
    let (lab, creds) = loopback_pki(&dir.path)?;
    let mut listener = Listener::bind(
        None,
        Some("127.0.0.1:0".parse()?),
        &creds,
        ListenOptions::default(),
    )
    .await?;
    let port = listener.local_tcp_addr().context("no TCP address")?.port();
    let control = dir.path.join("agent.sock");
    let log = dir.path.join("agent.log");
    let mut agent = loopback_agent(&lab, port, "tcp", &dir.path)?
        .env("RUST_LOG", "info")
        .spawn()?;
    let pid = agent.id().context("no pid")?;
    let result = async {
        // A well-behaved session first: one mitigation.
        let mut peer = Peer::new(accept(&mut listener).await?)?;
        let (code, _) = peer
            .request(put(1, "192.0.2.10/32", "203.0.113.0/24"), 4096)
            .await?;
        assert_eq!(code, ResponseType::Created);
        let before = fingerprint(&mitigations(&control)?);
        assert_eq!(before.len(), 1, "{before:?}");
        let rss_before = vm_rss_kb(pid)?;

        // Hostile requests in that session, written one byte at a time:
        // each gets its 4.xx, and a valid one still gets its answer.
        let mut none_match = put(1, "192.0.2.99/32", "198.51.100.0/24");
        none_match.add_option(CoapOption::IfNoneMatch, vec![]);
        let mut json = get(1);
        json.add_option(CoapOption::Accept, vec![50]);
        let mut leading_zero = put(2, "192.0.2.10/32", "203.0.113.0/24");
        leading_zero.payload = dots_proto::cbor::json_to_cbor(&serde_json::json!(
            {"ietf-dots-signal-channel:mitigation-scope": {"scope": [{
                "target-prefix": ["203.0.113.0/24"],
                "ietf-dots-call-home:source-prefix": ["192.0.2.010/32"],
                "lifetime": 60}]}}
        ))?;
        for (request, expected) in [
            (none_match, ResponseType::PreconditionFailed),
            (json, ResponseType::NotAcceptable),
            (leading_zero, ResponseType::BadRequest),
            (
                put(0, "192.0.2.10/32", "203.0.113.0/24"),
                ResponseType::Conflict,
            ),
            (get(1), ResponseType::Content),
        ] {
            let (code, body) = peer.request(request, 1).await?;
            assert_eq!(code, expected, "{}", String::from_utf8_lossy(&body));
        }
        drop(peer);

        // Broken framing, each on a new connection: Abort, close, redial.
        let cases: [(&str, Vec<Vec<u8>>, &str); 4] = [
            (
                "garbage instead of the CSM",
                vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()],
                "invalid options",
            ),
            (
                "a request before the CSM",
                vec![framing::encode(&get(1))?],
                "first message is not a CSM",
            ),
            (
                "a length claiming gigabytes",
                vec![csm(), vec![0xf0, 0xff, 0xff, 0xff, 0xf0, 0x01]],
                "exceeds Max-Message-Size",
            ),
            (
                "a connection that never sends its CSM",
                Vec::new(),
                "no CSM from the peer within 10s",
            ),
        ];
        for (what, writes, cause) in cases {
            let redial = Instant::now();
            let mut conn = accept(&mut listener).await.context(what)?;
            println!("{what}: the agent redialled in {:?}", redial.elapsed());
            for w in writes {
                conn.send(&w).await?;
            }
            let (diagnostic, took) = abort_and_close(&mut conn).await.context(what)?;
            assert!(
                diagnostic.contains(cause),
                "{what}: Abort says {diagnostic:?}"
            );
            assert!(
                took < Duration::from_secs(15),
                "{what}: closed after {took:?}"
            );
            println!("{what}: Abort {diagnostic:?} and close after {took:?}");
            // The agent's log names the real cause, not silence.
            let t = Instant::now();
            while !std::fs::read_to_string(&log)?.contains(cause) && t.elapsed() < WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let text = std::fs::read_to_string(&log)?;
            assert!(
                text.lines().any(|l| l.contains("session lost")
                    && l.contains("the peer broke the protocol: ")
                    && l.contains(cause)),
                "{what}: log:\n{text}"
            );
        }
        assert!(
            !std::fs::read_to_string(&log)?.contains("no traffic from the peer"),
            "no loss was blamed on silence"
        );

        // It redials once more, serves, and holds what it held.
        let mut peer = Peer::new(accept(&mut listener).await?)?;
        let (code, _) = peer.request(get(1), 4096).await?;
        assert_eq!(code, ResponseType::Content);
        assert_eq!(fingerprint(&mitigations(&control)?), before);
        let rss_after = vm_rss_kb(pid)?;
        println!("agent VmRSS: {rss_before} kB before the hostile cases, {rss_after} kB after");
        assert!(
            rss_after < rss_before + 4096,
            "memory grew from {rss_before} kB to {rss_after} kB"
        );
        assert!(agent.try_wait()?.is_none(), "the agent is still running");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_err() {
        eprintln!(
            "---- agent log ----\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let _ = agent.kill().await;
    result
}

#[test]
fn never_block_overlap_is_refused_or_reported() -> Result<()> {
    const HOSTB4: &str = "192.0.2.18";
    let mut lab = Lab::new()?;
    lab.start_client()?;
    lab.start_agent(&["--never-block", &format!("{HOSTB4}/32")])?;
    let sink = Sink::open(&lab.target)?;
    for ns in [&lab.hosta, &lab.hostb] {
        send(ns, TARGET4, 3, "warmup")?;
    }
    let _ = sink.count("warmup");

    // Entirely exempt: 4.09, conflict-cause 4, nothing installed.
    let (code, _, body) = lab.mitigate(&format!("{HOSTB4}/32"), &format!("{TARGET4}/32"), &[])?;
    assert_eq!(code, "4.09 Conflict", "{body}");
    let conflict =
        &body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["conflict-information"];
    assert_eq!(
        conflict["conflict-cause"], "request-rejected-legitimate-traffic",
        "{body}"
    );
    send(&lab.hostb, TARGET4, 50, "refused")?;
    assert_eq!(sink.count("refused"), 50, "nothing was installed");

    // Partly exempt: both hosts (a /31 around each, not the router's own
    // addresses, which would make it a NAT request), enforced for host A
    // only.
    let (code, mid, body) = lab.mitigate(
        &format!("{HOSTA4}/31"),
        &format!("{TARGET4}/32"),
        &["--source", "192.0.2.18/31"],
    )?;
    assert_eq!(code, "2.01 Created", "{body}");
    let conflict =
        &body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["conflict-information"];
    assert_eq!(conflict["conflict-status"], "request-active", "{body}");
    assert_eq!(
        conflict["conflict-cause"], "request-rejected-legitimate-traffic",
        "{body}"
    );
    assert_eq!(
        conflict["conflict-scope"]["ietf-dots-call-home:source-prefix"][0],
        format!("{HOSTB4}/32"),
        "{body}"
    );
    let status = lab.wait_status(mid, "attack-successfully-mitigated")?;
    assert!(status["conflict-information"].is_object(), "{status}");
    send(&lab.hosta, TARGET4, 100, "attacker")?;
    send(&lab.hostb, TARGET4, 100, "exempt")?;
    assert_eq!(sink.count("attacker"), 0, "host A is dropped");
    assert_eq!(sink.count("exempt"), 100, "the never-block host is not");
    // The operator is told as well.
    assert!(
        lab.agent_log().contains("part of the mitigation is exempt"),
        "{}",
        lab.agent_log()
    );
    let (ok, out) = lab.agent_cmd(&["mitigations", "--json"])?;
    assert!(ok && out.contains(&format!("{HOSTB4}/32")), "{out}");
    let (ok, out) = lab.agent_cmd(&["mitigations"])?;
    assert!(
        ok && out.contains(&format!("exempt, not dropped: {HOSTB4}/32")),
        "{out}"
    );
    Ok(())
}
