//! The local control interface of `dots-client listen`: a Unix socket
//! (mode 0600) speaking one JSON object per line. A CLI command connects,
//! sends one request and reads replies: one for most operations, a stream of
//! notification lines for `watch`.

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use dots_daemon::local_socket;

/// Default path of the control socket, inside `/run/dots-client/`, the
/// systemd unit's `RuntimeDirectory=`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dots-client/control.sock";

/// What a CLI command asks the listener. `agent` may be omitted when exactly
/// one agent is connected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Answered with the list of [`AgentInfo`] as the body.
    Agents,
    /// `scope` is the JSON form of a mitigation request body
    /// (`ietf-dots-signal-channel:mitigation-scope`).
    Mitigate {
        agent: Option<String>,
        scope: serde_json::Value,
        mid: Option<u32>,
    },
    Withdraw {
        agent: Option<String>,
        mid: u32,
    },
    Status {
        agent: Option<String>,
        mid: Option<u32>,
    },
    Config {
        agent: Option<String>,
    },
    /// `redirect` is the JSON form of a redirected-signal body.
    Redirect {
        agent: Option<String>,
        redirect: serde_json::Value,
    },
    Watch {
        agent: Option<String>,
    },
}

/// One reply line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// CoAP response code, e.g. "2.01 Created" (absent for local answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mid: Option<u32>,
    /// Decoded body (JSON form), or the list of agents.
    #[serde(skip_serializing_if = "serde_json::Value::is_null", default)]
    pub body: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A reply refusing the request.
    pub fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }

    /// Why this reply means the command failed: the listener refused it,
    /// or the agent answered with an error code (4.xx, 5.xx) whose
    /// diagnostic is in the body.
    pub fn failure(&self) -> Option<String> {
        if !self.ok {
            return self.error.clone();
        }
        self.code
            .as_deref()
            .filter(|c| c.starts_with('4') || c.starts_with('5'))
            .map(|code| format!("the agent answered {code}"))
    }
}

/// A connected agent, as the listener knows it: the body of the reply to
/// [`Request::Agents`] is a list of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its certificate identity (or its address, without one).
    pub id: String,
    pub addr: SocketAddr,
    /// "DTLS/UDP" or "TLS/TCP".
    pub transport: String,
    /// Whether the (D)TLS session was resumed.
    pub resumed: bool,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
}

/// Sends `req` to the listener at `socket` and calls `on_reply` for each
/// reply line until the listener closes the stream (or `on_reply` says stop).
pub async fn call(
    socket: &Path,
    req: &Request,
    mut on_reply: impl FnMut(Reply) -> bool,
) -> Result<()> {
    let mut lines = local_socket::request(socket, "dots-client listen", req).await?;
    let mut any = false;
    while let Some(l) = lines.next_line().await? {
        any = true;
        let reply: Reply =
            serde_json::from_str(&l).with_context(|| format!("bad reply line {l:?}"))?;
        if !on_reply(reply) {
            break;
        }
    }
    if !any {
        bail!("the listener closed the connection without answering");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_of_a_reply() {
        assert_eq!(
            Reply::error("no agent is connected").failure().as_deref(),
            Some("no agent is connected")
        );
        let ok = Reply {
            ok: true,
            code: Some("2.01 Created".into()),
            ..Reply::default()
        };
        assert_eq!(ok.failure(), None);
        assert_eq!(
            Reply {
                ok: true,
                ..Reply::default()
            }
            .failure(),
            None
        );
        for code in ["4.00 Bad Request", "5.03 Service Unavailable"] {
            let r = Reply {
                ok: true,
                code: Some(code.into()),
                ..Reply::default()
            };
            assert_eq!(r.failure(), Some(format!("the agent answered {code}")));
        }
    }

    #[test]
    fn agents_list_reads_back() {
        let agents = vec![AgentInfo {
            id: "cpe1".into(),
            addr: "[2001:db8::2]:50000".parse().unwrap(),
            transport: "DTLS/UDP".into(),
            resumed: false,
            connected_at: 1_700_000_000,
        }];
        let reply = Reply {
            ok: true,
            body: serde_json::to_value(&agents).unwrap(),
            ..Reply::default()
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"ok":true,"body":[{"addr":"[2001:db8::2]:50000","connected_at":1700000000,"id":"cpe1","resumed":false,"transport":"DTLS/UDP"}]}"#
        );
        let back: Reply = serde_json::from_str(&line).unwrap();
        let list: Vec<AgentInfo> = serde_json::from_value(back.body).unwrap();
        assert_eq!(list, agents);
    }
}
