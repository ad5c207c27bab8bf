//! Mitigation identifiers (mids) per agent identity: unique and increasing
//! across reconnects and restarts (RFC 9132 §4.4.1: a new request carries a
//! mid larger than any the client used before, and a mid is never reused,
//! or the agent would take it for an update of an old mitigation).
//!
//! `<state-dir>/mids.json` holds, per agent, a high-water mark: every mid
//! below it may have been handed out. Mids are reserved in blocks, the
//! mark written to disk before any mid of the block is used, so a crash
//! skips at most a block and never goes back.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::store::{self, StoreError};

/// Mids reserved per write of the file.
const BLOCK: u32 = 32;

/// Why no mid could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum MidError {
    #[error("agent {0} has used every mid (u32): it cannot take new mitigations from this client identity")]
    Exhausted(String),
    #[error("saving the mid counter: {0}")]
    Store(#[from] StoreError),
}

/// Hands out mids per agent identity.
pub struct MidAllocator {
    /// Next mid to hand out, per agent.
    next: BTreeMap<String, u32>,
    /// Persisted high-water marks.
    reserved: BTreeMap<String, u32>,
    path: Option<PathBuf>,
}

/// Where an agent that has no counter yet starts: from the clock, so that a
/// client that lost its state directory still does not go back below the
/// mids it used before (the clock moves forward by more than one request a
/// second). Half the u32 range leaves room for 2 billion more.
fn clock_start() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    (secs % u64::from(u32::MAX / 2)).max(1) as u32
}

impl MidAllocator {
    /// Loads `<state_dir>/mids.json` (none: counters live in memory).
    pub fn load(state_dir: Option<PathBuf>) -> Result<MidAllocator, StoreError> {
        let path = state_dir.map(|d| d.join("mids.json"));
        let reserved: BTreeMap<String, u32> = match &path {
            Some(p) => store::read(p)?.unwrap_or_default(),
            None => BTreeMap::new(),
        };
        Ok(MidAllocator {
            next: reserved.clone(),
            reserved,
            path,
        })
    }

    /// The next mid for `agent`.
    pub fn allocate(&mut self, agent: &str) -> Result<u32, MidError> {
        let next = match self.next.get(agent) {
            Some(n) => *n,
            None => clock_start(),
        };
        let reserved = self.reserved.get(agent).copied().unwrap_or(0);
        if next >= reserved {
            let mark = next
                .checked_add(BLOCK)
                .ok_or_else(|| MidError::Exhausted(agent.to_string()))?;
            let mut all = self.reserved.clone();
            all.insert(agent.to_string(), mark);
            if let Some(p) = &self.path {
                store::write(p, &all)?;
            }
            self.reserved = all;
        }
        let after = next
            .checked_add(1)
            .ok_or_else(|| MidError::Exhausted(agent.to_string()))?;
        self.next.insert(agent.to_string(), after);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increasing_per_agent_and_across_restarts() {
        let dir = std::env::temp_dir().join(format!("dots-client-mids-{}", std::process::id()));
        let mut a = MidAllocator::load(Some(dir.clone())).unwrap();
        let m1 = a.allocate("cpe1").unwrap();
        let m2 = a.allocate("cpe1").unwrap();
        let other = a.allocate("cpe2").unwrap();
        assert_eq!(m2, m1 + 1);
        assert!(other >= 1);
        // A restart: never below or equal to what was handed out.
        let mut b = MidAllocator::load(Some(dir.clone())).unwrap();
        let m3 = b.allocate("cpe1").unwrap();
        assert!(m3 > m2, "{m3} after {m2}");
        // Many more than a block, each larger than the last.
        let mut last = m3;
        for _ in 0..(3 * BLOCK) {
            let m = b.allocate("cpe1").unwrap();
            assert!(m > last);
            last = m;
        }
        let mut c = MidAllocator::load(Some(dir.clone())).unwrap();
        assert!(c.allocate("cpe1").unwrap() > last);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        let mut a = MidAllocator::load(None).unwrap();
        a.next.insert("x".into(), u32::MAX - 1);
        a.reserved.insert("x".into(), u32::MAX);
        assert_eq!(a.allocate("x").unwrap(), u32::MAX - 1);
        assert!(matches!(a.allocate("x"), Err(MidError::Exhausted(_))));
    }
}
