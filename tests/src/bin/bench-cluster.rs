//! `cargo xtask bench cluster`: an ISP cluster of three `dots-client` nodes
//! (release binaries) sharing one etcd (Debian's), with N simulated agents
//! (default 1,000; each its own certificate, a real TLS handshake, the real
//! protocol core in the agent's role, kept across reconnects as an agent
//! keeps its mitigations) spread over the nodes, one mitigation each.
//!
//! It measures the API latency of a mitigation request through a node that
//! does not hold the agent (and, for comparison, through the one that does),
//! then SIGKILLs the node holding the most agents and measures the time
//! until all of its agents are held by the other nodes and all of their
//! mitigations re-confirmed by the agents (re-sent with their mids, answered
//! 2.04); and the etcd writes (revisions) per mitigation and per failed-over
//! agent. Writes `target/bench/cluster.json` and the "## Cluster" section of
//! docs/benchmarks.md.
//!
//! Loopback only, in a network namespace of its own; every loop is bounded
//! in count and time.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
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
    transport::{Credentials, DialOptions, Dialer, Incoming, PeerIdentity, Transport},
};
use dots_proto::{
    coap::{Endpoint, StreamConfig, StreamEndpoint},
    signal::{Action, Counters, EnforcementMode, ServerConfig, SignalServer},
};
use serde_json::{json, Value};
use tests::{
    bench::{
        agent_name, customer_addr, enter_netns, percentile, write_json, write_section, ApiClient,
        BenchArgs,
    },
    procs::{bin, Proc, TempDir},
};
use tokio::sync::{watch, Semaphore};

const TOKEN: &str = "bench-cluster-token-0123456789";
const NODES: usize = 3;
const ETCD: &str = "127.0.0.1:23790";
/// The name every node's certificate carries, which the agents verify.
const CLUSTER_NAME: &str = "cluster.bench";
const DIAL_CONCURRENCY: usize = 128;

fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

struct Args {
    json: PathBuf,
    doc: PathBuf,
    agents: usize,
    lease_ttl: u64,
}

fn args() -> Result<Args> {
    let b = BenchArgs::parse("cluster", &["--agents", "--lease-ttl"], &[])?;
    let a = Args {
        agents: b.value("--agents", 1000)?,
        lease_ttl: b.value("--lease-ttl", 5)?,
        json: b.json,
        doc: b.doc,
    };
    if a.agents == 0 {
        bail!("--agents must be at least 1");
    }
    Ok(a)
}

/// One simulated agent: dials the nodes (its own order, so that agents
/// spread), runs the agent's protocol core over each connection, and dials
/// again when the connection ends, keeping its mitigations, until stopped.
async fn run_agent(
    i: usize,
    creds: Credentials,
    gate: Arc<Semaphore>,
    connected: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let opts = DialOptions {
        handshake_timeout: Duration::from_secs(60),
        ..DialOptions::default()
    };
    let Ok(mut dialer) = Dialer::new(&creds, opts) else {
        return;
    };
    let peer = PeerIdentity::parse(CLUSTER_NAME);
    let candidates: Vec<(SocketAddr, Transport)> = (0..NODES)
        .map(|k| {
            let addr = format!("{}:4647", node_ip((i + k) % NODES));
            (addr.parse().expect("address"), Transport::Tcp)
        })
        .collect();
    let config = ServerConfig {
        domain: vec![format!("{}/32", customer_addr(i)).parse().expect("prefix")],
        mode: EnforcementMode::Monitor,
        ..ServerConfig::default()
    };
    let mut server: Option<SignalServer<Box<dyn Endpoint + Send>>> = None;
    let mut first = true;
    let mut seed = (i as u64) << 20;
    while !*stop.borrow() {
        let conn = {
            let _permit = gate.acquire().await;
            dialer.dial(&candidates, &peer).await
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if first {
            connected.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let now = std::time::Instant::now();
        seed += 1;
        let Ok(ep) = StreamEndpoint::new(StreamConfig::default(), seed) else {
            return;
        };
        let ep: Box<dyn Endpoint + Send> = Box::new(ep);
        match &mut server {
            Some(s) => {
                if s.reconnect(now, ep).is_err() {
                    return;
                }
            }
            None => match SignalServer::new(now, ep, config.clone()) {
                Ok(s) => server = Some(s),
                Err(_) => return,
            },
        }
        let Some(server) = server.as_mut() else {
            return;
        };
        'session: loop {
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
                    Action::Close | Action::SessionLost { .. } => break 'session,
                    _ => {}
                }
            }
            while let Some(bytes) = server.poll_transmit() {
                if conn.send(&bytes).await.is_err() {
                    break 'session;
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
                    _ => break 'session,
                },
                _ = tokio::time::sleep_until(deadline.into()) => server.handle_timeout(std::time::Instant::now()),
                _ = stop.changed() => {
                    conn.close().await;
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// etcd's current revision (one per write), through its JSON gateway.
fn etcd_revision() -> Result<i64> {
    let body = r#"{"key":"AA=="}"#;
    let mut s = TcpStream::connect(ETCD)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /v3/kv/range HTTP/1.0\r\nHost: {ETCD}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let json = text.split("\r\n\r\n").nth(1).context("no body")?;
    let v: Value = serde_json::from_str(json)?;
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .or_else(|| v["header"]["revision"].as_i64())
        .with_context(|| format!("no revision in {v}"))
}

/// The end of every node's log, for a failure's message.
fn logs(dir: &TempDir) -> String {
    let mut out = String::new();
    for k in 0..NODES {
        let text = std::fs::read_to_string(dir.path.join(format!("n{k}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("---- node n{k} ----\n"));
        for l in &lines[lines.len().saturating_sub(30)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// `program args...` in the bench's own namespace, logging to `log` at
/// `DOTS_BENCH_LOG` (default warn); stopped when dropped.
fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let level = std::env::var("DOTS_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Proc::spawn_here(
        &name,
        program,
        args,
        log.to_path_buf(),
        &[("RUST_LOG".into(), level)],
    )
}

fn wait_log(log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{needle:?} not in {} after {timeout:?}:\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

#[derive(serde::Serialize)]
struct Report {
    agents: usize,
    nodes: usize,
    lease_ttl_s: u64,
    per_node_before: Vec<usize>,
    api_requests: usize,
    /// Answered 202 (the agent was between sessions), sent when it was back.
    api_queued: usize,
    api_remote_p50_ms: f64,
    api_remote_p99_ms: f64,
    api_owner_p50_ms: f64,
    api_owner_p99_ms: f64,
    etcd_writes_per_mitigation: f64,
    killed_node_agents: usize,
    reowned_s: f64,
    reconfirmed_s: f64,
    etcd_writes_per_failed_over_agent: f64,
    lost_mitigations: usize,
}

/// Which node holds each agent (index by agent number), from every node's
/// `GET /v1/agents`.
async fn owners(apis: &mut [Option<ApiClient>]) -> Result<HashMap<String, usize>> {
    let mut out = HashMap::new();
    for (k, api) in apis.iter_mut().enumerate() {
        let Some(api) = api else { continue };
        let (_, agents) = api.call("GET", "/v1/agents", None).await?;
        for a in agents.as_array().into_iter().flatten() {
            if a["state"] == "connected" {
                if let Some(id) = a["id"].as_str() {
                    out.insert(id.to_string(), k);
                }
            }
        }
    }
    Ok(out)
}

async fn measure(
    a: &Args,
    dir: &TempDir,
    pki: &pki::LabPki,
    agents: &[Credentials],
) -> Result<Report> {
    let s = |p: &Path| p.display().to_string();
    // etcd.
    let etcd_log = dir.path.join("etcd.log");
    let _etcd = spawn(
        Path::new("/usr/bin/etcd"),
        &[
            "--name".into(),
            "bench".into(),
            "--data-dir".into(),
            s(&dir.path.join("etcd-data")),
            "--listen-client-urls".into(),
            format!("http://{ETCD}"),
            "--advertise-client-urls".into(),
            format!("http://{ETCD}"),
            "--listen-peer-urls".into(),
            "http://127.0.0.1:23800".into(),
            "--initial-advertise-peer-urls".into(),
            "http://127.0.0.1:23800".into(),
            "--initial-cluster".into(),
            "bench=http://127.0.0.1:23800".into(),
        ],
        &etcd_log,
    )?;
    wait_log(
        &etcd_log,
        "ready to serve client requests",
        Duration::from_secs(30),
    )?;
    // The nodes, every agent a customer.
    let mut customers = String::new();
    for i in 0..a.agents {
        customers.push_str(&format!(
            "[[customer]]\nagent = \"{}\"\nprefixes = [\"{}\"]\n",
            agent_name(i),
            customer_addr(i)
        ));
    }
    let mut nodes: Vec<Option<Proc>> = Vec::new();
    for k in 0..NODES {
        let state = dir.path.join(format!("n{k}"));
        std::fs::create_dir_all(&state)?;
        let config = dir.path.join(format!("n{k}.toml"));
        std::fs::write(
            &config,
            format!(
                "udp = \"none\"\ntcp = \"{ip}:4647\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate-dir = \"{}\"\ncontrol-socket = \"{}\"\nmax-agents = {}\n\n[api]\nlisten = \"{ip}:8443\"\ntokens-file = \"{}\"\n\n[cluster]\netcd = [\"{ETCD}\"]\nname = \"bench\"\nnode = \"n{k}\"\nlease-ttl = {}\n\n{customers}",
                s(&pki.ca),
                s(&pki.client_cert),
                s(&pki.client_key),
                s(&state),
                s(&state.join("control.sock")),
                a.agents + 100,
                s(&dir.path.join("tokens")),
                a.lease_ttl,
                ip = node_ip(k),
            ),
        )?;
        let log = dir.path.join(format!("n{k}.log"));
        nodes.push(Some(spawn(
            &bin("dots-client")?,
            &["listen".into(), "--config".into(), s(&config)],
            &log,
        )?));
        let start = Instant::now();
        while !state.join("control.sock").exists() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "node n{k} did not start:\n{}",
                    std::fs::read_to_string(&log)?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The agents.
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(DIAL_CONCURRENCY));
    let connected = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (i, creds) in agents.iter().enumerate() {
        tasks.spawn(run_agent(
            i,
            creds.clone(),
            gate.clone(),
            connected.clone(),
            stop_rx.clone(),
        ));
    }
    let mut apis: Vec<Option<ApiClient>> = Vec::new();
    for k in 0..NODES {
        apis.push(Some(
            ApiClient::connect(
                &pki.ca,
                CLUSTER_NAME,
                &format!("{}:8443", node_ip(k)),
                TOKEN,
            )
            .await?,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut owner = loop {
        let o = owners(&mut apis).await?;
        if o.len() >= a.agents {
            break o;
        }
        if Instant::now() > deadline {
            bail!("only {} of {} agents connected", o.len(), a.agents);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "{} agents connected in {:.1}s",
        owner.len(),
        started.elapsed().as_secs_f64()
    );
    // Agents whose dial raced two nodes may still move: let them settle.
    tokio::time::sleep(Duration::from_secs(a.lease_ttl + 3)).await;
    owner = owners(&mut apis).await?;
    let mut per_node = vec![0usize; NODES];
    for k in owner.values() {
        per_node[*k] += 1;
    }

    // One mitigation per agent, all through node 0: latencies split by
    // whether node 0 holds the agent.
    let rev0 = etcd_revision()?;
    let mut remote = Vec::new();
    let mut local = Vec::new();
    let mut ids: HashMap<String, (String, u64)> = HashMap::new();
    let mut queued = 0usize;
    for i in 0..a.agents {
        let body = json!({
            "agent": agent_name(i),
            "attacker": customer_addr(i),
            "target": ["203.0.113.99"],
            "protocol": [17],
            "lifetime": 3600,
        });
        let api = apis[0].as_mut().context("api")?;
        let t = Instant::now();
        let (code, v) = api.call("POST", "/v1/mitigations", Some(body)).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if code == 202 {
            // The agent was between sessions: queued, sent when it is back.
            queued += 1;
        } else if code != 201 {
            bail!(
                "mitigation for {}: {code} {v}\n{}",
                agent_name(i),
                logs(dir)
            );
        }
        let id = v["mitigation"]["id"].as_str().context("id")?.to_string();
        let mid = v["mitigation"]["mid"].as_u64().context("mid")?;
        ids.insert(agent_name(i), (id, mid));
        if code == 201 {
            if owner.get(&agent_name(i)) == Some(&0) {
                local.push(ms);
            } else {
                remote.push(ms);
            }
        }
    }
    let writes_per_mitigation = (etcd_revision()? - rev0) as f64 / a.agents as f64;
    remote.sort_by(|x, y| x.total_cmp(y));
    local.sort_by(|x, y| x.total_cmp(y));
    eprintln!(
        "API through node 0: remote p50 {:.1} ms, owner p50 {:.1} ms",
        percentile(&remote, 0.5),
        percentile(&local, 0.5)
    );
    // Every mitigation active before the kill (the queued ones too).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let api = apis[0].as_mut().context("api")?;
        let (_, list) = api
            .call("GET", "/v1/mitigations?state=active", None)
            .await?;
        let n = list.as_array().map_or(0, Vec::len);
        if n >= a.agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {} mitigations active\n{}", a.agents, logs(dir));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the counters' first notifications settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Kill the node holding the most agents (not node 0 when tied: its
    // API is the one used above).
    let victim = (0..NODES).max_by_key(|k| per_node[*k]).context("no node")?;
    let theirs: Vec<String> = owner
        .iter()
        .filter(|(_, k)| **k == victim)
        .map(|(a, _)| a.clone())
        .collect();
    let rev1 = etcd_revision()?;
    let killed = Instant::now();
    let killed_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    nodes[victim].as_mut().context("victim")?.kill();
    nodes[victim] = None;
    apis[victim] = None;
    let survivor = (0..NODES).find(|k| *k != victim).context("survivor")?;
    let deadline = Instant::now() + Duration::from_secs(120 + 2 * a.lease_ttl);
    let mut reowned = None;
    let mut reconfirmed = None;
    while reconfirmed.is_none() {
        if Instant::now() > deadline {
            bail!("the killed node's agents did not all move within the deadline");
        }
        if reowned.is_none() {
            owner = owners(&mut apis).await?;
            if theirs.iter().all(|a| owner.contains_key(a)) {
                reowned = Some(killed.elapsed());
                eprintln!("re-owned in {:.2}s", killed.elapsed().as_secs_f64());
            }
        }
        if reowned.is_some() {
            let api = apis[survivor].as_mut().context("api")?;
            let (_, list) = api
                .call("GET", "/v1/mitigations?state=active", None)
                .await?;
            let sent: HashMap<String, u64> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["last-code"] == "2.04 Changed")
                .filter_map(|m| Some((m["agent"].as_str()?.to_string(), m["sent-at"].as_u64()?)))
                .collect();
            // Re-sent after the kill (seconds) and answered 2.04: the agent
            // held it already.
            if theirs
                .iter()
                .all(|a| sent.get(a).is_some_and(|t| *t >= killed_unix))
            {
                reconfirmed = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reowned = reowned.context("re-owned")?;
    let reconfirmed = reconfirmed.context("re-confirmed")?;
    let writes_failover = (etcd_revision()? - rev1) as f64 / theirs.len().max(1) as f64;
    // Nothing lost: every mitigation still active, with its mid.
    let api = apis[survivor].as_mut().context("api")?;
    let (_, list) = api
        .call("GET", "/v1/mitigations?state=active", None)
        .await?;
    let active: HashMap<String, u64> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["mid"].as_u64()?)))
        .collect();
    let lost = ids
        .values()
        .filter(|(id, mid)| active.get(id) != Some(mid))
        .count();

    // What moved agents around, from the nodes' logs (at info level:
    // DOTS_BENCH_LOG=info).
    for needle in [
        "another node holds the agent",
        "no longer the agent's owner",
        "released an owner key",
        "agent session ended",
    ] {
        let n: usize = (0..NODES)
            .map(|k| {
                std::fs::read_to_string(dir.path.join(format!("n{k}.log")))
                    .unwrap_or_default()
                    .matches(needle)
                    .count()
            })
            .sum();
        eprintln!("nodes logged {n} x {needle:?}");
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    drop(nodes);
    Ok(Report {
        agents: a.agents,
        nodes: NODES,
        lease_ttl_s: a.lease_ttl,
        per_node_before: per_node.clone(),
        api_requests: a.agents,
        api_queued: queued,
        api_remote_p50_ms: percentile(&remote, 0.5),
        api_remote_p99_ms: percentile(&remote, 0.99),
        api_owner_p50_ms: percentile(&local, 0.5),
        api_owner_p99_ms: percentile(&local, 0.99),
        etcd_writes_per_mitigation: writes_per_mitigation,
        killed_node_agents: theirs.len(),
        reowned_s: reowned.as_secs_f64(),
        reconfirmed_s: reconfirmed.as_secs_f64(),
        etcd_writes_per_failed_over_agent: writes_failover,
        lost_mitigations: lost,
    })
}

fn doc_section(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "`cargo xtask bench cluster`: {} simulated agents (real TLS handshakes, the agent's protocol core, each keeping its mitigations across reconnects) over {} `dots-client` nodes (release build) sharing one etcd 3.4 (Debian's), lease TTL {} s, all on loopback on this 2-core machine (etcd, the nodes and the agents share the two cores). One mitigation per agent, all requested through node 0's API, one at a time. Then the node holding the most agents is killed (SIGKILL).\n\n",
        r.agents, r.nodes, r.lease_ttl_s
    ));
    s.push_str("| agents per node before | API through a non-owning node p50 / p99 (ms) | API through the owner p50 / p99 (ms) | answered 202 (agent between sessions) | etcd writes per new mitigation | agents of the killed node | all re-owned after (s) | all mitigations re-confirmed after (s) | etcd writes per failed-over agent | mitigations lost |\n|---|---|---|---|---|---|---|---|---|---|\n");
    s.push_str(&format!(
        "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {} |\n\n",
        r.per_node_before
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        r.api_remote_p50_ms,
        r.api_remote_p99_ms,
        r.api_owner_p50_ms,
        r.api_owner_p99_ms,
        r.api_queued,
        r.etcd_writes_per_mitigation,
        r.killed_node_agents,
        r.reowned_s,
        r.reconfirmed_s,
        r.etcd_writes_per_failed_over_agent,
        r.lost_mitigations,
    ));
    s
}

fn main() -> Result<()> {
    let a = args()?;
    let ns = tests::Netns::new("bench")?;
    enter_netns(&ns)?;
    let dir = TempDir::new("bench-cluster")?;
    let pki = pki::create_lab_pki(&dir.path.join("pki"), &[San::parse(CLUSTER_NAME)], &[], 1)?;
    let ca = pki::Identity::load(&pki.ca, &dir.path.join("pki/ca.key"))?;
    let mut agents = Vec::with_capacity(a.agents);
    for i in 0..a.agents {
        let name = agent_name(i);
        let (cert, key) = pki::issue(&ca, &name, &[San::parse(&name)], 1)?
            .write(&dir.path.join("agents"), &name)?;
        agents.push(Credentials {
            ca: pki.ca.clone(),
            cert,
            key,
        });
    }
    std::fs::write(dir.path.join("tokens"), format!("bench {TOKEN}\n"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(measure(&a, &dir, &pki, &agents))?;
    eprintln!("{}", serde_json::to_string(&report)?);
    write_json(&a.json, &serde_json::to_value(&report)?)?;
    write_section(
        &a.doc,
        "cluster",
        "cargo xtask bench cluster",
        &doc_section(&report),
        "## Cluster",
    )?;
    Ok(())
}
