//! What the signal servers of one agent share (one server per upstream
//! peer): the count of mitigations held against the data plane's slots,
//! and the addresses enforcement never drops. Both are handles: clones see
//! the same state, so a [`super::ServerConfig`] cloned for each peer shares
//! them. They hold no I/O and no clock, only a lock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;

/// The agent-wide limit on mitigations held at once, all peers together:
/// every mitigation may need a data-plane slot, so the limit is at most
/// the number of slots.
#[derive(Debug, Clone)]
pub struct MitigationBudget {
    inner: Arc<Mutex<Ledger>>,
}

#[derive(Debug, Default)]
struct Ledger {
    limit: Option<usize>,
    next_id: u64,
    held: BTreeMap<u64, usize>,
}

/// One server's account in a [`MitigationBudget`]; dropping it returns
/// what it held.
#[derive(Debug)]
pub(crate) struct BudgetAccount {
    budget: MitigationBudget,
    id: u64,
}

/// Why [`BudgetAccount::reserve`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub(crate) held: usize,
    pub(crate) limit: usize,
}

impl MitigationBudget {
    /// At most `limit` mitigations in all; `None`: no agent-wide limit.
    pub fn new(limit: Option<usize>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Ledger {
                limit,
                ..Ledger::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // A panic elsewhere cannot leave the counts half-written: each
        // change is one insert.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn limit(&self) -> Option<usize> {
        self.lock().limit
    }

    /// Changes the limit (a configuration reload). What is held stays held;
    /// only new mitigations see the new limit.
    pub fn set_limit(&self, limit: Option<usize>) {
        self.lock().limit = limit;
    }

    /// Mitigations held by all servers.
    pub fn held(&self) -> usize {
        self.lock().held.values().sum()
    }

    pub(crate) fn account(&self) -> BudgetAccount {
        let mut l = self.lock();
        let id = l.next_id;
        l.next_id += 1;
        l.held.insert(id, 0);
        BudgetAccount {
            budget: self.clone(),
            id,
        }
    }
}

impl Default for MitigationBudget {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Handles are equal when they share their state.
impl PartialEq for MitigationBudget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl BudgetAccount {
    /// Sets this server's count to `count` when the total stays within the
    /// limit (a count that does not grow always fits), atomically with the
    /// check, so two servers cannot both take the last place.
    pub(crate) fn reserve(&self, count: usize) -> Result<(), OverBudget> {
        let mut l = self.budget.lock();
        let others: usize = l
            .held
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, n)| n)
            .sum();
        let mine = l.held.get(&self.id).copied().unwrap_or(0);
        if let Some(limit) = l.limit {
            if count > mine && others + count > limit {
                return Err(OverBudget {
                    held: others + mine,
                    limit,
                });
            }
        }
        l.held.insert(self.id, count);
        Ok(())
    }

    /// Sets this server's count, limit or not (what it already holds).
    pub(crate) fn set(&self, count: usize) {
        self.budget.lock().held.insert(self.id, count);
    }
}

impl Drop for BudgetAccount {
    fn drop(&mut self) {
        self.budget.lock().held.remove(&self.id);
    }
}

/// The prefixes enforcement never drops, from or to: the operator's
/// `never-block` list and the addresses of the peers the agent dials
/// (added as they are resolved). The data plane keeps its own copy; this
/// one lets a request be judged against it (RFC 9066 §5.3.1).
#[derive(Debug, Clone, Default)]
pub struct ExemptSet {
    inner: Arc<Mutex<Exempt>>,
}

#[derive(Debug, Default)]
struct Exempt {
    /// The operator's `never-block`.
    configured: BTreeSet<IpNet>,
    /// The peers' addresses, as they are dialled.
    peers: BTreeSet<IpNet>,
}

impl ExemptSet {
    /// A set holding the operator's `never_block` prefixes.
    pub fn new(never_block: &[IpNet]) -> Self {
        let set = Self::default();
        set.set_configured(never_block);
        set
    }

    fn lock(&self) -> MutexGuard<'_, Exempt> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the operator's prefixes (a configuration reload); the
    /// peers' addresses stay.
    pub fn set_configured(&self, never_block: &[IpNet]) {
        self.lock().configured = never_block.iter().map(IpNet::trunc).collect();
    }

    /// Adds single addresses (a peer's), as host prefixes.
    pub fn add_addrs(&self, addrs: &[IpAddr]) {
        self.lock()
            .peers
            .extend(addrs.iter().map(|a| IpNet::from(*a)));
    }

    /// Every exempt prefix, sorted, without repeats.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let e = self.lock();
        let all: BTreeSet<IpNet> = e.configured.union(&e.peers).copied().collect();
        all.into_iter().collect()
    }
}

/// Handles are equal when they share their state.
impl PartialEq for ExemptSet {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_share_one_limit() {
        let budget = MitigationBudget::new(Some(3));
        let a = budget.account();
        let b = budget.account();
        assert_eq!(a.reserve(2), Ok(()));
        assert_eq!(b.reserve(1), Ok(()));
        assert_eq!(b.reserve(2), Err(OverBudget { held: 3, limit: 3 }));
        assert_eq!(budget.held(), 3);
        // Shrinking always fits, and frees room for the other.
        assert_eq!(a.reserve(1), Ok(()));
        assert_eq!(b.reserve(2), Ok(()));
        drop(b);
        assert_eq!(budget.held(), 1, "a dropped account returns its share");
        // A server restored above the limit may keep what it holds.
        a.set(5);
        assert_eq!(a.reserve(5), Ok(()));
        assert!(a.reserve(6).is_err());
        let unlimited = MitigationBudget::default();
        assert_eq!(unlimited.account().reserve(10_000), Ok(()));
        assert_eq!(budget.clone(), budget);
        assert_ne!(budget, MitigationBudget::new(Some(3)));
        // A reload lowers the limit: what is held stays, nothing new fits.
        budget.set_limit(Some(2));
        assert_eq!(budget.limit(), Some(2));
        assert!(a.reserve(6).is_err());
        assert_eq!(a.reserve(4), Ok(()));
    }

    #[test]
    fn exempt_set_is_shared() {
        let net = |s: &str| s.parse::<IpNet>().expect("prefix");
        let set = ExemptSet::new(&[net("192.0.2.1/24")]);
        let copy = set.clone();
        copy.add_addrs(&["198.51.100.53".parse().expect("addr")]);
        assert_eq!(
            set.prefixes(),
            [net("192.0.2.0/24"), net("198.51.100.53/32")]
        );
        // A reload replaces never-block; the peers' addresses stay.
        set.set_configured(&[net("203.0.113.0/24")]);
        assert_eq!(
            copy.prefixes(),
            [net("198.51.100.53/32"), net("203.0.113.0/24")]
        );
    }
}
