//! How `dots-agent` prints what it reads: the running agent's status and
//! mitigations, the data plane, `check-config`.

use std::{fmt::Display, path::Path};

use anyhow::Result;
use serde::Serialize;

use dots_agent::agent::{
    view::{DataplaneStatus, MitigationView, StatusView},
    AgentOptions,
};

/// Pretty JSON. Through `serde_json::Value`, so that objects list their keys
/// sorted, as `--json` always has.
pub(crate) fn json(value: &impl Serialize) -> Result<()> {
    let value = serde_json::to_value(value)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `a,b,c`.
fn join<T: Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `dots-agent status`.
pub(crate) fn status(s: &StatusView) {
    let mode = if s.monitor {
        "monitor (nothing is installed)"
    } else {
        "enforcing"
    };
    println!("mode:        {mode}");
    println!("bpffs:       {}", s.bpffs.display());
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.iface, i.mode))
        .collect();
    println!(
        "interfaces:  {}",
        if ifaces.is_empty() {
            "(none)".into()
        } else {
            ifaces.join(", ")
        }
    );
    println!("mitigations: {}", s.mitigations);
    for (i, p) in s.peers.iter().enumerate() {
        let silent = p
            .silent_for
            .map(|s| format!(", last heard {s}s ago"))
            .unwrap_or_default();
        let transport = p
            .transport
            .as_deref()
            .map(|t| format!(" over {t}"))
            .unwrap_or_default();
        let resumed = if p.resumed { " (resumed)" } else { "" };
        println!(
            "peer {i}:      {} {}{transport}{resumed}{silent}",
            p.peer, p.state
        );
        if let Some(e) = &p.last_error {
            println!("             last error: {e}");
        }
    }
}

/// `dots-agent mitigations`.
pub(crate) fn mitigations(list: &[MitigationView]) {
    if list.is_empty() {
        println!("no mitigation");
        return;
    }
    for m in list {
        let lifetime = match m.lifetime_left {
            -1 => "indefinite".to_string(),
            s => format!("{s}s left"),
        };
        println!(
            "{}/{}  peer {}  {} (status {})  {lifetime}",
            m.cuid, m.mid, m.peer, m.state, m.status
        );
        let mut scope = format!("  from {}", join(&m.sources));
        for (v, label) in [(&m.source_ports, " sport "), (&m.icmp_types, " icmp ")] {
            if !v.is_empty() {
                scope += &format!("{label}{}", join(v));
            }
        }
        scope += &format!(" to {}", join(&m.targets));
        if !m.protocols.is_empty() {
            scope += &format!(" proto {}", join(&m.protocols));
        }
        if !m.target_ports.is_empty() {
            scope += &format!(" dport {}", join(&m.target_ports));
        }
        println!("{scope}");
        if !m.devices.is_empty() {
            println!("  behind NAT: {}", m.devices.join(", "));
        }
        if !m.exempt.is_empty() {
            // Never-block prefixes and peers' addresses: left out of the drop.
            println!(
                "  exempt, not dropped: {}",
                dots_daemon::logging::list(&m.exempt)
            );
        }
        if let Some(bound) = &m.over_limit {
            println!("  past local policy: {bound}");
        }
        if m.action == "monitor" {
            // Monitor mode: nothing is dropped; this is what would be.
            println!(
                "  monitor: would have dropped {} packets, {} bytes; now {} pps (none dropped)",
                m.passed_packets, m.passed_bytes, m.passed_pps
            );
        } else {
            println!(
                "  dropped {} packets, {} bytes; now {} pps, {} bps",
                m.packets, m.bytes, m.pps, m.bps
            );
        }
        if m.action.starts_with("rate-limit") {
            println!(
                "  {}: passed {} packets, {} bytes within the limit; now {} pps",
                m.action, m.passed_packets, m.passed_bytes, m.passed_pps
            );
        }
    }
}

/// `dots-agent dataplane status`.
pub(crate) fn dataplane(d: &DataplaneStatus) {
    println!("bpffs:      {}", d.bpffs.display());
    println!(
        "interfaces: {}",
        if d.interfaces.is_empty() {
            "(none)".into()
        } else {
            d.interfaces.join(", ")
        }
    );
    println!(
        "packets:    dropped {} exempt {} unparsed {} monitored (would drop) {} within a rate limit {}",
        d.stats.dropped, d.stats.exempt, d.stats.unparsed, d.stats.monitored, d.stats.conforming
    );
    println!("slots:      {}", d.slots.len());
    for s in &d.slots {
        println!(
            "  slot {}: {} packets, {} bytes dropped; {} packets, {} bytes passed",
            s.slot, s.packets, s.bytes, s.passed_packets, s.passed_bytes
        );
    }
}

/// `dots-agent check-config`.
pub(crate) fn check_config(path: &Path, opts: &AgentOptions) {
    println!(
        "{}: valid ({} peer(s), {} domain prefix(es), {} LAN interface(s), {})",
        path.display(),
        opts.peers.len(),
        opts.domain.len(),
        opts.lans.len(),
        if opts.monitor {
            "monitor mode"
        } else {
            "enforcing"
        }
    );
}
