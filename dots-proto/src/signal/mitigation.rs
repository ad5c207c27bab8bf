//! The server role's mitigations: one entry per (cuid, mid), its phase,
//! lifetime and the data-plane counters, plus the overlap rule.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::action::{Counters, MitigationKey};
use crate::model::{
    AttackStatus, Bound, Exemption, IcmpTypeRange, MitigationStatus, PortRange, Scope,
    ValidatedRequest, INDEFINITE_LIFETIME,
};

/// Where a mitigation stands. Only [`Phase::Active`] reports status 2:
/// that phase is entered on the data plane's `installed` result alone.
/// Serialized (in [`super::MitigationRecord`]) as `awaiting-consent`,
/// `installing`, `active`, `monitoring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for the operator (consent = require).
    AwaitingConsent,
    /// `Install` emitted, not confirmed yet.
    Installing,
    /// Enforced by the data plane.
    Active,
    /// Monitor mode: accepted and logged, never enforced.
    Monitoring,
}

/// One mitigation held by the server role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mitigation {
    pub request: ValidatedRequest,
    pub phase: Phase,
    /// Last values reported by the data plane, if any.
    pub counters: Option<Counters>,
    /// From the client's last efficacy update.
    pub attack_status: Option<AttackStatus>,
    /// `None` for an indefinite lifetime.
    pub expires: Option<Instant>,
    /// The part of the scope left alone because it is exempt from
    /// enforcement (never all of it: such requests are refused).
    pub exempt: Option<Exemption>,
    /// The local policy bound this request goes past, which made it wait
    /// for the operator's consent.
    pub over_limit: Option<Bound>,
    /// When enforcement began, in seconds since the Unix epoch
    /// (`mitigation-start`); `None` before, or without a wall clock.
    pub started: Option<u64>,
    /// When the entry entered its current phase (for consent, its age).
    pub(crate) since: Instant,
    pub(crate) last_notified: Instant,
    /// A periodic notification waits for the counters just queried.
    pub(crate) counters_due: bool,
}

impl Mitigation {
    pub(crate) fn new(now: Instant, request: ValidatedRequest, phase: Phase) -> Self {
        Self {
            expires: expiry(now, request.lifetime),
            request,
            phase,
            counters: None,
            attack_status: None,
            exempt: None,
            over_limit: None,
            started: None,
            since: now,
            last_notified: now,
            counters_due: false,
        }
    }

    /// When the entry entered its current phase.
    pub fn phase_since(&self) -> Instant {
        self.since
    }

    pub(crate) fn set_phase(&mut self, now: Instant, phase: Phase) {
        if self.phase != phase {
            self.phase = phase;
            self.since = now;
        }
    }

    pub fn status(&self) -> MitigationStatus {
        match self.phase {
            Phase::Active => MitigationStatus::SuccessfullyMitigated,
            _ => MitigationStatus::InProgress,
        }
    }

    /// Whether the data plane holds (or is about to hold) this entry.
    pub fn enforced(&self) -> bool {
        matches!(self.phase, Phase::Installing | Phase::Active)
    }

    /// Restarts the lifetime with a newly granted one.
    pub(crate) fn refresh(&mut self, now: Instant, request: ValidatedRequest) {
        self.expires = expiry(now, request.lifetime);
        self.request = request;
    }

    /// Remaining lifetime in whole seconds, or -1 for indefinite.
    pub fn remaining(&self, now: Instant) -> i64 {
        match self.expires {
            None => INDEFINITE_LIFETIME,
            Some(t) => {
                i64::try_from(t.saturating_duration_since(now).as_secs()).unwrap_or(i64::MAX)
            }
        }
    }

    /// The entry as it appears in a GET answer or a notification; a
    /// partly exempt one says which part in `conflict-information`.
    pub fn to_scope(&self, now: Instant) -> Scope {
        let scope = Scope {
            mid: Some(self.request.mid),
            lifetime: Some(self.remaining(now)),
            status: Some(self.status()),
            attack_status: self.attack_status,
            mitigation_start: self.started,
            // The trigger flag is a request-only attribute.
            trigger_mitigation: None,
            conflict_information: self.exempt.as_ref().map(Exemption::conflict_information),
            ..self.request.scope.clone()
        };
        with_counters(scope, self.counters)
    }
}

/// `scope` with the drop counters filled in (left out when never reported).
pub(crate) fn with_counters(scope: Scope, counters: Option<Counters>) -> Scope {
    match counters {
        None => scope,
        Some(c) => Scope {
            bytes_dropped: Some(c.bytes),
            bps_dropped: Some(c.bps),
            pkts_dropped: Some(c.pkts),
            pps_dropped: Some(c.pps),
            ..scope
        },
    }
}

fn expiry(now: Instant, lifetime: i64) -> Option<Instant> {
    u64::try_from(lifetime)
        .ok()
        .map(|secs| now + Duration::from_secs(secs))
}

fn prefixes_overlap(a: &[IpNet], b: &[IpNet]) -> bool {
    // Pairwise for small lists; for larger ones (a request carries up to a
    // few dozen prefixes, compared with every mitigation of the client) a
    // sweep over sorted address ranges, so admitting a request does not
    // cost lists x lists x mitigations.
    if a.len() * b.len() <= 64 {
        return a
            .iter()
            .any(|x| b.iter().any(|y| x.contains(y) || y.contains(x)));
    }
    let (ra, rb) = (ranges(a), ranges(b));
    let (mut i, mut j) = (0, 0);
    while i < ra.len() && j < rb.len() {
        let (x, y) = (ra[i], rb[j]);
        if x.1 < y.0 {
            i += 1;
        } else if y.1 < x.0 {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

/// The prefixes as (family, first, last) address ranges, sorted.
fn ranges(p: &[IpNet]) -> Vec<((u8, u128), (u8, u128))> {
    let mut out: Vec<((u8, u128), (u8, u128))> = p
        .iter()
        .map(|n| match n {
            IpNet::V4(n) => (
                (4, u128::from(u32::from(n.network()))),
                (4, u128::from(u32::from(n.broadcast()))),
            ),
            IpNet::V6(n) => ((6, u128::from(n.network())), (6, u128::from(n.broadcast()))),
        })
        .collect();
    out.sort_unstable();
    out
}

/// An empty list means "any", so it overlaps everything.
fn ports_overlap(a: &[PortRange], b: &[PortRange]) -> bool {
    let bounds = |r: &PortRange| (r.lower, r.upper.unwrap_or(r.lower));
    a.is_empty()
        || b.is_empty()
        || a.iter().any(|x| {
            let (xl, xu) = bounds(x);
            b.iter().any(|y| {
                let (yl, yu) = bounds(y);
                xl <= yu && yl <= xu
            })
        })
}

fn protocols_overlap(a: &[u8], b: &[u8]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|p| b.contains(p))
}

/// Whether two Call Home scopes can match the same packet: targets overlap
/// (RFC 9132's rule) *and* sources overlap. The source condition is ours:
/// on Call Home a client may block two different compromised devices
/// attacking one target, and those requests must not supersede each other.
/// ICMP type ranges are not compared (treated as overlapping).
pub fn overlaps(a: &Scope, b: &Scope) -> bool {
    prefixes_overlap(&a.target_prefix, &b.target_prefix)
        && ports_overlap(&a.target_port_range, &b.target_port_range)
        && protocols_overlap(&a.target_protocol, &b.target_protocol)
        && prefixes_overlap(&a.source_prefix, &b.source_prefix)
        && ports_overlap(&a.source_port_range, &b.source_port_range)
}

/// True when two requests differ only in their lifetime (a refresh).
pub(crate) fn same_scope(a: &Scope, b: &Scope) -> bool {
    Scope {
        lifetime: None,
        ..a.clone()
    } == Scope {
        lifetime: None,
        ..b.clone()
    }
}

/// Whether `update` repeats the request parameters of `stored`, as an
/// efficacy update must (RFC 9132 §4.4.3): lists compared as sets,
/// prefixes in canonical form, a single port or type `n` equal to `n-n`.
/// Lifetime, attack-status, the trigger flag and the status attributes
/// are not request parameters an update may not change.
pub(crate) fn same_request(stored: &Scope, update: &Scope) -> bool {
    fn set<T: Ord>(mut v: Vec<T>) -> Vec<T> {
        v.sort_unstable();
        v.dedup();
        v
    }
    let prefixes = |v: &[IpNet]| set(v.iter().map(IpNet::trunc).collect());
    let ports = |v: &[PortRange]| {
        set(v
            .iter()
            .map(|r| (r.lower, r.upper.unwrap_or(r.lower)))
            .collect())
    };
    let types = |v: &[IcmpTypeRange]| {
        set(v
            .iter()
            .map(|r| (r.lower, r.upper.unwrap_or(r.lower)))
            .collect())
    };
    let texts = |v: &[String]| set(v.to_vec());
    let (a, b) = (stored, update);
    prefixes(&a.target_prefix) == prefixes(&b.target_prefix)
        && prefixes(&a.source_prefix) == prefixes(&b.source_prefix)
        && ports(&a.target_port_range) == ports(&b.target_port_range)
        && ports(&a.source_port_range) == ports(&b.source_port_range)
        && types(&a.source_icmp_type_range) == types(&b.source_icmp_type_range)
        && set(a.target_protocol.clone()) == set(b.target_protocol.clone())
        && texts(&a.target_fqdn) == texts(&b.target_fqdn)
        && texts(&a.target_uri) == texts(&b.target_uri)
        && texts(&a.alias_name) == texts(&b.alias_name)
}

/// All mitigations, ordered by key so iteration is deterministic.
#[derive(Debug, Clone, Default)]
pub struct Mitigations {
    map: BTreeMap<MitigationKey, Mitigation>,
    revision: u64,
}

/// Equal when the entries are (the revision is bookkeeping).
impl PartialEq for Mitigations {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Eq for Mitigations {}

impl Mitigations {
    /// Grows whenever an entry may have changed (added, removed or
    /// touched), so a shell persisting [`super::SignalServer::snapshot`]
    /// can skip writes while it stays the same. It may grow without a
    /// visible change; it never stays the same across one.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, key: &MitigationKey) -> Option<&Mitigation> {
        self.map.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &MitigationKey) -> Option<&mut Mitigation> {
        self.revision += 1;
        self.map.get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: MitigationKey, m: Mitigation) {
        self.revision += 1;
        self.map.insert(key, m);
    }

    pub(crate) fn remove(&mut self, key: &MitigationKey) -> Option<Mitigation> {
        self.revision += 1;
        self.map.remove(key)
    }

    pub(crate) fn contains(&self, key: &MitigationKey) -> bool {
        self.map.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&MitigationKey, &Mitigation)> {
        self.map.iter()
    }

    pub fn of_cuid<'a>(
        &'a self,
        cuid: &'a str,
    ) -> impl Iterator<Item = (&'a MitigationKey, &'a Mitigation)> {
        self.map.iter().filter(move |(k, _)| k.cuid == cuid)
    }

    /// Other mitigations of the same cuid whose scope overlaps `req`'s.
    pub(crate) fn overlapping(&self, req: &ValidatedRequest) -> Vec<MitigationKey> {
        self.of_cuid(&req.cuid)
            .filter(|(k, m)| k.mid != req.mid && overlaps(&m.request.scope, &req.scope))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.map.values().filter_map(|m| m.expires).min()
    }

    pub(crate) fn expired(&self, now: Instant) -> Vec<MitigationKey> {
        self.map
            .iter()
            .filter(|(_, m)| m.expires.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(crate) fn keys_where(&self, pred: impl Fn(&Mitigation) -> bool) -> Vec<MitigationKey> {
        self.map
            .iter()
            .filter(|(_, m)| pred(m))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(target: &str, source: &str, ports: &[(u16, u16)]) -> Scope {
        Scope {
            target_prefix: vec![target.parse().expect("prefix")],
            source_prefix: vec![source.parse().expect("prefix")],
            source_port_range: ports
                .iter()
                .map(|(l, u)| PortRange {
                    lower: *l,
                    upper: Some(*u),
                })
                .collect(),
            ..Scope::default()
        }
    }

    #[test]
    fn overlap_needs_targets_and_sources() {
        let a = scope("203.0.113.0/24", "192.0.2.0/28", &[]);
        assert!(overlaps(&a, &scope("203.0.113.7/32", "192.0.2.1/32", &[])));
        assert!(!overlaps(
            &a,
            &scope("198.51.100.0/24", "192.0.2.1/32", &[])
        ));
        assert!(!overlaps(
            &a,
            &scope("203.0.113.7/32", "192.0.2.99/32", &[])
        ));
        let p = scope("203.0.113.0/24", "192.0.2.0/28", &[(1000, 2000)]);
        assert!(overlaps(&p, &a), "no ports = any port");
        assert!(overlaps(
            &p,
            &scope("203.0.113.0/24", "192.0.2.0/28", &[(2000, 3000)])
        ));
        assert!(!overlaps(
            &p,
            &scope("203.0.113.0/24", "192.0.2.0/28", &[(2001, 3000)])
        ));
    }

    #[test]
    fn efficacy_updates_must_repeat_the_request() {
        let stored = scope("203.0.113.0/24", "192.0.2.0/28", &[(1000, 1000)]);
        let same = Scope {
            target_prefix: vec!["203.0.113.9/24".parse().expect("prefix")],
            source_port_range: vec![PortRange {
                lower: 1000,
                upper: None,
            }],
            lifetime: Some(5),
            attack_status: Some(AttackStatus::UnderAttack),
            ..stored.clone()
        };
        assert!(same_request(&stored, &same));
        assert!(!same_request(
            &stored,
            &scope("203.0.113.0/25", "192.0.2.0/28", &[(1000, 1000)])
        ));
        assert!(!same_request(
            &stored,
            &scope("203.0.113.0/24", "192.0.2.0/28", &[])
        ));
        assert!(!same_request(
            &stored,
            &Scope {
                target_protocol: vec![6],
                ..stored.clone()
            }
        ));
    }

    #[test]
    fn long_prefix_lists_overlap_as_pairwise_checks_say() {
        let net = |s: &str| s.parse::<IpNet>().expect("prefix");
        let many: Vec<IpNet> = (0..40).map(|i| net(&format!("10.0.{i}.0/24"))).collect();
        let others: Vec<IpNet> = (0..40).map(|i| net(&format!("10.1.{i}.7/32"))).collect();
        let pairwise = |a: &[IpNet], b: &[IpNet]| {
            a.iter()
                .any(|x| b.iter().any(|y| x.contains(y) || y.contains(x)))
        };
        for (a, b) in [
            (many.clone(), others.clone()),
            (many.clone(), vec![net("10.0.39.200/32"); 90]),
            (others.clone(), vec![net("10.1.0.0/16"); 80]),
            (many.clone(), vec![net("2001:db8::/32"); 100]),
            (vec![net("0.0.0.0/0"); 10], others.clone()),
        ] {
            assert_eq!(prefixes_overlap(&a, &b), pairwise(&a, &b), "{a:?} {b:?}");
            assert_eq!(prefixes_overlap(&b, &a), pairwise(&a, &b));
        }
    }

    #[test]
    fn refresh_is_a_lifetime_only_change() {
        let a = scope("203.0.113.0/24", "192.0.2.0/28", &[]);
        let b = Scope {
            lifetime: Some(5),
            ..a.clone()
        };
        assert!(same_scope(&a, &b));
        assert!(!same_scope(
            &a,
            &scope("203.0.113.0/25", "192.0.2.0/28", &[])
        ));
    }
}
