//! The agent's local policy on what one request may block, beyond the
//! RFC rules of [`super::validate`]: how many addresses its sources and
//! targets may cover, and which of them are exempt from enforcement.
//!
//! A request past a bound is not invalid (RFC 9132 and RFC 9066 set no
//! such bounds): it asks for more than the operator lets a peer decide
//! alone. It is refused with 4.22 (Unprocessable Entity, as the other
//! "valid but more than this agent enforces" answers) or held for the
//! operator's consent (RFC 9066 §5.3.1 lets consent be required), as
//! [`OverLimit`] says. Either way the diagnostic names the bound by its
//! configuration key.
//!
//! Exemption (RFC 9066 §5.3.1): traffic the operator or the agent itself
//! judges legitimate (`never-block`, the peers' own addresses) is never
//! dropped. A request all of whose traffic is exempt would be answered
//! "mitigated" while nothing is dropped: it gets 4.09 with conflict-cause
//! 4 instead. A request only part of whose traffic is exempt is enforced
//! for the rest, and the exempt part is reported (see [`Exemption`]).

use ipnet::IpNet;

use super::prefixes::{inside, PrefixSet};
use super::{
    ConflictCause, ConflictInformation, ConflictScope, ConflictStatus, Scope, ValidatedRequest,
    INDEFINITE_LIFETIME,
};

/// What happens to a request past one of the [`Policy`] bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// 4.22 with a diagnostic naming the bound.
    #[default]
    Refuse,
    /// 2.01 with status 1; the request waits for the operator, as with
    /// consent required, whatever the consent mode.
    Consent,
}

/// Bounds on what one request may block. IPv4 is counted in addresses,
/// IPv6 in /64 networks (an IPv6 LAN's unit: a device may use any address
/// of its /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Most IPv4 addresses the `source-prefix` list may cover together.
    pub max_sources_v4: u64,
    /// Most IPv6 /64 networks the `source-prefix` list may touch.
    pub max_sources_v6: u64,
    /// Most IPv4 addresses the `target-prefix` list may cover together.
    pub max_targets_v4: u64,
    /// Most IPv6 /64 networks the `target-prefix` list may touch.
    pub max_targets_v6: u64,
    /// Whether a lifetime past [`super::Limits::max_lifetime`] (or an
    /// indefinite one) is granted shortened to it, as RFC 9132 §4.4.1 lets
    /// a server do (`true`), or is a bound like the others (`false`).
    pub shorten_lifetime: bool,
    pub over_limit: OverLimit,
}

impl Default for Policy {
    /// A home or small-office router's view: a request may block up to a
    /// /24 of IPv4 sources or 256 IPv6 /64s (a /56), towards up to a /16
    /// of IPv4 targets or 65,536 IPv6 /64s (a /48).
    fn default() -> Self {
        Self {
            max_sources_v4: 256,
            max_sources_v6: 256,
            max_targets_v4: 65_536,
            max_targets_v6: 65_536,
            shorten_lifetime: true,
            over_limit: OverLimit::Refuse,
        }
    }
}

/// A bound a request goes past, described for the diagnostic and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The configuration key of the bound, e.g. `max-sources-v4`.
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (local policy {})", self.message, self.key)
    }
}

impl Policy {
    /// The first bound `req` goes past. `requested_lifetime` is the one in
    /// the request (the granted one may already be shortened);
    /// `max_lifetime` is [`super::Limits::max_lifetime`].
    pub fn exceeded(
        &self,
        req: &ValidatedRequest,
        requested_lifetime: i64,
        max_lifetime: Option<u32>,
    ) -> Option<Bound> {
        let sources = PrefixSet::new(&req.scope.source_prefix);
        let targets = PrefixSet::new(&req.scope.target_prefix);
        let counts = [
            (
                "max-sources-v4",
                "source-prefix covers",
                sources.v4_addresses(),
                self.max_sources_v4,
                "IPv4 addresses",
            ),
            (
                "max-sources-v6",
                "source-prefix touches",
                sources.v6_networks(),
                self.max_sources_v6,
                "IPv6 /64 networks",
            ),
            (
                "max-targets-v4",
                "target-prefix covers",
                targets.v4_addresses(),
                self.max_targets_v4,
                "IPv4 addresses",
            ),
            (
                "max-targets-v6",
                "target-prefix touches",
                targets.v6_networks(),
                self.max_targets_v6,
                "IPv6 /64 networks",
            ),
        ];
        if let Some((key, what, n, max, unit)) = counts
            .into_iter()
            .find(|(_, _, n, max, _)| *n > u128::from(*max))
        {
            return Some(Bound {
                key,
                message: format!("{what} {n} {unit}, more than the {max} this agent allows"),
            });
        }
        let max = max_lifetime.map(i64::from)?;
        let longer = requested_lifetime == INDEFINITE_LIFETIME || requested_lifetime > max;
        (!self.shorten_lifetime && longer).then(|| Bound {
            key: "max-lifetime",
            message: match requested_lifetime {
                INDEFINITE_LIFETIME => {
                    format!(
                        "an indefinite lifetime is asked, more than the {max} s this agent grants"
                    )
                }
                n => {
                    format!("a lifetime of {n} s is asked, more than the {max} s this agent grants")
                }
            },
        })
    }
}

/// The part of a scope's traffic that enforcement leaves alone because
/// its source or its target is exempt (the data plane never drops a
/// packet from or to an exempt address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exemption {
    /// The scope's sources, or parts of them, inside an exempt prefix.
    pub sources: Vec<IpNet>,
    /// The scope's targets, or parts of them, inside an exempt prefix.
    pub targets: Vec<IpNet>,
    /// Whether no traffic of the scope is left to drop.
    pub complete: bool,
}

impl Exemption {
    /// How `scope` meets the `exempt` prefixes; `None` when not at all.
    pub fn of(scope: &Scope, exempt: &[IpNet]) -> Option<Self> {
        let sources = inside(&scope.source_prefix, exempt);
        let targets = inside(&scope.target_prefix, exempt);
        if sources.is_empty() && targets.is_empty() {
            return None;
        }
        let exempt_set = PrefixSet::new(exempt);
        // Traffic of one family needs a source and a target of it; all of
        // it is exempt when every source, or every target, of that family
        // is.
        let family_exempt = |v4: bool| {
            let of = |list: &[IpNet]| -> Vec<IpNet> {
                list.iter()
                    .filter(|p| matches!(p, IpNet::V4(_)) == v4)
                    .copied()
                    .collect()
            };
            let (s, t) = (of(&scope.source_prefix), of(&scope.target_prefix));
            s.is_empty()
                || t.is_empty()
                || s.iter().all(|p| exempt_set.covers(p))
                || t.iter().all(|p| exempt_set.covers(p))
        };
        Some(Self {
            sources,
            targets,
            complete: family_exempt(true) && family_exempt(false),
        })
    }
}

impl Exemption {
    /// How a partly exempt mitigation reports the exempt part in its
    /// answers and status: conflict-status 2 (request-active: the rest is
    /// enforced), conflict-cause 4 (request-rejected-legitimate-traffic,
    /// RFC 9066 §5.3.1), and the exempt prefixes in conflict-scope.
    pub fn conflict_information(&self) -> ConflictInformation {
        ConflictInformation {
            conflict_status: Some(ConflictStatus::Active),
            conflict_cause: Some(ConflictCause::RejectedLegitimateTraffic),
            retry_timer: None,
            conflict_scope: Some(ConflictScope {
                target_prefix: self.targets.clone(),
                source_prefix: self.sources.clone(),
                ..ConflictScope::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn request(sources: &[&str], targets: &[&str], lifetime: i64) -> ValidatedRequest {
        ValidatedRequest {
            cdid: None,
            cuid: "c".into(),
            mid: 1,
            scope: Scope {
                source_prefix: sources.iter().map(|s| net(s)).collect(),
                target_prefix: targets.iter().map(|s| net(s)).collect(),
                lifetime: Some(lifetime),
                ..Scope::default()
            },
            lifetime,
        }
    }

    #[test]
    fn address_bounds_name_their_key() {
        let p = Policy::default();
        let ok = request(&["192.0.2.0/24"], &["203.0.113.0/24"], 60);
        assert_eq!(p.exceeded(&ok, 60, Some(86_400)), None);
        let wide = request(&["192.0.0.0/23"], &["203.0.113.0/24"], 60);
        let b = p.exceeded(&wide, 60, Some(86_400)).expect("past");
        assert_eq!(b.key, "max-sources-v4");
        assert_eq!(
            b.to_string(),
            "source-prefix covers 512 IPv4 addresses, more than the 256 this agent allows (local policy max-sources-v4)"
        );
        let v6 = request(&["2001:db8:1::/48"], &["2001:db8:2::1/128"], 60);
        assert_eq!(
            p.exceeded(&v6, 60, None).map(|b| b.key),
            Some("max-sources-v6")
        );
        let everything = request(&["192.0.2.1/32"], &["0.0.0.0/1"], 60);
        assert_eq!(
            p.exceeded(&everything, 60, None).map(|b| b.key),
            Some("max-targets-v4")
        );
        let v6_targets = request(&["2001:db8:1::1/128"], &["2001:db8::/32"], 60);
        assert_eq!(
            p.exceeded(&v6_targets, 60, None).map(|b| b.key),
            Some("max-targets-v6")
        );
        // Several prefixes add up; overlaps count once.
        let parts = request(
            &["192.0.2.0/25", "192.0.2.128/25", "192.0.2.7/32"],
            &["203.0.113.0/24"],
            60,
        );
        assert_eq!(p.exceeded(&parts, 60, None), None);
    }

    #[test]
    fn lifetime_is_a_bound_only_when_not_shortened() {
        let req = request(&["192.0.2.1/32"], &["203.0.113.0/24"], 86_400);
        let shorten = Policy::default();
        assert_eq!(shorten.exceeded(&req, -1, Some(86_400)), None);
        let strict = Policy {
            shorten_lifetime: false,
            ..Policy::default()
        };
        assert_eq!(strict.exceeded(&req, 86_400, Some(86_400)), None);
        let b = strict.exceeded(&req, 86_401, Some(86_400)).expect("past");
        assert_eq!(b.key, "max-lifetime");
        assert!(strict.exceeded(&req, -1, Some(86_400)).is_some());
        assert_eq!(strict.exceeded(&req, -1, None), None, "no cap");
    }

    #[test]
    fn exemption_complete_or_partial() {
        let scope = |s: &[&str], t: &[&str]| Scope {
            source_prefix: s.iter().map(|x| net(x)).collect(),
            target_prefix: t.iter().map(|x| net(x)).collect(),
            ..Scope::default()
        };
        let exempt = [net("192.0.2.0/28"), net("198.51.100.53/32")];
        assert_eq!(
            Exemption::of(&scope(&["192.0.2.100/32"], &["203.0.113.0/24"]), &exempt),
            None
        );
        // All sources exempt.
        let all =
            Exemption::of(&scope(&["192.0.2.1/32"], &["203.0.113.0/24"]), &exempt).expect("meets");
        assert!(all.complete);
        assert_eq!(all.sources, [net("192.0.2.1/32")]);
        // The only target is exempt (a peer's own address, say).
        let t = Exemption::of(&scope(&["192.0.2.100/32"], &["198.51.100.53/32"]), &exempt)
            .expect("meets");
        assert!(t.complete);
        // Part of the sources.
        let part =
            Exemption::of(&scope(&["192.0.2.0/24"], &["203.0.113.0/24"]), &exempt).expect("meets");
        assert!(!part.complete);
        assert_eq!(part.sources, [net("192.0.2.0/28")]);
        // Covered only by two exempt prefixes together.
        let halves = [net("192.0.2.0/25"), net("192.0.2.128/25")];
        let union =
            Exemption::of(&scope(&["192.0.2.0/24"], &["203.0.113.0/24"]), &halves).expect("meets");
        assert!(union.complete);
        // One family exempt, the other not: traffic is left to drop.
        let mixed = Exemption::of(
            &scope(
                &["192.0.2.1/32", "2001:db8::1/128"],
                &["203.0.113.0/24", "2001:db8:5::/48"],
            ),
            &exempt,
        )
        .expect("meets");
        assert!(!mixed.complete);
    }
}
