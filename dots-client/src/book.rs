//! The ISP side's book of mitigations: every mitigation this client asked
//! for, with who asked, the scope, its state here, and the status and
//! counters the agent last reported. Kept in `<state-dir>/mitigations.json`
//! so that a restart keeps the active ones (they are re-observed, or sent
//! again when the agent no longer holds them) and the queued ones.

use std::{collections::BTreeMap, fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{self, StoreError};

/// Finished mitigations kept (newest first) for `GET` after a restart.
const KEEP_FINISHED: usize = 1000;

/// A mitigation's name across agents: `MID@AGENT`, e.g. `1795310206@cpe1`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MitigationId {
    pub agent: String,
    pub mid: u32,
}

impl fmt::Display for MitigationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.mid, self.agent)
    }
}

impl FromStr for MitigationId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a mitigation id (MID@AGENT, e.g. 1795310206@cpe1)");
        let (mid, agent) = s.split_once('@').ok_or_else(bad)?;
        if agent.is_empty() {
            return Err(bad());
        }
        Ok(MitigationId {
            agent: agent.to_string(),
            mid: mid.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for MitigationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MitigationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a mitigation stands, as this client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The agent is offline: sent when it connects.
    Queued,
    /// Sent, not answered yet (or the answer was lost: sent again on the
    /// next connection).
    Pending,
    /// The agent accepted it (2.01) and has not ended it.
    Active,
    /// A withdrawal waits for the agent to connect.
    WithdrawQueued,
    /// Withdrawn (2.02), or withdrawn before it was ever sent.
    Withdrawn,
    /// The agent ended it (lifetime, its operator), or it expired here
    /// while the agent was away.
    Ended,
    /// The agent refused it (4.xx/5.xx).
    Rejected,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Queued,
        State::Pending,
        State::Active,
        State::WithdrawQueued,
        State::Withdrawn,
        State::Ended,
        State::Rejected,
    ];

    /// No further change will come.
    pub fn is_final(self) -> bool {
        matches!(self, State::Withdrawn | State::Ended | State::Rejected)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Pending => "pending",
            State::Active => "active",
            State::WithdrawQueued => "withdraw-queued",
            State::Withdrawn => "withdrawn",
            State::Ended => "ended",
            State::Rejected => "rejected",
        }
    }
}

impl FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a state ({})",
                    State::ALL.map(State::as_str).join(", ")
                )
            })
    }
}

/// Drop counters an agent reports (RFC 9132 §4.4.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkts_dropped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_dropped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pps_dropped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps_dropped: Option<u64>,
}

/// One mitigation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Mitigation {
    pub id: MitigationId,
    pub agent: String,
    pub mid: u32,
    /// The requester's own name for it (e.g. the detector's ban), unique
    /// among unfinished mitigations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The credential that created it.
    pub requested_by: String,
    /// The request body sent to the agent (JSON form of the mitigation
    /// scope, RFC 9132 / RFC 9066 names).
    pub request: Value,
    /// Seconds; -1: until withdrawn.
    pub lifetime: i64,
    pub state: State,
    /// The agent's last reported status, e.g. "attack-successfully-mitigated".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub counters: Counters,
    /// The agent's last CoAP answer to a request about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_code: Option<String>,
    /// Why it was refused or ended, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// When it was last sent to the agent (seconds), for the remaining
    /// lifetime when it has to be sent again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    /// The lifetime the agent granted at the last send (it may cap what was
    /// asked, e.g. an indefinite lifetime to a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<i64>,
}

impl Mitigation {
    /// When an indefinite mitigation that the agent granted only a finite
    /// lifetime must be refreshed to go on (RFC 9132 §4.4.1: the client
    /// refreshes a mitigation it still wants before its lifetime ends):
    /// three quarters into the granted lifetime.
    pub fn refresh_at(&self) -> Option<u64> {
        if self.state != State::Active || self.lifetime != -1 {
            return None;
        }
        let granted = u64::try_from(self.granted?).ok().filter(|g| *g > 0)?;
        Some(self.sent_at? + granted * 3 / 4)
    }

    /// Lifetime left at `now` (seconds; -1 stays -1); 0: expired.
    pub fn remaining_lifetime(&self, now: u64) -> i64 {
        if self.lifetime < 0 {
            return self.lifetime;
        }
        let since = self.sent_at.unwrap_or(self.created_at);
        let elapsed = now.saturating_sub(since) as i64;
        (self.lifetime - elapsed).max(0)
    }
}

/// On-disk form.
#[derive(Default, Serialize, Deserialize)]
pub struct BookFile {
    mitigations: Vec<Mitigation>,
}

/// Every mitigation, by id.
pub struct Book {
    records: BTreeMap<MitigationId, Mitigation>,
    path: Option<PathBuf>,
}

impl Book {
    /// Loads `<state_dir>/mitigations.json` (none: memory only).
    pub fn load(state_dir: Option<PathBuf>) -> Result<Book, StoreError> {
        let path = state_dir.map(|d| d.join("mitigations.json"));
        let file: BookFile = match &path {
            Some(p) => store::read(p)?.unwrap_or_default(),
            None => BookFile::default(),
        };
        Ok(Book {
            records: file
                .mitigations
                .into_iter()
                .map(|m| (m.id.clone(), m))
                .collect(),
            path,
        })
    }

    pub fn get(&self, id: &MitigationId) -> Option<&Mitigation> {
        self.records.get(id)
    }

    pub fn get_mut(&mut self, id: &MitigationId) -> Option<&mut Mitigation> {
        self.records.get_mut(id)
    }

    pub fn remove(&mut self, id: &MitigationId) -> Option<Mitigation> {
        self.records.remove(id)
    }

    pub fn insert(&mut self, m: Mitigation) {
        self.records.insert(m.id.clone(), m);
    }

    /// The unfinished mitigation carrying `label`.
    pub fn open_with_label(&self, label: &str) -> Option<&Mitigation> {
        self.records
            .values()
            .find(|m| !m.state.is_final() && m.label.as_deref() == Some(label))
    }

    /// The agent's mitigation with `mid`, when only the mid is given: the
    /// agent must be unique among the mitigations with that mid.
    pub fn find_mid(&self, mid: u32) -> Vec<&Mitigation> {
        self.records.values().filter(|m| m.mid == mid).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mitigation> {
        self.records.values()
    }

    /// Ids of the agent's mitigations in `states`.
    pub fn of_agent(&self, agent: &str, states: &[State]) -> Vec<MitigationId> {
        self.records
            .values()
            .filter(|m| m.agent == agent && states.contains(&m.state))
            .map(|m| m.id.clone())
            .collect()
    }

    /// Writes the file: every unfinished mitigation and the newest
    /// finished ones.
    pub fn save(&mut self) -> Result<(), StoreError> {
        match self.to_save() {
            Some((path, file)) => store::write(&path, &file),
            None => Ok(()),
        }
    }

    /// Drops the oldest finished mitigations beyond those kept, and
    /// returns what [`save`](Self::save) writes where, so that the caller
    /// can write it without holding the book.
    pub fn to_save(&mut self) -> Option<(PathBuf, BookFile)> {
        let mut finished: Vec<(u64, MitigationId)> = self
            .records
            .values()
            .filter(|m| m.state.is_final())
            .map(|m| (m.updated_at, m.id.clone()))
            .collect();
        if finished.len() > KEEP_FINISHED {
            finished.sort_by(|a, b| b.cmp(a));
            for (_, id) in finished.drain(KEEP_FINISHED..) {
                self.records.remove(&id);
            }
        }
        let path = self.path.clone()?;
        Some((
            path,
            BookFile {
                mitigations: self.records.values().cloned().collect(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: &str, mid: u32, state: State, label: Option<&str>) -> Mitigation {
        Mitigation {
            id: MitigationId {
                agent: agent.into(),
                mid,
            },
            agent: agent.into(),
            mid,
            label: label.map(Into::into),
            requested_by: "api:test".into(),
            request: Value::Null,
            lifetime: 600,
            state,
            status: None,
            counters: Counters::default(),
            last_code: None,
            reason: None,
            created_at: 1000,
            updated_at: 1000,
            sent_at: None,
            granted: None,
        }
    }

    #[test]
    fn ids_parse_and_print() {
        let id: MitigationId = "17@cpe1.example".parse().unwrap();
        assert_eq!(id.mid, 17);
        assert_eq!(id.agent, "cpe1.example");
        assert_eq!(id.to_string(), "17@cpe1.example");
        let v6: MitigationId = "5@2001:db8::2".parse().unwrap();
        assert_eq!(v6.agent, "2001:db8::2");
        for bad in ["17", "x@cpe1", "17@", "@cpe1", "-1@a", "4294967296@a"] {
            assert!(bad.parse::<MitigationId>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"17@cpe1.example\"");
    }

    #[test]
    fn indefinite_mitigations_are_refreshed_before_the_granted_lifetime_ends() {
        let mut m = record("a", 1, State::Active, None);
        m.lifetime = -1;
        m.sent_at = Some(2000);
        assert_eq!(m.refresh_at(), None, "nothing granted yet");
        m.granted = Some(86_400);
        assert_eq!(m.refresh_at(), Some(2000 + 64_800));
        m.granted = Some(-1);
        assert_eq!(m.refresh_at(), None, "granted indefinitely");
        m.granted = Some(100);
        m.lifetime = 600;
        assert_eq!(
            m.refresh_at(),
            None,
            "a finite lifetime is what was asked for"
        );
        m.lifetime = -1;
        m.state = State::Withdrawn;
        assert_eq!(m.refresh_at(), None);
    }

    #[test]
    fn lifetime_left() {
        let mut m = record("a", 1, State::Active, None);
        m.sent_at = Some(2000);
        assert_eq!(m.remaining_lifetime(2100), 500);
        assert_eq!(m.remaining_lifetime(9000), 0);
        m.lifetime = -1;
        assert_eq!(m.remaining_lifetime(9000), -1);
    }

    #[test]
    fn labels_and_persistence() {
        let dir = std::env::temp_dir().join(format!("dots-client-book-{}", std::process::id()));
        let mut b = Book::load(Some(dir.clone())).unwrap();
        b.insert(record("a", 1, State::Withdrawn, Some("ban:1")));
        b.insert(record("a", 2, State::Active, Some("ban:1")));
        b.insert(record("b", 2, State::Queued, None));
        assert_eq!(b.open_with_label("ban:1").unwrap().mid, 2);
        assert_eq!(b.find_mid(2).len(), 2);
        assert_eq!(b.of_agent("b", &[State::Queued]).len(), 1);
        b.save().unwrap();
        let again = Book::load(Some(dir.clone())).unwrap();
        assert_eq!(again.iter().count(), 3);
        assert_eq!(
            again.get(&"2@a".parse().unwrap()).map(|m| m.state),
            Some(State::Active)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
