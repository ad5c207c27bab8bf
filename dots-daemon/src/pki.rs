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

/// A leaf certificate for `cn` with the given names, signed by `ca`.
pub fn issue(ca: &Identity, cn: &str, sans: &[San], days: u32) -> Result<Identity, PkiError> {
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&*name(cn)?)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(days)?)?;
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
    let client_cn = match client_names.first() {
        Some(San::Dns(d)) => d.clone(),
        Some(San::Ip(ip)) => ip.to_string(),
        None => "dots-client".into(),
    };
    let client = issue(&ca, &client_cn, client_names, days)?;
    let (client_cert, client_key) = client.write(dir, "client")?;
    let mut agents = Vec::new();
    for a in agent_names {
        let id = issue(&ca, a, &[San::Dns(a.clone())], days)?;
        let (cert, key) = id.write(dir, &format!("agent-{a}"))?;
        agents.push((a.clone(), cert, key));
    }
    Ok(LabPki {
        ca: ca_pem,
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
}
