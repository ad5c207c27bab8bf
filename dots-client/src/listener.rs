//! The ISP side (`dots-client listen`): accepts agents over DTLS and TLS,
//! runs one signal session (Call Home DOTS client role) per agent, and serves
//! the local control socket that the other `dots-client` commands use.

use std::{
    collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::SystemTime,
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use openssl::{hash::MessageDigest, x509::X509};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::UnixStream,
    signal::unix::{signal, SignalKind},
    sync::{broadcast, mpsc, oneshot},
};
use tracing::{info, warn};

pub use crate::session::Command;
use crate::{
    api::{self, Api, ApiOptions},
    audit::Principal,
    cluster::{Cluster, ClusterOptions},
    control::{AgentInfo, Reply, Request},
    service::{NewMitigation, Outcome, Service, ServiceError, ServiceOptions, Shared},
    session::{self, SessionContext},
};
use dots_daemon::transport::{Connection, ListenOptions, Listener, TICKET_KEYS_LEN};
use dots_proto::model::{DotsMessage, MitigationScope, RedirectedSignal};

/// What a reload reads again: the customer prefixes of the configuration.
pub type Customers = BTreeMap<String, Vec<IpNet>>;

/// Re-reads the configuration (SIGHUP, `dots-client reload`).
#[derive(Clone)]
pub struct Reloader(pub Arc<dyn Fn() -> Result<Customers, String> + Send + Sync>);

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reloader")
    }
}

/// Settings of `dots-client listen`.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub credentials: dots_daemon::transport::Credentials,
    /// Agent identities allowed in; `None`: any certificate from the CA.
    pub allow: Option<Vec<String>>,
    pub control: PathBuf,
    /// Where the session-ticket keys, the book of mitigations, the mid
    /// counters and the audit trail are kept; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// Customer prefixes per agent identity.
    pub customers: Customers,
    /// The HTTP API, when enabled.
    pub api: Option<ApiOptions>,
    /// The audit trail (default `<state-dir>/audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// Agents connected at most.
    pub max_agents: usize,
    /// (D)TLS handshakes in progress at most.
    pub max_handshakes: usize,
    /// How to re-read the configuration; `None`: reload only re-reads the
    /// API tokens.
    pub reload: Option<Reloader>,
    /// The cluster this node belongs to; `None`: a node alone.
    pub cluster: Option<ClusterOptions>,
}

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

/// Raises the soft limit of open files to the hard limit: every TLS agent
/// holds a socket, and so does every DTLS agent's handshake; the default
/// soft limit (1024) would cap the agents far below `max-agents`.
fn raise_fd_limit(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit
        // up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            info!(from = old, to = lim.rlim_cur, "raised the open-file limit");
        }
    }
    // Sockets of agents, API clients, the state files and some slack.
    if (lim.rlim_cur as usize) < want.saturating_add(64) {
        warn!(
            limit = lim.rlim_cur,
            max_agents = want,
            "the open-file limit is below max-agents: raise LimitNOFILE (systemd) or ulimit -Hn"
        );
    }
}

/// Runs the listener until stopped.
pub async fn listen(opts: ClientOptions) -> Result<()> {
    raise_fd_limit(opts.max_agents);
    let cert = std::fs::read(&opts.credentials.cert)
        .with_context(|| format!("reading {}", opts.credentials.cert.display()))?;
    let cuid = cuid_from_cert(&cert)?;
    let ticket_keys = match &opts.state_dir {
        Some(dir) => Some(ticket_keys(dir)?),
        None => None,
    };
    let cluster = match &opts.cluster {
        Some(c) => {
            let mut c = c.clone();
            // Redirects to this node give the address it listens on, when
            // that is a specific one.
            if c.advertise_addresses.is_empty() {
                c.advertise_addresses = opts
                    .tcp
                    .or(opts.udp)
                    .map(|a| a.ip())
                    .filter(|ip| !ip.is_unspecified())
                    .into_iter()
                    .collect();
            }
            Some(Cluster::connect(c).await?)
        }
        None => None,
    };
    let service = Service::start(ServiceOptions {
        cuid: cuid.clone(),
        state_dir: opts.state_dir.clone(),
        audit_log: opts.audit_log.clone(),
        customers: opts.customers.clone(),
        shared: cluster
            .clone()
            .map(|c| Shared(c as Arc<dyn crate::service::SharedState>)),
    })?;
    if let Some(c) = &cluster {
        c.start(&service).await?;
    }
    let listen_options = ListenOptions {
        allow: opts.allow.clone(),
        ticket_keys,
        max_connections: opts.max_agents,
        max_handshakes: opts.max_handshakes,
        ..Default::default()
    };
    let bind = || {
        Listener::bind(
            opts.udp,
            opts.tcp,
            &opts.credentials,
            listen_options.clone(),
        )
    };
    let first = bind().await?;
    info!(udp = ?first.local_udp_addr(), tcp = ?first.local_tcp_addr(), %cuid, "listening for agents");
    let mut listener = Some(first);
    let api = match &opts.api {
        Some(a) => Some(Arc::new(api::serve(a.clone(), service.clone()).await?)),
        None => None,
    };
    if let Some(path) = service.audit_path() {
        info!(path = %path.display(), "audit trail");
    }
    let control = dots_daemon::local_socket::bind(&opts.control, "dots-client listen")?;
    info!(socket = %opts.control.display(), "control socket ready");
    // systemd (Type=notify): serving from here on; the status counts agents.
    let notifier = Arc::new(dots_daemon::notify::Notifier::from_env());
    let agents = {
        let service = service.clone();
        move || format!("{} agent(s) connected", service.connected_count())
    };
    notifier.ready(&agents());
    dots_daemon::notify::spawn_status(notifier.clone(), agents);
    dots_daemon::notify::spawn_watchdog(notifier.clone());
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        // A cluster node out of touch with etcd cannot own agents: it stops
        // listening, so that agents dialling it are refused at once and
        // dial the next node of their list.
        if let Some(c) = &cluster {
            if !c.accepting() && listener.is_some() {
                if c.acting() {
                    info!("draining: not listening for agents");
                } else {
                    warn!("out of touch with etcd: not listening for agents until back");
                }
                listener = None;
            } else if c.accepting() && listener.is_none() {
                match bind().await {
                    Ok(l) => {
                        info!("in touch with etcd again: listening for agents");
                        listener = Some(l);
                    }
                    Err(e) => warn!(error = %e, "listening for agents again"),
                }
            }
        }
        tokio::select! {
            conn = accept_on(&mut listener) => match conn {
                Ok(c) => start_session(&service, &cuid, c, cluster.clone()),
                Err(e) => warn!(error = %e, "accept failed"),
            },
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)), if cluster.is_some() => {}
            stream = control.accept() => match stream {
                Ok((s, _)) => {
                    tokio::spawn(serve_control(s, service.clone(), opts.reload.clone(), api.clone(), cluster.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
            _ = hangup.recv() => {
                info!("SIGHUP: reloading");
                notifier.reloading();
                if let Err(e) = reload(&service, opts.reload.as_ref(), api.as_deref(), &Principal::service()) {
                    warn!(error = %e, "reload failed: the previous settings stay");
                }
                notifier.ready(&format!("{} agent(s) connected", service.connected_count()));
            }
            _ = dots_daemon::shutdown::signal() => { info!("stopping"); notifier.stopping(); break; }
        }
    }
    // Close every session properly (close_notify, RFC 8323 Release), so the
    // agents notice at once and redial instead of waiting out the heartbeats.
    for h in service.sessions() {
        let _ = h.send(Command::Close).await;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline && service.connected_count() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    service.save();
    if let Some(c) = &cluster {
        c.leave().await;
    }
    let _ = std::fs::remove_file(&opts.control);
    Ok(())
}

/// The next agent of `listener`; never, while not listening.
async fn accept_on(
    listener: &mut Option<Listener>,
) -> Result<Connection, dots_daemon::transport::TransportError> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A new agent connection: register it and run its session. A cluster
/// node first claims the agent; when another node holds it, or etcd is out
/// of reach, the connection is dropped and the agent dials again.
fn start_session(
    service: &Arc<Service>,
    cuid: &str,
    mut conn: Connection,
    cluster: Option<Arc<Cluster>>,
) {
    let id = conn
        .peer_identity()
        .unwrap_or_else(|| conn.peer_addr().to_string());
    let info = AgentInfo {
        id: id.clone(),
        state: "connected".into(),
        addr: Some(conn.peer_addr()),
        transport: Some(conn.transport().to_string()),
        resumed: Some(conn.session_reused()),
        connected_at: Some(unix_now()),
        ..AgentInfo::default()
    };
    info!(agent = %id, addr = ?info.addr, transport = ?info.transport, resumed = ?info.resumed, "agent connected");
    let service = service.clone();
    let cuid = cuid.to_string();
    tokio::spawn(async move {
        if let Some(c) = &cluster {
            if !c.claim(&id).await {
                conn.close().await;
                return;
            }
        }
        // Small queues: one per agent, and there may be 10,000 agents.
        let (tx, rx) = mpsc::channel(8);
        let (notify, _) = broadcast::channel(16);
        let generation = service.session_started(info, tx, notify.clone());
        let ctx = SessionContext {
            agent: id.clone(),
            generation,
            cuid,
            commands: rx,
            notify,
            events: service.session_events(),
        };
        session::run(conn, ctx).await;
        info!(agent = %id, "agent session ended");
        service.session_ended(&id, generation);
        if let Some(c) = &cluster {
            if !service.is_connected(&id) {
                c.release(&id).await;
            }
        }
    });
}

/// Re-reads the customer prefixes and the API tokens.
fn reload(
    service: &Service,
    reloader: Option<&Reloader>,
    api: Option<&Api>,
    by: &Principal,
) -> Result<String, String> {
    let mut done = Vec::new();
    if let Some(r) = reloader {
        let customers = (r.0)()?;
        let n = customers.len();
        service
            .reload_customers(by, customers)
            .map_err(|e| e.to_string())?;
        done.push(format!("{n} customer entries"));
    }
    if let Some(api) = api {
        let n = api.reload_tokens().map_err(|e| e.to_string())?;
        done.push(format!("{n} API tokens"));
    }
    let text = if done.is_empty() {
        "nothing to reload".to_string()
    } else {
        format!("reloaded {}", done.join(", "))
    };
    info!("{text}");
    Ok(text)
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

/// The reply line of a service outcome.
fn outcome_reply(o: Outcome) -> Reply {
    let m = &o.mitigation;
    Reply {
        ok: true,
        code: o.coap.clone(),
        agent: Some(m.agent.clone()),
        mid: Some(m.mid),
        state: Some(m.state.as_str().to_string()),
        body: if o.answer.is_null() {
            serde_json::to_value(m).unwrap_or_default()
        } else {
            o.answer
        },
        error: None,
    }
}

/// The reply line of a refused request: an agent's error answer keeps its
/// code and diagnostic (the command fails on it), others are errors.
fn error_reply(e: ServiceError) -> Reply {
    match e {
        ServiceError::AgentRefused { code, body, id, .. } => Reply {
            ok: true,
            code: Some(code),
            agent: id.as_ref().map(|i| i.agent.clone()),
            mid: id.as_ref().map(|i| i.mid),
            state: Some("rejected".into()),
            body,
            error: None,
        },
        other => Reply::error(other),
    }
}

async fn serve_control(
    stream: UnixStream,
    service: Arc<Service>,
    reloader: Option<Reloader>,
    api: Option<Arc<Api>>,
    cluster: Option<Arc<Cluster>>,
) {
    let by = Principal::cli(stream.peer_cred().ok().map(|c| c.uid()));
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else {
        return;
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let e = ServiceError::BadRequest {
                field: None,
                message: format!("bad request: {e}"),
            };
            service.refuse(&by, "control", None, &e);
            let _ = dots_daemon::local_socket::write_line(&mut write, &Reply::error(e)).await;
            return;
        }
    };
    match &req {
        Request::Agents => service.audit_read(&by, "agents", 200),
        Request::Mitigations { .. } => service.audit_read(&by, "mitigations", 200),
        Request::Watch { agent } => service.audit_read(
            &by,
            &format!("watch {}", agent.as_deref().unwrap_or("")),
            200,
        ),
        _ => {}
    }
    let reply = match req {
        Request::Agents => Reply {
            ok: true,
            body: serde_json::to_value(service.agents()).unwrap_or_default(),
            ..Reply::default()
        },
        Request::Mitigations { agent } => Reply {
            ok: true,
            body: serde_json::to_value(service.mitigations(agent.as_deref(), None, None))
                .unwrap_or_default(),
            ..Reply::default()
        },
        Request::Drain { max, ttl } => match &cluster {
            None => {
                Reply::error("this node is not in a cluster: there is no other node to drain to")
            }
            Some(c) => match c.drain(max, ttl).await {
                Ok(report) => Reply {
                    ok: true,
                    body: serde_json::to_value(report).unwrap_or_default(),
                    ..Reply::default()
                },
                Err(e) => Reply::error(e),
            },
        },
        Request::Reload => match reload(&service, reloader.as_ref(), api.as_deref(), &by) {
            Ok(text) => Reply {
                ok: true,
                body: serde_json::json!({ "reloaded": text }),
                ..Reply::default()
            },
            Err(e) => Reply::error(format!("reload failed, the previous settings stay: {e}")),
        },
        Request::Mitigate {
            agent,
            scope,
            mid,
            label,
        } => {
            let scope = MitigationScope::from_json(&scope)
                .map_err(|e| ServiceError::BadRequest {
                    field: None,
                    message: format!("invalid mitigation request: {}", e.diagnostic()),
                })
                .and_then(|m| match <[_; 1]>::try_from(m.scopes) {
                    Ok([s]) => Ok(s),
                    Err(v) => Err(ServiceError::BadRequest {
                        field: Some("scope".into()),
                        message: format!(
                            "a mitigation request carries exactly one scope, got {}",
                            v.len()
                        ),
                    }),
                });
            let result = match (scope, mid) {
                (Err(e), _) => {
                    service.refuse(&by, "mitigate", agent.as_deref(), &e);
                    Err(e)
                }
                (Ok(scope), Some(mid)) => match service.find(agent.as_deref(), mid) {
                    Ok(id) => service.update(&by, &id, scope).await,
                    Err(e) => Err(e),
                },
                (Ok(scope), None) => {
                    service
                        .mitigate(
                            &by,
                            NewMitigation {
                                agent,
                                scope,
                                label,
                            },
                        )
                        .await
                }
            };
            result.map_or_else(error_reply, outcome_reply)
        }
        Request::Withdraw { agent, mid } => {
            let result = match service.find(agent.as_deref(), mid) {
                Ok(id) => service.withdraw(&by, &id).await,
                Err(e) => {
                    service.refuse(&by, "withdraw", agent.as_deref(), &e);
                    Err(e)
                }
            };
            result.map_or_else(error_reply, outcome_reply)
        }
        Request::Watch { agent } => {
            let (id, _, notifications) = match service.connected(agent.as_deref()) {
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
        Request::Status { agent, mid } => {
            passthrough(&service, &by, "status", agent, |reply| {
                Ok(Command::Status { mid, reply })
            })
            .await
        }
        Request::Config { agent } => {
            passthrough(&service, &by, "config", agent, |reply| {
                Ok(Command::Config { reply })
            })
            .await
        }
        Request::Redirect { agent, redirect } => {
            passthrough(&service, &by, "redirect", agent, |reply| {
                let target = RedirectedSignal::from_json(&redirect)
                    .map_err(|e| format!("invalid redirect: {}", e.diagnostic()))?;
                Ok(Command::Redirect { target, reply })
            })
            .await
        }
    };
    let _ = dots_daemon::local_socket::write_line(&mut write, &reply).await;
}

/// Hands a request straight to the agent's session (status, config,
/// redirect) and waits for the CoAP answer.
async fn passthrough(
    service: &Service,
    by: &Principal,
    action: &str,
    agent: Option<String>,
    make: impl FnOnce(oneshot::Sender<Reply>) -> Result<Command, String>,
) -> Reply {
    let (id, commands, _) = match service.connected(agent.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            service.refuse(by, action, agent.as_deref(), &e);
            return Reply::error(e);
        }
    };
    let (tx, rx) = oneshot::channel();
    let cmd = match make(tx) {
        Ok(c) => c,
        Err(e) => {
            let err = ServiceError::BadRequest {
                field: None,
                message: e,
            };
            service.refuse(by, action, Some(&id), &err);
            return Reply::error(err);
        }
    };
    let reply = if commands.send(cmd).await.is_err() {
        Reply::error(format!("agent {id} disconnected"))
    } else {
        match rx.await {
            Ok(mut r) => {
                r.agent = Some(id.clone());
                r
            }
            Err(_) => Reply::error(format!("agent {id} disconnected before answering")),
        }
    };
    service.audit_passthrough(by, action, Some(&id), &reply);
    reply
}
