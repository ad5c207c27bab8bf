//! The local control interface of `dots-client listen`: a Unix socket
//! (mode 0600) speaking one JSON object per line. A CLI command connects,
//! sends one request and reads replies: one for most operations, a stream of
//! notification lines for `watch`.

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::registry::Origin;
use dots_daemon::local_socket;

/// Default path of the control socket, inside `/run/dots-client/`, the
/// systemd unit's `RuntimeDirectory=`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dots-client/control.sock";

/// What a CLI command asks the listener. `agent` may be omitted when exactly
/// one agent is connected; for `mitigate`, when the customer registry knows
/// whose prefixes contain the sources.
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
        /// Update this mitigation instead of creating one.
        mid: Option<u32>,
        /// The requester's name for it (unique among unfinished ones).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
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
    /// The book of mitigations (this client's view), optionally of one agent.
    Mitigations {
        agent: Option<String>,
    },
    /// Re-read the configuration file's customer prefixes and API tokens
    /// (as SIGHUP does).
    Reload,
    /// Redirect this cluster node's agents to the others: all of them (the
    /// node then takes no new agents), or at most `max`.
    Drain {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<usize>,
        /// Seconds the agents hold the redirect.
        ttl: u32,
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
    /// The mitigation's state in this client's book ("active", "queued", ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
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

/// An agent as the service knows it, connected or registered: the body of
/// the reply to [`Request::Agents`] is a list of these, and so is the API's
/// `GET /v1/agents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentInfo {
    /// Its certificate identity (or its address, without one).
    pub id: String,
    /// "connected" or "offline".
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    /// "DTLS/UDP" or "TLS/TCP".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Whether the (D)TLS session was resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<bool>,
    /// Seconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<u64>,
    /// Seconds between heartbeats, as the agent set it (RFC 9066 §5.2.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<u64>,
    /// Its customer prefixes (the registry).
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    /// Where they come from: "config" or "api".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefixes_from: Option<Origin>,
    /// Its unfinished mitigations in this client's book.
    #[serde(default)]
    pub mitigations: usize,
    /// In a cluster: the node holding its session (this one when
    /// "connected"; another one when "offline" here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
            state: "connected".into(),
            addr: Some("[2001:db8::2]:50000".parse().unwrap()),
            transport: Some("DTLS/UDP".into()),
            resumed: Some(false),
            connected_at: Some(1_700_000_000),
            heartbeat_interval: Some(30),
            prefixes: vec!["203.0.113.1/32".parse().unwrap()],
            prefixes_from: Some(Origin::Config),
            mitigations: 1,
            node: Some("isp-a".into()),
        }];
        let reply = Reply {
            ok: true,
            body: serde_json::to_value(&agents).unwrap(),
            ..Reply::default()
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"ok":true,"body":[{"addr":"[2001:db8::2]:50000","connected-at":1700000000,"heartbeat-interval":30,"id":"cpe1","mitigations":1,"node":"isp-a","prefixes":["203.0.113.1/32"],"prefixes-from":"config","resumed":false,"state":"connected","transport":"DTLS/UDP"}]}"#
        );
        let back: Reply = serde_json::from_str(&line).unwrap();
        let list: Vec<AgentInfo> = serde_json::from_value(back.body).unwrap();
        assert_eq!(list, agents);
    }
}
