//! The agent's control socket (Unix, mode 0600, root only): `dots-agent
//! status`, `mitigations`, `approve` and `reject` talk to the running agent
//! through it, one JSON object per line.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

use super::view::{AgentView, MitigationView, StatusView};
use dots_daemon::local_socket;

/// What a CLI command asks the running agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Answered with a [`StatusView`].
    Status,
    /// Answered with every [`MitigationView`].
    Mitigations,
    /// Decide a mitigation waiting for consent. `peer` picks the upstream
    /// peer when the same cuid/mid exists under several. Answered with a
    /// [`Decision`].
    Consent {
        cuid: String,
        mid: u32,
        approve: bool,
        peer: Option<usize>,
    },
}

/// One reply line: `{"ok":true,"body":...}`, or `{"ok":false,"error":"..."}`.
/// `B` is the body of the request asked (see [`Request`]); the agent sends
/// `Reply<Body>`, and a client reads the type it expects, as [`call`] does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply<B = Body> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<B>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of a successful reply, one variant per [`Request`]; serialized
/// as the inner value alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    Status(StatusView),
    Mitigations(Vec<MitigationView>),
    Decision(Decision),
}

/// The body of the reply to [`Request::Consent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub decided: Decided,
}

/// What the operator decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decided {
    Approved,
    Rejected,
}

impl Decided {
    /// `approved` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decided::Approved => "approved",
            Decided::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for Decided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<B> Reply<B> {
    fn ok(body: B) -> Reply<B> {
        Reply {
            ok: true,
            body: Some(body),
            error: None,
        }
    }

    fn error(e: impl std::fmt::Display) -> Reply<B> {
        Reply {
            ok: false,
            body: None,
            error: Some(e.to_string()),
        }
    }

    /// The body of a successful reply; the agent's error otherwise.
    pub fn into_result(self) -> Result<B> {
        if !self.ok {
            anyhow::bail!(
                "{}",
                self.error.unwrap_or_else(|| "the agent refused".into())
            );
        }
        self.body.context("the agent's reply has no body")
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
    /// One sender per peer task, by peer index (peers come and go with
    /// reloads).
    pub consent: Arc<Mutex<BTreeMap<usize, mpsc::Sender<ConsentCommand>>>>,
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
            Ok(v) => Reply::ok(Body::Status(v.status(now))),
            Err(_) => Reply::error("state poisoned"),
        },
        Request::Mitigations => match ctx.view.lock() {
            Ok(v) => Reply::ok(Body::Mitigations(v.mitigation_list())),
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
            let Some(tx) = ctx.consent.lock().ok().and_then(|c| c.get(&owner).cloned()) else {
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
                Ok(Ok(())) => Reply::ok(Body::Decision(Decision {
                    decided: if approve {
                        Decided::Approved
                    } else {
                        Decided::Rejected
                    },
                })),
                Ok(Err(e)) => Reply::error(e),
                Err(_) => Reply::error("the peer's session task has stopped"),
            }
        }
    }
}

/// Sends one request to the agent at `socket` and returns the body of its
/// reply, read as `B`; an error when the agent refused.
pub async fn call<B: DeserializeOwned>(socket: &Path, req: &Request) -> Result<B> {
    let mut lines = local_socket::request(socket, "dots-agent run", req).await?;
    let l = lines
        .next_line()
        .await?
        .context("the agent closed the connection without answering")?;
    local_socket::parse::<Reply<B>>(&l)?.into_result()
}

/// `dots-agent status`: the running agent's [`StatusView`].
pub async fn status(socket: &Path) -> Result<StatusView> {
    call(socket, &Request::Status).await
}

/// `dots-agent mitigations`: every mitigation the running agent holds.
pub async fn mitigations(socket: &Path) -> Result<Vec<MitigationView>> {
    call(socket, &Request::Mitigations).await
}

/// `dots-agent approve` / `reject`: decides a mitigation waiting for consent.
pub async fn consent(
    socket: &Path,
    cuid: &str,
    mid: u32,
    approve: bool,
    peer: Option<usize>,
) -> Result<Decision> {
    let req = Request::Consent {
        cuid: cuid.to_string(),
        mid,
        approve,
        peer,
    };
    call(socket, &req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::view::{MitigationState, PeerState, PeerStatus};

    fn line(r: &Reply) -> String {
        serde_json::to_string(r).unwrap()
    }

    #[test]
    fn replies_keep_their_wire_form() {
        let decided = Reply::ok(Body::Decision(Decision {
            decided: Decided::Approved,
        }));
        assert_eq!(
            line(&decided),
            r#"{"ok":true,"body":{"decided":"approved"}}"#
        );
        let refused: Reply = Reply::error("no mitigation x/1");
        assert_eq!(
            line(&refused),
            r#"{"ok":false,"error":"no mitigation x/1"}"#
        );
        let e = local_socket::parse::<Reply<Decision>>(&line(&refused))
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(e.to_string(), "no mitigation x/1");
        let d: Decision = local_socket::parse::<Reply<Decision>>(&line(&decided))
            .unwrap()
            .into_result()
            .unwrap();
        assert_eq!(d.decided.to_string(), "approved");
    }

    #[test]
    fn typed_bodies_read_back() {
        let status = StatusView {
            monitor: false,
            bpffs: "/sys/fs/bpf/dots-agent".into(),
            interfaces: Vec::new(),
            peers: vec![PeerStatus {
                peer: "isp.example:4647".into(),
                state: PeerState::Dialling,
                last_error: Some("refused".into()),
                ..Default::default()
            }],
            mitigations: 1,
        };
        let l = line(&Reply::ok(Body::Status(status.clone())));
        assert!(l.contains(r#""state":"dialling""#), "{l}");
        let back: StatusView = local_socket::parse::<Reply<StatusView>>(&l)
            .unwrap()
            .into_result()
            .unwrap();
        assert_eq!(back, status);

        let m = MitigationView {
            peer: 0,
            cuid: "dz6pHjaADkaFTbjreJGBpw".into(),
            mid: 56,
            state: MitigationState::PendingConsent,
            status: 1,
            sources: vec!["192.0.2.10/32".parse().unwrap()],
            source_ports: Vec::new(),
            icmp_types: Vec::new(),
            targets: vec!["198.51.100.7/32".parse().unwrap()],
            protocols: vec![17],
            target_ports: vec!["53".into()],
            lifetime_left: -1,
            packets: 0,
            bytes: 0,
            pps: 0,
            bps: 0,
            devices: Vec::new(),
            exempt: vec!["192.0.2.250/32".parse().unwrap()],
            over_limit: None,
            action: "monitor".into(),
            passed_packets: 3,
            passed_bytes: 300,
            passed_pps: 1,
            made_from: Default::default(),
        };
        let l = line(&Reply::ok(Body::Mitigations(vec![m.clone()])));
        assert!(l.contains(r#""state":"pending-consent""#), "{l}");
        let back: Vec<MitigationView> = local_socket::parse::<Reply<Vec<MitigationView>>>(&l)
            .unwrap()
            .into_result()
            .unwrap();
        assert_eq!(back, [m]);
        // Untyped readers (raw JSON, older tools) still see the same body.
        let any: Reply = local_socket::parse(&l).unwrap();
        assert!(matches!(any.body, Some(Body::Mitigations(ref v)) if v.len() == 1));
    }
}
