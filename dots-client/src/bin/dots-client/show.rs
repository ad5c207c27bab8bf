//! How `dots-client` prints control-socket replies and what it created.

use dots_client::control::Reply;
use dots_daemon::pki::LabPki;

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

/// `dots-client pki`: where the files went.
pub(crate) fn pki(lab: &LabPki) {
    println!("CA:      {}", lab.ca.display());
    println!(
        "client:  {} {}",
        lab.client_cert.display(),
        lab.client_key.display()
    );
    for (name, cert, key) in &lab.agents {
        println!("agent {name}: {} {}", cert.display(), key.display());
    }
}
