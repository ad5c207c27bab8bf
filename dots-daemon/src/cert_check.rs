//! Deep checks of a daemon's certificate files, for `check-config` and for
//! start-up: what makes every handshake fail in practice, each reported as
//! a [`ConfigError`] naming the configuration key and the file.
//!
//! * the files hold PEM certificates and a PEM private key;
//! * the key is the certificate's (not another identity's);
//! * the certificate is valid now (not expired, not yet valid);
//! * it chains to the CA bundle (`ca`): both ends of this implementation
//!   use one bundle for the peer and for their own chain;
//! * the CA bundle is not wholly expired;
//! * and a warning when a certificate expires within [`EXPIRY_WARNING`].

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use openssl::{
    asn1::{Asn1Time, Asn1TimeRef},
    pkey::PKey,
    stack::Stack,
    x509::{store::X509StoreBuilder, X509StoreContext, X509},
};

use crate::{
    config::{check_readable, path_value, ConfigError},
    transport::Credentials,
};

/// Certificates expiring sooner than this are warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// The configuration keys the three files were given under (e.g. `ca`, or
/// `peers[1].ca` for a peer's own).
#[derive(Clone, Copy, Debug)]
pub struct CredentialKeys<'a> {
    pub ca: &'a str,
    pub cert: &'a str,
    pub key: &'a str,
}

impl CredentialKeys<'static> {
    /// The top-level `ca`, `cert` and `key`.
    pub const TOP: CredentialKeys<'static> = CredentialKeys {
        ca: "ca",
        cert: "cert",
        key: "key",
    };
}

/// Checks `creds` as of `now`; the warnings (certificates expiring soon)
/// when nothing is wrong.
pub fn check_credentials(
    file: &Path,
    keys: CredentialKeys<'_>,
    creds: &Credentials,
    now: SystemTime,
) -> Result<Vec<String>, ConfigError> {
    let bad = |key: &str, path: &Path, message: String| ConfigError::Value {
        file: file.to_path_buf(),
        key: key.to_string(),
        value: path_value(path),
        message,
    };
    for (key, path) in [
        (keys.ca, &creds.ca),
        (keys.cert, &creds.cert),
        (keys.key, &creds.key),
    ] {
        check_readable(file, key, path)?;
    }
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| bad(key, path, format!("cannot read this file: {e}")))
    };
    let certs = |key: &str, path: &Path| -> Result<Vec<X509>, ConfigError> {
        let bytes = read(key, path)?;
        match X509::stack_from_pem(&bytes) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(bad(
                key,
                path,
                "holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)".into(),
            )),
        }
    };
    let ca = certs(keys.ca, &creds.ca)?;
    let chain = certs(keys.cert, &creds.cert)?;
    let key = PKey::private_key_from_pem(&read(keys.key, &creds.key)?).map_err(|_| {
        bad(
            keys.key,
            &creds.key,
            "holds no PEM private key (expected -----BEGIN PRIVATE KEY----- or similar)".into(),
        )
    })?;
    let now_asn1 = Asn1Time::from_unix(unix(now))
        .map_err(|e| bad(keys.cert, &creds.cert, format!("reading the time: {e}")))?;
    let leaf = &chain[0];
    let matches = leaf
        .public_key()
        .map(|p| p.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(bad(
            keys.key,
            &creds.key,
            format!(
                "is not the key of the certificate in {} = {} (a key of another identity?)",
                keys.cert,
                path_value(&creds.cert)
            ),
        ));
    }
    let mut warnings = Vec::new();
    match validity(leaf, &now_asn1) {
        Validity::NotYet(t) => {
            return Err(bad(
                keys.cert,
                &creds.cert,
                format!("not valid before {t} (is the clock right?)"),
            ))
        }
        Validity::Expired(t) => return Err(bad(keys.cert, &creds.cert, format!("expired on {t}"))),
        Validity::Valid { days_left, until } if days_left < warn_days() => {
            warnings.push(format!(
                "{}: {} = {}: expires on {until} (in {})",
                file.display(),
                keys.cert,
                path_value(&creds.cert),
                days(days_left)
            ));
        }
        Validity::Valid { .. } => {}
    }
    let mut usable_ca = false;
    for c in &ca {
        match validity(c, &now_asn1) {
            Validity::Valid { days_left, until } => {
                usable_ca = true;
                if days_left < warn_days() {
                    warnings.push(format!(
                        "{}: {} = {}: a CA certificate expires on {until} (in {})",
                        file.display(),
                        keys.ca,
                        path_value(&creds.ca),
                        days(days_left)
                    ));
                }
            }
            Validity::NotYet(_) | Validity::Expired(_) => {}
        }
    }
    if !usable_ca {
        return Err(bad(
            keys.ca,
            &creds.ca,
            "every CA certificate in it is expired or not yet valid".into(),
        ));
    }
    if let Err(why) = chains_to(leaf, &chain[1..], &ca) {
        return Err(bad(
            keys.cert,
            &creds.cert,
            format!(
                "does not chain to the CA in {} = {}: {why}",
                keys.ca,
                path_value(&creds.ca)
            ),
        ));
    }
    Ok(warnings)
}

fn days(n: i32) -> String {
    match n {
        0 => "less than a day".into(),
        1 => "1 day".into(),
        n => format!("{n} days"),
    }
}

fn warn_days() -> i32 {
    (EXPIRY_WARNING.as_secs() / 86_400) as i32
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

enum Validity {
    NotYet(String),
    Expired(String),
    Valid { days_left: i32, until: String },
}

fn validity(c: &X509, now: &Asn1TimeRef) -> Validity {
    if c.not_before() > now {
        return Validity::NotYet(c.not_before().to_string());
    }
    if c.not_after() < now {
        return Validity::Expired(c.not_after().to_string());
    }
    let days_left = now.diff(c.not_after()).map(|d| d.days).unwrap_or(i32::MAX);
    Validity::Valid {
        days_left,
        until: c.not_after().to_string(),
    }
}

/// Verifies `leaf` (with the intermediates sent alongside it) against the
/// CA certificates; OpenSSL's reason when it does not.
fn chains_to(leaf: &X509, intermediates: &[X509], ca: &[X509]) -> Result<(), String> {
    let fail = |e: openssl::error::ErrorStack| e.to_string();
    let mut store = X509StoreBuilder::new().map_err(fail)?;
    for c in ca {
        store.add_cert(c.clone()).map_err(fail)?;
    }
    let store = store.build();
    let mut chain = Stack::new().map_err(fail)?;
    for c in intermediates {
        chain.push(c.clone()).map_err(fail)?;
    }
    let mut ctx = X509StoreContext::new().map_err(fail)?;
    let (ok, err) = ctx
        .init(&store, leaf, &chain, |c| {
            Ok((c.verify_cert()?, c.error().error_string().to_string()))
        })
        .map_err(fail)?;
    if ok {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::pki::{issue, issue_between, new_ca, San};

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("dots-certcheck-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn check(creds: &Credentials) -> Result<Vec<String>, ConfigError> {
        check_credentials(
            Path::new("agent.toml"),
            CredentialKeys::TOP,
            creds,
            SystemTime::now(),
        )
    }

    /// A CA and a leaf in `d`, as ca.pem / leaf.pem / leaf.key.
    fn setup(d: &Path, leaf_days: u32) -> Credentials {
        let ca = new_ca("ca", 365).unwrap();
        ca.write(d, "ca").unwrap();
        let leaf = issue(&ca, "cpe1", &[San::parse("cpe1")], leaf_days).unwrap();
        let (cert, key) = leaf.write(d, "leaf").unwrap();
        Credentials {
            ca: d.join("ca.pem"),
            cert,
            key,
        }
    }

    fn message(e: ConfigError) -> (String, String) {
        (e.key().unwrap_or_default().to_string(), e.to_string())
    }

    #[test]
    fn a_good_set_passes_and_warns_only_when_expiring() {
        let d = dir("good");
        assert_eq!(check(&setup(&d.0, 365)).unwrap(), Vec::<String>::new());
        let w = check(&setup(&d.0, 10)).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("cert = ") && w[0].contains("expires on"),
            "{w:?}"
        );
    }

    #[test]
    fn an_expired_certificate_is_an_error() {
        let d = dir("expired");
        let mut creds = setup(&d.0, 365);
        let ca = crate::pki::Identity::load(&creds.ca, &d.0.join("ca.key")).unwrap();
        let now = unix(SystemTime::now());
        let old = issue_between(&ca, "old", &[], now - 20 * 86_400, now - 86_400).unwrap();
        (creds.cert, creds.key) = old.write(&d.0, "old").unwrap();
        let (key, msg) = message(check(&creds).unwrap_err());
        assert_eq!(key, "cert");
        assert!(msg.contains("expired on"), "{msg}");
    }

    #[test]
    fn a_key_of_another_certificate_is_an_error() {
        let d = dir("mismatch");
        let mut creds = setup(&d.0, 365);
        let other = new_ca("other", 1).unwrap();
        let (_, other_key) = other.write(&d.0, "other").unwrap();
        creds.key = other_key;
        let (key, msg) = message(check(&creds).unwrap_err());
        assert_eq!(key, "key");
        assert!(msg.contains("is not the key of the certificate"), "{msg}");
    }

    #[test]
    fn garbage_files_are_errors() {
        let d = dir("garbage");
        let creds = setup(&d.0, 365);
        let junk = d.0.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        for which in ["ca", "cert", "key"] {
            let mut c = creds.clone();
            match which {
                "ca" => c.ca = junk.clone(),
                "cert" => c.cert = junk.clone(),
                _ => c.key = junk.clone(),
            }
            let (key, msg) = message(check(&c).unwrap_err());
            assert_eq!(key, which, "{msg}");
            assert!(msg.contains("holds no PEM"), "{msg}");
            assert!(msg.contains("junk.pem"), "{msg}");
        }
    }

    #[test]
    fn a_certificate_of_another_ca_is_an_error() {
        let d = dir("otherca");
        let mut creds = setup(&d.0, 365);
        let other = new_ca("other", 365).unwrap();
        other.write(&d.0, "other-ca").unwrap();
        creds.ca = d.0.join("other-ca.pem");
        let (key, msg) = message(check(&creds).unwrap_err());
        assert_eq!(key, "cert");
        assert!(msg.contains("does not chain to the CA in ca = "), "{msg}");
    }

    #[test]
    fn keys_are_named_as_configured() {
        let d = dir("keys");
        let mut creds = setup(&d.0, 365);
        creds.cert = d.0.join("missing.pem");
        let e = check_credentials(
            Path::new("agent.toml"),
            CredentialKeys {
                ca: "peers[1].ca",
                cert: "peers[1].cert",
                key: "peers[1].key",
            },
            &creds,
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("peers[1].cert"));
    }
}
