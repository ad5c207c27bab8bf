//! The local control interface of `dots-client listen`: a Unix socket
//! (mode 0600) speaking one JSON object per line. A CLI command connects,
//! sends one request and reads replies: one for most operations, a stream of
//! notification lines for `watch`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::local_socket;

/// Default path of the control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dots-client.sock";

/// What a CLI command asks the listener. `agent` may be omitted when exactly
/// one agent is connected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
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
    pub fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
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
