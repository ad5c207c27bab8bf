//! The HTTP API of `dots-client listen` with the real binaries and curl, in
//! a namespace of the test's own: credentials, every route documented in
//! docs/openapi.yaml, bad bodies, queueing for an offline agent, the event
//! stream, metrics, and the audit trail naming each caller.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result};
use dots_daemon::pki::{self, San};
use serde_json::{json, Value};
use tests::{
    procs::{bin, curl_json, eventually, Proc, TempDir},
    Netns,
};

const TOKEN: &str = "api-test-token-0123456789abcdef";
const API: &str = "https://127.0.0.1:8443";

struct Lab {
    ns: Netns,
    dir: TempDir,
    pki: pki::LabPki,
    portal: (PathBuf, PathBuf),
    _client: Proc,
    _agent: Proc,
}

impl Lab {
    fn new() -> Result<Lab> {
        let ns = Netns::new("api")?;
        let dir = TempDir::new("api")?;
        let pki = pki::create_lab_pki(
            &dir.path.join("pki"),
            &[San::parse("127.0.0.1")],
            &["cpe1".into()],
            1,
        )?;
        // A portal that authenticates with a client certificate.
        let ca = pki::Identity::load(&pki.ca, &dir.path.join("pki/ca.key"))?;
        let portal = pki::issue(&ca, "portal", &[San::parse("portal.example")], 1)?
            .write(&dir.path.join("pki"), "portal")?;
        let tokens = dir.path.join("tokens");
        std::fs::write(&tokens, format!("detector {TOKEN}\n"))?;
        let s = |p: &PathBuf| p.display().to_string();
        let args: Vec<String> = [
            "listen",
            "--udp",
            "127.0.0.1:4647",
            "--tcp",
            "none",
            "--ca",
            &s(&pki.ca),
            "--cert",
            &s(&pki.client_cert),
            "--key",
            &s(&pki.client_key),
            "--control",
            &s(&dir.path.join("client.sock")),
            "--state-dir",
            &s(&dir.path.join("state")),
            "--customer",
            "cpe1=192.0.2.0/24",
            "--api",
            "127.0.0.1:8443",
            "--api-tokens",
            &s(&tokens),
            "--api-client-ca",
            &s(&pki.ca),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        let client = Proc::spawn(
            &ns,
            "dots-client",
            &bin("dots-client")?,
            &args,
            dir.path.join("client.log"),
        )?;
        client.wait_log("control socket ready", Duration::from_secs(10))?;
        let (_, cert, key) = &pki.agents[0];
        let agent_args: Vec<String> = [
            "run",
            "--peer",
            "127.0.0.1:4647",
            "--transport",
            "udp",
            "--ca",
            &s(&pki.ca),
            "--cert",
            &s(cert),
            "--key",
            &s(key),
            "--domain",
            "192.0.2.0/24",
            "--no-enforce",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        let agent = Proc::spawn(
            &ns,
            "agent",
            &bin("dots-agent")?,
            &agent_args,
            dir.path.join("agent.log"),
        )?;
        let lab = Lab {
            ns,
            dir,
            pki,
            portal,
            _client: client,
            _agent: agent,
        };
        eventually(Duration::from_secs(20), || {
            let (_, v) = lab.call("GET", "/v1/agents/cpe1", None).ok()?;
            (v["state"] == "connected").then_some(())
        })
        .context("the agent did not connect")?;
        Ok(lab)
    }

    /// curl with the token; returns the HTTP status and the JSON body (or
    /// the text as a JSON string).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        self.curl(
            method,
            path,
            body,
            &["-H", &format!("Authorization: Bearer {TOKEN}")],
        )
    }

    fn curl(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: &[&str],
    ) -> Result<(u16, Value)> {
        let url = format!("{API}{path}");
        curl_json(&self.ns, &self.pki.ca, 20, method, &url, body, auth)
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path.join("state/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

const GOOD: &str = r#"{"attacker": "192.0.2.10", "source-port": [1024, "2000-3000"], "target": ["198.51.100.7"], "protocol": [17], "lifetime": 600, "label": "t1"}"#;

#[test]
fn the_api_end_to_end() -> Result<()> {
    let lab = Lab::new()?;

    // Credentials: none, an unknown token, a client certificate.
    let (code, body) = lab.curl("GET", "/v1/agents", None, &[])?;
    assert_eq!(code, 401, "{body}");
    let (code, _) = lab.curl(
        "GET",
        "/v1/agents",
        None,
        &["-H", "Authorization: Bearer not-a-token-0123456789"],
    )?;
    assert_eq!(code, 401);
    let cert = lab.portal.0.display().to_string();
    let key = lab.portal.1.display().to_string();
    let (code, agents) = lab.curl("GET", "/v1/agents", None, &["--cert", &cert, "--key", &key])?;
    assert_eq!(code, 200);
    assert_eq!(agents[0]["id"], "cpe1");
    assert_eq!(agents[0]["state"], "connected");
    assert_eq!(agents[0]["prefixes"], json!(["192.0.2.0/24"]));
    assert!(
        agents[0]["heartbeat-interval"].as_u64().is_some(),
        "the agent's heartbeat interval is followed: {agents}"
    );

    // Bad bodies: 400 naming the field; nothing created.
    for (body, field) in [
        (r#"{"target": ["198.51.100.7"]}"#, "attacker"),
        (r#"{"attacker": "192.0.2.10"}"#, "target"),
        (
            r#"{"attacker": "192.0.2.10", "target": ["198.51.100.7"], "source-port": ["x"]}"#,
            "source-port[0]",
        ),
        (
            r#"{"attacker": "192.0.2.10", "target": ["198.51.100.7"], "protocol": ["udp"]}"#,
            "protocol[0]",
        ),
        (
            r#"{"attacker": "192.0.2.10/8", "target": ["198.51.100.7"]}"#,
            "attacker",
        ),
        (
            r#"{"attacker": "192.0.2.10", "target": ["127.0.0.1"], "agent": ""}"#,
            "agent",
        ),
    ] {
        let (code, v) = lab.call("POST", "/v1/mitigations", Some(body))?;
        assert_eq!(
            (code, v["field"].as_str()),
            (400, Some(field)),
            "{body}: {v}"
        );
    }
    let (code, v) = lab.call("POST", "/v1/mitigations", Some("{"))?;
    assert_eq!(code, 400, "{v}");
    // Outside every customer, unknown agent: 404.
    let (code, v) = lab.call(
        "POST",
        "/v1/mitigations",
        Some(r#"{"attacker": "198.18.0.1", "target": ["198.51.100.7"]}"#),
    )?;
    assert_eq!(code, 404, "{v}");
    let (code, v) = lab.call(
        "POST",
        "/v1/mitigations",
        Some(r#"{"agent": "cpe9", "attacker": "192.0.2.1", "target": ["198.51.100.7"]}"#),
    )?;
    assert_eq!(code, 404, "{v}");
    let (_, list) = lab.call("GET", "/v1/mitigations", None)?;
    assert_eq!(list, json!([]), "bad requests created nothing");

    // The event stream, while a mitigation is created.
    let events = lab.dir.path.join("events.txt");
    let sse = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns.name))
        .args(["curl", "-sSN", "--max-time", "6", "--cacert"])
        .arg(&lab.pki.ca)
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("{API}/v1/events?agent=cpe1"))
        .stdout(std::fs::File::create(&events)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));

    // Create: 201, picked by the attacker's customer prefix.
    let (code, o) = lab.call("POST", "/v1/mitigations", Some(GOOD))?;
    assert_eq!(code, 201, "{o}");
    assert_eq!(o["coap"], "2.01 Created");
    assert_eq!(o["mitigation"]["agent"], "cpe1");
    assert_eq!(o["mitigation"]["state"], "active");
    let id = o["mitigation"]["id"].as_str().context("id")?.to_string();
    let (code, v) = lab.call("POST", "/v1/mitigations", Some(GOOD))?;
    assert_eq!(
        (code, v["id"].as_str()),
        (409, Some(id.as_str())),
        "duplicate label: {v}"
    );
    let (code, m) = lab.call("GET", &format!("/v1/mitigations/{id}"), None)?;
    assert_eq!(code, 200);
    assert_eq!(m["label"], "t1");
    assert_eq!(m["requested-by"], "api:detector");
    let (code, v) = lab.call("GET", "/v1/mitigations?state=nonsense", None)?;
    assert_eq!((code, v["field"].as_str()), (400, Some("state")));
    let (_, active) = lab.call("GET", "/v1/mitigations?agent=cpe1&state=active", None)?;
    assert_eq!(active.as_array().map(Vec::len), Some(1));

    // An offline agent: 202, queued.
    let (code, a) = lab.call(
        "PUT",
        "/v1/agents/cpe2/prefixes",
        Some(r#"{"prefixes": ["203.0.113.8", "2001:db8:8::/48"]}"#),
    )?;
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["state"], "offline");
    let (code, v) = lab.call(
        "PUT",
        "/v1/agents/cpe3/prefixes",
        Some(r#"{"prefixes": ["192.0.2.128/25"]}"#),
    )?;
    assert_eq!(code, 409, "overlaps cpe1: {v}");
    let (code, v) = lab.call(
        "PUT",
        "/v1/agents/cpe3/prefixes",
        Some(r#"{"prefixes": ["x"]}"#),
    )?;
    assert_eq!((code, v["field"].as_str()), (400, Some("prefixes[0]")));
    let (code, q) = lab.call(
        "POST",
        "/v1/mitigations",
        Some(r#"{"attacker": "203.0.113.8", "target": ["198.51.100.7"]}"#),
    )?;
    assert_eq!(code, 202, "{q}");
    assert_eq!(q["mitigation"]["state"], "queued");
    let qid = q["mitigation"]["id"].as_str().context("id")?.to_string();
    let (code, w) = lab.call("DELETE", &format!("/v1/mitigations/{qid}"), None)?;
    assert_eq!(
        (code, w["mitigation"]["state"].as_str()),
        (200, Some("withdrawn"))
    );
    let (code, _) = lab.call("DELETE", "/v1/agents/cpe2/prefixes", None)?;
    assert_eq!(code, 200);

    // Withdraw: 200 with the final counters; again: 409, nothing changes.
    let (code, w) = lab.call("DELETE", &format!("/v1/mitigations/{id}"), None)?;
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["coap"], "2.02 Deleted");
    assert_eq!(w["mitigation"]["state"], "withdrawn");
    let (code, v) = lab.call("DELETE", &format!("/v1/mitigations/{id}"), None)?;
    assert_eq!(code, 409, "{v}");
    let (code, v) = lab.call("DELETE", "/v1/mitigations/not-an-id", None)?;
    assert_eq!((code, v["field"].as_str()), (400, Some("id")));
    let (code, _) = lab.call("GET", "/v1/mitigations/5@nobody", None)?;
    assert_eq!(code, 404);

    let sse = sse.wait_with_output()?;
    let _ = sse.status;
    let stream = std::fs::read_to_string(&events)?;
    assert!(stream.contains("event: mitigation"), "{stream}");
    assert!(stream.contains(&id), "{stream}");
    assert!(!stream.contains("cpe2"), "filtered to cpe1: {stream}");

    let (code, metrics) = lab.call("GET", "/metrics", None)?;
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap_or_default();
    assert!(text.contains("dots_client_agents_connected 1"), "{text}");
    assert!(
        text.contains(r#"dots_client_mitigations{state="withdrawn"} 2"#),
        "{text}"
    );

    // Every documented route answers with a documented status.
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.yaml"),
    )?;
    let (code, served) = lab.call("GET", "/v1/openapi.yaml", None)?;
    assert_eq!((code, served.as_str()), (200, Some(doc.as_str())));
    let routes = documented_routes(&doc);
    assert!(routes.len() >= 10, "{routes:?}");
    for (path, method, statuses) in &routes {
        let concrete = path.replace("{agent}", "cpe1").replace("{id}", &id);
        if path == "/v1/events" {
            continue; // streams: checked above
        }
        let body = (method == "post" || method == "put").then_some("{}");
        let (code, v) = lab.call(&method.to_uppercase(), &concrete, body)?;
        assert!(
            statuses.contains(&code),
            "{method} {path}: {code} not documented ({statuses:?}): {v}"
        );
    }

    // The trail names each caller.
    let trail = lab.audit();
    assert!(trail.iter().any(|e| e["event"] == "request"
        && e["action"] == "mitigate"
        && e["code"] == 201
        && e["by"]["name"] == "detector"));
    assert!(trail
        .iter()
        .any(|e| e["action"] == "set-prefixes" && e["code"] == 409));
    assert!(trail
        .iter()
        .any(|e| e["action"] == "withdraw" && e["code"] == 409));
    assert!(
        trail.iter().any(|e| e["action"] == "read"
            && e["detail"]["what"] == "/v1/agents"
            && e["by"]["name"] == "cert:portal.example"),
        "reads are audited, with the certificate's identity"
    );
    assert!(trail
        .iter()
        .any(|e| e["event"] == "final" && e["detail"]["id"] == id.as_str()));
    Ok(())
}

/// (path, method, statuses) of every operation in the OpenAPI document,
/// read from its indentation (paths at 2 spaces, methods at 4, statuses
/// at 8 under `responses:`).
fn documented_routes(doc: &str) -> Vec<(String, String, Vec<u16>)> {
    let mut out: Vec<(String, String, Vec<u16>)> = Vec::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in doc.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if !in_paths {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if indent == 2 && t.starts_with('/') && t.ends_with(':') {
            path = t.trim_end_matches(':').to_string();
        } else if indent == 4 && ["get:", "post:", "put:", "delete:"].contains(&t) {
            out.push((
                path.clone(),
                t.trim_end_matches(':').to_string(),
                Vec::new(),
            ));
        } else if indent == 8 && t.starts_with('"') {
            if let (Some(last), Some(code)) =
                (out.last_mut(), t.get(1..4).and_then(|c| c.parse().ok()))
            {
                last.2.push(code);
            }
        }
    }
    out
}
