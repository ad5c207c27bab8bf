//! The ISP side (`dots-client listen`): accepts agents over DTLS and TLS,
//! runs one signal session (Call Home DOTS client role) per agent, and serves
//! the local control socket that the other `dots-client` commands use.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::{Context, Result};
use openssl::{hash::MessageDigest, x509::X509};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::UnixStream,
    sync::{broadcast, mpsc, oneshot},
};
use tracing::{info, warn};

use crate::control::{AgentInfo, Reply, Request};
pub use crate::session::Command;
use dots_daemon::transport::{Credentials, ListenOptions, Listener, TICKET_KEYS_LEN};

/// Settings of `dots-client listen`.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub credentials: Credentials,
    /// Agent identities allowed in; `None`: any certificate from the CA.
    pub allow: Option<Vec<String>>,
    pub control: PathBuf,
    /// Where the session-ticket keys are kept, so agents resume their
    /// sessions after this listener restarts; `None`: keys live in memory.
    pub state_dir: Option<PathBuf>,
}

struct AgentHandle {
    info: AgentInfo,
    commands: mpsc::Sender<Command>,
    notifications: broadcast::Sender<Reply>,
    /// Distinguishes a reconnected agent's session from the one it replaces.
    generation: u64,
}

type Registry = Arc<Mutex<BTreeMap<String, AgentHandle>>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The client identifier derived from our certificate as RFC 9132 §4.4.1.1
/// suggests: the SPKI's SHA-256, truncated to 16 bytes, base64url without
/// padding.
pub fn cuid_from_cert(cert_pem: &[u8]) -> Result<String> {
    let cert = X509::from_pem(cert_pem).context("parsing our certificate")?;
    let spki = cert.public_key()?.public_key_to_der()?;
    let digest = openssl::hash::hash(MessageDigest::sha256(), &spki)?;
    let b64 = openssl::base64::encode_block(&digest[..16]);
    Ok(b64
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_"))
}

/// Runs the listener until stopped.
pub async fn listen(opts: ClientOptions) -> Result<()> {
    let cert = std::fs::read(&opts.credentials.cert)
        .with_context(|| format!("reading {}", opts.credentials.cert.display()))?;
    let cuid = cuid_from_cert(&cert)?;
    let ticket_keys = match &opts.state_dir {
        Some(dir) => Some(ticket_keys(dir)?),
        None => None,
    };
    let mut listener = Listener::bind(
        opts.udp,
        opts.tcp,
        &opts.credentials,
        ListenOptions {
            allow: opts.allow.clone(),
            ticket_keys,
            ..Default::default()
        },
    )
    .await?;
    info!(udp = ?listener.local_udp_addr(), tcp = ?listener.local_tcp_addr(), %cuid, "listening for agents");
    let registry: Registry = Arc::default();
    let control = dots_daemon::local_socket::bind(&opts.control, "dots-client listen")?;
    info!(socket = %opts.control.display(), "control socket ready");
    // systemd (Type=notify): serving from here on; the status counts agents.
    let notifier = Arc::new(dots_daemon::notify::Notifier::from_env());
    let agents = {
        let registry = registry.clone();
        move || {
            let n = registry.lock().map(|r| r.len()).unwrap_or(0);
            format!("{n} agent(s) connected")
        }
    };
    notifier.ready(&agents());
    dots_daemon::notify::spawn_status(notifier.clone(), agents);
    dots_daemon::notify::spawn_watchdog(notifier.clone());
    let mut generation = 0u64;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => { warn!(error = %e, "accept failed"); continue; }
                };
                generation += 1;
                let id = conn.peer_identity().unwrap_or_else(|| conn.peer_addr().to_string());
                let info = AgentInfo {
                    id: id.clone(),
                    addr: conn.peer_addr(),
                    transport: conn.transport().to_string(),
                    resumed: conn.session_reused(),
                    connected_at: unix_now(),
                };
                info!(agent = %id, addr = %info.addr, transport = %info.transport, resumed = info.resumed, "agent connected");
                let (tx, rx) = mpsc::channel(32);
                let (notify, _) = broadcast::channel(256);
                let previous = registry.lock().ok().and_then(|mut r| r.insert(id.clone(), AgentHandle {
                    info, commands: tx, notifications: notify.clone(), generation,
                }));
                if previous.is_some() {
                    info!(agent = %id, "replacing the agent's previous session");
                }
                let registry = registry.clone();
                let cuid = cuid.clone();
                let my_generation = generation;
                tokio::spawn(async move {
                    crate::session::run(conn, &id, &cuid, rx, notify).await;
                    info!(agent = %id, "agent session ended");
                    if let Ok(mut r) = registry.lock() {
                        if r.get(&id).is_some_and(|h| h.generation == my_generation) {
                            r.remove(&id);
                        }
                    }
                });
            }
            stream = control.accept() => match stream {
                Ok((s, _)) => { tokio::spawn(serve_control(s, registry.clone())); }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
            _ = dots_daemon::shutdown::signal() => { info!("stopping"); notifier.stopping(); break; }
        }
    }
    // Close every session properly (close_notify, RFC 8323 Release), so the
    // agents notice at once and redial instead of waiting out the heartbeats.
    let handles: Vec<mpsc::Sender<Command>> = registry
        .lock()
        .map(|r| r.values().map(|h| h.commands.clone()).collect())
        .unwrap_or_default();
    for h in &handles {
        let _ = h.send(Command::Close).await;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline
        && registry.lock().map(|r| !r.is_empty()).unwrap_or(false)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&opts.control);
    Ok(())
}

/// Loads `<dir>/ticket.key`, creating it (random, mode 0600) the first time.
fn ticket_keys(dir: &std::path::Path) -> Result<[u8; TICKET_KEYS_LEN]> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = dir.join("ticket.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|b: Vec<u8>| {
                anyhow::anyhow!(
                    "{} holds {} bytes, expected {TICKET_KEYS_LEN}",
                    path.display(),
                    b.len()
                )
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut keys = [0u8; TICKET_KEYS_LEN];
    openssl::rand::rand_bytes(&mut keys)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&keys)?;
    info!(path = %path.display(), "created session-ticket keys");
    Ok(keys)
}

/// Finds the agent a request names, or the only one connected.
fn pick(
    registry: &Registry,
    agent: Option<&str>,
) -> Result<(String, mpsc::Sender<Command>, broadcast::Sender<Reply>), String> {
    let r = registry
        .lock()
        .map_err(|_| "registry poisoned".to_string())?;
    let handle = match agent {
        Some(id) => r
            .get(id)
            .ok_or_else(|| format!("no agent {id:?} is connected (see `dots-client agents`)"))?,
        None => match r.len() {
            1 => r.values().next().ok_or("no agent")?,
            0 => return Err("no agent is connected".into()),
            n => return Err(format!("{n} agents are connected: name one with --agent")),
        },
    };
    Ok((
        handle.info.id.clone(),
        handle.commands.clone(),
        handle.notifications.clone(),
    ))
}

async fn serve_control(stream: UnixStream, registry: Registry) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else {
        return;
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = dots_daemon::local_socket::write_line(
                &mut write,
                &Reply::error(format!("bad request: {e}")),
            )
            .await;
            return;
        }
    };
    let reply = match req {
        Request::Agents => {
            let agents: Vec<AgentInfo> = registry
                .lock()
                .map(|r| r.values().map(|h| h.info.clone()).collect())
                .unwrap_or_default();
            Reply {
                ok: true,
                body: serde_json::to_value(agents).unwrap_or_default(),
                ..Reply::default()
            }
        }
        Request::Watch { agent } => {
            let (id, _, notifications) = match pick(&registry, agent.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    let _ =
                        dots_daemon::local_socket::write_line(&mut write, &Reply::error(e)).await;
                    return;
                }
            };
            let mut rx = notifications.subscribe();
            let hello = Reply {
                ok: true,
                agent: Some(id),
                code: None,
                ..Reply::default()
            };
            if dots_daemon::local_socket::write_line(&mut write, &hello)
                .await
                .is_err()
            {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(n) => {
                        if dots_daemon::local_socket::write_line(&mut write, &n)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        warn!(skipped = k, "watcher too slow")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
        other => forward(&registry, other).await,
    };
    let _ = dots_daemon::local_socket::write_line(&mut write, &reply).await;
}

/// Hands a request to the agent's session and waits for the CoAP answer.
async fn forward(registry: &Registry, req: Request) -> Reply {
    let agent = match &req {
        Request::Mitigate { agent, .. }
        | Request::Withdraw { agent, .. }
        | Request::Status { agent, .. }
        | Request::Config { agent }
        | Request::Redirect { agent, .. } => agent.clone(),
        Request::Agents | Request::Watch { .. } => None,
    };
    let (id, commands, _) = match pick(registry, agent.as_deref()) {
        Ok(p) => p,
        Err(e) => return Reply::error(e),
    };
    let (tx, rx) = oneshot::channel();
    let cmd = match Command::from_request(req, tx) {
        Ok(c) => c,
        Err(e) => return Reply::error(e),
    };
    if commands.send(cmd).await.is_err() {
        return Reply::error(format!("agent {id} disconnected"));
    }
    match rx.await {
        Ok(mut r) => {
            r.agent = Some(id);
            r
        }
        Err(_) => Reply::error(format!("agent {id} disconnected before answering")),
    }
}
