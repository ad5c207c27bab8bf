//! One mitigation slot as the data plane sees it, and its structural checks.

use std::{fmt, net::IpAddr};

use dots_common::MAX_SLOTS;
use ipnet::IpNet;

use super::EnforceError;

/// Index of a slot in the classifier, `0..MAX_SLOTS`.
pub type SlotId = u16;

/// An inclusive range of ports or ICMP types.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Range<T> {
    pub lower: T,
    pub upper: T,
}

impl<T: Copy + PartialOrd> Range<T> {
    pub fn new(lower: T, upper: T) -> Self {
        Range { lower, upper }
    }

    pub fn single(value: T) -> Self {
        Range {
            lower: value,
            upper: value,
        }
    }

    pub fn contains(&self, value: T) -> bool {
        self.lower <= value && value <= self.upper
    }
}

impl<T: fmt::Display + PartialEq> fmt::Display for Range<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lower == self.upper {
            write!(f, "{}", self.lower)
        } else {
            write!(f, "{}-{}", self.lower, self.upper)
        }
    }
}

/// What a slot does with the packets it matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotAction {
    /// Drop every matching packet.
    #[default]
    Drop,
    /// Drop nothing; count what would have been dropped (monitor mode).
    Monitor,
    /// Drop what exceeds these rates, pass the rest. 0 leaves that kind of
    /// rate unlimited; at least one is set.
    RateLimit {
        /// Packets per second.
        pps: u64,
        /// Bits per second.
        bps: u64,
    },
}

impl fmt::Display for SlotAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotAction::Drop => f.write_str("drop"),
            SlotAction::Monitor => f.write_str("monitor"),
            SlotAction::RateLimit { pps, bps } => {
                f.write_str("rate-limit")?;
                if *pps > 0 {
                    write!(f, " {pps} pps")?;
                }
                if *bps > 0 {
                    write!(f, " {bps} bps")?;
                }
                Ok(())
            }
        }
    }
}

/// A validated mitigation scope: what one slot drops.
///
/// A packet matches when it matches on every field the slot constrains:
/// an empty list means "any value". Source ports only match port-carrying
/// packets (TCP, UDP, SCTP, DCCP) and ICMP types only ICMP/ICMPv6 packets;
/// a slot with both matches either kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotSpec {
    pub sources: Vec<IpNet>,
    pub source_ports: Vec<Range<u16>>,
    pub icmp_types: Vec<Range<u8>>,
    pub targets: Vec<IpNet>,
    pub protocols: Vec<u8>,
    pub target_ports: Vec<Range<u16>>,
    /// What to do with the packets matched (drop unless said otherwise).
    #[serde(default)]
    pub action: SlotAction,
}

/// A slot as the classifier holds it: what it matches, and when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Shared, not copied: the agent's slot table and the data plane's
    /// model both hold the slot, and a spec may name thousands of prefixes.
    pub spec: std::sync::Arc<SlotSpec>,
    /// `CLOCK_BOOTTIME` nanoseconds ([`super::clock`]) from which the XDP
    /// program itself ignores the slot, whether or not user space is still
    /// there to remove it.
    pub expires_ns: u64,
}

impl Slot {
    pub fn new(spec: impl Into<std::sync::Arc<SlotSpec>>, expires_ns: u64) -> Slot {
        Slot {
            spec: spec.into(),
            expires_ns,
        }
    }

    /// A slot that never expires on its own: for tests and benchmarks of the
    /// data plane alone. The agent always gives its slots an expiry.
    pub fn without_expiry(spec: SlotSpec) -> Slot {
        Slot::new(spec, u64::MAX)
    }
}

/// Per-slot limits, so one request cannot fill the maps on its own.
#[derive(Clone, Copy, Debug)]
pub struct SlotLimits {
    pub max_sources: usize,
    pub max_targets: usize,
    pub max_ranges: usize,
}

impl Default for SlotLimits {
    fn default() -> Self {
        SlotLimits {
            max_sources: dots_common::MAX_SOURCE_PREFIXES as usize,
            max_targets: 1024,
            max_ranges: 256,
        }
    }
}

impl SlotSpec {
    /// Structural checks the classifier relies on. Protocol rules (domain,
    /// multicast sources, ...) belong to the signal layer, not here.
    pub fn check(&self, slot: SlotId, limits: &SlotLimits) -> Result<(), EnforceError> {
        let bad = |reason: String| EnforceError::InvalidSlot { slot, reason };
        if usize::from(slot) >= MAX_SLOTS {
            return Err(bad(format!("slot index must be below {MAX_SLOTS}")));
        }
        if self.sources.is_empty() {
            return Err(bad("no source prefix".into()));
        }
        if self.targets.is_empty() {
            return Err(bad("no target prefix".into()));
        }
        if self.sources.len() > limits.max_sources {
            return Err(bad(format!(
                "{} source prefixes, limit is {}",
                self.sources.len(),
                limits.max_sources
            )));
        }
        if self.targets.len() > limits.max_targets {
            return Err(bad(format!(
                "{} target prefixes, limit is {}",
                self.targets.len(),
                limits.max_targets
            )));
        }
        let ranges = self.source_ports.len() + self.icmp_types.len() + self.target_ports.len();
        if ranges > limits.max_ranges {
            return Err(bad(format!(
                "{ranges} port/ICMP ranges, limit is {}",
                limits.max_ranges
            )));
        }
        for p in self.sources.iter().chain(&self.targets) {
            if p.addr() != p.network() {
                return Err(bad(format!("prefix {p} has host bits set")));
            }
        }
        if let Some(r) = self.source_ports.iter().find(|r| r.lower > r.upper) {
            return Err(bad(format!(
                "source port range {}-{} is reversed",
                r.lower, r.upper
            )));
        }
        if let Some(r) = self.target_ports.iter().find(|r| r.lower > r.upper) {
            return Err(bad(format!(
                "target port range {}-{} is reversed",
                r.lower, r.upper
            )));
        }
        if let Some(r) = self.icmp_types.iter().find(|r| r.lower > r.upper) {
            return Err(bad(format!(
                "ICMP type range {}-{} is reversed",
                r.lower, r.upper
            )));
        }
        if let SlotAction::RateLimit { pps: 0, bps: 0 } = self.action {
            return Err(bad("a rate limit needs packets or bits per second".into()));
        }
        let family = |p: &IpNet| matches!(p.addr(), IpAddr::V4(_));
        let meets = self
            .sources
            .iter()
            .any(|s| self.targets.iter().any(|t| family(s) == family(t)));
        if !meets {
            return Err(bad(
                "source and target prefixes have no address family in common".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SlotSpec {
        SlotSpec {
            sources: vec!["192.0.2.0/24".parse().unwrap()],
            targets: vec!["198.51.100.7/32".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn accepts_minimal_scope() {
        spec().check(0, &SlotLimits::default()).unwrap();
    }

    #[test]
    fn rejects_with_reason() {
        let limits = SlotLimits::default();
        let cases: Vec<(SlotId, SlotSpec, &str)> = vec![
            (256, spec(), "below 256"),
            (
                1,
                SlotSpec {
                    sources: vec![],
                    ..spec()
                },
                "no source",
            ),
            (
                1,
                SlotSpec {
                    targets: vec![],
                    ..spec()
                },
                "no target",
            ),
            (
                1,
                SlotSpec {
                    sources: vec!["192.0.2.1/24".parse().unwrap()],
                    ..spec()
                },
                "host bits",
            ),
            (
                1,
                SlotSpec {
                    source_ports: vec![Range::new(9, 8)],
                    ..spec()
                },
                "source port range 9-8",
            ),
            (
                1,
                SlotSpec {
                    icmp_types: vec![Range::new(9, 8)],
                    ..spec()
                },
                "ICMP type",
            ),
            (
                1,
                SlotSpec {
                    targets: vec!["2001:db8::/32".parse().unwrap()],
                    ..spec()
                },
                "address family",
            ),
        ];
        for (slot, s, want) in cases {
            let err = s.check(slot, &limits).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn limits_apply() {
        let limits = SlotLimits {
            max_sources: 1,
            max_targets: 1,
            max_ranges: 1,
        };
        let mut s = spec();
        s.sources.push("192.0.3.0/24".parse().unwrap());
        assert!(s
            .check(0, &limits)
            .unwrap_err()
            .to_string()
            .contains("limit is 1"));
        let mut s = spec();
        s.source_ports = vec![Range::single(1), Range::single(2)];
        assert!(s
            .check(0, &limits)
            .unwrap_err()
            .to_string()
            .contains("ranges"));
    }
}
