//! Mitigation identifiers (mids): unique and increasing per agent identity
//! across reconnects and restarts (RFC 9132 §4.4.1: a new request carries a
//! mid larger than any the client used before, and a mid is never reused,
//! or the agent would take it for an update of an old mitigation).
//!
//! One counter serves every agent: each agent's mids are a subsequence of
//! it, so they increase per agent too, and the state is one number however
//! many agents there are (with 10,000 agents a counter per agent would
//! rewrite a 10,000-entry file whenever an agent gets its first mitigation).
//! `<state-dir>/mids.json` holds a high-water mark: every mid below it may
//! have been handed out. Mids are reserved in blocks, the mark written to
//! disk before any mid of the block is used, so a crash skips at most a
//! block and never goes back.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError};

/// Mids reserved per write of the file.
const BLOCK: u32 = 1024;

/// Why no mid could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum MidError {
    #[error("every mid (u32) has been used: agent {0} cannot take new mitigations from this client identity")]
    Exhausted(String),
    #[error("saving the mid counter: {0}")]
    Store(#[from] StoreError),
}

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MidFile {
    reserved: u32,
}

/// Hands out mids.
pub struct MidAllocator {
    next: u32,
    /// The persisted high-water mark.
    reserved: u32,
    path: Option<PathBuf>,
}

/// Where a client without a counter starts: from the clock, so that a
/// client that lost its state directory still does not go back below the
/// mids it used before (the clock moves forward faster than mitigations
/// are requested, one a second). Half the u32 range leaves room for two
/// billion more. A cluster's per-agent counters start the same way.
pub(crate) fn clock_start() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    (secs % u64::from(u32::MAX / 2)).max(1) as u32
}

impl MidAllocator {
    /// Loads `<state_dir>/mids.json` (none: the counter lives in memory).
    pub fn load(state_dir: Option<PathBuf>) -> Result<MidAllocator, StoreError> {
        let path = state_dir.map(|d| d.join("mids.json"));
        let reserved = match &path {
            Some(p) => store::read::<MidFile>(p)?.map(|f| f.reserved),
            None => None,
        };
        let next = reserved.unwrap_or_else(clock_start);
        Ok(MidAllocator {
            next,
            reserved: next,
            path,
        })
    }

    /// The next mid, for a request to `agent`.
    pub fn allocate(&mut self, agent: &str) -> Result<u32, MidError> {
        let exhausted = || MidError::Exhausted(agent.to_string());
        if self.next >= self.reserved {
            let mark = self.next.checked_add(BLOCK).ok_or_else(exhausted)?;
            if let Some(p) = &self.path {
                store::write(p, &MidFile { reserved: mark })?;
            }
            self.reserved = mark;
        }
        let mid = self.next;
        self.next = mid.checked_add(1).ok_or_else(exhausted)?;
        Ok(mid)
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
        let other = a.allocate("cpe2").unwrap();
        let m2 = a.allocate("cpe1").unwrap();
        assert!(m1 < other && other < m2);
        // A restart: never below or equal to what was handed out.
        let mut b = MidAllocator::load(Some(dir.clone())).unwrap();
        let m3 = b.allocate("cpe1").unwrap();
        assert!(m3 > m2, "{m3} after {m2}");
        // More than a block, each larger than the last.
        let mut last = m3;
        for _ in 0..(2 * BLOCK + 5) {
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
        a.next = u32::MAX - 1;
        a.reserved = u32::MAX;
        assert_eq!(a.allocate("x").unwrap(), u32::MAX - 1);
        let e = a.allocate("x").unwrap_err();
        assert!(matches!(e, MidError::Exhausted(_)), "{e}");
        assert_eq!(a.next, u32::MAX, "nothing changed");
    }
}
