//! What `dots-agent check-config` and start-up check beyond the file
//! itself, on this machine: the certificate files in depth (see
//! `dots_daemon::cert_check`), and, when enforcing, that the LAN
//! interfaces exist and that the bpffs directory is on a mounted bpffs.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
    time::SystemTime,
};

use dots_daemon::{
    cert_check::{check_credentials, CredentialKeys},
    config::{path_value, quoted, ConfigError},
    transport::Credentials,
};

use super::AgentConfig;

/// `statfs(2)` `f_type` of a bpffs mount (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

impl AgentConfig {
    /// Everything `dots-agent run` would refuse to start with:
    /// [`validate`](Self::validate), the certificate files of every peer in
    /// depth, and when enforcing the LAN interfaces and the bpffs mount.
    /// Returns the warnings (certificates expiring within 30 days).
    pub fn check(&self) -> Result<Vec<String>, ConfigError> {
        self.validate()?;
        let mut warnings = Vec::new();
        let mut checked: Vec<Credentials> = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let [(ca_key, ca), (cert_key, cert), (key_key, key)] =
                self.peer_credential_sources(i, p)?;
            let creds = Credentials { ca, cert, key };
            if checked
                .iter()
                .any(|c| c.ca == creds.ca && c.cert == creds.cert && c.key == creds.key)
            {
                continue;
            }
            let keys = CredentialKeys {
                ca: &ca_key,
                cert: &cert_key,
                key: &key_key,
            };
            warnings.extend(check_credentials(
                &self.origin,
                keys,
                &creds,
                SystemTime::now(),
            )?);
            checked.push(creds);
        }
        if self.enforce {
            for (i, name) in self.xdp.interfaces.iter().enumerate() {
                if !interface_exists(name) {
                    return Err(self.value_error(
                        format!("xdp.interfaces[{i}]"),
                        quoted(name),
                        "no such interface here (`ip link` lists them; enforce = false runs without XDP)",
                    ));
                }
            }
            if let Some(why) = bpffs_problem(&self.xdp.bpffs) {
                return Err(self.value_error("xdp.bpffs", path_value(&self.xdp.bpffs), why));
            }
        }
        Ok(warnings)
    }
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Why `dir` cannot hold the pins: the nearest existing directory (the
/// agent creates the rest) is not on a bpffs.
fn bpffs_problem(dir: &Path) -> Option<String> {
    let mut at: PathBuf = dir.to_path_buf();
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p.to_path_buf(),
            _ => break,
        }
    }
    match fs_type(&at) {
        Ok(BPF_FS_MAGIC) => None,
        Ok(_) => Some(format!(
            "not on a mounted bpffs ({} is not one): mount it with `mount -t bpf bpf /sys/fs/bpf`",
            at.display()
        )),
        Err(e) => Some(format!("cannot look at {}: {e}", at.display())),
    }
}

fn fs_type(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is a valid statfs to be filled in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads a NUL-terminated path and writes one statfs we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bpffs_holds_pins() {
        // /sys/fs/bpf is mounted on the machines that run the tests (cargo
        // xtask setup mounts it); /tmp never is a bpffs.
        assert_eq!(
            bpffs_problem(Path::new("/sys/fs/bpf/dots-agent-not-yet")),
            None
        );
        let e = bpffs_problem(Path::new("/tmp/not/there")).unwrap();
        assert!(
            e.contains("not on a mounted bpffs (/tmp is not one)"),
            "{e}"
        );
    }

    #[test]
    fn interfaces_are_looked_up() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("dots-no-such0"));
        assert!(!interface_exists("bad\0name"));
    }

    #[test]
    fn check_names_the_interface_the_bpffs_and_the_certificate() {
        let dir = std::env::temp_dir().join(format!("dots-agent-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = dots_daemon::pki::create_lab_pki(
            &dir,
            &[dots_daemon::pki::San::parse("isp.example")],
            &["cpe1".into(), "cpe2".into()],
            365,
        )
        .unwrap();
        let text = |key: &Path, lan: &str, bpffs: &str| {
            format!(
                "ca = \"ca.pem\"\ncert = \"agent-cpe1.pem\"\nkey = {:?}\n\
                 [[peers]]\naddress = \"isp.example\"\n\
                 [domain]\nprefixes = [\"192.0.2.0/24\"]\n\
                 [xdp]\ninterfaces = [{lan:?}]\nbpffs = {bpffs:?}\n",
                key.display().to_string()
            )
        };
        let origin = dir.join("agent.toml");
        let parse = |t: String| AgentConfig::from_str(&t, &origin).unwrap();
        let good = parse(text(&pki.agents[0].2, "lo", "/sys/fs/bpf/dots-check"));
        assert_eq!(
            good.check().unwrap_or_else(|e| panic!("{e}")),
            Vec::<String>::new()
        );
        let e = parse(text(&pki.agents[0].2, "nosuch0", "/sys/fs/bpf/x"))
            .check()
            .unwrap_err();
        assert_eq!(e.key(), Some("xdp.interfaces[0]"), "{e}");
        let e = parse(text(&pki.agents[0].2, "lo", "/tmp/pins"))
            .check()
            .unwrap_err();
        assert_eq!(e.key(), Some("xdp.bpffs"), "{e}");
        // Monitor mode needs neither.
        let mut monitor = parse(text(&pki.agents[0].2, "nosuch0", "/tmp/pins"));
        monitor.enforce = false;
        monitor.check().unwrap_or_else(|e| panic!("{e}"));
        // Another agent's key with this certificate.
        let e = parse(text(&pki.agents[1].2, "lo", "/sys/fs/bpf/x"))
            .check()
            .unwrap_err();
        assert_eq!(e.key(), Some("key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
