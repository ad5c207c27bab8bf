//! The ISP cluster with the real binaries: etcd from Debian's package, three
//! `dots-client` nodes sharing it, and one agent that finds them through RFC
//! 8973 discovery (dnsmasq serving S-NAPTR and SRV records naming the three
//! nodes), with XDP enforcement on its LAN.
//!
//! ```text
//! [ha 192.0.2.2]--lan--[cpe: dots-agent, dnsmasq]--+
//!                                                   |   hub (bridge, 10.77.0.254,
//! [etcd 10.77.0.9]---------------------------------+    target 198.51.100.10)
//! [n1 10.77.0.11] [n2 10.77.0.12] [n3 10.77.0.13]--+
//! ```
//!
//! Each node has a namespace of its own, so that one can be cut from etcd
//! with nftables while the agent still reaches it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dots_daemon::pki::{self, San};
use serde_json::Value;
use tests::{
    lab::{send, Sink},
    procs::{bin, curl_json, eventually, run_in, Proc, TempDir},
    unique, veth, BpffsDir, Netns,
};

const TOKEN: &str = "cluster-test-token-0123456789";
const ETCD: &str = "10.77.0.9";
const TARGET: &str = "198.51.100.10";
/// Seconds: a dead node's agents wait this long for another node.
const LEASE_TTL: u64 = 3;
const NODES: usize = 3;

fn node_addr(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

struct ClusterLab {
    // Processes first: they stop before their namespaces and files go.
    agent: Option<Proc>,
    nodes: Vec<Option<Proc>>,
    etcd: Option<Proc>,
    _dns: Proc,
    hub: Netns,
    etcd_ns: Netns,
    node_ns: Vec<Netns>,
    cpe: Netns,
    ha: Netns,
    dir: TempDir,
    bpffs: BpffsDir,
    pki: pki::LabPki,
    lan: String,
}

/// Joins `ns` to the hub's bridge with `addr`/24.
fn attach(hub: &Netns, ns: &Netns, addr: &str) -> Result<()> {
    let port = unique("v");
    veth(ns, "eth0", hub, &port)?;
    hub.ip(&["link", "set", &port, "master", "br0"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", "10.77.0.254"])?;
    Ok(())
}

impl ClusterLab {
    fn new() -> Result<ClusterLab> {
        let hub = Netns::new("hub")?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        hub.ip(&["addr", "add", "10.77.0.254/24", "dev", "br0"])?;
        hub.ip(&["addr", "add", &format!("{TARGET}/32"), "dev", "lo"])?;
        let etcd_ns = Netns::new("etcd")?;
        attach(&hub, &etcd_ns, ETCD)?;
        let mut node_ns = Vec::new();
        for i in 0..NODES {
            let ns = Netns::new(&format!("n{}", i + 1))?;
            attach(&hub, &ns, &node_addr(i))?;
            node_ns.push(ns);
        }
        let cpe = Netns::new("cpe")?;
        attach(&hub, &cpe, "10.77.0.1")?;
        let ha = Netns::new("ha")?;
        let lan = unique("la");
        veth(&ha, "eth0", &cpe, &lan)?;
        ha.ip(&["addr", "add", "192.0.2.2/28", "dev", "eth0"])?;
        ha.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        cpe.ip(&["addr", "add", "192.0.2.1/28", "dev", &lan])?;
        cpe.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        hub.ip(&["route", "add", "192.0.2.0/24", "via", "10.77.0.1"])?;

        let dir = TempDir::new("cluster")?;
        // One client identity for every node: the agent keys mitigations
        // by the client's cuid (its certificate's key), and a node taking
        // an agent over re-sends them under the same cuid and mids.
        let mut names = vec![San::parse("example.org")];
        names.extend((0..NODES).map(|i| San::parse(&node_addr(i))));
        names.extend((0..NODES).map(|i| San::parse(&format!("n{}.example.org", i + 1))));
        let pki = pki::create_lab_pki(&dir.path.join("pki"), &names, &["cpe1".into()], 1)?;
        std::fs::write(dir.path.join("tokens"), format!("ops {TOKEN}\n"))?;

        let mut zone = String::from(
            "local=/example.org/\nlocal-ttl=60\n\
naptr-record=example.org,100,10,,DOTS-CALL-HOME:signal.tcp,,signal.example.org\n\
naptr-record=signal.example.org,100,10,s,DOTS-CALL-HOME:signal.tcp,,_dots-call-home._tcp.example.org\n",
        );
        for i in 0..NODES {
            zone.push_str(&format!(
                "srv-host=_dots-call-home._tcp.example.org,n{n}.example.org,4647,{n},0\nhost-record=n{n}.example.org,{a}\n",
                n = i + 1,
                a = node_addr(i)
            ));
        }
        std::fs::write(dir.path.join("dnsmasq.conf"), zone)?;
        let dns = Proc::spawn(
            &cpe,
            "dnsmasq",
            Path::new("/usr/sbin/dnsmasq"),
            &[
                "--no-daemon".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--port=5353".into(),
                "--listen-address=127.0.0.1".into(),
                "--bind-interfaces".into(),
                format!("--conf-file={}", dir.path.join("dnsmasq.conf").display()),
                format!("--pid-file={}", dir.path.join("dnsmasq.pid").display()),
                "--user=root".into(),
            ],
            dir.path.join("dnsmasq.log"),
        )?;
        dns.wait_log("started, version", Duration::from_secs(10))?;

        let mut lab = ClusterLab {
            agent: None,
            nodes: (0..NODES).map(|_| None).collect(),
            etcd: None,
            _dns: dns,
            hub,
            etcd_ns,
            node_ns,
            cpe,
            ha,
            dir,
            bpffs: BpffsDir::new()?,
            pki,
            lan,
        };
        lab.start_etcd()?;
        for i in 0..NODES {
            lab.start_node(i)?;
        }
        lab.start_agent()?;
        Ok(lab)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    /// etcd from Debian's package, its data in the test's directory (kept
    /// across a restart).
    fn start_etcd(&mut self) -> Result<()> {
        let data = self.path("etcd-data");
        let client = format!("http://{ETCD}:2379");
        let args: Vec<String> = [
            "--name",
            "e1",
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "e1=http://127.0.0.1:2380",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = Proc::spawn(
            &self.etcd_ns,
            "etcd",
            Path::new("/usr/bin/etcd"),
            &args,
            self.path("etcd.log"),
        )?;
        p.wait_log("ready to serve client requests", Duration::from_secs(20))?;
        self.etcd = Some(p);
        Ok(())
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let s = |p: &Path| p.display().to_string();
        let addr = node_addr(i);
        let args: Vec<String> = [
            "listen".into(),
            "--udp".into(),
            "none".into(),
            "--tcp".into(),
            format!("{addr}:4647"),
            "--ca".into(),
            s(&self.pki.ca),
            "--cert".into(),
            s(&self.pki.client_cert),
            "--key".into(),
            s(&self.pki.client_key),
            "--control".into(),
            s(&self.path(&format!("n{}.sock", i + 1))),
            "--state-dir".into(),
            s(&self.path(&format!("n{}-state", i + 1))),
            "--customer".into(),
            "cpe1=192.0.2.0/24".into(),
            "--api".into(),
            format!("{addr}:8443"),
            "--api-tokens".into(),
            s(&self.path("tokens")),
            "--etcd".into(),
            format!("{ETCD}:2379"),
            "--node-name".into(),
            format!("n{}", i + 1),
            "--cluster-name".into(),
            "lab".into(),
            "--lease-ttl".into(),
            LEASE_TTL.to_string(),
            "--advertise".into(),
            format!("n{}.example.org", i + 1),
        ]
        .to_vec();
        let p = Proc::spawn(
            &self.node_ns[i],
            &format!("node n{}", i + 1),
            &bin("dots-client")?,
            &args,
            self.path(&format!("n{}.log", i + 1)),
        )?;
        p.wait_log("control socket ready", Duration::from_secs(15))?;
        self.nodes[i] = Some(p);
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        let s = |p: &Path| p.display().to_string();
        let (_, cert, key) = &self.pki.agents[0];
        let args: Vec<String> = [
            "run".into(),
            "--discovery-domain".into(),
            "example.org".into(),
            "--resolver".into(),
            "127.0.0.1:5353".into(),
            "--ca".into(),
            s(&self.pki.ca),
            "--cert".into(),
            s(cert),
            "--key".into(),
            s(key),
            "--domain".into(),
            "192.0.2.0/24".into(),
            "--lan".into(),
            self.lan.clone(),
            "--bpffs".into(),
            s(&self.bpffs.path),
            "--control".into(),
            s(&self.path("agent.sock")),
            "--state-dir".into(),
            s(&self.path("agent-state")),
            "--notify-interval".into(),
            "1".into(),
        ]
        .to_vec();
        self.agent = Some(Proc::spawn(
            &self.cpe,
            "dots-agent",
            &bin("dots-agent")?,
            &args,
            self.path("agent.log"),
        )?);
        eventually(Duration::from_secs(30), || {
            self.owners().ok()?.first().copied()
        })
        .with_context(|| format!("the agent connected to no node\n{}", self.logs()))?;
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, p) in [("agent", &self.agent), ("etcd", &self.etcd)]
            .into_iter()
            .chain(self.nodes.iter().map(|n| ("node", n)))
        {
            if let Some(p) = p {
                let text = p.log_text();
                let tail: Vec<&str> = text.lines().rev().take(120).collect();
                out.push_str(&format!("---- {name} {} (tail) ----\n", p.name));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// An API call to node `i` (from the hub); status and JSON body.
    fn call(&self, i: usize, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        let url = format!("https://{}:8443{path}", node_addr(i));
        let auth = format!("Authorization: Bearer {TOKEN}");
        curl_json(
            &self.hub,
            &self.pki.ca,
            25,
            method,
            &url,
            body,
            &["-H", &auth],
        )
    }

    /// The nodes running.
    fn alive(&self) -> Vec<usize> {
        (0..NODES).filter(|i| self.nodes[*i].is_some()).collect()
    }

    /// The nodes that report a session with the agent.
    fn owners(&self) -> Result<Vec<usize>> {
        let mut v = Vec::new();
        for i in self.alive() {
            let (code, a) = self.call(i, "GET", "/v1/agents/cpe1", None)?;
            if code == 200 && a["state"] == "connected" {
                v.push(i);
            }
        }
        Ok(v)
    }

    /// Waits until exactly one node, not in `not`, holds the agent, while
    /// never seeing two at once; returns it.
    fn wait_owner(&self, not: &[usize], within: Duration) -> Result<usize> {
        let start = Instant::now();
        while start.elapsed() < within {
            let o = self.owners()?;
            if o.len() > 1 {
                bail!("nodes {o:?} all speak for the agent\n{}", self.logs());
            }
            if let [i] = o.as_slice() {
                if !not.contains(i) {
                    return Ok(*i);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "no node other than {not:?} took the agent within {within:?}\n{}",
            self.logs()
        )
    }

    /// Waits until no node holds the agent.
    fn wait_no_owner(&self, within: Duration) -> Result<()> {
        eventually(within, || {
            self.owners().ok().filter(|o| o.is_empty()).map(|_| ())
        })
        .with_context(|| format!("a node still holds the agent\n{}", self.logs()))
    }

    /// The mitigations the agent holds (its control socket).
    fn agent_mitigations(&self) -> Result<Vec<Value>> {
        let s = self.path("agent.sock").display().to_string();
        let out = run_in(
            &self.cpe,
            &bin("dots-agent")?,
            &["mitigations".into(), "--json".into(), "--control".into(), s],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "dots-agent mitigations: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Datagrams from the customer's host to the target that get through.
    fn through(&self, sink: &Sink, tag: &str) -> Result<usize> {
        send(&self.ha, TARGET, 200, tag)?;
        Ok(sink.count(tag))
    }

    /// `GET /v1/mitigations/<id>` on node `i`.
    fn mitigation(&self, i: usize, id: &str) -> Result<Value> {
        let (code, m) = self.call(i, "GET", &format!("/v1/mitigations/{id}"), None)?;
        if code != 200 {
            bail!("node n{}: GET {id}: {code} {m}", i + 1);
        }
        Ok(m)
    }

    /// Mitigation `id` as node `i` shows it once the agent confirmed it
    /// again (2.04: re-sent by the node that took the agent over).
    fn wait_reconfirmed(&self, i: usize, id: &str) -> Result<Value> {
        eventually(Duration::from_secs(10), || {
            self.mitigation(i, id)
                .ok()
                .filter(|m| m["last-code"] == "2.04 Changed")
        })
        .with_context(|| format!("{id} not re-confirmed by n{}\n{}", i + 1, self.logs()))
    }

    /// Cuts node `i` from etcd (both ways), or mends it.
    fn partition(&self, i: usize, cut: bool) -> Result<()> {
        let ns = &self.node_ns[i];
        if !cut {
            ns.exec(&["nft", "delete", "table", "inet", "cut"])?;
            return Ok(());
        }
        let rules = self.path("cut.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet cut {{\n chain out {{\n  type filter hook output priority 0;\n  ip daddr {ETCD} drop\n }}\n chain in {{\n  type filter hook input priority 0;\n  ip saddr {ETCD} drop\n }}\n}}\n"
            ),
        )?;
        ns.exec(&["nft", "-f", &rules.display().to_string()])?;
        Ok(())
    }
}

fn counter(m: &Value) -> u64 {
    m["counters"]["pkts-dropped"].as_u64().unwrap_or(0)
}

const REQUEST: &str = r#"{"attacker": "192.0.2.2", "target": ["198.51.100.10"], "protocol": [17], "lifetime": 900, "label": "c1"}"#;

/// A request made on a node that does not hold the agent reaches it
/// through the owner; SIGKILL the owner: another node takes the agent over
/// within the lease's time to live, re-sends the mitigation with its mid
/// (the agent answers 2.04 and holds one mitigation, not two), enforcement
/// never stops, and the drop counters keep arriving.
#[test]
fn request_through_any_node_and_failover_without_loss() -> Result<()> {
    let mut lab = ClusterLab::new()?;
    let sink = Sink::open(&lab.hub)?;
    let b = lab.wait_owner(&[], Duration::from_secs(10))?;
    let a = (b + 1) % NODES;
    assert!(lab.through(&sink, "before")? > 190, "traffic flows before");

    // Through node A, for the agent node B holds: the agent's answer.
    let t = Instant::now();
    let (code, o) = lab.call(a, "POST", "/v1/mitigations", Some(REQUEST))?;
    let remote = t.elapsed();
    assert_eq!(code, 201, "{o}\n{}", lab.logs());
    assert_eq!(o["mitigation"]["state"], "active", "{o}");
    assert_eq!(o["coap"], "2.01 Created", "{o}");
    let id = o["mitigation"]["id"].as_str().context("id")?.to_string();
    let mid = o["mitigation"]["mid"].as_u64().context("mid")?;
    eprintln!("request through a non-owning node answered in {remote:?}");

    // Every node lists it, active.
    for i in 0..NODES {
        let m = eventually(Duration::from_secs(5), || {
            lab.mitigation(i, &id)
                .ok()
                .filter(|m| m["state"] == "active")
        })
        .with_context(|| format!("node n{} does not list {id} active", i + 1))?;
        assert_eq!(m["mid"], mid);
    }
    let held = lab.agent_mitigations()?;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["mid"], mid);
    assert_eq!(lab.through(&sink, "during")?, 0, "dropped at the CPE");
    eventually(Duration::from_secs(10), || {
        (counter(&lab.mitigation(a, &id).ok()?) >= 200).then_some(())
    })
    .context("the drop counters did not reach node A")?;

    // SIGKILL the owner.
    let killed = Instant::now();
    lab.nodes[b]
        .as_ref()
        .context("owner")?
        .signal(libc::SIGKILL);
    lab.nodes[b] = None;
    let c = lab.wait_owner(&[b], Duration::from_secs(LEASE_TTL + 15))?;
    let moved = killed.elapsed();
    eprintln!("agent moved from n{} to n{} in {moved:?}", b + 1, c + 1);
    // Re-sent with its mid, confirmed by the agent (2.04), still one.
    let m = lab.wait_reconfirmed(c, &id)?;
    assert_eq!(m["state"], "active", "{m}");
    assert_eq!(m["mid"], mid);
    let held = lab.agent_mitigations()?;
    assert_eq!(held.len(), 1, "nothing duplicated: {held:?}");
    assert_eq!(held[0]["mid"], mid);
    assert_eq!(lab.through(&sink, "after")?, 0, "still dropped");
    let before = counter(&lab.mitigation(c, &id)?);
    lab.through(&sink, "more")?;
    for i in lab.alive() {
        eventually(Duration::from_secs(10), || {
            (counter(&lab.mitigation(i, &id).ok()?) >= before + 200).then_some(())
        })
        .with_context(|| format!("counters stopped on node n{}\n{}", i + 1, lab.logs()))?;
        let (_, list) = lab.call(i, "GET", "/v1/mitigations", None)?;
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    }

    // Withdrawn through the other survivor.
    let d = lab
        .alive()
        .into_iter()
        .find(|i| *i != c)
        .context("survivor")?;
    let (code, w) = lab.call(d, "DELETE", &format!("/v1/mitigations/{id}"), None)?;
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["mitigation"]["state"], "withdrawn", "{w}");
    eventually(Duration::from_secs(5), || {
        lab.agent_mitigations().ok().filter(|v| v.is_empty())
    })
    .context("the agent still holds the withdrawn mitigation")?;

    // The agent away: a request on any node is queued (202) and sent by
    // whichever node the agent dials next.
    lab.agent.take().context("agent")?.stop();
    lab.wait_no_owner(Duration::from_secs(10))?;
    let body = REQUEST.replace("\"c1\"", "\"c3\"");
    let (code, q) = lab.call(d, "POST", "/v1/mitigations", Some(&body))?;
    assert_eq!(code, 202, "{q}");
    let id3 = q["mitigation"]["id"].as_str().context("id")?.to_string();
    lab.start_agent()?;
    for i in lab.alive() {
        eventually(Duration::from_secs(10), || {
            lab.mitigation(i, &id3)
                .ok()
                .filter(|m| m["state"] == "active")
        })
        .with_context(|| {
            format!(
                "the queued request is not active on n{}\n{}",
                i + 1,
                lab.logs()
            )
        })?;
    }
    assert_eq!(lab.agent_mitigations()?.len(), 1);
    Ok(())
}

/// A node cut from etcd stops speaking for its agent before its lease can
/// expire (never two nodes at once); another node takes over; mended, the
/// node comes back. etcd restarted: the nodes reconnect and requests flow
/// through any node again.
#[test]
fn partition_and_etcd_restart() -> Result<()> {
    let mut lab = ClusterLab::new()?;
    let o = lab.wait_owner(&[], Duration::from_secs(10))?;
    let (code, r) = lab.call(o, "POST", "/v1/mitigations", Some(REQUEST))?;
    assert_eq!(code, 201, "{r}");
    let id = r["mitigation"]["id"].as_str().context("id")?.to_string();
    let mid = r["mitigation"]["mid"].as_u64().context("mid")?;

    lab.partition(o, true)?;
    let n = lab.wait_owner(&[o], Duration::from_secs(LEASE_TTL + 15))?;
    let node = lab.nodes[o].as_ref().context("cut node")?;
    node.wait_log("out of touch with etcd", Duration::from_secs(1))?;
    let m = lab.wait_reconfirmed(n, &id)?;
    assert_eq!(m["mid"], mid);
    assert_eq!(lab.agent_mitigations()?.len(), 1);

    lab.partition(o, false)?;
    node.wait_log(
        "back in the cluster with a new lease",
        Duration::from_secs(15),
    )?;

    // etcd restarted: same data, the nodes reconnect.
    let mut etcd = lab.etcd.take().context("etcd")?;
    etcd.stop();
    drop(etcd);
    std::thread::sleep(Duration::from_secs(1));
    lab.start_etcd()?;
    let owner = lab.wait_owner(&[], Duration::from_secs(LEASE_TTL + 15))?;
    let other = (owner + 1) % NODES;
    let body = REQUEST
        .replace("\"c1\"", "\"c2\"")
        .replace("198.51.100.10", "198.51.100.11");
    let (code, r) = eventually(Duration::from_secs(20), || {
        lab.call(other, "POST", "/v1/mitigations", Some(&body))
            .ok()
            .filter(|(c, _)| *c == 201)
    })
    .with_context(|| {
        format!(
            "no request through n{} after etcd's restart\n{}",
            other + 1,
            lab.logs()
        )
    })?;
    assert_eq!(code, 201);
    let id2 = r["mitigation"]["id"].as_str().context("id")?.to_string();
    for i in 0..NODES {
        eventually(Duration::from_secs(10), || {
            let (_, list) = lab
                .call(i, "GET", "/v1/mitigations?state=active", None)
                .ok()?;
            let ids: Vec<&str> = list
                .as_array()?
                .iter()
                .filter_map(|m| m["id"].as_str())
                .collect();
            (ids.contains(&id.as_str()) && ids.contains(&id2.as_str())).then_some(())
        })
        .with_context(|| format!("node n{} did not reconcile\n{}", i + 1, lab.logs()))?;
    }
    assert_eq!(lab.agent_mitigations()?.len(), 2);
    Ok(())
}

/// `dots-client drain`: the node redirects its agent (RFC 9066 §5.2.2) to
/// another node, which takes it over and re-confirms its mitigation; the
/// drained node takes no new agents.
#[test]
fn drain_redirects_agents_to_another_node() -> Result<()> {
    let lab = ClusterLab::new()?;
    let o = lab.wait_owner(&[], Duration::from_secs(10))?;
    let (code, r) = lab.call(o, "POST", "/v1/mitigations", Some(REQUEST))?;
    assert_eq!(code, 201, "{r}");
    let id = r["mitigation"]["id"].as_str().context("id")?.to_string();
    let mid = r["mitigation"]["mid"].as_u64().context("mid")?;
    // The load the nodes publish reaches the draining node.
    std::thread::sleep(Duration::from_millis(1500));

    let sock = lab.path(&format!("n{}.sock", o + 1)).display().to_string();
    let out = run_in(
        &lab.node_ns[o],
        &bin("dots-client")?,
        &[
            "drain".into(),
            "--ttl".into(),
            "600".into(),
            "--control".into(),
            sock,
            "--raw".into(),
        ],
    )?;
    let reply: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("drain: {}", String::from_utf8_lossy(&out.stderr)))?;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["body"]["draining"], true, "{reply}");
    let moved: u64 = reply["body"]["redirected"]
        .as_object()
        .context("redirected")?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(moved, 1, "{reply}");

    let n = lab.wait_owner(&[o], Duration::from_secs(LEASE_TTL + 10))?;
    let m = lab.wait_reconfirmed(n, &id)?;
    assert_eq!(m["mid"], mid);
    let held = lab.agent_mitigations()?;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        lab.agent
            .as_ref()
            .context("agent")?
            .log_text()
            .contains("redirected"),
        "the agent followed a redirect"
    );
    // The drained node refuses new agents: it no longer listens.
    let node = lab.nodes[o].as_ref().context("drained node")?;
    node.wait_log("draining: not listening for agents", Duration::from_secs(2))?;

    // A node with another client key cannot join: the agents would take
    // its re-sent mitigations for another client's.
    let other = pki::create_lab_pki(&lab.path("other-pki"), &[San::parse("example.org")], &[], 1)?;
    let s = |p: &Path| p.display().to_string();
    let args: Vec<String> = vec![
        "20".into(),
        s(&bin("dots-client")?),
        "listen".into(),
        "--udp".into(),
        "none".into(),
        "--tcp".into(),
        "10.77.0.254:4647".into(),
        "--ca".into(),
        s(&other.ca),
        "--cert".into(),
        s(&other.client_cert),
        "--key".into(),
        s(&other.client_key),
        "--control".into(),
        s(&lab.path("n4.sock")),
        "--state-dir".into(),
        s(&lab.path("n4-state")),
        "--etcd".into(),
        format!("{ETCD}:2379"),
        "--node-name".into(),
        "n4".into(),
        "--cluster-name".into(),
        "lab".into(),
    ];
    let out = run_in(&lab.hub, Path::new("/usr/bin/timeout"), &args)?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("same client certificate key"), "{text}");
    Ok(())
}
