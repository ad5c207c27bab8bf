//! RFC 8973 discovery against real servers: dnsmasq serving the S-NAPTR
//! zone of RFC 8973 Figure 9 (plus DNS-SD records) on a namespace's
//! loopback, `dots-agent discover` and the library asking it; `dots-agent
//! dhcp-hook` fed the option values DHCP clients hand to hook scripts; and a
//! real DHCP exchange: dnsmasq sending options 147/148 to busybox udhcpc,
//! whose script runs the hook.
//!
//! Needs root (network namespaces) and Debian's dnsmasq-base and busybox.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use dots_agent::discovery::{
    self, dhcp, dns::DnsDiscovery, read_discovered, LookupErrorKind, Mechanism,
};
use dots_daemon::transport::Transport;
use tests::{
    procs::{bin, eventually, run_in, Proc, TempDir},
    veth, Netns,
};

const DNS_PORT: u16 = 5353;

/// RFC 8973 Figure 9 (the Call Home S-NAPTR example) in dnsmasq syntax, a
/// base-DOTS NAPTR record that must be ignored (lower order, other service
/// tag), and DNS-SD records for `_dots-call-home._udp`.
const ZONE: &str = "\
local=/example.net/
local-ttl=300
naptr-record=example.net,50,10,,DOTS:signal.udp,,signal.example.net
naptr-record=example.net,100,10,,DOTS-CALL-HOME:signal.udp,,signal.example.net
naptr-record=example.net,200,10,,DOTS-CALL-HOME:signal.tcp,,signal.example.net
naptr-record=signal.example.net,100,10,s,DOTS-CALL-HOME:signal.udp,,_dots-call-home._udp.example.net
naptr-record=signal.example.net,200,10,s,DOTS-CALL-HOME:signal.tcp,,_dots-call-home._tcp.example.net
srv-host=_dots-call-home._udp.example.net,b.example.net,6000,0,0
srv-host=_dots-call-home._tcp.example.net,b.example.net,6001,0,0
host-record=b.example.net,2001:db8::2
ptr-record=_dots-call-home._udp.example.net,one._dots-call-home._udp.example.net
ptr-record=_dots-call-home._udp.example.net,two._dots-call-home._udp.example.net
srv-host=one._dots-call-home._udp.example.net,c.example.net,4647,10,0
srv-host=two._dots-call-home._udp.example.net,d.example.net,4650,20,0
txt-record=one._dots-call-home._udp.example.net,\"\"
txt-record=two._dots-call-home._udp.example.net,\"\"
host-record=c.example.net,192.0.2.30
host-record=d.example.net,192.0.2.40,2001:db8::40
";

/// dnsmasq serving `zone` on `ns`'s loopback.
fn spawn_dnsmasq(ns: &Netns, dir: &TempDir, zone: &str) -> Result<Proc> {
    let conf = dir.path.join("dnsmasq.conf");
    fs::write(&conf, zone)?;
    let proc = Proc::spawn(
        ns,
        "dnsmasq",
        Path::new("/usr/sbin/dnsmasq"),
        &[
            "--no-daemon".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--log-queries".into(),
            format!("--port={DNS_PORT}"),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            format!("--conf-file={}", conf.display()),
            format!("--pid-file={}", dir.path.join("pid").display()),
            "--user=root".into(),
        ],
        dir.path.join("dnsmasq.log"),
    )?;
    proc.wait_log("started, version", Duration::from_secs(10))?;
    Ok(proc)
}

/// dnsmasq as DNS server on the namespace's loopback; killed on drop.
struct DnsServer {
    _proc: Proc,
    ns: Netns,
    _dir: TempDir,
}

impl DnsServer {
    fn start() -> Result<DnsServer> {
        Self::serving(ZONE)
    }

    fn serving(zone: &str) -> Result<DnsServer> {
        let ns = Netns::new("dns")?;
        let dir = TempDir::new("dns")?;
        let proc = spawn_dnsmasq(&ns, &dir, zone)?;
        Ok(DnsServer {
            _proc: proc,
            ns,
            _dir: dir,
        })
    }

    /// Serves `zone` instead, from the same namespace and address.
    fn reload(&mut self, zone: &str) -> Result<()> {
        self._proc.stop();
        self._proc = spawn_dnsmasq(&self.ns, &self._dir, zone)?;
        Ok(())
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], DNS_PORT))
    }
}

fn json_rows(out: &std::process::Output) -> Result<Vec<serde_json::Value>> {
    if !out.status.success() {
        bail!(
            "dots-agent failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v.as_array().context("not an array")?.clone())
}

fn row(v: &serde_json::Value) -> (String, String, String, u64) {
    (
        v["mechanism"].as_str().unwrap_or("").to_string(),
        v["transport"].as_str().unwrap_or("any").to_string(),
        v["address"].as_str().unwrap_or("").to_string(),
        v["port"].as_u64().unwrap_or(0),
    )
}

#[test]
fn discover_cli_snaptr_figure9_then_dnssd() -> Result<()> {
    let dns = DnsServer::start()?;
    let out = run_in(
        &dns.ns,
        &bin("dots-agent")?,
        &[
            "discover".into(),
            "--resolver".into(),
            dns.addr().to_string(),
            "--domain".into(),
            "example.net".into(),
            "--seed".into(),
            "1".into(),
            "--json".into(),
        ],
    )?;
    let rows = json_rows(&out)?;
    let got: Vec<_> = rows.iter().map(row).collect();
    let want = vec![
        // RFC 8973 Table 2.
        ("s-naptr", "udp", "2001:db8::2", 6000),
        ("s-naptr", "tcp", "2001:db8::2", 6001),
        // DNS-SD, SRV priority order, AAAA before A.
        ("dns-sd", "udp", "192.0.2.30", 4647),
        ("dns-sd", "udp", "2001:db8::40", 4650),
        ("dns-sd", "udp", "192.0.2.40", 4650),
    ];
    let want: Vec<_> = want
        .into_iter()
        .map(|(m, t, a, p)| (m.to_string(), t.to_string(), a.to_string(), p))
        .collect();
    assert_eq!(got, want, "{rows:#?}");
    for r in &rows {
        assert_eq!(r["reference_id"], "example.net");
        assert_eq!(r["ttl"], 300, "{r}");
    }
    // --first: only the preferred mechanism (S-NAPTR).
    let out = run_in(
        &dns.ns,
        &bin("dots-agent")?,
        &[
            "discover".into(),
            "--resolver".into(),
            dns.addr().to_string(),
            "--domain".into(),
            "example.net".into(),
            "--first".into(),
            "--json".into(),
        ],
    )?;
    let rows = json_rows(&out)?;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    // Text output names the columns.
    let out = run_in(
        &dns.ns,
        &bin("dots-agent")?,
        &[
            "discover".into(),
            "--resolver".into(),
            dns.addr().to_string(),
            "--domain".into(),
            "example.net".into(),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("s-naptr") && text.contains("6001"), "{text}");
    Ok(())
}

#[test]
fn library_snaptr_dnssd_and_error_kinds() -> Result<()> {
    let dns = DnsServer::start()?;
    let server = dns.addr();
    dns.ns.enter(|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut d = DnsDiscovery::new(Some(server))?.with_seed(7);
            let c = d.snaptr("example.net").await?;
            let got: Vec<_> = c
                .iter()
                .map(|c| (c.transport, c.address, c.port, c.mechanism))
                .collect();
            let b: IpAddr = "2001:db8::2".parse()?;
            assert_eq!(
                got,
                vec![
                    (Some(Transport::Udp), Some(b), 6000, Mechanism::Snaptr),
                    (Some(Transport::Tcp), Some(b), 6001, Mechanism::Snaptr),
                ]
            );
            assert_eq!(c[0].ttl, Some(Duration::from_secs(300)));
            assert!(discovery::next_refresh(&c).is_some());
            let t = c[0].peer_target();
            assert_eq!((t.port, t.addrs.clone()), (6000, vec![b]));
            assert_eq!(t.name.as_deref(), Some("example.net"));

            let sd = d.dnssd("example.net").await?;
            assert_eq!(sd.len(), 3);
            assert!(sd.iter().all(|c| c.mechanism == Mechanism::DnsSd));

            // NXDOMAIN and "no DOTS record" are told apart for the retry
            // policy.
            let e = d.snaptr("nothere.example.net").await.unwrap_err();
            assert!(matches!(e.kind, LookupErrorKind::NxDomain { .. }), "{e:?}");
            let e = d.snaptr("c.example.net").await.unwrap_err();
            assert!(matches!(e.kind, LookupErrorKind::NoData { .. }), "{e:?}");
            let mut p = discovery::RetryPolicy::default();
            assert!(p.on_failure(e.kind) >= Duration::from_secs(60));

            // A name from configuration resolved through the same server.
            let c = discovery::explicit_candidates(&discovery::ExplicitConfig {
                name: Some("d.example.net".into()),
                ..Default::default()
            })?;
            let r = d.resolve_names(c).await;
            let addrs: Vec<String> = r
                .iter()
                .map(|c| c.address.map(|a| a.to_string()).unwrap_or_default())
                .collect();
            assert_eq!(addrs, ["2001:db8::40", "192.0.2.40"]);
            Ok::<_, anyhow::Error>(())
        })
    })??;
    Ok(())
}

#[test]
fn dns_timeout_is_a_transient_failure() -> Result<()> {
    // Nothing listens there: the resolver times out (or gets ICMP refused).
    let ns = Netns::new("dnsto")?;
    ns.enter(|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut d = DnsDiscovery::new(Some("127.0.0.1:5399".parse()?))?;
            let e = d.snaptr("example.net").await.unwrap_err();
            assert!(
                matches!(
                    e.kind,
                    LookupErrorKind::Timeout
                        | LookupErrorKind::Network
                        | LookupErrorKind::ServerFailure
                ),
                "{e:?}"
            );
            Ok::<_, anyhow::Error>(())
        })
    })??;
    Ok(())
}

/// Figure 4 of RFC 8973, written by hand: "dots.example.com".
const FIG4_HEX: &str = "04646f7473076578616d706c6503636f6d00";

#[test]
fn dhcp_hook_records_and_discover_prefers_dhcp() -> Result<()> {
    let dir = TempDir::new("hook")?;
    let state = dir.path.join("state");
    let agent = bin("dots-agent")?;
    let run = |args: &[&str], env: &[(&str, &str)]| -> Result<String> {
        let out = Command::new(&agent)
            .args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .output()?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sd = state.to_str().unwrap();
    // DHCPv4, flags: hex name + 192.0.2.7, loopback and multicast (dropped).
    run(
        &[
            "dhcp-hook",
            "--v4-ri",
            FIG4_HEX,
            "--v4-address",
            "c00002077f000001e0000001",
            "--lease",
            "3600",
            "--state-dir",
            sd,
        ],
        &[],
    )?;
    // DHCPv6 the odhcp6c / networkd way: environment, OPTION_<code> hex.
    run(
        &["dhcp-hook", "--env", "--state-dir", sd],
        &[
            ("OPTION_141", "04646f7473076578616d706c6503636f6d00"),
            (
                "OPTION_142",
                "20010db80122030000000000000000020000000000000000000000000000000a",
            ),
        ],
    )?;
    let d = read_discovered(&state)?.context("no discovered.json")?;
    let v4 = d.dhcpv4.as_ref().context("no v4 entry")?;
    assert_eq!(v4.reference_id.as_deref(), Some("dots.example.com"));
    assert_eq!(v4.addresses, vec!["192.0.2.7".parse::<IpAddr>()?]);
    assert!(v4.valid_until.is_some());
    let v6 = d.dhcpv6.as_ref().context("no v6 entry")?;
    // ::a... is not loopback; only ::1 is. Both addresses kept, in order.
    assert_eq!(
        v6.addresses,
        vec![
            "2001:db8:122:300::2".parse::<IpAddr>()?,
            "::a".parse::<IpAddr>()?
        ]
    );

    let out = run(&["discover", "--state-dir", sd, "--first", "--json"], &[])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let got: Vec<_> = rows.iter().map(row).collect();
    assert_eq!(
        got,
        vec![
            (
                "dhcpv6".into(),
                "any".into(),
                "2001:db8:122:300::2".into(),
                4647
            ),
            ("dhcpv6".into(), "any".into(), "::a".into(), 4647),
            ("dhcpv4".into(), "any".into(), "192.0.2.7".into(), 4647),
        ]
    );
    assert!(rows.iter().all(|r| r["reference_id"] == "dots.example.com"));
    assert!(rows[2]["ttl"].as_u64().unwrap() <= 3600);

    // An explicit peer wins over DHCP.
    let out = run(
        &[
            "discover",
            "--state-dir",
            sd,
            "--peer-address",
            "198.51.100.1",
            "--peer-name",
            "isp.example",
            "--first",
            "--json",
        ],
        &[],
    )?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["mechanism"], "explicit");
    // Addresses alone are refused.
    let out = Command::new(&agent)
        .args(["discover", "--peer-address", "198.51.100.1"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reference identifier"));

    // Malformed option: not a multiple of 4 -> the name alone is used.
    run(
        &[
            "dhcp-hook",
            "--v4-ri",
            "dots.example.com",
            "--v4-address",
            "c00002",
            "--state-dir",
            sd,
        ],
        &[],
    )?;
    let d = read_discovered(&state)?.unwrap();
    let v4 = d.dhcpv4.unwrap();
    assert!(v4.addresses.is_empty());
    assert_eq!(v4.reference_id.as_deref(), Some("dots.example.com"));
    // Lease lost: the entry goes.
    run(&["dhcp-hook", "--clear", "v4", "--state-dir", sd], &[])?;
    let d = read_discovered(&state)?.unwrap();
    assert!(d.dhcpv4.is_none() && d.dhcpv6.is_some());
    // The file is replaced atomically: no temporary left behind.
    let names: Vec<_> = fs::read_dir(&state)?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    Ok(())
}

#[test]
fn dhcp_decoders_against_rfc_figures() {
    // Figure 6 / Figure 7 as a DHCPv4 options field, by hand.
    let opts = [
        53, 1, 5, // DHCPACK
        147, 18, 0x04, b'd', b'o', b't', b's', 0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e',
        0x03, b'c', b'o', b'm', 0x00, // Figure 6 (name of Figure 4)
        148, 8, 192, 0, 2, 1, 224, 0, 0, 5, // Figure 7: 2 addresses, one multicast
        255,
    ];
    let d = dhcp::DhcpDots::from_v4_options(&opts).unwrap();
    assert_eq!(d.reference_id.as_deref(), Some("dots.example.com"));
    assert_eq!(d.addresses, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    // Compression pointer in the name: RI unusable, addresses still used.
    let opts = [147, 4, 0x01, b'a', 0xC0, 0x00, 148, 4, 192, 0, 2, 1];
    let d = dhcp::DhcpDots::from_v4_options(&opts).unwrap();
    assert!(d.reference_id.is_none());
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.addresses.len(), 1);
    // Length 5: invalid address option.
    let opts = [148, 5, 192, 0, 2, 1, 9];
    let d = dhcp::DhcpDots::from_v4_options(&opts).unwrap();
    assert!(d.addresses.is_empty() && d.problems.len() == 1);
    // DHCPv6 Figure 3 + Figure 5: code 141 length 18, code 142 length 17.
    let mut v6 = vec![0, 141, 0, 18];
    v6.extend_from_slice(&[
        0x04, b'd', b'o', b't', b's', 0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c',
        b'o', b'm', 0x00,
    ]);
    v6.extend_from_slice(&[0, 142, 0, 17]);
    v6.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff,
    ]);
    let d = dhcp::DhcpDots::from_v6_options(&v6).unwrap();
    assert_eq!(d.reference_id.as_deref(), Some("dots.example.com"));
    assert!(d.addresses.is_empty());
    assert!(d.problems[0].contains("multiple of 16"), "{:?}", d.problems);
    // Truncated DHCPv6 name (no root label).
    let v6 = [0, 141, 0, 5, 0x04, b'd', b'o', b't', b's'];
    let d = dhcp::DhcpDots::from_v6_options(&v6).unwrap();
    assert!(d.reference_id.is_none());
}

/// A real DHCPv4 exchange: dnsmasq offers options 147 and 148, busybox
/// udhcpc asks for them (`-O 147 -O 148`) and its script runs
/// `dots-agent dhcp-hook --env`.
#[test]
fn real_dhcp_exchange_udhcpc_runs_the_hook() -> Result<()> {
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox not installed (Debian package busybox)")?;
    let srv = Netns::new("dhs")?;
    let cli = Netns::new("dhc")?;
    let (a, b) = (tests::unique("dhs"), tests::unique("dhc"));
    veth(&srv, &a, &cli, &b)?;
    srv.ip(&["addr", "add", "10.77.0.1/24", "dev", &a])?;
    let dir = TempDir::new("dhcp")?;
    let state = dir.path.join("state");
    let agent = bin("dots-agent")?;
    let script = dir.path.join("udhcpc.script");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             env > {env}.$1\n\
             case \"$1\" in\n\
             bound|renew) exec {agent} dhcp-hook --env --family v4 --state-dir {state} ;;\n\
             deconfig|leasefail|nak) exec {agent} dhcp-hook --clear v4 --state-dir {state} ;;\n\
             esac\n",
            env = dir.path.join("env").display(),
            agent = agent.display(),
            state = state.display(),
        ),
    )?;
    Command::new("chmod").arg("+x").arg(&script).status()?;
    // dots.example.com in DNS wire format, and two addresses (one loopback).
    let ri_hex: Vec<String> = dhcp::encode_name("dots.example.com")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let conf = dir.path.join("dnsmasq-dhcp.conf");
    fs::write(
        &conf,
        format!(
            "port=0\ninterface={a}\nbind-interfaces\n\
             dhcp-range=10.77.0.10,10.77.0.20,255.255.255.0,1h\n\
             dhcp-option=option:domain-name,example.net\n\
             dhcp-option=147,{}\n\
             dhcp-option=148,192.0.2.77,127.0.0.1\n\
             dhcp-leasefile={}\n",
            ri_hex.join(":"),
            dir.path.join("leases").display()
        ),
    )?;
    let _dnsmasq = Proc::spawn(
        &srv,
        "dnsmasq-dhcp",
        Path::new("/usr/sbin/dnsmasq"),
        &[
            "--no-daemon".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--log-dhcp".into(),
            "--user=root".into(),
            format!("--conf-file={}", conf.display()),
            format!("--pid-file={}", dir.path.join("pid").display()),
        ],
        dir.path.join("dnsmasq-dhcp.log"),
    )?;
    _dnsmasq.wait_log("DHCP, IP range", Duration::from_secs(10))?;
    let out = run_in(
        &cli,
        Path::new(busybox),
        &[
            "udhcpc".into(),
            "-i".into(),
            b.clone(),
            "-s".into(),
            script.display().to_string(),
            "-O".into(),
            "147".into(),
            "-O".into(),
            "148".into(),
            "-n".into(),
            "-q".into(),
            "-f".into(),
            "-t".into(),
            "5".into(),
            "-T".into(),
            "1".into(),
        ],
    )?;
    let d = eventually(Duration::from_secs(5), || {
        read_discovered(&state).ok().flatten()
    })
    .with_context(|| {
        format!(
            "no discovered.json; udhcpc: {} {}\ndnsmasq log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            _dnsmasq.log_text()
        )
    })?;
    let v4 = d.dhcpv4.context("no DHCPv4 entry")?;
    assert_eq!(v4.reference_id.as_deref(), Some("dots.example.com"));
    assert_eq!(v4.addresses, vec!["192.0.2.77".parse::<IpAddr>()?]);
    assert_eq!(v4.domain.as_deref(), Some("example.net"));
    let left = v4.valid_until.unwrap() - v4.obtained;
    assert!((3500..=3600).contains(&left), "lease {left}");
    Ok(())
}

/// Listeners and a discovering agent in the DNS server's namespace; the
/// listeners' certificate names `example.org`, the reference identifier of
/// its S-NAPTR candidates.
struct DiscoveryLab {
    dir: TempDir,
    pki: dots_daemon::pki::LabPki,
}

impl DiscoveryLab {
    fn new(tag: &str) -> Result<DiscoveryLab> {
        let dir = TempDir::new(tag)?;
        let pki = dots_daemon::pki::create_lab_pki(
            &dir.path.join("pki"),
            &[dots_daemon::pki::San::parse("example.org")],
            &["cpe1".into()],
            1,
        )?;
        Ok(DiscoveryLab { dir, pki })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }

    /// `dots-client listen` named `name`; returns it and its control socket.
    fn listener(&self, ns: &Netns, name: &str, udp: &str, tcp: &str) -> Result<(Proc, String)> {
        let ctl = self.path(&format!("{name}.sock"));
        let args: Vec<String> = [
            "listen",
            "--udp",
            udp,
            "--tcp",
            tcp,
            "--ca",
            &self.pki.ca.display().to_string(),
            "--cert",
            &self.pki.client_cert.display().to_string(),
            "--key",
            &self.pki.client_key.display().to_string(),
            "--control",
            &ctl,
            "--state-dir",
            &self.path(name),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let l = Proc::spawn(
            ns,
            name,
            &bin("dots-client")?,
            &args,
            self.dir.path.join(format!("{name}.log")),
        )?;
        l.wait_log("control socket ready", Duration::from_secs(10))?;
        Ok((l, ctl))
    }

    /// `dots-agent run` with no peer: it discovers one through `resolver`.
    fn agent(&self, ns: &Netns, resolver: SocketAddr) -> Result<Proc> {
        let (_, cert, key) = &self.pki.agents[0];
        let args: Vec<String> = [
            "run",
            "--discovery-domain",
            "example.org",
            "--resolver",
            &resolver.to_string(),
            "--ca",
            &self.pki.ca.display().to_string(),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--domain",
            "192.0.2.0/24",
            "--no-enforce",
            "--control",
            &self.path("agent.sock"),
            "--state-dir",
            &self.path("agent-state"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Proc::spawn(
            ns,
            "dots-agent",
            &bin("dots-agent")?,
            &args,
            self.dir.path.join("agent.log"),
        )
    }
}

/// The agent connected to the listener at `ctl`, once there is one.
fn connected_agent(
    ns: &Netns,
    ctl: &str,
    agent: &Proc,
    within: Duration,
    what: &str,
) -> Result<serde_json::Value> {
    tests::procs::eventually(within, || {
        let args = [
            "agents".into(),
            "--control".into(),
            ctl.to_string(),
            "--raw".into(),
        ];
        let out = tests::procs::run_in(ns, &bin("dots-client").ok()?, &args).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["body"].as_array()?.first().cloned()
    })
    .with_context(|| format!("{what}; agent log:\n{}", agent.log_text()))
}

/// The agent, given no peer, finds it with S-NAPTR and dials the address,
/// port and transport the records name (UDP on 6000 first; TCP on 6001 when
/// UDP is blocked).
#[test]
fn agent_dials_the_discovered_peer() -> Result<()> {
    let zone = "\
local=/example.org/
local-ttl=60
naptr-record=example.org,100,10,,DOTS-CALL-HOME:signal.udp,,signal.example.org
naptr-record=example.org,200,10,,DOTS-CALL-HOME:signal.tcp,,signal.example.org
naptr-record=signal.example.org,100,10,s,DOTS-CALL-HOME:signal.udp,,_dots-call-home._udp.example.org
naptr-record=signal.example.org,200,10,s,DOTS-CALL-HOME:signal.tcp,,_dots-call-home._tcp.example.org
srv-host=_dots-call-home._udp.example.org,ch.example.org,6000,0,0
srv-host=_dots-call-home._tcp.example.org,ch.example.org,6001,0,0
host-record=ch.example.org,127.0.0.1
";
    for (block_udp, want) in [(false, "DTLS/UDP"), (true, "TLS/TCP")] {
        let dns = DnsServer::serving(zone)?;
        let lab = DiscoveryLab::new("disc-run")?;
        if block_udp {
            let rules = lab.dir.path.join("rules.nft");
            fs::write(&rules, "table inet t {\n chain input {\n  type filter hook input priority 0;\n  udp dport 6000 drop\n }\n}\n")?;
            dns.ns.exec(&["nft", "-f", &rules.display().to_string()])?;
        }
        let (_listener, ctl) =
            lab.listener(&dns.ns, "client", "127.0.0.1:6000", "127.0.0.1:6001")?;
        let agent = lab.agent(&dns.ns, dns.addr())?;
        agent.wait_log("peer found by discovery", Duration::from_secs(10))?;
        let info = connected_agent(
            &dns.ns,
            &ctl,
            &agent,
            Duration::from_secs(20),
            "the agent did not connect",
        )?;
        assert_eq!(info["transport"], want, "{info}");
        let port = if block_udp { 6001 } else { 6000 };
        assert!(
            agent.log_text().contains(&format!("127.0.0.1:{port}")),
            "dialled port {port}"
        );
    }
    Ok(())
}

/// The agent follows its discovered peer: when the DNS answer's TTL runs
/// out and the records now name another Call Home DOTS client, it moves
/// there (RFC 8973 §4: discovery again when a validity timer expires).
#[test]
fn agent_moves_when_rediscovery_names_another_peer() -> Result<()> {
    let zone = |addr: &str| {
        format!(
            "local=/example.org/\nlocal-ttl=2\n\
naptr-record=example.org,100,10,,DOTS-CALL-HOME:signal.udp,,signal.example.org\n\
naptr-record=signal.example.org,100,10,s,DOTS-CALL-HOME:signal.udp,,_dots-call-home._udp.example.org\n\
srv-host=_dots-call-home._udp.example.org,ch.example.org,6000,0,0\n\
host-record=ch.example.org,{addr}\n"
        )
    };
    let mut dns = DnsServer::serving(&zone("127.0.0.1"))?;
    let lab = DiscoveryLab::new("disc-move")?;
    let (_a, ctl_a) = lab.listener(&dns.ns, "first", "127.0.0.1:6000", "none")?;
    let (_b, ctl_b) = lab.listener(&dns.ns, "second", "127.0.0.2:6000", "none")?;
    let agent = lab.agent(&dns.ns, dns.addr())?;
    connected_agent(
        &dns.ns,
        &ctl_a,
        &agent,
        Duration::from_secs(20),
        "no connection to the first peer",
    )?;
    // The records now name the second client.
    dns.reload(&zone("127.0.0.2"))?;
    connected_agent(
        &dns.ns,
        &ctl_b,
        &agent,
        Duration::from_secs(30),
        "the agent did not move to the second peer",
    )?;
    agent.wait_log("discovery names another peer", Duration::from_secs(1))?;
    Ok(())
}
