//! How `dots-client` prints control-socket replies and what it created.

use dots_client::control::Reply;

/// One reply: its raw JSON line with `raw`, else the response code, agent
/// and mid on one line and the decoded body as pretty JSON.
pub(crate) fn reply(r: &Reply, raw: bool) {
    if raw {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    if !r.ok {
        return; // the error is printed once, by main
    }
    let mut head = Vec::new();
    if let Some(code) = &r.code {
        head.push(code.clone());
    }
    if let Some(agent) = &r.agent {
        head.push(format!("agent {agent}"));
    }
    if let Some(mid) = r.mid {
        head.push(format!("mid {mid}"));
    }
    if !head.is_empty() {
        println!("{}", head.join("  "));
    }
    if !r.body.is_null() {
        println!(
            "{}",
            serde_json::to_string_pretty(&r.body).unwrap_or_default()
        );
    }
}

/// `dots-client check-config`.
pub(crate) fn check_config(path: &std::path::Path, o: &dots_client::listener::ClientOptions) {
    let addr = |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    println!(
        "{}: valid (DTLS {}, TLS {}, {})",
        path.display(),
        addr(o.udp),
        addr(o.tcp),
        match &o.allow {
            Some(a) => format!("{} allowed agent(s)", a.len()),
            None => "any agent certified by the CA".into(),
        }
    );
}
