//! A standard CoAP client drives the agent: libcoap's `coap-client` (Debian's
//! libcoap3-bin) as the Call Home DOTS client.
//!
//! libcoap 4.3 cannot take the reversed (D)TLS role of Call Home (be the DTLS
//! server while being the CoAP client), so the test terminates the agent's
//! DTLS connection with this project's listener and relays the decrypted CoAP
//! datagrams, byte for byte, to and from `coap-client-notls` on loopback. Every
//! CoAP message the agent sees is libcoap's, and every answer libcoap reads is
//! the agent's.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use dots_daemon::transport::{Incoming, ListenOptions, Listener};
use dots_proto::cbor;
use tests::procs::{loopback_agent, loopback_pki, TempDir};
use tokio::net::UdpSocket;

const CUID: &str = "libcoap-interop";

fn coap_client(args: &[&str]) -> Result<()> {
    let out = Command::new("coap-client-notls")
        .args(["-B", "10"])
        .args(args)
        .output()
        .context("running coap-client-notls (Debian package libcoap3-bin)")?;
    if !out.status.success() {
        bail!(
            "coap-client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn decode_file(path: &Path) -> Result<serde_json::Value> {
    let bytes =
        std::fs::read(path).with_context(|| format!("no answer written to {}", path.display()))?;
    cbor::cbor_to_json(&bytes)
        .map_err(|e| anyhow::anyhow!("answer is not DOTS CBOR: {}", e.diagnostic()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_client_drives_the_agent() -> Result<()> {
    let dir = TempDir::new("interop")?;
    let (lab, creds) = loopback_pki(&dir.path)?;
    let mut listener = Listener::bind(
        Some("127.0.0.1:0".parse()?),
        None,
        &creds,
        ListenOptions::default(),
    )
    .await?;
    let port = listener.local_udp_addr().context("no UDP address")?.port();

    let mut agent = loopback_agent(&lab, port, "udp", &dir.path)?.spawn()?;
    let mut conn = tokio::time::timeout(Duration::from_secs(15), listener.accept())
        .await
        .context("agent did not dial")??;

    // The relay: plain CoAP from coap-client <-> the agent's DTLS session.
    let plain = UdpSocket::bind("127.0.0.1:0").await?;
    let relay_addr = plain.local_addr()?;
    let relay = tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut buf = vec![0u8; 2048];
        loop {
            tokio::select! {
                got = plain.recv_from(&mut buf) => {
                    let Ok((n, from)) = got else { return };
                    client = Some(from);
                    if conn.send(&buf[..n]).await.is_err() { return; }
                }
                got = conn.recv() => match got {
                    Ok(Incoming::Datagram(d)) => {
                        if let Some(c) = client { let _ = plain.send_to(&d, c).await; }
                    }
                    _ => return,
                },
            }
        }
    });

    let base = format!("coap://{relay_addr}/.well-known/dots");
    let file = |name: &str| dir.path.join(name).display().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            coap_client(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };

    // GET config.
    run(vec![
        "-m".into(),
        "get".into(),
        "-o".into(),
        file("config.cbor"),
        format!("{base}/config"),
    ])
    .await??;
    let config = decode_file(&dir.path.join("config.cbor"))?;
    assert!(
        config["ietf-dots-signal-channel:signal-config"]["mitigating-config"].is_object(),
        "{config}"
    );

    // PUT a mitigation (CBOR body, Content-Format 271).
    let request = serde_json::json!({"ietf-dots-signal-channel:mitigation-scope": {"scope": [{
        "target-prefix": ["198.51.100.7/32"],
        "ietf-dots-call-home:source-prefix": ["192.0.2.10/32"],
        "lifetime": 600}]}});
    std::fs::write(
        dir.path.join("req.cbor"),
        cbor::json_to_cbor(&request).map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    let mitigate = format!("{base}/mitigate/cuid={CUID}/mid=7");
    run(vec![
        "-m".into(),
        "put".into(),
        "-t".into(),
        "271".into(),
        "-f".into(),
        file("req.cbor"),
        "-o".into(),
        file("put.cbor"),
        mitigate.clone(),
    ])
    .await??;
    let put = decode_file(&dir.path.join("put.cbor"))?;
    assert_eq!(
        put["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["status"],
        "attack-mitigation-in-progress",
        "{put}"
    );

    // GET with Observe for two seconds: at least the first answer arrives.
    run(vec![
        "-s".into(),
        "2".into(),
        "-o".into(),
        file("observe.cbor"),
        format!("{base}/mitigate/cuid={CUID}"),
    ])
    .await??;
    let observed = std::fs::read(dir.path.join("observe.cbor"))?;
    // Notifications are written back to back: the shortest prefix that
    // decodes is the first answer.
    let first = (1..=observed.len())
        .find_map(|k| cbor::cbor_to_json(&observed[..k]).ok())
        .context("observe delivered no DOTS CBOR")?;
    assert_eq!(
        first["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["mid"], 7,
        "{first}"
    );

    // DELETE: 2.02 with the final state.
    run(vec![
        "-m".into(),
        "delete".into(),
        "-o".into(),
        file("delete.cbor"),
        mitigate,
    ])
    .await??;
    let deleted = decode_file(&dir.path.join("delete.cbor"))?;
    assert_eq!(
        deleted["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["mid"], 7,
        "{deleted}"
    );

    relay.abort();
    let _ = agent.kill().await;
    Ok(())
}
