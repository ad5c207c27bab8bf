//! `<state-dir>/discovered.json`: what `dots-agent dhcp-hook` learnt from
//! DHCP, for the running agent to pick up.
//!
//! One entry per family (a DHCPv4 and a DHCPv6 client may both run the hook);
//! the hook rewrites its family's entry under an exclusive lock
//! (`discovered.lock`) and replaces the file atomically (write to a temporary
//! file, fsync, rename), so a reader never sees a partial file.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{dhcp::DhcpDots, Candidate, Mechanism};

/// File name inside the state directory.
pub const DISCOVERED_FILE: &str = "discovered.json";
const LOCK_FILE: &str = "discovered.lock";

/// What one DHCP client said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpEntry {
    /// First name of the RI option (141/147), if valid.
    #[serde(default)]
    pub reference_id: Option<String>,
    /// Valid addresses of the address option (142/148), in order.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Domain name of the network (DHCPv4 option 15 / DHCPv6 option 24),
    /// for S-NAPTR and DNS-SD when configuration gives none.
    #[serde(default)]
    pub domain: Option<String>,
    /// Port to dial [default: 4647].
    #[serde(default)]
    pub port: Option<u16>,
    /// When the hook ran (seconds since the Unix epoch).
    pub obtained: u64,
    /// When the information expires (lease end), seconds since the epoch;
    /// `None`: no lease time given.
    #[serde(default)]
    pub valid_until: Option<u64>,
}

impl DhcpEntry {
    pub fn new(
        d: &DhcpDots,
        domain: Option<String>,
        port: Option<u16>,
        lease: Option<Duration>,
        now: SystemTime,
    ) -> DhcpEntry {
        let obtained = unix(now);
        DhcpEntry {
            reference_id: d.reference_id.clone(),
            addresses: d.addresses.clone(),
            domain,
            port,
            obtained,
            valid_until: lease.map(|l| obtained.saturating_add(l.as_secs())),
        }
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        self.valid_until.is_some_and(|t| t <= unix(now))
    }

    fn candidates(&self, mechanism: Mechanism, now: SystemTime) -> Vec<Candidate> {
        if self.expired(now) {
            return Vec::new();
        }
        let d = DhcpDots {
            reference_id: self.reference_id.clone(),
            addresses: self.addresses.clone(),
            problems: Vec::new(),
        };
        let left = self
            .valid_until
            .map(|t| Duration::from_secs(t.saturating_sub(unix(now))));
        d.candidates(
            mechanism,
            self.port.unwrap_or(super::DEFAULT_CALL_HOME_PORT),
            left,
            now,
        )
    }
}

/// The content of `discovered.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    #[serde(default)]
    pub dhcpv4: Option<DhcpEntry>,
    #[serde(default)]
    pub dhcpv6: Option<DhcpEntry>,
}

impl Discovered {
    /// Unexpired DHCP candidates, DHCPv6 first (then DHCPv4).
    pub fn candidates(&self, now: SystemTime) -> Vec<Candidate> {
        let mut out = Vec::new();
        if let Some(e) = &self.dhcpv6 {
            out.extend(e.candidates(Mechanism::Dhcpv6, now));
        }
        if let Some(e) = &self.dhcpv4 {
            out.extend(e.candidates(Mechanism::Dhcpv4, now));
        }
        out
    }

    /// The domain DHCP gave for service resolution, if any unexpired.
    pub fn domain(&self, now: SystemTime) -> Option<String> {
        [&self.dhcpv6, &self.dhcpv4]
            .into_iter()
            .flatten()
            .filter(|e| !e.expired(now))
            .find_map(|e| e.domain.clone())
    }

    /// Earliest expiry of the entries.
    pub fn valid_until(&self) -> Option<SystemTime> {
        [&self.dhcpv4, &self.dhcpv6]
            .into_iter()
            .flatten()
            .filter_map(|e| e.valid_until)
            .min()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Path of the file in `dir`.
pub fn discovered_path(dir: &Path) -> PathBuf {
    dir.join(DISCOVERED_FILE)
}

/// Reads `<dir>/discovered.json`; `Ok(None)` when there is none.
pub fn read_discovered(dir: &Path) -> Result<Option<Discovered>> {
    let path = discovered_path(dir);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let d = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(d))
}

/// Writes `<dir>/discovered.json` atomically.
pub fn write_discovered(dir: &Path, d: &Discovered) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = discovered_path(dir);
    let tmp = dir.join(format!(".{DISCOVERED_FILE}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(d)?;
    let res = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Ok(dirf) = fs::File::open(dir) {
            let _ = dirf.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// Read-modify-write of the file under an exclusive lock (the DHCPv4 and
/// DHCPv6 hooks may run at the same time).
pub fn update_discovered(dir: &Path, f: impl FnOnce(&mut Discovered)) -> Result<Discovered> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .context("opening the lock file")?;
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking discovered.lock");
    }
    let mut d = read_discovered(dir).unwrap_or_default().unwrap_or_default();
    f(&mut d);
    write_discovered(dir, &d)?;
    Ok(d)
}
