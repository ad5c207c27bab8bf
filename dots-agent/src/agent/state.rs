//! The state directory: the active mitigations and the slot table, written
//! atomically after every change, so a restarted agent restores them with
//! their remaining lifetime and re-adopts the same classifier slots (the
//! pinned maps then need no write: drops never stop). This desired state
//! is the truth the data plane is reconciled to.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use dots_proto::signal::MitigationRecord;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    enforcer::{SlotRecord, SlotTable},
    view::unix_now,
};

const FILE: &str = "state.json";
const VERSION: u32 = 1;

/// What the state file holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateFile {
    pub version: u32,
    /// Seconds since the Unix epoch when written: restore subtracts the time
    /// since from every remaining lifetime.
    pub written_at: u64,
    /// Peer index -> the peer it was (its configured HOST:PORT) and its
    /// mitigations.
    pub peers: BTreeMap<usize, PeerState>,
    pub slots: Vec<SlotRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerState {
    pub peer: String,
    pub mitigations: Vec<MitigationRecord>,
}

impl StateFile {
    /// Reads `<dir>/state.json`. A missing file is an empty state; an
    /// unreadable one is moved aside (and logged) so the agent still starts.
    pub fn load(dir: &Path) -> StateFile {
        let path = dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StateFile::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the state file; starting empty");
                return StateFile::default();
            }
        };
        match serde_json::from_str::<StateFile>(&text) {
            Ok(s) if s.version == VERSION => s,
            Ok(s) => {
                warn!(path = %path.display(), version = s.version, "unknown state file version; starting empty");
                StateFile::default()
            }
            Err(e) => {
                let aside = dir.join(format!("{FILE}.bad-{}", unix_now()));
                warn!(path = %path.display(), error = %e, moved_to = %aside.display(), "corrupt state file; starting empty");
                let _ = fs::rename(&path, &aside);
                StateFile::default()
            }
        }
    }

    /// The records of peer `index` if it is still `peer`, aged by the time
    /// the agent was down.
    pub fn take_peer(&mut self, index: usize, peer: &str) -> Vec<MitigationRecord> {
        let Some(p) = self.peers.remove(&index) else {
            return Vec::new();
        };
        if p.peer != peer {
            warn!(index, was = %p.peer, now = %peer, "peer changed since the state was written; its mitigations are not restored");
            return Vec::new();
        }
        let down = Duration::from_secs(unix_now().saturating_sub(self.written_at));
        p.mitigations
            .into_iter()
            .map(|mut r| {
                r.elapse(down);
                r
            })
            .collect()
    }
}

/// Keeps the state file up to date; shared by the peer tasks.
pub struct StateStore {
    dir: PathBuf,
    table: Option<Arc<Mutex<SlotTable>>>,
    peers: Mutex<BTreeMap<usize, PeerState>>,
}

impl StateStore {
    pub fn new(dir: &Path, table: Option<Arc<Mutex<SlotTable>>>) -> Result<StateStore> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            table,
            peers: Mutex::new(BTreeMap::new()),
        })
    }

    /// Records peer `index`'s mitigations and rewrites the file.
    pub fn update(&self, index: usize, peer: &str, mitigations: Vec<MitigationRecord>) {
        let state = {
            let Ok(mut peers) = self.peers.lock() else {
                return;
            };
            peers.insert(
                index,
                PeerState {
                    peer: peer.to_string(),
                    mitigations,
                },
            );
            StateFile {
                version: VERSION,
                written_at: unix_now(),
                peers: peers.clone(),
                slots: self
                    .table
                    .as_ref()
                    .and_then(|t| t.lock().ok().map(|t| t.export()))
                    .unwrap_or_default(),
            }
        };
        if let Err(e) = self.write(&state) {
            warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "could not write the state file");
        }
    }

    /// Write to a temporary file, sync, rename over the old one, sync the
    /// directory: a crash leaves the old file or the new one, never half.
    fn write(&self, state: &StateFile) -> Result<()> {
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let path = self.dir.join(FILE);
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Logs what a restore brought back.
pub fn log_restored(peer: &str, restored: usize, offered: usize) {
    if offered > 0 {
        info!(
            peer,
            restored,
            dropped = offered - restored,
            "mitigations restored from the state directory"
        );
    }
}
