//! A small test PKI: one CA, and certificates for agents and clients, made
//! with OpenSSL. Meant for labs, tests and first trials; production
//! deployments use their own CA.
//!
//! Certificates carry both serverAuth and clientAuth usage because Call Home
//! reverses the roles: the agent is the (D)TLS client, the ISP side the server,
//! and each must authenticate the other.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use openssl::{
    asn1::Asn1Time,
    bn::{BigNum, MsbOption},
    ec::{EcGroup, EcKey},
    error::ErrorStack,
    hash::MessageDigest,
    nid::Nid,
    pkey::{PKey, Private},
    x509::{
        extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName},
        X509NameBuilder, X509,
    },
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] ErrorStack),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that would be written exists (and replacing was not asked).
    #[error("{path} exists")]
    Exists { path: PathBuf },
    /// No CA in the directory to issue from.
    #[error("no CA in {dir}: expected ca.pem and ca.key (made by `dots-client pki --out {dir}`)")]
    NoCa { dir: PathBuf },
    /// The CA in the directory can no longer sign anything useful.
    #[error("the CA in {path} expired on {not_after}: certificates it issues would not verify")]
    CaExpired { path: PathBuf, not_after: String },
    /// A validity that makes no certificate.
    #[error("{0}")]
    Validity(String),
}

/// A certificate and its private key.
pub struct Identity {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// A subject alternative name: the reference identifier peers check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl San {
    /// An IP address if `s` parses as one, else a DNS name.
    pub fn parse(s: &str) -> San {
        s.parse()
            .map(San::Ip)
            .unwrap_or_else(|_| San::Dns(s.to_string()))
    }
}

fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn serial() -> Result<openssl::asn1::Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn name(cn: &str) -> Result<openssl::x509::X509Name, ErrorStack> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, "dots-agent test PKI")?;
    b.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(b.build())
}

/// A self-signed CA valid for `days`.
pub fn new_ca(cn: &str, days: u32) -> Result<Identity, PkiError> {
    if days == 0 {
        return Err(PkiError::Validity(
            "a CA must be valid for at least 1 day".into(),
        ));
    }
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    let n = name(cn)?;
    b.set_subject_name(&n)?;
    b.set_issuer_name(&n)?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(days)?)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Identity {
        cert: b.build(),
        key,
    })
}

/// A leaf certificate for `cn` with the given names, signed by `ca`, valid
/// from now for `days` (at least 1).
pub fn issue(ca: &Identity, cn: &str, sans: &[San], days: u32) -> Result<Identity, PkiError> {
    if days == 0 {
        return Err(PkiError::Validity(
            "a certificate must be valid for at least 1 day".into(),
        ));
    }
    let now = unix_now();
    issue_between(ca, cn, sans, now, now + i64::from(days) * 86_400)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A leaf certificate valid from `not_before` to `not_after` (seconds since
/// the Unix epoch; either may be in the past, e.g. to test an expired
/// certificate).
pub fn issue_between(
    ca: &Identity,
    cn: &str,
    sans: &[San],
    not_before: i64,
    not_after: i64,
) -> Result<Identity, PkiError> {
    if not_after <= not_before {
        return Err(PkiError::Validity(
            "not-after must come after not-before".into(),
        ));
    }
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&*name(cn)?)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::from_unix(not_before)?)?;
    b.set_not_after(&*Asn1Time::from_unix(not_after)?)?;
    b.append_extension(BasicConstraints::new().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_agreement()
            .build()?,
    )?;
    b.append_extension(
        ExtendedKeyUsage::new()
            .server_auth()
            .client_auth()
            .build()?,
    )?;
    let mut alt = SubjectAlternativeName::new();
    for san in sans {
        match san {
            San::Dns(d) => alt.dns(d),
            San::Ip(ip) => alt.ip(&ip.to_string()),
        };
    }
    if !sans.is_empty() {
        let ext = alt.build(&b.x509v3_context(Some(&ca.cert), None))?;
        b.append_extension(ext)?;
    }
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(Identity {
        cert: b.build(),
        key,
    })
}

impl Identity {
    /// Reads a certificate and its key back from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, PkiError> {
        let read = |p: &Path| {
            fs::read(p).map_err(|source| PkiError::Io {
                action: "reading",
                path: p.into(),
                source,
            })
        };
        Ok(Identity {
            cert: X509::from_pem(&read(cert)?)?,
            key: PKey::private_key_from_pem(&read(key)?)?,
        })
    }

    /// Writes `<dir>/<stem>.pem` (certificate) and `<dir>/<stem>.key`
    /// (private key, mode 0600). Returns both paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            action: "creating",
            path: dir.into(),
            source,
        })?;
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert.to_pem()?, 0o644)?;
        write_file(&key, &self.key.private_key_to_pem_pkcs8()?, 0o600)?;
        Ok((cert, key))
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        action: "writing",
        path: path.into(),
        source,
    };
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

/// A directory holding a CA (`ca.pem`, `ca.key`) and the certificates it
/// issued: what `dots-client pki` works on. The CA is made once and reused,
/// so issuing more never invalidates what was issued before; existing
/// certificate files are replaced only when asked (`force`).
pub struct PkiDir {
    dir: PathBuf,
    ca: Identity,
    ca_pem: PathBuf,
}

/// Certificate and key file names of the ISP-side client and of an agent.
pub const CLIENT_STEM: &str = "client";

/// The file stem of agent `name`'s certificate and key.
pub fn agent_stem(name: &str) -> String {
    format!("agent-{name}")
}

impl PkiDir {
    /// The CA in `dir`, which must exist.
    pub fn open(dir: &Path) -> Result<PkiDir, PkiError> {
        let (pem, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !pem.exists() || !key.exists() {
            return Err(PkiError::NoCa { dir: dir.into() });
        }
        let ca = Identity::load(&pem, &key)?;
        if ca.cert.not_after() < Asn1Time::days_from_now(0)? {
            return Err(PkiError::CaExpired {
                path: pem,
                not_after: ca.cert.not_after().to_string(),
            });
        }
        Ok(PkiDir {
            dir: dir.into(),
            ca,
            ca_pem: pem,
        })
    }

    /// The CA in `dir`, or a new one valid for `days` when there is none
    /// (`ca.pem` and `ca.key` both absent). Returns whether it is new.
    pub fn open_or_create(dir: &Path, days: u32) -> Result<(PkiDir, bool), PkiError> {
        let (pem, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        match (pem.exists(), key.exists()) {
            (false, false) => {
                let ca = new_ca("dots-agent test CA", days)?;
                let (ca_pem, _) = ca.write(dir, "ca")?;
                Ok((
                    PkiDir {
                        dir: dir.into(),
                        ca,
                        ca_pem,
                    },
                    true,
                ))
            }
            // Half a CA is not reused, nor silently replaced.
            (true, false) => Err(PkiError::Exists { path: pem }),
            (false, true) => Err(PkiError::Exists { path: key }),
            (true, true) => Ok((PkiDir::open(dir)?, false)),
        }
    }

    /// `ca.pem`.
    pub fn ca_path(&self) -> &Path {
        &self.ca_pem
    }

    /// Fails with [`PkiError::Exists`] when a file of one of `stems` exists
    /// and `force` is false; nothing is written either way.
    pub fn check_free(&self, stems: &[String], force: bool) -> Result<(), PkiError> {
        if force {
            return Ok(());
        }
        for stem in stems {
            for ext in ["pem", "key"] {
                let path = self.dir.join(format!("{stem}.{ext}"));
                if path.exists() {
                    return Err(PkiError::Exists { path });
                }
            }
        }
        Ok(())
    }

    /// Issues a certificate for `cn` with `sans`, written to `<stem>.pem`
    /// and `<stem>.key`; existing files are replaced only with `force`.
    pub fn issue(
        &self,
        stem: &str,
        cn: &str,
        sans: &[San],
        days: u32,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        self.check_free(&[stem.to_string()], force)?;
        issue(&self.ca, cn, sans, days)?.write(&self.dir, stem)
    }

    /// The ISP-side client's certificate, `client.pem` / `client.key`; the
    /// first name is also its CN.
    pub fn issue_client(
        &self,
        names: &[San],
        days: u32,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let cn = match names.first() {
            Some(San::Dns(d)) => d.clone(),
            Some(San::Ip(ip)) => ip.to_string(),
            None => "dots-client".into(),
        };
        self.issue(CLIENT_STEM, &cn, names, days, force)
    }

    /// Agent `name`'s certificate (DNS name and CN `name`),
    /// `agent-NAME.pem` / `.key`.
    pub fn issue_agent(
        &self,
        name: &str,
        days: u32,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        self.issue(
            &agent_stem(name),
            name,
            &[San::Dns(name.to_string())],
            days,
            force,
        )
    }
}

/// Files of a lab PKI made by [`create_lab_pki`].
#[derive(Clone, Debug)]
pub struct LabPki {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// (name, cert, key) per agent.
    pub agents: Vec<(String, PathBuf, PathBuf)>,
}

/// A CA, one certificate for the ISP-side client (with `client_names` as
/// SANs) and one per agent name, written to `dir`.
pub fn create_lab_pki(
    dir: &Path,
    client_names: &[San],
    agent_names: &[String],
    days: u32,
) -> Result<LabPki, PkiError> {
    let ca = new_ca("dots-agent test CA", days)?;
    let (ca_pem, _) = ca.write(dir, "ca")?;
    let pki = PkiDir {
        dir: dir.into(),
        ca,
        ca_pem,
    };
    let (client_cert, client_key) = pki.issue_client(client_names, days, true)?;
    let mut agents = Vec::new();
    for a in agent_names {
        let (cert, key) = pki.issue_agent(a, days, true)?;
        agents.push((a.clone(), cert, key));
    }
    Ok(LabPki {
        ca: pki.ca_pem,
        client_cert,
        client_key,
        agents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_verifies_against_ca_and_carries_names() {
        let ca = new_ca("ca", 1).unwrap();
        let leaf = issue(
            &ca,
            "agent1",
            &[San::parse("agent1.example"), San::parse("192.0.2.1")],
            1,
        )
        .unwrap();
        assert!(leaf.cert.verify(&ca.key).unwrap());
        let names: Vec<String> = leaf
            .cert
            .subject_alt_names()
            .unwrap()
            .iter()
            .map(|n| {
                n.dnsname()
                    .map(String::from)
                    .unwrap_or_else(|| format!("{:?}", n.ipaddress().unwrap()))
            })
            .collect();
        assert_eq!(
            names,
            vec!["agent1.example".to_string(), "[192, 0, 2, 1]".to_string()]
        );
        let other = new_ca("other", 1).unwrap();
        assert!(!leaf.cert.verify(&other.key).unwrap());
    }

    #[test]
    fn lab_pki_files_and_key_mode() {
        let dir = std::env::temp_dir().join(format!("dots-pki-{}", std::process::id()));
        let pki = create_lab_pki(&dir, &[San::parse("isp.example")], &["cpe1".into()], 1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&pki.agents[0].2).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(fs::read_to_string(&pki.ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        fs::remove_dir_all(dir).unwrap();
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dots-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_ca_is_reused_and_nothing_is_overwritten_without_force() {
        let dir = temp("reuse");
        let (pki, created) = PkiDir::open_or_create(&dir, 30).unwrap();
        assert!(created);
        let (cert, _) = pki.issue_agent("cpe1", 30, false).unwrap();
        let ca_before = fs::read(pki.ca_path()).unwrap();
        // Again: the same CA, and cpe1's files are not replaced.
        let (again, created) = PkiDir::open_or_create(&dir, 30).unwrap();
        assert!(!created);
        assert_eq!(fs::read(again.ca_path()).unwrap(), ca_before);
        let cert_before = fs::read(&cert).unwrap();
        let e = again.issue_agent("cpe1", 30, false).unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }), "{e}");
        assert_eq!(fs::read(&cert).unwrap(), cert_before);
        // One more agent, from the same CA; and cpe1 again with force.
        let (cert2, key2) = again.issue_agent("cpe2", 30, false).unwrap();
        let (cert1, _) = again.issue_agent("cpe1", 30, true).unwrap();
        assert_ne!(fs::read(&cert1).unwrap(), cert_before);
        let ca = X509::from_pem(&ca_before).unwrap();
        for c in [&cert, &cert2] {
            let leaf = X509::from_pem(&fs::read(c).unwrap()).unwrap();
            assert!(leaf.verify(&ca.public_key().unwrap()).unwrap());
        }
        let id = Identity::load(&cert2, &key2).unwrap();
        assert!(id.cert.public_key().unwrap().public_eq(&id.key));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn issuing_needs_a_ca_and_a_validity() {
        let dir = temp("noca");
        let e = PkiDir::open(&dir).err().expect("no CA yet");
        assert!(e.to_string().starts_with("no CA in"), "{e}");
        assert!(matches!(
            PkiDir::open_or_create(&dir, 0),
            Err(PkiError::Validity(_))
        ));
        let (pki, _) = PkiDir::open_or_create(&dir, 1).unwrap();
        assert!(matches!(
            pki.issue_agent("x", 0, false),
            Err(PkiError::Validity(_))
        ));
        // Half a CA (the key gone) is neither reused nor replaced.
        fs::remove_file(dir.join("ca.key")).unwrap();
        assert!(matches!(
            PkiDir::open_or_create(&dir, 1),
            Err(PkiError::Exists { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_certificate_can_be_issued_already_expired() {
        let ca = new_ca("ca", 1).unwrap();
        let now = unix_now();
        let old = issue_between(&ca, "old", &[], now - 10 * 86_400, now - 86_400).unwrap();
        assert!(old.cert.not_after() < Asn1Time::days_from_now(0).unwrap());
        assert!(issue_between(&ca, "x", &[], now, now).is_err());
    }
}
