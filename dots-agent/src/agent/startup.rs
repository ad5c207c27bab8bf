//! From a configuration to the runtime's options, as `dots-agent run` starts:
//! find the peer by discovery when none is configured and check the
//! configuration on this machine; and how SIGHUP reads it again
//! ([`reloader`]).

use anyhow::Result;
use tracing::{info, warn};

use super::{AgentOptions, Reloader};
use crate::{
    config::{AgentConfig, DiscoveryFlags, PeerConfig, RunFlags},
    discovery::{self, DiscoverOptions, DiscoveryContext},
    peer::PeerTarget,
};

/// The options `dots-agent run` starts the runtime with. RFC 8973 §4:
/// explicit configuration first; without a peer, discovery with `discovery`
/// (which then also looks the peer up again when its information expires).
pub async fn options(mut config: AgentConfig, discovery: &DiscoveryFlags) -> Result<AgentOptions> {
    let discovered = if config.peers.is_empty() {
        Some(discover_peer(&config, discovery).await?)
    } else {
        None
    };
    if let Some((t, _)) = &discovered {
        info!(peer = %t, endpoints = ?t.endpoints, "peer found by discovery");
        config.peers = vec![discovered_peer(t)];
    }
    for w in config.check()? {
        warn!("{w}");
    }
    let mut opts = config.to_options()?;
    if let Some((t, d)) = discovered {
        opts.peers = vec![t];
        opts.discovery = Some(d);
    }
    // The router's own addresses join the domain in the runtime, as they
    // change (RFC 9066 §5.3.1).
    Ok(opts)
}

/// What SIGHUP runs: the configuration file and the flags read again and
/// checked as at start (`--log-format` and discovery are not re-read).
/// A file without peers keeps the peer discovery found (discovery is not
/// run again by a reload).
pub fn reloader(flags: RunFlags) -> Reloader {
    Box::new(move |running: &AgentOptions| {
        let mut config = flags.load(None)?;
        let discovered = config.peers.is_empty() && running.discovery.is_some();
        if discovered {
            config.peers = running.peers.iter().map(discovered_peer).collect();
        }
        for w in config.check()? {
            warn!("{w}");
        }
        let mut opts = config.to_options()?;
        if discovered {
            opts.peers = running.peers.clone();
            opts.discovery = running.discovery.clone();
        }
        Ok(opts)
    })
}

/// A discovered peer as the configuration would name it, so that the
/// checks of a configuration with peers apply.
fn discovered_peer(t: &PeerTarget) -> PeerConfig {
    PeerConfig {
        address: t
            .endpoints
            .first()
            .map_or_else(|| t.to_string(), |(a, _)| a.to_string()),
        peer_name: t.name.clone(),
        ..Default::default()
    }
}

/// The Call Home DOTS client found by RFC 8973 discovery.
async fn discover_peer(
    config: &AgentConfig,
    flags: &DiscoveryFlags,
) -> Result<(PeerTarget, DiscoveryContext)> {
    #[cfg(not(feature = "discovery"))]
    if flags.domain.is_some() || flags.resolver.is_some() {
        anyhow::bail!(
            "--discovery-domain/--resolver: {}",
            crate::config::WITHOUT_DISCOVERY
        );
    }
    let opts = DiscoverOptions {
        state_dir: Some(config.state_dir.clone()),
        domain: flags.domain.clone(),
        resolver: flags.resolver,
        resolve_names: true,
        ..Default::default()
    };
    let transports = config.transport.transports();
    match discovery::find_peer(&opts, &transports).await {
        Ok(found) => Ok((
            found.target,
            DiscoveryContext {
                opts,
                transports,
                valid_until: found.valid_until,
            },
        )),
        Err((msg, _)) => anyhow::bail!(
            "no peer configured (--peer or [[peers]]) and {msg}{}",
            if flags.domain.is_none() {
                " (give --discovery-domain for S-NAPTR/DNS-SD)"
            } else {
                ""
            }
        ),
    }
}
