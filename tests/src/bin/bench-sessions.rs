//! `cargo xtask bench sessions`: how many agents one `dots-client` holds on
//! this machine. N simulated agents run in this process over loopback, each
//! with its own certificate, a real (D)TLS handshake (Call Home: the agent
//! dials), the real protocol core in the server role (`SignalServer`, monitor
//! mode: it answers mitigation requests as an agent does, installs nothing)
//! and real heartbeats, against one `dots-client listen` process (the
//! release binary).
//!
//! Per transport and N it measures: handshakes per second (all agents
//! dialling, 256 at a time), the client's resident memory per session, its
//! CPU at steady heartbeats, and the latency of a mitigation through the
//! HTTPS API until the agent's 2.01 is back (p50/p99, one request at a time,
//! each to a different agent, all sessions up). Writes
//! `target/bench/sessions.json` and the "## Sessions" section of
//! docs/benchmarks.md.
//!
//! Loopback only, in a network namespace of its own (so that nothing else
//! on the machine is in the way); every loop is bounded in count and time.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_daemon::{
    pki::{self, San},
    transport::{Connection, Credentials, DialOptions, Dialer, Incoming, PeerIdentity, Transport},
};
use dots_proto::{
    coap::{DatagramConfig, DatagramEndpoint, Endpoint, StreamConfig, StreamEndpoint},
    signal::{Action, Counters, EnforcementMode, ServerConfig, SignalServer},
};
use serde_json::json;
use tests::{
    bench::{
        agent_name, customer_addr, enter_netns, percentile, write_json, write_section, ApiClient,
        BenchArgs,
    },
    procs::{bin, Proc, TempDir},
};
use tokio::sync::{watch, Semaphore};

const TOKEN: &str = "bench-sessions-token-0123456789";
const LISTEN: &str = "127.0.0.1:4647";
const API: &str = "127.0.0.1:8443";
/// Handshakes in flight from the simulated agents.
const DIAL_CONCURRENCY: usize = 256;

struct Args {
    json: PathBuf,
    doc: PathBuf,
    sizes: Vec<usize>,
    transports: Vec<Transport>,
    requests: usize,
    steady: Duration,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse(
        "sessions",
        &["--sizes", "--transports", "--requests", "--steady"],
        &[],
    )?;
    let sizes = b
        .value("--sizes", "1000,10000".to_string())?
        .split(',')
        .map(|s| s.parse().context("--sizes N,N"))
        .collect::<Result<_>>()?;
    let transports = b
        .value("--transports", "udp,tcp".to_string())?
        .split(',')
        .map(|s| match s {
            "udp" => Ok(Transport::Udp),
            "tcp" => Ok(Transport::Tcp),
            _ => bail!("--transports udp,tcp"),
        })
        .collect::<Result<_>>()?;
    Ok(Args {
        sizes,
        transports,
        requests: b.value("--requests", 200)?,
        steady: Duration::from_secs(b.value("--steady", 60)?),
        json: b.json,
        doc: b.doc,
    })
}

/// Open files: every simulated agent holds a socket here, every TLS agent
/// one in the client too. As root the hard limit is raised (the client
/// inherits it and raises its own soft limit to it); otherwise the soft
/// limit goes up to the hard one.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            let raised = libc::rlimit {
                rlim_cur: want.max(lim.rlim_cur),
                rlim_max: want.max(lim.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

/// One simulated agent: the server role over its connection until stopped.
async fn run_agent(mut conn: Connection, i: usize, mut stop: watch::Receiver<bool>) {
    let now = std::time::Instant::now();
    let ep: Box<dyn Endpoint + Send> = match conn.transport() {
        Transport::Udp => match DatagramEndpoint::new(DatagramConfig::default(), i as u64) {
            Ok(e) => Box::new(e),
            Err(_) => return,
        },
        Transport::Tcp => match StreamEndpoint::new(StreamConfig::default(), i as u64) {
            Ok(e) => Box::new(e),
            Err(_) => return,
        },
    };
    let config = ServerConfig {
        domain: vec![format!("{}/32", customer_addr(i)).parse().expect("prefix")],
        mode: EnforcementMode::Monitor,
        ..ServerConfig::default()
    };
    let Ok(mut server) = SignalServer::new(now, ep, config) else {
        return;
    };
    loop {
        let now = std::time::Instant::now();
        while let Some(action) = server.poll_action() {
            match action {
                Action::QueryCounters { keys } => {
                    for k in keys {
                        let _ = server.counters(now, &k, Counters::default());
                    }
                }
                Action::Remove { key } => {
                    server.removed(now, &key, Counters::default());
                }
                Action::Close | Action::SessionLost { .. } => return,
                _ => {}
            }
        }
        while let Some(bytes) = server.poll_transmit() {
            if conn.send(&bytes).await.is_err() {
                return;
            }
        }
        let deadline = server
            .poll_timeout()
            .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = conn.recv() => match got {
                Ok(Incoming::Datagram(b)) | Ok(Incoming::Stream(b)) => {
                    let _ = server.handle_input(std::time::Instant::now(), &b);
                }
                _ => return,
            },
            _ = tokio::time::sleep_until(deadline.into()) => server.handle_timeout(std::time::Instant::now()),
            _ = stop.changed() => {
                conn.close().await;
                return;
            }
        }
    }
}

/// Resident memory (kB) and CPU time (clock ticks) of a process.
fn rss_kb(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// CPU time (seconds) of every thread of a process, from the scheduler's
/// nanosecond counters (clock ticks are too coarse for an idle process).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = t?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

struct Setup {
    dir: TempDir,
    pki: pki::LabPki,
    agents: Vec<Credentials>,
}

/// The CA, the client's certificate and `n` agent certificates (P-256).
fn setup(n: usize) -> Result<Setup> {
    let dir = TempDir::new("bench-sessions")?;
    let pki = pki::create_lab_pki(&dir.path.join("pki"), &[San::parse("127.0.0.1")], &[], 1)?;
    let ca = pki::Identity::load(&pki.ca, &dir.path.join("pki/ca.key"))?;
    let started = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let name = agent_name(i);
        let (cert, key) = pki::issue(&ca, &name, &[San::parse(&name)], 1)?
            .write(&dir.path.join("agents"), &name)?;
        agents.push(Credentials {
            ca: pki.ca.clone(),
            cert,
            key,
        });
    }
    eprintln!(
        "issued {n} agent certificates in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(Setup { dir, pki, agents })
}

/// The client configuration: every agent a customer with one address.
fn client_config(s: &Setup, n: usize, transport: Transport, state: &Path) -> Result<PathBuf> {
    let mut text = format!(
        "udp = \"{}\"\ntcp = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate-dir = \"{}\"\ncontrol-socket = \"{}\"\nmax-agents = {}\nlog-format = \"json\"\n\n[api]\nlisten = \"{API}\"\ntokens-file = \"{}\"\n\n",
        if transport == Transport::Udp { LISTEN } else { "none" },
        if transport == Transport::Tcp { LISTEN } else { "none" },
        s.pki.ca.display(),
        s.pki.client_cert.display(),
        s.pki.client_key.display(),
        state.display(),
        state.join("control.sock").display(),
        n + 100,
        s.dir.path.join("tokens").display(),
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[customer]]\nagent = \"{}\"\nprefixes = [\"{}\"]\n",
            agent_name(i),
            customer_addr(i)
        ));
    }
    let path = s
        .dir
        .path
        .join(format!("client-{n}-{}.toml", transport.as_str()));
    std::fs::write(&path, text)?;
    Ok(path)
}

#[derive(serde::Serialize)]
struct Row {
    transport: &'static str,
    agents: usize,
    connected: usize,
    handshakes_per_s: f64,
    rss_mb_idle: f64,
    rss_mb_sessions: f64,
    rss_kb_per_session: f64,
    heartbeats_per_s: f64,
    cpu_percent_steady: f64,
    api_requests: usize,
    api_p50_ms: f64,
    api_p99_ms: f64,
    api_max_ms: f64,
    api_errors: usize,
}

async fn measure(s: &Setup, n: usize, transport: Transport, a: &Args) -> Result<Row> {
    let state = s.dir.path.join(format!("state-{n}-{}", transport.as_str()));
    let config = client_config(s, n, transport, &state)?;
    let client = spawn_client(&config, &s.dir.path.join(format!("client-{n}.log")))?;
    let pid = client.pid();
    wait_for(
        &state.join("control.sock"),
        &s.dir.path.join(format!("client-{n}.log")),
        Duration::from_secs(120),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kb(pid)?;

    // Dial: N agents, DIAL_CONCURRENCY handshakes at a time.
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(DIAL_CONCURRENCY));
    let connected = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let listen: std::net::SocketAddr = LISTEN.parse()?;
    for (i, creds) in s.agents.iter().take(n).enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let creds = creds.clone();
        let stop = stop_rx.clone();
        let connected = connected.clone();
        tasks.spawn(async move {
            let opts = DialOptions {
                handshake_timeout: Duration::from_secs(60),
                ..DialOptions::default()
            };
            let mut dialer = match Dialer::new(&creds, opts) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("agent {i}: {e}");
                    drop(permit);
                    return;
                }
            };
            let peer = PeerIdentity::parse("127.0.0.1");
            let mut conn = None;
            for attempt in 0..5u64 {
                match dialer.dial(&[(listen, transport)], &peer).await {
                    Ok(c) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => {
                        if attempt == 4 {
                            eprintln!("agent {i}: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await
                    }
                }
            }
            drop(permit);
            let Some(conn) = conn else { return };
            connected.fetch_add(1, Ordering::Relaxed);
            drop(dialer);
            run_agent(conn, i, stop).await;
        });
    }
    // Wait for the last permits: every dial has finished.
    let _all = gate.acquire_many(DIAL_CONCURRENCY as u32).await?;
    let dial_secs = started.elapsed().as_secs_f64();
    drop(_all);
    let up = connected.load(Ordering::Relaxed);
    eprintln!("{transport}: {up}/{n} agents connected in {dial_secs:.1}s");

    let mut api = ApiClient::connect(&s.pki.ca, "127.0.0.1", API, TOKEN).await?;
    // The client's own count.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, agents) = api.call("GET", "/v1/agents", None).await?;
        let n_up = agents
            .as_array()
            .map(|a| a.iter().filter(|x| x["state"] == "connected").count())
            .unwrap_or(0);
        if code == 200 && n_up >= up {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("the client reports {n_up} connected, expected {up}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the post-handshake exchanges (config, observe) settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_sessions = rss_kb(pid)?;

    // Steady state: heartbeats only.
    let t0 = cpu_seconds(pid)?;
    tokio::time::sleep(a.steady).await;
    let t1 = cpu_seconds(pid)?;
    let cpu = (t1 - t0) / a.steady.as_secs_f64() * 100.0;
    eprintln!("client CPU: {t0:.3}s -> {t1:.3}s");

    // API latency to the agent's 2.01, all sessions up.
    let mut lat = Vec::with_capacity(a.requests);
    let mut errors = 0;
    let mut ids = Vec::new();
    for k in 0..a.requests {
        let i = (k * 7919) % up.max(1);
        let body = json!({
            "attacker": customer_addr(i),
            "source-port": [40000 + k],
            "target": ["203.0.113.99"],
            "protocol": [17],
            "lifetime": 300,
        });
        let t = Instant::now();
        let (code, v) = api.call("POST", "/v1/mitigations", Some(body)).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if code == 201 {
            lat.push(ms);
            if let Some(id) = v["mitigation"]["id"].as_str() {
                ids.push(id.to_string());
            }
        } else {
            errors += 1;
            if errors < 5 {
                eprintln!("mitigation {k}: {code} {v}");
            }
        }
    }
    for id in &ids {
        let _ = api
            .call("DELETE", &format!("/v1/mitigations/{id}"), None)
            .await;
    }
    lat.sort_by(|x, y| x.total_cmp(y));

    let _ = stop_tx.send(true);
    let drain = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    });
    let _ = drain.await;
    drop(client);

    let hb_interval = 30.0; // the agents' default heartbeat-interval (seconds)
    Ok(Row {
        transport: if transport == Transport::Udp {
            "DTLS/UDP"
        } else {
            "TLS/TCP"
        },
        agents: n,
        connected: up,
        handshakes_per_s: up as f64 / dial_secs,
        rss_mb_idle: rss_idle as f64 / 1024.0,
        rss_mb_sessions: rss_sessions as f64 / 1024.0,
        rss_kb_per_session: (rss_sessions.saturating_sub(rss_idle)) as f64 / up.max(1) as f64,
        // Each side sends one heartbeat per interval and answers the other's.
        heartbeats_per_s: 2.0 * up as f64 / hb_interval,
        cpu_percent_steady: cpu,
        api_requests: a.requests,
        api_p50_ms: percentile(&lat, 0.5),
        api_p99_ms: percentile(&lat, 0.99),
        api_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        api_errors: errors,
    })
}

/// The client process, stopped (SIGTERM, then SIGKILL) when dropped, also
/// when a measurement fails half-way.
fn spawn_client(config: &Path, log: &Path) -> Result<Proc> {
    Proc::spawn_here(
        "dots-client",
        &bin("dots-client")?,
        &[
            "listen".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        log.to_path_buf(),
        &[("RUST_LOG".into(), "warn".into())],
    )
}

/// Waits until the client's control socket exists (it is bound last).
fn wait_for(socket: &Path, log: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if socket.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "no {} after {timeout:?}; client log:\n{}",
        socket.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

fn doc_section(rows: &[Row], a: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "`cargo xtask bench sessions`: N simulated agents in one process (each its own certificate, a real (D)TLS handshake, the protocol core in the server role, heartbeats every 30 s) against one `dots-client listen` (release build) over loopback, on this 2-core machine shared with other builds (numbers are noisy: compare rows of one run). Handshakes: {DIAL_CONCURRENCY} in flight. CPU: the client process over {} s of heartbeats only. API: {} mitigations through HTTPS, one at a time, each to another agent, time until the agent's 2.01 is back in the HTTP answer.\n\n",
        a.steady.as_secs(),
        a.requests
    ));
    s.push_str("| transport | agents | connected | handshakes/s | RSS idle (MB) | RSS with sessions (MB) | per session (kB) | heartbeats/s (both ways, 30 s interval) | CPU steady (% of a core) | API p50 (ms) | API p99 (ms) | API max (ms) | API errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            r.transport, r.agents, r.connected, r.handshakes_per_s, r.rss_mb_idle, r.rss_mb_sessions,
            r.rss_kb_per_session, r.heartbeats_per_s, r.cpu_percent_steady, r.api_p50_ms, r.api_p99_ms,
            r.api_max_ms, r.api_errors
        ));
    }
    s.push('\n');
    s
}

fn main() -> Result<()> {
    let a = args()?;
    let max = a.sizes.iter().copied().max().unwrap_or(0);
    raise_fd_limit(2 * max as u64 + 4096);
    let ns = tests::Netns::new("bench")?;
    enter_netns(&ns)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let s = setup(max)?;
    std::fs::write(s.dir.path.join("tokens"), format!("bench {TOKEN}\n"))?;
    let mut rows = Vec::new();
    for &transport in &a.transports {
        for &n in &a.sizes {
            let row = rt.block_on(measure(&s, n, transport, &a))?;
            eprintln!("{}", serde_json::to_string(&row)?);
            rows.push(row);
        }
    }
    write_json(&a.json, &serde_json::to_value(&rows)?)?;
    write_section(
        &a.doc,
        "sessions",
        "cargo xtask bench sessions",
        &doc_section(&rows, &a),
        "## Sessions",
    )?;
    Ok(())
}
