use std::{path::PathBuf, time::Duration};

use dots_proto::{
    model::Limits,
    signal::{ConsentMode, EnforcementMode},
};
use ipnet::IpNet;

use super::*;
use dots_daemon::{config::ConfigError, logging::LogFormat, transport::Transport};

use crate::enforce::AttachMode;

const FILE: &str = "/etc/dots-agent/agent.toml";

/// The smallest valid agent configuration.
const MINIMAL: &str = r#"
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"
[[peers]]
address = "isp.example"
[domain]
prefixes = ["192.0.2.0/24"]
"#;

fn agent(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_str(text, FILE)
}

fn agent_ok(text: &str) -> AgentConfig {
    let c = agent(text).unwrap_or_else(|e| panic!("{e}"));
    c.validate().unwrap_or_else(|e| panic!("{e}"));
    c
}

/// Parses and validates, expecting an error; checks it names the file and
/// returns it.
fn agent_err(text: &str) -> ConfigError {
    let e = match agent(text) {
        Ok(c) => c.validate().expect_err("expected an error"),
        Err(e) => e,
    };
    assert_eq!(e.file(), std::path::Path::new(FILE));
    assert!(e.to_string().starts_with(FILE), "{e}");
    e
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn workspace_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
}

#[test]
fn defaults_fill_in() {
    let c = agent_ok(MINIMAL);
    assert_eq!(c.transport, TransportPref::Both);
    assert!(c.enforce);
    assert_eq!(c.consent, ConsentMode::Auto);
    assert_eq!(c.consent_timeout(), None);
    assert!(c.never_block.is_empty());
    assert_eq!(c.notify_interval(), Duration::from_secs(30));
    assert_eq!(c.state_dir(), std::path::Path::new("/var/lib/dots-agent"));
    assert_eq!(
        c.control_socket(),
        std::path::Path::new("/run/dots-agent/control.sock")
    );
    assert_eq!(c.log_format(), LogFormat::Human);
    assert!(c.xdp.interfaces.is_empty());
    assert_eq!(c.xdp.mode, AttachMode::Auto);
    assert_eq!(c.xdp.bpffs, PathBuf::from("/sys/fs/bpf/dots-agent"));
    assert!(c.domain.interface_addresses);
    assert!(!c.domain.include_loopback && !c.domain.include_link_local);
    assert_eq!(c.limits.to_limits(&c.policy), Limits::default());
    assert_eq!(c.policy, PolicyConfig::default());
    assert_eq!(c.max_mitigations_per_cuid(), 64);
    assert_eq!(c.peers[0].peer_name, None);
    assert_eq!(c.peers[0].transport, None);
    // Relative paths are relative to the file's directory.
    assert_eq!(c.ca, Some(PathBuf::from("/etc/dots-agent/ca.pem")));
    // An empty file is the default configuration (which has no peer).
    let empty = AgentConfig::from_str("", FILE).unwrap();
    assert_eq!(
        empty,
        AgentConfig {
            origin: FILE.into(),
            ..AgentConfig::default()
        }
    );
    // The server settings follow.
    let s = c.server_config(vec![net("192.0.2.0/24")]);
    assert_eq!(s.notify_period, Duration::from_secs(30));
    assert_eq!(s.max_mitigations_per_cuid, 64);
    assert_eq!(s.consent, ConsentMode::Auto);
    assert_eq!(s.mode, EnforcementMode::Enforce);
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let e = agent_err(&format!("{MINIMAL}\nbogus = 1\n"));
    assert_eq!(e.key(), Some("domain.bogus"), "{e}");
    assert!(e.to_string().contains("unknown key"), "{e}");
    assert!(
        e.to_string().contains("prefixes"),
        "lists the known keys: {e}"
    );
    assert_eq!(e.line(), Some(10), "{e}");

    let e = agent_err(&format!("notify-intervall = 5\n{MINIMAL}"));
    assert_eq!(e.key(), Some("notify-intervall"), "{e}");
    assert_eq!(e.line(), Some(1), "{e}");

    let e = agent_err(&format!(
        "{MINIMAL}\n[[peers]]\naddress = \"b.example\"\npeername = \"x\"\n"
    ));
    assert_eq!(e.key(), Some("peers[1].peername"), "{e}");
    assert!(e.to_string().contains("peer-name"), "{e}");

    let e = agent_err(&format!("{MINIMAL}\n[limits]\nmax-prefix = 3\n"));
    assert_eq!(e.key(), Some("limits.max-prefix"), "{e}");

    let e = agent_err(&format!("{MINIMAL}\n[xdps]\nmode = \"auto\"\n"));
    assert_eq!(e.key(), Some("xdps"), "{e}");
}

#[test]
fn bad_prefixes_are_named_with_their_value() {
    let e = agent_err(&MINIMAL.replace(
        r#"["192.0.2.0/24"]"#,
        r#"["192.0.2.0/24", "192.0.2.300/24"]"#,
    ));
    assert_eq!(e.key(), Some("domain.prefixes[1]"), "{e}");
    assert!(e.to_string().contains("192.0.2.300/24"), "{e}");
    assert!(e.line().is_some(), "{e}");

    let e = agent_err(&MINIMAL.replace("192.0.2.0/24", "192.0.2.1/24"));
    assert_eq!(e.key(), Some("domain.prefixes[0]"), "{e}");
    assert!(
        matches!(&e, ConfigError::Value { value, message, .. }
            if value == "\"192.0.2.1/24\"" && message.contains("192.0.2.0/24")),
        "{e}"
    );

    let e = agent_err(&format!(
        "never-block = [\"2001:db8::/32\", \"nope\"]\n{MINIMAL}"
    ));
    assert_eq!(e.key(), Some("never-block[1]"), "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");

    let e = agent_err(&format!(
        "never-block = [\"198.51.100.7\", \"198.51.100.7/32\"]\n{MINIMAL}"
    ));
    assert_eq!(e.key(), Some("never-block[1]"), "{e}");
    assert!(e.to_string().contains("twice"), "{e}");

    // A bare address is a host prefix.
    let c = agent_ok(&format!(
        "never-block = [\"198.51.100.7\", \"2001:db8::1\"]\n{MINIMAL}"
    ));
    assert_eq!(
        c.never_block,
        vec![net("198.51.100.7/32"), net("2001:db8::1/128")]
    );
}

#[test]
fn bad_enum_values_are_named() {
    let e = agent_err(&format!("{MINIMAL}\n[xdp]\nmode = \"fast\"\n"));
    assert_eq!(e.key(), Some("xdp.mode"), "{e}");
    let s = e.to_string();
    assert!(s.contains("fast") && s.contains("generic"), "{s}");
    assert_eq!(e.line(), Some(11), "{e}");

    let e = agent_err(&format!("consent = \"maybe\"\n{MINIMAL}"));
    assert_eq!(e.key(), Some("consent"), "{e}");
    assert!(e.to_string().contains("maybe"), "{e}");

    let e = agent_err(&format!("log-format = \"xml\"\n{MINIMAL}"));
    assert_eq!(e.key(), Some("log-format"), "{e}");

    let e = agent_err(&format!(
        "{MINIMAL}\n[[peers]]\naddress = \"b.example\"\ntransport = \"quic\"\n"
    ));
    assert_eq!(e.key(), Some("peers[1].transport"), "{e}");
    assert!(e.to_string().contains("quic"), "{e}");
}

#[test]
fn missing_peers_and_addresses() {
    let e = agent_err(&MINIMAL.replace("[[peers]]\naddress = \"isp.example\"\n", ""));
    assert_eq!(e.key(), Some("peers"), "{e}");
    assert!(matches!(e, ConfigError::Missing { .. }), "{e}");

    let e = agent_err(&format!(
        "{MINIMAL}\n[[peers]]\npeer-name = \"b.example\"\n"
    ));
    assert_eq!(e.key(), Some("peers[1].address"), "{e}");
    assert!(matches!(e, ConfigError::Missing { .. }), "{e}");

    for bad in ["isp.example:http", "isp.example:0", "two words", ""] {
        let e = agent_err(&format!("{MINIMAL}\n[[peers]]\naddress = \"{bad}\"\n"));
        assert_eq!(e.key(), Some("peers[1].address"), "{bad}: {e}");
        assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
    }

    let e = agent_err(&format!(
        "{MINIMAL}\n[[peers]]\naddress = \"ISP.example:4647\"\n"
    ));
    assert_eq!(e.key(), Some("peers[1].address"), "{e}");
    assert!(e.to_string().contains("peers[0]"), "{e}");

    let e = agent_err(&format!(
        "peers = \"isp.example\"\n{}",
        MINIMAL.replace("[[peers]]\naddress = \"isp.example\"\n", "")
    ));
    assert_eq!(e.key(), Some("peers"), "{e}");
}

#[test]
fn bad_intervals_and_limits() {
    let e = agent_err(&format!("notify-interval = 0\n{MINIMAL}"));
    assert_eq!(e.key(), Some("notify-interval"), "{e}");
    assert!(
        matches!(&e, ConfigError::Value { value, .. } if value == "0"),
        "{e}"
    );

    let e = agent_err(&format!("notify-interval = \"30s\"\n{MINIMAL}"));
    assert_eq!(e.key(), Some("notify-interval"), "{e}");
    assert!(e.to_string().contains("30s"), "{e}");

    let e = agent_err(&format!("notify-interval = -5\n{MINIMAL}"));
    assert_eq!(e.key(), Some("notify-interval"), "{e}");
    assert!(e.to_string().contains("-5"), "{e}");

    let e = agent_err(&format!(
        "consent = \"require\"\nconsent-timeout = 0\n{MINIMAL}"
    ));
    assert_eq!(e.key(), Some("consent-timeout"), "{e}");

    let e = agent_err(&format!("consent-timeout = 60\n{MINIMAL}"));
    assert_eq!(e.key(), Some("consent-timeout"), "{e}");
    assert!(e.to_string().contains("require"), "{e}");

    let e = agent_err(&format!(
        "consent = \"require\"\nconsent-timeout-action = \"approve\"\n{MINIMAL}"
    ));
    assert_eq!(e.key(), Some("consent-timeout-action"), "{e}");

    let c = agent_ok(&format!(
        "consent = \"require\"\nconsent-timeout = 60\n{MINIMAL}"
    ));
    assert_eq!(
        c.consent_timeout(),
        Some(ConsentTimeout {
            after: Duration::from_secs(60),
            action: ConsentTimeoutAction::Reject
        })
    );

    let e = agent_err(&format!("{MINIMAL}\n[limits]\nmax-ranges = 0\n"));
    assert_eq!(e.key(), Some("limits.max-ranges"), "{e}");
    for bad in ["0", "-2", "4294967296"] {
        let e = agent_err(&format!("{MINIMAL}\n[policy]\nmax-lifetime = {bad}\n"));
        assert_eq!(e.key(), Some("policy.max-lifetime"), "{e}");
        assert!(e.to_string().contains(bad), "{e}");
    }
    let c = agent_ok(&format!("{MINIMAL}\n[policy]\nmax-lifetime = -1\n"));
    assert_eq!(c.limits.to_limits(&c.policy).max_lifetime, None);
    // Its old place is named in the error.
    let e = agent_err(&format!("{MINIMAL}\n[limits]\nmax-lifetime = 600\n"));
    assert_eq!(e.key(), Some("limits.max-lifetime"), "{e}");
    assert!(e.to_string().contains("[policy]"), "{e}");
}

#[test]
fn policy_section_is_read_and_checked() {
    let c = agent_ok(&format!(
        "{MINIMAL}\n[policy]\nover-limit = \"consent\"\nmax-sources-v4 = 16\nmax-sources-v6 = 4\n\
         max-targets-v4 = 1024\nmax-targets-v6 = 8\nmax-lifetime = 3600\nshorten-lifetime = false\n\
         max-mitigations-per-peer = 100\nmax-mitigations = 256\nmax-heartbeat-interval = 20\n\
         redirect-fallback = 60\n"
    ));
    let p = c.policy;
    assert_eq!(
        p.to_policy(),
        dots_proto::model::Policy {
            max_sources_v4: 16,
            max_sources_v6: 4,
            max_targets_v4: 1024,
            max_targets_v6: 8,
            shorten_lifetime: false,
            over_limit: dots_proto::model::OverLimit::Consent,
        }
    );
    assert_eq!(p.max_mitigations, 256);
    assert_eq!(p.redirect_fallback(), Duration::from_secs(60));
    let s = c.server_config(vec![net("192.0.2.0/24")]);
    assert_eq!(s.max_mitigations_per_peer, 100);
    assert_eq!(s.limits.max_lifetime, Some(3600));
    assert_eq!(s.session.heartbeat_interval.max, 20);
    assert_eq!(s.policy, p.to_policy());
    let o = c.to_options().unwrap();
    assert_eq!(o.policy, p);
    assert_eq!(o.limits.max_lifetime, Some(3600));

    let bad = [
        ("over-limit = \"ask\"", "policy.over-limit"),
        ("max-sources-v4 = 0", "policy.max-sources-v4"),
        ("max-sources-v4 = 4294967297", "policy.max-sources-v4"),
        ("max-targets-v6 = 0", "policy.max-targets-v6"),
        ("max-mitigations = 257", "policy.max-mitigations"),
        ("max-mitigations = 0", "policy.max-mitigations"),
        (
            "max-mitigations-per-peer = 300",
            "policy.max-mitigations-per-peer",
        ),
        (
            "max-heartbeat-interval = 241",
            "policy.max-heartbeat-interval",
        ),
        (
            "max-heartbeat-interval = 0",
            "policy.max-heartbeat-interval",
        ),
        ("redirect-fallback = 0", "policy.redirect-fallback"),
        ("shorten-lifetime = 1", "policy.shorten-lifetime"),
        ("max-slots = 3", "policy.max-slots"),
    ];
    for (line, key) in bad {
        let e = agent_err(&format!("{MINIMAL}\n[policy]\n{line}\n"));
        assert_eq!(e.key(), Some(key), "{line}: {e}");
    }
    let e = agent_err(&format!("{MINIMAL}\n[policy]\nmax-mitigations = 257\n"));
    assert!(
        e.to_string().contains("the data plane has 256 slots"),
        "{e}"
    );
    // The per-cuid limit cannot exceed the per-peer one.
    let e = agent_err(&format!(
        "{MINIMAL}\n[limits]\nmax-mitigations-per-cuid = 20\n[policy]\nmax-mitigations-per-peer = 10\n"
    ));
    assert_eq!(e.key(), Some("limits.max-mitigations-per-cuid"), "{e}");
}

#[test]
fn indefinite_cap_is_bounded() {
    // Indefinite is never forever in the kernel: the cap has bounds.
    for bad in ["0", "4294967296"] {
        let e = agent_err(&format!("{MINIMAL}\n[xdp]\nindefinite-cap = {bad}\n"));
        assert_eq!(e.key(), Some("xdp.indefinite-cap"), "{e}");
        assert!(e.to_string().contains("never forever"), "{e}");
    }
    assert_eq!(agent_ok(MINIMAL).xdp.indefinite_cap, 600);
}

#[test]
fn interfaces_credentials_and_domain() {
    for bad in ["eth0/1", "this-is-far-too-long0", "eth 1", ""] {
        let e = agent_err(&format!(
            "{MINIMAL}\n[xdp]\ninterfaces = [\"eth1\", \"{bad}\"]\n"
        ));
        assert_eq!(e.key(), Some("xdp.interfaces[1]"), "{e}");
    }
    let e = agent_err(&format!(
        "{MINIMAL}\n[xdp]\ninterfaces = [\"eth1\", \"eth1\"]\n"
    ));
    assert_eq!(e.key(), Some("xdp.interfaces[1]"), "{e}");

    let e = agent_err(&MINIMAL.replace("cert = \"agent.pem\"\n", ""));
    assert_eq!(e.key(), Some("peers[0].cert"), "{e}");
    assert!(matches!(e, ConfigError::Missing { .. }), "{e}");
    // ... unless the peer has its own.
    agent_ok(&MINIMAL.replace("cert = \"agent.pem\"\n", "").replace(
        "address = \"isp.example\"\n",
        "address = \"isp.example\"\ncert = \"/x.pem\"\n",
    ));

    let e = agent_err(&MINIMAL.replace(
        "prefixes = [\"192.0.2.0/24\"]",
        "interface-addresses = false",
    ));
    assert_eq!(e.key(), Some("domain.prefixes"), "{e}");
    // With interface addresses the domain may be empty in the file.
    agent_ok(&MINIMAL.replace("prefixes = [\"192.0.2.0/24\"]", ""));
}

#[test]
fn syntax_errors_have_a_line() {
    let e = agent_err("ca = \"x\"\n\n[[peers]\n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
    let e = agent_err("ca = \"x\"\nca = \"y\"\n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    let e = AgentConfig::load("/nonexistent/agent.toml").unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/agent.toml"), "{e}");
}

#[test]
fn check_files_names_the_key() {
    let dir = std::env::temp_dir().join(format!("dots-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    let origin = dir.join("agent.toml");
    let c = AgentConfig::from_str(MINIMAL, &origin).unwrap();
    c.validate().unwrap();
    c.check_files().unwrap();
    std::fs::remove_file(dir.join("agent.key")).unwrap();
    let e = c.check_files().unwrap_err();
    assert_eq!(e.key(), Some("key"), "{e}");
    assert!(e.to_string().contains("agent.key"), "{e}");
    let c = AgentConfig::from_str(
        &MINIMAL.replace(
            "address = \"isp.example\"\n",
            "address = \"isp.example\"\nkey = \".\"\n",
        ),
        &origin,
    )
    .unwrap();
    let e = c.check_files().unwrap_err();
    assert_eq!(e.key(), Some("peers[0].key"), "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

const FULL: &str = r#"
transport = "tcp"
ca = "/pki/ca.pem"
cert = "/pki/agent.pem"
key = "/pki/agent.key"
enforce = false
consent = "require"
consent-timeout = 120
consent-timeout-action = "approve"
never-block = ["203.0.113.0/24", "2001:db8:ffff::53"]
notify-interval = 5
state-dir = "state"
control-socket = "/tmp/agent.sock"
log-format = "json"

[[peers]]
address = "[2001:db8::1]:5000"
peer-name = "isp.example"

[[peers]]
address = "dots.isp.example"
transport = "tcp"
cert = "/pki/agent.pem"

[domain]
prefixes = ["192.0.2.0/24", "2001:db8:100::/48"]
interface-addresses = false

[xdp]
interfaces = ["eth1", "wlan0"]
mode = "generic"
bpffs = "/sys/fs/bpf/test"
indefinite-cap = 120

[limits]
max-mitigations-per-cuid = 8
max-prefixes = 4
max-ranges = 5
max-protocols = 6

[policy]
max-lifetime = 600
max-mitigations-per-peer = 50
"#;

#[test]
fn full_config_round_trips_into_agent_options() {
    let c = AgentConfig::from_str(FULL, "/etc/dots/agent.toml").unwrap();
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.peers.len(), 2);
    assert_eq!(o.peers[0].host, "2001:db8::1");
    assert_eq!(o.peers[0].port, 5000);
    assert_eq!(
        o.peers[0].addrs,
        vec!["2001:db8::1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(o.peers[0].name.as_deref(), Some("isp.example"));
    assert_eq!(o.peers[1].host, "dots.isp.example");
    assert_eq!(o.peers[1].port, 4647);
    assert_eq!(o.peers[1].name, None);
    assert_eq!(o.transports, vec![Transport::Tcp]);
    assert_eq!(o.credentials.ca, PathBuf::from("/pki/ca.pem"));
    assert_eq!(o.credentials.cert, PathBuf::from("/pki/agent.pem"));
    assert_eq!(o.credentials.key, PathBuf::from("/pki/agent.key"));
    assert_eq!(
        o.domain,
        vec![net("192.0.2.0/24"), net("2001:db8:100::/48")]
    );
    assert!(o.monitor);
    assert_eq!(o.lans, vec!["eth1".to_string(), "wlan0".to_string()]);
    assert_eq!(o.attach_mode, AttachMode::Generic);
    assert_eq!(o.bpffs, PathBuf::from("/sys/fs/bpf/test"));
    assert_eq!(o.indefinite_cap, Duration::from_secs(120));
    assert_eq!(o.consent, ConsentMode::Require);
    assert_eq!(
        o.never_block,
        vec![net("203.0.113.0/24"), net("2001:db8:ffff::53/128")]
    );
    assert_eq!(
        o.limits,
        Limits {
            max_lifetime: Some(600),
            max_prefixes: 4,
            max_ranges: 5,
            max_protocols: 6,
        }
    );
    // Settings AgentOptions does not hold (yet).
    assert_eq!(c.notify_interval(), Duration::from_secs(5));
    assert_eq!(
        c.consent_timeout(),
        Some(ConsentTimeout {
            after: Duration::from_secs(120),
            action: ConsentTimeoutAction::Approve,
        })
    );
    assert_eq!(c.state_dir(), std::path::Path::new("/etc/dots/state"));
    assert_eq!(c.control_socket(), std::path::Path::new("/tmp/agent.sock"));
    assert_eq!(c.log_format(), LogFormat::Json);
    assert_eq!(c.max_mitigations_per_cuid(), 8);
    assert!(c.interface_prefixes().is_empty());
    let s = c.server_config(o.domain.clone());
    assert_eq!(s.mode, EnforcementMode::Monitor);
    assert_eq!(s.notify_period, Duration::from_secs(5));
    assert_eq!(s.max_mitigations_per_cuid, 8);
    assert_eq!(s.limits, o.limits);
}

#[test]
fn per_peer_differences_the_runtime_cannot_hold_are_refused() {
    let text = FULL.replace(
        "transport = \"tcp\"\ncert = \"/pki/agent.pem\"",
        "transport = \"udp\"",
    );
    let c = AgentConfig::from_str(&text, FILE).unwrap();
    c.validate().unwrap();
    let e = c.to_options().unwrap_err();
    assert_eq!(e.key(), Some("peers[1].transport"), "{e}");
    let peers = c.resolved_peers().unwrap();
    assert_eq!(peers[0].transports, vec![Transport::Tcp]);
    assert_eq!(peers[1].transports, vec![Transport::Udp]);

    let text = FULL.replace(
        "cert = \"/pki/agent.pem\"\n\n[domain]",
        "cert = \"/pki/other.pem\"\n\n[domain]",
    );
    let e = AgentConfig::from_str(&text, FILE)
        .unwrap()
        .to_options()
        .unwrap_err();
    assert_eq!(e.key(), Some("peers[1].cert"), "{e}");
    assert!(e.to_string().contains("/pki/other.pem"), "{e}");
}

#[test]
fn example_agent_file_parses_and_validates() {
    let path = workspace_file("examples/agent.toml");
    let c = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    c.validate().unwrap_or_else(|e| panic!("{e}"));
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.peers.len(), 2);
    assert_eq!(o.lans, vec!["eth1".to_string()]);
    // Its values are the defaults, but for the marked examples.
    let defaults = AgentConfig {
        peers: c.peers.clone(),
        ca: c.ca.clone(),
        cert: c.cert.clone(),
        key: c.key.clone(),
        domain: DomainConfig {
            prefixes: c.domain.prefixes.clone(),
            ..DomainConfig::default()
        },
        xdp: XdpConfig {
            interfaces: c.xdp.interfaces.clone(),
            ..XdpConfig::default()
        },
        origin: c.origin.clone(),
        ..AgentConfig::default()
    };
    assert_eq!(c, defaults);
    // Every commented-out key is a valid key with a valid value.
    let uncommented: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if is_key_line(rest) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = AgentConfig::from_str(&uncommented, &path).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.consent_timeout.is_some() && c.peers[0].peer_name.is_some());
    assert_eq!(c.consent_timeout_action, Some(ConsentTimeoutAction::Reject));
}

fn is_key_line(s: &str) -> bool {
    let Some((k, _)) = s.split_once(" = ") else {
        return false;
    };
    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
}

#[test]
fn error_messages_read_well() {
    let e = agent_err(&format!("notify-interval = 0\n{MINIMAL}"));
    assert_eq!(
        e.to_string(),
        format!("{FILE}: notify-interval = 0: must be at least 1 (seconds)")
    );
    let e = agent_err(&format!("{MINIMAL}\n[[peers]]\npeer-name = \"b\"\n"));
    assert_eq!(
        e.to_string(),
        format!("{FILE}: peers[1].address: missing: this key is required")
    );
    let e = agent_err(&format!("{MINIMAL}\n[xdp]\nmode = \"fast\"\n"));
    assert!(
        e.to_string().starts_with(&format!("{FILE}:11: xdp.mode: ")),
        "{e}"
    );
}

#[test]
fn local_action_drop_or_rate_limit_per_agent_and_per_peer() {
    use crate::enforce::SlotAction;
    // Default: drop.
    assert_eq!(agent_ok(MINIMAL).peer_action(0).unwrap(), SlotAction::Drop);
    let e = agent_err(&format!("{MINIMAL}\n[xdp]\naction = \"rate-limit\"\n"));
    assert_eq!(e.key(), Some("xdp.rate-limit-pps"), "{e}");
    assert!(e.to_string().contains("needs rate-limit-pps"), "{e}");
    let e = agent_err(&format!("{MINIMAL}\n[xdp]\nrate-limit-pps = 10\n"));
    assert_eq!(e.key(), Some("xdp.rate-limit-pps"), "{e}");
    assert!(e.to_string().contains("only applies"), "{e}");
    let e = agent_err(&format!(
        "{MINIMAL}\n[xdp]\naction = \"rate-limit\"\nrate-limit-bps = 0\n"
    ));
    assert_eq!(e.key(), Some("xdp.rate-limit-bps"), "{e}");
    let e = agent_err(&format!("{MINIMAL}\n[xdp]\naction = \"throttle\"\n"));
    assert_eq!(e.key(), Some("xdp.action"), "{e}");
    // Per agent, and a peer overriding it.
    let text = MINIMAL.replace(
        "[domain]",
        "[[peers]]\naddress = \"backup.example\"\naction = \"drop\"\n[domain]",
    );
    let c = agent_ok(&format!(
        "{text}\n[xdp]\naction = \"rate-limit\"\nrate-limit-pps = 1000\nrate-limit-bps = 8000000\n"
    ));
    let o = c.to_options().unwrap();
    assert_eq!(
        o.actions,
        vec![
            SlotAction::RateLimit {
                pps: 1000,
                bps: 8_000_000
            },
            SlotAction::Drop
        ]
    );
    // A peer rate-limiting on its own, with the agent dropping.
    let text = MINIMAL.replace(
        "address = \"isp.example\"",
        "address = \"isp.example\"\naction = \"rate-limit\"\nrate-limit-pps = 5",
    );
    assert_eq!(
        agent_ok(&text).peer_action(0).unwrap(),
        SlotAction::RateLimit { pps: 5, bps: 0 }
    );
    let text = MINIMAL.replace(
        "address = \"isp.example\"",
        "address = \"isp.example\"\naction = \"rate-limit\"",
    );
    let e = agent_err(&text);
    assert_eq!(e.key(), Some("peers[0].rate-limit-pps"), "{e}");
}

#[test]
fn metrics_needs_the_feature() {
    let text = format!("metrics = \"127.0.0.1:9464\"\n{MINIMAL}");
    if cfg!(feature = "metrics") {
        agent_ok(&text);
    } else {
        let e = agent_err(&text).to_string();
        assert!(e.contains("metrics"), "{e}");
        assert!(e.contains("built without feature `metrics`"), "{e}");
    }
}
