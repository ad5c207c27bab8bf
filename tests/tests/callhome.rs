//! Call Home end to end with the real binaries: `dots-client listen` and
//! `dots-agent run` in a network namespace of the test's own, over DTLS and
//! TLS on its loopback, driven with the `dots-client` commands. nftables in
//! the namespace blocks UDP or drops 30% of it.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use dots_daemon::pki::{self, San};
use serde_json::Value;
use tests::{
    procs::{bin, eventually, run_in, Proc, TempDir},
    Netns,
};

const DOMAIN: &str = "192.0.2.0/24";

struct Lab {
    ns: Netns,
    dir: TempDir,
    pki: pki::LabPki,
}

impl Lab {
    fn new() -> Result<Lab> {
        let ns = Netns::new("ch")?;
        let dir = TempDir::new("ch")?;
        let pki = pki::create_lab_pki(
            &dir.path.join("pki"),
            &[San::parse("isp.example"), San::parse("127.0.0.1")],
            &["cpe1".into()],
            1,
        )?;
        Ok(Lab { ns, dir, pki })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }

    /// `dots-client listen` on `addr` (UDP and TCP), with its own control socket.
    fn listen(
        &self,
        name: &str,
        addr: &str,
        cert: (&PathBuf, &PathBuf),
        extra: &[&str],
    ) -> Result<Proc> {
        let mut args: Vec<String> = vec![
            "listen".into(),
            "--udp".into(),
            format!("{addr}:4647"),
            "--tcp".into(),
            format!("{addr}:4647"),
            "--ca".into(),
            self.pki.ca.display().to_string(),
            "--cert".into(),
            cert.0.display().to_string(),
            "--key".into(),
            cert.1.display().to_string(),
            "--control".into(),
            self.path(&format!("{name}.sock")),
            "--state-dir".into(),
            self.path(&format!("{name}-state")),
            // The agent's domain, and 10.1.1.0/24 outside it, so that the
            // agent's own domain check is tested too (the client passes
            // what lies in the customer's registered prefixes).
            "--customer".into(),
            format!("cpe1={DOMAIN},10.1.1.0/24"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::spawn(
            &self.ns,
            name,
            &bin("dots-client")?,
            &args,
            self.dir.path.join(format!("{name}.log")),
        )?;
        p.wait_log("control socket ready", Duration::from_secs(10))?;
        Ok(p)
    }

    fn default_listener(&self) -> Result<Proc> {
        self.listen(
            "isp",
            "127.0.0.1",
            (&self.pki.client_cert, &self.pki.client_key),
            &[],
        )
    }

    /// `dots-agent run --no-enforce` dialling `peer`.
    fn agent(&self, peer: &str, extra: &[&str]) -> Result<Proc> {
        let (_, cert, key) = &self.pki.agents[0];
        let mut args: Vec<String> = vec![
            "run".into(),
            "--peer".into(),
            peer.into(),
            "--ca".into(),
            self.pki.ca.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--domain".into(),
            DOMAIN.into(),
            "--no-enforce".into(),
            // Its own socket and state: tests running at the same time
            // (other test binaries, other checkouts) must not meet.
            "--control".into(),
            self.path("agent.sock"),
            "--state-dir".into(),
            self.path("agent-state"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            &self.ns,
            "agent",
            &bin("dots-agent")?,
            &args,
            self.dir.path.join("agent.log"),
        )
    }

    /// Runs a `dots-client` command against listener `name`; returns the reply
    /// lines (raw JSON) and whether the command succeeded.
    fn client(&self, name: &str, args: &[&str]) -> Result<(bool, Vec<Value>)> {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.push("--control".into());
        full.push(self.path(&format!("{name}.sock")));
        full.push("--raw".into());
        let out = run_in(&self.ns, &bin("dots-client")?, &full)?;
        let replies = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok((out.status.success(), replies))
    }

    /// The agents listener `name` has connected now.
    fn connected(&self, name: &str) -> Result<Vec<Value>> {
        let (_, r) = self.client(name, &["agents"])?;
        Ok(r.first()
            .and_then(|r| r["body"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["state"] == "connected")
            .collect())
    }

    /// Waits until listener `name` has an agent connected; returns its entry.
    fn wait_agent(&self, name: &str, timeout: Duration) -> Result<Value> {
        eventually(timeout, || self.connected(name).ok()?.into_iter().next())
            .with_context(|| format!("no agent connected to {name} within {timeout:?}"))
    }

    fn nft(&self, script: &str) -> Result<()> {
        let path = self.dir.path.join("rules.nft");
        std::fs::write(&path, script)?;
        self.ns.exec(&["nft", "-f", &path.display().to_string()])?;
        Ok(())
    }
}

fn mitigate(lab: &Lab, listener: &str) -> Result<(String, u32, Value)> {
    let (ok, replies) = lab.client(
        listener,
        &[
            "mitigate",
            "--source",
            "192.0.2.10/32",
            "--source-port",
            "1000-2000",
            "--target",
            "198.51.100.7/32",
            "--protocol",
            "17",
            "--lifetime",
            "600",
        ],
    )?;
    let r = replies.first().context("no reply")?;
    if !ok {
        bail!("mitigate failed: {r}");
    }
    let code = r["code"].as_str().unwrap_or_default().to_string();
    let mid = r["mid"].as_u64().context("reply without mid")? as u32;
    Ok((code, mid, r["body"].clone()))
}

fn scope_status(body: &Value) -> Option<&str> {
    body["ietf-dots-signal-channel:mitigation-scope"]["scope"][0]["status"].as_str()
}

fn conversation(transport: &str) -> Result<()> {
    let lab = Lab::new()?;
    let _isp = lab.default_listener()?;
    let agent = lab.agent("127.0.0.1:4647", &["--transport", transport])?;
    let info = lab.wait_agent("isp", Duration::from_secs(15))?;
    assert_eq!(info["id"], "cpe1");
    let want = if transport == "udp" {
        "DTLS/UDP"
    } else {
        "TLS/TCP"
    };
    assert_eq!(info["transport"], want);

    // Observe: a watcher sees the new mitigation appear.
    let watch_log = lab.dir.path.join("watch.log");
    let watcher = Proc::spawn(
        &lab.ns,
        "watch",
        &bin("dots-client")?,
        &[
            "watch".into(),
            "--control".into(),
            lab.path("isp.sock"),
            "--raw".into(),
        ],
        watch_log,
    )?;
    std::thread::sleep(Duration::from_millis(300));

    let (code, mid, body) = mitigate(&lab, "isp")?;
    assert_eq!(code, "2.01 Created");
    assert_eq!(
        scope_status(&body),
        Some("attack-mitigation-in-progress"),
        "monitor mode stays at status 1"
    );
    agent.wait_log(
        "monitor mode: mitigation validated and answered",
        Duration::from_secs(5),
    )?;
    watcher.wait_log(&mid.to_string(), Duration::from_secs(10))?;

    // Status of that mitigation, then of all.
    let (ok, r) = lab.client("isp", &["status", "--mid", &mid.to_string()])?;
    assert!(ok);
    assert_eq!(r[0]["code"], "2.05 Content");
    assert_eq!(
        scope_status(&r[0]["body"]),
        Some("attack-mitigation-in-progress")
    );

    // A source outside the agent's domain: 4.00 with a diagnostic, and the
    // command fails.
    let (ok, r) = lab.client(
        "isp",
        &[
            "mitigate",
            "--source",
            "10.1.1.1/32",
            "--target",
            "198.51.100.7/32",
        ],
    )?;
    assert!(!ok);
    assert_eq!(r[0]["code"], "4.00 Bad Request");
    assert!(
        r[0]["body"]["diagnostic"]
            .as_str()
            .unwrap_or_default()
            .contains("outside"),
        "{r:?}"
    );

    // Session configuration.
    let (ok, r) = lab.client("isp", &["config"])?;
    assert!(ok);
    assert!(
        r[0]["body"]["ietf-dots-signal-channel:signal-config"]["mitigating-config"].is_object(),
        "{r:?}"
    );

    // Withdraw: 2.02, then it is gone.
    let (ok, r) = lab.client("isp", &["withdraw", "--mid", &mid.to_string()])?;
    assert!(ok, "{r:?}");
    assert_eq!(r[0]["code"], "2.02 Deleted");
    let (ok, r) = lab.client("isp", &["status", "--mid", &mid.to_string()])?;
    assert!(!ok);
    assert_eq!(r[0]["code"], "4.04 Not Found");
    Ok(())
}

#[test]
fn mitigation_conversation_over_dtls() -> Result<()> {
    conversation("udp")
}

#[test]
fn mitigation_conversation_over_tls() -> Result<()> {
    conversation("tcp")
}

#[test]
fn agent_from_another_ca_is_rejected() -> Result<()> {
    let lab = Lab::new()?;
    let isp = lab.default_listener()?;
    // An agent certificate from a CA the listener does not trust.
    // (Named apart from the lab's CA: chain building goes by names.)
    let other = lab.dir.path.join("other");
    let other_ca = pki::new_ca("another CA", 1)?;
    let (other_ca_pem, _) = other_ca.write(&other, "ca")?;
    let (cert, key) = pki::issue(&other_ca, "mallory", &[pki::San::parse("mallory")], 1)?
        .write(&other, "agent-mallory")?;
    // Its bundle trusts the listener's CA and holds its own, so the agent
    // passes its own start-up checks: only the listener can refuse it.
    let bundle = lab.dir.path.join("mallory-ca.pem");
    std::fs::write(
        &bundle,
        [std::fs::read(&lab.pki.ca)?, std::fs::read(&other_ca_pem)?].concat(),
    )?;
    let args: Vec<String> = [
        "run",
        "--peer",
        "127.0.0.1:4647",
        "--ca",
        &bundle.display().to_string(),
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--domain",
        DOMAIN,
        "--no-enforce",
        "--transport",
        "udp",
        "--control",
        &lab.path("agent.sock"),
        "--state-dir",
        &lab.path("agent-state"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _agent = Proc::spawn(
        &lab.ns,
        "mallory",
        &bin("dots-agent")?,
        &args,
        lab.dir.path.join("mallory.log"),
    )?;
    isp.wait_log("handshake", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(lab.connected("isp")?.is_empty(), "no agent may be admitted");
    Ok(())
}

#[test]
fn listener_with_the_wrong_name_is_rejected() -> Result<()> {
    let lab = Lab::new()?;
    let _isp = lab.default_listener()?;
    let agent = lab.agent("127.0.0.1:4647", &["--peer-name", "not-the-isp.example"])?;
    agent.wait_log("dial failed", Duration::from_secs(20))?;
    assert!(
        agent.log_text().contains("mismatch") || agent.log_text().contains("verify"),
        "{}",
        agent.log_text()
    );
    assert!(lab.connected("isp")?.is_empty());
    Ok(())
}

#[test]
fn agent_redials_and_resumes_after_the_listener_restarts() -> Result<()> {
    for transport in ["udp", "tcp"] {
        let lab = Lab::new()?;
        let mut isp = lab.default_listener()?;
        let agent = lab.agent("127.0.0.1:4647", &["--transport", transport])?;
        let first = lab.wait_agent("isp", Duration::from_secs(15))?;
        assert_eq!(first["resumed"], false);
        isp.stop();
        drop(isp);
        // Same keys from the state directory: the agent's ticket is still good.
        let _isp = lab.default_listener()?;
        let again = eventually(Duration::from_secs(60), || {
            lab.connected("isp").ok()?.into_iter().next()
        })
        .with_context(|| {
            format!(
                "{transport}: no reconnection; agent log:\n{}",
                agent.log_text()
            )
        })?;
        assert_eq!(
            again["resumed"], true,
            "{transport}: session resumed: {again}"
        );
        // The session works.
        let (code, _, _) = mitigate(&lab, "isp")?;
        assert_eq!(code, "2.01 Created");
    }
    Ok(())
}

#[test]
fn redirect_to_a_second_client() -> Result<()> {
    let lab = Lab::new()?;
    let _isp = lab.default_listener()?;
    // A second client on 127.0.0.2 with its own name, from the same CA.
    let ca = pki::Identity::load(&lab.pki.ca, &lab.dir.path.join("pki/ca.key"))?;
    let alt = pki::issue(&ca, "alt.example", &[San::parse("alt.example")], 1)?;
    let (alt_cert, alt_key) = alt.write(&lab.dir.path.join("pki"), "alt")?;
    let _alt = lab.listen("alt", "127.0.0.2", (&alt_cert, &alt_key), &[])?;
    let agent = lab.agent("127.0.0.1:4647", &["--peer-name", "isp.example"])?;
    lab.wait_agent("isp", Duration::from_secs(15))?;
    let (ok, r) = lab.client(
        "isp",
        &[
            "redirect",
            "--alt",
            "alt.example",
            "--record",
            "127.0.0.2",
            "--ttl",
            "300",
        ],
    )?;
    assert!(ok, "{r:?}");
    assert_eq!(r[0]["code"], "2.01 Created");
    let info = lab.wait_agent("alt", Duration::from_secs(20))?;
    assert_eq!(info["id"], "cpe1");
    agent.wait_log("redirected", Duration::from_secs(1))?;
    let (code, _, _) = mitigate(&lab, "alt")?;
    assert_eq!(code, "2.01 Created");
    Ok(())
}

#[test]
fn falls_back_to_tls_when_udp_is_blocked() -> Result<()> {
    let lab = Lab::new()?;
    lab.nft("table inet dots {\n chain input {\n  type filter hook input priority 0;\n  udp dport 4647 drop\n }\n}\n")?;
    let _isp = lab.default_listener()?;
    let _agent = lab.agent("127.0.0.1:4647", &[])?;
    let info = lab.wait_agent("isp", Duration::from_secs(30))?;
    assert_eq!(info["transport"], "TLS/TCP");
    let (code, _, _) = mitigate(&lab, "isp")?;
    assert_eq!(code, "2.01 Created");
    Ok(())
}

#[test]
fn session_survives_30_percent_packet_loss() -> Result<()> {
    let lab = Lab::new()?;
    // 30% of the signal channel's datagrams, both directions, at random.
    lab.nft(
        "table inet dots {\n chain input {\n  type filter hook input priority 0;\n  \
         udp dport 4647 numgen random mod 100 < 30 drop\n  \
         udp sport 4647 numgen random mod 100 < 30 drop\n }\n}\n",
    )?;
    let _isp = lab.default_listener()?;
    let _agent = lab.agent("127.0.0.1:4647", &["--transport", "udp"])?;
    lab.wait_agent("isp", Duration::from_secs(60))?;
    let mut created = 0;
    for _ in 0..5 {
        // CoAP retransmits confirmable requests; a lost answer is replayed
        // from the agent's deduplication cache.
        if let Ok((code, _, _)) = mitigate(&lab, "isp") {
            assert_eq!(code, "2.01 Created");
            created += 1;
        }
    }
    // A request and its answer both get through one attempt with
    // probability 0.7 x 0.7 = 0.49; with CoAP's 3 retransmissions a request
    // fails with probability 0.51^4, about 7%. Three or more of five then
    // succeed 99.7% of the time (four or more only 96%: a flaky bar).
    assert!(
        created >= 3,
        "only {created} of 5 requests succeeded under 30% loss"
    );
    // The session is still up: the listener holds it, and a GET over the
    // same lossy path gets through within three tries (one try fails about
    // 7% of the time, like a PUT above; three in a row 0.03%).
    assert!(
        lab.connected("isp")?.iter().any(|a| a["id"] == "cpe1"),
        "the agent's session is gone"
    );
    let status_ok = (0..3).any(|_| lab.client("isp", &["status"]).is_ok_and(|(ok, _)| ok));
    assert!(status_ok, "status failed three times under 30% loss");
    Ok(())
}

#[test]
fn one_session_per_upstream_peer() -> Result<()> {
    let lab = Lab::new()?;
    let _isp = lab.default_listener()?;
    let ca = pki::Identity::load(&lab.pki.ca, &lab.dir.path.join("pki/ca.key"))?;
    let second = pki::issue(
        &ca,
        "isp2.example",
        &[San::parse("isp2.example"), San::parse("127.0.0.2")],
        1,
    )?;
    let (cert, key) = second.write(&lab.dir.path.join("pki"), "isp2")?;
    let _isp2 = lab.listen("isp2", "127.0.0.2", (&cert, &key), &[])?;
    let _agent = lab.agent("127.0.0.1:4647", &["--peer", "127.0.0.2:4647"])?;
    assert_eq!(
        lab.wait_agent("isp", Duration::from_secs(15))?["id"],
        "cpe1"
    );
    assert_eq!(
        lab.wait_agent("isp2", Duration::from_secs(15))?["id"],
        "cpe1"
    );
    // Each peer's session carries its own mitigations.
    assert_eq!(mitigate(&lab, "isp")?.0, "2.01 Created");
    assert_eq!(mitigate(&lab, "isp2")?.0, "2.01 Created");
    Ok(())
}
