//! The audit trail: one JSON object per line, appended to
//! `<state-dir>/audit.jsonl` (or `audit-log`), for every request from the
//! API, the CLI or a detector (who, what, which agent, the answer; reads
//! are recorded as `"action": "read"` with what was read), every
//! status change an agent reports, and the final counters of each
//! mitigation. The file is opened in append mode and never rewritten, so
//! it survives restarts; rotate it with logrotate's `copytruncate`.

use std::{
    fs::File,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;
use serde_json::Value;
use tracing::warn;

/// Who made a request: the credential it came with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// "api", "cli" or "service" (the client itself, e.g. re-sending after
    /// a restart).
    pub via: &'static str,
    /// The token's name, the client certificate's identity, or `uid=N`.
    pub name: String,
}

impl Principal {
    pub fn api(name: impl Into<String>) -> Principal {
        Principal {
            via: "api",
            name: name.into(),
        }
    }

    pub fn cli(uid: Option<u32>) -> Principal {
        Principal {
            via: "cli",
            name: uid.map_or_else(|| "uid=?".into(), |u| format!("uid={u}")),
        }
    }

    pub fn service() -> Principal {
        Principal {
            via: "service",
            name: "dots-client".into(),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.via, self.name)
    }
}

/// One line of the trail.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// "request", "status", "final", "agent".
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<Principal>,
    /// What was asked: "mitigate", "withdraw", "set-prefixes", "read", ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mid: Option<u32>,
    /// The answer: an HTTP status for requests (also for the CLI's, which
    /// share the service's outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// The agent's CoAP answer, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coap: Option<String>,
    /// Anything else: the request body, the error, the status change, the
    /// counters.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

impl Entry {
    pub fn new(event: &'static str) -> Entry {
        Entry {
            time: rfc3339(SystemTime::now()),
            event,
            by: None,
            action: None,
            agent: None,
            mid: None,
            code: None,
            coap: None,
            detail: Value::Null,
        }
    }
}

/// The append-only audit file.
pub struct AuditLog {
    file: Mutex<File>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (creating, mode 0640) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        Ok(AuditLog {
            file: Mutex::new(file),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (one write(2), so lines never interleave). A write
    /// that fails is logged and the request goes on: the trail must not
    /// become a way to stop mitigations.
    pub fn append(&self, entry: &Entry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "audit entry not serialisable");
                return;
            }
        };
        line.push(b'\n');
        let Ok(mut f) = self.file.lock() else {
            return;
        };
        if let Err(e) = f.write_all(&line) {
            warn!(path = %self.path.display(), error = %e, "writing the audit log failed");
        }
    }
}

/// `2026-11-28T23:46:03.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_764_373_563), "2025-11-28T23:46:03.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn lines_are_appended_and_kept() {
        let dir = std::env::temp_dir().join(format!("dots-client-audit-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut e = Entry::new("request");
        e.by = Some(Principal::api("fastnetmon"));
        e.action = Some("mitigate".into());
        e.code = Some(201);
        log.append(&e);
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        log.append(&Entry::new("agent"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["by"]["name"], "fastnetmon");
        assert_eq!(lines[0]["by"]["via"], "api");
        assert_eq!(lines[0]["code"], 201);
        assert_eq!(lines[1]["event"], "agent");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
