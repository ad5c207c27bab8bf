//! `dots-agent discover` and `dots-agent dhcp-hook`: arguments and handlers
//! (kept here so the binary only names the subcommands).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};

use super::{
    dhcp::{self, DhcpDots},
    state::{self, DhcpEntry},
    Candidate, DiscoverOptions, ExplicitConfig,
};
use crate::paths::DEFAULT_STATE_DIR;

/// Arguments of `dots-agent discover`.
#[derive(clap::Args, Debug)]
pub struct DiscoverArgs {
    /// Domain for S-NAPTR and DNS-SD lookups [default: the domain DHCP gave,
    /// from --state-dir].
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// DNS server to ask, ADDR:PORT (UDP, TCP on truncation) [default: the
    /// system's resolv.conf].
    #[arg(long, value_name = "ADDR:PORT")]
    pub resolver: Option<SocketAddr>,
    /// Explicitly configured Call Home DOTS client name.
    #[arg(long, value_name = "NAME")]
    pub peer: Option<String>,
    /// Explicitly configured address (repeatable); needs --peer-name or --peer.
    #[arg(long = "peer-address", value_name = "ADDR")]
    pub peer_addresses: Vec<IpAddr>,
    /// Reference identifier of the explicitly configured peer.
    #[arg(long, value_name = "NAME")]
    pub peer_name: Option<String>,
    /// Port of the explicitly configured peer [default: 4647].
    #[arg(long)]
    pub port: Option<u16>,
    /// State directory holding discovered.json (written by dhcp-hook).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Only the most preferred mechanism that gives candidates (what the
    /// agent dials) instead of every mechanism.
    #[arg(long)]
    pub first: bool,
    /// Seed of the SRV weighted random selection (reproducible order).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a JSON array of {mechanism, transport, address, port,
    /// reference_id, ttl}.
    #[arg(long)]
    pub json: bool,
}

/// `dots-agent discover`.
pub fn run_discover(a: &DiscoverArgs) -> Result<()> {
    let opts = DiscoverOptions {
        explicit: ExplicitConfig {
            name: a.peer.clone(),
            addresses: a.peer_addresses.clone(),
            reference_id: a.peer_name.clone(),
            port: a.port,
        },
        state_dir: a.state_dir.clone(),
        domain: a.domain.clone(),
        resolver: a.resolver,
        seed: a.seed,
        all: !a.first,
        resolve_names: true,
    };
    if opts.domain.is_none()
        && opts.state_dir.is_none()
        && opts.explicit.name.is_none()
        && opts.explicit.addresses.is_empty()
    {
        bail!("nothing to discover from: give --domain, --state-dir or --peer");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(super::discover(&opts))?;
    for (m, f) in &out.failures {
        tracing::warn!(mechanism = %m, kind = ?f.kind, "{f}");
    }
    if a.json {
        let v: Vec<serde_json::Value> = out.candidates.iter().map(Candidate::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if out.candidates.is_empty() {
        println!("no Call Home DOTS client found");
        return Ok(());
    }
    println!(
        "{:<3} {:<9} {:<9} {:<40} {:>5}  {:<30} valid",
        "#", "mechanism", "transport", "address", "port", "reference-id"
    );
    for (i, c) in out.candidates.iter().enumerate() {
        println!(
            "{:<3} {:<9} {:<9} {:<40} {:>5}  {:<30} {}",
            i + 1,
            c.mechanism.as_str(),
            c.transport.map_or("any", |t| t.as_str()),
            c.address.map_or_else(|| c.host.clone(), |a| a.to_string()),
            c.port,
            c.reference_id,
            c.ttl
                .map_or_else(|| "no expiry".to_string(), |t| format!("{}s", t.as_secs())),
        );
    }
    Ok(())
}

/// Which DHCP family an invocation reports.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Arguments of `dots-agent dhcp-hook`.
#[derive(clap::Args, Debug)]
pub struct DhcpHookArgs {
    /// OPTION_V4_DOTS_RI (147) value: hex of the DNS wire format (any of
    /// `0464...`, `04:64:...`, `4:64:...`) or the name as text.
    #[arg(long, value_name = "VALUE")]
    pub v4_ri: Option<String>,
    /// OPTION_V4_DOTS_ADDRESS (148) value, RFC 3396-concatenated: hex, or
    /// addresses separated by spaces or commas.
    #[arg(long, value_name = "VALUE")]
    pub v4_address: Option<String>,
    /// OPTION_V6_DOTS_RI (141) value: hex or text.
    #[arg(long, value_name = "VALUE")]
    pub v6_ri: Option<String>,
    /// OPTION_V6_DOTS_ADDRESS (142) value: hex or addresses.
    #[arg(long, value_name = "VALUE")]
    pub v6_address: Option<String>,
    /// Domain name of the network (DHCPv4 option 15, DHCPv6 option 24), for
    /// S-NAPTR / DNS-SD.
    #[arg(long, value_name = "NAME")]
    pub domain_name: Option<String>,
    /// Lease time (or DHCPv6 information refresh time) in seconds: the
    /// discovered peer expires after it.
    #[arg(long, value_name = "SECONDS")]
    pub lease: Option<u64>,
    /// Port of the discovered peer [default: 4647].
    #[arg(long)]
    pub port: Option<u16>,
    /// The family this lease is for: with no DOTS option given, that
    /// family's entry is removed (the server stopped sending them).
    #[arg(long, value_enum)]
    pub family: Option<Family>,
    /// Remove the entry of a family (lease lost: udhcpc deconfig/leasefail,
    /// dhclient EXPIRE/RELEASE/STOP).
    #[arg(long, value_enum, value_name = "FAMILY")]
    pub clear: Option<Family>,
    /// Also read the values from the environment of DHCP client hook
    /// scripts: udhcpc (`opt147`, `opt148`, `domain`, `lease`), dhclient
    /// (`new_dots_ri`, `new_dots_address`, `new_dhcp6_dots_ri`,
    /// `new_dhcp6_dots_address`, `new_domain_name`, `new_dhcp_lease_time`,
    /// `reason`), odhcp6c / networkd style (`OPTION_141`, `OPTION_142`,
    /// `OPTION_147`, `OPTION_148`). Flags win over the environment.
    #[arg(long)]
    pub env: bool,
    /// Where discovered.json is written [default: /var/lib/dots-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Values of one hook invocation, flags and environment merged.
#[derive(Debug, Default)]
struct HookValues {
    v4_ri: Option<String>,
    v4_addr: Option<String>,
    v6_ri: Option<String>,
    v6_addr: Option<String>,
    domain: Option<String>,
    lease: Option<u64>,
    clear: Option<Family>,
}

fn from_env(env: &HashMap<String, String>) -> HookValues {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| env.get(*k).filter(|v| !v.trim().is_empty()).cloned())
    };
    let mut v = HookValues {
        v4_ri: get(&["opt147", "new_dots_ri", "OPTION_147"]),
        v4_addr: get(&["opt148", "new_dots_address", "OPTION_148"]),
        v6_ri: get(&["new_dhcp6_dots_ri", "OPTION_141"]),
        v6_addr: get(&["new_dhcp6_dots_address", "OPTION_142"]),
        domain: get(&[
            "domain",
            "new_domain_name",
            "new_dhcp6_domain_search",
            "DOMAINS",
        ]),
        lease: get(&["lease", "new_dhcp_lease_time"]).and_then(|s| s.trim().parse().ok()),
        clear: None,
    };
    if let Some(r) = env.get("reason") {
        // dhclient: a lease lost.
        if matches!(r.as_str(), "EXPIRE" | "FAIL" | "RELEASE" | "STOP") {
            v.clear = Some(Family::V4);
        } else if matches!(r.as_str(), "EXPIRE6" | "RELEASE6" | "STOP6") {
            v.clear = Some(Family::V6);
        }
    }
    v
}

/// `dots-agent dhcp-hook`.
pub fn run_dhcp_hook(a: &DhcpHookArgs) -> Result<()> {
    let env: HashMap<String, String> = if a.env {
        std::env::vars().collect()
    } else {
        HashMap::new()
    };
    let e = from_env(&env);
    let v = HookValues {
        v4_ri: a.v4_ri.clone().or(e.v4_ri),
        v4_addr: a.v4_address.clone().or(e.v4_addr),
        v6_ri: a.v6_ri.clone().or(e.v6_ri),
        v6_addr: a.v6_address.clone().or(e.v6_addr),
        domain: a.domain_name.clone().or(e.domain).and_then(|d| {
            d.split_whitespace()
                .next()
                .map(|s| s.trim_end_matches('.').to_string())
        }),
        lease: a.lease.or(e.lease),
        clear: a.clear.or(e.clear),
    };
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let now = SystemTime::now();
    let lease = v.lease.map(Duration::from_secs);

    let decode =
        |ri: &Option<String>, addr: &Option<String>, v6: bool| -> Result<Option<DhcpDots>> {
            if ri.is_none() && addr.is_none() {
                return Ok(None);
            }
            let ri = ri
                .as_deref()
                .map(dhcp::hook_ri)
                .transpose()
                .context("reference identifier option")?;
            let addr = addr
                .as_deref()
                .map(|s| dhcp::hook_addresses(s, v6))
                .transpose()
                .context("address option")?;
            Ok(Some(if v6 {
                DhcpDots::from_v6(ri.as_deref(), addr.as_deref())
            } else {
                DhcpDots::from_v4(ri.as_deref(), addr.as_deref())
            }))
        };
    let d4 = decode(&v.v4_ri, &v.v4_addr, false)?;
    let d6 = decode(&v.v6_ri, &v.v6_addr, true)?;
    for p in d4.iter().chain(d6.iter()).flat_map(|d| &d.problems) {
        tracing::warn!("DHCP option ignored: {p}");
    }

    let entry = |d: &DhcpDots| DhcpEntry::new(d, v.domain.clone(), a.port, lease, now);
    let usable = |d: &&DhcpDots| d.reference_id.is_some() || !d.addresses.is_empty();
    let written = state::update_discovered(&dir, |s| {
        match v.clear {
            Some(Family::V4) => s.dhcpv4 = None,
            Some(Family::V6) => s.dhcpv6 = None,
            None => {}
        }
        if v.clear.is_some() {
            return;
        }
        let (e4, e6) = (d4.as_ref().filter(usable), d6.as_ref().filter(usable));
        if let Some(d) = e4 {
            s.dhcpv4 = Some(entry(d));
        } else if d4.is_some() || a.family == Some(Family::V4) {
            // Options absent or unusable on this lease: what we had is stale.
            s.dhcpv4 = None;
        }
        if let Some(d) = e6 {
            s.dhcpv6 = Some(entry(d));
        } else if d6.is_some() || a.family == Some(Family::V6) {
            s.dhcpv6 = None;
        }
    })?;
    let cands = written.candidates(now);
    tracing::info!(
        file = %state::discovered_path(&dir).display(),
        candidates = cands.len(),
        "DHCP discovery recorded"
    );
    for c in cands {
        println!(
            "{} {} port {} reference-id {}",
            c.mechanism,
            c.address.map_or_else(|| c.host.clone(), |a| a.to_string()),
            c.port,
            c.reference_id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_forms() {
        let env: HashMap<String, String> = [
            ("opt147", "03697370076578616d706c6500"),
            ("opt148", "c0000207"),
            ("lease", "3600"),
            ("domain", "example.net"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let v = from_env(&env);
        assert_eq!(v.v4_ri.as_deref(), Some("03697370076578616d706c6500"));
        assert_eq!(v.v4_addr.as_deref(), Some("c0000207"));
        assert_eq!(v.lease, Some(3600));
        assert_eq!(v.domain.as_deref(), Some("example.net"));
        let env: HashMap<String, String> = [("reason", "EXPIRE6"), ("OPTION_142", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let v = from_env(&env);
        assert_eq!(v.clear, Some(Family::V6));
        assert_eq!(v.v6_addr, None);
    }
}
