//! The agent's control socket (Unix, mode 0600, root only): `dots-agent
//! status`, `mitigations`, `approve` and `reject` talk to the running agent
//! through it, one JSON object per line.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

use super::view::AgentView;
use crate::local_socket;

/// Default path of the agent's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dots-agent.sock";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Mitigations,
    /// Decide a mitigation waiting for consent. `peer` picks the upstream
    /// peer when the same cuid/mid exists under several.
    Consent {
        cuid: String,
        mid: u32,
        approve: bool,
        peer: Option<usize>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "serde_json::Value::is_null", default)]
    pub body: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn ok(body: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            body,
            error: None,
        }
    }
    fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            body: serde_json::Value::Null,
            error: Some(e.to_string()),
        }
    }
}

/// A consent decision for the peer task that owns the mitigation.
pub struct ConsentCommand {
    pub cuid: String,
    pub mid: u32,
    pub approve: bool,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the control server needs from the runtime.
#[derive(Clone)]
pub struct ControlContext {
    pub view: Arc<Mutex<AgentView>>,
    /// One sender per peer task, by peer index.
    pub consent: Vec<mpsc::Sender<ConsentCommand>>,
}

pub fn bind(path: &Path) -> Result<UnixListener> {
    local_socket::bind(path, "dots-agent")
}

/// Serves control connections until the listener fails.
pub async fn serve(listener: UnixListener, ctx: ControlContext) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, ctx.clone()));
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                return;
            }
        }
    }
}

async fn handle(stream: UnixStream, ctx: ControlContext) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else {
        return;
    };
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => answer(req, &ctx).await,
        Err(e) => Reply::error(format!("bad request: {e}")),
    };
    let _ = local_socket::write_line(&mut write, &reply).await;
}

async fn answer(req: Request, ctx: &ControlContext) -> Reply {
    let now = Instant::now();
    match req {
        Request::Status => match ctx.view.lock() {
            Ok(v) => Reply::ok(serde_json::json!({
                "monitor": v.monitor,
                "bpffs": v.bpffs,
                "interfaces": v.interfaces,
                "peers": v.peers_at(now),
                "mitigations": v.mitigations.len(),
            })),
            Err(_) => Reply::error("state poisoned"),
        },
        Request::Mitigations => match ctx.view.lock() {
            Ok(v) => Reply::ok(
                serde_json::to_value(v.mitigations.values().collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
            Err(_) => Reply::error("state poisoned"),
        },
        Request::Consent {
            cuid,
            mid,
            approve,
            peer,
        } => {
            let owners: Vec<usize> = match ctx.view.lock() {
                Ok(v) => v
                    .mitigations
                    .keys()
                    .filter(|(p, c, m)| {
                        *c == cuid && *m == mid && peer.is_none_or(|want| want == *p)
                    })
                    .map(|(p, _, _)| *p)
                    .collect(),
                Err(_) => return Reply::error("state poisoned"),
            };
            let owner = match owners.as_slice() {
                [one] => *one,
                [] => {
                    return Reply::error(format!(
                        "no mitigation {cuid}/{mid} (see `dots-agent mitigations`)"
                    ))
                }
                _ => {
                    return Reply::error(format!(
                        "{cuid}/{mid} exists under several peers: give --peer"
                    ))
                }
            };
            let Some(tx) = ctx.consent.get(owner) else {
                return Reply::error("no such peer");
            };
            let (reply, rx) = oneshot::channel();
            if tx
                .send(ConsentCommand {
                    cuid,
                    mid,
                    approve,
                    reply,
                })
                .await
                .is_err()
            {
                return Reply::error("the peer's session task has stopped");
            }
            match rx.await {
                Ok(Ok(())) => Reply::ok(
                    serde_json::json!({ "decided": if approve { "approved" } else { "rejected" } }),
                ),
                Ok(Err(e)) => Reply::error(e),
                Err(_) => Reply::error("the peer's session task has stopped"),
            }
        }
    }
}

/// Sends one request to the agent at `socket` and returns its reply.
pub async fn call(socket: &Path, req: &Request) -> Result<Reply> {
    let mut lines = local_socket::request(socket, "dots-agent run", req).await?;
    let l = lines
        .next_line()
        .await?
        .context("the agent closed the connection without answering")?;
    local_socket::parse(&l)
}
