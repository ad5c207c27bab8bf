//! Credentials, OpenSSL contexts for both roles and both transports, peer
//! verification and the client-side session cache.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use openssl::{
    error::ErrorStack,
    ex_data::Index,
    hash::MessageDigest,
    memcmp,
    nid::Nid,
    pkey::{PKey, Private},
    rand::rand_bytes,
    sign::Signer,
    ssl::ErrorCode,
    ssl::{
        Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslRef, SslSession,
        SslSessionCacheMode, SslVerifyMode, SslVersion,
    },
    x509::{X509Ref, X509VerifyResult},
};

use super::{Transport, TransportError};

/// Where the certificate material of one side lives (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// CA bundle the peer's certificate must chain to.
    pub ca: PathBuf,
    /// Own certificate (chain), leaf first.
    pub cert: PathBuf,
    /// Own private key.
    pub key: PathBuf,
}

/// The reference identifier a dialer checks the listener's certificate
/// against (RFC 6125 DNS-ID, or an IP address in subjectAltName).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    Dns(String),
    Ip(IpAddr),
}

impl PeerIdentity {
    /// An IP address if `s` parses as one, else a DNS name.
    pub fn parse(s: &str) -> PeerIdentity {
        s.parse()
            .map(PeerIdentity::Ip)
            .unwrap_or_else(|_| PeerIdentity::Dns(s.to_string()))
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Dns(d) => f.write_str(d),
            PeerIdentity::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

const SESSION_ID_CONTEXT: &[u8] = b"dots-call-home";

/// AEAD suites with forward secrecy for (D)TLS 1.2; TLS 1.3 has its own list.
const CIPHERS_12: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

fn cred_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(ErrorStack) -> TransportError + 'a {
    move |source| TransportError::Credentials {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A context builder with credentials, versions, ciphers and peer
/// verification set for one role and transport.
pub(crate) fn context_builder(
    creds: &Credentials,
    transport: Transport,
    role: Role,
    allow: Option<Vec<String>>,
) -> Result<SslContextBuilder, TransportError> {
    let (method, min) = match transport {
        Transport::Udp => (SslMethod::dtls(), SslVersion::DTLS1_2),
        Transport::Tcp => (SslMethod::tls(), SslVersion::TLS1_2),
    };
    let mut b = SslContextBuilder::new(method)?;
    b.set_min_proto_version(Some(min))?;
    b.set_cipher_list(CIPHERS_12)?;
    b.set_options(SslOptions::NO_COMPRESSION | SslOptions::NO_RENEGOTIATION);
    // Free the record buffers (about 34 kB) while a connection is idle: a
    // listener holds thousands of mostly idle sessions.
    b.set_mode(openssl::ssl::SslMode::RELEASE_BUFFERS);
    if transport == Transport::Udp {
        // The MTU is set per connection (SSL_set_mtu); custom I/O cannot be asked.
        b.set_options(SslOptions::NO_QUERY_MTU);
    }
    b.set_ca_file(&creds.ca)
        .map_err(cred_err("CA bundle", &creds.ca))?;
    b.set_certificate_chain_file(&creds.cert)
        .map_err(cred_err("certificate", &creds.cert))?;
    b.set_private_key_file(&creds.key, SslFiletype::PEM)
        .map_err(cred_err("private key", &creds.key))?;
    b.check_private_key().map_err(cred_err(
        "private key (does not match the certificate)",
        &creds.key,
    ))?;
    match role {
        Role::Client => {
            b.set_verify(SslVerifyMode::PEER);
            b.set_session_cache_mode(
                SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL,
            );
        }
        Role::Server => {
            let mode = SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT;
            match allow {
                None => b.set_verify(mode),
                Some(allow) => b.set_verify_callback(mode, move |ok, ctx| {
                    if !ok || ctx.error_depth() != 0 {
                        return ok;
                    }
                    let allowed = ctx.current_cert().is_some_and(|c| identity_allowed(c, &allow));
                    if !allowed {
                        let who = ctx.current_cert().and_then(cert_identity);
                        tracing::warn!(identity = ?who, "client certificate identity not in the allow-list");
                        ctx.set_error(X509VerifyResult::APPLICATION_VERIFICATION);
                    }
                    allowed
                }),
            }
            b.set_session_id_context(SESSION_ID_CONTEXT)?;
            b.set_session_cache_mode(SslSessionCacheMode::SERVER);
        }
    }
    Ok(b)
}

/// Length of the session-ticket key block: 16-byte key name, 32-byte HMAC
/// key, 32-byte AES key (OpenSSL's `SSL_CTX_set_tlsext_ticket_keys`).
pub const TICKET_KEYS_LEN: usize = 80;

/// Sets the keys that encrypt session tickets. Persisting them lets peers
/// resume across restarts; they should be rotated like any long-term secret.
pub(crate) fn set_ticket_keys(
    b: &mut SslContextBuilder,
    keys: &[u8; TICKET_KEYS_LEN],
) -> Result<(), ErrorStack> {
    const SSL_CTRL_SET_TLSEXT_TICKET_KEYS: libc::c_int = 59;
    // SAFETY: the context is valid; OpenSSL copies the 80 bytes it is given.
    let rc = unsafe {
        openssl_sys::SSL_CTX_ctrl(
            b.as_ptr(),
            SSL_CTRL_SET_TLSEXT_TICKET_KEYS,
            TICKET_KEYS_LEN as libc::c_long,
            keys.as_ptr() as *mut libc::c_void,
        )
    };
    if rc != 1 {
        return Err(ErrorStack::get());
    }
    Ok(())
}

/// The index of the session-cache key in each client `Ssl`.
pub(crate) fn session_key_index() -> Result<Index<Ssl, String>, ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<String>()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// (D)TLS sessions kept per peer for resumption on reconnect. Filled by the
/// new-session callback of the dialer's contexts (which also catches TLS 1.3
/// tickets arriving after the handshake).
#[derive(Clone, Default)]
pub struct SessionCache {
    inner: Arc<Mutex<HashMap<String, SslSession>>>,
}

impl SessionCache {
    pub(crate) fn key(transport: Transport, peer: &PeerIdentity) -> String {
        format!("{transport}|{peer}")
    }

    pub(crate) fn get(&self, key: &str) -> Option<SslSession> {
        self.inner.lock().ok()?.get(key).cloned()
    }

    pub(crate) fn put(&self, key: String, session: SslSession) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(key, session);
        }
    }

    /// Forgets every session (next connections do full handshakes).
    pub fn clear(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Installs the callback that stores new sessions into this cache.
    pub(crate) fn install(&self, b: &mut SslContextBuilder) -> Result<(), ErrorStack> {
        let idx = session_key_index()?;
        let cache = self.clone();
        b.set_new_session_callback(move |ssl, session| {
            if let Some(key) = ssl.ex_data(idx) {
                tracing::debug!(%key, "storing session for resumption");
                cache.put(key.clone(), session);
            }
        });
        Ok(())
    }
}

/// A client `Ssl` checking `peer` and resuming a cached session if any.
pub(crate) fn client_ssl(
    ctx: &SslContext,
    peer: &PeerIdentity,
    cache: &SessionCache,
    key: String,
) -> Result<Ssl, ErrorStack> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.param_mut()
        .set_hostflags(openssl::x509::verify::X509CheckFlags::NO_PARTIAL_WILDCARDS);
    match peer {
        PeerIdentity::Dns(name) => {
            ssl.param_mut().set_host(name)?;
            ssl.set_hostname(name)?;
        }
        PeerIdentity::Ip(ip) => ssl.param_mut().set_ip(*ip)?,
    }
    if let Some(session) = cache.get(&key) {
        // SAFETY: the cache key includes the transport, and each transport has
        // one context per dialer, so the session comes from this context.
        unsafe { ssl.set_session(&session)? };
    }
    ssl.set_ex_data(session_key_index()?, key);
    Ok(ssl)
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

/// All names a certificate carries: DNS SANs, IP SANs, then the subject CN.
pub fn cert_names(cert: &X509Ref) -> Vec<String> {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(sans) = cert.subject_alt_names() {
        for n in sans.iter() {
            if let Some(d) = n.dnsname() {
                dns.push(d.to_string());
            } else if let Some(ip) = n.ipaddress().and_then(ip_from_bytes) {
                ips.push(ip.to_string());
            }
        }
    }
    dns.extend(ips);
    for e in cert.subject_name().entries_by_nid(Nid::COMMONNAME) {
        if let Ok(s) = e.data().to_string() {
            dns.push(s);
        }
    }
    dns
}

/// The identity a certificate stands for: first DNS SAN, else first IP SAN,
/// else subject CN.
pub fn cert_identity(cert: &X509Ref) -> Option<String> {
    cert_names(cert).into_iter().next()
}

/// True when one of the certificate's SANs is in `allow` (DNS names compare
/// case-insensitively). The CN counts only when the certificate has no SAN
/// (RFC 6125 §6.4.4).
pub(crate) fn identity_allowed(cert: &X509Ref, allow: &[String]) -> bool {
    let has_san = cert.subject_alt_names().is_some_and(|s| !s.is_empty());
    let names = cert_names(cert);
    let n = if has_san {
        names.len().saturating_sub(cert_cn_count(cert))
    } else {
        names.len()
    };
    names[..n]
        .iter()
        .any(|name| allow.iter().any(|a| a.eq_ignore_ascii_case(name)))
}

fn cert_cn_count(cert: &X509Ref) -> usize {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter(|e| e.data().to_string().is_ok())
        .count()
}

/// The peer's identity after a handshake (also for resumed sessions, whose
/// peer certificate is kept in the session).
pub(crate) fn peer_identity_of(ssl: &SslRef) -> Option<String> {
    ssl.peer_certificate().as_deref().and_then(cert_identity)
}

/// Checks the allow-list after the handshake (the verify callback already did
/// for full handshakes; this also covers resumed ones).
pub(crate) fn check_allowed(ssl: &SslRef, allow: Option<&[String]>) -> bool {
    match allow {
        None => true,
        Some(allow) => ssl
            .peer_certificate()
            .is_some_and(|c| identity_allowed(&c, allow)),
    }
}

/// Stateless DTLS cookies (RFC 6347 §4.2.1): HMAC-SHA256 over the peer's
/// address and port under a random per-listener secret.
pub(crate) struct CookieKey {
    key: PKey<Private>,
}

impl CookieKey {
    pub(crate) fn random() -> Result<CookieKey, ErrorStack> {
        let mut secret = [0u8; 32];
        rand_bytes(&mut secret)?;
        Ok(CookieKey {
            key: PKey::hmac(&secret)?,
        })
    }

    pub(crate) fn cookie(&self, peer: &std::net::SocketAddr) -> Result<Vec<u8>, ErrorStack> {
        let mut s = Signer::new(MessageDigest::sha256(), &self.key)?;
        match peer.ip() {
            IpAddr::V4(a) => s.update(&a.octets())?,
            IpAddr::V6(a) => s.update(&a.octets())?,
        }
        s.update(&peer.port().to_be_bytes())?;
        s.sign_to_vec()
    }

    pub(crate) fn verify(&self, peer: &std::net::SocketAddr, cookie: &[u8]) -> bool {
        match self.cookie(peer) {
            Ok(c) => c.len() == cookie.len() && memcmp::eq(&c, cookie),
            Err(_) => false,
        }
    }
}

/// The verify error of a failed handshake, if certificate verification failed.
pub(crate) fn verify_failure(ssl: &SslRef) -> Option<String> {
    let r = ssl.verify_result();
    (r != X509VerifyResult::OK).then(|| r.error_string().to_string())
}

/// Why a handshake failed, and whether the failure is the peer's
/// authentication/protocol fault (counted towards a ban).
pub(crate) fn handshake_failure(ssl: &SslRef, e: &openssl::ssl::Error) -> (String, bool) {
    if let Some(v) = verify_failure(ssl) {
        return (format!("certificate verification failed: {v}"), true);
    }
    match (e.code(), e.ssl_error(), e.io_error()) {
        (_, Some(stack), _) => {
            // A peer that hung up mid-handshake (e.g. a Happy Eyeballs loser)
            // is not an authentication failure.
            let eof = stack
                .errors()
                .iter()
                .all(|e| e.reason().is_some_and(|r| r.contains("unexpected eof")));
            (stack.to_string(), !eof && !stack.errors().is_empty())
        }
        (_, None, Some(io)) => (io.to_string(), false),
        (ErrorCode::SYSCALL, None, None) => ("connection closed by the peer".into(), false),
        (code, None, None) => (format!("{code:?}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{issue, new_ca, San};

    #[test]
    fn identity_prefers_dns_san_then_ip_then_cn() {
        let ca = new_ca("ca", 1).unwrap();
        let a = issue(
            &ca,
            "cn-a",
            &[San::parse("192.0.2.1"), San::parse("a.example")],
            1,
        )
        .unwrap();
        assert_eq!(cert_identity(&a.cert).as_deref(), Some("a.example"));
        let b = issue(&ca, "cn-b", &[San::parse("2001:db8::1")], 1).unwrap();
        assert_eq!(cert_identity(&b.cert).as_deref(), Some("2001:db8::1"));
        let c = issue(&ca, "cn-c", &[], 1).unwrap();
        assert_eq!(cert_identity(&c.cert).as_deref(), Some("cn-c"));
    }

    #[test]
    fn allow_list_uses_sans_and_cn_only_without_sans() {
        let ca = new_ca("ca", 1).unwrap();
        let a = issue(&ca, "cn-a", &[San::parse("A.example")], 1).unwrap();
        assert!(identity_allowed(&a.cert, &["a.example".into()]));
        assert!(!identity_allowed(&a.cert, &["cn-a".into()]));
        let c = issue(&ca, "cn-c", &[], 1).unwrap();
        assert!(identity_allowed(&c.cert, &["cn-c".into()]));
        assert!(!identity_allowed(&c.cert, &["other".into()]));
    }

    #[test]
    fn cookies_bind_the_address() {
        let k = CookieKey::random().unwrap();
        let p1: std::net::SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let p2: std::net::SocketAddr = "192.0.2.1:1001".parse().unwrap();
        let c = k.cookie(&p1).unwrap();
        assert!(k.verify(&p1, &c));
        assert!(!k.verify(&p2, &c));
        assert!(!k.verify(&p1, &c[..10]));
        assert!(!CookieKey::random().unwrap().verify(&p1, &c));
    }
}
