//! RFC 2782 target selection, sans IO: lowest priority first; within a
//! priority, weighted random order (weight 0 entries first in the running
//! sum, so they are picked rarely but can be). The RNG is injectable so that
//! tests are deterministic.

/// One SRV answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvEntry<T> {
    pub priority: u16,
    pub weight: u16,
    pub item: T,
}

/// A small deterministic RNG (xorshift64*), enough for load spreading.
#[derive(Clone, Debug)]
pub struct SrvRng(u64);

impl SrvRng {
    pub fn seeded(seed: u64) -> Self {
        SrvRng(seed.max(1))
    }

    /// Seeded from the clock and process id.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self::seeded(t ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..=max`.
    pub fn up_to(&mut self, max: u32) -> u32 {
        (self.next_u64() % (u64::from(max) + 1)) as u32
    }
}

/// Orders SRV entries per RFC 2782.
pub fn order<T>(mut entries: Vec<SrvEntry<T>>, rng: &mut SrvRng) -> Vec<T> {
    entries.sort_by_key(|e| e.priority);
    let mut out = Vec::with_capacity(entries.len());
    while !entries.is_empty() {
        let prio = entries[0].priority;
        let n = entries.iter().take_while(|e| e.priority == prio).count();
        let mut group: Vec<SrvEntry<T>> = entries.drain(..n).collect();
        // "arrange all SRV RRs (that have not been ordered yet) in any
        // order, except that all those with weight 0 are placed at the
        // beginning of the list."
        group.sort_by_key(|e| e.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|e| u32::from(e.weight)).sum();
            let pick = rng.up_to(total);
            let mut sum = 0u32;
            let idx = group
                .iter()
                .position(|e| {
                    sum += u32::from(e.weight);
                    sum >= pick
                })
                .unwrap_or(0);
            out.push(group.remove(idx).item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(priority: u16, weight: u16, item: &'static str) -> SrvEntry<&'static str> {
        SrvEntry {
            priority,
            weight,
            item,
        }
    }

    #[test]
    fn priority_first() {
        let mut rng = SrvRng::seeded(7);
        let got = order(vec![e(20, 0, "c"), e(10, 5, "a"), e(30, 1, "d")], &mut rng);
        assert_eq!(got, vec!["a", "c", "d"]);
    }

    #[test]
    fn weights_spread_and_seed_is_deterministic() {
        let entries = || vec![e(0, 90, "heavy"), e(0, 10, "light"), e(0, 0, "zero")];
        let a = order(entries(), &mut SrvRng::seeded(42));
        let b = order(entries(), &mut SrvRng::seeded(42));
        assert_eq!(a, b);
        let mut rng = SrvRng::seeded(1);
        let mut first = std::collections::HashMap::new();
        for _ in 0..10_000 {
            *first.entry(order(entries(), &mut rng)[0]).or_insert(0u32) += 1;
        }
        let heavy = first["heavy"];
        let light = first["light"];
        assert!((8500..9500).contains(&heavy), "heavy first {heavy} times");
        assert!((700..1300).contains(&light), "light first {light} times");
        // weight 0 is picked first only when the draw is 0: about 1/101.
        assert!(first.get("zero").copied().unwrap_or(0) < 300);
    }
}
