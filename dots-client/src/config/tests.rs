use std::path::PathBuf;

use dots_daemon::{config::ConfigError, logging::LogFormat};

use super::*;

fn workspace_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
}

#[test]
fn example_client_file_parses_and_validates() {
    let path = workspace_file("examples/client.toml");
    let c = ClientConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    c.validate().unwrap_or_else(|e| panic!("{e}"));
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.udp, Some("[::]:4647".parse().unwrap()));
    assert_eq!(
        c,
        ClientConfig {
            ca: c.ca.clone(),
            cert: c.cert.clone(),
            key: c.key.clone(),
            customer: vec![CustomerEntry {
                agent: "cpe1.example".into(),
                prefixes: vec![
                    "203.0.113.1/32".parse().unwrap(),
                    "2001:db8:1::/48".parse().unwrap()
                ],
            }],
            origin: c.origin.clone(),
            ..ClientConfig::default()
        }
    );
    assert_eq!(o.api, None);
    assert_eq!(o.max_agents, DEFAULT_MAX_AGENTS);
}

#[test]
fn customers_and_api() {
    const CF: &str = "/etc/dots-client/client.toml";
    let base = "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
    let c = ClientConfig::from_str(
        &format!(
            "{base}[[customer]]\nagent = \"cpe1\"\nprefixes = [\"203.0.113.1\", \"192.0.2.0/24\"]\n[[customer]]\nagent = \"cpe2\"\nprefixes = [\"2001:db8:2::/48\"]\n[api]\nlisten = \"127.0.0.1:8443\"\ntokens-file = \"tokens\"\n"
        ),
        CF,
    )
    .unwrap();
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.customers.len(), 2);
    assert_eq!(
        o.customers["cpe1"][0],
        "203.0.113.1/32".parse::<ipnet::IpNet>().unwrap()
    );
    let api = o.api.unwrap();
    assert_eq!(api.listen, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(api.tokens, Some(PathBuf::from("/etc/dots-client/tokens")));
    assert_eq!(
        api.cert,
        PathBuf::from("/etc/dots-client/c.pem"),
        "the client's by default"
    );

    let err = |text: &str| {
        let e = match ClientConfig::from_str(&format!("{base}{text}"), CF) {
            Ok(c) => c.validate().unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().starts_with(CF), "{e}");
        e
    };
    let e = err("[[customer]]\nagent = \"a\"\nprefixes = [\"192.0.2.1/24\"]\n");
    assert_eq!(e.key(), Some("customer[0].prefixes[0]"), "{e}");
    let e = err("[[customer]]\nagent = \"a\"\nprefixes = [\"nope\"]\n");
    assert!(e.to_string().contains("customer"), "{e}");
    let e = err("[[customer]]\nagent = \"\"\nprefixes = [\"192.0.2.1\"]\n");
    assert_eq!(e.key(), Some("customer[0].agent"), "{e}");
    let e = err("[[customer]]\nagent = \"a\"\nprefixes = []\n");
    assert_eq!(e.key(), Some("customer[0].prefixes"), "{e}");
    let e = err("[[customer]]\nagent = \"a\"\nprefixes = [\"192.0.2.1\"]\n[[customer]]\nagent = \"a\"\nprefixes = [\"192.0.2.2\"]\n");
    assert_eq!(e.key(), Some("customer[1].agent"), "{e}");
    let e = err("[[customer]]\nagent = \"a\"\nprefixes = [\"192.0.2.0/24\"]\n[[customer]]\nagent = \"b\"\nprefixes = [\"192.0.2.2\"]\n");
    assert_eq!(e.key(), Some("customer"), "{e}");
    assert!(e.to_string().contains("overlaps"), "{e}");
    let e = err("[api]\nlisten = \"127.0.0.1:8443\"\n");
    assert_eq!(e.key(), Some("api.tokens-file"), "{e}");
    let e = err("[api]\nlisten = \"8443\"\ntokens-file = \"t\"\n");
    assert_eq!(e.key(), Some("api.listen"), "{e}");
    let e = err("[api]\nlisten = \"none\"\ntoken-file = \"t\"\n");
    assert!(e.to_string().contains("token-file"), "{e}");
    let e = err("max-agents = 0\n");
    assert_eq!(e.key(), Some("max-agents"), "{e}");
}

#[test]
fn client_config() {
    const CF: &str = "/etc/dots-client/client.toml";
    let base = "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
    let c = ClientConfig::from_str(
        &format!("{base}udp = \"none\"\ntcp = \"0.0.0.0:4000\"\nallow = [\"cpe1\"]\ncontrol-socket = \"/tmp/c.sock\"\nstate-dir = \"st\"\nlog-format = \"json\"\n"),
        CF,
    )
    .unwrap();
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.udp, None);
    assert_eq!(o.tcp, Some("0.0.0.0:4000".parse().unwrap()));
    assert_eq!(o.credentials.ca, PathBuf::from("/etc/dots-client/ca.pem"));
    assert_eq!(o.allow, Some(vec!["cpe1".to_string()]));
    assert_eq!(o.control, PathBuf::from("/tmp/c.sock"));
    assert_eq!(o.state_dir, Some(PathBuf::from("/etc/dots-client/st")));
    assert_eq!(c.log_format(), LogFormat::Json);

    let defaults = ClientConfig::from_str(base, CF)
        .unwrap()
        .to_options()
        .unwrap();
    assert_eq!(defaults.allow, None);
    assert_eq!(
        defaults.control,
        PathBuf::from("/run/dots-client/control.sock")
    );
    assert_eq!(
        defaults.state_dir,
        Some(PathBuf::from("/var/lib/dots-client"))
    );

    let err = |text: &str| {
        let e = match ClientConfig::from_str(text, CF) {
            Ok(c) => c.validate().unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().starts_with(CF), "{e}");
        e
    };
    let e = err(&format!("{base}udp = \"4647\"\n"));
    assert_eq!(e.key(), Some("udp"), "{e}");
    assert!(e.to_string().contains("\"4647\""), "{e}");
    let e = err(&format!("{base}udp = \"none\"\ntcp = \"none\"\n"));
    assert_eq!(e.key(), Some("tcp"), "{e}");
    let e = err("ca = \"ca.pem\"\ncert = \"c.pem\"\n");
    assert_eq!(e.key(), Some("key"), "{e}");
    assert!(matches!(e, ConfigError::Missing { .. }), "{e}");
    let e = err(&format!("{base}alow = [\"x\"]\n"));
    assert_eq!(e.key(), Some("alow"), "{e}");
    assert!(e.to_string().contains("allow"), "{e}");
    let e = err(&format!("{base}allow = [\"\"]\n"));
    assert_eq!(e.key(), Some("allow[0]"), "{e}");
    let e = err(&format!(
        "{base}control-socket = \"/{}\"\n",
        "s".repeat(120)
    ));
    assert_eq!(e.key(), Some("control-socket"), "{e}");

    let c = ClientConfig::from_str(base, "/nonexistent/client.toml").unwrap();
    let e = c.check_files().unwrap_err();
    assert_eq!(e.key(), Some("ca"), "{e}");
}

#[test]
fn check_looks_into_the_certificates() {
    let dir = std::env::temp_dir().join(format!("dots-client-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = dots_daemon::pki::create_lab_pki(
        &dir,
        &[dots_daemon::pki::San::parse("isp.example")],
        &["cpe1".into()],
        365,
    )
    .unwrap();
    let file = dir.join("client.toml");
    let text = |key: &std::path::Path| {
        format!(
            "ca = \"ca.pem\"\ncert = \"client.pem\"\nkey = {:?}\n",
            key.display().to_string()
        )
    };
    let c = ClientConfig::from_str(&text(&pki.client_key), &file).unwrap();
    assert_eq!(
        c.check().unwrap_or_else(|e| panic!("{e}")),
        Vec::<String>::new()
    );
    // The agent's key with the client's certificate: refused, naming `key`.
    let c = ClientConfig::from_str(&text(&pki.agents[0].2), &file).unwrap();
    let e = c.check().unwrap_err();
    assert_eq!(e.key(), Some("key"), "{e}");
    assert!(
        e.to_string().contains("is not the key of the certificate"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cluster_section() {
    const CF: &str = "/etc/dots-client/client.toml";
    let base = "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\ntcp = \"192.0.2.10:4647\"\n";
    let c = ClientConfig::from_str(
        &format!("{base}[cluster]\netcd = [\"10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\nname = \"isp\"\nnode = \"a\"\nlease-ttl = 5\nadvertise = \"a.dots.example\"\n"),
        CF,
    )
    .unwrap();
    let o = c.to_options().unwrap_or_else(|e| panic!("{e}"));
    let cl = o.cluster.expect("a cluster");
    assert_eq!(
        cl.endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(
        (cl.cluster.as_str(), cl.node.as_str(), cl.lease_ttl),
        ("isp", "a", 5)
    );
    assert_eq!(cl.advertise.as_deref(), Some("a.dots.example"));
    // No endpoints: a node alone, as without the section.
    let c = ClientConfig::from_str(&format!("{base}[cluster]\nname = \"isp\"\n"), CF).unwrap();
    assert_eq!(c.to_options().unwrap().cluster, None);

    let err = |text: &str| {
        let e = match ClientConfig::from_str(&format!("{base}{text}"), CF) {
            Ok(c) => c.validate().unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().starts_with(CF), "{e}");
        e
    };
    let e = err("[cluster]\netcd = [\"10.0.0.1\"]\nnode = \"a\"\n");
    assert_eq!(e.key(), Some("cluster.etcd[0]"), "{e}");
    let e = err("[cluster]\netcd = [\"10.0.0.1:2379\"]\nnode = \"a b\"\n");
    assert_eq!(e.key(), Some("cluster.node"), "{e}");
    let e = err("[cluster]\netcd = [\"10.0.0.1:2379\"]\nnode = \"a\"\nlease-ttl = 1\n");
    assert_eq!(e.key(), Some("cluster.lease-ttl"), "{e}");
    let e = err("[cluster]\netcd = [\"10.0.0.1:2379\"]\nnode = \"a\"\nadvertise = \"10.0.0.5\"\n");
    assert_eq!(e.key(), Some("cluster.advertise"), "{e}");
    let e = err("[cluster]\nendpoints = [\"10.0.0.1:2379\"]\n");
    assert!(e.to_string().contains("endpoints"), "{e}");
}
