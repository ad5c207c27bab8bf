//! The (D)TLS transport on loopback: real handshakes with certificates from a
//! throw-away PKI, both transports, authentication failures in each
//! direction, resumption, loss, Happy Eyeballs, bans and garbage.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use dots_daemon::{
    pki::{issue, new_ca, Identity, San},
    transport::{
        dial, Connection, Credentials, DatagramLoss, DialOptions, Dialer, FailurePolicy, Incoming,
        ListenOptions, Listener, PeerIdentity, Transport, TransportError,
    },
};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ANY_PORT: SocketAddr = SocketAddr::new(LOCAL, 0);
const BOTH: [Transport; 2] = [Transport::Udp, Transport::Tcp];
const ISP: &str = "isp.example";

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(tests::unique("dots-transport-"));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lab PKI: one CA with the ISP side, two agents and a server whose name
/// is wrong; a second CA with an impostor agent.
struct Pki {
    _dir: TempDir,
    server: Credentials,
    wrong_san_server: Credentials,
    cpe1: Credentials,
    cpe2: Credentials,
    impostor: Credentials,
}

fn write(dir: &Path, ca_pem: &Path, id: &Identity, stem: &str) -> Result<Credentials> {
    let (cert, key) = id.write(dir, stem)?;
    Ok(Credentials {
        ca: ca_pem.to_path_buf(),
        cert,
        key,
    })
}

impl Pki {
    fn new() -> Result<Pki> {
        let dir = TempDir::new()?;
        let d = &dir.0;
        let ca = new_ca("transport test CA", 1)?;
        let (ca_pem, _) = ca.write(d, "ca")?;
        let other = new_ca("another CA", 1)?;
        let server = issue(
            &ca,
            ISP,
            &[San::parse(ISP), San::parse("127.0.0.1"), San::parse("::1")],
            1,
        )?;
        let wrong = issue(
            &ca,
            "elsewhere.example",
            &[San::parse("elsewhere.example")],
            1,
        )?;
        let cpe1 = issue(&ca, "cpe1", &[San::parse("cpe1")], 1)?;
        let cpe2 = issue(&ca, "cpe2", &[San::parse("cpe2")], 1)?;
        let impostor = issue(&other, "cpe1", &[San::parse("cpe1")], 1)?;
        Ok(Pki {
            server: write(d, &ca_pem, &server, "server")?,
            wrong_san_server: write(d, &ca_pem, &wrong, "wrong")?,
            cpe1: write(d, &ca_pem, &cpe1, "cpe1")?,
            cpe2: write(d, &ca_pem, &cpe2, "cpe2")?,
            // trusts the right CA, so that it accepts the listener and only
            // the listener can reject it
            impostor: write(d, &ca_pem, &impostor, "impostor")?,
            _dir: dir,
        })
    }
}

async fn listen(creds: &Credentials, opts: ListenOptions) -> Result<Listener> {
    Ok(Listener::bind(Some(ANY_PORT), Some(ANY_PORT), creds, opts).await?)
}

fn addr_of(l: &Listener, t: Transport) -> Result<SocketAddr> {
    match t {
        Transport::Udp => l.local_udp_addr(),
        Transport::Tcp => l.local_tcp_addr(),
    }
    .ok_or_else(|| anyhow!("listener has no {t} address"))
}

/// Logs to the test output with RUST_LOG=debug.
fn logs() {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let filter = dots_daemon::logging::filter_from_env().unwrap_or_default();
    let layer = tracing_subscriber::fmt::layer().with_test_writer();
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

fn isp() -> PeerIdentity {
    PeerIdentity::Dns(ISP.into())
}

fn quick() -> DialOptions {
    DialOptions {
        handshake_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn accept_within(l: &mut Listener, d: Duration) -> Result<Option<Connection>> {
    match tokio::time::timeout(d, l.accept()).await {
        Ok(c) => Ok(Some(c?)),
        Err(_) => Ok(None),
    }
}

/// Receives `n` bytes (one datagram, or stream chunks) within 5 s.
async fn recv_bytes(c: &mut Connection, n: usize) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, c.recv()).await?? {
            Incoming::Datagram(d) => return Ok(d),
            Incoming::Stream(b) => got.extend(b),
            Incoming::Closed => bail!("closed after {} bytes", got.len()),
        }
    }
    Ok(got)
}

/// Both directions carry data.
async fn exchange(agent: &mut Connection, server: &mut Connection) -> Result<()> {
    agent.send(b"ping from agent").await?;
    assert_eq!(recv_bytes(server, 15).await?, b"ping from agent");
    server.send(b"pong from isp").await?;
    assert_eq!(recv_bytes(agent, 13).await?, b"pong from isp");
    Ok(())
}

/// The agent did not get a working session: the dial failed, or (TLS 1.3,
/// where the client finishes before the server checks its certificate) the
/// connection dies at once.
async fn assert_rejected(r: Result<Connection, TransportError>) -> Result<()> {
    match r {
        Err(e) => {
            eprintln!("rejected as expected: {e}");
            Ok(())
        }
        Ok(mut c) => match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            Ok(Ok(Incoming::Closed)) | Ok(Err(_)) => Ok(()),
            other => bail!(
                "connection over {} was not rejected: {other:?}",
                c.transport()
            ),
        },
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn handshake_and_bidirectional_data_on_both_transports() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.server, ListenOptions::default()).await?;
    for t in BOTH {
        for peer in [isp(), PeerIdentity::Ip(LOCAL)] {
            let mut agent = dial(&[(addr_of(&l, t)?, t)], &pki.cpe1, &peer, quick()).await?;
            let mut server = accept_within(&mut l, Duration::from_secs(5))
                .await?
                .ok_or(anyhow!("no accept"))?;
            assert_eq!(agent.transport(), t);
            assert_eq!(server.transport(), t);
            assert_eq!(agent.peer_identity().as_deref(), Some(ISP));
            assert_eq!(server.peer_identity().as_deref(), Some("cpe1"));
            assert_eq!(server.peer_addr(), agent.local_addr()?);
            assert!(!agent.session_reused());
            let v = agent.protocol_version();
            assert!(
                v == if t == Transport::Udp {
                    "DTLSv1.2"
                } else {
                    "TLSv1.3"
                },
                "{v}"
            );
            exchange(&mut agent, &mut server).await?;
            // several messages in a row, then an orderly close
            for i in 0..20u8 {
                agent.send(&[i; 100]).await?;
            }
            let all = recv_bytes(&mut server, if t == Transport::Udp { 100 } else { 2000 }).await?;
            assert_eq!(&all[..100], &[0u8; 100][..]);
            agent.close().await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(deadline, server.recv()).await?? {
                    Incoming::Closed => break,
                    Incoming::Datagram(_) | Incoming::Stream(_) => {}
                }
            }
        }
    }
    assert_eq!(l.stats().accepted, 4);
    Ok(())
}

#[tokio::test]
async fn agent_with_certificate_from_another_ca_is_rejected() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.server, ListenOptions::default()).await?;
    for (i, t) in BOTH.into_iter().enumerate() {
        assert_rejected(dial(&[(addr_of(&l, t)?, t)], &pki.impostor, &isp(), quick()).await)
            .await?;
        assert!(accept_within(&mut l, Duration::from_millis(500))
            .await?
            .is_none());
        wait_for("the failure to be counted", || {
            l.stats().handshake_failures > i as u64
        })
        .await?;
    }
    assert_eq!(l.stats().accepted, 0);
    Ok(())
}

#[tokio::test]
async fn server_whose_name_does_not_match_is_rejected() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.wrong_san_server, ListenOptions::default()).await?;
    for t in BOTH {
        let r = dial(&[(addr_of(&l, t)?, t)], &pki.cpe1, &isp(), quick()).await;
        let e = r
            .err()
            .ok_or(anyhow!("{t}: dial to a misnamed server worked"))?;
        let msg = e.to_string();
        assert!(
            msg.contains("certificate verification failed") && msg.contains("mismatch"),
            "{msg}"
        );
        assert!(accept_within(&mut l, Duration::from_millis(300))
            .await?
            .is_none());
    }
    // and the right name for the same server works
    let t = Transport::Tcp;
    let ok = PeerIdentity::Dns("elsewhere.example".into());
    dial(&[(addr_of(&l, t)?, t)], &pki.cpe1, &ok, quick()).await?;
    Ok(())
}

#[tokio::test]
async fn allow_list_rejects_other_agents() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let opts = ListenOptions {
        allow: Some(vec!["cpe2".into()]),
        ..Default::default()
    };
    let mut l = listen(&pki.server, opts).await?;
    for t in BOTH {
        let a = addr_of(&l, t)?;
        assert_rejected(dial(&[(a, t)], &pki.cpe1, &isp(), quick()).await).await?;
        assert!(accept_within(&mut l, Duration::from_millis(300))
            .await?
            .is_none());
        let _agent = dial(&[(a, t)], &pki.cpe2, &isp(), quick()).await?;
        let server = accept_within(&mut l, Duration::from_secs(5))
            .await?
            .ok_or(anyhow!("cpe2 not accepted"))?;
        assert_eq!(server.peer_identity().as_deref(), Some("cpe2"));
    }
    Ok(())
}

#[tokio::test]
async fn sessions_are_resumed_on_reconnect() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.server, ListenOptions::default()).await?;
    let mut dialer = Dialer::new(&pki.cpe1, quick())?;
    for t in BOTH {
        let cands = [(addr_of(&l, t)?, t)];
        let mut agent = dialer.dial(&cands, &isp()).await?;
        let mut server = accept_within(&mut l, Duration::from_secs(5))
            .await?
            .ok_or(anyhow!("no accept"))?;
        assert!(!agent.session_reused() && !server.session_reused());
        // TLS 1.3 tickets arrive after the handshake: the exchange reads them
        exchange(&mut agent, &mut server).await?;
        agent.close().await;
        drop((agent, server));
        let mut agent = dialer.dial(&cands, &isp()).await?;
        let mut server = accept_within(&mut l, Duration::from_secs(5))
            .await?
            .ok_or(anyhow!("no accept"))?;
        assert!(agent.session_reused(), "{t}: agent did not resume");
        assert!(server.session_reused(), "{t}: server did not resume");
        assert_eq!(server.peer_identity().as_deref(), Some("cpe1"));
        assert_eq!(agent.peer_identity().as_deref(), Some(ISP));
        exchange(&mut agent, &mut server).await?;
    }
    assert_eq!(dialer.sessions().len(), 2);
    Ok(())
}

#[tokio::test]
async fn dtls_handshake_survives_loss() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.server, ListenOptions::default()).await?;
    // Lost: the first ClientHello, the ClientHello with the cookie, and the
    // first datagram of the server's flight. Only the retransmission timers
    // (1 s initial) can recover.
    let loss = DatagramLoss {
        drop_outgoing: vec![0, 2],
        drop_incoming: vec![1],
    };
    let opts = DialOptions {
        loss: Some(loss),
        handshake_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut agent = dial(
        &[(addr_of(&l, Transport::Udp)?, Transport::Udp)],
        &pki.cpe1,
        &isp(),
        opts,
    )
    .await?;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "three losses recovered in {took:?}?"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    let mut server = accept_within(&mut l, Duration::from_secs(5))
        .await?
        .ok_or(anyhow!("no accept"))?;
    exchange(&mut agent, &mut server).await?;
    Ok(())
}

#[tokio::test]
async fn happy_eyeballs_falls_back_to_tcp() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = Listener::bind(None, Some(ANY_PORT), &pki.server, ListenOptions::default()).await?;
    let tcp = addr_of(&l, Transport::Tcp)?;
    // UDP silently blocked: a socket that never answers. TLS starts after
    // the DTLS head start and wins.
    let blackhole = tokio::net::UdpSocket::bind(tcp).await?;
    let cands = [(tcp, Transport::Udp), (tcp, Transport::Tcp)];
    let opts = DialOptions {
        transport_delay: Duration::from_millis(300),
        ..quick()
    };
    let t0 = Instant::now();
    let agent = dial(&cands, &pki.cpe1, &isp(), opts.clone()).await?;
    assert_eq!(agent.transport(), Transport::Tcp);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    accept_within(&mut l, Duration::from_secs(5))
        .await?
        .ok_or(anyhow!("no accept"))?;
    drop(blackhole);
    // UDP refused (ICMP port unreachable): TLS starts at once, long before
    // its head start would have run out.
    let opts = DialOptions {
        transport_delay: Duration::from_secs(5),
        ..quick()
    };
    let t0 = Instant::now();
    let agent = dial(&cands, &pki.cpe1, &isp(), opts).await?;
    assert_eq!(agent.transport(), Transport::Tcp);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn happy_eyeballs_prefers_ipv6() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let v6: SocketAddr = "[::1]:0".parse()?;
    let Ok(mut l6) =
        Listener::bind(Some(v6), Some(v6), &pki.server, ListenOptions::default()).await
    else {
        eprintln!("no IPv6 loopback: skipped");
        return Ok(());
    };
    let mut l4 = listen(&pki.server, ListenOptions::default()).await?;
    let opts = DialOptions {
        family_delay: Duration::from_secs(3),
        ..quick()
    };
    for t in BOTH {
        let cands = [(addr_of(&l4, t)?, t), (addr_of(&l6, t)?, t)];
        let agent = dial(&cands, &pki.cpe1, &isp(), opts.clone()).await?;
        assert!(agent.peer_addr().is_ipv6(), "{t}: {:?}", agent.peer_addr());
        accept_within(&mut l6, Duration::from_secs(5))
            .await?
            .ok_or(anyhow!("no accept"))?;
    }
    assert!(accept_within(&mut l4, Duration::from_millis(100))
        .await?
        .is_none());
    Ok(())
}

#[tokio::test]
async fn repeated_failures_get_the_address_banned() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let policy = FailurePolicy {
        threshold: 2,
        window: Duration::from_secs(60),
        ban: Duration::from_secs(60),
    };
    for t in BOTH {
        let mut l = Listener::bind(
            (t == Transport::Udp).then_some(ANY_PORT),
            (t == Transport::Tcp).then_some(ANY_PORT),
            &pki.server,
            ListenOptions {
                failures: policy,
                ..Default::default()
            },
        )
        .await?;
        let a = addr_of(&l, t)?;
        for _ in 0..2 {
            assert_rejected(dial(&[(a, t)], &pki.impostor, &isp(), quick()).await).await?;
        }
        wait_for("the ban", || l.is_banned(LOCAL)).await?;
        // now even a good agent from that address is ignored
        let opts = DialOptions {
            handshake_timeout: Duration::from_secs(2),
            ..quick()
        };
        assert!(
            dial(&[(a, t)], &pki.cpe1, &isp(), opts).await.is_err(),
            "{t}: banned address got through"
        );
        assert!(accept_within(&mut l, Duration::from_millis(300))
            .await?
            .is_none());
        assert!(l.stats().banned_drops >= 1, "{t}: {:?}", l.stats());
        assert_eq!(l.stats().accepted, 0);
    }
    Ok(())
}

#[tokio::test]
async fn dialer_skips_a_peer_that_keeps_failing() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let l = listen(&pki.wrong_san_server, ListenOptions::default()).await?;
    let policy = FailurePolicy {
        threshold: 2,
        window: Duration::from_secs(60),
        ban: Duration::from_secs(60),
    };
    let mut dialer = Dialer::new(
        &pki.cpe1,
        DialOptions {
            failures: policy,
            ..quick()
        },
    )?;
    let cands = [(addr_of(&l, Transport::Tcp)?, Transport::Tcp)];
    for _ in 0..2 {
        assert!(matches!(
            dialer.dial(&cands, &isp()).await,
            Err(TransportError::AllFailed(_))
        ));
    }
    assert!(dialer.is_banned(&cands[0].0));
    assert!(matches!(
        dialer.dial(&cands, &isp()).await,
        Err(TransportError::AllBanned)
    ));
    Ok(())
}

#[tokio::test]
async fn plaintext_and_garbage_create_no_connection() -> Result<()> {
    logs();
    let pki = Pki::new()?;
    let mut l = listen(&pki.server, ListenOptions::default()).await?;
    let udp = tokio::net::UdpSocket::bind(ANY_PORT).await?;
    udp.connect(addr_of(&l, Transport::Udp)?).await?;
    udp.send(b"GET /.well-known/dots/hb plaintext, not DTLS")
        .await?;
    // looks like a DTLS handshake record, is not one
    let mut fake = vec![22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40];
    fake.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    udp.send(&fake).await?;
    udp.send(&[0u8; 3000]).await?;
    let mut tcp = tokio::net::TcpStream::connect(addr_of(&l, Transport::Tcp)?).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: isp.example\r\n\r\n")
        .await?;
    let mut sink = Vec::new();
    // the server answers with at most an alert, then closes
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await?;
    assert!(accept_within(&mut l, Duration::from_millis(500))
        .await?
        .is_none());
    let s = l.stats();
    assert_eq!(s.accepted, 0);
    assert!(s.stateless_drops >= 3, "{s:?}");
    assert!(s.handshake_failures >= 1, "{s:?}");
    // nothing answered the UDP garbage
    let mut buf = [0u8; 100];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), udp.recv(&mut buf))
            .await
            .is_err()
    );
    // and real agents still get in
    for t in BOTH {
        dial(&[(addr_of(&l, t)?, t)], &pki.cpe1, &isp(), quick()).await?;
        accept_within(&mut l, Duration::from_secs(5))
            .await?
            .ok_or(anyhow!("no accept"))?;
    }
    Ok(())
}
