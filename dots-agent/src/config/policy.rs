//! `[policy]`: what one request, one peer and all peers together may make
//! this router block, and what a peer may impose on the session. The RFCs
//! leave these bounds to the operator; the defaults suit a home or
//! small-office router. Every key is in docs/configuration.md.

use std::{path::Path, time::Duration};

use dots_common::MAX_SLOTS;
use dots_proto::{
    model::{OverLimit, Policy},
    signal::{ParamRange, ServerConfig, SessionPolicy},
};
use serde::Deserialize;

use dots_daemon::config::ConfigError;

/// Default `max-heartbeat-interval`, in seconds: the DOTS default heartbeat
/// (RFC 9132 §4.5), short enough for the UDP idle timers of common NATs
/// and firewalls (Linux conntrack forgets an unanswered UDP flow after
/// 30 s, many home routers keep UDP bindings 30 to 60 s), which the agent
/// must keep alive (RFC 9066 §5.2.1).
pub const DEFAULT_MAX_HEARTBEAT_INTERVAL: u16 = 30;

/// Default `redirect-fallback`, in seconds.
pub const DEFAULT_REDIRECT_FALLBACK: u64 = 300;

/// `[policy]` as written in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A request past one of the `max-sources-*`, `max-targets-*` bounds (or
    /// `max-lifetime` with `shorten-lifetime = false`): `refuse` (4.22) or
    /// `consent` (it waits for the operator).
    pub over_limit: OverLimit,
    /// Most IPv4 addresses one request's sources may cover.
    pub max_sources_v4: u64,
    /// Most IPv6 /64 networks one request's sources may touch.
    pub max_sources_v6: u64,
    /// Most IPv4 addresses one request's targets may cover.
    pub max_targets_v4: u64,
    /// Most IPv6 /64 networks one request's targets may touch.
    pub max_targets_v6: u64,
    /// Longest lifetime granted, seconds; `-1`: no cap, indefinite granted.
    pub max_lifetime: i64,
    /// `true`: a longer (or indefinite) lifetime is granted as
    /// `max-lifetime`; `false`: it is a bound, handled as `over-limit` says.
    pub shorten_lifetime: bool,
    /// Most mitigations one peer may hold, all its cuids together.
    pub max_mitigations_per_peer: usize,
    /// Most mitigations the agent holds for all peers; at most the data
    /// plane's slots.
    pub max_mitigations: usize,
    /// Longest heartbeat interval a peer may set (seconds).
    pub max_heartbeat_interval: u16,
    /// Seconds a redirect's alternate peer may stay unreachable before the
    /// agent dials its configured peers again.
    pub redirect_fallback: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let p = Policy::default();
        let s = ServerConfig::default();
        Self {
            over_limit: p.over_limit,
            max_sources_v4: p.max_sources_v4,
            max_sources_v6: p.max_sources_v6,
            max_targets_v4: p.max_targets_v4,
            max_targets_v6: p.max_targets_v6,
            max_lifetime: s.limits.max_lifetime.map_or(-1, i64::from),
            shorten_lifetime: p.shorten_lifetime,
            max_mitigations_per_peer: s.max_mitigations_per_peer,
            // One slot stays free: changing the scope of a mitigation
            // installs the new slot before the old one is freed.
            max_mitigations: MAX_SLOTS - 1,
            max_heartbeat_interval: DEFAULT_MAX_HEARTBEAT_INTERVAL,
            redirect_fallback: DEFAULT_REDIRECT_FALLBACK,
        }
    }
}

impl PolicyConfig {
    /// The checks of [`super::AgentConfig::validate`] for `[policy]`.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, value: String, message: String| ConfigError::Value {
            file: file.to_path_buf(),
            key: format!("policy.{key}"),
            value,
            message,
        };
        let v4 = 1u64 << 32;
        for (key, v, max, unit) in [
            ("max-sources-v4", self.max_sources_v4, v4, "IPv4 addresses"),
            ("max-targets-v4", self.max_targets_v4, v4, "IPv4 addresses"),
            (
                "max-sources-v6",
                self.max_sources_v6,
                u64::MAX,
                "/64 networks",
            ),
            (
                "max-targets-v6",
                self.max_targets_v6,
                u64::MAX,
                "/64 networks",
            ),
        ] {
            if !(1..=max).contains(&v) {
                return Err(err(
                    key,
                    v.to_string(),
                    format!("must be 1 to {max} ({unit})"),
                ));
            }
        }
        if self.max_lifetime != -1 && !(1..=i64::from(u32::MAX)).contains(&self.max_lifetime) {
            return Err(err(
                "max-lifetime",
                self.max_lifetime.to_string(),
                format!("must be 1 to {} seconds, or -1 for no cap", u32::MAX),
            ));
        }
        if !(1..=MAX_SLOTS).contains(&self.max_mitigations) {
            return Err(err(
                "max-mitigations",
                self.max_mitigations.to_string(),
                format!("must be 1 to {MAX_SLOTS}: the data plane has {MAX_SLOTS} slots, one per mitigation"),
            ));
        }
        if !(1..=self.max_mitigations).contains(&self.max_mitigations_per_peer) {
            return Err(err(
                "max-mitigations-per-peer",
                self.max_mitigations_per_peer.to_string(),
                format!("must be 1 to max-mitigations ({})", self.max_mitigations),
            ));
        }
        let hb = SessionPolicy::default().heartbeat_interval;
        if !(1..=hb.max).contains(&self.max_heartbeat_interval) {
            return Err(err(
                "max-heartbeat-interval",
                self.max_heartbeat_interval.to_string(),
                format!("must be 1 to {} seconds", hb.max),
            ));
        }
        if self.redirect_fallback < 1 {
            return Err(err(
                "redirect-fallback",
                self.redirect_fallback.to_string(),
                "must be at least 1 (seconds)".into(),
            ));
        }
        Ok(())
    }

    /// `max-lifetime` as `dots-proto` takes it (an out-of-range value reads
    /// as "no cap"; [`Self::validate`] refuses those).
    pub fn max_lifetime(&self) -> Option<u32> {
        u32::try_from(self.max_lifetime).ok()
    }

    /// The request bounds.
    pub fn to_policy(&self) -> Policy {
        Policy {
            max_sources_v4: self.max_sources_v4,
            max_sources_v6: self.max_sources_v6,
            max_targets_v4: self.max_targets_v4,
            max_targets_v6: self.max_targets_v6,
            shorten_lifetime: self.shorten_lifetime,
            over_limit: self.over_limit,
        }
    }

    /// The session ranges with the heartbeat interval capped: a peer's
    /// PUT above `max-heartbeat-interval` is 4.22 (RFC 9132 §4.5.2), and
    /// the default never exceeds it.
    pub fn session_policy(&self) -> SessionPolicy {
        let base = SessionPolicy::default();
        let cap = self.max_heartbeat_interval;
        let hb = base.heartbeat_interval;
        SessionPolicy {
            heartbeat_interval: ParamRange {
                min: hb.min.min(cap),
                max: cap,
                default: hb.default.min(cap),
            },
            ..base
        }
    }

    /// `redirect-fallback`.
    pub fn redirect_fallback(&self) -> Duration {
        Duration::from_secs(self.redirect_fallback)
    }

    /// Puts the policy into a server's settings; the agent-wide handles
    /// (budget, exempt set) are the runtime's to share.
    pub fn apply(&self, c: &mut ServerConfig) {
        c.policy = self.to_policy();
        c.limits.max_lifetime = self.max_lifetime();
        c.max_mitigations_per_peer = self.max_mitigations_per_peer;
        c.session = self.session_policy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe_and_consistent() {
        let p = PolicyConfig::default();
        assert_eq!(
            p.validate(Path::new("x")).map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(p.max_mitigations, 255);
        assert!(p.max_mitigations_per_peer <= p.max_mitigations);
        assert_eq!(p.max_lifetime(), Some(86_400));
        let s = p.session_policy();
        assert_eq!(s.heartbeat_interval.max, 30);
        assert_eq!(s.heartbeat_interval.default, 30);
        assert_eq!(s.validate(), Ok(()));
        let mut c = ServerConfig::default();
        p.apply(&mut c);
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.session, s);
        assert_eq!(c.max_mitigations_per_peer, p.max_mitigations_per_peer);
    }

    #[test]
    fn a_low_heartbeat_cap_lowers_the_range() {
        let p = PolicyConfig {
            max_heartbeat_interval: 10,
            ..PolicyConfig::default()
        };
        let hb = p.session_policy().heartbeat_interval;
        assert_eq!((hb.min, hb.max, hb.default), (10, 10, 10));
        assert_eq!(p.session_policy().validate(), Ok(()));
    }
}
