//! The state directory: one file per mitigation, holding the signal layer's
//! record (scope, remaining lifetime, phase) and the mitigation's classifier
//! slot, so a restarted agent restores its mitigations with their remaining
//! lifetime and re-adopts the same slots (the pinned maps then need no
//! write: drops never stop). This desired state is the truth the data plane
//! is reconciled to.
//!
//! A change rewrites only the files of the mitigations it changed, and a
//! background thread writes them (atomically: temporary file, fsync,
//! rename), so neither the cost of a request nor its answer grows with the
//! number of mitigations held. A mitigation accepted in the last moments
//! before a crash may be missing from the directory; its slot, if any, is
//! then removed by the next start.
//!
//! Layout: `<state-dir>/mitigations/p<peer>-<cuid in hex>-<mid>.json`. The
//! single `state.json` of earlier versions is still read, and removed once
//! its mitigations have files of their own.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use dots_proto::{
    coap::Endpoint,
    signal::{MitigationRecord, Phase, SignalServer},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    enforcer::{SlotKey, SlotRecord, SlotTable},
    view::unix_now,
};

/// The single file of earlier versions.
const LEGACY_FILE: &str = "state.json";
const LEGACY_VERSION: u32 = 1;
const DIR: &str = "mitigations";
const VERSION: u32 = 2;

/// What the state directory holds, as the runtime starts from it.
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

/// One file of the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MitigationFile {
    version: u32,
    /// Seconds since the Unix epoch when written.
    written_at: u64,
    peer_index: usize,
    /// The configured peer (HOST:PORT) the mitigation came from.
    peer: String,
    mitigation: Option<MitigationRecord>,
    slot: Option<SlotRecord>,
}

impl StateFile {
    /// Reads the state directory (and a `state.json` of an earlier
    /// version). Missing means empty; an unreadable file is moved aside
    /// (and logged) so the agent still starts.
    pub fn load(dir: &Path) -> StateFile {
        // Every record is aged here by the time since its own file was
        // written; `take_peer` then ages by the moments since loading.
        let now = unix_now();
        let mut state = StateFile {
            version: VERSION,
            written_at: now,
            ..StateFile::default()
        };
        if let Some(legacy) = load_legacy(dir) {
            let down = Duration::from_secs(now.saturating_sub(legacy.written_at));
            for (index, mut p) in legacy.peers {
                for m in &mut p.mitigations {
                    m.elapse(down);
                }
                state.peers.insert(index, p);
            }
            state.slots = legacy.slots;
        }
        for mut file in read_files(&dir.join(DIR)) {
            let peer = state.peers.entry(file.peer_index).or_default();
            if peer.peer.is_empty() {
                peer.peer = file.peer.clone();
            }
            if peer.peer != file.peer {
                warn!(index = file.peer_index, file = %file.peer, other = %peer.peer, "mitigations of two peers under one index; keeping the first");
                continue;
            }
            if let Some(mut m) = file.mitigation.take() {
                m.elapse(Duration::from_secs(now.saturating_sub(file.written_at)));
                peer.mitigations.push(m);
            }
            state.slots.extend(file.slot);
        }
        state
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

/// The `state.json` of an earlier version, if there is one.
fn load_legacy(dir: &Path) -> Option<StateFile> {
    let path = dir.join(LEGACY_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the state file; ignoring it");
            return None;
        }
    };
    match serde_json::from_str::<StateFile>(&text) {
        Ok(s) if s.version == LEGACY_VERSION => Some(s),
        Ok(s) => {
            warn!(path = %path.display(), version = s.version, "unknown state file version; ignoring it");
            None
        }
        Err(e) => {
            set_aside(&path, &e.to_string());
            None
        }
    }
}

fn set_aside(path: &Path, why: &str) {
    let aside = path.with_extension(format!("bad-{}", unix_now()));
    warn!(path = %path.display(), error = %why, moved_to = %aside.display(), "corrupt state file; moved aside");
    let _ = fs::rename(path, &aside);
}

fn read_files(dir: &Path) -> Vec<MitigationFile> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let parsed = fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<MitigationFile>(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(f) if f.version == VERSION => out.push(f),
            Ok(f) => {
                warn!(path = %path.display(), version = f.version, "unknown state file version; ignoring it")
            }
            Err(e) => set_aside(&path, &e),
        }
    }
    out.sort_by_key(|f| (f.peer_index, f.mitigation.as_ref().map(|m| m.mid)));
    out
}

/// What a mitigation's file was last written from: it is written again
/// only when this changes (counters and the passing of time alone do not
/// need a write: the file says when it was written).
#[derive(Clone, Debug, PartialEq)]
struct Mark {
    phase: Phase,
    since: Instant,
    expires: Option<Instant>,
    attack_status: Option<u64>,
    slot_version: u64,
}

/// A file of the state directory to write (with these bytes) or remove.
type FileOp = (PathBuf, Option<Vec<u8>>);

/// Keeps the state directory up to date; shared by the peer tasks.
pub struct StateStore {
    dir: PathBuf,
    table: Option<Arc<Mutex<SlotTable>>>,
    written: Mutex<HashMap<SlotKey, Mark>>,
    writer: Mutex<Option<mpsc::Sender<FileOp>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl StateStore {
    pub fn new(dir: &Path, table: Option<Arc<Mutex<SlotTable>>>) -> Result<StateStore> {
        let files = dir.join(DIR);
        fs::create_dir_all(&files)
            .with_context(|| format!("creating the state directory {}", files.display()))?;
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || write_loop(&files, &rx))
            .context("starting the state writer")?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            table,
            written: Mutex::new(HashMap::new()),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Brings peer `index`'s files in line with `server`'s mitigations:
    /// writes those that changed, removes those that are gone.
    pub fn sync<E: Endpoint>(
        &self,
        index: usize,
        peer: &str,
        now: Instant,
        server: &SignalServer<E>,
    ) {
        let Ok(mut written) = self.written.lock() else {
            return;
        };
        let table = self.table.as_ref().and_then(|t| t.lock().ok());
        let mut present = std::collections::HashSet::new();
        for (key, m) in server.mitigations().iter() {
            let skey = SlotKey {
                peer: index,
                cuid: key.cuid.clone(),
                mid: key.mid,
            };
            let mark = Mark {
                phase: m.phase,
                since: m.phase_since(),
                expires: m.expires,
                attack_status: m.attack_status.map(|s| s.code()),
                slot_version: table.as_ref().map_or(0, |t| t.record_version(&skey)),
            };
            if written.get(&skey) != Some(&mark) {
                let file = MitigationFile {
                    version: VERSION,
                    written_at: unix_now(),
                    peer_index: index,
                    peer: peer.to_string(),
                    mitigation: server.record(now, key),
                    slot: table.as_ref().and_then(|t| t.record(&skey)),
                };
                match serde_json::to_vec_pretty(&file) {
                    Ok(bytes) => {
                        self.send(file_name(&skey), Some(bytes));
                        written.insert(skey.clone(), mark);
                    }
                    Err(e) => warn!(error = %e, "could not encode a state file"),
                }
            }
            present.insert(skey);
        }
        let gone: Vec<SlotKey> = written
            .keys()
            .filter(|k| k.peer == index && !present.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            written.remove(&k);
            self.send(file_name(&k), None);
        }
        // Everything the file of an earlier version held has a file of its
        // own now (or is gone).
        let legacy = self.dir.join(LEGACY_FILE);
        if legacy.exists() {
            if let Err(e) = fs::remove_file(&legacy) {
                warn!(path = %legacy.display(), error = %e, "could not remove the state file of an earlier version");
            } else {
                info!(path = %legacy.display(), "state moved to one file per mitigation");
            }
        }
    }

    /// Removes the files of peer `index` (a reload removed the peer).
    pub fn forget_peer(&self, index: usize) {
        let Ok(mut written) = self.written.lock() else {
            return;
        };
        let gone: Vec<SlotKey> = written
            .keys()
            .filter(|k| k.peer == index)
            .cloned()
            .collect();
        for k in gone {
            written.remove(&k);
            self.send(file_name(&k), None);
        }
    }

    fn send(&self, name: String, bytes: Option<Vec<u8>>) {
        if let Ok(w) = self.writer.lock() {
            if let Some(tx) = w.as_ref() {
                let _ = tx.send((PathBuf::from(name), bytes));
            }
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn flush(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut t) = self.thread.lock() {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `p<peer>-<cuid in hex>-<mid>.json`: any cuid makes a safe file name.
fn file_name(k: &SlotKey) -> String {
    let hex: String = k.cuid.bytes().map(|b| format!("{b:02x}")).collect();
    format!("p{}-{hex}-{}.json", k.peer, k.mid)
}

/// Writes (or removes) files as asked, the latest version of each: under
/// a burst of changes, a file is written once per pass, not once per change.
fn write_loop(dir: &Path, rx: &mpsc::Receiver<FileOp>) {
    while let Ok(first) = rx.recv() {
        let mut batch: HashMap<PathBuf, Option<Vec<u8>>> = HashMap::new();
        batch.insert(first.0, first.1);
        while let Ok((name, bytes)) = rx.try_recv() {
            batch.insert(name, bytes);
        }
        for (name, bytes) in batch {
            let path = dir.join(&name);
            let result = match bytes {
                Some(b) => write_atomic(dir, &name, &b),
                None => match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                },
            };
            if let Err(e) = result {
                warn!(path = %path.display(), error = %format!("{e:#}"), "could not update the state directory");
            }
        }
        if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
            warn!(dir = %dir.display(), error = %e, "could not sync the state directory");
        }
    }
}

/// Write to a temporary file, sync, rename over the old one: a crash leaves
/// the old file or the new one, never half.
fn write_atomic(dir: &Path, name: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(name).with_extension("tmp");
    let path = dir.join(name);
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::SlotSpec;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dots-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn slot(peer: usize, cuid: &str, mid: u32, slot: u16) -> SlotRecord {
        SlotRecord {
            key: SlotKey {
                peer,
                cuid: cuid.into(),
                mid,
            },
            slot,
            spec: SlotSpec::default().into(),
            carried_packets: 7,
            carried_bytes: 700,
        }
    }

    #[test]
    fn file_names_are_safe_for_any_cuid() {
        let k = SlotKey {
            peer: 1,
            cuid: "../a/b".into(),
            mid: 9,
        };
        assert_eq!(file_name(&k), "p1-2e2e2f612f62-9.json");
    }

    #[test]
    fn files_written_by_the_writer_load_back_and_the_legacy_file_is_read() {
        let dir = temp_dir("load");
        let legacy = StateFile {
            version: LEGACY_VERSION,
            written_at: unix_now(),
            peers: BTreeMap::from([(
                0,
                PeerState {
                    peer: "isp:4647".into(),
                    mitigations: Vec::new(),
                },
            )]),
            slots: vec![slot(0, "old", 1, 3)],
        };
        fs::write(dir.join(LEGACY_FILE), serde_json::to_vec(&legacy).unwrap()).unwrap();
        let store = StateStore::new(&dir, None).unwrap();
        let file = MitigationFile {
            version: VERSION,
            written_at: unix_now(),
            peer_index: 0,
            peer: "isp:4647".into(),
            mitigation: None,
            slot: Some(slot(0, "new", 2, 4)),
        };
        let name = file_name(&file.slot.as_ref().unwrap().key);
        store.send(name.clone(), Some(serde_json::to_vec(&file).unwrap()));
        store.send("gone.json".into(), Some(b"{}".to_vec()));
        store.send("gone.json".into(), None);
        store.flush();
        assert!(dir.join(DIR).join(&name).exists());
        assert!(
            !dir.join(DIR).join("gone.json").exists(),
            "the last word wins"
        );
        let loaded = StateFile::load(&dir);
        let slots: Vec<u16> = loaded.slots.iter().map(|s| s.slot).collect();
        assert_eq!(slots, vec![3, 4], "legacy and per-mitigation records");
        assert_eq!(loaded.peers[&0].peer, "isp:4647");
        // A corrupt file is moved aside, not fatal.
        fs::write(dir.join(DIR).join("p0-00-5.json"), "{").unwrap();
        let again = StateFile::load(&dir);
        assert_eq!(again.slots.len(), 2);
        assert!(!dir.join(DIR).join("p0-00-5.json").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
